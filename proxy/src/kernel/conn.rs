//! A kernel-forwarded connection as the thread holds it: its two sockets, how the kernel
//! forwards it, its two directions (state and the buffer for what the thread copies), and
//! [`advance`], which steps both directions and settles the connection's fate.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use tendril_ebpf::client_socket::ClientSocket;
use tendril_ebpf::client_socket::Reply;
use tendril_ebpf::sockmap::{Joined, Sockmap};

use super::direction::{Action, DirState, End, Event, Flow, Outcome, Settle, settle};
use super::{Kind, client_socket, pair};
use crate::metrics::CloseReason;
use crate::routing::Backend;
use crate::sys::RESET_FLUSH;

/// Buffer of a direction the thread copies itself.
const USER_BUFFER: usize = 64 * 1024;
/// First and last delay of a connection's timed retries (waiting for a queue to drain).
pub(super) const FIRST_RETRY: Duration = Duration::from_millis(1);
const LAST_RETRY: Duration = Duration::from_millis(64);

/// One direction, named by the socket it reads from (`[client to backend, backend to
/// client]`).
#[derive(Debug)]
pub(super) struct Direction {
    pub state: DirState,
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    /// Bytes the thread wrote to the target.
    pub forwarded: u64,
    /// The source's receive buffer was fixed at the limit (on the first pause).
    pub clamped: bool,
}

impl Default for Direction {
    fn default() -> Self {
        Direction {
            state: DirState::START,
            buf: None,
            start: 0,
            end: 0,
            forwarded: 0,
            clamped: false,
        }
    }
}

impl Direction {
    /// Bytes held for the target.
    pub fn held(&self) -> u64 {
        (self.end - self.start) as u64
    }

    /// Writes what is held to `target`: `None` when bytes went out (counted in `forwarded`),
    /// `Some(Full)` when the socket is full.
    pub fn write(&mut self, target: RawFd) -> Result<Option<Outcome>, CloseReason> {
        let buf = self.buf.as_deref().unwrap_or(&[]);
        match send(target, &buf[self.start..self.end]) {
            Ok(n) => {
                self.start += n;
                self.forwarded += n as u64;
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(Outcome::Full)),
            Err(e) => {
                tracing::debug!(error = %e, "kernel path: send failed");
                Err(CloseReason::Error)
            }
        }
    }

    /// Reads `source` into the buffer (allocated on first use): `None` when bytes arrived,
    /// `Some(Eof)`, `Some(Reset)` or `Some(Empty)` otherwise.
    pub fn read(&mut self, source: RawFd) -> Result<Option<Outcome>, CloseReason> {
        let buf = self
            .buf
            .get_or_insert_with(|| vec![0u8; USER_BUFFER].into_boxed_slice());
        match recv(source, buf) {
            Ok(0) => Ok(Some(Outcome::Eof)),
            Ok(n) => {
                self.start = 0;
                self.end = n;
                Ok(None)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Some(Outcome::Empty)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(Some(Outcome::Reset)),
            Err(e) => {
                tracing::debug!(error = %e, "kernel path: recv failed");
                Err(CloseReason::Error)
            }
        }
    }

    /// The buffer goes once the direction is back in the kernel with nothing held (a long
    /// connection that paused once keeps no 64 KiB per direction).
    pub fn release_buffer(&mut self) {
        if self.held() == 0 {
            self.buf = None;
        }
    }

    /// Everything before the source's end is out: after a FIN, half-close `target` (after a
    /// reset the connection is cut instead). The buffer goes.
    pub fn shut(&mut self, target: RawFd) {
        if self.state == DirState::Shut(End::Fin) {
            // SAFETY: shutdown takes an integer; `target` is a socket of this connection.
            unsafe {
                libc::shutdown(target, libc::SHUT_WR);
            }
        }
        self.buf = None;
    }
}

/// Runs direction `side` as far as it goes without waiting: `decide` gathers the facts (given
/// what the last read or write returned, and whether the end-only facts are wanted) and
/// asks the path's step function; `wrote` tells the program how many bytes the thread wrote
/// in all. The executors of both kernel paths are this loop.
pub(super) fn drive(
    conn: &mut Conn,
    side: usize,
    mut decide: impl FnMut(
        &mut Direction,
        Option<Outcome>,
        bool,
    ) -> Result<(DirState, Action), CloseReason>,
    mut wrote: impl FnMut(u64) -> Result<(), CloseReason>,
) -> Result<(), CloseReason> {
    let (source, target) = conn.ends(side);
    let dir = &mut conn.dirs[side];
    let (mut last, mut look) = (None, false);
    while !dir.state.done() {
        let (state, action) = decide(dir, last, look)?;
        dir.state = state;
        last = None;
        if state.flow() == Some(Flow::Kernel) {
            dir.release_buffer();
        }
        match action {
            Action::Read => last = dir.read(source)?,
            Action::Write => {
                last = dir.write(target)?;
                if last.is_none() {
                    wrote(dir.forwarded)?;
                }
            }
            // Asked once: the facts it wants are there from the next look on. Asking again
            // would be a step function's bug, and waiting here could strand the
            // connection: cut it instead.
            Action::Look if look => {
                debug_assert!(false, "a step asked to look twice: {state:?}");
                return Err(CloseReason::Error);
            }
            Action::Look => look = true,
            Action::Shut => dir.shut(target),
            Action::Wait => break,
            Action::Cut => return Err(CloseReason::Error),
        }
    }
    Ok(())
}

/// What moves while a client-socket connection's end waits: the thread's copies both ways
/// and the reply direction's state.
pub(super) type StallState = (u64, u64, Option<Reply>);

#[derive(Debug)]
pub(super) struct Conn {
    pub fds: [OwnedFd; 2],
    pub kind: Kind,
    /// Bytes of each source read by the worker before the hand-over.
    pub base_recv: [u64; 2],
    pub dirs: [Direction; 2],
    pub backend: Backend,
    pub peer: SocketAddr,
    /// The epoll interest of each socket.
    pub interest: [u32; 2],
    /// The side whose source ended first (the close reason).
    pub first_end: Option<usize>,
    pub retry: Option<Instant>,
    pub delay: Duration,
    /// Tells this connection's epoll tokens from those of its slot's earlier tenants.
    pub generation: u32,
    /// Since when, and in which state, the end of a client-socket connection's server side
    /// has waited with nothing moving (see `client_socket::STALL_LIMIT`).
    pub stall: Option<(Instant, StallState)>,
    /// When the backend's reset was seen: the client gets a reset too, once it acknowledged
    /// every byte before it, for up to `RESET_FLUSH` (see `Thread::abort`).
    pub backend_reset: Option<Instant>,
    /// What the server socket had written when the connection was cut (passing a reset on
    /// clears the socket's counters).
    pub server_written: Option<u64>,
}

impl Conn {
    /// The cookies the programs' events name this connection by.
    pub fn cookies(&self) -> Vec<u64> {
        match self.kind {
            Kind::Pair(j) => vec![j.client, j.server],
            Kind::ClientSocket(r) => vec![r.server],
        }
    }

