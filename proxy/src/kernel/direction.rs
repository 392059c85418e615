//! One direction of a kernel-forwarded connection as a state machine, without I/O.
//!
//! A direction is named by the socket it reads from (its source) and delivers to the other
//! socket of the connection (its target). The kernel moves its bytes; the thread steps in
//! for what the kernel passes up (a paused direction, bytes sent before the route) and for
//! the end: a FIN goes on to the target only once every byte before it is there, and a reset
//! cuts the connection once the bytes before it are out.
//!
//! The executors (`pair.rs`, `client_socket.rs`) gather the facts (the program's counters,
//! the sockets' TCP counters, what the last read or write returned), ask a step function of
//! this module what to do, do it and ask again until the answer is to wait or to end. Every
//! transition is here, tested from tables in `proxy/testdata/direction/` (a FIN, a reset and
//! a peer's reset in every state, on every path) without a socket.

use crate::metrics::CloseReason;

/// How a direction's source ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Its FIN: the target is half-closed after the last byte.
    Fin,
    /// A reset (or a socket error): once the bytes before it are out, the connection is cut.
    Reset,
}

/// Who moves a live direction's bytes now, and so what the thread waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// The kernel: the thread only watches for the end.
    Kernel,
    /// The thread reads the source (woken by EPOLLIN).
    Reading,
    /// The thread holds bytes and the target is full (woken by the target's EPOLLOUT).
    Blocked,
    /// A kernel queue must drain first, which nothing reports: a timed retry.
    Behind,
    /// The program reports when it may go on (an event from the client-socket program).
    Parked,
}

/// The state of one direction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    /// Bytes may still move. `end`: how the source ended, when it did (its last bytes may
    /// still be on their way); `eof_read`: a read of the source returned end of file, so
    /// every byte it received has been read.
    Live {
        flow: Flow,
        end: Option<End>,
        eof_read: bool,
    },
    /// Done: after a FIN the target was half-closed behind the last byte; after a reset the
    /// last bytes are out and the connection is to be cut.
    Shut(End),
    /// The target was reset: nothing more can be delivered this way.
    Dead,
}

impl DirState {
    /// A direction as the kernel takes it over.
    pub const START: DirState = DirState::Live {
        flow: Flow::Kernel,
        end: None,
        eof_read: false,
    };

    /// Whether the source was reset.
    pub fn source_reset(self) -> bool {
        matches!(
            self,
            DirState::Shut(End::Reset)
                | DirState::Live {
                    end: Some(End::Reset),
                    ..
                }
        )
    }

    /// Whether the source ended (its end may not have reached the target yet).
    pub fn ended(self) -> bool {
        !matches!(self, DirState::Live { end: None, .. })
    }

    /// What the thread waits for in this state.
    pub fn flow(self) -> Option<Flow> {
        match self {
            DirState::Live { flow, .. } => Some(flow),
            DirState::Shut(_) | DirState::Dead => None,
        }
    }

    /// Whether the direction is done (shut or dead).
    pub fn done(self) -> bool {
        !matches!(self, DirState::Live { .. })
    }
}

/// What epoll or the peer direction reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The source's FIN (EPOLLRDHUP or EPOLLHUP).
    Hangup,
    /// The source was reset, or a send on it failed (EPOLLERR).
    Reset,
    /// The target's own source was reset.
    PeerReset,
}

/// The state after an event.
pub fn on_event(state: DirState, event: Event) -> DirState {
    use DirState::*;
    match (state, event) {
        (
            Live {
                flow,
                end,
                eof_read,
            },
            Event::Hangup,
        ) => Live {
            flow,
            end: end.or(Some(End::Fin)),
            eof_read,
        },
        (Live { flow, eof_read, .. }, Event::Reset) => Live {
            flow,
            end: Some(End::Reset),
            eof_read,
        },
        // A reset after the FIN went on, or after the other side's reset: the connection
        // is cut, as a direct one would be.
        (Shut(_) | Dead, Event::Reset) => Shut(End::Reset),
        // Both sides reset: nothing can move either way, and the reset stays visible (the
        // other side's reset must not be taken for the only one).
        (
            Live {
                end: Some(End::Reset),
                ..
            },
            Event::PeerReset,
        ) => Shut(End::Reset),
        (Live { .. }, Event::PeerReset) => Dead,
        (s, _) => s,
    }
}

