//! The cluster specification: what the user asks for, with tendril's defaults and validation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The user's intent for a cluster. Stored inside `clusterdata` with every field present, so
/// that what `tendrilctl spec` prints is exactly what every component acts on.
///
/// Defaults are seconds, not stolon's tens of seconds: a 1 s loop (`sleep_interval`), a master
/// failed after 5 s without a healthy report (`fail_interval`), a 5 s proxy lease
/// (`proxy_timeout`); the full set is in the `Default` impl below.
/// Every duration is written in JSON as a human-readable string ("5s", "1m 30s").
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterSpec {
    /// Period of the keeper report and of the sentinel loop.
    #[serde(with = "humantime_serde")]
    pub sleep_interval: Duration,
    /// Timeout of every request a keeper makes to its PostgreSQL.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// How long a keeper or database may be unhealthy before the sentinel declares it failed.
    #[serde(with = "humantime_serde")]
    pub fail_interval: Duration,
    /// How long a database may take to converge to a new spec generation (not initialisation).
    #[serde(with = "humantime_serde")]
    pub convergence_timeout: Duration,
    /// How long an `initdb`-based initialisation may take.
    #[serde(with = "humantime_serde")]
    pub init_timeout: Duration,
    /// How long a resync (base backup) or a PITR recovery may take; zero means no limit.
    #[serde(with = "humantime_serde")]
    pub sync_timeout: Duration,
    /// How long to wait for PostgreSQL to accept connections after a start.
    #[serde(with = "humantime_serde")]
    pub db_wait_ready_timeout: Duration,
    /// How long a keeper without a database may stay unhealthy before it is forgotten.
    #[serde(with = "humantime_serde")]
    pub dead_keeper_removal_interval: Duration,
    /// How often a proxy renews its lease and reports the generation it applied.
    #[serde(with = "humantime_serde")]
    pub proxy_check_interval: Duration,
    /// The proxy lease TTL: a proxy that cannot renew its lease for most of this long fences
    /// itself, and the sentinel stops waiting for a proxy whose lease expired.
    #[serde(with = "humantime_serde")]
    pub proxy_timeout: Duration,
    /// Maximum number of standbys (sets `max_replication_slots` and `max_wal_senders`).
    pub max_standbys: u32,
    /// Standbys the sentinel assigns to one master.
    pub max_standbys_per_sender: u32,
    /// Largest lag in bytes, against the master's last reported position, with which a standby
    /// may still be elected in asynchronous mode.
    pub max_standby_lag: u64,
    /// Largest lag in bytes, against the master's last reported position, with which a
    /// standby still serves reads: its keeper's `/replica` answers 503 beyond it, and the
    /// proxies' read-only listeners send it no new connection.
    pub max_standby_lag_for_reads: u64,
    /// The proxies' read-only listeners use only the master's synchronous standbys.
    pub reads_on_synchronous_only: bool,
    /// Synchronous replication: commits wait for the synchronous standbys.
    pub synchronous_replication: bool,
    /// Fewest synchronous standbys; with fewer real ones commits block rather than degrade.
    /// Zero lets the master run alone.
    pub min_synchronous_standbys: u32,
    /// Most synchronous standbys.
    pub max_synchronous_standbys: u32,
    /// WAL senders beyond the ones the standbys need (backups, logical decoding).
    pub additional_wal_senders: u32,
    /// Physical replication slots the master keeps for clients outside the cluster.
    pub additional_master_replication_slots: Vec<String>,
    /// Use `pg_rewind` to bring a former master back as a standby (also sets `wal_log_hints`).
    pub use_pg_rewind: bool,
    /// How the cluster's first master is created. Immutable after `init`.
    pub init_mode: InitMode,
    /// Keep the parameters found in the data directory after initialisation in the spec.
    pub merge_pg_parameters: bool,
    /// `master` for an ordinary cluster, `standby` for a cluster following another one.
    pub role: ClusterRole,
    /// Where the superuser and replication user may connect from: `all` or `strict`.
    pub default_su_repl_access_mode: SuReplAccessMode,
    /// initdb options for `init_mode = new`.
    pub new_config: Option<NewConfig>,
    /// The keeper whose data directory is adopted for `init_mode = existing`.
    pub existing_config: Option<ExistingConfig>,
    /// Restore settings for `init_mode = pitr`.
    pub pitr_config: Option<PitrConfig>,
    /// The cluster this one follows when `role = standby`.
    pub standby_config: Option<StandbyConfig>,
    /// PostgreSQL parameters written to every instance's `postgresql.conf`.
    pub pg_parameters: BTreeMap<String, String>,
    /// `pg_hba.conf` lines for ordinary users. Absent means the two default `md5` lines that
    /// admit every user from any address; an empty list admits nobody but tendril's roles.
    pub pg_hba: Option<Vec<String>>,
    /// Restart PostgreSQL when a changed parameter needs it; otherwise report "pending restart".
    pub automatic_pg_restart: bool,
    /// TLS of the standbys' replication connections; absent means `sslmode=prefer` (TLS when
    /// the upstream offers it, unverified).
    pub replication_tls: Option<crate::ReplicationTls>,
    /// The WAL archive, for the standbys: one that needs WAL its upstream no longer keeps
    /// fetches it with this `restore_command` instead of being cloned again.
    pub archive_recovery_settings: Option<ArchiveRecoverySettings>,
    /// New standbys restore the latest backup with this command, then catch up from the
    /// archive and stream, instead of a pg_basebackup from the master.
    pub standby_bootstrap: Option<StandbyBootstrap>,
}

