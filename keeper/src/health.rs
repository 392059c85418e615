//! The keeper's HTTP answers, in the habits of Patroni's REST API so that load balancer and
//! probe configurations carry over: `/master` (or `/primary`), `/replica`, `/health`,
//! `/status` (JSON) and `/metrics` (Prometheus). Each is a pure function of a [`Snapshot`]
//! the keeper refreshes as it works: what the cluster data last said about this keeper's
//! database, and what PostgreSQL last looked like.
//!
//! `/master` is 200 only while the cluster data names this database master **and** routes
//! the proxies to it, PostgreSQL accepts writes, and the cluster data was read recently
//! (within the fence limit). A switchover or failover fences the proxies first, so from
//! that moment the old master answers 503, before any other database is promoted: a load
//! balancer following `/master` never sees two.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use tendril_control_model::{ClusterData, DbRole, Lsn, PostgresState};

/// What the answers are computed from.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// This keeper.
    pub keeper_uid: String,
    /// The database the cluster data assigns to this keeper, and its role there.
    pub db: Option<(String, DbRole)>,
    /// The cluster's master database.
    pub cluster_master: Option<String>,
    /// The database the proxies route to.
    pub routed_master: Option<String>,
    /// This keeper's database leads a standby cluster (follows the external primary).
    pub standby_leader: bool,
    /// The master's WAL position as last reported to the cluster data.
    pub master_xlog_pos: Option<Lsn>,
    /// Standbys further behind than this (bytes) fail `/replica`.
    pub max_lag_for_reads: u64,
    /// When the cluster data was last read.
    pub cd_read_at: Option<SystemTime>,
    /// The cluster data older than this makes `/master` and `/replica` fail.
    pub stale_after: Duration,
    /// PostgreSQL as last observed.
    pub postgres: Option<PostgresState>,
    /// A standby's WAL receiver is streaming.
    pub streaming: bool,
    /// Replication slots on this instance.
    pub replication_slots: u64,
    /// PostgreSQL is stopped by the self-fence.
    pub fenced: bool,
    /// PostgreSQL exits the keeper did not ask for.
    pub pg_crashes: u64,
    /// When the last convergence pass succeeded.
    pub last_pass_ok: Option<SystemTime>,
    /// The last pass's or probe's error.
    pub last_error: Option<String>,
}

impl Snapshot {
    /// Records what a cluster data read says about this keeper's database.
    pub fn read_cluster_data(
        &mut self,
        cd: &ClusterData,
        max_lag_for_reads: u64,
        stale_after: Duration,
        now: SystemTime,
    ) {
        let mine = cd
            .dbs
            .values()
            .find(|d| d.spec.keeper_uid == self.keeper_uid);
        self.db = mine.map(|d| (d.uid.clone(), d.spec.role));
        self.standby_leader = mine.is_some_and(|d| d.spec.is_standby_leader());
        self.cluster_master.clone_from(&cd.master);
        self.routed_master = cd.proxy.master.as_ref().map(|r| r.db_uid.clone());
        self.master_xlog_pos = cd
            .master
            .as_ref()
            .and_then(|m| cd.dbs.get(m))
            .map(|d| d.status.xlog_pos);
        self.max_lag_for_reads = max_lag_for_reads;
        self.stale_after = stale_after;
        self.cd_read_at = Some(now);
    }

    fn my_db(&self) -> Option<&str> {
        self.db.as_ref().map(|(uid, _)| uid.as_str())
    }

    fn cluster_data_age(&self, now: SystemTime) -> Option<Duration> {
        self.cd_read_at
            .map(|at| now.duration_since(at).unwrap_or_default())
    }

    /// Bytes this standby's replay is behind the master's last reported position.
    pub fn lag_bytes(&self) -> Option<u64> {
        let pg = self.postgres.as_ref().filter(|p| p.in_recovery)?;
        let replayed = pg.replay_lsn.unwrap_or(pg.xlog_pos);
        Some(self.master_xlog_pos?.bytes_ahead_of(replayed))
    }
}

fn running(s: &Snapshot) -> Result<&PostgresState, String> {
    if s.fenced {
        return Err("fenced: PostgreSQL is stopped because the store is unreachable".into());
    }
    match &s.postgres {
        Some(pg) if pg.running && pg.healthy => Ok(pg),
        Some(pg) if pg.running => Err("PostgreSQL runs but does not answer".into()),
        _ => Err("PostgreSQL is not running".into()),
    }
}

