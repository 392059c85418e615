//! Proxy flags (each also a `TENDRIL_*` variable) and the validated configuration.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use tendril_control_model::Keys;
use tendril_control_store::{StoreArgs, StoreConfig};

/// Send every PostgreSQL client to the current master.
#[derive(Debug, Parser)]
#[command(name = "tendril-proxy", version, about, long_about = None, args_override_self = true)]
pub struct ProxyArgs {
    /// The cluster's name.
    #[arg(long, env = "TENDRIL_CLUSTER_NAME")]
    pub cluster_name: String,
    /// Read settings from this TOML file too: its keys are these flags' long names
    /// (`hold_timeout = "15s"`); a flag or a set environment variable wins over it.
    #[arg(long, env = "TENDRIL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// Address clients connect to.
    #[arg(
        long,
        env = "TENDRIL_LISTEN_ADDRESS",
        default_value = "127.0.0.1:25432"
    )]
    pub listen_address: SocketAddr,
    /// A second address for read-only connections (off by default): each new connection
    /// goes to a standby eligible for reads (healthy, streaming from the master, within the
    /// cluster spec's `max_standby_lag_for_reads`), round robin; see
    /// `--read-only-fallback` for when none is.
    #[arg(long, env = "TENDRIL_READ_ONLY_LISTEN_ADDRESS")]
    pub read_only_listen_address: Option<SocketAddr>,
    /// Where a read-only connection goes when no standby is eligible: `master`, or `reject`
    /// (refused with SQLSTATE 57P03 and the reason).
    #[arg(long, env = "TENDRIL_READ_ONLY_FALLBACK", default_value = "master")]
    pub read_only_fallback: ReadOnlyFallback,
    /// This proxy's uid (default: random per start).
    #[arg(long, env = "TENDRIL_PROXY_UID")]
    pub uid: Option<String>,
    /// Worker threads, each with its own ring and listener (default: one per core). Where the
    /// proxy shares a few cores with the application and PostgreSQL, fewer workers cost less
    /// CPU per transaction on the userspace path: one ring serves more connections per
    /// wake-up (docs/benchmarks.md, "one ring or one per core").
    #[arg(long, env = "TENDRIL_WORKERS")]
    pub workers: Option<usize>,
    /// During a switchover, and while the proxy has not read its routing table yet (just
    /// started), hold new connections up to this long instead of refusing them (0: refuse
    /// at once).
    #[arg(long, env = "TENDRIL_HOLD_TIMEOUT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub hold_timeout: Duration,
    /// During a switchover, how long connections to the old master may finish what they are
    /// doing (new connections are held meanwhile) before they are cut (0: cut at once). The
    /// drain ends as soon as the last of them closes. A failover never waits.
    #[arg(long, env = "TENDRIL_SWITCHOVER_GRACE", default_value = "1s", value_parser = humantime::parse_duration)]
    pub switchover_grace: Duration,
    /// Serve Prometheus metrics and `/health` on this address (shared, like the listen
    /// address, with a proxy started beside this one to replace it).
    #[arg(long, env = "TENDRIL_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
    /// Most client connections at once; more are refused with SQLSTATE 53300.
    #[arg(long, env = "TENDRIL_MAX_CONNECTIONS", default_value_t = 50_000)]
    pub max_connections: u64,
    /// Deadline of a connection to the master.
    #[arg(long, env = "TENDRIL_CONNECT_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, env = "TENDRIL_DRAIN_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// I/O driver: `auto` (io_uring, epoll when unavailable) or `epoll`.
    #[arg(long, env = "TENDRIL_IO_DRIVER", default_value = "auto")]
    pub io_driver: IoDriver,
    /// How established connections move bytes: `auto` (the default: in the kernel on the
    /// client's own socket for clients on this host that read in non-blocking mode, in
    /// userspace for every other connection, and everything in userspace where the BPF
    /// programs cannot load, as without root), `userspace` (io_uring, or epoll), or `kernel`
    /// (the BPF paths: the client-socket path, then the pair path for what it cannot take;
    /// the proxy refuses to start without them).
    #[arg(long, env = "TENDRIL_FORWARDING", default_value = "auto")]
    pub forwarding: Forwarding,
    /// Most bytes the kernel holds for one direction of a kernel-forwarded connection before
    /// that direction is passed up to the proxy, where TCP flow control applies (accepts
    /// KiB and MiB suffixes).
    #[arg(long, env = "TENDRIL_KERNEL_BUFFER_LIMIT", default_value = "1MiB", value_parser = parse_bytes)]
    pub kernel_buffer_limit: u64,
    /// Connections the sockmap has room for; more stay in userspace.
    #[arg(long, env = "TENDRIL_KERNEL_MAX_CONNECTIONS", default_value_t = 65_536)]
    pub kernel_max_connections: u32,
    /// Kernel forwarding for clients on this host: `on` forwards on the client's own socket
    /// (sk_msg redirect to the server socket, replies into the client's receive queue; one
    /// loopback hop fewer, the fastest path here) when its programs load; `off` turns that
    /// path off (every connection then goes on the proxy's two sockets with `--forwarding
    /// kernel`, and in userspace with `auto`). A client whose socket is in blocking mode
    /// when it sends its first bytes stays off it anyway (pair path or userspace): with
    /// the client's socket in a sockmap the kernel's receive path can end a blocking read
    /// with EAGAIN after a wake-up without data (libpq and other non-blocking clients just
    /// poll again).
    #[arg(long, env = "TENDRIL_KERNEL_CLIENT_SOCKET", default_value = "on")]
    pub kernel_client_socket: Switch,
    /// Certificate (PEM, leaf then chain) the proxy presents only to refuse a TLS client (no
    /// master, the master unreachable, the connection limit), so that the client shows why (libpq since 15.10 does
    /// not show an error sent before TLS). Sessions stay end to end with PostgreSQL. Give
    /// one that clients verify for the proxy's host name (the CA of the PostgreSQL servers).
    #[arg(long, env = "TENDRIL_REFUSAL_CERT_FILE", requires = "refusal_key_file")]
    pub refusal_cert_file: Option<std::path::PathBuf>,
    /// The refusal certificate's private key (PEM).
    #[arg(long, env = "TENDRIL_REFUSAL_KEY_FILE", requires = "refusal_cert_file")]
    pub refusal_key_file: Option<std::path::PathBuf>,
    /// Take over from the proxy running on the same listen address (a restart or an
    /// upgrade): receive its listening sockets, serve once the routing table is read, then
    /// the old process stops accepting, finishes its connections (up to its
    /// `--drain-timeout`) and exits. No connect is refused meanwhile. `--takeover` alone
    /// (or `always`) fails when no proxy runs there; `auto` then starts on its own (a
    /// supervisor that starts the same command every time: a pod, a container).
    #[arg(
        long,
        env = "TENDRIL_TAKEOVER",
        value_enum,
        num_args = 0..=1,
        default_value = "never",
        default_missing_value = "always"
    )]
    pub takeover: Takeover,
    /// What the process whose listening sockets were taken does once it has drained:
    /// `exit`, or `wait` for SIGTERM. Use `wait` under a supervisor that restarts a
    /// process that exits (a Kubernetes pod): a restarted proxy would take the sockets back.
    #[arg(
        long,
        env = "TENDRIL_AFTER_HANDOVER",
        value_enum,
        default_value = "exit"
    )]
    pub after_handover: AfterHandover,
}