/// How a new standby gets its data from the backup repository.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandbyBootstrap {
    /// Shell command that restores a base backup; `%d` is replaced by the data directory.
    pub command: String,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            sleep_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            fail_interval: Duration::from_secs(5),
            convergence_timeout: Duration::from_secs(30),
            init_timeout: Duration::from_secs(5 * 60),
            sync_timeout: Duration::ZERO,
            db_wait_ready_timeout: Duration::from_secs(60),
            dead_keeper_removal_interval: Duration::from_secs(48 * 3600),
            proxy_check_interval: Duration::from_secs(1),
            proxy_timeout: Duration::from_secs(5),
            max_standbys: 20,
            max_standbys_per_sender: 3,
            // stolon documents 1 MiB but its code says 1024*1204; we mean 1 MiB.
            max_standby_lag: 1024 * 1024,
            max_standby_lag_for_reads: 1024 * 1024,
            reads_on_synchronous_only: false,
            synchronous_replication: false,
            min_synchronous_standbys: 1,
            max_synchronous_standbys: 1,
            additional_wal_senders: 5,
            additional_master_replication_slots: Vec::new(),
            use_pg_rewind: false,
            init_mode: InitMode::New,
            merge_pg_parameters: true,
            role: ClusterRole::Master,
            default_su_repl_access_mode: SuReplAccessMode::All,
            new_config: None,
            existing_config: None,
            pitr_config: None,
            standby_config: None,
            pg_parameters: BTreeMap::new(),
            pg_hba: None,
            automatic_pg_restart: false,
            replication_tls: None,
            archive_recovery_settings: None,
            standby_bootstrap: None,
        }
    }
}

/// How the first master of a cluster is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitMode {
    /// `initdb` a fresh data directory on a keeper chosen by the sentinel.
    New,
    /// Adopt the data directory of the keeper named in `existing_config`.
    Existing,
    /// Restore a base backup with the user's command, then recover (point-in-time recovery).
    Pitr,
}

/// Whether the cluster is independent or follows another cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClusterRole {
    /// An ordinary cluster with a writable master.
    Master,
    /// A standby cluster: its "master" is itself a standby of an external primary.
    Standby,
}

/// Which addresses the superuser and the replication user may connect from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SuReplAccessMode {
    /// From anywhere (still password-authenticated).
    All,
    /// Only from the other keepers' addresses.
    Strict,
}

/// initdb options.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NewConfig {
    /// `--locale`.
    pub locale: Option<String>,
    /// `--encoding`.
    pub encoding: Option<String>,
    /// `--data-checksums`.
    pub data_checksums: bool,
}

/// The data directory to adopt.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExistingConfig {
    /// The keeper whose current data directory becomes the master.
    pub keeper_uid: String,
}

/// Point-in-time recovery settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PitrConfig {
    /// Shell command that restores a base backup; `%d` is replaced by the data directory.
    pub data_restore_command: String,
    /// WAL archive settings used during recovery.
    pub archive_recovery_settings: Option<ArchiveRecoverySettings>,
    /// Where recovery stops; absent means the end of the archive on the latest timeline.
    pub recovery_target_settings: Option<RecoveryTargetSettings>,
}

/// WAL archive access during recovery.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ArchiveRecoverySettings {
    /// PostgreSQL's `restore_command`.
    pub restore_command: String,
}

/// PostgreSQL's `recovery_target*` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecoveryTargetSettings {
    /// `recovery_target` (only `immediate` is meaningful).
    pub recovery_target: Option<String>,
    /// `recovery_target_lsn`.
    pub recovery_target_lsn: Option<String>,
    /// `recovery_target_name`.
    pub recovery_target_name: Option<String>,
    /// `recovery_target_time`.
    pub recovery_target_time: Option<String>,
    /// `recovery_target_xid`.
    pub recovery_target_xid: Option<String>,
    /// `recovery_target_timeline`.
    pub recovery_target_timeline: Option<String>,
    /// `recovery_target_inclusive`: stop just after the target (`true`, PostgreSQL's default)
    /// or just before it (`false`).
    pub recovery_target_inclusive: Option<String>,
}

impl RecoveryTargetSettings {
    /// The targets set (PostgreSQL allows at most one).
    fn targets(&self) -> Vec<&'static str> {
        [
            ("recovery_target", &self.recovery_target),
            ("recovery_target_lsn", &self.recovery_target_lsn),
            ("recovery_target_name", &self.recovery_target_name),
            ("recovery_target_time", &self.recovery_target_time),
            ("recovery_target_xid", &self.recovery_target_xid),
        ]
        .into_iter()
        .filter(|(_, v)| v.is_some())
        .map(|(name, _)| name)
        .collect()
    }
}

/// How a standby cluster follows its external primary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandbyConfig {
    /// Streaming replication settings.
    pub standby_settings: Option<StandbySettings>,
    /// WAL archive settings.
    pub archive_recovery_settings: Option<ArchiveRecoverySettings>,
}

