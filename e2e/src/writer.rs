//! A writer through the proxy that records every acknowledged write, to prove none is lost and
//! to time the write gap around a fault.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the writer uses connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// One connection per worker, reconnecting after an error (a typical application).
    Persistent,
    /// A new connection per transaction: held connections during a switchover are visible.
    PerTransaction,
}

/// How a writer's clients connect and what each of their transactions is, beyond [`Mode`].
#[derive(Debug, Clone, Default)]
pub struct Style {
    /// Connect over TLS (required), verifying the server against this CA certificate.
    pub tls_ca: Option<PathBuf>,
    /// Each write is an explicit transaction of several round trips: BEGIN, the INSERT, a
    /// statement that lasts this long, COMMIT (`None`: a single INSERT).
    pub in_transaction: Option<Duration>,
    /// Pause after each transaction, as an application between two requests.
    pub think: Duration,
    /// Log in as this role instead of the harness's superuser.
    pub login: Option<crate::Login>,
}

/// What the writer saw.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Ids whose INSERT was acknowledged (committed), with when and the port of the server
    /// that acknowledged it (`inet_server_port()`: which node, as every node shares the
    /// system identifier).
    pub acked: Vec<(i64, Instant, u16)>,
    /// Failed attempts, with when and why.
    pub failures: Vec<(Instant, String)>,
    /// Connections opened.
    pub connections: u64,
}

impl Report {
    /// The first acknowledged write at or after `t`.
    pub fn first_success_after(&self, t: Instant) -> Option<Instant> {
        self.acked
            .iter()
            .map(|(_, at, _)| *at)
            .filter(|at| *at >= t)
            .min()
    }

    /// The last acknowledged write before `t`.
    pub fn last_success_before(&self, t: Instant) -> Option<Instant> {
        self.acked
            .iter()
            .map(|(_, at, _)| *at)
            .filter(|at| *at < t)
            .max()
    }

    /// The longest stretch without an acknowledged write that contains `t`.
    pub fn gap_around(&self, t: Instant) -> Option<Duration> {
        Some(
            self.first_success_after(t)?
                .duration_since(self.last_success_before(t)?),
        )
    }

    /// The longest time without an acknowledged write, among the gaps that end at or after
    /// `t` (the write outage a fault at `t` caused, wherever it fell).
    pub fn max_gap_after(&self, t: Instant) -> Option<Duration> {
        let mut times: Vec<Instant> = self.acked.iter().map(|(_, at, _)| *at).collect();
        times.sort();
        times
            .windows(2)
            .filter(|w| w[1] >= t)
            .map(|w| w[1].duration_since(w[0]))
            .max()
    }

    /// When the server on `port` first acknowledged a write.
    pub fn first_ack_on(&self, port: u16) -> Option<Instant> {
        self.acks_on(port).min()
    }

    /// When the server on `port` last acknowledged a write.
    pub fn last_ack_on(&self, port: u16) -> Option<Instant> {
        self.acks_on(port).max()
    }

    fn acks_on(&self, port: u16) -> impl Iterator<Item = Instant> + '_ {
        self.acked.iter().filter(move |a| a.2 == port).map(|a| a.1)
    }

    /// Acknowledged ids.
    pub fn ids(&self) -> Vec<i64> {
        self.acked.iter().map(|(id, _, _)| *id).collect()
    }
}

/// A running writer.
#[derive(Debug)]
pub struct Writer {
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Creates the table the writer fills.
pub async fn create_table(host: &str, port: u16) {
    create_table_as(host, port, None).await
}

async fn create_table_as(host: &str, port: u16, login: Option<&crate::Login>) {
    let client = crate::connect_as(host, port, login)
        .await
        .expect("connect to create the writes table");
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS writes (id bigint PRIMARY KEY, at timestamptz DEFAULT now())")
        .await
        .expect("create the writes table");
}

impl Writer {
    /// Starts `workers` writers through `port` on this host (a proxy), ids from 1.
    pub async fn start(port: u16, workers: usize, mode: Mode) -> Writer {
        Writer::start_to("127.0.0.1", port, workers, mode, 1).await
    }

    /// Starts `workers` writers to `host:port` (a PostgreSQL straight, bypassing the
    /// proxies), numbering ids from `first_id` so they never collide with another writer's.
    pub async fn start_to(
        host: &str,
        port: u16,
        workers: usize,
        mode: Mode,
        first_id: i64,
    ) -> Writer {
        Writer::start_styled(host, port, workers, mode, first_id, Style::default()).await
    }