    /// The (source, target) descriptors of direction `side`.
    pub fn ends(&self, side: usize) -> (RawFd, RawFd) {
        (self.fds[side].as_raw_fd(), self.fds[1 - side].as_raw_fd())
    }

    /// Applies what epoll reported on `side`'s socket: its source's FIN or reset. A reset
    /// also ends the other direction, which can deliver nothing more.
    pub fn sense(&mut self, side: usize, event: Event) {
        self.dirs[side].state = super::direction::on_event(self.dirs[side].state, event);
        self.first_end.get_or_insert(side);
        self.propagate_reset(side);
    }

    /// When `side`'s source was reset (seen by epoll or by a read), the other direction can
    /// deliver nothing more. Idempotent: called after every step.
    pub fn propagate_reset(&mut self, side: usize) {
        if !self.dirs[side].state.source_reset() {
            return;
        }
        let other = &mut self.dirs[1 - side].state;
        *other = super::direction::on_event(*other, Event::PeerReset);
        if side == 1 {
            self.backend_reset.get_or_insert_with(Instant::now);
        }
        self.first_end.get_or_insert(side);
    }
}

/// What a connection needs after [`advance`].
pub(super) enum Advance {
    /// Both directions are half-closed: close the sockets.
    Close(CloseReason),
    /// Cut it.
    Abort(CloseReason),
    /// Keep it, with these epoll interest changes (fd, side, events).
    Watch(Vec<(RawFd, usize, u32)>),
}

/// Steps both directions, then settles the connection's fate, its retry timer and what
/// epoll watches for it.
pub(super) fn advance(
    map: Option<&Sockmap>,
    cs: Option<&ClientSocket>,
    conn: &mut Conn,
) -> Advance {
    for side in 0..2 {
        let stepped = match (conn.kind, map, cs) {
            (Kind::Pair(joined), Some(map), _) => pair::step(map, conn, &joined, side),
            // A pair is joined only where the pair programs are loaded.
            (Kind::Pair(_), None, _) => Err(CloseReason::Error),
            (Kind::ClientSocket(route), _, Some(cs)) if side == 0 => {
                client_socket::step_sends(cs, conn, &route)
            }
            (Kind::ClientSocket(route), _, Some(cs)) => {
                client_socket::step_replies(cs, conn, &route)
            }
            (Kind::ClientSocket(_), _, None) => Err(CloseReason::Error),
        };
        if let Err(reason) = stepped {
            return Advance::Abort(reason);
        }
        conn.propagate_reset(side);
    }
    let client = conn.fds[0].as_raw_fd();
    let flush_window = conn
        .backend_reset
        .is_some_and(|at| at.elapsed() < RESET_FLUSH);
    let states = [conn.dirs[0].state, conn.dirs[1].state];
    let flush = match settle(states, conn.first_end, flush_window, || {
        crate::sys::unacknowledged(client).is_ok_and(|n| n > 0)
    }) {
        Settle::Close(reason) => return Advance::Close(reason),
        Settle::Cut(reason) => return Advance::Abort(reason),
        Settle::Keep { flush } => flush,
    };
    let wait = flush || states.iter().any(|s| s.flow() == Some(Flow::Behind));
    conn.retry = if wait {
        let at = Instant::now() + conn.delay;
        conn.delay = (conn.delay * 2).min(LAST_RETRY);
        Some(at)
    } else {
        conn.delay = FIRST_RETRY;
        None
    };
    let mut changes = Vec::new();
    for side in 0..2 {
        let mut want = (libc::EPOLLRDHUP | libc::EPOLLET) as u32;
        // Behind a kernel queue, the bytes waited for may also show up on the source:
        // its EPOLLIN wakes the retry early (and resets its back-off).
        if matches!(states[side].flow(), Some(Flow::Reading | Flow::Behind)) {
            want |= libc::EPOLLIN as u32;
        }
        if states[1 - side].flow() == Some(Flow::Blocked) {
            want |= libc::EPOLLOUT as u32;
        }
        if want != conn.interest[side] {
            conn.interest[side] = want;
            changes.push((conn.fds[side].as_raw_fd(), side, want));
        }
    }
    Advance::Watch(changes)
}

/// The cookie of the socket a pair-path direction reads from.
pub(super) fn cookie(joined: &Joined, side: usize) -> u64 {
    if side == 0 {
        joined.client
    } else {
        joined.server
    }
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