/// Streaming replication from an external primary: a plain PostgreSQL, or another tendril
/// cluster reached through its proxy (which follows that cluster's failovers).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StandbySettings {
    /// The external primary's host (or its proxy's).
    pub primary_host: Option<String>,
    /// Its port; 5432 when absent.
    pub primary_port: Option<u16>,
    /// The role to replicate as; absent: the keepers' replication user. The standby cluster
    /// replicates the primary's roles, so its keepers' users and passwords must be the
    /// primary's.
    pub user: Option<String>,
    /// A file on every keeper host holding that role's password (passwords never go in the
    /// store); absent: the keepers' replication password.
    pub password_file: Option<String>,
    /// libpq `sslmode` of the connection; `prefer` when absent.
    pub sslmode: Option<String>,
    /// More `primary_conninfo` keywords (`sslrootcert=...`), added after the ones above; a
    /// password is refused here.
    pub primary_conninfo: String,
    /// PostgreSQL's `primary_slot_name`.
    pub primary_slot_name: Option<String>,
    /// PostgreSQL's `recovery_min_apply_delay`.
    pub recovery_min_apply_delay: Option<String>,
}

impl StandbySettings {
    /// What is wrong, as (field, message) pairs.
    fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let extra = conninfo_keywords(&self.primary_conninfo);
        let host_in_extra = extra.iter().any(|k| k == "host" || k == "hostaddr");
        match self.primary_host.as_deref().map(str::trim) {
            Some("") => out.push(("primary_host", "must not be empty".to_owned())),
            None if !host_in_extra => out.push((
                "primary_host",
                "is required when role is standby (or host= in primary_conninfo)".to_owned(),
            )),
            _ => {}
        }
        if self.primary_port == Some(0) {
            out.push(("primary_port", "must be a port number".to_owned()));
        }
        if self.user.as_deref().is_some_and(|u| u.trim().is_empty()) {
            out.push(("user", "must not be empty".to_owned()));
        }
        if self
            .password_file
            .as_deref()
            .is_some_and(|p| !p.starts_with('/'))
        {
            out.push((
                "password_file",
                "must be an absolute path on the keepers' hosts".to_owned(),
            ));
        }
        if let Some(mode) = &self.sslmode
            && !crate::SslMode::ALL.iter().any(|m| m.as_str() == mode)
        {
            let modes: Vec<&str> = crate::SslMode::ALL.iter().map(|m| m.as_str()).collect();
            out.push(("sslmode", format!("must be one of {}", modes.join(", "))));
        }
        if extra.iter().any(|k| k == "password" || k == "passfile") {
            out.push((
                "primary_conninfo",
                "must not hold a password: every component reads the store; use password_file"
                    .to_owned(),
            ));
        }
        // The keeper sets these itself (the user and database change for the timeline
        // checks and rewinds, which log in as the superuser).
        for reserved in ["user", "dbname", "replication", "application_name"] {
            if extra.iter().any(|k| k == reserved) {
                out.push((
                    "primary_conninfo",
                    format!("must not set {reserved}: the keeper sets it (use the user field)"),
                ));
            }
        }
        let texts = [
            ("primary_conninfo", Some(&self.primary_conninfo)),
            ("primary_host", self.primary_host.as_ref()),
            ("user", self.user.as_ref()),
            ("password_file", self.password_file.as_ref()),
            ("primary_slot_name", self.primary_slot_name.as_ref()),
            (
                "recovery_min_apply_delay",
                self.recovery_min_apply_delay.as_ref(),
            ),
        ];
        for (field, text) in texts {
            if text.is_some_and(|t| t.contains(|c: char| c.is_control())) {
                out.push((
                    field,
                    "must not contain a line break or control character".into(),
                ));
            }
        }
        if let Some(slot) = &self.primary_slot_name
            && (slot.is_empty()
                || !slot
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'))
        {
            out.push((
                "primary_slot_name",
                "must be lower-case letters, digits and underscores".into(),
            ));
        }
        if self
            .recovery_min_apply_delay
            .as_deref()
            .is_some_and(|d| d.trim().is_empty())
        {
            out.push(("recovery_min_apply_delay", "must not be empty".to_owned()));
        }
        out
    }
}

/// The keywords of a libpq `key=value` connection string (quoted values skipped).
fn conninfo_keywords(conninfo: &str) -> Vec<String> {
    let mut keys = Vec::new();
    let mut chars = conninfo.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        if key.is_empty() && chars.peek().is_none() {
            return keys;
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            // Not key=value: libpq says what is wrong with it.
            continue;
        }
        keys.push(key.to_ascii_lowercase());
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next_if_eq(&'\'').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        chars.next();
                    }
                    '\'' => break,
                    _ => {}
                }
            }
        } else {
            while chars.next_if(|c| !c.is_whitespace()).is_some() {}
        }
    }
}

/// One reason a spec is invalid, naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecError {
    /// The field, as it is spelled in JSON (`pitr_config.data_restore_command`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Every reason a spec is invalid, reported together so the user fixes them in one pass.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SpecErrors(pub Vec<SpecError>);

impl SpecErrors {
    /// Whether `field` is among the errors.
    pub fn mentions(&self, field: &str) -> bool {
        self.0.iter().any(|e| e.field == field)
    }
}

