//! The control thread: owns the store client, follows the cluster data with a watch (never
//! polling), publishes routing tables, fences, acknowledges, and keeps the proxy's lease.
//!
//! Fencing order: publish the new table, wake every worker, wait until each has shut down
//! its connections to the old master, run the socket killer (every other socket on the host
//! to the old master), and only then acknowledge the generation in `proxies/<uid>`.
//!
//! Self-fencing: when the lease has not been renewed for 80 % of its TTL, the proxy routes
//! nowhere, before the lease can expire and the sentinel stop waiting for it. A shorter store
//! hiccup changes nothing.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tendril_control_model::{
    ClusterData, FORMAT_VERSION, Generation, Keys, ProxyInfo, decode, encode,
};
use tendril_control_store::{KeptLease, Store, Watch, WatchEvent};

use crate::routing::{Backend, NoBackend, Role, RoutingTable, Standby, Target};
use crate::shared::Shared;

/// Destroys every socket on the host connected to an address (the eBPF socket killer).
pub trait SocketKiller: Send {
    /// Destroys the sockets connected to `peer`; returns how many.
    fn kill(&mut self, peer: SocketAddr) -> Result<u64, String>;
    /// Counts the sockets connected to `peer`.
    fn count(&mut self, peer: SocketAddr) -> Result<u64, String>;
    /// The mechanism, for logs and metrics.
    fn mechanism(&self) -> &'static str;
}

impl SocketKiller for tendril_ebpf::SocketKiller {
    fn kill(&mut self, peer: SocketAddr) -> Result<u64, String> {
        tendril_ebpf::SocketKiller::kill(self, &[tendril_ebpf::Target::peer(peer)])
            .map(|r| r.destroyed)
            .map_err(|e| e.to_string())
    }

    fn count(&mut self, peer: SocketAddr) -> Result<u64, String> {
        tendril_ebpf::SocketKiller::count(self, &[tendril_ebpf::Target::peer(peer)])
            .map(|r| r.matched)
            .map_err(|e| e.to_string())
    }

    fn mechanism(&self) -> &'static str {
        tendril_ebpf::SocketKiller::mechanism(self).label()
    }
}

/// The control loop's state.
pub struct Control<S> {
    store: S,
    shared: Arc<Shared>,
    keys: Keys,
    uid: String,
    lease_ttl: Duration,
    wakers: Vec<std::os::unix::net::UnixStream>,
    listener_fds: Vec<RawFd>,
    killer: Option<Box<dyn SocketKiller>>,
    target: Option<Target>,
    self_fenced: bool,
    epoch: u64,
    lease_id: Option<tendril_control_store::LeaseId>,
    last_count: Option<Instant>,
    on_drain: Option<Box<dyn FnOnce() + Send>>,
}

impl<S> std::fmt::Debug for Control<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control")
            .field("uid", &self.uid)
            .field("epoch", &self.epoch)
            .finish()
    }
}

impl<S: Store> Control<S> {
    /// A control loop for the given workers.
    #[allow(clippy::too_many_arguments, reason = "wired once, in spawn_control")]
    pub fn new(
        store: S,
        shared: Arc<Shared>,
        keys: Keys,
        uid: String,
        lease_ttl: Duration,
        wakers: Vec<std::os::unix::net::UnixStream>,
        listener_fds: Vec<RawFd>,
        killer: Option<Box<dyn SocketKiller>>,
    ) -> Control<S> {
        Control {
            store,
            shared,
            keys,
            uid,
            lease_ttl,
            wakers,
            listener_fds,
            killer,
            target: None,
            self_fenced: false,
            epoch: 0,
            lease_id: None,
            last_count: None,
            on_drain: None,
        }
    }

    /// Runs `f` when the drain starts (the kernel path stops capturing new clients).
    pub fn on_drain(&mut self, f: impl FnOnce() + Send + 'static) {
        self.on_drain = Some(Box::new(f));
    }

