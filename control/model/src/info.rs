//! What each component reports about itself, under its own leased key.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::codec::{Document, FORMAT_VERSION};
use crate::{Generation, Lsn, TimelineHistoryEntry};

/// A PostgreSQL major and minor version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PgVersion {
    /// Major version (15).
    pub major: u32,
    /// Minor version (18).
    pub minor: u32,
}

/// A keeper's report, at `/tendril/<cluster>/keepers/<uid>` under the keeper's lease.
///
/// Published every `sleep_interval` and at once on any PostgreSQL state change. `info_uid`
/// changes on every publish, so the sentinel can tell a fresh report from a stale one without
/// trusting clocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeeperInfo {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Random per publish.
    pub info_uid: String,
    /// The keeper's uid.
    pub uid: String,
    /// The cluster incarnation it belongs to.
    pub cluster_uid: String,
    /// Random per keeper process start.
    pub boot_uuid: String,
    /// PostgreSQL binary version.
    #[serde(default)]
    pub pg_binary_version: Option<PgVersion>,
    /// The state of its PostgreSQL, when it has a data directory.
    #[serde(default)]
    pub postgres_state: Option<PostgresState>,
    /// `--can-be-master`.
    #[serde(default = "yes")]
    pub can_be_master: bool,
    /// `--can-be-synchronous-replica`.
    #[serde(default = "yes")]
    pub can_be_synchronous_replica: bool,
    /// `--priority`.
    #[serde(default)]
    pub priority: i32,
    /// The error of the keeper's last loop, if it failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// How many times postgres crashed and was restarted since the keeper started.
    #[serde(default)]
    pub pg_crashes: u64,
    /// The last crash: when, and how postgres exited.
    #[serde(default)]
    pub last_pg_crash: Option<String>,
    /// The last self-fence of this keeper's master: when, for how long, and why.
    #[serde(default)]
    pub last_fence: Option<String>,
}

fn yes() -> bool {
    true
}

impl Document for KeeperInfo {
    const KIND: &'static str = "keeper info";
}

/// The state of one PostgreSQL instance as its keeper observed it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PostgresState {
    /// The database uid the data directory holds.
    pub uid: String,
    /// The database spec generation the keeper has fully applied.
    pub generation: Generation,
    /// Advertised address.
    pub listen_address: String,
    /// Advertised port.
    pub port: u16,
    /// The postmaster process runs.
    pub running: bool,
    /// Running, answering queries, and every probe below succeeded.
    pub healthy: bool,
    /// In recovery (a standby) or not.
    pub in_recovery: bool,
    /// Database system identifier, as text.
    pub system_id: String,
    /// Current timeline.
    pub timeline_id: u32,
    /// Current WAL position (flush on a master, replay on a standby).
    pub xlog_pos: Lsn,
    /// WAL flushed to disk (masters).
    pub flush_lsn: Option<Lsn>,
    /// Last WAL position received from the master (standbys).
    pub receive_lsn: Option<Lsn>,
    /// Last WAL position replayed (standbys).
    pub replay_lsn: Option<Lsn>,
    /// A standby's WAL receiver is streaming from its upstream.
    pub streaming: bool,
    /// With postgres stopped: the last checkpoint, the end of what it wrote.
    pub checkpoint_lsn: Option<Lsn>,
    /// The last entries of the timeline history.
    pub timelines_history: Vec<TimelineHistoryEntry>,
    /// Parameters in effect, excluding the ones the keeper manages.
    pub pg_parameters: BTreeMap<String, String>,
    /// Standbys (database uids) PostgreSQL reports as `sync`.
    pub synchronous_standbys: Vec<String>,
    /// Oldest WAL segment file in `pg_wal`.
    pub older_wal_file: Option<String>,
    /// A changed parameter waits for a restart the spec does not allow automatically.
    pub pending_restart: bool,
    /// WAL archiving, where this instance archives (`archive_mode` on a master, or
    /// `always`).
    pub archiver: Option<ArchiverState>,
}

/// WAL archiving as PostgreSQL's `pg_stat_archiver` shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ArchiverState {
    /// WAL files archived since the statistics were reset.
    pub archived_count: u64,
    /// The last one archived.
    pub last_archived_wal: Option<String>,
    /// When (PostgreSQL's text form).
    pub last_archived_time: Option<String>,
    /// Failed attempts since the statistics were reset.
    pub failed_count: u64,
    /// The WAL file of the last failure.
    pub last_failed_wal: Option<String>,
    /// When it failed.
    pub last_failed_time: Option<String>,
}

