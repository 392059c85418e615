//! The few raw socket calls the data plane needs on file descriptors owned elsewhere.

use std::os::fd::RawFd;

/// Shuts a socket down in both directions: pending reads and writes on it (including
/// io_uring operations in flight) complete at once, and the peer sees the connection end.
///
/// Used by the fence, which must cut connections owned by their forwarding tasks without
/// waiting for them.
pub fn shutdown_both(fd: RawFd) {
    // SAFETY: shutdown(2) only takes an integer; on a descriptor that is not a socket (or is
    // no longer open) it fails with ENOTSOCK/EBADF and touches no memory. Callers pass the fd
    // of a socket registered by a live connection task, removed from the registry before the
    // socket is closed, on the same thread.
    unsafe {
        libc::shutdown(fd, libc::SHUT_RDWR);
    }
}

/// Raises the soft open-file limit to the hard limit (a proxy holds two sockets per client).
/// Returns the new soft limit.
pub fn raise_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed by pointer, which lives on
    // this stack frame for the duration of the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    limit.rlim_cur
}

/// Byte counters of a TCP socket, from `TCP_INFO`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpBytes {
    /// Bytes the peer acknowledged (`tcpi_bytes_acked`).
    pub acked: u64,
    /// Bytes received in order (`tcpi_bytes_received`).
    pub received: u64,
}

/// Reads `tcpi_bytes_acked` and `tcpi_bytes_received` (Linux >= 4.1).
pub fn tcp_bytes(fd: RawFd) -> std::io::Result<TcpBytes> {
    let (acked, received) = tendril_ebpf::sockopt::tcp_byte_counts(fd)?;
    Ok(TcpBytes { acked, received })
}

/// Bytes written to a TCP socket since it connected: acknowledged plus still in the send
/// queue. Read in that order, so a concurrent acknowledgement can only make it smaller
/// (callers wait for it to reach a value; an underestimate only makes them wait longer).
pub fn tcp_written(fd: RawFd) -> std::io::Result<u64> {
    let acked = tcp_bytes(fd)?.acked;
    Ok(acked + unacknowledged(fd)?)
}

/// Bytes written to a TCP socket that its peer has not acknowledged yet (`SIOCOUTQ`).
pub fn unacknowledged(fd: RawFd) -> std::io::Result<u64> {
    let mut outq: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int into `outq`.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut outq) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(outq.max(0) as u64)
}

/// How long passing on a reset waits for the peer to acknowledge the bytes before it, on
/// every forwarding path (a reset drops what is unacknowledged). Past it the peer gets a FIN
/// instead: its data is worth more than the exact kind of ending.
pub const RESET_FLUSH: std::time::Duration = std::time::Duration::from_millis(200);

/// Resets a TCP connection now, keeping the descriptor: the peer gets a reset, not a FIN,
/// and later shutdowns and the close send nothing (`connect` to `AF_UNSPEC` disconnects the
/// socket). How a proxy passes on a reset it received. A reset drops what the peer has not
/// acknowledged, so callers wait for [`unacknowledged`] to reach 0 first.
pub fn reset_connection(fd: RawFd) -> std::io::Result<()> {
    let addr = libc::sockaddr {
        sa_family: libc::AF_UNSPEC as libc::sa_family_t,
        sa_data: [0; 14],
    };
    // SAFETY: connect reads size_of::<sockaddr>() bytes from `addr`, which lives on this
    // frame.
    let rc = unsafe {
        libc::connect(
            fd,
            &addr,
            std::mem::size_of::<libc::sockaddr>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Duplicates a descriptor (close-on-exec).
pub fn dup(fd: RawFd) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_DUPFD_CLOEXEC returns a new descriptor we then own, or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

/// Fixes a socket's send buffer (`SO_SNDBUF`; doubled by the kernel, capped by
/// `net.core.wmem_max`, autotuning off for that socket).
pub fn set_send_buffer(fd: RawFd, bytes: u64) -> std::io::Result<()> {
    set_buffer(fd, libc::SO_SNDBUF, bytes)
}

/// Fixes a socket's receive buffer (`SO_RCVBUF`; the kernel doubles the value for its own
/// bookkeeping, capped by `net.core.rmem_max`). It also turns receive-buffer autotuning off
/// for that socket.
pub fn set_receive_buffer(fd: RawFd, bytes: u64) -> std::io::Result<()> {
    set_buffer(fd, libc::SO_RCVBUF, bytes)
}

fn set_buffer(fd: RawFd, option: libc::c_int, bytes: u64) -> std::io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    tendril_ebpf::sockopt::set(fd, libc::SOL_SOCKET, option, value)
}
