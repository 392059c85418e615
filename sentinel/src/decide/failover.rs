//! Fencing, failover, publication and planned switchover.
//!
//! The order is the safety core: the proxy section goes to "no master" first; only when every
//! live proxy has acknowledged that generation (or its lease expired) is a new master chosen
//! and promoted; it is published only once its keeper reports it writable.

use std::time::Duration;

use tendril_control_model::{
    ClusterRole, DbInitMode, DbRole, FollowConfig, Lsn, ProxyRoute, SwitchoverPhase,
};

use super::{Ctx, standbys};

/// Sets the proxy section to "no master" (bumping its generation), unless it already is.
/// `hold`: proxies hold new connections instead of refusing them (a planned switchover).
pub(super) fn fence(ctx: &mut Ctx<'_>, hold: bool, why: &str) {
    let p = &mut ctx.cd.proxy;
    if p.master.is_none() && p.hold == hold {
        return;
    }
    p.master = None;
    p.hold = hold;
    p.generation = p.generation.next();
    p.change_time = Some(ctx.now.wall);
    let generation = p.generation;
    ctx.event(
        "fence",
        format!("proxy generation {generation}: no master routable ({why})"),
    );
}

/// Proxies that have not acknowledged the current proxy generation.
pub(super) fn unacknowledged(ctx: &Ctx<'_>) -> Vec<String> {
    let generation = ctx.cd.proxy.generation;
    ctx.obs
        .proxies
        .values()
        .filter(|p| p.generation < generation)
        .map(|p| p.uid.clone())
        .collect()
}

/// The master failed: fence, then (once acknowledged) elect and promote.
pub(super) fn failover(ctx: &mut Ctx<'_>, master: &str, forced: bool) {
    let why = if forced {
        format!("keeper of master {master} was failed by request")
    } else if ctx.convergence_failed(master) {
        format!("master {master} did not converge in time")
    } else if !ctx.healthy(master) {
        format!(
            "master {master} unhealthy for longer than {}",
            humantime::format_duration(ctx.cd.spec.fail_interval)
        )
    } else {
        format!("master {master} is being demoted by a failover")
    };
    let routed = ctx.cd.proxy.master.is_some() || ctx.cd.proxy.hold;
    let keeper = ctx.cd.dbs[master].spec.keeper_uid.clone();
    let lease = lease_left(ctx, &keeper);
    let new = match choose(ctx, master, None, ctx.cd.spec.max_standby_lag) {
        Ok(new) => new,
        Err(reasons) => {
            if lease.is_zero() {
                // A silent keeper stops its PostgreSQL by itself (its self-fence): the
                // proxies route nowhere either until it reports again.
                if routed {
                    fence(ctx, false, &why);
                }
            } else {
                // Nothing can take over and the keeper reports: its master runs again (a
                // master this failover stopped), and the proxies route to it again. A keeper
                // that fenced its master lifts the fence only once they do, and the route
                // would otherwise wait for a writable master: neither would ever move.
                if let Some(d) = ctx.cd.dbs.get_mut(master) {
                    d.spec.stop = false;
                }
                if !routed {
                    route_back(ctx, master, &reasons);
                }
            }
            ctx.event(
                "no candidate",
                format!("{why}; no standby can be promoted: {reasons}"),
            );
            return;
        }
    };
    if routed {
        fence(ctx, false, &why);
    }
    // The old master must be fenced before another is promoted, or a client that bypasses
    // the proxies could write to both. A keeper that stopped reporting fences its PostgreSQL
    // itself before its lease (fail_interval after its last report) runs out; one that still
    // reports is told to stop it, and must say it did.
    if let Some(d) = ctx.cd.dbs.get_mut(master)
        && !lease.is_zero()
        && !d.spec.stop
    {
        d.spec.stop = true;
        ctx.event(
            "demote",
            format!(
                "{why}; its keeper {keeper} still reports: stopping {master} before {new} is promoted"
            ),
        );
        return;
    }
    if routed || !unacknowledged(ctx).is_empty() {
        return;
    }
    if !lease.is_zero() && !stopped(ctx, master) {
        ctx.event(
            "waiting",
            format!(
                "{why}; not promoting {new} until keeper {keeper} reports {master} stopped, \
                 or its lease runs out (fail_interval after its last report)"
            ),
        );
        return;
    }
    let why = format!("{why}; {new} is the most advanced eligible standby");
    promote(ctx, master, &new, &why);
}

