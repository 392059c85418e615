//! Test support for the proxy: real etcd, real PostgreSQL, the real proxy binary, and cluster
//! data written by hand (no sentinel).
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support module"
)]
#![allow(clippy::unwrap_used, reason = "test support: a failed step panics")]

pub mod loops;
pub mod wire;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tendril_control_model::{
    ClusterData, ClusterSpec, Generation, Keys, ProxyInfo, ProxyRoute, decode, encode,
};
use tendril_control_store::{EtcdStore, Store, StoreConfig};
use tendril_testkit::{EtcdServer, PgServer, free_port};

pub const CLUSTER: &str = "pxy";

pub struct Env {
    pub etcd: EtcdServer,
    pub store: EtcdStore,
    pub keys: Keys,
    pub cd: ClusterData,
}

impl Env {
    pub async fn new() -> Env {
        tendril_testkit::init_logging();
        let etcd = EtcdServer::start();
        let store = EtcdStore::connect(&StoreConfig::new([etcd.endpoint()]))
            .await
            .unwrap();
        let cd = ClusterData::new("c", ClusterSpec::default(), SystemTime::now());
        Env {
            etcd,
            store,
            keys: Keys::new(CLUSTER).unwrap(),
            cd,
        }
    }

    /// Writes the cluster data routing to `port` on 127.0.0.1 (or nowhere), bumping the
    /// proxy generation. Returns the generation.
    pub async fn route(&mut self, db: Option<(&str, u16)>, hold: bool) -> Generation {
        let db = db.map(|(uid, port)| (uid, std::net::IpAddr::from([127, 0, 0, 1]), port));
        self.route_to(db, hold).await
    }

