//! tendril-keeper: runs beside one PostgreSQL instance and converges it to the database spec
//! the cluster data assigns to it.
//!
//! How a keeper ticks (see [`keeper`]): read the cluster data; find this keeper's database;
//! if the local data belongs to another database, initialise (initdb, adopt, pg_rewind or
//! pg_basebackup); write `postgresql.conf` and `pg_hba.conf` from the spec; start postgres,
//! promote it or point it at its master; reconcile replication slots; record the generation
//! reached. A separate task publishes what postgres looks like under the keeper's lease.
//!
//! The keeper is the only process that touches its data directory, which it locks; passwords
//! come from files or the environment, never from the store, and never reach a log.
#![forbid(unsafe_code)]

pub mod config;
pub mod datadir;
pub mod fence;
pub mod guard;
pub mod health;
pub mod keeper;
pub mod pgconf;
pub mod pitr;
pub mod postgres;
pub mod sql;
pub mod switchover;

use std::path::{Path, PathBuf};

pub use config::{KeeperArgs, KeeperConfig};
pub use keeper::{Keeper, Pass};

/// Why the keeper could not do something.
#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    /// Bad flags or environment.
    #[error("invalid configuration:\n  - {0}")]
    Config(String),
    /// Another keeper holds the data directory.
    #[error("cannot take exclusive lock on data dir {0}: another keeper uses it")]
    Locked(PathBuf),
    /// A file operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why it failed.
        source: std::io::Error,
    },
    /// A local state file cannot be read back.
    #[error("{path} is corrupt ({detail}); fix or remove it")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] tendril_control_store::StoreError),
    /// The store did not answer a read in time (see `fence::STORE_READ_TIMEOUT`).
    #[error("the store did not answer within {0:?}")]
    StoreTimeout(std::time::Duration),
    /// The cluster data cannot be used; the keeper changes nothing until it can.
    #[error("cannot use the cluster data: {0}")]
    ClusterData(#[from] tendril_control_model::DecodeError),
    /// The cluster data is inconsistent for this keeper.
    #[error("{0}")]
    Spec(String),
    /// A PostgreSQL tool failed.
    #[error("{command} failed: {detail}")]
    Command {
        /// The tool.
        command: String,
        /// Exit status and the end of its output.
        detail: String,
    },
    /// postgres misbehaved.
    #[error("{0}")]
    Postgres(String),
    /// A query failed.
    #[error("postgres query failed: {0}")]
    Sql(String),
    /// The data directory has no PostgreSQL data although this keeper initialised it.
    #[error("data directory {0} vanished: postgres is not started; the sentinel will fail over")]
    DataVanished(PathBuf),
    /// The local data is not the database assigned (and its init mode creates nothing).
    #[error(
        "database {db} is assigned to this keeper but the local data belongs to {local:?}: keeper data disappeared"
    )]
    DataDisappeared {
        /// The database assigned.
        db: String,
        /// The database the local data belongs to.
        local: String,
    },
    /// The data directory is another PostgreSQL cluster than the one the cluster data expects.
    #[error(
        "system identifier mismatch: cluster data expects {expected}, the data directory has {found}; postgres is not started"
    )]
    SystemIdMismatch {
        /// Expected.
        expected: String,
        /// Found.
        found: String,
    },
    /// A master is asked to become a standby of the same database uid.
    #[error(
        "database {0} was a master and is now asked to be a standby: a database never demotes in place; it needs a new database uid (resync)"
    )]
    NeverDemotes(String),
    /// A standby cluster's leader whose data is not a standby.
    #[error(
        "database {0} leads a standby cluster but its data directory is not a standby (no standby.signal): a standby cluster never promotes its data; re-initialise the cluster, or `tendrilctl promote` it"
    )]
    NotAStandby(String),
}

impl KeeperError {
    /// An I/O error on `path`.
    pub fn io(op: &'static str, path: &Path, source: std::io::Error) -> KeeperError {
        KeeperError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
