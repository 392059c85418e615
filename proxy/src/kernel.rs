//! The kernel path: connections whose established traffic the kernel forwards, with the BPF
//! sockmap program of `tendril_ebpf::sockmap`. Workers set a connection up in userspace as
//! usual (startup packet, SSLRequest answer, 57P03, hold), then [`KernelPath::adopt`] joins
//! the pair to the sockhash and hands both sockets to this module's thread, which:
//!
//! - closes pairs in order: on a FIN from one side it waits until every byte that arrived
//!   before the FIN has left the kernel's queue for the peer socket, then half-closes the
//!   peer, so a client's Terminate is never overtaken by the FIN;
//! - forwards a direction itself while the program has paused it for backpressure (the
//!   program passes the bytes up; the thread writes them to the peer under ordinary TCP flow
//!   control, behind what the kernel already queued);
//! - fences: drops the pair from the map and shuts both sockets at once;
//! - closes both sides on an error, a reset or a failed redirect;
//! - counts each pair's bytes and close reason into its own block of the metrics.
//!
//! No data comes through this thread except for paused directions, so one thread serves
//! every core. It sleeps in epoll on the peers' hang-ups (EPOLLRDHUP; data wake-ups are not
//! asked for), the workers' hand-over eventfd, the control thread's fence socket and the
//! program's event ring.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tendril_ebpf::local::{self, ClientKey, Local, ReplyMode, RouteError, RouteRequest};
use tendril_ebpf::sockmap::{EventKind, Events, JoinError, JoinRequest, Joined, Mode, Sockmap};

use crate::metrics::{CloseReason, WorkerMetrics};
use crate::routing::Backend;
use crate::shared::Shared;
use crate::sys::{RESET_FLUSH, dup, tcp_bytes, tcp_written};

const TOKEN_COMMANDS: u64 = u64::MAX;
const TOKEN_FENCE: u64 = u64::MAX - 1;
const TOKEN_EVENTS: u64 = u64::MAX - 2;
const TOKEN_LOCAL_EVENTS: u64 = u64::MAX - 3;
/// Buffer of a direction the thread forwards itself (paused for backpressure).
const USER_BUFFER: usize = 64 * 1024;
/// First and last delay of a pair's timed retries (waiting for a queue to drain).
const FIRST_RETRY: Duration = Duration::from_millis(1);
const LAST_RETRY: Duration = Duration::from_millis(64);
/// How often the thread looks at draining and lost events when nothing else wakes it.
const HOUSEKEEPING: Duration = Duration::from_millis(100);
/// A client-socket connection whose server side ended, whose client has read everything it
/// holds and where nothing moved for this long is cut (a defence: every end should reach the
/// client well before, see `step_replies`).
const STALL_LIMIT: Duration = Duration::from_secs(2);

/// Why a connection stayed in userspace.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The sockmap is full.
    #[error("the sockmap is full")]
    MapFull,
    /// The kernel refused the pair, or a descriptor could not be duplicated.
    #[error("{0}")]
    Refused(io::Error),
    /// The kernel-path thread has stopped; the pair was joined and is now closed.
    #[error("the kernel path has stopped")]
    Stopped,
}

/// How the kernel forwards a connection.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Both proxy sockets joined `peers`: the verdict redirects between them.
    Pair(Joined),
    /// Routed on the client's own socket (a client in the proxy's namespace).
    Local(LocalRoute),
}

/// A connection routed on the client's socket.
#[derive(Debug, Clone, Copy)]
struct LocalRoute {
    key: ClientKey,
    /// The server socket's cookie.
    server: u64,
    /// The client socket's cookie.
    client: u64,
    /// The server socket's connection as a backend on this host sees it.
    backend: ClientKey,
    /// What the proxy had read from the client and written to the server before the route.
    from_client: u64,
    to_server: u64,
}

/// A client on this host whose socket joined the client sockhash at connect: the
/// client-socket path can take it once its first bytes arrived ([`KernelPath::local_client`]).
#[derive(Debug, Clone, Copy)]
pub struct LocalClient {
    key: ClientKey,
    /// The client socket's cookie.
    cookie: u64,
}

/// A joined pair on its way to the thread.
struct Handoff {
    fds: [OwnedFd; 2],
    kind: Kind,
    base_recv: [u64; 2],
    backend: Backend,
    peer: SocketAddr,
}

/// The workers' handle on the kernel path.
#[derive(Debug)]
pub struct KernelPath {
    map: Arc<Sockmap>,
    local: Option<Arc<Local>>,
    limit: u64,
    tx: mpsc::Sender<Handoff>,
    wake: OwnedFd,
    shared: Arc<Shared>,
    index: usize,
}

impl KernelPath {
    /// Starts the thread. `index` is its counter block in `shared.workers`; `fence` the
    /// socket the control thread writes to after publishing a table.
    pub fn start(
        map: Sockmap,
        local: Option<Local>,
        limit: u64,
        shared: Arc<Shared>,
        index: usize,
        fence: std::os::unix::net::UnixStream,
    ) -> io::Result<(Arc<KernelPath>, std::thread::JoinHandle<()>)> {
        let map = Arc::new(map);
        let events = map.events()?;
        let local = local.map(Arc::new);
        let local_events = local.as_ref().map(|l| l.events()).transpose()?;
        // SAFETY: eventfd returns a new descriptor or -1.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `wake` is a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
        fence.set_nonblocking(true)?;
        let (tx, rx) = mpsc::channel();
        let thread_wake = dup(wake.as_raw_fd())?;
        let thread = Thread {
            map: map.clone(),
            local: local.clone(),
            events,
            local_events,
            epfd,
            commands: rx,
            wake: thread_wake,
            fence,
            shared: shared.clone(),
            index,
            pairs: Vec::new(),
            free: Vec::new(),
            by_cookie: HashMap::new(),
            lost_seen: 0,
            last_housekeeping: Instant::now(),
            drain_deadline: None,
            disconnected: false,
            next_generation: 0,
        };
        thread.watch(
            thread.wake.as_raw_fd(),
            TOKEN_COMMANDS,
            libc::EPOLLIN as u32,
        )?;
        thread.watch(thread.fence.as_raw_fd(), TOKEN_FENCE, libc::EPOLLIN as u32)?;
        thread.watch(thread.events.fd(), TOKEN_EVENTS, libc::EPOLLIN as u32)?;
        if let Some(events) = &thread.local_events {
            thread.watch(events.fd(), TOKEN_LOCAL_EVENTS, libc::EPOLLIN as u32)?;
        }
        let handle = std::thread::Builder::new()
            .name("tendril-kernel".into())
            .spawn(move || thread.run())?;
        Ok((
            Arc::new(KernelPath {
                map,
                local,
                limit,
                tx,
                wake,
                shared,
                index,
            }),
            handle,
        ))
    }