    /// The kill mechanism in use.
    pub fn kill_mechanism(&self) -> &'static str {
        self.killer.as_ref().map_or("none", |k| k.mechanism())
    }

    /// Runs until `shutdown`, then drains: stop accepting, let connections finish. While
    /// they do, routing still follows the store: a fence during the drain cuts them as it
    /// would have before.
    pub async fn run(mut self, shutdown: impl std::future::Future<Output = ()>) {
        let mut lease = KeptLease::start(self.store.clone(), self.lease_ttl);
        let started = Instant::now();
        let mut watch: Option<Watch> = None;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        let mut drain_until: Option<Instant> = None;
        loop {
            if watch.is_none() && !self.self_fenced {
                match self.reload().await {
                    Ok(revision) => match self
                        .store
                        .watch(&self.keys.cluster_data(), revision + 1)
                        .await
                    {
                        Ok(w) => watch = Some(w),
                        Err(e) => tracing::warn!(error = %e, "cannot watch the cluster data"),
                    },
                    Err(e) => tracing::warn!(error = %e, "cannot read the cluster data"),
                }
            }
            tokio::select! {
                event = next_event(&mut watch) => match event {
                    Some(WatchEvent::Put(kv)) => self.on_cluster_data(Some(&kv.value)).await,
                    Some(WatchEvent::Delete { .. }) => self.on_cluster_data(None).await,
                    Some(WatchEvent::Reset { kvs, .. }) => {
                        let key = self.keys.cluster_data();
                        let value = kvs.into_iter().find(|kv| kv.key == key).map(|kv| kv.value);
                        self.on_cluster_data(value.as_deref()).await;
                    }
                    Some(WatchEvent::Interrupted { error }) => tracing::warn!(%error, "cluster data watch interrupted; connections stay until the lease is at risk"),
                    Some(WatchEvent::Resumed { .. }) => {
                        // Events may have been missed only if the revision was compacted, which
                        // arrives as a Reset; still, re-read to be sure of the current state.
                        if let Err(e) = self.reload().await {
                            tracing::warn!(error = %e, "cannot re-read the cluster data");
                        }
                    }
                    None => watch = None,
                },
                _ = tick.tick() => {
                    self.check_lease(&lease, started).await;
                    self.track_host_sockets();
                    if drain_until.is_some_and(|until| {
                        self.shared.active_connections() == 0 || Instant::now() >= until
                    }) {
                        break;
                    }
                }
                () = lease.changed() => {
                    if lease.id() != self.lease_id {
                        self.lease_id = lease.id();
                        self.acknowledge().await;
                    }
                }
                () = &mut shutdown, if drain_until.is_none() => {
                    drain_until = Some(self.start_drain());
                }
            }
        }
        let _ = lease.revoke(&self.store).await;
    }

    /// The connection tracker: every few seconds, how many sockets on the host (proxied or
    /// not) point at the current backend, for the metrics.
    fn track_host_sockets(&mut self) {
        if self
            .last_count
            .is_some_and(|t| t.elapsed() < Duration::from_secs(5))
        {
            return;
        }
        self.last_count = Some(Instant::now());
        let Some(backend) = self.shared.table.load().backend().map(|b| b.addr) else {
            self.shared.host_sockets.store(0, Ordering::Relaxed);
            return;
        };
        if let Some(killer) = self.killer.as_mut()
            && let Ok(n) = killer.count(backend)
        {
            self.shared.host_sockets.store(n, Ordering::Relaxed);
        }
    }

    /// Reads the cluster data and applies it; returns the revision read.
    async fn reload(&mut self) -> Result<i64, tendril_control_store::StoreError> {
        let key = self.keys.cluster_data();
        let listing = self.store.list(&key).await?;
        let value = listing
            .kvs
            .into_iter()
            .find(|kv| kv.key == key)
            .map(|kv| kv.value);
        self.on_cluster_data(value.as_deref()).await;
        Ok(listing.revision)
    }

    async fn on_cluster_data(&mut self, value: Option<&[u8]>) {
        let target = match value.map(decode::<ClusterData>) {
            None => Target::from_cluster_data(None),
            Some(Ok(cd)) => Target::from_cluster_data(Some(&cd)),
            Some(Err(e)) => {
                // Never act on data we cannot read: route nowhere, say why.
                tracing::error!(error = %e, "cannot use the cluster data; routing nowhere");
                Target {
                    generation: Generation::NONE,
                    route: Err(NoBackend::BadClusterData),
                    hold: false,
                    standbys: Vec::new(),
                }
            }
        };
        if self.target.as_ref() == Some(&target) {
            return;
        }
        self.target = Some(target.clone());
        if self.self_fenced {
            return;
        }
        self.apply(target).await;
    }

    async fn apply(&mut self, target: Target) {
        let backend = match &target.route {
            Ok(route) => match resolve(&route.address, route.port).await {
                Some(addr) => Ok(Backend {
                    db_uid: route.db_uid.clone(),
                    addr,
                    role: Role::Master,
                }),
                None => {
                    tracing::error!(address = %route.address, port = route.port, "the master's address does not resolve; routing nowhere");
                    Err(NoBackend::Unresolved)
                }
            },
            Err(why) => Err(*why),
        };
        let mut standbys = Vec::with_capacity(target.standbys.len());
        for s in &target.standbys {
            match resolve(&s.address, s.port).await {
                Some(addr) => standbys.push(Standby {
                    backend: Backend {
                        db_uid: s.db_uid.clone(),
                        addr,
                        role: Role::Standby,
                    },
                    eligible: s.eligible,
                }),
                // Not listed: it takes no read-only connection, and those it has are cut.
                None => {
                    tracing::warn!(db = %s.db_uid, address = %s.address, "a standby's address does not resolve")
                }
            }
        }
        self.publish(target.generation, backend, target.hold, standbys)
            .await;
        self.acknowledge().await;
    }

    /// Publishes a table; when it routes away from the current backend, waits until every
    /// worker has cut its connections and the killer has run.
    async fn publish(
        &mut self,
        generation: Generation,
        backend: Result<Backend, NoBackend>,
        hold: bool,
        standbys: Vec<Standby>,
    ) {
        let old = self.shared.table.load_full();
        self.epoch += 1;
        let mut table = RoutingTable {
            epoch: self.epoch,
            generation,
            backend,
            hold,
            draining: None,
            standbys,
        };
        if old.standbys != table.standbys {
            let eligible: Vec<_> = table
                .standbys
                .iter()
                .map(|s| match s.eligible {
                    Ok(()) => format!("{} at {}: eligible", s.backend.db_uid, s.backend.addr),
                    Err(why) => format!(
                        "{} at {}: {}",
                        s.backend.db_uid,
                        s.backend.addr,
                        why.describe()
                    ),
                })
                .collect();
            tracing::info!(standbys = ?eligible, "standbys for read-only connections");
        }
        // Standbys that left the cluster (or moved): their read-only connections are cut
        // without waiting (nothing is acknowledged for them).
        let standbys_cut = old.standbys.iter().any(|s| table.fences(&s.backend));
        let cut = old
            .backend()
            .or(old.draining.as_ref())
            .filter(|b| table.fences(b))
            .cloned();
        let started = Instant::now();
        tracing::info!(
            generation = %generation,
            backend = ?table.backend().map(|b| b.addr),
            hold,
            "routing table published"
        );
        let grace = self.shared.settings.switchover_grace;
        let Some(old_backend) = cut else {
            self.shared.table.store(Arc::new(table));
            if standbys_cut {
                self.wake_workers();
            }
            return;
        };
        if hold && table.backend().is_none() && !grace.is_zero() {
            // A planned switchover: the old master is healthy and everything it commits
            // reaches the new one before the promotion, so connections to it may finish their
            // work while new ones wait; most end by themselves, which spares their
            // transactions. Only a switchover drains: a failover cuts at once.
            table.draining = Some(old_backend.clone());
            self.shared.table.store(Arc::new(table.clone()));
            let left = self.drain_switchover(grace).await;
            tracing::info!(
                old = %old_backend.addr,
                generation = %generation,
                left,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "switchover drain over; cutting what is left"
            );
            self.epoch += 1;
            table.epoch = self.epoch;
            table.draining = None;
        }
        self.shared.table.store(Arc::new(table));
        self.wake_workers();
        self.wait_applied(self.epoch).await;
        // A switchover's old master is stopped by its keeper right after every proxy
        // acknowledged, which ends every session, proxied or not. Killing host sockets here
        // would also cut the standbys' replication streams where they share this host, and
        // the new master must receive the old one's last WAL (its shutdown checkpoint).
        let killer = if hold { None } else { self.killer.as_mut() };
        if let Some(killer) = killer {
            match killer.kill(old_backend.addr) {
                Ok(n) => {
                    self.shared.killed.fetch_add(n, Ordering::Relaxed);
                    tracing::info!(peer = %old_backend.addr, destroyed = n, mechanism = killer.mechanism(), "host sockets to the old master destroyed");
                }
                Err(e) => {
                    tracing::warn!(peer = %old_backend.addr, error = %e, "socket killer failed")
                }
            }
        }
        tracing::info!(
            old = %old_backend.addr,
            generation = %generation,
            elapsed_us = started.elapsed().as_micros() as u64,
            "fence complete: every connection to the old master is closed"
        );
    }

    /// Waits until no connection is linked to a backend, or `grace` ran out; returns how
    /// many are left.
    async fn drain_switchover(&self, grace: Duration) -> u64 {
        let deadline = Instant::now() + grace;
        loop {
            let left = self.shared.linked_connections();
            if left == 0 || Instant::now() >= deadline {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    fn wake_workers(&mut self) {
        use std::io::Write;
        for w in &mut self.wakers {
            // A full socket buffer means a wake-up is already pending; that is enough.
            let _ = w.write(&[1]);
        }
    }

    async fn wait_applied(&self, epoch: u64) {
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            let all = self
                .shared
                .workers
                .iter()
                .all(|w| w.applied_epoch.load(Ordering::Acquire) >= epoch);
            if all || Instant::now() > deadline {
                if !all {
                    tracing::warn!(epoch, "a worker did not acknowledge the fence within 2 s");
                }
                return;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
    }

    /// Reports the generation applied, under the lease.
    async fn acknowledge(&mut self) {
        if self.self_fenced {
            return;
        }
        let (Some(target), Some(lease)) = (&self.target, self.lease_id) else {
            return;
        };
        let info = ProxyInfo {
            format_version: FORMAT_VERSION,
            uid: self.uid.clone(),
            generation: target.generation,
            proxy_timeout: self.lease_ttl,
            listen: Some(self.shared.settings.listen.0.to_string()),
            read_only_listen: self.shared.settings.listen.1.map(|a| a.to_string()),
        };
        if let Err(e) = self
            .store
            .put(&self.keys.proxy(&self.uid), encode(&info), Some(lease))
            .await
        {
            tracing::warn!(error = %e, "cannot acknowledge the generation");
        }
    }

    async fn check_lease(&mut self, lease: &KeptLease, started: Instant) {
        let fence_after = self.lease_ttl * 4 / 5;
        let stale = match lease.since_renewed() {
            Some(since) => since > fence_after,
            None => started.elapsed() > fence_after,
        };
        if stale && !self.self_fenced {
            tracing::error!(
                ttl = ?self.lease_ttl,
                "cannot renew the proxy lease: fencing this proxy before the lease expires"
            );
            self.self_fenced = true;
            let generation = self
                .target
                .as_ref()
                .map_or(Generation::NONE, |t| t.generation);
            self.publish(generation, Err(NoBackend::SelfFenced), false, Vec::new())
                .await;
        } else if !stale && self.self_fenced {
            self.self_fenced = false;
            self.target = None;
            match self.reload().await {
                Ok(_) => tracing::info!("store reachable again: routing resumes"),
                Err(e) => {
                    tracing::warn!(error = %e, "lease renewed but the cluster data cannot be read; staying fenced");
                    self.self_fenced = true;
                }
            }
        }
    }

    /// Stops the accepts; returns when the drain ends at the latest (the workers cut what
    /// is left at `drain_timeout`).
    fn start_drain(&mut self) -> Instant {
        tracing::info!(connections = self.shared.active_connections(), "draining");
        self.shared.start_draining();
        if let Some(f) = self.on_drain.take() {
            f();
        }
        if self.shared.may_shut_listeners() {
            tendril_daemon::notify("STOPPING=1");
            // Clients in the accept queues are reset now rather than left waiting.
            for fd in &self.listener_fds {
                crate::sys::shutdown_both(*fd);
            }
        }
        // Workers stop accepting; after a takeover the sockets stay open in the new process.
        self.wake_workers();
        Instant::now() + self.shared.settings.drain_timeout + Duration::from_secs(1)
    }
}

async fn next_event(watch: &mut Option<Watch>) -> Option<WatchEvent> {
    match watch {
        Some(w) => w.next().await,
        None => std::future::pending().await,
    }
}

async fn resolve(host: &str, port: u16) -> Option<SocketAddr> {
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return Some(SocketAddr::new(ip, port));
    }
    let lookup = tokio::net::lookup_host((host, port));
    match tokio::time::timeout(Duration::from_secs(2), lookup).await {
        Ok(Ok(mut addrs)) => addrs.next(),
        _ => None,
    }
}
