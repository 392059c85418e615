//! The whole-cluster soak's checker: it reads only a history ([`crate::history`]) and the
//! final database contents, and says what went wrong, with the history around each anomaly.
//!
//! What it checks:
//! - **Lost writes**: an acknowledged id missing at the end. An anomaly in synchronous mode;
//!   in asynchronous mode counted, and each attributed to the first failover after it.
//! - **Failed writes present**: an id whose write certainly failed is in the table (the
//!   client's classification, or the database, is wrong).
//! - **Split brain**: two nodes acknowledging writes on the same timeline at overlapping
//!   times, or a write on an older timeline invoked after a newer master was routable (or
//!   had acknowledged).
//! - **Reads**: a read-after-acknowledged-write that missed its id, and a client's reads of a
//!   table going backwards (fewer rows than a read it completed before, beyond the rows of
//!   unknown writes missing at the end). Anomalies in
//!   synchronous mode; counted in asynchronous mode, where a failover may lose rows.
//!
//! - **Blocked clients**: an operation through a proxy that ended later than the faults it
//!   overlapped plus an allowance (the failover time the cluster promises): a client the
//!   data plane left waiting.
//!
//! Unknown outcomes are reported apart: present or not, either is allowed.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::history::{Contents, Event, Outcome, Read, Route, Server, Write};

/// Replication mode of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replication {
    /// Synchronous: no acknowledged write may be lost.
    Sync,
    /// Asynchronous: losses are counted, not anomalies.
    Async,
}

/// One anomaly, with the history excerpt around it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anomaly {
    /// The kind: `lost`, `failed-present`, `split-brain`, `stale-read`, `read-backwards`,
    /// `blocked`.
    pub kind: &'static str,
    /// What happened.
    pub what: String,
    /// When (microseconds since the start).
    pub at_us: u64,
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// Anomalies, in time order.
    pub anomalies: Vec<Anomaly>,
    /// Writes by outcome.
    pub acked: usize,
    /// Writes that certainly failed.
    pub failed: usize,
    /// Writes whose outcome is unknown, and of them how many are present at the end.
    pub unknown: usize,
    /// Unknown writes present at the end.
    pub unknown_present: usize,
    /// Acknowledged writes missing at the end.
    pub lost: usize,
    /// Lost writes by the failover they are attributed to (the routing change's time), or
    /// `None` when no failover followed them.
    pub lost_by_failover: BTreeMap<Option<u64>, usize>,
    /// Reads, and how many failed.
    pub reads: usize,
    /// In asynchronous mode, reads that missed an acknowledged id or went backwards
    /// (counted, not anomalies: a failover may lose rows there).
    pub async_read_losses: usize,
    /// Reads that failed.
    pub reads_failed: usize,
    /// Faults injected, by kind.
    pub faults: BTreeMap<String, usize>,
    /// Master changes the proxies were told of: from the old master's last acknowledged
    /// write to the new one's first (microseconds).
    pub failovers: Vec<u64>,
    /// The longest time without any acknowledged write (microseconds).
    pub longest_unavailable_us: u64,
    /// Operations through the proxies, and the longest any of them lasted past the end of
    /// the faults it overlapped (or past its start when it overlapped none), in
    /// microseconds.
    pub proxied_operations: usize,
    /// See `proxied_operations`.
    pub longest_wait_past_faults_us: u64,
}

impl Report {
    /// Percentile `p` (0-100) of the failover durations, in microseconds.
    pub fn failover_percentile(&self, p: f64) -> Option<u64> {
        let mut d = self.failovers.clone();
        d.sort_unstable();
        let last = d.len().checked_sub(1)?;
        let i = ((p / 100.0) * last as f64).round() as usize;
        d.get(i.min(last)).copied()
    }
}

