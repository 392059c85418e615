//! tendril-proxy: the data plane. A thread-per-core proxy on every application host that
//! sends each client to the current master and cuts every connection to a demoted one at once.
//!
//! - [`worker`]: one thread per core, each with its own monoio runtime (io_uring with
//!   DEFER_TASKRUN, epoll as a fallback), its own `SO_REUSEPORT` listener, and the
//!   connections it accepted. Per accept it loads the [`routing`] table lock-free.
//! - [`forward`]: userspace forwarding of established connections (recv/send on the ring).
//! - [`kernel`]: kernel forwarding (BPF sockmap redirect) and the thread that closes, fences
//!   and applies backpressure to kernel-forwarded connections; `--forwarding` picks.
//! - [`control`]: a tokio thread that follows the cluster data by watch, publishes routing
//!   tables, fences (workers cut their connections, the socket killer the rest), acknowledges
//!   the generation, and fences the proxy itself before its lease can expire.
//! - [`pgwire`]: the startup-packet parser (sans-IO) and the 57P03 refusal used while there is
//!   no master.

pub mod config;
pub mod control;
pub mod forward;
pub mod handover;
pub mod kernel;
pub mod metrics;
pub mod pgwire;
pub use tendril_control_model::reads;
pub mod routing;
pub mod shared;
mod sys;
mod taking;
pub mod tls_refusal;
pub mod worker;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use config::{AfterHandover, ProxyConfig, Takeover};
use shared::{Settings, Shared};
use tendril_control_model::{ClusterData, decode};
use tendril_control_store::{EtcdStore, Store};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A worker could not start.
    #[error("worker {worker} failed to start: {detail}")]
    Worker {
        /// Which.
        worker: usize,
        /// Why.
        detail: String,
    },
    /// The metrics address cannot be bound.
    #[error("{0}")]
    Metrics(std::io::Error),
    /// The store configuration is unusable.
    #[error(transparent)]
    Store(#[from] tendril_control_store::StoreError),
    /// `--takeover` could not take the running proxy's listening sockets.
    #[error(transparent)]
    Takeover(#[from] handover::HandoverError),
    /// Another startup failure.
    #[error("{0}")]
    Other(String),
}

/// A running proxy.
#[derive(Debug)]
pub struct App {
    /// The address clients connect to.
    pub listen: SocketAddr,
    /// The read-only listener's address, when it runs.
    pub read_only: Option<SocketAddr>,
    /// Shared state (routing table, counters).
    pub shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    control: JoinHandle<()>,
    kernel: Option<JoinHandle<()>>,
    forwarding: &'static str,
}

/// The forwarding strategy in use, as logs and metrics name it: `kernel` (both kernel
/// paths), `client_socket` (the client-socket path, userspace for the rest: `auto`), or
/// `userspace`.
fn strategy(kernel: bool, pair: bool) -> &'static str {
    match (kernel, pair) {
        (false, _) => "userspace",
        (true, true) => "kernel",
        (true, false) => "client_socket",
    }
}

