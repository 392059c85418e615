//! The convergence loop.
//!
//! Each pass reads the cluster data, finds the database assigned to this keeper and makes the
//! local PostgreSQL match it: initialise it if the local data belongs to another database,
//! write the configuration, start, promote, re-point, reconcile slots, and finally record the
//! spec generation reached. A pass runs every `sleep_interval`, and at once when the cluster
//! data changes or postgres exits. A separate task publishes the keeper's report under its
//! lease, so a long base backup never makes the keeper look dead.

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tendril_control_model::{
    ArchiveRecoverySettings, ClusterData, ClusterSpec, Db, DbInitMode, DbRole, FORMAT_VERSION,
    FollowConfig, KeeperInfo, PgVersion, PostgresState, StandbySettings, SwitchoverPhase, decode,
    encode,
};
use tendril_control_store::{KeptLease, Store, WatchEvent};
use tokio::sync::watch;

use crate::KeeperError;
use crate::config::KeeperConfig;
use crate::datadir::{DataDir, DbState, KeeperState};
use crate::fence::{self, ReportClock, Unfence};
use crate::guard::Guard;
use crate::health;
use crate::pgconf::{self, ConfInput, HbaInput, Upstream};
use crate::postgres::{Endpoint, Postgres};
use crate::sql::{self, Probe};
use crate::switchover::IdleSessionCloser;

/// TTL of the lease the keeper's report lives under. The sentinel judges liveness by the
/// report's freshness over `fail_interval`; the lease only removes reports of keepers gone.
mod init;
mod leader;
mod step_down;

const REPORT_LEASE_TTL: Duration = Duration::from_secs(10);

/// What a pass achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pass {
    /// The local PostgreSQL matches the assigned database spec.
    Converged,
    /// Nothing to do yet, and why.
    Waiting(String),
}

/// The keeper: one data directory, one PostgreSQL.
#[derive(Debug)]
pub struct Keeper<S> {
    config: KeeperConfig,
    store: S,
    data: DataDir,
    pg: Postgres,
    uid: String,
    boot_uuid: String,
    pg_version: PgVersion,
    state: KeeperState,
    db_state: DbState,
    spec: ClusterSpec,
    last_probe: Option<Probe>,
    report: watch::Sender<Option<KeeperInfo>>,
    /// How often an unchanged report is written again (from the spec, see
    /// [`fence::republish_every`]).
    republish: watch::Sender<Duration>,
    pg_crashes: u64,
    last_pg_crash: Option<String>,
    sync_change_pending: bool,
    /// When the publisher's last successful report write started (the fence's clock).
    report_clock: ReportClock,
    /// The fence guard (see [`crate::guard`]), when enabled.
    guard: Option<Arc<Guard>>,
    /// PostgreSQL runs as this cluster's master (as of the last pass).
    running_master: bool,
    /// Since when PostgreSQL is stopped by the self-fence (monotonic, and wall-clock for the
    /// report); it stays stopped until [`fence::unfence`] says otherwise.
    fenced: Option<(Instant, SystemTime)>,
    /// The last fence, as reported: when, how long, why.
    last_fence: Option<String>,
    /// While a planned switchover drains this master: ends its sessions as they go idle.
    idle_closer: Option<IdleSessionCloser>,
    /// After a failed restore from a backup: when to try again, the delay, and the error
    /// (repeated meanwhile, so the report does not change).
    restore_backoff: Option<(Instant, Duration, String)>,
    /// A standby cluster's leader not streaming from its external primary: since when, or
    /// since the last check of whether it can follow at all (see [`leader`]).
    leader_stalled: Option<Instant>,
    /// What the HTTP endpoints answer from (see [`crate::health`]).
    health: Arc<std::sync::Mutex<health::Snapshot>>,
}

