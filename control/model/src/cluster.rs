//! Cluster data: the one document the sentinel leader writes, and every other component follows.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::codec::FORMAT_VERSION;
use crate::spec::{ArchiveRecoverySettings, ClusterSpec, NewConfig, PitrConfig, StandbySettings};
use crate::{Generation, Lsn};

/// The cluster view, stored at `/tendril/<cluster>/clusterdata`.
///
/// Written only by the sentinel leader (compare-and-swap on the key's mod revision) and by
/// `tendrilctl` for spec changes; `generation` increases on every write so a reader can tell
/// two versions apart without comparing them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterData {
    /// The document format; [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Random identifier given at `init`; keepers of another cluster incarnation ignore this one.
    pub uid: String,
    /// Increases on every write.
    pub generation: Generation,
    /// When this version was written.
    #[serde(with = "humantime_serde")]
    pub change_time: SystemTime,
    /// Whether the first master is still being created.
    pub phase: ClusterPhase,
    /// The user's intent, every field present.
    pub spec: ClusterSpec,
    /// The database that is master, once there is one.
    #[serde(default)]
    pub master: Option<String>,
    /// Keepers the sentinel knows, by keeper uid.
    #[serde(default)]
    pub keepers: BTreeMap<String, Keeper>,
    /// Databases (one per keeper incarnation), by database uid.
    #[serde(default)]
    pub dbs: BTreeMap<String, Db>,
    /// What the proxies route to.
    #[serde(default)]
    pub proxy: ProxySection,
    /// A planned switchover in progress (requested by `tendrilctl switchover`).
    #[serde(default)]
    pub switchover: Option<Switchover>,
    /// The sentinel's recent decisions, newest last, at most [`ClusterData::MAX_EVENTS`].
    #[serde(default)]
    pub events: Vec<Event>,
}

impl ClusterData {
    /// Records a planned switchover request (to keeper `to`'s standby, or the best one);
    /// returns the master database being switched from. The sentinel carries it out.
    pub fn request_switchover(
        &mut self,
        to: Option<&str>,
        now: SystemTime,
    ) -> Result<String, String> {
        if self.phase != ClusterPhase::Normal {
            return Err("the cluster is still initialising".into());
        }
        if let Some(s) = &self.switchover {
            return Err(format!(
                "a switchover is already in progress ({:?})",
                s.phase
            ));
        }
        let Some(master) = self.master_db() else {
            return Err("the cluster has no master to switch from".into());
        };
        if let Some(k) = to {
            let standby = self
                .dbs
                .values()
                .any(|d| d.spec.keeper_uid == k && d.spec.role == DbRole::Standby);
            if master.spec.keeper_uid == k {
                return Err(format!("keeper {k} already runs the master"));
            }
            if !standby {
                return Err(format!("keeper {k} runs no standby of this cluster"));
            }
        }
        let old = master.uid.clone();
        self.switchover = Some(Switchover {
            target_keeper: to.map(str::to_owned),
            requested_at: now,
            phase: SwitchoverPhase::Requested,
            target_db: None,
            old_master: None,
            fence_generation: None,
            outcome: None,
        });
        Ok(old)
    }

    /// A brand-new cluster in the `initializing` phase, with nothing routable yet.
    pub fn new(uid: impl Into<String>, spec: ClusterSpec, now: SystemTime) -> ClusterData {
        ClusterData {
            format_version: FORMAT_VERSION,
            uid: uid.into(),
            generation: Generation::INITIAL,
            change_time: now,
            phase: ClusterPhase::Initializing,
            spec,
            master: None,
            keepers: BTreeMap::new(),
            dbs: BTreeMap::new(),
            proxy: ProxySection {
                generation: Generation::INITIAL,
                change_time: Some(now),
                ..ProxySection::default()
            },
            switchover: None,
            events: Vec::new(),
        }
    }

    /// How many events the history keeps.
    pub const MAX_EVENTS: usize = 50;

