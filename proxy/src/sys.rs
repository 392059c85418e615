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
