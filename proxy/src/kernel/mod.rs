//! The kernel path: connections whose established traffic the kernel forwards. Workers set
//! a connection up in userspace as usual (startup packet, SSLRequest answer, 57P03, hold),
//! then [`KernelPath::adopt`] chooses its path (`path`: on the client's own socket for a
//! client on this host, else both proxy sockets joined to the sockmap, else userspace) and
//! hands both sockets to this module's thread (`thread`), which:
//!
//! - closes connections in order: on a FIN from one side it waits until every byte that
//!   arrived before the FIN has left the kernel's queues for the peer socket, then
//!   half-closes the peer, so a client's Terminate is never overtaken by the FIN;
//! - forwards a direction itself while a program has paused it for backpressure (the program
//!   passes the bytes up; the thread writes them to the peer under ordinary TCP flow control,
//!   behind what the kernel already queued);
//! - fences: drops the connection from the maps and shuts both sockets at once;
//! - closes both sides on an error, a reset or a failed redirect (a reset's bytes first);
//! - counts each connection's bytes and close reason into its own block of the metrics.
//!
//! Each direction is a state machine without I/O (`direction`, table-tested); `pair` and
//! `client_socket` are its executors on the two kernel paths, `conn` what the thread holds.

mod client_socket;
mod conn;
pub mod direction;
mod moved;
mod pair;
pub mod path;
mod thread;

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use tendril_ebpf::client_socket::{ClientKey, ClientSocket};
use tendril_ebpf::sockmap::{JoinError, JoinRequest, Joined, Sockmap};

pub use client_socket::Candidate;
use client_socket::ClientRoute;
use path::JoinFailure;
use thread::Thread;

use crate::routing::Backend;
use crate::shared::Shared;
use crate::sys::{dup, tcp_written};

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
    /// The client-socket path cannot take it and the pair path is not selectable
    /// (`--forwarding auto`); the reason's label.
    #[error("{0}: userspace")]
    Declined(&'static str),
}

/// How the kernel forwards a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Both proxy sockets joined `peers`: the verdict redirects between them.
    Pair(Joined),
    /// Routed on the client's own socket (a client in the proxy's namespace).
    ClientSocket(ClientRoute),
}

/// What the worker knows of the client when it hands the connection over.
#[derive(Debug, Clone, Copy)]
pub enum Candidacy {
    /// Not a candidate for the client-socket path: on another host or namespace, or the
    /// client-socket programs are off.
    Elsewhere,
    /// On this host, but it sent nothing within the wait for its first bytes (it was
    /// released already).
    Silent,
    /// On this host, its first bytes went through the program.
    Ready(Candidate),
}

/// A joined pair on its way to the thread.
struct Handoff {
    fds: [OwnedFd; 2],
    kind: Kind,
    base_recv: [u64; 2],
    backend: Backend,
    peer: SocketAddr,
    /// What the thread of the process this one took over from had written each way (a
    /// connection it handed over; zero for a new one).
    forwarded: [u64; 2],
    /// Told once the thread holds the connection (or cut it): a handed-over connection's
    /// answer to the old process waits for it.
    adopted: Option<mpsc::Sender<()>>,
}

/// What the handover asks of the kernel-path thread (see `crate::handover`).
enum Command {
    /// Stop reading the event ring (answered once it stopped): the taker reads it next.
    YieldEvents(mpsc::Sender<()>),
    /// Read it again: the taker did not take the maps after all.
    ResumeEvents,
    /// Send the connections at rest on these paths to the taker on this stream.
    Move(std::os::unix::net::UnixStream, Adopts),
    /// The process taken over is gone: remove what it left in the shared maps.
    Sweep,
}

/// The handover's handle on the kernel-path thread. Unlike [`KernelPath`], holding one
/// does not keep the thread from stopping.
#[derive(Clone, Debug)]
pub struct Control {
    tx: mpsc::Sender<Command>,
    wake: Arc<OwnedFd>,
}

