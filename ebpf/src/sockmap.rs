//! Kernel forwarding: the sockmap fast path. `bpf/sockmap.bpf.c` redirects every skb that
//! arrives on a joined socket to its peer inside the kernel; this module loads it, joins and
//! releases socket pairs, reads each direction's counters, and delivers the program's events
//! (a direction paused for backpressure, a redirect that failed).
//!
//! Map operations are plain `bpf(2)` calls on the map descriptors, safe from any thread: the
//! proxy's workers join pairs and its kernel-path thread follows them.

use std::ffi::c_void;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::Arc;

use libbpf_rs::libbpf_sys;
use libbpf_rs::{MapCore, Object};

use crate::ring::{Ring, cookie_and_kind};
use crate::sockopt::cookie;
use crate::{Inherited, Unavailable};

/// The object file, empty when the build could not make it.
pub(crate) static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/sockmap.bpf.o"));
/// Why the object is empty.
const BUILD_ERROR: &str = env!("TENDRIL_BPF_BUILD_ERROR");

// The program's enums (sockmap.bpf.c), checked against its BTF by CONSTANTS's test.
const MODE_KERNEL: u32 = 0;
const MODE_USER: u32 = 1;
const MODE_FAILED: u32 = 2;
const MODE_JOINING: u32 = 3;

const EVENT_PAUSED: u32 = 1;
const EVENT_FAILED: u32 = 2;

const STAT_REDIRECTS: u32 = 0;
const STAT_PASSES: u32 = 1;
const STAT_PAUSES: u32 = 2;
const STAT_RESUMES: u32 = 3;
const STAT_FAILURES: u32 = 4;
const STAT_LOST_EVENTS: u32 = 5;
const STAT_UNKNOWN: u32 = 6;
const STAT_REPEATED: u32 = 7;
#[cfg(test)]
const STAT_COUNT: u32 = 8;

/// Every constant shared with the program, by its C enum: the layout test
/// (`crate::layout`) checks each against the object's BTF, and that no member is missing.
#[cfg(test)]
pub(crate) const CONSTANTS: &[(&str, &[(&str, u32)])] = &[
    (
        "direction_mode",
        &[
            ("MODE_KERNEL", MODE_KERNEL),
            ("MODE_USER", MODE_USER),
            ("MODE_FAILED", MODE_FAILED),
            ("MODE_JOINING", MODE_JOINING),
        ],
    ),
    (
        "sockmap_event",
        &[
            ("EVENT_PAUSED", EVENT_PAUSED),
            ("EVENT_FAILED", EVENT_FAILED),
        ],
    ),
    (
        "sockmap_stat",
        &[
            ("STAT_REDIRECTS", STAT_REDIRECTS),
            ("STAT_PASSES", STAT_PASSES),
            ("STAT_PAUSES", STAT_PAUSES),
            ("STAT_RESUMES", STAT_RESUMES),
            ("STAT_FAILURES", STAT_FAILURES),
            ("STAT_LOST_EVENTS", STAT_LOST_EVENTS),
            ("STAT_UNKNOWN", STAT_UNKNOWN),
            ("STAT_REPEATED", STAT_REPEATED),
            ("STAT_COUNT", STAT_COUNT),
        ],
    ),
];

/// How a direction moves its bytes right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Redirected inside the kernel.
    Kernel,
    /// Passed up to the proxy (backpressure, or data that arrived while the pair joined).
    User,
    /// A redirect failed: the pair must be closed.
    Failed,
    /// Joined, no data seen yet.
    Joining,
}

/// One direction's state, named by the socket it reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Direction {
    /// Bytes the proxy wrote to the peer before the pair joined.
    pub base: u64,
    /// Most bytes the kernel may hold for this direction.
    pub limit: u64,
    /// Bytes redirected in the kernel.
    pub redirected: u64,
    /// Bytes passed up to the proxy.
    pub passed: u64,
    /// Current mode.
    pub mode: Mode,
    /// Times the direction paused for backpressure.
    pub pauses: u32,
    /// Most bytes seen held in the kernel for this direction at one verdict.
    pub peak: u64,
}