impl fmt::Display for SpecErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid cluster spec ({} error", self.0.len())?;
        if self.0.len() != 1 {
            write!(f, "s")?;
        }
        write!(f, ")")?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

/// Parameters the keeper writes itself. A user value for one of them would be silently
/// overridden, so it is rejected instead.
pub(crate) const MANAGED_PG_PARAMETERS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "hot_standby",
    "max_replication_slots",
    "max_wal_senders",
    "synchronous_standby_names",
    "primary_conninfo",
    "primary_slot_name",
    "restore_command",
    "recovery_min_apply_delay",
    "wal_log_hints",
    "config_file",
    "hba_file",
    "ident_file",
    "data_directory",
];

/// Parameters that could end a standby's recovery (a standby cluster's leader among them):
/// only the keeper's own point-in-time recovery sets them. Neither the spec nor an adopted
/// data directory's configuration may carry them.
pub const RECOVERY_ENDING_PARAMETERS: &[&str] = &[
    "recovery_target",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_xid",
    "recovery_target_timeline",
    "recovery_target_inclusive",
    "recovery_target_action",
    "promote_trigger_file",
];

/// Prefix of the replication slots and application names tendril manages.
pub(crate) const MANAGED_SLOT_PREFIX: &str = "tendril_";

struct Collector(Vec<SpecError>);

impl Collector {
    fn push(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.0.push(SpecError {
            field: field.into(),
            message: message.into(),
        });
    }

    fn positive(&mut self, field: &str, value: Duration) {
        if value.is_zero() {
            self.push(field, "must be greater than zero");
        }
    }
}

impl ClusterSpec {
    /// Parses a spec given by a user: every field is optional and takes its default; unknown
    /// fields, wrongly typed values and semantic errors are all reported together.
    pub fn from_json_value(input: &Value) -> Result<ClusterSpec, SpecErrors> {
        let (spec, errors) = ClusterSpec::parse_lenient(input);
        finish(spec, errors, ClusterSpec::validate)
    }

    /// Parses a spec meant to replace `self` in a running cluster, reporting the parse errors,
    /// the new spec's own errors and the changes that are not allowed, all together.
    pub fn update_from_json_value(&self, input: &Value) -> Result<ClusterSpec, SpecErrors> {
        let (spec, errors) = ClusterSpec::parse_lenient(input);
        finish(spec, errors, |new| self.validate_update(new))
    }

    /// The spec with every well-formed field of `input` applied over the defaults, and an
    /// error for each field that is unknown or not of its type.
    fn parse_lenient(input: &Value) -> (ClusterSpec, Vec<SpecError>) {
        let Value::Object(given) = input else {
            let error = SpecError {
                field: "(spec)".into(),
                message: format!("must be a JSON object, found {}", json_kind(input)),
            };
            return (ClusterSpec::default(), vec![error]);
        };
        let defaults = match serde_json::to_value(ClusterSpec::default()) {
            Ok(Value::Object(map)) => map,
            _ => unreachable!("a struct always serialises to a JSON object"),
        };
        let mut errors = Collector(Vec::new());
        let mut merged = defaults.clone();
        for (key, value) in given {
            if !defaults.contains_key(key) {
                errors.push(key.as_str(), "unknown field");
                continue;
            }
            // Check this one field on its own, over the defaults, so that a type error in one
            // field does not hide the errors in the others.
            let mut single = defaults.clone();
            single.insert(key.clone(), value.clone());
            match serde_json::from_value::<ClusterSpec>(Value::Object(single)) {
                Ok(_) => {
                    merged.insert(key.clone(), value.clone());
                }
                Err(e) => errors.push(key.as_str(), e.to_string()),
            }
        }
        // Each field deserialised alone over the defaults, so together they do too.
        let spec = serde_json::from_value(Value::Object(merged)).unwrap_or_default();
        (spec, errors.0)
    }

    /// Parses a spec from JSON text, as [`ClusterSpec::from_json_value`].
    pub fn from_json(text: &str) -> Result<ClusterSpec, SpecErrors> {
        let value: Value = serde_json::from_str(text).map_err(|e| {
            SpecErrors(vec![SpecError {
                field: "(spec)".into(),
                message: format!("not JSON: {e}"),
            }])
        })?;
        ClusterSpec::from_json_value(&value)
    }

