//! The soak's clients, each a thread looping until the run ends: raw-protocol sessions that
//! check every row they get back, a streaming client that copies megabytes in and out and
//! compares them byte for byte, and the programs users run (pgbench, psql) under a watchdog.
//!
//! A fault may end any session at any moment: that is expected, and the client reconnects.
//! What fails the soak is a client left waiting more than [`SLACK`] past what its operation
//! takes on a direct connection (a stranded client), and a completed operation whose bytes
//! differ from what was sent or asked for (bytes lost, duplicated or reordered).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::nemesis::Rng;
use crate::support::wire::{End, Message, WireClient};
use tendril_testkit::PG_BIN;

/// How long past an operation's own duration a client may wait: a fault ends a direct
/// connection at once, and a switchover holds new connections for at most
/// [`crate::nemesis::HELD`], which is added where a connection is made.
pub const SLACK: Duration = Duration::from_secs(2);

/// What every client reports to.
#[derive(Default)]
pub struct Report {
    failures: Mutex<Vec<String>>,
    counts: Mutex<BTreeMap<&'static str, u64>>,
    /// The longest an operation took past its own expected duration, and which.
    worst: Mutex<(Duration, String)>,
}

impl Report {
    pub fn fail(&self, what: String) {
        eprintln!("SOAK FAILURE: {what}");
        self.failures.lock().unwrap().push(what);
    }

    pub fn count(&self, what: &'static str) {
        self.add(what, 1);
    }

    pub fn add(&self, what: &'static str, n: u64) {
        *self.counts.lock().unwrap().entry(what).or_default() += n;
    }

    /// Records how long operation `what` took past `expected`.
    pub fn took(&self, what: &str, elapsed: Duration, expected: Duration) {
        let over = elapsed.saturating_sub(expected);
        let mut worst = self.worst.lock().unwrap();
        if over > worst.0 {
            *worst = (over, what.to_owned());
        }
    }

    pub fn failures(&self) -> Vec<String> {
        self.failures.lock().unwrap().clone()
    }

    pub fn counts(&self) -> BTreeMap<&'static str, u64> {
        self.counts.lock().unwrap().clone()
    }

    /// The longest wait past expected, and the operation that waited.
    pub fn worst(&self) -> (Duration, String) {
        self.worst.lock().unwrap().clone()
    }
}

/// Where the clients connect, when they stop, and what they report to.
pub struct Run {
    pub addr: SocketAddr,
    pub stop: Arc<AtomicBool>,
    pub report: Arc<Report>,
}

impl Run {
    pub fn going(&self) -> bool {
        !self.stop.load(Ordering::Relaxed)
    }
}

/// The application name of the soak's raw-protocol sessions (the nemesis picks among them).
pub const APPLICATION: &str = "soak";

/// How an operation on a session went.
enum Step {
    /// Done; the session goes on.
    Continue,
    /// The session ended (a fault, or the client's own close): reconnect.
    Ended,
}

/// A session's bound for `expected`, failing the soak if `seen` shows it waited past it.
fn check_wait(
    run: &Run,
    what: &str,
    since: Instant,
    expected: Duration,
    messages: &[Message],
    end: End,
    done: bool,
) -> bool {
    let elapsed = since.elapsed();
    run.report.took(what, elapsed, expected);
    if !done && end == End::Open {
        run.report.fail(format!(
            "{what}: the client waited {elapsed:?} (expected {expected:?}) and the connection \
             is still open; last messages: {:?}",
            messages
                .iter()
                .rev()
                .take(3)
                .map(Message::summary)
                .collect::<Vec<_>>()
        ));
        return false;
    }
    if elapsed > expected + SLACK {
        run.report.fail(format!(
            "{what}: the client waited {elapsed:?}, expected {expected:?} (+{SLACK:?})"
        ));
    }
    true
}

fn ready(m: &[Message]) -> bool {
    m.last().is_some_and(|m| m.kind == b'Z')
}

