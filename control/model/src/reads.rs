//! The read-only listener's view of the cluster: which standbys exist, and which of them may
//! take a new read-only connection now. A pure function of the cluster data, like the
//! keeper's `/replica` check (the same rule, seen from the store instead of from
//! PostgreSQL): the proxies route by it and `tendrilctl status` shows it.
//!
//! A standby is **eligible** when its database is healthy (its keeper too), it has converged
//! to its spec (it follows the current master), its WAL receiver streams, its replay is
//! within `max_standby_lag_for_reads` bytes of the master's last reported position, and, with
//! `reads_on_synchronous_only`, the master waits for it (a synchronous standby). An eligible
//! standby that stops being one takes no new connection; its open connections stay (they
//! read a consistent snapshot, a little older). They are cut only when the database leaves
//! the cluster or is re-initialised (a new database uid): the proxy's routing table decides.

use crate::{ClusterData, DbRole, FollowConfig};

/// Why a standby takes no new read-only connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ineligible {
    /// The cluster has no master to measure the lag against.
    NoMaster,
    /// Its database or its keeper is not healthy.
    Unhealthy,
    /// It has not converged to its spec (being initialised, or re-pointed to a new master).
    NotConverged,
    /// Its WAL receiver is not streaming.
    NotStreaming,
    /// Its replay is further behind the master than `max_standby_lag_for_reads`.
    Lagging,
    /// `reads_on_synchronous_only` and the master does not wait for it.
    NotSynchronous,
}

impl Ineligible {
    /// Said in refusals and logs.
    pub fn describe(self) -> &'static str {
        match self {
            Ineligible::NoMaster => "the cluster has no master",
            Ineligible::Unhealthy => "not healthy",
            Ineligible::NotConverged => "not following the current master yet",
            Ineligible::NotStreaming => "not streaming from the master",
            Ineligible::Lagging => "further behind than max_standby_lag_for_reads",
            Ineligible::NotSynchronous => "not synchronous (reads_on_synchronous_only)",
        }
    }

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Ineligible::NoMaster => "no_master",
            Ineligible::Unhealthy => "unhealthy",
            Ineligible::NotConverged => "not_converged",
            Ineligible::NotStreaming => "not_streaming",
            Ineligible::Lagging => "lagging",
            Ineligible::NotSynchronous => "not_synchronous",
        }
    }
}

/// A standby database as the cluster data describes it, before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StandbyRoute {
    /// Its database uid.
    pub db_uid: String,
    /// Its advertised address.
    pub address: String,
    /// Its advertised port.
    pub port: u16,
    /// Whether it takes new read-only connections, or why not.
    pub eligible: Result<(), Ineligible>,
}

