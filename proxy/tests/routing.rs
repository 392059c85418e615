//! The proxy with real PostgreSQL and real etcd: routing on both I/O drivers and both
//! forwarding paths (the default is kernel forwarding where it loads), re-routing and
//! fencing on a cluster-data change, no-master refusals, holding during a switchover.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use support::{Env, ProxyProc, backend_port, connect, wait_routed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_clients_on_both_io_drivers_and_both_forwarding_paths() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    for (driver, expected, forwarding) in [
        ("auto", "io_uring", "userspace"),
        ("epoll", "epoll", "userspace"),
        ("auto", "io_uring", "kernel"),
    ] {
        let proxy = ProxyProc::start(
            &env,
            &format!("p-{driver}-{forwarding}"),
            &["--io-driver", driver, "--forwarding", forwarding],
            &[],
        );
        wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
        let client = connect(proxy.port).await.unwrap();
        let n: i32 = client.query_one("SELECT 41 + 1", &[]).await.unwrap().get(0);
        assert_eq!(n, 42);
        // A result larger than the buffers, to exercise the large-transfer path.
        let rows = client
            .query(
                "SELECT repeat('x', 1000) FROM generate_series(1, 2000)",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(rows.len(), 2000);
        let metrics = proxy.metrics();
        assert!(
            metrics.contains(&format!("driver=\"{expected}\"")),
            "{driver}: {metrics}"
        );
        assert!(
            metrics.contains(&format!("strategy=\"{forwarding}\"")),
            "{forwarding}: {metrics}"
        );
        let moved = proxy
            .metric("tendril_proxy_bytes_total{cluster=\"pxy\",direction=\"to_client\"}")
            .unwrap_or(0.0);
        drop(client);
        // Userspace counts as it copies; the kernel path when the connection closes.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut counted = moved;
        while counted < 2_000_000.0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            counted = proxy
                .metric("tendril_proxy_bytes_total{cluster=\"pxy\",direction=\"to_client\"}")
                .unwrap_or(0.0);
        }
        assert!(
            counted >= 2_000_000.0,
            "{forwarding}: {counted} bytes counted"
        );
        assert!(
            proxy.log_text().contains(&format!("driver={expected}"))
                || proxy.log_text().contains(expected)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_data_write_reroutes_new_and_closes_old_connections() {
    let mut env = Env::new().await;
    let (pg1, pg2) = (support::pg(), support::pg());
    let g1 = env.route(Some(("db1", pg1.port())), false).await;
    let proxy = ProxyProc::start(&env, "p1", &[], &[]);
    env.wait_acked("p1", g1, Duration::from_secs(10)).await;
    wait_routed(proxy.port, pg1.port(), Duration::from_secs(10)).await;
    // A client that bypasses the proxy and talks to the master directly.
    let direct = connect(pg1.port()).await.unwrap();
    assert_eq!(backend_port(&direct).await, pg1.port());
    let mut old = Vec::new();
    for _ in 0..20 {
        let c = connect(proxy.port).await.unwrap();
        assert_eq!(backend_port(&c).await, pg1.port());
        old.push(c);
    }
    // The connection tracker sees every host socket to the master: 20 proxied, 1 direct.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = proxy
            .metric("tendril_proxy_host_sockets_to_backend")
            .unwrap_or(0.0);
        if seen >= 21.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "tracker saw {seen} host sockets to the master"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let put = Instant::now();
    let g2 = env.route(Some(("db2", pg2.port())), false).await;
    let deadline = put + Duration::from_secs(5);
    while old.iter().any(|c| !c.is_closed()) {
        assert!(
            Instant::now() < deadline,
            "old connections still open 5 s after the change"
        );
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let closed_after = put.elapsed();
    println!("cluster data put -> last of 20 old-master connections closed: {closed_after:?}");
    env.wait_acked("p1", g2, Duration::from_secs(5)).await;
    // The socket killer ran before the acknowledgement: the direct connection is gone too.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !direct.is_closed() {
        assert!(
            Instant::now() < deadline,
            "the direct (non-proxied) connection to the old master survived the fence"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(direct.query_one("SELECT 1", &[]).await.is_err());
    let killed =
        proxy.metric("tendril_proxy_host_sockets_killed_total{cluster=\"pxy\",mechanism=\"bpf\"}");
    assert!(killed.is_some_and(|k| k >= 1.0), "{}", proxy.metrics());
    let c = connect(proxy.port).await.unwrap();
    assert_eq!(
        backend_port(&c).await,
        pg2.port(),
        "new connections go to the new master"
    );
    assert!(
        proxy
            .metric("tendril_proxy_connections_closed_total{cluster=\"pxy\",reason=\"fenced\"}")
            .unwrap()
            >= 20.0
    );
    // An unchanged master keeps its connections when only the generation moves.
    let g3 = env.route(Some(("db2", pg2.port())), false).await;
    env.wait_acked("p1", g3, Duration::from_secs(5)).await;
    assert!(!c.is_closed());
    assert_eq!(backend_port(&c).await, pg2.port());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_master_answers_57p03_naming_the_cluster() {
    let mut env = Env::new().await;
    let g = env.route(None, false).await;
    let proxy = ProxyProc::start(&env, "p1", &[], &[]);
    env.wait_acked("p1", g, Duration::from_secs(10)).await;
    let err = connect(proxy.port).await.unwrap_err();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {err}"));
    assert_eq!(db.code().code(), "57P03");
    assert!(
        db.message().contains("no master available"),
        "{}",
        db.message()
    );
    assert!(db.message().contains(support::CLUSTER), "{}", db.message());
    // An SSLRequest or a GSSENCRequest is never answered `N` by the proxy (a client that
    // requires TLS would report "server does not support SSL"): the answer is the same
    // ErrorResponse, in place of the single byte, and clients print it as the server's error.
    for request in [
        [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f],
        [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30],
    ] {
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        raw.write_all(&request).unwrap();
        let mut reply = Vec::new();
        raw.read_to_end(&mut reply).unwrap();
        assert_eq!(reply[0], b'E', "{reply:?}");
        assert!(reply.windows(5).any(|w| w == b"57P03"));
        assert!(
            reply
                .windows(b"no master available".len())
                .any(|w| w == b"no master available")
        );
    }
    // What a user sees. libpq since 15.10 does not print an error received before TLS
    // (CVE-2024-10977: the server is not authenticated yet), so a client that asked for TLS
    // reads that the server answered with an error, never that it "does not support SSL";
    // without TLS it prints the reason.
    let psql = |sslmode: &str| {
        let out = std::process::Command::new(format!("{}/psql", tendril_testkit::PG_BIN))
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode} connect_timeout=5",
                proxy.port
            ))
            .args(["-c", "select 1"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    for sslmode in ["require", "prefer"] {
        let stderr = psql(sslmode);
        assert!(
            stderr.contains("error response during SSL exchange")
                && !stderr.contains("does not support SSL"),
            "psql sslmode={sslmode} printed: {stderr}"
        );
    }
    let stderr = psql("disable");
    assert!(
        stderr.contains("no master available"),
        "psql sslmode=disable printed: {stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_waits_for_the_new_master_during_a_switchover() {
    let mut env = Env::new().await;
    let pg = support::pg();
    let g = env.route(None, true).await;
    let proxy = ProxyProc::start(&env, "p1", &["--hold-timeout", "10s"], &[]);
    env.wait_acked("p1", g, Duration::from_secs(10)).await;
    let port = proxy.port;
    let started = Instant::now();
    let pending = tokio::spawn(async move { connect(port).await });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        !pending.is_finished(),
        "a held connection was answered before the master appeared"
    );
    env.route(Some(("db1", pg.port())), false).await;
    let client = tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    println!("held connection served after {:?}", started.elapsed());
    assert_eq!(backend_port(&client).await, pg.port());

    // Past the hold timeout the client gets the no-master error, not a hang.
    env.route(None, true).await;
    let short = ProxyProc::start(&env, "p2", &["--hold-timeout", "300ms"], &[]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let err = connect(short.port).await.unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "57P03");
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("hold timeout"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_lets_open_transactions_finish_then_cuts_the_rest() {
    let mut env = Env::new().await;
    let pg = support::pg();
    for forwarding in ["userspace", "kernel"] {
        env.route(Some(("db1", pg.port())), false).await;
        let uid = format!("drain-{forwarding}");
        let proxy = ProxyProc::start(
            &env,
            &uid,
            &[
                "--switchover-grace",
                "4s",
                "--hold-timeout",
                "20s",
                "--forwarding",
                forwarding,
            ],
            &[],
        );
        wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
        let busy = connect(proxy.port).await.unwrap();
        let idle = connect(proxy.port).await.unwrap();
        busy.batch_execute("BEGIN; SELECT 1").await.unwrap();

        // A planned switchover fences with hold: new connections wait, open ones drain.
        let fence = env.route(None, true).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let port = proxy.port;
        let held = tokio::spawn(async move { connect(port).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !held.is_finished(),
            "{forwarding}: a new connection was answered during the drain"
        );
        busy.batch_execute("SELECT pg_sleep(0.2); COMMIT")
            .await
            .unwrap_or_else(|e| panic!("{forwarding}: the open transaction was cut: {e}"));
        assert!(
            env.acked(&uid).await.is_none_or(|g| g < fence),
            "{forwarding}: the fence was acknowledged while connections were still open"
        );
        drop(busy);
        // The idle session is cut when the grace runs out, then the fence is acknowledged.
        let cut = Instant::now();
        let deadline = cut + Duration::from_secs(15);
        while idle.simple_query("SELECT 1").await.is_ok() {
            assert!(
                Instant::now() < deadline,
                "{forwarding}: the idle session never cut"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        env.wait_acked(&uid, fence, Duration::from_secs(10)).await;
        println!(
            "{forwarding}: idle session cut {:?} after the last busy one closed",
            cut.elapsed()
        );
        assert!(proxy.log_text().contains("switchover drain over"));

        // The new master appears: the held connection goes there.
        env.route(Some(("db1", pg.port())), false).await;
        let client = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(backend_port(&client).await, pg.port());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_slow_clients_affect_no_one_else() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let proxy = ProxyProc::start(&env, "p1", &[], &[]);
    wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
    let good = connect(proxy.port).await.unwrap();
    // Garbage is forwarded to PostgreSQL, which rejects it; the proxy survives.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0xff; 100],
        &[0, 0, 0, 1],
    ] {
        let mut raw = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let _ = raw.write_all(junk);
        let mut sink = Vec::new();
        let _ = raw.read_to_end(&mut sink);
    }
    // A client that connects and sends nothing does not block others.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    let n: i64 = good
        .query_one("SELECT count(*) FROM pg_class", &[])
        .await
        .unwrap()
        .get(0);
    assert!(n > 0);
    let again = connect(proxy.port).await.unwrap();
    assert_eq!(backend_port(&again).await, pg.port());
    // And with no master, garbage gets a protocol error, not a crash.
    env.route(None, false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    raw.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut reply = Vec::new();
    raw.read_to_end(&mut reply).unwrap();
    assert_eq!(reply.first(), Some(&b'E'));
    assert!(reply.windows(5).any(|w| w == b"08P01"));
    assert!(proxy.child.id() > 0 && proxy.metrics().contains("tendril_proxy_connections_active"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_open_connections_then_exits() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let mut proxy = ProxyProc::start(&env, "p1", &["--drain-timeout", "10s"], &[]);
    wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
    let client = connect(proxy.port).await.unwrap();
    let running = tokio::spawn(async move {
        client
            .query_one("SELECT pg_sleep(1.5)::text", &[])
            .await
            .map(|_| client)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // No new connections while draining.
    assert!(
        connect(proxy.port).await.is_err(),
        "accepted a connection while draining"
    );
    // The query in flight completes.
    let client = running
        .await
        .unwrap()
        .expect("the in-flight query survives the drain");
    drop(client);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(Some(status)) = proxy.child.try_wait() {
            assert!(status.success(), "proxy exited with {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not exit after its connections ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn operator_kill_command_destroys_host_sockets_to_a_peer() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let mut client = std::net::TcpStream::connect(addr).unwrap();
    let (_server, _) = listener.accept().unwrap();
    let dry = std::process::Command::new(env!("CARGO_BIN_EXE_tendril-proxy"))
        .args(["kill", "--dry-run", "--peer", &addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        dry.status.success() && text.starts_with("found 1 sockets"),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tendril-proxy"))
        .args(["kill", "--peer", &addr.to_string()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("{text}");
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with("destroyed 1 sockets"), "{text}");
    assert!(text.contains("mechanism bpf"), "{text}");
    let mut b = [0u8; 1];
    let err = client.read(&mut b).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ECONNABORTED));
    // The listener still accepts.
    let _again = std::net::TcpStream::connect(addr).unwrap();
    assert!(listener.accept().is_ok());
}

/// `/health` is what a load balancer or a Kubernetes probe asks: 200 while the proxy routes to
/// a master (or holds clients for a switchover), 503 with the reason otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_says_whether_the_proxy_can_take_clients() {
    let mut env = Env::new().await;
    let pg = support::pg();
    let g = env.route(None, false).await;
    let proxy = ProxyProc::start(&env, "health", &[], &[]);
    env.wait_acked("health", g, Duration::from_secs(10)).await;
    let (status, why) = proxy.health();
    assert_eq!(status, 503, "{why}");
    assert!(why.starts_with("no master in the cluster data"), "{why}");
    let g = env.route(Some(("db1", pg.port())), false).await;
    env.wait_acked("health", g, Duration::from_secs(10)).await;
    let (status, what) = proxy.health();
    assert_eq!(status, 200, "{what}");
    assert!(
        what.starts_with(&format!("routing to db1 at 127.0.0.1:{}", pg.port())),
        "{what}"
    );
    let g = env.route(None, true).await;
    env.wait_acked("health", g, Duration::from_secs(10)).await;
    let (status, what) = proxy.health();
    assert_eq!(status, 200, "{what}");
    assert!(what.starts_with("holding new connections"), "{what}");
    // Shutting down: unhealthy at once, while open connections drain.
    let g = env.route(Some(("db1", pg.port())), false).await;
    env.wait_acked("health", g, Duration::from_secs(10)).await;
    let _open = connect(proxy.port).await.unwrap();
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, why) = proxy.health();
        if status == 503 {
            assert!(why.starts_with("draining"), "{why}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still healthy while draining: {why}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