/// How long keeper `uid`'s lease has left: it runs out `fail_interval` after this leadership
/// last saw the keeper's report change (or after the leadership began, if it never did).
/// The keeper fences its PostgreSQL well before that when it cannot report
/// (keeper/src/fence.rs: three fifths of `fail_interval`).
pub(super) fn lease_left(ctx: &Ctx<'_>, uid: &str) -> Duration {
    let seen = ctx
        .mem
        .keepers
        .get(uid)
        .map(|(_, at)| *at)
        .or(ctx.mem.started)
        .unwrap_or(ctx.now.mono);
    (seen + ctx.cd.spec.fail_interval).saturating_sub(ctx.now.mono)
}

/// Whether the keeper of `db` reports it stopped at its current spec generation.
pub(super) fn stopped(ctx: &Ctx<'_>, db: &str) -> bool {
    let Some(d) = ctx.cd.dbs.get(db) else {
        return false;
    };
    d.spec.stop
        && ctx
            .db_state(db)
            .is_some_and(|s| !s.running && s.generation == d.generation)
}

/// The best standby to promote in place of `master`, or why there is none. With `target`,
/// only that keeper's database is considered.
pub(super) fn choose(
    ctx: &Ctx<'_>,
    master: &str,
    target: Option<&str>,
    max_lag: u64,
) -> Result<String, String> {
    let m = &ctx.cd.dbs[master];
    let sync = m.spec.synchronous_replication;
    let in_sync: Vec<&String> = m
        .spec
        .synchronous_standbys
        .iter()
        .filter(|u| m.status.synchronous_standbys.contains(u))
        .collect();
    let mut candidates = Vec::new();
    let mut reasons = Vec::new();
    for db in ctx.cd.dbs.values() {
        if db.uid == master || db.spec.role != DbRole::Standby {
            continue;
        }
        if target.is_some_and(|t| db.spec.keeper_uid != t) {
            continue;
        }
        if !matches!(&db.spec.follow, Some(FollowConfig::Internal { db_uid }) if db_uid == master) {
            reasons.push(format!("{} does not follow {master}", db.uid));
            continue;
        }
        let keeper = ctx.cd.keepers.get(&db.spec.keeper_uid);
        let reason = if !keeper.is_some_and(|k| k.status.healthy) {
            Some("its keeper is unhealthy".to_owned())
        } else if !keeper.is_some_and(|k| k.status.can_be_master) {
            Some("its keeper cannot be master".to_owned())
        } else if !ctx.healthy(&db.uid) || !ctx.db_state(&db.uid).is_some_and(|s| s.healthy) {
            Some("it is unhealthy".to_owned())
        } else if !ctx.converged(&db.uid) {
            Some("it has not converged to its spec yet".to_owned())
        } else if db.status.system_id.is_some()
            && m.status.system_id.is_some()
            && db.status.system_id != m.status.system_id
        {
            Some("its system identifier differs".to_owned())
        } else if db.status.timeline_id != m.status.timeline_id {
            Some(format!(
                "it is on timeline {}, the master on {}",
                db.status.timeline_id, m.status.timeline_id
            ))
        } else if sync && !in_sync.contains(&&db.uid) {
            Some("it is not a synchronous standby known to be in sync".to_owned())
        } else if !sync && m.status.xlog_pos.bytes_ahead_of(db.status.xlog_pos) > max_lag {
            Some(format!(
                "it lags {} bytes behind (max_standby_lag {max_lag})",
                m.status.xlog_pos.bytes_ahead_of(db.status.xlog_pos),
            ))
        } else {
            None
        };
        match reason {
            Some(r) => reasons.push(format!("{}: {r}", db.uid)),
            None => candidates.push(db),
        }
    }
    // Most advanced first (stolon sorts the other way round, a known flaw), then priority.
    candidates.sort_by(|a, b| {
        b.status
            .xlog_pos
            .cmp(&a.status.xlog_pos)
            .then_with(|| priority(ctx, &b.spec.keeper_uid).cmp(&priority(ctx, &a.spec.keeper_uid)))
            .then_with(|| a.uid.cmp(&b.uid))
    });
    match candidates.first() {
        Some(db) => Ok(db.uid.clone()),
        None if reasons.is_empty() => Err("no standby".into()),
        None => Err(reasons.join("; ")),
    }
}

