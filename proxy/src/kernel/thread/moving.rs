//! The old process's side of a handover with kernel-forwarded connections (see
//! `crate::handover`): the thread gives up the event ring before the taker loads with the
//! maps, then sends it each client-socket connection once it is at rest, and forgets it
//! once the taker answers that it holds it.
//!
//! A connection at rest has nothing in the thread's hands: both directions are forwarded
//! by the kernel (the sends' accepted socket is only read when the program passes bytes,
//! the replies are in the kernel's mode with nothing passed and not yet copied), no end was
//! seen and no retry is due. Nothing the thread knows is then lost by moving it, and what
//! the kernel does meanwhile is in the shared maps, which the taker reads. A connection that
//! is not at rest is tried again at every look until the drain's deadline.
//!
//! Between the send and the answer the connection is in neither process's table: this
//! thread keeps its copies of the sockets and cuts it if a fence comes (the sockets are the
//! same), so no process acknowledges a generation while it is open.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::time::Instant;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use super::super::Command;
use super::super::Kind;
use super::super::conn::{Conn, cookie};
use super::super::direction::{DirState, Flow};
use super::super::moved::Moved;
use super::{POLL, TOKEN_CLIENT_SOCKET_EVENTS, TOKEN_EVENTS, TOKEN_MOVER, Thread};
use crate::metrics::CloseReason;
use crate::routing::RoutingTable;
use tendril_ebpf::client_socket::ReplyMode;
use tendril_ebpf::sockmap::Mode as PairMode;

/// The stream to the taker and what it has not answered yet.
pub(in crate::kernel) struct Mover {
    stream: UnixStream,
    /// Sent, in order, until answered.
    pub in_flight: VecDeque<Conn>,
    answers: Vec<u8>,
}

impl Thread {
    pub(super) fn command(&mut self, command: Command) {
        match command {
            Command::YieldEvents(done) => {
                if let Some(events) = self.client_socket_events.take() {
                    let _ = self.ctl(libc::EPOLL_CTL_DEL, events.fd(), 0, 0);
                }
                if let Some(events) = self.events.take() {
                    let _ = self.ctl(libc::EPOLL_CTL_DEL, events.fd(), 0, 0);
                }
                self.events_yielded = true;
                let _ = done.send(());
                tracing::info!(
                    "the event ring goes to the new proxy: polling this one's connections"
                );
            }
            Command::ResumeEvents => self.resume_events(),
            Command::Move(stream) => {
                if stream.set_nonblocking(true).is_err()
                    || self
                        .watch(stream.as_raw_fd(), TOKEN_MOVER, libc::EPOLLIN as u32)
                        .is_err()
                {
                    tracing::warn!("cannot send connections to the new proxy: they drain here");
                    return;
                }
                if let Some(cs) = &self.client_socket {
                    cs.forget_connecting_threads();
                }
                tracing::info!("handing the kernel-forwarded connections over to the new proxy");
                self.mover = Some(Mover {
                    stream,
                    in_flight: VecDeque::new(),
                    answers: Vec::new(),
                });
            }
        }
    }

    /// Reads the event ring again (the taker never used it); events lost meanwhile are
    /// made up for by a look at every connection.
    fn resume_events(&mut self) {
        if !self.events_yielded {
            return;
        }
        let mut failed = false;
        if let Some(cs) = self.client_socket.clone() {
            match cs.events() {
                Ok(events)
                    if self
                        .watch(
                            events.fd(),
                            TOKEN_CLIENT_SOCKET_EVENTS,
                            libc::EPOLLIN as u32,
                        )
                        .is_ok() =>
                {
                    self.client_socket_events = Some(events);
                }
                _ => failed = true,
            }
        }
        if let Some(map) = self.map.clone() {
            match map.events() {
                Ok(events)
                    if self
                        .watch(events.fd(), TOKEN_EVENTS, libc::EPOLLIN as u32)
                        .is_ok() =>
                {
                    self.events = Some(events);
                }
                _ => failed = true,
            }
        }
        // Without a ring, this thread goes on polling.
        self.events_yielded = failed;
        self.progress_all();
        if failed {
            tracing::warn!("cannot read the event rings again: polling");
        } else {
            tracing::info!("reading the event ring again");
        }
    }

