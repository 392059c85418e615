//! The sentinel loop around [`decide`]: publish this sentinel's report, campaign for
//! leadership, and while leader read everything, decide and write the result with a
//! compare-and-swap guarded by the leadership.
//!
//! It runs every `sleep_interval` and, to react in milliseconds rather than a second, at once
//! (debounced) whenever any key of the cluster changes: a proxy acknowledging a fence or a
//! keeper reporting its promotion moves the failover on immediately.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tendril_control_model::{
    ClusterData, ClusterSpec, FORMAT_VERSION, KeeperInfo, Keys, ProxyInfo, SentinelInfo, decode,
    encode,
};
use tendril_control_store::{CasOutcome, Expect, KeptLease, Leadership, Store, StoreError, Watch};
use tokio::task::JoinHandle;

use crate::decide::{Memory, Now, Observations, decide};

/// What a sentinel needs to run.
#[derive(Debug, Clone)]
pub struct SentinelConfig {
    /// The cluster's store keys.
    pub keys: Keys,
    /// The cluster name (for logs).
    pub cluster: String,
    /// This sentinel's uid.
    pub uid: String,
    /// Written as the cluster's spec when no cluster data exists yet.
    pub initial_spec: Option<ClusterSpec>,
    /// TTL of the lease the leadership is tied to: a dead leader is replaced after about this.
    pub leader_ttl: Duration,
}

/// Counters the metrics endpoint exposes.
#[derive(Debug, Default)]
pub struct SentinelMetrics {
    /// 1 while leader.
    pub leader: AtomicBool,
    /// Decisions taken as leader.
    pub decisions: AtomicU64,
    /// Cluster data writes.
    pub writes: AtomicU64,
    /// Failed compare-and-swaps (someone else wrote).
    pub conflicts: AtomicU64,
    /// The cluster data generation last seen.
    pub generation: AtomicU64,
    /// Unix time of the last successful loop.
    pub last_success: AtomicU64,
}

impl SentinelMetrics {
    /// Prometheus text exposition.
    pub fn render(&self, cluster: &str) -> String {
        let g = |name: &str, help: &str, value: u64| {
            format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name}{{cluster=\"{cluster}\"}} {value}\n"
            )
        };
        [
            g(
                "tendril_sentinel_leader",
                "1 while this sentinel is the leader",
                u64::from(self.leader.load(Ordering::Relaxed)),
            ),
            g(
                "tendril_sentinel_decisions_total",
                "decisions taken as leader",
                self.decisions.load(Ordering::Relaxed),
            ),
            g(
                "tendril_sentinel_writes_total",
                "cluster data writes",
                self.writes.load(Ordering::Relaxed),
            ),
            g(
                "tendril_sentinel_cas_conflicts_total",
                "cluster data writes lost to a concurrent writer",
                self.conflicts.load(Ordering::Relaxed),
            ),
            g(
                "tendril_cluster_generation",
                "cluster data generation last seen",
                self.generation.load(Ordering::Relaxed),
            ),
            g(
                "tendril_sentinel_last_success_timestamp_seconds",
                "unix time of the last successful loop",
                self.last_success.load(Ordering::Relaxed),
            ),
        ]
        .concat()
    }
}

/// A running campaign, resolved once elected.
type Campaign = JoinHandle<Result<Leadership, StoreError>>;

/// The sentinel.
#[derive(Debug)]
pub struct Sentinel<S> {
    store: S,
    config: SentinelConfig,
    metrics: Arc<SentinelMetrics>,
    origin: Instant,
}

impl<S: Store> Sentinel<S> {
    /// A sentinel on `store`.
    pub fn new(store: S, config: SentinelConfig, metrics: Arc<SentinelMetrics>) -> Sentinel<S> {
        Sentinel {
            store,
            config,
            metrics,
            origin: Instant::now(),
        }
    }

    fn now(&self) -> Now {
        Now {
            mono: self.origin.elapsed(),
            wall: SystemTime::now(),
        }
    }

