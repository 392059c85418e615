//! The pair path's executor: both proxy sockets joined to the sockmap, the verdict redirects
//! between them. The thread collects what the program passes up (a paused direction, bytes
//! that arrived while the pair joined), writes it behind everything the kernel redirected,
//! and forwards each end once every byte before it is in the target's queue; the decisions
//! are `direction::pair_step`'s.

use tendril_ebpf::sockmap::{Joined, Mode as ProgramMode, Sockmap};

use super::conn::{Conn, Direction, cookie, drive};
use super::direction::{self, Mode, PairFacts};
use crate::metrics::CloseReason;
use crate::sys::{tcp_bytes, tcp_written};

fn mode(m: ProgramMode) -> Mode {
    match m {
        ProgramMode::Kernel | ProgramMode::Joining => Mode::Kernel,
        ProgramMode::User => Mode::User,
        ProgramMode::Failed => Mode::Failed,
    }
}

/// Moves direction `side` forward as far as it goes without waiting.
pub(super) fn step(
    map: &Sockmap,
    conn: &mut Conn,
    joined: &Joined,
    side: usize,
) -> Result<(), CloseReason> {
    let (source, target) = conn.ends(side);
    let cookie = cookie(joined, side);
    let base_recv = conn.base_recv[side];
    let err = |e: std::io::Error| {
        tracing::debug!(error = %e, "kernel path: socket call failed");
        CloseReason::Error
    };
    let decide = |dir: &mut Direction, last, look: bool| {
        let d = map.direction(cookie).ok_or(CloseReason::Error)?;
        if d.mode == ProgramMode::User && !dir.clamped {
            // Paused: from now on what the kernel holds for this direction is mostly the
            // source's receive buffer, which autotuning may have grown toward tcp_rmem's
            // maximum (32 MiB on these machines). Fix it at the limit so a stalled peer
            // costs a bounded amount whatever came before; autotuning stays off after.
            if let Err(e) = crate::sys::set_receive_buffer(source, d.limit) {
                tracing::debug!(error = %e, "kernel path: cannot fix the receive buffer");
            }
            dir.clamped = true;
        }
        let facts = PairFacts {
            mode: mode(d.mode),
            held: dir.held(),
            passed: d.passed,
            forwarded: dir.forwarded,
            redirected: d.redirected,
            base: d.base,
            written: look.then(|| tcp_written(target)).transpose().map_err(err)?,
            // tcpi_bytes_received counts the FIN's sequence number as one byte. (After a
            // reset without a FIN this ends the wait one byte early rather than never.)
            received: look
                .then(|| tcp_bytes(source).map(|b| b.received.saturating_sub(1)))
                .transpose()
                .map_err(err)?,
            base_recv,
            last,
        };
        Ok(direction::pair_step(dir.state, &facts))
    };
    drive(conn, side, decide, |forwarded| {
        map.set_forwarded(cookie, forwarded).map_err(err)
    })
}
