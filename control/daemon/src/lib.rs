//! What every tendril daemon (keeper, sentinel, proxy) does at its edges, written once:
//! structured logs to standard error, filtered by `TENDRIL_LOG` (`info` for the daemons,
//! `warn` for `tendrilctl`, which logs the same way), and the future that completes on
//! SIGTERM or SIGINT, which each daemon's `run` takes as its shutdown trigger, and readiness
//! notices to the service manager (systemd's `sd_notify` protocol), and settings read from a
//! file ([`config_file`]).
#![forbid(unsafe_code)]

pub mod config_file;

/// Sends `tracing` output to standard error, filtered by `TENDRIL_LOG` (an `EnvFilter`
/// directive such as `info` or `tendril_proxy=debug`; `default` when unset), coloured only
/// on a terminal.
pub fn init_logging(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENDRIL_LOG")
                .unwrap_or_else(|_| default.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Completes on the first SIGTERM or SIGINT, and logs which one. If the handlers cannot be
/// installed it never completes: the process then stops only by being killed, as it would
/// without handlers, rather than shutting down at once.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// Sends `state` (newline-separated `KEY=value` lines such as `READY=1`) to the service
/// manager named by `NOTIFY_SOCKET` (systemd's `Type=notify`): a datagram to that path, or to
/// the abstract socket when it starts with `@`. Returns whether one was sent; without
/// `NOTIFY_SOCKET` (not run by systemd) it does nothing.
pub fn notify(state: &str) -> bool {
    use std::os::linux::net::SocketAddrExt;
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => std::os::unix::net::SocketAddr::from_abstract_name(name),
        None => std::os::unix::net::SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let socket = std::os::unix::net::UnixDatagram::unbound()?;
        socket.send_to_addr(state.as_bytes(), &addr)
    });
    match sent {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(error = %e, notify_socket = ?path, "cannot notify the service manager");
            false
        }
    }
}
