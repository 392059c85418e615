//! Keeper flags (each also a `TENDRIL_*` variable) and the validated configuration.

use std::path::{Path, PathBuf};

use clap::Parser;
use tendril_control_model::Keys;
use tendril_control_store::{StoreArgs, StoreConfig};

use crate::KeeperError;

/// Run one PostgreSQL instance as the cluster data says.
#[derive(Debug, Parser)]
#[command(name = "tendril-keeper", version, about, long_about = None, args_override_self = true)]
pub struct KeeperArgs {
    /// The cluster's name.
    #[arg(long, env = "TENDRIL_CLUSTER_NAME")]
    pub cluster_name: String,
    /// Read settings from this TOML file too: its keys are these flags' long names
    /// (`hold_timeout = "15s"`); a flag or a set environment variable wins over it.
    #[arg(long, env = "TENDRIL_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    pub store: StoreArgs,
    /// This keeper's uid (a-z, 0-9, _ and -, as a Kubernetes pod name). Default: generated
    /// once and kept in the data dir.
    #[arg(long, env = "TENDRIL_KEEPER_UID")]
    pub uid: Option<String>,
    /// The keeper's data directory (PostgreSQL's data lives in its `postgres/`).
    #[arg(long, env = "TENDRIL_DATA_DIR")]
    pub data_dir: PathBuf,
    /// Directory of the PostgreSQL binaries.
    #[arg(
        long,
        env = "TENDRIL_PG_BIN_PATH",
        default_value = "/usr/lib/postgresql/15/bin"
    )]
    pub pg_bin_path: PathBuf,
    /// Address PostgreSQL listens on.
    #[arg(long, env = "TENDRIL_PG_LISTEN_ADDRESS", default_value = "127.0.0.1")]
    pub pg_listen_address: String,
    /// Port PostgreSQL listens on.
    #[arg(long, env = "TENDRIL_PG_PORT", default_value_t = 5432)]
    pub pg_port: u16,
    /// Address other keepers and proxies use to reach PostgreSQL (default: the listen address).
    #[arg(long, env = "TENDRIL_PG_ADVERTISE_ADDRESS")]
    pub pg_advertise_address: Option<String>,
    /// Port others use to reach PostgreSQL (default: the listen port).
    #[arg(long, env = "TENDRIL_PG_ADVERTISE_PORT")]
    pub pg_advertise_port: Option<u16>,
    /// PostgreSQL superuser.
    #[arg(long, env = "TENDRIL_PG_SU_USERNAME", default_value = "postgres")]
    pub pg_su_username: String,
    /// File holding the superuser's password (or set TENDRIL_PG_SU_PASSWORD).
    #[arg(long, env = "TENDRIL_PG_SU_PASSWORDFILE")]
    pub pg_su_passwordfile: Option<PathBuf>,
    /// PostgreSQL replication user.
    #[arg(long, env = "TENDRIL_PG_REPL_USERNAME", default_value = "repl")]
    pub pg_repl_username: String,
    /// File holding the replication user's password (or set TENDRIL_PG_REPL_PASSWORD).
    #[arg(long, env = "TENDRIL_PG_REPL_PASSWORDFILE")]
    pub pg_repl_passwordfile: Option<PathBuf>,
    /// Whether this keeper may be elected master.
    #[arg(long, env = "TENDRIL_CAN_BE_MASTER", default_value_t = true, action = clap::ArgAction::Set)]
    pub can_be_master: bool,
    /// Whether this keeper may be a synchronous standby.
    #[arg(long, env = "TENDRIL_CAN_BE_SYNCHRONOUS_REPLICA", default_value_t = true, action = clap::ArgAction::Set)]
    pub can_be_synchronous_replica: bool,
    /// Election preference among equally advanced standbys; higher wins.
    #[arg(
        long,
        env = "TENDRIL_PRIORITY",
        default_value_t = 0,
        allow_hyphen_values = true
    )]
    pub priority: i32,
    /// Operating-system user PostgreSQL runs as when the keeper runs as root (PostgreSQL
    /// refuses to run as root).
    #[arg(long, env = "TENDRIL_PG_OS_USER", default_value = "postgres")]
    pub pg_os_user: String,
    /// Start the fence guard: a process beside the keeper that stops PostgreSQL if this
    /// keeper freezes or dies while running the master, before another can be elected.
    #[arg(long, env = "TENDRIL_FENCE_GUARD", default_value_t = true, action = clap::ArgAction::Set)]
    pub fence_guard: bool,
    /// Serve `/metrics`, the role checks `/master` (`/primary`) and `/replica`, `/health`
    /// and `/status` (JSON) on this address.
    #[arg(long, env = "TENDRIL_METRICS_ADDRESS")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// On SIGTERM while running the master: ask for a planned switchover to a healthy
    /// standby and keep running until it is done (at most this long), so clients see a
    /// switchover rather than a failover. Off when absent (PostgreSQL stops at once).
    #[arg(long, env = "TENDRIL_SWITCHOVER_ON_STOP", value_parser = humantime::parse_duration)]
    pub switchover_on_stop: Option<std::time::Duration>,
}

