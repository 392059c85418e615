//! docs/deploy.md, run as written on four "hosts": db1, db2 and db3 (an etcd member, a keeper
//! with PostgreSQL and a sentinel each) and app1 (a proxy and the application), each a network
//! namespace routed through this one, with its own `/etc/tendril`, `/etc/etcd`, `/usr/local`,
//! `/var/lib/tendril`, `/var/lib/etcd` and `/etc/default/etcd` (bind mounts of per-host
//! directories, so the guide's absolute paths stay apart). The guide's `systemctl` lines run
//! the shipped units through `tests/deploy/systemctl`, since the hosts have no systemd.
//!
//! Then, on the deployed cluster, with an application writing through app1's proxy: one etcd
//! member stops (no failover, no client connection lost); the master's host is cut off (the
//! sentinel fails over, no acknowledged write lost: synchronous replication); it comes back
//! and rejoins as a standby.
//!
//! Needs root (network namespaces, mounts) and creates the system user `tendril` the guide
//! asks for.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use tendril_e2e::guide::{self, Target};
use tendril_e2e::writer::{Mode, Style, Writer};
use tendril_e2e::{Login, bin_dir};
use tendril_testkit::Netns;

const HOSTS: [&str; 4] = ["db1", "db2", "db3", "app1"];
const DB_HOSTS: [&str; 3] = ["db1", "db2", "db3"];

/// Per-host directory (under the host's tree) and where it is mounted.
const BINDS: [(&str, &str); 7] = [
    ("etc-tendril", "/etc/tendril"),
    ("etc-etcd", "/etc/etcd"),
    ("etc-systemd-system", "/etc/systemd/system"),
    ("usr-local", "/usr/local"),
    ("var-lib-tendril", "/var/lib/tendril"),
    ("var-lib-etcd", "/var/lib/etcd"),
    ("etc-default-etcd", "/etc/default/etcd"),
];

/// The script that enters a host (inside its network namespace): its mounts, the guide's
/// working directory, then the command given as arguments.
fn enter_script() -> String {
    let mut script = String::from("set -e\n");
    for (dir, target) in BINDS {
        script.push_str(&format!(
            "mount --bind \"$TENDRIL_TEST_TREE/{dir}\" {target}\n"
        ));
    }
    script.push_str("cd \"$TENDRIL_TEST_CWD\"\nexec \"$@\"\n");
    script
}

/// The longest one block may take (the guide's waits loop until the cluster answers).
const BLOCK_LIMIT: Duration = Duration::from_secs(240);

struct Host {
    name: &'static str,
    ns: Netns,
    tree: PathBuf,
}

struct Topology {
    work: tempfile::TempDir,
    hosts: Vec<Host>,
}