impl Control {
    fn send(&self, command: Command) -> bool {
        if self.tx.send(command).is_err() {
            return false;
        }
        wake(self.wake.as_raw_fd());
        true
    }

    /// Stops the thread reading the event ring; false when it did not confirm in time.
    pub fn yield_events(&self) -> bool {
        let (tx, rx) = mpsc::channel();
        self.send(Command::YieldEvents(tx))
            && rx.recv_timeout(std::time::Duration::from_secs(2)).is_ok()
    }

    /// Has the thread read the event ring again.
    pub fn resume_events(&self) {
        self.send(Command::ResumeEvents);
    }

    /// Has the thread remove, from the maps shared with the process taken over (now gone),
    /// the entries of connections nobody holds (see `thread::moving`'s sweep).
    pub fn sweep(&self) {
        self.send(Command::Sweep);
    }

    /// Has the thread send its connections at rest on the paths `adopts` names to the taker
    /// on `stream`.
    pub fn move_connections(&self, stream: std::os::unix::net::UnixStream, adopts: Adopts) {
        self.send(Command::Move(stream, adopts));
    }
}

/// Removes every trace of a connection from the maps of its path.
fn forget(kind: Kind, pair: Option<&Sockmap>, cs: Option<&ClientSocket>) {
    match (kind, pair, cs) {
        (Kind::Pair(joined), Some(map), _) => map.forget(&joined),
        (Kind::ClientSocket(r), _, Some(cs)) => cs.forget(&r.key, &r.backend, r.server),
        _ => {}
    }
}

/// Wakes the thread through its eventfd.
fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from `one` to the eventfd.
    unsafe {
        libc::write(fd, (&one as *const u64).cast(), 8);
    }
}

/// The workers' handle on the kernel path.
#[derive(Debug)]
pub struct KernelPath {
    /// The pair path's program and maps, when the pair path is selectable (`--forwarding
    /// kernel`); else what the client-socket path cannot take stays in userspace, and the
    /// pair programs are not loaded at all.
    pair: Option<Arc<Sockmap>>,
    client_socket: Option<Arc<ClientSocket>>,
    limit: u64,
    tx: mpsc::Sender<Handoff>,
    wake: OwnedFd,
    shared: Arc<Shared>,
    index: usize,
    control: Control,
    adopts: Adopts,
}

/// Which programs this process loaded with the maps of the process it took over from: the
/// connections it can adopt from there ([`KernelPath::adopt_moved`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adopts {
    /// The pair path's.
    pub pair: bool,
    /// The client-socket path's.
    pub client_socket: bool,
}

impl Adopts {
    /// Whether any path is adopted.
    pub fn any(self) -> bool {
        self.pair || self.client_socket
    }

    /// The paths as the handover's `ready adopt` line names them.
    pub fn words(self) -> String {
        let mut w = Vec::new();
        if self.pair {
            w.push("pair");
        }
        if self.client_socket {
            w.push("client_socket");
        }
        w.join(",")
    }

    /// Reads [`Adopts::words`]; unknown names are ignored (a newer taker's paths).
    pub fn from_words(words: &str) -> Adopts {
        let has = |name: &str| words.split(',').any(|w| w.trim() == name);
        Adopts {
            pair: has("pair"),
            client_socket: has("client_socket"),
        }
    }
}

