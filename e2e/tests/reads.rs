//! The proxy's read-only listener on a real cluster (three keepers, etcd, proxies): new
//! connections spread over the standbys eligible for reads, never to the master while one
//! is; a standby whose replay falls behind `max_standby_lag_for_reads` takes no new
//! connection (its open ones stay) and takes them again once it caught up; with no standby
//! eligible (both behind, then both stopped), `--read-only-fallback` sends them to the
//! master or refuses them with 57P03; a cancel request on the read-only listener reaches the
//! standby that runs the query.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tendril_e2e::{Cluster, Options, connect, http_get, tuned_spec};

/// The server port of a new connection through `port` (`inet_server_port()`), or the error
/// (a server that does not answer within 10 s is one).
async fn served_by(port: u16) -> Result<u16, String> {
    let ask = async {
        let client = connect("127.0.0.1", port).await.map_err(|e| {
            e.as_db_error().map_or(e.to_string(), |d| {
                format!("{}: {}", d.code().code(), d.message())
            })
        })?;
        let row = client
            .query_one("select inet_server_port()", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, i32>(0) as u16)
    };
    tokio::time::timeout(Duration::from_secs(10), ask)
        .await
        .unwrap_or_else(|_| Err("no answer within 10 s".into()))
}

/// How `n` new connections through `port` were served: server port to count.
async fn spread(port: u16, n: usize) -> BTreeMap<u16, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..n {
        let server = served_by(port).await.unwrap();
        *out.entry(server).or_default() += 1;
    }
    out
}

