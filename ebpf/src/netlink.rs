//! The netlink mechanism: dump TCP sockets with `SOCK_DIAG_BY_FAMILY`, then destroy each
//! matching one with `SOCK_DESTROY` (what `ss -K` does). Needs CAP_NET_ADMIN and a kernel
//! built with `CONFIG_INET_DIAG_DESTROY`.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::{Counts, KillError, Target, Unavailable};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const SOCKID_LEN: usize = 48;
const REQ_LEN: usize = 8 + SOCKID_LEN;
const MSG_LEN: usize = 4 + SOCKID_LEN + 20;

/// TCP states to look at: everything but LISTEN (10), TIME_WAIT (6) and NEW_SYN_RECV (12).
const STATES: u32 = 0xfff & !(1 << 0) & !(1 << 6) & !(1 << 10);

#[derive(Debug)]
pub(crate) struct NetlinkKiller {
    fd: OwnedFd,
    seq: u32,
}

fn io_err(op: &'static str) -> impl Fn(io::Error) -> KillError {
    move |source| KillError::Netlink { op, source }
}

impl NetlinkKiller {
    pub(crate) fn open() -> Result<NetlinkKiller, Unavailable> {
        let unavailable = |reason: String| Unavailable {
            mechanism: "netlink socket killer",
            reason,
        };
        // SAFETY: socket(2) takes integers only; the result is checked and owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(unavailable(format!(
                "cannot open a sock_diag socket: {}",
                io::Error::last_os_error()
            )));
        }
        // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut k = NetlinkKiller { fd, seq: 1 };
        // Probe: destroying a socket that does not exist answers ENOENT when allowed, EPERM
        // without CAP_NET_ADMIN, EOPNOTSUPP without CONFIG_INET_DIAG_DESTROY.
        let probe = [0u8; SOCKID_LEN];
        match k.destroy(libc::AF_INET as u8, &probe) {
            Ok(()) => Ok(k),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(k),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                Err(unavailable("SOCK_DESTROY needs CAP_NET_ADMIN".into()))
            }
            Err(e) => Err(unavailable(format!("SOCK_DESTROY is not usable: {e}"))),
        }
    }

    pub(crate) fn walk(&mut self, targets: &[Target], destroy: bool) -> Result<Counts, KillError> {
        let mut counts = Counts::default();
        for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
            let sockets = self.dump(family)?;
            counts.scanned += sockets.len() as u64;
            for (local, remote, id) in sockets {
                if !targets.iter().any(|t| t.matches(local, remote)) {
                    continue;
                }
                counts.matched += 1;
                if !destroy {
                    continue;
                }
                match self.destroy(family, &id) {
                    Ok(()) => counts.destroyed += 1,
                    // Gone between the dump and the destroy: nothing to do.
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    Err(e) => {
                        tracing::debug!(%local, %remote, error = %e, "SOCK_DESTROY failed");
                        counts.errors += 1;
                    }
                }
            }
        }
        Ok(counts)
    }

    /// Every TCP socket of `family` in the states of interest: (local, remote, raw id).
    fn dump(
        &mut self,
        family: u8,
    ) -> Result<Vec<(SocketAddr, SocketAddr, [u8; SOCKID_LEN])>, KillError> {
        let seq = self.next_seq();
        let req = request(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            seq,
            family,
            STATES,
            &[0u8; SOCKID_LEN],
        );
        self.send(&req).map_err(io_err("dump request"))?;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = self.recv(&mut buf).map_err(io_err("dump"))?;
            let mut at = 0;
            while at + NLMSG_HDRLEN <= n {
                let len = u32_at(&buf, at) as usize;
                let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
                if len < NLMSG_HDRLEN || at + len > n {
                    return Err(KillError::Netlink {
                        op: "dump",
                        source: io::Error::other("truncated netlink message"),
                    });
                }
                match kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = -i32::from_ne_bytes([
                            buf[at + 16],
                            buf[at + 17],
                            buf[at + 18],
                            buf[at + 19],
                        ]);
                        return Err(KillError::Netlink {
                            op: "dump",
                            source: io::Error::from_raw_os_error(errno),
                        });
                    }
                    SOCK_DIAG_BY_FAMILY if len >= NLMSG_HDRLEN + MSG_LEN => {
                        let msg = &buf[at + NLMSG_HDRLEN..at + len];
                        let mut id = [0u8; SOCKID_LEN];
                        id.copy_from_slice(&msg[4..4 + SOCKID_LEN]);
                        if let Some((local, remote)) = endpoints(msg[0], &id) {
                            out.push((local, remote, id));
                        }
                    }
                    _ => {}
                }
                at += (len + 3) & !3;
            }
        }
    }

    fn destroy(&mut self, family: u8, id: &[u8; SOCKID_LEN]) -> io::Result<()> {
        let seq = self.next_seq();
        let req = request(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            seq,
            family,
            0xfff,
            id,
        );
        self.send(&req)?;
        let mut buf = [0u8; 1024];
        loop {
            let n = self.recv(&mut buf)?;
            if n < NLMSG_HDRLEN + 4 {
                return Err(io::Error::other("short netlink acknowledgement"));
            }
            let kind = u16::from_ne_bytes([buf[4], buf[5]]);
            let got_seq = u32_at(&buf, 8);
            if kind == NLMSG_ERROR && got_seq == seq {
                let errno = -i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
                return if errno == 0 {
                    Ok(())
                } else {
                    Err(io::Error::from_raw_os_error(errno))
                };
            }
        }
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: the pointer and length describe `msg`, alive for the call; the socket is
        // connected to the kernel by default (no address needed).
        let n = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe `buf`, writable and alive for the call.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

fn u32_at(buf: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

/// A netlink message carrying an `inet_diag_req_v2` for TCP.
fn request(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    states: u32,
    id: &[u8; SOCKID_LEN],
) -> Vec<u8> {
    let len = NLMSG_HDRLEN + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.push(family);
    m.push(libc::IPPROTO_TCP as u8);
    m.push(0);
    m.push(0);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

/// Local and remote addresses from an `inet_diag_sockid`.
fn endpoints(family: u8, id: &[u8; SOCKID_LEN]) -> Option<(SocketAddr, SocketAddr)> {
    let sport = u16::from_be_bytes([id[0], id[1]]);
    let dport = u16::from_be_bytes([id[2], id[3]]);
    let (src, dst): (IpAddr, IpAddr) = match i32::from(family) {
        libc::AF_INET => (
            Ipv4Addr::new(id[4], id[5], id[6], id[7]).into(),
            Ipv4Addr::new(id[20], id[21], id[22], id[23]).into(),
        ),
        libc::AF_INET6 => {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&id[4..20]);
            d.copy_from_slice(&id[20..36]);
            (Ipv6Addr::from(s).into(), Ipv6Addr::from(d).into())
        }
        _ => return None,
    };
    Some((SocketAddr::new(src, sport), SocketAddr::new(dst, dport)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_socket_ids() {
        let mut id = [0u8; SOCKID_LEN];
        id[0..2].copy_from_slice(&40000u16.to_be_bytes());
        id[2..4].copy_from_slice(&5432u16.to_be_bytes());
        id[4..8].copy_from_slice(&[127, 0, 0, 1]);
        id[20..24].copy_from_slice(&[10, 0, 0, 2]);
        let (l, r) = endpoints(libc::AF_INET as u8, &id).unwrap();
        assert_eq!(l, "127.0.0.1:40000".parse().unwrap());
        assert_eq!(r, "10.0.0.2:5432".parse().unwrap());
        assert!(endpoints(99, &id).is_none());
        let req = request(SOCK_DESTROY, NLM_F_REQUEST | NLM_F_ACK, 7, 2, 0xfff, &id);
        assert_eq!(req.len(), NLMSG_HDRLEN + REQ_LEN);
        assert_eq!(u32_at(&req, 0) as usize, req.len());
        assert_eq!(&req[NLMSG_HDRLEN + 8..], &id);
    }
}
