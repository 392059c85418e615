//! A raw PostgreSQL protocol client for tests that compare what a client sees: it records
//! every message it receives and how the connection ended (EOF, reset, or still open), so a
//! connection through the proxy can be compared byte for byte with a direct one.
//!
//! The socket is non-blocking and waits in poll(2), as libpq does: the kernel client-socket
//! path forwards only clients that read that way.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// How a connection ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// A read returned 0.
    Eof,
    /// A read failed with ECONNRESET (or another error).
    Reset,
    /// Still open when the observation stopped.
    Open,
}

/// One message from the server: its type byte and body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: u8,
    pub body: Vec<u8>,
}

impl Message {
    /// The SQLSTATE of an ErrorResponse or NoticeResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    /// A field of an ErrorResponse or NoticeResponse.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut rest = &self.body[..];
        while let Some((&c, tail)) = rest.split_first() {
            if c == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&tail[..end]).into_owned());
            }
            rest = &tail[end + 1..];
        }
        None
    }

    /// A short form that compares across servers: the type, and for errors the severity
    /// and SQLSTATE, for command completions the tag, for rows their bytes, for
    /// ReadyForQuery the status. Process ids, secret keys and parameter values are left out.
    pub fn summary(&self) -> String {
        let k = self.kind as char;
        match self.kind {
            b'E' | b'N' => format!(
                "{k}:{}:{}",
                self.field(b'V').unwrap_or_default(),
                self.sqlstate().unwrap_or_default()
            ),
            b'C' => format!(
                "{k}:{}",
                String::from_utf8_lossy(&self.body).trim_end_matches('\0')
            ),
            b'D' => format!("{k}:{}", String::from_utf8_lossy(&self.body)),
            b'Z' => format!("{k}:{}", self.body.first().map_or('?', |b| *b as char)),
            _ => k.to_string(),
        }
    }
}

/// A client connection speaking the protocol by hand.
pub struct WireClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The backend's process id and secret key (BackendKeyData), once started.
    pub key: Option<(u32, u32)>,
}

impl WireClient {
    /// A session through `port` that reads in blocking mode: forwarded in userspace under
    /// `--forwarding auto`, so it stays with a process taken over until it ends (a session
    /// on the client-socket path moves to the new process).
    pub fn blocking_session(port: u16) -> WireClient {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut c = WireClient::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
        c.stream
            .set_nonblocking(false)
            .unwrap_or_else(|e| panic!("{e}"));
        c.stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap_or_else(|e| panic!("{e}"));
        let (_, end) = c.startup("postgres");
        assert_eq!(end, End::Open, "the session's startup through {addr}");
        c
    }

