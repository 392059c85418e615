//! Kernel forwarding on the client's own socket, for clients in the proxy's network namespace
//! (`bpf/client_socket.bpf.c`): a sockops program on the cgroup v2 root puts client sockets that
//! connect to the proxy into a sockhash, an sk_msg program redirects their sends to the
//! proxy's server socket, and the server socket's verdict redirects replies into the client
//! socket's receive queue. This module loads it (the sockops program through a cgroup link,
//! so it goes away with the process), routes a connection once the proxy has connected it,
//! and reads the reply direction's state and the program's events.
//!
//! The program reads psock internals through BTF (CO-RE): on a kernel where they do not
//! resolve, loading fails and the proxy keeps the pair path of [`crate::sockmap`].

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use libbpf_rs::libbpf_sys;
use libbpf_rs::{Link, MapCore, Object};

use crate::ring::{Ring, cookie_and_kind};
use crate::sockmap::{cookie_keys, count_keys, errno, keys, push_queued, sockhash_has};
use crate::sockopt::{cookie, netns_cookie, tcp_byte_counts};
use crate::{Inherited, Unavailable};

/// The object file, empty when the build could not make it.
pub(crate) static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/client_socket.bpf.o"));
/// Why the object is empty.
const BUILD_ERROR: &str = env!("TENDRIL_BPF_BUILD_ERROR");

/// Size of `struct client_key`.
const KEY_SIZE: usize = 48;
/// Size of `struct route`.
const ROUTE_SIZE: usize = 32;
/// Size of `struct reply`.
const REPLY_SIZE: usize = KEY_SIZE + 48 + 40 + 32;
/// Size of `struct config`, the read-only data.
const CONFIG_SIZE: usize = 48;

// The program's enums (client_socket.bpf.c), checked against its BTF by CONSTANTS's test.
pub(crate) const R_KERNEL: u32 = 0;
pub(crate) const R_DRAINING: u32 = 1;
pub(crate) const R_USER: u32 = 2;
pub(crate) const R_FAILED: u32 = 3;

const EVENT_DRAINED: u32 = 1;
const EVENT_DELIVERED: u32 = 2;
const EVENT_FAILED: u32 = 3;
const EVENT_PAUSED: u32 = 4;

const PROBE_DELIVERED: u32 = 1;
const PROBE_GONE: u32 = 2;
const PROBE_HELD: u32 = 4;
const PROBE_UNKNOWN: u32 = 8;

const STAT_CLIENTS: u32 = 0;
const STAT_CLIENTS_FULL: u32 = 1;
const STAT_SENDS_REDIRECTED: u32 = 2;
const STAT_SENDS_PASSED: u32 = 3;
const STAT_SEND_PAUSES: u32 = 4;
const STAT_REPLIES_REDIRECTED: u32 = 5;
const STAT_REPLIES_PASSED: u32 = 6;
const STAT_REPLY_PAUSES: u32 = 7;
const STAT_FAILURES: u32 = 8;
const STAT_LOST_EVENTS: u32 = 9;
const STAT_REPEATED: u32 = 10;
const STAT_TIMER_FAILURES: u32 = 11;
const STAT_REPLIES_DIRECT: u32 = 12;
const STAT_BACKENDS: u32 = 13;
#[cfg(test)]
const STAT_COUNT: u32 = 14;

/// Every constant shared with the program, by its C enum: the layout test
/// (`crate::layout`) checks each against the object's BTF, and that no member is missing.
#[cfg(test)]
pub(crate) const CONSTANTS: &[(&str, &[(&str, u32)])] = &[
    (
        "reply_mode",
        &[
            ("R_KERNEL", R_KERNEL),
            ("R_DRAINING", R_DRAINING),
            ("R_USER", R_USER),
            ("R_FAILED", R_FAILED),
        ],
    ),
    (
        "client_socket_event",
        &[
            ("EVENT_DRAINED", EVENT_DRAINED),
            ("EVENT_DELIVERED", EVENT_DELIVERED),
            ("EVENT_FAILED", EVENT_FAILED),
            ("EVENT_PAUSED", EVENT_PAUSED),
        ],
    ),
    (
        "probe_bit",
        &[
            ("PROBE_DELIVERED", PROBE_DELIVERED),
            ("PROBE_GONE", PROBE_GONE),
            ("PROBE_HELD", PROBE_HELD),
            ("PROBE_UNKNOWN", PROBE_UNKNOWN),
        ],
    ),
    (
        "client_socket_stat",
        &[
            ("STAT_CLIENTS", STAT_CLIENTS),
            ("STAT_CLIENTS_FULL", STAT_CLIENTS_FULL),
            ("STAT_SENDS_REDIRECTED", STAT_SENDS_REDIRECTED),
            ("STAT_SENDS_PASSED", STAT_SENDS_PASSED),
            ("STAT_SEND_PAUSES", STAT_SEND_PAUSES),
            ("STAT_REPLIES_REDIRECTED", STAT_REPLIES_REDIRECTED),
            ("STAT_REPLIES_PASSED", STAT_REPLIES_PASSED),
            ("STAT_REPLY_PAUSES", STAT_REPLY_PAUSES),
            ("STAT_FAILURES", STAT_FAILURES),
            ("STAT_LOST_EVENTS", STAT_LOST_EVENTS),
            ("STAT_REPEATED", STAT_REPEATED),
            ("STAT_TIMER_FAILURES", STAT_TIMER_FAILURES),
            ("STAT_REPLIES_DIRECT", STAT_REPLIES_DIRECT),
            ("STAT_BACKENDS", STAT_BACKENDS),
            ("STAT_COUNT", STAT_COUNT),
        ],
    ),
];