fn priority(ctx: &Ctx<'_>, keeper: &str) -> i32 {
    ctx.cd.keepers.get(keeper).map_or(0, |k| k.status.priority)
}

/// Makes `new` the master in place of `old`: `new` promotes, the other standbys re-point to
/// it, `old` is told to stay stopped (it is removed once `new` is up, and its keeper resyncs).
pub(super) fn promote(ctx: &mut Ctx<'_>, old: &str, new: &str, why: &str) {
    let mut old_sync = ctx
        .cd
        .dbs
        .get(old)
        .map(|d| d.spec.synchronous_standbys.clone())
        .unwrap_or_default();
    old_sync.retain(|u| u != new);
    // With synchronous replication the new master must not run without a synchronous standby
    // longer than needed: besides the old master's other synchronous standbys, list at once
    // the healthy standbys (that may be synchronous) which will follow it, so commits resume
    // as soon as one of them has re-pointed and caught up, instead of waiting for the normal
    // selection to run once the new master converged. Known-in-sync starts empty: none of
    // them is electable before the new master reports it in sync.
    let max_sync = (ctx.cd.spec.max_synchronous_standbys as usize).max(1);
    let mut extra: Vec<(Lsn, String)> = ctx
        .cd
        .dbs
        .values()
        .filter(|d| d.uid != new && d.uid != old && d.spec.role == DbRole::Standby)
        .filter(|d| !old_sync.contains(&d.uid) && ctx.good(&d.uid))
        .filter(|d| {
            ctx.cd
                .keepers
                .get(&d.spec.keeper_uid)
                .is_some_and(|k| k.status.can_be_synchronous_replica)
        })
        .map(|d| (d.status.xlog_pos, d.uid.clone()))
        .collect();
    extra.sort_by(|a, b| b.cmp(a));
    for (_, uid) in extra {
        if old_sync.len() >= max_sync {
            break;
        }
        old_sync.push(uid);
    }
    old_sync.sort();
    let sync = ctx
        .cd
        .dbs
        .get(old)
        .is_some_and(|d| d.spec.synchronous_replication);
    let xlog = ctx
        .cd
        .dbs
        .get(new)
        .map_or(Lsn::INVALID, |d| d.status.xlog_pos);
    let keeper = ctx
        .cd
        .dbs
        .get(new)
        .map(|d| d.spec.keeper_uid.clone())
        .unwrap_or_default();
    let cluster_role = ctx.cd.spec.role;
    let min_sync = ctx.cd.spec.min_synchronous_standbys as usize;
    for db in ctx.cd.dbs.values_mut() {
        if db.uid == new {
            db.spec.role = DbRole::Master;
            db.spec.init_mode = DbInitMode::None;
            // A standby cluster's new leader keeps following the external primary: nothing
            // is promoted (`tendrilctl promote` alone makes it writable).
            db.spec.follow = match cluster_role {
                ClusterRole::Master => None,
                ClusterRole::Standby => Some(FollowConfig::external(&ctx.cd.spec)),
            };
            // Until one of them follows the new master and catches up, commits wait; with none
            // at all, the placeholder keeps them waiting (minimum permitting).
            db.spec.synchronous_replication = sync;
            db.spec.synchronous_standbys = if sync { old_sync.clone() } else { Vec::new() };
            db.spec.external_synchronous_standbys =
                if sync && db.spec.synchronous_standbys.len() < min_sync {
                    vec![tendril_control_model::PLACEHOLDER_SYNC_STANDBY.to_owned()]
                } else {
                    Vec::new()
                };
            db.status.synchronous_standbys.clear();
        } else if db.uid == old {
            db.spec.stop = true;
            db.spec.followers.clear();
        } else if db.spec.role == DbRole::Standby {
            db.spec.follow = Some(FollowConfig::Internal {
                db_uid: new.to_owned(),
            });
        }
    }
    ctx.cd.master = Some(new.to_owned());
    match cluster_role {
        ClusterRole::Master => ctx.event(
            "promote",
            format!("{why}: promoting {new} on keeper {keeper} (at {xlog})"),
        ),
        ClusterRole::Standby => ctx.event(
            "new leader",
            format!(
                "{why}: {new} on keeper {keeper} (at {xlog}) becomes the standby leader, \
                 following the external primary"
            ),
        ),
    }
}