/// Whether a starting proxy takes the listening sockets of the one running on its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Takeover {
    /// Bind its own (beside a running proxy, it takes clients once it routes).
    #[value(alias = "false")]
    Never,
    /// Take them; fail when no proxy runs there.
    #[value(alias = "true")]
    Always,
    /// Take them when a proxy runs there, else bind its own.
    Auto,
}

/// What a proxy whose listening sockets were taken over does once drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AfterHandover {
    /// Exit (status 0).
    Exit,
    /// Wait for SIGTERM or SIGINT, holding nothing (no listener, no metrics port).
    Wait,
}

/// Where the read-only listener sends a connection no standby can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadOnlyFallback {
    /// To the master (reads keep working, on the master).
    Master,
    /// Refuse it (SQLSTATE 57P03, saying why no standby is eligible).
    Reject,
}

/// On or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    /// Enabled.
    On,
    /// Disabled.
    Off,
}

/// The forwarding strategy asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Forwarding {
    /// The default: the client-socket path where it applies, userspace for the rest.
    Auto,
    /// Both kernel paths (client socket, then pair); refuse to start without them.
    Kernel,
    /// Userspace only.
    Userspace,
}

/// The forwarding paths a proxy runs, chosen from [`Forwarding`] in [`Forwarding::path`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForwardPath {
    /// Userspace forwarding, and why (logged at start).
    Userspace(&'static str),
    /// Kernel forwarding for the connections it can take.
    Kernel {
        /// The proxy refuses to start when the programs do not load (else: userspace).
        required: bool,
        /// The pair path is selectable; without it only the client-socket path is, and
        /// the proxy needs its programs (else: userspace).
        pair: bool,
    },
}

