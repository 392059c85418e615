//! tendril-ebpf: destroys every TCP socket on the host that is connected to a demoted master,
//! including connections that never went through the proxy.
//!
//! Mechanisms, in order of preference, chosen by [`SocketKiller::load`]:
//! 1. **BPF**: a `iter/tcp` program (C, `bpf/killer.bpf.c`) walks the host's TCP sockets and
//!    calls the `bpf_sock_destroy()` kfunc (Linux >= 6.5) on each one matching a target.
//!    Needs CAP_BPF and CAP_PERFMON. Loaded with libbpf-rs: aya cannot load kfunc calls on
//!    this toolchain (aya >= 0.15, which can, needs Rust 1.98); the loader is this one
//!    module, so moving to aya is a one-file change.
//! 2. **netlink**: `SOCK_DIAG_BY_FAMILY` dump, then `SOCK_DESTROY` per matching socket (what
//!    `ss -K` does). Needs CAP_NET_ADMIN.
//! 3. **none**: the proxy closes its own connections only.
//!
//! The crate also loads the kernel-forwarding program ([`sockmap`]): the proxy's in-kernel
//! fast path, built and loaded the same way, and [`client_socket`], its variant for clients on the
//! proxy's own host, which forwards on the client's own socket.
//!
//! Both walk only the network namespace of the calling process. A destroyed socket's owner
//! sees `ECONNABORTED` on its next operation (pending io_uring operations complete with it);
//! the peer sees a reset.

mod bpf;
pub mod client_socket;
#[cfg(test)]
mod layout;
mod netlink;
mod object;
pub mod ring;
pub mod sockmap;
pub mod sockopt;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// Which end of a connection a target names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Sockets whose remote end is the target (clients of a server: the proxy's and any
    /// application's connections to the old master).
    Remote,
    /// Sockets whose local end is the target (the server side).
    Local,
}

/// Sockets to destroy: those whose `side` end is `addr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// Address and port.
    pub addr: SocketAddr,
    /// Which end.
    pub side: Side,
}

impl Target {
    /// Every socket connected to `addr` (remote end).
    pub fn peer(addr: SocketAddr) -> Target {
        Target {
            addr,
            side: Side::Remote,
        }
    }

    fn matches(&self, local: SocketAddr, remote: SocketAddr) -> bool {
        let other = match self.side {
            Side::Remote => remote,
            Side::Local => local,
        };
        other.port() == self.addr.port() && same_ip(other.ip(), self.addr.ip())
    }
}

fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let canon = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    canon(a) == canon(b)
}

/// The mechanism in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// BPF iterator with `bpf_sock_destroy`.
    Bpf,
    /// netlink `SOCK_DESTROY`.
    Netlink,
    /// Nothing beyond the proxy's own connections.
    None,
}

impl Mechanism {
    /// For logs and metrics.
    pub fn label(self) -> &'static str {
        match self {
            Mechanism::Bpf => "bpf",
            Mechanism::Netlink => "netlink",
            Mechanism::None => "none",
        }
    }
}

/// What a kill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KillReport {
    /// Sockets destroyed.
    pub destroyed: u64,
    /// Sockets that matched (destroyed or failed).
    pub matched: u64,
    /// Sockets looked at.
    pub scanned: u64,
    /// Matching sockets that could not be destroyed.
    pub errors: u64,
    /// How long the walk took.
    pub elapsed: Duration,
    /// The mechanism used.
    pub mechanism: Mechanism,
}

/// A mechanism cannot be used here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{mechanism} unavailable: {reason}")]
pub struct Unavailable {
    /// Which.
    pub mechanism: &'static str,
    /// Why (missing capability, old kernel, not built).
    pub reason: String,
}

/// The maps of a running proxy's kernel programs, received by the proxy that takes over
/// from it (by name): loaded with them, the new process's programs and the old one's work on
/// the same connections, which the new process can then adopt. Only for the same object with
/// the same settings (equal fingerprints, see `client_socket::fingerprint`), since both
/// processes' programs then work on the maps at once.
#[derive(Debug, Default)]
pub struct Inherited {
    /// Each map's name and descriptor.
    pub maps: Vec<(String, std::os::fd::OwnedFd)>,
}

/// FNV-1a over `parts` in 16 hex digits: stable across builds and Rust versions (unlike the
/// standard hasher), for the fingerprints two processes compare.
pub fn fingerprint(parts: &[&[u8]]) -> String {
    object::fingerprint(parts)
}

