//! Listener handover: a new `tendril-proxy --takeover` receives the running process's
//! listening sockets (the same kernel sockets, over `SCM_RIGHTS`), serves on them once it has
//! read its routing table, and only then does the old process stop accepting. The sockets
//! never close, so no client's connect is refused or reset at any moment of a restart or an
//! upgrade; the old process finishes the connections it has, then exits.
//!
//! Every proxy answers on an abstract Unix socket named after its listen address
//! ([`name`]): abstract, so nothing is left on disk after a kill -9, and per network
//! namespace like the address itself. Only a process of the same user (or root) is answered
//! (`SO_PEERCRED`): the listening sockets carry every client of the host.
//!
//! The exchange, one line each way plus the descriptors:
//! 1. new → old: `takeover v1`
//! 2. old → new: `listeners N UID CLUSTER R` with N descriptors attached (UID: the old
//!    process's proxy uid; a taker with the same `--uid` takes another, [`successor_uid`],
//!    so that each process acknowledges fences for its own connections only; CLUSTER: the
//!    cluster it serves, which must be the taker's; R, absent in older versions: how many
//!    of the N, at the end, are the read-only listener's. A taker whose read-only address
//!    differs closes its copies of those and binds its own)
//! 3. new → old: `ready`, once its routing table is read. The old process stops capturing
//!    new local clients in its kernel programs and starts its drain (it stops accepting).
//! 4. old → new: `stopped`. Only then does the new process accept: a local client it
//!    accepts was captured by its own programs, or by the old process's on maps it shares.
//!    (Clients the old process still accepts meanwhile are its own.)
//!
//! Kernel-forwarded connections move too, when both processes load the same BPF objects with
//! the same settings: the old process then adds `kernel FINGERPRINT` to its `listeners` line
//! (older takers read no further than R). A taker with the same fingerprint asks `maps`
//! before it loads its programs; the old process stops reading the programs' event rings
//! (each has one reader) and answers `maps K NAME,...` with the K map descriptors, which the
//! taker loads with (`maps 0 -` when it cannot share them). It says `ready adopt PATHS`
//! (`pair`, `client_socket`: the paths it loaded on those maps) instead of `ready`, and after
//! `stopped` the old process sends each of those paths' connections at rest as a `conn` line
//! (`crate::kernel::moved`) with its two sockets; the taker answers each with `adopted` once
//! its kernel thread holds it (or `refused`). A taker whose fingerprint differs says
//! `ready`: the old process drains its connections, as an older one does.
//!
//! A new process that dies before `ready` (EOF) changes nothing: the old one keeps serving
//! and answers the next taker.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

mod kernel;
pub use kernel::{Incoming, KernelShare};

const REQUEST: &str = "takeover v1";
const READY: &str = "ready";
const READY_ADOPT: &str = "ready adopt ";
const STOPPED: &str = "stopped";
const MAPS: &str = "maps";
/// The taker's answer to a `conn` line: its kernel thread holds the connection.
pub const ADOPTED: &str = "adopted";
/// The taker's answer to a `conn` line it could not take: the old process keeps it.
pub const REFUSED: &str = "refused";
/// Most listening sockets one exchange carries (one per worker).
const MAX_LISTENERS: usize = 256;
/// How long either side waits for the other's line during the exchange (not for `ready`).
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a proxy tries to take its handover name while the one it replaced holds it.
const RETRY: Duration = Duration::from_millis(20);

/// Why a takeover failed (the new process does not start; the old one is unaffected).
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// No running proxy answers for this listen address.
    #[error(
        "--takeover: no running tendril-proxy answers for {listen} (handover socket @{name}): {source}"
    )]
    NoneRunning {
        /// The listen address.
        listen: SocketAddr,
        /// The abstract socket's name.
        name: String,
        /// Why the connect failed.
        source: std::io::Error,
    },
    /// The exchange broke off or made no sense.
    #[error("--takeover from the proxy on {listen}: {detail}")]
    Exchange {
        /// The listen address.
        listen: SocketAddr,
        /// What went wrong.
        detail: String,
    },
}

