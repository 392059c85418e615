//! Standbys and the WAL archive (pgBackRest): a standby stopped while its master recycled the
//! WAL it needs (a replication slot limited by `max_slot_wal_keep_size`) catches up from the
//! archive with the spec's `archive_recovery_settings.restore_command` and streams again, as
//! the same database (no re-clone); and with `standby_bootstrap` a new standby restores the
//! latest backup instead of a pg_basebackup from the master, then catches up and streams.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::time::{Duration, Instant};

use tendril_e2e::Cluster;
use tendril_e2e::pgbackrest::{Repository, archiving_cluster, archiving_spec};

/// Waits until every keeper's database has `rows` rows in `t` and streams; panics after
/// `limit` with what it saw.
async fn wait_all_streaming_with(cluster: &Cluster, keepers: usize, rows: i64, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let counts = cluster.count_on_each("SELECT count(*) FROM t").await;
        let healthy = cluster.healthy(keepers).await;
        if healthy && counts.len() == keepers && counts.values().all(|c| *c == Some(rows)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not every database caught up to {rows} rows: {counts:?}\n{}\n{}",
            cluster.describe().await,
            cluster.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The database `keeper` reports holding.
async fn db_of(cluster: &Cluster, keeper: &str) -> String {
    let info = cluster.info(keeper).await.unwrap();
    info.postgres_state.unwrap().uid
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standbys_catch_up_from_the_archive_and_new_ones_start_from_the_backup() {
    let repo = Repository::create();
    // The master keeps no WAL for a standby beyond 32 MB (a slot past it is lost).
    let spec = archiving_spec(
        &repo,
        serde_json::json!({"wal_keep_size": "0", "max_slot_wal_keep_size": "32MB"}),
    );
    let (mut cluster, master) = archiving_cluster(&repo, spec).await;
    let restore = format!(
        "{} --pg1-path=\"$PWD\" archive-get %f \"%p\"",
        repo.command()
    );
    let patch = serde_json::json!({
        "archive_recovery_settings": {"restore_command": restore},
        "standby_bootstrap": {"command": format!("{} --pg1-path=%d restore", repo.command())},
    });
    let out = cluster.ctl(&["update", "--patch", &patch.to_string()]);
    assert!(out.status.success(), "{out:?}");

    let standby = cluster
        .keeper_uids()
        .into_iter()
        .find(|k| *k != master)
        .unwrap();
    let db_before = db_of(&cluster, &standby).await;
    let c = tendril_e2e::connect("127.0.0.1", cluster.proxy_port())
        .await
        .unwrap();
    // Uncompressed padding: real WAL volume.
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, pad text); \
         ALTER TABLE t ALTER pad SET STORAGE EXTERNAL",
    )
    .await
    .unwrap();
    // An idle cluster first, longer than the sentinel's ten-loop stall bound: a standby
    // that does not move while it is caught up is not stalled (it was counted so, and then
    // re-cloned as soon as it came back behind).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let needed: String = cluster
        .node(&standby)
        .sql()
        .await
        .unwrap()
        .query_one("SELECT pg_last_wal_replay_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    cluster.node_mut(&standby).keeper.stop();
    let log_before = cluster.node(&standby).keeper.log_text().len();

    // About 80 MB of WAL while the standby is away, each segment archived, then removed
    // by the checkpoints.
    for i in 0..8 {
        let from = i * 1000 + 1;
        c.batch_execute(&format!(
            "INSERT INTO t SELECT g, repeat('x', 8000) FROM generate_series({from}, {}) g",
            from + 999
        ))
        .await
        .unwrap();
        c.batch_execute("SELECT pg_switch_wal()").await.unwrap();
        c.batch_execute("CHECKPOINT").await.unwrap();
    }
    repo.run(&cluster, &master, "check");
    let gone: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_ls_waldir() WHERE name = pg_walfile_name($1::text::pg_lsn)",
            &[&needed],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(gone, 0, "the master no longer has WAL segment of {needed}");

    cluster.node_mut(&standby).keeper.start();
    wait_all_streaming_with(&cluster, 2, 8000, Duration::from_secs(90)).await;
    let db_after = db_of(&cluster, &standby).await;
    assert_eq!(
        db_before,
        db_after,
        "the same database caught up: no re-clone\n{}",
        cluster.describe().await
    );
    let log = cluster.node(&standby).keeper.log_text();
    let since = log.get(log_before..).unwrap_or_default();
    assert!(!since.contains("resync by"), "no re-clone:\n{since}");
    let pg_log = |uid: &str| {
        std::fs::read_to_string(cluster.node(uid).data_dir.join("postgres.log")).unwrap()
    };
    assert!(
        pg_log(&standby).contains("from archive"),
        "the standby read WAL from the archive:\n{}",
        pg_log(&standby)
    );

    // A new keeper: its standby comes from the backup repository.
    cluster.add_keeper("k2");
    wait_all_streaming_with(&cluster, 3, 8000, Duration::from_secs(120)).await;
    let log = cluster.node("k2").keeper.log_text();
    assert!(
        log.contains("new standby from the backup repository"),
        "k2 restored the backup:\n{log}"
    );
    assert!(!log.contains("resync by pg_basebackup"), "{log}");
    let k2_log = std::fs::read_to_string(cluster.node("k2").data_dir.join("postgres.log")).unwrap();
    assert!(
        k2_log.contains("from archive"),
        "k2 caught up from the archive:\n{k2_log}"
    );
    c.batch_execute("INSERT INTO t VALUES (100000, 'after')")
        .await
        .unwrap();
    wait_all_streaming_with(&cluster, 3, 8001, Duration::from_secs(30)).await;
}
