//! The kernel-forwarded connections' part of a handover (see the parent module's exchange):
//! the old process shares its kernel maps with a taker that loads the same programs, then
//! sends it its connections at rest, which arrive here as [`Incoming`] lines.

use std::io::{IoSlice, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};

use super::MAPS;

/// What a proxy with client-socket programs shares with a taker that loads the same ones
/// (same [`KernelShare::fingerprint`]): their maps, and then its connections at rest.
#[derive(Debug)]
pub struct KernelShare {
    /// `tendril_ebpf::client_socket::ClientSocket::fingerprint`.
    pub fingerprint: String,
    /// The maps a taker loads with, by name.
    pub maps: Vec<(String, RawFd)>,
    /// The kernel-path thread: it stops reading the event ring before the maps go, and
    /// sends the connections once the taker serves.
    pub control: crate::kernel::Control,
}

/// Sends `share`'s maps to the taker (pid `pid`, for the log), once the kernel-path thread
/// stopped reading their event rings; `maps 0 -` when it did not (the taker then loads its
/// own maps, and the exchange goes on).
pub(super) fn share_maps(
    stream: &UnixStream,
    share: &KernelShare,
    pid: i32,
) -> std::io::Result<()> {
    if !share.control.yield_events() {
        tracing::warn!(
            pid,
            "the kernel-path thread did not give up the event rings: not sharing the maps"
        );
        let mut writer = stream;
        return writer.write_all(format!("{MAPS} 0 -\n").as_bytes());
    }
    let names: Vec<&str> = share.maps.iter().map(|(n, _)| n.as_str()).collect();
    let fds: Vec<RawFd> = share.maps.iter().map(|(_, fd)| *fd).collect();
    let head = format!("{MAPS} {} {}\n", fds.len(), names.join(","));
    sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(head.as_bytes())],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    tracing::info!(
        pid,
        maps = fds.len(),
        "shared the kernel maps with the new proxy"
    );
    Ok(())
}

/// The maps of a `maps K NAME,...` line and its descriptors.
pub(super) fn inherited(line: &str, fds: Vec<OwnedFd>) -> std::io::Result<tendril_ebpf::Inherited> {
    let names: Vec<String> = match line.split(' ').collect::<Vec<_>>().as_slice() {
        [MAPS, n, names] if n.parse::<usize>().ok() == Some(fds.len()) => {
            names.split(',').map(str::to_owned).collect()
        }
        _ => Vec::new(),
    };
    if names.len() != fds.len() || fds.is_empty() {
        return Err(std::io::Error::other(format!(
            "unexpected answer {line:?} with {} descriptors",
            fds.len()
        )));
    }
    Ok(tendril_ebpf::Inherited {
        maps: names.into_iter().zip(fds).collect(),
    })
}

/// The old process's connections as they arrive after `stopped`: lines, each `conn` line
/// with its two sockets. A stream socket may deliver several lines in one read, and the
/// descriptors of a message with the first of its bytes: they are queued in order.
#[derive(Debug)]
pub struct Incoming {
    stream: UnixStream,
    text: Vec<u8>,
    fds: std::collections::VecDeque<OwnedFd>,
}

impl Incoming {
    pub(super) fn new(stream: UnixStream) -> Incoming {
        Incoming {
            stream,
            text: Vec::new(),
            fds: std::collections::VecDeque::new(),
        }
    }

    /// Waits at most `timeout` for each read from now on (`None`: forever).
    pub fn set_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// The next line and its descriptors (two for a `conn` line); `None` at the end (the
    /// old process exited). A timeout is an error of kind `WouldBlock` or `TimedOut`, after
    /// which the next call goes on where this one stopped.
    pub fn next_line(&mut self) -> std::io::Result<Option<(String, Vec<OwnedFd>)>> {
        loop {
            if let Some(at) = self.text.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.text.drain(..=at).collect();
                let line = String::from_utf8_lossy(&line[..at]).into_owned();
                let want = if line.starts_with("conn ") { 2 } else { 0 };
                if self.fds.len() < want {
                    return Err(std::io::Error::other(format!(
                        "{line:?} came without its {want} sockets"
                    )));
                }
                let fds = self.fds.drain(..want).collect();
                return Ok(Some((line, fds)));
            }
            let mut buf = [0u8; 4096];
            let (n, fds) = super::receive_with_fds(&self.stream, &mut buf)?;
            self.fds.extend(fds);
            if n == 0 {
                return Ok(None);
            }
            self.text.extend_from_slice(&buf[..n]);
        }
    }

    /// Answers the last `conn` line ([`ADOPTED`] or [`REFUSED`]).
    pub fn answer(&mut self, word: &str) -> std::io::Result<()> {
        self.stream.write_all(format!("{word}\n").as_bytes())
    }
}