/// Starts this program again with the same arguments plus `--takeover`; returns its pid.
/// The program is found as it was started (a relative path against the working directory,
/// a bare name on `PATH`), so a binary replaced on disk is the one that runs. Its exit, if it
/// fails before taking over, is logged.
pub fn reexec() -> std::io::Result<u32> {
    let mut args = std::env::args_os();
    let program = args
        .next()
        .ok_or_else(|| std::io::Error::other("no program name in argv"))?;
    let program = if std::path::Path::new(&program).components().count() > 1 {
        std::path::absolute(&program)?.into_os_string()
    } else {
        program
    };
    let args = without_takeover(args);
    let mut child = std::process::Command::new(&program)
        .args(&args)
        .arg("--takeover")
        .stdin(std::process::Stdio::null())
        .spawn()?;
    let pid = child.id();
    std::thread::Builder::new()
        .name("reexec".into())
        .spawn(move || {
            if let Ok(status) = child.wait()
                && !status.success()
            {
                tracing::error!(pid, %status, "the new process exited with an error");
            }
        })?;
    Ok(pid)
}

/// `args` without their `--takeover` flag (`--takeover`, `--takeover=MODE` or
/// `--takeover MODE`): the new process gets a plain `--takeover`.
fn without_takeover(args: impl Iterator<Item = std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    let mut out = Vec::new();
    let mut args = args.peekable();
    while let Some(arg) = args.next() {
        if arg == "--takeover" {
            let mode = args.peek().and_then(|v| v.to_str()).is_some_and(|v| {
                <crate::config::Takeover as clap::ValueEnum>::from_str(v, false).is_ok()
            });
            if mode {
                args.next();
            }
        } else if !arg.to_string_lossy().starts_with("--takeover=") {
            out.push(arg);
        }
    }
    out
}

/// The abstract socket name a proxy listening on `listen` answers takeovers on.
pub fn name(listen: SocketAddr) -> String {
    format!("tendril-proxy/{listen}")
}

/// The exchange with the proxy whose listening sockets this process took: [`Taken::ready`]
/// tells it to stop accepting.
#[derive(Debug)]
pub struct Taken {
    /// The old process's proxy uid.
    pub uid: String,
    /// The fingerprint of the old process's client-socket programs, when it can hand its
    /// kernel-forwarded connections over (`tendril_ebpf::client_socket::fingerprint`).
    pub kernel: Option<String>,
    stream: UnixStream,
}

impl Taken {
    /// Whether the old process is gone (it closed its end: exited or killed) before this
    /// one was ready: nobody else accepts on the sockets then.
    pub fn old_gone(&self) -> bool {
        let mut byte = [0u8; 1];
        let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
        matches!(
            nix::sys::socket::recv(self.stream.as_raw_fd(), &mut byte, flags),
            Ok(0) | Err(nix::errno::Errno::ECONNRESET)
        )
    }

    /// Asks for the old process's kernel maps (only when [`Taken::kernel`] is this process's
    /// fingerprint): it stops reading their event rings before it sends them.
    pub fn inherit(&mut self) -> std::io::Result<tendril_ebpf::Inherited> {
        self.stream.write_all(format!("{MAPS}\n").as_bytes())?;
        self.stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
        let (line, fds) = receive(&self.stream)?;
        self.stream.set_read_timeout(None)?;
        kernel::inherited(&line, fds)
    }

    /// Tells the old process that this one serves; returns once it has stopped capturing
    /// and accepting (`stopped`), or after [`EXCHANGE_TIMEOUT`] without an answer (it hangs
    /// or died: this process accepts anyway). With `adopt` (the paths this process loaded on
    /// the old one's maps), the old process's connections on them then arrive on the
    /// returned stream.
    pub fn ready(
        mut self,
        adopt: Option<crate::kernel::Adopts>,
    ) -> std::io::Result<Option<Incoming>> {
        let line = match adopt {
            Some(a) => format!("{READY_ADOPT}{}\n", a.words()),
            None => format!("{READY}\n"),
        };
        self.stream.write_all(line.as_bytes())?;
        self.stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
        let mut incoming = Incoming::new(self.stream);
        match incoming.next_line()? {
            Some((line, _)) if line == STOPPED => Ok(adopt.map(|_| incoming)),
            other => Err(std::io::Error::other(format!(
                "the old proxy answered {:?} instead of {STOPPED:?}",
                other.map(|(l, _)| l)
            ))),
        }
    }
}

/// The listening sockets taken from a running proxy, as its workers used them.
#[derive(Debug)]
pub struct Listeners {
    /// On the listen address.
    pub primary: Vec<std::net::TcpListener>,
    /// On the read-only listen address, when the running proxy had the one this proxy has.
    pub read_only: Vec<std::net::TcpListener>,
}