/// A user name and password. The password never appears in `Debug` output or logs.
#[derive(Clone)]
pub struct Credentials {
    /// The role name.
    pub user: String,
    /// The password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// The operating-system identity PostgreSQL runs under, when it differs from the keeper's.
#[derive(Debug, Clone)]
pub struct RunAs {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Its home directory: PostgreSQL's `HOME`, where libpq in the walreceiver looks for
    /// `~/.postgresql/` files (the keeper's own `HOME`, root's, is unreadable to it and
    /// makes every TLS replication connection fail).
    pub home: std::path::PathBuf,
}

/// Validated keeper configuration.
#[derive(Debug, Clone)]
pub struct KeeperConfig {
    /// Cluster name.
    pub cluster: String,
    /// Store keys of the cluster.
    pub keys: Keys,
    /// Store connection.
    pub store: StoreConfig,
    /// Uid given on the command line.
    pub uid: Option<String>,
    /// Data directory.
    pub data_dir: PathBuf,
    /// PostgreSQL binaries.
    pub pg_bin_path: PathBuf,
    /// Listen address.
    pub listen_address: String,
    /// Listen port.
    pub port: u16,
    /// Advertised address.
    pub advertise_address: String,
    /// Advertised port.
    pub advertise_port: u16,
    /// Superuser.
    pub su: Credentials,
    /// Replication user.
    pub repl: Credentials,
    /// May be master.
    pub can_be_master: bool,
    /// May be a synchronous standby.
    pub can_be_synchronous_replica: bool,
    /// Election priority.
    pub priority: i32,
    /// Whether to start the fence guard.
    pub fence_guard: bool,
    /// Where to serve metrics and the role checks.
    pub metrics_address: Option<std::net::SocketAddr>,
    /// On SIGTERM while running the master, switch over first, within this long.
    pub switchover_on_stop: Option<std::time::Duration>,
    /// PostgreSQL's OS identity when the keeper runs as root.
    pub run_as: Option<RunAs>,
}

impl KeeperConfig {
    /// Validates the flags, reading passwords from their files or the environment.
    pub fn from_args(args: KeeperArgs) -> Result<KeeperConfig, KeeperError> {
        Self::from_args_with_env(args, |name| std::env::var(name).ok())
    }