/// Publishes the master to the proxies once it is writable and every live proxy has seen the
/// current generation; also follows an address change of the same master.
pub(super) fn publish(ctx: &mut Ctx<'_>, master: &str) {
    let Some(route) = route(ctx, master) else {
        return;
    };
    let current = &ctx.cd.proxy.master;
    if current.as_ref() == Some(&route) && !ctx.cd.proxy.hold {
        return;
    }
    let same_db = current.as_ref().is_some_and(|r| r.db_uid == route.db_uid);
    if !same_db {
        // A new route: only to a converged, writable master (a standby cluster's leader: in
        // recovery, following the external primary), and only after every live proxy
        // acknowledged the fence.
        let leader = ctx.cd.dbs[master].spec.is_standby_leader();
        let ready = ctx.converged(master)
            && ctx
                .db_state(master)
                .is_some_and(|s| s.healthy && s.in_recovery == leader);
        if !ready || !unacknowledged(ctx).is_empty() {
            return;
        }
    }
    set_route(ctx, route, "");
}

/// Routes the proxies to `route` in a new proxy generation; `note` ends the event's reason.
fn set_route(ctx: &mut Ctx<'_>, route: ProxyRoute, note: &str) {
    let p = &mut ctx.cd.proxy;
    p.master = Some(route.clone());
    p.hold = false;
    p.generation = p.generation.next();
    p.change_time = Some(ctx.now.wall);
    let generation = p.generation;
    ctx.event(
        "publish",
        format!(
            "proxy generation {generation}: route to {} at {}:{}{note}",
            route.db_uid, route.address, route.port
        ),
    );
}

/// Routes the proxies back to `master` with no standby to promote (`why_none`), once every
/// live proxy acknowledged the fence, whether or not it is writable yet (see [`failover`]).
fn route_back(ctx: &mut Ctx<'_>, master: &str, why_none: &str) {
    let Some(route) = route(ctx, master) else {
        return;
    };
    if !unacknowledged(ctx).is_empty() {
        return;
    }
    let note = format!(" again: its keeper reports and no standby can be promoted ({why_none})");
    set_route(ctx, route, &note);
}

fn route(ctx: &Ctx<'_>, master: &str) -> Option<ProxyRoute> {
    let db = ctx.cd.dbs.get(master)?;
    Some(ProxyRoute {
        db_uid: master.to_owned(),
        address: db.status.listen_address.clone()?,
        port: db.status.port?,
    })
}

