//! The keepers' role checks and every component's metrics, on a real cluster: what a load
//! balancer following `/master` and `/replica` sees through a switchover and a failover,
//! and that each metrics endpoint parses.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tendril_e2e::{Cluster, Options, default_spec, http_get};

/// `/master` on every keeper, sampled every 25 ms: (when, keeper uid, status; 0 when nothing
/// answered).
type Samples = Arc<Mutex<Vec<(Instant, String, u16)>>>;

fn sample(
    keepers: Vec<(String, std::net::SocketAddr)>,
    stop: Arc<AtomicBool>,
) -> (Samples, std::thread::JoinHandle<()>) {
    let samples: Samples = Arc::default();
    let out = samples.clone();
    let thread = std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            for (uid, addr) in &keepers {
                let code = http_get(*addr, "/master").map_or(0, |(c, _)| c);
                out.lock()
                    .unwrap()
                    .push((Instant::now(), uid.clone(), code));
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    });
    (samples, thread)
}

/// Waits until `path` on keeper `uid` answers `code`.
async fn wait_code(cluster: &Cluster, uid: &str, path: &str, code: u16, limit: Duration) {
    let addr = cluster.node(uid).http;
    let deadline = Instant::now() + limit;
    loop {
        let got = tokio::task::spawn_blocking(move || http_get(addr, "/status"))
            .await
            .unwrap();
        let answer = {
            let path = path.to_owned();
            tokio::task::spawn_blocking(move || http_get(addr, &path))
                .await
                .unwrap()
        };
        if answer.as_ref().is_some_and(|(c, _)| *c == code) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{uid} {path} did not answer {code}: {answer:?}\nstatus: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prometheus text: every sample line is `name{labels} value` with a number.
fn parse_metrics(text: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for line in text
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line:?}"));
        let name = series.split('{').next().unwrap().to_owned();
        *out.entry(name).or_default() += value;
    }
    out
}

/// A master change: the old and new master keepers, when the proxies were fenced from the
/// old one and routed to the new one (the cluster data as the test's watch saw it), and
/// when the new one answered `/master` 200 (the end of the change).
#[derive(Debug)]
struct Change {
    old: String,
    new: String,
    fenced: Instant,
    routed: Instant,
    end: Instant,
}

/// The change from `old` (database `db`) that started at `since` and ended now.
async fn event(cluster: &Cluster, old: String, db: &str, since: Instant, new: String) -> Change {
    let end = Instant::now();
    let routes = cluster.routes.lock().unwrap().clone();
    let fenced = routes
        .iter()
        .find(|(t, r)| *t >= since && r.as_ref().is_none_or(|r| r.db_uid != db))
        .map(|(t, _)| *t)
        .unwrap_or_else(|| panic!("the proxies were never fenced from {db}: {routes:?}"));
    let routed = routes
        .iter()
        .find(|(t, r)| *t >= fenced && r.as_ref().is_some_and(|r| r.db_uid != db))
        .map(|(t, _)| *t)
        .unwrap_or_else(|| panic!("no route to the new master: {routes:?}"));
    Change {
        old,
        new,
        fenced,
        routed,
        end,
    }
}

/// Waits until the master has a synchronous standby known to be in sync (a switchover needs
/// one, and so does a failover that loses nothing).
async fn wait_in_sync(cluster: &Cluster) {
    cluster
        .wait_cd(
            "a synchronous standby in sync",
            Duration::from_secs(60),
            |cd| {
                cd.master_db()
                    .is_some_and(|m| !m.status.synchronous_standbys.is_empty())
            },
        )
        .await;
}