fn fresh(s: &Snapshot, now: SystemTime) -> Result<(), String> {
    match s.cluster_data_age(now) {
        None => Err("the cluster data has not been read yet".into()),
        Some(age) if age > s.stale_after => Err(format!(
            "the cluster data was last read {}s ago",
            age.as_secs()
        )),
        Some(_) => Ok(()),
    }
}

/// `/health`: PostgreSQL runs and answers.
pub fn health(s: &Snapshot) -> Result<String, String> {
    let pg = running(s)?;
    let role = if pg.in_recovery { "standby" } else { "master" };
    Ok(format!("PostgreSQL runs ({role})"))
}

/// `/master` and `/primary`: this is the master clients may write to now.
pub fn master(s: &Snapshot, now: SystemTime) -> Result<String, String> {
    let pg = running(s)?;
    fresh(s, now)?;
    let mine = s.my_db().ok_or("no database is assigned to this keeper")?;
    if s.cluster_master.as_deref() != Some(mine) {
        return Err(match &s.cluster_master {
            Some(m) => format!("not the master (the master is database {m})"),
            None => "not the master (the cluster has none)".into(),
        });
    }
    if s.routed_master.as_deref() != Some(mine) {
        return Err("the proxies are fenced from this master (a switchover or failover)".into());
    }
    if s.standby_leader {
        return Err(format!(
            "the standby leader of a standby cluster (database {mine}): read-only, following \
             the external primary until `tendrilctl promote`"
        ));
    }
    if pg.in_recovery {
        return Err("PostgreSQL is still in recovery".into());
    }
    Ok(format!("master (database {mine})"))
}

/// `/replica`: a standby streaming within the lag bound for reads.
pub fn replica(s: &Snapshot, now: SystemTime) -> Result<String, String> {
    let pg = running(s)?;
    fresh(s, now)?;
    let mine = s.my_db().ok_or("no database is assigned to this keeper")?;
    if !matches!(s.db, Some((_, DbRole::Standby))) || !pg.in_recovery {
        return Err("not a standby".into());
    }
    if !s.streaming {
        return Err("not streaming from its upstream".into());
    }
    let lag = s.lag_bytes().ok_or("the master's position is unknown")?;
    if lag > s.max_lag_for_reads {
        return Err(format!(
            "{lag} bytes behind the master (the bound for reads is {})",
            s.max_lag_for_reads
        ));
    }
    Ok(format!("standby (database {mine}), {lag} bytes behind"))
}

/// The paths the keeper serves, from the snapshot it keeps current.
pub fn routes(
    snapshot: std::sync::Arc<std::sync::Mutex<Snapshot>>,
    cluster: String,
) -> tendril_metrics::Routes {
    use tendril_metrics::Reply;
    std::sync::Arc::new(move |path: &str| {
        let s = snapshot
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let now = SystemTime::now();
        Some(match path {
            "/master" | "/primary" | "/read-write" => Reply::check(master(&s, now)),
            "/replica" => Reply::check(replica(&s, now)),
            "/health" | "/healthz" => Reply::check(health(&s)),
            "/status" | "/" => Reply::json(status_json(&s, now)),
            "/metrics" => Reply::metrics(metrics(&s, &cluster, now)),
            _ => return None,
        })
    })
}

fn code(r: &Result<String, String>) -> u16 {
    if r.is_ok() { 200 } else { 503 }
}

/// `/status`: everything above as JSON.
pub fn status_json(s: &Snapshot, now: SystemTime) -> String {
    let rfc = |t: Option<SystemTime>| t.map(|t| humantime::format_rfc3339_millis(t).to_string());
    let pg = s.postgres.as_ref();
    let checks = [
        ("master", master(s, now)),
        ("replica", replica(s, now)),
        ("health", health(s)),
    ];
    let checks: serde_json::Map<String, serde_json::Value> = checks
        .into_iter()
        .map(|(name, r)| {
            let detail = match &r {
                Ok(l) | Err(l) => l.clone(),
            };
            (
                name.to_owned(),
                serde_json::json!({ "status": code(&r), "detail": detail }),
            )
        })
        .collect();
    serde_json::json!({
        "keeper": s.keeper_uid,
        "database": s.my_db(),
        "role": s.db.as_ref().map(|(_, r)| match r { DbRole::Master => "master", DbRole::Standby => "standby" }),
        "cluster_master": s.cluster_master,
        "routed_master": s.routed_master,
        "postgres": {
            "running": pg.is_some_and(|p| p.running),
            "healthy": pg.is_some_and(|p| p.healthy),
            "in_recovery": pg.is_some_and(|p| p.in_recovery),
            "timeline": pg.map(|p| p.timeline_id),
            "xlog_pos": pg.map(|p| p.xlog_pos.to_string()),
            "replay_lsn": pg.and_then(|p| p.replay_lsn).map(|l| l.to_string()),
            "streaming": s.streaming,
            "lag_bytes": s.lag_bytes(),
            "replication_slots": s.replication_slots,
            "pending_restart": pg.is_some_and(|p| p.pending_restart),
        },
        "fenced": s.fenced,
        "pg_crashes": s.pg_crashes,
        "cluster_data_read_at": rfc(s.cd_read_at),
        "last_pass_ok_at": rfc(s.last_pass_ok),
        "last_error": s.last_error,
        "checks": checks,
    })
    .to_string()
}