    /// Appends an event, dropping the oldest beyond [`ClusterData::MAX_EVENTS`].
    pub fn push_event(&mut self, event: Event) {
        self.events.push(event);
        let excess = self.events.len().saturating_sub(Self::MAX_EVENTS);
        self.events.drain(..excess);
    }

    /// The master database, when one is assigned and present.
    pub fn master_db(&self) -> Option<&Db> {
        self.master.as_ref().and_then(|uid| self.dbs.get(uid))
    }
}

/// The standby name a master lists in `synchronous_standby_names` when it has fewer real
/// synchronous standbys than the minimum. No standby has it, so commits keep waiting instead of
/// silently degrading to asynchronous replication.
pub const PLACEHOLDER_SYNC_STANDBY: &str = "tendril_placeholder_standby";

/// One decision of the sentinel, kept for `tendrilctl status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// When.
    #[serde(with = "humantime_serde")]
    pub time: SystemTime,
    /// The cluster data generation the decision was written in.
    pub generation: Generation,
    /// What was decided, in a word or two ("fence", "promote", "no candidate").
    pub kind: String,
    /// Why.
    pub reason: String,
}

/// A planned switchover: fence with proxies holding new connections, stop the master so every
/// byte it wrote reaches the target, promote the target, publish it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Switchover {
    /// The keeper to switch to; `None` lets the sentinel choose the best standby.
    #[serde(default)]
    pub target_keeper: Option<String>,
    /// When it was asked for.
    #[serde(with = "humantime_serde")]
    pub requested_at: SystemTime,
    /// How far it got.
    #[serde(default)]
    pub phase: SwitchoverPhase,
    /// The database being promoted, once chosen.
    #[serde(default)]
    pub target_db: Option<String>,
    /// The database being demoted.
    #[serde(default)]
    pub old_master: Option<String>,
    /// The proxy generation of the fence.
    #[serde(default)]
    pub fence_generation: Option<Generation>,
    /// Why it was abandoned, if it was.
    #[serde(default)]
    pub outcome: Option<String>,
}

/// The steps of a switchover.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SwitchoverPhase {
    /// Written by `tendrilctl switchover`; the sentinel has not acted yet.
    #[default]
    Requested,
    /// Proxies hold new connections and close the old ones; waiting for their acknowledgement.
    Fencing,
    /// The old master is being stopped so the target receives everything it wrote.
    StoppingMaster,
    /// The target is being promoted.
    Promoting,
}

/// The life stage of a cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterPhase {
    /// The first master is being created (initdb, adoption or recovery).
    Initializing,
    /// The cluster has had a master; failover rules apply.
    Normal,
}

/// A keeper as the sentinel records it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Keeper {
    /// The keeper's uid (also its key in [`ClusterData::keepers`]).
    pub uid: String,
    /// What the sentinel last concluded about it.
    #[serde(default)]
    pub status: KeeperStatus,
}

/// The sentinel's view of a keeper's health and capabilities.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct KeeperStatus {
    /// Reported within `fail_interval`.
    pub healthy: bool,
    /// The last time it was healthy.
    #[serde(with = "humantime_serde::option")]
    pub last_healthy_time: Option<SystemTime>,
    /// The keeper process incarnation the sentinel has seen; a restarted keeper waits until
    /// the sentinel has recorded its new boot uuid before it starts PostgreSQL.
    pub boot_uuid: Option<String>,
    /// PostgreSQL binary version the keeper runs.
    pub pg_binary_version: Option<crate::PgVersion>,
    /// Set by `tendrilctl failkeeper`: treat the keeper as failed once.
    pub force_fail: bool,
    /// May be elected master.
    pub can_be_master: bool,
    /// May be a synchronous standby.
    pub can_be_synchronous_replica: bool,
    /// Election preference among equally advanced candidates; higher wins.
    pub priority: i32,
}

impl Default for KeeperStatus {
    fn default() -> Self {
        KeeperStatus {
            healthy: false,
            last_healthy_time: None,
            boot_uuid: None,
            pg_binary_version: None,
            force_fail: false,
            can_be_master: true,
            can_be_synchronous_replica: true,
            priority: 0,
        }
    }
}

