//! The pure decision function: from the cluster data and what the components report, the next
//! cluster data.
//!
//! `decide` reads no clock and does no I/O: the caller passes the time ([`Now`]) and the
//! leader's in-memory timers ([`Memory`]), which a new leader starts empty so it never acts on
//! a predecessor's stale failure timers. One call is one sentinel loop:
//!
//! 1. health: keepers are healthy while their reports keep changing (`info_uid`) within
//!    `fail_interval`; a database is failed once it has been unhealthy for `fail_interval`;
//! 2. initialisation (phase `initializing`): create the first master;
//! 3. normal phase: a planned switchover if one is asked for; otherwise, if the master failed,
//!    fail over in steps (fence the proxies, wait for every live proxy to acknowledge, elect
//!    and promote, publish once writable); otherwise publish the master if needed, manage
//!    standbys and synchronous standbys;
//! 4. copy the cluster spec's settings into every database spec and bump the generation of
//!    every database spec that changed.

mod failover;
mod init;
mod standbys;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use tendril_control_model::{
    ClusterData, ClusterPhase, ClusterRole, Db, DbRole, Event, FollowConfig, Generation, Keeper,
    KeeperInfo, KeeperStatus, Lsn, ProxyInfo,
};

/// The time of a decision: a monotonic reading for timers, a wall-clock one for what is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time since an arbitrary origin.
    pub mono: Duration,
    /// Wall-clock time.
    pub wall: SystemTime,
}

/// What the components report, read by the loop just before deciding.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    /// Keeper reports by keeper uid (the leased keys present).
    pub keepers: BTreeMap<String, KeeperInfo>,
    /// Proxy reports by proxy uid (the leased keys present: a proxy whose lease expired is
    /// absent, and no longer needs to acknowledge anything).
    pub proxies: BTreeMap<String, ProxyInfo>,
}

/// The leader's timers. Empty at the start of every leadership.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// When this leadership's first decision was taken.
    started: Option<Duration>,
    /// Per keeper: the last report id seen and when it changed.
    keepers: BTreeMap<String, (String, Duration)>,
    /// Per database: since when it has been unhealthy.
    db_unhealthy_since: BTreeMap<String, Duration>,
    /// Per database: the generation it is converging to, and since when.
    converging: BTreeMap<String, (Generation, Duration)>,
    /// Per database: its last position and how many decisions it did not move.
    stalled: BTreeMap<String, (Lsn, u32)>,
    /// Keepers whose initialisation failed in this leadership: tried last.
    failed_init: BTreeSet<String>,
    /// The last error the initialising master's keeper reported, recorded as an event once.
    init_error: Option<String>,
    /// When the cluster data was last written (set by the loop).
    pub last_write: Option<Duration>,
}

/// The outcome of one decision.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The next cluster data (generation not yet bumped: the writer does that).
    pub cluster_data: ClusterData,
    /// Events recorded by this decision (also appended to `cluster_data.events`).
    pub events: Vec<Event>,
    /// Whether to write: something that matters changed, or observed positions changed and
    /// the last write is older than [`REFRESH_INTERVAL`].
    pub write: bool,
}

/// How stale the stored positions (WAL positions, timelines) may get in a steady cluster.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(5);

/// Decisions about one cluster data document.
pub(crate) struct Ctx<'a> {
    pub cd: ClusterData,
    pub obs: &'a Observations,
    pub mem: &'a mut Memory,
    pub now: Now,
    pub events: Vec<Event>,
}

