//! The master's self-fence in a whole cluster of real processes: the master's host loses
//! the store only (its PostgreSQL still reachable by the proxies, the other keepers and the
//! clients), while one writer goes through the proxy and another straight to the master, as
//! a client that bypasses the proxies would. The old master must acknowledge no write once
//! another master can be elected: none after its PostgreSQL stopped, none after the proxies
//! were fenced, none after the new master served one; no acknowledged write is lost. And the
//! sentinel's side: a master failed while its keeper still reports (`tendrilctl failkeeper`)
//! is stopped before a standby is promoted.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::time::{Duration, Instant};

use tendril_control_model::{DbRole, ProxyRoute};
use tendril_e2e::writer::{Mode, Writer};
use tendril_e2e::{Cluster, Options, default_spec};

/// Ids of the writer that bypasses the proxies start here, apart from the proxied writer's.
const DIRECT_IDS: i64 = 1_000_000_000;

/// Two writers through the proxy and one straight to PostgreSQL at `addr:port` (as a client
/// that bypasses the proxies), once both have written.
async fn writers(cluster: &Cluster, addr: &str, port: u16) -> (Writer, Writer) {
    let proxied = Writer::start(cluster.proxy_port(), 2, Mode::Persistent).await;
    let direct = Writer::start_to(addr, port, 1, Mode::Persistent, DIRECT_IDS).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !direct.snapshot().acked.is_empty(),
        "the direct writer never wrote"
    );
    assert!(
        !proxied.snapshot().acked.is_empty(),
        "the proxied writer never wrote"
    );
    (proxied, direct)
}

/// A synchronous cluster; its master's keeper, database, address and port.
async fn sync_cluster() -> (Cluster, String, String, String, u16) {
    let cluster = Cluster::start(Options {
        spec: default_spec(true),
        ..Options::default()
    })
    .await;
    let keeper = cluster.master_keeper().await.unwrap();
    let db = cluster.cluster_data().await.master.clone().unwrap();
    let (addr, port) = {
        let n = cluster.node(&keeper);
        (n.address.to_string(), n.port)
    };
    (cluster, keeper, db, addr, port)
}

