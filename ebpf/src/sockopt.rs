//! Socket options on raw descriptors, through one `getsockopt` and one `setsockopt`.
//!
//! The kernel-forwarding code works on descriptors owned elsewhere (the proxy's runtimes, the
//! client's socket in a sockhash), so options are read and set by descriptor. Each option is
//! a one-line typed wrapper over [`get`], [`get_bytes`] or [`set`], which hold the only
//! `unsafe` (in the manner of pingora's `protocols/l4/ext.rs`). Options socket2 offers on an
//! owned socket are still read here when only the raw descriptor is at hand.

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

/// Reads a fixed-size option into a `T` (an integer type).
pub fn get<T: Copy + Default>(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<T> {
    let mut value = T::default();
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` (= size_of::<T>()) bytes into `value`, which
    // lives on this frame; T is an integer type, valid for any bytes written.
    let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != size_of::<T>() {
        return Err(io::Error::other(format!(
            "option {level}/{name}: {len} bytes, expected {}",
            size_of::<T>()
        )));
    }
    Ok(value)
}

/// Reads a variable-size option into `buf`; returns how many bytes the kernel wrote.
pub fn get_bytes(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    buf: &mut [u8],
) -> io::Result<usize> {
    let mut len = libc::socklen_t::try_from(buf.len()).unwrap_or(libc::socklen_t::MAX);
    // SAFETY: getsockopt writes at most `len` bytes into `buf`, which is at least that long.
    let rc = unsafe { libc::getsockopt(fd, level, name, buf.as_mut_ptr().cast(), &raw mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(len as usize)
}

/// Sets a fixed-size option from a `T` (an integer type).
pub fn set<T: Copy>(fd: RawFd, level: libc::c_int, name: libc::c_int, value: T) -> io::Result<()> {
    // SAFETY: setsockopt reads exactly size_of::<T>() bytes from `value`, on this frame.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&raw const value).cast(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A socket's cookie (`SO_COOKIE`): unique for the life of the system.
pub fn cookie(fd: RawFd) -> io::Result<u64> {
    get(fd, libc::SOL_SOCKET, libc::SO_COOKIE)
}

/// The cookie of a socket's network namespace (`SO_NETNS_COOKIE`, Linux >= 5.14).
pub fn netns_cookie(fd: RawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    get(fd, libc::SOL_SOCKET, SO_NETNS_COOKIE)
}

/// The pending error of a socket (`SO_ERROR`), which reading it clears; an error with code
/// 0 when there is none.
pub fn pending_error(fd: RawFd) -> io::Error {
    match get::<libc::c_int>(fd, libc::SOL_SOCKET, libc::SO_ERROR) {
        Ok(code) => io::Error::from_raw_os_error(code),
        Err(e) => e,
    }
}

/// A TCP socket's `tcpi_bytes_acked` and `tcpi_bytes_received` (Linux >= 4.1), in that
/// order. `struct tcp_info` is longer than libc's definition: the raw bytes are read and the
/// two u64 fields taken at their fixed offsets (120 and 128, stable since 4.1).
pub fn tcp_byte_counts(fd: RawFd) -> io::Result<(u64, u64)> {
    let mut buf = [0u8; 256];
    let len = get_bytes(fd, libc::IPPROTO_TCP, libc::TCP_INFO, &mut buf)?;
    if len < 136 {
        return Err(io::Error::other("TCP_INFO too short (kernel < 4.1)"));
    }
    let at = |i: usize| u64::from_ne_bytes(buf[i..i + 8].try_into().unwrap_or([0; 8]));
    Ok((at(120), at(128)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_and_sets_options_of_a_real_socket() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let fd = client.as_raw_fd();
        let a = cookie(fd).expect("cookie");
        let b = cookie(listener.as_raw_fd()).expect("cookie");
        assert_ne!(a, 0);
        assert_ne!(a, b, "cookies are unique per socket");
        assert_eq!(
            netns_cookie(fd).expect("netns"),
            netns_cookie(listener.as_raw_fd()).expect("netns")
        );
        assert_eq!(pending_error(fd).raw_os_error(), Some(0));
        // The SYN counts as one acknowledged byte; nothing was received.
        assert_eq!(tcp_byte_counts(fd).expect("tcp_info").1, 0);
        set(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, 65536 as libc::c_int).expect("set");
        let doubled: libc::c_int = get(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).expect("get");
        assert_eq!(doubled, 131072, "the kernel doubles SO_RCVBUF");
        let not_a_socket = std::fs::File::open("/dev/null").expect("open");
        assert!(cookie(not_a_socket.as_raw_fd()).is_err());
    }
}
