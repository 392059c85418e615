//! End-to-end harness: a whole tendril cluster of real processes (etcd, keepers running
//! PostgreSQL 15, sentinels, proxies), a writer that records every acknowledged write through
//! the proxy, a monitor of what the proxies are told to route to, and the faults (kill -9,
//! SIGSTOP, network partitions in network namespaces).
//!
//! Used by the end-to-end tests (`e2e/tests`) and by the failover timing benchmark
//! (`cargo xtask bench failover`). Binaries are taken from the directory of the running
//! executable (`target/<profile>`), or `TENDRIL_BIN_DIR`: build them first (`cargo test
//! --workspace` and `cargo xtask test` do).
#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed step panics with its context"
)]

pub mod checker;
pub mod faults;
pub mod guide;
pub mod history;
pub mod pgbackrest;
pub mod soak;
pub mod writer;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tendril_control_model::{
    ClusterData, ClusterPhase, DbRole, KeeperInfo, Keys, ProxyRoute, decode,
};
use tendril_control_store::{EtcdStore, Store, StoreConfig, WatchEvent};
use tendril_testkit::{EtcdServer, free_port};

/// The superuser's password in every harness cluster.
pub const SU_PASSWORD: &str = "e2e-su-secret";
/// The replication user's password (the keepers' default user, `repl`).
pub const REPL_PASSWORD: &str = "e2e-repl-secret";
/// The cluster name.
pub const CLUSTER: &str = "e2e";

/// The longest the harness waits for one answer from the store.
const STORE_LIMIT: Duration = Duration::from_secs(10);

/// Where the binaries are.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TENDRIL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().unwrap();
    let mut dir = exe.parent().unwrap().to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    for bin in [
        "tendril-keeper",
        "tendril-sentinel",
        "tendril-proxy",
        "tendrilctl",
    ] {
        assert!(
            dir.join(bin).is_file(),
            "{bin} not found in {}: build the workspace binaries first (cargo build --workspace --bins)",
            dir.display()
        );
    }
    dir
}

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// Keepers.
    pub keepers: usize,
    /// Sentinels.
    pub sentinels: usize,
    /// Proxies.
    pub proxies: usize,
    /// The cluster spec (JSON).
    pub spec: String,
    /// Put keeper `k0` in a network namespace (for partition tests); everything else then
    /// listens on the root side of the veth pair.
    pub partitionable: bool,
    /// Put every keeper in a network namespace of its own (a host each, reaching the others
    /// through the root namespace; etcd, sentinels, proxies and clients stay in the root
    /// namespace): [`Node::host`].
    pub isolated: bool,
    /// Wait until every keeper is healthy and converged before returning (`false`: for
    /// tests of a cluster that cannot initialise).
    pub wait_healthy: bool,
    /// The cluster's name in the store.
    pub name: String,
    /// The etcd of another cluster, shared (two clusters with different names in one
    /// store); `None` starts one for this cluster. Not with network namespaces.
    pub etcd: Option<Arc<EtcdServer>>,
    /// More environment for every keeper (`TENDRIL_*` settings).
    pub keeper_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            keepers: 3,
            sentinels: 2,
            proxies: 1,
            spec: default_spec(false),
            partitionable: false,
            isolated: false,
            wait_healthy: true,
            name: CLUSTER.into(),
            etcd: None,
            keeper_env: Vec::new(),
        }
    }
}

/// The default spec of the harness: tendril's defaults, pg_rewind on.
pub fn default_spec(sync: bool) -> String {
    format!(r#"{{"synchronous_replication": {sync}, "use_pg_rewind": true}}"#)
}

/// A spec tuned for fast failover.
pub fn tuned_spec(sync: bool) -> String {
    format!(
        r#"{{"synchronous_replication": {sync}, "use_pg_rewind": true, "sleep_interval": "300ms",
            "fail_interval": "1500ms", "proxy_check_interval": "300ms", "proxy_timeout": "2s"}}"#
    )
}

