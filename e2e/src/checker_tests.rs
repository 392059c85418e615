//! The checker on hand-written histories: a clean one passes, and each anomaly is caught.

use super::*;
use crate::history::{Fault, Seen};

const A: &str = "10.0.0.2:5432";
/// How long past its faults an operation through a proxy may last: 8 s.
const ALLOWANCE: u64 = 8_000_000;
const B: &str = "10.0.1.2:5432";

fn srv(node: &str, timeline: u32) -> Option<Server> {
    Some(Server {
        node: node.into(),
        timeline,
    })
}

fn write(id: i64, start: u64, end: u64, outcome: Outcome, server: Option<Server>) -> Event {
    Event::Write(Write {
        client: "p0-w0".into(),
        via: "p0".into(),
        table: "t0".into(),
        id,
        start_us: start,
        end_us: end,
        outcome,
        server,
        error: (outcome != Outcome::Ack).then(|| "connection closed".into()),
    })
}

fn route(at: u64, master: Option<&str>, seq: u64) -> Event {
    Event::Route(Route {
        at_us: at,
        master: master.map(str::to_owned),
        seq,
    })
}

fn read(start: u64, end: u64, after_ack: Option<i64>, rows: i64, found: bool) -> Event {
    Event::Read(Read {
        client: "p1-r0".into(),
        via: "p1".into(),
        table: "t0".into(),
        start_us: start,
        end_us: end,
        after_ack,
        seen: Some(Seen { rows, found }),
        server: srv(B, 2),
        error: None,
    })
}

fn contents(ids: &[i64]) -> Contents {
    [("t0".to_owned(), ids.iter().copied().collect())].into()
}

/// A failover from A (timeline 1) to B (timeline 2) at 1 s, with writes around it.
fn failover() -> Vec<Event> {
    vec![
        route(0, Some(A), 1),
        write(1, 100, 200, Outcome::Ack, srv(A, 1)),
        write(2, 300, 400, Outcome::Ack, srv(A, 1)),
        Event::Fault(Fault {
            name: "kill-postmaster".into(),
            detail: "k0".into(),
            start_us: 500,
            end_us: 500,
        }),
        write(3, 600, 900_000, Outcome::Unknown, None),
        route(700_000, None, 2),
        write(4, 900_100, 900_200, Outcome::Fail, None),
        route(1_000_000, Some(B), 3),
        write(5, 1_000_100, 1_200_000, Outcome::Ack, srv(B, 2)),
        read(1_300_000, 1_300_100, Some(5), 3, true),
        read(1_400_000, 1_400_100, Some(5), 3, true),
    ]
}

#[test]
fn a_clean_failover_has_no_anomaly_and_its_figures() {
    let report = check(
        &failover(),
        &contents(&[1, 2, 5]),
        Replication::Sync,
        ALLOWANCE,
    );
    assert_eq!(report.anomalies, vec![], "{report}");
    assert_eq!(
        (report.acked, report.failed, report.unknown, report.lost),
        (3, 1, 1, 0)
    );
    assert_eq!(report.unknown_present, 0);
    assert_eq!(report.faults.get("kill-postmaster"), Some(&1));
    // From A's last acknowledgement (400 us) to B's first (1.2 s).
    assert_eq!(report.failovers, vec![1_200_000 - 400]);
    assert_eq!(report.longest_unavailable_us, 1_200_000 - 400);
    // An unknown write may be present too.
    let report = check(
        &failover(),
        &contents(&[1, 2, 3, 5]),
        Replication::Sync,
        ALLOWANCE,
    );
    assert_eq!(report.anomalies, vec![]);
    assert_eq!(report.unknown_present, 1);
}

#[test]
fn a_lost_acknowledged_write_is_an_anomaly_in_sync_mode_and_counted_in_async() {
    let report = check(
        &failover(),
        &contents(&[1, 5]),
        Replication::Sync,
        ALLOWANCE,
    );
    assert_eq!(report.lost, 1);
    assert_eq!(report.anomalies.len(), 1, "{report}");
    assert_eq!(report.anomalies[0].kind, "lost");
    assert!(report.anomalies[0].what.contains("id 2"), "{report}");
    let report = check(
        &failover(),
        &contents(&[1, 5]),
        Replication::Async,
        ALLOWANCE,
    );
    assert_eq!(report.anomalies, vec![]);
    assert_eq!(report.lost, 1);
    // Attributed to the master change at 1 s.
    assert_eq!(
        report.lost_by_failover,
        [(Some(1_000_000), 1)].into_iter().collect()
    );
}

