//! tendril-proxy: validate flags (exit 64 on a usage error), bind, run until SIGTERM or
//! SIGINT, drain.

use std::process::ExitCode;

use clap::Parser;
use tendril_proxy::App;
use tendril_proxy::config::ProxyArgs;

fn main() -> ExitCode {
    let args = ProxyArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENDRIL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tendril-proxy: invalid configuration:\n  - {e}");
            return ExitCode::from(64);
        }
    };
    match App::start(config, shutdown_signal()) {
        Ok(app) => {
            app.wait();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tendril-proxy: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn shutdown_signal() {
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
