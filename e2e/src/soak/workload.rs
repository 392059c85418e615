//! The soak's clients: writers appending unique ids to a few tables through each proxy and
//! one straight to the master's PostgreSQL (an application that bypasses the proxies and
//! keeps its connection to whichever node it reached, the client that shows a second
//! master), and readers through each proxy checking that they see what was acknowledged.
//! Every operation becomes an event of the history ([`crate::history`]).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::history::{Event, Outcome, Read, Seen, Server, Write};

/// Tables the writers spread their ids over.
pub const TABLES: [&str; 3] = ["soak_a", "soak_b", "soak_c"];

/// How long a client waits for one operation before it calls the outcome unknown (a
/// client-side deadline only: a statement_timeout would cancel a commit waiting for a
/// synchronous standby after it committed locally).
pub const OPERATION: Duration = Duration::from_secs(30);

/// What the clients share: the clock, the history, the next id, each table's last
/// acknowledged id, and the stop flag.
#[derive(Debug)]
pub struct Shared {
    start: Instant,
    history: Mutex<Vec<Event>>,
    next_id: AtomicI64,
    last_acked: [AtomicI64; TABLES.len()],
    stop: AtomicBool,
}

impl Shared {
    /// A new run starting now.
    pub fn new() -> Arc<Shared> {
        Arc::new(Shared {
            start: Instant::now(),
            history: Mutex::new(Vec::new()),
            next_id: AtomicI64::new(1),
            last_acked: Default::default(),
            stop: AtomicBool::new(false),
        })
    }

    /// Microseconds since the run's start.
    pub fn us(&self) -> u64 {
        self.at(Instant::now())
    }

    /// `t` in microseconds since the run's start.
    pub fn at(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.start).as_micros() as u64
    }

    /// Records an event.
    pub fn record(&self, e: Event) {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(e);
    }

    /// The history so far.
    pub fn history(&self) -> Vec<Event> {
        self.history
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Tells every client to stop.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

/// Creates the tables on the master.
pub async fn create_tables(host: &str, port: u16) -> Result<(), tokio_postgres::Error> {
    let c = crate::connect(host, port).await?;
    for t in TABLES {
        c.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {t} (id bigint PRIMARY KEY, at timestamptz DEFAULT now())"
        ))
        .await?;
    }
    Ok(())
}

/// The master's PostgreSQL as an application with its own discovery knows it
/// (`host`, `port`), updated by the soak from the routing it watches.
pub type Master = Arc<Mutex<Option<(String, u16)>>>;

/// Where a client connects.
#[derive(Debug, Clone)]
pub enum Target {
    /// A proxy on this host: its name (`p0`) and port.
    Proxy(String, u16),
    /// The master straight, as published when the client connects.
    Direct(Master),
}

impl Target {
    fn via(&self) -> String {
        match self {
            Target::Proxy(name, _) => name.clone(),
            Target::Direct(_) => "direct".into(),
        }
    }

    fn address(&self) -> Option<(String, u16)> {
        match self {
            Target::Proxy(_, port) => Some(("127.0.0.1".into(), *port)),
            Target::Direct(master) => master.lock().unwrap_or_else(|e| e.into_inner()).clone(),
        }
    }
}

/// The server's node and timeline, as a write or read returns them.
const WHO: &str = "host(inet_server_addr()) || ':' || inet_server_port(), \
                   pg_walfile_name(pg_current_wal_lsn())";

fn server(row: &tokio_postgres::Row, at: usize) -> Option<Server> {
    let node: String = row.try_get(at).ok()?;
    let wal: String = row.try_get(at + 1).ok()?;
    let timeline = u32::from_str_radix(wal.get(..8)?, 16).ok()?;
    Some(Server { node, timeline })
}

/// A statement that was sent and got no clean answer may have committed: the connection
/// ended (a backend terminated while its commit waited for a synchronous standby has
/// committed locally and closes without an error), the server is shutting down or refusing
/// (classes 57 and 08), or the client's deadline passed. Any other error from the server
/// (a standby's 25006 read-only refusal, a conflict) means the statement did not commit.
fn outcome_of(e: &tokio_postgres::Error) -> Outcome {
    match e.as_db_error() {
        Some(db) => {
            let code = db.code().code();
            if code.starts_with("57") || code.starts_with("08") {
                Outcome::Unknown
            } else {
                Outcome::Fail
            }
        }
        None => Outcome::Unknown,
    }
}

async fn connect(target: &Target) -> Result<tokio_postgres::Client, String> {
    let (host, port) = target
        .address()
        .ok_or_else(|| "no master published".to_owned())?;
    match tokio::time::timeout(OPERATION, crate::connect(&host, port)).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("connect to {host}:{port}: {e}")),
        Err(_) => Err(format!("connect to {host}:{port}: timed out")),
    }
}

