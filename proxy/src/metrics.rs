//! Proxy counters: one cache-line-padded block per worker (no sharing on the hot path),
//! summed when scraped.

use std::sync::atomic::{AtomicU64, Ordering};

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The client closed it.
    Client,
    /// The backend closed it.
    Backend,
    /// The fence cut it (master changed or proxy fenced itself).
    Fenced,
    /// An I/O error.
    Error,
    /// Refused: no master (SQLSTATE 57P03).
    NoMaster,
    /// Refused: connection limit (SQLSTATE 53300).
    Limit,
    /// The backend could not be reached.
    ConnectFailed,
    /// Not PostgreSQL, or too slow to send its startup packet.
    BadStartup,
    /// A cancel request, forwarded or dropped.
    Cancel,
    /// Refused by the read-only listener: no standby eligible and `--read-only-fallback
    /// reject` (SQLSTATE 57P03).
    NoStandby,
    /// Handed over, open, to the proxy that took over from this one (a node rollout): it
    /// goes on there.
    HandedOver,
}

impl CloseReason {
    /// All reasons, for rendering.
    pub const ALL: [CloseReason; 11] = [
        CloseReason::Client,
        CloseReason::Backend,
        CloseReason::Fenced,
        CloseReason::Error,
        CloseReason::NoMaster,
        CloseReason::Limit,
        CloseReason::ConnectFailed,
        CloseReason::BadStartup,
        CloseReason::Cancel,
        CloseReason::NoStandby,
        CloseReason::HandedOver,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::Client => "client",
            CloseReason::Backend => "backend",
            CloseReason::Fenced => "fenced",
            CloseReason::Error => "error",
            CloseReason::NoMaster => "no_master",
            CloseReason::Limit => "limit",
            CloseReason::ConnectFailed => "connect_failed",
            CloseReason::BadStartup => "bad_startup",
            CloseReason::Cancel => "cancel",
            CloseReason::NoStandby => "no_standby",
            CloseReason::HandedOver => "handed_over",
        }
    }
}

/// One worker's counters.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct WorkerMetrics {
    /// Connections accepted.
    pub accepted: AtomicU64,
    /// Connections open.
    pub active: AtomicU64,
    /// Connections linked to a backend (a switchover's drain waits for these to end).
    pub linked: AtomicU64,
    /// Kernel-forwarded connections on the client's own socket, open now.
    pub kernel_client_socket: AtomicU64,
    /// Connections accepted on the read-only listener (also counted in `accepted`).
    pub accepted_read_only: AtomicU64,
    /// Read-only connections sent to a standby.
    pub read_only_to_standby: AtomicU64,
    /// Read-only connections sent to the master (`--read-only-fallback master`).
    pub read_only_to_master: AtomicU64,
    /// Closed, by reason (indexed like [`CloseReason::ALL`]).
    pub closed: [AtomicU64; CloseReason::ALL.len()],
    /// Bytes from clients to the backend.
    pub bytes_to_backend: AtomicU64,
    /// Bytes from the backend to clients.
    pub bytes_to_client: AtomicU64,
    /// The last routing-table epoch this worker applied (fence acknowledgement).
    pub applied_epoch: AtomicU64,
}

impl WorkerMetrics {
    /// Records that this block's thread stopped: it holds no connection, so it has applied
    /// every fence to come (a drain must not wait for it).
    pub fn stopped(&self) {
        self.applied_epoch.store(u64::MAX, Ordering::Release);
    }

