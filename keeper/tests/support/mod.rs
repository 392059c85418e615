//! Test support for keeper tests: real etcd, real keeper processes, and the test playing the
//! sentinel by writing the cluster data by hand.
#![allow(
    dead_code,
    reason = "each test binary uses a different part of the support module"
)]
#![allow(clippy::unwrap_used, reason = "test support: a failed step panics")]

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tendril_control_model::{
    ClusterData, ClusterPhase, ClusterSpec, Db, DbInitMode, DbRole, DbSpec, DbStatus, FollowConfig,
    Generation, Keeper, KeeperInfo, KeeperStatus, Keys, decode, encode,
};
use tendril_control_store::{EtcdStore, Store, StoreConfig};
use tendril_testkit::{EtcdServer, free_port};

pub const SU_PASSWORD: &str = "su-secret";
pub const REPL_PASSWORD: &str = "repl-secret";

/// etcd, a directory for keepers, and the cluster's keys.
pub struct Env {
    pub etcd: EtcdServer,
    pub dir: tempfile::TempDir,
    pub store: EtcdStore,
    pub keys: Keys,
}

impl Env {
    pub async fn new() -> Env {
        tendril_testkit::init_logging();
        let etcd = EtcdServer::start();
        // TENDRIL_TEST_KEEP=1 keeps the directory (logs, data) of a failed test for a look.
        let keep = std::env::var_os("TENDRIL_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new()
            .prefix("tendril-keeper-test-")
            .disable_cleanup(keep)
            .tempdir()
            .unwrap();
        // PostgreSQL runs as another user when tests run as root: it must reach its data.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(dir.path().join("su.pw"), format!("{SU_PASSWORD}\n")).unwrap();
        std::fs::write(dir.path().join("repl.pw"), REPL_PASSWORD).unwrap();
        let store = EtcdStore::connect(&StoreConfig::new([etcd.endpoint()]))
            .await
            .unwrap();
        Env {
            etcd,
            dir,
            store,
            keys: Keys::new("t").unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A keeper named `uid` with its own data dir and a free port, started.
    pub fn keeper(&self, uid: &str) -> KeeperProc {
        let mut k = self.keeper_without_start(uid);
        k.start();
        k
    }

    /// A keeper named `uid`, not started.
    pub fn keeper_without_start(&self, uid: &str) -> KeeperProc {
        KeeperProc {
            uid: uid.to_owned(),
            data_dir: self.path(uid),
            port: free_port(),
            endpoint: self.etcd.endpoint(),
            su_passwordfile: self.path("su.pw"),
            repl_passwordfile: self.path("repl.pw"),
            log: self.path(&format!("{uid}.keeper.log")),
            child: None,
        }
    }

    pub async fn cluster_data(&self) -> ClusterData {
        let kv = self
            .store
            .get(&self.keys.cluster_data())
            .await
            .unwrap()
            .expect("cluster data");
        decode(&kv.value).unwrap()
    }

    pub async fn write(&self, cd: &mut ClusterData) {
        cd.generation = cd.generation.next();
        self.store
            .put(&self.keys.cluster_data(), encode(cd), None)
            .await
            .unwrap();
    }

    pub async fn info(&self, uid: &str) -> Option<KeeperInfo> {
        let kv = self.store.get(&self.keys.keeper(uid)).await.unwrap()?;
        decode(&kv.value).ok()
    }

    /// Waits until `check` holds for keeper `uid`'s report.
    pub async fn wait_info(
        &self,
        uid: &str,
        what: &str,
        limit: Duration,
        check: impl Fn(&KeeperInfo) -> bool,
    ) -> KeeperInfo {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(info) = self.info(uid).await {
                if check(&info) {
                    return info;
                }
                last = Some(info);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let log =
            std::fs::read_to_string(self.path(&format!("{uid}.keeper.log"))).unwrap_or_default();
        let tail: Vec<&str> = log
            .lines()
            .rev()
            .take(40)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!(
            "keeper {uid}: {what} not reached in {limit:?}; last report: {last:#?}\nkeeper log tail:\n{}",
            tail.join("\n")
        );
    }

    /// Plays the sentinel's bookkeeping: registers keepers with the boot uuid they report and
    /// copies each database's reported state into its status.
    pub async fn sync_statuses(&self, cd: &mut ClusterData, keepers: &[&str]) {
        for uid in keepers {
            let info = self
                .wait_info(uid, "a report", Duration::from_secs(30), |_| true)
                .await;
            cd.keepers.insert(
                (*uid).to_owned(),
                Keeper {
                    uid: (*uid).to_owned(),
                    status: KeeperStatus {
                        healthy: true,
                        boot_uuid: Some(info.boot_uuid.clone()),
                        ..KeeperStatus::default()
                    },
                },
            );
            if let Some(state) = &info.postgres_state
                && let Some(db) = cd.dbs.get_mut(&state.uid)
            {
                db.status = DbStatus {
                    healthy: state.healthy,
                    current_generation: state.generation,
                    listen_address: Some(state.listen_address.clone()),
                    port: Some(state.port),
                    system_id: Some(state.system_id.clone()).filter(|s| !s.is_empty()),
                    timeline_id: state.timeline_id,
                    xlog_pos: state.xlog_pos,
                    ..DbStatus::default()
                };
            }
        }
    }

    /// Waits until keeper `uid` runs database `db` converged to its generation, healthy, in
    /// the expected recovery state.
    pub async fn wait_converged(&self, uid: &str, db: &Db, in_recovery: bool) -> KeeperInfo {
        let generation = db.generation;
        let db_uid = db.uid.clone();
        self.wait_info(
            uid,
            &format!("{db_uid} converged"),
            Duration::from_secs(90),
            move |info| {
                info.postgres_state.as_ref().is_some_and(|s| {
                    s.uid == db_uid
                        && s.generation == generation
                        && s.healthy
                        && s.in_recovery == in_recovery
                })
            },
        )
        .await
    }

    /// A brand-new cluster data document with fast timings.
    pub fn new_cluster(&self, spec: ClusterSpec) -> ClusterData {
        let mut cd = ClusterData::new("c1", spec, SystemTime::now());
        cd.phase = ClusterPhase::Normal;
        cd
    }
}

/// Keeper `k0` running database `db0` as the master of a new cluster with `spec`.
pub async fn new_master(env: &Env, spec: &ClusterSpec) -> (KeeperProc, ClusterData) {
    let k0 = env.keeper("k0");
    let mut cd = env.new_cluster(spec.clone());
    env.write(&mut cd).await;
    env.sync_statuses(&mut cd, &["k0"]).await;
    let db0 = db("db0", "k0", DbRole::Master, DbInitMode::New, None, spec);
    cd.dbs.insert("db0".into(), db0.clone());
    cd.master = Some("db0".into());
    env.write(&mut cd).await;
    env.wait_converged("k0", &db0, false).await;
    (k0, cd)
}

/// A database spec: master with `init_mode`, or standby following `follows`.
pub fn db(
    uid: &str,
    keeper: &str,
    role: DbRole,
    init_mode: DbInitMode,
    follows: Option<&str>,
    spec: &ClusterSpec,
) -> Db {
    Db {
        uid: uid.to_owned(),
        generation: Generation::INITIAL,
        change_time: SystemTime::now(),
        spec: DbSpec {
            keeper_uid: keeper.to_owned(),
            role,
            init_mode,
            follow: follows.map(|f| FollowConfig::Internal {
                db_uid: f.to_owned(),
            }),
            use_pg_rewind: spec.use_pg_rewind,
            max_standbys: spec.max_standbys,
            pg_parameters: spec.pg_parameters.clone(),
            ..DbSpec::default()
        },
        status: DbStatus::default(),
    }
}

/// Changes a database spec and bumps its generation, as the sentinel does.
pub fn change(cd: &mut ClusterData, uid: &str, f: impl FnOnce(&mut DbSpec)) {
    let db = cd.dbs.get_mut(uid).expect("db exists");
    f(&mut db.spec);
    db.generation = db.generation.next();
}

/// A keeper process.
pub struct KeeperProc {
    pub uid: String,
    pub data_dir: PathBuf,
    pub port: u16,
    endpoint: String,
    pub su_passwordfile: PathBuf,
    pub repl_passwordfile: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl KeeperProc {
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tendril-keeper"));
        cmd.env("TENDRIL_CLUSTER_NAME", "t")
            .env("TENDRIL_STORE_ENDPOINTS", &self.endpoint)
            .env("TENDRIL_LOG", "info,tendril_keeper=debug")
            .arg("--uid")
            .arg(&self.uid)
            .arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--pg-port")
            .arg(self.port.to_string())
            .arg("--pg-su-passwordfile")
            .arg(&self.su_passwordfile)
            .arg("--pg-repl-passwordfile")
            .arg(&self.repl_passwordfile);
        cmd
    }

    pub fn start(&mut self) {
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = self
            .command()
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start tendril-keeper");
        self.child = Some(child);
    }

    /// SIGTERM: the keeper stops postgres and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(90);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            panic!("keeper {} did not stop on SIGTERM", self.uid);
        }
    }

    /// Sends `signal` to the keeper process (not to its PostgreSQL).
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let child = self.child.as_ref().expect("the keeper runs");
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    pub fn postmaster_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("postgres/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// A superuser connection over TCP.
    pub async fn sql(&self) -> tokio_postgres::Client {
        connect(self.port).await
    }
}

impl Drop for KeeperProc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // Tests that fail leave no postgres behind: stop the keeper, which stops it.
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(pid) = self.postmaster_pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGQUIT,
            );
        }
    }
}

pub async fn connect(port: u16) -> tokio_postgres::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let conninfo = format!(
            "host=127.0.0.1 port={port} user=postgres password={SU_PASSWORD} dbname=postgres connect_timeout=5"
        );
        match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
            Ok((client, conn)) => {
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                return client;
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, port, "connect retry");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot connect to postgres on {port}: {e}"),
        }
    }
}

/// Waits until `query` (returning one bigint) gives `expected` on `port`.
pub async fn wait_count(port: u16, query: &str, expected: i64, limit: Duration) {
    let client = connect(port).await;
    let deadline = Instant::now() + limit;
    let mut last = None;
    while Instant::now() < deadline {
        match client.query_one(query, &[]).await {
            Ok(row) => {
                let n: i64 = row.get(0);
                if n == expected {
                    return;
                }
                last = Some(n.to_string());
            }
            Err(e) => last = Some(e.to_string()),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("on port {port}, {query} did not reach {expected} in {limit:?} (last: {last:?})");
}

pub fn path_exists(p: &Path) -> bool {
    p.exists()
}

pub fn params(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}
