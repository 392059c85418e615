//! Kernel-forwarded connections across a takeover: with the same programs and settings, the
//! new process loads with the old one's maps and adopts its connections, so a session goes
//! on with its backend (its pid, its temporary table) and the old process exits instead of
//! waiting for its clients; with other settings they drain in the old process.
//! Real PostgreSQL, etcd, BPF and pgbench.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt, pin_mut};
use support::loops::{wait_exit, wait_log, wait_took_over};
use support::wire::{End, WireClient};
use support::{Env, ProxyProc, wait_routed};

/// What a session shows of itself: its backend's pid and its temporary table's row.
async fn identity(client: &tokio_postgres::Client) -> (i32, i32) {
    let row = client
        .query_one("SELECT pg_backend_pid(), (SELECT x FROM kept)", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// `rows` kB out through a reply pause (nothing read for half a second while PostgreSQL
/// sends).
async fn copy_out_paused(client: &tokio_postgres::Client, rows: i64) {
    let out = client
        .copy_out(&format!(
            "COPY (SELECT repeat('x', 999) FROM generate_series(1, {rows})) TO STDOUT"
        ))
        .await
        .unwrap();
    pin_mut!(out);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut bytes = 0usize;
    while let Some(chunk) = out.next().await {
        bytes += chunk.unwrap().len();
    }
    assert_eq!(
        bytes,
        rows as usize * 1000,
        "COPY out through the moved session"
    );
}

/// 20 MB each way on the session: out through a reply pause, then in.
async fn copy_both_ways(client: &tokio_postgres::Client) {
    let rows: i64 = 20_000;
    copy_out_paused(client, rows).await;
    client
        .batch_execute("DROP TABLE IF EXISTS sink; CREATE TEMP TABLE sink (line text)")
        .await
        .unwrap();
    let sink = client.copy_in("COPY sink FROM STDIN").await.unwrap();
    pin_mut!(sink);
    let line: &'static [u8] = format!("{}\n", "y".repeat(999)).leak().as_bytes();
    for _ in 0..rows {
        sink.feed(line).await.unwrap();
    }
    let copied = sink.as_mut().finish().await.unwrap();
    assert_eq!(copied, rows as u64);
    let row = client
        .query_one("SELECT count(*), sum(length(line)) FROM sink", &[])
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, i64>(0), row.get::<_, i64>(1)),
        (rows, rows * 999)
    );
}

