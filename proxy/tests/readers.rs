//! Clients that read the way asynchronous drivers do: tokio-postgres on tokio, whose sockets
//! are registered edge-triggered and which takes a read shorter than its buffer to mean the
//! socket is drained (it waits for the next wake-up before reading again). A path that leaves
//! bytes where such a read does not reach them, with no wake-up to come, hangs the client
//! with the rest of its result already on this host. Every path, both topologies, results
//! large enough for the kernel paths to pause and resume a direction many times, and one read
//! slowly (tokio-postgres stops reading its socket while rows wait to be taken): each must
//! give the rows a direct connection gives. A client that sleeps before reading a result that
//! its receive buffer can hold whole reproduces, on every run, the resume race fixed in
//! 2b0a346 (see [`paused_reader`]).
//!
//! Needs root (network namespaces; the kernel paths need CAP_BPF): on these machines it is
//! there, so a missing piece fails loudly.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::net::IpAddr;
use std::time::Duration;

use futures_util::StreamExt;

use support::{Env, PATHS, ProxyProc};
use tendril_testkit::{Netns, PgServer};

/// Far past what the largest result takes here (well under a second): a client still
/// waiting then is hung, not slow.
const HUNG: Duration = Duration::from_secs(30);

/// Rows per result: a few replies' worth, then several MiB (past the kernel paths' 1 MiB
/// bound for what a client holds).
const SIZES: [i64; 3] = [2_000, 20_000, 200_000];