/// A kill failed.
#[derive(Debug, thiserror::Error)]
pub enum KillError {
    /// The BPF side failed.
    #[error("BPF socket walk failed: {0}")]
    Bpf(String),
    /// A netlink call failed.
    #[error("netlink {op} failed: {source}")]
    Netlink {
        /// The operation.
        op: &'static str,
        /// The error.
        source: std::io::Error,
    },
    /// No mechanism is available.
    #[error("no socket killer is available on this host")]
    Unavailable,
}

/// The socket killer, with the best mechanism available.
#[derive(Debug)]
pub struct SocketKiller {
    inner: Inner,
    fallback: Vec<Unavailable>,
}

#[derive(Debug)]
enum Inner {
    Bpf(Box<bpf::BpfKiller>),
    Netlink(netlink::NetlinkKiller),
    None,
}

impl SocketKiller {
    /// Loads the best mechanism available; never fails. [`SocketKiller::fallbacks`] says why
    /// better ones were not used.
    pub fn load() -> SocketKiller {
        let mut fallback = Vec::new();
        match bpf::BpfKiller::load() {
            Ok(k) => {
                return SocketKiller {
                    inner: Inner::Bpf(Box::new(k)),
                    fallback,
                };
            }
            Err(e) => fallback.push(e),
        }
        match netlink::NetlinkKiller::open() {
            Ok(k) => SocketKiller {
                inner: Inner::Netlink(k),
                fallback,
            },
            Err(e) => {
                fallback.push(e);
                SocketKiller {
                    inner: Inner::None,
                    fallback,
                }
            }
        }
    }

    /// The BPF mechanism only.
    pub fn load_bpf() -> Result<SocketKiller, Unavailable> {
        Ok(SocketKiller {
            inner: Inner::Bpf(Box::new(bpf::BpfKiller::load()?)),
            fallback: Vec::new(),
        })
    }

    /// The netlink mechanism only.
    pub fn load_netlink() -> Result<SocketKiller, Unavailable> {
        Ok(SocketKiller {
            inner: Inner::Netlink(netlink::NetlinkKiller::open()?),
            fallback: Vec::new(),
        })
    }

    /// The mechanism in use.
    pub fn mechanism(&self) -> Mechanism {
        match self.inner {
            Inner::Bpf(_) => Mechanism::Bpf,
            Inner::Netlink(_) => Mechanism::Netlink,
            Inner::None => Mechanism::None,
        }
    }

    /// Why the better mechanisms were not used.
    pub fn fallbacks(&self) -> &[Unavailable] {
        &self.fallback
    }

    /// Destroys every socket matching a target.
    pub fn kill(&mut self, targets: &[Target]) -> Result<KillReport, KillError> {
        let started = Instant::now();
        let mechanism = self.mechanism();
        let counts = match &mut self.inner {
            Inner::Bpf(k) => k.walk(targets, bpf::Mode::Destroy)?,
            Inner::Netlink(k) => k.walk(targets, true)?,
            Inner::None => return Err(KillError::Unavailable),
        };
        Ok(KillReport {
            destroyed: counts.destroyed,
            matched: counts.matched,
            scanned: counts.scanned,
            errors: counts.errors,
            elapsed: started.elapsed(),
            mechanism,
        })
    }

    /// Counts the sockets matching the targets without touching them (the connection
    /// tracker: how many host sockets still point at a backend).
    pub fn count(&mut self, targets: &[Target]) -> Result<KillReport, KillError> {
        let started = Instant::now();
        let mechanism = self.mechanism();
        let counts = match &mut self.inner {
            Inner::Bpf(k) => k.walk(targets, bpf::Mode::Count)?,
            Inner::Netlink(k) => k.walk(targets, false)?,
            Inner::None => return Err(KillError::Unavailable),
        };
        Ok(KillReport {
            destroyed: 0,
            matched: counts.matched,
            scanned: counts.scanned,
            errors: 0,
            elapsed: started.elapsed(),
            mechanism,
        })
    }
}

/// Counts from one walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counts {
    pub scanned: u64,
    pub matched: u64,
    pub destroyed: u64,
    pub errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_either_end_and_mapped_addresses() {
        let t = Target::peer("127.0.0.1:5432".parse().unwrap());
        let client: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let server: SocketAddr = "127.0.0.1:5432".parse().unwrap();
        assert!(t.matches(client, server));
        assert!(!t.matches(server, client));
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5432".parse().unwrap();
        assert!(t.matches(client, mapped));
        let local = Target {
            addr: server,
            side: Side::Local,
        };
        assert!(local.matches(server, client));
        assert!(!Target::peer("127.0.0.1:5433".parse().unwrap()).matches(client, server));
    }
}