fn secs(us: u64) -> String {
    format!("{:.3} s", us as f64 / 1e6)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "writes: {} acknowledged, {} failed, {} unknown ({} of them present), {} lost",
            self.acked, self.failed, self.unknown, self.unknown_present, self.lost
        )?;
        writeln!(
            f,
            "reads: {} ({} failed, {} missed rows in asynchronous mode)",
            self.reads, self.reads_failed, self.async_read_losses
        )?;
        let faults: Vec<String> = self
            .faults
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        writeln!(
            f,
            "faults: {} ({})",
            self.faults.values().sum::<usize>(),
            faults.join(", ")
        )?;
        match (
            self.failover_percentile(50.0),
            self.failover_percentile(99.0),
            self.failovers.iter().max(),
        ) {
            (Some(p50), Some(p99), Some(max)) => writeln!(
                f,
                "master changes: {} (write outage p50 {}, p99 {}, max {})",
                self.failovers.len(),
                secs(p50),
                secs(p99),
                secs(*max)
            )?,
            _ => writeln!(f, "master changes: 0")?,
        }
        writeln!(
            f,
            "longest time without an acknowledged write: {}",
            secs(self.longest_unavailable_us)
        )?;
        writeln!(
            f,
            "operations through the proxies: {} (longest wait past the faults it overlapped: {})",
            self.proxied_operations,
            secs(self.longest_wait_past_faults_us)
        )?;
        for (failover, n) in &self.lost_by_failover {
            match failover {
                Some(at) => writeln!(f, "lost to the master change at {}: {n}", secs(*at))?,
                None => writeln!(f, "lost with no master change after them: {n}")?,
            }
        }
        writeln!(f, "anomalies: {}", self.anomalies.len())?;
        for a in &self.anomalies {
            writeln!(f, "  [{}] at {}: {}", a.kind, secs(a.at_us), a.what)?;
        }
        Ok(())
    }
}

/// Checks a history against the final contents. `allowance_us`: how long past the faults it
/// overlapped an operation through a proxy may last (the failover time the cluster promises).
pub fn check(
    events: &[Event],
    contents: &Contents,
    mode: Replication,
    allowance_us: u64,
) -> Report {
    let mut report = Report::default();
    let writes: Vec<&Write> = events
        .iter()
        .filter_map(|e| match e {
            Event::Write(w) => Some(w),
            _ => None,
        })
        .collect();
    let mut routes: Vec<&Route> = events
        .iter()
        .filter_map(|e| match e {
            Event::Route(r) => Some(r),
            _ => None,
        })
        .collect();
    routes.sort_by_key(|r| r.at_us);
    for e in events {
        if let Event::Fault(f) = e {
            *report.faults.entry(f.name.clone()).or_default() += 1;
        }
    }
    let empty = BTreeSet::new();
    let present = |w: &Write| contents.get(&w.table).unwrap_or(&empty).contains(&w.id);
    for w in &writes {
        match w.outcome {
            Outcome::Ack => {
                report.acked += 1;
                if !present(w) {
                    report.lost += 1;
                    let failover = routes
                        .iter()
                        .find(|r| r.at_us >= w.end_us && r.master.is_some() && changes(r, &routes))
                        .map(|r| r.at_us);
                    *report.lost_by_failover.entry(failover).or_default() += 1;
                    if mode == Replication::Sync {
                        report.anomalies.push(Anomaly {
                            kind: "lost",
                            what: format!(
                                "id {} in {} acknowledged by {} via {} at {} is missing",
                                w.id,
                                w.table,
                                server(w.server.as_ref()),
                                w.via,
                                secs(w.end_us)
                            ),
                            at_us: w.end_us,
                        });
                    }
                }
            }
            Outcome::Fail => {
                report.failed += 1;
                if present(w) {
                    report.anomalies.push(Anomaly {
                        kind: "failed-present",
                        what: format!(
                            "id {} in {} failed ({}) but is present",
                            w.id,
                            w.table,
                            w.error.as_deref().unwrap_or("no error recorded")
                        ),
                        at_us: w.end_us,
                    });
                }
            }
            Outcome::Unknown => {
                report.unknown += 1;
                if present(w) {
                    report.unknown_present += 1;
                }
            }
        }
    }
    split_brain(&writes, &routes, &mut report);
    reads(events, contents, mode, &mut report);
    outages(&writes, &routes, &mut report);
    blocked(events, allowance_us, &mut report);
    report.anomalies.sort_by_key(|a| a.at_us);
    report
}

fn server(s: Option<&Server>) -> String {
    s.map_or_else(
        || "an unknown server".to_owned(),
        |s| format!("{} (timeline {})", s.node, s.timeline),
    )
}

/// Whether `r` routes to another master than the route before it.
fn changes(r: &Route, routes: &[&Route]) -> bool {
    let before = routes
        .iter()
        .rfind(|o| o.at_us < r.at_us && o.master.is_some());
    before.is_none_or(|b| b.master != r.master)
}