/// Waits until 8 new connections in a row through `port` are all served by `want`; says
/// what the cluster looked like if they never are.
async fn wait_served_only_by(cluster: &Cluster, port: u16, want: &[u16], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut in_a_row = 0;
    let mut last = Vec::new();
    while in_a_row < 8 {
        let got = served_by(port).await;
        if got.as_ref().is_ok_and(|p| want.contains(p)) {
            in_a_row += 1;
        } else {
            in_a_row = 0;
        }
        last.push(got);
        if last.len() > 10 {
            let _ = last.remove(0);
        }
        if Instant::now() >= deadline {
            panic!(
                "{what}: connections through {port} never went only to {want:?}; last: {last:?}\n{}\n{}",
                cluster.describe().await,
                cluster.logs_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until a new connection through `port` is refused with 57P03; returns the refusal.
async fn wait_refused(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match served_by(port).await {
            Err(e) if e.starts_with("57P03") => return e,
            other => assert!(Instant::now() < deadline, "not refused: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The proxy's `tendril_proxy_standby_eligible` lines.
fn eligibility(metrics: std::net::SocketAddr) -> Vec<String> {
    let (_, body) = http_get(metrics, "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with("tendril_proxy_standby_eligible{"))
        .map(str::to_owned)
        .collect()
}

/// Writes about `mib` MiB of WAL on the master (through the first proxy).
async fn write_wal(cluster: &Cluster, mib: usize) {
    let master = connect("127.0.0.1", cluster.proxy_port()).await.unwrap();
    master
        .batch_execute("create table if not exists ballast (x text)")
        .await
        .unwrap();
    master
        .execute(
            "insert into ballast select repeat('x', 1000) from generate_series(1, $1::int)",
            &[&((mib * 1100) as i32)],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_connections_go_to_eligible_standbys_and_fall_back_as_configured() {
    // A standby whose PostgreSQL stops answering is found unhealthy when its keeper's probes
    // time out (request_timeout, twice: the pass and the report), then after fail_interval:
    // a short request_timeout keeps that within seconds.
    let spec = tuned_spec(false).replace('{', r#"{"request_timeout": "2s", "#);
    let mut cluster = Cluster::start(Options {
        sentinels: 1,
        spec,
        ..Options::default()
    })
    .await;
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], tendril_testkit::free_port()));
    let (_, _, to_master) =
        cluster.add_read_only_proxy(&["--metrics-address", &metrics.to_string()]);
    // The other proxy forwards on the kernel's pair path: the read-only listener shares
    // the forwarding paths.
    let (_, _, reject) =
        cluster.add_read_only_proxy(&["--read-only-fallback", "reject", "--forwarding", "kernel"]);
    let master_keeper = cluster.master_keeper().await.unwrap();
    let master_port = cluster.node(&master_keeper).port;
    let standbys: Vec<(String, u16)> = cluster
        .nodes
        .iter()
        .filter(|n| n.uid != master_keeper)
        .map(|n| (n.uid.clone(), n.port))
        .collect();
    let standby_ports: Vec<u16> = standbys.iter().map(|(_, p)| *p).collect();
    for port in [to_master, reject] {
        // Both standbys eligible (and the proxy started) once connections reach each.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = BTreeMap::new();
        while !standby_ports.iter().all(|p| seen.contains_key(p)) {
            let got = served_by(port).await;
            assert!(
                Instant::now() < deadline,
                "through {port}: {seen:?}, {got:?}"
            );
            match got {
                Ok(server) => *seen.entry(server).or_insert(0) += 1,
                // Still starting.
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    // 100 new connections: both standbys, evenly, never the master.
    for port in [to_master, reject] {
        let seen = spread(port, 100).await;
        eprintln!("100 read-only connections through {port}: {seen:?} (master {master_port})");
        assert!(!seen.contains_key(&master_port), "{seen:?}");
        assert_eq!(seen.values().sum::<usize>(), 100);
        for p in &standby_ports {
            let n = seen.get(p).copied().unwrap_or(0);
            assert!(
                (45..=55).contains(&n),
                "standby {p} got {n} of 100: {seen:?}"
            );
        }
    }

    // Replay paused on one standby while the master writes: it leaves eligibility; a
    // session opened on it before stays.
    let (paused_uid, paused_port) = standbys[0].clone();
    let other_port = standbys[1].1;
    let paused = connect("127.0.0.1", paused_port).await.unwrap();
    let mut open_on_paused = None;
    for _ in 0..10 {
        let c = connect("127.0.0.1", to_master).await.unwrap();
        let port: i32 = c
            .query_one("select inet_server_port()", &[])
            .await
            .unwrap()
            .get(0);
        if port as u16 == paused_port {
            open_on_paused = Some(c);
            break;
        }
    }
    let open_on_paused = open_on_paused.expect("a read-only session on the standby to pause");
    paused
        .batch_execute("select pg_wal_replay_pause()")
        .await
        .unwrap();
    write_wal(&cluster, 3).await;
    wait_served_only_by(
        &cluster,
        to_master,
        &[other_port],
        "replay paused on one standby",
    )
    .await;
    wait_served_only_by(
        &cluster,
        reject,
        &[other_port],
        "replay paused on one standby",
    )
    .await;
    let lines = eligibility(metrics);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("reason=\"lagging\"") && l.ends_with(" 0")),
        "{lines:?}"
    );
    // tendrilctl status says the same, and shows the proxies' read-only listeners.
    let status = String::from_utf8_lossy(&cluster.ctl(&["status"]).stdout).into_owned();
    let row = status
        .lines()
        .find(|l| l.starts_with(paused_uid.as_str()))
        .unwrap_or_else(|| panic!("no row for {paused_uid}:\n{status}"));
    assert!(row.contains("lagging"), "{status}");
    assert!(
        status.contains("READS") && status.contains("eligible"),
        "{status}"
    );
    assert!(
        status.contains("READ-ONLY") && status.contains(&format!("127.0.0.1:{to_master}")),
        "the proxies' read-only listeners: {status}"
    );
    let still: i32 = open_on_paused
        .query_one("select inet_server_port()", &[])
        .await
        .expect("a session on a standby that left eligibility stays open")
        .get(0);
    assert_eq!(still as u16, paused_port);

    // Resumed: it catches up and takes connections again.
    paused
        .batch_execute("select pg_wal_replay_resume()")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = spread(to_master, 6).await;
        if seen.contains_key(&paused_port) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{paused_uid} never took read-only connections again: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A cancel request on the read-only listener reaches the standby running the query.
    let client = connect("127.0.0.1", to_master).await.unwrap();
    let token = client.cancel_token();
    let sleeping = tokio::spawn(async move {
        let started = Instant::now();
        let r = client.batch_execute("select pg_sleep(60)").await;
        (r, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (result, took) = tokio::time::timeout(Duration::from_secs(20), sleeping)
        .await
        .expect("the cancelled query ends")
        .unwrap();
    let err = result.expect_err("the query was cancelled");
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57014"),
        "{err}"
    );
    assert!(took < Duration::from_secs(20), "{took:?}");

    // No standby eligible: the fallback sends to the master, or refuses saying why.
    let second = connect("127.0.0.1", standbys[1].1).await.unwrap();
    for s in [&paused, &second] {
        s.batch_execute("select pg_wal_replay_pause()")
            .await
            .unwrap();
    }
    write_wal(&cluster, 3).await;
    wait_served_only_by(&cluster, to_master, &[master_port], "both standbys behind").await;
    let refusal = wait_refused(reject).await;
    eprintln!("refused: {refusal}");
    assert!(
        refusal.contains("no standby is eligible for reads")
            && refusal.contains("further behind than max_standby_lag_for_reads"),
        "{refusal}"
    );
    // The primary listener of the rejecting proxy still reaches the master.
    let reject_primary = cluster.proxies.last().unwrap().1;
    assert_eq!(served_by(reject_primary).await.unwrap(), master_port);

    for s in [&paused, &second] {
        s.batch_execute("select pg_wal_replay_resume()")
            .await
            .unwrap();
    }
    wait_served_only_by(&cluster, reject, &standby_ports, "replay resumed on both").await;

    // Both standbys gone (their PostgreSQL stopped answering): unhealthy, out of the
    // rotation; the fallbacks again, and back once they answer.
    for (uid, _) in &standbys {
        cluster.node(uid).pause_postgres();
    }
    wait_served_only_by(&cluster, to_master, &[master_port], "both standbys stopped").await;
    let refusal = wait_refused(reject).await;
    assert!(refusal.contains("not healthy"), "{refusal}");
    for (uid, _) in &standbys {
        cluster.node(uid).thaw();
    }
    wait_served_only_by(&cluster, reject, &standby_ports, "standbys answering again").await;
    let lines = eligibility(metrics);
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("reason=\"eligible\"") && l.ends_with(" 1"))
            .count(),
        2,
        "{lines:?}"
    );
    let (_, body) = http_get(metrics, "/metrics").unwrap();
    assert!(
        body.contains("tendril_proxy_listener_connections_accepted_total{cluster=\"e2e\",listener=\"read_only\"}"),
        "{body}"
    );
}
