//! The routing table: where new connections go. Built by the control thread from the cluster
//! data, published with `arc-swap`, read lock-free by the workers on every accept.

use std::net::SocketAddr;

use tendril_control_model::{ClusterData, Generation, ProxyRoute};

use crate::reads::{Ineligible, StandbyRoute};

/// A database to send clients to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Its database uid: a connection to another database is a connection to fence.
    pub db_uid: String,
    /// Its resolved address.
    pub addr: SocketAddr,
    /// What it was chosen as, which decides when its connections are cut.
    pub role: Role,
}

/// What a connection's backend was chosen as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The master (the listen address, or the read-only listener's fallback): its
    /// connections are cut as soon as the proxies route elsewhere.
    Master,
    /// A standby, by the read-only listener: its connections stay while the database is
    /// in the cluster at that address (see [`RoutingTable::fences`]).
    Standby,
}

/// A standby in the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standby {
    /// Where it is (role [`Role::Standby`]).
    pub backend: Backend,
    /// Whether the read-only listener sends it new connections, or why not.
    pub eligible: Result<(), Ineligible>,
}

/// Why there is no backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoBackend {
    /// Not decided yet (the proxy just started and has not read the cluster data).
    Starting,
    /// The cluster data routes nowhere (a failover or switchover is under way, or the cluster
    /// is initialising).
    NoMaster,
    /// The proxy cannot renew its lease: it fenced itself.
    SelfFenced,
    /// The cluster data cannot be used (bad JSON, unknown format).
    BadClusterData,
    /// The master's address does not resolve.
    Unresolved,
}

/// One immutable version of the routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingTable {
    /// Increases with every table published, so workers can acknowledge a fence.
    pub epoch: u64,
    /// The proxy-section generation this table applies.
    pub generation: Generation,
    /// Where to send clients; `Err` says why nowhere.
    pub backend: Result<Backend, NoBackend>,
    /// With no backend: hold new connections instead of refusing them (switchover).
    pub hold: bool,
    /// During a switchover's drain: connections to this former backend are left to finish
    /// (new ones are held) until they end or the grace period runs out.
    pub draining: Option<Backend>,
    /// Every standby database of the cluster with an address, eligible for reads or not.
    pub standbys: Vec<Standby>,
}

impl RoutingTable {
    /// The table before anything is known: route nowhere.
    pub fn starting() -> RoutingTable {
        RoutingTable {
            epoch: 0,
            generation: Generation::NONE,
            backend: Err(NoBackend::Starting),
            hold: false,
            draining: None,
            standbys: Vec::new(),
        }
    }

    /// The backend, if any.
    pub fn backend(&self) -> Option<&Backend> {
        self.backend.as_ref().ok()
    }

    /// Whether a connection to `backend` must be closed under this table. A master's as
    /// soon as the table routes elsewhere (the fence). A standby's when its database left
    /// the cluster, was re-initialised (a new uid) or moved, or when the proxy knows nothing
    /// current (no usable cluster data, or fenced itself); a standby promoted to master keeps
    /// its sessions.
    pub fn fences(&self, backend: &Backend) -> bool {
        match backend.role {
            Role::Master => {
                self.backend() != Some(backend) && self.draining.as_ref() != Some(backend)
            }
            Role::Standby => {
                let same = |b: &Backend| b.db_uid == backend.db_uid && b.addr == backend.addr;
                !(self.standbys.iter().any(|s| same(&s.backend))
                    || self.backend().is_some_and(same)
                    || self.draining.as_ref().is_some_and(same))
            }
        }
    }

    /// The standby for the `turn`-th read-only connection (round robin over the eligible
    /// ones), if any is eligible.
    pub fn pick_standby(&self, turn: u64) -> Option<&Backend> {
        let eligible = self.standbys.iter().filter(|s| s.eligible.is_ok());
        let n = eligible.clone().count() as u64;
        if n == 0 {
            return None;
        }
        eligible.map(|s| &s.backend).nth((turn % n) as usize)
    }

