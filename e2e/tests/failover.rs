//! End-to-end failover with real processes. Each test runs a writer through the proxy that
//! records every acknowledged id, applies a fault, and checks: no acknowledged id missing
//! (synchronous mode), never two masters routable, and logs the time from the fault to the
//! first successful write through the proxy.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::time::{Duration, Instant};

use tendril_e2e::writer::{Mode, Style, Writer};
use tendril_e2e::{Cluster, Options, default_spec};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_three_keepers_a_row_reaches_every_standby() {
    let cluster = Cluster::start(Options::default()).await;
    let client = tendril_e2e::connect("127.0.0.1", cluster.proxy_port())
        .await
        .unwrap();
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let counts = cluster.count_on_each("SELECT count(*) FROM t").await;
        if counts.values().all(|c| *c == Some(1)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the row did not reach every node: {counts:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let status = cluster.ctl(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    println!("{text}");
    assert!(status.status.success());
    assert_eq!(text.matches("streaming").count(), 2, "{text}");
    assert!(text.contains("accepting writes"), "{text}");
    cluster.assert_never_two_masters_routable();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_postmaster_is_restarted_in_place() {
    let cluster = Cluster::start(Options {
        spec: default_spec(true),
        ..Options::default()
    })
    .await;
    let writer = Writer::start(cluster.proxy_port(), 2, Mode::Persistent).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let master = cluster.master_keeper().await.unwrap();
    let fault = Instant::now();
    let old_pid = cluster.node(&master).kill_postmaster();
    // Wait until postgres was restarted (new postmaster) and writes flow through it.
    let node = cluster.node(&master);
    let deadline = Instant::now() + Duration::from_secs(60);
    while node.postmaster_pid().is_none_or(|p| p == old_pid) {
        assert!(Instant::now() < deadline, "postgres was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let restarted = Instant::now();
    writer
        .wait_success_after(restarted, Duration::from_secs(60))
        .await
        .expect("writes resume");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = writer.stop().await;
    println!(
        "postmaster kill -9: longest write outage {:?}",
        report.max_gap_after(fault).unwrap_or_default()
    );
    cluster.assert_no_acked_write_lost(&report.ids()).await;
    cluster.assert_never_two_masters_routable();
}

async fn failover_after(
    fault_name: &str,
    apply: impl FnOnce(&mut Cluster, &str),
) -> (Cluster, String, String) {
    let mut cluster = Cluster::start(Options {
        spec: default_spec(true),
        ..Options::default()
    })
    .await;
    let writer = Writer::start(cluster.proxy_port(), 2, Mode::Persistent).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = cluster.master_keeper().await.unwrap();
    let fault = Instant::now();
    apply(&mut cluster, &old);
    let new = cluster.wait_new_master(&old, Duration::from_secs(60)).await;
    let published = Instant::now();
    writer
        .wait_success_after(published, Duration::from_secs(30))
        .await
        .expect("writes resume");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = writer.stop().await;
    println!(
        "{fault_name}: new master {new}; longest write outage {:?}, published {:?} after the fault",
        report.max_gap_after(fault).unwrap_or_default(),
        published - fault
    );
    cluster.assert_no_acked_write_lost(&report.ids()).await;
    cluster.assert_never_two_masters_routable();
    (cluster, old, new)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_master_keeper_fails_over_and_the_old_master_rejoins() {
    let (mut cluster, old, _) =
        failover_after("master keeper kill -9", |c, m| c.node_mut(m).kill_keeper()).await;
    // The keeper comes back: it stops the postgres it left running and rejoins as a standby.
    cluster.node_mut(&old).restart_keeper();
    cluster.wait_healthy(3, Duration::from_secs(90)).await;
    let cd = cluster.cluster_data().await;
    let db = cd.dbs.values().find(|d| d.spec.keeper_uid == old).unwrap();
    assert_eq!(db.spec.role, tendril_control_model::DbRole::Standby);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_master_host_fails_over_and_rejoins_by_rewind() {
    let (cluster, old, _) =
        failover_after("frozen master host (SIGSTOP)", |c, m| c.node(m).freeze()).await;
    cluster.node(&old).thaw();
    cluster.wait_healthy(3, Duration::from_secs(90)).await;
    let log = cluster.node(&old).keeper.log_text();
    assert!(
        log.contains("resync by pg_rewind"),
        "the old master did not rejoin by pg_rewind:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_master_fails_over_and_rejoins_when_healed() {
    let mut cluster = Cluster::start(Options {
        spec: default_spec(true),
        partitionable: true,
        ..Options::default()
    })
    .await;
    // k0 is in the network namespace; make sure it is the master.
    cluster.make_master("k0").await;
    let writer = Writer::start(cluster.proxy_port(), 2, Mode::Persistent).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let fault = Instant::now();
    cluster.netns.as_ref().unwrap().partition();
    let new = cluster.wait_new_master("k0", Duration::from_secs(60)).await;
    let published = Instant::now();
    writer
        .wait_success_after(published, Duration::from_secs(30))
        .await
        .expect("writes resume");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = writer.stop().await;
    println!(
        "network partition of the master: new master {new}; longest write outage {:?}",
        report.max_gap_after(fault).unwrap_or_default()
    );
    cluster.assert_no_acked_write_lost(&report.ids()).await;
    cluster.assert_never_two_masters_routable();
    cluster.netns.as_ref().unwrap().heal();
    cluster.wait_healthy(3, Duration::from_secs(120)).await;
    let _ = &mut cluster;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_leader_killed_during_a_failover() {
    let (_cluster, _, _) =
        failover_after("master keeper killed, then the sentinel leader", |c, m| {
            c.node_mut(m).kill_keeper();
            // Kill whichever sentinel leads, once the failure is being handled.
            let leader = c
                .sentinels
                .iter()
                .position(|s| s.log_text().contains("elected leader"))
                .unwrap();
            std::thread::sleep(Duration::from_secs(5));
            c.sentinels[leader].kill();
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_restarted_during_a_failover() {
    let (_cluster, _, _) = failover_after(
        "master keeper killed, proxy restarted mid-failover",
        |c, m| {
            c.node_mut(m).kill_keeper();
            std::thread::sleep(Duration::from_secs(5));
            c.restart_proxy(0);
        },
    )
    .await;
}

/// Persistent sessions over TLS, as a connection pool keeps them: each transaction spans
/// several round trips, with a pause between transactions. The proxy cannot see where a
/// transaction ends inside TLS; the old master's keeper ends each session once it is idle
/// between transactions, the client sees it closed before its next transaction and connects
/// again (held until the new master is routable). No transaction fails, and no session is
/// left for the proxy to cut when its grace ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_closes_persistent_tls_sessions_between_transactions() {
    let certs = tempfile::tempdir().unwrap();
    let tls = tendril_testkit::make_certificates_for_postgres(certs.path());
    let spec = format!(
        r#"{{"synchronous_replication": true, "use_pg_rewind": true,
            "pg_parameters": {{"ssl": "on", "ssl_cert_file": "{}", "ssl_key_file": "{}"}}}}"#,
        tls.server_cert.display(),
        tls.server_key.display()
    );
    let cluster = Cluster::start(Options {
        spec,
        ..Options::default()
    })
    .await;
    let style = Style {
        tls_ca: Some(tls.ca_cert.clone()),
        in_transaction: Some(Duration::from_millis(20)),
        think: Duration::from_millis(100),
        login: None,
    };
    let writer = Writer::start_styled(
        "127.0.0.1",
        cluster.proxy_port(),
        4,
        Mode::Persistent,
        1,
        style,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = writer.snapshot();
    assert!(
        before.failures.is_empty() && before.acked.len() > 20,
        "the TLS writers work before the switchover: {before:?}"
    );
    let old = cluster.master_keeper().await.unwrap();
    let out = cluster.ctl(&["switchover"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new = cluster.master_keeper().await.unwrap();
    assert_ne!(new, old);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = writer.stop().await;
    assert!(
        report.failures.is_empty(),
        "{} failed transactions: {:?}",
        report.failures.len(),
        report.failures
    );
    assert!(
        report.first_ack_on(cluster.node(&new).port).is_some(),
        "the sessions reconnected to the new master"
    );
    assert!(
        report.connections > 4,
        "the sessions to the old master were closed and opened again: {} connections",
        report.connections
    );
    // Every session ended at an idle moment: the proxy's drain had nothing left to cut.
    let proxy_log = cluster.proxies[0].0.log_text();
    let drain = proxy_log
        .lines()
        .find(|l| l.contains("switchover drain over"))
        .unwrap_or_else(|| panic!("the proxy drained:\n{proxy_log}"));
    assert!(drain.contains(" left=0"), "{drain}");
    let keeper_log = cluster.node(&old).keeper.log_text();
    assert!(
        keeper_log.contains("ending client sessions as they go idle"),
        "{keeper_log}"
    );
    cluster.assert_no_acked_write_lost(&report.ids()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_under_load_holds_instead_of_failing() {
    let cluster = Cluster::start(Options {
        spec: default_spec(true),
        ..Options::default()
    })
    .await;
    let writer = Writer::start(cluster.proxy_port(), 4, Mode::PerTransaction).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = cluster.master_keeper().await.unwrap();
    let before = writer.snapshot().failures.len();
    let started = Instant::now();
    let out = cluster.ctl(&["switchover"]);
    let text = String::from_utf8_lossy(&out.stdout);
    println!("tendrilctl switchover: {}", text.trim());
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("held for"), "the pause is printed: {text}");
    let new = cluster.master_keeper().await.unwrap();
    assert_ne!(new, old);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = writer.stop().await;
    // The proxies drain: transactions in flight when they fenced finish on the old master
    // (which hands everything to the new one before it is promoted), new ones are held.
    assert_none_failed(&report, before, started, "during the switchover");
    println!(
        "switchover: 0 failed transactions, longest write gap {:?}",
        report.max_gap_after(started)
    );
    cluster.assert_no_acked_write_lost(&report.ids()).await;

    // A switchover to the asynchronous standby: the sentinel makes it synchronous first.
    cluster.wait_healthy(3, Duration::from_secs(90)).await;
    let writer = Writer::start(cluster.proxy_port(), 2, Mode::PerTransaction).await;
    let cd = cluster.cluster_data().await;
    let master_db = &cd.dbs[cd.master.as_ref().unwrap()];
    let target = cd
        .dbs
        .values()
        .find(|d| d.uid != master_db.uid && !master_db.spec.synchronous_standbys.contains(&d.uid))
        .map(|d| d.spec.keeper_uid.clone())
        .expect("one of the two standbys is asynchronous (max_synchronous_standbys 1)");
    let out = cluster.ctl(&["switchover", "--to", &target]);
    assert!(
        out.status.success(),
        "switchover to the asynchronous {target}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        cluster.master_keeper().await.as_deref(),
        Some(target.as_str())
    );
    let events: String = cluster.sentinels.iter().map(|s| s.log_text()).collect();
    assert!(
        events.contains("synchronous standby before switching"),
        "the target was made synchronous first:\n{events}"
    );
    let report = writer.stop().await;
    cluster.assert_no_acked_write_lost(&report.ids()).await;
    cluster.assert_never_two_masters_routable();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_keeper_stopped_switches_over_first() {
    // As a Kubernetes pod deletion or a host shutdown stops a keeper: SIGTERM, with
    // --switchover-on-stop (the manifests set it).
    // Three keepers: with synchronous replication, the new master needs a standby besides
    // the one that is stopping.
    let mut cluster = Cluster::start(Options {
        sentinels: 1,
        spec: default_spec(true),
        keeper_env: vec![("TENDRIL_SWITCHOVER_ON_STOP".into(), "30s".into())],
        ..Options::default()
    })
    .await;
    let writer = Writer::start(cluster.proxy_port(), 4, Mode::PerTransaction).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let old = cluster.master_keeper().await.unwrap();
    let before = writer.snapshot().failures.len();
    let started = Instant::now();
    cluster.node_mut(&old).keeper.stop();
    let new = cluster.wait_new_master(&old, Duration::from_secs(30)).await;
    assert_ne!(new, old);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = writer.stop().await;
    // A switchover, not a failover: the proxies held new transactions and nothing failed.
    assert_none_failed(
        &report,
        before,
        started,
        "while the master's keeper stopped",
    );
    let events = cluster.cluster_data().await.events;
    assert!(
        events.iter().any(|e| e.kind == "switchover done"),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| e.reason.contains("unhealthy for longer")),
        "a failover: {events:?}"
    );
    assert!(
        cluster
            .node(&old)
            .keeper
            .log_text()
            .contains("asked for a switchover away from this master"),
        "{}",
        cluster.node(&old).keeper.log_text()
    );
    cluster.assert_no_acked_write_lost(&report.ids()).await;
}

/// Fails the test if the writer has failures from the `before`-th on that happened at
/// `started` or later.
fn assert_none_failed(
    report: &tendril_e2e::writer::Report,
    before: usize,
    started: Instant,
    during: &str,
) {
    let failed: Vec<_> = report.failures[before..]
        .iter()
        .filter(|(at, _)| *at >= started)
        .collect();
    assert!(
        failed.is_empty(),
        "{} failed transactions {during}: {failed:?}",
        failed.len()
    );
}
