//! A proxy rolled the way a supervisor that restarts exited processes does it (a Kubernetes
//! DaemonSet with `maxSurge`): every process runs the same command, `--takeover=auto
//! --after-handover wait`. The first starts on its own; each next one takes the running
//! one's listening sockets; the one taken over drains, releases the metrics port they share,
//! and waits for its SIGTERM (its pod's deletion) instead of exiting, which would have its
//! supervisor start it again and take the sockets back.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use nix::sys::signal::Signal;
use support::loops::{ConnectLoops, wait_exit, wait_handover, wait_log};
use support::wire::{End, WireClient};
use support::{Env, ProxyProc, backend_port, connect, wait_routed};

/// The pids of the processes listening on `port` on 127.0.0.1 (`ss -ltnp`).
fn listening_pids(port: u16) -> Vec<u32> {
    let out = std::process::Command::new("ss")
        .args(["-H", "-ltnp", &format!("sport = :{port}")])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mut pids: Vec<u32> = text
        .split("pid=")
        .skip(1)
        .filter_map(|p| p.split(',').next()?.parse().ok())
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

fn pod(env: &Env, uid: &str, listen: &str, metrics: &str, drain: &str) -> ProxyProc {
    ProxyProc::start(
        env,
        uid,
        &[
            "--listen-address",
            listen,
            "--metrics-address",
            metrics,
            "--drain-timeout",
            drain,
        ],
        &[
            ("TENDRIL_TAKEOVER", "auto"),
            ("TENDRIL_AFTER_HANDOVER", "wait"),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_roll_with_takeover_auto_and_the_old_one_waits_for_its_sigterm() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let port = tendril_testkit::free_port();
    let metrics_port = tendril_testkit::free_port();
    let (listen, metrics) = (
        format!("127.0.0.1:{port}"),
        format!("127.0.0.1:{metrics_port}"),
    );

    let mut old = pod(&env, "node0", &listen, &metrics, "10s");
    assert!(
        old.log_text().contains("no proxy answers on this address"),
        "{}",
        old.log_text()
    );
    wait_routed(port, pg.port(), Duration::from_secs(10)).await;

    for round in 1..=2 {
        let loops = ConnectLoops::start(port, 4);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let new = pod(&env, &format!("node{round}"), &listen, &metrics, "10s");
        wait_handover(&new, &old, "handed over and drained: waiting for SIGTERM").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        loops.finish(10).await;

        // Drained and idle: alive, holding neither the listening port nor the metrics port
        // (probes reach the new process alone).
        assert!(
            old.child.try_wait().unwrap().is_none(),
            "{}",
            old.log_text()
        );
        assert!(
            old.log_text()
                .contains("handed over: metrics port released")
        );
        let new_pid = new.child.id();
        assert_eq!(listening_pids(port), vec![new_pid], "round {round}");
        assert_eq!(listening_pids(metrics_port), vec![new_pid], "round {round}");
        assert_eq!(new.health().0, 200);

        // Its pod deleted: SIGTERM, and it exits at once with status 0.
        old.signal(Signal::SIGTERM);
        let status = wait_exit(&mut old, Duration::from_secs(5)).await;
        assert!(status.success(), "{status}: {}", old.log_text());
        old = new;
    }
    let c = connect(port).await.unwrap();
    assert_eq!(backend_port(&c).await, pg.port());
}

/// A SIGTERM that reaches the process taken over while it still drains ends it once the
/// drain ends: it does not wait for a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_during_the_drain_after_a_handover_is_not_lost() {
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let port = tendril_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let metrics = format!("127.0.0.1:{}", tendril_testkit::free_port());
    let mut old = pod(&env, "node0", &listen, &metrics, "60s");
    wait_routed(port, pg.port(), Duration::from_secs(10)).await;
    // A session the old process serves until the client ends it (a blocking reader,
    // forwarded in userspace: one on the client-socket path would move to the new one).
    let mut session = WireClient::blocking_session(port);

    let _new = pod(&env, "node1", &listen, &metrics, "60s");
    wait_log(
        &old,
        "handed over: metrics port released",
        Duration::from_secs(10),
    )
    .await;
    old.signal(Signal::SIGTERM);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "it exited before its session ended:\n{}",
        old.log_text()
    );
    assert_eq!(session.select_one(), End::Open);
    drop(session);
    let status = wait_exit(&mut old, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}: {}", old.log_text());
    assert!(
        !old.log_text().contains("waiting for SIGTERM"),
        "{}",
        old.log_text()
    );
}