/// `struct direction` of the program.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct RawDirection {
    pub(crate) base: u64,
    pub(crate) limit: u64,
    pub(crate) redirected: u64,
    pub(crate) passed: u64,
    pub(crate) mode: u32,
    pub(crate) pauses: u32,
    pub(crate) peak: u64,
    pub(crate) acked: u64,
    pub(crate) next_seq: u32,
    pub(crate) seq_known: u32,
    pub(crate) trimmed: u64,
    pub(crate) dropped: u64,
}

/// Size of `struct direction`.
const DIRECTION_SIZE: usize = 80;
/// Size of `struct forwarded`.
pub(crate) const FORWARDED_SIZE: usize = 8;

impl RawDirection {
    pub(crate) fn bytes(&self) -> [u8; DIRECTION_SIZE] {
        let mut out = [0u8; DIRECTION_SIZE];
        out[0..8].copy_from_slice(&self.base.to_ne_bytes());
        out[8..16].copy_from_slice(&self.limit.to_ne_bytes());
        out[16..24].copy_from_slice(&self.redirected.to_ne_bytes());
        out[24..32].copy_from_slice(&self.passed.to_ne_bytes());
        out[32..36].copy_from_slice(&self.mode.to_ne_bytes());
        out[36..40].copy_from_slice(&self.pauses.to_ne_bytes());
        out[40..48].copy_from_slice(&self.peak.to_ne_bytes());
        out[48..56].copy_from_slice(&self.acked.to_ne_bytes());
        out[56..60].copy_from_slice(&self.next_seq.to_ne_bytes());
        out[60..64].copy_from_slice(&self.seq_known.to_ne_bytes());
        out[64..72].copy_from_slice(&self.trimmed.to_ne_bytes());
        out[72..80].copy_from_slice(&self.dropped.to_ne_bytes());
        out
    }

    pub(crate) fn from_bytes(b: &[u8; DIRECTION_SIZE]) -> RawDirection {
        let u64_at = |i: usize| u64::from_ne_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_ne_bytes(b[i..i + 4].try_into().unwrap_or([0; 4]));
        RawDirection {
            base: u64_at(0),
            limit: u64_at(8),
            redirected: u64_at(16),
            passed: u64_at(24),
            mode: u32_at(32),
            pauses: u32_at(36),
            peak: u64_at(40),
            acked: u64_at(48),
            next_seq: u32_at(56),
            seq_known: u32_at(60),
            trimmed: u64_at(64),
            dropped: u64_at(72),
        }
    }
}

/// What the program reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The direction read from this socket switched to USER mode.
    Paused,
    /// A redirect from this socket failed; its data cannot be delivered.
    Failed,
}

/// An event for the direction read from the socket with `cookie`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The source socket's cookie.
    pub cookie: u64,
    /// What happened.
    pub kind: EventKind,
}

/// Program-wide counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// skbs redirected.
    pub redirects: u64,
    /// skbs passed up to the proxy.
    pub passes: u64,
    /// Directions paused for backpressure.
    pub pauses: u64,
    /// Directions that went back to the kernel.
    pub resumes: u64,
    /// Redirects that failed.
    pub failures: u64,
    /// Events lost because the ring was full.
    pub lost_events: u64,
    /// skbs on sockets with no direction (passed up).
    pub unknown: u64,
    /// skbs that repeated bytes already delivered (their head cut off, or dropped whole).
    pub repeated: u64,
}

/// Why a pair could not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// The maps are full: the connection stays in userspace.
    #[error("the sockmap is full")]
    MapFull,
    /// The kernel refused (socket state, memory).
    #[error("cannot join the sockmap: {0}")]
    Refused(io::Error),
}

