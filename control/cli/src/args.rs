//! Command-line arguments of tendrilctl.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tendril_control_store::StoreArgs;

/// Administer a tendril cluster.
#[derive(Debug, Parser)]
#[command(name = "tendrilctl", version, about, long_about = None, args_override_self = true)]
pub struct Cli {
    /// The cluster's name (its keys live under /tendril/<name>/).
    #[arg(long, env = "TENDRIL_CLUSTER_NAME", global = true)]
    pub cluster_name: Option<String>,
    /// Read the cluster name and store settings from this TOML file (keys are these flags'
    /// long names, `store_endpoints = [...]`); a flag or a set environment variable wins.
    /// Default: /etc/tendril/tendrilctl.toml when it exists.
    #[arg(long, env = "TENDRIL_CONFIG", global = true)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// tendrilctl commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the cluster: write its initial cluster data from a spec (or the defaults).
    Init(InitArgs),
    /// Print the cluster spec in effect.
    Spec(SpecArgs),
    /// Change the cluster spec, with a JSON merge patch or a whole new spec.
    Update(UpdateArgs),
    /// Read or replace the raw cluster data (recovery).
    #[command(subcommand)]
    Clusterdata(ClusterDataCommand),
    /// Show keepers, databases, replication, proxies, the sentinel leader and recent events.
    Status(StatusArgs),
    /// Planned switchover: proxies hold new connections, the master stops after its standby
    /// received everything, the standby is promoted and published.
    Switchover(SwitchoverArgs),
    /// Mark a keeper failed once (the sentinel fails over if it runs the master).
    Failkeeper(KeeperArg),
    /// Forget a keeper and its database (refused for the master's keeper).
    Removekeeper(KeeperArg),
    /// Promote a standby cluster to an ordinary (master) cluster.
    Promote,
    /// Kubernetes: the manifests of this cluster.
    #[command(subcommand)]
    K8s(K8sCommand),
}

/// `tendrilctl k8s` commands.
#[derive(Debug, Subcommand)]
pub enum K8sCommand {
    /// Print the cluster's objects (keepers, sentinels, proxies, passwords, initial spec) for
    /// `kubectl apply -f -`. Reads nothing from the store.
    Manifests(Box<ManifestsArgs>),
}

/// `tendrilctl k8s manifests` arguments. The cluster name and the store endpoints are the
/// global flags; the endpoints must be reachable from the pods.
#[derive(Debug, Args)]
pub struct ManifestsArgs {
    /// The namespace of every object.
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// The image with the tendril binaries and PostgreSQL 15.
    #[arg(long)]
    pub image: String,
    /// Keeper pods.
    #[arg(long, default_value_t = 3)]
    pub keepers: u32,
    /// Sentinel pods (two or more).
    #[arg(long, default_value_t = 2)]
    pub sentinels: u32,
    /// The storage class of the keepers' volumes (default: the cluster's default class).
    #[arg(long)]
    pub storage_class: Option<String>,
    /// The size of each keeper's volume.
    #[arg(long, default_value = "20Gi")]
    pub storage_size: String,
    /// Synchronous replication in the initial cluster spec.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub synchronous_replication: bool,
    /// An existing Secret holding the keys su-password and repl-password. Without it, a
    /// Secret with random passwords is part of the output (apply it once: applying newly
    /// generated passwords to a running cluster would lock the keepers out).
    #[arg(long)]
    pub secret: Option<String>,
    /// Keeper (and PostgreSQL) CPU request.
    #[arg(long, default_value = "1")]
    pub keeper_cpu: String,
    /// Keeper (and PostgreSQL) memory.
    #[arg(long, default_value = "2Gi")]
    pub keeper_memory: String,
    /// Sentinel CPU request.
    #[arg(long, default_value = "100m")]
    pub sentinel_cpu: String,
    /// Sentinel memory.
    #[arg(long, default_value = "64Mi")]
    pub sentinel_memory: String,
    /// Proxy CPU request.
    #[arg(long, default_value = "250m")]
    pub proxy_cpu: String,
    /// Proxy memory.
    #[arg(long, default_value = "128Mi")]
    pub proxy_memory: String,
    /// The proxies' read-only listener (port 25433 on each node; reads on the standbys) and
    /// its node-local Service (`tendril-CLUSTER-ro`, port 5433).
    #[arg(long)]
    pub read_only: bool,
    /// Output format.
    #[arg(long, short, value_enum, default_value = "yaml")]
    pub output: ManifestFormat,
}

