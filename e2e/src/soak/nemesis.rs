//! The soak's nemesis: one fault at a time, chosen and timed from the seed, healed, then
//! the cluster given time to recover before the next. Every keeper is a host of its own (a
//! network namespace), so partitions are real: from everything, from etcd only, or from the
//! application hosts (the proxies and direct clients) only.

use std::time::Duration;

use tendril_testkit::Rng;

use crate::Cluster;
use crate::history::{Event, Fault};
use crate::soak::progress::Progress;
use crate::soak::workload::Shared;

/// The kinds of fault, by the names the report counts.
pub const KINDS: [&str; 13] = [
    "kill-postmaster",
    "kill-keeper",
    "host-crash",
    "freeze",
    "partition",
    "partition-store",
    "partition-clients",
    "store-outage-short",
    "store-outage-long",
    "kill-sentinel",
    "restart-proxy",
    "switchover",
    "pause-postgres",
];

/// A time in `lo..hi` milliseconds.
fn between(rng: &mut Rng, lo: u64, hi: u64) -> Duration {
    Duration::from_millis(lo + rng.below(hi - lo))
}

/// A keeper: the master's half of the time (its faults are the ones that fail over), any
/// other otherwise.
async fn pick(cluster: &Cluster, rng: &mut Rng) -> String {
    let uids = cluster.keeper_uids();
    let master = cluster
        .try_cluster_data()
        .await
        .and_then(|cd| cd.master_db().map(|d| d.spec.keeper_uid.clone()));
    match master {
        Some(m) if rng.below(2) == 0 => m,
        _ => uids[rng.below(uids.len() as u64) as usize].clone(),
    }
}

/// Injects one fault of `kind` and heals it; returns what it did.
pub async fn inject(cluster: &mut Cluster, kind: &str, rng: &mut Rng) -> String {
    let sleep = tokio::time::sleep;
    match kind {
        "kill-postmaster" => {
            let uid = pick(cluster, rng).await;
            let node = cluster.node(&uid);
            if node.postmaster_pid().is_none() {
                return format!("{uid}: no postmaster running");
            }
            node.kill_postmaster();
            uid
        }
        "kill-keeper" | "host-crash" => {
            let uid = pick(cluster, rng).await;
            let down = between(rng, 500, 4000);
            let node = cluster.node_mut(&uid);
            if kind == "host-crash" {
                node.crash();
            } else {
                node.kill_keeper();
            }
            sleep(down).await;
            cluster.node_mut(&uid).restart_keeper();
            format!("{uid} for {down:?}")
        }
        "freeze" | "pause-postgres" => {
            let uid = pick(cluster, rng).await;
            let down = between(rng, 1000, 8000);
            let node = cluster.node(&uid);
            if kind == "freeze" {
                node.freeze();
            } else {
                node.pause_postgres();
            }
            sleep(down).await;
            cluster.node(&uid).thaw();
            format!("{uid} for {down:?}")
        }
        "partition" | "partition-store" | "partition-clients" => {
            let uid = pick(cluster, rng).await;
            let down = between(rng, 1000, 8000);
            let Some(host) = cluster.node(&uid).host.as_ref() else {
                return format!("{uid}: not on a host of its own");
            };
            match kind {
                "partition" => host.partition(),
                "partition-store" => host.cut_store(),
                _ => host.cut_to(host.root_ip),
            }
            sleep(down).await;
            let Some(host) = cluster.node(&uid).host.as_ref() else {
                return uid;
            };
            match kind {
                "partition" => host.heal(),
                "partition-store" => host.heal_store(),
                _ => host.heal_to(host.root_ip),
            }
            format!("{uid} for {down:?}")
        }
        "store-outage-short" | "store-outage-long" => {
            // The proxies' lease is 5 s: one outage ends within it, the other outlasts it.
            let down = if kind == "store-outage-short" {
                between(rng, 500, 3000)
            } else {
                between(rng, 6000, 10000)
            };
            cluster.pause_store();
            sleep(down).await;
            cluster.resume_store();
            format!("{down:?}")
        }
        "kill-sentinel" => {
            let i = rng.below(cluster.sentinels.len() as u64) as usize;
            let down = between(rng, 200, 3000);
            cluster.sentinels[i].kill();
            sleep(down).await;
            cluster.sentinels[i].start();
            format!("sentinel-{i} for {down:?}")
        }
        "restart-proxy" => {
            let i = rng.below(cluster.proxies.len() as u64) as usize;
            cluster.restart_proxy(i);
            format!("p{i}")
        }
        "switchover" => {
            let out = cluster.ctl(&["switchover"]);
            if out.status.success() {
                "requested".into()
            } else {
                format!("refused: {}", String::from_utf8_lossy(&out.stderr).trim())
            }
        }
        other => format!("unknown fault {other}"),
    }
}

/// Runs faults until `until` (microseconds of the run), each followed by the recovery wait:
/// the cluster healthy again (a master published, every keeper converged), then a quiet
/// stretch. Returns an error when the cluster does not recover within `recovery`.
pub async fn run(
    cluster: &mut Cluster,
    shared: &Shared,
    progress: &Progress,
    rng: &mut Rng,
    until_us: u64,
    recovery: Duration,
) -> Result<usize, String> {
    let keepers = cluster.nodes.len();
    let mut injected = 0;
    while shared.us() < until_us {
        tokio::time::sleep(between(rng, 1000, 3000)).await;
        let kind = KINDS[rng.below(KINDS.len() as u64) as usize];
        let start_us = shared.us();
        progress.step(&format!("fault {}: injecting {kind}", injected + 1));
        let detail = inject(cluster, kind, rng).await;
        let end_us = shared.us();
        progress.step(&format!(
            "fault {}: {kind} {detail} (from {:.3}s), healed; waiting for the recovery",
            injected + 1,
            start_us as f64 / 1e6
        ));
        shared.record(Event::Fault(Fault {
            name: kind.into(),
            detail,
            start_us,
            end_us,
        }));
        injected += 1;
        let deadline = tokio::time::Instant::now() + recovery;
        while !cluster.healthy(keepers).await {
            if tokio::time::Instant::now() > deadline {
                return Err(format!(
                    "the cluster did not recover within {recovery:?} of {kind}:\n{}\n{}",
                    cluster.describe().await,
                    cluster.logs_tail()
                ));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    Ok(injected)
}
