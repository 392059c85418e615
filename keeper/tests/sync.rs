//! Synchronous replication as the cluster data says: commits wait for the synchronous
//! standbys, a placeholder keeps them waiting when there are too few, and a minimum of 0 lets
//! the master run alone.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use support::{Env, change, db, wait_count};
use tendril_control_model::{ClusterSpec, DbInitMode, DbRole};

/// Runs an insert and reports whether it committed within `limit`.
async fn commits_within(port: u16, id: i32, limit: Duration) -> tokio::task::JoinHandle<()> {
    let client = support::connect(port).await;
    let handle = tokio::spawn(async move {
        client
            .execute("INSERT INTO t VALUES ($1)", &[&id])
            .await
            .expect("insert");
    });
    let _ = tokio::time::timeout(limit, async {
        while !handle.is_finished() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    handle
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_for_synchronous_standbys() {
    let env = Env::new().await;
    let k0 = env.keeper("k0");
    let mut k1 = env.keeper("k1");
    let spec = ClusterSpec {
        synchronous_replication: true,
        ..ClusterSpec::default()
    };
    let mut cd = env.new_cluster(spec.clone());
    env.write(&mut cd).await;
    env.sync_statuses(&mut cd, &["k0", "k1"]).await;

    let mut db0 = db("db0", "k0", DbRole::Master, DbInitMode::New, None, &spec);
    db0.spec.followers = vec!["db1".into()];
    db0.spec.synchronous_replication = true;
    db0.spec.synchronous_standbys = vec!["db1".into()];
    cd.dbs.insert("db0".into(), db0.clone());
    cd.master = Some("db0".into());
    env.write(&mut cd).await;
    env.wait_converged("k0", &db0, false).await;
    env.sync_statuses(&mut cd, &["k0"]).await;
    cd.dbs.insert(
        "db1".into(),
        db(
            "db1",
            "k1",
            DbRole::Standby,
            DbInitMode::Resync,
            Some("db0"),
            &spec,
        ),
    );
    env.write(&mut cd).await;
    env.wait_converged("k1", &cd.dbs["db1"].clone(), true).await;

    let master = k0.sql().await;
    let names: String = master
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(names, "tendril_db1");
    // Creating the table commits through the synchronous standby.
    tokio::time::timeout(
        Duration::from_secs(30),
        master.batch_execute("CREATE TABLE t (id int primary key)"),
    )
    .await
    .expect("a commit with the synchronous standby connected completes")
    .unwrap();
    env.wait_info("k0", "db1 reported in sync", Duration::from_secs(30), |i| {
        i.postgres_state
            .as_ref()
            .is_some_and(|s| s.synchronous_standbys == ["db1"])
    })
    .await;

    // The synchronous standby goes away: a commit blocks until it is back.
    k1.stop();
    let blocked = commits_within(k0.port, 1, Duration::from_secs(3)).await;
    assert!(
        !blocked.is_finished(),
        "commit completed without its synchronous standby"
    );
    k1.start();
    env.sync_statuses(&mut cd, &["k1"]).await;
    env.write(&mut cd).await;
    tokio::time::timeout(Duration::from_secs(60), blocked)
        .await
        .expect("the blocked commit completes once the standby is back")
        .unwrap();

    // Fewer synchronous standbys than the minimum (1): the placeholder keeps commits waiting.
    change(&mut cd, "db0", |s| s.synchronous_standbys.clear());
    env.write(&mut cd).await;
    env.wait_converged("k0", &cd.dbs["db0"].clone(), false)
        .await;
    let names: String = master
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(names, "tendril_placeholder_standby");
    let blocked = commits_within(k0.port, 2, Duration::from_secs(3)).await;
    assert!(
        !blocked.is_finished(),
        "commit completed with fewer sync standbys than the minimum"
    );

    // db1 becomes synchronous again: first listed beside the placeholder, then alone once it
    // is in sync, which releases the waiting commit.
    change(&mut cd, "db0", |s| {
        s.synchronous_standbys = vec!["db1".into()]
    });
    env.write(&mut cd).await;
    tokio::time::timeout(Duration::from_secs(60), blocked)
        .await
        .expect("the waiting commit completes once db1 is the synchronous standby")
        .unwrap();
    let log = std::fs::read_to_string(env.path("k0.keeper.log")).unwrap();
    assert!(
        log.contains("changing synchronous standbys in two steps"),
        "no two-step change:\n{log}"
    );
    env.wait_converged("k0", &cd.dbs["db0"].clone(), false)
        .await;
    let names: String = master
        .query_one("SHOW synchronous_standby_names", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(names, "tendril_db1");

    // With a minimum of 0 and no synchronous standby listed, the master runs alone.
    cd.spec.min_synchronous_standbys = 0;
    change(&mut cd, "db0", |s| s.synchronous_standbys.clear());
    env.write(&mut cd).await;
    env.wait_converged("k0", &cd.dbs["db0"].clone(), false)
        .await;
    k1.stop();
    let free = commits_within(k0.port, 3, Duration::from_secs(10)).await;
    assert!(
        free.is_finished(),
        "commit blocked although the minimum is 0"
    );
    free.await.unwrap();
    wait_count(k0.port, "SELECT count(*) FROM t", 3, Duration::from_secs(5)).await;
}