/// One step of a planned switchover.
pub(super) fn switchover(ctx: &mut Ctx<'_>) {
    let Some(mut sw) = ctx.cd.switchover.clone() else {
        return;
    };
    let Some(master) = ctx.cd.master.clone() else {
        abandon(ctx, "there is no master");
        return;
    };
    let age = ctx
        .now
        .wall
        .duration_since(sw.requested_at)
        .unwrap_or(Duration::ZERO);
    let limit = ctx.cd.spec.convergence_timeout + ctx.cd.spec.proxy_timeout;
    match sw.phase {
        SwitchoverPhase::Requested => {
            if !ctx.healthy(&master) {
                abandon(
                    ctx,
                    &format!("master {master} is not healthy; a failover handles it"),
                );
                return;
            }
            if !ctx.converged(&master) {
                // A spec change (new synchronous standbys, parameters) is being applied.
                if age > limit {
                    abandon(
                        ctx,
                        &format!("master {master} did not converge to its spec in time"),
                    );
                }
                return;
            }
            if let Some(db) = target_not_ready(ctx, &master, sw.target_keeper.as_deref()) {
                // The chosen standby is healthy but not eligible yet (converging, or
                // asynchronous): with synchronous replication it is made synchronous first,
                // then the switch goes on, so the promotion loses no acknowledged commit.
                if age > limit {
                    abandon(
                        ctx,
                        &format!("{db} did not become eligible in time (converged and in sync)"),
                    );
                    return;
                }
                let listed = ctx.cd.dbs[&master].spec.synchronous_standbys.contains(&db);
                standbys::manage(ctx, &master, Some(&db));
                let listed_now = ctx.cd.dbs[&master].spec.synchronous_standbys.contains(&db);
                if !listed && listed_now {
                    ctx.event(
                        "switchover",
                        format!("making the target {db} a synchronous standby before switching"),
                    );
                }
                return;
            }
            let target = match choose_switchover_target(ctx, &master, sw.target_keeper.as_deref()) {
                Ok(t) => t,
                Err(why) => {
                    abandon(ctx, &why);
                    return;
                }
            };
            fence(ctx, true, &format!("switchover from {master} to {target}"));
            sw.phase = SwitchoverPhase::Fencing;
            sw.target_db = Some(target);
            sw.old_master = Some(master);
            sw.fence_generation = Some(ctx.cd.proxy.generation);
            ctx.cd.switchover = Some(sw);
        }
        SwitchoverPhase::Fencing => {
            if !unacknowledged(ctx).is_empty() {
                if age > limit {
                    abandon(ctx, "proxies did not acknowledge the fence in time");
                }
                return;
            }
            if let Some(db) = ctx.cd.dbs.get_mut(&master) {
                db.spec.stop = true;
            }
            sw.phase = SwitchoverPhase::StoppingMaster;
            ctx.cd.switchover = Some(sw);
            ctx.event(
                "switchover",
                format!("proxies fenced; stopping {master} so its standbys receive all it wrote"),
            );
        }
        SwitchoverPhase::StoppingMaster => {
            let Some(target) = sw.target_db.clone().filter(|t| ctx.cd.dbs.contains_key(t)) else {
                abandon(ctx, "the target database disappeared");
                return;
            };
            let stopped = ctx
                .db_state(&master)
                .filter(|s| !s.running && s.generation == ctx.cd.dbs[&master].generation)
                .and_then(|s| s.checkpoint_lsn);
            // The whole shutdown checkpoint record, so no other standby that has it is left
            // forked; if it does not come (the stream broke as the master stopped), the
            // record's start is enough for the data after half the time allowed.
            let caught_up = stopped.is_some_and(|checkpoint| {
                ctx.db_state(&target).is_some_and(|t| {
                    t.healthy
                        && (t.xlog_pos >= shutdown_checkpoint_end(checkpoint)
                            || (t.xlog_pos >= checkpoint && age > limit / 2))
                })
            });
            if caught_up {
                let end = stopped.unwrap_or_default();
                promote(
                    ctx,
                    &master,
                    &target,
                    &format!(
                        "switchover: {target} received everything {master} wrote (up to {end})"
                    ),
                );
                sw.phase = SwitchoverPhase::Promoting;
                ctx.cd.switchover = Some(sw);
            } else if age > limit {
                abandon(
                    ctx,
                    &format!("{target} did not catch up with the stopped {master} in time"),
                );
            }
        }
        SwitchoverPhase::Promoting => {
            publish(ctx, &master);
            if ctx.cd.proxy.master.is_some() {
                ctx.cd.switchover = None;
                let paused = ctx
                    .now
                    .wall
                    .duration_since(sw.requested_at)
                    .unwrap_or_default();
                ctx.event(
                    "switchover done",
                    format!(
                        "{master} is the master; new connections were held for {}",
                        humantime::format_duration(trim(paused))
                    ),
                );
            } else if age > limit + ctx.cd.spec.convergence_timeout {
                // The promotion itself is stuck: from here on it is an ordinary failover.
                ctx.cd.switchover = None;
                ctx.event(
                    "switchover",
                    format!("{master} did not become writable in time; leaving it to failover"),
                );
            }
        }
    }
}