/// Two masters at once: two nodes acknowledging on one timeline at overlapping times, or an
/// older timeline's master acknowledging a write invoked after a newer one was routable (or
/// had acknowledged a write).
fn split_brain(writes: &[&Write], routes: &[&Route], report: &mut Report) {
    let acked: Vec<(&Write, &Server)> = writes
        .iter()
        .filter(|w| w.outcome == Outcome::Ack)
        .filter_map(|w| Some((*w, w.server.as_ref()?)))
        .collect();
    // Each master (node and timeline): its first acknowledged write, and the span from that
    // write's invocation to the last one's completion.
    let mut first: BTreeMap<&Server, &Write> = BTreeMap::new();
    let mut span: BTreeMap<&Server, (u64, u64)> = BTreeMap::new();
    for (w, s) in &acked {
        let e = first.entry(s).or_insert(w);
        if w.start_us < e.start_us {
            *e = w;
        }
        let sp = span.entry(s).or_insert((w.start_us, w.end_us));
        sp.0 = sp.0.min(w.start_us);
        sp.1 = sp.1.max(w.end_us);
    }
    // Two nodes on one timeline is a fork; it is two masters only if both acknowledged at
    // once (one after the other, the lost writes show it).
    let masters: Vec<(&Server, (u64, u64))> = span.iter().map(|(s, sp)| (*s, *sp)).collect();
    for (i, (a, (a0, a1))) in masters.iter().enumerate() {
        for (b, (b0, b1)) in &masters[i + 1..] {
            if a.timeline == b.timeline && a.node != b.node && a0 < b1 && b0 < a1 {
                report.anomalies.push(Anomaly {
                    kind: "split-brain",
                    what: format!(
                        "{} and {} both acknowledged writes on timeline {} ({}-{} and {}-{})",
                        a.node,
                        b.node,
                        a.timeline,
                        secs(*a0),
                        secs(*a1),
                        secs(*b0),
                        secs(*b1)
                    ),
                    at_us: (*a0).max(*b0),
                });
            }
        }
    }
    // Since when each master was in charge: from the routing to its node that its first
    // acknowledged write followed (back through the routes that named that node or none,
    // a fence or a hold in between), else from that write's completion.
    let since: Vec<(&Server, u64)> = first
        .iter()
        .map(|(s, w)| {
            let mut at = None;
            for r in routes.iter().rev().filter(|r| r.at_us <= w.start_us) {
                match r.master.as_deref() {
                    Some(m) if m == s.node => at = Some(r.at_us),
                    Some(_) => break,
                    None => {}
                }
            }
            (*s, at.unwrap_or(w.end_us).min(w.end_us))
        })
        .collect();
    for (w, s) in &acked {
        let newer = since
            .iter()
            .filter(|(n, at)| n.timeline > s.timeline && n.node != s.node && w.start_us > *at)
            .min_by_key(|(_, at)| *at);
        if let Some((n, at)) = newer {
            report.anomalies.push(Anomaly {
                kind: "split-brain",
                what: format!(
                    "id {} in {} invoked at {} via {} was acknowledged by {} although {} was master since {}",
                    w.id,
                    w.table,
                    secs(w.start_us),
                    w.via,
                    server(Some(s)),
                    server(Some(n)),
                    secs(*at)
                ),
                at_us: w.end_us,
            });
        }
    }
}

