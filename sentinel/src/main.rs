//! tendril-sentinel: validate flags (exit 64 on a usage error), connect to the store, serve
//! metrics if asked, and run the sentinel until SIGTERM or SIGINT.

use std::process::ExitCode;
use std::sync::Arc;

use tendril_control_store::EtcdStore;
use tendril_sentinel::config::SentinelArgs;
use tendril_sentinel::sentinel::{Sentinel, SentinelMetrics};

fn main() -> ExitCode {
    let args: SentinelArgs = match tendril_daemon::config_file::parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("tendril-sentinel: {e}");
            return ExitCode::from(64);
        }
    };
    tendril_daemon::init_logging("info");
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
            .run(tendril_daemon::shutdown_signal())
            .await;
        ExitCode::SUCCESS
    })
}