/// Takes the listening sockets of the proxy running on `listen` (and those of its read-only
/// listener when it is on `read_only`).
pub fn take(
    listen: SocketAddr,
    read_only: Option<SocketAddr>,
    cluster: &str,
) -> Result<(Listeners, Taken), HandoverError> {
    let exchange = |detail: String| HandoverError::Exchange { listen, detail };
    let name = name(listen);
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| exchange(e.to_string()))?;
    // A proxy that took over a moment ago answers once the one it replaced has gone (the
    // name is free then): while something listens on the address, wait a little for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut stream = loop {
        match UnixStream::connect_addr(&addr) {
            Ok(stream) => break stream,
            Err(_) if listened_on(listen) && std::time::Instant::now() < deadline => {
                std::thread::sleep(RETRY);
            }
            Err(source) => {
                return Err(HandoverError::NoneRunning {
                    listen,
                    name: name.clone(),
                    source,
                });
            }
        }
    };
    stream
        .set_read_timeout(Some(EXCHANGE_TIMEOUT))
        .map_err(|e| exchange(e.to_string()))?;
    stream
        .write_all(format!("{REQUEST}\n").as_bytes())
        .map_err(|e| exchange(format!("cannot send the request: {e}")))?;
    let (line, fds) = receive(&stream).map_err(|e| exchange(format!("no answer: {e}")))?;
    let mut words = line.split(' ');
    let head = (words.next(), words.next(), words.next(), words.next());
    let read_only_count = words.next().map_or(Some(0), |r| r.parse::<usize>().ok());
    let kernel = match (words.next(), words.next()) {
        (Some("kernel"), Some(fingerprint)) => Some(fingerprint.to_owned()),
        _ => None,
    };
    let expected = match (head, read_only_count) {
        ((Some("listeners"), Some(n), Some(uid), Some(theirs)), Some(r)) => n
            .parse::<usize>()
            .ok()
            .map(|n| (n, r, uid.to_owned(), theirs.to_owned())),
        _ => None,
    };
    let Some((_, read_only_count, uid, theirs)) =
        expected.filter(|(n, r, ..)| *n == fds.len() && *n > *r)
    else {
        return Err(exchange(format!(
            "unexpected answer {line:?} with {} descriptors",
            fds.len()
        )));
    };
    if theirs != cluster {
        // Dropping the descriptors closes only this process's copies.
        return Err(exchange(format!(
            "the proxy running there serves cluster {theirs:?}, not {cluster:?}"
        )));
    }
    let primary_count = fds.len() - read_only_count;
    let mut listeners = Listeners {
        primary: Vec::with_capacity(primary_count),
        read_only: Vec::with_capacity(read_only_count),
    };
    let mut theirs_read_only = None;
    for (i, fd) in fds.into_iter().enumerate() {
        let socket = socket2::Socket::from(fd);
        let bound = socket.local_addr().ok().and_then(|a| a.as_socket());
        let listening = socket.is_listener().unwrap_or(false);
        if i >= primary_count {
            // Theirs: kept only when it is this proxy's read-only address too.
            theirs_read_only = bound;
            if listening
                && bound
                    .zip(read_only)
                    .is_some_and(|(b, r)| same_address(b, r))
            {
                socket
                    .set_nonblocking(true)
                    .map_err(|e| exchange(e.to_string()))?;
                listeners.read_only.push(socket.into());
            }
            continue;
        }
        if !listening || bound.is_none_or(|b| !same_address(b, listen)) {
            return Err(exchange(format!(
                "received a socket that is not listening on {listen} ({bound:?}, listening {listening})"
            )));
        }
        socket
            .set_nonblocking(true)
            .map_err(|e| exchange(e.to_string()))?;
        listeners.primary.push(socket.into());
    }
    if read_only_count > 0 && listeners.read_only.is_empty() {
        tracing::info!(
            theirs = ?theirs_read_only,
            ours = ?read_only,
            "the running proxy's read-only listener is on another address: not taken"
        );
    }
    stream
        .set_read_timeout(None)
        .map_err(|e| exchange(e.to_string()))?;
    Ok((
        listeners,
        Taken {
            uid,
            kernel,
            stream,
        },
    ))
}