/// A pair to join.
#[derive(Debug, Clone, Copy)]
pub struct JoinRequest {
    /// The client socket.
    pub client: RawFd,
    /// The backend socket.
    pub server: RawFd,
    /// Bytes the proxy already wrote to the client.
    pub written_to_client: u64,
    /// Bytes the proxy already wrote to the backend.
    pub written_to_server: u64,
    /// Most bytes the kernel may hold per direction.
    pub limit: u64,
}

/// The cookies of a joined pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Joined {
    /// The client socket's cookie (names the client-to-backend direction).
    pub client: u64,
    /// The backend socket's cookie (names the backend-to-client direction).
    pub server: u64,
}

/// The loaded program and its maps.
pub struct Sockmap {
    _object: Object,
    peers: RawFd,
    directions: RawFd,
    forwarded: RawFd,
    events: RawFd,
    stats: RawFd,
    max_pairs: u32,
}

impl std::fmt::Debug for Sockmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sockmap")
            .field("max_pairs", &self.max_pairs)
            .finish_non_exhaustive()
    }
}

/// The name the proxy logs when this path is unavailable.
const MECHANISM: &str = "kernel forwarding (BPF sockmap)";

/// [`Sockmap::fingerprint`] of a load with room for `max_pairs`: the object's bytes and the
/// map size.
pub fn fingerprint(max_pairs: u32) -> String {
    crate::object::fingerprint(&[OBJECT, &max_pairs.to_ne_bytes()])
}

fn unavailable(reason: impl Into<String>) -> Unavailable {
    Unavailable {
        mechanism: MECHANISM,
        reason: reason.into(),
    }
}

pub(crate) fn errno(rc: i32) -> io::Error {
    if rc < 0 {
        io::Error::from_raw_os_error(-rc)
    } else {
        io::Error::last_os_error()
    }
}

impl Sockmap {
    /// Loads the program with room for `max_pairs` connections and attaches it to the
    /// sockhash. Fails (with why) when the object was not built, the kernel lacks sockmap,
    /// or the process lacks CAP_BPF/CAP_NET_ADMIN/CAP_PERFMON.
    pub fn load(max_pairs: u32) -> Result<Sockmap, Unavailable> {
        Self::load_with(max_pairs, None)
    }

    /// [`Sockmap::load`], with the maps of the running proxy this one takes over from when
    /// `inherited` is given (same [`fingerprint`] only).
    pub fn load_with(
        max_pairs: u32,
        inherited: Option<&Inherited>,
    ) -> Result<Sockmap, Unavailable> {
        if max_pairs == 0 {
            return Err(unavailable("room for 0 connections"));
        }
        let mut open = crate::object::open(OBJECT, BUILD_ERROR, MECHANISM)?;
        let sockets = max_pairs.saturating_mul(2);
        if let Some(inherited) = inherited {
            crate::object::reuse(&mut open, inherited, MECHANISM)?;
        } else {
            for mut map in open.maps_mut() {
                let name = map.name().to_string_lossy().into_owned();
                if matches!(name.as_str(), "peers" | "directions" | "forwarded") {
                    map.set_max_entries(sockets)
                        .map_err(|e| unavailable(format!("size map {name}: {e}")))?;
                }
            }
        }
        let object = crate::object::load(open, MECHANISM)?;
        let fd = |name: &str| -> Result<RawFd, Unavailable> {
            object
                .maps()
                .find(|m| m.name() == name)
                .map(|m| m.as_fd().as_raw_fd())
                .ok_or_else(|| unavailable(format!("map {name} missing from the object")))
        };
        // Lookups copy whole values into buffers sized here: the layouts must agree.
        for (name, size) in [
            ("directions", DIRECTION_SIZE),
            ("forwarded", FORWARDED_SIZE),
        ] {
            let declared = object
                .maps()
                .find(|m| m.name() == name)
                .map(|m| m.value_size() as usize);
            if declared != Some(size) {
                return Err(unavailable(format!(
                    "map {name} holds {declared:?}-byte values, the loader expects {size}"
                )));
            }
        }
        let peers = fd("peers")?;
        let directions = fd("directions")?;
        let forwarded = fd("forwarded")?;
        let events = fd("events")?;
        let stats = fd("stats")?;
        {
            let program = object
                .progs_mut()
                .find(|p| p.name() == "forward")
                .ok_or_else(|| unavailable("program forward missing from the object"))?;
            program
                .attach_sockmap(peers)
                .map_err(|e| unavailable(format!("attach the verdict to the sockhash: {e}")))?;
        }
        Ok(Sockmap {
            _object: object,
            peers,
            directions,
            forwarded,
            events,
            stats,
            max_pairs,
        })
    }

