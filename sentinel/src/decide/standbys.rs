//! With a healthy, converged master: old masters go, invalid standbys are rebuilt, standbys are
//! assigned up to `max_standbys_per_sender`, and synchronous standbys are chosen.

use std::collections::BTreeSet;

use tendril_control_model::{
    ClusterRole, Db, DbInitMode, DbRole, FollowConfig, PLACEHOLDER_SYNC_STANDBY,
};

use super::Ctx;

/// Standby management for `master` (healthy and converged). `prefer` is a standby to make
/// synchronous first (the target of a planned switchover).
pub(super) fn manage(ctx: &mut Ctx<'_>, master: &str, prefer: Option<&str>) {
    remove_old_masters(ctx, master);
    remove_invalid(ctx, master);
    let standbys: Vec<String> = standbys(ctx, master);
    for uid in &standbys {
        let good = ctx.good(uid);
        if let Some(db) = ctx.cd.dbs.get_mut(uid) {
            if good {
                db.spec.init_mode = DbInitMode::None;
            }
            // Every standby follows the master (a re-point is a reload on the keeper).
            db.spec.follow = Some(FollowConfig::Internal {
                db_uid: master.to_owned(),
            });
        }
    }
    synchronous(ctx, master, prefer);
    count(ctx, master);
}

fn standbys(ctx: &Ctx<'_>, master: &str) -> Vec<String> {
    ctx.cd
        .dbs
        .values()
        .filter(|d| d.uid != master && d.spec.role == DbRole::Standby)
        .map(|d| d.uid.clone())
        .collect()
}

/// A former master (kept stopped since the failover) goes once the new master is up; its keeper
/// is then free and gets a new database that resyncs from the new master.
fn remove_old_masters(ctx: &mut Ctx<'_>, master: &str) {
    let old: Vec<String> = ctx
        .cd
        .dbs
        .values()
        .filter(|d| d.uid != master && d.spec.role == DbRole::Master)
        .map(|d| d.uid.clone())
        .collect();
    for uid in old {
        let keeper = ctx.cd.dbs[&uid].spec.keeper_uid.clone();
        ctx.cd.dbs.remove(&uid);
        ctx.event(
            "remove",
            format!("former master {uid} removed; keeper {keeper} will resync from {master}"),
        );
    }
}

/// Standbys on another system or a forked timeline, or that cannot catch up, are rebuilt
/// under a new database uid.
fn remove_invalid(ctx: &mut Ctx<'_>, master: &str) {
    let m = ctx.cd.dbs[master].clone();
    for uid in standbys(ctx, master) {
        let db = &ctx.cd.dbs[&uid];
        let why = invalid(&m, db).or_else(|| cannot_sync(ctx, &m, db));
        if let Some(why) = why {
            let keeper = db.spec.keeper_uid.clone();
            ctx.cd.dbs.remove(&uid);
            let new_uid = ctx.new_db_uid(&keeper);
            let standby = ctx.standby_db(&new_uid, &keeper, master, DbInitMode::Resync);
            ctx.cd.dbs.insert(new_uid.clone(), standby);
            ctx.event(
                "resync",
                format!("{uid} on keeper {keeper}: {why}; resyncing as {new_uid}"),
            );
        }
    }
}

/// Whether `db`'s data can follow `master` at all.
pub(super) fn invalid(master: &Db, db: &Db) -> Option<String> {
    if db.status.current_generation == tendril_control_model::Generation::NONE {
        return None;
    }
    if let (Some(a), Some(b)) = (&master.status.system_id, &db.status.system_id)
        && a != b
    {
        return Some(format!(
            "system identifier {b} differs from the master's {a}"
        ));
    }
    let (mtl, dtl) = (master.status.timeline_id, db.status.timeline_id);
    if mtl == 0 || dtl == 0 {
        return None;
    }
    if mtl < dtl {
        return Some(format!(
            "it is on timeline {dtl}, ahead of the master's {mtl}"
        ));
    }
    let switch = |db: &Db, tl: u32| {
        db.status
            .timelines_history
            .iter()
            .find(|h| h.timeline_id == tl)
            .map(|h| h.switch_point)
    };
    if mtl == dtl && mtl > 1 {
        if let (Some(a), Some(b)) = (switch(master, mtl - 1), switch(db, dtl - 1))
            && a != b
        {
            return Some(format!("timeline {mtl} forked at {b}, the master's at {a}"));
        }
    } else if mtl > dtl
        && let Some(point) = switch(master, dtl)
        && point < db.status.xlog_pos
    {
        return Some(format!(
            "it wrote past {point}, where the master's timeline {dtl} ended (timeline fork)"
        ));
    }
    None
}

