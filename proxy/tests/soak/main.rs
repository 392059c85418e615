//! The proxy's fault soak: clients of every kind work through the proxy (raw-protocol
//! sessions checking every row, a client streaming megabytes through COPY in both directions
//! and comparing them byte for byte, pgbench and psql, and tokio-postgres on tokio, whose
//! edge-triggered reads notice what blocking clients do not) while a seeded driver injects the
//! faults of the data-plane matrix at random: terminated, cancelled and killed backends, a
//! crashed postmaster, failover fences and switchover holds, the proxy replaced by a new
//! process (`--takeover`), and the clients' own FIN, reset, Terminate and idle timeouts.
//!
//! It fails on any client waiting more than 2 s past what the operation takes directly, any
//! byte lost, duplicated or reordered in a completed operation, and any socket, connection or
//! kernel map entry the proxy still holds once the clients have gone, and any replaced
//! process still running then.
//!
//! `cargo xtask test` runs it briefly on every forwarding path with PostgreSQL on another
//! host (a network namespace behind a veth pair); `cargo xtask soak proxy` runs it as long
//! as asked. Settings, from the environment:
//! - `TENDRIL_SOAK_SECONDS`: per path and topology (default 12);
//! - `TENDRIL_SOAK_SEED`: the seed (default: from the clock; printed, so a run replays);
//! - `TENDRIL_SOAK_PATHS`: comma-separated among `userspace-io-uring`, `userspace-epoll`,
//!   `kernel-pair`, `kernel-client-socket`, `default` (no flag; default: all);
//! - `TENDRIL_SOAK_TOPOLOGY`: `remote` (default), `local` or `both`.
//!
//! Needs root (network namespaces; the kernel paths need CAP_BPF).

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

#[path = "../support/mod.rs"]
mod support;

mod async_client;
mod clients;
mod nemesis;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use clients::{Report, Run};
use nemesis::Rng;
use support::{Env, ProxyProc};
use tendril_testkit::{Netns, PG_BIN, PgServer};

use support::PATHS;

struct Settings {
    seconds: u64,
    seed: u64,
    paths: Vec<(&'static str, &'static [&'static str])>,
    remote: Vec<bool>,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let seconds = var("TENDRIL_SOAK_SECONDS").map_or(12, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("TENDRIL_SOAK_SECONDS={v:?}: not a number"))
        });
        let seed = var("TENDRIL_SOAK_SEED").map_or_else(
            || {
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            },
            |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("TENDRIL_SOAK_SEED={v:?}: not a number"))
            },
        );
        let paths = var("TENDRIL_SOAK_PATHS").map_or_else(
            || PATHS.to_vec(),
            |v| {
                v.split(',')
                    .map(|name| {
                        *PATHS
                            .iter()
                            .find(|(n, _)| *n == name.trim())
                            .unwrap_or_else(|| {
                                panic!(
                                    "TENDRIL_SOAK_PATHS: unknown path {name:?} (one of {:?})",
                                    PATHS.iter().map(|p| p.0).collect::<Vec<_>>()
                                )
                            })
                    })
                    .collect()
            },
        );
        let remote = match var("TENDRIL_SOAK_TOPOLOGY").as_deref() {
            None | Some("remote") => vec![true],
            Some("local") => vec![false],
            Some("both") => vec![false, true],
            Some(other) => panic!("TENDRIL_SOAK_TOPOLOGY={other:?}: remote, local or both"),
        };
        Settings {
            seconds,
            seed,
            paths,
            remote,
        }
    }
}

/// Waits until the proxy holds nothing; returns what is left after 10 s.
fn leftovers(proxy: &ProxyProc) -> Option<String> {
    support::leftovers_of(
        proxy,
        ProxyProc::kernel_map_entries,
        Duration::from_secs(10),
    )
}