    /// Connections the maps have room for.
    pub fn max_pairs(&self) -> u32 {
        self.max_pairs
    }

    /// What a proxy taking over from this one must load identically to share its maps.
    pub fn fingerprint(&self) -> String {
        fingerprint(self.max_pairs)
    }

    /// Each map of the object that a taker loads with ([`Inherited`]).
    pub fn maps(&self) -> Vec<(String, RawFd)> {
        crate::object::shared_maps(&self._object)
    }

    /// Joins a connected pair: from now on the kernel forwards between them. On error
    /// nothing is left in the maps and the sockets are untouched, so the caller can forward
    /// in userspace.
    ///
    /// The backend joins first when nothing was written to it yet (it stays silent until the
    /// client's first message arrives), the client first otherwise (it waits for the
    /// backend's answer): the socket that may be receiving joins last. Bytes that arrive
    /// anyway before the peer joined are passed up, never lost (JOINING mode). Data queued on
    /// a socket before it joined is pushed through the program with a peek, so it is
    /// forwarded without waiting for more.
    pub fn join(&self, req: &JoinRequest) -> Result<Joined, JoinError> {
        let client = cookie(req.client).map_err(JoinError::Refused)?;
        let server = cookie(req.server).map_err(JoinError::Refused)?;
        let joined = Joined { client, server };
        let dir = |base: u64| RawDirection {
            base,
            limit: req.limit,
            mode: MODE_JOINING,
            ..RawDirection::default()
        };
        let result = (|| {
            self.insert(self.directions, client, &dir(req.written_to_server).bytes())?;
            self.insert(self.directions, server, &dir(req.written_to_client).bytes())?;
            self.insert(self.forwarded, client, &0u64.to_ne_bytes())?;
            self.insert(self.forwarded, server, &0u64.to_ne_bytes())?;
            // peers[c] is the socket c's data goes to: inserting it makes that socket join.
            let backend_entry = (client, req.server);
            let client_entry = (server, req.client);
            let order = if req.written_to_server == 0 {
                [backend_entry, client_entry]
            } else {
                [client_entry, backend_entry]
            };
            for (key, fd) in order {
                self.insert(self.peers, key, &(fd as u64).to_ne_bytes())?;
            }
            Ok(())
        })();
        if let Err(e) = result {
            self.forget(&joined);
            return Err(e);
        }
        push_queued(req.client);
        push_queued(req.server);
        Ok(joined)
    }