    /// Runs `select 1`: how the session ended, `Open` when it answered.
    pub fn select_one(&mut self) -> End {
        if self.query("select 1").is_err() {
            return End::Reset;
        }
        let (answer, end) = self.read_until(Duration::from_secs(5), |m| {
            m.last().is_some_and(|m| m.kind == b'Z')
        });
        match end {
            End::Open if answer.is_empty() => End::Open,
            other => other,
        }
    }
    pub fn connect(addr: SocketAddr) -> std::io::Result<WireClient> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(WireClient {
            stream,
            buf: Vec::new(),
            key: None,
        })
    }

    fn poll(&self, events: libc::c_short, left: Duration) {
        let mut fd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events,
            revents: 0,
        };
        // SAFETY: one valid pollfd on this frame.
        unsafe { libc::poll(&mut fd, 1, left.as_millis().clamp(1, 1000) as libc::c_int) };
    }

    /// Writes every byte (waiting while the socket is full, up to 10 s).
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while sent < bytes.len() {
            match self.stream.write(&bytes[sent..]) {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        return Err(std::io::ErrorKind::TimedOut.into());
                    }
                    self.poll(libc::POLLOUT, deadline - Instant::now());
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Reads what arrives until `until` says stop (given the messages so far), the
    /// connection ends, or `limit` passes. Raw bytes not yet forming a message stay
    /// buffered; `raw` returns single bytes (SSL negotiation answers).
    pub fn read_until(
        &mut self,
        limit: Duration,
        mut until: impl FnMut(&[Message]) -> bool,
    ) -> (Vec<Message>, End) {
        let deadline = Instant::now() + limit;
        let mut messages = Vec::new();
        loop {
            while let Some(m) = self.take_message() {
                if m.kind == b'K' && m.body.len() == 8 {
                    let pid = u32::from_be_bytes([m.body[0], m.body[1], m.body[2], m.body[3]]);
                    let key = u32::from_be_bytes([m.body[4], m.body[5], m.body[6], m.body[7]]);
                    self.key = Some((pid, key));
                }
                messages.push(m);
                if until(&messages) {
                    return (messages, End::Open);
                }
            }
            match self.fill(deadline) {
                Some(end) => return (messages, end),
                None if Instant::now() >= deadline => return (messages, End::Open),
                None => {}
            }
        }
    }

    /// Reads one raw byte (the answer to an SSLRequest or GSSENCRequest).
    pub fn read_byte(&mut self, limit: Duration) -> Result<u8, End> {
        let deadline = Instant::now() + limit;
        loop {
            if !self.buf.is_empty() {
                return Ok(self.buf.remove(0));
            }
            if let Some(end) = self.fill(deadline) {
                return Err(end);
            }
            if Instant::now() >= deadline {
                return Err(End::Open);
            }
        }
    }

    /// One read into the buffer; Some(end) when the connection ended.
    fn fill(&mut self, deadline: Instant) -> Option<End> {
        let mut chunk = [0u8; 65536];
        match self.stream.read(&mut chunk) {
            Ok(0) => Some(End::Eof),
            Ok(n) => {
                self.buf.extend_from_slice(&chunk[..n]);
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                self.poll(
                    libc::POLLIN,
                    deadline.saturating_duration_since(Instant::now()),
                );
                None
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => None,
            Err(_) => Some(End::Reset),
        }
    }

    fn take_message(&mut self) -> Option<Message> {
        if self.buf.len() < 5 {
            return None;
        }
        let len = u32::from_be_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]) as usize;
        if self.buf.len() < 1 + len {
            return None;
        }
        let kind = self.buf[0];
        let body = self.buf[5..1 + len].to_vec();
        self.buf.drain(..1 + len);
        Some(Message { kind, body })
    }

    /// Sends a StartupMessage for `database` as the superuser and reads to ReadyForQuery
    /// (or the end: a FATAL during startup).
    pub fn startup(&mut self, database: &str) -> (Vec<Message>, End) {
        self.startup_as(database, "matrix")
    }

    /// As [`WireClient::startup`], naming the application (how tests find their backends).
    pub fn startup_as(&mut self, database: &str, application: &str) -> (Vec<Message>, End) {
        let packet = super::startup_packet(&[
            ("user", "postgres"),
            ("database", database),
            ("application_name", application),
        ]);
        if self.send(&packet).is_err() {
            return (Vec::new(), End::Reset);
        }
        self.read_until(Duration::from_secs(10), |m| {
            m.last().is_some_and(|m| m.kind == b'Z')
        })
    }

    /// Sends a simple Query.
    pub fn query(&mut self, sql: &str) -> std::io::Result<()> {
        self.send(&query_message(sql))
    }
}

/// A simple Query message.
pub fn query_message(sql: &str) -> Vec<u8> {
    let mut m = vec![b'Q'];
    let len = u32::try_from(sql.len() + 5).unwrap_or(u32::MAX);
    m.extend_from_slice(&len.to_be_bytes());
    m.extend_from_slice(sql.as_bytes());
    m.push(0);
    m
}

/// An 8-byte request (SSLRequest 80877103, GSSENCRequest 80877104).
pub fn request(code: u32) -> Vec<u8> {
    let mut m = 8u32.to_be_bytes().to_vec();
    m.extend_from_slice(&code.to_be_bytes());
    m
}

/// A CancelRequest for a backend.
pub fn cancel_request(pid: u32, key: u32) -> Vec<u8> {
    let mut m = 16u32.to_be_bytes().to_vec();
    m.extend_from_slice(&80_877_102u32.to_be_bytes());
    m.extend_from_slice(&pid.to_be_bytes());
    m.extend_from_slice(&key.to_be_bytes());
    m
}
