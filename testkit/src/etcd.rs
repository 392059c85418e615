//! A real etcd server for tests.

use std::fs::File;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::tls::{TlsMaterial, make_certificates};
use crate::{find_binary, free_port};

/// A single-member etcd cluster in a temporary directory.
#[derive(Debug)]
pub struct EtcdServer {
    dir: tempfile::TempDir,
    binary: PathBuf,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    tls: Option<TlsMaterial>,
    extra: Vec<std::net::IpAddr>,
    args: Vec<String>,
}

impl EtcdServer {
    /// Starts etcd and waits until it answers. Panics with a clear message if the binary is
    /// missing (install Debian's `etcd-server`; `cargo xtask test` does) or etcd does not come
    /// up within 30 s.
    pub fn start() -> EtcdServer {
        EtcdServer::start_inner(false)
    }

    /// Starts etcd serving clients over TLS only, requiring a client certificate signed by
    /// its test CA (see [`EtcdServer::tls`]). Needs the `openssl` command.
    pub fn start_tls() -> EtcdServer {
        EtcdServer::start_inner(true)
    }

    /// Starts etcd listening on each of `ips` too (same port): for processes in network
    /// namespaces (one address each), which cannot reach this namespace's loopback.
    pub fn start_also_on_each(ips: &[std::net::IpAddr]) -> EtcdServer {
        EtcdServer::start_inner_with(false, ips.to_vec())
    }

    /// Starts etcd with these flags added, e.g. `--auth-token-ttl=1`.
    pub fn start_with_args(args: &[&str]) -> EtcdServer {
        EtcdServer::start_inner_with_args(false, Vec::new(), args)
    }

    fn start_inner(tls: bool) -> EtcdServer {
        EtcdServer::start_inner_with(tls, Vec::new())
    }

    fn start_inner_with(tls: bool, extra: Vec<std::net::IpAddr>) -> EtcdServer {
        EtcdServer::start_inner_with_args(tls, extra, &[])
    }

    fn start_inner_with_args(tls: bool, extra: Vec<std::net::IpAddr>, args: &[&str]) -> EtcdServer {
        let binary = find_binary("etcd", &["/usr/bin"]).unwrap_or_else(|| {
            panic!(
                "etcd not found on PATH: install Debian's etcd-server package \
                 (cargo xtask test installs it when run as root)"
            )
        });
        let mut last_error = String::new();
        // A port found free can be taken before etcd binds it; try fresh ports a few times.
        for _ in 0..3 {
            let mut server = EtcdServer {
                dir: tempfile::Builder::new()
                    .prefix("tendril-etcd-")
                    .tempdir()
                    .expect("cannot create a temporary directory"),
                binary: binary.clone(),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
                tls: None,
                extra: extra.clone(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
            };
            if tls {
                server.tls = Some(make_certificates(server.dir.path()));
            }
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start: {last_error}");
    }

    /// The client URL, e.g. `http://127.0.0.1:41234` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The client URL on `ip`, one of the extra addresses.
    pub fn endpoint_on(&self, ip: std::net::IpAddr) -> String {
        format!("http://{}", std::net::SocketAddr::new(ip, self.client_port))
    }

    /// The certificates, when started with [`EtcdServer::start_tls`].
    pub fn tls(&self) -> Option<&TlsMaterial> {
        self.tls.as_ref()
    }

    /// The client port.
    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The etcd process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory holding etcd's data and log.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills etcd (SIGKILL, as a crash) and waits for it to exit. The data stays.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same ports and data after [`EtcdServer::kill`].
    pub fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn_and_wait() {
            panic!("etcd did not restart: {e}");
        }
    }

    /// Freezes etcd (SIGSTOP): connections stay open but nothing answers.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Thaws etcd after [`EtcdServer::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.pid() {
            let pid = libc::pid_t::try_from(pid).expect("pid fits pid_t");
            // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child,
            // which has not been reaped while `self.child` holds it.
            unsafe {
                libc::kill(pid, signal);
            }
        }
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let url = |port: u16| format!("http://127.0.0.1:{port}");
        let mut client_url = self.endpoint();
        for ip in &self.extra {
            client_url = format!("{client_url},{}", self.endpoint_on(*ip));
        }
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.log_path())
            .map_err(|e| format!("cannot open etcd log: {e}"))?;
        let log_err = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--name=tendril-test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={}", self.endpoint()))
            .arg(format!("--listen-peer-urls={}", url(self.peer_port)))
            .arg(format!(
                "--initial-advertise-peer-urls={}",
                url(self.peer_port)
            ))
            .arg(format!(
                "--initial-cluster=tendril-test={}",
                url(self.peer_port)
            ))
            .arg("--heartbeat-interval=50")
            .arg("--election-timeout=250")
            .args(&self.args)
            .env_remove("ETCD_NAME");
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cert-file={}", tls.server_cert.display()))
                .arg(format!("--key-file={}", tls.server_key.display()))
                .arg(format!("--trusted-ca-file={}", tls.ca_cert.display()))
                .arg("--client-cert-auth");
        }
        cmd.stdin(Stdio::null()).stdout(log).stderr(log_err);
        // SAFETY: the closure only calls prctl(2), which is async-signal-safe, between fork
        // and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status}; log:\n{}",
                    self.log_tail()
                ));
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "etcd not healthy after 30 s; log:\n{}",
                    self.log_tail()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether etcd is serving: its `/health` endpoint answers `true` (plain HTTP), or its log
    /// says it serves clients (TLS, where this check cannot speak HTTPS).
    pub fn healthy(&self) -> bool {
        if self.tls.is_some() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            let serving = log.matches("ready to serve client requests").count();
            return serving > 0 && TcpStream::connect(("127.0.0.1", self.client_port)).is_ok();
        }
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.client_port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let request = "GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
        if stream.write_all(request.as_bytes()).is_err() {
            return false;
        }
        let mut response = String::new();
        let _ = stream.read_to_string(&mut response);
        response.contains("\"health\":\"true\"")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}