/// A connection as the client sees it: its network namespace and its four addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    /// The network namespace's cookie (`SO_NETNS_COOKIE`).
    pub netns: u64,
    /// The client's address (the accepted socket's peer).
    pub client: SocketAddr,
    /// The proxy's address the client connected to (the accepted socket's local address).
    pub proxy: SocketAddr,
}

impl ClientKey {
    /// The key of the client connected to the accepted socket `fd`.
    pub fn of_accepted(fd: RawFd) -> io::Result<ClientKey> {
        Ok(ClientKey {
            netns: netns_cookie(fd)?,
            client: socket_addr(fd, true)?,
            proxy: socket_addr(fd, false)?,
        })
    }

    /// The key of the connection the socket `fd` made (the proxy's server socket): the
    /// connecting side in `client`, the listening side (the backend) in `proxy`, as the
    /// backend's program sees it.
    pub fn of_connected(fd: RawFd) -> io::Result<ClientKey> {
        Ok(ClientKey {
            netns: netns_cookie(fd)?,
            client: socket_addr(fd, false)?,
            proxy: socket_addr(fd, true)?,
        })
    }

    pub(crate) fn bytes(&self) -> [u8; KEY_SIZE] {
        let mut out = [0u8; KEY_SIZE];
        out[0..8].copy_from_slice(&self.netns.to_ne_bytes());
        out[8..24].copy_from_slice(&mapped(self.client.ip()));
        out[24..40].copy_from_slice(&mapped(self.proxy.ip()));
        out[40..44].copy_from_slice(&u32::from(self.client.port()).to_ne_bytes());
        out[44..48].copy_from_slice(&u32::from(self.proxy.port()).to_ne_bytes());
        out
    }
}

/// IPv4 mapped into IPv6, as the program keys addresses (network order).
fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// How the reply direction moves its bytes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyMode {
    /// Redirected into the client socket.
    Kernel,
    /// Paused: replies wait in the server socket's queue until the client's backlog drained.
    Draining,
    /// Paused: the proxy copies the passed replies through the accepted socket.
    User,
    /// A reply could not be delivered: the connection must be closed.
    Failed,
}

/// The reply direction of a routed connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Current mode.
    pub mode: ReplyMode,
    /// Reply bytes redirected into the client socket.
    pub redirected: u64,
    /// Reply bytes passed to the server socket's own queue (for the proxy to copy).
    pub passed: u64,
    /// Reply bytes a backend on this host sent straight into the client socket.
    pub direct: u64,
    /// The proxy may write passed bytes up to this count.
    pub allow: u64,
    /// Most bytes seen held for the client at one look.
    pub peak: u64,
    /// Times the direction paused.
    pub pauses: u32,
    /// The server's FIN was seen.
    pub fin: bool,
    /// After the FIN, every redirected byte reached the client socket.
    pub delivered: bool,
}

/// The client's side of a connection as [`ClientSocket::probe`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    /// Everything redirected to the client reached its socket: its backlog is empty and the
    /// backlog worker idle, or the client socket is gone.
    pub delivered: bool,
    /// The client socket closed (it left the client sockhash).
    pub gone: bool,
    /// The client holds bytes it has not read (delivered, in its backlog, or on the way
    /// through the accepted socket).
    pub held: bool,
}

/// What the program reports, for the server socket with `server` cookie.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The server socket's cookie.
    pub server: u64,
    /// What happened.
    pub kind: EventKind,
}

/// Kinds of [`Event`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The client's backlog drained during a pause: copy the passed replies.
    Drained,
    /// After the server's FIN, every reply reached the client: the FIN may follow.
    Delivered,
    /// A reply could not be delivered.
    Failed,
    /// Replies paused (the client stopped reading): they now wait in the server socket,
    /// whose receive buffer the proxy fixes at the limit.
    Paused,
}

