//! A driver's own test suite pointed at the proxy: tokio-postgres's integration tests (the
//! version this workspace uses, from cargo's registry, unchanged but for the port they
//! connect to), run once against PostgreSQL directly and once through the proxy on each
//! forwarding path. Every test must end the same way through the proxy as directly:
//! authentication exchanges (password, md5, SCRAM), COPY in and out, notifications, cancel
//! requests, pipelining, errors, and the types.
//!
//! The suite expects what its upstream CI sets up (rust-postgres' `docker/sql_setup.sh`):
//! the roles `pass_user`, `md5_user` and `scram_user` with their authentication methods, and
//! the extensions `hstore`, `citext` and `ltree`. It connects to one fixed port, so the
//! direct run has PostgreSQL there, and the proxied runs the proxy.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::{Env, PATHS, ProxyProc, wait_routed};
use tendril_testkit::PgServer;

/// The port the suite's sources name; each run's is substituted for it.
const UPSTREAM_PORT: &str = "5433";

/// The source directory of the tokio-postgres package this workspace builds.
fn driver_source() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let package = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "tokio-postgres")
        .expect("tokio-postgres in the workspace's dependencies");
    PathBuf::from(package["manifest_path"].as_str().unwrap())
        .parent()
        .unwrap()
        .to_owned()
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The package's manifest with only what its integration tests use: no benchmarks, and of the
/// dev-dependencies only tokio and futures-util (the others serve optional type features,
/// which stay off). The package's own lock file pins the rest; cargo fetches from the
/// registry what it does not have.
fn trimmed_manifest(manifest: &str) -> String {
    let mut out = String::new();
    let mut keep = true;
    for line in manifest.lines() {
        if line.starts_with('[') {
            let section = line.trim();
            keep = !(section == "[[bench]]"
                || section.starts_with("[dev-dependencies.")
                    && section != "[dev-dependencies.tokio]"
                    && section != "[dev-dependencies.futures-util]");
        }
        if keep {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Builds the suite to connect to `port`; returns the test binary.
fn build_suite(port: u16) -> PathBuf {
    let work = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("driver-suite");
    let src = work.join("tokio-postgres");
    let _ = std::fs::remove_dir_all(&src);
    copy_tree(&driver_source(), &src);
    let manifest = std::fs::read_to_string(src.join("Cargo.toml")).unwrap();
    std::fs::write(src.join("Cargo.toml"), trimmed_manifest(&manifest)).unwrap();
    let mut files = Vec::new();
    tests_of(&src.join("tests"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        std::fs::write(&f, text.replace(UPSTREAM_PORT, &port.to_string())).unwrap();
    }
    let out = Command::new(env!("CARGO"))
        .args(["test", "--test", "test", "--no-run"])
        .arg("--message-format=json")
        .arg("--manifest-path")
        .arg(src.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", work.join("target"))
        // Its own lints are not this workspace's business.
        .env("RUSTFLAGS", "--cap-lints=allow")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building tokio-postgres's tests: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "test")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("the test binary")
}

fn tests_of(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            tests_of(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// PostgreSQL as the suite's upstream CI sets it up.
async fn prepare(pg: &PgServer) {
    let (client, connection) = tokio_postgres::connect(&pg.conninfo(), tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(connection);
    client
        .batch_execute(
            "CREATE ROLE pass_user PASSWORD 'password' LOGIN;
             CREATE ROLE md5_user PASSWORD 'password' LOGIN;
             SET password_encryption TO 'scram-sha-256';
             CREATE ROLE scram_user PASSWORD 'password' LOGIN;
             CREATE EXTENSION hstore;
             CREATE EXTENSION citext;
             CREATE EXTENSION ltree;",
        )
        .await
        .unwrap();
    std::fs::write(
        pg.data_dir().join("pg_hba.conf"),
        "host all pass_user 127.0.0.1/32 password\n\
         host all md5_user 127.0.0.1/32 md5\n\
         host all scram_user 127.0.0.1/32 scram-sha-256\n\
         host all postgres 127.0.0.1/32 trust\n\
         local all postgres trust\n",
    )
    .unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
}

/// Each test's outcome (`ok`, `FAILED`, `ignored`) and the run's whole output.
fn run_suite(binary: &Path) -> (BTreeMap<String, String>, String) {
    let out = Command::new(binary)
        .args(["--test-threads", "2"])
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let outcomes = text
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("test ")?;
            let (name, outcome) = rest.rsplit_once(" ... ")?;
            Some((name.to_owned(), outcome.trim().to_owned()))
        })
        .collect();
    (outcomes, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_own_tests_end_the_same_through_every_path() {
    let port = tendril_testkit::free_port();
    let binary = tokio::task::spawn_blocking(move || build_suite(port))
        .await
        .unwrap();

    let direct_pg = PgServer::start_on(port, &[]);
    prepare(&direct_pg).await;
    let (direct, direct_text) = run_suite(&binary);
    drop(direct_pg);
    let passed = direct.values().filter(|o| *o == "ok").count();
    // The suite as a whole ran, and against a PostgreSQL set up as it expects.
    assert!(
        passed >= 100,
        "only {passed} tests passed directly:\n{direct_text}"
    );
    let failed: Vec<_> = direct.iter().filter(|(_, o)| *o == "FAILED").collect();
    assert!(
        failed.is_empty(),
        "failed directly: {failed:?}\n{direct_text}"
    );
    eprintln!(
        "tokio-postgres's suite directly: {} tests, {passed} passed",
        direct.len()
    );

    let mut env = Env::new().await;
    let pg = PgServer::start();
    prepare(&pg).await;
    env.route(Some(("db1", pg.port())), false).await;
    let listen = format!("127.0.0.1:{port}");
    for (path, flags) in PATHS {
        let mut args = vec!["--listen-address", listen.as_str()];
        args.extend_from_slice(flags);
        let proxy = ProxyProc::start(&env, &format!("suite-{path}"), &args, &[]);
        wait_routed(port, pg.port(), Duration::from_secs(10)).await;
        let (through, text) = run_suite(&binary);
        let differ: Vec<String> = direct
            .iter()
            .filter(|(name, outcome)| through.get(*name) != Some(outcome))
            .map(|(name, outcome)| {
                format!(
                    "{name}: directly {outcome}, through {path} {:?}",
                    through.get(name)
                )
            })
            .collect();
        assert!(
            differ.is_empty() && through.len() == direct.len(),
            "through {path}: {differ:?}\n{text}\n{}",
            proxy.log_text()
        );
        eprintln!(
            "tokio-postgres's suite through {path}: {} tests, the same outcomes as directly",
            through.len()
        );
        drop(proxy);
    }
}
