//! A worker: one thread pinned to a core, its own monoio runtime on io_uring (epoll when
//! io_uring cannot be used), its own `SO_REUSEPORT` listener, and the connections it accepted.
//! Nothing on the per-connection path is shared with other threads except the routing table
//! (one lock-free load per accept) and this worker's own counters.
//!
//! The fence: the control thread publishes a new table and writes one byte to each worker's
//! wake socket; the worker's fence task shuts down every registered connection whose backend
//! the new table no longer routes to, then records the table's epoch as applied.
//!
//! `admit`: a client with no route yet (no master, or the read-only listener).

use std::cell::RefCell;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use crate::forward::{BufferPool, Ended, Forwarder, UserspaceCopy};
use crate::kernel::{AdoptError, Candidacy, KernelPath};
use crate::metrics::{CloseReason, WorkerMetrics};
use crate::pgwire;
use crate::routing::{Backend, NoBackend, RoutingTable};
use crate::shared::Shared;
use crate::sys::shutdown_both;

mod admit;

use admit::{refuse_first, unrouted};

/// The I/O driver a worker runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Driver {
    /// io_uring with single issuer, deferred and cooperative task running.
    IoUring,
    /// io_uring without those flags (older kernels).
    IoUringPlain,
    /// epoll.
    Epoll,
}

impl Driver {
    /// For logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::IoUringPlain => "io_uring_plain",
            Driver::Epoll => "epoll",
        }
    }
}

type Uring = monoio::time::TimeDriver<monoio::IoUringDriver>;
type Legacy = monoio::time::TimeDriver<monoio::LegacyDriver>;
type Runtime = monoio::FusionRuntime<Uring, Legacy>;

/// Builds the best runtime available: io_uring with DEFER_TASKRUN, plain io_uring, epoll.
/// `force_epoll` skips io_uring (tests cover both drivers with it).
pub fn build_runtime(force_epoll: bool) -> std::io::Result<(Runtime, Driver)> {
    const ENTRIES: u32 = 1024;
    if !force_epoll && monoio::utils::detect_uring() {
        let mut tuned = io_uring::IoUring::builder();
        tuned
            .setup_coop_taskrun()
            .setup_single_issuer()
            .setup_defer_taskrun();
        let built = monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(ENTRIES)
            .uring_builder(tuned)
            .build();
        match built {
            Ok(rt) => return Ok((monoio::FusionRuntime::Uring(rt), Driver::IoUring)),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring with DEFER_TASKRUN unavailable, trying a plain ring")
            }
        }
        match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .with_entries(ENTRIES)
            .build()
        {
            Ok(rt) => return Ok((monoio::FusionRuntime::Uring(rt), Driver::IoUringPlain)),
            // ENOMEM here is RLIMIT_MEMLOCK: monoio's own fallback does not catch it.
            Err(e) => {
                tracing::warn!(error = %e, "cannot build an io_uring ring (memlock limit?), falling back to epoll")
            }
        }
    }
    let rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
        .enable_timer()
        .with_entries(ENTRIES)
        .build()?;
    Ok((monoio::FusionRuntime::Legacy(rt), Driver::Epoll))
}

/// A registered connection, for the fence.
#[derive(Debug)]
struct Entry {
    backend: Backend,
    client_fd: RawFd,
    backend_fd: RawFd,
    fenced: bool,
}

/// The connections of one worker that have a backend.
#[derive(Debug, Default)]
struct Registry {
    entries: Vec<Option<Entry>>,
    free: Vec<usize>,
}

impl Registry {
    fn insert(&mut self, entry: Entry) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(entry);
                i
            }
            None => {
                self.entries.push(Some(entry));
                self.entries.len() - 1
            }
        }
    }

    fn remove(&mut self, key: usize) -> Option<Entry> {
        let entry = self.entries.get_mut(key)?.take()?;
        self.free.push(key);
        Some(entry)
    }

    /// Shuts down every connection `table` fences; returns how many.
    fn fence(&mut self, table: &RoutingTable) -> usize {
        let mut cut = 0;
        for entry in self.entries.iter_mut().flatten() {
            if !entry.fenced && table.fences(&entry.backend) {
                shutdown_both(entry.backend_fd);
                shutdown_both(entry.client_fd);
                entry.fenced = true;
                cut += 1;
            }
        }
        cut
    }
}

