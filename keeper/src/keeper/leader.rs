//! A standby cluster's leader that cannot follow its external primary: the primary failed
//! over to a standby that had received less WAL than this leader (an asynchronous follower
//! can be ahead of the primary's synchronous standby), so the primary's new timeline forked
//! off before this leader's position and PostgreSQL refuses to follow it. The leader is
//! rewound onto the primary's new timeline (pg_rewind): the cluster keeps its databases, the
//! WAL the primary lost is lost here too, and the sentinel resyncs the leader's standbys
//! after it (their timeline forked too).
//!
//! Nothing is wiped on a guess. A rewind that cannot start (the primary unreachable, no
//! superuser access, no `wal_log_hints`: pg_rewind's dry run fails) leaves the data as it
//! was, PostgreSQL running, and is tried again later. Only a rewind that failed while it
//! rewrote files (the data is then unusable) is followed by a fresh base backup, and a
//! marker file makes a keeper killed meanwhile finish that copy when it starts again.

use std::time::{Duration, Instant};

use tendril_control_model::{ClusterData, Db, FollowConfig, Lsn, TimelineHistoryEntry};
use tendril_control_store::Store;

use super::{ExternalPrimary, Keeper};
use crate::sql::{self, Probe};
use crate::{KeeperError, pgconf};

/// How long a leader may go without streaming before the keeper asks the primary whether
/// it can be followed at all (a primary restarting or failing over is not a fork), and how
/// often it asks again.
const CHECK_AFTER: Duration = Duration::from_secs(5);
/// The longest a question to the primary may take.
const QUERY_LIMIT: Duration = Duration::from_secs(30);
/// How long after a rewind that could not start (or did not help) the next one is tried.
const RETRY_AFTER: Duration = Duration::from_secs(60);
/// In the keeper's data directory while a rewind or the copy after it rewrites the leader's
/// data: found at start, the copy is made (again).
pub(super) const REPAIR_MARKER: &str = "standby-leader-repair";

/// The primary's current timeline (a primary; a standby's answer is an error).
const PRIMARY_TIMELINE: &str =
    "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int";

/// Where this leader's timeline ended in the primary's history, when the leader went past
/// it: it forked and cannot follow. `None` when it can (or cannot tell).
pub fn forked_at(
    local_timeline: u32,
    local_position: Lsn,
    primary_timeline: u32,
    primary_history: &[TimelineHistoryEntry],
) -> Option<Lsn> {
    if local_timeline == 0 || local_timeline >= primary_timeline {
        return None;
    }
    let end = primary_history
        .iter()
        .find(|h| h.timeline_id == local_timeline)?
        .switch_point;
    (local_position > end).then_some(end)
}

impl<S: Store> Keeper<S> {
    /// While the leader streams, nothing. Once it has not for [`CHECK_AFTER`], asks the
    /// external primary (as the superuser: the standby cluster replicates its roles) for
    /// its timeline and history, and rewinds the leader when it forked.
    pub(super) async fn follow_external_primary(
        &mut self,
        cd: &ClusterData,
        db: &Db,
        probe: &Probe,
    ) -> Result<(), KeeperError> {
        if probe.streaming {
            self.leader_stalled = None;
            return Ok(());
        }
        let since = *self.leader_stalled.get_or_insert_with(Instant::now);
        if since.elapsed() < CHECK_AFTER {
            return Ok(());
        }
        self.leader_stalled = Some(Instant::now());
        let Some(FollowConfig::External {
            standby_settings: Some(settings),
            ..
        }) = &db.spec.follow
        else {
            return Ok(());
        };
        let ExternalPrimary { mut pairs, .. } = self.external_primary(db, settings)?;
        let su = &self.config.su;
        for (key, value) in &mut pairs {
            if *key == "user" {
                value.clone_from(&su.user);
            }
        }
        pairs.push(("dbname", "postgres".into()));
        let conninfo = pgconf::conninfo(&pairs, &settings.primary_conninfo);
        let password = su.password.clone();
        let primary_timeline = match self
            .pg
            .query_conninfo(&conninfo, &password, PRIMARY_TIMELINE, QUERY_LIMIT)
            .await
        {
            Ok(out) => out.trim().parse::<u32>().unwrap_or(0),
            Err(e) => {
                tracing::info!(db = %db.uid, error = %e, "the standby leader does not stream, and the external primary cannot be asked why");
                return Ok(());
            }
        };
        let history_file = format!("pg_wal/{:08X}.history", primary_timeline);
        let history = match self
            .pg
            .query_conninfo(
                &conninfo,
                &password,
                &format!("SELECT pg_read_file('{history_file}', 0, 1048576, true)"),
                QUERY_LIMIT,
            )
            .await
        {
            Ok(text) => sql::parse_history(&text),
            Err(e) => {
                tracing::info!(db = %db.uid, error = %e, "cannot read the external primary's timeline history");
                return Ok(());
            }
        };
        let local = sql::standby_timeline(
            probe.timeline,
            sql::newest_segment_timeline(&self.data.pgdata()),
        );
        let Some(end) = forked_at(local, probe.xlog_pos(), primary_timeline, &history) else {
            tracing::info!(db = %db.uid, timeline = local, primary_timeline, "the standby leader does not stream from the external primary");
            return Ok(());
        };
        tracing::warn!(
            db = %db.uid,
            position = %probe.xlog_pos(),
            timeline = local,
            %end,
            primary_timeline,
            "the standby leader went past the end of its timeline on the external primary (it \
             failed over to a standby that had less WAL): rewinding onto timeline {primary_timeline}"
        );
        // Whatever happens next, not again before RETRY_AFTER.
        self.leader_stalled = Some(Instant::now() + RETRY_AFTER - CHECK_AFTER);
        self.pg.stop().await?;
        // pg_rewind copies the source's postgresql.auto.conf; it must be a file.
        let _ = std::fs::remove_file(self.data.pgdata().join("postgresql.auto.conf"));
        if let Err(e) = self.pg.rewind_from(&conninfo, &password, true).await {
            tracing::warn!(db = %db.uid, error = %e, "the rewind cannot start; the leader keeps its data and stays behind (trying again in {RETRY_AFTER:?})");
            self.make_standby(cd, db)?;
            return self.start_leader(db, cd.spec.db_wait_ready_timeout).await;
        }
        let marker = self.data.root().join(REPAIR_MARKER);
        self.pg.write_file(&marker, db.uid.as_bytes())?;
        if let Err(e) = self.pg.rewind_from(&conninfo, &password, false).await {
            tracing::warn!(db = %db.uid, error = %e, "pg_rewind failed while rewriting the data: cloning the external primary again");
            return self.repair_leader(cd, db).await;
        }
        self.make_standby(cd, db)?;
        let _ = std::fs::remove_file(&marker);
        self.pg.start(cd.spec.db_wait_ready_timeout).await?;
        tracing::info!(db = %db.uid, "rewound: following the external primary again");
        Ok(())
    }

