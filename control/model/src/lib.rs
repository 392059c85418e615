//! The cluster model shared by every tendril process: what the user asks for ([`ClusterSpec`]),
//! what the sentinel leader decides ([`ClusterData`]), and what each component reports
//! ([`KeeperInfo`], [`ProxyInfo`], [`SentinelInfo`]), plus the small value types they are built
//! from ([`Lsn`], [`Generation`]) and the store key layout ([`Keys`]).
//!
//! Architecture invariant: this crate performs no I/O. It never depends on tokio, etcd, the
//! clock or the file system; callers pass the current time and any random identifiers in. That
//! keeps every decision that uses the model testable as a pure function.
//!
//! Every document stored in etcd carries a `format_version`. [`decode`] checks it before
//! anything else, so a component never acts on data it cannot understand; an unknown version
//! or invalid JSON is an error value, never a panic.
#![forbid(unsafe_code)]

mod cluster;
mod codec;
mod generation;
mod info;
mod keys;
mod lsn;
mod patch;
pub mod reads;
mod replication_tls;
mod spec;

pub use cluster::{
    ClusterData, ClusterPhase, Db, DbInitMode, DbRole, DbSpec, DbStatus, Event, FollowConfig,
    Keeper, KeeperStatus, PLACEHOLDER_SYNC_STANDBY, ProxyRoute, ProxySection, Switchover,
    SwitchoverPhase, TimelineHistoryEntry,
};
pub use codec::{DecodeError, Document, FORMAT_VERSION, decode, encode, encode_pretty};
pub use generation::Generation;
pub use info::{ArchiverState, KeeperInfo, PgVersion, PostgresState, ProxyInfo, SentinelInfo};
pub use keys::{InvalidClusterName, Keys};
pub use lsn::{Lsn, ParseLsnError};
pub use patch::merge_patch;
pub use replication_tls::{ReplicationTls, SslMode};
pub use spec::{
    ArchiveRecoverySettings, ClusterRole, ClusterSpec, ExistingConfig, InitMode, NewConfig,
    PitrConfig, RECOVERY_ENDING_PARAMETERS, RecoveryTargetSettings, SpecError, SpecErrors,
    StandbyBootstrap, StandbyConfig, StandbySettings, SuReplAccessMode,
};