    /// Without the event ring, every connection is looked at every [`POLL`].
    pub(super) fn poll_yielded(&mut self) {
        if !self.events_yielded || self.last_poll.elapsed() < POLL {
            return;
        }
        self.last_poll = Instant::now();
        self.progress_all();
    }

    pub(super) fn progress_all(&mut self) {
        let all: Vec<usize> = (0..self.conns.len())
            .filter(|&i| self.conns[i].is_some())
            .collect();
        for slot in all {
            self.progress(slot);
        }
    }

    /// Whether the connection in `slot` is at rest (see the module's documentation), with
    /// its record when it is.
    fn at_rest(&self, conn: &Conn) -> Option<Moved> {
        let live = |s: DirState, flows: &[Flow]| matches!(s, DirState::Live { flow, end: None, eof_read: false } if flows.contains(&flow));
        let quiet = conn.dirs.iter().all(|d| d.held() == 0)
            && conn.retry.is_none()
            && conn.first_end.is_none()
            && conn.backend_reset.is_none()
            && conn.stall.is_none();
        let kernel = match conn.kind {
            Kind::ClientSocket(route) => {
                let reply = self.client_socket.as_ref()?.reply(route.server)?;
                live(conn.dirs[0].state, &[Flow::Reading, Flow::Kernel])
                    && live(conn.dirs[1].state, &[Flow::Kernel])
                    && reply.mode == ReplyMode::Kernel
                    && reply.passed == conn.dirs[1].forwarded
            }
            Kind::Pair(joined) => {
                let map = self.map.as_ref()?;
                (0..2).all(|side| {
                    map.direction(cookie(&joined, side)).is_some_and(|d| {
                        live(conn.dirs[side].state, &[Flow::Kernel])
                            && d.mode == PairMode::Kernel
                            && d.passed == conn.dirs[side].forwarded
                    })
                })
            }
        };
        (quiet && kernel).then(|| Moved {
            peer: conn.peer,
            backend: conn.backend.clone(),
            kind: conn.kind,
            base_recv: conn.base_recv,
            forwarded: [conn.dirs[0].forwarded, conn.dirs[1].forwarded],
        })
    }

    /// Sends every connection at rest to the taker.
    pub(super) fn move_steady(&mut self) {
        if self.mover.is_none() {
            return;
        }
        for slot in 0..self.conns.len() {
            let Some(conn) = self.conns[slot].as_ref() else {
                continue;
            };
            let Some(line) = self.at_rest(conn).and_then(|m| m.encode()) else {
                continue;
            };
            let fds = [conn.fds[0].as_raw_fd(), conn.fds[1].as_raw_fd()];
            let Some(mover) = self.mover.as_mut() else {
                return;
            };
            let line = format!("{line}\n");
            match sendmsg::<()>(
                mover.stream.as_raw_fd(),
                &[IoSlice::new(line.as_bytes())],
                &[ControlMessage::ScmRights(&fds)],
                MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                None,
            ) {
                Ok(n) if n == line.len() => {}
                Err(nix::errno::Errno::EAGAIN) => return, // the taker is behind: later
                Ok(n) => {
                    // The rest of the line must follow before anything else on the stream.
                    let rest = &line.as_bytes()[n..];
                    let sent = mover.stream.set_nonblocking(false).is_ok()
                        && std::io::Write::write_all(&mut &mover.stream, rest).is_ok()
                        && mover.stream.set_nonblocking(true).is_ok();
                    if !sent {
                        return self.taker_gone("a send to it failed");
                    }
                }
                Err(e) => return self.taker_gone(&format!("a send to it failed: {e}")),
            }
            let Some(conn) = self.take_out(slot) else {
                continue;
            };
            if let Some(mover) = self.mover.as_mut() {
                mover.in_flight.push_back(conn);
            }
        }
    }