/// Three takeovers in a row under persistent `pgbench -c 8`, an open session and two idle
/// ones: every replaced process exits while pgbench still runs (its connections moved; with
/// a 60 s drain it would otherwise wait for them), the new one adopted all 11, pgbench keeps
/// its 8 backends and each session its backend pid (and temporary table; then it moves 20 MB
/// each way), and no transaction fails.
/// With the default forwarding (the client-socket path) and on the pair path.
async fn connections_move_on(path: &str, path_flags: &[&str]) {
    let mut env = Env::new().await;
    let pg = support::pg();
    support::pgbench_init(pg.port());
    env.route(Some(("db1", pg.port())), false).await;
    let mut flags = vec!["--drain-timeout", "60s"];
    flags.extend_from_slice(path_flags);
    let mut old = ProxyProc::start(&env, "m0", &flags, &[]);
    wait_routed(old.port, pg.port(), Duration::from_secs(10)).await;
    let listen = format!("127.0.0.1:{}", old.port);
    let client = support::connect(old.port).await.unwrap();
    client
        .batch_execute("CREATE TEMP TABLE kept AS SELECT 7 AS x")
        .await
        .unwrap();
    let before = identity(&client).await;
    // Two idle sessions, which must move too: one that sent nothing since its startup (a
    // pair direction joins on its first packet), and one whose replies paused once (the
    // direction stays paused until its next packet).
    let fresh = named_session(old.port, "fresh").await;
    let paused = named_session(old.port, "paused").await;
    copy_out_paused(&paused, 20_000).await;
    let direct = support::connect(pg.port()).await.unwrap();
    let pid_of = |name: &'static str| {
        let direct = &direct;
        async move {
            let row = direct
                .query_one(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
                    &[&name],
                )
                .await
                .unwrap();
            row.get::<_, i32>(0)
        }
    };
    let idle_pids = (pid_of("fresh").await, pid_of("paused").await);
    let mut run = support::pgbench(&["-S", "-c", "8", "-j", "2", "-T", "25"], old.port);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // pgbench's backends, seen by PostgreSQL itself: the same 8 after every takeover.
    let pgbench_backends = || async {
        let row = direct
            .query_one(
                "SELECT array_agg(pid ORDER BY pid) FROM pg_stat_activity \
                 WHERE application_name = 'pgbench'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, Option<Vec<i32>>>(0).unwrap_or_default()
    };
    let backends = pgbench_backends().await;
    assert_eq!(backends.len(), 8, "{backends:?}");
    assert!(
        old.path_total(path) >= 9.0,
        "the session and pgbench's 8 connections on the {path} path:\n{}",
        old.metrics()
    );
    for i in 1..=3 {
        let mut args = vec!["--listen-address", listen.as_str(), "--takeover"];
        args.extend_from_slice(&flags);
        let new = ProxyProc::start(&env, &format!("m{i}"), &args, &[]);
        wait_took_over(&new).await;
        assert!(
            new.log_text().contains("on the old proxy's maps"),
            "takeover {i}: not loaded with the old process's maps:\n{}",
            new.log_text()
        );
        let status = wait_exit(&mut old, Duration::from_secs(10)).await;
        assert!(status.success(), "takeover {i}: {status}");
        assert!(
            run.try_wait().unwrap().is_none(),
            "takeover {i}: pgbench ended before the old process exited"
        );
        assert!(
            old.log_text()
                .contains("handing the kernel-forwarded connections over"),
            "{}",
            old.log_text()
        );
        assert_eq!(identity(&client).await, before, "takeover {i}");
        assert_eq!(
            pgbench_backends().await,
            backends,
            "takeover {i}: pgbench reconnected"
        );
        wait_log(&new, "adopted=11 refused=0", Duration::from_secs(5)).await;
        old = new;
        tokio::time::sleep(Duration::from_millis(1000)).await;
    }
    copy_both_ways(&client).await;
    assert_eq!(identity(&client).await, before);
    assert_eq!(
        (backend_pid(&fresh).await, backend_pid(&paused).await),
        idle_pids,
        "the idle sessions kept their backends"
    );
    let (status, text) = support::finished(run).await;
    assert!(status.success(), "pgbench failed:\n{text}");
    assert!(
        !text.contains("error") && !text.contains("abort"),
        "a transaction or a client failed:\n{text}"
    );
    let served = support::pgbench_processed(&text);
    assert!(served > 100, "only {served} transactions:\n{text}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_socket_connections_move_to_the_new_process() {
    connections_move_on("client_socket", &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pair_path_connections_move_to_the_new_process() {
    connections_move_on(
        "pair",
        &["--forwarding", "kernel", "--kernel-client-socket", "off"],
    )
    .await;
}

async fn backend_pid(c: &tokio_postgres::Client) -> i32 {
    c.query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0)
}

/// A session through `port` named `name` (its `application_name`), which sends nothing
/// after its startup.
async fn named_session(port: u16, name: &str) -> tokio_postgres::Client {
    let conninfo =
        format!("host=127.0.0.1 port={port} user=postgres dbname=postgres application_name={name}");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A session on the client-socket path, with its identity.
async fn session(port: u16) -> (tokio_postgres::Client, (i32, i32)) {
    let client = support::connect(port).await.unwrap();
    client
        .batch_execute("CREATE TEMP TABLE kept AS SELECT 7 AS x")
        .await
        .unwrap();
    let id = identity(&client).await;
    (client, id)
}

/// A taker whose client-socket settings differ (another buffer limit, so other programs'
/// data) does not share the maps: the old process drains its connections as before the
/// kernel handover existed, and serves them to their end; the new one loads its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taker_with_other_settings_leaves_the_connections_to_drain() {
    let (env, _pg, mut old, listen) = support::routed_proxy("d0").await;
    let (client, before) = session(old.port).await;
    let args = [
        "--listen-address",
        listen.as_str(),
        "--takeover",
        "--kernel-buffer-limit",
        "512KiB",
    ];
    let new = ProxyProc::start(&env, "d1", &args, &[]);
    wait_took_over(&new).await;
    assert!(
        new.log_text()
            .contains("the old proxy runs other kernel programs or settings"),
        "{}",
        new.log_text()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the old process left its session:\n{}",
        old.log_text()
    );
    copy_both_ways(&client).await;
    assert_eq!(identity(&client).await, before);
    drop(client);
    let status = wait_exit(&mut old, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    let (_fresh, _) = session(new.port).await;
    assert!(new.path_total("client_socket") >= 1.0, "{}", new.metrics());
}

/// A taker that took the maps (and so the event ring) but never got ready, then killed:
/// the old process keeps its sessions working meanwhile (it polls them) and reads the ring
/// again after, through reply pauses; the next taker adopts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taker_killed_after_taking_the_maps_leaves_the_sessions_working() {
    let (env, _pg, mut old, listen) = support::routed_proxy("k0").await;
    let (client, before) = session(old.port).await;
    let args = ["--listen-address", listen.as_str(), "--takeover"];
    let stuck = ProxyProc::start(
        &env,
        "k1",
        &args,
        &[("TENDRIL_STORE_ENDPOINTS", "http://127.0.0.1:1")],
    );
    wait_log(
        &old,
        "shared the kernel maps with the new proxy",
        Duration::from_secs(10),
    )
    .await;
    copy_both_ways(&client).await;
    drop(stuck);
    wait_log(
        &old,
        "reading the event ring again",
        Duration::from_secs(10),
    )
    .await;
    copy_both_ways(&client).await;
    assert_eq!(identity(&client).await, before);
    let new = ProxyProc::start(&env, "k2", &args, &[]);
    wait_log(&new, "adopted=1 refused=0", Duration::from_secs(10)).await;
    let status = wait_exit(&mut old, Duration::from_secs(10)).await;
    assert!(status.success(), "{status}");
    copy_both_ways(&client).await;
    assert_eq!(identity(&client).await, before);
}

/// The old process killed (SIGKILL) while it still holds a kernel-forwarded connection that
/// was not at rest (its client stopped reading a large result): nothing of it stays in the
/// maps the new process shares with it. The new process removes what no socket and no
/// process holds any more, once the old one is gone. PostgreSQL runs on another host (a
/// network namespace), so that its backend notices the proxy's end at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_old_process_leaves_nothing_in_the_shared_maps() {
    let ns = tendril_testkit::Netns::create();
    let pg = tendril_testkit::PgServer::start_in(&ns, &[]);
    let mut env = Env::new().await;
    env.route_to(Some(("db1", pg.host(), pg.port())), false)
        .await;
    let mut old = ProxyProc::start(&env, "s0", &[], &[]);
    wait_routed(old.port, pg.port(), Duration::from_secs(15)).await;
    let listen = format!("127.0.0.1:{}", old.port);
    let mut stuck =
        WireClient::connect(format!("127.0.0.1:{}", old.port).parse().unwrap()).unwrap();
    let (_, end) = stuck.startup("postgres");
    assert_eq!(end, End::Open);
    stuck
        .query("COPY (SELECT repeat('x', 999) FROM generate_series(1, 50000)) TO STDOUT")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(old.path_total("client_socket") >= 1.0, "{}", old.metrics());
    let args = ["--listen-address", listen.as_str(), "--takeover"];
    let new = ProxyProc::start(&env, "s1", &args, &[]);
    wait_took_over(&new).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        old.child.try_wait().unwrap().is_none(),
        "the connection not at rest stays with the old process:\n{}",
        old.log_text()
    );
    old.child.kill().unwrap();
    old.child.wait().unwrap();
    drop(stuck);
    wait_log(
        &new,
        "removed what the process taken over left in the shared maps",
        Duration::from_secs(10),
    )
    .await;
    let left = tokio::task::block_in_place(|| {
        support::leftovers_of(&new, ProxyProc::kernel_map_entries, Duration::from_secs(10))
    });
    assert_eq!(left, None, "{}", new.log_text());
}