impl<S: Store> Keeper<S> {
    /// Opens (and locks) the data directory and prepares the keeper; nothing is started yet.
    pub async fn build(config: KeeperConfig, store: S) -> Result<Keeper<S>, KeeperError> {
        let data = DataDir::open(&config.data_dir)?;
        let saved = data.load_keeper_state()?;
        let uid = match (&config.uid, &saved) {
            (Some(given), Some(saved)) if given != &saved.uid => {
                return Err(KeeperError::Config(format!(
                    "--uid {given} differs from the uid {} this data directory belongs to",
                    saved.uid
                )));
            }
            (Some(given), _) => given.clone(),
            (None, Some(saved)) => saved.uid.clone(),
            (None, None) => format!("{:08x}", rand::random::<u32>()),
        };
        let state = KeeperState {
            uid: uid.clone(),
            cluster_uid: saved.and_then(|s| s.cluster_uid),
        };
        data.save_keeper_state(&state)?;
        let db_state = data.load_db_state()?;
        let pg = Postgres::new(
            config.pg_bin_path.clone(),
            data.pgdata(),
            data.socket_dir(),
            data.log_file(),
            config.port,
            config.su.clone(),
            config.run_as.clone(),
        );
        let (major, minor) = pg.binary_version().await?;
        let (report, _) = watch::channel(None);
        let (republish, _) = watch::channel(fence::republish_every(&ClusterSpec::default()));
        let health = Arc::new(std::sync::Mutex::new(health::Snapshot {
            keeper_uid: uid.clone(),
            ..health::Snapshot::default()
        }));
        Ok(Keeper {
            config,
            store,
            data,
            pg,
            uid,
            boot_uuid: format!("{:016x}", rand::random::<u64>()),
            pg_version: PgVersion { major, minor },
            state,
            db_state,
            spec: ClusterSpec::default(),
            last_probe: None,
            report,
            republish,
            pg_crashes: 0,
            last_pg_crash: None,
            sync_change_pending: false,
            report_clock: ReportClock::default(),
            running_master: false,
            fenced: None,
            last_fence: None,
            idle_closer: None,
            restore_backoff: None,
            leader_stalled: None,
            guard: None,
            health,
        })
    }

    /// The keeper uid.
    pub fn uid(&self) -> &str {
        &self.uid
    }

