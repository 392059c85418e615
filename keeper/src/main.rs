//! tendril-keeper: parse and validate flags (exit 64 on a usage error), connect to the store,
//! run the keeper until SIGTERM or SIGINT, then stop postgres.

use std::process::ExitCode;

use clap::Parser;
use tendril_control_store::EtcdStore;
use tendril_keeper::{Keeper, KeeperArgs, KeeperConfig, KeeperError};

fn main() -> ExitCode {
    let args = KeeperArgs::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("TENDRIL_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = match KeeperConfig::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tendril-keeper: {e}");
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tendril-keeper: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "keeper failed");
            eprintln!("tendril-keeper: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: KeeperConfig) -> Result<(), KeeperError> {
    let store = EtcdStore::connect_lazy(&config.store).await?;
    let keeper = Keeper::build(config, store).await?;
    keeper.run(shutdown_signal()).await
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
