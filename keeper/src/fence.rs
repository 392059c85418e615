//! The master's self-fence: a master whose keeper cannot reach the store stops its
//! PostgreSQL before the sentinel can elect another master, so a client that bypasses the
//! proxies (a job on a host without one, an admin's psql) never gets a write acknowledged by
//! a master that has lost the election.
//!
//! The bound comes from how the sentinel judges a keeper: alive while its reports keep
//! changing, failed once none arrived for `fail_interval`. The sentinel notes a report no
//! earlier than the keeper's write of it started, so no failover can begin before
//! `fail_interval` after the start of the keeper's last successful report write. The keeper
//! stops its master at [`fence_after`] (3/5 of `fail_interval`) after that start: 2 s before
//! the earliest failover with the defaults, enough for the check's own delay (it runs at
//! least every [`CHECK_PERIOD`] and store reads in a pass give up after
//! [`STORE_READ_TIMEOUT`]) and for PostgreSQL's fast shutdown to end every session (its
//! backends are signalled at once; the shutdown checkpoint comes after). The sentinel then
//! still fences the proxies and promotes, which adds to the margin.
//!
//! Stopping PostgreSQL is the fence: every session ends, nothing more can be written, and
//! nothing needs undoing when the store returns: if the cluster data still names this
//! database the master, published to the proxies, the keeper starts it again as it was (same
//! timeline, nothing lost); if another master was elected, it rejoins as a standby as any
//! former master does. A keeper frozen with its PostgreSQL running (SIGSTOP, a hung process)
//! or killed cannot fence itself: its fence guard ([`crate::guard`]) does, at the same bound.
//!
//! The decisions are pure functions of the observed state, so they are table-tested here.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tendril_control_model::{ClusterData, ClusterSpec, Db, DbRole};

/// How often the run loop looks at the fence while nothing else wakes it.
pub const CHECK_PERIOD: Duration = Duration::from_millis(250);
/// A pass's read of the cluster data gives up after this long, so the loop (and the fence
/// check) goes on while the store does not answer.
pub const STORE_READ_TIMEOUT: Duration = Duration::from_millis(500);

/// How long after the start of its last successful report write a master fences itself.
pub fn fence_after(spec: &ClusterSpec) -> Duration {
    spec.fail_interval * 3 / 5
}

/// How often the keeper writes its report again when nothing changed (a pass that takes
/// long, such as an initdb, observes nothing meanwhile): well within the fence limit, or
/// a master just started could find its last report older than the limit and fence
/// itself (it did, with a 1.5 s `fail_interval` and a fixed 1 s period).
pub fn republish_every(spec: &ClusterSpec) -> Duration {
    (fence_after(spec) / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
}

/// When the keeper's last report write that succeeded started, shared by the publisher
/// (which records it) and the run loop (which reads it).
#[derive(Debug, Clone, Default)]
pub struct ReportClock(Arc<Mutex<Option<Instant>>>);

impl ReportClock {
    /// A write that started at `started` succeeded.
    pub fn record(&self, started: Instant) {
        if let Ok(mut last) = self.0.lock() {
            *last = Some(last.map_or(started, |l| l.max(started)));
        }
    }

    /// When the last successful write started; `None` before the first.
    pub fn last(&self) -> Option<Instant> {
        self.0.lock().ok().and_then(|l| *l)
    }

    /// How long ago the last successful write started; `None` before the first.
    pub fn since(&self) -> Option<Duration> {
        self.last().map(|at| at.elapsed())
    }
}

/// Whether a keeper running its database as master must fence it now: its last successful
/// report started `since` ago (`None`: it never reported, so no sentinel can have counted
/// on it and its PostgreSQL is not running as master yet).
pub fn must_fence(running_master: bool, since: Option<Duration>, limit: Duration) -> bool {
    running_master && since.is_some_and(|s| s >= limit)
}

/// What a fenced keeper does once it reads the cluster data again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unfence {
    /// Lift the fence and converge as usual.
    Lift,
    /// Keep PostgreSQL stopped, for this reason.
    Stay(String),
}