/// A process the harness started.
#[derive(Debug)]
pub struct Proc {
    /// Name.
    pub name: String,
    /// The child.
    pub child: Option<Child>,
    /// Log file.
    pub log: PathBuf,
    command: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Proc {
    /// Starts `command` with `envs`, its output in `dir/<name>.log`.
    pub fn spawn(
        name: &str,
        dir: &Path,
        command: Vec<String>,
        envs: Vec<(String, String)>,
    ) -> Proc {
        let mut p = Proc {
            name: name.into(),
            child: None,
            log: dir.join(format!("{name}.log")),
            command,
            envs,
        };
        p.start();
        p
    }

    /// (Re)starts the process.
    pub fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.envs {
            cmd.env(k, v);
        }
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", self.name)),
        );
    }

    /// The process id.
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// Sends a signal.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to 60 s, then SIGKILL.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log's text.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
        self.stop();
    }
}

/// A keeper and the PostgreSQL it runs.
#[derive(Debug)]
pub struct Node {
    /// Keeper uid.
    pub uid: String,
    /// PostgreSQL port.
    pub port: u16,
    /// Address PostgreSQL listens on.
    pub address: IpAddr,
    /// The keeper's data dir.
    pub data_dir: PathBuf,
    /// The keeper process.
    pub keeper: Proc,
    /// The processes a freeze stopped, for the thaw (their parents may have changed).
    pub frozen: std::sync::Mutex<Vec<i32>>,
    /// Its own network namespace, in an isolated cluster ([`Options::isolated`]).
    pub host: Option<faults::Netns>,
    /// The keeper's HTTP address (`--metrics-address`: metrics and role checks).
    pub http: std::net::SocketAddr,
}

/// The postmaster pid of the keeper whose data directory is `data_dir`, from PostgreSQL's
/// `postmaster.pid` (`None` when PostgreSQL is not running there).
pub fn postmaster_pid_in(data_dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(data_dir.join("postgres/postmaster.pid")).ok()?;
    text.lines().next()?.trim().parse().ok()
}

/// The last `lines` lines of a log's `text`, under a `--- title ---` header.
pub fn log_tail(title: &str, text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let mut out = format!("--- {title} ---\n");
    for l in &all[all.len().saturating_sub(lines)..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

impl Node {
    /// The postmaster pid, from postmaster.pid.
    pub fn postmaster_pid(&self) -> Option<i32> {
        postmaster_pid_in(&self.data_dir)
    }

    /// A superuser connection straight to this PostgreSQL.
    pub async fn sql(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        connect(&self.address.to_string(), self.port).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Thaw first: a frozen postgres ignores everything else.
        if let Some(pid) = self.postmaster_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGCONT,
            );
        }
        self.keeper.signal(nix::sys::signal::Signal::SIGCONT);
        self.keeper.stop();
        if let Some(pid) = self.postmaster_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGQUIT,
            );
        }
    }
}

/// What the proxies were told to route to, in order, with when.
pub type RouteLog = Arc<Mutex<Vec<(Instant, Option<ProxyRoute>)>>>;

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The cluster's directory (logs, data).
    pub dir: tempfile::TempDir,
    /// Keepers, `k0`..
    pub nodes: Vec<Node>,
    /// Sentinels.
    pub sentinels: Vec<Proc>,
    /// Each sentinel's metrics address, in the order of `sentinels`.
    pub sentinel_metrics: Vec<std::net::SocketAddr>,
    /// Proxies: (process, port).
    pub proxies: Vec<(Proc, u16)>,
    /// The store.
    pub store: EtcdStore,
    /// Store keys.
    pub keys: Keys,
    /// What the proxies were told to route to, in order, with when (from a watch).
    pub routes: RouteLog,
    /// The network namespace of `k0`, when partitionable.
    pub netns: Option<faults::Netns>,
    bin: PathBuf,
    store_endpoint: String,
    etcd: Arc<EtcdServer>,
    /// The cluster's name in the store.
    pub name: String,
    /// More environment for every keeper.
    keeper_env: Vec<(String, String)>,
    _watch: tokio::task::JoinHandle<()>,
}

