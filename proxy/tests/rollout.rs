//! Replacing the proxy on a host: a new process started beside the running one, with the same
//! listen address, takes no client before it has read its routing table (the running one
//! takes them all meanwhile), then shares the address, and serves alone once the old one
//! drained and exited. Its metrics address can be the same as the old one's too.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use support::loops::{ConnectLoops, clients, wait_exit, wait_handover, wait_log, wait_took_over};
use support::wire::{End, WireClient};
use support::{Env, ProxyProc, backend_port, connect, wait_routed};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_started_beside_a_running_one_takes_clients_only_once_it_can_route() {
    let (env, pg, mut old, listen) = support::routed_proxy("p1").await;
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
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let mut old = ProxyProc::start(&env, "r0", &["--workers", "2"], &[]);
    wait_routed(old.port, pg.port(), Duration::from_secs(10)).await;
    let listen = format!("127.0.0.1:{}", old.port);
    let loops = ConnectLoops::start(old.port, 3);
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
        wait_handover(&new, &old, "a new proxy took over the listening sockets").await;
        for _ in 0..20 {
            session.simple_query("select 1").await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if i == 0 {
            // Default forwarding on both sides: the session's connection moved to the new
            // process (kernel_handover.rs), and the old one exits while it is open.
            let status = wait_exit(&mut old, Duration::from_secs(10)).await;
            assert!(status.success(), "old proxy: {status}\n{}", old.log_text());
            session.simple_query("select 1").await.unwrap();
        } else {
            // Into or out of userspace: the old process serves what it has until it ends.
            assert!(
                old.child.try_wait().unwrap().is_none(),
                "the old process ended early"
            );
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
    loops.finish(30).await;
    let c = connect(old.port).await.unwrap();
    assert_eq!(backend_port(&c).await, pg.port());
}

/// A taker that never reads its routing table (the store unreachable) and is then killed
/// changes nothing: the old process takes every client meanwhile and after, and answers the
/// next taker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taker_that_cannot_route_leaves_the_old_proxy_serving() {
    let (env, _pg, mut old, listen) = support::routed_proxy("t0").await;
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
    wait_took_over(&new).await;
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
    let mut stays = WireClient::blocking_session(old.port);
    let new = ProxyProc::start(
        &env,
        "same",
        &["--listen-address", listen.as_str(), "--takeover"],
        &[],
    );
    wait_took_over(&new).await;
    assert!(new.log_text().contains("same-b"), "{}", new.log_text());
    env.wait_acked("same-b", g1, Duration::from_secs(10)).await;
    let on_new = connect(new.port).await.unwrap();
    assert_eq!(backend_port(&on_new).await, pg1.port());
    // While the old process drains, local clients are the new one's own: its programs
    // capture them (the client-socket path), not the old process's.
    for _ in 0..5 {
        let c = connect(new.port).await.unwrap();
        c.simple_query("select 1").await.unwrap();
    }
    assert!(new.path_total("client_socket") >= 6.0, "{}", new.metrics());
    let elsewhere: f64 = new
        .metrics()
        .lines()
        .filter(|l| l.contains("reason=\"client_elsewhere\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(
        elsewhere, 0.0,
        "local clients captured by the draining process's programs"
    );
    // The old process is draining when the master changes: it still serves a session
    // that stays with it (a blocking reader, forwarded in userspace). `on_old` was on the
    // client-socket path: it moved to the new process, which must cut it.
    on_old.simple_query("select 1").await.unwrap();
    assert_eq!(
        stays.select_one(),
        End::Open,
        "the session on the old process"
    );
    let g2 = env.route(Some(("db2", pg2.port())), false).await;
    env.wait_acked("same-b", g2, Duration::from_secs(10)).await;
    for (which, c) in [("moved", &on_old), ("new", &on_new)] {
        let r = tokio::time::timeout(Duration::from_secs(5), c.simple_query("select 1")).await;
        assert!(
            matches!(r, Ok(Err(_))),
            "the {which} connection to the old master survived the fence: {r:?}"
        );
    }
    let end = stays.select_one();
    assert!(
        matches!(end, End::Eof | End::Reset),
        "the old process's connection to the old master survived the fence: {end:?}"
    );
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

/// Kills a process the test did not spawn (the one a re-execution started) when dropped.
struct Pid(i32);

impl Drop for Pid {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The next notice a service manager would get on `socket`.
fn notice(socket: &std::os::unix::net::UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket.recv(&mut buf).expect("no notice within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// What `systemctl reload` does with the shipped unit (its `ExecReload`, SIGUSR2 to the main
/// process; run here as the unit says): the proxy starts itself again
/// with `--takeover`; the new process takes the sockets, tells the service manager it is
/// the main process and ready (`MAINPID=`, `READY=1` on `NOTIFY_SOCKET`), and the old one
/// exits. No connect fails meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_restarts_the_proxy_in_place_and_notifies_the_service_manager() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    let mut old = ProxyProc::start(
        &env,
        "u0",
        &[],
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    );
    assert_eq!(notice(&socket), "READY=1");
    wait_routed(old.port, pg.port(), Duration::from_secs(10)).await;
    let loops = ConnectLoops::start(old.port, 3);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // `systemctl reload`: what the shipped unit's ExecReload says, for the main pid.
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/systemd/tendril-proxy.service"
    ))
    .unwrap();
    for line in ["Type=notify", "NotifyAccess=all"] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    let reload = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecReload="))
        .expect("the unit has an ExecReload")
        .replace("$MAINPID", &old.child.id().to_string());
    let ran = std::process::Command::new("bash")
        .args(["-c", &reload])
        .status()
        .unwrap();
    assert!(ran.success(), "{reload}: {ran}");
    let ready = tokio::task::block_in_place(|| notice(&socket));
    let pid: i32 = ready
        .strip_prefix("MAINPID=")
        .and_then(|r| r.strip_suffix("\nREADY=1"))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected notice {ready:?}:\n{}", old.log_text()));
    let _new = Pid(pid);
    assert_ne!(pid, old.child.id() as i32);
    let status = wait_exit(&mut old, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    loops.finish(10).await;
    // The new process (same flags, same log) serves alone.
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "{}",
        old.log_text()
    );
    let c = connect(old.port).await.unwrap();
    assert_eq!(backend_port(&c).await, pg.port());
    assert!(
        old.log_text()
            .contains("SIGUSR2: started a new process to take over")
    );
}

#[test]
fn version_is_printed() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tendril-proxy"))
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("tendril-proxy {}", env!("CARGO_PKG_VERSION"))
    );
}

