//! A client with no route yet: its first packet is read and parsed (sans-IO in
//! [`crate::pgwire`]), then it is held until a master is routable (a switchover, a proxy
//! that has not read its routing table), sent to a standby (the read-only listener), or
//! refused with an `ErrorResponse` that says why (in TLS with `--refusal-cert-file`). A
//! cancel request goes to the servers whose sessions it may name.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;

use super::{Ctx, Listener, Outcome, routed};
use crate::config::ReadOnlyFallback;
use crate::metrics::CloseReason;
use crate::pgwire::{self, FirstPacket, Parse};
use crate::routing::{Backend, NoBackend};

/// No backend yet (or the read-only listener, which chooses one per connection): speak just
/// enough protocol to refuse properly, or hold the client during a switchover until the
/// new master is published.
pub(super) async fn unrouted(
    ctx: &Ctx,
    mut client: TcpStream,
    peer: SocketAddr,
    listener: Listener,
) -> Outcome {
    let settings = &ctx.shared.settings;
    let deadline = std::time::Instant::now() + settings.startup_timeout;
    let buf = match read_first_packet(&mut client, Vec::with_capacity(256), deadline).await {
        Ok(buf) => buf,
        Err(FirstRead::Gone) => return CloseReason::Client.into(),
        Err(FirstRead::Silent) => return CloseReason::BadStartup.into(),
    };
    // Everything read from the client (the kernel path must know where its stream starts).
    let consumed = buf.len() as u64;
    match pgwire::parse_first_packet(&buf) {
        Parse::NeedMore => CloseReason::BadStartup.into(),
        Parse::Invalid(why) => {
            tracing::debug!(client = %peer, why, "bad startup packet");
            refuse(
                client,
                pgwire::PROTOCOL_VIOLATION,
                &format!("tendril: {why}"),
            )
            .await;
            CloseReason::BadStartup.into()
        }
        Parse::Done(FirstPacket::SslRequest | FirstPacket::GssEncRequest, _) => {
            // Only PostgreSQL may answer: held like a startup packet, the request goes to
            // the master once one is routable and the TLS (or GSS) handshake is end to end.
            // A refusal answers with an ErrorResponse instead of the one byte, which
            // clients report as the server's error: an `N` here would make an
            // `sslmode=require` client fail with "server does not support SSL".
            hold_or_refuse(ctx, client, peer, buf, consumed, listener).await
        }
        Parse::Done(FirstPacket::CancelRequest { .. }, used) => {
            // Cancel keys belong to the master: forward if there is one now, else drop. On
            // the read-only listener the session may be on any standby (or the master): the
            // request goes to each, and only the one whose key matches acts on it.
            let table = ctx.shared.table.load_full();
            let packet = &buf[..used];
            let mut to: Vec<&Backend> = table.backend().into_iter().collect();
            if listener == Listener::ReadOnly {
                to.extend(table.standbys.iter().map(|s| &s.backend));
            }
            let timeout = settings.connect_timeout;
            for b in to {
                // Each on its own: a dead standby must not delay the others.
                monoio::spawn(forward_cancel(b.clone(), packet.to_vec(), timeout));
            }
            CloseReason::Cancel.into()
        }
        Parse::Done(FirstPacket::Startup { .. }, _) => {
            hold_or_refuse(ctx, client, peer, buf, consumed, listener).await
        }
    }
}

/// Why the first packet did not arrive whole.
enum FirstRead {
    /// The client closed or its socket failed.
    Gone,
    /// Not before the deadline.
    Silent,
}

/// Reads into `buf` until it holds the client's whole first packet (or bytes that cannot
/// be one), by `deadline`.
async fn read_first_packet(
    client: &mut TcpStream,
    mut buf: Vec<u8>,
    deadline: std::time::Instant,
) -> Result<Vec<u8>, FirstRead> {
    while matches!(pgwire::parse_first_packet(&buf), Parse::NeedMore) {
        let remaining = deadline.saturating_duration_since(std::time::Instant::now());
        buf = match monoio::time::timeout(remaining, read_more(client, buf)).await {
            Ok(Ok(more)) => more,
            Ok(Err(_)) => return Err(FirstRead::Gone),
            Err(_) => return Err(FirstRead::Silent),
        };
    }
    Ok(buf)
}