async fn connect(host: IpAddr, port: u16) -> tokio_postgres::Client {
    let conninfo =
        format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=10");
    let (client, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to {host}:{port}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// What a client got for each size, three times over on one connection: the row count and a
/// sum over every row's columns, or where it hung.
async fn results(client: &tokio_postgres::Client) -> Vec<String> {
    let mut out = Vec::new();
    for n in SIZES {
        for round in 0..3 {
            let sql =
                format!("select g, repeat(md5(g::text), 2) from generate_series(1, {n}::bigint) g");
            match tokio::time::timeout(HUNG, client.query(&sql, &[])).await {
                Ok(Ok(rows)) => {
                    let sum: i64 = rows.iter().map(|r| r.get::<_, i64>(0)).sum();
                    let text: usize = rows.iter().map(|r| r.get::<_, &str>(1).len()).sum();
                    out.push(format!(
                        "{n} rows: {} rows, sum {sum}, {text} chars",
                        rows.len()
                    ));
                }
                Ok(Err(e)) => out.push(format!("{n} rows: error {e}")),
                Err(_) => {
                    out.push(format!(
                        "{n} rows, round {round}: no result within {HUNG:?}"
                    ));
                    return out;
                }
            }
        }
    }
    // A slow consumer: tokio-postgres stops reading its socket while rows wait to be taken,
    // so the client's socket fills, the kernel paths pause, and the reads resume later with
    // much already delivered.
    let sql = "select g, repeat(md5(g::text), 2) from generate_series(1, 200000::bigint) g";
    let slow = async {
        let params: [i64; 0] = [];
        let rows = client.query_raw(sql, params).await?;
        let mut rows = std::pin::pin!(rows);
        let (mut n, mut sum) = (0usize, 0i64);
        while let Some(row) = rows.next().await {
            sum += row?.get::<_, i64>(0);
            n += 1;
            if n % 25_000 == 0 {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok::<_, tokio_postgres::Error>(format!("slowly: {n} rows, sum {sum}"))
    };
    out.push(match tokio::time::timeout(HUNG, slow).await {
        Ok(Ok(got)) => got,
        Ok(Err(e)) => format!("slowly: error {e}"),
        Err(_) => format!("slowly: no result within {HUNG:?}"),
    });
    out
}

/// The receive buffer of the client that reproduces the resume race: room for the whole
/// result (about 8 MB), so that while the client does not read, the kernel's backlog is
/// delivered into its socket and a pause can end.
const ROOMY_RECEIVE_BUFFER: usize = 16 << 20;

/// A client on a tokio socket that stops reading for a while in the middle of a result, then
/// reads the rest as tokio does (a short read clears the socket's readiness): the DataRows it
/// got and whether ReadyForQuery came, or where it hung.
///
/// With `receive_buffer` (set with SO_RCVBUFFORCE, past `net.core.rmem_max`), this is the
/// deterministic reproduction of the race fixed in 2b0a346. While the client sleeps, the
/// client-socket path pauses its replies past the buffer limit and the backlog is delivered
/// (the buffer has room). A path that then resumed through the accepted socket before the
/// client had read every redirected byte would put the rest of the result in the TCP queue
/// behind them: the client's first read after its sleep takes only the redirected bytes,
/// ends short, and waits for a wake-up that came while it slept. It never reads the rest.
async fn paused_reader(addr: std::net::SocketAddr, receive_buffer: Option<usize>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    if let Some(size) = receive_buffer {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::RcvBufForce, &size)
            .unwrap();
    }
    let mut s = socket.connect(addr).await.unwrap();
    s.write_all(&support::startup_packet(&[
        ("user", "postgres"),
        ("database", "postgres"),
    ]))
    .await
    .unwrap();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    // The messages in `buf` from `at`: (count of DataRows, ReadyForQuery seen), consuming
    // whole messages only.
    let scan = |buf: &mut Vec<u8>, rows: &mut usize| -> bool {
        let mut at = 0;
        let mut ready = false;
        while buf.len() >= at + 5 {
            let len = u32::from_be_bytes(buf[at + 1..at + 5].try_into().unwrap()) as usize;
            if buf.len() < at + 1 + len {
                break;
            }
            match buf[at] {
                b'D' => *rows += 1,
                b'Z' => ready = true,
                _ => {}
            }
            at += 1 + len;
        }
        buf.drain(..at);
        ready
    };
    let mut rows = 0;
    // The startup's answers, up to ReadyForQuery.
    loop {
        match tokio::time::timeout(HUNG, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => return format!("paused: startup ended with {other:?}"),
        }
        if scan(&mut buf, &mut rows) {
            break;
        }
    }
    let sql = b"select g, repeat(md5(g::text), 2) from generate_series(1, 100000) g\0";
    let mut query = vec![b'Q'];
    query.extend_from_slice(&u32::try_from(sql.len() + 4).unwrap().to_be_bytes());
    query.extend_from_slice(sql);
    s.write_all(&query).await.unwrap();
    rows = 0;
    // With a roomy buffer the client sleeps before its first read, so that the direction is
    // forwarding in the kernel when it stops reading and pauses while it sleeps; otherwise
    // after its first thousand rows.
    let sleep_at = if receive_buffer.is_some() { 0 } else { 1001 };
    let mut paused = false;
    loop {
        if !paused && rows >= sleep_at {
            // The client stops reading: what the server sends meanwhile piles up.
            paused = true;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        match tokio::time::timeout(HUNG, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            Ok(other) => {
                return format!("paused: the result ended with {other:?} after {rows} rows");
            }
            Err(_) => return format!("paused: no more within {HUNG:?} after {rows} rows"),
        }
        if scan(&mut buf, &mut rows) {
            return format!("paused: {rows} rows, then ReadyForQuery");
        }
    }
}

/// How many times the proxy's kernel paths paused a direction, from its metrics.
fn pauses(proxy: &ProxyProc) -> f64 {
    proxy
        .metrics()
        .lines()
        .filter(|l| l.contains("paused") && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// PostgreSQL on this host, or in a network namespace behind a veth pair (`remote`), and a
/// store whose cluster data routes proxies to it. Bind the namespace to a name declared
/// first, so that it outlives the server.
async fn routed_postgres(remote: bool) -> (Option<Netns>, PgServer, Env) {
    let netns = remote.then(Netns::create);
    let pg = match &netns {
        Some(ns) => PgServer::start_in(ns, &[]),
        None => PgServer::start(),
    };
    let mut env = Env::new().await;
    env.route_to(Some(("db1", pg.host(), pg.port())), false)
        .await;
    (netns, pg, env)
}

async fn every_path(remote: bool) {
    let (_netns, pg, env) = routed_postgres(remote).await;
    let mut direct = results(&connect(pg.host(), pg.port()).await).await;
    for receive_buffer in [None, Some(ROOMY_RECEIVE_BUFFER)] {
        direct.push(paused_reader((pg.host(), pg.port()).into(), receive_buffer).await);
    }
    let mut failures = Vec::new();
    // The kernel paths again with a small bound, so that each result pauses and resumes
    // its direction many times.
    let runs = PATHS
        .iter()
        .map(|(name, flags)| (*name, *flags, None))
        .chain(
            PATHS
                .iter()
                .filter(|(name, _)| *name != "userspace-io-uring" && *name != "userspace-epoll")
                .map(|(name, flags)| (*name, *flags, Some("128KiB"))),
        );
    for (name, flags, limit) in runs {
        let envs: Vec<(&str, &str)> = limit
            .map(|l| ("TENDRIL_KERNEL_BUFFER_LIMIT", l))
            .into_iter()
            .collect();
        let proxy = ProxyProc::start(&env, "readers", flags, &envs);
        support::wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
        let mut got = results(&connect("127.0.0.1".parse().unwrap(), proxy.port).await).await;
        for receive_buffer in [None, Some(ROOMY_RECEIVE_BUFFER)] {
            got.push(paused_reader(([127, 0, 0, 1], proxy.port).into(), receive_buffer).await);
        }
        let pauses = pauses(&proxy);
        let name = format!("{name} (buffer limit {})", limit.unwrap_or("default"));
        println!("{name}: {pauses} pauses; {got:?}");
        if got != direct {
            failures.push(format!(
                "{name}: direct gave {direct:?}\n    through the proxy {got:?}\n    proxy log tail:\n{}",
                proxy
                    .log_text()
                    .lines()
                    .rev()
                    .take(10)
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_clients_get_large_results_whole_on_every_path_postgres_here() {
    every_path(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_clients_get_large_results_whole_on_every_path_postgres_remote() {
    every_path(true).await;
}

/// The resume race on its own, repeated: the client-socket path (and the default, which
/// takes it here) with a small buffer limit and a client whose receive buffer holds the
/// whole result (see [`paused_reader`]). Each run must end as a direct connection's does,
/// and must have paused the replies (else it tested nothing). Against the BPF object before
/// 2b0a346, every run on `kernel-client-socket` hung, in both topologies (10 of 10).
async fn resume_race(remote: bool) {
    const RUNS: usize = 5;
    let (_netns, pg, env) = routed_postgres(remote).await;
    let direct = paused_reader((pg.host(), pg.port()).into(), Some(ROOMY_RECEIVE_BUFFER)).await;
    let mut failures = Vec::new();
    for (name, flags) in PATHS
        .iter()
        .filter(|(name, _)| *name == "kernel-client-socket" || *name == "default")
    {
        let proxy = ProxyProc::start(
            &env,
            "resume-race",
            flags,
            &[("TENDRIL_KERNEL_BUFFER_LIMIT", "128KiB")],
        );
        support::wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
        for run in 0..RUNS {
            let addr = ([127, 0, 0, 1], proxy.port).into();
            let got = paused_reader(addr, Some(ROOMY_RECEIVE_BUFFER)).await;
            println!("{name} run {run}: {got}");
            if got != direct {
                failures.push(format!(
                    "{name} run {run}: direct gave {direct:?}, the proxy {got:?}"
                ));
            }
        }
        let pauses = pauses(&proxy);
        if pauses < RUNS as f64 {
            failures.push(format!(
                "{name}: {pauses} pauses in {RUNS} runs: the replies did not pause"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sleeps_with_a_roomy_buffer_gets_its_result_postgres_here() {
    resume_race(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sleeps_with_a_roomy_buffer_gets_its_result_postgres_remote() {
    resume_race(true).await;
}