    /// Starts a standby leader's PostgreSQL. A leader that forked from its primary holds the
    /// primary's new timeline history (fetched when it tried to follow), and PostgreSQL then
    /// refuses to start ("requested timeline N does not contain minimum recovery point"):
    /// those histories of timelines it has no WAL of are set aside, and it starts on its own
    /// timeline, serving reads until the fork is mended (it fetches them again).
    pub(super) async fn start_leader(
        &mut self,
        db: &Db,
        wait: Duration,
    ) -> Result<(), KeeperError> {
        match self.pg.start(wait).await {
            Err(e)
                if e.to_string()
                    .contains("does not contain minimum recovery point") =>
            {
                let pgdata = self.data.pgdata();
                let removed = sql::remove_unfollowed_histories(&pgdata);
                tracing::warn!(db = %db.uid, ?removed, "the standby leader forked from its primary's timeline: starting it on its own");
                self.pg.start(wait).await
            }
            other => other,
        }
    }

    /// A leader whose data a rewind left unusable (the marker says so): a fresh base backup
    /// of the external primary, the marker removed only once it is done.
    pub(super) async fn repair_leader(
        &mut self,
        cd: &ClusterData,
        db: &Db,
    ) -> Result<(), KeeperError> {
        tracing::warn!(db = %db.uid, "the standby leader's data was being rewritten from the external primary: copying it again");
        self.clone_external(cd, db).await?;
        let _ = std::fs::remove_file(self.data.root().join(REPAIR_MARKER));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(timeline_id: u32, lsn: u64) -> TimelineHistoryEntry {
        TimelineHistoryEntry {
            timeline_id,
            switch_point: Lsn(lsn),
            reason: String::new(),
        }
    }

    #[test]
    fn a_leader_past_the_end_of_its_timeline_forked() {
        let history = [entry(1, 0x500_0000), entry(2, 0x600_0000)];
        // Past the end of timeline 1 on the primary, now on 3.
        assert_eq!(
            forked_at(1, Lsn(0x500_0100), 3, &history),
            Some(Lsn(0x500_0000))
        );
        assert_eq!(
            forked_at(2, Lsn(0x600_0001), 3, &history),
            Some(Lsn(0x600_0000))
        );
        // Exactly at the switch point, or before it: it can follow.
        assert_eq!(forked_at(1, Lsn(0x500_0000), 3, &history), None);
        assert_eq!(forked_at(2, Lsn(0x550_0000), 3, &history), None);
        // Same timeline as the primary, or unknown: nothing to say.
        assert_eq!(forked_at(3, Lsn(0x900_0000), 3, &history), None);
        assert_eq!(forked_at(0, Lsn(0x900_0000), 3, &history), None);
        // A timeline the history does not list (a history read wrong): no fork claimed.
        assert_eq!(forked_at(1, Lsn(0x900_0000), 3, &[entry(2, 1)]), None);
    }
}