    /// The program and its maps (stats, tests).
    pub fn map(&self) -> &Arc<Sockmap> {
        &self.map
    }

    /// The client-socket programs, when they loaded.
    pub fn local(&self) -> Option<&Arc<Local>> {
        self.local.as_ref()
    }

    /// The client connected to the accepted socket `client`, when it is in this network
    /// namespace and its socket joined the client sockhash at connect. The caller routes it
    /// ([`KernelPath::adopt`]) only after the client's first bytes went through the program
    /// (before the route), which is where the program learns how the client reads; or it
    /// gives the client back with [`KernelPath::release_local`].
    pub fn local_client(&self, client: RawFd) -> Option<LocalClient> {
        let local = self.local.as_ref()?;
        let key = ClientKey::of_accepted(client).ok()?;
        let cookie = local.client_cookie(&key)?;
        Some(LocalClient { key, cookie })
    }

    /// Called by each worker thread at start: a backend on this host then recognises the
    /// worker's connections (see `tendril_ebpf::local`'s direct replies).
    pub fn register_worker_thread(&self) {
        if let Some(local) = &self.local
            && let Err(e) = local.add_connecting_thread()
        {
            tracing::warn!(error = %e, "cannot register the worker thread: replies from a backend on this host take the proxy's server socket");
        }
    }

    /// Takes a local client the client-socket path will not forward out of the client
    /// sockhash: its socket is an ordinary TCP socket again.
    pub fn release_local(&self, client: &LocalClient) {
        if let Some(local) = &self.local {
            local.release_client(&client.key);
        }
    }

    /// Routes the connection on the client's own socket unless the program saw the client
    /// send in blocking mode. `None`: the pair path takes it (and the client is released).
    /// `backend`: the server socket's [`ClientKey::of_connected`].
    fn route_local(
        &self,
        client: RawFd,
        server: RawFd,
        consumed_from_client: u64,
        peer: SocketAddr,
        local_client: LocalClient,
        backend: ClientKey,
    ) -> Option<LocalRoute> {
        let local = self.local.as_ref()?;
        let LocalClient {
            key,
            cookie: client_cookie,
        } = local_client;
        if local.client_blocks(&key) {
            // A blocking reader could get EAGAIN from the kernel on this path (see
            // Local::client_blocks): the pair path takes it, on an ordinary socket.
            local.release_client(&key);
            self.shared
                .kernel_local_blocking
                .fetch_add(1, Ordering::Relaxed);
            tracing::debug!(client = %peer, "client reads in blocking mode: forwarding on the proxy's sockets");
            return None;
        }
        let routed = tcp_written(server)
            .map_err(RouteError::Refused)
            .and_then(|to_server| {
                let request = RouteRequest {
                    key,
                    client: client_cookie,
                    backend,
                    accepted: client,
                    server,
                    from_client: consumed_from_client,
                    to_server,
                };
                local.route(&request).map(|cookie| (cookie, to_server))
            });
        let (server_cookie, to_server) = match routed {
            Ok(r) => r,
            Err(e) => {
                // Nothing was routed (the client's sends still take the ordinary path): the
                // pair path takes the connection instead.
                tracing::debug!(client = %peer, error = %e, "client-socket route refused: forwarding on the proxy's sockets");
                self.shared
                    .kernel_local_refused
                    .fetch_add(1, Ordering::Relaxed);
                local.release_client(&key);
                return None;
            }
        };
        // The bounds of local.bpf.c, kept by the kernel's own accounting too: the server
        // socket's send buffer stays above what the client may redirect into it (a redirect
        // into a full socket fails and the client would retry at once), and the accepted
        // socket, which only carries what the program passes, holds at most the limit.
        // Set only once routed: the pair path keeps autotuning.
        let _ = crate::sys::set_send_buffer(server, self.limit.saturating_mul(2));
        let _ = crate::sys::set_receive_buffer(client, self.limit);
        Some(LocalRoute {
            key,
            server: server_cookie,
            client: client_cookie,
            backend,
            from_client: consumed_from_client,
            to_server,
        })
    }