    /// Takes the connection out of the table as it is: out of epoll and the cookie index,
    /// its sockets and the maps untouched, counted as handed over.
    fn take_out(&mut self, slot: usize) -> Option<Conn> {
        let conn = self.conns.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        for fd in &conn.fds {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0);
        }
        for c in conn.cookies() {
            self.by_cookie.remove(&c);
        }
        let metrics = self.metrics();
        if matches!(conn.kind, Kind::ClientSocket(_)) {
            metrics.kernel_client_socket.fetch_sub(1, Ordering::Relaxed);
        }
        metrics.active.fetch_sub(1, Ordering::Relaxed);
        metrics.linked.fetch_sub(1, Ordering::Relaxed);
        metrics.closed(CloseReason::HandedOver);
        tracing::debug!(client = %conn.peer, backend = %conn.backend.addr, "kernel-forwarded connection sent to the new proxy");
        Some(conn)
    }

    /// Reads the taker's answers: `adopted` drops this process's copies, `refused` takes
    /// the connection back (the taker never stepped it).
    pub(super) fn take_answers(&mut self) {
        let Some(mover) = self.mover.as_mut() else {
            return;
        };
        let mut buf = [0u8; 1024];
        let gone = loop {
            match (&mover.stream).read(&mut buf) {
                Ok(0) => break Some("it closed the stream"),
                Ok(n) => mover.answers.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break Some("a read from it failed"),
            }
        };
        let mut back = Vec::new();
        while let Some(at) = mover.answers.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = mover.answers.drain(..=at).collect();
            let Some(conn) = mover.in_flight.pop_front() else {
                break;
            };
            match &line[..at] {
                b"adopted" => drop(conn),
                _ => back.push(conn),
            }
        }
        for conn in back {
            tracing::warn!(client = %conn.peer, "the new proxy refused a connection: it stays here");
            self.take_back(conn);
        }
        if let Some(why) = gone {
            self.taker_gone(why);
        }
    }

    fn take_back(&mut self, conn: Conn) {
        let metrics = self.metrics();
        if matches!(conn.kind, Kind::ClientSocket(_)) {
            metrics.kernel_client_socket.fetch_add(1, Ordering::Relaxed);
        }
        metrics.active.fetch_add(1, Ordering::Relaxed);
        metrics.linked.fetch_add(1, Ordering::Relaxed);
        self.insert(conn);
    }

    /// The taker is gone or unreachable: no more moves. A connection it did not answer for
    /// may have been stepped there, so this thread cannot take it back: it is cut, as the
    /// taker's crash cuts those it held.
    pub(super) fn taker_gone(&mut self, why: &str) {
        let Some(mover) = self.mover.take() else {
            return;
        };
        let _ = self.ctl(libc::EPOLL_CTL_DEL, mover.stream.as_raw_fd(), 0, 0);
        let cut = mover.in_flight.len();
        for conn in mover.in_flight {
            for fd in &conn.fds {
                crate::sys::shutdown_both(fd.as_raw_fd());
            }
        }
        if cut > 0 || !why.contains("closed") {
            tracing::warn!(
                reason = why,
                cut,
                "the new proxy stopped taking connections: the rest drain here"
            );
        } else {
            tracing::info!("the new proxy closed the handover: the rest drain here");
        }
    }

    /// Cuts the connections on their way whose backend `table` fences.
    pub(super) fn fence_in_flight(&mut self, table: &RoutingTable) {
        let Some(mover) = self.mover.as_ref() else {
            return;
        };
        for conn in mover.in_flight.iter().filter(|c| table.fences(&c.backend)) {
            for fd in &conn.fds {
                crate::sys::shutdown_both(fd.as_raw_fd());
            }
        }
    }
}
