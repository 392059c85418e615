//! Sentinel flags (each also a `TENDRIL_*` variable).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use tendril_control_model::{ClusterSpec, Keys};
use tendril_control_store::{StoreArgs, StoreConfig};

use crate::sentinel::SentinelConfig;

/// Watch the cluster and, when elected leader, decide its view.
#[derive(Debug, Parser)]
#[command(name = "tendril-sentinel", version, about, long_about = None, args_override_self = true)]
pub struct SentinelArgs {
    /// The cluster's name.
    #[arg(long, env = "TENDRIL_CLUSTER_NAME")]
    pub cluster_name: String,
    /// Read settings from this TOML file too: its keys are these flags' long names
    /// (`hold_timeout = "15s"`); a flag or a set environment variable wins over it.
    #[arg(long, env = "TENDRIL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// A cluster spec (JSON) written as the cluster data when none exists yet.
    #[arg(long, env = "TENDRIL_INITIAL_CLUSTER_SPEC")]
    pub initial_cluster_spec: Option<PathBuf>,
    /// TTL of the leadership lease: a dead leader is replaced after about this long.
    #[arg(long, env = "TENDRIL_LEADER_TTL", default_value = "5s", value_parser = humantime::parse_duration)]
    pub leader_ttl: Duration,
    /// Serve Prometheus metrics on this address.
    #[arg(long, env = "TENDRIL_METRICS_ADDRESS")]
    pub metrics_address: Option<SocketAddr>,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// What the loop needs.
    pub sentinel: SentinelConfig,
    /// The store.
    pub store: StoreConfig,
    /// Metrics address.
    pub metrics_address: Option<SocketAddr>,
}

impl SentinelArgs {
    /// Validates the flags, reading the initial spec file. Every problem is reported.
    pub fn into_config(self) -> Result<Config, String> {
        let mut errors = Vec::new();
        let keys = Keys::new(&self.cluster_name)
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        let store = self
            .store
            .to_config()
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        let initial_spec = match &self.initial_cluster_spec {
            None => None,
            Some(path) => match std::fs::read_to_string(path) {
                Ok(text) => ClusterSpec::from_json(&text)
                    .map_err(|e| {
                        errors.push(format!("--initial-cluster-spec {}: {e}", path.display()))
                    })
                    .ok(),
                Err(e) => {
                    errors.push(format!(
                        "cannot read --initial-cluster-spec {}: {e}",
                        path.display()
                    ));
                    None
                }
            },
        };
        if self.leader_ttl < Duration::from_secs(2) {
            errors.push("--leader-ttl must be at least 2s (etcd leases have whole seconds)".into());
        }
        match (keys, store) {
            (Some(keys), Some(store)) if errors.is_empty() => Ok(Config {
                sentinel: SentinelConfig {
                    keys,
                    cluster: self.cluster_name,
                    uid: format!("{:08x}", rand::random::<u32>()),
                    initial_spec,
                    leader_ttl: self.leader_ttl,
                },
                store,
                metrics_address: self.metrics_address,
            }),
            _ => Err(errors.join("\n  - ")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sample_settings_file_covers_every_flag_and_holds_the_defaults() {
        let sample =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/sentinel.toml");
        let checked = tendril_daemon::config_file::check_sample::<SentinelArgs>(
            &sample,
            &["tendril-sentinel", "--cluster-name", "main"],
        );
        assert_eq!(checked, Ok(()));
    }
}
