//! The master's self-fence with a real keeper, PostgreSQL and etcd: a master whose keeper
//! cannot reach the store stops acknowledging writes before a sentinel could elect another
//! master, and comes back as it was (same timeline, nothing lost) once the store answers
//! and the cluster data still names it; a store blip shorter than the fence costs nothing.
//!
//! A keeper that freezes or dies while its PostgreSQL runs as master cannot fence it; its
//! fence guard does, within the same bound.
//!
//! The test plays the sentinel's part in judging liveness: it notes when it sees a new
//! keeper report, as the sentinel does, and no failover can start before `fail_interval`
//! after the last one. A writer goes straight to PostgreSQL, as a client that bypasses the
//! proxies would.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{Env, KeeperProc, SU_PASSWORD};
use tendril_control_model::{ClusterData, ClusterSpec, KeeperInfo, ProxyRoute, decode};
use tendril_control_store::Store;

/// A master on k0, published to the proxies, with a table to write into.
async fn master(env: &Env) -> (KeeperProc, ClusterData) {
    let (k0, mut cd) = support::new_master(env, &ClusterSpec::default()).await;
    // Published to the proxies, as the sentinel does once the master is writable.
    cd.proxy.master = Some(ProxyRoute {
        db_uid: "db0".into(),
        address: "127.0.0.1".into(),
        port: k0.port,
    });
    env.write(&mut cd).await;
    k0.sql()
        .await
        .batch_execute("CREATE TABLE w (i bigint PRIMARY KEY)")
        .await
        .unwrap();
    (k0, cd)
}

