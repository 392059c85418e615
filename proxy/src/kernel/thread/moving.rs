//! The old process's side of a handover with kernel-forwarded connections (see
//! `crate::handover`): the thread gives up the event rings before the taker loads with the
//! maps, then sends it each connection on the paths it adopts once it is at rest, and
//! forgets it once the taker answers that it holds it.
//!
//! A connection at rest has nothing in the thread's hands: no byte held, none passed up by
//! a program and not yet copied, no end seen, no retry due, each direction either forwarded
//! by the kernel or read by the thread only for what a program may pass (a direction that
//! paused once stays so until its next packet; a pair direction joins on its first).
//! Nothing the thread knows is then lost by moving it, and what the kernel does meanwhile
//! is in the shared maps, which the taker reads. A connection not at rest is tried again
//! every look until the drain's deadline; one the taker refused stays here.
//!
//! Between the send and the answer the connection is in neither process's table: this
//! thread keeps its copies of the sockets and cuts it if a fence comes (the sockets are the
//! same), so no process acknowledges a generation while it is open.

use std::collections::{HashSet, VecDeque};
use std::io::{self, IoSlice, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use super::super::Kind;
use super::super::conn::{Conn, cookie};
use super::super::direction::{DirState, Flow};
use super::super::moved::Moved;
use super::super::{Adopts, Command};
use super::{POLL, TOKEN_CLIENT_SOCKET_EVENTS, TOKEN_EVENTS, TOKEN_MOVER, Thread};
use crate::metrics::CloseReason;
use crate::routing::RoutingTable;
use tendril_ebpf::client_socket::ReplyMode;
use tendril_ebpf::sockmap::Mode as PairMode;

/// How long an orphan must stay one before the sweep removes it.
const SWEEP_AFTER: Duration = Duration::from_secs(1);

/// Orphaned connections in the shared maps, by path (pair sockets' cookies; client-socket
/// server cookies).
#[derive(Debug, Default)]
pub(in crate::kernel) struct Orphans {
    pair: HashSet<u64>,
    client_socket: HashSet<u64>,
}

impl Orphans {
    fn is_empty(&self) -> bool {
        self.pair.is_empty() && self.client_socket.is_empty()
    }
}

/// The stream to the taker and what it has not answered yet.
pub(in crate::kernel) struct Mover {
    stream: UnixStream,
    /// The paths whose connections the taker adopts.
    adopts: Adopts,
    /// Sent, in order, until answered.
    pub in_flight: VecDeque<Conn>,
    answers: Vec<u8>,
    /// Connections the taker refused (by their first cookie): never sent again.
    refused: HashSet<u64>,
    last_look: Option<Instant>,
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
            Command::Sweep => {
                let orphans = self.orphans();
                if !orphans.is_empty() {
                    self.sweep = Some((Instant::now() + SWEEP_AFTER, orphans));
                }
            }
            Command::Move(stream, adopts) => {
                if stream.set_nonblocking(true).is_err()
                    || stream
                        .set_write_timeout(Some(Duration::from_secs(1)))
                        .is_err()
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
                tracing::info!(paths = %adopts.words(), "handing the kernel-forwarded connections over to the new proxy");
                self.mover = Some(Mover {
                    stream,
                    adopts,
                    in_flight: VecDeque::new(),
                    answers: Vec::new(),
                    refused: HashSet::new(),
                    last_look: None,
                });
            }
        }
    }

    /// Connections in the maps that no socket and no process holds any more, by path:
    /// what a process taken over leaves behind when it is killed while it still held kernel
    /// connections (it did not forget them, and the maps outlive it here). Those this
    /// thread holds are not orphans, whatever their sockets' state.
    fn orphans(&self) -> Orphans {
        let mine = |c: &u64| !self.by_cookie.contains_key(c);
        Orphans {
            pair: self
                .map
                .as_ref()
                .map(|m| m.orphans().into_iter().filter(mine).collect())
                .unwrap_or_default(),
            client_socket: self
                .client_socket
                .as_ref()
                .map(|cs| cs.orphans().into_iter().filter(mine).collect())
                .unwrap_or_default(),
        }
    }

    /// Removes the orphans found [`SWEEP_AFTER`] ago that are orphans still: a connection
    /// being routed or joined right now is one for an instant (its entries go in before
    /// its sockets join), never for that long.
    pub(super) fn sweep_due(&mut self) {
        if self
            .sweep
            .as_ref()
            .is_none_or(|(at, _)| Instant::now() < *at)
        {
            return;
        }
        let Some((_, first)) = self.sweep.take() else {
            return;
        };
        let now = self.orphans();
        let mut removed = 0;
        if let Some(map) = &self.map {
            for c in first.pair.iter().filter(|c| now.pair.contains(c)) {
                map.forget_socket(*c);
                removed += 1;
            }
        }
        if let Some(cs) = &self.client_socket {
            for c in first
                .client_socket
                .iter()
                .filter(|c| now.client_socket.contains(c))
            {
                cs.forget_orphan(*c);
                removed += 1;
            }
        }
        if removed > 0 {
            tracing::info!(
                removed,
                "removed what the process taken over left in the shared maps"
            );
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

    /// The record of `conn` when it is at rest (see the module's documentation) on a path
    /// the taker adopts, and was not refused.
    fn at_rest(&self, conn: &Conn, mover: &Mover) -> Option<Moved> {
        let quiet = conn.dirs.iter().all(|d| d.held() == 0)
            && conn.retry.is_none()
            && conn.first_end.is_none()
            && conn.backend_reset.is_none()
            && conn.stall.is_none()
            && !conn
                .cookies()
                .first()
                .is_some_and(|c| mover.refused.contains(c));
        if !quiet {
            return None;
        }
        let open = |side: usize| {
            matches!(
                conn.dirs[side].state,
                DirState::Live {
                    flow: Flow::Kernel | Flow::Reading,
                    end: None,
                    eof_read: false
                }
            )
        };
        let rest = match conn.kind {
            Kind::ClientSocket(route) if mover.adopts.client_socket => {
                // Paused replies (Draining) wait for the client's backlog: not at rest.
                let reply = self.client_socket.as_ref()?.reply(route.server)?;
                matches!(reply.mode, ReplyMode::Kernel | ReplyMode::User)
                    && reply.passed == conn.dirs[1].forwarded
            }
            Kind::Pair(joined) if mover.adopts.pair => {
                let map = self.map.as_ref()?;
                (0..2).all(|side| {
                    map.direction(cookie(&joined, side)).is_some_and(|d| {
                        d.mode != PairMode::Failed && d.passed == conn.dirs[side].forwarded
                    })
                })
            }
            _ => false,
        };
        (rest && open(0) && open(1)).then(|| Moved {
            peer: conn.peer,
            backend: conn.backend.clone(),
            kind: conn.kind,
            base_recv: conn.base_recv,
            forwarded: [conn.dirs[0].forwarded, conn.dirs[1].forwarded],
        })
    }

    /// Sends every connection at rest to the taker (every [`POLL`] at most).
    pub(super) fn move_steady(&mut self) {
        let Some(mover) = self.mover.as_mut() else {
            return;
        };
        if mover.last_look.is_some_and(|t| t.elapsed() < POLL) {
            return;
        }
        mover.last_look = Some(Instant::now());
        for slot in 0..self.conns.len() {
            let (Some(conn), Some(mover)) = (self.conns[slot].as_ref(), self.mover.as_ref()) else {
                continue;
            };
            let Some(line) = self.at_rest(conn, mover).and_then(|m| m.encode()) else {
                continue;
            };
            let fds = [conn.fds[0].as_raw_fd(), conn.fds[1].as_raw_fd()];
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
                    // The rest of the line must follow before anything else on the stream
                    // (within the stream's write timeout).
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
    /// its sockets and the maps untouched (counted closed once the taker holds it).
    fn take_out(&mut self, slot: usize) -> Option<Conn> {
        let conn = self.conns.get_mut(slot).and_then(Option::take)?;
        self.free.push(slot);
        for fd in &conn.fds {
            let _ = self.ctl(libc::EPOLL_CTL_DEL, fd.as_raw_fd(), 0, 0);
        }
        for c in conn.cookies() {
            self.by_cookie.remove(&c);
        }
        self.metrics()
            .kernel_released(matches!(conn.kind, Kind::ClientSocket(_)));
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
            if &line[..at] == crate::handover::ADOPTED.as_bytes() {
                self.shared.workers[self.index].closed(CloseReason::HandedOver);
                drop(conn);
            } else {
                if let Some(c) = conn.cookies().first() {
                    mover.refused.insert(*c);
                }
                back.push(conn);
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
        self.metrics()
            .kernel_held(matches!(conn.kind, Kind::ClientSocket(_)));
        self.insert(conn);
    }

    /// The taker is gone or unreachable: no more moves. A connection it did not answer for
    /// may have been stepped there, so this thread cannot take it back: it is cut, as the
    /// taker's crash cuts those it held, and its entries leave the shared maps (no process
    /// holds it to forget them later).
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
            super::super::forget(
                conn.kind,
                self.map.as_deref(),
                self.client_socket.as_deref(),
            );
            self.metrics().closed(CloseReason::Error);
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
