//! The kernel path's thread: one for every core, since no data comes through it except for
//! paused directions. It sleeps in epoll on the connections' hang-ups (EPOLLRDHUP; data
//! wake-ups are asked for only while it reads a direction), the workers' hand-over eventfd,
//! the control thread's fence socket and the programs' event rings; it steps a
//! connection's directions after anything happened to it, and closes, cuts or fences it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use tendril_ebpf::client_socket::{
    ClientSocket, EventKind as ClientSocketEvent, Events as ClientSocketEvents,
};
use tendril_ebpf::sockmap::{EventKind, Events, Sockmap};

use super::conn::{Advance, Conn, Direction, FIRST_RETRY, advance, cookie};
use super::direction::Event;
use super::{Command, Handoff, Kind, client_socket};
use crate::metrics::{CloseReason, WorkerMetrics};
use crate::shared::Shared;
use crate::sys::tcp_written;

const TOKEN_COMMANDS: u64 = u64::MAX;
const TOKEN_FENCE: u64 = u64::MAX - 1;
const TOKEN_EVENTS: u64 = u64::MAX - 2;
const TOKEN_CLIENT_SOCKET_EVENTS: u64 = u64::MAX - 3;
const TOKEN_MOVER: u64 = u64::MAX - 4;
/// How often the connections are looked at once the event ring went to the process that
/// took over (their events reach that process, see `moving`).
const POLL: Duration = Duration::from_millis(10);

mod moving;
/// How often the thread looks at draining and lost events when nothing else wakes it.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

pub(super) struct Thread {
    /// The pair path's program, when the pair path is selectable.
    map: Option<Arc<Sockmap>>,
    client_socket: Option<Arc<ClientSocket>>,
    events: Option<Events>,
    client_socket_events: Option<ClientSocketEvents>,
    epfd: OwnedFd,
    commands: mpsc::Receiver<Handoff>,
    control: mpsc::Receiver<Command>,
    wake: OwnedFd,
    fence: std::os::unix::net::UnixStream,
    shared: Arc<Shared>,
    index: usize,
    conns: Vec<Option<Conn>>,
    free: Vec<usize>,
    by_cookie: HashMap<u64, usize>,
    lost_seen: u64,
    last_housekeeping: Instant,
    drain_deadline: Option<Instant>,
    disconnected: bool,
    next_generation: u32,
    /// The connections on their way to the process that took over, once it adopts them.
    mover: Option<moving::Mover>,
    /// The event ring went to the process that took over: poll every [`POLL`].
    events_yielded: bool,
    /// Orphans in the maps shared with a process taken over, removed if they still are
    /// at the instant given (see `moving`'s sweep).
    sweep: Option<(Instant, moving::Orphans)>,
    last_poll: Instant,
}

impl Thread {
    /// The thread's state and its epoll set; `wake` is the eventfd of its `inbox`: the
    /// workers' connections and the handover's commands.
    pub(super) fn new(
        map: Option<Arc<Sockmap>>,
        cs: Option<Arc<ClientSocket>>,
        inbox: (mpsc::Receiver<Handoff>, mpsc::Receiver<Command>),
        wake: OwnedFd,
        fence: std::os::unix::net::UnixStream,
        shared: Arc<Shared>,
        index: usize,
    ) -> io::Result<Thread> {
        let (commands, control) = inbox;
        let events = map.as_ref().map(|m| m.events()).transpose()?;
        let client_socket_events = cs.as_ref().map(|l| l.events()).transpose()?;
        // SAFETY: epoll_create1 returns a new descriptor or -1.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor owned by nobody else.
        let epfd = unsafe { OwnedFd::from_raw_fd(epfd) };
        fence.set_nonblocking(true)?;
        let thread = Thread {
            map,
            client_socket: cs,
            events,
            client_socket_events,
            epfd,
            commands,
            control,
            wake,
            fence,
            shared,
            index,
            conns: Vec::new(),
            free: Vec::new(),
            by_cookie: HashMap::new(),
            lost_seen: 0,
            last_housekeeping: Instant::now(),
            drain_deadline: None,
            disconnected: false,
            next_generation: 0,
            mover: None,
            events_yielded: false,
            sweep: None,
            last_poll: Instant::now(),
        };
        let input = libc::EPOLLIN as u32;
        thread.watch(thread.wake.as_raw_fd(), TOKEN_COMMANDS, input)?;
        thread.watch(thread.fence.as_raw_fd(), TOKEN_FENCE, input)?;
        if let Some(events) = &thread.events {
            thread.watch(events.fd(), TOKEN_EVENTS, input)?;
        }
        if let Some(events) = &thread.client_socket_events {
            thread.watch(events.fd(), TOKEN_CLIENT_SOCKET_EVENTS, input)?;
        }
        Ok(thread)
    }

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

