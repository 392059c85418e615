//! Faults and bad input: a killed postmaster, a missing password file, a port in use, a data
//! dir locked by another keeper, a deleted data dir, malformed cluster data. Each gives a clear
//! error and leaves the data intact.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::{Duration, Instant};

use support::{Env, change, wait_count};
use tendril_control_model::{ClusterData, ClusterSpec, DbInitMode};
use tendril_control_store::Store;

/// One master keeper `k0` with a table holding one row.
async fn single_master(env: &Env) -> (support::KeeperProc, ClusterData) {
    let (k0, mut cd) = support::new_master(env, &ClusterSpec::default()).await;
    // Initialised: from now on the data must already be there, as the sentinel records.
    change(&mut cd, "db0", |s| s.init_mode = DbInitMode::None);
    env.sync_statuses(&mut cd, &["k0"]).await;
    env.write(&mut cd).await;
    env.wait_converged("k0", &cd.dbs["db0"].clone(), false)
        .await;
    k0.sql()
        .await
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    (k0, cd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postmaster_is_restarted_and_reported() {
    let env = Env::new().await;
    let (k0, _cd) = single_master(&env).await;
    let pid = k0.postmaster_pid().expect("postgres runs");
    let killed = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let info = env
        .wait_info(
            "k0",
            "crash reported and postgres healthy again",
            Duration::from_secs(60),
            |i| i.pg_crashes == 1 && i.postgres_state.as_ref().is_some_and(|s| s.healthy),
        )
        .await;
    println!(
        "postmaster SIGKILL to healthy again: {:?}",
        killed.elapsed()
    );
    let crash = info.last_pg_crash.expect("the crash is described");
    assert!(crash.contains("signal: 9"), "{crash}");
    assert_ne!(k0.postmaster_pid(), Some(pid), "a new postmaster runs");
    wait_count(
        k0.port,
        "SELECT count(*) FROM t",
        1,
        Duration::from_secs(10),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gives_clear_errors_and_keeps_the_data() {
    let env = Env::new().await;
    let (mut k0, mut cd) = single_master(&env).await;

    // A missing password file: usage error, nothing created.
    let mut k9 = env.keeper_without_start("k9");
    k9.su_passwordfile = env.path("no-such-file");
    let out = k9.command().output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(64),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no-such-file"),
        "error must name the file: {stderr}"
    );
    assert!(
        !k9.data_dir.exists(),
        "a refused start must not create the data dir"
    );

    // A second keeper on the same data dir: refused, the first keeps running.
    let out = k0.command().output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot take exclusive lock on data dir"),
        "{stderr}"
    );
    wait_count(k0.port, "SELECT count(*) FROM t", 1, Duration::from_secs(5)).await;

    // Malformed cluster data: reported, nothing changed, postgres keeps serving.
    let key = env.keys.cluster_data();
    env.store
        .put(&key, b"{\"format_version\": 1, \"uid\": ".to_vec(), None)
        .await
        .unwrap();
    env.wait_info(
        "k0",
        "the malformed cluster data reported",
        Duration::from_secs(10),
        |i| {
            i.last_error
                .as_deref()
                .is_some_and(|e| e.contains("cannot use the cluster data"))
        },
    )
    .await;
    env.store
        .put(&key, br#"{"format_version": 7}"#.to_vec(), None)
        .await
        .unwrap();
    env.wait_info(
        "k0",
        "the unknown format version reported",
        Duration::from_secs(10),
        |i| {
            i.last_error
                .as_deref()
                .is_some_and(|e| e.contains("format_version 7"))
        },
    )
    .await;
    wait_count(k0.port, "SELECT count(*) FROM t", 1, Duration::from_secs(5)).await;
    env.write(&mut cd).await;
    env.wait_info("k0", "error cleared", Duration::from_secs(10), |i| {
        i.last_error.is_none()
    })
    .await;

    // The port is taken: postgres cannot start, the keeper says why, and starts it once the
    // port is free.
    k0.stop();
    let squatter = std::net::TcpListener::bind(("127.0.0.1", k0.port)).unwrap();
    k0.start();
    env.sync_statuses(&mut cd, &["k0"]).await;
    env.write(&mut cd).await;
    let info = env
        .wait_info(
            "k0",
            "the port conflict reported",
            Duration::from_secs(30),
            |i| {
                i.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("Address already in use"))
            },
        )
        .await;
    println!("port in use: {}", info.last_error.unwrap());
    drop(squatter);
    env.wait_converged("k0", &cd.dbs["db0"].clone(), false)
        .await;
    wait_count(
        k0.port,
        "SELECT count(*) FROM t",
        1,
        Duration::from_secs(10),
    )
    .await;

    // The PostgreSQL data deleted while the keeper was down: not recreated, not started.
    k0.stop();
    std::fs::remove_dir_all(k0.data_dir.join("postgres")).unwrap();
    k0.start();
    env.sync_statuses(&mut cd, &["k0"]).await;
    env.write(&mut cd).await;
    let info = env
        .wait_info(
            "k0",
            "the vanished data reported",
            Duration::from_secs(30),
            |i| {
                i.last_error
                    .as_deref()
                    .is_some_and(|e| e.contains("vanished"))
            },
        )
        .await;
    assert!(
        info.postgres_state.is_none(),
        "no postgres state without data: {info:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !k0.data_dir.join("postgres").exists(),
        "the keeper must not invent new data"
    );

    // The whole keeper data dir deleted: the database's data is gone; the keeper says so
    // instead of running initdb for a database that should hold data.
    k0.stop();
    std::fs::remove_dir_all(&k0.data_dir).unwrap();
    k0.start();
    env.sync_statuses(&mut cd, &["k0"]).await;
    env.write(&mut cd).await;
    env.wait_info(
        "k0",
        "the disappeared data reported",
        Duration::from_secs(30),
        |i| {
            i.last_error
                .as_deref()
                .is_some_and(|e| e.contains("keeper data disappeared"))
        },
    )
    .await;
    assert!(
        !k0.data_dir.join("postgres").exists(),
        "the keeper must not invent new data"
    );
}