#[test]
fn a_failed_write_that_is_present_is_an_anomaly() {
    let report = check(
        &failover(),
        &contents(&[1, 2, 4, 5]),
        Replication::Sync,
        ALLOWANCE,
    );
    assert_eq!(report.anomalies.len(), 1, "{report}");
    assert_eq!(report.anomalies[0].kind, "failed-present");
}

#[test]
fn two_nodes_acknowledging_on_one_timeline_is_split_brain() {
    let mut h = failover();
    // B acknowledges on timeline 1 too, before the failover.
    h.push(write(6, 350, 450, Outcome::Ack, srv(B, 1)));
    let report = check(&h, &contents(&[1, 2, 5, 6]), Replication::Sync, ALLOWANCE);
    assert!(
        report
            .anomalies
            .iter()
            .any(|a| a.kind == "split-brain" && a.what.contains("timeline 1")),
        "{report}"
    );
}

#[test]
fn the_old_master_acknowledging_after_the_new_one_was_routable_is_split_brain() {
    let mut h = failover();
    // A write straight to A, invoked after B was routable, acknowledged by A.
    h.push(Event::Write(Write {
        via: "direct".into(),
        client: "direct-w0".into(),
        ..match write(7, 1_100_000, 1_100_500, Outcome::Ack, srv(A, 1)) {
            Event::Write(w) => w,
            _ => unreachable!(),
        }
    }));
    let report = check(&h, &contents(&[1, 2, 5, 7]), Replication::Sync, ALLOWANCE);
    assert_eq!(report.anomalies.len(), 1, "{report}");
    assert_eq!(report.anomalies[0].kind, "split-brain");
    assert!(report.anomalies[0].what.contains("id 7"), "{report}");
    // The same write invoked before B was routable is not: A was master then.
    let mut h = failover();
    h.push(write(7, 650_000, 1_100_500, Outcome::Ack, srv(A, 1)));
    let report = check(&h, &contents(&[1, 2, 5, 7]), Replication::Sync, ALLOWANCE);
    assert_eq!(report.anomalies, vec![], "{report}");
}

#[test]
fn a_read_missing_an_acknowledged_write_or_going_backwards_is_an_anomaly_in_sync_mode() {
    let mut h = failover();
    h.push(read(1_500_000, 1_500_100, Some(5), 3, false));
    // Two rows fewer: one more than the unknown write missing at the end can explain.
    h.push(read(1_600_000, 1_600_100, None, 1, false));
    let report = check(&h, &contents(&[1, 2, 5]), Replication::Sync, ALLOWANCE);
    let kinds: Vec<&str> = report.anomalies.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, vec!["stale-read", "read-backwards"], "{report}");
    let report = check(&h, &contents(&[1, 2, 5]), Replication::Async, ALLOWANCE);
    assert_eq!(report.anomalies, vec![], "{report}");
    assert_eq!(report.async_read_losses, 2);
}

#[test]
fn overlapping_reads_may_see_rows_in_any_order() {
    // The second read started before the first completed: either order is linearizable.
    let mut h = failover();
    h.push(read(1_500_000, 1_500_900, None, 4, false));
    h.push(read(1_500_100, 1_500_200, None, 3, false));
    let report = check(&h, &contents(&[1, 2, 5]), Replication::Sync, ALLOWANCE);
    assert_eq!(report.anomalies, vec![], "{report}");
}

#[test]
fn a_history_survives_its_file() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.path().join("history.jsonl");
    crate::history::write(&path, &failover()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(crate::history::read(&path), Ok(failover()));
    std::fs::write(&path, "{\"kind\":\"write\"}\n").unwrap_or_else(|e| panic!("{e}"));
    let err = crate::history::read(&path).expect_err("a truncated record");
    assert!(err.contains(":1:"), "{err}");
}