async fn master_cut_from_the_store(sync: bool) {
    let cluster = Cluster::start(Options {
        spec: default_spec(sync),
        partitionable: true,
        ..Options::default()
    })
    .await;
    // k0 is in the network namespace; make sure it is the master.
    cluster.make_master("k0").await;
    let old_db = cluster.cluster_data().await.master.clone().unwrap();
    let (k0_addr, k0_port) = {
        let n = cluster.node("k0");
        (n.address.to_string(), n.port)
    };
    let (proxied, direct) = writers(&cluster, &k0_addr, k0_port).await;

    let cut = Instant::now();
    cluster.netns.as_ref().unwrap().cut_store();
    let deadline = cut + Duration::from_secs(20);
    while cluster.node("k0").postmaster_pid().is_some() {
        assert!(
            Instant::now() < deadline,
            "k0 did not fence itself:\n{}",
            cluster.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pg_gone = Instant::now();
    let new = cluster.wait_new_master("k0", Duration::from_secs(60)).await;
    let new_port = cluster.node(&new).port;
    proxied
        .wait_success_after(Instant::now(), Duration::from_secs(30))
        .await
        .expect("writes resume through the proxy");

    cluster.netns.as_ref().unwrap().heal_store();
    cluster.wait_healthy(3, Duration::from_secs(120)).await;
    let cd = cluster.cluster_data().await;
    let k0_db = cd.dbs.values().find(|d| d.spec.keeper_uid == "k0").unwrap();
    assert_eq!(k0_db.spec.role, DbRole::Standby, "k0 did not rejoin");
    let direct = direct.stop().await;
    let proxied = proxied.stop().await;

    let routes = cluster.routes.lock().unwrap().clone();
    let after = |want: &dyn Fn(&Option<ProxyRoute>) -> bool| {
        routes
            .iter()
            .find(|(at, r)| *at >= cut && want(r))
            .map(|(at, _)| *at)
    };
    let fenced_at = after(&|r| r.is_none()).expect("the failover fenced the proxies");
    let routed_at = after(&|r| r.as_ref().is_some_and(|r| r.db_uid != old_db))
        .expect("the new master was routed");
    let first_new = proxied
        .first_ack_on(new_port)
        .expect("the new master acknowledged writes");
    let last_old = [&direct, &proxied]
        .iter()
        .filter_map(|r| r.last_ack_on(k0_port))
        .max()
        .unwrap();
    println!(
        "store cut (sync {sync}): after the cut, last write acknowledged by k0 {:?}, its \
         postgres stopped {:?}, proxies fenced {:?}, new master routed {:?}, first write on it \
         {:?}; direct writer: {} acknowledged, {} failures",
        last_old - cut,
        pg_gone - cut,
        fenced_at - cut,
        routed_at - cut,
        first_new - cut,
        direct.acked.len(),
        direct.failures.len()
    );
    assert!(
        direct.acked.iter().all(|a| a.2 == k0_port),
        "the direct writer reached another server"
    );
    assert!(
        last_old <= pg_gone,
        "k0 acknowledged a write after its postgres stopped"
    );
    assert!(
        last_old < fenced_at && fenced_at <= routed_at,
        "k0 acknowledged a write after the failover began"
    );
    assert!(
        last_old < first_new,
        "k0 acknowledged a write after the new master served one"
    );
    assert!(
        cluster.node("k0").keeper.log_text().contains("fencing:"),
        "k0's keeper never said it fenced"
    );
    let ids: Vec<i64> = direct.ids().into_iter().chain(proxied.ids()).collect();
    cluster.assert_no_acked_write_lost(&ids).await;
    cluster.assert_never_two_masters_routable();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_cut_from_the_store_fences_itself_before_the_failover_async() {
    master_cut_from_the_store(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_cut_from_the_store_fences_itself_before_the_failover_sync() {
    master_cut_from_the_store(true).await;
}

/// `tendrilctl failkeeper` on the master's keeper, which is alive and keeps reporting: the
/// sentinel tells it to stop its master and promotes a standby only once it reported the
/// master stopped, so a client writing straight to the old master gets nothing acknowledged
/// there once the new master serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_keeper_stops_its_master_before_a_standby_is_promoted() {
    let (cluster, old, old_db, old_addr, old_port) = sync_cluster().await;
    let (proxied, direct) = writers(&cluster, &old_addr, old_port).await;

    let asked = Instant::now();
    let out = cluster.ctl(&["failkeeper", &old]);
    assert!(
        out.status.success(),
        "tendrilctl failkeeper: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = cluster.wait_new_master(&old, Duration::from_secs(60)).await;
    let new_port = cluster.node(&new).port;
    proxied
        .wait_success_after(Instant::now(), Duration::from_secs(30))
        .await
        .expect("writes resume through the proxy");
    let direct = direct.stop().await;
    let proxied = proxied.stop().await;

    let routes = cluster.routes.lock().unwrap().clone();
    let routed_at = routes
        .iter()
        .find(|(at, r)| *at >= asked && r.as_ref().is_some_and(|r| r.db_uid != old_db))
        .map(|(at, _)| *at)
        .expect("the new master was routed");
    let first_new = proxied
        .first_ack_on(new_port)
        .expect("the new master acknowledged writes");
    let last_old = [&direct, &proxied]
        .iter()
        .filter_map(|r| r.last_ack_on(old_port))
        .max()
        .unwrap();
    let events: Vec<String> = cluster
        .cluster_data()
        .await
        .events
        .iter()
        .map(|e| format!("{}: {}", e.kind, e.reason))
        .collect();
    println!(
        "failkeeper {old}: last write acknowledged by it {:?} after the request, new master \
         {new} routed {:?}, first write on it {:?}; events: {events:#?}",
        last_old.saturating_duration_since(asked),
        routed_at - asked,
        first_new - asked
    );
    assert!(
        events.iter().any(|e| e.starts_with("demote:")),
        "the sentinel did not tell {old} to stop its master"
    );
    assert!(
        last_old < routed_at && last_old < first_new,
        "{old} acknowledged a write after the new master was routed"
    );
    let ids: Vec<i64> = direct.ids().into_iter().chain(proxied.ids()).collect();
    cluster.assert_no_acked_write_lost(&ids).await;
    cluster.assert_never_two_masters_routable();
}

/// The master's host loses the store for less than the fence bound: nothing is fenced, no
/// client, through the proxy or straight to the master, sees an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_shorter_than_the_fence_costs_nothing() {
    let cluster = Cluster::start(Options {
        spec: default_spec(true),
        partitionable: true,
        ..Options::default()
    })
    .await;
    cluster.make_master("k0").await;
    let (k0_addr, k0_port) = {
        let n = cluster.node("k0");
        (n.address.to_string(), n.port)
    };
    let (proxied, direct) = writers(&cluster, &k0_addr, k0_port).await;
    let before = cluster.cluster_data().await.proxy.generation;
    // Well under the fence bound (3/5 of fail_interval: 3 s by default).
    cluster.netns.as_ref().unwrap().cut_store();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    cluster.netns.as_ref().unwrap().heal_store();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let direct = direct.stop().await;
    let proxied = proxied.stop().await;
    println!(
        "short store outage of the master's host: {} direct and {} proxied writes \
         acknowledged, failures {:?} / {:?}",
        direct.acked.len(),
        proxied.acked.len(),
        direct.failures,
        proxied.failures
    );
    assert!(direct.failures.is_empty(), "direct writes failed");
    assert!(proxied.failures.is_empty(), "proxied writes failed");
    assert_eq!(
        cluster.cluster_data().await.proxy.generation,
        before,
        "the proxies were fenced"
    );
    assert!(
        !cluster.node("k0").keeper.log_text().contains("fencing:"),
        "k0 fenced itself"
    );
    let ids: Vec<i64> = direct.ids().into_iter().chain(proxied.ids()).collect();
    cluster.assert_no_acked_write_lost(&ids).await;
}

/// etcd is down for everyone for longer than the fence bound: the master fences itself (no
/// sentinel can fail over either, and the proxies fence themselves when their leases run
/// out); when etcd returns, the same master resumes on the same timeline, without a rewind,
/// and no acknowledged write is lost. The price is the outage: consistency first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_for_everyone_stops_writes_then_the_same_master_resumes() {
    let (cluster, master, master_db, addr, port) = sync_cluster().await;
    let timeline = async || -> i32 {
        let client = cluster.node(&master).sql().await.unwrap();
        client
            .query_one("SELECT timeline_id FROM pg_control_checkpoint()", &[])
            .await
            .unwrap()
            .get(0)
    };
    let timeline_before = timeline().await;
    let fail_interval = cluster.cluster_data().await.spec.fail_interval;
    let (proxied, direct) = writers(&cluster, &addr, port).await;

    let down = Instant::now();
    cluster.pause_store();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let last_before = direct
        .snapshot()
        .last_success_before(Instant::now())
        .unwrap();
    cluster.resume_store();
    let up = Instant::now();
    let resumed = direct
        .wait_success_after(up, Duration::from_secs(60))
        .await
        .expect("writes straight to the master resume");
    proxied
        .wait_success_after(up, Duration::from_secs(60))
        .await
        .expect("writes through the proxy resume");
    let direct = direct.stop().await;
    let proxied = proxied.stop().await;
    let cd = cluster.cluster_data().await;
    let log = cluster.node(&master).keeper.log_text();
    println!(
        "etcd down for everyone 8 s: last direct write acknowledged {:?} after etcd stopped, \
         writes again {:?} after it returned",
        last_before.saturating_duration_since(down),
        resumed.saturating_duration_since(up)
    );
    assert_eq!(
        cd.master.as_deref(),
        Some(master_db.as_str()),
        "the master changed"
    );
    assert!(log.contains("fencing:"), "the master never fenced itself");
    assert!(
        log.contains("lifting the fence"),
        "the master never lifted its fence"
    );
    assert!(!log.contains("pg_rewind"), "the master was rewound");
    // The outage is reported where an operator looks.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cluster.ctl(&["status"]);
        let text = String::from_utf8_lossy(&status.stdout).into_owned();
        if text.contains(&format!("{master}: fenced its master at")) {
            println!("{text}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tendrilctl status does not show the fence:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Fenced before a failover could have started, had a sentinel still reached etcd.
    assert!(
        last_before < down + fail_interval,
        "the master acknowledged writes {:?} into the outage",
        last_before - down
    );
    assert_eq!(
        timeline().await,
        timeline_before,
        "the master came back on a new timeline"
    );
    let ids: Vec<i64> = direct.ids().into_iter().chain(proxied.ids()).collect();
    cluster.assert_no_acked_write_lost(&ids).await;
    cluster.assert_never_two_masters_routable();
}

/// The master's keeper cut from the store long enough to fence its PostgreSQL and to have
/// the proxies fenced, with no standby to take over (a one-keeper cluster): once the store
/// is reachable again the sentinel routes the proxies back to it, its keeper lifts the fence
/// and writes resume, on the same master. Before, the sentinel waited for a writable master
/// to route to and the keeper for a route to lift its fence: the cluster stayed down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_master_with_no_standby_comes_back_once_the_store_does() {
    let cluster = Cluster::start(Options {
        keepers: 1,
        sentinels: 1,
        spec: tendril_e2e::tuned_spec(false),
        partitionable: true,
        ..Options::default()
    })
    .await;
    let master_db = cluster.cluster_data().await.master.clone().unwrap();
    let (addr, port) = {
        let n = cluster.node("k0");
        (n.address.to_string(), n.port)
    };
    let (proxied, direct) = writers(&cluster, &addr, port).await;
    let cut = Instant::now();
    cluster.netns.as_ref().unwrap().cut_store();
    let deadline = cut + Duration::from_secs(20);
    while cluster.cluster_data().await.proxy.master.is_some() {
        assert!(
            Instant::now() < deadline,
            "the proxies were not fenced:\n{}",
            cluster.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    while cluster.node("k0").postmaster_pid().is_some() {
        assert!(Instant::now() < deadline, "k0 did not fence itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Past fail_interval again: the sentinel has found no standby to promote.
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.netns.as_ref().unwrap().heal_store();
    let healed = Instant::now();
    let resumed = proxied
        .wait_success_after(healed, Duration::from_secs(60))
        .await;
    let cd = cluster.cluster_data().await;
    assert!(
        resumed.is_some(),
        "writes through the proxy never resumed:\n{}\n{}",
        cluster.describe().await,
        cluster.logs_tail()
    );
    println!(
        "writes resumed {:?} after the store was reachable again",
        resumed.unwrap().saturating_duration_since(healed)
    );
    assert_eq!(cd.master.as_deref(), Some(master_db.as_str()));
    assert!(
        cluster
            .node("k0")
            .keeper
            .log_text()
            .contains("lifting the fence"),
        "the keeper never lifted its fence"
    );
    let proxied = proxied.stop().await;
    let direct = direct.stop().await;
    let ids: Vec<i64> = direct.ids().into_iter().chain(proxied.ids()).collect();
    cluster.assert_no_acked_write_lost(&ids).await;
}
