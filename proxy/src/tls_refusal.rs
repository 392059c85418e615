//! Refusing a TLS client so that it sees why: when the proxy refuses a client that asked for
//! TLS (SSLRequest) because no master can be reached, the master cannot be connected to, or
//! the proxy is at its connection limit, the client gets a TLS handshake with the proxy's
//! refusal certificate (`--refusal-cert-file`, `--refusal-key-file`), then the ErrorResponse
//! (57P03, 08006 or 53300 and the reason) inside TLS, then close_notify. libpq since 15.10
//! does not show an error sent in place of the one-byte SSL answer (it is unauthenticated),
//! so without this an `sslmode=require` client prints "server sent an error response during
//! SSL exchange" instead of the reason.
//!
//! Only refusals go through this: a routed connection's handshake is always end to end with
//! PostgreSQL, and the proxy holds no session key. Without a refusal certificate the proxy
//! sends the ErrorResponse in place of the answer byte (see `worker::refuse_first`).
//!
//! The handshake runs on the worker's own socket with rustls's buffer-driven connection
//! (monoio has no rustls adapter here), bounded by the caller's deadline.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use monoio::io::{AsyncReadRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::pgwire::{self, Parse};

/// Loads the refusal certificate (PEM, leaf first, then its chain) and its key.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("--refusal-cert-file {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--refusal-cert-file {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "--refusal-cert-file {}: no certificate in it",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("--refusal-key-file {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map(Arc::new)
        .map_err(|e| format!("--refusal-cert-file and --refusal-key-file: {e}"))
}

/// Why a TLS refusal did not complete (the client gave up, or spoke something else).
#[derive(Debug, thiserror::Error)]
pub enum RefusalError {
    /// The socket failed or closed.
    #[error("client socket: {0}")]
    Io(#[from] std::io::Error),
    /// The TLS handshake or record layer failed.
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Answers an SSLRequest with `S`, completes the handshake, reads the startup packet and
/// sends the ErrorResponse (`code`, `message`) inside TLS, then closes.
pub async fn refuse(
    client: &mut TcpStream,
    config: Arc<rustls::ServerConfig>,
    code: &str,
    message: &str,
) -> Result<(), RefusalError> {
    let mut tls = rustls::ServerConnection::new(config)?;
    let (res, _) = client.write_all(vec![b'S']).await;
    res?;
    while tls.is_handshaking() {
        flush(client, &mut tls).await?;
        if tls.is_handshaking() {
            receive(client, &mut tls).await?;
        }
    }
    flush(client, &mut tls).await?;
    // The startup packet, in TLS; whatever it says, the answer is the refusal.
    let mut plain = Vec::new();
    loop {
        let mut chunk = [0u8; 1024];
        match tls.reader().read(&mut chunk) {
            Ok(0) => return Ok(()),
            Ok(n) => plain.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.into()),
        }
        match pgwire::parse_first_packet(&plain) {
            Parse::NeedMore if plain.len() < pgwire::MAX_STARTUP_PACKET => {
                receive(client, &mut tls).await?;
            }
            _ => break,
        }
    }
    tls.writer()
        .write_all(&pgwire::error_response(code, message))?;
    tls.send_close_notify();
    flush(client, &mut tls).await?;
    let _ = monoio::io::AsyncWriteRent::shutdown(client).await;
    Ok(())
}

/// Sends what rustls has to send.
async fn flush(
    client: &mut TcpStream,
    tls: &mut rustls::ServerConnection,
) -> Result<(), RefusalError> {
    while tls.wants_write() {
        let mut out = Vec::new();
        tls.write_tls(&mut out)?;
        let (res, _) = client.write_all(out).await;
        res?;
    }
    Ok(())
}

/// Reads once from the client and feeds rustls.
async fn receive(
    client: &mut TcpStream,
    tls: &mut rustls::ServerConnection,
) -> Result<(), RefusalError> {
    let (res, buf) = client.read(Vec::with_capacity(16 * 1024)).await;
    if res? == 0 {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    let mut rest = &buf[..];
    while !rest.is_empty() {
        tls.read_tls(&mut rest)?;
        tls.process_new_packets()?;
    }
    Ok(())
}