impl App {
    /// Binds, starts the workers and the control thread. `shutdown` stops the proxy (drain).
    pub fn start(
        config: ProxyConfig,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<App, ProxyError> {
        let mut config = config;
        let nofile = sys::raise_nofile_limit();
        let take = || handover::take(config.listen, config.read_only_listen, &config.cluster);
        let taken = match config.takeover {
            Takeover::Never => None,
            Takeover::Always => Some(take()?),
            Takeover::Auto => match take() {
                Ok(taken) => Some(taken),
                Err(handover::HandoverError::NoneRunning { .. }) => {
                    tracing::info!(listen = %config.listen, "--takeover=auto: no proxy answers on this address: starting on its own");
                    None
                }
                Err(e) => return Err(e.into()),
            },
        };
        let (listeners, read_only, beside, mut taken) = if let Some((taken_sockets, taken)) = taken
        {
            // The running process's own sockets: they never close, so no connect is
            // refused. It accepts on them until this one has read its routing table.
            let (mut listeners, mut read_only) = (taken_sockets.primary, taken_sockets.read_only);
            let uid = handover::successor_uid(&config.uid, &taken.uid);
            if uid != config.uid {
                tracing::info!(old = %taken.uid, %uid, "the running proxy has this uid: taking another until it exits");
                config.uid = uid;
            }
            let taken_count = listeners.len().max(read_only.len());
            if taken_count > config.workers {
                // Every socket of the group gets clients: each needs a worker.
                tracing::info!(
                    workers = taken_count,
                    "one worker per listening socket taken over"
                );
                config.workers = taken_count;
            }
            let more = config.workers - listeners.len();
            if more > 0 {
                listeners.extend(bind(config.listen, more, false)?);
            }
            if let Some(ro) = config.read_only_listen {
                let more = config.workers - read_only.len();
                if more > 0 {
                    let ro = read_only
                        .first()
                        .and_then(|l| l.local_addr().ok())
                        .unwrap_or(ro);
                    read_only.extend(bind(ro, more, false)?);
                }
            }
            (listeners, read_only, true, Some(taken))
        } else {
            // Beside a running process on the same address (a proxy started to replace
            // it without --takeover), the listeners join only once the routing table is
            // read: until then every new client goes to the process that can route it.
            let beside = handover::listened_on(config.listen);
            let read_only = match config.read_only_listen {
                Some(ro) => bind(ro, config.workers, !beside)?,
                None => Vec::new(),
            };
            (
                bind(config.listen, config.workers, !beside)?,
                read_only,
                beside,
                None,
            )
        };
        let read_only_listen = match read_only.first() {
            Some(l) => Some(l.local_addr().map_err(|source| ProxyError::Listen {
                addr: config.read_only_listen.unwrap_or(config.listen),
                source,
            })?),
            None => None,
        };
        let listen = listeners[0]
            .local_addr()
            .map_err(|source| ProxyError::Listen {
                addr: config.listen,
                source,
            })?;
        let taking::Programs {
            pair: pair_map,
            client_socket,
            adopts,
        } = taking::load_programs(&config, listen, read_only_listen, taken.as_mut())?;
        let pair = pair_map.is_some();
        let shared = Shared::new(
            config.workers,
            usize::from(pair_map.is_some() || client_socket.is_some()),
            Settings {
                cluster: config.cluster.clone(),
                max_connections: config.max_connections,
                connect_timeout: config.connect_timeout,
                hold_timeout: config.hold_timeout,
                startup_timeout: Duration::from_secs(10),
                drain_timeout: config.drain_timeout,
                switchover_grace: config.switchover_grace,
                refusal_tls: config.refusal_tls.clone(),
                read_only_fallback: config.read_only_fallback,
                listen: (listen, read_only_listen),
            },
        );
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        let mut wakers = Vec::new();
        let mut workers = Vec::new();
        let mut kernel_thread = None;
        let mut kernel_stats = None;
        let kernel = match (pair_map, client_socket) {
            (None, None) => None,
            (pair_map, client_socket) => {
                let (control_end, thread_end) = std::os::unix::net::UnixStream::pair()
                    .map_err(|e| ProxyError::Other(format!("socketpair: {e}")))?;
                control_end
                    .set_nonblocking(true)
                    .map_err(|e| ProxyError::Other(e.to_string()))?;
                wakers.push(control_end);
                let (path, handle) = kernel::KernelPath::start(
                    (pair_map, client_socket, adopts),
                    config.kernel_buffer_limit,
                    shared.clone(),
                    config.workers,
                    thread_end,
                )
                .map_err(|e| ProxyError::Other(format!("start the kernel path: {e}")))?;
                kernel_thread = Some(handle);
                kernel_stats = Some((path.pair_map().cloned(), path.client_socket().cloned()));
                Some(path)
            }
        };
        let forwarding = strategy(kernel.is_some(), pair);
        // What a proxy that takes over from this one may share (same programs, same
        // settings): the maps, then the connections.
        let share = kernel.as_ref().and_then(|k| taking::share(k));
        let adopting = kernel
            .as_ref()
            .filter(|_| adopts.any())
            .map(|k| (Arc::downgrade(k), adopts));
        let accept = match (&taken, beside) {
            (Some(_), _) => worker::Accept::OnceAlone,
            (None, true) => worker::Accept::OnceRouting,
            (None, false) => worker::Accept::Now,
        };
        let listener_fds: Vec<_> = listeners.iter().map(AsRawFd::as_raw_fd).collect();
        let read_only_fds: Vec<_> = read_only.iter().map(AsRawFd::as_raw_fd).collect();
        let mut read_only = read_only.into_iter();
        let (started_tx, started_rx) =
            std::sync::mpsc::channel::<(usize, Result<worker::Driver, String>)>();
        for (id, listener) in listeners.into_iter().enumerate() {
            let (control_end, worker_end) = std::os::unix::net::UnixStream::pair()
                .map_err(|e| ProxyError::Other(format!("socketpair: {e}")))?;
            control_end
                .set_nonblocking(true)
                .map_err(|e| ProxyError::Other(e.to_string()))?;
            worker_end
                .set_nonblocking(true)
                .map_err(|e| ProxyError::Other(e.to_string()))?;
            wakers.push(control_end);
            let shared = shared.clone();
            let core = (!cores.is_empty()).then(|| cores[id % cores.len()]);
            let force_epoll = config.force_epoll;
            let kernel = kernel.clone();
            let started = started_tx.clone();
            let read_only = read_only.next();
            let handle = std::thread::Builder::new()
                .name(format!("tendril-worker-{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    worker::run(
                        id,
                        listener,
                        read_only,
                        accept,
                        worker_end,
                        shared,
                        force_epoll,
                        kernel,
                        started,
                    );
                })
                .map_err(|e| ProxyError::Other(format!("spawn worker: {e}")))?;
            workers.push(handle);
        }
        drop(started_tx);
        // Only the workers hold the kernel path now: when they stop, its thread drains.
        drop(kernel);
        for _ in 0..config.workers {
            match started_rx.recv_timeout(Duration::from_secs(10)) {
                Ok((_, Ok(_))) => {}
                Ok((worker, Err(detail))) => return Err(ProxyError::Worker { worker, detail }),
                Err(_) => {
                    return Err(ProxyError::Other(
                        "workers did not start within 10 s".into(),
                    ));
                }
            }
        }
        let driver = shared.driver();
        tracing::info!(%listen, read_only = ?read_only_listen, workers = config.workers, driver, forwarding, nofile, uid = %config.uid, "proxy listening");
        if taken.is_some() {
            tracing::info!(%listen, "took the running proxy's listening sockets: accepting once the routing table is read");
        } else if beside {
            tracing::info!(%listen, "another process listens on this address: this one takes clients once it has read its routing table");
        }
        let (handed_over_tx, handed_over) = tokio::sync::watch::channel(false);
        match taken {
            Some(taken) => taking::tell_when_routing(taken, adopting, shared.clone())?,
            None => {
                shared.own_listeners();
                // Listening: clients are held until the routing table is read.
                tendril_daemon::notify("READY=1");
            }
        }
        let s = shared.clone();
        let capturing = kernel_stats.as_ref().and_then(|(_, cs)| cs.clone());
        handover::serve(
            listen,
            config.uid.clone(),
            config.cluster.clone(),
            listener_fds.clone(),
            read_only_fds.clone(),
            share,
            move || {
                // Before the new process accepts: its local clients must reach its own
                // programs (the drain repeats this for SIGTERM).
                if let Some(cs) = capturing {
                    cs.stop_capturing();
                }
                s.hand_over();
                handed_over_tx.send_replace(true);
            },
        )
        .map_err(|e| ProxyError::Other(format!("handover socket: {e}")))?;
        let control = spawn_control(
            config,
            shared.clone(),
            wakers,
            listener_fds.into_iter().chain(read_only_fds).collect(),
            kernel_stats,
            Stop {
                signal: Box::pin(shutdown),
                handed_over,
            },
        )?;
        Ok(App {
            listen,
            read_only: read_only_listen,
            shared,
            workers,
            control,
            kernel: kernel_thread,
            forwarding,
        })
    }