/// Starts a session; None when a fault refused or ended it (reconnect).
fn session(run: &Run) -> Option<WireClient> {
    let since = Instant::now();
    let Ok(mut c) = WireClient::connect(run.addr) else {
        run.report.count("connect refused");
        std::thread::sleep(Duration::from_millis(50));
        return None;
    };
    let (m, end) = c.startup_as("postgres", APPLICATION);
    let expected = crate::nemesis::HELD;
    if !check_wait(run, "startup", since, expected, &m, end, ready(&m)) || !ready(&m) {
        run.report.count("startup refused or ended");
        std::thread::sleep(Duration::from_millis(50));
        return None;
    }
    run.report.count("sessions");
    Some(c)
}

/// Runs `sql` and reads its answer up to ReadyForQuery or the end, within its bound.
fn exchange(
    run: &Run,
    c: &mut WireClient,
    what: &str,
    sql: &str,
    expected: Duration,
) -> Option<Vec<Message>> {
    if c.query(sql).is_err() {
        return None;
    }
    let since = Instant::now();
    let (m, end) = c.read_until(expected + SLACK + Duration::from_secs(3), ready);
    let done = ready(&m);
    check_wait(run, what, since, expected, &m, end, done);
    done.then_some(m)
}

/// The columns of a DataRow, None for NULL.
fn columns(row: &Message) -> Vec<Option<Vec<u8>>> {
    let b = &row.body;
    let n = u16::from_be_bytes([b[0], b[1]]) as usize;
    let mut at = 2;
    let mut cols = Vec::with_capacity(n);
    for _ in 0..n {
        let len = i32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        at += 4;
        if len < 0 {
            cols.push(None);
        } else {
            let len = len as usize;
            cols.push(Some(b[at..at + len].to_vec()));
            at += len;
        }
    }
    cols
}

fn errored(m: &[Message]) -> bool {
    m.iter().any(|m| m.kind == b'E')
}

/// A raw-protocol client: random queries whose every row is checked, long queries, results
/// it pauses reading, its own FIN, reset, Terminate and idle timeout.
pub fn wire_client(run: &Run, mut rng: Rng) {
    while run.going() {
        let Some(mut c) = session(run) else { continue };
        while run.going() {
            match wire_step(run, &mut c, &mut rng) {
                Step::Continue => {}
                Step::Ended => break,
            }
        }
    }
}