/// Every standby database with an address, in database-uid order, and its eligibility.
pub fn standbys(cd: &ClusterData) -> Vec<StandbyRoute> {
    let master = cd.master.as_ref().and_then(|m| cd.dbs.get(m));
    cd.dbs
        .values()
        .filter(|db| db.spec.role == DbRole::Standby && Some(&db.uid) != cd.master.as_ref())
        .filter_map(|db| {
            let address = db.status.listen_address.clone()?;
            let port = db.status.port?;
            let eligible = match master {
                None => Err(Ineligible::NoMaster),
                Some(m) => {
                    let follows_master = matches!(
                        &db.spec.follow,
                        Some(FollowConfig::Internal { db_uid }) if *db_uid == m.uid
                    );
                    // What its readers see: the replayed position (replay can be paused
                    // or slow while the WAL still arrives).
                    let replayed = db.status.replay_lsn.unwrap_or(db.status.xlog_pos);
                    let lag = m.status.xlog_pos.bytes_ahead_of(replayed);
                    if !db.status.healthy {
                        Err(Ineligible::Unhealthy)
                    } else if !follows_master || db.status.current_generation != db.generation {
                        Err(Ineligible::NotConverged)
                    } else if !db.status.streaming {
                        Err(Ineligible::NotStreaming)
                    } else if lag > cd.spec.max_standby_lag_for_reads {
                        Err(Ineligible::Lagging)
                    } else if cd.spec.reads_on_synchronous_only
                        && !m.spec.synchronous_standbys.contains(&db.uid)
                    {
                        Err(Ineligible::NotSynchronous)
                    } else {
                        Ok(())
                    }
                }
            };
            Some(StandbyRoute {
                db_uid: db.uid.clone(),
                address,
                port,
                eligible,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClusterSpec, Db, DbSpec, DbStatus, Generation, Lsn};
    use std::time::UNIX_EPOCH;

    fn db(uid: &str, role: DbRole, follow: Option<&str>, pos: u64) -> Db {
        Db {
            uid: uid.into(),
            generation: Generation(3),
            change_time: UNIX_EPOCH,
            spec: DbSpec {
                keeper_uid: format!("k-{uid}"),
                role,
                follow: follow.map(|m| FollowConfig::Internal { db_uid: m.into() }),
                ..DbSpec::default()
            },
            status: DbStatus {
                healthy: true,
                current_generation: Generation(3),
                listen_address: Some(format!("10.0.0.{}", uid.len())),
                port: Some(5432),
                xlog_pos: Lsn(pos),
                streaming: role == DbRole::Standby,
                ..DbStatus::default()
            },
        }
    }

    /// A master `m` at 10 MiB and standbys `s1`, `s22` just behind it.
    fn cluster() -> ClusterData {
        let mut cd = ClusterData::new("u", ClusterSpec::default(), UNIX_EPOCH);
        let mib = 1024 * 1024;
        for d in [
            db("m", DbRole::Master, None, 10 * mib),
            db("s1", DbRole::Standby, Some("m"), 10 * mib - 100),
            db("s22", DbRole::Standby, Some("m"), 10 * mib),
        ] {
            cd.dbs.insert(d.uid.clone(), d);
        }
        cd.master = Some("m".into());
        cd
    }

    fn eligibility(cd: &ClusterData) -> Vec<(String, Result<(), Ineligible>)> {
        standbys(cd)
            .into_iter()
            .map(|s| (s.db_uid, s.eligible))
            .collect()
    }

    #[test]
    fn streaming_standbys_within_the_bound_are_eligible_and_the_master_is_not_listed() {
        let cd = cluster();
        let all = standbys(&cd);
        assert_eq!(
            all.iter().map(|s| s.db_uid.as_str()).collect::<Vec<_>>(),
            ["s1", "s22"]
        );
        assert!(all.iter().all(|s| s.eligible.is_ok()));
        assert_eq!((all[1].address.as_str(), all[1].port), ("10.0.0.3", 5432));
    }

    #[test]
    fn each_rule_makes_a_standby_ineligible() {
        type Break = fn(&mut ClusterData);
        let cases: [(Break, Ineligible); 6] = [
            (
                |cd| cd.dbs.get_mut("s1").unwrap().status.healthy = false,
                Ineligible::Unhealthy,
            ),
            (
                |cd| cd.dbs.get_mut("s1").unwrap().generation = Generation(4),
                Ineligible::NotConverged,
            ),
            (
                |cd| {
                    cd.dbs.get_mut("s1").unwrap().spec.follow = Some(FollowConfig::Internal {
                        db_uid: "s22".into(),
                    })
                },
                Ineligible::NotConverged,
            ),
            (
                |cd| cd.dbs.get_mut("s1").unwrap().status.streaming = false,
                Ineligible::NotStreaming,
            ),
            (
                |cd| cd.dbs.get_mut("s1").unwrap().status.replay_lsn = Some(Lsn(8 * 1024 * 1024)),
                Ineligible::Lagging,
            ),
            (
                |cd| cd.spec.reads_on_synchronous_only = true,
                Ineligible::NotSynchronous,
            ),
        ];
        for (breaks, why) in cases {
            let mut cd = cluster();
            breaks(&mut cd);
            let got = eligibility(&cd);
            assert_eq!(got[0], ("s1".into(), Err(why)), "{why:?}");
            if why != Ineligible::NotSynchronous {
                assert_eq!(got[1].1, Ok(()), "s22 is unaffected by {why:?}");
            }
        }
    }

    #[test]
    fn the_lag_bound_is_inclusive_and_synchronous_standbys_qualify() {
        let mut cd = cluster();
        cd.spec.max_standby_lag_for_reads = 100;
        assert_eq!(eligibility(&cd)[0].1, Ok(()));
        cd.spec.max_standby_lag_for_reads = 99;
        assert_eq!(eligibility(&cd)[0].1, Err(Ineligible::Lagging));
        cd.dbs.get_mut("s1").unwrap().status.replay_lsn = Some(Lsn(10 * 1024 * 1024 - 99));
        assert_eq!(
            eligibility(&cd)[0].1,
            Ok(()),
            "the replayed position counts when known"
        );
        cd.spec.max_standby_lag_for_reads = 100;
        cd.spec.reads_on_synchronous_only = true;
        cd.dbs.get_mut("m").unwrap().spec.synchronous_standbys = vec!["s22".into()];
        assert_eq!(
            eligibility(&cd),
            [
                ("s1".into(), Err(Ineligible::NotSynchronous)),
                ("s22".into(), Ok(()))
            ]
        );
    }

    #[test]
    fn without_a_master_no_standby_is_eligible_and_one_without_an_address_is_not_listed() {
        let mut cd = cluster();
        cd.dbs.get_mut("s22").unwrap().status.port = None;
        cd.master = None;
        assert_eq!(eligibility(&cd), [("s1".into(), Err(Ineligible::NoMaster))]);
    }
}
