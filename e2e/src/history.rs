//! The whole-cluster soak's history: every write, read, routing change and fault of a run,
//! as one JSON object per line, in the order they were recorded. The soak writes it; the
//! checker ([`crate::checker`]) reads it back with the final database contents and nothing
//! else, so a history file from any run can be checked again.
//!
//! Times are microseconds since the run's start (one monotonic clock for every client).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Write as _};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One record of the history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// An INSERT of a unique id.
    Write(Write),
    /// A read of a table.
    Read(Read),
    /// What the proxies were told to route to (from a watch of the cluster data).
    Route(Route),
    /// A fault the nemesis injected.
    Fault(Fault),
}

/// How a write ended, as the client knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Committed and acknowledged.
    Ack,
    /// Certainly not committed: never sent, or the server refused the statement.
    Fail,
    /// Sent, and the connection ended (or the server was stopped) before the answer: it may
    /// or may not have committed.
    Unknown,
}

/// The server that answered: its node (address:port) and the timeline it wrote on.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Server {
    /// `inet_server_addr():inet_server_port()`.
    pub node: String,
    /// The timeline of its current WAL insert position.
    pub timeline: u32,
}

/// A write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Write {
    /// The client (`p0-w1`, `direct-w0`).
    pub client: String,
    /// Where it connected: a proxy (`p0`) or a node straight (`direct`).
    pub via: String,
    /// The table.
    pub table: String,
    /// The id, unique in the run.
    pub id: i64,
    /// Invoked.
    pub start_us: u64,
    /// Completed.
    pub end_us: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Who acknowledged it (acknowledged writes only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<Server>,
    /// Why it failed or is unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A read: how many rows the table holds, and whether it holds the id the client last saw
/// acknowledged (read-after-acknowledged-write).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Read {
    /// The client.
    pub client: String,
    /// Where it connected.
    pub via: String,
    /// The table.
    pub table: String,
    /// Invoked.
    pub start_us: u64,
    /// Completed.
    pub end_us: u64,
    /// An id acknowledged before this read was invoked, which it must see.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after_ack: Option<i64>,
    /// The answer: rows in the table, and whether `after_ack` was among them (None: the read
    /// failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<Seen>,
    /// Who answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<Server>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What a read saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// Rows in the table.
    pub rows: i64,
    /// Whether the id the read had to see was there.
    pub found: bool,
}

/// A routing change the proxies were told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    /// When the watch saw it.
    pub at_us: u64,
    /// The master's node (address:port), or none (fenced, holding).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub master: Option<String>,
    /// Its position among the routing changes the watch saw.
    pub seq: u64,
}

/// A fault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Its kind (`kill-postmaster`, `freeze`, ...): the report counts by kind.
    pub name: String,
    /// What exactly (`k1 for 3.2 s`).
    pub detail: String,
    /// Injected.
    pub start_us: u64,
    /// Healed (equal to `start_us` for an instant fault).
    pub end_us: u64,
}

impl Event {
    /// When it started (writes and reads: invoked; routes: seen).
    pub fn start_us(&self) -> u64 {
        match self {
            Event::Write(w) => w.start_us,
            Event::Read(r) => r.start_us,
            Event::Route(r) => r.at_us,
            Event::Fault(f) => f.start_us,
        }
    }
}

/// Writes events as JSON lines.
pub fn write(path: &Path, events: &[Event]) -> std::io::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for e in events {
        serde_json::to_writer(&mut out, e)?;
        out.write_all(b"\n")?;
    }
    out.flush()
}

/// Reads a history file; a line that is not an event is an error naming it.
pub fn read(path: &Path) -> Result<Vec<Event>, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut events = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| format!("{}: {e}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        events.push(
            serde_json::from_str(&line)
                .map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))?,
        );
    }
    Ok(events)
}

/// The final contents: every table's ids.
pub type Contents = BTreeMap<String, BTreeSet<i64>>;

/// Writes the final contents as JSON.
pub fn write_contents(path: &Path, contents: &Contents) -> std::io::Result<()> {
    std::fs::write(path, serde_json::to_vec(contents)?)
}

/// Reads the final contents.
pub fn read_contents(path: &Path) -> Result<Contents, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}