/// How `tendrilctl k8s manifests` prints the objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ManifestFormat {
    /// YAML documents separated by `---`, every string quoted.
    Yaml,
    /// One `v1` `List`.
    Json,
}

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// A readable table.
    Table,
    /// JSON.
    Json,
}

/// `status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Output format.
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

/// `switchover` arguments.
#[derive(Debug, Args)]
pub struct SwitchoverArgs {
    /// The keeper to switch to (default: the best standby).
    #[arg(long)]
    pub to: Option<String>,
    /// How long to wait for it to finish.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// A keeper uid argument.
#[derive(Debug, Args)]
pub struct KeeperArg {
    /// The keeper's uid.
    pub keeper: String,
}

/// `init` arguments.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// The spec as inline JSON, e.g. '{"synchronous_replication": true}'.
    #[arg(conflicts_with = "file")]
    pub spec: Option<String>,
    /// Read the spec from a file ('-' for standard input).
    #[arg(long, short)]
    pub file: Option<PathBuf>,
    /// Replace an existing cluster. Every keeper re-initialises: data can be lost.
    #[arg(long)]
    pub force: bool,
}

/// `spec` arguments.
#[derive(Debug, Args)]
pub struct SpecArgs {
    /// Print the default spec instead of the stored one (no store needed).
    #[arg(long)]
    pub defaults: bool,
}

/// `update` arguments.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct UpdateArgs {
    /// A JSON merge patch: fields given replace the current ones, null resets one to its
    /// default, e.g. '{"fail_interval": "3s"}'.
    #[arg(long, short)]
    pub patch: Option<String>,
    /// A whole new spec from a file ('-' for standard input); fields left out take defaults.
    #[arg(long, short)]
    pub file: Option<PathBuf>,
}

/// `clusterdata` subcommands.
#[derive(Debug, Subcommand)]
pub enum ClusterDataCommand {
    /// Print the stored cluster data as JSON.
    Read,
    /// Replace the cluster data with a JSON document. It must be valid; the sentinel acts on it
    /// at once.
    Write {
        /// Read the document from a file ('-' for standard input).
        #[arg(long, short, default_value = "-")]
        file: PathBuf,
        /// Confirm: this overwrites whatever the sentinel wrote.
        #[arg(long)]
        yes: bool,
    },
}

/// The settings file tendrilctl reads when none is named: written by the deployment guide
/// on each host, so that `tendrilctl status` works there without flags.
pub const DEFAULT_CONFIG: &str = "/etc/tendril/tendrilctl.toml";

/// `argv` with `--config DEFAULT_CONFIG` added when neither the command line nor
/// `TENDRIL_CONFIG` names a file and `default_exists`.
pub fn with_default_config(
    mut argv: Vec<std::ffi::OsString>,
    env_names_one: bool,
    default_exists: bool,
) -> Vec<std::ffi::OsString> {
    let named = argv
        .iter()
        .skip(1)
        .any(|a| a == "--config" || a.to_string_lossy().starts_with("--config="));
    if !named && !env_names_one && default_exists {
        argv.splice(1..1, ["--config".into(), DEFAULT_CONFIG.into()]);
    }
    argv
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<std::ffi::OsString> {
        a.iter().map(Into::into).collect()
    }

    #[test]
    fn the_default_file_is_read_only_when_it_exists_and_none_is_named() {
        let plain = args(&["tendrilctl", "status"]);
        assert_eq!(
            with_default_config(plain.clone(), false, true),
            args(&["tendrilctl", "--config", DEFAULT_CONFIG, "status"])
        );
        assert_eq!(with_default_config(plain.clone(), false, false), plain);
        assert_eq!(with_default_config(plain.clone(), true, true), plain);
        let named = args(&["tendrilctl", "status", "--config=/x.toml"]);
        assert_eq!(with_default_config(named.clone(), false, true), named);
    }
}