/// Where the WAL of a cleanly stopped PostgreSQL 15 ends: just after its shutdown checkpoint
/// record, which starts at `start` (the control file's latest checkpoint location). The
/// target must have received the whole record: promoted at its start, it would fork from
/// every standby that did receive it (they would then need a rewind). The record is 114 bytes
/// (24-byte header, 2-byte data header, 88-byte `CheckPoint`), 120 once MAXALIGNed; a record
/// that crosses a page boundary also spans the next page's header (24 bytes, 40 at the
/// start of a 16 MiB segment).
fn shutdown_checkpoint_end(start: Lsn) -> Lsn {
    const PAGE: u64 = 8192;
    const SEGMENT: u64 = 16 * 1024 * 1024;
    const RECORD: u64 = 114;
    let room = PAGE - start.0 % PAGE;
    let end = if RECORD <= room {
        start.0 + RECORD
    } else {
        let next_page = start.0 + room;
        let header = if next_page.is_multiple_of(SEGMENT) {
            40
        } else {
            24
        };
        next_page + header + (RECORD - room)
    };
    Lsn(end.div_ceil(8) * 8)
}

fn trim(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The database of the requested target keeper when it is a healthy standby of `master` that
/// will be eligible soon: it is still converging to its spec, or (with synchronous
/// replication) it can be synchronous but is not yet known in sync.
fn target_not_ready(ctx: &Ctx<'_>, master: &str, keeper: Option<&str>) -> Option<String> {
    let keeper = keeper?;
    let m = ctx.cd.dbs.get(master)?;
    let db = ctx
        .cd
        .dbs
        .values()
        .find(|d| d.spec.keeper_uid == keeper && d.uid != master)?;
    let k = ctx.cd.keepers.get(keeper)?;
    let sync = m.spec.synchronous_replication && ctx.cd.spec.max_synchronous_standbys > 0;
    let in_sync = m.spec.synchronous_standbys.contains(&db.uid)
        && m.status.synchronous_standbys.contains(&db.uid);
    let follows =
        matches!(&db.spec.follow, Some(FollowConfig::Internal { db_uid }) if db_uid == master);
    let could_be_target = db.spec.role == DbRole::Standby
        && follows
        && k.status.healthy
        && k.status.can_be_master
        && (!sync || k.status.can_be_synchronous_replica)
        && ctx.healthy(&db.uid)
        && db.status.timeline_id == m.status.timeline_id;
    let pending = !ctx.converged(&db.uid) || (sync && !in_sync);
    (could_be_target && pending).then(|| db.uid.clone())
}

fn choose_switchover_target(
    ctx: &Ctx<'_>,
    master: &str,
    keeper: Option<&str>,
) -> Result<String, String> {
    if let Some(k) = keeper {
        let owns_master = ctx
            .cd
            .dbs
            .get(master)
            .is_some_and(|d| d.spec.keeper_uid == k);
        if owns_master {
            return Err(format!("keeper {k} already runs the master"));
        }
    }
    // The lag bound is irrelevant here: the master stops and the target catches up first.
    choose(ctx, master, keeper, u64::MAX)
        .map_err(|why| format!("no eligible switchover target: {why}"))
}

/// Gives up a switchover: the old master runs again and is published once the proxies
/// acknowledge.
fn abandon(ctx: &mut Ctx<'_>, why: &str) {
    if let Some(old) = ctx
        .cd
        .switchover
        .as_ref()
        .and_then(|s| s.old_master.clone())
        && let Some(db) = ctx.cd.dbs.get_mut(&old)
    {
        db.spec.stop = false;
    }
    ctx.cd.switchover = None;
    ctx.event("switchover abandoned", why.to_owned());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shutdown_checkpoint_ends_after_its_record() {
        let at = |t: &str| -> Lsn { t.parse().unwrap_or_default() };
        // Measured: a stopped PostgreSQL 15 whose checkpoint record starts at 0/403C360 has
        // its WAL end at 0/403C3D8.
        assert_eq!(shutdown_checkpoint_end(at("0/403C360")), at("0/403C3D8"));
        // 16 bytes before a page boundary: the rest follows the next page's header.
        // (24 + 98 = 122 bytes, MAXALIGNed to 128.)
        assert_eq!(shutdown_checkpoint_end(at("0/4001FF0")), at("0/4002080"));
        // Across a segment boundary the header is the long one.
        // (40 + 98 = 138 bytes, MAXALIGNed to 144.)
        assert_eq!(shutdown_checkpoint_end(at("0/4FFFFF0")), at("0/5000090"));
    }
}