    /// Runs until `shutdown` resolves, then stops postgres (fast) and withdraws the report.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), KeeperError> {
        tracing::info!(
            keeper = %self.uid,
            cluster = %self.config.cluster,
            data_dir = %self.data.root().display(),
            listen = %format!("{}:{}", self.config.listen_address, self.config.port),
            "keeper starting"
        );
        if self.config.fence_guard {
            match Guard::spawn(
                &self.data.root().join("fence-guard.pid"),
                self.report_clock.clone(),
            ) {
                Ok(g) => self.guard = Some(Arc::new(g)),
                Err(e) => {
                    tracing::error!(error = %e, "cannot start the fence guard: a frozen or dead keeper's master will not be stopped")
                }
            }
        }
        if let Some(addr) = self.config.metrics_address {
            let listener = tendril_metrics::bind(addr)
                .await
                .map_err(|source| KeeperError::Io {
                    op: "listen for metrics on",
                    path: addr.to_string().into(),
                    source,
                })?;
            tokio::spawn(tendril_metrics::serve_routes(
                listener,
                health::routes(self.health.clone(), self.config.cluster.clone()),
            ));
            tracing::info!(%addr, "serving /metrics, /master, /replica, /health and /status");
        }
        // A postgres left by a keeper that was killed runs with whatever role it had; it is
        // stopped so it only runs again once this keeper knows its assignment.
        self.pg.stop_stray().await?;
        let lease = Arc::new(tokio::sync::Mutex::new(KeptLease::start(
            self.store.clone(),
            REPORT_LEASE_TTL,
        )));
        let publisher = tokio::spawn(publish(
            self.store.clone(),
            self.config.keys.keeper(&self.uid),
            lease.clone(),
            self.report.subscribe(),
            self.republish.subscribe(),
            self.report_clock.clone(),
            self.guard.clone(),
        ));
        let cd_key = self.config.keys.cluster_data();
        let mut cd_watch = match self.store.watch(&cd_key, 0).await {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch cluster data, polling only");
                None
            }
        };
        tokio::pin!(shutdown);
        loop {
            let pass = self.pass().await;
            match &pass {
                Ok(Pass::Converged) => {}
                Ok(Pass::Waiting(why)) => tracing::debug!(keeper = %self.uid, why, "waiting"),
                Err(e) => tracing::warn!(keeper = %self.uid, error = %e, "pass failed"),
            }
            let failed = pass.is_err();
            if !failed {
                self.snapshot().last_pass_ok = Some(SystemTime::now());
            }
            if failed {
                // Only a pass that reads a switchover's fencing phase keeps the closer
                // running: one that failed first (the store unreachable, postgres down)
                // cannot tell whether the switchover was abandoned meanwhile.
                self.idle_closer = None;
            }
            let last_error = pass.err().map(|e| e.to_string());
            self.observe_and_report(last_error).await;
            // A failed pass (postgres not up yet after a crash) or a synchronous-standby
            // change halfway through its two steps is retried soon, not a whole interval later.
            let next = if failed || self.sync_change_pending {
                self.spec.sleep_interval.min(Duration::from_millis(300))
            } else {
                self.spec.sleep_interval
            };
            let wake = tokio::time::Instant::now() + next;
            // Until the next pass, the fence is looked at every CHECK_PERIOD.
            let stop = loop {
                self.fence_if_isolated().await;
                self.update_guard();
                tokio::select! {
                    () = tokio::time::sleep_until(wake) => break false,
                    () = tokio::time::sleep(fence::CHECK_PERIOD) => {}
                    event = next_watch_event(&mut cd_watch) => {
                        match event {
                            Some(WatchEvent::Interrupted { error }) => {
                                tracing::debug!(%error, "cluster data watch interrupted");
                            }
                            // The role checks follow a fence at once, before the pass that
                            // acts on it reads the cluster data again.
                            Some(WatchEvent::Put(kv)) => {
                                if let Ok(cd) = decode::<ClusterData>(&kv.value) {
                                    self.snapshot().read_cluster_data(
                                        &cd,
                                        cd.spec.max_standby_lag_for_reads,
                                        fence::fence_after(&cd.spec),
                                        SystemTime::now(),
                                    );
                                }
                            }
                            _ => {}
                        }
                        break false;
                    }
                    status = self.pg.exited() => {
                        self.pg_crashes += 1;
                        let note = format!(
                            "postgres exited unexpectedly ({status}) at {}",
                            humantime::format_rfc3339_seconds(SystemTime::now())
                        );
                        tracing::error!(keeper = %self.uid, %status, "postgres exited unexpectedly; restarting it");
                        self.last_pg_crash = Some(note);
                        break false;
                    }
                    () = &mut shutdown => break true,
                }
            };
            if stop {
                break;
            }
        }
        if let Some(limit) = self.config.switchover_on_stop
            && self.running_master
        {
            self.step_down(limit).await;
        }
        tracing::info!(keeper = %self.uid, "keeper stopping");
        let stopped = self.pg.stop().await;
        if let Some(guard) = &self.guard {
            guard.close();
        }
        publisher.abort();
        let lease = lease.lock().await;
        if let Some(id) = lease.id() {
            let _ = self.store.revoke_lease(id).await;
        }
        stopped
    }

    /// The endpoints' snapshot (a poisoned lock still holds the last values).
    fn snapshot(&self) -> std::sync::MutexGuard<'_, health::Snapshot> {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Tells the fence guard what to guard: this master while it runs unfenced.
    fn update_guard(&self) {
        if let Some(guard) = &self.guard {
            let target = (self.running_master && self.fenced.is_none()).then(|| self.data.pgdata());
            guard.set_target(target, fence::fence_after(&self.spec));
        }
    }

    /// Stops a master whose reports no longer reach the store, before the sentinel can
    /// elect another (see [`crate::fence`]).
    async fn fence_if_isolated(&mut self) {
        let since = self.report_clock.since();
        let limit = fence::fence_after(&self.spec);
        if self.fenced.is_some() || !fence::must_fence(self.running_master, since, limit) {
            return;
        }
        tracing::error!(
            keeper = %self.uid,
            db = %self.db_state.uid,
            since_last_report = ?since,
            limit = ?limit,
            "fencing: this master's reports have not reached the store for too long; stopping \
             PostgreSQL before another master can be elected"
        );
        self.fenced = Some((Instant::now(), SystemTime::now()));
        self.running_master = false;
        if let Err(e) = self.pg.stop().await {
            tracing::error!(keeper = %self.uid, error = %e, "fencing: cannot stop postgres");
        }
        self.observe_and_report(Some("fenced: the store is unreachable".into()))
            .await;
    }

    /// One convergence pass.
    pub async fn pass(&mut self) -> Result<Pass, KeeperError> {
        let key = self.config.keys.cluster_data();
        let read = tokio::time::timeout(fence::STORE_READ_TIMEOUT, self.store.get(&key)).await;
        let read = read.map_err(|_| KeeperError::StoreTimeout(fence::STORE_READ_TIMEOUT))?;
        let Some(kv) = read? else {
            return Ok(Pass::Waiting(format!("no cluster data at {key}")));
        };
        let cd: ClusterData = decode(&kv.value)?;
        self.spec = cd.spec.clone();
        self.republish.send_if_modified(|every| {
            let wanted = fence::republish_every(&cd.spec);
            std::mem::replace(every, wanted) != wanted
        });
        self.snapshot().read_cluster_data(
            &cd,
            cd.spec.max_standby_lag_for_reads,
            fence::fence_after(&cd.spec),
            SystemTime::now(),
        );
        if self.state.cluster_uid.as_deref() != Some(cd.uid.as_str()) {
            tracing::info!(cluster_uid = %cd.uid, "joined cluster incarnation");
            self.state.cluster_uid = Some(cd.uid.clone());
            self.data.save_keeper_state(&self.state)?;
        }
        let Some(keeper) = cd.keepers.get(&self.uid) else {
            return Ok(Pass::Waiting(
                "not yet registered in the cluster data".into(),
            ));
        };
        if keeper.status.boot_uuid.as_deref() != Some(self.boot_uuid.as_str()) {
            // The sentinel has not seen this keeper process yet: whatever the cluster data
            // says was decided without it, so postgres stays down until it has.
            self.pg.stop().await?;
            return Ok(Pass::Waiting(
                "waiting for the sentinel to acknowledge this keeper".into(),
            ));
        }
        let assigned: Vec<&Db> = cd
            .dbs
            .values()
            .filter(|d| d.spec.keeper_uid == self.uid)
            .collect();
        let db = match assigned.as_slice() {
            [] => {
                self.pg.stop().await?;
                return Ok(Pass::Waiting("no database assigned".into()));
            }
            [db] => (*db).clone(),
            many => {
                let uids: Vec<&str> = many.iter().map(|d| d.uid.as_str()).collect();
                return Err(KeeperError::Spec(format!(
                    "the cluster data assigns several databases to this keeper ({}); changing nothing",
                    uids.join(", ")
                )));
            }
        };
        if let Some((at, wall)) = self.fenced {
            let since = self.report_clock.since();
            match fence::unfence(&cd, &db, since, fence::fence_after(&cd.spec)) {
                Unfence::Lift => {
                    let fenced_for = at.elapsed();
                    tracing::info!(db = %db.uid, role = ?db.spec.role, ?fenced_for, "lifting the fence: the store answers and the cluster data says what to run");
                    self.last_fence = Some(format!(
                        "fenced its master at {} for {:.1} s: its reports did not reach the store",
                        humantime::format_rfc3339_seconds(wall),
                        fenced_for.as_secs_f64()
                    ));
                    self.fenced = None;
                }
                Unfence::Stay(why) => {
                    self.pg.stop().await?;
                    return Ok(Pass::Waiting(why));
                }
            }
        }
        self.running_master = false;
        if self.db_state.initializing {
            tracing::warn!(db = %self.db_state.uid, "an initialisation was interrupted; discarding its data");
            self.pg.stop().await?;
            self.wipe_pgdata()?;
            self.db_state = DbState::default();
            self.data.save_db_state(&self.db_state)?;
        }
        if self.db_state.uid != db.uid {
            self.initialize(&cd, &db).await?;
        }
        if db.spec.is_standby_leader() && self.data.root().join(leader::REPAIR_MARKER).exists() {
            self.repair_leader(&cd, &db).await?;
        }
        if !self.data.pgdata_initialised() {
            self.pg.stop().await?;
            return Err(KeeperError::DataVanished(self.data.pgdata()));
        }
        if let Some(expected) = db.status.system_id.as_deref().filter(|s| !s.is_empty()) {
            let found = self.pg.system_id_offline().await?;
            if found != expected {
                self.pg.stop().await?;
                return Err(KeeperError::SystemIdMismatch {
                    expected: expected.into(),
                    found,
                });
            }
        }
        if db.spec.stop {
            self.idle_closer = None;
            // A switchover stops the old master: a clean shutdown sends every byte of WAL to
            // the connected standbys before postgres exits.
            if self.pg.is_running() {
                tracing::info!(db = %db.uid, "stopping postgres as the cluster data asks");
            }
            self.pg.stop().await?;
            if self.db_state.generation != db.generation {
                self.db_state.generation = db.generation;
                self.data.save_db_state(&self.db_state)?;
            }
            return Ok(Pass::Converged);
        }
        let standby_signal = self.data.pgdata().join("standby.signal");
        let leader = db.spec.is_standby_leader();
        if !standby_signal.exists() {
            if db.spec.role == DbRole::Standby {
                return Err(KeeperError::NeverDemotes(db.uid.clone()));
            }
            if leader {
                return Err(KeeperError::NotAStandby(db.uid.clone()));
            }
        }
        let changed = self.write_config(&cd, &db)?;
        let was_running = self.pg.is_running();
        if !was_running {
            if leader {
                self.start_leader(&db, cd.spec.db_wait_ready_timeout)
                    .await?;
            } else {
                self.pg.start(cd.spec.db_wait_ready_timeout).await?;
            }
        }
        let client = self.pg.connect(cd.spec.request_timeout).await?;
        let limit = cd.spec.request_timeout;
        if changed && was_running {
            tracing::info!(db = %db.uid, "configuration changed, reloading");
            self.pg.reload()?;
        }
        if db.spec.role == DbRole::Master {
            self.running_master = true;
            // A standby cluster's leader is never promoted here: `tendrilctl promote` ends
            // its following first (the sentinel clears it), and only then does this run.
            if !leader && !sql::within(limit, "is_writable", sql::is_writable(&client)).await? {
                tracing::info!(db = %db.uid, "promoting");
                // Unbounded: a promotion cut short and tried again could find one under way.
                sql::promote(&client).await?;
                tracing::info!(db = %db.uid, "promoted: accepting writes");
            }
            let wanted: BTreeSet<String> = db
                .spec
                .followers
                .iter()
                .map(|uid| pgconf::standby_name(uid))
                .collect();
            let additional: BTreeSet<String> = db
                .spec
                .additional_replication_slots
                .iter()
                .cloned()
                .collect();
            let slots = sql::reconcile_slots(&client, &wanted, &additional);
            for change in sql::within(limit, "replication slots", slots).await? {
                tracing::info!(db = %db.uid, "{change}");
            }
            self.close_idle_sessions_if_draining(&cd, &db).await;
        } else {
            self.idle_closer = None;
        }
        let probe = sql::within(limit, "probe", sql::probe(&client)).await?;
        if leader {
            self.follow_external_primary(&cd, &db, &probe).await?;
        } else {
            self.leader_stalled = None;
        }
        if probe.pending_restart {
            if cd.spec.automatic_pg_restart {
                tracing::info!(db = %db.uid, "a changed parameter needs a restart; restarting");
                drop(client);
                self.pg.restart(cd.spec.db_wait_ready_timeout).await?;
            } else if !self.last_probe.as_ref().is_some_and(|p| p.pending_restart) {
                tracing::info!(db = %db.uid, "a changed parameter needs a restart (pending restart)");
            }
        }
        if self.db_state.generation != db.generation {
            self.db_state.generation = db.generation;
            self.data.save_db_state(&self.db_state)?;
        }
        Ok(Pass::Converged)
    }

    /// While the proxies drain this master for a planned switchover (see
    /// [`crate::switchover`]), its client sessions end as they go idle; before and after,
    /// nothing is touched.
    async fn close_idle_sessions_if_draining(&mut self, cd: &ClusterData, db: &Db) {
        let draining = cd.switchover.as_ref().is_some_and(|sw| {
            sw.phase == SwitchoverPhase::Fencing && sw.old_master.as_deref() == Some(&db.uid)
        });
        if !draining {
            self.idle_closer = None;
        } else if self
            .idle_closer
            .as_ref()
            .is_none_or(IdleSessionCloser::stopped)
        {
            // Started, or started again after its query failed. Without it the drain only
            // lasts longer (the proxies cut at the end of their grace): not worth failing the
            // pass for.
            match self.pg.connect(cd.spec.request_timeout).await {
                Ok(client) => {
                    let limit = cd.spec.convergence_timeout + cd.spec.proxy_timeout;
                    self.idle_closer = Some(IdleSessionCloser::start(client, limit));
                }
                Err(e) => {
                    tracing::warn!(db = %db.uid, error = %e, "switchover: cannot connect to end idle sessions");
                }
            }
        }
    }

    /// Writes `postgresql.conf` and `pg_hba.conf`; true if either changed.
    fn write_config(&mut self, cd: &ClusterData, db: &Db) -> Result<bool, KeeperError> {
        let pgdata = self.data.pgdata();
        let conf_path = pgdata.join("postgresql.conf");
        let current = std::fs::read_to_string(&conf_path).unwrap_or_default();
        let sync_names = if db.spec.role == DbRole::Master {
            let wanted = pgconf::wanted_sync_names(&db.spec, cd.spec.min_synchronous_standbys);
            let applied = pgconf::read_conf_value(&current, "synchronous_standby_names")
                .map(|v| pgconf::parse_sync_names(&v))
                .unwrap_or_default();
            let in_sync = self
                .last_probe
                .as_ref()
                .map(|p| p.sync_standbys.clone())
                .unwrap_or_default();
            let next = pgconf::next_sync_names(&applied, &wanted, &in_sync);
            self.sync_change_pending = next != wanted;
            if next != wanted {
                tracing::info!(db = %db.uid, ?applied, ?wanted, "changing synchronous standbys in two steps");
            }
            pgconf::render_sync_names(&next)
        } else {
            String::new()
        };
        let upstream = match db.spec.role {
            DbRole::Standby => Some(self.upstream(cd, db)?),
            DbRole::Master if db.spec.is_standby_leader() => match self.upstream(cd, db) {
                Ok(up) => Some(up),
                // The password file unreadable on this host: the leader keeps following
                // with the settings in effect (failing the pass would fail it over to a
                // standby whose host most likely lacks the file too).
                Err(e) => match pgconf::upstream_in_effect(&current) {
                    Some(up) => {
                        tracing::error!(db = %db.uid, error = %e, "keeping the standby leader's connection settings in effect");
                        Some(up)
                    }
                    None => return Err(e),
                },
            },
            DbRole::Master => None,
        };
        let socket_dir = self.data.socket_dir().to_string_lossy().into_owned();
        let params =
            pgconf::parameters(&ConfInput {
                spec: &db.spec,
                init_parameters: self.db_state.init_pg_parameters.as_ref(),
                listen_address: &self.config.listen_address,
                port: self.config.port,
                socket_dir: &socket_dir,
                upstream: upstream.as_ref(),
                synchronous_standby_names: &sync_names,
                recovery: db.spec.pitr_config.as_ref().filter(|_| {
                    db.spec.init_mode == DbInitMode::Pitr && self.db_state.initializing
                }),
            });
        let conf = pgconf::render_conf(&params);
        let hba = pgconf::render_hba(&HbaInput {
            su_user: &self.config.su.user,
            repl_user: &self.config.repl.user,
            mode: cd.spec.default_su_repl_access_mode,
            peer_addresses: pgconf::peer_addresses(cd, db),
            user_lines: db.spec.pg_hba.as_deref(),
        });
        let mut changed = false;
        for (path, text) in [(conf_path, conf), (pgdata.join("pg_hba.conf"), hba)] {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                self.pg.write_file(&path, text.as_bytes())?;
                changed = true;
            }
        }
        self.neutralise_alter_system()?;
        Ok(changed)
    }

    /// Replaces `postgresql.auto.conf` with a link to /dev/null: ALTER SYSTEM then fails (it
    /// cannot fsync /dev/null) instead of overriding the spec behind the keeper's back.
    fn neutralise_alter_system(&self) -> Result<(), KeeperError> {
        let auto = self.data.pgdata().join("postgresql.auto.conf");
        if std::fs::read_link(&auto).is_ok_and(|target| target == Path::new("/dev/null")) {
            return Ok(());
        }
        let _ = std::fs::remove_file(&auto);
        std::os::unix::fs::symlink("/dev/null", &auto)
            .map_err(|e| KeeperError::io("symlink", &auto, e))
    }

    fn upstream(&self, cd: &ClusterData, db: &Db) -> Result<Upstream, KeeperError> {
        let archive = |a: Option<&ArchiveRecoverySettings>| a.map(|a| a.restore_command.clone());
        match &db.spec.follow {
            Some(FollowConfig::Internal { .. }) => {
                let (source, _) = followed_endpoint(cd, db)?;
                let repl = &self.config.repl;
                let tls = db
                    .spec
                    .replication_tls
                    .as_ref()
                    .map_or_else(|| vec![("sslmode", "prefer".to_owned())], |t| t.conninfo());
                let pairs: Vec<(&str, String)> = [
                    ("host", source.host.clone()),
                    ("port", source.port.to_string()),
                    ("user", repl.user.clone()),
                    ("password", repl.password.clone()),
                    ("application_name", pgconf::standby_name(&db.uid)),
                    ("connect_timeout", "5".to_owned()),
                ]
                .into_iter()
                .chain(tls)
                .collect();
                Ok(Upstream {
                    conninfo: pgconf::conninfo(&pairs, ""),
                    slot: Some(pgconf::standby_name(&db.uid)),
                    restore_command: archive(db.spec.archive_recovery_settings.as_ref()),
                    min_apply_delay: None,
                })
            }
            Some(FollowConfig::External {
                standby_settings: Some(s),
                archive_recovery_settings,
            }) => {
                let ExternalPrimary {
                    mut pairs,
                    password,
                } = self.external_primary(db, s)?;
                pairs.push(("password", password));
                Ok(Upstream {
                    conninfo: pgconf::conninfo(&pairs, &s.primary_conninfo),
                    slot: s.primary_slot_name.clone(),
                    restore_command: archive(
                        archive_recovery_settings
                            .as_ref()
                            .or(db.spec.archive_recovery_settings.as_ref()),
                    ),
                    min_apply_delay: s.recovery_min_apply_delay.clone(),
                })
            }
            _ => Err(KeeperError::Spec(format!(
                "standby database {} follows nothing",
                db.uid
            ))),
        }
    }

    /// The connection to a standby cluster's external primary: its keywords (without the
    /// password) and the password, read from the spec's password file on this host or, by
    /// default, this keeper's replication password (the standby cluster replicates the
    /// primary's roles, so the two are the same).
    fn external_primary(
        &self,
        db: &Db,
        s: &StandbySettings,
    ) -> Result<ExternalPrimary, KeeperError> {
        let repl = &self.config.repl;
        let password = match &s.password_file {
            Some(file) => crate::config::password(
                "standby_config.standby_settings.password_file",
                Some(Path::new(file)),
                None,
            )
            .map_err(KeeperError::Spec)?,
            None => repl.password.clone(),
        };
        let mut pairs = Vec::new();
        if let Some(host) = &s.primary_host {
            pairs.push(("host", host.clone()));
        }
        pairs.extend([
            ("port", s.primary_port.unwrap_or(5432).to_string()),
            ("user", s.user.clone().unwrap_or_else(|| repl.user.clone())),
            ("application_name", pgconf::standby_name(&db.uid)),
            ("connect_timeout", "5".to_owned()),
            (
                "sslmode",
                s.sslmode.clone().unwrap_or_else(|| "prefer".into()),
            ),
        ]);
        Ok(ExternalPrimary { pairs, password })
    }

    fn wipe_pgdata(&self) -> Result<(), KeeperError> {
        let pgdata = self.data.pgdata();
        match std::fs::remove_dir_all(&pgdata) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(KeeperError::io("remove", &pgdata, e)),
        }
    }

    /// Observes postgres and publishes the report.
    async fn observe_and_report(&mut self, last_error: Option<String>) {
        let running = self.pg.is_running();
        let mut probe_error = None;
        let probe = if running {
            match self.pg.connect(self.spec.request_timeout).await {
                Ok(client) => sql::within(self.spec.request_timeout, "probe", sql::probe(&client))
                    .await
                    .map_err(|e| probe_error = Some(e.to_string()))
                    .ok(),
                Err(e) => {
                    probe_error = Some(e.to_string());
                    None
                }
            }
        } else {
            None
        };
        self.last_probe.clone_from(&probe);
        let checkpoint_lsn = if running || !self.data.pgdata_initialised() {
            None
        } else {
            self.pg
                .control_data()
                .await
                .ok()
                .and_then(|c| c.checkpoint_lsn)
        };
        let postgres_state = (self.data.pgdata_initialised() || running).then(|| {
            let pgdata = self.data.pgdata();
            let p = probe.clone().unwrap_or_default();
            let history = sql::timeline_history(&pgdata, 10);
            let timeline_id = if p.in_recovery {
                sql::standby_timeline(p.timeline, sql::newest_segment_timeline(&pgdata))
            } else {
                p.timeline
            };
            PostgresState {
                uid: self.db_state.uid.clone(),
                generation: self.db_state.generation,
                listen_address: self.config.advertise_address.clone(),
                port: self.config.advertise_port,
                running,
                healthy: probe.is_some() && !self.db_state.initializing,
                in_recovery: p.in_recovery,
                system_id: p.system_id.clone(),
                timeline_id,
                xlog_pos: p.xlog_pos(),
                flush_lsn: p.flush_lsn,
                receive_lsn: p.receive_lsn,
                replay_lsn: p.replay_lsn,
                streaming: p.streaming,
                checkpoint_lsn,
                timelines_history: history,
                pg_parameters: p.parameters.clone(),
                synchronous_standbys: p
                    .sync_standbys
                    .iter()
                    .filter_map(|n| n.strip_prefix(pgconf::MANAGED_PREFIX).map(str::to_owned))
                    .collect(),
                older_wal_file: sql::oldest_wal_file(&pgdata),
                pending_restart: p.pending_restart,
                archiver: p.archiver.clone(),
            }
        });
        let last_error = last_error.or(probe_error);
        self.set_report(postgres_state, last_error);
    }

    fn report_initializing(&self) {
        self.report_initializing_because("initialising the database".into());
    }

    /// The report of a database being initialised, with what holds it up.
    fn report_initializing_because(&self, why: String) {
        let state = PostgresState {
            uid: self.db_state.uid.clone(),
            listen_address: self.config.advertise_address.clone(),
            port: self.config.advertise_port,
            ..PostgresState::default()
        };
        self.set_report(Some(state), Some(why));
    }

    fn set_report(&self, postgres_state: Option<PostgresState>, last_error: Option<String>) {
        {
            let mut snap = self.snapshot();
            snap.postgres.clone_from(&postgres_state);
            snap.last_error.clone_from(&last_error);
            snap.fenced = self.fenced.is_some();
            snap.pg_crashes = self.pg_crashes;
            let probe = self.last_probe.as_ref();
            snap.streaming = probe.is_some_and(|p| p.streaming);
            snap.replication_slots = probe.map_or(0, |p| p.replication_slots);
        }
        let Some(cluster_uid) = self.state.cluster_uid.clone() else {
            return;
        };
        let info = KeeperInfo {
            format_version: FORMAT_VERSION,
            info_uid: String::new(),
            uid: self.uid.clone(),
            cluster_uid,
            boot_uuid: self.boot_uuid.clone(),
            pg_binary_version: Some(self.pg_version),
            postgres_state,
            can_be_master: self.config.can_be_master,
            can_be_synchronous_replica: self.config.can_be_synchronous_replica,
            priority: self.config.priority,
            last_error,
            pg_crashes: self.pg_crashes,
            last_pg_crash: self.last_pg_crash.clone(),
            last_fence: self.last_fence.clone(),
        };
        self.report.send_replace(Some(info));
    }
}