    fn insert(&self, map: RawFd, key: u64, value: &[u8]) -> Result<(), JoinError> {
        // SAFETY: key and value point to live buffers of the sizes the map was created with
        // (8-byte keys; values of DIRECTION_SIZE or FORWARDED_SIZE bytes, checked at load).
        let rc = unsafe {
            libbpf_sys::bpf_map_update_elem(
                map,
                (&key as *const u64).cast(),
                value.as_ptr().cast(),
                u64::from(libbpf_sys::BPF_NOEXIST),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = errno(rc);
        match err.raw_os_error() {
            Some(libc::E2BIG) | Some(libc::ENOMEM) | Some(libc::ENOSPC) => Err(JoinError::MapFull),
            _ => Err(JoinError::Refused(err)),
        }
    }

    fn delete(&self, map: RawFd, key: u64) {
        // SAFETY: key points to a live 8-byte buffer; a missing key is ENOENT, ignored.
        unsafe {
            libbpf_sys::bpf_map_delete_elem(map, (&key as *const u64).cast());
        }
    }

    /// Stops the kernel forwarding between the pair (the fence): later skbs find no peer.
    pub fn leave(&self, pair: &Joined) {
        self.delete(self.peers, pair.client);
        self.delete(self.peers, pair.server);
    }

    /// Removes every trace of the pair from the maps (after its sockets are closed, or when
    /// a join is undone).
    pub fn forget(&self, pair: &Joined) {
        self.leave(pair);
        for key in [pair.client, pair.server] {
            self.delete(self.directions, key);
            self.delete(self.forwarded, key);
        }
    }

    /// Sockets whose directions are in the maps while the socket is in no pair of the
    /// sockhash: left behind by a process that ended without forgetting them (killed while
    /// it held them), or on their way in or out of a join (see [`Sockmap::forget_socket`]).
    pub fn orphans(&self) -> Vec<u64> {
        cookie_keys(self.directions)
            .into_iter()
            .filter(|c| !sockhash_has(self.peers, *c))
            .collect()
    }

    /// Removes what the maps hold for one socket of a pair whose process is gone (an
    /// orphan that stayed one: the caller checks it twice, a while apart).
    pub fn forget_socket(&self, cookie: u64) {
        for map in [self.peers, self.directions, self.forwarded] {
            self.delete(map, cookie);
        }
    }

    /// The direction read from the socket with `cookie`.
    pub fn direction(&self, cookie: u64) -> Option<Direction> {
        let mut raw = [0u8; DIRECTION_SIZE];
        // SAFETY: the value buffer is the map's value size; key is 8 bytes.
        let rc = unsafe {
            libbpf_sys::bpf_map_lookup_elem(
                self.directions,
                (&cookie as *const u64).cast(),
                raw.as_mut_ptr().cast(),
            )
        };
        if rc != 0 {
            return None;
        }
        let d = RawDirection::from_bytes(&raw);
        Some(Direction {
            base: d.base,
            limit: d.limit,
            redirected: d.redirected,
            passed: d.passed,
            mode: match d.mode {
                MODE_KERNEL => Mode::Kernel,
                MODE_USER => Mode::User,
                MODE_JOINING => Mode::Joining,
                MODE_FAILED => Mode::Failed,
                other => {
                    tracing::warn!(mode = other, "unknown direction mode: stopping the pair");
                    Mode::Failed
                }
            },
            pauses: d.pauses,
            peak: d.peak,
        })
    }

    /// Records that the proxy wrote `bytes` of the direction's passed data to the peer.
    pub fn set_forwarded(&self, cookie: u64, bytes: u64) -> io::Result<()> {
        // SAFETY: key and value are live 8-byte buffers, the map's sizes.
        let rc = unsafe {
            libbpf_sys::bpf_map_update_elem(
                self.forwarded,
                (&cookie as *const u64).cast(),
                (&bytes as *const u64).cast(),
                u64::from(libbpf_sys::BPF_EXIST),
            )
        };
        if rc == 0 { Ok(()) } else { Err(errno(rc)) }
    }

    /// Program-wide counters, summed over CPUs.
    pub fn stats(&self) -> Stats {
        let read = |i: u32| percpu_sum(self.stats, i);
        Stats {
            redirects: read(STAT_REDIRECTS),
            passes: read(STAT_PASSES),
            pauses: read(STAT_PAUSES),
            resumes: read(STAT_RESUMES),
            failures: read(STAT_FAILURES),
            lost_events: read(STAT_LOST_EVENTS),
            unknown: read(STAT_UNKNOWN),
            repeated: read(STAT_REPEATED),
        }
    }

    /// Entries in (peers, directions, forwarded): what a leak check looks at.
    pub fn entries(&self) -> (usize, usize, usize) {
        (
            count_keys(self.peers, 8),
            count_keys(self.directions, 8),
            count_keys(self.forwarded, 8),
        )
    }

    /// Opens the event ring (one consumer: the proxy's kernel-path thread).
    pub fn events(self: &Arc<Self>) -> io::Result<Events> {
        Ring::open(self.events, decode_event, self.clone())
    }
}

/// The program's event ring.
pub type Events = Ring<Event, Arc<Sockmap>>;

fn decode_event(record: &[u8]) -> Option<Event> {
    let (cookie, kind) = cookie_and_kind(record)?;
    let kind = match kind {
        EVENT_PAUSED => EventKind::Paused,
        EVENT_FAILED => EventKind::Failed,
        _ => return None,
    };
    Some(Event { cookie, kind })
}

/// Runs the verdict over bytes that reached the socket before it joined (a receive on a
/// sockmap socket first feeds its TCP queue to the program). A peek, so anything the
/// program passes up stays queued for the proxy.
pub(crate) fn push_queued(fd: RawFd) {
    let mut byte = 0u8;
    // SAFETY: recv writes at most 1 byte into `byte`; MSG_DONTWAIT never blocks.
    unsafe {
        libc::recv(
            fd,
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        );
    }
}

/// Keys in a map whose keys are `key_size` bytes (at most 64).
pub(crate) fn count_keys(map: RawFd, key_size: usize) -> usize {
    keys(map, key_size).len()
}

/// The keys of `map`, whose keys are `key_size` bytes (at most 64), up to 1<<24 of them.
pub(crate) fn keys(map: RawFd, key_size: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut next = [0u8; 64];
    debug_assert!(key_size <= 64);
    loop {
        let prev: *const c_void = match out.last() {
            None => std::ptr::null(),
            Some(k) => <Vec<u8> as AsRef<[u8]>>::as_ref(k).as_ptr().cast(),
        };
        // SAFETY: `prev` is null or a live key of the map's key size; `next` is 64 bytes,
        // at least the map's key size.
        let rc = unsafe { libbpf_sys::bpf_map_get_next_key(map, prev, next.as_mut_ptr().cast()) };
        if rc != 0 || out.len() >= 1 << 24 {
            return out;
        }
        out.push(next[..key_size].to_vec());
    }
}

/// The keys of a map keyed by a u64 (a socket cookie).
pub(crate) fn cookie_keys(map: RawFd) -> Vec<u64> {
    keys(map, 8)
        .into_iter()
        .filter_map(|k| Some(u64::from_ne_bytes(k.try_into().ok()?)))
        .collect()
}

/// Whether a sockhash keyed by a u64 holds `key` (a lookup from userspace writes the
/// socket's cookie).
pub(crate) fn sockhash_has(map: RawFd, key: u64) -> bool {
    let mut cookie = [0u8; 8];
    // SAFETY: the key is 8 bytes and the value buffer 8, a sockhash's sizes here.
    let rc = unsafe {
        libbpf_sys::bpf_map_lookup_elem(
            map,
            (&key as *const u64).cast(),
            cookie.as_mut_ptr().cast(),
        )
    };
    rc == 0
}

/// Entry `i` of a per-CPU array of u64, summed over CPUs (0 when it cannot be read).
pub(crate) fn percpu_sum(map: RawFd, i: u32) -> u64 {
    // SAFETY: libbpf_num_possible_cpus reads sysfs and returns a count or a negative errno.
    let cpus = unsafe { libbpf_sys::libbpf_num_possible_cpus() }.max(1) as usize;
    let mut values = vec![0u64; cpus];
    // SAFETY: a per-CPU array lookup writes one 8-byte value per possible CPU into the
    // buffer, which has exactly that many.
    let rc = unsafe {
        libbpf_sys::bpf_map_lookup_elem(map, (&i as *const u32).cast(), values.as_mut_ptr().cast())
    };
    if rc == 0 { values.iter().sum() } else { 0 }
}