/// `pgbench` with a new connection per transaction (`-C -c 8`) and with persistent
/// connections (`-c 8`) at once, while the proxy is replaced three times in a row by
/// `--takeover`, with the default forwarding, in userspace and on the kernel pair path: no
/// transaction fails, no client aborts, and every replaced process exits once its
/// connections ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_takeovers_under_pgbench_fail_no_transaction() {
    let mut env = Env::new().await;
    let pg = support::pg();
    support::pgbench_init(pg.port());
    env.route(Some(("db1", pg.port())), false).await;
    for (name, flags) in [
        ("default", &[][..]),
        ("userspace", &["--forwarding", "userspace"][..]),
        (
            "kernel-pair",
            &["--forwarding", "kernel", "--kernel-client-socket", "off"][..],
        ),
    ] {
        let mut old = ProxyProc::start(&env, &format!("{name}0"), flags, &[]);
        wait_routed(old.port, pg.port(), Duration::from_secs(10)).await;
        let listen = format!("127.0.0.1:{}", old.port);
        let runs = [
            support::pgbench(&["-C", "-S", "-c", "8", "-j", "2", "-T", "8"], old.port),
            support::pgbench(&["-S", "-c", "8", "-j", "2", "-T", "8"], old.port),
        ];
        let mut replaced = Vec::new();
        for i in 1..=3 {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            if name == "kernel-pair" {
                // Its clients took the pair path (its metrics port closes at the handover).
                assert!(old.path_total("pair") > 0.0, "{}", old.metrics());
            }
            let mut args = vec!["--listen-address", listen.as_str(), "--takeover"];
            args.extend_from_slice(flags);
            let new = ProxyProc::start(&env, &format!("{name}{i}"), &args, &[]);
            wait_took_over(&new).await;
            replaced.push(std::mem::replace(&mut old, new));
        }
        for run in runs {
            let (status, text) = support::finished(run).await;
            assert!(status.success(), "{name}: pgbench failed:\n{text}");
            assert!(
                !text.contains("error") && !text.contains("abort"),
                "{name}: a transaction or a client failed:\n{text}"
            );
            let served = support::pgbench_processed(&text);
            assert!(served > 100, "{name}: only {served} transactions:\n{text}");
        }
        if name == "kernel-pair" {
            assert!(old.path_total("pair") > 0.0, "{}", old.metrics());
        }
        for mut p in replaced {
            let status = wait_exit(&mut p, Duration::from_secs(10)).await;
            assert!(status.success(), "{name}: {status}");
        }
    }
}

/// The old process killed mid-handover (after it passed its sockets, before the new one
/// could route): the new one accepts at once and treats clients as a proxy that just
/// started does (held, then refused with the reason), so none waits in a queue forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_proxy_killed_mid_handover_leaves_no_client_waiting() {
    let (env, _pg, old, listen) = support::routed_proxy("k0").await;
    let new = ProxyProc::start(
        &env,
        "k1",
        &[
            "--listen-address",
            listen.as_str(),
            "--takeover",
            "--hold-timeout",
            "1s",
        ],
        &[("TENDRIL_STORE_ENDPOINTS", "http://127.0.0.1:1")],
    );
    wait_log(
        &old,
        "a new proxy asks for the listening sockets",
        Duration::from_secs(5),
    )
    .await;
    drop(old);
    wait_log(
        &new,
        "the old proxy ended before this one could route",
        Duration::from_secs(5),
    )
    .await;
    let failed = clients(new.port, 3).await;
    assert_eq!(failed.len(), 3, "{failed:?}");
    for f in &failed {
        assert!(
            f.contains("has not read its routing table"),
            "a client did not get the reason: {f}\n{}",
            new.log_text()
        );
    }
}

/// `--takeover` for another cluster than the running proxy's is refused, and the running
/// proxy goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn takeover_across_clusters_is_refused() {
    let (env, _pg, old, _) = support::routed_proxy("c0").await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tendril-proxy"))
        .env("TENDRIL_CLUSTER_NAME", "other")
        .env("TENDRIL_STORE_ENDPOINTS", env.etcd.endpoint())
        .args([
            "--listen-address",
            &format!("127.0.0.1:{}", old.port),
            "--takeover",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "serves cluster {:?}, not \"other\"",
            support::CLUSTER
        )),
        "{stderr}"
    );
    assert!(clients(old.port, 10).await.is_empty());
}