    /// Waits until the proxy has drained and stopped.
    pub fn wait(self) {
        let _ = self.control.join();
        for w in self.workers {
            let _ = w.join();
        }
        if let Some(k) = self.kernel {
            let _ = k.join();
        }
    }

    /// The forwarding strategy in use (see [`strategy`]).
    pub fn forwarding(&self) -> &'static str {
        self.forwarding
    }
}

/// `n` sockets sharing `addr` (`SO_REUSEPORT`), listening unless `listen` is false (the
/// workers listen once the routing table is read, [`worker::run`]).
fn bind(
    addr: SocketAddr,
    n: usize,
    listen: bool,
) -> Result<Vec<std::net::TcpListener>, ProxyError> {
    use socket2::{Domain, Protocol, Socket, Type};
    let mut out = Vec::with_capacity(n);
    let mut addr = addr;
    for _ in 0..n {
        let err = |source| ProxyError::Listen { addr, source };
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
            .map_err(err)?;
        socket.set_reuse_address(true).map_err(err)?;
        socket.set_reuse_port(true).map_err(err)?;
        socket.set_nonblocking(true).map_err(err)?;
        socket.bind(&addr.into()).map_err(err)?;
        if listen {
            socket.listen(worker::BACKLOG).map_err(err)?;
        }
        let listener: std::net::TcpListener = socket.into();
        // With port 0 the first bind picks a port; the others share it.
        addr = listener.local_addr().map_err(err)?;
        out.push(listener);
    }
    Ok(out)
}

