//! pgjdbc (Debian's libpostgresql-jdbc-java, blocking sockets) through every forwarding path:
//! its transcript of queries, prepared statements, a 200,000-row result, a cursor, errors,
//! COPY both ways, a notification and a backend ended from outside must equal the one of a
//! direct connection, plain and over TLS. Blocking readers are the clients the kernel's
//! client-socket path must leave alone, and a client thread blocked forever is the failure
//! a proxy must never cause.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::{Env, PATHS, ProxyProc, wait_routed};
use tendril_testkit::PgServer;

/// The JDK and pgjdbc, as Debian installs them (`cargo xtask deps` probes both).
const JAVAC: &str = "/usr/lib/jvm/java-17-openjdk-amd64/bin/javac";
const JAVA: &str = "/usr/lib/jvm/java-17-openjdk-amd64/bin/java";
const PGJDBC: &str = "/usr/share/java/postgresql.jar";

/// Compiles the client once.
fn compile() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/jdbc/JdbcTranscript.java");
    let out = Command::new(JAVAC)
        .args(["-cp", PGJDBC, "-d"])
        .arg(dir.path())
        .arg(source)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// The client's transcript through `port`; it fails the test if the client errs or does
/// not finish within 90 s (a hung client).
fn transcript(classes: &Path, port: u16, direct: u16, ssl: bool) -> String {
    let mut child = Command::new(JAVA)
        .arg("-cp")
        .arg(format!("{PGJDBC}:{}", classes.display()))
        .args([
            "JdbcTranscript",
            "127.0.0.1",
            &port.to_string(),
            &direct.to_string(),
        ])
        .args(ssl.then_some("ssl"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the pgjdbc client through port {port} hung:\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the pgjdbc client through port {port} failed:\n{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgjdbc_sees_through_every_path_what_it_sees_directly() {
    let mut env = Env::new().await;
    let pg = PgServer::start_tls(&[]);
    env.route(Some(("db1", pg.port())), false).await;
    let classes = compile();
    let direct = pg.port();
    let plain = transcript(classes.path(), direct, direct, false);
    let tls = transcript(classes.path(), direct, direct, true);
    // What a direct connection shows, so that equality below means something.
    assert!(plain.contains("large 200000"), "{plain}");
    assert!(
        plain.contains("error 22012") && plain.contains("duplicate 23505"),
        "{plain}"
    );
    assert!(plain.contains("copy 50000 50000"), "{plain}");
    assert!(plain.contains("notify 1 hello"), "{plain}");
    assert!(plain.contains("terminated 57P01 at once"), "{plain}");
    assert!(
        tls.contains("ssl=true") && plain.contains("ssl=false"),
        "{tls}\n{plain}"
    );
    for (name, flags) in PATHS {
        let proxy = ProxyProc::start(&env, &format!("j-{name}"), flags, &[]);
        wait_routed(proxy.port, pg.port(), Duration::from_secs(10)).await;
        let port = proxy.port;
        let classes = classes.path().to_owned();
        let (got_plain, got_tls) = tokio::task::spawn_blocking(move || {
            (
                transcript(&classes, port, direct, false),
                transcript(&classes, port, direct, true),
            )
        })
        .await
        .unwrap();
        assert_eq!(got_plain, plain, "{name}: pgjdbc, plain");
        assert_eq!(got_tls, tls, "{name}: pgjdbc over TLS");
        println!("{name}: pgjdbc transcripts equal a direct connection's");
    }
}