    pub(super) fn run(mut self) {
        tracing::info!(
            pair_path = self.map.is_some(),
            client_socket_path = self.client_socket.is_some(),
            limit_pairs = self.map.as_ref().map_or(0, |m| m.max_pairs()),
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
                    TOKEN_CLIENT_SOCKET_EVENTS => self.take_client_socket_events(),
                    TOKEN_MOVER => self.take_answers(),
                    t => self.socket_ready(
                        (t >> 32) as u32,
                        ((t & 0xffff_ffff) >> 1) as usize,
                        (t & 1) as usize,
                        bits,
                    ),
                }
            }
            self.retry_due();
            self.poll_yielded();
            self.move_steady();
            if self.housekeeping() {
                break;
            }
        }
        self.metrics().stopped();
        tracing::info!("kernel forwarding thread stopped");
    }

    /// Milliseconds until the next timed retry, or the housekeeping period.
    fn timeout(&self) -> i32 {
        let now = Instant::now();
        let next = self
            .conns
            .iter()
            .flatten()
            .filter_map(|p| p.retry)
            .min()
            .map_or(HOUSEKEEPING, |t| t.saturating_duration_since(now));
        let period = if self.events_yielded && self.conns.iter().any(Option::is_some) {
            POLL
        } else {
            HOUSEKEEPING
        };
        next.min(period)
            .as_millis()
            .max(u128::from(next > Duration::ZERO)) as i32
    }

    fn take_handoffs(&mut self) {
        let mut count = [0u8; 8];
        // SAFETY: reads the eventfd counter (8 bytes) into `count`.
        unsafe {
            libc::read(self.wake.as_raw_fd(), count.as_mut_ptr().cast(), 8);
        }
        while let Ok(command) = self.control.try_recv() {
            self.command(command);
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
        let interest = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        let mut dirs = [Direction::default(), Direction::default()];
        dirs[0].forwarded = h.forwarded[0];
        dirs[1].forwarded = h.forwarded[1];
        let conn = Conn {
            fds: h.fds,
            kind: h.kind,
            base_recv: h.base_recv,
            dirs,
            backend: h.backend,
            peer: h.peer,
            interest: [interest; 2],
            first_end: None,
            retry: None,
            delay: FIRST_RETRY,
            generation: 0,
            stall: None,
            backend_reset: None,
            server_written: None,
        };
        self.insert(conn);
        if let Some(adopted) = h.adopted {
            let _ = adopted.send(());
        }
    }

    /// Holds a connection from now on: watched, named by its cookies, stepped once (the
    /// bytes passed up while it was on its way are collected now); cut at once if a fence
    /// was published since its backend was chosen.
    fn insert(&mut self, mut conn: Conn) {
        let table = self.shared.table.load();
        let fenced = table.fences(&conn.backend);
        drop(table);
        let slot = match self.free.pop() {
            Some(i) => i,
            None => {
                self.conns.push(None);
                self.conns.len() - 1
            }
        };
        conn.generation = self.next_generation;
        let interest = conn.interest;
        let pair_gen = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let fds = [conn.fds[0].as_raw_fd(), conn.fds[1].as_raw_fd()];
        for c in conn.cookies() {
            self.by_cookie.insert(c, slot);
        }
        self.conns[slot] = Some(conn);
        if fenced {
            // A fence was published between the worker's table load and now.
            self.abort(slot, CloseReason::Fenced);
            return;
        }
        for (side, fd) in fds.into_iter().enumerate() {
            if self
                .watch(fd, token(pair_gen, slot, side), interest[side])
                .is_err()
            {
                self.abort(slot, CloseReason::Error);
                return;
            }
        }
        // Bytes passed up while the connection joined are collected now.
        self.progress(slot);
    }

    fn fence(&mut self) {
        // Connections handed to this thread before the table was published are held (and
        // cut) before the fence is acknowledged.
        self.take_handoffs();
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
            .conns
            .iter()
            .enumerate()
            .filter_map(|(i, p)| p.as_ref().filter(|p| table.fences(&p.backend)).map(|_| i))
            .collect();
        for &slot in &doomed {
            self.abort(slot, CloseReason::Fenced);
        }
        // On their way to the process that took over: cut here too (the sockets are the
        // same), so neither process acknowledges while one is open.
        self.fence_in_flight(&table);
        self.metrics()
            .applied_epoch
            .store(table.epoch, Ordering::Release);
        if !doomed.is_empty() {
            tracing::info!(connections = doomed.len(), generation = %table.generation, "fenced kernel-forwarded connections");
        }
    }

    fn take_events(&mut self) {
        let Some(events) = self.events.as_mut() else {
            return;
        };
        for event in events.drain() {
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

    fn take_client_socket_events(&mut self) {
        let Some(events) = self.client_socket_events.as_mut() else {
            return;
        };
        for event in events.drain() {
            let Some(&slot) = self.by_cookie.get(&event.server) else {
                continue;
            };
            match event.kind {
                ClientSocketEvent::Drained
                | ClientSocketEvent::Delivered
                | ClientSocketEvent::Paused => self.progress(slot),
                ClientSocketEvent::Failed => {
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
            .conns
            .get(slot)
            .and_then(Option::as_ref)
            .map(|p| p.generation)
            != Some(generation)
        {
            return;
        }
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        if bits & libc::EPOLLERR as u32 != 0 && !conn.dirs[side].state.source_reset() {
            // A reset (or a failed send) on this side: what it sent before still goes out to
            // the peer, as a userspace copy would have done, then the connection is cut.
            let e = tendril_ebpf::sockopt::pending_error(conn.fds[side].as_raw_fd());
            tracing::debug!(client = %conn.peer, backend = %conn.backend.addr, side = if side == 0 { "client" } else { "backend" }, error = %e, "socket error");
            conn.sense(side, Event::Reset);
        }
        if bits & (libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
            conn.sense(side, Event::Hangup);
        }
        conn.delay = FIRST_RETRY;
        self.progress(slot);
    }

    fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<usize> = self
            .conns
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
        let lost = self.map.as_ref().map_or(0, |m| m.stats().lost_events)
            + self
                .client_socket
                .as_ref()
                .map_or(0, |l| l.stats().lost_events);
        if lost != self.lost_seen {
            // The event ring overflowed: look at every connection.
            self.lost_seen = lost;
            self.progress_all();
        }
        self.cut_stalled();
        self.sweep_due();
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
                let left: Vec<usize> = (0..self.conns.len())
                    .filter(|&i| self.conns[i].is_some())
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
                if self.mover.as_ref().is_some_and(|m| !m.in_flight.is_empty()) {
                    self.taker_gone("it did not answer by the drain timeout");
                }
            }
        }
        // Stop once no worker can hand anything over and every connection is closed (or
        // adopted by the process that took over).
        let idle = self.conns.iter().all(Option::is_none)
            && self.mover.as_ref().is_none_or(|m| m.in_flight.is_empty());
        idle && (self.disconnected || (self.shared.draining() && self.shared.all_workers_stopped()))
    }

    /// Cuts client-socket connections whose server side ended but whose end has not reached
    /// the client after `client_socket::STALL_LIMIT` with nothing moving while the client
    /// holds nothing unread. Should never happen: each one is logged and counted.
    fn cut_stalled(&mut self) {
        let Some(cs) = self.client_socket.clone() else {
            return;
        };
        let now = Instant::now();
        let mut stalled = Vec::new();
        for (slot, conn) in self.conns.iter_mut().enumerate() {
            let Some(conn) = conn else { continue };
            if let Kind::ClientSocket(route) = conn.kind
                && client_socket::stalled(&cs, conn, &route, now)
            {
                cs.count_stalled();
                client_socket::log_stalled(&cs, conn, &route, conn.peer);
                stalled.push(slot);
            }
        }
        for slot in stalled {
            self.abort(slot, CloseReason::Error);
        }
    }

    /// Moves a connection forward after anything happened to it.
    fn progress(&mut self, slot: usize) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) else {
            return;
        };
        let conn_gen = conn.generation;
        match advance(self.map.as_deref(), self.client_socket.as_deref(), conn) {
            Advance::Close(reason) => self.close(slot, reason),
            Advance::Abort(reason) => self.abort(slot, reason),
            Advance::Watch(changes) => {
                for (fd, side, events) in changes {
                    if self
                        .ctl(libc::EPOLL_CTL_MOD, fd, token(conn_gen, slot, side), events)
                        .is_err()
                    {
                        self.abort(slot, CloseReason::Error);
                        return;
                    }
                }
            }
        }
    }

    /// Cuts a connection at once: out of the maps, both sockets shut down and closed. After
    /// one side's reset, the other gets a reset too (as over a direct connection) when it has
    /// acknowledged every byte sent to it; a FIN otherwise, which drops nothing.
    fn abort(&mut self, slot: usize, reason: CloseReason) {
        if let Some(conn) = self.conns.get_mut(slot).and_then(Option::as_mut) {
            conn.server_written = tcp_written(conn.fds[1].as_raw_fd()).ok();
            let mut client_bytes_dropped = false;
            match conn.kind {
                Kind::Pair(joined) => {
                    client_bytes_dropped = pair_drops_client_bytes(conn);
                    if let Some(map) = &self.map {
                        map.leave(&joined);
                    }
                }
                Kind::ClientSocket(r) => {
                    if let Some(cs) = &self.client_socket {
                        cs.leave(&r.key, &r.backend, r.server);
                    }
                }
            }
            for to in 0..2 {
                // A reset from one side reaches the other as a reset, as over a direct
                // connection, once that side acknowledged every byte sent to it (a reset
                // would drop them); a FIN otherwise.
                // So does a client whose bytes this cut drops (see
                // `pair_drops_client_bytes`).
                let fd = conn.fds[to].as_raw_fd();
                let reset =
                    conn.dirs[1 - to].state.source_reset() || (to == 0 && client_bytes_dropped);
                let pass_reset = reset
                    && !conn.dirs[to].state.source_reset()
                    && crate::sys::unacknowledged(fd).is_ok_and(|n| n == 0)
                    && crate::sys::reset_connection(fd).is_ok();
                if !pass_reset {
                    crate::sys::shutdown_both(fd);
                }
            }
        }
        self.close(slot, reason);
    }

    fn close(&mut self, slot: usize, reason: CloseReason) {
        let Some(conn) = self.conns.get_mut(slot).and_then(Option::take) else {
            return;
        };
        self.free.push(slot);
        for fd in &conn.fds {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0);
        }
        for c in conn.cookies() {
            self.by_cookie.remove(&c);
        }
        let (up, down, pauses) = match conn.kind {
            Kind::Pair(joined) => {
                let map = self.map.as_deref();
                let direction = |side: usize| map.and_then(|m| m.direction(cookie(&joined, side)));
                let moved = |side: usize| {
                    direction(side).map_or(0, |d| d.redirected) + conn.dirs[side].forwarded
                };
                let pauses: u32 = (0..2).filter_map(direction).map(|d| d.pauses).sum();
                let moved = (moved(0), moved(1));
                if let Some(map) = map {
                    map.forget(&joined);
                }
                (moved.0, moved.1, pauses)
            }
            Kind::ClientSocket(r) => {
                // To the backend: everything written to the server socket, by the client's
                // redirects and by the proxy. To the client: what the verdict saw and what a
                // backend on this host sent straight to the client.
                let up = conn
                    .server_written
                    .or_else(|| tcp_written(conn.fds[1].as_raw_fd()).ok())
                    .unwrap_or(0)
                    .saturating_sub(r.to_server)
                    + r.from_client;
                let reply = self.client_socket.as_ref().and_then(|l| l.reply(r.server));
                let down = reply.map_or(0, |x| x.redirected + x.passed + x.direct);
                if let Some(cs) = &self.client_socket {
                    cs.forget(&r.key, &r.backend, r.server);
                }
                (up, down, reply.map_or(0, |x| x.pauses))
            }
        };
        let metrics = self.metrics();
        metrics.kernel_released(matches!(conn.kind, Kind::ClientSocket(_)));
        metrics.bytes_to_backend.fetch_add(up, Ordering::Relaxed);
        metrics.bytes_to_client.fetch_add(down, Ordering::Relaxed);
        metrics.closed(reason);
        tracing::debug!(
            client = %conn.peer,
            backend = %conn.backend.addr,
            to_backend = up,
            to_client = down,
            pauses,
            reason = reason.label(),
            "kernel-forwarded connection closed"
        );
        // Dropping the connection closes both sockets; the kernel removes them from the sockhash.
        drop(conn);
    }
}

