//! tendril-sentinel: validate flags (exit 64 on a usage error), connect to the store, serve
//! metrics if asked, and run the sentinel until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use tendril_control_store::EtcdStore;
use tendril_sentinel::config::SentinelArgs;
use tendril_sentinel::sentinel::{Sentinel, SentinelMetrics};

fn main() -> ExitCode {
    let args = SentinelArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENDRIL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tendril-sentinel: invalid configuration:\n  - {e}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tendril-sentinel: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let store = match EtcdStore::connect_lazy(&config.store).await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("tendril-sentinel: {e}");
                return ExitCode::FAILURE;
            }
        };
        let metrics = Arc::new(SentinelMetrics::default());
        if let Some(addr) = config.metrics_address {
            match tendril_metrics::bind(addr).await {
                Ok(listener) => {
                    tracing::info!(%addr, "serving metrics");
                    let m = metrics.clone();
                    let cluster = config.sentinel.cluster.clone();
                    tokio::spawn(tendril_metrics::serve(
                        listener,
                        Arc::new(move || m.render(&cluster)),
                    ));
                }
                Err(e) => {
                    eprintln!("tendril-sentinel: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        Sentinel::new(store, config.sentinel, metrics)
            .run(shutdown_signal())
            .await;
        ExitCode::SUCCESS
    })
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