impl Topology {
    fn create() -> Topology {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the deployment guide's test needs root (network namespaces, bind mounts)"
        );
        let work = tempfile::Builder::new()
            .prefix("tendril-deploy-")
            .tempdir()
            .unwrap();
        let etcd_user = user_ids("etcd");
        let mut hosts = Vec::new();
        for name in HOSTS {
            let ns = Netns::create();
            ns.route_through_root();
            let tree = work.path().join("hosts").join(name);
            for (dir, target) in BINDS {
                let source = tree.join(dir);
                if dir == "etc-default-etcd" {
                    std::fs::create_dir_all(&tree).unwrap();
                    std::fs::write(&source, "").unwrap();
                    assert!(
                        Path::new(target).is_file(),
                        "{target} missing: install etcd-server"
                    );
                    continue;
                }
                std::fs::create_dir_all(&source).unwrap();
                // The mount point, on the real root (empty directories).
                std::fs::create_dir_all(target).unwrap();
            }
            let (uid, gid) = etcd_user;
            std::os::unix::fs::chown(tree.join("var-lib-etcd"), Some(uid), Some(gid)).unwrap();
            set_mode(&tree.join("var-lib-etcd"), 0o700);
            hosts.push(Host { name, ns, tree });
        }
        std::fs::create_dir_all(work.path().join("bin")).unwrap();
        let shim = work.path().join("bin/systemctl");
        std::fs::copy(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/deploy/systemctl"),
            &shim,
        )
        .unwrap();
        set_mode(&shim, 0o755);
        set_mode(work.path(), 0o755);
        Topology { work, hosts }
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("the guide names host {name}, which the test lacks"))
    }

    fn ip(&self, name: &str) -> IpAddr {
        self.host(name).ns.ns_ip
    }

    /// The variables section 1 of the guide asks for.
    fn variables(&self, host: Option<&Host>) -> Vec<(String, String)> {
        let mut vars: Vec<(String, String)> = DB_HOSTS
            .iter()
            .map(|h| (format!("{}_IP", h.to_uppercase()), self.ip(h).to_string()))
            .collect();
        if let Some(h) = host {
            vars.push(("HOST_NAME".into(), h.name.into()));
            vars.push(("HOST_IP".into(), h.ns.ns_ip.to_string()));
        }
        vars
    }

    fn command(&self, host: Option<&Host>, script: &str) -> Command {
        let mut cmd = Command::new("timeout");
        cmd.env_clear()
            .env(
                "PATH",
                format!(
                    "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    self.work.path().join("bin").display()
                ),
            )
            .env("HOME", "/root")
            .env("LANG", "C.UTF-8")
            .envs(self.variables(host))
            .args(["--kill-after=5", &BLOCK_LIMIT.as_secs().to_string()]);
        match host {
            None => {
                cmd.current_dir(self.work.path())
                    .args(["bash", "-euo", "pipefail", "-c", script]);
            }
            Some(h) => {
                let enter = enter_script();
                cmd.env("TENDRIL_TEST_TREE", &h.tree)
                    .env("TENDRIL_TEST_CWD", self.work.path().join("tendril-setup"))
                    .env("TENDRIL_TEST_SYSTEMCTL_STATE", h.tree.join("systemctl"))
                    .args(["ip", "netns", "exec", &h.ns.name, "bash", "-c", &enter])
                    .args(["enter", "bash", "-euo", "pipefail", "-c", script]);
            }
        }
        cmd
    }

    /// Runs `script` on `host` (on the workstation with `None`); its output.
    fn try_run(&self, host: Option<&Host>, script: &str) -> Output {
        self.command(host, script).output().expect("run bash")
    }

    /// Runs `script` and panics, with the output and the host's service logs, if it fails.
    fn run(&self, host: Option<&Host>, script: &str, what: &str) -> String {
        let out = self.try_run(host, script);
        if !out.status.success() {
            panic!(
                "{what} on {} failed ({}):\n--- script\n{script}\n--- stdout\n{}\n--- stderr\n{}\n{}",
                host.map_or("the workstation", |h| h.name),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                host.map(|h| self.service_logs(h)).unwrap_or_default()
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn service_logs(&self, host: &Host) -> String {
        let mut out = String::new();
        let Ok(dir) = std::fs::read_dir(host.tree.join("systemctl")) else {
            return out;
        };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                out.push_str(&tendril_e2e::log_tail(
                    &format!("{} {}", host.name, path.display()),
                    &text,
                    25,
                ));
            }
        }
        out
    }

    /// The guide's step the test does itself.
    fn instead(&self, step: &str) {
        match step {
            // The variables come from `variables`.
            "addresses" | "copy" => {}
            "packages" => {
                for program in [
                    "/usr/bin/etcd",
                    "/usr/bin/etcdctl",
                    "/usr/bin/psql",
                    "/usr/bin/curl",
                    "/usr/lib/postgresql/15/bin/initdb",
                ] {
                    assert!(
                        Path::new(program).exists(),
                        "{program} missing: cargo xtask deps installs it"
                    );
                }
            }
            "tarball" => self.pack_tarball(),
            other => panic!("the guide asks for step {other:?}, which this test does not know"),
        }
    }

    /// The `cargo xtask dist` layout, with the binaries this test run built.
    fn pack_tarball(&self) {
        let staging = self.work.path().join("staging");
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let copy = |from: &Path, to: &str| {
            let dest = staging.join(to);
            std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
            std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
        };
        for bin in [
            "tendril-keeper",
            "tendril-sentinel",
            "tendril-proxy",
            "tendrilctl",
        ] {
            copy(&bin_dir().join(bin), &format!("usr/local/bin/{bin}"));
        }
        for (dir, to, suffix) in [
            ("deploy/systemd", "etc/systemd/system", ""),
            ("deploy/config", "etc/tendril", ".sample"),
        ] {
            for entry in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                copy(&entry.path(), &format!("{to}/{name}{suffix}"));
            }
        }
        let tarball = self
            .work
            .path()
            .join("tendril-setup/tendril-0.0.0-test-x86_64-linux.tar.gz");
        let out = Command::new("tar")
            .args(["--owner=root", "--group=root", "-czf"])
            .arg(&tarball)
            .arg("-C")
            .arg(&staging)
            .args(["usr", "etc"])
            .output()
            .unwrap();
        assert!(out.status.success(), "tar: {out:?}");
    }

    /// `tendrilctl status --output json` on `host`.
    fn status(&self, host: &str) -> Option<serde_json::Value> {
        let out = self.try_run(Some(self.host(host)), "tendrilctl status --output json");
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    /// Waits (polling `status` on `from`) until `ok` holds; the last status otherwise.
    fn wait_status(
        &self,
        from: &str,
        limit: Duration,
        what: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        let mut last = None;
        while Instant::now() < deadline {
            if let Some(s) = self.status(from) {
                if ok(&s) {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        let logs: String = self.hosts.iter().map(|h| self.service_logs(h)).collect();
        panic!("{what}: not within {limit:?}; last status {last:#?}\n{logs}");
    }

    /// Stops every service and kills whatever is left in each host's namespace.
    fn stop_all(&self) {
        for h in &self.hosts {
            let _ = self.try_run(
                Some(h),
                "systemctl stop tendril-proxy tendril-sentinel tendril-keeper etcd",
            );
            if let Ok(out) = Command::new("ip")
                .args(["netns", "pids", &h.ns.name])
                .output()
            {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    if let Ok(pid) = pid.parse::<i32>() {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                }
            }
        }
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for h in &self.hosts {
            h.ns.heal();
        }
        self.stop_all();
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn user_ids(name: &str) -> (u32, u32) {
    let user = nix::unistd::User::from_name(name)
        .ok()
        .flatten()
        .unwrap_or_else(|| panic!("no user {name}: install etcd-server"));
    (user.uid.as_raw(), user.gid.as_raw())
}

/// The keeper that runs the master, if the status shows one.
fn master_keeper(s: &serde_json::Value) -> Option<String> {
    s["keepers"]
        .as_array()?
        .iter()
        .find(|k| k["role"] == "master")
        .and_then(|k| k["keeper"].as_str().map(str::to_owned))
}

/// Three healthy keepers, converged: a master, and two streaming standbys following it, one
/// synchronous.
fn converged(s: &serde_json::Value) -> bool {
    let Some(keepers) = s["keepers"].as_array() else {
        return false;
    };
    let master_db = s["master"].as_str();
    keepers.len() == 3
        && keepers
            .iter()
            .all(|k| k["healthy"] == true && k["reporting"] == true)
        && keepers.iter().filter(|k| k["role"] == "master").count() == 1
        && keepers
            .iter()
            .filter(|k| k["role"] == "standby")
            .all(|k| k["follows"].as_str() == master_db && k["postgres"] == "streaming")
        && keepers.iter().any(|k| k["synchronous"] == true)
        // Each keeper reached the spec generation it was given ("wanted/reached").
        && keepers.iter().all(|k| {
            k["generation"]
                .as_str()
                .and_then(|g| g.split_once('/'))
                .is_some_and(|(wanted, reached)| wanted == reached)
        })
}

/// A runtime whose threads live in the network namespace `ns`, so the sockets its tasks open
/// are app1's (its proxy listens on app1's 127.0.0.1).
fn runtime_in(ns: &str) -> tokio::runtime::Runtime {
    let path = format!("/var/run/netns/{ns}");
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .on_thread_start(move || {
            let file = std::fs::File::open(&path).expect("open the namespace");
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)
                .expect("enter the namespace");
        })
        .build()
        .unwrap()
}

#[test]
fn the_deployment_guide_runs_as_written_and_the_cluster_survives_host_faults() {
    let markdown =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/deploy.md"))
            .unwrap();
    let blocks = guide::blocks(&markdown).unwrap_or_else(|e| panic!("docs/deploy.md: {e}"));
    let top = Topology::create();

    // The guide, block by block, host by host.
    for block in &blocks {
        match &block.target {
            Target::Instead(step) => top.instead(step),
            Target::On(hosts) => {
                for name in hosts {
                    let host = (name != "admin").then(|| top.host(name));
                    top.run(host, &block.text, &format!("docs/deploy.md:{}", block.line));
                }
            }
        }
    }
    let s = top.wait_status("db1", Duration::from_secs(60), "converged", converged);
    let first_master = master_keeper(&s).unwrap();
    assert!(
        s["proxies"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["proxy"] == "app1")),
        "app1's proxy reports: {s:#}"
    );

    // The application: two persistent connections through app1's proxy, as the guide's role.
    let app = runtime_in(&top.host("app1").ns.name);
    let password = std::fs::read_to_string(top.work.path().join("tendril-setup/secrets/app.pw"))
        .unwrap()
        .trim()
        .to_owned();
    let login = Login {
        user: "app".into(),
        password,
        dbname: "app".into(),
    };
    let style = Style {
        login: Some(login.clone()),
        think: Duration::from_millis(20),
        ..Style::default()
    };
    let writer = app
        .block_on(app.spawn(Writer::start_styled(
            "127.0.0.1",
            5432,
            2,
            Mode::Persistent,
            1,
            style,
        )))
        .unwrap();
    let t = Instant::now();
    assert!(
        app.block_on(writer.wait_success_after(t, Duration::from_secs(30)))
            .is_some(),
        "no write through app1's proxy"
    );

    // One etcd member stops (the master's host's own): nothing else changes.
    let master = master_keeper(&top.status("db1").unwrap()).unwrap();
    let master_host = top.host(&master);
    let other = DB_HOSTS.iter().find(|h| **h != master).unwrap();
    let before = writer.snapshot();
    top.run(
        Some(master_host),
        "systemctl stop etcd",
        "stop an etcd member",
    );
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs(15));
    let s = top.wait_status(
        other,
        Duration::from_secs(10),
        "status without one etcd member",
        |_| true,
    );
    let during = writer.snapshot();
    assert_eq!(
        master_keeper(&s).as_deref(),
        Some(master.as_str()),
        "no failover while one etcd member is down: {s:#}"
    );
    assert!(converged(&s), "every keeper still healthy: {s:#}");
    assert_eq!(
        during.failures.len(),
        before.failures.len(),
        "no write failed: {:?}",
        &during.failures[before.failures.len()..]
    );
    assert_eq!(
        during.connections, before.connections,
        "no client connection was lost"
    );
    assert!(
        during
            .first_success_after(t + Duration::from_secs(10))
            .is_some()
    );
    top.run(
        Some(master_host),
        "systemctl start etcd\nset -a; . /etc/tendril/etcdctl.env; set +a\n\
         until ETCDCTL_ENDPOINTS=https://$HOST_IP:2379 etcdctl endpoint health; do sleep 1; done",
        "restart the etcd member",
    );

    // The master's whole host is cut off: failover, and no acknowledged write is lost.
    master_host.ns.partition();
    let cut = Instant::now();
    let s = top.wait_status(other, Duration::from_secs(60), "a new master", |s| {
        master_keeper(s).is_some_and(|m| m != master)
    });
    let new_master = master_keeper(&s).unwrap();
    assert!(
        app.block_on(writer.wait_success_after(Instant::now(), Duration::from_secs(30)))
            .is_some(),
        "writes through app1's proxy resume after the failover to {new_master}"
    );
    let report = app.block_on(app.spawn(writer.stop())).unwrap();
    let acked = report.ids();
    let stored: Vec<i64> = app
        .block_on(app.spawn(async move {
            let c = tendril_e2e::connect_as("127.0.0.1", 5432, Some(&login))
                .await
                .expect("connect through the proxy");
            c.query("SELECT id FROM writes", &[])
                .await
                .expect("read the writes")
                .iter()
                .map(|r| r.get::<_, i64>(0))
                .collect()
        }))
        .unwrap();
    let stored: std::collections::BTreeSet<i64> = stored.into_iter().collect();
    let lost: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !stored.contains(id))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes lost in the failover from {master} to {new_master}: {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
    let after_cut = report.acked.iter().filter(|(_, at, _)| *at > cut).count();
    assert!(after_cut > 0, "writes acknowledged after the cut");

    // The host comes back: its keeper rejoins as a standby of the new master.
    master_host.ns.heal();
    let s = top.wait_status(
        other,
        Duration::from_secs(120),
        "the old master rejoins",
        |s| converged(s) && master_keeper(s).as_deref() == Some(new_master.as_str()),
    );
    eprintln!(
        "deployed: first master {first_master}; etcd member of {master} stopped without \
         failover; {master} cut off, {new_master} took over, {} acknowledged writes kept; \
         {master} rejoined: {}",
        acked.len(),
        s["keepers"]
    );
    drop(app);
}
