//! Point-in-time recovery with pgBackRest: a cluster archives its WAL with `archive-push` (on
//! its master only: `archive_mode = on`), a full backup is taken, rows are written, a restore
//! point is made, more rows are written; a new cluster with `init_mode: pitr` restores the
//! backup (`data_restore_command`), replays the archive (`archive-get`) to the restore point,
//! promotes, and builds its standby. It holds exactly the rows before the restore point, is
//! writable, and its standby streams from it; the first cluster is untouched. Then a restore
//! that fails leaves the cluster initialising, with the command's exit status and output in
//! the keeper's report.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::time::{Duration, Instant};

use tendril_e2e::pgbackrest::{Repository, archiving_cluster, archiving_spec};
use tendril_e2e::{Cluster, Options};

/// A new cluster of two keepers restored from `repo` to the restore point `name`.
async fn restore_to(repo: &Repository, name: &str) -> Cluster {
    let pitr = serde_json::json!({
        "use_pg_rewind": true,
        "init_mode": "pitr",
        "pitr_config": {
            "data_restore_command": format!("{} --pg1-path=%d restore", repo.command()),
            "archive_recovery_settings": {
                "restore_command": format!("{} --pg1-path=\"$PWD\" archive-get %f \"%p\"", repo.command()),
            },
            "recovery_target_settings": {"recovery_target_name": name},
        },
    });
    Cluster::start(Options {
        keepers: 2,
        sentinels: 1,
        proxies: 1,
        spec: pitr.to_string(),
        ..Options::default()
    })
    .await
}

/// A master's current timeline, from the name of its current WAL file.
const TIMELINE: &str =
    "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint";

async fn query_i64(cluster: &Cluster, sql: &str) -> i64 {
    let c = tendril_e2e::connect("127.0.0.1", cluster.proxy_port())
        .await
        .unwrap();
    c.query_one(sql, &[]).await.unwrap().get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_cluster_recovers_to_a_restore_point_from_pgbackrest() {
    let repo = Repository::create();
    let (source, master) =
        archiving_cluster(&repo, archiving_spec(&repo, serde_json::json!({}))).await;

    let c = tendril_e2e::connect("127.0.0.1", source.proxy_port())
        .await
        .unwrap();
    // One transaction per statement (a multi-statement query would be one transaction,
    // committed after the restore point).
    for statement in [
        "CREATE TABLE t (id int PRIMARY KEY)",
        "INSERT INTO t SELECT generate_series(1, 100)",
        "SELECT pg_create_restore_point('before')",
        "INSERT INTO t SELECT generate_series(101, 200)",
    ] {
        c.batch_execute(statement).await.unwrap();
    }
    // Switches WAL and waits until the segment is archived: the restore point is in it.
    repo.run(&source, &master, "check");
    // The master's keeper reports its archiving; the standby does not archive.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = source.ctl(&["status", "--output", "json"]);
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let rows = json["keepers"].as_array().unwrap().clone();
        let archiving: Vec<&serde_json::Value> =
            rows.iter().filter(|k| !k["archiving"].is_null()).collect();
        if let [row] = archiving.as_slice()
            && row["archiving"]["archived_count"].as_u64() > Some(0)
        {
            assert_eq!(row["keeper"], master.as_str(), "{json:#}");
            // Attempts before stanza-create failed; the last one succeeded.
            let failed = row["archiving"]["last_failed_time"].as_str().unwrap_or("");
            let archived = row["archiving"]["last_archived_time"]
                .as_str()
                .unwrap_or("");
            assert!(archived > failed, "{json:#}");
            assert!(
                row["archiving"]["last_archived_wal"].is_string(),
                "{json:#}"
            );
            let text = String::from_utf8_lossy(&source.ctl(&["status"]).stdout).into_owned();
            assert!(text.contains("archiving: "), "{text}");
            assert!(!text.contains("FAILING"), "{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "archiving not reported: {json:#}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let restored = restore_to(&repo, "before").await;
    assert_eq!(
        query_i64(&restored, "SELECT count(*) FROM t").await,
        100,
        "exactly the rows before the restore point"
    );
    assert_eq!(
        query_i64(&restored, "SELECT max(id)::bigint FROM t").await,
        100
    );
    let w = tendril_e2e::connect("127.0.0.1", restored.proxy_port())
        .await
        .unwrap();
    w.batch_execute("INSERT INTO t VALUES (1000)")
        .await
        .unwrap();
    // Its standby streams from it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = restored.count_on_each("SELECT count(*) FROM t").await;
        if counts.values().all(|c| *c == Some(101)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the standby did not catch up: {counts:?}\n{}",
            restored.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cd = restored.cluster_data().await;
    assert!(
        cd.events
            .iter()
            .any(|e| e.reason.contains("init mode pitr")),
        "the init is recorded: {:?}",
        cd.events
    );
    // The source is untouched.
    assert_eq!(query_i64(&source, "SELECT count(*) FROM t").await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_failover_the_new_master_archives_and_recovery_follows_its_timeline() {
    let repo = Repository::create();
    let (source, old_master) =
        archiving_cluster(&repo, archiving_spec(&repo, serde_json::json!({}))).await;
    let c = tendril_e2e::connect("127.0.0.1", source.proxy_port())
        .await
        .unwrap();
    c.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t SELECT generate_series(1, 100);",
    )
    .await
    .unwrap();
    drop(c);
    source.ctl(&["failkeeper", &old_master]);
    let new_master = source
        .wait_new_master(&old_master, Duration::from_secs(60))
        .await;
    let c = tendril_e2e::connect("127.0.0.1", source.proxy_port())
        .await
        .unwrap();
    let timeline: i64 = c.query_one(TIMELINE, &[]).await.unwrap().get(0);
    for statement in [
        "INSERT INTO t SELECT generate_series(101, 200)",
        "SELECT pg_create_restore_point('after')",
        "INSERT INTO t SELECT generate_series(201, 300)",
    ] {
        c.batch_execute(statement).await.unwrap();
    }
    repo.run(&source, &new_master, "check");
    let restored = restore_to(&repo, "after").await;
    assert_eq!(
        query_i64(&restored, "SELECT count(*) FROM t").await,
        200,
        "the rows before the restore point, across the failover"
    );
    let restored_timeline = query_i64(&restored, TIMELINE).await;
    assert!(
        restored_timeline > timeline,
        "the restored cluster followed the failover's timeline {timeline} and promoted past it \
         (it is on {restored_timeline})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_restore_leaves_the_cluster_initialising_and_says_why() {
    let spec = serde_json::json!({
        "init_mode": "pitr",
        "pitr_config": {"data_restore_command": "echo no backup for %d >&2; exit 3"},
    });
    let cluster = Cluster::start(Options {
        keepers: 1,
        sentinels: 1,
        proxies: 0,
        spec: spec.to_string(),
        wait_healthy: false,
        ..Options::default()
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = cluster.ctl(&["status", "--output", "json"]);
        let json: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
        let error = json["keepers"][0]["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        if error.contains("data_restore_command") {
            assert!(error.contains("exit status: 3"), "{error}");
            assert!(error.contains("no backup for"), "{error}");
            assert_eq!(json["phase"], "initializing", "{json:#}");
            assert!(json["proxy_route"].is_null(), "nothing is routed: {json:#}");
            let events = json["events"].to_string();
            if events.contains("init error") {
                assert!(events.contains("exit status: 3"), "{events}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no restore error reported: {json:#}\n{}",
            cluster.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