    /// As [`Writer::start_to`], with the clients' [`Style`].
    pub async fn start_styled(
        host: &str,
        port: u16,
        workers: usize,
        mode: Mode,
        first_id: i64,
        style: Style,
    ) -> Writer {
        create_table_as(host, port, style.login.as_ref()).await;
        let stop = Arc::new(AtomicBool::new(false));
        let report = Arc::new(Mutex::new(Report::default()));
        let next = Arc::new(AtomicI64::new(first_id));
        let tasks = (0..workers)
            .map(|_| {
                tokio::spawn(work(
                    host.to_owned(),
                    port,
                    mode,
                    style.clone(),
                    stop.clone(),
                    report.clone(),
                    next.clone(),
                ))
            })
            .collect();
        Writer {
            stop,
            report,
            tasks,
        }
    }

    /// A copy of what was seen so far.
    pub fn snapshot(&self) -> Report {
        self.report.lock().expect("report lock").clone()
    }

    /// Waits until a write acknowledged at or after `t` exists (or `limit` passes).
    pub async fn wait_success_after(&self, t: Instant, limit: Duration) -> Option<Instant> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(at) = self.snapshot().first_success_after(t) {
                return Some(at);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Stops and returns the report.
    pub async fn stop(self) -> Report {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(15), t).await;
        }
        self.report.lock().expect("report lock").clone()
    }
}

async fn work(
    host: String,
    port: u16,
    mode: Mode,
    style: Style,
    stop: Arc<AtomicBool>,
    report: Arc<Mutex<Report>>,
    next: Arc<AtomicI64>,
) {
    let mut client: Option<tokio_postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        if mode == Mode::PerTransaction {
            // Close the previous connection before opening the next, as a client that
            // connects per transaction does.
            client = None;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            let connect = async {
                match &style.tls_ca {
                    Some(ca) => crate::connect_tls(&host, port, ca).await,
                    None => crate::connect_as(&host, port, style.login.as_ref()).await,
                }
            };
            client = match tokio::time::timeout(Duration::from_secs(40), connect).await {
                Ok(Ok(c)) => {
                    report.lock().expect("report lock").connections += 1;
                    Some(c)
                }
                Ok(Err(e)) => {
                    fail(&report, describe(&e));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
                Err(_) => {
                    fail(&report, "connect timed out".into());
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else { continue };
        let id = next.fetch_add(1, Ordering::Relaxed);
        // A client-side deadline only: a statement_timeout would cancel a commit waiting for a
        // synchronous standby and report it committed (locally) — not what we count.
        let write = write_once(c, id, style.in_transaction);
        match tokio::time::timeout(Duration::from_secs(30), write).await {
            Ok(Ok(server)) => {
                report.lock().expect("report lock").acked.push((
                    id,
                    Instant::now(),
                    u16::try_from(server).unwrap_or(0),
                ));
                if !style.think.is_zero() {
                    tokio::time::sleep(style.think).await;
                }
            }
            Ok(Err(e)) => {
                fail(&report, describe(&e));
                client = None;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(_) => {
                fail(&report, format!("insert {id} timed out"));
                client = None;
            }
        }
    }
}

/// Writes `id`; returns the port of the server that committed it.
async fn write_once(
    client: &mut tokio_postgres::Client,
    id: i64,
    in_transaction: Option<Duration>,
) -> Result<i32, tokio_postgres::Error> {
    const INSERT: &str = "INSERT INTO writes (id) VALUES ($1) RETURNING inet_server_port()";
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    let Some(lasting) = in_transaction else {
        return Ok(client.query_one(INSERT, &params).await?.get(0));
    };
    let tx = client.transaction().await?;
    let server: i32 = tx.query_one(INSERT, &params).await?.get(0);
    tx.execute("SELECT pg_sleep($1)", &[&lasting.as_secs_f64()])
        .await?;
    tx.commit().await?;
    Ok(server)
}

/// An error as the user would read it: the server's SQLSTATE and message when it sent one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

fn fail(report: &Mutex<Report>, why: String) {
    report
        .lock()
        .expect("report lock")
        .failures
        .push((Instant::now(), why));
}
