//! The data-plane fault matrix: every scenario runs once straight against PostgreSQL and once
//! through a forwarding path of the proxy, and what the client sees must be the same: the
//! same messages in the same order, the same final ErrorResponse, EOF or reset, at about the
//! same time (within 1 s of direct's). After each proxied run the proxy must hold nothing for
//! it: no open connection, no kernel map entry, no socket on its port but listeners and
//! TIME-WAIT, and the close counted in its metrics.
//!
//! Paths: userspace on io_uring and on epoll, the two kernel paths (the pair of proxy
//! sockets, and the client's own socket, which with PostgreSQL on this host also takes
//! direct replies), and the default (`--forwarding auto`: the client-socket path for these
//! clients, which must be seen taking it). Topologies: PostgreSQL on the proxy's host, and PostgreSQL on another
//! host (a network namespace behind a veth pair; the proxy and the clients stay here).
//!
//! Scenarios: the backend ends with FATAL then closes (pg_terminate_backend when idle, in a
//! query, and with unread input so that it resets, idle_in_transaction_session_timeout, idle_session_timeout, a FATAL at startup),
//! the backend process killed, the postmaster killed in a transaction and during startup,
//! the backend ending while the client is not reading a large result, the client's FIN in a
//! query, its reset, its half-close after Terminate, a CancelRequest reaching the right
//! backend, SSLRequest and GSSENCRequest negotiation then startup. Each runs through the
//! listen address and through the read-only listener (to a standby). Then the fence, which has
//! no direct counterpart, in each state (before startup, after the SSL answer, idle, in a
//! query, not reading a large result): the client's connection ends within 1 s.
//!
//! Needs root (network namespaces; the kernel paths need CAP_BPF): on these machines it is
//! there, so a missing piece fails loudly.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use support::wire::{End, Message, WireClient, cancel_request, request};
use support::{Env, ProxyProc};
use tendril_testkit::{Netns, PG_BIN, PgServer};

/// How long a scenario waits for the end it expects: far past any direct outcome, so a
/// stranded client shows as `Open`.
const WAIT: Duration = Duration::from_secs(5);
/// What PostgreSQL logs when it accepts connections again (after a start or a crash reset).
const READY: &str = "database system is ready to accept connections";
/// How far a proxied outcome's timing may be from direct's.
const TOLERANCE: Duration = Duration::from_secs(1);

/// A forwarding path under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Uring,
    Epoll,
    KernelPair,
    KernelClientSocket,
    /// No flag: what a user gets.
    Default,
}

impl Path {
    fn flags(self) -> &'static [&'static str] {
        match self {
            Path::Uring => &["--forwarding", "userspace"],
            Path::Epoll => &["--forwarding", "userspace", "--io-driver", "epoll"],
            Path::KernelPair => &["--forwarding", "kernel", "--kernel-client-socket", "off"],
            Path::KernelClientSocket => &["--forwarding", "kernel", "--kernel-client-socket", "on"],
            Path::Default => &[],
        }
    }
}

/// Where PostgreSQL runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// On the proxy's host (loopback).
    Local,
    /// On another host: a network namespace behind a veth pair.
    Remote,
}

/// What a client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    /// Message summaries (see [`Message::summary`]) and scenario-specific facts.
    messages: Vec<String>,
    end: End,
}

/// A scenario's observation: what the client saw and how long after the fault.
#[derive(Debug)]
struct Observation {
    seen: Seen,
    elapsed: Duration,
}

impl Observation {
    /// The same, with a fact noted first.
    fn with(mut self, fact: String) -> Observation {
        self.seen.messages.insert(0, fact);
        self
    }
}

fn observe(messages: &[Message], end: End, since: Instant) -> Observation {
    Observation {
        seen: Seen {
            messages: messages.iter().map(Message::summary).collect(),
            end,
        },
        elapsed: since.elapsed(),
    }
}

/// One side of a comparison: where clients connect, and the PostgreSQL behind it.
struct Target<'a> {
    addr: SocketAddr,
    pg: &'a mut PgServer,
}

