//! tendril-keeper: parse and validate flags (exit 64 on a usage error), connect to the store,
//! run the keeper until SIGTERM or SIGINT, then stop postgres.

use std::process::ExitCode;

use tendril_control_store::EtcdStore;
use tendril_keeper::{Keeper, KeeperArgs, KeeperConfig, KeeperError};

fn main() -> ExitCode {
    // The keeper starts this same executable as its fence guard.
    if std::env::args_os().nth(1).as_deref() == Some(tendril_keeper::guard::SUBCOMMAND.as_ref()) {
        return tendril_keeper::guard::run();
    }
    let args: KeeperArgs = match tendril_daemon::config_file::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("tendril-keeper: {e}");
            return ExitCode::from(64);
        }
    };
    tendril_daemon::init_logging("info");
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
    keeper.run(tendril_daemon::shutdown_signal()).await
}