/// A standby stuck behind WAL the master no longer has.
fn cannot_sync(ctx: &Ctx<'_>, master: &Db, db: &Db) -> Option<String> {
    let oldest = master.status.older_wal_file.as_deref()?;
    if db.generation == tendril_control_model::Generation::INITIAL
        || !db.status.healthy
        || db.status.xlog_pos == master.status.xlog_pos
    {
        return None;
    }
    // A standby that can read the archive (archive_recovery_settings) fetches what the
    // master recycled: it gets convergence_timeout to move before it is cloned again.
    let patience = match &db.spec.archive_recovery_settings {
        Some(_) => {
            let loops = ctx.cd.spec.convergence_timeout.as_millis()
                / ctx.cd.spec.sleep_interval.as_millis().max(1);
            u32::try_from(loops).unwrap_or(u32::MAX).max(10)
        }
        None => 10,
    };
    let stalled = ctx
        .mem
        .stalled
        .get(&db.uid)
        .is_some_and(|(_, n)| *n > patience);
    let needed = db.status.xlog_pos.wal_file_name(1, 16 * 1024 * 1024);
    // Compare without the timeline: the segment number is what must still exist.
    (stalled && &needed[8..] < oldest.get(8..).unwrap_or("")).then(|| {
        format!(
            "it needs WAL segment {} but the master's oldest is {oldest}",
            &needed[8..]
        )
    })
}

/// Standby count: up to `max_standbys_per_sender` good or converging standbys; free keepers
/// replace failed ones; excess ones go (never synchronous ones).
fn count(ctx: &mut Ctx<'_>, master: &str) {
    let per_sender = ctx.cd.spec.max_standbys_per_sender as usize;
    let sync: BTreeSet<String> = ctx.cd.dbs[master]
        .spec
        .synchronous_standbys
        .iter()
        .cloned()
        .collect();
    let all = standbys(ctx, master);
    let (mut good, rest): (Vec<String>, Vec<String>) = all.into_iter().partition(|u| ctx.good(u));
    let converging: Vec<String> = rest
        .iter()
        .filter(|u| !ctx.convergence_failed(u) && ctx.healthy(u))
        .cloned()
        .collect();
    if good.len() >= per_sender {
        for uid in rest.iter().filter(|u| !sync.contains(*u)) {
            remove(ctx, uid, "enough good standbys without it");
        }
        // Least advanced go first; synchronous ones stay.
        good.sort_by_key(|u| std::cmp::Reverse(ctx.cd.dbs[u].status.xlog_pos));
        let mut kept = 0;
        for uid in good {
            if kept < per_sender || sync.contains(&uid) {
                kept += 1;
            } else {
                remove(
                    ctx,
                    &uid,
                    &format!("more than max_standbys_per_sender ({per_sender})"),
                );
            }
        }
        return;
    }
    let mut wanted = per_sender.saturating_sub(good.len() + converging.len());
    let total_cap = (ctx.cd.spec.max_standbys as usize).saturating_sub(ctx.cd.dbs.len() - 1);
    wanted = wanted.min(total_cap);
    let assigned: BTreeSet<String> = ctx
        .cd
        .dbs
        .values()
        .map(|d| d.spec.keeper_uid.clone())
        .collect();
    let free: Vec<String> = ctx
        .cd
        .keepers
        .values()
        .filter(|k| k.status.healthy && !assigned.contains(&k.uid))
        .map(|k| k.uid.clone())
        .take(wanted)
        .collect();
    for keeper in free {
        let uid = ctx.new_db_uid(&keeper);
        let db = ctx.standby_db(&uid, &keeper, master, DbInitMode::Resync);
        ctx.cd.dbs.insert(uid.clone(), db);
        ctx.event(
            "standby",
            format!("new standby {uid} on free keeper {keeper} following {master}"),
        );
    }
}

fn remove(ctx: &mut Ctx<'_>, uid: &str, why: &str) {
    if let Some(db) = ctx.cd.dbs.remove(uid) {
        ctx.event(
            "remove",
            format!(
                "standby {uid} on keeper {} removed: {why}",
                db.spec.keeper_uid
            ),
        );
    }
}

