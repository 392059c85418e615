//! TLS through the proxy, with real PostgreSQL speaking TLS, real etcd and the real proxy:
//! the proxy never answers an SSLRequest itself while a route may come, so a client that
//! requires TLS is held through a switchover and then does its handshake end to end with
//! PostgreSQL (`sslmode=verify-full` verifies PostgreSQL's own certificate: the proxy is
//! transparent); every forwarding path carries TLS; a switchover under a TLS-requiring load
//! fails no connection and no transaction, whether clients connect per transaction or keep
//! persistent sessions.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Env, PATHS, ProxyProc};
use tendril_e2e::writer::{Mode, Style, Writer};
use tendril_keeper::switchover::IdleSessionCloser;
use tendril_testkit::{PG_BIN, PgServer};

/// What TLS a session got.
const SSL_QUERY: &str = "select ssl, version from pg_stat_ssl where pid = pg_backend_pid()";

/// psql through the proxy verifying PostgreSQL's certificate, running `sql`.
fn psql_verify_full(proxy_port: u16, pg: &PgServer, sql: &str) -> Command {
    let ca = pg.tls().unwrap().ca_cert.display().to_string();
    let mut cmd = Command::new(format!("{PG_BIN}/psql"));
    cmd.arg(format!(
        "host=127.0.0.1 port={proxy_port} user=postgres dbname=postgres \
         sslmode=verify-full sslrootcert={ca} connect_timeout=20"
    ))
    .args(["-XAtc", sql]);
    cmd
}