    /// Runs until `shutdown` resolves; then resigns and withdraws its report.
    pub async fn run(self, shutdown: impl std::future::Future<Output = ()>) {
        let keys = &self.config.keys;
        tracing::info!(sentinel = %self.config.uid, cluster = %self.config.cluster, "sentinel starting");
        let mut lease = KeptLease::start(self.store.clone(), self.config.leader_ttl);
        let mut campaign: Option<(Campaign, tendril_control_store::LeaseId)> = None;
        let mut leadership: Option<Leadership> = None;
        let mut mem = Memory::default();
        let mut watch: Option<Watch> = None;
        tokio::pin!(shutdown);
        let mut sleep = Duration::from_secs(1);
        // The lease the sentinel report was last written with: the key lives as long as that
        // lease, so it is written once per lease. Writing it every loop would wake every
        // sentinel's watch, whose wake-up writes it again: a loop at the settle rate.
        let mut published: Option<tendril_control_store::LeaseId> = None;
        loop {
            if watch.is_none() {
                watch = self.store.watch(keys.base(), 0).await.ok();
            }
            // The lease: a new id means the old one expired, and with it any leadership.
            let lease_id = lease.id();
            if let Some(id) = lease_id {
                if published != Some(id) {
                    let info = SentinelInfo {
                        format_version: FORMAT_VERSION,
                        uid: self.config.uid.clone(),
                    };
                    match self
                        .store
                        .put(&keys.sentinel(&self.config.uid), encode(&info), Some(id))
                        .await
                    {
                        Ok(_) => published = Some(id),
                        Err(e) => {
                            tracing::debug!(error = %e, "cannot publish the sentinel report")
                        }
                    }
                }
                let stale = campaign.as_ref().is_some_and(|(_, l)| *l != id)
                    || leadership.as_ref().is_some_and(|l| l.lease != id);
                if stale {
                    self.lose(
                        &mut leadership,
                        &mut campaign,
                        "the leadership lease expired",
                    );
                }
                if campaign.is_none() && leadership.is_none() {
                    let store = self.store.clone();
                    let name = keys.leader();
                    let uid = self.config.uid.clone();
                    campaign = Some((
                        tokio::spawn(async move { store.campaign(&name, &uid, id).await }),
                        id,
                    ));
                }
            }
            if let Some((task, _)) = &mut campaign
                && task.is_finished()
            {
                let (task, _) = campaign.take().expect("checked just above");
                match task.await {
                    Ok(Ok(l)) => {
                        tracing::info!(sentinel = %self.config.uid, "elected leader");
                        mem = Memory::default();
                        self.metrics.leader.store(true, Ordering::Relaxed);
                        leadership = Some(l);
                    }
                    Ok(Err(e)) => tracing::warn!(error = %e, "campaign failed, retrying"),
                    Err(e) => tracing::warn!(error = %e, "campaign task failed"),
                }
            }
            // A leader that cannot renew its lease for most of its TTL stops acting first.
            if leadership.is_some()
                && lease
                    .since_renewed()
                    .is_none_or(|t| t > self.config.leader_ttl * 2 / 3)
            {
                self.lose(
                    &mut leadership,
                    &mut campaign,
                    "cannot renew the leadership lease",
                );
            }
            match self.iteration(leadership.as_ref(), &mut mem).await {
                Ok(Some(spec_sleep)) => sleep = spec_sleep,
                Ok(None) => {}
                Err(Lost) => self.lose(&mut leadership, &mut campaign, "another sentinel leads"),
            }
            let deadline = tokio::time::sleep(sleep);
            tokio::pin!(deadline);
            tokio::select! {
                () = &mut deadline => {}
                () = next_change(&mut watch) => {
                    // Let a burst of changes settle into one decision.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                () = lease.changed() => {}
                () = &mut shutdown => break,
            }
        }
        tracing::info!(sentinel = %self.config.uid, "sentinel stopping");
        if let Some(l) = &leadership {
            let _ = self.store.resign(l).await;
        }
        let _ = lease.revoke(&self.store).await;
    }

    fn lose(
        &self,
        leadership: &mut Option<Leadership>,
        campaign: &mut Option<(Campaign, tendril_control_store::LeaseId)>,
        why: &str,
    ) {
        if leadership.take().is_some() {
            tracing::warn!(sentinel = %self.config.uid, why, "no longer leader");
        }
        if let Some((task, _)) = campaign.take() {
            task.abort();
        }
        self.metrics.leader.store(false, Ordering::Relaxed);
    }

    /// One loop. Returns the spec's sleep interval when the cluster data was read.
    async fn iteration(
        &self,
        leadership: Option<&Leadership>,
        mem: &mut Memory,
    ) -> Result<Option<Duration>, Lost> {
        let keys = &self.config.keys;
        let kv = match self.store.get(&keys.cluster_data()).await {
            Ok(kv) => kv,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the cluster data");
                return Ok(None);
            }
        };
        let Some(kv) = kv else {
            self.create_initial().await;
            return Ok(None);
        };
        let cd: ClusterData = match decode(&kv.value) {
            Ok(cd) => cd,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the cluster data; deciding nothing until it is fixed");
                return Ok(None);
            }
        };
        self.metrics
            .generation
            .store(cd.generation.0, Ordering::Relaxed);
        let sleep = cd.spec.sleep_interval;
        let Some(leadership) = leadership else {
            return Ok(Some(sleep));
        };
        let obs = match self.observe().await {
            Ok(obs) => obs,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the component reports");
                return Ok(Some(sleep));
            }
        };
        let now = self.now();
        let decision = decide(&cd, &obs, mem, now);
        self.metrics.decisions.fetch_add(1, Ordering::Relaxed);
        if decision.write {
            let mut next = decision.cluster_data;
            next.generation = cd.generation.next();
            next.change_time = now.wall;
            let written = self
                .store
                .cas(
                    &keys.cluster_data(),
                    encode(&next),
                    Expect::ModRevision(kv.mod_revision),
                    Some(leadership),
                )
                .await;
            match written {
                Ok(CasOutcome::Written(_)) => {
                    mem.last_write = Some(now.mono);
                    self.metrics.writes.fetch_add(1, Ordering::Relaxed);
                    self.metrics
                        .generation
                        .store(next.generation.0, Ordering::Relaxed);
                    for e in &decision.events {
                        tracing::info!(cluster = %self.config.cluster, generation = %next.generation, kind = %e.kind, reason = %e.reason, "cluster data written");
                    }
                }
                Ok(CasOutcome::Conflict(_)) => {
                    // Someone (tendrilctl) wrote in between: decide again on fresh data.
                    self.metrics.conflicts.fetch_add(1, Ordering::Relaxed);
                    tracing::info!("cluster data changed under us; deciding again");
                }
                Ok(CasOutcome::NotLeader) => return Err(Lost),
                Err(e) => tracing::warn!(error = %e, "cannot write the cluster data"),
            }
        }
        let unix = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics
            .last_success
            .store(unix.as_secs(), Ordering::Relaxed);
        Ok(Some(sleep))
    }

    async fn create_initial(&self) {
        let Some(spec) = &self.config.initial_spec else {
            tracing::debug!("no cluster data yet; waiting for tendrilctl init");
            return;
        };
        let uid = format!("{:08x}", rand::random::<u32>());
        let cd = ClusterData::new(uid, spec.clone(), SystemTime::now());
        match self
            .store
            .cas(
                &self.config.keys.cluster_data(),
                encode(&cd),
                Expect::Absent,
                None,
            )
            .await
        {
            Ok(CasOutcome::Written(_)) => {
                tracing::info!(uid = %cd.uid, "cluster data created from the initial spec")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot create the cluster data"),
        }
    }

    async fn observe(&self) -> Result<Observations, StoreError> {
        let keys = &self.config.keys;
        let mut obs = Observations::default();
        for kv in self.store.list(&keys.keepers_prefix()).await?.kvs {
            match decode::<KeeperInfo>(&kv.value) {
                Ok(info) => {
                    obs.keepers.insert(info.uid.clone(), info);
                }
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "ignoring a keeper report"),
            }
        }
        for kv in self.store.list(&keys.proxies_prefix()).await?.kvs {
            match decode::<ProxyInfo>(&kv.value) {
                Ok(info) => {
                    obs.proxies.insert(info.uid.clone(), info);
                }
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "ignoring a proxy report"),
            }
        }
        Ok(obs)
    }
}

/// The guarded write found another leader.
#[derive(Debug)]
struct Lost;

async fn next_change(watch: &mut Option<Watch>) {
    match watch {
        Some(w) => {
            if w.next().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