/// Sets up the program's backlog-check timer (its `init_checker`, run here). The set-up
/// allocates without sleeping and can fail for a while (seen for hundreds of milliseconds
/// at a time here); at load there is time to retry.
fn init_checker(object: &Object, inherited: bool) -> Result<(), Unavailable> {
    let prog = object
        .progs()
        .find(|p| p.name() == "init_checker")
        .map(|p| p.as_fd().as_raw_fd())
        .ok_or_else(|| unavailable("program init_checker missing from the object"))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let mut args = [0u8; 8];
        // SAFETY: an all-zero bpf_test_run_opts is valid; sz is set as libbpf requires.
        let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _;
        // A syscall program's context is copied back to ctx_in after the run.
        opts.ctx_in = args.as_mut_ptr().cast();
        opts.ctx_size_in = args.len() as u32;
        // SAFETY: ctx_in points to `args`, 8 live bytes, which the kernel reads and writes.
        let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(prog, &mut opts) };
        let result = if rc != 0 {
            errno(rc)
        } else {
            match i64::from_ne_bytes(args) {
                0 => return Ok(()),
                e if inherited && e == -i64::from(libc::EBUSY) => return Ok(()),
                e => io::Error::from_raw_os_error((-e) as i32),
            }
        };
        if std::time::Instant::now() >= deadline {
            return Err(unavailable(format!(
                "set up the backlog-check timer: {result}"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// Program-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Client sockets put into the sockhash at connect.
    pub clients: u64,
    /// Client sockets left out because the sockhash was full.
    pub clients_full: u64,
    /// Client sends redirected to the server socket.
    pub sends_redirected: u64,
    /// Client sends passed to the accepted socket.
    pub sends_passed: u64,
    /// Send-side pauses (server socket backed up).
    pub send_pauses: u64,
    /// Reply skbs redirected into the client socket.
    pub replies_redirected: u64,
    /// Reply skbs passed to the server socket's queue.
    pub replies_passed: u64,
    /// Receive-side pauses (client not reading).
    pub reply_pauses: u64,
    /// Replies that could not be delivered.
    pub failures: u64,
    /// Events lost because the ring was full.
    pub lost_events: u64,
    /// Reply skbs that repeated bytes already seen.
    pub repeated: u64,
    /// Backlog checks that could not be queued or armed (should stay 0: the queue holds
    /// every connection).
    pub timer_failures: u64,
    /// Backend sends redirected straight into a client socket (a backend on this host).
    pub replies_direct: u64,
    /// Backend sockets on this host that joined (one per connection the proxy made to it).
    pub backends: u64,
    /// Connections the proxy cut because their server side had ended and nothing moved for
    /// a while with the client waiting (see the proxy's kernel path; should stay 0).
    pub stalled: u64,
}

/// Why a connection could not be routed on the client's socket.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// The maps are full.
    #[error("the client-socket maps are full")]
    MapFull,
    /// The kernel refused.
    #[error("cannot route on the client socket: {0}")]
    Refused(io::Error),
}

/// A connection to route.
#[derive(Debug, Clone, Copy)]
pub struct RouteRequest {
    /// The client's connection.
    pub key: ClientKey,
    /// The client socket's cookie ([`ClientSocket::client_cookie`]).
    pub client: u64,
    /// The server socket's connection as a backend on this host sees it
    /// ([`ClientKey::of_connected`]).
    pub backend: ClientKey,
    /// The accepted socket.
    pub accepted: RawFd,
    /// The server socket.
    pub server: RawFd,
    /// Bytes the proxy read from the accepted socket and dealt with.
    pub from_client: u64,
    /// Bytes the proxy wrote to the server socket.
    pub to_server: u64,
}

/// Entries in the maps of [`ClientSocket`] that hold one per connection (a leak check's view).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entries {
    /// Client sockets (connected to the proxy's port on this host).
    pub clients: usize,
    /// Routed connections.
    pub routes: usize,
    /// Server sockets of routed connections.
    pub servers: usize,
    /// Reply directions of routed connections.
    pub replies: usize,
    /// Backend sockets on this host accepting the proxy's connections.
    pub backends: usize,
}

/// The loaded programs and their maps.
pub struct ClientSocket {
    _object: Object,
    /// The sockops program's attachment: taken (detached) by [`ClientSocket::stop_capturing`].
    link: std::sync::Mutex<Option<Link>>,
    clients: RawFd,
    blocking: RawFd,
    routes: RawFd,
    servers: RawFd,
    accepted: RawFd,
    server_acked: RawFd,
    replies: RawFd,
    reply_written: RawFd,
    backends: RawFd,
    backend_routes: RawFd,
    connectors: RawFd,
    events: RawFd,
    stats: RawFd,
    probe: RawFd,
    stalled: std::sync::atomic::AtomicU64,
    max_clients: u32,
    recv_limit: u64,
    fingerprint: String,
    /// The threads [`ClientSocket::add_connecting_thread`] put into `connectors`.
    threads: std::sync::Mutex<Vec<u32>>,
}

impl std::fmt::Debug for ClientSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientSocket")
            .field("max_clients", &self.max_clients)
            .finish_non_exhaustive()
    }
}

/// The name the proxy logs when this path is unavailable.
const MECHANISM: &str = "kernel forwarding on the client socket (sk_msg)";

fn unavailable(reason: impl Into<String>) -> Unavailable {
    Unavailable {
        mechanism: MECHANISM,
        reason: reason.into(),
    }
}

/// Where cgroup v2 is mounted (the first cgroup2 line of /proc/mounts).
fn cgroup2_root() -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, dir, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| dir.replace("\\040", " "))
    })
}

impl ClientSocket {
    /// Detaches the sockops program: sockets connecting from now on are no longer put in
    /// this object's maps. A draining proxy calls it, so that the clients of the proxy that
    /// replaces it are captured by that proxy's own programs, not by these (whose maps it
    /// cannot use). Connections already routed keep forwarding; their sends lose the
    /// acknowledgement tracking and are copied by the kernel-path thread instead.
    pub fn stop_capturing(&self) {
        let link = self
            .link
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        drop(link);
    }