/// One database incarnation assigned to one keeper. A uid is never reused for a different role
/// history: rebuilding a keeper's data gives it a new database uid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Db {
    /// The database uid (also its key in [`ClusterData::dbs`]).
    pub uid: String,
    /// Increases whenever `spec` changes; the keeper reports the one it has converged to.
    pub generation: Generation,
    /// When `spec` last changed.
    #[serde(with = "humantime_serde")]
    pub change_time: SystemTime,
    /// What the keeper must make of it.
    pub spec: DbSpec,
    /// What the keeper last reported, as the sentinel copied it.
    #[serde(default)]
    pub status: DbStatus,
}

/// What a keeper must make of its database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DbSpec {
    /// The keeper that owns it.
    pub keeper_uid: String,
    /// Master or standby.
    pub role: DbRole,
    /// How to create it if the keeper has no data for it yet.
    pub init_mode: DbInitMode,
    /// Whom it replicates from: a standby follows a database of the cluster; the master of a
    /// standby cluster (its standby leader) follows the external primary.
    pub follow: Option<FollowConfig>,
    /// Databases following this one (sorted).
    pub followers: Vec<String>,
    /// Whether `synchronous_standbys` is in force.
    pub synchronous_replication: bool,
    /// Databases that must acknowledge commits (sorted).
    pub synchronous_standbys: Vec<String>,
    /// Raw standby names added to `synchronous_standby_names` (the placeholder that keeps a
    /// master blocking when fewer real synchronous standbys than the minimum exist).
    pub external_synchronous_standbys: Vec<String>,
    /// PostgreSQL parameters from the cluster spec.
    pub pg_parameters: BTreeMap<String, String>,
    /// User `pg_hba.conf` lines from the cluster spec.
    pub pg_hba: Option<Vec<String>>,
    /// TLS of the replication connection to the upstream, from the cluster spec.
    #[serde(default)]
    pub replication_tls: Option<crate::ReplicationTls>,
    /// `max_replication_slots` and the base of `max_wal_senders`.
    pub max_standbys: u32,
    /// Extra WAL senders.
    pub additional_wal_senders: u32,
    /// Physical slots to keep besides the followers' (master only).
    pub additional_replication_slots: Vec<String>,
    /// Allow pg_rewind for resync.
    pub use_pg_rewind: bool,
    /// Timeout of requests to PostgreSQL.
    #[serde(with = "humantime_serde")]
    pub request_timeout: std::time::Duration,
    /// initdb options for `init_mode = new`.
    pub new_config: Option<NewConfig>,
    /// Restore settings for `init_mode = pitr`.
    pub pitr_config: Option<PitrConfig>,
    /// Merge parameters found after initialisation into the spec.
    pub include_previous_config: bool,
    /// Keep postgres stopped (a master being switched over: stopping it makes sure every byte
    /// of WAL it wrote reaches its standbys).
    pub stop: bool,
    /// The WAL archive, for a standby that needs WAL its upstream no longer keeps.
    pub archive_recovery_settings: Option<crate::ArchiveRecoverySettings>,
    /// How a new standby restores a backup instead of a pg_basebackup.
    pub standby_bootstrap: Option<crate::StandbyBootstrap>,
}

impl DbSpec {
    /// The master of a standby cluster: it replicates from the external primary, never
    /// promotes, and its standbys stream from it.
    pub fn is_standby_leader(&self) -> bool {
        self.role == DbRole::Master && matches!(self.follow, Some(FollowConfig::External { .. }))
    }
}

impl FollowConfig {
    /// What a standby cluster's leader follows, from the cluster spec.
    pub fn external(spec: &ClusterSpec) -> FollowConfig {
        let config = spec.standby_config.clone().unwrap_or_default();
        FollowConfig::External {
            standby_settings: config.standby_settings,
            archive_recovery_settings: config.archive_recovery_settings,
        }
    }
}

