//! Property tests: random histories of keeper reports (that follow the cluster data as real
//! keepers would, with failures), proxy acknowledgements and lease expiries, and sentinel
//! leadership changes. After every decision the safety properties are checked:
//!
//! - the proxy section never names two different masters without a fence between them;
//! - a new master is never published before every live proxy acknowledged the fence;
//! - the route always names the cluster's master;
//! - in synchronous mode only a standby listed and known in sync is promoted;
//! - in asynchronous mode a standby beyond the lag bound is never promoted;
//! - no standby is promoted while the old master may still accept writes: its keeper either
//!   reported it stopped at its current generation, or has been silent for a whole
//!   `fail_interval` (its lease ran out; the keeper fences itself before that);
//! - generations (cluster, proxy, databases) never go backwards;
//! - in a standby cluster, every master-role database follows the external primary (its
//!   keeper never promotes it) until the cluster's role turns to master (`tendrilctl
//!   promote`, at random here), after which the master follows nothing.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::script::{Report, World};
use tendril_control_model::{ClusterPhase, ClusterRole, DbRole, Lsn, ProxyInfo};

const KEEPERS: [&str; 4] = ["k0", "k1", "k2", "k3"];
const PROXIES: [&str; 2] = ["p1", "p2"];

struct Sim {
    world: World,
    rng: StdRng,
    alive: [bool; 4],
    /// When each keeper last reported (the ground truth the sentinel's lease estimates).
    last_report: [Option<Duration>; 4],
    master_xlog: u64,
    sync: bool,
    /// The external primary's timeline (a standby cluster's leader follows it).
    external_tl: u32,
}

/// What kind of cluster a history runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Async,
    Sync,
    /// A standby cluster, promoted at random.
    Standby,
}