/// The program's state for a direction, on either path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Redirecting in the kernel.
    Kernel,
    /// Paused: the bytes go to the thread.
    User,
    /// Client-socket replies: a pause is ending, the client's backlog drains.
    Draining,
    /// A redirect failed.
    Failed,
}

/// What the executor's last read or write in this step returned, when it was not data moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The read returned end of file.
    Eof,
    /// The read found the source reset (ECONNRESET): nothing more to read, and its end is a
    /// reset.
    Reset,
    /// The read found nothing (EAGAIN).
    Empty,
    /// The write found the target full (EAGAIN).
    Full,
}

/// What the executor does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Read the source into the direction's buffer.
    Read,
    /// Write the buffer to the target (and tell the program how much went).
    Write,
    /// Gather the facts only needed at the end (`received`, `backlog_delivered`), then ask
    /// again.
    Look,
    /// Half-close the target after a FIN; after a reset, nothing (the connection is cut).
    Shut,
    /// Nothing to do until what the state's flow waits for.
    Wait,
    /// Cut the connection.
    Cut,
}

/// The pair path's facts about a direction (both proxy sockets in the sockmap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairFacts {
    pub mode: Mode,
    /// Bytes the thread holds for the target.
    pub held: u64,
    /// Bytes the program passed up to the thread, and how many of them the thread wrote.
    pub passed: u64,
    pub forwarded: u64,
    /// Bytes the program redirected to the target.
    pub redirected: u64,
    /// Bytes written to the target before the join, and in all (present once looked at).
    pub base: u64,
    pub written: Option<u64>,
    /// The source's data bytes received (its FIN not counted), once looked at.
    pub received: Option<u64>,
    /// Bytes of the source read by the worker before the join.
    pub base_recv: u64,
    pub last: Option<Outcome>,
}

/// The client-socket path's facts about the client's sends (those passed to the accepted
/// socket are copied by the thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendFacts {
    pub held: u64,
    pub last: Option<Outcome>,
}

/// The client-socket path's facts about the replies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyFacts {
    pub mode: Mode,
    pub held: u64,
    pub passed: u64,
    pub forwarded: u64,
    /// How many passed bytes the thread may have written so far (those passed after a pause
    /// wait for the client's backlog ahead of them).
    pub allow: u64,
    /// The program saw the server's FIN, and saw everything before it delivered.
    pub fin: bool,
    pub delivered: bool,
    /// The client's backlog holds nothing, once looked at.
    pub backlog_delivered: Option<bool>,
    pub last: Option<Outcome>,
}

fn live(flow: Flow, end: Option<End>, eof_read: bool) -> DirState {
    DirState::Live {
        flow,
        end,
        eof_read,
    }
}

/// The state as seen with the last outcome: a read's end of file is the source's FIN (unless
/// it was reset) and means every byte was read; so does a read that found the reset.
fn with_last(state: DirState, last: Option<Outcome>) -> Option<(Option<End>, bool)> {
    let DirState::Live { end, eof_read, .. } = state else {
        return None;
    };
    match last {
        Some(Outcome::Eof) => Some((end.or(Some(End::Fin)), true)),
        Some(Outcome::Reset) => Some((Some(End::Reset), true)),
        _ => Some((end, eof_read)),
    }
}

