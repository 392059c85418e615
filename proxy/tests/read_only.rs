//! The read-only listener of the proxy binary, with real etcd and PostgreSQL and the cluster
//! data written by hand: it moves with a takeover like the listen address (the new process
//! reading it from its settings file; no connect on
//! either fails), its local clients take the kernel's client-socket path, and a standby that leaves the cluster data has its read-only sessions cut
//! while the master's stay, its new clients going to the master (`--read-only-fallback
//! master`, the default). The choice among standbys and the fallbacks on a real cluster are
//! in e2e/tests/reads.rs.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use support::loops::{ConnectLoops, wait_exit, wait_took_over};
use support::{Env, ProxyProc, backend_port, connect, wait_routed};
use tendril_testkit::free_port;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_listener_moves_with_a_takeover_and_cuts_a_removed_standby() {
    let mut env = Env::new().await;
    let (master, standby) = (support::pg(), support::pg());
    env.set_standbys("db1", &[("s1", standby.port())]);
    env.route(Some(("db1", master.port())), false).await;
    let read_only = format!("127.0.0.1:{}", free_port());
    let mut old = ProxyProc::start(
        &env,
        "ro0",
        &["--read-only-listen-address", read_only.as_str()],
        &[],
    );
    let ro_port: u16 = read_only.rsplit(':').next().unwrap().parse().unwrap();
    wait_routed(old.port, master.port(), Duration::from_secs(10)).await;
    wait_routed(ro_port, standby.port(), Duration::from_secs(10)).await;

    // A takeover under connect loops on both listeners: none fails.
    let loops = [
        ConnectLoops::start(ro_port, 2),
        ConnectLoops::start(old.port, 1),
    ];
    let listen = format!("127.0.0.1:{}", old.port);
    // The new process reads its read-only address from a settings file.
    let settings = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        settings.path(),
        format!("read_only_listen_address = \"{read_only}\"\ndrain_timeout = \"20s\"\n"),
    )
    .unwrap();
    let new = ProxyProc::start(
        &env,
        "ro1",
        &[
            "--listen-address",
            listen.as_str(),
            "--config",
            settings.path().to_str().unwrap(),
            "--takeover",
        ],
        &[],
    );
    wait_took_over(&new).await;
    let status = wait_exit(&mut old, Duration::from_secs(15)).await;
    assert!(status.success(), "old proxy: {status}\n{}", old.log_text());
    tokio::time::sleep(Duration::from_millis(300)).await;
    for l in loops {
        l.finish(10).await;
    }
    let taken = new
        .metric("tendril_proxy_listener_connections_accepted_total{cluster=\"pxy\",listener=\"read_only\"}")
        .unwrap_or(0.0);
    assert!(
        taken > 0.0,
        "the new proxy took no read-only client:\n{}",
        new.metrics()
    );
    // Local read-only clients take the default path of local clients (the kernel, on
    // their own socket), as on the listen address.
    let before = new.path_total("client_socket");
    for _ in 0..4 {
        let c = connect(ro_port).await.unwrap();
        assert_eq!(backend_port(&c).await, standby.port());
    }
    assert!(
        new.path_total("client_socket") >= before + 4.0,
        "{}",
        new.metrics()
    );

    // The standby leaves the cluster data: its read-only sessions are cut, the master's
    // stay, and new read-only clients go to the master.
    let on_master = connect(new.port).await.unwrap();
    let on_standby = connect(ro_port).await.unwrap();
    assert_eq!(backend_port(&on_standby).await, standby.port());
    env.set_standbys("db1", &[]);
    env.route(Some(("db1", master.port())), false).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while on_standby.simple_query("select 1").await.is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "the session on the removed standby was not cut:\n{}",
            new.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    on_master.simple_query("select 1").await.unwrap();
    wait_routed(ro_port, master.port(), Duration::from_secs(5)).await;
    assert!(
        new.metric("tendril_proxy_read_only_routed_total{cluster=\"pxy\",to=\"master\"}")
            .is_some_and(|n| n >= 1.0),
        "{}",
        new.metrics()
    );
}
