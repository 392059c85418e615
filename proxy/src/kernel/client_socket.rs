//! The client-socket path's executors: a client on this host is routed on its own socket
//! (the client-socket programs of `tendril_ebpf::client_socket`): its sends reach the server socket
//! in the kernel and the replies its socket. The thread copies what the programs pass to the
//! ordinary path (sends before the route or while the server socket was backed up; replies
//! while the client stopped reading) and forwards each end once every byte before it
//! arrived; the decisions are `direction::sends_step` and `direction::replies_step`'s.

use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use tendril_ebpf::client_socket::{ClientKey, ClientSocket, ReplyMode, RouteError, RouteRequest};

use super::KernelPath;
use super::conn::{Conn, Direction, StallState, drive};
use super::direction::{self, DirState, Mode, ReplyFacts, SendFacts};
use crate::metrics::CloseReason;
use crate::sys::tcp_written;

/// A connection whose server side ended, whose client has read everything it holds and
/// where nothing moved for this long is cut (a defence: every end should reach the client
/// well before, see [`step_replies`]).
pub(super) const STALL_LIMIT: Duration = Duration::from_secs(2);

/// A client on this host whose socket joined the client sockhash at connect: the
/// client-socket path can take it once its first bytes arrived ([`KernelPath::candidate`]).
#[derive(Debug, Clone, Copy)]
pub struct Candidate {
    pub(super) key: ClientKey,
    /// The client socket's cookie.
    pub(super) cookie: u64,
}

/// A connection routed on the client's socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ClientRoute {
    pub key: ClientKey,
    /// The server socket's cookie.
    pub server: u64,
    /// The client socket's cookie.
    pub client: u64,
    /// The server socket's connection as a backend on this host sees it.
    pub backend: ClientKey,
    /// What the proxy had read from the client and written to the server before the route.
    pub from_client: u64,
    pub to_server: u64,
}

impl KernelPath {
    /// Routes the connection on the client's own socket. `backend`: the server socket's
    /// [`ClientKey::of_connected`]. On an error nothing was routed (the client's sends still
    /// take the ordinary path).
    pub(super) fn route(
        &self,
        cs: &ClientSocket,
        client: RawFd,
        server: RawFd,
        consumed_from_client: u64,
        candidate: Candidate,
        backend: ClientKey,
    ) -> Result<ClientRoute, RouteError> {
        let to_server = tcp_written(server).map_err(RouteError::Refused)?;
        let request = RouteRequest {
            key: candidate.key,
            client: candidate.cookie,
            backend,
            accepted: client,
            server,
            from_client: consumed_from_client,
            to_server,
        };
        let server_cookie = cs.route(&request)?;
        // The bounds of client_socket.bpf.c, kept by the kernel's own accounting too: the server
        // socket's send buffer stays above what the client may redirect into it (a redirect
        // into a full socket fails and the client would retry at once), and the accepted
        // socket, which only carries what the program passes, holds at most the limit.
        // Set only once routed: the pair path keeps autotuning.
        let _ = crate::sys::set_send_buffer(server, self.limit.saturating_mul(2));
        let _ = crate::sys::set_receive_buffer(client, self.limit);
        Ok(ClientRoute {
            key: candidate.key,
            server: server_cookie,
            client: candidate.cookie,
            backend,
            from_client: consumed_from_client,
            to_server,
        })
    }
}

/// Client to backend: every byte the accepted socket gets (what the program passed, then the
/// client's FIN) is copied to the server socket in order; the program redirects again only
/// once the count written here equals what it passed.
pub(super) fn step_sends(
    cs: &ClientSocket,
    conn: &mut Conn,
    route: &ClientRoute,
) -> Result<(), CloseReason> {
    let decide = |dir: &mut Direction, last, _look| {
        let facts = SendFacts {
            held: dir.held(),
            last,
        };
        Ok(direction::sends_step(dir.state, &facts))
    };
    drive(conn, 0, decide, |forwarded| {
        cs.set_forwarded(
            &route.key,
            route.server,
            route.client,
            route.from_client + forwarded,
            route.to_server + forwarded,
        )
        .map_err(|e| {
            tracing::debug!(error = %e, "client-socket route update failed");
            CloseReason::Error
        })
    })
}