    /// As [`KeeperConfig::from_args`], with the environment given (for tests).
    pub fn from_args_with_env(
        args: KeeperArgs,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<KeeperConfig, KeeperError> {
        let mut errors = Vec::new();
        let keys = Keys::new(&args.cluster_name)
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        let store = args
            .store
            .to_config()
            .map_err(|e| errors.push(e.to_string()))
            .ok();
        if let Some(uid) = &args.uid
            && !valid_uid(uid)
        {
            errors.push(format!(
                "--uid {uid:?}: use 1-63 characters of a-z, 0-9, _ and -, not starting or \
                 ending with -"
            ));
        }
        let advertise_address = args
            .pg_advertise_address
            .clone()
            .unwrap_or_else(|| args.pg_listen_address.clone());
        if ["*", "0.0.0.0", "::", ""].contains(&advertise_address.as_str()) {
            errors.push(format!(
                "--pg-advertise-address is required when listening on {:?}: others need an address to reach PostgreSQL",
                args.pg_listen_address
            ));
        }
        if args.pg_port == 0 {
            errors.push("--pg-port must not be 0".into());
        }
        let su_password = password(
            "superuser",
            args.pg_su_passwordfile.as_deref(),
            env("TENDRIL_PG_SU_PASSWORD"),
        )
        .map_err(|e| errors.push(e))
        .ok();
        let repl_password = password(
            "replication user",
            args.pg_repl_passwordfile.as_deref(),
            env("TENDRIL_PG_REPL_PASSWORD"),
        )
        .map_err(|e| errors.push(e))
        .ok();
        for (what, user) in [
            ("--pg-su-username", &args.pg_su_username),
            ("--pg-repl-username", &args.pg_repl_username),
        ] {
            if user.is_empty() || user.len() > 63 || user.contains(['\0', '\n']) {
                errors.push(format!("{what} {user:?} is not a valid role name"));
            }
        }
        if args.pg_su_username == args.pg_repl_username
            && let (Some(a), Some(b)) = (&su_password, &repl_password)
            && a != b
        {
            errors.push(
                "the superuser and the replication user are the same role but their passwords differ".into(),
            );
        }
        if !args.pg_bin_path.join("postgres").is_file() {
            errors.push(format!(
                "--pg-bin-path {}: no postgres binary there (install postgresql-15)",
                args.pg_bin_path.display()
            ));
        }
        let run_as = match run_as(&args.pg_os_user) {
            Ok(r) => r,
            Err(e) => {
                errors.push(e);
                None
            }
        };
        match (keys, store, su_password, repl_password) {
            (Some(keys), Some(store), Some(su_password), Some(repl_password))
                if errors.is_empty() =>
            {
                Ok(KeeperConfig {
                    cluster: args.cluster_name,
                    keys,
                    store,
                    uid: args.uid,
                    data_dir: args.data_dir,
                    pg_bin_path: args.pg_bin_path,
                    advertise_port: args.pg_advertise_port.unwrap_or(args.pg_port),
                    listen_address: args.pg_listen_address,
                    port: args.pg_port,
                    advertise_address,
                    su: Credentials {
                        user: args.pg_su_username,
                        password: su_password,
                    },
                    repl: Credentials {
                        user: args.pg_repl_username,
                        password: repl_password,
                    },
                    can_be_master: args.can_be_master,
                    can_be_synchronous_replica: args.can_be_synchronous_replica,
                    priority: args.priority,
                    fence_guard: args.fence_guard,
                    metrics_address: args.metrics_address,
                    switchover_on_stop: args.switchover_on_stop,
                    run_as,
                })
            }
            _ => Err(KeeperError::Config(errors.join("\n  - "))),
        }
    }
}

/// Whether a keeper uid is acceptable (it becomes part of store keys and names). A
/// Kubernetes pod name (a DNS label, as a StatefulSet names its pods: `tendril-keeper-0`)
/// is one, so a pod's name can be its keeper's uid.
pub fn valid_uid(uid: &str) -> bool {
    let edge = |b: Option<u8>| b.is_some_and(|b| b != b'-');
    uid.len() <= 63
        && edge(uid.bytes().next())
        && edge(uid.bytes().last())
        && uid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A password from its file (or, without one, the environment), the trailing newline removed.
pub(crate) fn password(
    what: &str,
    file: Option<&Path>,
    env: Option<String>,
) -> Result<String, String> {
    let raw = match (file, env) {
        (Some(path), _) => std::fs::read_to_string(path).map_err(|e| {
            format!(
                "cannot read the {what} password file {}: {e}",
                path.display()
            )
        })?,
        (None, Some(value)) => value,
        (None, None) => {
            return Err(format!(
                "no {what} password: give its password file flag or set its TENDRIL_*_PASSWORD variable"
            ));
        }
    };
    let trimmed = raw.trim_end_matches(['\r', '\n']);
    if trimmed.len() != raw.len() {
        // Files written by echo or `openssl rand` end with one: normal, not worth a warning.
        tracing::debug!("removed the trailing newline of the {what} password");
    }
    if trimmed.is_empty() {
        return Err(format!("the {what} password is empty"));
    }
    Ok(trimmed.to_owned())
}

fn run_as(os_user: &str) -> Result<Option<RunAs>, String> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    match nix::unistd::User::from_name(os_user) {
        Ok(Some(user)) => Ok(Some(RunAs {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        })),
        Ok(None) => Err(format!(
            "running as root, PostgreSQL must run as another user, and --pg-os-user {os_user:?} does not exist"
        )),
        Err(e) => Err(format!("cannot look up user {os_user:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn keeper_uids_include_kubernetes_pod_names() {
        for good in ["k0", "db_1", "tendril-keeper-0", "_legacy", &"a".repeat(63)] {
            assert!(valid_uid(good), "{good}");
        }
        for bad in ["", "-k", "k-", "K0", "k.0", "k 0", &"a".repeat(64)] {
            assert!(!valid_uid(bad), "{bad}");
        }
    }

    use super::*;

    #[test]
    fn the_sample_settings_file_covers_every_flag_and_holds_the_defaults() {
        let sample =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/keeper.toml");
        let checked = tendril_daemon::config_file::check_sample::<KeeperArgs>(
            &sample,
            &[
                "tendril-keeper",
                "--cluster-name",
                "main",
                "--data-dir",
                "/var/lib/tendril/keeper",
            ],
        );
        assert_eq!(checked, Ok(()));
    }

    fn args(extra: &[&str]) -> KeeperArgs {
        let mut argv = vec![
            "tendril-keeper",
            "--cluster-name",
            "c",
            "--data-dir",
            "/tmp/x",
        ];
        argv.extend(extra);
        KeeperArgs::parse_from(argv)
    }

    fn env_with_passwords(name: &str) -> Option<String> {
        match name {
            "TENDRIL_PG_SU_PASSWORD" => Some("su-pw".into()),
            "TENDRIL_PG_REPL_PASSWORD" => Some("repl-pw".into()),
            _ => None,
        }
    }

    #[test]
    fn passwords_from_the_environment_are_hidden_in_debug() {
        let config = KeeperConfig::from_args_with_env(args(&[]), env_with_passwords).unwrap();
        assert_eq!(config.su.password, "su-pw");
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("su-pw") && !debug.contains("repl-pw"),
            "{debug}"
        );
    }

    #[test]
    fn every_problem_is_reported() {
        let err = KeeperConfig::from_args_with_env(
            args(&[
                "--pg-su-passwordfile",
                "/nonexistent/su",
                "--uid",
                "Bad-Uid",
                "--pg-listen-address",
                "*",
                "--pg-bin-path",
                "/nonexistent",
            ]),
            |_| None,
        )
        .unwrap_err()
        .to_string();
        for needle in [
            "/nonexistent/su",
            "replication user password",
            "--uid",
            "advertise",
            "--pg-bin-path",
        ] {
            assert!(err.contains(needle), "{needle} missing from: {err}");
        }
    }

    #[test]
    fn password_files_lose_the_trailing_newline_and_empty_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good");
        std::fs::write(&good, "secret\r\n").unwrap();
        assert_eq!(password("x", Some(&good), None).unwrap(), "secret");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        assert!(
            password("x", Some(&empty), None)
                .unwrap_err()
                .contains("empty")
        );
    }

    #[test]
    fn same_role_needs_the_same_password() {
        let err = KeeperConfig::from_args_with_env(
            args(&["--pg-repl-username", "postgres"]),
            env_with_passwords,
        )
        .unwrap_err();
        assert!(err.to_string().contains("passwords differ"), "{err}");
    }
}