impl ArchiverState {
    /// Whether the last attempt failed: a failure after the last success.
    pub fn failing(&self) -> bool {
        match (&self.last_failed_time, &self.last_archived_time) {
            (Some(failed), Some(archived)) => failed > archived,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// One line for `tendrilctl status`.
    pub fn summary(&self) -> String {
        let last = match (&self.last_archived_wal, &self.last_archived_time) {
            (Some(wal), Some(at)) => format!("last {wal} at {at}"),
            _ => "nothing archived yet".into(),
        };
        let failures = match (&self.last_failed_wal, &self.last_failed_time) {
            (Some(wal), Some(at)) if self.failing() => {
                format!(
                    "FAILING since {at} on {wal}, {} failures",
                    self.failed_count
                )
            }
            _ => format!("{} failures", self.failed_count),
        };
        format!(
            "archiving: {} WAL files archived, {last}; {failures}",
            self.archived_count
        )
    }
}

/// A proxy's report, at `/tendril/<cluster>/proxies/<uid>` under the proxy's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Random per proxy start unless given with `--uid`.
    pub uid: String,
    /// The proxy-section generation it has applied: every connection to a master it no longer
    /// routes to is closed.
    pub generation: Generation,
    /// Its lease TTL; the sentinel waits at most this long for an acknowledgement.
    #[serde(with = "humantime_serde")]
    pub proxy_timeout: Duration,
    /// The address it listens on for clients (absent from older proxies' reports).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<String>,
    /// Its read-only listener's address, when it runs one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_only_listen: Option<String>,
}

impl Document for ProxyInfo {
    const KIND: &'static str = "proxy info";
}

/// A sentinel's report, at `/tendril/<cluster>/sentinels/<uid>` under the sentinel's lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentinelInfo {
    /// [`FORMAT_VERSION`].
    pub format_version: u32,
    /// Random per sentinel start.
    pub uid: String,
}

impl Document for SentinelInfo {
    const KIND: &'static str = "sentinel info";
}

impl SentinelInfo {
    /// A report for `uid` in the current format.
    pub fn new(uid: impl Into<String>) -> SentinelInfo {
        SentinelInfo {
            format_version: FORMAT_VERSION,
            uid: uid.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{decode, encode};

    #[test]
    fn keeper_info_round_trips() {
        let info = KeeperInfo {
            format_version: FORMAT_VERSION,
            info_uid: "i1".into(),
            uid: "k1".into(),
            cluster_uid: "c1".into(),
            boot_uuid: "b1".into(),
            pg_binary_version: Some(PgVersion {
                major: 15,
                minor: 18,
            }),
            postgres_state: Some(PostgresState {
                uid: "db1".into(),
                generation: Generation(3),
                listen_address: "127.0.0.1".into(),
                port: 5433,
                healthy: true,
                system_id: "7312345678901234567".into(),
                timeline_id: 1,
                xlog_pos: Lsn(0x3000060),
                synchronous_standbys: vec!["db2".into()],
                ..PostgresState::default()
            }),
            can_be_master: false,
            can_be_synchronous_replica: true,
            priority: -1,
            last_error: Some("pg_basebackup failed".into()),
            pg_crashes: 2,
            last_pg_crash: None,
            last_fence: None,
        };
        assert_eq!(decode::<KeeperInfo>(&encode(&info)).unwrap(), info);
    }

    #[test]
    fn keeper_info_defaults_capabilities_to_allowed() {
        let info: KeeperInfo = decode(
            br#"{"format_version":1,"info_uid":"i","uid":"k","cluster_uid":"c","boot_uuid":"b"}"#,
        )
        .unwrap();
        assert!(info.can_be_master && info.can_be_synchronous_replica);
        assert!(info.postgres_state.is_none());
    }

    #[test]
    fn proxy_and_sentinel_info_round_trip() {
        let proxy = ProxyInfo {
            format_version: FORMAT_VERSION,
            uid: "p1".into(),
            generation: Generation(9),
            proxy_timeout: Duration::from_secs(5),
            listen: Some("127.0.0.1:25432".into()),
            read_only_listen: None,
        };
        let text = String::from_utf8(encode(&proxy)).unwrap();
        assert!(text.contains(r#""proxy_timeout":"5s""#), "{text}");
        assert_eq!(decode::<ProxyInfo>(text.as_bytes()).unwrap(), proxy);
        let sentinel = SentinelInfo::new("s1");
        assert_eq!(
            decode::<SentinelInfo>(&encode(&sentinel)).unwrap(),
            sentinel
        );
    }
}