impl Target<'_> {
    fn connect(&self) -> WireClient {
        WireClient::connect(self.addr).unwrap_or_else(|e| panic!("connect {}: {e}", self.addr))
    }

    /// A connected, started session.
    fn session(&self) -> WireClient {
        let mut c = self.connect();
        let (m, end) = c.startup("postgres");
        assert!(
            m.last().is_some_and(|m| m.kind == b'Z'),
            "startup through {} failed: {m:?} {end:?}",
            self.addr
        );
        c
    }

    fn admin(&self, sql: &str) -> String {
        admin(self.pg, sql)
    }
}

/// Runs SQL on PostgreSQL directly, as an operator would with psql.
fn admin(pg: &PgServer, sql: &str) -> String {
    let out = Command::new(format!("{PG_BIN}/psql"))
        .args(["-h", &pg.host().to_string(), "-p", &pg.port().to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-XAtc", sql])
        .env("PGCONNECT_TIMEOUT", "5")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn backend_pid(c: &WireClient) -> u32 {
    c.key.expect("BackendKeyData").0
}

fn read_to_end(c: &mut WireClient, since: Instant) -> Observation {
    let (m, end) = c.read_until(WAIT, |_| false);
    observe(&m, end, since)
}

fn terminate(t: &Target, pid: u32) {
    assert_eq!(t.admin(&format!("select pg_terminate_backend({pid})")), "t");
}

// === scenarios ===

fn terminate_idle(t: &mut Target) -> Observation {
    let mut c = t.session();
    let since = Instant::now();
    terminate(t, backend_pid(&c));
    read_to_end(&mut c, since)
}

fn terminate_in_query(t: &mut Target) -> Observation {
    let mut c = t.session();
    c.query("select pg_sleep(30)").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let since = Instant::now();
    terminate(t, backend_pid(&c));
    read_to_end(&mut c, since)
}

/// A backend that exits with input it has not read closes with a reset, not a FIN (what
/// pgbench saw when its sessions were terminated between two queries).
fn terminate_with_unread_input(t: &mut Target) -> Observation {
    let mut c = t.session();
    c.query("select pg_sleep(30)").unwrap();
    // Sent while the sleep runs, so PostgreSQL has not read it when it exits.
    std::thread::sleep(Duration::from_millis(200));
    c.query("select 1").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let since = Instant::now();
    terminate(t, backend_pid(&c));
    read_to_end(&mut c, since)
}

fn idle_in_transaction_timeout(t: &mut Target) -> Observation {
    let mut c = t.session();
    c.query("set idle_in_transaction_session_timeout = 300; begin")
        .unwrap();
    let since = Instant::now();
    read_to_end(&mut c, since)
}

fn idle_session_timeout(t: &mut Target) -> Observation {
    let mut c = t.session();
    c.query("set idle_session_timeout = 300").unwrap();
    let since = Instant::now();
    read_to_end(&mut c, since)
}

fn fatal_at_startup(t: &mut Target) -> Observation {
    let mut c = t.connect();
    let since = Instant::now();
    let (m, end) = c.startup("no_such_database");
    let (more, end) = if end == End::Open {
        c.read_until(WAIT, |_| false)
    } else {
        (Vec::new(), end)
    };
    observe(&[m, more].concat(), end, since)
}

fn backend_killed(t: &mut Target) -> Observation {
    let mut c = t.session();
    c.query("select pg_sleep(30)").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let ready = |pg: &PgServer| pg.log().matches(READY).count();
    let before = ready(t.pg);
    let since = Instant::now();
    kill(backend_pid(&c));
    let seen = read_to_end(&mut c, since);
    // The postmaster resets every backend after a crash: wait until it has come back from
    // that (it may not have started when the client saw the end), then until it serves.
    let deadline = Instant::now() + Duration::from_secs(30);
    while ready(t.pg) <= before {
        assert!(
            Instant::now() < deadline,
            "no crash restart:\n{}",
            t.pg.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    support::wait_ready(t.pg);
    seen
}

fn postmaster_killed_in_transaction(t: &mut Target) -> Observation {
    let mut c = t.session();
    c.query("begin").unwrap();
    let (m, _) = c.read_until(WAIT, |m| m.last().is_some_and(|m| m.kind == b'Z'));
    assert_eq!(m.last().map(Message::summary).as_deref(), Some("Z:T"));
    let since = Instant::now();
    t.pg.kill_postmaster();
    let seen = read_to_end(&mut c, since);
    t.pg.restart();
    seen
}

fn postmaster_killed_during_startup(t: &mut Target) -> Observation {
    let mut c = t.connect();
    c.send(&request(80_877_103)).unwrap();
    let answer = c.read_byte(WAIT);
    let since = Instant::now();
    t.pg.kill_postmaster();
    // The backend notices and exits (FATAL, then a FIN) before the startup packet comes:
    // sent earlier, the packet could arrive unread and turn the FIN into a reset, by chance.
    std::thread::sleep(Duration::from_millis(300));
    let (m, end) = c.startup("postgres");
    let (more, end) = if end == End::Open {
        c.read_until(WAIT, |_| false)
    } else {
        (Vec::new(), end)
    };
    let seen = observe(&[m, more].concat(), end, since).with(format!("answer:{answer:?}"));
    t.pg.restart();
    seen
}

fn backend_ends_while_client_not_reading(t: &mut Target) -> Observation {
    let mut c = t.session();
    c.query("select repeat('x', 1000) from generate_series(1, 50000)")
        .unwrap();
    // The backend fills every buffer on the way and blocks in send.
    std::thread::sleep(Duration::from_millis(500));
    let since = Instant::now();
    terminate(t, backend_pid(&c));
    let (m, end) = c.read_until(Duration::from_secs(20), |_| false);
    // How many rows got through depends on the buffers between the two (the proxy adds
    // its own); what must match is the kinds of message and how the stream ended. Whether
    // PostgreSQL's FATAL gets out is its own race (not sent if the signal finds it blocked
    // in send, sent if it finds it between rows), so an ErrorResponse is checked, not
    // compared: if there is one, it is the termination, and it is last.
    if let Some(at) = m.iter().position(|m| m.kind == b'E') {
        assert_eq!(m[at].sqlstate().as_deref(), Some("57P01"), "{:?}", m[at]);
        assert_eq!(at, m.len() - 1, "the ErrorResponse is not the last message");
    }
    let mut kinds: Vec<String> = m
        .iter()
        .filter(|m| m.kind != b'E')
        .map(|m| (m.kind as char).to_string())
        .collect();
    kinds.dedup();
    Observation {
        seen: Seen {
            messages: kinds,
            end,
        },
        elapsed: since.elapsed(),
    }
}

fn client_fin_in_query(t: &mut Target) -> Observation {
    let mut c = t.session();
    c.query("select pg_sleep(0.5)").unwrap();
    let since = Instant::now();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    read_to_end(&mut c, since)
}

fn client_reset_in_query(t: &mut Target) -> Observation {
    let c = t.session();
    let pid = backend_pid(&c);
    let mut c = c;
    c.query("select pg_sleep(0.5)").unwrap();
    let since = Instant::now();
    socket2::SockRef::from(&c.stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    backend_gone(t, pid, since)
}

fn client_half_close_after_terminate(t: &mut Target) -> Observation {
    let mut c = t.session();
    let pid = backend_pid(&c);
    c.send(b"X\0\0\0\x04").unwrap();
    let since = Instant::now();
    c.stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut seen = read_to_end(&mut c, since);
    let gone = backend_gone(t, pid, since);
    seen.seen.messages.extend(gone.seen.messages);
    seen
}

/// Waits for the backend to leave pg_stat_activity: the client's end reached PostgreSQL.
fn backend_gone(t: &Target, pid: u32, since: Instant) -> Observation {
    let deadline = Instant::now() + WAIT;
    let query = format!("select count(*) from pg_stat_activity where pid = {pid}");
    while t.admin(&query) != "0" {
        if Instant::now() >= deadline {
            return Observation {
                seen: Seen {
                    messages: vec!["backend still there".into()],
                    end: End::Open,
                },
                elapsed: since.elapsed(),
            };
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Observation {
        seen: Seen {
            messages: vec!["backend gone".into()],
            end: End::Eof,
        },
        elapsed: since.elapsed(),
    }
}

fn cancel_in_query(t: &mut Target) -> Observation {
    let mut c = t.session();
    let (pid, key) = c.key.unwrap();
    c.query("select pg_sleep(30)").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let since = Instant::now();
    let mut cancel = t.connect();
    cancel.send(&cancel_request(pid, key)).unwrap();
    let (_, cancel_end) = cancel.read_until(WAIT, |_| false);
    let (mut m, _) = c.read_until(WAIT, |m| m.last().is_some_and(|m| m.kind == b'Z'));
    // The session is still usable after the cancel.
    c.query("select 1").unwrap();
    let (more, end) = c.read_until(WAIT, |m| m.last().is_some_and(|m| m.kind == b'Z'));
    m.extend(more);
    let mut seen = observe(&m, end, since);
    seen.seen
        .messages
        .push(format!("cancel connection: {cancel_end:?}"));
    seen
}

fn negotiation(t: &mut Target, code: u32) -> Observation {
    let mut c = t.connect();
    let since = Instant::now();
    c.send(&request(code)).unwrap();
    let answer = c.read_byte(WAIT);
    if answer != Ok(b'N') {
        // `S` or `G`: the handshake would follow, which this client does not speak. The
        // answer is what must match (it came from PostgreSQL either way).
        return observe(&[], End::Open, since).with(format!("answer:{:?}", answer.map(char::from)));
    }
    let (m, end) = c.startup("postgres");
    observe(&m, end, since).with(format!("answer:{:?}", answer.map(char::from)))
}

fn ssl_request_then_startup(t: &mut Target) -> Observation {
    negotiation(t, 80_877_103)
}

fn gssenc_request_then_startup(t: &mut Target) -> Observation {
    negotiation(t, 80_877_104)
}

fn kill(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
}

/// Waits until a session through the proxy starts (the route is in place).
fn wait_routed(proxy: &ProxyProc, through: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let started = WireClient::connect(through)
            .map(|mut c| c.startup("postgres").0)
            .is_ok_and(|m| m.last().is_some_and(|m| m.kind == b'Z'));
        if started {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "never routed:\n{}",
            proxy.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A state a proxied connection is fenced in, and how a fresh connection is brought there.
type FenceState = (&'static str, fn(&mut WireClient));

/// The states a proxied connection is fenced in.
const FENCE_STATES: &[FenceState] = &[
    ("before_startup", |c| {
        // Connected and routed, nothing sent yet.
        std::thread::sleep(Duration::from_millis(100));
        let _ = c;
    }),
    ("after_ssl_request", |c| {
        c.send(&request(80_877_103)).unwrap();
        assert_eq!(c.read_byte(WAIT), Ok(b'N'));
    }),
    ("idle", |c| {
        c.startup("postgres");
    }),
    ("in_query", |c| {
        c.startup("postgres");
        c.query("select pg_sleep(30)").unwrap();
        std::thread::sleep(Duration::from_millis(200));
    }),
    ("not_reading_a_large_result", |c| {
        c.startup("postgres");
        c.query("select repeat('x', 1000) from generate_series(1, 50000)")
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
    }),
];

type Scenario = fn(&mut Target) -> Observation;

const SCENARIOS: &[(&str, Scenario)] = &[
    ("terminate_idle", terminate_idle),
    ("terminate_in_query", terminate_in_query),
    ("terminate_with_unread_input", terminate_with_unread_input),
    ("idle_in_transaction_timeout", idle_in_transaction_timeout),
    ("idle_session_timeout", idle_session_timeout),
    ("fatal_at_startup", fatal_at_startup),
    ("backend_killed", backend_killed),
    (
        "backend_ends_while_client_not_reading",
        backend_ends_while_client_not_reading,
    ),
    ("client_fin_in_query", client_fin_in_query),
    ("client_reset_in_query", client_reset_in_query),
    (
        "client_half_close_after_terminate",
        client_half_close_after_terminate,
    ),
    ("cancel_in_query", cancel_in_query),
    ("ssl_request_then_startup", ssl_request_then_startup),
    ("gssenc_request_then_startup", gssenc_request_then_startup),
    (
        "postmaster_killed_in_transaction",
        postmaster_killed_in_transaction,
    ),
    (
        "postmaster_killed_during_startup",
        postmaster_killed_during_startup,
    ),
];

fn closed_total(proxy: &ProxyProc) -> f64 {
    proxy
        .metrics()
        .lines()
        .filter(|l| l.starts_with("tendril_proxy_connections_closed_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the proxy holds nothing for finished scenarios; returns what is left.
fn leftovers(proxy: &ProxyProc) -> Option<String> {
    support::leftovers_of(proxy, ProxyProc::kernel_map_entries, Duration::from_secs(5))
}

/// As [`leftovers`], not counting the client-socket path's `backends` map.
fn leftovers_but_backends(proxy: &ProxyProc) -> Option<String> {
    support::leftovers_of(
        proxy,
        |p| {
            p.kernel_map_entries()
            - p.metric(&format!(
                "tendril_proxy_kernel_client_socket_map_entries{{cluster=\"{}\",map=\"backends\"}}",
                support::CLUSTER
            ))
            .unwrap_or(0.0)
        },
        Duration::from_secs(5),
    )
}

async fn matrix(topology: Topology, path: Path) {
    let netns = (topology == Topology::Remote).then(Netns::create);
    let mut pg = match &netns {
        Some(ns) => PgServer::start_in(ns, &[]),
        None => PgServer::start(),
    };
    let direct = SocketAddr::new(pg.host(), pg.port());
    let mut env = Env::new().await;
    // The same PostgreSQL is also the standby the read-only listener sends clients to: the
    // data plane does not care whether it is in recovery.
    env.set_standbys_at("db1", &[("db2", pg.host(), pg.port())]);
    env.route_to(Some(("db1", pg.host(), pg.port())), false)
        .await;
    let read_only_port = tendril_testkit::free_port();
    let read_only_listen = format!("127.0.0.1:{read_only_port}");
    let mut flags = path.flags().to_vec();
    flags.extend(["--read-only-listen-address", read_only_listen.as_str()]);
    let proxy = ProxyProc::start(&env, "matrix", &flags, &[]);
    let through = SocketAddr::from(([127, 0, 0, 1], proxy.port));
    let read_only = SocketAddr::from(([127, 0, 0, 1], read_only_port));
    wait_routed(&proxy, through);
    wait_routed(&proxy, read_only);
    assert!(leftovers(&proxy).is_none(), "{:?}", leftovers(&proxy));
    let mut failures = Vec::new();
    for (name, scenario) in SCENARIOS {
        let expected = scenario(&mut Target {
            addr: direct,
            pg: &mut pg,
        });
        for (listener, addr) in [("", through), (" (read-only listener)", read_only)] {
            let before = closed_total(&proxy);
            let got = scenario(&mut Target { addr, pg: &mut pg });
            let timing = got.elapsed.abs_diff(expected.elapsed);
            println!(
                "{topology:?} {path:?} {name}{listener}: direct {:?} in {:?}, proxied {:?} in {:?}",
                expected.seen, expected.elapsed, got.seen, got.elapsed
            );
            if got.seen != expected.seen {
                failures.push(format!(
                    "{name}{listener}: direct saw {:?}, through the proxy {:?}",
                    expected.seen, got.seen
                ));
            } else if timing > TOLERANCE {
                failures.push(format!(
                    "{name}{listener}: direct ended in {:?}, through the proxy in {:?}",
                    expected.elapsed, got.elapsed
                ));
            }
            if let Some(left) = leftovers(&proxy) {
                failures.push(format!("{name}{listener}: the proxy kept {left}"));
            }
            if closed_total(&proxy) <= before {
                failures.push(format!("{name}{listener}: no close counted in the metrics"));
            }
        }
    }
    let read_only_accepted = proxy
        .metric(&format!(
            "tendril_proxy_read_only_routed_total{{cluster=\"{}\",to=\"standby\"}}",
            support::CLUSTER
        ))
        .unwrap_or(0.0);
    if read_only_accepted < SCENARIOS.len() as f64 {
        failures.push(format!(
            "the read-only listener sent {read_only_accepted} connections to the standby, fewer than the scenarios"
        ));
    }
    // The fence has no direct counterpart: a failover routes the proxies nowhere, and every
    // proxied connection to the old master ends at once, whatever state it is in.
    for (name, state) in FENCE_STATES {
        let mut c = WireClient::connect(through).unwrap();
        state(&mut c);
        let since = Instant::now();
        env.route_to(None, false).await;
        let (_, end) = c.read_until(WAIT, |_| false);
        let elapsed = since.elapsed();
        // The client closes its end too (until then the proxy's side waits in FIN-WAIT-2).
        drop(c);
        println!("{topology:?} {path:?} fence {name}: {end:?} in {elapsed:?}");
        if end == End::Open || elapsed > TOLERANCE {
            failures.push(format!(
                "fence {name}: the client saw {end:?} after {elapsed:?}"
            ));
        }
        // Not the backends map: its entries are PostgreSQL's sockets, which live until the
        // backend notices its client left (a pg_sleep does not); checked below.
        if let Some(left) = leftovers_but_backends(&proxy) {
            failures.push(format!("fence {name}: the proxy kept {left}"));
        }
        env.route_to(Some(("db1", pg.host(), pg.port())), false)
            .await;
        wait_routed(&proxy, through);
    }
    // Once the fenced sessions' backends are gone, nothing at all is left.
    admin(
        &pg,
        "select pg_terminate_backend(pid) from pg_stat_activity where application_name = 'matrix'",
    );
    if let Some(left) = leftovers(&proxy) {
        failures.push(format!("after the fences: the proxy kept {left}"));
    }
    if path == Path::Default {
        // The default forwards these clients (on this host, non-blocking) in the kernel on
        // their own socket, and nothing on the pair path.
        let taken = |path: &str, reason: &str| {
            proxy
                .metric(&format!(
                    "tendril_proxy_kernel_path_total{{cluster=\"{}\",path=\"{path}\",reason=\"{reason}\"}}",
                    support::CLUSTER
                ))
                .unwrap_or(0.0)
        };
        let on_host = taken("client_socket", "client_on_host");
        let pair = proxy.path_total("pair");
        if on_host < 2.0 * SCENARIOS.len() as f64 || pair > 0.0 {
            failures.push(format!(
                "the default took the client-socket path {on_host} times (of {} scenario runs) and the pair path {pair} times",
                2 * SCENARIOS.len()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{topology:?} {path:?}: {} of {} scenarios differ from a direct connection:\n  {}\nproxy log tail:\n{}",
        failures.len(),
        SCENARIOS.len() + FENCE_STATES.len(),
        failures.join("\n  "),
        tail(&proxy.log_text(), 30)
    );
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

macro_rules! matrix_tests {
    ($($name:ident: $topology:ident, $path:ident;)*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                matrix(Topology::$topology, Path::$path).await;
            }
        )*
    };
}

matrix_tests! {
    local_userspace_io_uring: Local, Uring;
    local_userspace_epoll: Local, Epoll;
    local_kernel_pair: Local, KernelPair;
    local_kernel_client_socket_with_direct_replies: Local, KernelClientSocket;
    remote_userspace_io_uring: Remote, Uring;
    remote_userspace_epoll: Remote, Epoll;
    remote_kernel_pair: Remote, KernelPair;
    remote_kernel_client_socket: Remote, KernelClientSocket;
    local_default: Local, Default;
    remote_default: Remote, Default;
}