/// Whether a process listens on `addr` already: a socket that does not share the port
/// cannot bind it then (port 0 is never taken).
pub(crate) fn listened_on(addr: SocketAddr) -> bool {
    use socket2::{Domain, Protocol, Socket, Type};
    if addr.port() == 0 {
        return false;
    }
    let Ok(probe) = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
    else {
        return false;
    };
    // Past connections in TIME-WAIT do not count.
    let _ = probe.set_reuse_address(true);
    matches!(probe.bind(&addr.into()), Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
}

/// The uid a taker configured with `mine` uses after a process with `old`: its own, unless
/// that is the old one's (the same `--uid` on both), then the other of `UID` and `UID-b`.
/// Two processes acknowledging for one uid would let one's acknowledgement cover the
/// other's connections to a fenced master.
pub fn successor_uid(mine: &str, old: &str) -> String {
    if mine != old {
        mine.to_owned()
    } else if let Some(base) = mine.strip_suffix("-b") {
        base.to_owned()
    } else {
        format!("{mine}-b")
    }
}

/// Whether a socket bound to `bound` serves `listen` (port 0 is never handed over).
fn same_address(bound: SocketAddr, listen: SocketAddr) -> bool {
    bound.port() == listen.port() && (bound.ip() == listen.ip() || listen.ip().is_unspecified())
}

/// One line and the descriptors attached to it.
fn receive(stream: &UnixStream) -> std::io::Result<(String, Vec<OwnedFd>)> {
    let mut buf = [0u8; 1024];
    let (n, fds) = receive_with_fds(stream, &mut buf)?;
    let line = String::from_utf8_lossy(&buf[..n]).trim_end().to_owned();
    Ok((line, fds))
}

/// One read into `buf` and the descriptors that came with it (at most [`MAX_LISTENERS`]).
fn receive_with_fds(stream: &UnixStream, buf: &mut [u8]) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let mut space = nix::cmsg_space!([RawFd; MAX_LISTENERS]);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            // SAFETY: SCM_RIGHTS installed these descriptors in this process just now;
            // nothing else owns them.
            fds.extend(
                raw.into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::other("too many descriptors"));
    }
    Ok((msg.bytes, fds))
}

/// Answers takeovers for the proxy listening on `listen` with `listeners` (the read-only
/// listener's, `read_only`, after them), on a thread of its own. `handed_over` runs once,
/// when a taker said `ready`: the caller stops capturing new clients and starts its drain
/// before it returns; the taker is then told `stopped` (and, when it adopts, the kernel
/// thread sends it the connections). While another process holds the name (the proxy this
/// one replaced, until it hands over), the thread tries again every [`RETRY`].
pub fn serve(
    listen: SocketAddr,
    uid: String,
    cluster: String,
    listeners: Vec<RawFd>,
    read_only: Vec<RawFd>,
    kernel: Option<KernelShare>,
    handed_over: impl FnOnce() + Send + 'static,
) -> std::io::Result<()> {
    let mut about = format!("{uid} {cluster} {}", read_only.len());
    if let Some(k) = &kernel {
        about.push_str(&format!(" kernel {}", k.fingerprint));
    }
    let listeners: Vec<RawFd> = listeners.into_iter().chain(read_only).collect();
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name(listen).as_bytes())?;
    std::thread::Builder::new()
        .name("handover".into())
        .spawn(move || {
            // Quick after a takeover (the old process frees the name as it hands over);
            // slower when started beside a proxy that may run for long.
            let mut wait = RETRY;
            let socket = loop {
                match UnixListener::bind_addr(&addr) {
                    Ok(socket) => break socket,
                    Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                        std::thread::sleep(wait);
                        wait = (wait * 2).min(Duration::from_secs(1));
                    }
                    Err(e) => {
                        tracing::warn!(%listen, error = %e, "cannot answer takeovers");
                        return;
                    }
                }
            };
            for stream in socket.incoming() {
                let Ok(stream) = stream else { continue };
                let mut yielded = false;
                let answered = answer(&stream, &about, &listeners, kernel.as_ref(), &mut yielded);
                let adopt = matches!(answered, Ok(Some(_)));
                if yielded && !adopt && let Some(k) = &kernel {
                    // The taker did not load with the maps (or is gone): this process
                    // reads the event ring again.
                    k.control.resume_events();
                }
                match answered {
                    Ok(adopts) => {
                        tracing::info!(%listen, adopt, "a new proxy took over the listening sockets: draining");
                        handed_over();
                        let mut writer = &stream;
                        if let Err(e) = writer.write_all(format!("{STOPPED}\n").as_bytes()) {
                            tracing::warn!(error = %e, "cannot tell the new proxy that this one stopped");
                        } else if let (Some(adopts), Some(k)) = (adopts, &kernel) {
                            k.control.move_connections(stream, adopts);
                        }
                        return;
                    }
                    Err(e) => tracing::warn!(%listen, error = %e, "takeover not completed; still serving"),
                }
            }
        })?;
    Ok(())
}