/// Whether a fenced keeper may go on with its database `db`: as a standby at once (the
/// usual rejoin follows); as the master only while its reports reach the store again and
/// the proxies route to it, i.e. no failover has begun (a failover first routes the proxies
/// nowhere, and may end with this database still master, published again).
pub fn unfence(cd: &ClusterData, db: &Db, since: Option<Duration>, limit: Duration) -> Unfence {
    if db.spec.role != DbRole::Master {
        return Unfence::Lift;
    }
    if since.is_none_or(|s| s >= limit) {
        return Unfence::Stay("fenced: the keeper's reports do not reach the store yet".into());
    }
    let published = cd
        .proxy
        .master
        .as_ref()
        .is_some_and(|route| route.db_uid == db.uid);
    if published {
        Unfence::Lift
    } else {
        Unfence::Stay(
            "fenced: the proxies do not route to this master (a failover may be under way)".into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;
    use tendril_control_model::{DbInitMode, DbSpec, DbStatus, Generation, ProxyRoute};

    const LIMIT: Duration = Duration::from_secs(3);

    #[test]
    fn reports_are_written_again_well_within_the_fence_limit() {
        let mut spec = ClusterSpec::default();
        assert_eq!(republish_every(&spec), Duration::from_millis(750));
        spec.fail_interval = Duration::from_millis(1500);
        assert_eq!(fence_after(&spec), Duration::from_millis(900));
        assert_eq!(republish_every(&spec), Duration::from_millis(225));
        spec.fail_interval = Duration::from_secs(60);
        assert_eq!(republish_every(&spec), Duration::from_secs(1));
    }

    #[test]
    fn the_default_fence_comes_two_seconds_before_the_earliest_failover() {
        let spec = ClusterSpec::default();
        assert_eq!(fence_after(&spec), Duration::from_secs(3));
        assert_eq!(
            spec.fail_interval - fence_after(&spec),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn only_a_master_whose_reports_stopped_reaching_the_store_fences() {
        let s = Duration::from_secs;
        // (running as master, since last successful report, fence?)
        let table = [
            (true, Some(s(0)), false),
            (true, Some(Duration::from_millis(2_999)), false),
            (true, Some(s(3)), true),
            (true, Some(s(30)), true),
            (true, None, false),
            (false, Some(s(30)), false),
        ];
        for (master, since, expect) in table {
            assert_eq!(
                must_fence(master, since, LIMIT),
                expect,
                "{master} {since:?}"
            );
        }
    }

    fn cluster(route_to: Option<&str>) -> ClusterData {
        let mut cd = ClusterData::new("c", ClusterSpec::default(), SystemTime::now());
        cd.proxy.master = route_to.map(|uid| ProxyRoute {
            db_uid: uid.into(),
            address: "127.0.0.1".into(),
            port: 5432,
        });
        cd
    }

    fn db(role: DbRole) -> Db {
        Db {
            uid: "db0".into(),
            generation: Generation::INITIAL,
            change_time: SystemTime::now(),
            spec: DbSpec {
                role,
                init_mode: DbInitMode::None,
                ..DbSpec::default()
            },
            status: DbStatus::default(),
        }
    }

    #[test]
    fn a_fenced_master_resumes_only_while_published_and_reporting() {
        let fresh = Some(Duration::from_millis(100));
        let stale = Some(Duration::from_secs(10));
        let master = db(DbRole::Master);
        assert_eq!(
            unfence(&cluster(Some("db0")), &master, fresh, LIMIT),
            Unfence::Lift
        );
        // A failover under way: the proxies route nowhere, or elsewhere.
        assert!(matches!(
            unfence(&cluster(None), &master, fresh, LIMIT),
            Unfence::Stay(_)
        ));
        assert!(matches!(
            unfence(&cluster(Some("db1")), &master, fresh, LIMIT),
            Unfence::Stay(_)
        ));
        // The store answered a read but reports still do not get through.
        assert!(matches!(
            unfence(&cluster(Some("db0")), &master, stale, LIMIT),
            Unfence::Stay(_)
        ));
        assert!(matches!(
            unfence(&cluster(Some("db0")), &master, None, LIMIT),
            Unfence::Stay(_)
        ));
        // Demoted meanwhile: rejoin as any former master does.
        assert_eq!(
            unfence(&cluster(Some("db1")), &db(DbRole::Standby), stale, LIMIT),
            Unfence::Lift
        );
    }
}
