//! What the keeper asks PostgreSQL: its state for the report, roles, replication slots.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tendril_control_model::{Lsn, TimelineHistoryEntry};
use tokio_postgres::Client;

use crate::KeeperError;
use crate::pgconf::{MANAGED_PREFIX, is_managed};

/// A server error's message and detail, or the client error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

fn sql(e: tokio_postgres::Error) -> KeeperError {
    KeeperError::Sql(describe(&e))
}

/// One observation of a running instance.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Probe {
    /// In recovery (a standby).
    pub in_recovery: bool,
    /// Database system identifier.
    pub system_id: String,
    /// Current timeline.
    pub timeline: u32,
    /// Flushed WAL position (master).
    pub flush_lsn: Option<Lsn>,
    /// Received WAL position (standby).
    pub receive_lsn: Option<Lsn>,
    /// Replayed WAL position (standby).
    pub replay_lsn: Option<Lsn>,
    /// Parameters set in the configuration file, except the managed ones.
    pub parameters: BTreeMap<String, String>,
    /// Standby application names PostgreSQL reports as `sync`.
    pub sync_standbys: BTreeSet<String>,
    /// A changed parameter needs a restart.
    pub pending_restart: bool,
    /// A standby's WAL receiver is streaming.
    pub streaming: bool,
    /// Replication slots on this instance.
    pub replication_slots: u64,
    /// WAL archiving, where this instance archives.
    pub archiver: Option<tendril_control_model::ArchiverState>,
}

impl Probe {
    /// The position used to compare databases: flushed on a master; on a standby, whatever it
    /// has received or replayed, whichever is further (both survive a promotion).
    pub fn xlog_pos(&self) -> Lsn {
        if self.in_recovery {
            self.receive_lsn.max(self.replay_lsn).unwrap_or_default()
        } else {
            self.flush_lsn.unwrap_or_default()
        }
    }
}

fn lsn(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

/// Runs `query` within `limit`. A PostgreSQL that stops answering (stopped, hung, its host
/// frozen) must fail the keeper's pass rather than hang it: the keeper's last report would
/// go on saying healthy meanwhile (it is written again as it is), so a hung standby would
/// keep taking reads and a hung master would never be failed over.
pub async fn within<T>(
    limit: std::time::Duration,
    what: &str,
    query: impl std::future::Future<Output = Result<T, KeeperError>>,
) -> Result<T, KeeperError> {
    tokio::time::timeout(limit, query)
        .await
        .map_err(|_| KeeperError::Sql(format!("{what}: no answer within {limit:?}")))?
}

/// Observes a running instance.
pub async fn probe(client: &Client) -> Result<Probe, KeeperError> {
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), (SELECT system_identifier::text FROM pg_control_system()), \
                    (SELECT count(*) FROM pg_settings WHERE pending_restart)::int, \
                    (SELECT count(*) FROM pg_replication_slots)::int",
            &[],
        )
        .await
        .map_err(sql)?;
    let in_recovery: bool = row.get(0);
    let mut p = Probe {
        in_recovery,
        system_id: row.get(1),
        pending_restart: row.get::<_, i32>(2) > 0,
        replication_slots: u64::try_from(row.get::<_, i32>(3)).unwrap_or(0),
        ..Probe::default()
    };
    if in_recovery {
        let row = client
            .query_one(
                "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
                        (SELECT received_tli FROM pg_stat_wal_receiver), \
                        (SELECT timeline_id FROM pg_control_checkpoint()), \
                        coalesce((SELECT status = 'streaming' FROM pg_stat_wal_receiver), false)",
                &[],
            )
            .await
            .map_err(sql)?;
        p.receive_lsn = lsn(row.get(0));
        p.replay_lsn = lsn(row.get(1));
        let received: Option<i32> = row.get(2);
        let checkpoint: i32 = row.get(3);
        p.streaming = row.get(4);
        p.timeline = u32::try_from(received.unwrap_or(checkpoint).max(checkpoint)).unwrap_or(0);
    } else {
        let row = client
            .query_one(
                "SELECT pg_current_wal_flush_lsn()::text, pg_walfile_name(pg_current_wal_lsn())",
                &[],
            )
            .await
            .map_err(sql)?;
        p.flush_lsn = lsn(row.get(0));
        let walfile: String = row.get(1);
        p.timeline = u32::from_str_radix(walfile.get(..8).unwrap_or("0"), 16).unwrap_or(0);
        let rows = client
            .query(
                "SELECT application_name FROM pg_stat_replication WHERE sync_state = 'sync'",
                &[],
            )
            .await
            .map_err(sql)?;
        p.sync_standbys = rows.iter().map(|r| r.get::<_, String>(0)).collect();
    }
    p.archiver = archiver(client, in_recovery).await?;
    let rows = client
        .query(
            "SELECT name, setting FROM pg_file_settings WHERE error IS NULL AND setting IS NOT NULL",
            &[],
        )
        .await
        .map_err(sql)?;
    for row in rows {
        let name: String = row.get(0);
        if !is_managed(&name) {
            p.parameters.insert(name, row.get(1));
        }
    }
    Ok(p)
}