fn wire_step(run: &Run, c: &mut WireClient, rng: &mut Rng) -> Step {
    match rng.below(100) {
        0..60 => {
            // A result of known content: every byte is checked.
            let k = rng.below(1_000_000);
            let n = rng.below(200_000) as usize;
            let c_char = (b'a' + rng.below(26) as u8) as char;
            let sql = format!("select {k}, repeat('{c_char}', {n})");
            let Some(m) = exchange(run, c, "query", &sql, Duration::ZERO) else {
                return Step::Ended;
            };
            if errored(&m) {
                run.report.count("query errors");
                return Step::Continue;
            }
            let rows: Vec<&Message> = m.iter().filter(|m| m.kind == b'D').collect();
            let want = vec![
                Some(k.to_string().into_bytes()),
                Some(c_char.to_string().repeat(n).into_bytes()),
            ];
            if rows.len() != 1 || columns(rows[0]) != want {
                run.report.fail(format!(
                    "query {k} x{n}: the rows differ from what was asked: {} rows, first {:?}",
                    rows.len(),
                    rows.first()
                        .map(|r| r.summary().chars().take(80).collect::<String>())
                ));
            }
            run.report.count("queries checked");
            Step::Continue
        }
        60..70 => {
            let ms = 50 + rng.below(250);
            let sql = format!("select pg_sleep({ms} / 1000.0)");
            match exchange(run, c, "sleep", &sql, Duration::from_millis(ms)) {
                Some(_) => Step::Continue,
                None => Step::Ended,
            }
        }
        70..80 => {
            // A large result the client does not read for a while (every buffer fills).
            if c.query("select repeat('y', 1000) from generate_series(1, 20000)")
                .is_err()
            {
                return Step::Ended;
            }
            let pause = Duration::from_millis(100 + rng.below(400));
            std::thread::sleep(pause);
            let since = Instant::now();
            let (m, end) = c.read_until(SLACK + Duration::from_secs(3), ready);
            let done = ready(&m);
            check_wait(run, "large result", since, Duration::ZERO, &m, end, done);
            if !done {
                return Step::Ended;
            }
            let rows = m.iter().filter(|m| m.kind == b'D').count();
            if !errored(&m) && rows != 20_000 {
                run.report
                    .fail(format!("large result: {rows} rows of 20000 arrived"));
            }
            Step::Continue
        }
        80..85 => {
            // Two statements in one message: two results, in order.
            let k = rng.below(1_000_000);
            let sql = format!("select {k}; select {k} + 1");
            let Some(m) = exchange(run, c, "two statements", &sql, Duration::ZERO) else {
                return Step::Ended;
            };
            let rows: Vec<_> = m.iter().filter(|m| m.kind == b'D').map(columns).collect();
            let want = vec![
                vec![Some(k.to_string().into_bytes())],
                vec![Some((k + 1).to_string().into_bytes())],
            ];
            if !errored(&m) && rows != want {
                run.report
                    .fail(format!("two statements {k}: got rows {rows:?}"));
            }
            Step::Continue
        }
        85..89 => {
            // The client's FIN in a query: the server ends the session when the query ends.
            let ms = 50 + rng.below(200);
            if c.query(&format!("select pg_sleep({ms} / 1000.0)")).is_err() {
                return Step::Ended;
            }
            let since = Instant::now();
            let _ = c.stream.shutdown(std::net::Shutdown::Write);
            let (m, end) = c.read_until(SLACK + Duration::from_secs(3), |_| false);
            check_wait(
                run,
                "client FIN",
                since,
                Duration::from_millis(ms),
                &m,
                end,
                false,
            );
            run.report.count("client FIN");
            Step::Ended
        }
        89..93 => {
            // The client's reset in a query.
            let _ = c.query("select pg_sleep(0.1)");
            let _ = socket2::SockRef::from(&c.stream).set_linger(Some(Duration::ZERO));
            run.report.count("client reset");
            Step::Ended
        }
        93..97 => {
            let _ = c.send(b"X\0\0\0\x04");
            run.report.count("client terminate");
            Step::Ended
        }
        _ => {
            // The server ends an idle session by itself.
            if exchange(
                run,
                c,
                "set timeout",
                "set idle_session_timeout = 100",
                Duration::ZERO,
            )
            .is_none()
            {
                return Step::Ended;
            }
            let since = Instant::now();
            let (m, end) = c.read_until(SLACK + Duration::from_secs(3), |_| false);
            check_wait(
                run,
                "idle_session_timeout",
                since,
                Duration::from_millis(100),
                &m,
                end,
                false,
            );
            run.report.count("idle timeouts");
            Step::Ended
        }
    }
}

/// A CopyData message.
fn copy_data(bytes: &[u8], out: &mut Vec<u8>) {
    out.push(b'd');
    out.extend_from_slice(&u32::try_from(bytes.len() + 4).unwrap().to_be_bytes());
    out.extend_from_slice(bytes);
}

/// Streams a few megabytes in with COPY FROM STDIN and back out with COPY TO STDOUT: the
/// bytes out must be the bytes in, in order, whenever both completed.
pub fn copy_client(run: &Run, mut rng: Rng) {
    while run.going() {
        let Some(mut c) = session(run) else { continue };
        if exchange(
            run,
            &mut c,
            "create",
            "create temp table soak_copy (id int, payload text)",
            Duration::ZERO,
        )
        .is_none_or(|m| errored(&m))
        {
            continue;
        }
        while run.going() && copy_round(run, &mut c, &mut rng) {}
    }
}