async fn master_db(cluster: &Cluster) -> (String, String) {
    let cd = cluster.cluster_data().await;
    let db = cd.master.clone().unwrap();
    (cd.dbs[&db].spec.keeper_uid.clone(), db)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn role_checks_name_one_master_through_a_switchover_and_a_failover() {
    let cluster = Cluster::start(Options {
        spec: default_spec(true),
        partitionable: true,
        ..Options::default()
    })
    .await;
    wait_in_sync(&cluster).await;
    cluster.make_master("k0").await;
    let limit = Duration::from_secs(30);
    wait_code(&cluster, "k0", "/master", 200, limit).await;
    for uid in ["k1", "k2"] {
        wait_code(&cluster, uid, "/replica", 200, limit).await;
        wait_code(&cluster, uid, "/master", 503, limit).await;
    }
    for uid in ["k0", "k1", "k2"] {
        wait_code(&cluster, uid, "/health", 200, limit).await;
    }
    wait_code(&cluster, "k0", "/replica", 503, limit).await;

    let stop = Arc::new(AtomicBool::new(false));
    let keepers = cluster
        .nodes
        .iter()
        .map(|n| (n.uid.clone(), n.http))
        .collect();
    let (samples, sampler) = sample(keepers, stop.clone());

    // A switchover away from k0.
    let (old, old_db) = master_db(&cluster).await;
    wait_in_sync(&cluster).await;
    let start = Instant::now();
    let out = cluster.ctl(&["switchover"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = cluster.wait_new_master(&old, Duration::from_secs(60)).await;
    wait_code(&cluster, &new, "/master", 200, limit).await;
    let mut events = vec![event(&cluster, old.clone(), &old_db, start, new.clone()).await];

    // Back to k0, then k0 cut from the store: it fences itself, the sentinel fails over.
    wait_in_sync(&cluster).await;
    cluster.make_master("k0").await;
    wait_code(&cluster, "k0", "/master", 200, limit).await;
    let (old, old_db) = master_db(&cluster).await;
    assert_eq!(old, "k0");
    let start = Instant::now();
    wait_in_sync(&cluster).await;
    cluster.netns.as_ref().unwrap().cut_store();
    let new = cluster.wait_new_master("k0", Duration::from_secs(60)).await;
    wait_code(&cluster, &new, "/master", 200, limit).await;
    events.push(event(&cluster, old, &old_db, start, new).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    sampler.join().unwrap();
    cluster.netns.as_ref().unwrap().heal_store();

    // At every sample at most one keeper said master.
    let samples = samples.lock().unwrap().clone();
    let mut by_round: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for (i, (_, uid, code)) in samples.iter().enumerate() {
        if *code == 200 {
            by_round.entry(i / 3).or_default().push(uid);
        }
    }
    for (round, masters) in &by_round {
        assert!(
            masters.len() <= 1,
            "sample round {round}: {masters:?} all answered /master 200"
        );
    }
    // The old master stopped saying master as soon as it saw the proxies' fence (a watch
    // delivery: milliseconds), and never once the new master was routable; the new one
    // said master afterwards.
    for e in &events {
        let last_old = samples
            .iter()
            .filter(|(t, uid, code)| *uid == e.old && *code == 200 && *t < e.end)
            .map(|(t, ..)| *t)
            .max();
        if let Some(last) = last_old {
            assert!(
                last < e.routed,
                "{} answered /master 200 after {} was routable",
                e.old,
                e.new
            );
            let after_fence = last.saturating_duration_since(e.fenced);
            assert!(
                after_fence < Duration::from_secs(1),
                "{} answered /master 200 {after_fence:?} after the proxies' fence",
                e.old
            );
            println!(
                "{}: last /master 200 {after_fence:?} after the fence was written",
                e.old
            );
        }
        assert!(
            samples.iter().any(|(t, uid, code)| *uid == e.new
                && *code == 200
                && *t > e.routed
                && *t < e.end + Duration::from_secs(1)),
            "{} never answered /master 200 after the change",
            e.new
        );
    }
    println!("{} samples of /master, events {events:?}", samples.len());

    // Every metrics endpoint parses; the keepers' say one master, as /status does.
    cluster.wait_healthy(3, Duration::from_secs(120)).await;
    let (master, _) = master_db(&cluster).await;
    wait_code(&cluster, &master, "/master", 200, limit).await;
    let mut masters = 0.0;
    for node in &cluster.nodes {
        let (code, text) = http_get(node.http, "/metrics").unwrap();
        assert_eq!(code, 200);
        let m = parse_metrics(&text);
        for name in [
            "tendril_keeper_postgres_up",
            "tendril_keeper_timeline",
            "tendril_keeper_wal_position_bytes",
            "tendril_keeper_replication_lag_bytes",
            "tendril_keeper_replication_slots",
            "tendril_keeper_pending_restart",
            "tendril_keeper_last_pass_success_timestamp_seconds",
        ] {
            assert!(m.contains_key(name), "{}: no {name}:\n{text}", node.uid);
        }
        assert_eq!(m["tendril_keeper_postgres_up"], 1.0, "{}", node.uid);
        masters += m["tendril_keeper_master"];
        let (code, status) = http_get(node.http, "/status").unwrap();
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        let master_check = http_get(node.http, "/master").unwrap().0;
        assert_eq!(
            status["checks"]["master"]["status"], master_check,
            "{}",
            node.uid
        );
        assert_eq!(status["keeper"], node.uid.as_str());
    }
    assert_eq!(masters, 1.0, "keepers reporting master in their metrics");
    let mut leaders = 0.0;
    for addr in &cluster.sentinel_metrics {
        let (code, text) = http_get(*addr, "/metrics").unwrap();
        assert_eq!(code, 200);
        let m = parse_metrics(&text);
        for name in [
            "tendril_sentinel_leader",
            "tendril_sentinel_decisions_total",
            "tendril_sentinel_writes_total",
            "tendril_sentinel_cas_conflicts_total",
            "tendril_cluster_generation",
            "tendril_sentinel_last_success_timestamp_seconds",
        ] {
            assert!(m.contains_key(name), "sentinel {addr}: no {name}: {m:?}");
        }
        if m["tendril_sentinel_leader"] == 1.0 {
            // The leader decided this cluster's changes and saw its latest generation.
            assert!(m["tendril_sentinel_decisions_total"] > 0.0, "{m:?}");
            assert!(m["tendril_cluster_generation"] > 1.0, "{m:?}");
        }
        leaders += m["tendril_sentinel_leader"];
    }
    assert_eq!(leaders, 1.0, "sentinels reporting themselves leader");
}