impl Ctx<'_> {
    /// Records an event, unless it repeats the last one (waiting states do not pile up).
    pub fn event(&mut self, kind: &str, reason: impl Into<String>) {
        let reason = reason.into();
        let repeat = self
            .cd
            .events
            .last()
            .is_some_and(|e| e.kind == kind && e.reason == reason);
        if repeat {
            return;
        }
        tracing::info!(kind, %reason, generation = %self.cd.generation.next(), "decision");
        let event = Event {
            time: self.now.wall,
            generation: self.cd.generation.next(),
            kind: kind.to_owned(),
            reason,
        };
        self.events.push(event.clone());
        self.cd.push_event(event);
    }

    /// The report of keeper `uid`, if it belongs to this cluster.
    pub fn info(&self, uid: &str) -> Option<&KeeperInfo> {
        self.obs
            .keepers
            .get(uid)
            .filter(|i| i.cluster_uid == self.cd.uid)
    }

    /// The report of the keeper of database `db`, if it is about that database.
    pub fn db_state(&self, db: &str) -> Option<&tendril_control_model::PostgresState> {
        let keeper = &self.cd.dbs.get(db)?.spec.keeper_uid;
        self.info(keeper)?
            .postgres_state
            .as_ref()
            .filter(|s| s.uid == db)
    }

    /// Whether database `db` converged to its spec generation.
    pub fn converged(&self, db: &str) -> bool {
        self.cd
            .dbs
            .get(db)
            .is_some_and(|d| d.status.current_generation == d.generation)
    }

    /// Whether database `db` is healthy (its keeper too).
    pub fn healthy(&self, db: &str) -> bool {
        let Some(d) = self.cd.dbs.get(db) else {
            return false;
        };
        d.status.healthy
            && self
                .cd
                .keepers
                .get(&d.spec.keeper_uid)
                .is_some_and(|k| k.status.healthy)
    }

    /// Whether database `db` failed to converge in time.
    pub fn convergence_failed(&self, db: &str) -> bool {
        let Some(d) = self.cd.dbs.get(db) else {
            return false;
        };
        if d.status.current_generation == d.generation {
            return false;
        }
        let Some((_, since)) = self.mem.converging.get(db) else {
            return false;
        };
        let spec = &self.cd.spec;
        let timeout = match d.spec.init_mode {
            tendril_control_model::DbInitMode::New => spec.init_timeout,
            tendril_control_model::DbInitMode::Resync if d.generation == Generation::INITIAL => {
                spec.sync_timeout
            }
            tendril_control_model::DbInitMode::Pitr => Duration::ZERO,
            _ => spec.convergence_timeout,
        };
        !timeout.is_zero() && self.now.mono.saturating_sub(*since) > timeout
    }

    /// Healthy and converged.
    pub fn good(&self, db: &str) -> bool {
        self.healthy(db) && self.converged(db)
    }

    /// A new database uid: eight hex digits derived from the cluster, the keeper and the
    /// generation, so `decide` stays deterministic, and checked against the uids in use.
    pub fn new_db_uid(&self, keeper: &str) -> String {
        for salt in 0u64.. {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325;
            for byte in self
                .cd
                .uid
                .bytes()
                .chain(keeper.bytes())
                .chain(self.cd.generation.0.to_le_bytes())
                .chain(salt.to_le_bytes())
            {
                h ^= u64::from(byte);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
            let uid = format!("{:08x}", h as u32);
            if !self.cd.dbs.contains_key(&uid) {
                return uid;
            }
        }
        unreachable!("the salt loop is unbounded")
    }

    /// A standby database `uid` on `keeper` following `master`.
    pub fn standby_db(
        &self,
        uid: &str,
        keeper: &str,
        master: &str,
        init: tendril_control_model::DbInitMode,
    ) -> Db {
        Db {
            uid: uid.to_owned(),
            generation: Generation::INITIAL,
            change_time: self.now.wall,
            spec: tendril_control_model::DbSpec {
                keeper_uid: keeper.to_owned(),
                role: DbRole::Standby,
                init_mode: init,
                follow: Some(FollowConfig::Internal {
                    db_uid: master.to_owned(),
                }),
                ..tendril_control_model::DbSpec::default()
            },
            status: Default::default(),
        }
    }
}

/// One sentinel decision. See the module documentation.
pub fn decide(cd: &ClusterData, obs: &Observations, mem: &mut Memory, now: Now) -> Decision {
    mem.started.get_or_insert(now.mono);
    let mut ctx = Ctx {
        cd: cd.clone(),
        obs,
        mem,
        now,
        events: Vec::new(),
    };
    update_keepers(&mut ctx);
    update_dbs(&mut ctx);
    match ctx.cd.phase {
        ClusterPhase::Initializing => init::initialize(&mut ctx),
        ClusterPhase::Normal => normal(&mut ctx),
    }
    if ctx.cd.phase == ClusterPhase::Normal
        && let Some(master) = ctx.cd.master.clone()
    {
        follow_cluster_role(&mut ctx, &master);
    }
    clear_force_fail(&mut ctx);
    propagate_spec(&mut ctx.cd);
    bump_generations(cd, &mut ctx.cd, now.wall);
    track_convergence(&mut ctx);
    let significant = significant_view(cd) != significant_view(&ctx.cd);
    let stale = ctx.cd != *cd
        && ctx
            .mem
            .last_write
            .is_none_or(|t| now.mono.saturating_sub(t) >= REFRESH_INTERVAL);
    Decision {
        cluster_data: ctx.cd,
        events: ctx.events,
        write: significant || stale,
    }
}