    /// Loads the programs for a proxy listening on `listen` (and on the port `read_only`, a
    /// second listener on the same address), with room for `max_clients` connections,
    /// `send_limit` and `recv_limit` bytes held per direction, and attaches the sockops
    /// program to the cgroup v2 root (through a link: detached when this is dropped).
    pub fn load(
        listen: SocketAddr,
        read_only: Option<u16>,
        max_clients: u32,
        send_limit: u64,
        recv_limit: u64,
    ) -> Result<ClientSocket, Unavailable> {
        Self::load_with(listen, read_only, max_clients, send_limit, recv_limit, None)
    }

    /// [`ClientSocket::load`], with the maps of the running proxy this one takes over from
    /// when `inherited` is given: only for the same object and settings (the two processes'
    /// [`ClientSocket::fingerprint`]s are equal), since both processes' programs then work
    /// on the maps at once. Every map of the object must be among them.
    pub fn load_with(
        listen: SocketAddr,
        read_only: Option<u16>,
        max_clients: u32,
        send_limit: u64,
        recv_limit: u64,
        inherited: Option<&Inherited>,
    ) -> Result<ClientSocket, Unavailable> {
        if max_clients == 0 {
            return Err(unavailable("room for 0 connections"));
        }
        let root = cgroup2_root().ok_or_else(|| unavailable("no cgroup v2 mount"))?;
        let mut open = crate::object::open(OBJECT, BUILD_ERROR, MECHANISM)?;
        let config = config_bytes(
            listen,
            read_only.unwrap_or(0),
            std::process::id(),
            send_limit,
            recv_limit,
        );
        for mut map in open.maps_mut() {
            let name = map.name().to_string_lossy().into_owned();
            if inherited.is_some() && crate::object::shared(&name) {
                continue; // sized as the old process sized it
            }
            if name.ends_with(".rodata") {
                let data = map
                    .initial_value_mut()
                    .ok_or_else(|| unavailable("no read-only data in the object"))?;
                if data.len() < CONFIG_SIZE {
                    return Err(unavailable(format!(
                        "read-only data of {} bytes, the loader writes {CONFIG_SIZE}",
                        data.len()
                    )));
                }
                data[..CONFIG_SIZE].copy_from_slice(&config);
            } else if matches!(
                name.as_str(),
                "clients"
                    | "routes"
                    | "servers"
                    | "accepted"
                    | "server_acked"
                    | "replies"
                    | "reply_written"
                    | "backends"
                    | "backend_routes"
            ) {
                map.set_max_entries(max_clients)
                    .map_err(|e| unavailable(format!("size map {name}: {e}")))?;
            } else if name == "pending" {
                // Each connection is queued at most once, but a closed one's cookie stays
                // until the next check pops it: room for both.
                map.set_max_entries(max_clients.saturating_mul(2))
                    .map_err(|e| unavailable(format!("size map {name}: {e}")))?;
            }
        }
        if let Some(inherited) = inherited {
            crate::object::reuse(&mut open, inherited, MECHANISM)?;
        }
        let object = crate::object::load(open, MECHANISM)?;
        let map = |name: &str, size: Option<usize>| -> Result<RawFd, Unavailable> {
            let m = object
                .maps()
                .find(|m| m.name() == name)
                .ok_or_else(|| unavailable(format!("map {name} missing from the object")))?;
            if let Some(size) = size
                && m.value_size() as usize != size
            {
                return Err(unavailable(format!(
                    "map {name} holds {}-byte values, the loader expects {size}",
                    m.value_size()
                )));
            }
            Ok(m.as_fd().as_raw_fd())
        };
        let clients = map("clients", None)?;
        let blocking = map("blocking", Some(4))?;
        let routes = map("routes", Some(ROUTE_SIZE))?;
        let servers = map("servers", None)?;
        let accepted = map("accepted", None)?;
        let server_acked = map("server_acked", Some(8))?;
        let replies = map("replies", Some(REPLY_SIZE))?;
        let reply_written = map("reply_written", Some(8))?;
        let events = map("events", None)?;
        let backends = map("backends", None)?;
        let backend_routes = map("backend_routes", Some(8))?;
        let connectors = map("connectors", Some(4))?;
        let stats = map("stats", None)?;
        let probe = object
            .progs()
            .find(|p| p.name() == "probe_client")
            .map(|p| p.as_fd().as_raw_fd())
            .ok_or_else(|| unavailable("program probe_client missing from the object"))?;
        let cgroup = std::fs::File::open(&root)
            .map_err(|e| unavailable(format!("open the cgroup v2 root {root}: {e}")))?;
        let mut link = None;
        for prog in object.progs_mut() {
            let name = prog.name().to_string_lossy().into_owned();
            match name.as_str() {
                "client_send" => prog.attach_sockmap(clients),
                "backend_send" => prog.attach_sockmap(backends),
                "server_receive" => prog.attach_sockmap(servers),
                "watch_sockets" => prog.attach_cgroup(cgroup.as_raw_fd()).map(|l| {
                    link = Some(l);
                }),
                _ => Ok(()),
            }
            .map_err(|e| unavailable(format!("attach {name}: {e}")))?;
        }
        let link =
            link.ok_or_else(|| unavailable("program watch_sockets missing from the object"))?;
        // Inherited, the checker's timer is set up already (and runs on).
        init_checker(&object, inherited.is_some())?;
        Ok(ClientSocket {
            _object: object,
            link: std::sync::Mutex::new(Some(link)),
            clients,
            blocking,
            routes,
            servers,
            accepted,
            server_acked,
            replies,
            reply_written,
            backends,
            backend_routes,
            connectors,
            events,
            stats,
            probe,
            stalled: std::sync::atomic::AtomicU64::new(0),
            max_clients,
            recv_limit,
            fingerprint: fingerprint(listen, read_only, max_clients, send_limit, recv_limit),
            threads: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// What a proxy taking over from this one must load identically to share its maps: the
    /// object's bytes and the settings in its read-only data and map sizes (the pid aside).
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Each map of the object that a taker loads with ([`Inherited`]).
    pub fn maps(&self) -> Vec<(String, RawFd)> {
        crate::object::shared_maps(&self._object)
    }

    /// Marks the calling thread as one that connects to backends (a worker): a backend on
    /// this host that accepts its connections can then send replies straight to the client.
    pub fn add_connecting_thread(&self) -> io::Result<()> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        self.insert(
            self.connectors,
            &tid.to_ne_bytes(),
            &1u32.to_ne_bytes(),
            libbpf_sys::BPF_ANY,
        )
        .map_err(|e| match e {
            RouteError::MapFull => io::Error::other("thread map full"),
            RouteError::Refused(e) => e,
        })?;
        self.threads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(tid);
        Ok(())
    }

    /// Takes this process's threads out of `connectors`: a process that shared its maps
    /// with the one that took over leaves no thread ids behind there for another thread to
    /// be taken for (ids are reused).
    pub fn forget_connecting_threads(&self) {
        let threads = std::mem::take(
            &mut *self
                .threads
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for tid in threads {
            self.delete(self.connectors, &tid.to_ne_bytes());
        }
    }

    /// Most reply bytes held for a client that does not read.
    pub fn recv_limit(&self) -> u64 {
        self.recv_limit
    }

    /// The cookie of the client's socket when it joined the sockhash at connect (so it can
    /// be routed); `None` when it did not (another host or namespace, blocking mode, full).
    pub fn client_cookie(&self, key: &ClientKey) -> Option<u64> {
        // A sockhash lookup from userspace writes the socket's 8-byte cookie.
        let mut cookie = [0u8; 8];
        self.key_present(self.clients, key, &mut cookie)
            .then(|| u64::from_ne_bytes(cookie))
    }

    /// Whether the client's socket was in blocking mode when it last sent before the route.
    /// Such a client must not be routed here: the kernel's receive path for a socket in a
    /// sockmap can end a blocking read with EAGAIN after a wake-up without data, which a
    /// blocking reader takes as an error (a non-blocking one, like libpq, polls again).
    pub fn client_blocks(&self, key: &ClientKey) -> bool {
        self.key_present(self.blocking, key, &mut [0u8; 4])
    }

    /// Whether `map` (keyed by client) holds `key`; the value lands in `value`, which must be
    /// the map's value size (checked at load for the maps this module reads).
    fn key_present(&self, map: RawFd, key: &ClientKey, value: &mut [u8]) -> bool {
        let k = key.bytes();
        // SAFETY: the key buffer is the map's key size and `value` its value size.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_elem(map, k.as_ptr().cast(), value.as_mut_ptr().cast())
        };
        rc == 0
    }

    /// Takes a client that will not be routed here out of the sockhash, so its socket is an
    /// ordinary TCP socket again (no sk_msg program on its sends, the kernel's own receive
    /// path). Nothing was redirected into it before a route, so nothing is lost.
    pub fn release_client(&self, key: &ClientKey) {
        let k = key.bytes();
        self.delete(self.clients, &k);
        self.delete(self.blocking, &k);
    }

    /// Takes the backend's side of a connection the client-socket path does not forward out
    /// of `backends` (a backend on this host), so its sends take the kernel's ordinary path
    /// without the program. `backend` is the server socket's [`ClientKey::of_connected`].
    pub fn release_backend(&self, backend: &ClientKey) {
        self.delete(self.backends, &backend.bytes());
    }

    fn insert(&self, map: RawFd, key: &[u8], value: &[u8], flags: u32) -> Result<(), RouteError> {
        // SAFETY: key and value point to live buffers of the sizes the map was created with
        // (checked at load for the value sizes this module writes).
        let rc = unsafe {
            libbpf_sys::bpf_map_update_elem(
                map,
                key.as_ptr().cast(),
                value.as_ptr().cast(),
                u64::from(flags),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = errno(rc);
        match err.raw_os_error() {
            Some(libc::E2BIG) | Some(libc::ENOMEM) | Some(libc::ENOSPC) => Err(RouteError::MapFull),
            _ => Err(RouteError::Refused(err)),
        }
    }

    /// Inserts an entry keyed by a connection's four addresses, whose value starts with the
    /// server socket's cookie (its owner). The same addresses can belong to a new connection
    /// before the proxy has cleaned up after the old one (a port reused out of TIME_WAIT, or
    /// at once when the kernel's TIME_WAIT table is full): an entry another server socket
    /// owns is then stale, and replaced.
    fn insert_addressed(&self, map: RawFd, key: &[u8], value: &[u8]) -> Result<(), RouteError> {
        let noexist = libbpf_sys::BPF_NOEXIST;
        match self.insert(map, key, value, noexist) {
            Err(RouteError::Refused(e)) if e.raw_os_error() == Some(libc::EEXIST) => {
                match self.owner(map, key, value.len()) {
                    Some(owner) if owner != value[..8] => {
                        self.insert(map, key, value, libbpf_sys::BPF_ANY)
                    }
                    _ => Err(RouteError::Refused(e)),
                }
            }
            other => other,
        }
    }

    /// The first 8 bytes (the owning server socket's cookie) of the entry under `key`, whose
    /// value is `len` bytes long.
    fn owner(&self, map: RawFd, key: &[u8], len: usize) -> Option<[u8; 8]> {
        let mut value = [0u8; ROUTE_SIZE];
        let value = value.get_mut(..len)?;
        // SAFETY: key has the map's key size; value has the map's value size (`len`, one of
        // the sizes checked at load).
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_elem(map, key.as_ptr().cast(), value.as_mut_ptr().cast())
        };
        (rc == 0).then(|| value[..8].try_into().ok()).flatten()
    }

    /// Deletes the entry under `key` if `server` owns it: a new connection with the same
    /// addresses may have replaced it already (see [`ClientSocket::insert_addressed`]).
    fn delete_owned(&self, map: RawFd, key: &[u8], len: usize, server: u64) {
        if self.owner(map, key, len) == Some(server.to_ne_bytes()) {
            self.delete(map, key);
        }
    }

    fn delete(&self, map: RawFd, key: &[u8]) {
        // SAFETY: key points to a live buffer of the map's key size; ENOENT is ignored.
        unsafe {
            libbpf_sys::bpf_map_delete_elem(map, key.as_ptr().cast());
        }
    }

    /// Routes a connection: from now on the client's sends go to `server` and the server's
    /// replies into the client socket, in the kernel. Returns the server socket's cookie. On
    /// error nothing is left in the maps.
    pub fn route(&self, req: &RouteRequest) -> Result<u64, RouteError> {
        let server = cookie(req.server).map_err(RouteError::Refused)?;
        let (acked, _) = tcp_byte_counts(req.server).map_err(RouteError::Refused)?;
        let s = server.to_ne_bytes();
        let key = req.key.bytes();
        let reply = reply_bytes(&req.key, server);
        let noexist = libbpf_sys::BPF_NOEXIST;
        let result = (|| {
            self.insert(self.server_acked, &s, &acked.to_ne_bytes(), noexist)?;
            self.insert(self.replies, &s, &reply, noexist)?;
            self.insert(self.reply_written, &s, &0u64.to_ne_bytes(), noexist)?;
            self.insert(
                self.accepted,
                &s,
                &(req.accepted as u64).to_ne_bytes(),
                noexist,
            )?;
            // The server socket joins: its replies go to the client from here on.
            self.insert(
                self.servers,
                &s,
                &(req.server as u64).to_ne_bytes(),
                noexist,
            )?;
            // A backend on this host: its replies may go straight to the client.
            self.insert_addressed(self.backend_routes, &req.backend.bytes(), &s)?;
            // The route: the client's sends follow once the proxy has forwarded what the
            // client sent before (the program compares counts).
            let route = route_bytes(server, req.client, req.from_client, req.to_server);
            self.insert_addressed(self.routes, &key, &route)
        })();
        if let Err(e) = result {
            self.forget(&req.key, &req.backend, server);
            return Err(e);
        }
        push_queued(req.server);
        Ok(server)
    }

    /// Records what the proxy forwarded from the accepted socket to the server socket.
    pub fn set_forwarded(
        &self,
        key: &ClientKey,
        server: u64,
        client: u64,
        from_client: u64,
        to_server: u64,
    ) -> io::Result<()> {
        let route = route_bytes(server, client, from_client, to_server);
        self.insert(self.routes, &key.bytes(), &route, libbpf_sys::BPF_EXIST)
            .map_err(|e| match e {
                RouteError::MapFull => io::Error::other("route map full"),
                RouteError::Refused(e) => e,
            })
    }

    /// Records how many passed reply bytes the proxy wrote to the accepted socket.
    pub fn set_reply_written(&self, server: u64, bytes: u64) -> io::Result<()> {
        self.insert(
            self.reply_written,
            &server.to_ne_bytes(),
            &bytes.to_ne_bytes(),
            libbpf_sys::BPF_EXIST,
        )
        .map_err(|e| match e {
            RouteError::MapFull => io::Error::other("reply map full"),
            RouteError::Refused(e) => e,
        })
    }

    /// The reply direction of the connection whose server socket has `server` cookie.
    pub fn reply(&self, server: u64) -> Option<Reply> {
        let mut raw = [0u8; REPLY_SIZE];
        // SAFETY: the value buffer is the map's value size (checked at load); key is 8 bytes.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_elem(
                self.replies,
                (&server as *const u64).cast(),
                raw.as_mut_ptr().cast(),
            )
        };
        if rc != 0 {
            return None;
        }
        Some(decode_reply(&raw))
    }

    /// Looks at the client's side of the connection whose server socket has `server` cookie
    /// (the program's `probe_client`): `None` when the connection is unknown. For an end the
    /// verdict cannot see (a reset of the server socket), and behind the timer after a FIN.
    pub fn probe(&self, server: u64) -> io::Result<Option<Probe>> {
        // An Ethernet header's worth of bytes (the least a tc program's test run takes), then
        // the cookie.
        let mut packet = [0u8; 14 + 8];
        packet[14..].copy_from_slice(&server.to_ne_bytes());
        // SAFETY: an all-zero bpf_test_run_opts is valid; sz is set as libbpf requires.
        let mut opts: libbpf_sys::bpf_test_run_opts = unsafe { std::mem::zeroed() };
        opts.sz = std::mem::size_of::<libbpf_sys::bpf_test_run_opts>() as _;
        opts.data_in = packet.as_ptr().cast();
        opts.data_size_in = packet.len() as u32;
        opts.repeat = 1;
        // SAFETY: data_in points to `packet`, live for the call; nothing is written back
        // (no data_out, no context).
        let rc = unsafe { libbpf_sys::bpf_prog_test_run_opts(self.probe, &mut opts) };
        if rc != 0 {
            return Err(errno(rc));
        }
        let bits = opts.retval;
        if bits & PROBE_UNKNOWN != 0 {
            return Ok(None);
        }
        Ok(Some(Probe {
            delivered: bits & PROBE_DELIVERED != 0,
            gone: bits & PROBE_GONE != 0,
            held: bits & PROBE_HELD != 0,
        }))
    }

    /// Counts a connection the proxy cut because it stalled after its server side ended
    /// ([`Stats::stalled`]).
    pub fn count_stalled(&self) {
        self.stalled
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Stops kernel forwarding for the connection (the fence): the client's sends and the
    /// server's replies find no route.
    pub fn leave(&self, key: &ClientKey, backend: &ClientKey, server: u64) {
        self.delete_owned(self.routes, &key.bytes(), ROUTE_SIZE, server);
        self.delete_owned(self.backend_routes, &backend.bytes(), 8, server);
        let s = server.to_ne_bytes();
        self.delete(self.servers, &s);
        self.delete(self.accepted, &s);
    }

    /// Routed connections (by server cookie) whose server socket is in no sockhash: left
    /// behind by a process that ended without forgetting them (killed while it held them),
    /// or on their way in or out of a route (see [`ClientSocket::forget_orphan`]).
    pub fn orphans(&self) -> Vec<u64> {
        cookie_keys(self.replies)
            .into_iter()
            .filter(|c| !sockhash_has(self.servers, *c))
            .collect()
    }

    /// Removes every trace of a routed connection whose process is gone, known only by its
    /// server cookie (an orphan that stayed one: the caller checks it twice, a while apart):
    /// its cookie-keyed entries, and the address-keyed ones it owns.
    pub fn forget_orphan(&self, server: u64) {
        let s = server.to_ne_bytes();
        for map in [
            self.servers,
            self.accepted,
            self.server_acked,
            self.replies,
            self.reply_written,
        ] {
            self.delete(map, &s);
        }
        for (map, len) in [(self.routes, ROUTE_SIZE), (self.backend_routes, 8)] {
            for key in keys(map, KEY_SIZE) {
                self.delete_owned(map, &key, len, server);
            }
        }
    }

    /// Removes every trace of the connection from the maps.
    pub fn forget(&self, key: &ClientKey, backend: &ClientKey, server: u64) {
        self.leave(key, backend, server);
        let s = server.to_ne_bytes();
        for map in [self.server_acked, self.replies, self.reply_written] {
            self.delete(map, &s);
        }
    }

    /// Program-wide counters, summed over CPUs.
    pub fn stats(&self) -> Stats {
        let read = |i: u32| crate::sockmap::percpu_sum(self.stats, i);
        Stats {
            clients: read(STAT_CLIENTS),
            clients_full: read(STAT_CLIENTS_FULL),
            sends_redirected: read(STAT_SENDS_REDIRECTED),
            sends_passed: read(STAT_SENDS_PASSED),
            send_pauses: read(STAT_SEND_PAUSES),
            replies_redirected: read(STAT_REPLIES_REDIRECTED),
            replies_passed: read(STAT_REPLIES_PASSED),
            reply_pauses: read(STAT_REPLY_PAUSES),
            failures: read(STAT_FAILURES),
            lost_events: read(STAT_LOST_EVENTS),
            repeated: read(STAT_REPEATED),
            timer_failures: read(STAT_TIMER_FAILURES),
            replies_direct: read(STAT_REPLIES_DIRECT),
            backends: read(STAT_BACKENDS),
            stalled: self.stalled.load(std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// Entries in the maps a leak check looks at.
    pub fn entries(&self) -> Entries {
        Entries {
            clients: count_keys(self.clients, KEY_SIZE),
            routes: count_keys(self.routes, KEY_SIZE),
            servers: count_keys(self.servers, 8),
            replies: count_keys(self.replies, 8),
            backends: count_keys(self.backends, KEY_SIZE),
        }
    }

    /// Opens the event ring (one consumer: the proxy's kernel-path thread).
    pub fn events(self: &Arc<Self>) -> io::Result<Events> {
        Ring::open(self.events, decode_event, self.clone())
    }
}

/// [`ClientSocket::fingerprint`] of a load with these settings: the object's bytes, the
/// read-only data without the pid, and the map size.
pub fn fingerprint(
    listen: SocketAddr,
    read_only: Option<u16>,
    max_clients: u32,
    send_limit: u64,
    recv_limit: u64,
) -> String {
    let config = config_bytes(listen, read_only.unwrap_or(0), 0, send_limit, recv_limit);
    crate::object::fingerprint(&[OBJECT, &config, &max_clients.to_ne_bytes()])
}

/// `struct config`, as [`ClientSocket::load`] writes it into the read-only data.
pub(crate) fn config_bytes(
    listen: SocketAddr,
    read_only_port: u16,
    tgid: u32,
    send_limit: u64,
    recv_limit: u64,
) -> [u8; CONFIG_SIZE] {
    let mut config = [0u8; CONFIG_SIZE];
    if !listen.ip().is_unspecified() {
        config[0..16].copy_from_slice(&mapped(listen.ip()));
    }
    config[16..20].copy_from_slice(&u32::from(listen.port()).to_ne_bytes());
    config[20..24].copy_from_slice(&tgid.to_ne_bytes());
    config[24..32].copy_from_slice(&send_limit.to_ne_bytes());
    config[32..40].copy_from_slice(&recv_limit.to_ne_bytes());
    config[40..44].copy_from_slice(&u32::from(read_only_port).to_ne_bytes());
    config
}

/// A new `struct reply`, as [`ClientSocket::route`] inserts it: the client's key and the
/// server socket's cookie, the rest zero.
pub(crate) fn reply_bytes(key: &ClientKey, server: u64) -> [u8; REPLY_SIZE] {
    let mut reply = [0u8; REPLY_SIZE];
    reply[..KEY_SIZE].copy_from_slice(&key.bytes());
    reply[KEY_SIZE..KEY_SIZE + 8].copy_from_slice(&server.to_ne_bytes());
    reply
}

/// A `struct reply` as [`ClientSocket::reply`] reads it.
pub(crate) fn decode_reply(raw: &[u8; REPLY_SIZE]) -> Reply {
    let base = KEY_SIZE + 8;
    let u64_at = |i: usize| u64::from_ne_bytes(raw[i..i + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |i: usize| u32::from_ne_bytes(raw[i..i + 4].try_into().unwrap_or([0; 4]));
    let flags = base + 40;
    Reply {
        redirected: u64_at(base),
        passed: u64_at(base + 8),
        allow: u64_at(base + 16),
        peak: u64_at(base + 32),
        // After the flags (24 bytes), `queued` and its tick (16): the direct replies.
        direct: u64_at(base + 40 + 24 + 16),
        mode: match u32_at(flags) {
            R_KERNEL => ReplyMode::Kernel,
            R_DRAINING => ReplyMode::Draining,
            R_USER => ReplyMode::User,
            R_FAILED => ReplyMode::Failed,
            other => {
                tracing::warn!(mode = other, "unknown reply mode: stopping the connection");
                ReplyMode::Failed
            }
        },
        pauses: u32_at(flags + 4),
        fin: u32_at(flags + 16) != 0,
        delivered: u32_at(flags + 20) != 0,
    }
}

/// `struct route`, as [`ClientSocket::route`] inserts it.
pub(crate) fn route_bytes(
    server: u64,
    client: u64,
    from_client: u64,
    to_server: u64,
) -> [u8; ROUTE_SIZE] {
    let mut route = [0u8; ROUTE_SIZE];
    route[0..8].copy_from_slice(&server.to_ne_bytes());
    route[8..16].copy_from_slice(&client.to_ne_bytes());
    route[16..24].copy_from_slice(&from_client.to_ne_bytes());
    route[24..32].copy_from_slice(&to_server.to_ne_bytes());
    route
}

/// The program's event ring.
pub type Events = Ring<Event, Arc<ClientSocket>>;

fn decode_event(record: &[u8]) -> Option<Event> {
    let (server, kind) = cookie_and_kind(record)?;
    let kind = match kind {
        EVENT_DRAINED => EventKind::Drained,
        EVENT_DELIVERED => EventKind::Delivered,
        EVENT_FAILED => EventKind::Failed,
        EVENT_PAUSED => EventKind::Paused,
        _ => return None,
    };
    Some(Event { server, kind })
}

/// A socket's peer (`peer`) or local address.
fn socket_addr(fd: RawFd, peer: bool) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    let ptr = (&mut storage as *mut libc::sockaddr_storage).cast::<libc::sockaddr>();
    // SAFETY: the call writes at most `len` bytes into `storage`.
    let rc = unsafe {
        if peer {
            libc::getpeername(fd, ptr, &mut len)
        } else {
            libc::getsockname(fd, ptr, &mut len)
        }
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    match i32::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a = unsafe {
                &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            Ok(SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a = unsafe {
                &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            Ok(SocketAddr::from((
                std::net::Ipv6Addr::from(a.sin6_addr.s6_addr),
                u16::from_be(a.sin6_port),
            )))
        }
        other => Err(io::Error::other(format!(
            "address family {other} is not TCP/IP"
        ))),
    }
}