    /// Why no standby takes read-only connections (for the refusal).
    pub fn no_standby_reason(&self) -> String {
        if self.standbys.is_empty() {
            return "the cluster has no standby".into();
        }
        let each: Vec<String> = self
            .standbys
            .iter()
            .filter_map(|s| {
                let why = s.eligible.err()?;
                Some(format!("{} {}", s.backend.db_uid, why.describe()))
            })
            .collect();
        format!("no standby is eligible for reads: {}", each.join("; "))
    }
}

/// What the proxy's `/health` says: healthy (a load balancer may send it clients) while it
/// routes to a master, or holds new connections for a switchover; else why not. `draining`:
/// the proxy is shutting down.
pub fn health(table: &RoutingTable, draining: bool) -> Result<String, String> {
    if draining {
        return Err("draining: the proxy is shutting down".into());
    }
    match &table.backend {
        Ok(b) => Ok(format!(
            "routing to {} at {} (generation {})",
            b.db_uid, b.addr, table.generation.0
        )),
        Err(NoBackend::NoMaster) if table.hold => Ok(format!(
            "holding new connections for a switchover (generation {})",
            table.generation.0
        )),
        Err(NoBackend::Starting) => Err("starting: no routing table yet".into()),
        Err(NoBackend::NoMaster) => Err(format!(
            "no master in the cluster data (generation {})",
            table.generation.0
        )),
        Err(NoBackend::SelfFenced) => {
            Err("fenced: the proxy cannot renew its lease with the store".into())
        }
        Err(NoBackend::BadClusterData) => Err("the cluster data cannot be used".into()),
        Err(NoBackend::Unresolved) => Err("the master's address does not resolve".into()),
    }
}

/// What the cluster data asks for, before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Proxy-section generation.
    pub generation: Generation,
    /// The route, or why none.
    pub route: Result<ProxyRoute, NoBackend>,
    /// Hold new connections.
    pub hold: bool,
    /// The standbys, for the read-only listener.
    pub standbys: Vec<StandbyRoute>,
}