/// An epoll token: the connection's generation (so a stale event never reaches the next
/// connection in its slot), its slot and the side.
fn token(generation: u32, slot: usize, side: usize) -> u64 {
    (u64::from(generation) << 32) | ((slot as u64) << 1) | side as u64
}

/// Whether cutting a pair-path connection now drops bytes its client sent: bytes the client's
/// socket received beyond what was written to the server socket. Those wait in the program's
/// queue of the client's socket, which leaving the sockmap purges, so the close would not
/// see them as unread and would send a FIN. The client, still sending into the window it
/// last saw (zero once that queue filled the capped receive buffer), would then get no
/// answer until the FIN-WAIT-2 timer ran out a minute later. A PostgreSQL that closes with
/// unread bytes resets the connection; so does the proxy.
fn pair_drops_client_bytes(conn: &Conn) -> bool {
    // Read so that traffic still moving can only make the written count larger than the
    // received one (no reset then): the client's count first, then the server socket's
    // queue before what its peer acknowledged (a byte acknowledged in between is counted
    // twice, never missed).
    let (client, server) = (conn.fds[0].as_raw_fd(), conn.fds[1].as_raw_fd());
    let Ok(received) = crate::sys::tcp_bytes(client).map(|b| b.received) else {
        return false;
    };
    let (Ok(queued), Ok(acked)) = (
        crate::sys::unacknowledged(server),
        crate::sys::tcp_bytes(server).map(|b| b.acked),
    ) else {
        return false;
    };
    // tcpi_bytes_received counts the client's FIN as one byte.
    received.saturating_sub(1) > queued + acked
}
