//! A real PostgreSQL 15 server for tests (Debian's binaries), trust authentication on
//! loopback, in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::net::IpAddr;

use crate::free_port;
use crate::netns::{NamespaceThread, Netns, spawn_in};
use crate::tls::{TlsMaterial, make_certificates_for_postgres};

/// Where Debian puts PostgreSQL 15.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running PostgreSQL.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    host: IpAddr,
    /// The network namespace it runs in, if not this one.
    netns: Option<String>,
    port: u16,
    child: Option<Child>,
    /// The `-c` settings it was started with, for [`PgServer::restart`].
    settings: Vec<(String, String)>,
    /// The thread that started the postmaster in its namespace, alive as long as it runs.
    ns_thread: Option<NamespaceThread>,
    /// Its certificates, when it speaks TLS.
    tls: Option<TlsMaterial>,
    tls_dir: Option<tempfile::TempDir>,
}

impl PgServer {
    /// initdb and start on a free port; panics with the log if it does not come up.
    pub fn start() -> PgServer {
        PgServer::start_with(&[])
    }

    /// As [`PgServer::start`], with extra `-c name=value` settings.
    pub fn start_with(settings: &[(&str, &str)]) -> PgServer {
        PgServer::start_at(None, settings)
    }

    /// Starts inside `netns`, listening on its inside address, as a PostgreSQL on another
    /// host: clients reach it over the veth pair (trust authentication from any address).
    pub fn start_in(netns: &Netns, settings: &[(&str, &str)]) -> PgServer {
        PgServer::start_at(Some(netns), settings)
    }

    /// As [`PgServer::start_with`], on `port` of 127.0.0.1 (for a client that cannot be told
    /// another one); panics with the log if it does not come up there.
    pub fn start_on(port: u16, settings: &[(&str, &str)]) -> PgServer {
        PgServer::start_at_port(None, Some(port), settings)
    }

    /// As [`PgServer::start_with`], with TLS on (`ssl=on`): a test CA signed its certificate
    /// for 127.0.0.1 and localhost, so clients can verify it with `sslmode=verify-full` and
    /// `sslrootcert` = [`TlsMaterial::ca_cert`] of [`PgServer::tls`].
    pub fn start_tls(settings: &[(&str, &str)]) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("tendril-pg-tls-")
            .tempdir()
            .expect("temp dir");
        let tls = make_certificates_for_postgres(dir.path());
        let cert = tls.server_cert.display().to_string();
        let key = tls.server_key.display().to_string();
        let mut all = vec![
            ("ssl", "on"),
            ("ssl_cert_file", cert.as_str()),
            ("ssl_key_file", key.as_str()),
        ];
        all.extend_from_slice(settings);
        let mut server = PgServer::start_at(None, &all);
        server.tls = Some(tls);
        server.tls_dir = Some(dir);
        server
    }

    /// Its certificates, when started with [`PgServer::start_tls`].
    pub fn tls(&self) -> Option<&TlsMaterial> {
        self.tls.as_ref()
    }

    fn start_at(netns: Option<&Netns>, settings: &[(&str, &str)]) -> PgServer {
        PgServer::start_at_port(netns, None, settings)
    }

    fn start_at_port(
        netns: Option<&Netns>,
        port: Option<u16>,
        settings: &[(&str, &str)],
    ) -> PgServer {
        let dir = tempfile::Builder::new()
            .prefix("tendril-pg-")
            .tempdir()
            .expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let run_as = run_as();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).expect("chown");
        }
        let data = dir.path().join("data");
        let out = tool("initdb", run_as)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "-A", "trust", "--no-sync"])
            .output()
            .expect("run initdb (install postgresql-15)");
        assert!(
            out.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        if netns.is_some() {
            use std::io::Write;
            let mut hba = std::fs::OpenOptions::new()
                .append(true)
                .open(data.join("pg_hba.conf"))
                .expect("open pg_hba.conf");
            writeln!(hba, "host all all 0.0.0.0/0 trust").expect("write pg_hba.conf");
        }
        let mut server = PgServer {
            dir,
            host: netns.map_or(IpAddr::from([127, 0, 0, 1]), |n| n.ns_ip),
            netns: netns.map(|n| n.name.clone()),
            port: 0,
            child: None,
            settings: settings
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ns_thread: None,
            tls: None,
            tls_dir: None,
        };
        for _ in 0..3 {
            server.port = port.unwrap_or_else(free_port);
            if server.spawn(settings) {
                return server;
            }
        }
        panic!("postgres did not start; log:\n{}", server.log());
    }

    /// `kill -9` of the postmaster (its backends notice and exit on their own).
    pub fn kill_postmaster(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.ns_thread = None;
    }

    /// Starts it again on the same port after [`PgServer::kill_postmaster`]: crash recovery
    /// runs first. Retries while the old backends still hold the shared memory.
    pub fn restart(&mut self) {
        self.kill_postmaster();
        let settings = self.settings.clone();
        let settings: Vec<(&str, &str)> = settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.spawn(&settings) {
            assert!(
                Instant::now() < deadline,
                "postgres did not restart; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn spawn(&mut self, settings: &[(&str, &str)]) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("postgres.log"))
            .expect("log file");
        let mut cmd = tool("postgres", run_as());
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .arg("-c")
            .arg(format!("listen_addresses={}", self.host))
            .args(["-c", "fsync=off", "-c", "max_connections=200"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log);
        for (k, v) in settings {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        // SAFETY: prctl(2) is async-signal-safe; it runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = match &self.netns {
            Some(name) => {
                let (child, thread) = spawn_in(name, cmd);
                self.ns_thread = Some(thread);
                child
            }
            None => cmd.spawn(),
        };
        self.child = Some(child.expect("start postgres"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            let ready = Command::new(Path::new(PG_BIN).join("pg_isready"))
                .args([
                    "-h",
                    &self.host.to_string(),
                    "-p",
                    &self.port.to_string(),
                    "-q",
                ])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address it listens on (127.0.0.1, or its namespace's inside address).
    pub fn host(&self) -> IpAddr {
        self.host
    }

    /// A libpq connection string for the superuser.
    pub fn conninfo(&self) -> String {
        format!(
            "host={} port={} user=postgres dbname=postgres",
            self.host, self.port
        )
    }

    /// The postmaster's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The server log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Fast shutdown.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = child.wait();
        }
        self.ns_thread = None;
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// PostgreSQL refuses to run as root: when tests run as root, its tools run as `postgres`.
pub(crate) fn run_as() -> Option<(u32, u32)> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    let user = nix::unistd::User::from_name("postgres").ok().flatten()?;
    Some((user.uid.as_raw(), user.gid.as_raw()))
}

fn tool(name: &str, run_as: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(Path::new(PG_BIN).join(name));
    if let Some((uid, gid)) = run_as {
        cmd.uid(uid).gid(gid);
    }
    cmd.env("LC_ALL", "C");
    cmd
}