    /// Joins a connected pair to the sockmap and hands it to the thread; from here on the
    /// kernel forwards it and the caller must forget both sockets (drop its handles without
    /// touching them). `consumed_from_client` is what the caller read from the client and
    /// already dealt with (the startup packet it wrote to the backend on a held connection).
    /// On `MapFull` and `Refused` nothing changed: the caller forwards in userspace.
    /// `local`: the client, when the client-socket path may take it (see
    /// [`KernelPath::local_client`]).
    pub fn adopt(
        &self,
        client: RawFd,
        server: RawFd,
        consumed_from_client: u64,
        peer: SocketAddr,
        backend: &Backend,
        local: Option<LocalClient>,
    ) -> Result<(), AdoptError> {
        // Everything that can fail without consequence comes before the join: once joined,
        // the kernel may already be forwarding.
        let fds = match dup(client).and_then(|c| Ok([c, dup(server)?])) {
            Ok(fds) => fds,
            Err(e) => {
                if let Some(c) = &local {
                    self.release_local(c);
                }
                return Err(AdoptError::Refused(e));
            }
        };
        // How a backend on this host keys the connection (only with the client-socket
        // programs loaded): for the route, or to release its socket below.
        let backend_key = match self.local.as_ref().map(|_| ClientKey::of_connected(server)) {
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => {
                tracing::debug!(client = %peer, error = %e, "server socket without addresses: forwarding on the proxy's sockets");
                None
            }
            None => None,
        };
        let local = match (local, backend_key) {
            (Some(c), Some(b)) => {
                self.route_local(client, server, consumed_from_client, peer, c, b)
            }
            (Some(c), None) => {
                self.release_local(&c);
                None
            }
            (None, _) => None,
        };
        if local.is_none()
            && let (Some(l), Some(b)) = (&self.local, &backend_key)
        {
            // A backend on this host whose connection takes the pair path (or userspace):
            // its sends need no program.
            l.release_backend(b);
        }
        let kind = match local {
            Some(route) => Kind::Local(route),
            None => {
                let written_to_client = tcp_written(client).map_err(AdoptError::Refused)?;
                let written_to_server = tcp_written(server).map_err(AdoptError::Refused)?;
                let joined = self
                    .map
                    .join(&JoinRequest {
                        client,
                        server,
                        written_to_client,
                        written_to_server,
                        limit: self.limit,
                    })
                    .map_err(|e| match e {
                        JoinError::MapFull => AdoptError::MapFull,
                        JoinError::Refused(e) => AdoptError::Refused(e),
                    })?;
                Kind::Pair(joined)
            }
        };
        let metrics = &self.shared.workers[self.index];
        metrics.active.fetch_add(1, Ordering::Relaxed);
        metrics.linked.fetch_add(1, Ordering::Relaxed);
        if matches!(kind, Kind::Local(_)) {
            metrics.kernel_local.fetch_add(1, Ordering::Relaxed);
        }
        let handoff = Handoff {
            fds,
            kind,
            base_recv: [consumed_from_client, 0],
            backend: backend.clone(),
            peer,
        };
        if let Err(mpsc::SendError(h)) = self.tx.send(handoff) {
            match h.kind {
                Kind::Pair(joined) => self.map.forget(&joined),
                Kind::Local(r) => {
                    if let Some(local) = &self.local {
                        local.forget(&r.key, &r.backend, r.server);
                    }
                }
            }
            for fd in &h.fds {
                crate::sys::shutdown_both(fd.as_raw_fd());
            }
            metrics.active.fetch_sub(1, Ordering::Relaxed);
            metrics.linked.fetch_sub(1, Ordering::Relaxed);
            return Err(AdoptError::Stopped);
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from `one` to the eventfd.
        unsafe {
            libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
        Ok(())
    }
}

/// One direction of a pair, named by the socket it reads from.
#[derive(Debug, Default)]
struct Dir {
    /// The source sent its FIN.
    eof: bool,
    /// The peer was half-closed after the last byte.
    shut: bool,
    /// The thread is reading the source (paused direction, or passed bytes to collect).
    reading: bool,
    /// Waiting for the peer to be writable.
    want_out: bool,
    /// The source was reset: once its last bytes are out, the pair is cut.
    reset: bool,
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// Bytes of passed-up data written to the peer.
    forwarded: u64,
    /// The source's receive buffer was fixed at the limit (on the first pause).
    clamped: bool,
    /// A read returned end of file (client-socket connections: every byte before the FIN
    /// was read).
    fin_read: bool,
}

impl Dir {
    /// Writes what is buffered (from `start`) to `target`: `Some(n)` bytes went out (counted
    /// in `forwarded`), `None` when the socket is full (`want_out` set, wait for EPOLLOUT).
    fn write_buffered(&mut self, target: RawFd) -> Result<Option<usize>, CloseReason> {
        let buf = self.buf.as_deref().unwrap_or(&[]);
        match send(target, &buf[self.start..self.end]) {
            Ok(n) => {
                self.start += n;
                self.forwarded += n as u64;
                Ok(Some(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.want_out = true;
                Ok(None)
            }
            Err(_) => Err(CloseReason::Error),
        }
    }

    /// Reads from `source` into the direction's buffer (allocated on first use): `Ok(n)`
    /// bytes now wait from `start`, `Ok(0)` is the source's end of file.
    fn fill(&mut self, source: RawFd) -> io::Result<usize> {
        let buf = self
            .buf
            .get_or_insert_with(|| vec![0u8; USER_BUFFER].into_boxed_slice());
        let n = recv(source, buf)?;
        if n > 0 {
            self.start = 0;
            self.end = n;
        }
        Ok(n)
    }

    /// Everything before the source's FIN is out: half-close `target` (unless the source
    /// was reset; the pair is cut then) and stop reading.
    fn half_close(&mut self, target: RawFd) -> Result<bool, CloseReason> {
        if !self.reset {
            // SAFETY: shutdown takes an integer; `target` is a socket of this pair.
            unsafe {
                libc::shutdown(target, libc::SHUT_WR);
            }
        }
        self.shut = true;
        self.reading = false;
        self.buf = None;
        Ok(false)
    }
}

#[derive(Debug)]
struct Pair {
    fds: [OwnedFd; 2],
    kind: Kind,
    base_recv: [u64; 2],
    dirs: [Dir; 2],
    backend: Backend,
    peer: SocketAddr,
    interest: [u32; 2],
    first_eof: Option<usize>,
    retry: Option<Instant>,
    delay: Duration,
    generation: u32,
    /// Since when, and in which state, the end of a client-socket connection's server side
    /// has waited with nothing moving (see [`STALL_LIMIT`]).
    stall: Option<(Instant, StallState)>,
    /// When the backend's reset was seen: the client gets a reset too, once it acknowledged
    /// every byte before it, for up to [`RESET_FLUSH`] (see [`Thread::abort`]).
    backend_reset: Option<Instant>,
}

/// What moves while a client-socket connection's end waits: the proxy's copies both ways and
/// the reply direction's state.
type StallState = (u64, u64, Option<local::Reply>);

impl Pair {
    /// The cookies the program's events name this connection by.
    fn cookies(&self) -> Vec<u64> {
        match self.kind {
            Kind::Pair(j) => vec![j.client, j.server],
            Kind::Local(r) => vec![r.server],
        }
    }
}

/// The cookie of the socket a pair-path direction reads from.
fn cookie(joined: &Joined, side: usize) -> u64 {
    if side == 0 {
        joined.client
    } else {
        joined.server
    }
}

struct Thread {
    map: Arc<Sockmap>,
    local: Option<Arc<Local>>,
    events: Events,
    local_events: Option<local::Events>,
    epfd: OwnedFd,
    commands: mpsc::Receiver<Handoff>,
    wake: OwnedFd,
    fence: std::os::unix::net::UnixStream,
    shared: Arc<Shared>,
    index: usize,
    pairs: Vec<Option<Pair>>,
    free: Vec<usize>,
    by_cookie: HashMap<u64, usize>,
    lost_seen: u64,
    last_housekeeping: Instant,
    drain_deadline: Option<Instant>,
    disconnected: bool,
    next_generation: u32,
}

impl Thread {
    fn metrics(&self) -> &WorkerMetrics {
        &self.shared.workers[self.index]
    }

    fn watch(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: epoll_ctl reads the event struct, which lives on this frame.
        let rc = unsafe { libc::epoll_ctl(self.epfd.as_raw_fd(), op, fd, &mut ev) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn run(mut self) {
        tracing::info!(
            limit_pairs = self.map.max_pairs(),
            "kernel forwarding thread started"
        );
        let mut ready = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
        loop {
            let timeout = self.timeout();
            // SAFETY: epoll_wait writes at most `ready.len()` events into the buffer.
            let n = unsafe {
                libc::epoll_wait(
                    self.epfd.as_raw_fd(),
                    ready.as_mut_ptr(),
                    ready.len() as i32,
                    timeout,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    tracing::error!(error = %e, "kernel path: epoll_wait failed");
                    std::thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            for ev in &ready[..n as usize] {
                let (token, bits) = (ev.u64, ev.events);
                match token {
                    TOKEN_COMMANDS => self.take_handoffs(),
                    TOKEN_FENCE => self.fence(),
                    TOKEN_EVENTS => self.take_events(),
                    TOKEN_LOCAL_EVENTS => self.take_local_events(),
                    t => self.socket_ready(
                        (t >> 32) as u32,
                        ((t & 0xffff_ffff) >> 1) as usize,
                        (t & 1) as usize,
                        bits,
                    ),
                }
            }
            self.retry_due();
            if self.housekeeping() {
                break;
            }
        }
        tracing::info!("kernel forwarding thread stopped");
    }

    /// Milliseconds until the next timed retry, or the housekeeping period.
    fn timeout(&self) -> i32 {
        let now = Instant::now();
        let next = self
            .pairs
            .iter()
            .flatten()
            .filter_map(|p| p.retry)
            .min()
            .map_or(HOUSEKEEPING, |t| t.saturating_duration_since(now));
        next.min(HOUSEKEEPING)
            .as_millis()
            .max(u128::from(next > Duration::ZERO)) as i32
    }

    fn take_handoffs(&mut self) {
        let mut count = [0u8; 8];
        // SAFETY: reads the eventfd counter (8 bytes) into `count`.
        unsafe {
            libc::read(self.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8);
        }
        loop {
            match self.commands.try_recv() {
                Ok(h) => self.adopt(h),
                Err(mpsc::TryRecvError::Empty) => return,
                Err(mpsc::TryRecvError::Disconnected) => {
                    self.disconnected = true;
                    return;
                }
            }
        }
    }

    fn adopt(&mut self, h: Handoff) {
        let table = self.shared.table.load();
        let fenced = table.fences(&h.backend);
        drop(table);
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.pairs.push(None);
                self.pairs.len() - 1
            }
        };
        let interest = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        let pair = Pair {
            fds: h.fds,
            kind: h.kind,
            base_recv: h.base_recv,
            dirs: [Dir::default(), Dir::default()],
            backend: h.backend,
            peer: h.peer,
            interest: [interest; 2],
            first_eof: None,
            retry: None,
            delay: FIRST_RETRY,
            generation: self.next_generation,
            stall: None,
            backend_reset: None,
        };
        let pair_gen = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let fds = [pair.fds[0].as_raw_fd(), pair.fds[1].as_raw_fd()];
        for c in pair.cookies() {
            self.by_cookie.insert(c, slot);
        }
        tracing::debug!(client = %pair.peer, backend = %pair.backend.addr, client_socket = matches!(pair.kind, Kind::Local(_)), "connection forwarded in the kernel");
        self.pairs[slot] = Some(pair);
        if fenced {
            // A fence was published between the worker's table load and now.
            self.abort(slot, CloseReason::Fenced);
            return;
        }
        for (side, fd) in fds.into_iter().enumerate() {
            if self
                .watch(fd, token(pair_gen, slot, side), interest)
                .is_err()
            {
                self.abort(slot, CloseReason::Error);
                return;
            }
        }
        // Bytes passed up while the pair joined are collected now.
        self.progress(slot);
    }

    fn fence(&mut self) {
        let mut buf = [0u8; 64];
        loop {
            match io::Read::read(&mut self.fence, &mut buf) {
                Ok(0) => {
                    let _ = self.ctl(libc::EPOLL_CTL_DEL, self.fence.as_raw_fd(), 0, 0);
                    break;
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
        let table = self.shared.table.load_full();
        let doomed: Vec<usize> = self
            .pairs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().filter(|p| table.fences(&p.backend)).map(|_| i))
            .collect();
        for &slot in &doomed {
            self.abort(slot, CloseReason::Fenced);
        }
        self.metrics()
            .applied_epoch
            .store(table.epoch, Ordering::Release);
        if !doomed.is_empty() {
            tracing::info!(connections = doomed.len(), generation = %table.generation, "fenced kernel-forwarded connections");
        }
    }

    fn take_events(&mut self) {
        for event in self.events.drain() {
            let Some(&slot) = self.by_cookie.get(&event.cookie) else {
                // Not handed over yet: the adopt reads the direction's state itself.
                continue;
            };
            match event.kind {
                EventKind::Paused => self.progress(slot),
                EventKind::Failed => {
                    tracing::warn!(
                        cookie = event.cookie,
                        "kernel redirect failed: closing the connection"
                    );
                    self.abort(slot, CloseReason::Error);
                }
            }
        }
    }

    fn take_local_events(&mut self) {
        let Some(events) = self.local_events.as_mut() else {
            return;
        };
        for event in events.drain() {
            let Some(&slot) = self.by_cookie.get(&event.server) else {
                continue;
            };
            match event.kind {
                local::EventKind::Drained
                | local::EventKind::Delivered
                | local::EventKind::Paused => self.progress(slot),
                local::EventKind::Failed => {
                    tracing::debug!(
                        cookie = event.server,
                        "reply could not reach the client socket: closing the connection"
                    );
                    self.abort(slot, CloseReason::Error);
                }
            }
        }
    }

    fn socket_ready(&mut self, generation: u32, slot: usize, side: usize, bits: u32) {
        if self
            .pairs
            .get(slot)
            .and_then(Option::as_ref)
            .map(|p| p.generation)
            != Some(generation)
        {
            return;
        }
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if bits & libc::EPOLLERR as u32 != 0 && !pair.dirs[side].reset {
            // A reset (or a failed send) on this side: what it sent before still goes out to
            // the peer, as a userspace copy would have done, then the pair is cut.
            let e = tendril_ebpf::sockopt::pending_error(pair.fds[side].as_raw_fd());
            tracing::debug!(client = %pair.peer, backend = %pair.backend.addr, side = if side == 0 { "client" } else { "backend" }, error = %e, "socket error");
            pair.dirs[side].reset = true;
            pair.dirs[side].eof = true;
            pair.first_eof.get_or_insert(side);
            if side == 1 {
                pair.backend_reset = Some(Instant::now());
            }
        }
        if bits & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
            pair.dirs[side].eof = true;
            pair.first_eof.get_or_insert(side);
        }
        pair.delay = FIRST_RETRY;
        self.progress(slot);
    }

    fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .pairs
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                p.as_ref()
                    .and_then(|p| p.retry)
                    .filter(|t| *t <= now)
                    .map(|_| i)
            })
            .collect();
        for slot in due {
            self.progress(slot);
        }
    }

    /// Draining, lost events. Returns true when the thread should stop.
    fn housekeeping(&mut self) -> bool {
        if self.last_housekeeping.elapsed() < HOUSEKEEPING {
            return false;
        }
        self.last_housekeeping = Instant::now();
        let lost =
            self.map.stats().lost_events + self.local.as_ref().map_or(0, |l| l.stats().lost_events);
        if lost != self.lost_seen {
            // The event ring overflowed: look at every pair.
            self.lost_seen = lost;
            let all: Vec<usize> = (0..self.pairs.len())
                .filter(|&i| self.pairs[i].is_some())
                .collect();
            for slot in all {
                self.progress(slot);
            }
        }
        self.cut_stalled();
        if !self.disconnected {
            // Workers gone (all their handles dropped) means the proxy is stopping.
            if let Err(mpsc::TryRecvError::Disconnected) =
                self.commands.try_recv().map(|h| self.adopt(h))
            {
                self.disconnected = true;
            }
        }
        if self.shared.draining() {
            let deadline = *self
                .drain_deadline
                .get_or_insert_with(|| Instant::now() + self.shared.settings.drain_timeout);
            if Instant::now() >= deadline {
                let left: Vec<usize> = (0..self.pairs.len())
                    .filter(|&i| self.pairs[i].is_some())
                    .collect();
                if !left.is_empty() {
                    tracing::warn!(
                        connections = left.len(),
                        "drain timeout: closing the remaining kernel-forwarded connections"
                    );
                }
                for slot in left {
                    self.abort(slot, CloseReason::Fenced);
                }
            }
        }
        // Stop once no worker can hand anything over and every pair is closed.
        let idle = self.pairs.iter().all(Option::is_none);
        idle && (self.disconnected || (self.shared.draining() && self.shared.all_workers_stopped()))
    }

    /// Cuts client-socket connections whose server side ended but whose end has not reached
    /// the client after [`STALL_LIMIT`] with nothing moving while the client holds nothing
    /// unread (it waits for the proxy, not the other way round). Should never happen: each
    /// one is logged and counted.
    fn cut_stalled(&mut self) {
        let Some(local) = self.local.clone() else {
            return;
        };
        let now = Instant::now();
        let mut stalled = Vec::new();
        for (slot, pair) in self.pairs.iter_mut().enumerate() {
            let Some(pair) = pair else { continue };
            let Kind::Local(route) = pair.kind else {
                continue;
            };
            let waiting_end = pair.dirs[1].eof && !pair.dirs[1].shut;
            if !waiting_end
                || local
                    .probe(route.server)
                    .ok()
                    .flatten()
                    .is_some_and(|p| p.held)
            {
                pair.stall = None;
                continue;
            }
            let state = (
                pair.dirs[0].forwarded,
                pair.dirs[1].forwarded,
                local.reply(route.server),
            );
            match &pair.stall {
                Some((since, was)) if *was == state => {
                    if now.duration_since(*since) >= STALL_LIMIT {
                        stalled.push((slot, state.2));
                    }
                }
                _ => pair.stall = Some((now, state)),
            }
        }
        for (slot, reply) in stalled {
            local.count_stalled();
            if let Some(pair) = self.pairs.get(slot).and_then(Option::as_ref) {
                tracing::warn!(
                    client = %pair.peer,
                    backend = %pair.backend.addr,
                    server_reset = pair.dirs[1].reset,
                    reply = ?reply,
                    stalled_total = local.stats().stalled,
                    "the server side ended but its end never reached the client: cutting the connection"
                );
            }
            self.abort(slot, CloseReason::Error);
        }
    }

    /// Moves a pair forward after anything happened to it.
    fn progress(&mut self, slot: usize) {
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let pair_gen = pair.generation;
        match advance(&self.map, self.local.as_deref(), pair) {
            Advance::Close(reason) => self.close(slot, reason),
            Advance::Abort(reason) => self.abort(slot, reason),
            Advance::Watch(changes) => {
                for (fd, side, events) in changes {
                    if self
                        .ctl(libc::EPOLL_CTL_MOD, fd, token(pair_gen, slot, side), events)
                        .is_err()
                    {
                        self.abort(slot, CloseReason::Error);
                        return;
                    }
                }
            }
        }
    }

    /// Cuts a pair at once: out of the map, both sockets shut down and closed. After the
    /// backend's reset, the client gets a reset too (as straight from PostgreSQL) when it has
    /// acknowledged every byte sent to it; a FIN otherwise, which drops nothing.
    fn abort(&mut self, slot: usize, reason: CloseReason) {
        if let Some(pair) = self.pairs.get(slot).and_then(Option::as_ref) {
            match pair.kind {
                Kind::Pair(joined) => self.map.leave(&joined),
                Kind::Local(r) => {
                    if let Some(local) = &self.local {
                        local.leave(&r.key, &r.backend, r.server);
                    }
                }
            }
            let client = pair.fds[0].as_raw_fd();
            let pass_reset = pair.dirs[1].reset
                && !pair.dirs[0].reset
                && crate::sys::unacknowledged(client).is_ok_and(|n| n == 0)
                && crate::sys::reset_connection(client).is_ok();
            if !pass_reset {
                crate::sys::shutdown_both(client);
            }
            crate::sys::shutdown_both(pair.fds[1].as_raw_fd());
        }
        self.close(slot, reason);
    }

    fn close(&mut self, slot: usize, reason: CloseReason) {
        let Some(pair) = self.pairs.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        for fd in &pair.fds {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0);
        }
        for c in pair.cookies() {
            self.by_cookie.remove(&c);
        }
        let (up, down, pauses) = match pair.kind {
            Kind::Pair(joined) => {
                let moved = |side: usize| {
                    self.map
                        .direction(cookie(&joined, side))
                        .map_or(0, |d| d.redirected)
                        + pair.dirs[side].forwarded
                };
                let pauses: u32 = (0..2)
                    .filter_map(|s| self.map.direction(cookie(&joined, s)))
                    .map(|d| d.pauses)
                    .sum();
                let moved = (moved(0), moved(1));
                self.map.forget(&joined);
                (moved.0, moved.1, pauses)
            }
            Kind::Local(r) => {
                // To the backend: everything written to the server socket, by the client's
                // redirects and by the proxy. To the client: what the verdict saw and what a
                // backend on this host sent straight to the client.
                let up = tcp_written(pair.fds[1].as_raw_fd())
                    .unwrap_or(0)
                    .saturating_sub(r.to_server)
                    + r.from_client;
                let reply = self.local.as_ref().and_then(|l| l.reply(r.server));
                let down = reply.map_or(0, |x| x.redirected + x.passed + x.direct);
                if let Some(local) = &self.local {
                    local.forget(&r.key, &r.backend, r.server);
                }
                (up, down, reply.map_or(0, |x| x.pauses))
            }
        };
        let metrics = self.metrics();
        if matches!(pair.kind, Kind::Local(_)) {
            metrics.kernel_local.fetch_sub(1, Ordering::Relaxed);
        }
        metrics.bytes_to_backend.fetch_add(up, Ordering::Relaxed);
        metrics.bytes_to_client.fetch_add(down, Ordering::Relaxed);
        metrics.active.fetch_sub(1, Ordering::Relaxed);
        metrics.linked.fetch_sub(1, Ordering::Relaxed);
        metrics.closed(reason);
        tracing::debug!(
            client = %pair.peer,
            backend = %pair.backend.addr,
            to_backend = up,
            to_client = down,
            pauses,
            reason = reason.label(),
            "kernel-forwarded connection closed"
        );
        // Dropping the pair closes both sockets; the kernel removes them from the sockhash.
        drop(pair);
    }
}

/// What a pair needs after [`advance`].
enum Advance {
    /// Both directions are half-closed: close the sockets.
    Close(CloseReason),
    /// Cut it.
    Abort(CloseReason),
    /// Keep it, with these epoll interest changes (fd, side, events).
    Watch(Vec<(RawFd, usize, u32)>),
}

fn advance(map: &Sockmap, local: Option<&Local>, pair: &mut Pair) -> Advance {
    let mut wait = false;
    for side in 0..2 {
        let stepped = match (pair.kind, local) {
            (Kind::Pair(joined), _) => step(map, pair, &joined, side),
            (Kind::Local(route), Some(local)) if side == 0 => step_sends(local, pair, &route),
            (Kind::Local(route), Some(local)) => step_replies(local, pair, &route),
            (Kind::Local(_), None) => Err(CloseReason::Error),
        };
        match stepped {
            Ok(w) => wait |= w,
            Err(reason) => return Advance::Abort(reason),
        }
    }
    let mut flushing = false;
    if pair.dirs.iter().any(|d| d.reset && d.shut) {
        // After the backend's reset, the client's reset waits (briefly) for the client to
        // acknowledge the last replies: a reset would drop them.
        flushing = pair
            .backend_reset
            .is_some_and(|at| at.elapsed() < RESET_FLUSH)
            && !pair.dirs[0].reset
            && crate::sys::unacknowledged(pair.fds[0].as_raw_fd()).is_ok_and(|n| n > 0);
        if !flushing {
            return Advance::Abort(CloseReason::Error);
        }
        wait = true;
    }
    if pair.dirs[0].shut && pair.dirs[1].shut && !flushing {
        return Advance::Close(match pair.first_eof {
            Some(1) => CloseReason::Backend,
            _ => CloseReason::Client,
        });
    }
    pair.retry = if wait {
        let at = Instant::now() + pair.delay;
        pair.delay = (pair.delay * 2).min(LAST_RETRY);
        Some(at)
    } else {
        pair.delay = FIRST_RETRY;
        None
    };
    let mut changes = Vec::new();
    for side in 0..2 {
        let mut want = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        if pair.dirs[side].reading {
            want |= libc::EPOLLIN as u32;
        }
        if pair.dirs[1 - side].want_out {
            want |= libc::EPOLLOUT as u32;
        }
        if want != pair.interest[side] {
            pair.interest[side] = want;
            changes.push((pair.fds[side].as_raw_fd(), side, want));
        }
    }
    Advance::Watch(changes)
}

/// An epoll token: the pair's generation (so a stale event never reaches a slot's next
/// pair), its slot and the side.
fn token(generation: u32, slot: usize, side: usize) -> u64 {
    (u64::from(generation) << 32) | ((slot as u64) << 1) | side as u64
}

/// Moves one direction forward: collects and writes bytes passed up to the thread, and
/// half-closes the peer once the source's FIN is the next thing in line. Returns whether it
/// waits on something epoll does not report (a kernel queue draining).
fn step(map: &Sockmap, pair: &mut Pair, joined: &Joined, side: usize) -> Result<bool, CloseReason> {
    let source = pair.fds[side].as_raw_fd();
    let target = pair.fds[1 - side].as_raw_fd();
    let cookie = cookie(joined, side);
    let base_recv = pair.base_recv[side];
    if pair.dirs[1 - side].reset {
        // Its peer is gone: nothing more can be delivered this way.
        return Ok(false);
    }
    let dir = &mut pair.dirs[side];
    if dir.shut {
        return Ok(false);
    }
    let err = |e: io::Error| {
        tracing::debug!(error = %e, "kernel path: socket call failed");
        CloseReason::Error
    };
    let mut d = map.direction(cookie).ok_or(CloseReason::Error)?;
    if d.mode == Mode::Failed {
        return Err(CloseReason::Error);
    }
    if d.mode == Mode::User && !dir.clamped {
        // Paused: from now on what the kernel holds for this direction is mostly the
        // source's receive buffer, which autotuning may have grown toward tcp_rmem's maximum
        // (32 MiB on these machines). Fix it at the limit so a stalled peer costs a bounded
        // amount whatever came before; autotuning stays off for this connection after.
        if let Err(e) = crate::sys::set_receive_buffer(source, d.limit) {
            tracing::debug!(error = %e, "kernel path: cannot fix the receive buffer");
        }
        dir.clamped = true;
    }
    loop {
        if dir.start < dir.end {
            // Passed-up bytes go out only behind everything the kernel took for the peer.
            let ahead = d.base + d.redirected + dir.forwarded;
            if tcp_written(target).map_err(err)? < ahead {
                dir.want_out = false;
                return Ok(true);
            }
            if dir.write_buffered(target)?.is_none() {
                return Ok(false);
            }
            map.set_forwarded(cookie, dir.forwarded).map_err(err)?;
            continue;
        }
        dir.want_out = false;
        let pending = d.passed > dir.forwarded;
        if !pending && d.mode != Mode::User {
            // Back in the kernel (or never left): nothing to collect.
            dir.reading = false;
            dir.buf = None;
            break;
        }
        dir.reading = true;
        match dir.fill(source) {
            Ok(0) => {
                dir.eof = true;
                d = map.direction(cookie).ok_or(CloseReason::Error)?;
                if d.passed > dir.forwarded {
                    // Passed bytes still on their way to the queue.
                    return Ok(true);
                }
                break;
            }
            Ok(_) => {
                d = map.direction(cookie).ok_or(CloseReason::Error)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                d = map.direction(cookie).ok_or(CloseReason::Error)?;
                if d.passed > dir.forwarded {
                    // Passed behind the psock's backlog: queued by a kernel worker soon.
                    return Ok(true);
                }
                if d.mode != Mode::User {
                    dir.reading = false;
                    dir.buf = None;
                }
                break;
            }
            Err(_) => return Err(CloseReason::Error),
        }
    }
    if !dir.eof {
        return Ok(false);
    }
    // The source sent its FIN: half-close the peer once every byte before it is there.
    // tcpi_bytes_received counts the FIN's sequence number as one byte.
    let received = tcp_bytes(source).map_err(err)?.received.saturating_sub(1);
    if d.redirected + d.passed + base_recv < received {
        // The program has not seen the last bytes yet.
        return Ok(true);
    }
    if dir.forwarded < d.passed || dir.start < dir.end {
        return Ok(true);
    }
    if tcp_written(target).map_err(err)? < d.base + d.redirected + dir.forwarded {
        // Still in the peer's psock backlog.
        return Ok(true);
    }
    dir.half_close(target)
}

/// The (source, target) descriptors of direction `side`, or None when nothing more can move
/// that way: its target was reset, or it is half-closed already.
fn live_direction(pair: &Pair, side: usize) -> Option<(RawFd, RawFd)> {
    if pair.dirs[1 - side].reset || pair.dirs[side].shut {
        return None;
    }
    Some((pair.fds[side].as_raw_fd(), pair.fds[1 - side].as_raw_fd()))
}

/// Client-socket connections, client to backend: the client's sends reach the server socket
/// in the kernel, except what the program passes to the ordinary path (sent before the route
/// existed, or while the server socket was backed up). Those arrive on the accepted socket
/// and are written here, in order: the program redirects again only once the count written
/// here equals what it passed. The client's FIN arrives here too, after every byte it sent,
/// and is forwarded as a half-close. Returns whether it waits on something epoll does not
/// report.
fn step_sends(local: &Local, pair: &mut Pair, route: &LocalRoute) -> Result<bool, CloseReason> {
    let Some((source, target)) = live_direction(pair, 0) else {
        return Ok(false);
    };
    let dir = &mut pair.dirs[0];
    dir.reading = true;
    loop {
        if dir.start < dir.end {
            if dir.write_buffered(target)?.is_none() {
                return Ok(false);
            }
            local
                .set_forwarded(
                    &route.key,
                    route.server,
                    route.client,
                    route.from_client + dir.forwarded,
                    route.to_server + dir.forwarded,
                )
                .map_err(|e| {
                    tracing::debug!(error = %e, "client-socket route update failed");
                    CloseReason::Error
                })?;
            continue;
        }
        dir.want_out = false;
        if dir.fin_read {
            break;
        }
        match dir.fill(source) {
            Ok(0) => {
                dir.fin_read = true;
                dir.eof = true;
                break;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(_) => return Err(CloseReason::Error),
        }
    }
    dir.half_close(target)
}

/// Client-socket connections, backend to client: replies go into the client socket in the
/// kernel. While the program pauses them (the client stopped reading), they wait in the
/// server socket's queue; once the client's backlog drained, this copies them through the
/// accepted socket, within the allowance the program sets (bytes passed after a pause wait
/// until what was redirected before them has been delivered). The server's FIN is forwarded
/// as a half-close of the accepted socket once every reply before it reached the client.
fn step_replies(local: &Local, pair: &mut Pair, route: &LocalRoute) -> Result<bool, CloseReason> {
    let Some((source, target)) = live_direction(pair, 1) else {
        return Ok(false);
    };
    let dir = &mut pair.dirs[1];
    let mut r = local.reply(route.server).ok_or(CloseReason::Error)?;
    if r.mode == ReplyMode::Failed {
        return Err(CloseReason::Error);
    }
    if r.mode != ReplyMode::Kernel && !dir.clamped {
        // Paused: the server socket's receive buffer now holds the replies; fix it at the
        // limit so a stalled client costs a bounded amount (see step's comment).
        if let Err(e) = crate::sys::set_receive_buffer(source, local.recv_limit()) {
            tracing::debug!(error = %e, "kernel path: cannot fix the receive buffer");
        }
        dir.clamped = true;
    }
    loop {
        if dir.start < dir.end {
            if dir.forwarded + (dir.end - dir.start) as u64 > r.allow {
                // Passed during a pause: wait (not reading) until the client's backlog
                // ahead of these bytes has drained; the program says so with an event.
                dir.reading = false;
                return Ok(false);
            }
            if dir.write_buffered(target)?.is_none() {
                return Ok(false);
            }
            local
                .set_reply_written(route.server, dir.forwarded)
                .map_err(|_| CloseReason::Error)?;
            continue;
        }
        dir.want_out = false;
        let pending = r.passed > dir.forwarded;
        if dir.fin_read || (!pending && r.mode != ReplyMode::User) {
            dir.reading = false;
            dir.buf = None;
            break;
        }
        dir.reading = true;
        match dir.fill(source) {
            Ok(0) => {
                dir.fin_read = true;
                dir.eof = true;
                r = local.reply(route.server).ok_or(CloseReason::Error)?;
                if r.passed > dir.forwarded {
                    return Ok(true);
                }
                break;
            }
            Ok(_) => {
                // The allowance is read with the bytes in hand: a pause lowers it before the
                // bytes it holds back are queued.
                r = local.reply(route.server).ok_or(CloseReason::Error)?;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                r = local.reply(route.server).ok_or(CloseReason::Error)?;
                if r.passed > dir.forwarded && r.mode == ReplyMode::User {
                    // Passed behind the socket's backlog: queued by a kernel worker soon.
                    return Ok(true);
                }
                break;
            }
            Err(_) => return Err(CloseReason::Error),
        }
    }
    if !dir.eof {
        return Ok(false);
    }
    // The server ended: its FIN, or a reset. The end follows toward the client (a half-close,
    // or the cut of the pair after a reset) once every reply before it is there. A reset
    // leaves no skb for the verdict, so the program never notes it: after one, the client's
    // backlog is looked at from here. A read that returned end of file after a reset took
    // everything the server socket still held; passed bytes not read by then went with the
    // socket's psock, which the kernel drops at the reset, and are not waited for.
    let passed_lost = dir.reset && dir.fin_read;
    if dir.start < dir.end || (r.passed > dir.forwarded && !passed_lost) {
        return Ok(r.mode == ReplyMode::User);
    }
    let delivered = match r.mode {
        ReplyMode::Kernel if r.delivered => true,
        // The verdict saw the FIN (the timer reports the drained backlog; this looks too, in
        // case its event was lost) or never will (a reset): everything before the end is in
        // the client socket or its backlog.
        ReplyMode::Kernel if r.fin || dir.reset => local
            .probe(route.server)
            .map_err(|e| {
                tracing::debug!(error = %e, "client-socket probe failed");
                CloseReason::Error
            })?
            .is_none_or(|p| p.delivered),
        ReplyMode::Kernel => false,
        ReplyMode::User => dir.fin_read,
        ReplyMode::Draining | ReplyMode::Failed => false,
    };
    if !delivered {
        // The program reports delivery (or a drained backlog) with an event; retry anyway
        // in case the FIN has not reached it yet (and after a reset, which it never sees).
        return Ok(true);
    }
    dir.half_close(target)
}

fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: send reads at most buf.len() bytes from buf.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: recv writes at most buf.len() bytes into buf.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