impl Default for DbSpec {
    fn default() -> Self {
        let spec = ClusterSpec::default();
        DbSpec {
            keeper_uid: String::new(),
            role: DbRole::Standby,
            init_mode: DbInitMode::None,
            follow: None,
            followers: Vec::new(),
            synchronous_replication: false,
            synchronous_standbys: Vec::new(),
            external_synchronous_standbys: Vec::new(),
            pg_parameters: BTreeMap::new(),
            pg_hba: None,
            replication_tls: None,
            max_standbys: spec.max_standbys,
            additional_wal_senders: spec.additional_wal_senders,
            additional_replication_slots: Vec::new(),
            use_pg_rewind: false,
            request_timeout: spec.request_timeout,
            new_config: None,
            pitr_config: None,
            archive_recovery_settings: None,
            standby_bootstrap: None,
            include_previous_config: false,
            stop: false,
        }
    }
}

/// A database's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbRole {
    /// Accepts writes (or, in a standby cluster, is the one following the external primary).
    Master,
    /// Replicates from another database.
    Standby,
}

/// How a keeper creates a database it has no data for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DbInitMode {
    /// Nothing to create: the data must already be there.
    None,
    /// initdb.
    New,
    /// Adopt the data directory as it is.
    Existing,
    /// Restore with the user's command and recover.
    Pitr,
    /// Become a standby of the master: pg_rewind when allowed and possible, else base backup.
    Resync,
}

/// Whom a standby replicates from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FollowConfig {
    /// Another database of this cluster.
    Internal {
        /// The database followed.
        db_uid: String,
    },
    /// A primary outside the cluster (standby cluster).
    External {
        /// Streaming settings.
        standby_settings: Option<StandbySettings>,
        /// Archive settings.
        archive_recovery_settings: Option<ArchiveRecoverySettings>,
    },
}

/// One line of a timeline history file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimelineHistoryEntry {
    /// The timeline that ended.
    pub timeline_id: u32,
    /// Where it ended: the first position of the next timeline.
    pub switch_point: Lsn,
    /// Why, as PostgreSQL wrote it.
    #[serde(default)]
    pub reason: String,
}

/// A database's last reported state, as the sentinel copied it from the keeper.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct DbStatus {
    /// Reported healthy within `fail_interval`.
    pub healthy: bool,
    /// The spec generation the keeper has converged to.
    pub current_generation: Generation,
    /// Advertised address.
    pub listen_address: Option<String>,
    /// Advertised port.
    pub port: Option<u16>,
    /// PostgreSQL's database system identifier (a 64-bit number, kept as text so no JSON
    /// reader rounds it).
    pub system_id: Option<String>,
    /// Current timeline.
    pub timeline_id: u32,
    /// Current WAL position (write position on a master, replay on a standby).
    pub xlog_pos: Lsn,
    /// A healthy standby's WAL receiver is streaming from its upstream.
    pub streaming: bool,
    /// A standby's last replayed WAL position (what its readers see; `xlog_pos` is the
    /// furthest of received and replayed).
    pub replay_lsn: Option<Lsn>,
    /// The last entries of the timeline history.
    pub timelines_history: Vec<TimelineHistoryEntry>,
    /// Parameters in effect.
    pub pg_parameters: BTreeMap<String, String>,
    /// Synchronous standbys known to be in sync (sentinel-maintained).
    pub synchronous_standbys: Vec<String>,
    /// Oldest WAL segment still on the master's disk.
    pub older_wal_file: Option<String>,
}

/// What the proxies route to. The sentinel bumps `generation` on every change and waits for
/// each live proxy to acknowledge it before it takes the next step of a failover.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ProxySection {
    /// Version of this section.
    pub generation: Generation,
    /// When it last changed.
    #[serde(with = "humantime_serde::option")]
    pub change_time: Option<SystemTime>,
    /// The master to route to; `None` fences every proxy (no connection to any database).
    pub master: Option<ProxyRoute>,
    /// With no master: hold new connections (a planned switchover) instead of refusing them.
    pub hold: bool,
}