fn normal(ctx: &mut Ctx<'_>) {
    remove_dead_keepers(ctx);
    if ctx.cd.switchover.is_some() {
        failover::switchover(ctx);
        return;
    }
    let Some(master) = ctx.cd.master.clone().filter(|m| ctx.cd.dbs.contains_key(m)) else {
        ctx.event(
            "no master",
            "the cluster data names no existing master database",
        );
        failover::fence(ctx, false, "no master database");
        return;
    };
    let forced = ctx
        .cd
        .keepers
        .get(&ctx.cd.dbs[&master].spec.keeper_uid)
        .is_some_and(|k| k.status.force_fail);
    // A failover that told a live master's keeper to stop it goes on until the standby is
    // promoted (stopping changes the master's generation, which restarts its convergence
    // timer and can make it look healthy again). A switchover's stop holds; this does not.
    let p = &ctx.cd.proxy;
    let demoting = ctx.cd.dbs[&master].spec.stop && p.master.is_none() && !p.hold;
    if !ctx.healthy(&master) || ctx.convergence_failed(&master) || forced || demoting {
        failover::failover(ctx, &master, forced);
        return;
    }
    if ctx.cd.dbs[&master].spec.stop {
        // A master left stopped by an abandoned switchover runs again.
        if let Some(d) = ctx.cd.dbs.get_mut(&master) {
            d.spec.stop = false;
        }
    }
    failover::publish(ctx, &master);
    if ctx.good(&master) {
        standbys::manage(ctx, &master, None);
    }
}

/// The master follows the external primary exactly while the cluster is a standby cluster,
/// with the spec's current settings. The cluster's role turning to master (`tendrilctl
/// promote`) is the one path that makes a standby leader writable: its keeper promotes it
/// once it no longer follows anything.
fn follow_cluster_role(ctx: &mut Ctx<'_>, master: &str) {
    let wanted = match ctx.cd.spec.role {
        ClusterRole::Master => None,
        ClusterRole::Standby => Some(FollowConfig::external(&ctx.cd.spec)),
    };
    let Some(db) = ctx.cd.dbs.get_mut(master) else {
        return;
    };
    if db.spec.follow == wanted {
        return;
    }
    let was_leader = db.spec.is_standby_leader();
    db.spec.follow = wanted;
    if was_leader && db.spec.follow.is_none() {
        let keeper = db.spec.keeper_uid.clone();
        ctx.event(
            "promote cluster",
            format!(
                "the cluster is now a master cluster: its standby leader {master} on keeper \
                 {keeper} stops following the external primary and is promoted"
            ),
        );
    }
}

/// Keeper health from the freshness of their reports.
fn update_keepers(ctx: &mut Ctx<'_>) {
    let now = ctx.now;
    let started = ctx.mem.started.unwrap_or(now.mono);
    let fail = ctx.cd.spec.fail_interval;
    let infos: Vec<KeeperInfo> = ctx
        .obs
        .keepers
        .values()
        .filter(|i| i.cluster_uid == ctx.cd.uid)
        .cloned()
        .collect();
    for info in &infos {
        let seen = ctx
            .mem
            .keepers
            .entry(info.uid.clone())
            .or_insert((String::new(), now.mono));
        if seen.0 != info.info_uid {
            *seen = (info.info_uid.clone(), now.mono);
        }
        if !ctx.cd.keepers.contains_key(&info.uid) {
            ctx.cd.keepers.insert(
                info.uid.clone(),
                Keeper {
                    uid: info.uid.clone(),
                    status: KeeperStatus {
                        healthy: true,
                        last_healthy_time: Some(now.wall),
                        ..KeeperStatus::default()
                    },
                },
            );
            ctx.event(
                "keeper joined",
                format!("keeper {} reports for the first time", info.uid),
            );
        }
    }
    let uids: Vec<String> = ctx.cd.keepers.keys().cloned().collect();
    for uid in uids {
        let info = infos.iter().find(|i| i.uid == uid);
        let fresh_at = match (info, ctx.mem.keepers.get(&uid)) {
            (Some(_), Some((_, at))) => *at,
            // Not reporting: healthy until fail_interval after this leadership began, so a new
            // leader does not fail anything on its first look.
            _ => started,
        };
        let fresh = now.mono.saturating_sub(fresh_at) < fail;
        let Some(keeper) = ctx.cd.keepers.get_mut(&uid) else {
            continue;
        };
        let status = &mut keeper.status;
        if let Some(info) = info {
            status.boot_uuid = Some(info.boot_uuid.clone());
            status.pg_binary_version = info.pg_binary_version;
            status.can_be_master = info.can_be_master;
            status.can_be_synchronous_replica = info.can_be_synchronous_replica;
            status.priority = info.priority;
        }
        let healthy = fresh && !status.force_fail;
        if status.healthy && !healthy {
            // Only transitions are stored, so a steady cluster writes nothing.
            status.last_healthy_time = Some(now.wall);
        }
        status.healthy = healthy;
    }
}