/// `/metrics`: Prometheus text.
pub fn metrics(s: &Snapshot, cluster: &str, now: SystemTime) -> String {
    let pg = s.postgres.as_ref();
    let labels = format!("cluster=\"{cluster}\",keeper=\"{}\"", s.keeper_uid);
    let mut out = String::new();
    let mut gauge = |name: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}"
        );
    };
    let flag = |b: bool| if b { "1" } else { "0" }.to_owned();
    gauge(
        "tendril_keeper_postgres_up",
        "PostgreSQL runs and answers the keeper's probe",
        flag(pg.is_some_and(|p| p.running && p.healthy)),
    );
    gauge(
        "tendril_keeper_master",
        "this keeper's PostgreSQL is the master clients may write to (what /master says)",
        flag(master(s, now).is_ok()),
    );
    gauge(
        "tendril_keeper_replica",
        "a streaming standby within the lag bound for reads (what /replica says)",
        flag(replica(s, now).is_ok()),
    );
    gauge(
        "tendril_keeper_in_recovery",
        "PostgreSQL is in recovery (a standby)",
        flag(pg.is_some_and(|p| p.in_recovery)),
    );
    gauge(
        "tendril_keeper_timeline",
        "PostgreSQL's timeline",
        pg.map_or(0, |p| p.timeline_id).to_string(),
    );
    gauge(
        "tendril_keeper_wal_position_bytes",
        "WAL position (flushed on a master, received or replayed on a standby)",
        pg.map_or(0, |p| p.xlog_pos.0).to_string(),
    );
    gauge(
        "tendril_keeper_replication_lag_bytes",
        "a standby's replay behind the master's last reported position (0 on a master)",
        s.lag_bytes().unwrap_or(0).to_string(),
    );
    gauge(
        "tendril_keeper_replication_slots",
        "replication slots on this instance",
        s.replication_slots.to_string(),
    );
    gauge(
        "tendril_keeper_pending_restart",
        "a changed parameter waits for a restart",
        flag(pg.is_some_and(|p| p.pending_restart)),
    );
    let archiver = pg.and_then(|p| p.archiver.as_ref());
    gauge(
        "tendril_keeper_archiving",
        "this instance archives WAL (archive_mode on a master, or always)",
        flag(archiver.is_some()),
    );
    gauge(
        "tendril_keeper_archived_wal_files",
        "WAL files archived (pg_stat_archiver.archived_count)",
        archiver.map_or(0, |a| a.archived_count).to_string(),
    );
    gauge(
        "tendril_keeper_archive_failures",
        "failed archive attempts (pg_stat_archiver.failed_count)",
        archiver.map_or(0, |a| a.failed_count).to_string(),
    );
    gauge(
        "tendril_keeper_archive_failing",
        "the last archive attempt failed",
        flag(archiver.is_some_and(|a| a.failing())),
    );
    gauge(
        "tendril_keeper_fenced",
        "PostgreSQL is stopped by the self-fence",
        flag(s.fenced),
    );
    let epoch = |t: Option<SystemTime>| {
        t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0.0, |d| d.as_secs_f64())
    };
    gauge(
        "tendril_keeper_last_pass_success_timestamp_seconds",
        "when the last convergence pass succeeded (Unix time)",
        format!("{:.3}", epoch(s.last_pass_ok)),
    );
    let _ = writeln!(
        out,
        "# HELP tendril_keeper_postgres_crashes_total PostgreSQL exits the keeper did not ask for\n\
         # TYPE tendril_keeper_postgres_crashes_total counter\n\
         tendril_keeper_postgres_crashes_total{{{labels}}} {}",
        s.pg_crashes
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pg(in_recovery: bool) -> PostgresState {
        PostgresState {
            running: true,
            healthy: true,
            in_recovery,
            xlog_pos: Lsn(1000),
            replay_lsn: in_recovery.then_some(Lsn(1000)),
            ..PostgresState::default()
        }
    }

    fn snapshot(role: DbRole, in_recovery: bool) -> Snapshot {
        Snapshot {
            keeper_uid: "k1".into(),
            db: Some(("d1".into(), role)),
            cluster_master: Some(if role == DbRole::Master { "d1" } else { "d0" }.into()),
            routed_master: Some(if role == DbRole::Master { "d1" } else { "d0" }.into()),
            master_xlog_pos: Some(Lsn(1500)),
            max_lag_for_reads: 1000,
            cd_read_at: Some(SystemTime::UNIX_EPOCH),
            stale_after: Duration::from_secs(3),
            postgres: Some(pg(in_recovery)),
            streaming: true,
            ..Snapshot::default()
        }
    }

    const NOW: SystemTime = SystemTime::UNIX_EPOCH;

    #[test]
    fn master_answers_200_only_while_named_routed_writable_and_fresh() {
        let s = snapshot(DbRole::Master, false);
        assert!(master(&s, NOW).is_ok());
        assert!(replica(&s, NOW).unwrap_err().contains("not a standby"));
        let mut fenced_proxies = s.clone();
        fenced_proxies.routed_master = None;
        assert!(
            master(&fenced_proxies, NOW)
                .unwrap_err()
                .contains("proxies are fenced")
        );
        let mut demoted = s.clone();
        demoted.cluster_master = Some("d2".into());
        assert!(
            master(&demoted, NOW)
                .unwrap_err()
                .contains("master is database d2")
        );
        let mut promoting = s.clone();
        promoting.postgres = Some(pg(true));
        assert!(master(&promoting, NOW).unwrap_err().contains("recovery"));
        let mut leader = promoting.clone();
        leader.standby_leader = true;
        assert!(
            master(&leader, NOW)
                .unwrap_err()
                .contains("standby leader of a standby cluster")
        );
        let later = NOW + Duration::from_secs(4);
        assert!(master(&s, later).unwrap_err().contains("last read 4s ago"));
        let mut self_fenced = s.clone();
        self_fenced.fenced = true;
        assert!(master(&self_fenced, NOW).unwrap_err().starts_with("fenced"));
        assert!(health(&self_fenced).is_err());
        let mut down = s;
        down.postgres.as_mut().unwrap().running = false;
        assert_eq!(master(&down, NOW).unwrap_err(), "PostgreSQL is not running");
    }

    #[test]
    fn replica_answers_200_for_a_streaming_standby_within_the_bound() {
        let s = snapshot(DbRole::Standby, true);
        assert_eq!(s.lag_bytes(), Some(500));
        assert!(replica(&s, NOW).is_ok());
        assert!(
            master(&s, NOW)
                .unwrap_err()
                .contains("master is database d0")
        );
        let mut behind = s.clone();
        behind.max_lag_for_reads = 499;
        assert!(
            replica(&behind, NOW)
                .unwrap_err()
                .contains("500 bytes behind")
        );
        let mut cut = s.clone();
        cut.streaming = false;
        assert!(replica(&cut, NOW).unwrap_err().contains("not streaming"));
        let mut unknown = s;
        unknown.master_xlog_pos = None;
        assert!(replica(&unknown, NOW).is_err());
    }

    #[test]
    fn status_and_metrics_say_the_same() {
        let s = snapshot(DbRole::Standby, true);
        let status: serde_json::Value = serde_json::from_str(&status_json(&s, NOW)).unwrap();
        assert_eq!(status["checks"]["replica"]["status"], 200);
        assert_eq!(status["checks"]["master"]["status"], 503);
        assert_eq!(status["postgres"]["lag_bytes"], 500);
        let m = metrics(&s, "c", NOW);
        assert!(
            m.contains("tendril_keeper_replica{cluster=\"c\",keeper=\"k1\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("tendril_keeper_master{cluster=\"c\",keeper=\"k1\"} 0"),
            "{m}"
        );
        assert!(
            m.contains("tendril_keeper_replication_lag_bytes{cluster=\"c\",keeper=\"k1\"} 500")
        );
    }
}