/// The client's connection: a new one when it has none or it closed.
async fn connection<'a>(
    client: &'a mut Option<tokio_postgres::Client>,
    target: &Target,
) -> Result<&'a tokio_postgres::Client, String> {
    if client
        .as_ref()
        .is_none_or(tokio_postgres::Client::is_closed)
    {
        *client = Some(connect(target).await?);
    }
    client.as_ref().ok_or_else(|| "no connection".to_owned())
}

/// Runs one statement with `$1` = `id` within the client's deadline: its row, or how it
/// ended and why.
async fn run(
    c: &tokio_postgres::Client,
    sql: &str,
    id: i64,
) -> Result<tokio_postgres::Row, (Outcome, String)> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&id];
    match tokio::time::timeout(OPERATION, c.query_one(sql, &params)).await {
        Ok(Ok(row)) => Ok(row),
        Ok(Err(e)) => Err((outcome_of(&e), e.to_string())),
        Err(_) => Err((
            Outcome::Unknown,
            "no answer within the client's deadline".into(),
        )),
    }
}

/// A writer: one connection, kept while it works (a new one after any error), an INSERT
/// of a fresh id per transaction, spread over the tables.
pub async fn writer(shared: Arc<Shared>, name: String, target: Target) {
    let mut client: Option<tokio_postgres::Client> = None;
    while !shared.stopped() {
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let table_index = (id as usize) % TABLES.len();
        let table = TABLES[table_index];
        let start_us = shared.us();
        let result = match connection(&mut client, &target).await {
            Ok(c) => {
                let sql = format!("INSERT INTO {table} (id) VALUES ($1) RETURNING {WHO}");
                run(c, &sql, id).await
            }
            // Never sent: certainly not committed.
            Err(e) => Err((Outcome::Fail, e)),
        };
        let mut w = Write {
            client: name.clone(),
            via: target.via(),
            table: table.into(),
            id,
            start_us,
            end_us: shared.us(),
            outcome: Outcome::Ack,
            server: None,
            error: None,
        };
        match result {
            Ok(row) => {
                w.server = server(&row, 0);
                shared.last_acked[table_index].fetch_max(id, Ordering::Relaxed);
            }
            Err((outcome, why)) => {
                w.outcome = outcome;
                w.error = Some(why);
                client = None;
            }
        }
        let failed = w.outcome != Outcome::Ack;
        shared.record(Event::Write(w));
        // A pace that keeps a 30-minute history in memory and on disk (about 100 writes a
        // second per writer) while every fault still lands among writes.
        tokio::time::sleep(Duration::from_millis(if failed { 50 } else { 10 })).await;
    }
}

/// A reader: counts a table's rows and looks for the last id acknowledged in it before
/// the read began (read-after-acknowledged-write), table after table.
pub async fn reader(shared: Arc<Shared>, name: String, target: Target) {
    let mut client: Option<tokio_postgres::Client> = None;
    let mut turn = 0usize;
    while !shared.stopped() {
        let table_index = turn % TABLES.len();
        turn += 1;
        let table = TABLES[table_index];
        let after = shared.last_acked[table_index].load(Ordering::Relaxed);
        let start_us = shared.us();
        let result = match connection(&mut client, &target).await {
            Ok(c) => {
                let sql = format!(
                    "SELECT count(*), coalesce(bool_or(id = $1), false), {WHO} FROM {table}"
                );
                run(c, &sql, after).await
            }
            Err(e) => Err((Outcome::Fail, e)),
        };
        let mut r = Read {
            client: name.clone(),
            via: target.via(),
            table: table.into(),
            start_us,
            end_us: shared.us(),
            after_ack: (after > 0).then_some(after),
            seen: None,
            server: None,
            error: None,
        };
        match result {
            Ok(row) => {
                r.seen = Some(Seen {
                    rows: row.get(0),
                    found: row.get(1),
                });
                r.server = server(&row, 2);
            }
            Err((_, why)) => {
                r.error = Some(why);
                client = None;
            }
        }
        let failed = r.seen.is_none();
        shared.record(Event::Read(r));
        tokio::time::sleep(Duration::from_millis(if failed { 50 } else { 20 })).await;
    }
}

/// Every table's ids, read from `host:port` (the master at the end).
pub async fn contents(host: &str, port: u16) -> Result<crate::history::Contents, String> {
    let c = crate::connect(host, port)
        .await
        .map_err(|e| format!("connect to {host}:{port}: {e}"))?;
    let mut out = crate::history::Contents::new();
    for t in TABLES {
        let rows = c
            .query(&format!("SELECT id FROM {t}"), &[])
            .await
            .map_err(|e| format!("read {t}: {e}"))?;
        out.insert(t.into(), rows.iter().map(|r| r.get::<_, i64>(0)).collect());
    }
    Ok(out)
}