fn mode(m: ReplyMode) -> Mode {
    match m {
        ReplyMode::Kernel => Mode::Kernel,
        ReplyMode::User => Mode::User,
        ReplyMode::Draining => Mode::Draining,
        ReplyMode::Failed => Mode::Failed,
    }
}

/// Backend to client: while the program pauses the replies (the client stopped reading),
/// they wait in the server socket's queue; once the client's backlog drained, this copies
/// them through the accepted socket within the allowance the program sets. The server's end
/// follows once every reply before it reached the client.
pub(super) fn step_replies(
    cs: &ClientSocket,
    conn: &mut Conn,
    route: &ClientRoute,
) -> Result<(), CloseReason> {
    let (source, _) = conn.ends(1);
    let decide = |dir: &mut Direction, last, look: bool| {
        // Read with the bytes in hand: a pause lowers the allowance before the bytes it
        // holds back are queued.
        let r = cs.reply(route.server).ok_or(CloseReason::Error)?;
        if r.mode != ReplyMode::Kernel && !dir.clamped {
            // Paused: the server socket's receive buffer now holds the replies; fix it at
            // the limit so a stalled client costs a bounded amount.
            if let Err(e) = crate::sys::set_receive_buffer(source, cs.recv_limit()) {
                tracing::debug!(error = %e, "kernel path: cannot fix the receive buffer");
            }
            dir.clamped = true;
        }
        let backlog_delivered = if look {
            let probe = cs.probe(route.server).map_err(|e| {
                tracing::debug!(error = %e, "client-socket probe failed");
                CloseReason::Error
            })?;
            Some(probe.is_none_or(|p| p.delivered))
        } else {
            None
        };
        let facts = ReplyFacts {
            mode: mode(r.mode),
            held: dir.held(),
            passed: r.passed,
            forwarded: dir.forwarded,
            allow: r.allow,
            fin: r.fin,
            delivered: r.delivered,
            backlog_delivered,
            last,
        };
        Ok(direction::replies_step(dir.state, &facts))
    };
    drive(conn, 1, decide, |forwarded| {
        cs.set_reply_written(route.server, forwarded)
            .map_err(|_| CloseReason::Error)
    })
}

/// Whether a client-socket connection's end has waited [`STALL_LIMIT`] with nothing moving
/// while the client holds nothing unread (it waits for the proxy, not the other way round).
/// Keeps the connection's stall record.
pub(super) fn stalled(
    cs: &ClientSocket,
    conn: &mut Conn,
    route: &ClientRoute,
    now: Instant,
) -> bool {
    let waiting_end = matches!(conn.dirs[1].state, DirState::Live { end: Some(_), .. });
    if !waiting_end
        || cs
            .probe(route.server)
            .ok()
            .flatten()
            .is_some_and(|p| p.held)
    {
        conn.stall = None;
        return false;
    }
    let state: StallState = (
        conn.dirs[0].forwarded,
        conn.dirs[1].forwarded,
        cs.reply(route.server),
    );
    match &conn.stall {
        Some((since, was)) if *was == state => now.duration_since(*since) >= STALL_LIMIT,
        _ => {
            conn.stall = Some((now, state));
            false
        }
    }
}

/// Logs a connection cut by [`stalled`].
pub(super) fn log_stalled(cs: &ClientSocket, conn: &Conn, route: &ClientRoute, peer: SocketAddr) {
    tracing::warn!(
        client = %peer,
        backend = %conn.backend.addr,
        server_reset = conn.dirs[1].state.source_reset(),
        reply = ?cs.reply(route.server),
        stalled_total = cs.stats().stalled,
        "the server side ended but its end never reached the client: cutting the connection"
    );
}