/// `pg_stat_archiver`, when this instance archives: `archive_mode` `on` on a master (a
/// standby's archiver does not run then), or `always`.
async fn archiver(
    client: &Client,
    in_recovery: bool,
) -> Result<Option<tendril_control_model::ArchiverState>, KeeperError> {
    let row = client
        .query_one(
            "SELECT current_setting('archive_mode'), archived_count, last_archived_wal, \
                    last_archived_time::text, failed_count, last_failed_wal, \
                    last_failed_time::text FROM pg_stat_archiver",
            &[],
        )
        .await
        .map_err(sql)?;
    let mode: String = row.get(0);
    if mode == "off" || (mode == "on" && in_recovery) {
        return Ok(None);
    }
    let count = |i| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    Ok(Some(tendril_control_model::ArchiverState {
        archived_count: count(1),
        last_archived_wal: row.get(2),
        last_archived_time: row.get(3),
        failed_count: count(4),
        last_failed_wal: row.get(5),
        last_failed_time: row.get(6),
    }))
}

/// Whether the instance is in recovery, and whether that recovery is paused
/// (`pg_get_wal_replay_pause_state`).
pub async fn recovery_state(client: &Client) -> Result<(bool, bool), KeeperError> {
    let row = client
        .query_one(
            // CASE: the function errors out of recovery, and AND does not order evaluation.
            "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() \
                    THEN pg_get_wal_replay_pause_state() <> 'not paused' ELSE false END",
            &[],
        )
        .await
        .map_err(sql)?;
    Ok((row.get(0), row.get(1)))
}

/// Whether the instance accepts writes.
pub async fn is_writable(client: &Client) -> Result<bool, KeeperError> {
    let row = client
        .query_one("SELECT NOT pg_is_in_recovery()", &[])
        .await
        .map_err(sql)?;
    Ok(row.get(0))
}

/// Promotes a standby and waits (up to 60 s) until it accepts writes.
pub async fn promote(client: &Client) -> Result<(), KeeperError> {
    let row = client
        .query_one("SELECT pg_promote(true, 60)", &[])
        .await
        .map_err(sql)?;
    if !row.get::<_, bool>(0) {
        return Err(KeeperError::Postgres(
            "promotion did not complete within 60 s".into(),
        ));
    }
    Ok(())
}

/// Quotes a string literal for SQL (standard_conforming_strings is on in PostgreSQL 15).
fn literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// Quotes an identifier for SQL.
fn ident(value: &str) -> String {
    format!("\"{}\"", value.replace('"', "\"\""))
}

/// Creates the replication role (or gives the superuser replication rights when they are the
/// same role). Statements are not logged: they carry a password.
pub async fn setup_roles(
    client: &Client,
    su: &str,
    repl: &str,
    repl_password: &str,
) -> Result<(), KeeperError> {
    let statement = if su == repl {
        format!("ALTER ROLE {} WITH LOGIN REPLICATION", ident(su))
    } else {
        let exists = client
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&repl])
            .await
            .map_err(sql)?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        format!(
            "{verb} ROLE {} WITH LOGIN REPLICATION PASSWORD {}",
            ident(repl),
            literal(repl_password)
        )
    };
    // Not logged (a password), and not waiting for synchronous standbys that may not exist
    // yet: the master is being set up.
    let batch = format!(
        "BEGIN; SET LOCAL log_statement = 'none'; SET LOCAL synchronous_commit = 'local'; {statement}; COMMIT;"
    );
    client.batch_execute(&batch).await.map_err(sql)
}

