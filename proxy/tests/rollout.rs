//! Replacing the proxy on a host: a new process started beside the running one, with the same
//! listen address, takes no client before it has read its routing table (the running one
//! takes them all meanwhile), then shares the address, and serves alone once the old one
//! drained and exited. Its metrics address can be the same as the old one's too.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use support::{Env, ProxyProc, backend_port, connect, wait_routed};

/// Connects and asks once, `n` times; the failures, each with how it failed.
async fn clients(port: u16, n: usize) -> Vec<String> {
    let mut failed = Vec::new();
    for i in 0..n {
        let attempt = async {
            let c = connect(port).await.map_err(|e| e.to_string())?;
            c.simple_query("select 1")
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("client {i}: {e}")),
            Err(_) => failed.push(format!("client {i}: no answer within 5 s")),
        }
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_beside_a_running_one_takes_clients_only_once_it_can_route() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let mut old = ProxyProc::start(&env, "p1", &[], &[]);
    wait_routed(old.port, pg.port(), Duration::from_secs(10)).await;
    let listen = format!("127.0.0.1:{}", old.port);
    let same = ["--listen-address", listen.as_str()];

    // A process that cannot reach the store never gets its routing table: it must leave
    // every client to the running one (else it would hold them, then refuse them).
    let unready = ProxyProc::start(
        &env,
        "p2",
        &same,
        &[("TENDRIL_STORE_ENDPOINTS", "http://127.0.0.1:1")],
    );
    assert!(
        unready
            .log_text()
            .contains("another process listens on this address"),
        "{}",
        unready.log_text()
    );
    let failed = clients(old.port, 60).await;
    assert!(
        failed.is_empty(),
        "with a process beside that cannot route yet: {failed:?}"
    );
    drop(unready);

    // One that reads its table joins, then serves alone once the old one has gone. The
    // same metrics address as the old one's is no conflict.
    let metrics = format!("127.0.0.1:{}", old.metrics_port);
    let new = ProxyProc::start(
        &env,
        "p3",
        &[same[0], same[1], "--metrics-address", &metrics],
        &[],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !new.log_text().contains("routing table read: accepting") {
        assert!(
            std::time::Instant::now() < deadline,
            "the new proxy did not start accepting:\n{}",
            new.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    old.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while old.child.try_wait().unwrap().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the old proxy did not exit:\n{}",
            old.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = clients(new.port, 20).await;
    assert!(failed.is_empty(), "after the old proxy exited: {failed:?}");
    let c = connect(new.port).await.unwrap();
    assert_eq!(backend_port(&c).await, pg.port());
}