/// Where proxies send clients.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRoute {
    /// The master database.
    pub db_uid: String,
    /// Its advertised address.
    pub address: String,
    /// Its advertised port.
    pub port: u16,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};
    use std::time::{Duration, UNIX_EPOCH};

    fn sample() -> ClusterData {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut cd = ClusterData::new("c0ffee01", ClusterSpec::default(), now);
        cd.phase = ClusterPhase::Normal;
        cd.generation = Generation(42);
        cd.keepers.insert(
            "k1".into(),
            Keeper {
                uid: "k1".into(),
                status: KeeperStatus {
                    healthy: true,
                    last_healthy_time: Some(now),
                    boot_uuid: Some("b-1".into()),
                    priority: 3,
                    ..KeeperStatus::default()
                },
            },
        );
        cd.dbs.insert(
            "db1".into(),
            Db {
                uid: "db1".into(),
                generation: Generation(7),
                change_time: now,
                spec: DbSpec {
                    keeper_uid: "k1".into(),
                    role: DbRole::Master,
                    followers: vec!["db2".into()],
                    ..DbSpec::default()
                },
                status: DbStatus {
                    healthy: true,
                    current_generation: Generation(7),
                    listen_address: Some("127.0.0.1".into()),
                    port: Some(5432),
                    system_id: Some("7312345678901234567".into()),
                    timeline_id: 2,
                    xlog_pos: Lsn(0x3000060),
                    timelines_history: vec![TimelineHistoryEntry {
                        timeline_id: 1,
                        switch_point: Lsn(0x3000000),
                        reason: "no recovery target specified".into(),
                    }],
                    ..DbStatus::default()
                },
            },
        );
        cd.dbs.insert(
            "db2".into(),
            Db {
                uid: "db2".into(),
                generation: Generation(1),
                change_time: now,
                spec: DbSpec {
                    keeper_uid: "k2".into(),
                    init_mode: DbInitMode::Resync,
                    follow: Some(FollowConfig::Internal {
                        db_uid: "db1".into(),
                    }),
                    ..DbSpec::default()
                },
                status: DbStatus::default(),
            },
        );
        cd.master = Some("db1".into());
        cd.proxy.generation = Generation(5);
        cd.proxy.master = Some(ProxyRoute {
            db_uid: "db1".into(),
            address: "127.0.0.1".into(),
            port: 5432,
        });
        cd
    }

    #[test]
    fn round_trips_through_json() {
        let cd = sample();
        let bytes = encode(&cd);
        let back: ClusterData = decode(&bytes).unwrap();
        assert_eq!(back, cd);
        assert_eq!(back.master_db().map(|d| d.uid.as_str()), Some("db1"));
    }

    #[test]
    fn json_shape_is_readable() {
        let v: serde_json::Value = serde_json::from_slice(&encode(&sample())).unwrap();
        assert_eq!(v["format_version"], 1);
        assert_eq!(v["phase"], "normal");
        assert_eq!(v["change_time"], "2027-01-15T08:00:00Z");
        assert_eq!(v["dbs"]["db1"]["status"]["xlog_pos"], "0/3000060");
        assert_eq!(
            v["dbs"]["db1"]["status"]["system_id"],
            "7312345678901234567"
        );
        assert_eq!(v["dbs"]["db2"]["spec"]["follow"]["type"], "internal");
        assert_eq!(v["proxy"]["master"]["port"], 5432);
        assert_eq!(v["spec"]["fail_interval"], "5s");
    }

    #[test]
    fn new_cluster_routes_nowhere() {
        let cd = ClusterData::new("u", ClusterSpec::default(), UNIX_EPOCH);
        assert_eq!(cd.phase, ClusterPhase::Initializing);
        assert_eq!(cd.generation, Generation::INITIAL);
        assert!(cd.proxy.master.is_none());
        assert!(cd.master_db().is_none());
    }
}
