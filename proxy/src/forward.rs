//! Forwarding established connections: how bytes move between a client and its backend once
//! the connection is set up. One interface, so the in-kernel path (a BPF sockmap redirect)
//! slots in beside the userspace copy.
// #[PerformanceCriticalPath]: no logging above debug, no locks, no allocation per message.

use std::cell::RefCell;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt, Splitable};
use monoio::net::TcpStream;

use crate::metrics::WorkerMetrics;
use crate::sys::{RESET_FLUSH, reset_connection, shutdown_both, unacknowledged};

/// Which side ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client closed it (its side reached EOF first).
    Client,
    /// The backend closed it.
    Backend,
    /// A read or write failed (reset, or cut by the fence).
    Error,
}

/// A way to move bytes between two connected sockets until the connection ends.
pub trait Forwarder {
    /// Forwards until both directions are done; returns who ended it.
    fn forward(
        &self,
        client: TcpStream,
        backend: TcpStream,
        metrics: &WorkerMetrics,
    ) -> impl std::future::Future<Output = Ended>;
}

/// Size of the buffer every direction keeps while idle: enough for the messages of an OLTP
/// workload, small enough that 10,000 idle connections cost little memory.
pub const SMALL_BUFFER: usize = 512;
/// Size of the pooled buffers a direction borrows while a large transfer is under way.
pub const LARGE_BUFFER: usize = 64 * 1024;
/// Large buffers a worker keeps for reuse.
const POOL_LIMIT: usize = 64;

/// Large buffers shared by the connections of one worker (single-threaded, so a `RefCell`).
#[derive(Debug, Default)]
pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
}

impl BufferPool {
    fn take(&self) -> Vec<u8> {
        self.free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(LARGE_BUFFER))
    }

    fn give(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut free = self.free.borrow_mut();
        if free.len() < POOL_LIMIT {
            free.push(buf);
        }
    }
}

/// Copy through userspace with recv/send on the worker's ring.
#[derive(Debug, Clone)]
pub struct UserspaceCopy {
    pool: Rc<BufferPool>,
}

impl UserspaceCopy {
    /// A forwarder using `pool` for large transfers.
    pub fn new(pool: Rc<BufferPool>) -> UserspaceCopy {
        UserspaceCopy { pool }
    }
}

impl Forwarder for UserspaceCopy {
    async fn forward(
        &self,
        client: TcpStream,
        backend: TcpStream,
        metrics: &WorkerMetrics,
    ) -> Ended {
        let fds = (fd_of(&client), fd_of(&backend));
        let (client_r, client_w) = client.into_split();
        let (backend_r, backend_w) = backend.into_split();
        let to_backend = copy(
            client_r,
            backend_w,
            &self.pool,
            &metrics.bytes_to_backend,
            fds,
        );
        let to_client = copy(
            backend_r,
            client_w,
            &self.pool,
            &metrics.bytes_to_client,
            (fds.1, fds.0),
        );
        let (up, down) = monoio::join!(to_backend, to_client);
        match (up, down) {
            (Direction::Error, _) | (_, Direction::Error) => Ended::Error,
            (Direction::Eof(first_up), Direction::Eof(first_down)) => {
                if first_up <= first_down {
                    Ended::Client
                } else {
                    Ended::Backend
                }
            }
        }
    }
}

fn fd_of(s: &TcpStream) -> RawFd {
    std::os::fd::AsRawFd::as_raw_fd(s)
}

/// How one direction ended; `Eof` carries a sequence number to tell which side ended first.
enum Direction {
    Eof(u64),
    Error,
}

thread_local! {
    static EOF_ORDER: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Copies `from` to `to` until `from` ends; `fds` are (from, to).
async fn copy<R: AsyncReadRent, W: AsyncWriteRent>(
    mut from: R,
    mut to: W,
    pool: &BufferPool,
    bytes: &AtomicU64,
    fds: (RawFd, RawFd),
) -> Direction {
    let mut small = Vec::with_capacity(SMALL_BUFFER);
    let mut large: Option<Vec<u8>> = None;
    loop {
        // A direction that just filled its buffer is in a large transfer: read with a pooled
        // large buffer until a read comes back short, then give it back, so idle connections
        // only hold their small buffer.
        let mut buf = match large.take() {
            Some(b) => b,
            None => std::mem::take(&mut small),
        };
        buf.clear();
        let (res, read_buf) = from.read(buf).await;
        let n = match res {
            Ok(0) => {
                // Half-close: the other side may still be sending (the backend's reply to a
                // client's Terminate, or the end of a result).
                let _ = to.shutdown().await;
                return Direction::Eof(next_eof());
            }
            Ok(n) => n,
            Err(e) => {
                if e.kind() == std::io::ErrorKind::ConnectionReset && flushed(fds.1).await {
                    // The source reset (PostgreSQL exiting with input it had not read, a
                    // client gone hard): the peer gets a reset too, after every byte before
                    // it, as it would have straight from the source. The other direction's
                    // pending read on the peer then fails, and nothing more is sent.
                    if reset_connection(fds.1).is_ok() {
                        shutdown_both(fds.0);
                        return Direction::Error;
                    }
                }
                shutdown_both(fds.0);
                shutdown_both(fds.1);
                return Direction::Error;
            }
        };
        let full = n == read_buf.capacity();
        let (res, written) = to.write_all(read_buf).await;
        if res.is_err() {
            shutdown_both(fds.0);
            shutdown_both(fds.1);
            return Direction::Error;
        }
        bytes.fetch_add(n as u64, Ordering::Relaxed);
        if written.capacity() >= LARGE_BUFFER {
            if full {
                large = Some(written);
            } else {
                pool.give(written);
            }
        } else {
            small = written;
            if full {
                large = Some(pool.take());
            }
        }
    }
}

/// Waits until the peer acknowledged everything written to `fd`, up to [`RESET_FLUSH`].
async fn flushed(fd: RawFd) -> bool {
    let deadline = std::time::Instant::now() + RESET_FLUSH;
    loop {
        match unacknowledged(fd) {
            Ok(0) => return true,
            Ok(_) if std::time::Instant::now() < deadline => {
                monoio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            _ => return false,
        }
    }
}

fn next_eof() -> u64 {
    EOF_ORDER.with(|c| {
        let v = c.get() + 1;
        c.set(v);
        v
    })
}