/// Gives the superuser this cluster's password, creating the role if the data lacks it: data
/// restored from another cluster's backup carries that cluster's roles and passwords.
pub async fn setup_superuser(client: &Client, su: &str, password: &str) -> Result<(), KeeperError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&su])
        .await
        .map_err(sql)?
        .is_some();
    let verb = if exists { "ALTER" } else { "CREATE" };
    let batch = format!(
        "BEGIN; SET LOCAL log_statement = 'none'; SET LOCAL synchronous_commit = 'local'; \
         {verb} ROLE {} WITH SUPERUSER LOGIN PASSWORD {}; COMMIT;",
        ident(su),
        literal(password)
    );
    client.batch_execute(&batch).await.map_err(sql)
}

/// Makes the physical slots managed by tendril exactly `wanted_managed` and creates the
/// additional ones; slots without the prefix that are not listed are left alone. Returns what
/// changed.
pub async fn reconcile_slots(
    client: &Client,
    wanted_managed: &BTreeSet<String>,
    additional: &BTreeSet<String>,
) -> Result<Vec<String>, KeeperError> {
    let rows = client
        .query(
            "SELECT slot_name::text, active, coalesce(wal_status = 'lost', false) \
             FROM pg_replication_slots WHERE slot_type = 'physical' AND NOT temporary",
            &[],
        )
        .await
        .map_err(sql)?;
    let mut existing: BTreeMap<String, bool> = rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, bool>(1)))
        .collect();
    let mut changes = Vec::new();
    // A slot that lost WAL it should have kept (max_slot_wal_keep_size) can never be
    // streamed from again: the standby catches up from the archive (restore_command) and
    // then streams through a new slot.
    for row in &rows {
        let (name, active, lost): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if lost && !active && wanted_managed.contains(&name) {
            match client
                .execute("SELECT pg_drop_replication_slot($1)", &[&name])
                .await
            {
                Ok(_) => {
                    changes.push(format!("dropped slot {name}, which lost WAL"));
                    existing.remove(&name);
                }
                Err(e) => tracing::warn!(slot = %name, error = %describe(&e), "cannot drop slot"),
            }
        }
    }
    for (name, active) in &existing {
        if name.starts_with(MANAGED_PREFIX) && !wanted_managed.contains(name) {
            if *active {
                // A standby still streams from it; it goes once the standby disconnects.
                continue;
            }
            match client
                .execute("SELECT pg_drop_replication_slot($1)", &[name])
                .await
            {
                Ok(_) => changes.push(format!("dropped slot {name}")),
                Err(e) => tracing::warn!(slot = %name, error = %describe(&e), "cannot drop slot"),
            }
        }
    }
    for name in wanted_managed.iter().chain(additional) {
        if !existing.contains_key(name) {
            client
                .execute("SELECT pg_create_physical_replication_slot($1)", &[name])
                .await
                .map_err(sql)?;
            changes.push(format!("created slot {name}"));
        }
    }
    Ok(changes)
}

/// Timeline history from the `.history` files in `pg_wal` (the last `keep` entries of the
/// newest file).
pub fn timeline_history(pgdata: &Path, keep: usize) -> Vec<TimelineHistoryEntry> {
    let Ok(entries) = std::fs::read_dir(pgdata.join("pg_wal")) else {
        return Vec::new();
    };
    let newest = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let tli = u32::from_str_radix(name.strip_suffix(".history")?, 16).ok()?;
            Some((tli, e.path()))
        })
        .max_by_key(|(tli, _)| *tli);
    let Some((_, path)) = newest else {
        return Vec::new();
    };
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all = parse_history(&text);
    all[all.len().saturating_sub(keep)..].to_vec()
}

/// The timeline a standby is on. `reported` comes from the WAL receiver or, when it is not
/// connected (its upstream is gone), from the last restartpoint, which lags a timeline switch
/// until the next restartpoint. The WAL segments in `pg_wal` tell better: a standby that
/// followed a switch received (and recycles into) segments named with the new timeline,
/// while one that forked past the switch point never gets any, even though it may hold the
/// new timeline's history file (fetched when it tried to follow).
pub fn standby_timeline(reported: u32, newest_segment_timeline: Option<u32>) -> u32 {
    reported.max(newest_segment_timeline.unwrap_or(0))
}