#[test]
fn a_node_routed_to_before_it_acknowledged_on_a_later_timeline_is_no_split_brain() {
    // B is routed to at 1 s but fails before acknowledging; C takes over on timeline 3;
    // much later B is master again on timeline 4. C's writes in between are fine.
    const C: &str = "10.0.2.2:5432";
    let h = vec![
        route(0, Some(A), 1),
        write(1, 100, 200, Outcome::Ack, srv(A, 1)),
        route(1_000_000, Some(B), 2),
        route(1_500_000, None, 3),
        route(2_000_000, Some(C), 4),
        write(2, 2_100_000, 2_200_000, Outcome::Ack, srv(C, 3)),
        route(5_000_000, None, 5),
        route(6_000_000, Some(B), 6),
        write(3, 6_100_000, 6_200_000, Outcome::Ack, srv(B, 4)),
    ];
    let report = check(&h, &contents(&[1, 2, 3]), Replication::Sync, ALLOWANCE);
    assert_eq!(report.anomalies, vec![], "{report}");
    // But C acknowledging after B's return is.
    let mut h = h;
    h.push(write(4, 6_300_000, 6_400_000, Outcome::Ack, srv(C, 3)));
    let report = check(&h, &contents(&[1, 2, 3, 4]), Replication::Sync, ALLOWANCE);
    assert_eq!(report.anomalies.len(), 1, "{report}");
    assert!(report.anomalies[0].what.contains("id 4"), "{report}");
}

#[test]
fn one_timeline_on_two_nodes_one_after_the_other_is_no_split_brain() {
    // A fork (a standby promoted to the timeline another had used), not two masters at
    // once: what it cost shows as lost writes.
    let h = vec![
        route(0, Some(A), 1),
        write(1, 100, 200, Outcome::Ack, srv(A, 2)),
        route(1_000_000, Some(B), 2),
        write(2, 1_100_000, 1_200_000, Outcome::Ack, srv(B, 2)),
    ];
    let report = check(&h, &contents(&[2]), Replication::Sync, ALLOWANCE);
    let kinds: Vec<&str> = report.anomalies.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, vec!["lost"], "{report}");
}

#[test]
fn rows_of_unknown_writes_that_vanished_explain_a_read_going_backwards() {
    // A read saw 4 rows, one of them an unknown write the failover dropped; then 3.
    let mut h = failover();
    h.push(read(1_500_000, 1_500_100, None, 4, false));
    h.push(read(1_600_000, 1_600_100, None, 3, false));
    let report = check(&h, &contents(&[1, 2, 5]), Replication::Sync, ALLOWANCE);
    assert_eq!(report.anomalies, vec![], "{report}");
    // Two fewer is one more than the vanished write explains.
    h.push(read(1_700_000, 1_700_100, None, 2, false));
    let report = check(&h, &contents(&[1, 2, 5]), Replication::Sync, ALLOWANCE);
    let kinds: Vec<&str> = report.anomalies.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, vec!["read-backwards"], "{report}");
}

#[test]
fn a_client_waiting_long_past_its_fault_is_blocked() {
    let mut h = failover();
    // Through a proxy, 9 s and overlapping no fault (the kill was over before it began):
    // blocked.
    h.push(write(6, 1_000, 9_100_000, Outcome::Unknown, None));
    // As long, but through no proxy: not counted.
    let mut direct = write(7, 1_000, 9_100_000, Outcome::Unknown, None);
    if let Event::Write(w) = &mut direct {
        w.via = "direct".into();
    }
    h.push(direct);
    let report = check(&h, &contents(&[1, 2, 5]), Replication::Sync, ALLOWANCE);
    let kinds: Vec<_> = report.anomalies.iter().map(|a| a.kind).collect();
    assert_eq!(kinds, ["blocked"], "{report}");
    assert!(report.anomalies[0].what.contains("id 6"), "{report}");
    assert_eq!(report.longest_wait_past_faults_us, 9_100_000 - 1_000);

    // The same wait inside a long outage that ends 2 s before it: not blocked.
    let mut h = failover();
    h.push(Event::Fault(Fault {
        name: "store-outage-long".into(),
        detail: "etcd".into(),
        start_us: 2_000,
        end_us: 7_100_000,
    }));
    h.push(write(6, 1_000, 9_100_000, Outcome::Unknown, None));
    let report = check(&h, &contents(&[1, 2, 5]), Replication::Sync, ALLOWANCE);
    assert!(report.anomalies.is_empty(), "{report}");
    assert_eq!(report.longest_wait_past_faults_us, 2_000_000);
}
