//! End-to-end election rules: a standby too far behind is not elected (consistency before
//! availability), and a standby whose timeline forked is resynced under a new database uid.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::time::{Duration, Instant};

use tendril_e2e::{Cluster, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_too_far_behind_is_not_elected() {
    let spec = r#"{"use_pg_rewind": true, "max_standby_lag": 65536}"#;
    let mut cluster = Cluster::start(Options {
        keepers: 2,
        spec: spec.into(),
        ..Options::default()
    })
    .await;
    let master = cluster.master_keeper().await.unwrap();
    let standby = cluster
        .keeper_uids()
        .into_iter()
        .find(|k| *k != master)
        .unwrap();
    cluster.node_mut(&standby).keeper.stop();
    let client = tendril_e2e::connect("127.0.0.1", cluster.proxy_port())
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE big AS SELECT g, repeat('x', 1000) AS pad FROM generate_series(1, 5000) g")
        .await
        .unwrap();
    // Let the sentinel record the master's new position (written at least every 5 s).
    tokio::time::sleep(Duration::from_secs(7)).await;
    let node = cluster.node_mut(&master);
    node.kill_postmaster();
    node.kill_keeper();
    cluster.node_mut(&standby).keeper.start();
    let deadline = Instant::now() + Duration::from_secs(25);
    while Instant::now() < deadline {
        let cd = cluster.cluster_data().await;
        assert_eq!(
            cd.master_db().map(|m| m.spec.keeper_uid.clone()),
            Some(master.clone()),
            "the lagging standby was elected"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cd = cluster.cluster_data().await;
    assert!(
        cd.proxy.master.is_none(),
        "nothing routable while no candidate qualifies"
    );
    let event = cd
        .events
        .iter()
        .rev()
        .find(|e| e.kind == "no candidate")
        .expect("the reason is recorded");
    println!("{}", event.reason);
    assert!(event.reason.contains("lags"), "{}", event.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forked_standby_is_resynced_under_a_new_uid() {
    let spec = r#"{"use_pg_rewind": true}"#;
    let mut cluster = Cluster::start(Options {
        spec: spec.into(),
        ..Options::default()
    })
    .await;
    let master = cluster.master_keeper().await.unwrap();
    let others: Vec<String> = cluster
        .keeper_uids()
        .into_iter()
        .filter(|k| *k != master)
        .collect();
    let (ahead, behind) = (others[0].clone(), others[1].clone());
    let client = tendril_e2e::connect("127.0.0.1", cluster.proxy_port())
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.node_mut(&behind).keeper.stop();
    client
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    // `ahead` gets row 2; then `ahead` and the master go down.
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster
        .node(&ahead)
        .sql()
        .await
        .unwrap()
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        != 2
    {
        assert!(Instant::now() < deadline, "row 2 did not reach {ahead}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `ahead` goes first, so it never becomes master itself; then the master.
    cluster.node_mut(&ahead).keeper.stop();
    cluster.node_mut(&master).keeper.stop();
    let ahead_db = cluster
        .cluster_data()
        .await
        .dbs
        .values()
        .find(|d| d.spec.keeper_uid == ahead)
        .unwrap()
        .uid
        .clone();
    // Only `behind` remains: it is elected (asynchronous mode, within the lag bound).
    cluster.node_mut(&behind).keeper.start();
    cluster
        .wait_cd(
            "the behind standby promoted",
            Duration::from_secs(90),
            |cd| {
                cd.proxy.master.is_some()
                    && cd.master_db().is_some_and(|m| m.spec.keeper_uid == behind)
            },
        )
        .await;
    let client = tendril_e2e::connect("127.0.0.1", cluster.proxy_port())
        .await
        .unwrap();
    client
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    // `ahead` comes back on the old timeline, past the fork: rebuilt under a new uid.
    cluster.node_mut(&ahead).keeper.start();
    let cd = cluster
        .wait_cd(
            "the forked standby resynced",
            Duration::from_secs(120),
            |cd| {
                cd.dbs.values().any(|d| {
                    d.spec.keeper_uid == ahead
                        && d.uid != ahead_db
                        && d.status.current_generation == d.generation
                        && d.status.healthy
                })
            },
        )
        .await;
    let event = cd
        .events
        .iter()
        .find(|e| e.kind == "resync" && e.reason.contains(&ahead_db));
    println!("{event:?}");
    assert!(
        event.is_some(),
        "the fork is recorded:\n{}",
        cluster.describe().await
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let rows: Vec<i32> = cluster
            .node(&ahead)
            .sql()
            .await
            .unwrap()
            .query("SELECT id FROM t ORDER BY id", &[])
            .await
            .map(|r| r.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default();
        if rows == [1, 3] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resynced standby has {rows:?}, not the new master's rows"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