/// Writes rows one by one straight to PostgreSQL until stopped, reconnecting after errors.
/// Returns the acknowledged ids with when each was acknowledged, and the number of failures.
fn writer(port: u16, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(Vec<(i64, Instant)>, u64)> {
    tokio::spawn(async move {
        let conninfo = format!(
            "host=127.0.0.1 port={port} user=postgres password={SU_PASSWORD} dbname=postgres connect_timeout=2"
        );
        let (mut acked, mut failures, mut next) = (Vec::new(), 0u64, 0i64);
        let mut client: Option<tokio_postgres::Client> = None;
        while !stop.load(Ordering::Relaxed) {
            if client
                .as_ref()
                .is_none_or(tokio_postgres::Client::is_closed)
            {
                match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
                    Ok((c, conn)) => {
                        tokio::spawn(conn);
                        client = Some(c);
                    }
                    Err(_) => {
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                }
            }
            let Some(c) = client.as_ref() else { continue };
            next += 1;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&next];
            let insert = c.execute("INSERT INTO w VALUES ($1)", &params);
            match tokio::time::timeout(Duration::from_secs(2), insert).await {
                Ok(Ok(_)) => acked.push((next, Instant::now())),
                _ => {
                    failures += 1;
                    client = None;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (acked, failures)
    })
}

/// Notes when a new report of `keeper` is seen, as the sentinel does; returns the time of
/// the last one.
fn liveness_watch(env: &Env, keeper: &str, stop: Arc<AtomicBool>) -> Arc<Mutex<Instant>> {
    let fresh = Arc::new(Mutex::new(Instant::now()));
    let (store, key, seen) = (env.store.clone(), env.keys.keeper(keeper), fresh.clone());
    tokio::spawn(async move {
        let mut last = String::new();
        while !stop.load(Ordering::Relaxed) {
            let read = tokio::time::timeout(Duration::from_millis(200), store.get(&key)).await;
            if let Ok(Ok(Some(kv))) = read
                && let Ok(info) = decode::<KeeperInfo>(&kv.value)
                && info.info_uid != last
            {
                last = info.info_uid;
                *seen.lock().unwrap() = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    fresh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_cut_off_from_the_store_stops_before_a_failover_could_start_then_resumes() {
    let env = Env::new().await;
    let (k0, cd) = master(&env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let fresh = liveness_watch(&env, "k0", stop.clone());
    let writes = writer(k0.port, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;

    env.etcd.pause();
    // Past the earliest failover a sentinel could start.
    tokio::time::sleep(cd.spec.fail_interval + Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, _) = writes.await.unwrap();
    let earliest_failover = *fresh.lock().unwrap() + cd.spec.fail_interval;
    let last = acked.last().map(|(_, at)| *at).unwrap();
    assert!(
        last < earliest_failover,
        "a write was acknowledged {:?} after another master could have been elected",
        last - earliest_failover
    );
    assert!(
        tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres password={SU_PASSWORD} connect_timeout=2",
                k0.port
            ),
            tokio_postgres::NoTls
        )
        .await
        .is_err(),
        "the fenced master still accepts connections"
    );
    assert!(k0.log_text().contains("fencing"), "{}", k0.log_text());

    // The store answers again and the cluster data still names it: the same master
    // resumes, on the same timeline, with every acknowledged write.
    env.etcd.resume();
    let client = support::connect(k0.port).await;
    let ids: Vec<i64> = acked.iter().map(|(id, _)| *id).collect();
    let found: i64 = client
        .query_one("SELECT count(*) FROM w WHERE i = ANY($1)", &[&ids])
        .await
        .unwrap()
        .get(0);
    assert_eq!(found, ids.len() as i64, "acknowledged writes were lost");
    let timeline: i32 = client
        .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(timeline, 1, "the master came back on a new timeline");
    let deadline = Instant::now() + Duration::from_secs(30);
    while client
        .execute("INSERT INTO w VALUES (-1)", &[])
        .await
        .is_err()
    {
        assert!(
            Instant::now() < deadline,
            "the master never accepted writes again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_blip_shorter_than_the_fence_costs_no_write() {
    let env = Env::new().await;
    let (k0, _cd) = master(&env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writes = writer(k0.port, stop.clone());
    tokio::time::sleep(Duration::from_millis(1000)).await;
    env.etcd.pause();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    env.etcd.resume();
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, failures) = writes.await.unwrap();
    assert_eq!(failures, 0, "writes failed during a short store outage");
    assert!(acked.len() > 50, "only {} writes", acked.len());
    assert!(!k0.log_text().contains("fencing"), "{}", k0.log_text());
}

/// The keeper freezes (SIGSTOP) or dies (SIGKILL) with its master running: the fence guard
/// stops PostgreSQL before a sentinel could elect another master, and a client writing
/// straight to it gets nothing acknowledged after that.
async fn keeper_gone_master_fenced_by_its_guard(signal: nix::sys::signal::Signal) {
    let env = Env::new().await;
    let (k0, cd) = master(&env).await;
    let stop = Arc::new(AtomicBool::new(false));
    let fresh = liveness_watch(&env, "k0", stop.clone());
    let writes = writer(k0.port, stop.clone());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let pg = k0.postmaster_pid().unwrap();

    let gone = Instant::now();
    k0.signal(signal);
    tokio::time::sleep(cd.spec.fail_interval + Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (acked, _) = writes.await.unwrap();
    let earliest_failover = *fresh.lock().unwrap() + cd.spec.fail_interval;
    let last = acked.last().map(|(_, at)| *at).unwrap();
    println!(
        "keeper {signal}: last write acknowledged {:?} after, earliest failover {:?} after",
        last.saturating_duration_since(gone),
        earliest_failover.saturating_duration_since(gone)
    );
    assert!(
        last < earliest_failover,
        "a write was acknowledged {:?} after another master could have been elected",
        last - earliest_failover
    );
    // Gone, or a zombie its frozen parent (the keeper) cannot reap.
    let state = std::fs::read_to_string(format!("/proc/{pg}/stat")).unwrap_or_default();
    let state = state.rsplit(") ").next().and_then(|r| r.chars().next());
    assert!(
        state.is_none_or(|s| s == 'Z'),
        "postgres (pid {pg}) still runs (state {state:?})"
    );
    assert!(
        k0.log_text().contains("fence guard (pid"),
        "the guard never said it fenced:\n{}",
        k0.log_text()
    );
    if signal == nix::sys::signal::Signal::SIGSTOP {
        k0.signal(nix::sys::signal::Signal::SIGCONT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_keepers_master_is_stopped_by_its_fence_guard() {
    keeper_gone_master_fenced_by_its_guard(nix::sys::signal::Signal::SIGSTOP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_keepers_master_is_stopped_by_its_fence_guard() {
    keeper_gone_master_fenced_by_its_guard(nix::sys::signal::Signal::SIGKILL).await;
}