impl Forwarding {
    /// The one place the forwarding paths are chosen. A path is the default only while it
    /// passes the data-plane fault matrix (`proxy/tests/matrix.rs`) and the fault soak
    /// (`cargo xtask soak proxy`): the client-socket path and userspace do, with the
    /// client-socket path at 0.94 of direct PostgreSQL's throughput against userspace's
    /// 0.60 (docs/benchmarks.md). The pair path passes too but is barely faster than
    /// userspace (a kernel worker wake-up per message each way), so it stays opt-in.
    pub fn path(self, client_socket: bool) -> ForwardPath {
        match self {
            Forwarding::Auto if client_socket => ForwardPath::Kernel {
                required: false,
                pair: false,
            },
            Forwarding::Auto => ForwardPath::Userspace(
                "auto with --kernel-client-socket off: every connection in userspace",
            ),
            Forwarding::Userspace => ForwardPath::Userspace("--forwarding userspace"),
            Forwarding::Kernel => ForwardPath::Kernel {
                required: true,
                pair: true,
            },
        }
    }
}

/// Parses `65536`, `64KiB`, `1MiB` (also `K`, `M`, `KB`, `MB` as binary units).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number of bytes such as 1MiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1024,
        "m" | "mb" | "mib" => 1024 * 1024,
        "g" | "gb" | "gib" => 1024 * 1024 * 1024,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use KiB or MiB)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// The I/O driver choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum IoDriver {
    /// io_uring where possible.
    Auto,
    /// Always epoll.
    Epoll,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Cluster name.
    pub cluster: String,
    /// Store keys.
    pub keys: Keys,
    /// Store connection.
    pub store: StoreConfig,
    /// Listen address.
    pub listen: SocketAddr,
    /// The read-only listener's address, if any.
    pub read_only_listen: Option<SocketAddr>,
    /// Where read-only connections go when no standby is eligible.
    pub read_only_fallback: ReadOnlyFallback,
    /// Proxy uid.
    pub uid: String,
    /// Worker count.
    pub workers: usize,
    /// Hold timeout.
    pub hold_timeout: Duration,
    /// Switchover grace.
    pub switchover_grace: Duration,
    /// Metrics address.
    pub metrics_address: Option<SocketAddr>,
    /// Connection limit.
    pub max_connections: u64,
    /// Backend connect timeout.
    pub connect_timeout: Duration,
    /// Drain timeout.
    pub drain_timeout: Duration,
    /// Force epoll.
    pub force_epoll: bool,
    /// Forwarding strategy asked for.
    pub forwarding: Forwarding,
    /// Per-direction kernel buffer limit (bytes).
    pub kernel_buffer_limit: u64,
    /// Sockmap capacity (connections).
    pub kernel_max_connections: u32,
    /// Forward clients on this host on their own socket (the client-socket path).
    pub kernel_client_socket: bool,
    /// The refusal certificate, loaded.
    pub refusal_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Whether to take the listening sockets of the proxy running on `listen`.
    pub takeover: Takeover,
    /// What to do once drained after a handover.
    pub after_handover: AfterHandover,
}

impl ProxyArgs {
    /// Validates the flags; every problem is reported.
    pub fn into_config(self) -> Result<ProxyConfig, String> {
        let mut errors = Vec::new();
        let keys = Keys::new(&self.cluster_name)
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        let store = self
            .store
            .to_config()
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let workers = self.workers.unwrap_or(cores);
        if workers == 0 || workers > 1024 {
            errors.push(format!("--workers {workers}: use 1 to 1024"));
        }
        if self.max_connections == 0 {
            errors.push("--max-connections must be at least 1".into());
        }
        if self.connect_timeout.is_zero() {
            errors.push("--connect-timeout must be greater than zero".into());
        }
        let uid = self
            .uid
            .unwrap_or_else(|| format!("{:08x}", rand::random::<u32>()));
        if uid.is_empty()
            || !uid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            errors.push(format!("--uid {uid:?}: use letters, digits, '-' and '_'"));
        }
        let force_epoll = self.io_driver == IoDriver::Epoll;
        let takeover = self.takeover != Takeover::Never;
        if takeover && self.listen_address.port() == 0 {
            errors.push("--takeover needs a --listen-address with a fixed port".into());
        }
        if let Some(ro) = self.read_only_listen_address {
            if ro == self.listen_address && ro.port() != 0 {
                errors.push(format!(
                    "--read-only-listen-address {ro} is the --listen-address: give it its own port"
                ));
            }
            if takeover && ro.port() == 0 {
                errors
                    .push("--takeover needs a --read-only-listen-address with a fixed port".into());
            }
        }
        if self.kernel_buffer_limit < 64 * 1024 {
            errors.push(format!(
                "--kernel-buffer-limit {}: use at least 64KiB (one TCP segment batch)",
                self.kernel_buffer_limit
            ));
        }
        if self.kernel_max_connections == 0 || self.kernel_max_connections > 1 << 24 {
            errors.push(format!(
                "--kernel-max-connections {}: use 1 to 16777216",
                self.kernel_max_connections
            ));
        }
        let refusal_tls = match (&self.refusal_cert_file, &self.refusal_key_file) {
            (Some(cert), Some(key)) => crate::tls_refusal::server_config(cert, key)
                .map_err(|e| errors.push(e))
                .ok(),
            _ => None,
        };
        match (keys, store) {
            (Some(keys), Some(store)) if errors.is_empty() => Ok(ProxyConfig {
                cluster: self.cluster_name,
                keys,
                store,
                listen: self.listen_address,
                read_only_listen: self.read_only_listen_address,
                read_only_fallback: self.read_only_fallback,
                uid,
                workers,
                hold_timeout: self.hold_timeout,
                switchover_grace: self.switchover_grace,
                metrics_address: self.metrics_address,
                max_connections: self.max_connections,
                connect_timeout: self.connect_timeout,
                drain_timeout: self.drain_timeout,
                force_epoll,
                forwarding: self.forwarding,
                kernel_buffer_limit: self.kernel_buffer_limit,
                kernel_max_connections: self.kernel_max_connections,
                kernel_client_socket: self.kernel_client_socket == Switch::On,
                refusal_tls,
                takeover: self.takeover,
                after_handover: self.after_handover,
            }),
            _ => Err(errors.join("\n  - ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_settings_file_covers_every_flag_and_holds_the_defaults() {
        let sample =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/proxy.toml");
        let checked = tendril_daemon::config_file::check_sample::<ProxyArgs>(
            &sample,
            &["tendril-proxy", "--cluster-name", "main"],
        );
        assert_eq!(checked, Ok(()));
    }

    #[test]
    fn byte_sizes_parse_with_binary_units_and_reject_garbage() {
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("64KiB"), Ok(64 * 1024));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("2m"), Ok(2 << 20));
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("1 parsec").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }

    fn args(extra: &[&str]) -> Result<ProxyArgs, clap::Error> {
        let mut all = vec![
            "tendril-proxy",
            "--cluster-name",
            "c",
            "--store-endpoints",
            "http://127.0.0.1:2379",
        ];
        all.extend(extra);
        ProxyArgs::try_parse_from(all)
    }

    #[test]
    fn the_read_only_listener_needs_its_own_port() {
        let config = args(&["--read-only-listen-address", "127.0.0.1:25433"])
            .unwrap()
            .into_config()
            .unwrap();
        assert_eq!(
            config.read_only_listen,
            Some("127.0.0.1:25433".parse().unwrap())
        );
        assert_eq!(config.read_only_fallback, ReadOnlyFallback::Master);
        assert_eq!(
            args(&[]).unwrap().into_config().unwrap().read_only_listen,
            None
        );
        let err = args(&["--read-only-listen-address", "127.0.0.1:25432"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(err.contains("give it its own port"), "{err}");
        let err = args(&["--read-only-fallback", "standby"]).unwrap_err();
        assert!(err.to_string().contains("master, reject"), "{err}");
    }

    #[test]
    fn takeover_is_a_switch_or_a_mode() {
        let mode = |extra: &[&str]| args(extra).map(|a| a.takeover);
        assert_eq!(mode(&[]).unwrap(), Takeover::Never);
        assert_eq!(mode(&["--takeover"]).unwrap(), Takeover::Always);
        assert_eq!(
            mode(&["--takeover", "--uid", "p1"]).unwrap(),
            Takeover::Always
        );
        assert_eq!(mode(&["--takeover=auto"]).unwrap(), Takeover::Auto);
        assert_eq!(mode(&["--takeover", "auto"]).unwrap(), Takeover::Auto);
        // What the settings file makes of `takeover = true`.
        assert_eq!(mode(&["--takeover", "true"]).unwrap(), Takeover::Always);
        assert!(mode(&["--takeover=sometimes"]).is_err());
        let config = args(&["--takeover=auto", "--listen-address", "127.0.0.1:0"])
            .unwrap()
            .into_config()
            .unwrap_err();
        assert!(config.contains("--takeover needs a --listen-address with a fixed port"));
        assert_eq!(
            args(&["--after-handover", "wait"]).unwrap().after_handover,
            AfterHandover::Wait
        );
    }

    #[test]
    fn a_refusal_certificate_needs_its_key_and_must_load() {
        let err = args(&["--refusal-cert-file", "/x.crt"]).unwrap_err();
        assert!(err.to_string().contains("--refusal-key-file"), "{err}");
        let err = args(&[
            "--refusal-cert-file",
            "/no/such.crt",
            "--refusal-key-file",
            "/no/such.key",
        ])
        .unwrap()
        .into_config()
        .unwrap_err();
        assert!(err.contains("--refusal-cert-file /no/such.crt"), "{err}");
        let dir = std::env::temp_dir().join(format!("refusal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let err = args(&[
            "--refusal-cert-file",
            junk.to_str().unwrap(),
            "--refusal-key-file",
            junk.to_str().unwrap(),
        ])
        .unwrap()
        .into_config()
        .unwrap_err();
        assert!(err.contains("no certificate in it"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