/// One round in and out; false when the session ended.
fn copy_round(run: &Run, c: &mut WireClient, rng: &mut Rng) -> bool {
    let rows = 2_000 + rng.below(20_000) as usize;
    let mut text = Vec::new();
    let mut wire = Vec::new();
    for id in 0..rows {
        let len = 10 + rng.below(300) as usize;
        let mut line = format!("{id}\t").into_bytes();
        line.extend((0..len).map(|_| b"0123456789abcdef"[rng.below(16) as usize]));
        line.push(b'\n');
        copy_data(&line, &mut wire);
        text.extend_from_slice(&line);
    }
    wire.extend_from_slice(b"c\0\0\0\x04");
    let Some(m) = exchange(run, c, "truncate", "truncate soak_copy", Duration::ZERO) else {
        return false;
    };
    if errored(&m) || c.query("copy soak_copy from stdin").is_err() {
        return !errored(&m);
    }
    let since = Instant::now();
    let (m, end) = c.read_until(SLACK + Duration::from_secs(3), |m| {
        m.last().is_some_and(|m| m.kind == b'G' || m.kind == b'Z')
    });
    let started = m.last().is_some_and(|m| m.kind == b'G');
    check_wait(
        run,
        "copy in start",
        since,
        Duration::ZERO,
        &m,
        end,
        started || ready(&m),
    );
    if !started {
        return ready(&m);
    }
    // The whole stream, then CopyDone; a fault may end the session while it goes.
    let since = Instant::now();
    if let Err(e) = c.send(&wire) {
        if e.kind() == std::io::ErrorKind::TimedOut {
            run.report.fail(format!(
                "copy in: {} bytes not taken in {:?}",
                wire.len(),
                since.elapsed()
            ));
        }
        return false;
    }
    let (m, end) = c.read_until(SLACK + Duration::from_secs(5), ready);
    let done = ready(&m);
    check_wait(run, "copy in", since, Duration::ZERO, &m, end, done);
    if !done || errored(&m) {
        return done;
    }
    let complete = m.iter().find(|m| m.kind == b'C').map(|m| m.summary());
    if complete.as_deref() != Some(&format!("C:COPY {rows}")) {
        run.report
            .fail(format!("copy in of {rows} rows completed as {complete:?}"));
    }
    let Some(m) = exchange(
        run,
        c,
        "copy out",
        "copy (select * from soak_copy order by id) to stdout",
        Duration::ZERO,
    ) else {
        return false;
    };
    if errored(&m) {
        return true;
    }
    let out: Vec<u8> = m
        .iter()
        .filter(|m| m.kind == b'd')
        .flat_map(|m| m.body.iter().copied())
        .collect();
    if out != text {
        let at = out.iter().zip(&text).position(|(a, b)| a != b);
        run.report.fail(format!(
            "copy of {rows} rows: {} bytes in, {} bytes out, first difference at {at:?}",
            text.len(),
            out.len()
        ));
    }
    run.report.count("copies checked");
    true
}

/// Runs a program under a watchdog: it must exit within `expected` + [`SLACK`] (its exit
/// status is not judged: a fault makes pgbench and psql fail, as they would directly).
fn watched(run: &Run, what: &str, cmd: &mut Command, expected: Duration) {
    let since = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let limit = expected + SLACK;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            run.report.took(what, since.elapsed(), expected);
            run.report.count(if status.success() {
                "programs succeeded"
            } else {
                "programs failed"
            });
            return;
        }
        if since.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            run.report.fail(format!(
                "{what} still running after {:?} (expected {expected:?}); output:\n{}{}",
                since.elapsed(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// pgbench runs of two seconds, with persistent connections or one per transaction.
pub fn pgbench_client(run: &Run, mut rng: Rng) {
    while run.going() {
        let mut cmd = Command::new(format!("{PG_BIN}/pgbench"));
        cmd.args([
            "-n",
            "-S",
            "-c",
            "2",
            "-j",
            "1",
            "-T",
            "2",
            "-h",
            "127.0.0.1",
        ])
        .args([
            "-p",
            &run.addr.port().to_string(),
            "-U",
            "postgres",
            "postgres",
        ]);
        if rng.below(2) == 0 {
            cmd.arg("-C");
        }
        // The run, plus a held connection.
        let expected = Duration::from_secs(2) + crate::nemesis::HELD;
        watched(run, "pgbench", &mut cmd, expected);
    }
}

/// psql one-shots, as an operator's scripts run them.
pub fn psql_client(run: &Run, _rng: Rng) {
    while run.going() {
        let mut cmd = Command::new(format!("{PG_BIN}/psql"));
        cmd.arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            run.addr.port()
        ))
        .args(["-XAtc", "select count(*) from pgbench_accounts"]);
        watched(run, "psql", &mut cmd, crate::nemesis::HELD);
        std::thread::sleep(Duration::from_millis(50));
    }
}