/// Synchronous standby selection. The master waits for every listed standby, so whichever
/// listed one survives has every commit. Changes happen in two steps (new members join the old
/// ones, the old leave once the new are known in sync), so a standby known to be in sync is
/// always listed. `prefer`, when eligible, takes the first place (a switchover target must be
/// in sync before it can be promoted without losing commits).
fn synchronous(ctx: &mut Ctx<'_>, master: &str, prefer: Option<&str>) {
    let spec = &ctx.cd.spec;
    let enabled = spec.synchronous_replication && spec.role == ClusterRole::Master;
    let (min, max) = (
        spec.min_synchronous_standbys as usize,
        spec.max_synchronous_standbys as usize,
    );
    let Some(m) = ctx.cd.dbs.get(master).cloned() else {
        return;
    };
    if !enabled {
        if let Some(db) = ctx.cd.dbs.get_mut(master) {
            db.spec.synchronous_replication = false;
            db.spec.synchronous_standbys.clear();
            db.spec.external_synchronous_standbys.clear();
            db.status.synchronous_standbys.clear();
        }
        return;
    }
    let reported: BTreeSet<String> = ctx
        .db_state(master)
        .map(|s| s.synchronous_standbys.iter().cloned().collect())
        .unwrap_or_default();
    let mut spec_set: BTreeSet<String> = m.spec.synchronous_standbys.iter().cloned().collect();
    let known_before: BTreeSet<String> = m.status.synchronous_standbys.iter().cloned().collect();
    let mut known: BTreeSet<String> = known_before.intersection(&spec_set).cloned().collect();
    known.extend(spec_set.intersection(&reported).cloned());
    let follows_master = |ctx: &Ctx<'_>, u: &str| {
        ctx.cd.dbs.get(u).is_some_and(|d| {
            matches!(&d.spec.follow, Some(FollowConfig::Internal { db_uid }) if db_uid == master)
        })
    };
    let good = |ctx: &Ctx<'_>, u: &str| ctx.good(u) && follows_master(ctx, u);
    if spec_set != known && spec_set.difference(&known).any(|u| !good(ctx, u)) {
        // A member that never got in sync is gone or broken: fall back to those in sync.
        spec_set = known.clone();
    }
    if spec_set == known {
        let previous = spec_set.clone();
        let mut next: Vec<String> = spec_set.iter().filter(|u| good(ctx, u)).cloned().collect();
        let by_position = |ctx: &Ctx<'_>, v: &mut Vec<String>| {
            v.sort_by_key(|u| std::cmp::Reverse(ctx.cd.dbs.get(u).map(|d| d.status.xlog_pos)));
        };
        by_position(ctx, &mut next);
        next.truncate(max);
        let mut extra: Vec<String> = standbys(ctx, master)
            .into_iter()
            .filter(|u| !next.contains(u) && good(ctx, u))
            .filter(|u| ctx.cd.dbs[u].status.timeline_id == m.status.timeline_id)
            .filter(|u| {
                ctx.cd
                    .keepers
                    .get(&ctx.cd.dbs[u].spec.keeper_uid)
                    .is_some_and(|k| k.status.can_be_synchronous_replica)
            })
            .collect();
        by_position(ctx, &mut extra);
        if let Some(p) = prefer
            && max > 0
        {
            let eligible = next.iter().chain(extra.iter()).any(|u| u == p);
            if eligible {
                next.retain(|u| u != p);
                extra.retain(|u| u != p);
                next.insert(0, p.to_owned());
                // Members pushed out by the preferred one stay candidates for the free places.
                while next.len() > max {
                    if let Some(u) = next.pop() {
                        extra.insert(0, u);
                    }
                }
            }
        }
        for u in extra {
            if next.len() >= max {
                break;
            }
            next.push(u);
        }
        if next.len() < min {
            // Keep failed previous members listed: they keep failover options if they return,
            // and commits wait rather than run without a synchronous copy.
            for u in &previous {
                if next.len() >= min {
                    break;
                }
                if ctx.cd.dbs.contains_key(u) && !next.contains(u) {
                    next.push(u.clone());
                }
            }
        }
        let mut next: BTreeSet<String> = next.into_iter().collect();
        if !previous.is_empty() && next.iter().any(|u| !previous.contains(u)) {
            next.extend(
                previous
                    .iter()
                    .filter(|u| ctx.cd.dbs.contains_key(*u))
                    .cloned(),
            );
        }
        spec_set = next;
    }
    let external = if spec_set.len() < min {
        vec![PLACEHOLDER_SYNC_STANDBY.to_owned()]
    } else {
        Vec::new()
    };
    if let Some(db) = ctx.cd.dbs.get_mut(master) {
        db.spec.synchronous_replication = true;
        db.spec.synchronous_standbys = spec_set.iter().cloned().collect();
        db.spec.external_synchronous_standbys = external;
        db.status.synchronous_standbys = known.intersection(&spec_set).cloned().collect();
    }
}