    /// The spec as a JSON value with every field present.
    pub fn to_json_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Checks the spec's own consistency and reports every problem found.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let mut e = Collector(Vec::new());
        e.positive("sleep_interval", self.sleep_interval);
        e.positive("request_timeout", self.request_timeout);
        e.positive("fail_interval", self.fail_interval);
        e.positive("convergence_timeout", self.convergence_timeout);
        e.positive("init_timeout", self.init_timeout);
        e.positive("db_wait_ready_timeout", self.db_wait_ready_timeout);
        e.positive(
            "dead_keeper_removal_interval",
            self.dead_keeper_removal_interval,
        );
        e.positive("proxy_check_interval", self.proxy_check_interval);
        e.positive("proxy_timeout", self.proxy_timeout);
        if !self.sleep_interval.is_zero() && self.fail_interval <= self.sleep_interval {
            e.push(
                "fail_interval",
                format!(
                    "must be longer than sleep_interval ({}), or one late report fails a keeper",
                    humantime::format_duration(self.sleep_interval)
                ),
            );
        }
        if !self.proxy_check_interval.is_zero() && self.proxy_check_interval >= self.proxy_timeout {
            e.push(
                "proxy_check_interval",
                format!(
                    "must be shorter than proxy_timeout ({})",
                    humantime::format_duration(self.proxy_timeout)
                ),
            );
        }
        if self.max_standbys < 1 {
            e.push("max_standbys", "must be at least 1");
        }
        if self.max_standbys_per_sender < 1 {
            e.push("max_standbys_per_sender", "must be at least 1");
        }
        if self.max_synchronous_standbys < 1 {
            e.push("max_synchronous_standbys", "must be at least 1");
        }
        if self.min_synchronous_standbys > self.max_synchronous_standbys {
            e.push(
                "min_synchronous_standbys",
                format!(
                    "must not exceed max_synchronous_standbys ({})",
                    self.max_synchronous_standbys
                ),
            );
        }
        let mut seen = BTreeSet::new();
        for (i, slot) in self.additional_master_replication_slots.iter().enumerate() {
            let field = format!("additional_master_replication_slots[{i}]");
            if slot.is_empty()
                || slot.len() > 63
                || !slot
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
            {
                e.push(
                    field,
                    format!("{slot:?} must be 1-63 characters of a-z, 0-9 and _ (a slot name)"),
                );
            } else if slot.starts_with(MANAGED_SLOT_PREFIX) {
                e.push(field, format!("{slot:?} uses the prefix {MANAGED_SLOT_PREFIX:?} reserved for tendril's own slots"));
            } else if !seen.insert(slot) {
                e.push(field, format!("{slot:?} is listed twice"));
            }
        }
        for (name, value) in &self.pg_parameters {
            let field = format!("pg_parameters.{name}");
            let valid_name = name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !valid_name {
                e.push(field, "is not a valid PostgreSQL parameter name");
            } else if [MANAGED_PG_PARAMETERS, RECOVERY_ENDING_PARAMETERS]
                .concat()
                .contains(&name.to_ascii_lowercase().as_str())
            {
                e.push(
                    field,
                    "is managed by the keeper and cannot be set in the spec",
                );
            } else if value.contains(['\n', '\r', '\0']) {
                e.push(field, "must not contain a line break or NUL");
            }
        }
        if let Some(lines) = &self.pg_hba {
            for (i, line) in lines.iter().enumerate() {
                if line.contains(['\n', '\r', '\0']) {
                    e.push(format!("pg_hba[{i}]"), "must be a single line");
                }
            }
        }
        match self.init_mode {
            // A new standby cluster clones its external primary (pg_basebackup).
            InitMode::New => {}
            InitMode::Existing => match &self.existing_config {
                Some(c) if !c.keeper_uid.is_empty() => {}
                _ => e.push(
                    "existing_config.keeper_uid",
                    "is required when init_mode is existing",
                ),
            },
            InitMode::Pitr => match &self.pitr_config {
                Some(c) => {
                    if c.data_restore_command.trim().is_empty() {
                        e.push(
                            "pitr_config.data_restore_command",
                            "is required when init_mode is pitr",
                        );
                    }
                    if let Some(t) = &c.recovery_target_settings {
                        let targets = t.targets();
                        if targets.len() > 1 {
                            e.push(
                                "pitr_config.recovery_target_settings",
                                format!("sets {}: PostgreSQL takes one target", targets.join(", ")),
                            );
                        }
                        if t.recovery_target
                            .as_deref()
                            .is_some_and(|v| v != "immediate")
                        {
                            e.push(
                                "pitr_config.recovery_target_settings.recovery_target",
                                "can only be immediate",
                            );
                        }
                        if let Some(v) = &t.recovery_target_inclusive
                            && !["true", "false", "on", "off"].contains(&v.as_str())
                        {
                            e.push(
                                "pitr_config.recovery_target_settings.recovery_target_inclusive",
                                "must be true or false",
                            );
                        }
                    }
                    if self.role == ClusterRole::Standby && c.recovery_target_settings.is_some() {
                        e.push(
                            "pitr_config.recovery_target_settings",
                            "cannot be used by a standby cluster, which never ends recovery",
                        );
                    }
                }
                None => e.push(
                    "pitr_config.data_restore_command",
                    "is required when init_mode is pitr",
                ),
            },
        }
        if self
            .archive_recovery_settings
            .as_ref()
            .is_some_and(|a| a.restore_command.trim().is_empty())
        {
            e.push(
                "archive_recovery_settings.restore_command",
                "must not be empty",
            );
        }
        if let Some(b) = &self.standby_bootstrap {
            if b.command.trim().is_empty() {
                e.push("standby_bootstrap.command", "must not be empty");
            }
            if self.archive_recovery_settings.is_none() {
                e.push(
                    "standby_bootstrap",
                    "needs archive_recovery_settings: a standby restored from a backup \
                     catches up from the archive",
                );
            }
        }
        if let Some(tls) = &self.replication_tls {
            for (field, message) in tls.problems() {
                e.push(field, message);
            }
        }
        if let Some(settings) = self
            .standby_config
            .as_ref()
            .and_then(|c| c.standby_settings.as_ref())
        {
            for (field, message) in settings.problems() {
                e.push(format!("standby_config.standby_settings.{field}"), message);
            }
        } else if self.role == ClusterRole::Standby {
            e.push(
                "standby_config.standby_settings.primary_host",
                "is required when role is standby",
            );
        }
        if let Some(a) = self
            .standby_config
            .as_ref()
            .and_then(|c| c.archive_recovery_settings.as_ref())
            && a.restore_command.trim().is_empty()
        {
            e.push(
                "standby_config.archive_recovery_settings.restore_command",
                "must not be empty",
            );
        }
        if e.0.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(e.0))
        }
    }

    /// Checks that `new` may replace `self` in a running cluster: fields fixed at
    /// initialisation stay fixed. Reports every problem, including `new`'s own.
    pub fn validate_update(&self, new: &ClusterSpec) -> Result<(), SpecErrors> {
        let mut errors = match new.validate() {
            Ok(()) => Vec::new(),
            Err(SpecErrors(errors)) => errors,
        };
        if new.init_mode != self.init_mode {
            errors.push(SpecError {
                field: "init_mode".into(),
                message: format!(
                    "cannot change after init (is {}, asked {})",
                    self.init_mode.as_str(),
                    new.init_mode.as_str()
                ),
            });
        }
        if self.role == ClusterRole::Master && new.role == ClusterRole::Standby {
            errors.push(SpecError {
                field: "role".into(),
                message: "a master cluster cannot become a standby cluster".into(),
            });
        }
        // A spec written without `role` (a file copied from the primary site, a patch
        // resetting it) must not make a standby cluster writable behind the operator's back.
        if self.role == ClusterRole::Standby && new.role == ClusterRole::Master {
            errors.push(SpecError {
                field: "role".into(),
                message: "a standby cluster becomes a master cluster only with \
                          `tendrilctl promote`"
                    .into(),
            });
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors(errors))
        }
    }
}

