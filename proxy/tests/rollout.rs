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

/// New connections (one `select 1` each) in `loops` tasks until `stop`; every failure with
/// how it failed, and how many succeeded.
fn connect_loops(
    port: u16,
    loops: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    use std::sync::atomic::Ordering;
    tokio::spawn(async move {
        let tasks: Vec<_> = (0..loops)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !stop.load(Ordering::Relaxed) {
                        let f = clients(port, 1).await;
                        if f.is_empty() {
                            ok += 1;
                        }
                        failed.extend(f);
                    }
                    (ok, failed)
                })
            })
            .collect();
        let (mut ok, mut failed) = (0, Vec::new());
        for t in tasks {
            let (o, f) = t.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        (ok, failed)
    })
}

async fn wait_log(p: &ProxyProc, what: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while !p.log_text().contains(what) {
        assert!(
            std::time::Instant::now() < deadline,
            "proxy {} did not log {what:?}:\n{}",
            p.uid,
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_exit(p: &mut ProxyProc, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "proxy {} did not exit:\n{}",
            p.uid,
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn accepted(p: &ProxyProc) -> u64 {
    p.metrics()
        .lines()
        .find(|l| l.starts_with("tendril_proxy_connections_accepted_total"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Three takeovers in a row (default forwarding, then the epoll driver in userspace, then the
/// default again) under new connections in a loop and an open session on the old process:
/// no connect fails, the session keeps working on the old process until it closes it, the
/// old process then exits by itself, and the new one serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_moves_the_listening_sockets_without_failing_a_client() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let mut old = ProxyProc::start(&env, "r0", &["--workers", "2"], &[]);
    wait_routed(old.port, pg.port(), Duration::from_secs(10)).await;
    let listen = format!("127.0.0.1:{}", old.port);
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let loops = connect_loops(old.port, 3, stop.clone());
    let rounds: [&[&str]; 3] = [
        &["--workers", "1"],
        &[
            "--workers",
            "3",
            "--io-driver",
            "epoll",
            "--forwarding",
            "userspace",
        ],
        &[],
    ];
    for (i, flags) in rounds.iter().enumerate() {
        let session = connect(old.port).await.unwrap();
        session.simple_query("select 1").await.unwrap();
        let mut args = vec!["--listen-address", listen.as_str(), "--takeover"];
        args.extend_from_slice(flags);
        let new = ProxyProc::start(&env, &format!("r{}", i + 1), &args, &[]);
        wait_log(
            &new,
            "took over: the old proxy stops accepting",
            Duration::from_secs(10),
        )
        .await;
        wait_log(
            &old,
            "a new proxy took over the listening sockets",
            Duration::from_secs(5),
        )
        .await;
        // The old process serves what it has until it ends.
        for _ in 0..20 {
            session.simple_query("select 1").await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(session);
        let status = wait_exit(&mut old, Duration::from_secs(10)).await;
        assert!(status.success(), "old proxy: {status}\n{}", old.log_text());
        let before = accepted(&new);
        assert!(clients(new.port, 5).await.is_empty());
        assert!(
            accepted(&new) >= before + 5,
            "round {i}: the new proxy did not accept the clients:\n{}",
            new.metrics()
        );
        old = new;
    }
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = loops.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} connects failed: {failed:?}",
        failed.len()
    );
    assert!(ok > 30, "only {ok} connects in the loops");
    let c = connect(old.port).await.unwrap();
    assert_eq!(backend_port(&c).await, pg.port());
}

/// A taker that never reads its routing table (the store unreachable) and is then killed
/// changes nothing: the old process takes every client meanwhile and after, and answers the
/// next taker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taker_that_cannot_route_leaves_the_old_proxy_serving() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let mut old = ProxyProc::start(&env, "t0", &[], &[]);
    wait_routed(old.port, pg.port(), Duration::from_secs(10)).await;
    let listen = format!("127.0.0.1:{}", old.port);
    let args = ["--listen-address", listen.as_str(), "--takeover"];
    let stuck = ProxyProc::start(
        &env,
        "t1",
        &args,
        &[("TENDRIL_STORE_ENDPOINTS", "http://127.0.0.1:1")],
    );
    wait_log(
        &old,
        "a new proxy asks for the listening sockets",
        Duration::from_secs(5),
    )
    .await;
    let failed = clients(old.port, 40).await;
    assert!(
        failed.is_empty(),
        "with a taker that cannot route: {failed:?}"
    );
    drop(stuck);
    let failed = clients(old.port, 20).await;
    assert!(failed.is_empty(), "after the taker died: {failed:?}");
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "{}",
        old.log_text()
    );
    let mut new = ProxyProc::start(&env, "t2", &args, &[]);
    wait_log(
        &new,
        "took over: the old proxy stops accepting",
        Duration::from_secs(10),
    )
    .await;
    wait_exit(&mut old, Duration::from_secs(10)).await;
    assert!(clients(new.port, 5).await.is_empty());
    assert!(new.child.try_wait().unwrap().is_none());
}

/// `--takeover` with no proxy on the address fails at once and says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_without_a_running_proxy_says_so() {
    let env = Env::new().await;
    let port = tendril_testkit::free_port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tendril-proxy"))
        .env("TENDRIL_CLUSTER_NAME", support::CLUSTER)
        .env("TENDRIL_STORE_ENDPOINTS", env.etcd.endpoint())
        .args([
            "--listen-address",
            &format!("127.0.0.1:{port}"),
            "--takeover",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "--takeover: no running tendril-proxy answers for 127.0.0.1:{port}"
        )),
        "{stderr}"
    );
}

/// A failover while the old process drains after a takeover: both processes follow the store,
/// each cuts its own connections to the old master and acknowledges for its own uid (the
/// new one, started with the same `--uid`, takes `UID-b`), and new clients reach the new
/// master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_during_a_takeover_is_fenced_in_both_processes() {
    let mut env = Env::new().await;
    let (pg1, pg2) = (support::pg(), support::pg());
    let g1 = env.route(Some(("db1", pg1.port())), false).await;
    let old = ProxyProc::start(&env, "same", &[], &[]);
    env.wait_acked("same", g1, Duration::from_secs(10)).await;
    let listen = format!("127.0.0.1:{}", old.port);
    let on_old = connect(old.port).await.unwrap();
    assert_eq!(backend_port(&on_old).await, pg1.port());
    let new = ProxyProc::start(
        &env,
        "same",
        &["--listen-address", listen.as_str(), "--takeover"],
        &[],
    );
    wait_log(
        &new,
        "took over: the old proxy stops accepting",
        Duration::from_secs(10),
    )
    .await;
    assert!(new.log_text().contains("same-b"), "{}", new.log_text());
    env.wait_acked("same-b", g1, Duration::from_secs(10)).await;
    let on_new = connect(new.port).await.unwrap();
    assert_eq!(backend_port(&on_new).await, pg1.port());
    // The old process is draining (it still serves its session) when the master changes.
    on_old.simple_query("select 1").await.unwrap();
    let g2 = env.route(Some(("db2", pg2.port())), false).await;
    env.wait_acked("same-b", g2, Duration::from_secs(10)).await;
    for (which, c) in [("old", &on_old), ("new", &on_new)] {
        let r = tokio::time::timeout(Duration::from_secs(5), c.simple_query("select 1")).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "the {which} process's connection to the old master survived the fence: {r:?}"
        );
    }
    // The old process acknowledged for its own uid before it cut its last connection and
    // exited (its registration ends with its lease).
    let mut old = old;
    let status = wait_exit(&mut old, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    let log = old.log_text();
    assert!(
        log.contains("fence complete: every connection to the old master is closed")
            && !log.contains("did not acknowledge the fence"),
        "{log}"
    );
    let c = connect(new.port).await.unwrap();
    assert_eq!(backend_port(&c).await, pg2.port());
}