fn output_ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "psql failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_ssl_request_gets_its_handshake_with_postgres_once_routed() {
    let mut env = Env::new().await;
    let pg = PgServer::start_tls(&[]);
    // A switchover in progress: no master, connections held.
    let g = env.route(None, true).await;
    let proxy = ProxyProc::start(&env, "p1", &["--hold-timeout", "20s"], &[]);
    env.wait_acked("p1", g, Duration::from_secs(10)).await;
    let started = Instant::now();
    let mut held = psql_verify_full(proxy.port, &pg, SSL_QUERY)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        held.try_wait().unwrap().is_none(),
        "a held TLS client was answered before the master appeared"
    );
    env.route(Some(("db1", pg.port())), false).await;
    let out = tokio::task::spawn_blocking(move || held.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    println!("held TLS connection served after {:?}", started.elapsed());
    assert_eq!(output_ok(out), "t|TLSv1.3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forwarding_path_carries_tls_end_to_end() {
    let mut env = Env::new().await;
    let pg = PgServer::start_tls(&[]);
    env.route(Some(("db1", pg.port())), false).await;
    for (name, flags) in PATHS {
        let uid = format!("p-{name}");
        let proxy = ProxyProc::start(&env, &uid, flags, &[]);
        support::wait_routed(proxy.port, pg.port(), Duration::from_secs(15)).await;
        let out = psql_verify_full(proxy.port, &pg, SSL_QUERY)
            .output()
            .unwrap();
        assert_eq!(output_ok(out), "t|TLSv1.3", "{name}");
        // A result larger than every buffer on the way, encrypted end to end.
        let sql = "select repeat(i::text, 100) from generate_series(1, 20000) i";
        let through = output_ok(psql_verify_full(proxy.port, &pg, sql).output().unwrap());
        let direct = Command::new(format!("{PG_BIN}/psql"))
            .arg(pg.conninfo())
            .args(["-XAtc", sql])
            .output()
            .unwrap();
        assert_eq!(through, output_ok(direct), "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switchover_under_tls_requiring_load_fails_no_connection_or_transaction() {
    let mut env = Env::new().await;
    let pg1 = PgServer::start_tls(&[]);
    let pg2 = PgServer::start_tls(&[]);
    for pg in [&pg1, &pg2] {
        let init = Command::new(format!("{PG_BIN}/pgbench"))
            .args(["-i", "-q", "-s", "1", "-h", "127.0.0.1"])
            .args(["-p", &pg.port().to_string(), "-U", "postgres", "postgres"])
            .output()
            .unwrap();
        assert!(
            init.status.success(),
            "{}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    // The persistent clients trust both servers' CAs (each test server has its own).
    let cas = tempfile::tempdir().unwrap();
    let bundle = cas.path().join("cas.pem");
    let pem: Vec<u8> = [&pg1, &pg2]
        .iter()
        .flat_map(|pg| std::fs::read(&pg.tls().unwrap().ca_cert).unwrap())
        .collect();
    std::fs::write(&bundle, pem).unwrap();
    for pg in [&pg1, &pg2] {
        tendril_e2e::writer::create_table("127.0.0.1", pg.port()).await;
    }
    for (i, (name, flags)) in PATHS.iter().enumerate() {
        env.route(Some(("db1", pg1.port())), false).await;
        let uid = format!("s-{name}");
        let proxy = ProxyProc::start(&env, &uid, flags, &[]);
        support::wait_routed(proxy.port, pg1.port(), Duration::from_secs(15)).await;
        // Persistent TLS sessions too, as a pool keeps them: transactions of several round
        // trips, a pause between them.
        let persistent = Writer::start_styled(
            "127.0.0.1",
            proxy.port,
            3,
            Mode::Persistent,
            1 + i as i64 * 1_000_000,
            Style {
                tls_ca: Some(bundle.clone()),
                in_transaction: Some(Duration::from_millis(20)),
                think: Duration::from_millis(100),
                login: None,
            },
        )
        .await;
        // New connection per transaction, each requiring TLS. A thread per client: pgbench
        // connects in blocking mode, and one thread stuck in a held connect would leave the
        // other client's finished session unread through the drain.
        let load = Command::new(format!("{PG_BIN}/pgbench"))
            .args([
                "-C",
                "-S",
                "-c",
                "2",
                "-j",
                "2",
                "-T",
                "4",
                "-h",
                "127.0.0.1",
            ])
            .args(["-p", &proxy.port.to_string(), "-U", "postgres", "postgres"])
            .env("PGSSLMODE", "require")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // The switchover: hold (while the old master's keeper ends its sessions as they go
        // idle), then the new master.
        let keeper_session = tokio_postgres::connect(&pg1.conninfo(), tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(keeper_session.1);
        env.route(None, true).await;
        let closer = IdleSessionCloser::start(keeper_session.0, Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(800)).await;
        drop(closer);
        env.route(Some(("db2", pg2.port())), false).await;
        let (status, text) = support::finished(load).await;
        println!("{name}:\n{text}");
        assert!(status.success(), "{name}: pgbench failed:\n{text}");
        assert!(
            !text.contains("SSL") && !text.contains("error"),
            "{name}: a connection failed:\n{text}"
        );
        let served = support::pgbench_processed(&text);
        assert!(served > 20, "{name}: only {served} transactions:\n{text}");
        let report = persistent.stop().await;
        assert!(
            report.failures.is_empty(),
            "{name}: {} persistent TLS transactions failed: {:?}",
            report.failures.len(),
            report.failures
        );
        assert!(
            report.first_ack_on(pg2.port()).is_some() && report.connections > 3,
            "{name}: the persistent sessions moved to the new master ({} connections)",
            report.connections
        );
        // Every session to the old master ended between transactions: the drain had
        // nothing left to cut.
        let log = proxy.log_text();
        let drain = log
            .lines()
            .find(|l| l.contains("switchover drain over"))
            .unwrap_or_else(|| panic!("{name}: the proxy drained:\n{log}"));
        assert!(drain.contains(" left=0"), "{name}: {drain}");
        // Both masters served: the held connections went to the new one.
        let on_new = Command::new(format!("{PG_BIN}/psql"))
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=require",
                proxy.port
            ))
            .args(["-XAtc", "show port"])
            .output()
            .unwrap();
        assert_eq!(output_ok(on_new), pg2.port().to_string(), "{name}");
    }
}

/// No master, and the proxy has a refusal certificate: a client requiring TLS completes a
/// handshake with the proxy and is told why it is refused (libpq since 15.10 would otherwise
/// print only "server sent an error response during SSL exchange"); `verify-full` checks
/// that certificate like any server's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_tls_client_is_told_why() {
    let mut env = Env::new().await;
    // Its certificates (a server certificate for 127.0.0.1 and its CA) serve the proxy too.
    let pg = PgServer::start_tls(&[]);
    let g = env.route(None, false).await;
    let proxy = start_refuser(&env, "refuser", &pg, &[]);
    env.wait_acked("refuser", g, Duration::from_secs(10)).await;
    let ca = pg.tls().unwrap().ca_cert.display().to_string();
    for mode in [
        "sslmode=require".to_owned(),
        "sslmode=prefer".to_owned(),
        format!("sslmode=verify-full sslrootcert={ca}"),
    ] {
        let out = Command::new(format!("{PG_BIN}/psql"))
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres connect_timeout=10 {mode}",
                proxy.port
            ))
            .args(["-XAtc", "select 1"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        println!("{mode}: {}", stderr.trim());
        assert!(!out.status.success(), "{mode}: connected without a master");
        assert!(
            stderr.contains("no master available for cluster"),
            "{mode}: psql did not say why: {stderr}"
        );
    }
    // A certificate the client does not trust is not accepted either: the proxy cannot
    // vouch for anything but itself.
    let other = tempfile::tempdir().unwrap();
    let untrusted = tendril_testkit::make_certificates(other.path());
    let out = Command::new(format!("{PG_BIN}/psql"))
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode=verify-full sslrootcert={}",
            proxy.port,
            untrusted.ca_cert.display()
        ))
        .args(["-XAtc", "select 1"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("certificate verify failed"),
        "{stderr}"
    );
}

/// A proxy that refuses inside TLS, with PostgreSQL's certificate (for 127.0.0.1, from the
/// CA the clients trust) as its refusal certificate.
fn start_refuser(env: &Env, uid: &str, pg: &PgServer, extra: &[&str]) -> ProxyProc {
    let tls = pg.tls().unwrap();
    let (cert, key) = (
        tls.server_cert.display().to_string(),
        tls.server_key.display().to_string(),
    );
    let mut args = vec!["--refusal-cert-file", &cert, "--refusal-key-file", &key];
    args.extend_from_slice(extra);
    ProxyProc::start(env, uid, &args, &[])
}

/// psql's error connecting through the proxy with `mode` (a failure is expected).
fn psql_error(port: u16, mode: &str) -> String {
    let out = Command::new(format!("{PG_BIN}/psql"))
        .arg(format!(
            "host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=10 {mode}"
        ))
        .args(["-XAtc", "select 1"])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{mode}: psql connected");
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_for_the_connection_limit_and_an_unreachable_master_say_why_over_tls() {
    let mut env = Env::new().await;
    let pg = PgServer::start_tls(&[]);
    let g = env.route(Some(("db1", pg.port())), false).await;
    let proxy = start_refuser(&env, "limited", &pg, &["--max-connections", "1"]);
    env.wait_acked("limited", g, Duration::from_secs(10)).await;
    // One connection takes the only place (the proxy connects it to PostgreSQL, which
    // waits for its startup packet).
    let _taken = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    for mode in ["sslmode=require", "sslmode=prefer", "sslmode=disable"] {
        let stderr = psql_error(proxy.port, mode);
        println!("limit, {mode}: {stderr}");
        assert!(
            stderr.contains("too many connections to the proxy (limit 1)"),
            "{mode}: psql did not say why: {stderr}"
        );
    }
    drop(_taken);
    // A master the proxy cannot reach: a port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let g = env.route(Some(("db2", closed_port)), false).await;
    env.wait_acked("limited", g, Duration::from_secs(10)).await;
    std::thread::sleep(Duration::from_millis(300));
    for mode in ["sslmode=require", "sslmode=disable"] {
        let stderr = psql_error(proxy.port, mode);
        println!("unreachable, {mode}: {stderr}");
        assert!(
            stderr.contains("cannot connect to the master at 127.0.0.1"),
            "{mode}: psql did not say why: {stderr}"
        );
    }
}
