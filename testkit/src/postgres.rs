//! A real PostgreSQL 15 server for tests (Debian's binaries), trust authentication on
//! loopback, in a temporary directory.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::free_port;

/// Where Debian puts PostgreSQL 15.
pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running PostgreSQL.
#[derive(Debug)]
pub struct PgServer {
    dir: tempfile::TempDir,
    port: u16,
    child: Option<Child>,
}

impl PgServer {
    /// initdb and start on a free port; panics with the log if it does not come up.
    pub fn start() -> PgServer {
        PgServer::start_with(&[])
    }

    /// As [`PgServer::start`], with extra `-c name=value` settings.
    pub fn start_with(settings: &[(&str, &str)]) -> PgServer {
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
        let mut server = PgServer {
            dir,
            port: 0,
            child: None,
        };
        for _ in 0..3 {
            server.port = free_port();
            if server.spawn(settings) {
                return server;
            }
        }
        panic!("postgres did not start; log:\n{}", server.log());
    }

    fn spawn(&mut self, settings: &[(&str, &str)]) -> bool {
        let log = std::fs::File::create(self.dir.path().join("postgres.log")).expect("log file");
        let mut cmd = tool("postgres", run_as());
        cmd.arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ])
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
        self.child = Some(cmd.spawn().expect("start postgres"));
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            let ready = Command::new(Path::new(PG_BIN).join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
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

    /// A libpq connection string for the superuser.
    pub fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
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
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// PostgreSQL refuses to run as root: when tests run as root, its tools run as `postgres`.
fn run_as() -> Option<(u32, u32)> {
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