    /// As [`Env::route`], to a master at any address (one in a network namespace).
    pub async fn route_to(
        &mut self,
        db: Option<(&str, std::net::IpAddr, u16)>,
        hold: bool,
    ) -> Generation {
        self.cd.proxy.generation = self.cd.proxy.generation.next();
        self.cd.proxy.master = db.map(|(uid, address, port)| ProxyRoute {
            db_uid: uid.into(),
            address: address.to_string(),
            port,
        });
        self.cd.proxy.hold = hold;
        self.cd.generation = self.cd.generation.next();
        // Retried: under a soak's load a request can fail once (as it can for every
        // component, which all retry).
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(e) = self
            .store
            .put(&self.keys.cluster_data(), encode(&self.cd), None)
            .await
        {
            println!("writing the cluster data failed (retrying): {e}");
            assert!(
                Instant::now() < deadline,
                "cannot write the cluster data: {e}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.cd.proxy.generation
    }

    /// Makes `master` the cluster's master database and `standbys` (database uid, port on
    /// 127.0.0.1) its standbys, each eligible for reads (healthy, converged, streaming, not
    /// behind), in the cluster data the next [`Env::route`] writes.
    pub fn set_standbys(&mut self, master: &str, standbys: &[(&str, u16)]) {
        let at: Vec<(&str, std::net::IpAddr, u16)> = standbys
            .iter()
            .map(|(uid, port)| (*uid, std::net::IpAddr::from([127, 0, 0, 1]), *port))
            .collect();
        self.set_standbys_at(master, &at);
    }

    /// As [`Env::set_standbys`], with each standby at any address (one in a network
    /// namespace).
    pub fn set_standbys_at(&mut self, master: &str, standbys: &[(&str, std::net::IpAddr, u16)]) {
        use tendril_control_model::{Db, DbRole, DbSpec, DbStatus, FollowConfig};
        let db = |uid: &str, role: DbRole, at: Option<(std::net::IpAddr, u16)>| Db {
            uid: uid.into(),
            generation: Generation(1),
            change_time: SystemTime::now(),
            spec: DbSpec {
                keeper_uid: format!("keeper-{uid}"),
                role,
                follow: (role == DbRole::Standby).then(|| FollowConfig::Internal {
                    db_uid: master.into(),
                }),
                ..DbSpec::default()
            },
            status: DbStatus {
                healthy: true,
                current_generation: Generation(1),
                listen_address: at.map(|(ip, _)| ip.to_string()),
                port: at.map(|(_, port)| port),
                streaming: role == DbRole::Standby,
                ..DbStatus::default()
            },
        };
        self.cd.dbs.clear();
        self.cd
            .dbs
            .insert(master.into(), db(master, DbRole::Master, None));
        for (uid, ip, port) in standbys {
            self.cd
                .dbs
                .insert((*uid).into(), db(uid, DbRole::Standby, Some((*ip, *port))));
        }
        self.cd.master = Some(master.into());
    }

    pub async fn acked(&self, uid: &str) -> Option<Generation> {
        let kv = self.store.get(&self.keys.proxy(uid)).await.unwrap()?;
        decode::<ProxyInfo>(&kv.value).ok().map(|p| p.generation)
    }

    pub async fn wait_acked(&self, uid: &str, generation: Generation, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if self.acked(uid).await.is_some_and(|g| g >= generation) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("proxy {uid} did not acknowledge generation {generation} in {limit:?}");
    }
}

pub struct ProxyProc {
    pub child: Child,
    pub port: u16,
    pub metrics_port: u16,
    pub uid: String,
    pub log: tempfile::NamedTempFile,
}

impl ProxyProc {
    pub fn start(env: &Env, uid: &str, args: &[&str], envs: &[(&str, &str)]) -> ProxyProc {
        // --listen-address, --metrics-address and --workers in `args` replace the defaults.
        let given = |flag: &str| {
            args.iter()
                .position(|a| *a == flag)
                .map(|i| args[i + 1].rsplit(':').next().unwrap().parse().unwrap())
        };
        let listen = given("--listen-address");
        let port = listen.unwrap_or_else(free_port);
        let metrics = given("--metrics-address");
        let metrics_port = metrics.unwrap_or_else(free_port);
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tendril-proxy"));
        cmd.env("TENDRIL_CLUSTER_NAME", CLUSTER)
            .env("TENDRIL_STORE_ENDPOINTS", env.etcd.endpoint())
            .env("TENDRIL_LOG", "info,tendril_proxy=debug")
            .arg("--uid")
            .arg(uid)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.reopen().unwrap())
            .stderr(log.reopen().unwrap());
        if listen.is_none() {
            cmd.arg("--listen-address").arg(format!("127.0.0.1:{port}"));
        }
        if metrics.is_none() {
            cmd.arg("--metrics-address")
                .arg(format!("127.0.0.1:{metrics_port}"));
        }
        if !args.contains(&"--workers") {
            cmd.arg("--workers").arg("2");
        }
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd.spawn().unwrap();
        let p = ProxyProc {
            child,
            port,
            metrics_port,
            uid: uid.into(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !p.log_text().contains("proxy listening") {
            assert!(
                Instant::now() < deadline,
                "proxy did not start:\n{}",
                p.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }

    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return String::new();
        };
        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    /// `/health` on the metrics port: the HTTP status and the body's line.
    pub fn health(&self) -> (u16, String) {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)) else {
            return (0, String::new());
        };
        let _ = s.write_all(b"GET /health HTTP/1.0\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        let status = out
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
        (status, body)
    }

    /// The value of a metric line starting with `prefix`.
    pub fn metric(&self, prefix: &str) -> Option<f64> {
        self.metrics()
            .lines()
            .find(|l| l.starts_with(prefix))?
            .rsplit(' ')
            .next()?
            .parse()
            .ok()
    }

    /// Connections the kernel path gave to `path` (`tendril_proxy_kernel_path_total`),
    /// whatever the reason.
    pub fn path_total(&self, path: &str) -> f64 {
        let label = format!("path=\"{path}\"");
        self.metrics()
            .lines()
            .filter(|l| l.starts_with("tendril_proxy_kernel_path_total{") && l.contains(&label))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// Entries in every kernel-forwarding map (pair path and client-socket path); 0 when
    /// the proxy forwards in userspace.
    pub fn kernel_map_entries(&self) -> f64 {
        let maps = [
            ("kernel_map_entries", "peers"),
            ("kernel_map_entries", "directions"),
            ("kernel_map_entries", "forwarded"),
            ("kernel_client_socket_map_entries", "clients"),
            ("kernel_client_socket_map_entries", "routes"),
            ("kernel_client_socket_map_entries", "servers"),
            ("kernel_client_socket_map_entries", "replies"),
            ("kernel_client_socket_map_entries", "backends"),
        ];
        maps.iter()
            .filter_map(|(metric, map)| {
                self.metric(&format!(
                    "tendril_proxy_{metric}{{cluster=\"{CLUSTER}\",map=\"{map}\"}}"
                ))
            })
            .sum()
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), signal);
    }

    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A protocol 3.0 StartupMessage with these parameters (user, database, ...).
pub fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for (name, value) in params {
        for s in [name, value] {
            body.extend_from_slice(s.as_bytes());
            body.push(0);
        }
    }
    body.push(0);
    let mut packet = u32::try_from(body.len() + 4)
        .unwrap()
        .to_be_bytes()
        .to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// Connects through `port` as the superuser.
pub async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// The port of the PostgreSQL a client is connected to.
pub async fn backend_port(client: &tokio_postgres::Client) -> u16 {
    let port: String = client.query_one("SHOW port", &[]).await.unwrap().get(0);
    port.parse().unwrap()
}

/// Waits until a connection through the proxy lands on `port`.
pub async fn wait_routed(proxy: u16, port: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let started = Instant::now();
        let last = match connect(proxy).await {
            Ok(c) => {
                let on = backend_port(&c).await;
                if on == port {
                    return;
                }
                format!("a connection landed on port {on}")
            }
            Err(e) => format!("{e:?} after {:?}", started.elapsed()),
        };
        assert!(
            Instant::now() < deadline,
            "proxy on {proxy} did not route to {port} in {limit:?}; last attempt: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `child` off the async threads; its exit status and its stdout then stderr.
pub async fn finished(child: std::process::Child) -> (std::process::ExitStatus, String) {
    let out = tokio::task::spawn_blocking(move || child.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

/// pgbench with `args` through 127.0.0.1:`port` as the superuser, its output piped.
pub fn pgbench(args: &[&str], port: u16) -> Child {
    Command::new(format!("{}/pgbench", tendril_testkit::PG_BIN))
        .args(args)
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// pgbench's tables (scale 1) in the PostgreSQL on `port`.
pub fn pgbench_init(port: u16) {
    let init = pgbench(&["-i", "-q", "-s", "1"], port)
        .wait_with_output()
        .unwrap();
    assert!(init.status.success(), "{init:?}");
}

/// The transactions pgbench's report says it processed (0 when the line is missing).
pub fn pgbench_processed(report: &str) -> u64 {
    report
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next()?.trim().parse().ok())
        .unwrap_or(0)
}

/// A proxy `uid` (default flags) routing to a new PostgreSQL, and its listen address.
pub async fn routed_proxy(uid: &str) -> (Env, PgServer, ProxyProc, String) {
    let mut env = Env::new().await;
    let pg = pg();
    env.route(Some(("db1", pg.port())), false).await;
    let proxy = ProxyProc::start(&env, uid, &[], &[]);
    wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
    let listen = format!("127.0.0.1:{}", proxy.port);
    (env, pg, proxy, listen)
}

pub fn pg() -> PgServer {
    PgServer::start()
}

/// Every forwarding path a user can select, by the names the soak's settings use, with the
/// flags that select it.
pub const PATHS: &[(&str, &[&str])] = &[
    ("userspace-io-uring", &["--forwarding", "userspace"]),
    (
        "userspace-epoll",
        &["--forwarding", "userspace", "--io-driver", "epoll"],
    ),
    (
        "kernel-pair",
        &["--forwarding", "kernel", "--kernel-client-socket", "off"],
    ),
    (
        "kernel-client-socket",
        &["--forwarding", "kernel", "--kernel-client-socket", "on"],
    ),
    // `--forwarding auto`: the client-socket path for clients on this host that read in
    // non-blocking mode, userspace for the rest.
    ("default", &[]),
];

/// Sockets on the proxy's port other than listeners and TIME-WAIT.
pub fn proxy_sockets(port: u16) -> Vec<String> {
    let out = Command::new("ss")
        .args(["-tanH", "sport", "=", &format!(":{port}")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with("LISTEN") && !l.starts_with("TIME-WAIT"))
        .map(str::to_owned)
        .collect()
}

/// Waits up to `limit` until the proxy holds nothing: no connection, no kernel map entry
/// (as `map_entries` counts them), no socket but listeners and TIME-WAIT; returns what is
/// left otherwise.
pub fn leftovers_of(
    proxy: &ProxyProc,
    map_entries: fn(&ProxyProc) -> f64,
    limit: Duration,
) -> Option<String> {
    let deadline = Instant::now() + limit;
    loop {
        let active = proxy
            .metric("tendril_proxy_connections_active{")
            .unwrap_or(-1.0);
        let entries = map_entries(proxy);
        let sockets = proxy_sockets(proxy.port);
        if active == 0.0 && entries == 0.0 && sockets.is_empty() {
            return None;
        }
        if Instant::now() >= deadline {
            // Both ends of those connections, with their timers, windows and processes:
            // what a socket left in FIN-WAIT-2 is waiting for.
            let port = format!(":{}", proxy.port);
            let out = Command::new("ss")
                .args([
                    "-tanoiepH",
                    "(",
                    "sport",
                    "=",
                    &port,
                    "or",
                    "dport",
                    "=",
                    &port,
                ])
                .arg(")")
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            return Some(format!(
                "{active} connections active, {entries} kernel map entries, sockets: \
                 {sockets:?}; both ends in detail: {:?}",
                out.lines().collect::<Vec<_>>()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until PostgreSQL accepts connections again (after a crash reset or a restart).
pub fn wait_ready(pg: &PgServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ok = Command::new(format!("{}/pg_isready", tendril_testkit::PG_BIN))
            .args(["-q", "-h", &pg.host().to_string()])
            .args(["-p", &pg.port().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "postgres did not come back:\n{}",
            pg.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