impl Target {
    /// The target the cluster data describes (`None`: no cluster data).
    pub fn from_cluster_data(cd: Option<&ClusterData>) -> Target {
        match cd {
            None => Target {
                generation: Generation::NONE,
                route: Err(NoBackend::NoMaster),
                hold: false,
                standbys: Vec::new(),
            },
            Some(cd) => Target {
                generation: cd.proxy.generation,
                route: cd.proxy.master.clone().ok_or(NoBackend::NoMaster),
                hold: cd.proxy.hold,
                standbys: crate::reads::standbys(cd),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;
    use tendril_control_model::ClusterSpec;

    #[test]
    fn health_is_ok_only_while_routing_or_holding() {
        let mut t = RoutingTable::starting();
        assert!(health(&t, false).unwrap_err().contains("starting"));
        t.generation = Generation(4);
        t.backend = Err(NoBackend::NoMaster);
        assert!(health(&t, false).unwrap_err().contains("no master"));
        t.hold = true;
        assert!(health(&t, false).unwrap().contains("holding"));
        t.hold = false;
        t.backend = Err(NoBackend::SelfFenced);
        assert!(health(&t, false).unwrap_err().contains("fenced"));
        t.backend = Ok(Backend {
            db_uid: "db1".into(),
            addr: "10.0.0.2:5432".parse().unwrap(),
            role: Role::Master,
        });
        assert_eq!(
            health(&t, false).unwrap(),
            "routing to db1 at 10.0.0.2:5432 (generation 4)"
        );
        assert!(health(&t, true).unwrap_err().contains("draining"));
    }

    #[test]
    fn targets_follow_the_proxy_section() {
        assert_eq!(
            Target::from_cluster_data(None).route,
            Err(NoBackend::NoMaster)
        );
        let mut cd = ClusterData::new("u", ClusterSpec::default(), UNIX_EPOCH);
        cd.proxy.generation = Generation(7);
        cd.proxy.hold = true;
        let t = Target::from_cluster_data(Some(&cd));
        assert_eq!(
            (t.generation, t.route.clone(), t.hold),
            (Generation(7), Err(NoBackend::NoMaster), true)
        );
        cd.proxy.master = Some(ProxyRoute {
            db_uid: "db".into(),
            address: "10.0.0.1".into(),
            port: 5432,
        });
        let t = Target::from_cluster_data(Some(&cd));
        assert_eq!(t.route.unwrap().port, 5432);
    }

    #[test]
    fn a_table_fences_every_other_backend() {
        let a = Backend {
            db_uid: "a".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            role: Role::Master,
        };
        let b = Backend {
            db_uid: "b".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
            role: Role::Master,
        };
        let a_moved = Backend {
            db_uid: "a".into(),
            addr: "127.0.0.1:2".parse().unwrap(),
            role: Role::Master,
        };
        let table = RoutingTable {
            epoch: 1,
            generation: Generation(1),
            backend: Ok(a.clone()),
            hold: false,
            draining: None,
            standbys: Vec::new(),
        };
        assert!(!table.fences(&a));
        assert!(table.fences(&b));
        assert!(
            table.fences(&a_moved),
            "same database at a new address: old connections go"
        );
        assert!(RoutingTable::starting().fences(&a));
        let drain = RoutingTable {
            epoch: 2,
            generation: Generation(2),
            backend: Err(NoBackend::NoMaster),
            hold: true,
            draining: Some(a.clone()),
            standbys: Vec::new(),
        };
        assert!(
            !drain.fences(&a),
            "a draining backend keeps its connections"
        );
        assert!(drain.fences(&b));
    }

    fn standby(uid: &str, port: u16, eligible: Result<(), Ineligible>) -> Standby {
        Standby {
            backend: Backend {
                db_uid: uid.into(),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                role: Role::Standby,
            },
            eligible,
        }
    }

    #[test]
    fn standby_connections_stay_while_their_database_does() {
        let mut table = RoutingTable::starting();
        table.backend = Ok(Backend {
            db_uid: "m".into(),
            addr: "127.0.0.1:5432".parse().unwrap(),
            role: Role::Master,
        });
        table.standbys = vec![
            standby("s1", 5433, Ok(())),
            standby("s2", 5434, Err(Ineligible::Lagging)),
        ];
        let s1 = table.standbys[0].backend.clone();
        let s2 = table.standbys[1].backend.clone();
        assert!(!table.fences(&s1));
        assert!(
            !table.fences(&s2),
            "a lagging standby takes no new connection, keeps its own"
        );
        let mut moved = s1.clone();
        moved.addr.set_port(6000);
        assert!(table.fences(&moved));
        let mut resynced = s1.clone();
        resynced.db_uid = "s1-new".into();
        assert!(
            table.fences(&resynced),
            "re-initialised: a new database uid"
        );
        let mut promoted = table.clone();
        promoted.standbys.remove(0);
        promoted.backend = Ok(Backend {
            role: Role::Master,
            ..s1.clone()
        });
        assert!(
            !promoted.fences(&s1),
            "a promoted standby keeps its sessions"
        );
        assert!(RoutingTable::starting().fences(&s1), "no cluster data: cut");
        let master_fallback = table.backend().unwrap().clone();
        assert!(!table.fences(&master_fallback));
        assert!(
            promoted.fences(&master_fallback),
            "a read-only connection on the master is fenced like any"
        );
    }

    #[test]
    fn read_only_connections_go_round_robin_over_eligible_standbys() {
        let mut table = RoutingTable::starting();
        table.standbys = vec![
            standby("s1", 5433, Ok(())),
            standby("s2", 5434, Err(Ineligible::Lagging)),
            standby("s3", 5435, Ok(())),
        ];
        let picks: Vec<_> = (0..4)
            .map(|t| table.pick_standby(t).unwrap().db_uid.clone())
            .collect();
        assert_eq!(picks, ["s1", "s3", "s1", "s3"]);
        table.standbys[0].eligible = Err(Ineligible::NotStreaming);
        table.standbys[2].eligible = Err(Ineligible::Unhealthy);
        assert_eq!(table.pick_standby(0), None);
        assert_eq!(
            table.no_standby_reason(),
            "no standby is eligible for reads: s1 not streaming from the master; \
             s2 further behind than max_standby_lag_for_reads; s3 not healthy"
        );
        table.standbys.clear();
        assert_eq!(table.no_standby_reason(), "the cluster has no standby");
    }
}