fn pgbench_init(pg: &PgServer) {
    let out = Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-i", "-q", "-s", "1", "-h", &pg.host().to_string()])
        .args(["-p", &pg.port().to_string(), "-U", "postgres", "postgres"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pgbench -i: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A client's loop, run on its own thread until the soak stops.
type Client = fn(&Run, Rng);

/// One soak of one path in one topology; returns its failures.
async fn soak(
    settings: &Settings,
    remote: bool,
    (name, flags): (&str, &[&str]),
    rng: &mut Rng,
) -> Vec<String> {
    let netns = remote.then(Netns::create);
    let mut pg = match &netns {
        Some(ns) => PgServer::start_in(ns, &[]),
        None => PgServer::start(),
    };
    pgbench_init(&pg);
    let mut env = Env::new().await;
    env.route_to(Some(("db1", pg.host(), pg.port())), false)
        .await;
    let proxy = ProxyProc::start(&env, &format!("soak-{name}"), flags, &[]);
    support::wait_routed(proxy.port, pg.port(), Duration::from_secs(15)).await;
    let mut proxies = nemesis::Proxies {
        current: proxy,
        replaced: Vec::new(),
        flags,
        name: name.to_owned(),
    };
    let topology = if remote { "remote" } else { "local" };
    println!(
        "soak {topology} {name}: {} s, seed {}",
        settings.seconds, settings.seed
    );

    let stop = Arc::new(AtomicBool::new(false));
    let report = Arc::new(Report::default());
    let addr = SocketAddr::from(([127, 0, 0, 1], proxies.current.port));
    let start = Instant::now();
    let until = start + Duration::from_secs(settings.seconds);
    let clients: [(&str, Client); 9] = [
        ("wire-1", clients::wire_client),
        ("wire-2", clients::wire_client),
        ("wire-3", clients::wire_client),
        ("wire-4", clients::wire_client),
        ("copy-1", clients::copy_client),
        ("copy-2", clients::copy_client),
        ("pgbench", clients::pgbench_client),
        ("psql", clients::psql_client),
        ("async", async_client::async_client),
    ];
    let threads: Vec<_> = clients
        .iter()
        .enumerate()
        .map(|(i, &(who, client))| {
            let run = Run {
                addr,
                stop: stop.clone(),
                report: report.clone(),
            };
            let rng = rng.fork(i as u64);
            std::thread::Builder::new()
                .name(who.into())
                .spawn(move || client(&run, rng))
                .unwrap()
        })
        .collect();
    nemesis::run(
        &mut env,
        &mut pg,
        &mut proxies,
        rng,
        (start, until),
        &report,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        tokio::task::block_in_place(|| t.join()).unwrap();
    }

    let mut failures = report.failures();
    // Replaced processes go once their own connections ended (the clients' are).
    for old in &mut proxies.replaced {
        let deadline = Instant::now() + Duration::from_secs(15);
        while old.child.try_wait().unwrap().is_none() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match old.child.try_wait().unwrap() {
            Some(status) if status.success() => {}
            Some(status) => failures.push(format!("replaced {} exited with {status}", old.uid)),
            None => failures.push(format!(
                "replaced {} still runs 15 s after the clients left:\n{}",
                old.uid,
                old.log_text()
            )),
        }
    }
    // What moved with each takeover, as each new process counted it.
    for p in proxies.replaced.iter().skip(1).chain([&proxies.current]) {
        if proxies.replaced.is_empty() {
            break;
        }
        let log = p.log_text();
        let count = |word: &str| -> u64 {
            log.lines()
                .filter(|l| l.contains("handover over"))
                .filter_map(|l| l.split(word).nth(1)?.split(' ').next()?.parse::<u64>().ok())
                .sum()
        };
        report.add("connections handed over", count("adopted="));
        let refused = count("refused=");
        if refused > 0 {
            // A record that does not match its sockets or the shared maps: a bug.
            let why: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("refused a connection"))
                .collect();
            failures.push(format!(
                "{} refused {refused} connections handed over:\n{}",
                p.uid,
                why.join("\n")
            ));
        }
    }
    let proxy = &proxies.current;
    if let Some(left) = leftovers(proxy) {
        failures.push(format!("after the clients left, the proxy kept {left}"));
    }
    let counts = report.counts();
    let (worst, worst_what) = report.worst();
    println!(
        "soak {topology} {name}: worst wait past expected {worst:?} ({worst_what}); {counts:#?}"
    );
    // A soak in which nothing got through proves nothing.
    for needed in ["queries checked", "copies checked", "programs succeeded"] {
        if counts.get(needed).copied().unwrap_or(0) == 0 {
            failures.push(format!("no {needed} in {} s", settings.seconds));
        }
    }
    if !failures.is_empty() {
        let log = proxy.log_text();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        println!(
            "proxy log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    failures
        .into_iter()
        .map(|f| format!("{topology} {name}: {f}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_soak_with_random_faults() {
    let settings = Settings::from_env();
    println!(
        "proxy soak: seed {} (replay with TENDRIL_SOAK_SEED={})",
        settings.seed, settings.seed
    );
    let mut failures = Vec::new();
    let mut rng = Rng::new(settings.seed);
    for &remote in &settings.remote {
        for &path in &settings.paths {
            failures.extend(soak(&settings, remote, path, &mut rng).await);
        }
    }
    assert!(
        failures.is_empty(),
        "proxy soak, seed {}: {} failures:\n  {}",
        settings.seed,
        failures.len(),
        failures.join("\n  ")
    );
}
