//! The PostgreSQL process and its tools (initdb, pg_basebackup, pg_rewind, pg_controldata).
//!
//! postgres runs as the keeper's child, started directly (not through pg_ctl) so the keeper
//! sees it exit the moment it crashes. When the keeper runs as root, postgres and its tools
//! run as the configured OS user.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

use crate::KeeperError;
use crate::config::{Credentials, RunAs};

/// One PostgreSQL instance.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    pgdata: PathBuf,
    socket_dir: PathBuf,
    log: PathBuf,
    port: u16,
    su: Credentials,
    run_as: Option<RunAs>,
    child: Option<Child>,
}

impl Postgres {
    /// An instance on `pgdata`, not started.
    pub fn new(
        bin: PathBuf,
        pgdata: PathBuf,
        socket_dir: PathBuf,
        log: PathBuf,
        port: u16,
        su: Credentials,
        run_as: Option<RunAs>,
    ) -> Postgres {
        Postgres {
            bin,
            pgdata,
            socket_dir,
            log,
            port,
            su,
            run_as,
            child: None,
        }
    }

    /// PGDATA.
    pub fn pgdata(&self) -> &Path {
        &self.pgdata
    }

    /// The postmaster's pid while it runs as our child.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether our postmaster child is running. Reaps it if it exited and returns its status.
    pub fn poll_exit(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok()??;
        self.child = None;
        Some(status)
    }

    /// Whether the postmaster child is running.
    pub fn is_running(&mut self) -> bool {
        self.poll_exit();
        self.child.is_some()
    }

    /// Resolves when the postmaster child exits; never while there is none.
    pub async fn exited(&mut self) -> ExitStatus {
        match self.child.as_mut() {
            Some(child) => {
                let status = child.wait().await;
                self.child = None;
                status.unwrap_or_else(|_| std::os::unix::process::ExitStatusExt::from_raw(-1))
            }
            None => std::future::pending().await,
        }
    }

    /// The version of the binaries (`postgres --version`).
    pub async fn binary_version(&self) -> Result<(u32, u32), KeeperError> {
        let out = self
            .tool("postgres")
            .arg("--version")
            .output()
            .await
            .map_err(|e| KeeperError::io("run", &self.bin.join("postgres"), e))?;
        let text = String::from_utf8_lossy(&out.stdout);
        // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
        let version = text.split_whitespace().nth(2).unwrap_or_default();
        let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
        Ok((parts.next().unwrap_or(0), parts.next().unwrap_or(0)))
    }

    fn tool(&self, name: &str) -> Command {
        self.command(&self.bin.join(name))
    }

    /// Runs a shell command line as postgres' OS user (a user's restore command), with
    /// `PGDATA` set, to completion; an error carries its exit status and the end of its
    /// output.
    pub async fn run_shell(&self, what: &str, line: &str) -> Result<(), KeeperError> {
        let out = self
            .command(Path::new("/bin/sh"))
            .arg("-c")
            .arg(line)
            .env("PGDATA", &self.pgdata)
            .current_dir("/")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .await
            .map_err(|e| KeeperError::io("run", Path::new("/bin/sh"), e))?;
        if out.status.success() {
            return Ok(());
        }
        Err(KeeperError::Command {
            command: what.to_owned(),
            detail: format!(
                "{}: {}",
                out.status,
                crate::pitr::output_tail(&out.stdout, &out.stderr, 8)
            ),
        })
    }

    fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if let Some(run_as) = &self.run_as {
            cmd.uid(run_as.uid)
                .gid(run_as.gid)
                .env("HOME", &run_as.home);
        }
        cmd.env_remove("PGPASSWORD")
            .env("LC_ALL", "C")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// Runs a tool to completion; an error carries the end of its output.
    async fn run_tool(
        &self,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
        timeout: Option<Duration>,
    ) -> Result<String, KeeperError> {
        let mut cmd = self.tool(name);
        cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let run = cmd.output();
        let out = match timeout {
            Some(limit) => {
                tokio::time::timeout(limit, run)
                    .await
                    .map_err(|_| KeeperError::Command {
                        command: name.to_owned(),
                        detail: format!(
                            "did not finish within {}",
                            humantime::format_duration(limit)
                        ),
                    })?
            }
            None => run.await,
        }
        .map_err(|e| KeeperError::io("run", &self.bin.join(name), e))?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            let tail: Vec<&str> = stderr.lines().rev().take(8).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            return Err(KeeperError::Command {
                command: name.to_owned(),
                detail: format!("{}: {}", out.status, tail.join(" | ")),
            });
        }
        Ok(stdout)
    }

    /// Creates PGDATA's parent directories for postgres: PGDATA (0700) and the socket
    /// directory, owned by the OS user postgres runs as.
    pub fn prepare_dirs(&self, create_pgdata: bool) -> Result<(), KeeperError> {
        let mut dirs = vec![&self.socket_dir];
        if create_pgdata {
            dirs.push(&self.pgdata);
        }
        for dir in dirs {
            std::fs::create_dir_all(dir).map_err(|e| KeeperError::io("create", dir, e))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
                .map_err(|e| KeeperError::io("chmod", dir, e))?;
            self.chown(dir)?;
        }
        Ok(())
    }

    /// Gives a path to postgres' OS user.
    pub fn chown(&self, path: &Path) -> Result<(), KeeperError> {
        if let Some(run_as) = &self.run_as {
            std::os::unix::fs::chown(path, Some(run_as.uid), Some(run_as.gid))
                .map_err(|e| KeeperError::io("chown", path, e))?;
        }
        Ok(())
    }

    /// Writes a file postgres must read, owned by its OS user.
    pub fn write_file(&self, path: &Path, bytes: &[u8]) -> Result<(), KeeperError> {
        crate::datadir::write_atomic(path, bytes, 0o600)?;
        self.chown(path)
    }

    /// Starts postgres and waits until it accepts connections.
    pub async fn start(&mut self, wait: Duration) -> Result<(), KeeperError> {
        if self.is_running() {
            return Ok(());
        }
        self.prepare_dirs(false)?;
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| KeeperError::io("open", &self.log, e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| KeeperError::io("dup", &self.log, e))?;
        let mut cmd = self.tool("postgres");
        cmd.arg("-D")
            .arg(&self.pgdata)
            .stdout(log)
            .stderr(log_err)
            .kill_on_drop(false);
        let child = cmd
            .spawn()
            .map_err(|e| KeeperError::io("start", &self.bin.join("postgres"), e))?;
        tracing::info!(pid = child.id(), pgdata = %self.pgdata.display(), "postgres started");
        self.child = Some(child);
        self.wait_ready(wait).await
    }

    /// Waits until postgres accepts connections, failing if it exits or the time runs out.
    pub async fn wait_ready(&mut self, wait: Duration) -> Result<(), KeeperError> {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(status) = self.poll_exit() {
                return Err(KeeperError::Postgres(format!(
                    "postgres exited while starting ({status}): {}",
                    self.log_problems()
                )));
            }
            match self.connect(Duration::from_secs(2)).await {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() >= deadline => {
                    return Err(KeeperError::Postgres(format!(
                        "postgres not ready after {}: {e}",
                        humantime::format_duration(wait)
                    )));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// What went wrong according to the end of postgres' log, for error messages: the
    /// messages that say why (FATAL, ERROR, PANIC, "could not"), or the last lines.
    pub fn log_problems(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let recent = &all[all.len().saturating_sub(12)..];
        let problems: Vec<&str> = recent
            .iter()
            .filter(|l| {
                ["FATAL:", "ERROR:", "PANIC:", "could not"]
                    .iter()
                    .any(|m| l.contains(m))
            })
            .map(|l| l.split_once(":  ").map_or(*l, |(_, msg)| msg))
            .collect();
        let shown = if problems.is_empty() {
            recent[recent.len().saturating_sub(3)..].to_vec()
        } else {
            problems
        };
        format!("{} (log: {})", shown.join(" | "), self.log.display())
    }

    /// Connects to the `postgres` database as the superuser over the unix socket.
    pub async fn connect(&self, timeout: Duration) -> Result<tokio_postgres::Client, KeeperError> {
        let mut config = tokio_postgres::Config::new();
        config.host_path(&self.socket_dir).port(self.port);
        self.connect_with(config, timeout).await
    }

    /// Connects to another instance as the superuser.
    pub async fn connect_remote(
        &self,
        endpoint: &Endpoint,
        timeout: Duration,
    ) -> Result<tokio_postgres::Client, KeeperError> {
        let mut config = tokio_postgres::Config::new();
        config.host(&endpoint.host).port(endpoint.port);
        self.connect_with(config, timeout).await
    }

    async fn connect_with(
        &self,
        mut config: tokio_postgres::Config,
        timeout: Duration,
    ) -> Result<tokio_postgres::Client, KeeperError> {
        config
            .user(&self.su.user)
            .password(&self.su.password)
            .dbname("postgres")
            .application_name("tendril-keeper")
            .connect_timeout(timeout);
        let (client, connection) =
            tokio::time::timeout(timeout, config.connect(tokio_postgres::NoTls))
                .await
                .map_err(|_| KeeperError::Sql("connect timed out".into()))?
                .map_err(|e| KeeperError::Sql(format!("connect: {}", crate::sql::describe(&e))))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres connection closed");
            }
        });
        Ok(client)
    }

    /// Sends a signal to the postmaster child.
    fn signal(&self, signal: Signal) -> Result<(), KeeperError> {
        let Some(pid) = self.pid() else { return Ok(()) };
        let pid = Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        kill(pid, signal).map_err(|e| KeeperError::Postgres(format!("signal {signal}: {e}")))
    }

    /// Re-reads the configuration files.
    pub fn reload(&self) -> Result<(), KeeperError> {
        self.signal(Signal::SIGHUP)
    }

    /// Fast shutdown: disconnect clients, checkpoint, exit. Falls back to an immediate
    /// shutdown after 60 s. Also stops a postmaster left running by a previous keeper.
    pub async fn stop(&mut self) -> Result<(), KeeperError> {
        if self.is_running() {
            self.signal(Signal::SIGINT)?;
            let exited = tokio::time::timeout(Duration::from_secs(60), self.exited()).await;
            if exited.is_err() {
                tracing::warn!("postgres did not stop in 60 s, immediate shutdown");
                self.signal(Signal::SIGQUIT)?;
                let _ = tokio::time::timeout(Duration::from_secs(10), self.exited()).await;
            }
            tracing::info!("postgres stopped");
            return Ok(());
        }
        self.stop_stray().await
    }

    /// Stops a postmaster that runs on PGDATA but is not our child (its keeper was killed).
    pub async fn stop_stray(&mut self) -> Result<(), KeeperError> {
        let pidfile = self.pgdata.join("postmaster.pid");
        let Ok(text) = std::fs::read_to_string(&pidfile) else {
            return Ok(());
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<i32>().ok())
        else {
            return Ok(());
        };
        if pid <= 0 || kill(Pid::from_raw(pid), None).is_err() {
            return Ok(());
        }
        if zombie(pid) {
            // Killed, not yet reaped by its new parent (init reaps orphans when it gets to
            // them): it holds no lock and no shared memory, but PostgreSQL would refuse to
            // start beside its pid file until it is gone.
            let deadline = Instant::now() + Duration::from_secs(10);
            while kill(Pid::from_raw(pid), None).is_ok() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::info!(pid, "the postgres left on this data directory had died");
            return Ok(());
        }
        tracing::warn!(
            pid,
            "stopping a postgres left running on this data directory"
        );
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        let stopped = self
            .run_tool(
                "pg_ctl",
                &["stop", "-D", &pgdata, "-m", "fast", "-w", "-t", "60"],
                &[],
                None,
            )
            .await;
        match stopped {
            Ok(_) => Ok(()),
            // It stopped on its own meanwhile (the previous keeper's fence guard was
            // stopping it): pg_ctl finds no pid file, which is the outcome wanted.
            Err(_) if !pidfile.exists() || kill(Pid::from_raw(pid), None).is_err() => {
                tracing::info!(
                    pid,
                    "the postgres left on this data directory stopped by itself"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Restarts postgres.
    pub async fn restart(&mut self, wait: Duration) -> Result<(), KeeperError> {
        self.stop().await?;
        self.start(wait).await
    }

    /// initdb with the superuser and its password.
    pub async fn initdb(
        &self,
        password_file: &Path,
        locale: Option<&str>,
        encoding: Option<&str>,
        data_checksums: bool,
    ) -> Result<(), KeeperError> {
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        let pwfile = format!("--pwfile={}", password_file.display());
        let mut args = vec![
            "-D",
            &pgdata,
            "-U",
            &self.su.user,
            &pwfile,
            "--auth-local=md5",
            "--auth-host=md5",
        ];
        let locale_arg;
        if let Some(l) = locale {
            locale_arg = format!("--locale={l}");
            args.push(&locale_arg);
        }
        let encoding_arg;
        if let Some(e) = encoding {
            encoding_arg = format!("--encoding={e}");
            args.push(&encoding_arg);
        }
        if data_checksums {
            args.push("--data-checksums");
        }
        self.run_tool("initdb", &args, &[], Some(Duration::from_secs(300)))
            .await
            .map(|_| ())
    }

    /// A base backup of `source` into the (empty) PGDATA.
    pub async fn base_backup(
        &self,
        source: &Endpoint,
        repl: &Credentials,
    ) -> Result<(), KeeperError> {
        let conninfo = crate::pgconf::conninfo(
            &[
                ("host", source.host.clone()),
                ("port", source.port.to_string()),
                ("user", repl.user.clone()),
            ],
            "",
        );
        self.base_backup_from(&conninfo, &repl.password).await
    }

    /// Clones PGDATA from the server `conninfo` names (a libpq connection string without
    /// the password, which goes in the environment rather than on the command line).
    pub async fn base_backup_from(
        &self,
        conninfo: &str,
        password: &str,
    ) -> Result<(), KeeperError> {
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        let args = [
            "-D",
            &pgdata,
            "-d",
            conninfo,
            "-X",
            "stream",
            "--checkpoint=fast",
            "--no-password",
        ];
        // synchronous_commit=off: the backup must not wait for synchronous standbys that may
        // not exist yet.
        let env = [
            ("PGPASSWORD", password),
            ("PGOPTIONS", "-c synchronous_commit=off"),
        ];
        self.run_tool("pg_basebackup", &args, &env, None)
            .await
            .map(|_| ())
    }

    /// Runs `sql` with psql on the server `conninfo` names (libpq does its TLS, whatever
    /// the `sslmode`); the password goes in the environment. Returns psql's unaligned,
    /// tuples-only output.
    pub async fn query_conninfo(
        &self,
        conninfo: &str,
        password: &str,
        sql: &str,
        limit: Duration,
    ) -> Result<String, KeeperError> {
        let args = [
            "-X",
            "-A",
            "-t",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            conninfo,
            "-c",
            sql,
        ];
        let env = [("PGPASSWORD", password), ("PGCONNECT_TIMEOUT", "5")];
        self.run_tool("psql", &args, &env, Some(limit)).await
    }

    /// Rewinds PGDATA onto the timeline of the server `conninfo` names (as a superuser;
    /// the password goes in the environment). `dry_run`: pg_rewind checks everything it
    /// needs (access, `wal_log_hints`, a clean shutdown) and changes nothing.
    pub async fn rewind_from(
        &self,
        conninfo: &str,
        password: &str,
        dry_run: bool,
    ) -> Result<(), KeeperError> {
        // A just-promoted source still says the old timeline in its control file until its
        // first checkpoint, and pg_rewind would then see nothing to rewind. An immediate
        // checkpoint of a busy primary can take minutes.
        if dry_run {
            let limit = Duration::from_secs(600);
            self.query_conninfo(conninfo, password, "CHECKPOINT", limit)
                .await?;
        }
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        let source_server = format!("--source-server={conninfo}");
        let mut args = vec!["-D", &pgdata, &source_server];
        if dry_run {
            args.push("--dry-run");
        }
        let env = [("PGPASSWORD", password)];
        self.run_tool("pg_rewind", &args, &env, Some(Duration::from_secs(600)))
            .await
            .map(|_| ())
    }

    /// Rewinds PGDATA onto `source`'s timeline.
    pub async fn rewind(&self, source: &Endpoint) -> Result<(), KeeperError> {
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        let conninfo = format!(
            "host={} port={} user={} dbname=postgres options='-c synchronous_commit=off'",
            source.host, source.port, self.su.user
        );
        let source_server = format!("--source-server={conninfo}");
        // A just-promoted source still says the old timeline in its control file until its
        // first checkpoint, and pg_rewind would then see nothing to rewind.
        let source_client = self.connect_remote(source, Duration::from_secs(10)).await?;
        source_client
            .batch_execute("CHECKPOINT")
            .await
            .map_err(|e| {
                KeeperError::Sql(format!(
                    "CHECKPOINT on the rewind source: {}",
                    crate::sql::describe(&e)
                ))
            })?;
        let args = ["-D", &pgdata, &source_server];
        let env = [("PGPASSWORD", self.su.password.as_str())];
        self.run_tool("pg_rewind", &args, &env, Some(Duration::from_secs(600)))
            .await
            .map(|_| ())
    }

    /// The database system identifier of a stopped (or running) data directory.
    pub async fn system_id_offline(&self) -> Result<String, KeeperError> {
        self.control_data().await?.system_id.ok_or_else(|| {
            KeeperError::Postgres("pg_controldata printed no system identifier".into())
        })
    }

    /// What pg_controldata says of PGDATA.
    pub async fn control_data(&self) -> Result<ControlData, KeeperError> {
        let pgdata = self.pgdata.to_string_lossy().into_owned();
        let out = self
            .run_tool(
                "pg_controldata",
                &[&pgdata],
                &[],
                Some(Duration::from_secs(30)),
            )
            .await?;
        Ok(ControlData::parse(&out))
    }
}

/// Where to reach another PostgreSQL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host or address.
    pub host: String,
    /// Port.
    pub port: u16,
}

/// The parts of `pg_controldata` output the keeper uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ControlData {
    /// "Database system identifier".
    pub system_id: Option<String>,
    /// "Latest checkpoint location": after a clean shutdown, the end of the WAL written.
    pub checkpoint_lsn: Option<tendril_control_model::Lsn>,
    /// "Latest checkpoint's TimeLineID".
    pub checkpoint_timeline: Option<u32>,
    /// "Database cluster state".
    pub state: Option<String>,
}

impl ControlData {
    /// Parses pg_controldata's output (run with LC_ALL=C).
    pub fn parse(text: &str) -> ControlData {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_owned())
        };
        ControlData {
            system_id: field("Database system identifier"),
            checkpoint_lsn: field("Latest checkpoint location").and_then(|v| v.parse().ok()),
            checkpoint_timeline: field("Latest checkpoint's TimeLineID")
                .and_then(|v| v.parse().ok()),
            state: field("Database cluster state"),
        }
    }
}

