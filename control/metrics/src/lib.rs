//! A minimal HTTP endpoint serving Prometheus text at `/metrics` and the daemon's health at
//! `/health` (200 with a line saying what it does, or 503 with a line saying why not; a
//! daemon without a health function answers `200 ok`), and any other paths a daemon routes
//! ([`serve_routes`]: the keeper's role checks).
//!
//! Daemons keep their counters in atomics and hand a render function over; scraping never
//! takes a lock on a hot path. HTTP/1.0-style: one request per connection, then close.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Binds `addr` (a clear error if taken) and serves until the task is dropped.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    })
}

/// As [`bind`], sharing the port with other sockets of this user that share it too
/// (`SO_REUSEPORT`): a proxy started beside the one it replaces, with the same flags, serves
/// its metrics on the same address until the old one exits.
pub async fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let err = |e: std::io::Error| {
        std::io::Error::new(
            e.kind(),
            format!("cannot listen for metrics on {addr}: {e}"),
        )
    };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(err)?;
    socket.set_reuseaddr(true).map_err(err)?;
    socket.set_reuseport(true).map_err(err)?;
    socket.bind(addr).map_err(err)?;
    socket.listen(128).map_err(err)
}

/// What `/health` answers: `Ok` (200) or `Err` (503), with the line to send.
pub type Health = Arc<dyn Fn() -> Result<String, String> + Send + Sync>;

/// Serves `render()` at `/metrics` on `listener` forever; `/health` is always 200.
pub async fn serve(listener: TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    serve_with_health(listener, render, Arc::new(|| Ok("ok".to_owned()))).await;
}

/// Serves `render()` at `/metrics` and `health()` at `/health` on `listener` forever.
pub async fn serve_with_health(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    health: Health,
) {
    serve_routes(
        listener,
        Arc::new(move |path: &str| match path {
            "/metrics" => Some(Reply::metrics(render())),
            "/health" | "/healthz" => Some(Reply::check(health())),
            _ => None,
        }),
    )
    .await;
}

/// One answer: status code, content type, body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `content-type`.
    pub content_type: &'static str,
    /// The body.
    pub body: String,
}

impl Reply {
    /// Prometheus text, 200.
    pub fn metrics(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "text/plain; version=0.0.4",
            body,
        }
    }

    /// A check's outcome: 200 with its line, or 503 with why not.
    pub fn check(outcome: Result<String, String>) -> Reply {
        let (status, line) = match outcome {
            Ok(line) => (200, line),
            Err(line) => (503, line),
        };
        Reply {
            status,
            content_type: "text/plain",
            body: format!("{line}\n"),
        }
    }

    /// JSON, 200.
    pub fn json(body: String) -> Reply {
        Reply {
            status: 200,
            content_type: "application/json",
            body,
        }
    }
}

/// What a daemon answers for a path (without its query string); `None` is 404.
pub type Routes = Arc<dyn Fn(&str) -> Option<Reply> + Send + Sync>;

/// Serves `routes` on `listener` forever; `GET` and `HEAD` (load balancers probe with both)
/// get the same status.
pub async fn serve_routes(listener: TcpListener, routes: Routes) {
    loop {
        let Ok((mut socket, _)) = listener.accept().await else {
            continue;
        };
        let routes = routes.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), socket.read(&mut buf)).await;
            let Ok(Ok(n)) = read else { return };
            let request = String::from_utf8_lossy(&buf[..n]);
            let mut words = request.split_whitespace();
            let head = words.next() == Some("HEAD");
            let target = words.next().unwrap_or("/");
            let path = target.split('?').next().unwrap_or(target);
            let reply = routes(path).unwrap_or_else(|| Reply {
                status: 404,
                content_type: "text/plain",
                body: "not found\n".to_owned(),
            });
            let reason = match reply.status {
                200 => "OK",
                404 => "Not Found",
                503 => "Service Unavailable",
                _ => "",
            };
            let mut response = format!(
                "HTTP/1.1 {} {reason}\r\ncontent-type: {}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                reply.status,
                reply.content_type,
                reply.body.len()
            );
            if !head {
                response.push_str(&reply.body);
            }
            if let Err(e) = socket.write_all(response.as_bytes()).await {
                tracing::debug!(error = %e, "metrics client went away");
            }
        });
    }
}