/// The highest timeline among the WAL segment files in `pg_wal` (`TTTTTTTTXXXXXXXXYYYYYYYY`,
/// also `.partial`).
pub fn newest_segment_timeline(pgdata: &Path) -> Option<u32> {
    let entries = std::fs::read_dir(pgdata.join("pg_wal")).ok()?;
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let base = name.strip_suffix(".partial").unwrap_or(&name);
            (base.len() == 24 && base.bytes().all(|b| b.is_ascii_hexdigit()))
                .then(|| u32::from_str_radix(&base[..8], 16).ok())
                .flatten()
        })
        .max()
}

/// Removes from `pg_wal` the history files of timelines newer than the newest one this
/// data directory has WAL segments of (a standby fetched them trying to follow a primary it
/// forked from); returns their names.
pub fn remove_unfollowed_histories(pgdata: &Path) -> Vec<String> {
    let newest = newest_segment_timeline(pgdata).unwrap_or(0);
    let Ok(entries) = std::fs::read_dir(pgdata.join("pg_wal")) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let tli = name
            .strip_suffix(".history")
            .and_then(|t| u32::from_str_radix(t, 16).ok());
        if newest > 0 && tli.is_some_and(|t| t > newest) && std::fs::remove_file(e.path()).is_ok() {
            removed.push(name);
        }
    }
    removed
}

/// Parses a timeline history file: `<tli>\t<switch lsn>\t<reason>` per line.
pub fn parse_history(text: &str) -> Vec<TimelineHistoryEntry> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let mut fields = line.splitn(3, char::is_whitespace);
            let timeline_id = fields.next()?.parse().ok()?;
            let switch_point = fields.next()?.trim().parse().ok()?;
            let reason = fields.next().unwrap_or("").trim().to_owned();
            Some(TimelineHistoryEntry {
                timeline_id,
                switch_point,
                reason,
            })
        })
        .collect()
}

/// The oldest WAL segment in `pg_wal`.
pub fn oldest_wal_file(pgdata: &Path) -> Option<String> {
    std::fs::read_dir(pgdata.join("pg_wal"))
        .ok()?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .min()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_standby_on_the_segments_of_a_new_timeline_is_on_it() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(&wal).unwrap();
        assert_eq!(super::newest_segment_timeline(dir.path()), None);
        for f in [
            "000000010000000000000003",
            "000000010000000000000004",
            "00000002.history",
            "archive_status",
        ] {
            std::fs::write(wal.join(f), b"").unwrap();
        }
        // A forked standby may hold the new timeline's history, never its segments.
        assert_eq!(super::newest_segment_timeline(dir.path()), Some(1));
        assert_eq!(super::standby_timeline(1, Some(1)), 1);
        std::fs::write(wal.join("000000020000000000000004.partial"), b"").unwrap();
        assert_eq!(super::newest_segment_timeline(dir.path()), Some(2));
        // Receiver down, restartpoint still on timeline 1: the segments say 2.
        assert_eq!(super::standby_timeline(1, Some(2)), 2);
        assert_eq!(super::standby_timeline(3, Some(2)), 3);
    }

    use super::*;

    #[test]
    fn histories_of_timelines_without_segments_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let wal = dir.path().join("pg_wal");
        std::fs::create_dir_all(&wal).unwrap();
        for f in [
            "000000020000000000000005",
            "00000002.history",
            "00000003.history",
            "0000000A.history",
        ] {
            std::fs::write(wal.join(f), b"").unwrap();
        }
        let mut removed = remove_unfollowed_histories(dir.path());
        removed.sort();
        assert_eq!(removed, ["00000003.history", "0000000A.history"]);
        assert!(wal.join("00000002.history").exists());
        // Without segments nothing is known: nothing is removed.
        std::fs::remove_file(wal.join("000000020000000000000005")).unwrap();
        assert!(remove_unfollowed_histories(dir.path()).is_empty());
    }

    #[test]
    fn parses_history_files() {
        let text =
            "1\t0/3000158\tno recovery target specified\n\n2\t0/5000000\tat restore point \"x\"\n";
        let h = parse_history(text);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].timeline_id, 1);
        assert_eq!(h[0].switch_point, "0/3000158".parse().unwrap());
        assert_eq!(h[1].reason, "at restore point \"x\"");
        assert!(parse_history("garbage\nx\ty\n").is_empty());
    }

    #[test]
    fn quotes_sql() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}