/// Database status from the keeper reports.
fn update_dbs(ctx: &mut Ctx<'_>) {
    let now = ctx.now.mono;
    let fail = ctx.cd.spec.fail_interval;
    let uids: Vec<String> = ctx.cd.dbs.keys().cloned().collect();
    // A standby counts as stalled only while it is behind the master: in an idle cluster
    // nobody moves, and a standby back from an outage would otherwise look stuck at once.
    let master_pos = ctx
        .cd
        .master
        .as_ref()
        .and_then(|m| ctx.db_state(m))
        .map(|s| s.xlog_pos);
    for uid in uids {
        let keeper_healthy = ctx
            .cd
            .keepers
            .get(&ctx.cd.dbs[&uid].spec.keeper_uid)
            .is_some_and(|k| k.status.healthy);
        let state = ctx.db_state(&uid).cloned();
        let ok = keeper_healthy && state.as_ref().is_some_and(|s| s.healthy);
        if ok {
            ctx.mem.db_unhealthy_since.remove(&uid);
        } else {
            ctx.mem.db_unhealthy_since.entry(uid.clone()).or_insert(now);
        }
        let healthy = ctx
            .mem
            .db_unhealthy_since
            .get(&uid)
            .is_none_or(|since| now.saturating_sub(*since) < fail);
        let stall = ctx
            .mem
            .stalled
            .entry(uid.clone())
            .or_insert((Lsn::INVALID, 0));
        let Some(db) = ctx.cd.dbs.get_mut(&uid) else {
            continue;
        };
        db.status.healthy = healthy && keeper_healthy;
        if let Some(s) = state {
            let behind = master_pos.is_some_and(|m| s.xlog_pos < m);
            if s.xlog_pos == stall.0 && behind {
                stall.1 = stall.1.saturating_add(1);
            } else {
                *stall = (s.xlog_pos, 0);
            }
            let st = &mut db.status;
            st.current_generation = s.generation;
            st.listen_address = Some(s.listen_address.clone());
            st.port = Some(s.port);
            st.streaming = s.healthy && s.streaming;
            if !s.system_id.is_empty() {
                st.system_id = Some(s.system_id.clone());
            }
            if s.healthy {
                st.timeline_id = s.timeline_id;
                st.xlog_pos = s.xlog_pos;
                st.replay_lsn = s.replay_lsn;
                st.timelines_history = s.timelines_history.clone();
                st.pg_parameters = s.pg_parameters.clone();
                st.older_wal_file = s.older_wal_file.clone();
            }
        }
    }
}

/// `force_fail` lasts one decision, except on the master's keeper, where it lasts until the
/// master has moved away (the failover takes several decisions).
fn clear_force_fail(ctx: &mut Ctx<'_>) {
    let master_keeper = ctx
        .cd
        .master
        .as_ref()
        .and_then(|m| ctx.cd.dbs.get(m))
        .map(|d| d.spec.keeper_uid.clone());
    for (uid, keeper) in &mut ctx.cd.keepers {
        if keeper.status.force_fail && Some(uid) != master_keeper.as_ref() {
            keeper.status.force_fail = false;
        }
    }
}