impl Sim {
    fn new(seed: u64, mode: Mode) -> Sim {
        let sync = mode == Mode::Sync;
        let mut world = World::new();
        world.apply("phase initializing").unwrap();
        if mode == Mode::Standby {
            world
                .apply(r#"spec {"role": "standby", "standby_config": {"standby_settings": {"primary_host": "site-a"}}}"#)
                .unwrap();
        }
        if sync {
            world
                .apply(r#"spec {"synchronous_replication": true, "max_synchronous_standbys": 2}"#)
                .unwrap();
        }
        world.apply(r#"spec {"max_standby_lag": 1000000}"#).unwrap();
        for p in PROXIES {
            world.apply(&format!("proxy {p}")).unwrap();
        }
        Sim {
            world,
            rng: StdRng::seed_from_u64(seed),
            alive: [true; 4],
            last_report: [None; 4],
            master_xlog: 0x300_0000,
            sync,
            external_tl: 1,
        }
    }

    /// Keepers report what real keepers would: the database assigned to them, converging to
    /// its spec with some delay, promoting when told, lagging a little, sometimes failing.
    fn keepers_report(&mut self) {
        self.master_xlog += self.rng.random_range(0..200_000);
        // The external primary fails over now and then: a standby leader follows it onto
        // its new timeline.
        if self.rng.random_bool(0.01) {
            self.external_tl += 1;
        }
        for (i, uid) in KEEPERS.iter().enumerate() {
            if self.rng.random_bool(0.03) {
                self.alive[i] = !self.alive[i];
            }
            if !self.alive[i] {
                self.world.reports.remove(*uid);
                continue;
            }
            let db = self
                .world
                .cd
                .dbs
                .values()
                .find(|d| d.spec.keeper_uid == *uid)
                .cloned();
            let previous = self.world.reports.get(*uid).cloned().unwrap_or(Report {
                healthy: true,
                tl: 1,
                sysid: "7000".into(),
                can_be_master: true,
                can_be_sync: true,
                ..Report::default()
            });
            let mut r = previous.clone();
            r.db = db.as_ref().map(|d| d.uid.clone());
            r.healthy = self.rng.random_bool(0.95);
            if let Some(db) = &db {
                let converges = self.rng.random_bool(0.7);
                let same_db = previous.db.as_deref() == Some(db.uid.as_str());
                if converges {
                    r.generation = Some(db.generation.0);
                } else if !same_db {
                    r.generation = Some(0);
                }
                let converged = r.generation == Some(db.generation.0);
                match db.spec.role {
                    DbRole::Master if db.spec.stop && converged => {
                        r.stopped = true;
                        r.checkpoint = Some(r.xlog);
                    }
                    DbRole::Master if db.spec.is_standby_leader() => {
                        r.stopped = false;
                        r.recovery = true;
                        r.sync.clear();
                        r.tl = r.tl.max(self.external_tl);
                        r.xlog = Lsn(self.master_xlog.max(r.xlog.0));
                    }
                    DbRole::Master => {
                        r.stopped = false;
                        if converged {
                            r.recovery = false;
                            if previous.recovery {
                                r.tl += 1;
                            }
                            r.xlog = Lsn(self.master_xlog.max(r.xlog.0));
                            // The master reports as in sync a random part of its listed ones.
                            r.sync = db
                                .spec
                                .synchronous_standbys
                                .iter()
                                .filter(|_| self.rng.random_bool(0.8))
                                .cloned()
                                .collect();
                        }
                    }
                    DbRole::Standby => {
                        r.stopped = false;
                        r.recovery = true;
                        r.sync.clear();
                        let lag = self.rng.random_range(0..2_000_000);
                        r.xlog = Lsn(self.master_xlog.saturating_sub(lag).max(r.xlog.0));
                        let master_tl = self
                            .world
                            .cd
                            .master
                            .as_ref()
                            .and_then(|m| {
                                self.world
                                    .reports
                                    .values()
                                    .find(|x| x.db.as_deref() == Some(m.as_str()))
                            })
                            .map(|x| x.tl);
                        if let Some(tl) = master_tl {
                            r.tl = tl;
                        }
                    }
                }
            } else {
                r.generation = None;
            }
            r.addr = Some((format!("10.0.0.{i}"), 5432));
            self.world.reports.insert((*uid).to_owned(), r);
            self.last_report[i] = Some(self.world.now);
        }
    }

    fn proxies_act(&mut self) {
        for p in PROXIES {
            let roll: f64 = self.rng.random();
            if roll < 0.02 {
                self.world.proxies.remove(p);
            } else if roll < 0.6 {
                let generation = self.world.cd.proxy.generation;
                self.world.proxies.insert(
                    p.to_owned(),
                    ProxyInfo {
                        format_version: 1,
                        uid: p.to_owned(),
                        generation,
                        proxy_timeout: Duration::from_secs(5),
                        listen: None,
                        read_only_listen: None,
                    },
                );
            }
        }
    }

    fn step(&mut self) {
        self.world.now += Duration::from_millis(self.rng.random_range(200..3000));
        self.keepers_report();
        self.proxies_act();
        if self.rng.random_bool(0.02) {
            self.world.mem = tendril_sentinel::Memory::default();
        }
        if self.world.cd.spec.role == ClusterRole::Standby && self.rng.random_bool(0.003) {
            self.world.apply(r#"spec {"role": "master"}"#).unwrap();
        }
        if self.rng.random_bool(0.01) && self.world.cd.switchover.is_none() {
            let target = KEEPERS[self.rng.random_range(0..KEEPERS.len())];
            let _ = self.world.apply(&format!("switchover target={target}"));
        }
        let before = self.world.cd.clone();
        let obs = self.world.observations_peek();
        self.world.run();
        let after = &self.world.cd;
        check(&before, after, &obs, self.sync);
        check_standby_cluster(after);
        self.check_old_master_fenced(&before);
    }

    /// A promotion happens only once the old master is stopped or its keeper's lease ran out.
    fn check_old_master_fenced(&self, before: &tendril_control_model::ClusterData) {
        let after = &self.world.cd;
        let (Some(old), Some(new)) = (&before.master, &after.master) else {
            return;
        };
        if old == new {
            return;
        }
        let old_db = &before.dbs[old];
        let keeper = &old_db.spec.keeper_uid;
        let i = KEEPERS.iter().position(|k| k == keeper).unwrap();
        let silent =
            self.last_report[i].map_or(Duration::MAX, |at| self.world.now.saturating_sub(at));
        let report = self.world.reports.get(keeper.as_str());
        let stopped = report.is_some_and(|r| {
            r.stopped
                && r.db.as_deref() == Some(old.as_str())
                && r.generation == Some(old_db.generation.0)
        });
        assert!(
            stopped || silent >= before.spec.fail_interval,
            "promoted {new} while the old master {old} may accept writes: keeper {keeper} \
             reported {silent:?} ago, last report {report:?}"
        );
    }
}

fn check(
    before: &tendril_control_model::ClusterData,
    after: &tendril_control_model::ClusterData,
    obs: &tendril_sentinel::Observations,
    sync: bool,
) {
    assert!(
        after.generation >= before.generation,
        "cluster generation went back"
    );
    assert!(
        after.proxy.generation >= before.proxy.generation,
        "proxy generation went back"
    );
    for db in after.dbs.values() {
        if let Some(b) = before.dbs.get(&db.uid) {
            assert!(
                db.generation >= b.generation,
                "db {} generation went back",
                db.uid
            );
        }
    }
    // The route names the master.
    if let Some(route) = &after.proxy.master {
        assert_eq!(
            Some(&route.db_uid),
            after.master.as_ref(),
            "route to a database that is not the master"
        );
    }
    // No switch from one routed master to another without a fence in between.
    if let (Some(a), Some(b)) = (&before.proxy.master, &after.proxy.master) {
        assert_eq!(a.db_uid, b.db_uid, "route changed master without a fence");
    }
    // A newly published master: every live proxy had acknowledged the fence.
    if before.proxy.master.is_none() && after.proxy.master.is_some() {
        for p in obs.proxies.values() {
            assert!(
                p.generation >= before.proxy.generation,
                "published while proxy {} was at generation {} < {}",
                p.uid,
                p.generation,
                before.proxy.generation
            );
        }
    }
    // A promotion.
    if let (Some(old), Some(new)) = (&before.master, &after.master)
        && old != new
    {
        assert!(
            after.proxy.master.is_none(),
            "promoted while the proxies still route"
        );
        let old_db = &before.dbs[old];
        let new_before = &before.dbs[new];
        assert_eq!(
            new_before.spec.role,
            DbRole::Standby,
            "promoted a non-standby"
        );
        if sync && old_db.spec.synchronous_replication {
            assert!(
                old_db.spec.synchronous_standbys.contains(new)
                    && old_db.status.synchronous_standbys.contains(new),
                "promoted {new}, not a synchronous standby known in sync ({:?} / {:?})",
                old_db.spec.synchronous_standbys,
                old_db.status.synchronous_standbys
            );
        }
        let switchover = before.switchover.is_some();
        if !switchover && !old_db.spec.synchronous_replication {
            let master_pos = after
                .dbs
                .get(old)
                .map_or(old_db.status.xlog_pos, |d| d.status.xlog_pos);
            let new_pos = after.dbs[new].status.xlog_pos;
            assert!(
                master_pos.bytes_ahead_of(new_pos) <= after.spec.max_standby_lag,
                "promoted {new} at {new_pos}, beyond the lag bound from {master_pos}"
            );
        }
    }
}

/// A standby cluster never has a master that follows nothing (its keeper would promote it);
/// a promoted one (role master) has no master that follows the external primary.
fn check_standby_cluster(after: &tendril_control_model::ClusterData) {
    for db in after.dbs.values().filter(|d| d.spec.role == DbRole::Master) {
        match after.spec.role {
            ClusterRole::Standby => assert!(
                db.spec.is_standby_leader(),
                "{} is a master of a standby cluster that does not follow the external primary",
                db.uid
            ),
            ClusterRole::Master if after.phase == ClusterPhase::Normal => {
                if after.master.as_ref() == Some(&db.uid) {
                    assert!(
                        db.spec.follow.is_none(),
                        "master {} of a promoted cluster still follows",
                        db.uid
                    );
                }
            }
            ClusterRole::Master => {}
        }
    }
}

impl support::script::World {
    /// The observations the next run will see, without consuming report ids.
    fn observations_peek(&self) -> tendril_sentinel::Observations {
        let mut copy = World {
            cd: self.cd.clone(),
            reports: self.reports.clone(),
            proxies: self.proxies.clone(),
            mem: self.mem.clone(),
            now: self.now,
            writes: 0,
            next_info: self.next_info,
        };
        copy.observations()
    }
}

fn run_seeds(mode: Mode) {
    let mut failovers = 0;
    let mut publishes = 0;
    let mut promoted = 0;
    for seed in 0..300 {
        let mut sim = Sim::new(seed, mode);
        let mut last_master = None;
        for _ in 0..200 {
            sim.step();
            if sim.world.cd.master != last_master {
                failovers += 1;
                last_master.clone_from(&sim.world.cd.master);
            }
            if sim.world.cd.proxy.master.is_some() {
                publishes += 1;
            }
        }
        if mode == Mode::Standby && sim.world.cd.spec.role == ClusterRole::Master {
            promoted += 1;
        }
    }
    // The histories must exercise failovers and publication, or the properties hold vacuously.
    assert!(
        failovers > 300,
        "only {failovers} master changes in all histories"
    );
    assert!(
        publishes > 10_000,
        "only {publishes} routed steps in all histories"
    );
    if mode == Mode::Standby {
        // Both halves: histories that stay standby clusters and histories promoted.
        assert!(
            (30..270).contains(&promoted),
            "{promoted} of 300 standby-cluster histories promoted"
        );
    }
    println!("{mode:?}: {failovers} master changes, {publishes} routed steps, {promoted} promoted");
}

#[test]
fn random_histories_async() {
    run_seeds(Mode::Async);
}

#[test]
fn random_histories_sync() {
    run_seeds(Mode::Sync);
}

#[test]
fn random_histories_standby_cluster() {
    run_seeds(Mode::Standby);
}
