//! State shared between the control thread and the workers: the routing table (arc-swap),
//! per-worker counters, settings.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;

use crate::metrics::WorkerMetrics;
use crate::routing::RoutingTable;
use crate::worker::Driver;

/// Data-plane settings, fixed at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The cluster name (in error messages).
    pub cluster: String,
    /// Most client connections at once.
    pub max_connections: u64,
    /// Deadline of a backend connect.
    pub connect_timeout: Duration,
    /// How long a new connection may wait for a master during a switchover (0: never wait).
    pub hold_timeout: Duration,
    /// How long a client has to send its startup packet when there is no master.
    pub startup_timeout: Duration,
    /// How long to wait for connections to end on SIGTERM.
    pub drain_timeout: Duration,
    /// In a switchover, how long connections to the old master may go on (new ones are held)
    /// before they are cut; zero cuts at once.
    pub switchover_grace: Duration,
    /// The certificate a TLS client is refused with (see [`crate::tls_refusal`]).
    pub refusal_tls: Option<std::sync::Arc<rustls::ServerConfig>>,
    /// Where read-only connections go when no standby is eligible.
    pub read_only_fallback: crate::config::ReadOnlyFallback,
    /// The listen addresses (client and read-only), for the proxy's report.
    pub listen: (std::net::SocketAddr, Option<std::net::SocketAddr>),
}

/// Shared state.
#[derive(Debug)]
pub struct Shared {
    /// The current routing table.
    pub table: ArcSwap<RoutingTable>,
    /// One counter block per worker, then one for the kernel path when it runs.
    pub workers: Vec<WorkerMetrics>,
    /// Settings.
    pub settings: Settings,
    /// Host sockets destroyed by the socket killer.
    pub killed: AtomicU64,
    /// Host sockets pointing at the current backend (the connection tracker).
    pub host_sockets: AtomicU64,
    /// Connections given a path by the kernel path, by reason (`kernel::path::Reason`'s
    /// index).
    pub kernel_paths: [AtomicU64; crate::kernel::path::Reason::ALL.len()],
    read_turn: AtomicU64,
    drivers: Vec<AtomicU8>,
    draining: AtomicBool,
    owns_listeners: AtomicBool,
    alone: AtomicBool,
    handed_over: AtomicBool,
    workers_stopped: std::sync::atomic::AtomicUsize,
}

impl Shared {
    /// Shared state for `workers` workers plus `extra` counter blocks for other
    /// connection-owning threads (the kernel path), routing nowhere. Every block
    /// acknowledges fences.
    pub fn new(workers: usize, extra: usize, settings: Settings) -> Arc<Shared> {
        Arc::new(Shared {
            table: ArcSwap::from_pointee(RoutingTable::starting()),
            workers: (0..workers + extra)
                .map(|_| WorkerMetrics::default())
                .collect(),
            settings,
            killed: AtomicU64::new(0),
            host_sockets: AtomicU64::new(0),
            kernel_paths: Default::default(),
            read_turn: AtomicU64::new(0),
            drivers: (0..workers).map(|_| AtomicU8::new(0)).collect(),
            draining: AtomicBool::new(false),
            owns_listeners: AtomicBool::new(false),
            alone: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            workers_stopped: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Connections open across workers.
    pub fn active_connections(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.active.load(Ordering::Relaxed))
            .sum()
    }

    /// Connections linked to a backend across workers and the kernel path.
    pub fn linked_connections(&self) -> u64 {
        self.workers
            .iter()
            .map(|w| w.linked.load(Ordering::Relaxed))
            .sum()
    }

    /// The turn of a new read-only connection, for the round robin over standbys (one
    /// counter for every worker, so that the spread is even across them).
    pub fn next_read_turn(&self) -> u64 {
        self.read_turn.fetch_add(1, Ordering::Relaxed)
    }

    /// Records the driver worker `id` runs on.
    pub fn set_driver(&self, id: usize, driver: Driver) {
        let code = match driver {
            Driver::IoUring => 1,
            Driver::IoUringPlain => 2,
            Driver::Epoll => 3,
        };
        self.drivers[id].store(code, Ordering::Relaxed);
    }

    /// The driver of the first worker that reported one (they normally agree).
    pub fn driver(&self) -> &'static str {
        match self
            .drivers
            .iter()
            .map(|d| d.load(Ordering::Relaxed))
            .find(|c| *c != 0)
        {
            Some(1) => Driver::IoUring.label(),
            Some(2) => Driver::IoUringPlain.label(),
            Some(3) => Driver::Epoll.label(),
            _ => "starting",
        }
    }

    /// Whether every worker reported its driver.
    pub fn all_started(&self) -> bool {
        self.drivers.iter().all(|d| d.load(Ordering::Relaxed) != 0)
    }

    /// Starts draining: workers stop accepting once their listener is shut down.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Records that a worker thread returned.
    pub fn worker_stopped(&self) {
        self.workers_stopped.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether every worker thread returned (none can hand over a connection any more).
    pub fn all_workers_stopped(&self) -> bool {
        self.workers_stopped.load(Ordering::Acquire) >= self.drivers.len()
    }

    /// Marks the listening sockets as this process's alone: shutting them down on drain
    /// refuses nobody another process would serve.
    pub fn own_listeners(&self) {
        self.owns_listeners.store(true, Ordering::Release);
    }

    /// Records that no other process accepts on this one's listening sockets any more (the
    /// one they were taken from is ready to drain, or gone): workers waiting for the routing
    /// table accept at once.
    pub fn set_alone(&self) {
        self.alone.store(true, Ordering::Release);
    }

    /// See [`Shared::set_alone`].
    pub fn alone(&self) -> bool {
        self.alone.load(Ordering::Acquire)
    }

    /// Records that a new process took over the listening sockets (it serves on them now).
    pub fn hand_over(&self) {
        self.handed_over.store(true, Ordering::Release);
    }

    /// Whether draining may shut the listening sockets down: they are this process's and
    /// no other took them over (else the workers only stop accepting on them).
    pub fn may_shut_listeners(&self) -> bool {
        self.owns_listeners.load(Ordering::Acquire) && !self.handed_over.load(Ordering::Acquire)
    }

    /// Whether the proxy is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}