/// Whether process `pid` has died and waits to be reaped (state `Z` in /proc).
fn zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // "pid (comm) state ...": the comm may hold spaces and parentheses.
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            == Some("Z")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pg_controldata() {
        let text = "pg_control version number:            1300\n\
                    Database system identifier:           7441234567890123456\n\
                    Database cluster state:               shut down\n\
                    Latest checkpoint location:           0/3000060\n\
                    Latest checkpoint's TimeLineID:       2\n";
        let c = ControlData::parse(text);
        assert_eq!(c.system_id.as_deref(), Some("7441234567890123456"));
        assert_eq!(c.checkpoint_lsn, Some("0/3000060".parse().unwrap()));
        assert_eq!(c.checkpoint_timeline, Some(2));
        assert_eq!(c.state.as_deref(), Some("shut down"));
        assert_eq!(ControlData::parse(""), ControlData::default());
    }

    #[test]
    fn a_dead_unreaped_process_is_a_zombie_until_reaped() {
        let mut child = std::process::Command::new("bash")
            .args(["-c", "exit 0"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let deadline = Instant::now() + Duration::from_secs(5);
        while !zombie(pid) {
            assert!(Instant::now() < deadline, "bash did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!zombie(pid));
        assert!(!zombie(std::process::id() as i32), "this process runs");
    }
}