async fn next_watch_event(watch: &mut Option<tendril_control_store::Watch>) -> Option<WatchEvent> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

/// Publishes the latest report every second and at once when it changes, with a fresh
/// `info_uid` each time so the sentinel can tell a live keeper from a stale report.
async fn publish<S: Store>(
    store: S,
    key: String,
    lease: Arc<tokio::sync::Mutex<KeptLease>>,
    mut reports: watch::Receiver<Option<KeeperInfo>>,
    mut every: watch::Receiver<Duration>,
    clock: ReportClock,
    guard: Option<Arc<Guard>>,
) {
    let mut tick = tokio::time::interval(*every.borrow_and_update());
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            changed = reports.changed() => if changed.is_err() { return },
            changed = every.changed() => {
                if changed.is_err() {
                    return;
                }
                tick = tokio::time::interval(*every.borrow_and_update());
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                continue;
            }
        }
        let Some(mut info) = reports.borrow_and_update().clone() else {
            continue;
        };
        let id = lease.lock().await.id();
        let Some(id) = id else { continue };
        info.info_uid = format!("{:08x}", rand::random::<u32>());
        let started = std::time::Instant::now();
        match store.put(&key, encode(&info), Some(id)).await {
            Ok(_) => {
                clock.record(started);
                if let Some(guard) = &guard {
                    guard.renewed();
                }
            }
            Err(e) => tracing::debug!(error = %e, "cannot publish the keeper report"),
        }
    }
}