/// One taker: check who it is, send the sockets (with `about`: uid and cluster), share the
/// maps if asked, wait for `ready` (or its end). `Ok(Some(paths))`: the taker adopts the
/// connections on those paths. `yielded`: the event rings were given up on the way.
fn answer(
    stream: &UnixStream,
    about: &str,
    listeners: &[RawFd],
    kernel: Option<&KernelShare>,
    yielded: &mut bool,
) -> std::io::Result<Option<crate::kernel::Adopts>> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    let me = nix::unistd::geteuid().as_raw();
    if cred.uid() != me && cred.uid() != 0 {
        return Err(std::io::Error::other(format!(
            "refused a takeover from uid {} (pid {}): only this user or root may",
            cred.uid(),
            cred.pid()
        )));
    }
    stream.set_read_timeout(Some(EXCHANGE_TIMEOUT))?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if line.trim_end() != REQUEST {
        return Err(std::io::Error::other(format!(
            "unexpected request {:?} from pid {}",
            line.trim_end(),
            cred.pid()
        )));
    }
    tracing::info!(
        pid = cred.pid(),
        "a new proxy asks for the listening sockets"
    );
    let head = format!("listeners {} {about}\n", listeners.len());
    let rights = [ControlMessage::ScmRights(listeners)];
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(head.as_bytes())],
        &rights,
        MsgFlags::empty(),
        None,
    )?;
    // The taker reads its routing table first: that may take as long as the store does.
    stream.set_read_timeout(None)?;
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        match (line.trim_end(), kernel) {
            (MAPS, Some(k)) if !*yielded => {
                *yielded = true;
                kernel::share_maps(stream, k, cred.pid())?;
            }
            (READY, _) => return Ok(None),
            (adopt, Some(_)) if *yielded && adopt.starts_with(READY_ADOPT) => {
                return Ok(Some(crate::kernel::Adopts::from_words(
                    &adopt[READY_ADOPT.len()..],
                )));
            }
            ("", _) => {
                return Err(std::io::Error::other(format!(
                    "the new proxy (pid {}) ended before it was ready",
                    cred.pid()
                )));
            }
            (other, _) => {
                return Err(std::io::Error::other(format!(
                    "unexpected line {other:?} from the new proxy (pid {})",
                    cred.pid()
                )));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{successor_uid, without_takeover};

    #[test]
    fn a_reexecuted_proxy_gets_one_plain_takeover_flag() {
        let args = |a: &[&str]| a.iter().map(std::ffi::OsString::from).collect::<Vec<_>>();
        let kept = args(&["--uid", "p1", "--listen-address", "127.0.0.1:5"]);
        for with in [
            &[
                "--uid",
                "p1",
                "--takeover",
                "--listen-address",
                "127.0.0.1:5",
            ][..],
            &[
                "--uid",
                "p1",
                "--takeover",
                "auto",
                "--listen-address",
                "127.0.0.1:5",
            ],
            &[
                "--takeover=auto",
                "--uid",
                "p1",
                "--listen-address",
                "127.0.0.1:5",
            ],
            &[
                "--uid",
                "p1",
                "--listen-address",
                "127.0.0.1:5",
                "--takeover",
                "never",
            ],
        ] {
            assert_eq!(without_takeover(args(with).into_iter()), kept, "{with:?}");
        }
        // A value that is not a mode is the next flag's business.
        assert_eq!(
            without_takeover(args(&["--takeover", "--uid", "p1"]).into_iter()),
            args(&["--uid", "p1"])
        );
    }

    #[test]
    fn a_taker_with_the_old_process_uid_alternates() {
        assert_eq!(successor_uid("a1", "zz"), "a1");
        assert_eq!(successor_uid("a1", "a1"), "a1-b");
        assert_eq!(successor_uid("a1", "a1-b"), "a1");
        assert_eq!(successor_uid("a1-b", "a1-b"), "a1");
    }
}