impl InitMode {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            InitMode::New => "new",
            InitMode::Existing => "existing",
            InitMode::Pitr => "pitr",
        }
    }
}

/// Adds the semantic errors of `spec` (except on fields already reported) to `errors`.
fn finish(
    spec: ClusterSpec,
    mut errors: Vec<SpecError>,
    check: impl FnOnce(&ClusterSpec) -> Result<(), SpecErrors>,
) -> Result<ClusterSpec, SpecErrors> {
    if let Err(SpecErrors(semantic)) = check(&spec) {
        for e in semantic {
            if !errors.iter().any(|seen| seen.field == e.field) {
                errors.push(e);
            }
        }
    }
    if errors.is_empty() {
        Ok(spec)
    } else {
        Err(SpecErrors(errors))
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors_of(input: Value) -> SpecErrors {
        ClusterSpec::from_json_value(&input).expect_err("spec should be rejected")
    }

    #[test]
    fn empty_object_gives_the_defaults() {
        let spec = ClusterSpec::from_json_value(&json!({})).unwrap();
        assert_eq!(spec, ClusterSpec::default());
        assert_eq!(spec.sleep_interval, Duration::from_secs(1));
        assert_eq!(spec.fail_interval, Duration::from_secs(5));
        assert_eq!(spec.proxy_timeout, Duration::from_secs(5));
        assert_eq!(spec.max_standby_lag, 1_048_576);
        assert_eq!(spec.init_mode, InitMode::New);
        assert!(spec.pg_hba.is_none());
    }

    #[test]
    fn durations_are_human_readable() {
        let json = ClusterSpec::default().to_json_value();
        assert_eq!(json["sleep_interval"], "1s");
        assert_eq!(json["init_timeout"], "5m");
        assert_eq!(json["dead_keeper_removal_interval"], "2days");
        let spec = ClusterSpec::from_json_value(
            &json!({"fail_interval": "1m 30s", "sleep_interval": "500ms"}),
        )
        .unwrap();
        assert_eq!(spec.fail_interval, Duration::from_secs(90));
        assert_eq!(spec.sleep_interval, Duration::from_millis(500));
    }

    #[test]
    fn round_trips_through_json() {
        let mut spec = ClusterSpec {
            synchronous_replication: true,
            min_synchronous_standbys: 2,
            max_synchronous_standbys: 3,
            additional_master_replication_slots: vec!["backup_1".into()],
            pg_hba: Some(vec!["host all all 10.0.0.0/8 scram-sha-256".into()]),
            new_config: Some(NewConfig {
                locale: Some("C".into()),
                encoding: Some("UTF8".into()),
                data_checksums: true,
            }),
            ..ClusterSpec::default()
        };
        spec.pg_parameters
            .insert("shared_buffers".into(), "256MB".into());
        let text = serde_json::to_string(&spec).unwrap();
        assert_eq!(ClusterSpec::from_json(&text).unwrap(), spec);
        let value = spec.to_json_value();
        assert_eq!(ClusterSpec::from_json_value(&value).unwrap(), spec);
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let errors = errors_of(json!({
            "sleep_interval": "soon",
            "max_standbys": -1,
            "synchronous_replication": "yes",
            "no_such_field": 1,
        }));
        assert_eq!(errors.0.len(), 4, "{errors}");
        for field in [
            "sleep_interval",
            "max_standbys",
            "synchronous_replication",
            "no_such_field",
        ] {
            assert!(errors.mentions(field), "{field} missing from {errors}");
        }
        let text = errors.to_string();
        assert!(
            text.starts_with("invalid cluster spec (4 errors)"),
            "{text}"
        );
    }

    #[test]
    fn type_and_semantic_errors_are_reported_together() {
        let errors = errors_of(json!({"sleep_interval": "never", "max_standbys": 0, "x": 1}));
        for field in ["sleep_interval", "max_standbys", "x"] {
            assert!(errors.mentions(field), "{field} missing from {errors}");
        }
        let current = ClusterSpec::default();
        let errors = current
            .update_from_json_value(&json!({"init_mode": "existing", "bogus": 1}))
            .unwrap_err();
        for field in ["init_mode", "existing_config.keeper_uid", "bogus"] {
            assert!(errors.mentions(field), "{field} missing from {errors}");
        }
    }

    #[test]
    fn semantic_errors_are_reported_together() {
        let errors = errors_of(json!({
            "sleep_interval": "0s",
            "proxy_check_interval": "10s",
            "proxy_timeout": "5s",
            "max_standbys": 0,
            "max_standbys_per_sender": 0,
            "min_synchronous_standbys": 3,
            "max_synchronous_standbys": 2,
        }));
        for field in [
            "sleep_interval",
            "proxy_check_interval",
            "max_standbys",
            "max_standbys_per_sender",
            "min_synchronous_standbys",
        ] {
            assert!(errors.mentions(field), "{field} missing from {errors}");
        }
    }

    #[test]
    fn rejects_each_invalid_value() {
        let cases: Vec<(Value, &str)> = vec![
            (json!("text"), "(spec)"),
            (json!({"request_timeout": "0s"}), "request_timeout"),
            (json!({"fail_interval": "0s"}), "fail_interval"),
            (json!({"fail_interval": "1s"}), "fail_interval"),
            (json!({"convergence_timeout": "0s"}), "convergence_timeout"),
            (json!({"init_timeout": "0s"}), "init_timeout"),
            (
                json!({"db_wait_ready_timeout": "0s"}),
                "db_wait_ready_timeout",
            ),
            (
                json!({"dead_keeper_removal_interval": "0s"}),
                "dead_keeper_removal_interval",
            ),
            (
                json!({"proxy_check_interval": "0s"}),
                "proxy_check_interval",
            ),
            (json!({"proxy_timeout": "0s"}), "proxy_timeout"),
            (
                json!({"max_synchronous_standbys": 0, "min_synchronous_standbys": 0}),
                "max_synchronous_standbys",
            ),
            (
                json!({"additional_master_replication_slots": ["Bad-Name"]}),
                "additional_master_replication_slots[0]",
            ),
            (
                json!({"additional_master_replication_slots": [""]}),
                "additional_master_replication_slots[0]",
            ),
            (
                json!({"additional_master_replication_slots": ["tendril_x"]}),
                "additional_master_replication_slots[0]",
            ),
            (
                json!({"additional_master_replication_slots": ["a", "a"]}),
                "additional_master_replication_slots[1]",
            ),
            (
                json!({"pg_parameters": {"bad name": "1"}}),
                "pg_parameters.bad name",
            ),
            (
                json!({"pg_parameters": {"port": "6543"}}),
                "pg_parameters.port",
            ),
            (
                json!({"pg_parameters": {"work_mem": "4MB\nport = 1"}}),
                "pg_parameters.work_mem",
            ),
            (json!({"pg_parameters": {"work_mem": 4}}), "pg_parameters"),
            (
                json!({"pg_hba": ["host all all 0.0.0.0/0 trust\nlocal all all trust"]}),
                "pg_hba[0]",
            ),
            (json!({"init_mode": "clone"}), "init_mode"),
            (
                json!({"init_mode": "existing"}),
                "existing_config.keeper_uid",
            ),
            (
                json!({"init_mode": "existing", "existing_config": {"keeper_uid": ""}}),
                "existing_config.keeper_uid",
            ),
            (
                json!({"init_mode": "pitr"}),
                "pitr_config.data_restore_command",
            ),
            (
                json!({"init_mode": "pitr", "pitr_config": {"data_restore_command": " "}}),
                "pitr_config.data_restore_command",
            ),
            (
                json!({"role": "standby", "init_mode": "pitr", "pitr_config": {"data_restore_command": "cp"}}),
                "standby_config.standby_settings.primary_host",
            ),
            (
                json!({"role": "standby", "standby_config": {"standby_settings": {"primary_conninfo": "port=5432 sslmode=require"}}}),
                "standby_config.standby_settings.primary_host",
            ),
            (
                json!({"role": "standby", "standby_config": {"standby_settings": {"primary_host": "a", "primary_conninfo": "sslrootcert=/x password = 'it''s'"}}}),
                "standby_config.standby_settings.primary_conninfo",
            ),
            (
                json!({"role": "standby", "standby_config": {"standby_settings": {"primary_host": "a", "password_file": "pw"}}}),
                "standby_config.standby_settings.password_file",
            ),
            (
                json!({"role": "standby", "standby_config": {"standby_settings": {"primary_host": "a", "sslmode": "on"}}}),
                "standby_config.standby_settings.sslmode",
            ),
            (
                json!({"role": "standby", "standby_config": {"standby_settings": {"primary_host": "a", "primary_conninfo": "user=repl"}}}),
                "standby_config.standby_settings.primary_conninfo",
            ),
            (
                json!({"role": "standby", "standby_config": {"standby_settings": {"primary_host": "a\nb"}}}),
                "standby_config.standby_settings.primary_host",
            ),
            (
                json!({"role": "standby", "standby_config": {"standby_settings": {"primary_host": "a", "primary_slot_name": "Site-B"}}}),
                "standby_config.standby_settings.primary_slot_name",
            ),
            (
                json!({"pg_parameters": {"recovery_target_action": "promote"}}),
                "pg_parameters.recovery_target_action",
            ),
            (
                json!({"role": "standby", "standby_config": {"standby_settings": {"primary_host": "a"}, "archive_recovery_settings": {"restore_command": " "}}}),
                "standby_config.archive_recovery_settings.restore_command",
            ),
            (
                json!({"role": "standby", "init_mode": "pitr", "standby_config": {"standby_settings": {"primary_conninfo": "host=x"}}, "pitr_config": {"data_restore_command": "cp", "recovery_target_settings": {"recovery_target": "immediate"}}}),
                "pitr_config.recovery_target_settings",
            ),
            (
                json!({"init_mode": "pitr", "pitr_config": {"data_restore_command": "cp", "recovery_target_settings": {"recovery_target_name": "a", "recovery_target_lsn": "0/1"}}}),
                "pitr_config.recovery_target_settings",
            ),
            (
                json!({"init_mode": "pitr", "pitr_config": {"data_restore_command": "cp", "recovery_target_settings": {"recovery_target": "latest"}}}),
                "pitr_config.recovery_target_settings.recovery_target",
            ),
            (
                json!({"init_mode": "pitr", "pitr_config": {"data_restore_command": "cp", "recovery_target_settings": {"recovery_target_inclusive": "yes"}}}),
                "pitr_config.recovery_target_settings.recovery_target_inclusive",
            ),
            (
                json!({"standby_bootstrap": {"command": "restore %d"}}),
                "standby_bootstrap",
            ),
            (
                json!({"archive_recovery_settings": {"restore_command": ""}}),
                "archive_recovery_settings.restore_command",
            ),
            (json!({"role": "leader"}), "role"),
            (
                json!({"default_su_repl_access_mode": "some"}),
                "default_su_repl_access_mode",
            ),
            (
                json!({"new_config": {"locale": "C", "checksums": true}}),
                "new_config",
            ),
            (json!({"max_standby_lag": "1MB"}), "max_standby_lag"),
        ];
        for (input, field) in cases {
            let errors = errors_of(input.clone());
            assert!(
                errors.mentions(field),
                "{input}: expected an error on {field}, got {errors}"
            );
        }
    }

    #[test]
    fn reads_conninfo_keywords() {
        assert_eq!(
            conninfo_keywords("host=a  Port = 5 password='x y\\' z' sslmode=require"),
            ["host", "port", "password", "sslmode"]
        );
        assert_eq!(conninfo_keywords(""), Vec::<String>::new());
        assert_eq!(conninfo_keywords("junk host=b"), ["host"]);
        assert_eq!(conninfo_keywords("a='unterminated"), ["a"]);
    }

    #[test]
    fn accepts_valid_non_default_modes() {
        let existing = json!({"init_mode": "existing", "existing_config": {"keeper_uid": "k1"}});
        assert!(ClusterSpec::from_json_value(&existing).is_ok());
        let standby = json!({
            "role": "standby",
            "init_mode": "pitr",
            "pitr_config": {"data_restore_command": "cp -a /backup/. %d"},
            "standby_config": {"standby_settings": {"primary_conninfo": "host=remote"}},
        });
        assert!(ClusterSpec::from_json_value(&standby).is_ok());
        // A new standby cluster clones its external primary.
        let cloned = json!({
            "role": "standby",
            "standby_config": {"standby_settings": {
                "primary_host": "site-a.example", "primary_port": 5432, "user": "repl",
                "password_file": "/etc/tendril/site-a.pw", "sslmode": "verify-full",
                "primary_conninfo": "sslrootcert='/etc/ssl/site a.pem'",
                "primary_slot_name": "site_b", "recovery_min_apply_delay": "5min"}},
        });
        assert!(ClusterSpec::from_json_value(&cloned).is_ok());
        let zero_min = json!({"synchronous_replication": true, "min_synchronous_standbys": 0});
        assert!(ClusterSpec::from_json_value(&zero_min).is_ok());
    }

    #[test]
    fn update_keeps_init_mode_and_master_role() {
        let old = ClusterSpec::default();
        let mut new = old.clone();
        new.init_mode = InitMode::Existing;
        new.existing_config = Some(ExistingConfig {
            keeper_uid: "k".into(),
        });
        new.role = ClusterRole::Standby;
        new.max_standbys = 0;
        let errors = old.validate_update(&new).unwrap_err();
        assert!(errors.mentions("init_mode"), "{errors}");
        assert!(errors.mentions("role"), "{errors}");
        assert!(errors.mentions("max_standbys"), "{errors}");

        let mut fine = old.clone();
        fine.synchronous_replication = true;
        assert!(old.validate_update(&fine).is_ok());

        // A standby cluster's spec replaced without its role does not promote it.
        let standby = ClusterSpec::from_json_value(&json!({
            "role": "standby",
            "standby_config": {"standby_settings": {"primary_host": "a"}},
        }))
        .unwrap();
        let mut dropped_role = standby.clone();
        dropped_role.role = ClusterRole::Master;
        let errors = standby.validate_update(&dropped_role).unwrap_err();
        assert!(
            errors.to_string().contains("tendrilctl promote"),
            "{errors}"
        );
    }
}