/// Reads: each must see the id acknowledged before it began, and a client's reads of a
/// table must not go backwards, beyond the rows of writes whose outcome was unknown and
/// that are missing at the end (a master may show a row it committed locally and never
/// replicated, which a failover then drops).
fn reads(events: &[Event], contents: &Contents, mode: Replication, report: &mut Report) {
    let reads: Vec<&Read> = events
        .iter()
        .filter_map(|e| match e {
            Event::Read(r) => Some(r),
            _ => None,
        })
        .collect();
    report.reads = reads.len();
    report.reads_failed = reads.iter().filter(|r| r.seen.is_none()).count();
    // Unknown writes missing at the end, by table: their invocation times.
    let mut vanished: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for e in events {
        if let Event::Write(w) = e
            && w.outcome == Outcome::Unknown
            && !contents
                .get(&w.table)
                .is_some_and(|ids| ids.contains(&w.id))
        {
            vanished
                .entry(w.table.as_str())
                .or_default()
                .push(w.start_us);
        }
    }
    // Per client and table, completed reads in invocation order.
    let mut last: BTreeMap<(&str, &str), (i64, u64)> = BTreeMap::new();
    let mut sorted = reads.clone();
    sorted.sort_by_key(|r| r.start_us);
    for r in sorted {
        let Some(seen) = r.seen else { continue };
        if let (Some(id), false) = (r.after_ack, seen.found) {
            report.anomalies.push(Anomaly {
                kind: "stale-read",
                what: format!(
                    "{} read {} via {} at {} ({}) without id {id}, acknowledged before",
                    r.client,
                    r.table,
                    r.via,
                    secs(r.start_us),
                    server(r.server.as_ref())
                ),
                at_us: r.end_us,
            });
        }
        let key = (r.client.as_str(), r.table.as_str());
        let allowance = vanished
            .get(r.table.as_str())
            .map_or(0, |v| v.iter().filter(|t| **t < r.start_us).count())
            as i64;
        if let Some((rows, end)) = last.get(&key)
            && *end <= r.start_us
            && seen.rows + allowance < *rows
        {
            report.anomalies.push(Anomaly {
                kind: "read-backwards",
                what: format!(
                    "{} read {} rows of {} via {} at {} ({}) after reading {rows}",
                    r.client,
                    seen.rows,
                    r.table,
                    r.via,
                    secs(r.start_us),
                    server(r.server.as_ref())
                ),
                at_us: r.end_us,
            });
        }
        let entry = last.entry(key).or_insert((seen.rows, r.end_us));
        if seen.rows >= entry.0 {
            *entry = (seen.rows, r.end_us);
        }
    }
    if mode == Replication::Async {
        // A failover may lose rows: the read checks only count there.
        let (kept, dropped): (Vec<Anomaly>, Vec<Anomaly>) = std::mem::take(&mut report.anomalies)
            .into_iter()
            .partition(|a| a.kind != "stale-read" && a.kind != "read-backwards");
        report.anomalies = kept;
        report.async_read_losses = dropped.len();
    }
}

/// Master changes and their write outages; the longest time without an acknowledgement.
fn outages(writes: &[&Write], routes: &[&Route], report: &mut Report) {
    let mut acks: Vec<(u64, &Server)> = writes
        .iter()
        .filter(|w| w.outcome == Outcome::Ack)
        .filter_map(|w| Some((w.end_us, w.server.as_ref()?)))
        .collect();
    acks.sort_by_key(|a| a.0);
    report.longest_unavailable_us = acks.windows(2).map(|p| p[1].0 - p[0].0).max().unwrap_or(0);
    for r in routes {
        let Some(master) = &r.master else { continue };
        if !changes(r, routes) {
            continue;
        }
        let before = acks
            .iter()
            .rfind(|(at, s)| *at <= r.at_us && s.node != *master);
        let after = acks
            .iter()
            .find(|(at, s)| *at >= r.at_us && s.node == *master);
        if let (Some((b, _)), Some((a, _))) = (before, after) {
            report.failovers.push(a - b);
        }
    }
}

/// Operations through the proxies that lasted longer than the faults they overlapped plus
/// `allowance_us`. The faults' windows count from injection to healing, so a client held
/// through an outage and served once it ends is not blocked; one still waiting long after is.
fn blocked(events: &[Event], allowance_us: u64, report: &mut Report) {
    let faults: Vec<(u64, u64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Fault(f) => Some((f.start_us, f.end_us)),
            _ => None,
        })
        .collect();
    for e in events {
        let (what, via, start, end) = match e {
            Event::Write(w) => (
                format!("write of id {} in {}", w.id, w.table),
                &w.via,
                w.start_us,
                w.end_us,
            ),
            Event::Read(r) => (format!("read of {}", r.table), &r.via, r.start_us, r.end_us),
            _ => continue,
        };
        if via == "direct" {
            continue;
        }
        report.proxied_operations += 1;
        let free_from = faults
            .iter()
            .filter(|(s, e)| *s <= end && *e >= start)
            .map(|(_, e)| *e)
            .fold(start, u64::max);
        let waited = end.saturating_sub(free_from);
        report.longest_wait_past_faults_us = report.longest_wait_past_faults_us.max(waited);
        if waited > allowance_us {
            report.anomalies.push(Anomaly {
                kind: "blocked",
                what: format!(
                    "a {what} via {via} from {} to {} ended {} after the faults it overlapped",
                    secs(start),
                    secs(end),
                    secs(waited)
                ),
                at_us: end,
            });
        }
    }
}

#[cfg(test)]
#[path = "checker_tests.rs"]
mod tests;