/// How to reach a standby cluster's external primary.
pub(crate) struct ExternalPrimary {
    /// libpq keywords and values, without the password.
    pub pairs: Vec<(&'static str, String)>,
    /// The password, kept off command lines (tools get it in `PGPASSWORD`).
    pub password: String,
}

/// The endpoint and system identifier of the database `db` follows.
fn followed_endpoint(cd: &ClusterData, db: &Db) -> Result<(Endpoint, Option<String>), KeeperError> {
    let Some(FollowConfig::Internal { db_uid }) = &db.spec.follow else {
        return Err(KeeperError::Spec(format!(
            "database {} follows no database of the cluster",
            db.uid
        )));
    };
    let source = cd.dbs.get(db_uid).ok_or_else(|| {
        KeeperError::Spec(format!(
            "database {} follows {db_uid}, which does not exist",
            db.uid
        ))
    })?;
    match (&source.status.listen_address, source.status.port) {
        (Some(host), Some(port)) => Ok((
            Endpoint {
                host: host.clone(),
                port,
            },
            source.status.system_id.clone().filter(|s| !s.is_empty()),
        )),
        _ => Err(KeeperError::Spec(format!(
            "database {db_uid} (followed by {}) has no address yet",
            db.uid
        ))),
    }
}

/// The settings of a `postgresql.conf` written by initdb or by a user: `name = value` lines,
/// comments and quotes removed. `include` directives are not followed.
pub fn read_postgresql_conf(path: &Path) -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((name, rest)) = line
            .split_once('=')
            .or_else(|| line.split_once(char::is_whitespace))
        else {
            continue;
        };
        let name = name.trim().to_ascii_lowercase();
        let rest = rest.trim();
        let value = if let Some(quoted) = rest.strip_prefix('\'') {
            let mut value = String::new();
            let mut chars = quoted.chars().peekable();
            while let Some(c) = chars.next() {
                match c {
                    '\'' if chars.peek() == Some(&'\'') => {
                        value.push('\'');
                        chars.next();
                    }
                    '\'' => break,
                    '\\' => {
                        if let Some(next) = chars.next() {
                            value.push(next);
                        }
                    }
                    other => value.push(other),
                }
            }
            value
        } else {
            rest.split('#').next().unwrap_or("").trim().to_owned()
        };
        if name == "include" || name == "include_dir" || name == "include_if_exists" {
            continue;
        }
        if !pgconf::is_managed(&name) {
            out.insert(name, value);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_initdb_style_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postgresql.conf");
        std::fs::write(
            &path,
            "# comment\nmax_connections = 100\t\t\t# (change requires restart)\n\
             shared_buffers = 128MB\nlog_timezone = 'Etc/UTC'\ndatestyle = 'iso, mdy'\n\
             lc_messages = 'it''s'\nport = 5432\ninclude 'other.conf'\n#work_mem = 4MB\n",
        )
        .unwrap();
        let p = read_postgresql_conf(&path);
        assert_eq!(p["max_connections"], "100");
        assert_eq!(p["shared_buffers"], "128MB");
        assert_eq!(p["log_timezone"], "Etc/UTC");
        assert_eq!(p["datestyle"], "iso, mdy");
        assert_eq!(p["lc_messages"], "it's");
        assert!(!p.contains_key("port"), "managed parameters are left out");
        assert!(!p.contains_key("include"));
        assert!(!p.contains_key("work_mem"));
    }
}