async fn read_more(client: &mut TcpStream, mut buf: Vec<u8>) -> std::io::Result<Vec<u8>> {
    if buf.len() >= pgwire::MAX_STARTUP_PACKET {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    let (res, chunk) = client.read(Vec::with_capacity(1024)).await;
    match res? {
        0 => Err(std::io::ErrorKind::UnexpectedEof.into()),
        _ => {
            buf.extend_from_slice(&chunk);
            Ok(buf)
        }
    }
}

/// Holds a client whose first packet (`first`: a startup packet, an SSLRequest or a
/// GSSENCRequest) is read, until a master is routable (then forwards `first` to it) or the
/// hold ends (then refuses with 57P03 and the reason). On the read-only listener an eligible
/// standby comes first; without one, `--read-only-fallback` says master or refuse.
async fn hold_or_refuse(
    ctx: &Ctx,
    client: TcpStream,
    peer: SocketAddr,
    first: Vec<u8>,
    consumed: u64,
    listener: Listener,
) -> Outcome {
    let settings = &ctx.shared.settings;
    let start = std::time::Instant::now();
    let turn = match listener {
        Listener::ReadOnly => Some(ctx.shared.next_read_turn()),
        Listener::Primary => None,
    };
    let (message, reason) = loop {
        let table = ctx.shared.table.load_full();
        if let Some(turn) = turn {
            if let Some(standby) = table.pick_standby(turn) {
                ctx.metrics()
                    .read_only_to_standby
                    .fetch_add(1, Ordering::Relaxed);
                let standby = standby.clone();
                return routed(ctx, client, peer, standby, table.epoch, first, consumed).await;
            }
            let starting = matches!(table.backend, Err(NoBackend::Starting));
            if !starting && settings.read_only_fallback == ReadOnlyFallback::Reject {
                let message = format!(
                    "tendril: no standby available for read-only connections to cluster {} ({})",
                    settings.cluster,
                    table.no_standby_reason()
                );
                break (message, CloseReason::NoStandby);
            }
        }
        if let Some(backend) = table.backend() {
            if turn.is_some() {
                ctx.metrics()
                    .read_only_to_master
                    .fetch_add(1, Ordering::Relaxed);
            }
            return routed(
                ctx,
                client,
                peer,
                backend.clone(),
                table.epoch,
                first,
                consumed,
            )
            .await;
        }
        // A switchover holds; so does a proxy that has not loaded its routing table yet
        // (started, restarted, or started beside the proxy it replaces): the route is
        // a store read away, and a refusal would fail a client that a moment's wait serves.
        let starting = matches!(table.backend, Err(NoBackend::Starting));
        let holding = (table.hold || starting)
            && !settings.hold_timeout.is_zero()
            && start.elapsed() < settings.hold_timeout;
        if !holding {
            let why = match table.backend {
                Err(NoBackend::SelfFenced) => " (this proxy cannot reach the store)",
                Err(NoBackend::BadClusterData) => " (the cluster data cannot be used)",
                Err(NoBackend::Unresolved) => " (the master's address does not resolve)",
                Err(NoBackend::Starting) => {
                    " (the proxy has not read its routing table within the hold timeout)"
                }
                _ if table.hold => " (a switchover did not finish within the hold timeout)",
                _ => "",
            };
            let message = format!(
                "tendril: no master available for cluster {}{why}",
                settings.cluster
            );
            break (message, CloseReason::NoMaster);
        }
        // Rare path (a switchover in progress): a short poll keeps the hot path free of
        // cross-thread wake-ups.
        monoio::time::sleep(Duration::from_millis(5)).await;
    };
    let code = pgwire::CANNOT_CONNECT_NOW;
    refuse_first(ctx, client, peer, first, code, &message).await;
    reason.into()
}

async fn forward_cancel(backend: Backend, packet: Vec<u8>, timeout: Duration) {
    if let Ok(Ok(mut s)) =
        monoio::time::timeout(timeout, TcpStream::connect_addr(backend.addr)).await
    {
        let _ = s.write_all(packet).await;
    }
}

/// Refuses a client with `code` and `message` once its first packet is in (`first`: what
/// was read of it so far; the rest is read within the startup timeout). To a client that
/// asked for TLS the refusal comes inside TLS when `--refusal-cert-file` is set, else, as to
/// a GSSENCRequest, as an ErrorResponse in place of the one-byte answer: libpq and pgjdbc
/// print either as the server's error, where an `N` would read "server does not support
/// SSL". Reading first also leaves nothing unread at the close, which would otherwise send a
/// reset that can overtake the ErrorResponse.
pub(super) async fn refuse_first(
    ctx: &Ctx,
    mut client: TcpStream,
    peer: SocketAddr,
    first: Vec<u8>,
    code: &str,
    message: &str,
) {
    let settings = &ctx.shared.settings;
    let deadline = std::time::Instant::now() + settings.startup_timeout;
    // Gone, or silent: the ErrorResponse goes anyway (a client that never sends still
    // reads it).
    let ssl = read_first_packet(&mut client, first, deadline)
        .await
        .is_ok_and(|buf| {
            matches!(
                pgwire::parse_first_packet(&buf),
                Parse::Done(FirstPacket::SslRequest, _)
            )
        });
    match &settings.refusal_tls {
        Some(tls) if ssl => {
            let refusal = crate::tls_refusal::refuse(&mut client, tls.clone(), code, message);
            match monoio::time::timeout(settings.startup_timeout, refusal).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(client = %peer, error = %e, "TLS refusal"),
                Err(_) => tracing::debug!(client = %peer, "TLS refusal timed out"),
            }
        }
        _ => refuse(client, code, message).await,
    }
}

/// Sends an `ErrorResponse` and closes.
async fn refuse(mut client: TcpStream, code: &str, message: &str) {
    let (res, _) = client
        .write_all(pgwire::error_response(code, message))
        .await;
    if res.is_ok() {
        let _ = monoio::io::AsyncWriteRent::shutdown(&mut client).await;
    }
}