/// What ends the proxy: a signal, or a handover to a new process (then, with
/// `--after-handover wait`, the process outlives its drain until the signal).
struct Stop {
    signal: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
    handed_over: tokio::sync::watch::Receiver<bool>,
}

impl Stop {
    /// Resolves when the proxy should drain: on the signal, or once handed over. The
    /// signal is watched from the start, so one that arrives during the drain still counts
    /// for [`Stop::outlive_drain`].
    fn drain(self) -> (impl std::future::Future<Output = ()>, Drained) {
        let (signalled_tx, signalled) = tokio::sync::watch::channel(false);
        let signal = self.signal;
        tokio::spawn(async move {
            signal.await;
            signalled_tx.send_replace(true);
        });
        let (mut s, mut h) = (signalled.clone(), self.handed_over.clone());
        let drain = async move {
            tokio::select! {
                Ok(_) = s.wait_for(|v| *v) => {}
                Ok(_) = h.wait_for(|v| *v) => {}
                // Both senders gone: the runtime is ending.
                else => {}
            }
        };
        let drained = Drained {
            signalled,
            handed_over: self.handed_over,
        };
        (drain, drained)
    }
}

/// See [`Stop::drain`].
struct Drained {
    signalled: tokio::sync::watch::Receiver<bool>,
    handed_over: tokio::sync::watch::Receiver<bool>,
}

impl Drained {
    /// With `--after-handover wait`, a process that was handed over waits for the signal
    /// after its drain: a supervisor that restarts exited processes (kubelet) would start
    /// one that takes the sockets back.
    async fn outlive_drain(mut self, after: AfterHandover) {
        if after == AfterHandover::Wait && *self.handed_over.borrow() {
            if !*self.signalled.borrow() {
                tracing::info!(
                    "handed over and drained: waiting for SIGTERM (--after-handover wait)"
                );
            }
            let _ = self.signalled.wait_for(|v| *v).await;
        }
    }
}

/// The kernel path's loaded programs, for the metrics: the pair path's when it is selectable,
/// the client-socket path's when it loaded.
type KernelPrograms = (
    Option<Arc<tendril_ebpf::sockmap::Sockmap>>,
    Option<Arc<tendril_ebpf::client_socket::ClientSocket>>,
);

