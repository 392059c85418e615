//! The routing table: where new connections go. Built by the control thread from the cluster
//! data, published with `arc-swap`, read lock-free by the workers on every accept.

use std::net::SocketAddr;

use tendril_control_model::{ClusterData, Generation, ProxyRoute};

/// The master to send clients to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Backend {
    /// Its database uid: a connection to another database is a connection to fence.
    pub db_uid: String,
    /// Its resolved address.
    pub addr: SocketAddr,
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
        }
    }

    /// The backend, if any.
    pub fn backend(&self) -> Option<&Backend> {
        self.backend.as_ref().ok()
    }

    /// Whether a connection to `backend` must be closed under this table.
    pub fn fences(&self, backend: &Backend) -> bool {
        self.backend() != Some(backend) && self.draining.as_ref() != Some(backend)
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
}

impl Target {
    /// The target the cluster data describes (`None`: no cluster data).
    pub fn from_cluster_data(cd: Option<&ClusterData>) -> Target {
        match cd {
            None => Target {
                generation: Generation::NONE,
                route: Err(NoBackend::NoMaster),
                hold: false,
            },
            Some(cd) => Target {
                generation: cd.proxy.generation,
                route: cd.proxy.master.clone().ok_or(NoBackend::NoMaster),
                hold: cd.proxy.hold,
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
        };
        let b = Backend {
            db_uid: "b".into(),
            addr: "127.0.0.1:1".parse().unwrap(),
        };
        let a_moved = Backend {
            db_uid: "a".into(),
            addr: "127.0.0.1:2".parse().unwrap(),
        };
        let table = RoutingTable {
            epoch: 1,
            generation: Generation(1),
            backend: Ok(a.clone()),
            hold: false,
            draining: None,
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
        };
        assert!(
            !drain.fences(&a),
            "a draining backend keeps its connections"
        );
        assert!(drain.fences(&b));
    }
}