/// What a worker task needs.
struct Ctx {
    id: usize,
    shared: Arc<Shared>,
    registry: RefCell<Registry>,
    forwarder: UserspaceCopy,
    kernel: Option<Arc<KernelPath>>,
}

impl Ctx {
    fn metrics(&self) -> &WorkerMetrics {
        &self.shared.workers[self.id]
    }

    /// Registers a connection linked to its backend, for the fence.
    fn link(&self, entry: Entry) -> usize {
        self.metrics().linked.fetch_add(1, Ordering::Relaxed);
        self.registry.borrow_mut().insert(entry)
    }

    /// Forgets a linked connection.
    fn unlink(&self, key: usize) -> Option<Entry> {
        let entry = self.registry.borrow_mut().remove(key);
        if entry.is_some() {
            self.metrics().linked.fetch_sub(1, Ordering::Relaxed);
        }
        entry
    }
}

/// The listen backlog of each worker's socket.
pub const BACKLOG: i32 = 4096;

/// When a worker starts accepting on its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accept {
    /// At once (the socket is this process's own).
    Now,
    /// Once the routing table is read: a proxy started beside a running one, whose socket
    /// is bound but not listening until then.
    OnceRouting,
    /// Once the process the socket was taken from stopped accepting on it
    /// ([`crate::handover`]), or is gone.
    OnceAlone,
}

/// Which listener a client came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// The listen address: to the master.
    Primary,
    /// The read-only listen address: to a standby eligible for reads.
    ReadOnly,
}

/// Runs worker `id` on the current thread until the proxy drains. `started` hears once: the
/// driver, as soon as the worker runs, or why it could not start. `accept`: when it starts
/// accepting on `listener` (and on `read_only`, the read-only listener's socket).
#[allow(
    clippy::too_many_arguments,
    reason = "the worker's whole start, passed once"
)]
pub fn run(
    id: usize,
    listener: std::net::TcpListener,
    read_only: Option<std::net::TcpListener>,
    accept: Accept,
    wake: std::os::unix::net::UnixStream,
    shared: Arc<Shared>,
    force_epoll: bool,
    kernel: Option<Arc<KernelPath>>,
    started: std::sync::mpsc::Sender<(usize, Result<Driver, String>)>,
) {
    let _stopped = Stopped(shared.clone());
    let (mut rt, driver) = match build_runtime(force_epoll) {
        Ok(built) => built,
        Err(e) => {
            let _ = started.send((id, Err(format!("cannot build a runtime: {e}"))));
            return;
        }
    };
    shared.set_driver(id, driver);
    if let Some(k) = &kernel {
        k.register_worker_thread();
    }
    let result: std::io::Result<()> = rt.block_on(async move {
        let wake = monoio::net::UnixStream::from_std(wake)?;
        tracing::info!(worker = id, driver = driver.label(), "worker started");
        let _ = started.send((id, Ok(driver)));
        if accept != Accept::Now {
            // The process beside this one, or the one the socket was taken from, takes
            // every client until then.
            let ready = || {
                shared.alone()
                    || (accept == Accept::OnceRouting
                        && !matches!(shared.table.load().backend, Err(NoBackend::Starting)))
            };
            while !ready() {
                if shared.draining() {
                    return Ok(());
                }
                monoio::time::sleep(Duration::from_millis(10)).await;
            }
            // Listening already after a takeover: this only sets the backlog again.
            socket2::SockRef::from(&listener).listen(BACKLOG)?;
            if let Some(ro) = &read_only {
                socket2::SockRef::from(ro).listen(BACKLOG)?;
            }
            tracing::info!(worker = id, "routing table read: accepting");
        }
        let listener = monoio::net::TcpListener::from_std(listener)?;
        let read_only = read_only
            .map(monoio::net::TcpListener::from_std)
            .transpose()?;
        let ctx = Rc::new(Ctx {
            id,
            shared: shared.clone(),
            registry: RefCell::new(Registry::default()),
            forwarder: UserspaceCopy::new(Rc::new(BufferPool::default())),
            kernel,
        });
        // Draining stops the accepts: the fence task cancels the one in flight (after a
        // takeover the socket stays open in the new process, so nothing else ends it).
        let accepting = monoio::io::Canceller::new();
        let stop = accepting.handle();
        monoio::spawn(fence_task(ctx.clone(), wake, accepting));
        let read_only = read_only.map(|ro| {
            monoio::spawn(accept_loop(
                ctx.clone(),
                ro,
                Listener::ReadOnly,
                stop.clone(),
            ))
        });
        accept_loop(ctx.clone(), listener, Listener::Primary, stop).await;
        if let Some(ro) = read_only {
            ro.await;
        }
        drain(&ctx).await;
        ctx.metrics().stopped();
        drop(ctx);
        // monoio closes a dropped socket with an io_uring op that the next park submits; a
        // runtime dropped before then leaks the descriptor. Park once more, so that the
        // listening sockets and the last clients' close now: a process that outlives its
        // drain (`--after-handover wait`) would hold them open.
        monoio::time::sleep(Duration::from_millis(1)).await;
        Ok(())
    });
    if let Err(e) = result {
        tracing::error!(worker = id, error = %e, "worker stopped");
    }
}