/// The pair path: collects and writes what the program passes up, behind everything it
/// redirected; forwards the end once every byte the source received before it reached the
/// target's queue.
pub fn pair_step(state: DirState, f: &PairFacts) -> (DirState, Action) {
    let Some((end, eof_read)) = with_last(state, f.last) else {
        return (state, Action::Wait);
    };
    if f.mode == Mode::Failed {
        return (state, Action::Cut);
    }
    // Passed-up bytes go out only behind everything the kernel took for the target.
    let ahead = f.base + f.redirected + f.forwarded;
    if f.held > 0 {
        let Some(written) = f.written else {
            return (live(Flow::Reading, end, eof_read), Action::Look);
        };
        return if written < ahead {
            (live(Flow::Behind, end, eof_read), Action::Wait)
        } else if f.last == Some(Outcome::Full) {
            (live(Flow::Blocked, end, eof_read), Action::Wait)
        } else {
            (live(Flow::Reading, end, eof_read), Action::Write)
        };
    }
    let pending = f.passed > f.forwarded;
    let flow = if !pending && f.mode != Mode::User {
        // Back in the kernel (or never left): nothing to collect.
        Flow::Kernel
    } else {
        match f.last {
            // Passed bytes on their way to the source's queue (behind the psock's backlog).
            Some(Outcome::Eof | Outcome::Reset | Outcome::Empty) if pending => {
                return (live(Flow::Behind, end, eof_read), Action::Wait);
            }
            Some(Outcome::Empty) if f.mode != Mode::User => Flow::Kernel,
            Some(Outcome::Eof | Outcome::Reset | Outcome::Empty) => Flow::Reading,
            _ => return (live(Flow::Reading, end, eof_read), Action::Read),
        }
    };
    let Some(end) = end else {
        return (live(flow, None, eof_read), Action::Wait);
    };
    let (Some(received), Some(written)) = (f.received, f.written) else {
        return (live(flow, Some(end), eof_read), Action::Look);
    };
    if f.redirected + f.passed + f.base_recv < received || pending || written < ahead {
        // The program has not seen the last bytes yet, or they are still in the target's
        // psock backlog.
        return (live(Flow::Behind, Some(end), eof_read), Action::Wait);
    }
    (DirState::Shut(end), Action::Shut)
}

/// The client-socket path, client to backend: every byte of the accepted socket (what the
/// program passed, then the client's FIN) is copied to the server socket in order.
pub fn sends_step(state: DirState, f: &SendFacts) -> (DirState, Action) {
    let Some((end, eof_read)) = with_last(state, f.last) else {
        return (state, Action::Wait);
    };
    if f.held > 0 {
        return if f.last == Some(Outcome::Full) {
            (live(Flow::Blocked, end, eof_read), Action::Wait)
        } else {
            (live(Flow::Reading, end, eof_read), Action::Write)
        };
    }
    if eof_read {
        return (DirState::Shut(end.unwrap_or(End::Fin)), Action::Shut);
    }
    match f.last {
        Some(Outcome::Empty) => (live(Flow::Reading, end, eof_read), Action::Wait),
        _ => (live(Flow::Reading, end, eof_read), Action::Read),
    }
}