/// Keepers without a database that have been unhealthy for `dead_keeper_removal_interval`.
fn remove_dead_keepers(ctx: &mut Ctx<'_>) {
    let limit = ctx.cd.spec.dead_keeper_removal_interval;
    let with_db: BTreeSet<String> = ctx
        .cd
        .dbs
        .values()
        .map(|d| d.spec.keeper_uid.clone())
        .collect();
    let dead: Vec<String> = ctx
        .cd
        .keepers
        .values()
        .filter(|k| !k.status.healthy && !with_db.contains(&k.uid))
        .filter(|k| {
            k.status
                .last_healthy_time
                .is_some_and(|t| ctx.now.wall.duration_since(t).is_ok_and(|age| age > limit))
        })
        .map(|k| k.uid.clone())
        .collect();
    for uid in dead {
        ctx.cd.keepers.remove(&uid);
        ctx.event(
            "keeper removed",
            format!(
                "keeper {uid} has no database and was unhealthy for longer than {}",
                humantime::format_duration(limit)
            ),
        );
    }
}

/// Copies the cluster-level settings into every database spec.
fn propagate_spec(cd: &mut ClusterData) {
    let spec = cd.spec.clone();
    let sync_allowed = spec.synchronous_replication && spec.role == ClusterRole::Master;
    for db in cd.dbs.values_mut() {
        let s = &mut db.spec;
        s.request_timeout = spec.request_timeout;
        s.max_standbys = spec.max_standbys;
        s.use_pg_rewind = spec.use_pg_rewind;
        s.pg_parameters.clone_from(&spec.pg_parameters);
        s.pg_hba.clone_from(&spec.pg_hba);
        s.replication_tls.clone_from(&spec.replication_tls);
        s.archive_recovery_settings
            .clone_from(&spec.archive_recovery_settings);
        s.standby_bootstrap.clone_from(&spec.standby_bootstrap);
        s.additional_wal_senders = spec.additional_wal_senders;
        if s.role == DbRole::Master {
            s.additional_replication_slots
                .clone_from(&spec.additional_master_replication_slots);
        } else {
            s.additional_replication_slots.clear();
            s.synchronous_replication = false;
            s.synchronous_standbys.clear();
            s.external_synchronous_standbys.clear();
            s.followers.clear();
        }
        if !sync_allowed {
            s.synchronous_replication = false;
            s.synchronous_standbys.clear();
            s.external_synchronous_standbys.clear();
            db.status.synchronous_standbys.clear();
        }
    }
    // Followers: whoever follows each database.
    let follows: Vec<(String, String)> = cd
        .dbs
        .values()
        .filter_map(|d| match &d.spec.follow {
            Some(FollowConfig::Internal { db_uid }) => Some((db_uid.clone(), d.uid.clone())),
            _ => None,
        })
        .collect();
    for db in cd.dbs.values_mut() {
        if db.spec.role == DbRole::Master {
            let mut followers: Vec<String> = follows
                .iter()
                .filter(|(m, _)| *m == db.uid)
                .map(|(_, f)| f.clone())
                .collect();
            followers.sort();
            db.spec.followers = followers;
        }
    }
}

/// Every database whose spec changed gets the next generation.
fn bump_generations(old: &ClusterData, new: &mut ClusterData, wall: SystemTime) {
    for db in new.dbs.values_mut() {
        match old.dbs.get(&db.uid) {
            Some(before) if before.spec != db.spec => {
                db.generation = before.generation.next();
                db.change_time = wall;
            }
            _ => {}
        }
    }
}

/// Starts a convergence timer whenever a database's generation changes.
fn track_convergence(ctx: &mut Ctx<'_>) {
    let now = ctx.now.mono;
    ctx.mem
        .converging
        .retain(|uid, _| ctx.cd.dbs.contains_key(uid));
    ctx.mem
        .stalled
        .retain(|uid, _| ctx.cd.dbs.contains_key(uid));
    ctx.mem
        .db_unhealthy_since
        .retain(|uid, _| ctx.cd.dbs.contains_key(uid));
    for db in ctx.cd.dbs.values() {
        match ctx.mem.converging.get(&db.uid) {
            Some((generation, _)) if *generation == db.generation => {}
            _ => {
                ctx.mem
                    .converging
                    .insert(db.uid.clone(), (db.generation, now));
            }
        }
    }
}

/// The cluster data without what changes on every report (positions, timestamps), to tell a
/// change that must be written at once from one that can wait.
fn significant_view(cd: &ClusterData) -> ClusterData {
    let mut v = cd.clone();
    for db in v.dbs.values_mut() {
        db.status.xlog_pos = Lsn::INVALID;
        db.status.timelines_history.clear();
        db.status.older_wal_file = None;
        db.status.pg_parameters.clear();
    }
    v
}