impl KernelPath {
    /// Starts the thread. `index` is its counter block in `shared.workers`; `fence` the
    /// socket the control thread writes to after publishing a table; `pair` the pair path's
    /// programs, when it is selectable. At least one of `pair` and `client_socket` is given.
    pub fn start(
        (pair, client_socket, adopts): (Option<Sockmap>, Option<ClientSocket>, Adopts),
        limit: u64,
        shared: Arc<Shared>,
        index: usize,
        fence: std::os::unix::net::UnixStream,
    ) -> io::Result<(Arc<KernelPath>, std::thread::JoinHandle<()>)> {
        let pair = pair.map(Arc::new);
        let cs = client_socket.map(Arc::new);
        // SAFETY: eventfd returns a new descriptor or -1.
        let wake = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `wake` is a fresh descriptor owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(wake) };
        let (tx, rx) = mpsc::channel();
        let (control_tx, control_rx) = mpsc::channel();
        let control = Control {
            tx: control_tx,
            wake: Arc::new(dup(wake.as_raw_fd())?),
        };
        let thread = Thread::new(
            pair.clone(),
            cs.clone(),
            (rx, control_rx),
            dup(wake.as_raw_fd())?,
            fence,
            shared.clone(),
            index,
        )?;
        let handle = std::thread::Builder::new()
            .name("tendril-kernel".into())
            .spawn(move || thread.run())?;
        Ok((
            Arc::new(KernelPath {
                pair,
                client_socket: cs,
                limit,
                tx,
                wake,
                shared,
                index,
                control,
                adopts,
            }),
            handle,
        ))
    }

    /// The handover's handle on the thread.
    pub fn control(&self) -> Control {
        self.control.clone()
    }

    /// Adopts a connection the process this one took over from handed over (a `conn` line
    /// of the handover, with its accepted and server sockets). It is checked against the
    /// sockets and the shared maps first; `Ok` once the thread holds it.
    pub fn adopt_moved(&self, line: &str, fds: Vec<OwnedFd>) -> Result<(), String> {
        let m = moved::Moved::decode(line).map_err(|e| e.to_string())?;
        let fds: [OwnedFd; 2] = fds
            .try_into()
            .map_err(|_| "a connection comes with two sockets".to_owned())?;
        let (client, server) = (fds[0].as_raw_fd(), fds[1].as_raw_fd());
        let cookie = |fd| tendril_ebpf::sockopt::cookie(fd).ok();
        // The sockets' cookies name them for good; their addresses and the client socket's
        // entry only while they are connected: a connection that ended on its way is still
        // taken (the thread sees its end and closes it), never one that is someone else's.
        let (checks, what): (Vec<bool>, &[&str]) = match (m.kind, &self.pair, &self.client_socket) {
            (Kind::ClientSocket(r), _, Some(cs)) if self.adopts.client_socket => {
                let addressed = |got: io::Result<ClientKey>, want: ClientKey| match got {
                    Ok(k) => k == want,
                    Err(e) => e.raw_os_error() == Some(libc::ENOTCONN),
                };
                (
                    vec![
                        cookie(server) == Some(r.server),
                        addressed(ClientKey::of_accepted(client), r.key),
                        addressed(ClientKey::of_connected(server), r.backend),
                        cs.client_cookie(&r.key).is_none_or(|c| c == r.client),
                        cs.reply(r.server).is_some(),
                    ],
                    &[
                        "the server socket's cookie",
                        "the accepted socket's addresses",
                        "the server socket's addresses",
                        "the client socket in the shared maps",
                        "the reply direction in the shared maps",
                    ],
                )
            }
            (Kind::Pair(j), Some(map), _) if self.adopts.pair => (
                vec![
                    cookie(client) == Some(j.client),
                    cookie(server) == Some(j.server),
                    map.direction(j.client).is_some() && map.direction(j.server).is_some(),
                ],
                &[
                    "the client socket's cookie",
                    "the server socket's cookie",
                    "the directions in the shared maps",
                ],
            ),
            _ => return Err("not loaded with the old process's maps for its path".into()),
        };
        if let Some(i) = checks.iter().position(|ok| !ok) {
            return Err(format!("{} do not match the record", what[i]));
        }
        let on_client_socket = matches!(m.kind, Kind::ClientSocket(_));
        let metrics = &self.shared.workers[self.index];
        metrics.kernel_held(on_client_socket);
        let (tx, rx) = mpsc::channel();
        let handoff = Handoff {
            fds,
            kind: m.kind,
            base_recv: m.base_recv,
            backend: m.backend,
            peer: m.peer,
            forwarded: m.forwarded,
            adopted: Some(tx),
        };
        if self.tx.send(handoff).is_err() {
            metrics.kernel_released(on_client_socket);
            return Err("the kernel path has stopped".into());
        }
        wake(self.wake.as_raw_fd());
        // The thread answers once it holds the connection; if it stops first, the handoff
        // is dropped unread and so is the sender: the old process keeps it then.
        rx.recv().map_err(|_| {
            metrics.kernel_released(on_client_socket);
            "the kernel-path thread stopped before it took it".to_owned()
        })
    }

    /// Whether the pair path is selectable.
    pub fn pair(&self) -> bool {
        self.pair.is_some()
    }

    /// The pair path's program and its maps, when it is selectable (stats, tests).
    pub fn pair_map(&self) -> Option<&Arc<Sockmap>> {
        self.pair.as_ref()
    }

    /// The client-socket programs, when they loaded.
    pub fn client_socket(&self) -> Option<&Arc<ClientSocket>> {
        self.client_socket.as_ref()
    }

    /// The client connected to the accepted socket `client`, when it is in this network
    /// namespace and its socket joined the client sockhash at connect. The caller hands it
    /// over ([`KernelPath::adopt`]) only after the client's first bytes went through the
    /// program (before the route), which is where the program learns how the client reads;
    /// or it gives the client back with [`KernelPath::release`].
    pub fn candidate(&self, client: RawFd) -> Option<Candidate> {
        let cs = self.client_socket.as_ref()?;
        let key = ClientKey::of_accepted(client).ok()?;
        let cookie = cs.client_cookie(&key)?;
        Some(Candidate { key, cookie })
    }

    /// Called by each worker thread at start: a backend on this host then recognises the
    /// worker's connections (see `tendril_ebpf::client_socket`'s direct replies).
    pub fn register_worker_thread(&self) {
        if let Some(cs) = &self.client_socket
            && let Err(e) = cs.add_connecting_thread()
        {
            tracing::warn!(error = %e, "cannot register the worker thread: replies from a backend on this host take the proxy's server socket");
        }
    }

    /// Takes a candidate the client-socket path will not forward out of the client
    /// sockhash: its socket is an ordinary TCP socket again.
    pub fn release(&self, client: &Candidate) {
        if let Some(cs) = &self.client_socket {
            cs.release_client(&client.key);
        }
    }

    /// Chooses the connection's path ([`path::choose`], counted by its reason) and hands it
    /// to the thread; from here on the kernel forwards it and the caller must forget both
    /// sockets (drop its handles without touching them). `consumed_from_client` is what the
    /// caller read from the client and already dealt with (the startup packet it wrote to
    /// the backend on a held connection). On `MapFull` and `Refused` nothing changed: the
    /// caller forwards in userspace.
    pub fn adopt(
        &self,
        client: RawFd,
        server: RawFd,
        consumed_from_client: u64,
        peer: SocketAddr,
        backend: &Backend,
        candidacy: Candidacy,
    ) -> Result<(), AdoptError> {
        let candidate = match candidacy {
            Candidacy::Ready(c) => Some(c),
            Candidacy::Elsewhere | Candidacy::Silent => None,
        };
        // How a backend on this host keys the connection (only with the client-socket
        // programs loaded): for the route, or to release its socket.
        let backend_key = match self
            .client_socket
            .as_ref()
            .map(|_| ClientKey::of_connected(server))
        {
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => {
                tracing::debug!(client = %peer, error = %e, "server socket without addresses");
                None
            }
            None => None,
        };
        let mut facts = path::Facts {
            programs: self.client_socket.is_some(),
            on_host: !matches!(candidacy, Candidacy::Elsewhere),
            silent: matches!(candidacy, Candidacy::Silent),
            server_keyed: backend_key.is_some(),
            blocks: match (&self.client_socket, &candidate) {
                // A blocking reader could get EAGAIN from the kernel on the client-socket
                // path (see ClientSocket::client_blocks).
                (Some(l), Some(c)) => l.client_blocks(&c.key),
                _ => false,
            },
            ..path::Facts::default()
        };
        // Everything that can fail without consequence comes before the join: once joined,
        // the kernel may already be forwarding.
        let mut error = None;
        let fds = if path::choose(&facts).path(self.pair()) == path::Path::Userspace {
            None // nothing to hand over
        } else {
            match dup(client).and_then(|c| Ok([c, dup(server)?])) {
                Ok(fds) => Some(fds),
                Err(e) => {
                    facts.join = Some(JoinFailure::Refused);
                    error = Some(AdoptError::Refused(e));
                    None
                }
            }
        };
        let (reason, kind) = loop {
            let reason = path::choose(&facts);
            match (
                reason.path(self.pair()),
                &self.client_socket,
                candidate,
                backend_key,
            ) {
                (path::Path::ClientSocket, Some(cs), Some(c), Some(b)) => {
                    match self.route(cs, client, server, consumed_from_client, c, b) {
                        Ok(route) => break (reason, Some(Kind::ClientSocket(route))),
                        Err(e) => {
                            tracing::debug!(client = %peer, error = %e, "client-socket route refused");
                            facts.route_refused = true;
                        }
                    }
                }
                (path::Path::ClientSocket, ..) => facts.route_refused = true,
                (path::Path::Pair, ..) => match self.join(client, server) {
                    Ok(joined) => break (reason, Some(Kind::Pair(joined))),
                    Err(e) => {
                        facts.join = Some(match e {
                            AdoptError::MapFull => JoinFailure::MapFull,
                            _ => JoinFailure::Refused,
                        });
                        error = Some(e);
                    }
                },
                (path::Path::Userspace, ..) => break (reason, None),
            }
        };
        self.shared.kernel_paths[reason.index()].fetch_add(1, Ordering::Relaxed);
        if !matches!(kind, Some(Kind::ClientSocket(_))) {
            // The client-socket path does not take it: the client's socket is an ordinary
            // one again, and a backend on this host needs no program for its sends.
            if let Some(c) = &candidate {
                self.release(c);
            }
            if let (Some(l), Some(b)) = (&self.client_socket, &backend_key) {
                l.release_backend(b);
            }
        }
        let (Some(kind), Some(fds)) = (kind, fds) else {
            tracing::debug!(client = %peer, backend = %backend.addr, reason = reason.label(), "kept in userspace");
            return Err(error.unwrap_or(AdoptError::Declined(reason.label())));
        };
        tracing::debug!(client = %peer, backend = %backend.addr, path = reason.path(self.pair()).label(), reason = reason.label(), "connection forwarded in the kernel");
        let metrics = &self.shared.workers[self.index];
        let on_client_socket = matches!(kind, Kind::ClientSocket(_));
        metrics.kernel_held(on_client_socket);
        let handoff = Handoff {
            fds,
            kind,
            base_recv: [consumed_from_client, 0],
            backend: backend.clone(),
            peer,
            forwarded: [0, 0],
            adopted: None,
        };
        if let Err(mpsc::SendError(h)) = self.tx.send(handoff) {
            forget(h.kind, self.pair.as_deref(), self.client_socket.as_deref());
            for fd in &h.fds {
                crate::sys::shutdown_both(fd.as_raw_fd());
            }
            metrics.kernel_released(on_client_socket);
            return Err(AdoptError::Stopped);
        }
        wake(self.wake.as_raw_fd());
        Ok(())
    }

    /// Joins both sockets to the sockmap: the verdict redirects between them from here on.
    fn join(&self, client: RawFd, server: RawFd) -> Result<Joined, AdoptError> {
        let Some(map) = &self.pair else {
            return Err(AdoptError::Declined("the pair path is not selectable"));
        };
        let written_to_client = tcp_written(client).map_err(AdoptError::Refused)?;
        let written_to_server = tcp_written(server).map_err(AdoptError::Refused)?;
        map.join(&JoinRequest {
            client,
            server,
            written_to_client,
            written_to_server,
            limit: self.limit,
        })
        .map_err(|e| match e {
            JoinError::MapFull => AdoptError::MapFull,
            JoinError::Refused(e) => AdoptError::Refused(e),
        })
    }
}