/// The client-socket path, backend to client: replies go into the client socket in the
/// kernel; while paused they wait in the server socket and are copied through the accepted
/// socket within the program's allowance. The server's end follows once every reply before
/// it reached the client.
pub fn replies_step(state: DirState, f: &ReplyFacts) -> (DirState, Action) {
    let was_eof = matches!(state, DirState::Live { eof_read: true, .. });
    let Some((end, eof_read)) = with_last(state, f.last) else {
        return (state, Action::Wait);
    };
    if f.mode == Mode::Failed {
        return (state, Action::Cut);
    }
    if f.held > 0 {
        return if f.forwarded + f.held > f.allow {
            // Passed during a pause: waits (not reading) until the client's backlog ahead
            // of these bytes has drained; the program says so with an event.
            (live(Flow::Parked, end, eof_read), Action::Wait)
        } else if f.last == Some(Outcome::Full) {
            (live(Flow::Blocked, end, eof_read), Action::Wait)
        } else {
            (live(Flow::Reading, end, eof_read), Action::Write)
        };
    }
    let pending = f.passed > f.forwarded;
    let flow = match f.last {
        Some(Outcome::Eof | Outcome::Reset) if pending => {
            return (live(Flow::Behind, end, eof_read), Action::Wait);
        }
        Some(Outcome::Eof | Outcome::Reset) => Flow::Reading,
        _ if was_eof || (!pending && f.mode != Mode::User) => Flow::Kernel,
        Some(Outcome::Empty) if pending && f.mode == Mode::User => {
            // Passed behind the socket's backlog: queued by a kernel worker soon.
            return (live(Flow::Behind, end, eof_read), Action::Wait);
        }
        Some(Outcome::Empty) => Flow::Reading,
        _ => return (live(Flow::Reading, end, eof_read), Action::Read),
    };
    let Some(end) = end else {
        return (live(flow, None, eof_read), Action::Wait);
    };
    // A reset leaves no skb for the verdict, so the program never notes it. A read that
    // returned end of file after a reset took everything the server socket still held;
    // passed bytes not read by then went with the socket's psock, which the kernel drops at
    // the reset, and are not waited for.
    let reset = end == End::Reset;
    if pending && !(reset && eof_read) {
        let flow = if f.mode == Mode::User {
            Flow::Behind
        } else {
            Flow::Parked
        };
        return (live(flow, Some(end), eof_read), Action::Wait);
    }
    let delivered = match f.mode {
        Mode::Kernel if f.delivered => true,
        // The verdict saw the FIN (the program's timer reports the drained backlog; this
        // looks too, in case its event was lost) or never will (a reset): everything before
        // the end is in the client socket or its backlog.
        Mode::Kernel if f.fin || reset => match f.backlog_delivered {
            Some(d) => d,
            None => return (live(flow, Some(end), eof_read), Action::Look),
        },
        Mode::Kernel => false,
        Mode::User => eof_read,
        Mode::Draining | Mode::Failed => false,
    };
    if !delivered {
        // The program reports delivery with an event; retry anyway in case the FIN has not
        // reached it yet (and after a reset, which it never sees).
        return (live(Flow::Behind, Some(end), eof_read), Action::Wait);
    }
    (DirState::Shut(end), Action::Shut)
}

/// What becomes of a connection once both directions stepped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Keep it; `flush`: the client's reset waits for the client to acknowledge the last
    /// replies (a timed retry).
    Keep { flush: bool },
    /// Both directions are half-closed: close the sockets, counting who ended first.
    Close(CloseReason),
    /// Cut it.
    Cut(CloseReason),
}

/// The connection's fate from its directions' states (`[client to backend, backend to
/// client]`). `first_end`: the side whose source ended first. `flush_window`: the backend's
/// reset is recent enough for the client's reset to wait; `client_unacked`: whether the
/// client has not acknowledged every byte sent to it (asked only when it matters).
pub fn settle(
    dirs: [DirState; 2],
    first_end: Option<usize>,
    flush_window: bool,
    client_unacked: impl FnOnce() -> bool,
) -> Settle {
    if dirs.contains(&DirState::Shut(End::Reset)) {
        // After the backend's reset, the client's reset waits (briefly) for the client to
        // acknowledge the last replies: a reset would drop them.
        let flush =
            flush_window && dirs[1].source_reset() && !dirs[0].source_reset() && client_unacked();
        return if flush {
            Settle::Keep { flush: true }
        } else {
            Settle::Cut(CloseReason::Error)
        };
    }
    if dirs.iter().all(|d| matches!(d, DirState::Shut(End::Fin))) {
        return Settle::Close(match first_end {
            Some(1) => CloseReason::Backend,
            _ => CloseReason::Client,
        });
    }
    Settle::Keep { flush: false }
}

#[cfg(test)]
#[path = "direction_tests.rs"]
mod tests;