impl Cluster {
    /// Starts etcd, keepers, sentinels and proxies; returns once a master is published and
    /// every standby streams from it.
    pub async fn start(opts: Options) -> Cluster {
        tendril_testkit::init_logging();
        let bin = bin_dir();
        let keep = std::env::var_os("TENDRIL_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix("tendril-e2e-")
            .disable_cleanup(keep)
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("su.pw"), SU_PASSWORD).unwrap();
        std::fs::write(dir.path().join("repl.pw"), REPL_PASSWORD).unwrap();
        let netns = opts.partitionable.then(faults::Netns::create);
        let root_ip: IpAddr = netns
            .as_ref()
            .map_or("127.0.0.1".parse().unwrap(), |n| n.root_ip);
        let mut hosts: Vec<faults::Netns> = Vec::new();
        if opts.isolated {
            for _ in 0..opts.keepers {
                let host = faults::Netns::create();
                host.route_through_root();
                hosts.push(host);
            }
        }
        // The store is reached on loopback from this namespace and, from k0's (or each
        // keeper's), on an address of its own, so a test can cut a keeper from the store
        // alone (Netns::cut_store).
        let store_ips: Vec<IpAddr> = netns.iter().chain(&hosts).map(|n| n.store_ip).collect();
        let etcd = match opts.etcd.clone() {
            Some(shared) => {
                assert!(
                    store_ips.is_empty(),
                    "a shared etcd listens on loopback only"
                );
                shared
            }
            None if store_ips.is_empty() => Arc::new(EtcdServer::start()),
            None => Arc::new(EtcdServer::start_also_on_each(&store_ips)),
        };
        let store_endpoint = etcd.endpoint();
        let store = EtcdStore::connect(&StoreConfig::new([etcd.endpoint()]))
            .await
            .unwrap();
        let keys = Keys::new(&opts.name).unwrap();
        let ctl = |args: &[&str]| {
            let out = Command::new(bin.join("tendrilctl"))
                .env("TENDRIL_CLUSTER_NAME", &opts.name)
                .env("TENDRIL_STORE_ENDPOINTS", etcd.endpoint())
                .args(args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "tendrilctl {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ctl(&["init", &opts.spec]);
        let routes = Arc::new(Mutex::new(Vec::new()));
        let watch = tokio::spawn(watch_routes(
            store.clone(),
            keys.cluster_data(),
            routes.clone(),
        ));
        let mut cluster = Cluster {
            dir,
            nodes: Vec::new(),
            sentinels: Vec::new(),
            sentinel_metrics: Vec::new(),
            proxies: Vec::new(),
            store,
            keys,
            routes,
            netns,
            bin,
            store_endpoint,
            etcd,
            name: opts.name.clone(),
            keeper_env: opts.keeper_env.clone(),
            _watch: watch,
        };
        let mut hosts = hosts.into_iter();
        for i in 0..opts.keepers {
            let uid = format!("k{i}");
            if let Some(host) = hosts.next() {
                let place = (host.name.clone(), cluster.etcd.endpoint_on(host.store_ip));
                cluster.add_node(&uid, host.ns_ip, Some(place));
                if let Some(node) = cluster.nodes.last_mut() {
                    node.host = Some(host);
                }
                continue;
            }
            match &cluster.netns {
                Some(n) if i == 0 => {
                    let place = (n.name.clone(), cluster.etcd.endpoint_on(n.store_ip));
                    let ip = n.ns_ip;
                    cluster.add_node(&uid, ip, Some(place));
                }
                _ => cluster.add_node(&uid, root_ip, None),
            }
        }
        for i in 0..opts.sentinels {
            cluster.add_sentinel(i);
        }
        for i in 0..opts.proxies {
            cluster.add_proxy(i);
        }
        if opts.wait_healthy {
            cluster
                .wait_healthy(opts.keepers, Duration::from_secs(120))
                .await;
        }
        cluster
    }

    /// Adds keeper `uid` with PostgreSQL on `address`; `place`: the network namespace it
    /// runs in and the store endpoint it reaches from there.
    fn add_node(&mut self, uid: &str, address: IpAddr, place: Option<(String, String)>) {
        let port = free_port();
        let http = std::net::SocketAddr::new(address, free_port());
        let data_dir = self.dir.path().join(uid);
        let mut command = Vec::new();
        if let Some((ns, _)) = &place {
            command.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        command.push(
            self.bin
                .join("tendril-keeper")
                .to_string_lossy()
                .into_owned(),
        );
        command.extend([
            "--uid".into(),
            uid.into(),
            "--data-dir".into(),
            data_dir.to_string_lossy().into_owned(),
            "--pg-listen-address".into(),
            address.to_string(),
            "--pg-port".into(),
            port.to_string(),
            "--metrics-address".into(),
            http.to_string(),
            "--pg-su-passwordfile".into(),
            self.dir.path().join("su.pw").to_string_lossy().into_owned(),
            "--pg-repl-passwordfile".into(),
            self.dir
                .path()
                .join("repl.pw")
                .to_string_lossy()
                .into_owned(),
        ]);
        let store = place.map_or_else(|| self.store_endpoint.clone(), |(_, store)| store);
        let mut env = self.envs(store);
        env.extend(self.keeper_env.iter().cloned());
        let keeper = Proc::spawn(&format!("keeper-{uid}"), self.dir.path(), command, env);
        self.nodes.push(Node {
            uid: uid.into(),
            port,
            address,
            data_dir,
            keeper,
            frozen: std::sync::Mutex::new(Vec::new()),
            host: None,
            http,
        });
    }

    fn envs(&self, store: String) -> Vec<(String, String)> {
        vec![
            ("TENDRIL_CLUSTER_NAME".into(), self.name.clone()),
            ("TENDRIL_STORE_ENDPOINTS".into(), store),
            ("TENDRIL_LOG".into(), "info".into()),
        ]
    }

    /// Starts one more keeper, `uid`, on this host (a cluster without network namespaces).
    pub fn add_keeper(&mut self, uid: &str) {
        self.add_node(uid, IpAddr::from([127, 0, 0, 1]), None);
    }

    fn add_sentinel(&mut self, i: usize) {
        let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let command = vec![
            self.bin
                .join("tendril-sentinel")
                .to_string_lossy()
                .into_owned(),
            "--leader-ttl".into(),
            "3s".into(),
            "--metrics-address".into(),
            metrics.to_string(),
        ];
        self.sentinel_metrics.push(metrics);
        self.sentinels.push(Proc::spawn(
            &format!("sentinel-{i}"),
            self.dir.path(),
            command,
            self.envs(self.store_endpoint.clone()),
        ));
    }

    fn add_proxy(&mut self, i: usize) {
        let port = free_port();
        self.spawn_proxy(i, port, Vec::new());
    }

    /// Starts one more proxy, with a read-only listener (`args`: more flags, such as
    /// `--read-only-fallback reject`); returns its index in `proxies`, its port and its
    /// read-only port.
    pub fn add_read_only_proxy(&mut self, args: &[&str]) -> (usize, u16, u16) {
        let i = self.proxies.len();
        let (port, read_only) = (free_port(), free_port());
        let mut extra = vec![
            "--read-only-listen-address".to_owned(),
            format!("127.0.0.1:{read_only}"),
        ];
        extra.extend(args.iter().map(|a| (*a).to_owned()));
        self.spawn_proxy(i, port, extra);
        (i, port, read_only)
    }

    fn spawn_proxy(&mut self, i: usize, port: u16, extra: Vec<String>) {
        let mut command = vec![
            self.bin
                .join("tendril-proxy")
                .to_string_lossy()
                .into_owned(),
            "--listen-address".into(),
            format!("127.0.0.1:{port}"),
            "--uid".into(),
            format!("p{i}"),
            "--workers".into(),
            "2".into(),
            "--hold-timeout".into(),
            "30s".into(),
        ];
        command.extend(extra);
        let p = Proc::spawn(
            &format!("proxy-{i}"),
            self.dir.path(),
            command,
            self.envs(self.store_endpoint.clone()),
        );
        self.proxies.push((p, port));
    }

    /// The first proxy's port.
    pub fn proxy_port(&self) -> u16 {
        self.proxies[0].1
    }

    /// The node of keeper `uid`.
    pub fn node(&self, uid: &str) -> &Node {
        self.nodes.iter().find(|n| n.uid == uid).unwrap()
    }

    /// The node of keeper `uid`, mutably.
    pub fn node_mut(&mut self, uid: &str) -> &mut Node {
        self.nodes.iter_mut().find(|n| n.uid == uid).unwrap()
    }

    /// The cluster data.
    pub async fn cluster_data(&self) -> ClusterData {
        let kv = self.get(&self.keys.cluster_data()).await.unwrap().unwrap();
        decode(&kv.value).unwrap()
    }

    /// A key from the store, within [`STORE_LIMIT`] whatever the client's own timeouts
    /// do: a harness that waits on the store forever hides the fault it is testing.
    async fn get(&self, key: &str) -> Result<Option<tendril_control_store::KeyValue>, String> {
        match tokio::time::timeout(STORE_LIMIT, self.store.get(key)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("get {key}: no answer within {STORE_LIMIT:?}")),
        }
    }

    /// The cluster data, or None when the store does not answer or holds none.
    pub async fn try_cluster_data(&self) -> Option<ClusterData> {
        let kv = self.get(&self.keys.cluster_data()).await.ok()??;
        decode(&kv.value).ok()
    }

    /// A keeper's report.
    pub async fn info(&self, uid: &str) -> Option<KeeperInfo> {
        let kv = self.get(&self.keys.keeper(uid)).await.ok()??;
        decode(&kv.value).ok()
    }

    /// The keeper running the master.
    pub async fn master_keeper(&self) -> Option<String> {
        let cd = self.cluster_data().await;
        cd.master_db().map(|d| d.spec.keeper_uid.clone())
    }

    /// Waits until a master is published and `standbys` standbys stream from it (healthy,
    /// converged, in recovery).
    pub async fn wait_healthy(&self, keepers: usize, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if self.healthy(keepers).await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "cluster not healthy within {limit:?}:\n{}\n{}",
                    self.describe().await,
                    self.logs_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Whether a master is published and `keepers` databases have converged (the master
    /// out of recovery, each standby in it) and the sentinel counts each healthy (a
    /// switchover picks only such a target).
    pub async fn healthy(&self, keepers: usize) -> bool {
        let Some(cd) = self.try_cluster_data().await else {
            return false;
        };
        cd.phase == ClusterPhase::Normal
            && cd.proxy.master.is_some()
            && cd.dbs.values().all(|d| d.status.healthy)
            && self.all_converged(&cd, keepers).await
    }

    async fn all_converged(&self, cd: &ClusterData, keepers: usize) -> bool {
        let mut good = 0;
        for db in cd.dbs.values() {
            let Some(info) = self.info(&db.spec.keeper_uid).await else {
                return false;
            };
            let Some(s) = info.postgres_state else {
                return false;
            };
            // A standby cluster's leader stays in recovery.
            let role_ok = match db.spec.role {
                DbRole::Master => s.in_recovery == db.spec.is_standby_leader(),
                DbRole::Standby => s.in_recovery,
            };
            if s.uid == db.uid && s.healthy && s.generation == db.generation && role_ok {
                good += 1;
            }
        }
        good == keepers && cd.dbs.len() == keepers
    }

    /// Makes `keeper`'s database the master (a switchover) unless it is already. Waits first
    /// until every keeper's database is healthy and converged: a keeper that has just
    /// rejoined (a former master) is not yet a target the sentinel accepts.
    pub async fn make_master(&self, keeper: &str) {
        if self.master_keeper().await.as_deref() == Some(keeper) {
            return;
        }
        self.wait_healthy(self.nodes.len(), Duration::from_secs(90))
            .await;
        let out = self.ctl(&["switchover", "--to", keeper]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let keepers = self.nodes.len();
        self.wait_healthy(keepers, Duration::from_secs(90)).await;
    }

    /// Waits until a master on a keeper other than `old` is published; returns that keeper.
    pub async fn wait_new_master(&self, old: &str, limit: Duration) -> String {
        let cd = self
            .wait_cd("a new master published", limit, |cd| {
                cd.proxy.master.is_some()
                    && cd.master_db().is_some_and(|m| m.spec.keeper_uid != old)
            })
            .await;
        cd.master_db()
            .map(|m| m.spec.keeper_uid.clone())
            .unwrap_or_default()
    }

    /// Panics unless every id of `acked` is in the `writes` table, read through the proxy.
    pub async fn assert_no_acked_write_lost(&self, acked: &[i64]) {
        let client = connect("127.0.0.1", self.proxy_port())
            .await
            .expect("connect through the proxy");
        let rows = client
            .query("SELECT id FROM writes", &[])
            .await
            .expect("read the writes");
        let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
        let missing: Vec<&i64> = acked.iter().filter(|id| !present.contains(id)).collect();
        assert!(
            missing.is_empty(),
            "{} acknowledged writes lost: {:?}",
            missing.len(),
            &missing[..missing.len().min(20)]
        );
    }

    /// Waits for a condition on the cluster data.
    pub async fn wait_cd(
        &self,
        what: &str,
        limit: Duration,
        check: impl Fn(&ClusterData) -> bool,
    ) -> ClusterData {
        let deadline = Instant::now() + limit;
        loop {
            let cd = self.cluster_data().await;
            if check(&cd) {
                return cd;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what} not reached within {limit:?}:\n{}\n{}",
                    self.describe().await,
                    self.logs_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A summary of the cluster data and the recent events, for failure messages.
    pub async fn describe(&self) -> String {
        let Some(cd) = self.try_cluster_data().await else {
            return "no cluster data (the store does not answer)\n".into();
        };
        let mut out = format!(
            "phase {:?} master {:?} route {:?} switchover {:?}\n",
            cd.phase, cd.master, cd.proxy.master, cd.switchover
        );
        for db in cd.dbs.values() {
            out.push_str(&format!(
                "  db {} keeper {} {:?} gen {}/{} healthy {} stop {}\n",
                db.uid,
                db.spec.keeper_uid,
                db.spec.role,
                db.generation,
                db.status.current_generation,
                db.status.healthy,
                db.spec.stop
            ));
        }
        for e in cd.events.iter().rev().take(12).rev() {
            out.push_str(&format!("  event {}: {}\n", e.kind, e.reason));
        }
        out
    }

    /// The store, to start another cluster beside this one ([`Options::etcd`]).
    pub fn etcd(&self) -> Arc<EtcdServer> {
        self.etcd.clone()
    }

    /// Stops etcd (SIGSTOP): the store is down for every component at once.
    pub fn pause_store(&self) {
        self.etcd.pause();
    }

    /// Resumes etcd after [`Cluster::pause_store`].
    pub fn resume_store(&self) {
        self.etcd.resume();
    }

    /// The end of every process log.
    pub fn logs_tail(&self) -> String {
        let mut out = String::new();
        let procs = self
            .nodes
            .iter()
            .map(|n| &n.keeper)
            .chain(self.sentinels.iter())
            .chain(self.proxies.iter().map(|(p, _)| p));
        for p in procs {
            out.push_str(&log_tail(&p.name, &p.log_text(), 8));
        }
        out
    }

    /// Checks the route history: the proxies never switched from one master to another
    /// without a fence (no route) in between.
    pub fn assert_never_two_masters_routable(&self) {
        let routes = self.routes.lock().unwrap();
        let mut last: Option<&ProxyRoute> = None;
        for (_, route) in routes.iter() {
            if let (Some(a), Some(b)) = (last, route.as_ref()) {
                assert_eq!(
                    a.db_uid, b.db_uid,
                    "the route moved from {} to {} without a fence: {routes:?}",
                    a.db_uid, b.db_uid
                );
            }
            last = route.as_ref();
        }
    }

    /// Starts a tendrilctl command.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("tendrilctl"))
            .env("TENDRIL_CLUSTER_NAME", &self.name)
            .env("TENDRIL_STORE_ENDPOINTS", self.etcd.endpoint())
            .args(args)
            .output()
            .unwrap()
    }

    /// Restarts a proxy process (SIGKILL then start).
    pub fn restart_proxy(&mut self, i: usize) {
        let (p, _) = &mut self.proxies[i];
        p.kill();
        p.start();
    }

    /// The keeper uids in order.
    pub fn keeper_uids(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.uid.clone()).collect()
    }

    /// The replica ids seen on each node (for data checks).
    pub async fn count_on_each(&self, query: &str) -> BTreeMap<String, Option<i64>> {
        let mut out = BTreeMap::new();
        for n in &self.nodes {
            let v = match n.sql().await {
                Ok(c) => c
                    .query_one(query, &[])
                    .await
                    .ok()
                    .map(|r| r.get::<_, i64>(0)),
                Err(_) => None,
            };
            out.insert(n.uid.clone(), v);
        }
        out
    }
}

async fn watch_routes(store: EtcdStore, key: String, routes: RouteLog) {
    let Ok(mut watch) = store.watch(&key, 0).await else {
        return;
    };
    while let Some(event) = watch.next().await {
        if let WatchEvent::Put(kv) = event
            && let Ok(cd) = decode::<ClusterData>(&kv.value)
        {
            let mut r = routes.lock().unwrap();
            if r.last().map(|(_, x)| x) != Some(&cd.proxy.master) {
                r.push((Instant::now(), cd.proxy.master.clone()));
            }
        }
    }
}

/// `GET path` on `addr` (a daemon's metrics or role-check endpoint): the status code and the
/// body, or `None` when nothing answers within 2 s.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let limit = Duration::from_secs(2);
    let mut s = std::net::TcpStream::connect_timeout(&addr, limit).ok()?;
    s.set_read_timeout(Some(limit)).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, body.to_owned()))
}

/// As [`connect`], over TLS (required) with the server's certificate verified against the CA
/// certificate `ca` (as libpq's `sslmode=verify-full`).
pub async fn connect_tls(
    host: &str,
    port: u16,
    ca: &std::path::Path,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("read the CA certificate") {
        roots
            .add(cert.expect("a PEM certificate"))
            .expect("a usable CA certificate");
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conninfo = format!(
        "host={host} port={port} user=postgres password={SU_PASSWORD} dbname=postgres \
         connect_timeout=5 sslmode=require"
    );
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(config);
    let (client, conn) = tokio_postgres::connect(&conninfo, tls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// A superuser connection to `host:port`.
pub async fn connect(
    host: &str,
    port: u16,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    connect_as(host, port, None).await
}

/// A role and database to log in to, other than the harness's superuser.
#[derive(Debug, Clone)]
pub struct Login {
    /// The role.
    pub user: String,
    /// Its password.
    pub password: String,
    /// The database.
    pub dbname: String,
}

/// Connects without TLS as `login`, or as the harness's superuser to `postgres`.
pub async fn connect_as(
    host: &str,
    port: u16,
    login: Option<&Login>,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(host)
        .port(port)
        .connect_timeout(Duration::from_secs(5));
    match login {
        Some(l) => config.user(&l.user).password(&l.password).dbname(&l.dbname),
        None => config
            .user("postgres")
            .password(SU_PASSWORD)
            .dbname("postgres"),
    };
    let (client, conn) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}