/// Accepts on `listener` until the drain cancels the accepts.
async fn accept_loop(
    ctx: Rc<Ctx>,
    listener: monoio::net::TcpListener,
    kind: Listener,
    stop: monoio::io::CancelHandle,
) {
    loop {
        match listener.cancelable_accept(stop.clone()).await {
            Ok((stream, peer)) => {
                // Counted before its task first runs: a drain that starts meanwhile
                // (a takeover's cancel can return one last client) waits for it.
                let metrics = ctx.metrics();
                metrics.accepted.fetch_add(1, Ordering::Relaxed);
                if kind == Listener::ReadOnly {
                    metrics.accepted_read_only.fetch_add(1, Ordering::Relaxed);
                }
                metrics.active.fetch_add(1, Ordering::Relaxed);
                monoio::spawn(connection(ctx.clone(), stream, peer, kind));
            }
            Err(e) => {
                if ctx.shared.draining() {
                    return;
                }
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(worker = ctx.id, error = %e, "accept failed");
                monoio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Tells the shared state when a worker thread returns, however it returns.
struct Stopped(Arc<Shared>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.worker_stopped();
    }
}

/// After the listener closed: wait for connections to end, then cut the rest.
async fn drain(ctx: &Ctx) {
    let deadline = std::time::Instant::now() + ctx.shared.settings.drain_timeout;
    while ctx.metrics().active.load(Ordering::Relaxed) > 0 && std::time::Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(50)).await;
    }
    let left = ctx.registry.borrow_mut().fence(&RoutingTable::starting());
    if left > 0 {
        tracing::warn!(
            worker = ctx.id,
            connections = left,
            "drain timeout: closing the remaining connections"
        );
        while ctx.metrics().active.load(Ordering::Relaxed) > 0 {
            monoio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

async fn fence_task(
    ctx: Rc<Ctx>,
    mut wake: monoio::net::UnixStream,
    accepting: monoio::io::Canceller,
) {
    let mut accepting = Some(accepting);
    let mut buf = vec![0u8; 64];
    loop {
        let (res, b) = wake.read(buf).await;
        buf = b;
        match res {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if ctx.shared.draining() {
            // An accept that completed before the cancel still returns its client, which
            // is served like the others.
            if let Some(c) = accepting.take() {
                drop(c.cancel());
            }
        }
        let table = ctx.shared.table.load_full();
        let cut = ctx.registry.borrow_mut().fence(&table);
        ctx.metrics()
            .applied_epoch
            .store(table.epoch, Ordering::Release);
        if cut > 0 {
            tracing::info!(worker = ctx.id, connections = cut, generation = %table.generation, "fenced connections");
        }
    }
}

/// How a connection task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The connection is closed, for this reason.
    Closed(CloseReason),
    /// The kernel path owns it now (and counts its close).
    HandedOff,
}

impl From<CloseReason> for Outcome {
    fn from(r: CloseReason) -> Outcome {
        Outcome::Closed(r)
    }
}

/// Decrements the active count and counts the close reason when a connection task ends.
struct Active<'a> {
    metrics: &'a WorkerMetrics,
    outcome: Outcome,
}

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.metrics.active.fetch_sub(1, Ordering::Relaxed);
        if let Outcome::Closed(reason) = self.outcome {
            self.metrics.closed(reason);
        }
    }
}

/// Serves one accepted client (already counted as accepted and active by the accept loop;
/// `Active` uncounts it when it ends).
async fn connection(ctx: Rc<Ctx>, client: TcpStream, peer: SocketAddr, listener: Listener) {
    let metrics = ctx.metrics();
    let mut active = Active {
        metrics,
        outcome: Outcome::Closed(CloseReason::Error),
    };
    let _ = client.set_nodelay(true);
    set_keepalive(&client);
    let total = ctx.shared.active_connections();
    if total > ctx.shared.settings.max_connections {
        active.outcome = CloseReason::Limit.into();
        let message = format!(
            "tendril: too many connections to the proxy (limit {})",
            ctx.shared.settings.max_connections
        );
        refuse_first(
            &ctx,
            client,
            peer,
            Vec::new(),
            pgwire::TOO_MANY_CONNECTIONS,
            &message,
        )
        .await;
        return;
    }
    if listener == Listener::ReadOnly {
        // Always through the first packet: a cancel request must reach whichever standby
        // runs the query, and the standby is chosen per connection.
        active.outcome = unrouted(&ctx, client, peer, listener).await;
        return;
    }
    let table = ctx.shared.table.load_full();
    active.outcome = match table.backend() {
        Some(backend) => {
            let backend = backend.clone();
            routed(&ctx, client, peer, backend, table.epoch, Vec::new(), 0).await
        }
        None => unrouted(&ctx, client, peer, listener).await,
    };
}

/// Connects to the backend and forwards, the connection registered for the fence: in the
/// kernel when the kernel path takes it, in userspace otherwise. `prefix` (what was read
/// from the client while holding it) goes to the backend first; `consumed` counts every byte
/// read from the client so far.
async fn routed(
    ctx: &Ctx,
    mut client: TcpStream,
    peer: SocketAddr,
    backend: Backend,
    epoch: u64,
    prefix: Vec<u8>,
    consumed: u64,
) -> Outcome {
    let settings = &ctx.shared.settings;
    let connect = monoio::time::timeout(
        settings.connect_timeout,
        TcpStream::connect_addr(backend.addr),
    )
    .await;
    let mut server = match connect {
        Ok(Ok(s)) => s,
        failed => {
            let message = match failed {
                Ok(Err(e)) => {
                    tracing::debug!(client = %peer, backend = %backend.addr, error = %e, "backend connect failed");
                    format!(
                        "tendril: cannot connect to the master at {}: {e}",
                        backend.addr
                    )
                }
                _ => format!(
                    "tendril: connecting to the master at {} timed out",
                    backend.addr
                ),
            };
            let code = pgwire::CONNECTION_FAILURE;
            refuse_first(ctx, client, peer, prefix, code, &message).await;
            return CloseReason::ConnectFailed.into();
        }
    };
    let _ = server.set_nodelay(true);
    set_keepalive(&server);
    let key = ctx.link(Entry {
        backend: backend.clone(),
        client_fd: client.as_raw_fd(),
        backend_fd: server.as_raw_fd(),
        fenced: false,
    });
    // A fence published between our table load and the registration above did not see this
    // connection: look again now that it is registered.
    let now = ctx.shared.table.load();
    if now.epoch != epoch && now.fences(&backend) {
        ctx.unlink(key);
        return CloseReason::Fenced.into();
    }
    drop(now);
    tracing::debug!(client = %peer, backend = %backend.addr, db = %backend.db_uid, "connected");
    if !prefix.is_empty() {
        let (res, _) = server.write_all(prefix).await;
        if res.is_err() {
            ctx.unlink(key);
            return CloseReason::Backend.into();
        }
    }
    let mut consumed = consumed;
    if let Some(kernel) = &ctx.kernel {
        let mut candidacy = match kernel.candidate(client.as_raw_fd()) {
            Some(c) => Candidacy::Ready(c),
            None => Candidacy::Elsewhere,
        };
        if let Candidacy::Ready(c) = candidacy
            && consumed == 0
        {
            match first_bytes(&mut client, &mut server, settings.startup_timeout).await {
                FirstBytes::Forwarded(n) => consumed = n,
                FirstBytes::Silent => {
                    kernel.release(&c);
                    candidacy = Candidacy::Silent;
                }
                FirstBytes::Gone(reason) => {
                    kernel.release(&c);
                    let entry = ctx.unlink(key);
                    if entry.is_some_and(|e| e.fenced) {
                        return CloseReason::Fenced.into();
                    }
                    return reason.into();
                }
            }
        }
        match kernel.adopt(
            client.as_raw_fd(),
            server.as_raw_fd(),
            consumed,
            peer,
            &backend,
            candidacy,
        ) {
            Ok(()) => {
                // The kernel path holds its own descriptors; ours close when dropped here.
                ctx.unlink(key);
                return Outcome::HandedOff;
            }
            Err(AdoptError::Stopped) => {
                ctx.unlink(key);
                return CloseReason::Error.into();
            }
            Err(e) => {
                tracing::debug!(client = %peer, backend = %backend.addr, error = %e, "kept in userspace");
            }
        }
    }
    let ended = ctx.forwarder.forward(client, server, ctx.metrics()).await;
    let entry = ctx.unlink(key);
    if entry.is_some_and(|e| e.fenced) {
        return CloseReason::Fenced.into();
    }
    match ended {
        Ended::Client => CloseReason::Client,
        Ended::Backend => CloseReason::Backend,
        Ended::Error => CloseReason::Error,
    }
    .into()
}

/// What came of waiting for the first bytes of a client on this host.
enum FirstBytes {
    /// This many bytes were read from the client and written to the server.
    Forwarded(u64),
    /// Nothing arrived within the wait.
    Silent,
    /// A side closed or failed.
    Gone(CloseReason),
}

/// Forwards what a client on this host sends first (the startup packet, an SSLRequest): the
/// client-socket program sees those bytes before the route exists, which is where it learns
/// whether the client reads in blocking mode (such a client must stay off that path). A
/// PostgreSQL client always speaks first, so this waits for nothing the client would not
/// send anyway; one that says nothing within `wait` is forwarded on the proxy's sockets.
async fn first_bytes(client: &mut TcpStream, server: &mut TcpStream, wait: Duration) -> FirstBytes {
    // Readiness first, then the read: a read cancelled by the timeout could lose bytes.
    match monoio::time::timeout(wait, client.readable(false)).await {
        Err(_) => return FirstBytes::Silent,
        Ok(Err(_)) => return FirstBytes::Gone(CloseReason::Client),
        Ok(Ok(())) => {}
    }
    let (res, buf) = client.read(Vec::with_capacity(1024)).await;
    let n = match res {
        Ok(0) | Err(_) => return FirstBytes::Gone(CloseReason::Client),
        Ok(n) => n,
    };
    let (res, _) = server.write_all(buf).await;
    if res.is_err() {
        return FirstBytes::Gone(CloseReason::Backend);
    }
    FirstBytes::Forwarded(n as u64)
}

fn set_keepalive(s: &TcpStream) {
    // Dead peers (a crashed host, a cut network) are noticed within a minute or so.
    let _ = s.set_tcp_keepalive(
        Some(Duration::from_secs(30)),
        Some(Duration::from_secs(10)),
        Some(3),
    );
}