fn spawn_control(
    config: ProxyConfig,
    shared: Arc<Shared>,
    wakers: Vec<std::os::unix::net::UnixStream>,
    listener_fds: Vec<std::os::fd::RawFd>,
    kernel: Option<KernelPrograms>,
    stop: Stop,
) -> Result<JoinHandle<()>, ProxyError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ProxyError::Other(format!("control runtime: {e}")))?;
    let metrics_listener = match config.metrics_address {
        Some(addr) => Some(
            runtime
                .block_on(tendril_metrics::bind_shared(addr))
                .map_err(ProxyError::Metrics)?,
        ),
        None => None,
    };
    let store = runtime.block_on(EtcdStore::connect_lazy(&config.store))?;
    std::thread::Builder::new()
        .name("tendril-control".into())
        .spawn(move || {
            runtime.block_on(async move {
                let lease_ttl = lease_ttl(&store, &config).await;
                let killer = tendril_ebpf::SocketKiller::load();
                let mechanism = killer.mechanism();
                if mechanism == tendril_ebpf::Mechanism::Bpf {
                    tracing::info!(mechanism = mechanism.label(), "socket killer ready");
                } else {
                    let why: Vec<String> = killer.fallbacks().iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        mechanism = mechanism.label(),
                        why = %why.join("; "),
                        "socket killer degraded: connections that bypass the proxy may survive a fence"
                    );
                }
                let killer: Option<Box<dyn control::SocketKiller>> =
                    (mechanism != tendril_ebpf::Mechanism::None).then(|| Box::new(killer) as Box<dyn control::SocketKiller>);
                let mut control = control::Control::new(
                    store,
                    shared.clone(),
                    config.keys.clone(),
                    config.uid.clone(),
                    lease_ttl,
                    wakers,
                    listener_fds,
                    killer,
                );
                if let Some(cs) = kernel.as_ref().and_then(|(_, cs)| cs.clone()) {
                    // New local clients then reach the programs of the process that
                    // accepts them (after a takeover), not this one's.
                    control.on_drain(move || cs.stop_capturing());
                }
                let (drain, drained) = stop.drain();
                if let Some(listener) = metrics_listener {
                    let mechanism = control.kill_mechanism();
                    let cluster = config.cluster.clone();
                    let read_only = config.read_only_listen.is_some();
                    let s = shared.clone();
                    let s_health = shared.clone();
                    let health: tendril_metrics::Health = Arc::new(move || {
                        routing::health(&s_health.table.load(), s_health.draining())
                    });
                    let server = tokio::spawn(tendril_metrics::serve_with_health(
                        listener,
                        Arc::new(move || {
                            let table = s.table.load();
                            let kernel = kernel.as_ref().map(|(k, cs)| metrics::KernelMetrics {
                                pair: k.is_some(),
                                client_socket: cs.as_ref().map(|l| {
                                    let open = s.workers.iter().map(|w| w.kernel_client_socket.load(std::sync::atomic::Ordering::Relaxed)).sum();
                                    metrics::ClientSocketMetrics {
                                        stats: l.stats(),
                                        active: open,
                                        entries: l.entries(),
                                    }
                                }),
                                stats: k.as_ref().map(|k| k.stats()).unwrap_or_default(),
                                paths: std::array::from_fn(|i| s.kernel_paths[i].load(std::sync::atomic::Ordering::Relaxed)),
                                active: s.workers.last().map_or(0, |w| w.active.load(std::sync::atomic::Ordering::Relaxed)),
                                entries: k.as_ref().map_or((0, 0, 0), |k| k.entries()),
                            });
                            let mut text = metrics::render(
                                &cluster,
                                &s.workers,
                                table.generation.0,
                                table.backend().is_none(),
                                s.driver(),
                                mechanism,
                                strategy(kernel.is_some(), kernel.as_ref().is_some_and(|k| k.pair)),
                                s.killed.load(std::sync::atomic::Ordering::Relaxed),
                                s.host_sockets.load(std::sync::atomic::Ordering::Relaxed),
                                kernel,
                            );
                            text.push_str(&metrics::render_listeners(&cluster, &s.workers, &table, read_only));
                            text
                        }),
                        health,
                    ));
                    // The process that took over serves the metrics port from now on
                    // (probes reach it alone).
                    let mut handed_over = drained.handed_over.clone();
                    tokio::spawn(async move {
                        if handed_over.wait_for(|h| *h).await.is_ok() {
                            server.abort();
                            tracing::info!("handed over: metrics port released");
                        }
                    });
                }
                tokio::spawn(reexec_on_sigusr2(shared.clone()));
                let after = config.after_handover;
                control.run(drain).await;
                drained.outlive_drain(after).await;
            });
        })
        .map_err(|e| ProxyError::Other(format!("spawn control thread: {e}")))
}

/// SIGUSR2 starts this program again with `--takeover` (systemd's `ExecReload`): a restart,
/// or an upgrade once the binary was replaced on disk.
async fn reexec_on_sigusr2(shared: Arc<Shared>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Ok(mut usr2) = signal(SignalKind::user_defined2()) else {
        tracing::warn!("cannot handle SIGUSR2: no re-execution on reload");
        return;
    };
    while usr2.recv().await.is_some() {
        if shared.draining() {
            tracing::info!("SIGUSR2 while draining: ignored");
            continue;
        }
        match handover::reexec() {
            Ok(pid) => tracing::info!(pid, "SIGUSR2: started a new process to take over"),
            Err(e) => tracing::error!(error = %e, "SIGUSR2: cannot start a new process"),
        }
    }
}

/// The lease TTL: the spec's `proxy_timeout` if the cluster data can be read now, else 5 s.
async fn lease_ttl(store: &EtcdStore, config: &ProxyConfig) -> Duration {
    let read = tokio::time::timeout(
        Duration::from_secs(2),
        store.get(&config.keys.cluster_data()),
    )
    .await;
    match read {
        Ok(Ok(Some(kv))) => decode::<ClusterData>(&kv.value)
            .map_or(Duration::from_secs(5), |cd| cd.spec.proxy_timeout),
        _ => Duration::from_secs(5),
    }
}
