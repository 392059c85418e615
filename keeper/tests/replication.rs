//! Keepers converging real PostgreSQL instances to hand-written cluster data: streaming,
//! promotion, re-pointing without restart, the old master rejoining by pg_rewind or by a
//! base backup, and streaming over verified TLS.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use support::{Env, change, db, wait_count};
use tendril_control_model::{
    ClusterSpec, DbInitMode, DbRole, FollowConfig, ReplicationTls, SslMode,
};

const ROWS: &str = "SELECT count(*) FROM t";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_promotion_repoint_and_rejoin() {
    let env = Env::new().await;
    let mut k0 = env.keeper("k0");
    let mut k1 = env.keeper("k1");
    let mut k2 = env.keeper("k2");
    let spec = ClusterSpec {
        use_pg_rewind: true,
        ..ClusterSpec::default()
    };
    let mut cd = env.new_cluster(spec.clone());
    // The keepers need a cluster uid before they report; an empty cluster gives them one.
    env.write(&mut cd).await;
    env.sync_statuses(&mut cd, &["k0", "k1", "k2"]).await;

    // --- master: initdb on k0.
    let mut db0 = db("db0", "k0", DbRole::Master, DbInitMode::New, None, &spec);
    db0.spec.followers = vec!["db1".into(), "db2".into()];
    cd.dbs.insert("db0".into(), db0.clone());
    cd.master = Some("db0".into());
    env.write(&mut cd).await;
    env.wait_converged("k0", &db0, false).await;
    env.sync_statuses(&mut cd, &["k0"]).await;

    // --- two standbys by base backup.
    for (uid, keeper) in [("db1", "k1"), ("db2", "k2")] {
        cd.dbs.insert(
            uid.into(),
            db(
                uid,
                keeper,
                DbRole::Standby,
                DbInitMode::Resync,
                Some("db0"),
                &spec,
            ),
        );
    }
    env.write(&mut cd).await;
    let (d1, d2) = (cd.dbs["db1"].clone(), cd.dbs["db2"].clone());
    env.wait_converged("k1", &d1, true).await;
    env.wait_converged("k2", &d2, true).await;

    // The master made a slot for each follower, and both standbys stream through it.
    let master = k0.sql().await;
    master
        .batch_execute("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    wait_count(k1.port, ROWS, 1, Duration::from_secs(30)).await;
    wait_count(k2.port, ROWS, 1, Duration::from_secs(30)).await;
    let slots = master
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE active ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let slots: Vec<String> = slots.iter().map(|r| r.get(0)).collect();
    assert_eq!(slots, ["tendril_db1", "tendril_db2"]);
    drop(master);

    // --- a fork: the standbys stop, the master takes a write they never see, then stops.
    k1.stop();
    k2.stop();
    k0.sql()
        .await
        .batch_execute("INSERT INTO t VALUES (100)")
        .await
        .unwrap();
    k0.stop();
    k1.start();
    k2.start();
    cd.keepers.remove("k0");
    env.sync_statuses(&mut cd, &["k1", "k2"]).await;

    // --- promote db1; db2 re-points to it by reload, without a restart.
    change(&mut cd, "db1", |s| {
        s.role = DbRole::Master;
        s.follow = None;
        s.init_mode = DbInitMode::None;
        s.followers = vec!["db2".into(), "db3".into()];
    });
    change(&mut cd, "db2", |s| s.init_mode = DbInitMode::None);
    cd.master = Some("db1".into());
    env.write(&mut cd).await;
    let d1 = cd.dbs["db1"].clone();
    env.wait_converged("k1", &d1, false).await;
    env.wait_converged("k2", &cd.dbs["db2"].clone(), true).await;
    env.sync_statuses(&mut cd, &["k1", "k2"]).await;
    let k2_pid = k2.postmaster_pid().expect("k2 runs postgres");
    change(&mut cd, "db2", |s| {
        s.follow = Some(FollowConfig::Internal {
            db_uid: "db1".into(),
        })
    });
    env.write(&mut cd).await;
    env.wait_converged("k2", &cd.dbs["db2"].clone(), true).await;
    k1.sql()
        .await
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    wait_count(
        k2.port,
        "SELECT count(*) FROM t WHERE id = 2",
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        k2.postmaster_pid(),
        Some(k2_pid),
        "re-pointing restarted the standby"
    );
    let new_timeline = env
        .info("k1")
        .await
        .unwrap()
        .postgres_state
        .unwrap()
        .timeline_id;
    assert!(
        new_timeline >= 2,
        "promotion did not switch timeline: {new_timeline}"
    );

    // --- the old master comes back as a standby of db1 by pg_rewind: its forked row is gone.
    k0.start();
    cd.dbs.remove("db0");
    env.sync_statuses(&mut cd, &["k0", "k1"]).await;
    cd.dbs.insert(
        "db3".into(),
        db(
            "db3",
            "k0",
            DbRole::Standby,
            DbInitMode::Resync,
            Some("db1"),
            &spec,
        ),
    );
    env.write(&mut cd).await;
    env.wait_converged("k0", &cd.dbs["db3"].clone(), true).await;
    wait_count(
        k0.port,
        "SELECT count(*) FROM t WHERE id = 2",
        1,
        Duration::from_secs(30),
    )
    .await;
    wait_count(
        k0.port,
        "SELECT count(*) FROM t WHERE id = 100",
        0,
        Duration::from_secs(5),
    )
    .await;
    let log = k0.log_text();
    assert!(
        log.contains("resync by pg_rewind"),
        "k0 did not rewind:\n{log}"
    );
    assert!(
        !log.contains("resync by pg_basebackup"),
        "k0 fell back to a base backup:\n{log}"
    );
    let history = env
        .info("k0")
        .await
        .unwrap()
        .postgres_state
        .unwrap()
        .timelines_history;
    assert!(
        !history.is_empty(),
        "a rewound standby knows the timeline history"
    );

    // --- when pg_rewind cannot work (disabled here), a fresh base backup.
    k2.stop();
    k2.start();
    env.sync_statuses(&mut cd, &["k2"]).await;
    cd.dbs.remove("db2");
    let mut db4 = db(
        "db4",
        "k2",
        DbRole::Standby,
        DbInitMode::Resync,
        Some("db1"),
        &spec,
    );
    db4.spec.use_pg_rewind = false;
    cd.dbs.insert("db4".into(), db4);
    change(&mut cd, "db1", |s| {
        s.followers = vec!["db3".into(), "db4".into()]
    });
    env.write(&mut cd).await;
    env.wait_converged("k2", &cd.dbs["db4"].clone(), true).await;
    k1.sql()
        .await
        .batch_execute("INSERT INTO t VALUES (3)")
        .await
        .unwrap();
    wait_count(k2.port, ROWS, 3, Duration::from_secs(30)).await;
    assert!(k2.log_text().contains("resync by pg_basebackup"));

    // The master dropped the slot of the database that went away and made the new one.
    let slots = k1
        .sql()
        .await
        .query(
            "SELECT slot_name::text FROM pg_replication_slots ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let slots: Vec<String> = slots.iter().map(|r| r.get(0)).collect();
    assert_eq!(slots, ["tendril_db3", "tendril_db4"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standbys_stream_over_verified_tls_when_the_spec_asks() {
    let env = Env::new().await;
    let certs = tempfile::tempdir().unwrap();
    let tls = tendril_testkit::make_certificates_for_postgres(certs.path());
    let k0 = env.keeper("k0");
    let k1 = env.keeper("k1");
    let path = |p: &std::path::Path| p.display().to_string();
    let mut spec = ClusterSpec::default();
    spec.pg_parameters.insert("ssl".into(), "on".into());
    spec.pg_parameters
        .insert("ssl_cert_file".into(), path(&tls.server_cert));
    spec.pg_parameters
        .insert("ssl_key_file".into(), path(&tls.server_key));
    spec.replication_tls = Some(ReplicationTls {
        sslmode: SslMode::VerifyFull,
        sslrootcert: Some(path(&tls.ca_cert)),
    });
    spec.validate().unwrap();
    let mut cd = env.new_cluster(spec.clone());
    env.write(&mut cd).await;
    env.sync_statuses(&mut cd, &["k0", "k1"]).await;
    let mut db0 = db("db0", "k0", DbRole::Master, DbInitMode::New, None, &spec);
    db0.spec.followers = vec!["db1".into()];
    cd.dbs.insert("db0".into(), db0.clone());
    cd.master = Some("db0".into());
    env.write(&mut cd).await;
    env.wait_converged("k0", &db0, false).await;
    env.sync_statuses(&mut cd, &["k0"]).await;
    let mut db1 = db(
        "db1",
        "k1",
        DbRole::Standby,
        DbInitMode::Resync,
        Some("db0"),
        &spec,
    );
    db1.spec.replication_tls = spec.replication_tls.clone();
    cd.dbs.insert("db1".into(), db1.clone());
    env.write(&mut cd).await;
    env.wait_converged("k1", &db1, true).await;

    // The standby verifies the master's certificate (signed by the test CA for 127.0.0.1)
    // and streams over TLS.
    let master = k0.sql().await;
    master
        .batch_execute("CREATE TABLE t (id int primary key); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    wait_count(k1.port, ROWS, 1, Duration::from_secs(30)).await;
    let streams = master
        .query(
            "SELECT s.ssl, s.version FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(streams.len(), 1, "one walsender");
    let (ssl, version): (bool, Option<String>) = (streams[0].get(0), streams[0].get(1));
    assert!(ssl, "replication is not over TLS");
    assert!(version.is_some_and(|v| v.starts_with("TLS")));
    let conninfo: String = k1
        .sql()
        .await
        .query_one("SHOW primary_conninfo", &[])
        .await
        .unwrap()
        .get(0);
    assert!(
        conninfo.contains("sslmode=verify-full") && conninfo.contains("sslrootcert="),
        "{conninfo}"
    );
}
