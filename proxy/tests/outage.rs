//! The store goes away: a hiccup shorter than the lease drops no connection; a longer outage
//! makes the proxy fence itself before its lease expires, and it routes again once the store
//! is back.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::{Duration, Instant};

use support::{Env, ProxyProc, backend_port, connect, wait_routed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_store_outage_keeps_connections_long_one_fences() {
    let mut env = Env::new().await;
    let pg = support::pg();
    let g = env.route(Some(("db1", pg.port())), false).await;
    // Lease TTL = the spec's proxy_timeout (5 s): fence after 4 s without renewal.
    let proxy = ProxyProc::start(&env, "p1", &[], &[]);
    env.wait_acked("p1", g, Duration::from_secs(10)).await;
    wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
    let mut clients = Vec::new();
    for _ in 0..5 {
        clients.push(connect(proxy.port).await.unwrap());
    }

    // A 2 s freeze of etcd: nothing happens to the connections.
    env.etcd.pause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    env.etcd.resume();
    for c in &clients {
        assert_eq!(
            backend_port(c).await,
            pg.port(),
            "a short store hiccup dropped a connection"
        );
    }
    assert!(
        !proxy.log_text().contains("fencing this proxy"),
        "{}",
        proxy.log_text()
    );

    // etcd down for good: the proxy fences itself within 80 % of the TTL plus a renewal period.
    env.etcd.kill();
    let down = Instant::now();
    let deadline = down + Duration::from_secs(8);
    while clients.iter().any(|c| !c.is_closed()) {
        assert!(
            Instant::now() < deadline,
            "connections survived a store outage past the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fenced_after = down.elapsed();
    println!("store down -> self-fence closed every connection after {fenced_after:?}");
    assert!(
        fenced_after < Duration::from_secs(5),
        "fenced only after the lease could have expired"
    );
    let err = connect(proxy.port).await.unwrap_err();
    let db = err.as_db_error().unwrap();
    assert_eq!(db.code().code(), "57P03");
    assert!(
        db.message().contains("cannot reach the store"),
        "{}",
        db.message()
    );

    // The store comes back: routing resumes by itself.
    env.etcd.restart();
    wait_routed(proxy.port, pg.port(), Duration::from_secs(20)).await;
}

/// A proxy that starts while the store does not answer has no routing table yet: it holds its
/// first clients, as during a switchover, and serves them once it reads the table, instead of
/// refusing them; past the hold timeout it refuses, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_starting_proxy_holds_clients_until_it_reads_its_routing_table() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    env.etcd.pause();
    let proxy = ProxyProc::start(&env, "p1", &["--hold-timeout", "20s"], &[]);
    let impatient = ProxyProc::start(&env, "p2", &["--hold-timeout", "1s"], &[]);
    let port = proxy.port;
    let held = tokio::spawn(async move { connect(port).await });
    let refused = connect(impatient.port).await.unwrap_err();
    let db = refused.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "57P03");
    assert!(
        db.message().contains("has not read its routing table"),
        "{}",
        db.message()
    );
    assert!(
        !held.is_finished(),
        "the client of a starting proxy was answered before the proxy had a route"
    );
    env.etcd.resume();
    let client = tokio::time::timeout(Duration::from_secs(20), held)
        .await
        .expect("the held client was served once the store answered")
        .unwrap()
        .expect("the held client connects");
    assert_eq!(backend_port(&client).await, pg.port());
}