    /// Counts a connection the kernel path holds from now on (open, linked, and on the
    /// client-socket path when `client_socket`).
    pub fn kernel_held(&self, client_socket: bool) {
        self.active.fetch_add(1, Ordering::Relaxed);
        self.linked.fetch_add(1, Ordering::Relaxed);
        if client_socket {
            self.kernel_client_socket.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Undoes [`WorkerMetrics::kernel_held`]: closed, or gone to another process.
    pub fn kernel_released(&self, client_socket: bool) {
        self.active.fetch_sub(1, Ordering::Relaxed);
        self.linked.fetch_sub(1, Ordering::Relaxed);
        if client_socket {
            self.kernel_client_socket.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Counts a closed connection.
    pub fn closed(&self, reason: CloseReason) {
        let i = CloseReason::ALL
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        self.closed[i].fetch_add(1, Ordering::Relaxed);
    }
}

/// Client-socket path values.
#[derive(Debug, Clone, Copy)]
pub struct ClientSocketMetrics {
    /// The program's counters.
    pub stats: tendril_ebpf::client_socket::Stats,
    /// Connections forwarded on the client's socket now.
    pub active: u64,
    /// Entries in the per-connection maps.
    pub entries: tendril_ebpf::client_socket::Entries,
}

/// Kernel-path values for the metrics.
#[derive(Debug, Clone, Copy)]
pub struct KernelMetrics {
    /// The program's counters.
    pub stats: tendril_ebpf::sockmap::Stats,
    /// The pair path is selectable (what the client-socket path cannot take goes there,
    /// else to userspace).
    pub pair: bool,
    /// Connections given each path, by reason (`kernel::path::Reason::ALL`'s order).
    pub paths: [u64; crate::kernel::path::Reason::ALL.len()],
    /// Connections forwarded in the kernel now.
    pub active: u64,
    /// Entries in the program's maps (peers, directions, forwarded).
    pub entries: (usize, usize, usize),
    /// The client-socket programs, when loaded: counters, open connections, and map
    /// entries.
    pub client_socket: Option<ClientSocketMetrics>,
}

/// Appends one metric family: its HELP and TYPE lines, then one sample per row, labelled
/// with the cluster and the row's labels (`name="value",...`, or empty).
fn family(
    out: &mut String,
    cluster: &str,
    name: &str,
    kind: &str,
    help: &str,
    rows: Vec<(String, u64)>,
) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, value) in rows {
        let sep = if labels.is_empty() { "" } else { "," };
        out.push_str(&format!(
            "{name}{{cluster=\"{cluster}\"{sep}{labels}}} {value}\n"
        ));
    }
}

/// The listeners' and the read-only routing's part of the Prometheus text: connections
/// accepted per listener, where read-only connections went, and each standby's
/// eligibility (`read_only`: whether the read-only listener runs).
pub fn render_listeners(
    cluster: &str,
    workers: &[WorkerMetrics],
    table: &crate::routing::RoutingTable,
    read_only: bool,
) -> String {
    let sum = |f: &dyn Fn(&WorkerMetrics) -> u64| workers.iter().map(f).sum::<u64>();
    let read_only_accepted = sum(&|w| w.accepted_read_only.load(Ordering::Relaxed));
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        family(&mut out, cluster, name, kind, help, rows);
    };
    let mut accepted = vec![(
        "listener=\"primary\"".to_owned(),
        sum(&|w| w.accepted.load(Ordering::Relaxed)) - read_only_accepted,
    )];
    if read_only {
        accepted.push(("listener=\"read_only\"".to_owned(), read_only_accepted));
    }
    metric(
        "tendril_proxy_listener_connections_accepted_total",
        "counter",
        "client connections accepted, by listener",
        accepted,
    );
    if !read_only {
        return out;
    }
    metric(
        "tendril_proxy_read_only_routed_total",
        "counter",
        "read-only connections sent to a backend, by its role",
        vec![
            (
                "to=\"standby\"".into(),
                sum(&|w| w.read_only_to_standby.load(Ordering::Relaxed)),
            ),
            (
                "to=\"master\"".into(),
                sum(&|w| w.read_only_to_master.load(Ordering::Relaxed)),
            ),
        ],
    );
    metric(
        "tendril_proxy_standby_eligible",
        "gauge",
        "1 while a standby takes new read-only connections, else 0 with the reason",
        table
            .standbys
            .iter()
            .map(|s| {
                let reason = s.eligible.err().map_or("eligible", |r| r.label());
                (
                    format!(
                        "db=\"{}\",address=\"{}\",reason=\"{reason}\"",
                        s.backend.db_uid, s.backend.addr
                    ),
                    u64::from(s.eligible.is_ok()),
                )
            })
            .collect(),
    );
    out
}

/// Renders the Prometheus text for all workers plus the control-plane values.
#[allow(
    clippy::too_many_arguments,
    reason = "one call site, each value a metric"
)]
pub fn render(
    cluster: &str,
    workers: &[WorkerMetrics],
    generation: u64,
    fenced: bool,
    driver: &str,
    kill_mechanism: &str,
    forwarding: &str,
    killed: u64,
    host_sockets: u64,
    kernel: Option<KernelMetrics>,
) -> String {
    let sum = |f: &dyn Fn(&WorkerMetrics) -> u64| workers.iter().map(f).sum::<u64>();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        family(&mut out, cluster, name, kind, help, rows);
    };
    metric(
        "tendril_proxy_connections_active",
        "gauge",
        "client connections open",
        vec![(String::new(), sum(&|w| w.active.load(Ordering::Relaxed)))],
    );
    metric(
        "tendril_proxy_connections_accepted_total",
        "counter",
        "client connections accepted",
        vec![(String::new(), sum(&|w| w.accepted.load(Ordering::Relaxed)))],
    );
    metric(
        "tendril_proxy_connections_closed_total",
        "counter",
        "client connections closed, by reason",
        CloseReason::ALL
            .iter()
            .enumerate()
            .map(|(i, r)| {
                (
                    format!("reason=\"{}\"", r.label()),
                    sum(&|w| w.closed[i].load(Ordering::Relaxed)),
                )
            })
            .collect(),
    );
    metric(
        "tendril_proxy_bytes_total",
        "counter",
        "bytes forwarded, by direction",
        vec![
            (
                "direction=\"to_backend\"".into(),
                sum(&|w| w.bytes_to_backend.load(Ordering::Relaxed)),
            ),
            (
                "direction=\"to_client\"".into(),
                sum(&|w| w.bytes_to_client.load(Ordering::Relaxed)),
            ),
        ],
    );
    metric(
        "tendril_proxy_generation",
        "gauge",
        "proxy-section generation applied",
        vec![(String::new(), generation)],
    );
    metric(
        "tendril_proxy_fenced",
        "gauge",
        "1 while routing nowhere",
        vec![(String::new(), u64::from(fenced))],
    );
    metric(
        "tendril_proxy_io_driver",
        "gauge",
        "the I/O driver in use",
        vec![(format!("driver=\"{driver}\""), 1)],
    );
    metric(
        "tendril_proxy_forwarding",
        "gauge",
        "the forwarding strategy in use",
        vec![(format!("strategy=\"{forwarding}\""), 1)],
    );
    metric(
        "tendril_proxy_kill_mechanism",
        "gauge",
        "how host sockets to a demoted master are destroyed",
        vec![(format!("mechanism=\"{kill_mechanism}\""), 1)],
    );
    metric(
        "tendril_proxy_host_sockets_killed_total",
        "counter",
        "host sockets to demoted masters destroyed, by mechanism",
        vec![(format!("mechanism=\"{kill_mechanism}\""), killed)],
    );
    metric(
        "tendril_proxy_host_sockets_to_backend",
        "gauge",
        "sockets on this host connected to the current master (proxied or not)",
        vec![(String::new(), host_sockets)],
    );
    if let Some(k) = kernel {
        metric(
            "tendril_proxy_kernel_connections_active",
            "gauge",
            "connections forwarded in the kernel now",
            vec![(String::new(), k.active)],
        );
        metric(
            "tendril_proxy_kernel_path_total",
            "counter",
            "connections by the forwarding path the kernel path chose for them, and why (client_socket: a client on this host; pair with --forwarding kernel, userspace with auto: client_socket_off, client_elsewhere, client_silent, server_unkeyed, client_blocks, route_refused; userspace: map_full, join_refused)",
            crate::kernel::path::Reason::ALL
                .iter()
                .map(|r| {
                    (
                        format!(
                            "path=\"{}\",reason=\"{}\"",
                            r.path(k.pair).label(),
                            r.label()
                        ),
                        k.paths[r.index()],
                    )
                })
                .collect(),
        );
        metric(
            "tendril_proxy_kernel_verdicts_total",
            "counter",
            "skbs seen by the sockmap program, by outcome (repeated: bytes delivered before, after a retransmission; dropped or trimmed)",
            vec![
                ("outcome=\"redirected\"".into(), k.stats.redirects),
                ("outcome=\"passed\"".into(), k.stats.passes),
                ("outcome=\"failed\"".into(), k.stats.failures),
                ("outcome=\"repeated\"".into(), k.stats.repeated),
            ],
        );
        metric(
            "tendril_proxy_kernel_backpressure_total",
            "counter",
            "directions paused for backpressure (passed up to the proxy) and resumed",
            vec![
                ("event=\"paused\"".into(), k.stats.pauses),
                ("event=\"resumed\"".into(), k.stats.resumes),
            ],
        );
        metric(
            "tendril_proxy_kernel_map_entries",
            "gauge",
            "entries in the sockmap program's maps (two per kernel-forwarded connection)",
            vec![
                ("map=\"peers\"".into(), k.entries.0 as u64),
                ("map=\"directions\"".into(), k.entries.1 as u64),
                ("map=\"forwarded\"".into(), k.entries.2 as u64),
            ],
        );
        metric(
            "tendril_proxy_kernel_events_lost_total",
            "counter",
            "program events lost to a full ring (the proxy then rescans)",
            vec![(String::new(), k.stats.lost_events)],
        );
        if let Some(ClientSocketMetrics {
            stats,
            active,
            entries,
        }) = k.client_socket
        {
            metric(
                "tendril_proxy_kernel_client_socket_connections",
                "gauge",
                "kernel-forwarded connections on the client's own socket (clients on this host)",
                vec![(String::new(), active)],
            );
            metric(
                "tendril_proxy_kernel_client_socket_total",
                "counter",
                "client-socket path events: sends and reply skbs redirected or passed, pauses, failures, connections cut because their end never reached the client (stalled_cut; should stay 0)",
                vec![
                    ("event=\"client_joined\"".into(), stats.clients),
                    ("event=\"client_map_full\"".into(), stats.clients_full),
                    ("event=\"send_redirected\"".into(), stats.sends_redirected),
                    ("event=\"send_passed\"".into(), stats.sends_passed),
                    ("event=\"send_paused\"".into(), stats.send_pauses),
                    (
                        "event=\"reply_redirected\"".into(),
                        stats.replies_redirected,
                    ),
                    ("event=\"reply_passed\"".into(), stats.replies_passed),
                    ("event=\"reply_direct\"".into(), stats.replies_direct),
                    ("event=\"backend_joined\"".into(), stats.backends),
                    ("event=\"reply_paused\"".into(), stats.reply_pauses),
                    ("event=\"failed\"".into(), stats.failures),
                    ("event=\"repeated\"".into(), stats.repeated),
                    ("event=\"events_lost\"".into(), stats.lost_events),
                    ("event=\"timer_failed\"".into(), stats.timer_failures),
                    ("event=\"stalled_cut\"".into(), stats.stalled),
                ],
            );
            metric(
                "tendril_proxy_kernel_client_socket_map_entries",
                "gauge",
                "entries in the client-socket program's maps (clients: sockets connected to the proxy port on this host; backends: backend sockets on this host accepting the proxy's connections)",
                vec![
                    ("map=\"clients\"".into(), entries.clients as u64),
                    ("map=\"routes\"".into(), entries.routes as u64),
                    ("map=\"servers\"".into(), entries.servers as u64),
                    ("map=\"replies\"".into(), entries.replies as u64),
                    ("map=\"backends\"".into(), entries.backends as u64),
                ],
            );
        }
    }
    out
}
