//! Failover timing: for each scenario (postmaster kill, keeper kill, frozen host, network
//! partition, planned switchover), with the default spec and a tuned one, several runs of a
//! whole cluster in synchronous mode with a writer through the proxy. Prints a markdown table:
//! the longest write outage (median, min, max), acknowledged writes lost, failed transactions.
//!
//! `cargo xtask bench failover [--runs N]` builds and runs it.

use std::time::{Duration, Instant};

use tendril_e2e::writer::{Mode, Writer};
use tendril_e2e::{Cluster, Options, default_spec, tuned_spec};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    PostmasterKill,
    KeeperKill,
    FrozenHost,
    Partition,
    Switchover,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::PostmasterKill => "postmaster kill -9",
            Scenario::KeeperKill => "master keeper kill -9",
            Scenario::FrozenHost => "frozen master host (SIGSTOP)",
            Scenario::Partition => "master partitioned (netns)",
            Scenario::Switchover => "planned switchover",
        }
    }
}

struct Sample {
    outage: Duration,
    lost: usize,
    failed: usize,
}

async fn run_once(scenario: Scenario, spec: &str) -> Result<Sample, String> {
    let opts = Options {
        spec: spec.into(),
        partitionable: scenario == Scenario::Partition,
        ..Options::default()
    };
    let mut cluster = Cluster::start(opts).await;
    if scenario == Scenario::Partition && cluster.master_keeper().await.as_deref() != Some("k0") {
        let out = cluster.ctl(&["switchover", "--to", "k0"]);
        if !out.status.success() {
            return Err(format!(
                "switchover to k0: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        cluster.wait_healthy(3, Duration::from_secs(90)).await;
    }
    let mode = if scenario == Scenario::Switchover {
        Mode::PerTransaction
    } else {
        Mode::Persistent
    };
    let writer = Writer::start(
        cluster.proxy_port(),
        if mode == Mode::PerTransaction { 4 } else { 2 },
        mode,
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let master = cluster.master_keeper().await.ok_or("no master")?;
    let failures_before = writer.snapshot().failures.len();
    let fault = Instant::now();
    match scenario {
        Scenario::PostmasterKill => {
            cluster.node(&master).kill_postmaster();
        }
        Scenario::KeeperKill => cluster.node_mut(&master).kill_keeper(),
        Scenario::FrozenHost => cluster.node(&master).freeze(),
        Scenario::Partition => cluster.netns.as_ref().ok_or("no netns")?.partition(),
        Scenario::Switchover => {
            let out = cluster.ctl(&["switchover"]);
            if !out.status.success() {
                return Err(format!(
                    "switchover: {}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
        }
    }
    if scenario != Scenario::PostmasterKill {
        cluster
            .wait_cd("a new master published", Duration::from_secs(90), |cd| {
                cd.proxy.master.is_some()
                    && cd.master_db().is_some_and(|m| m.spec.keeper_uid != master)
            })
            .await;
    } else {
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let resumed = Instant::now();
    writer
        .wait_success_after(resumed, Duration::from_secs(60))
        .await
        .ok_or("writes did not resume")?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = writer.stop().await;
    let client = tendril_e2e::connect("127.0.0.1", cluster.proxy_port())
        .await
        .map_err(|e| e.to_string())?;
    let rows = client
        .query("SELECT id FROM writes", &[])
        .await
        .map_err(|e| e.to_string())?;
    let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost = report
        .ids()
        .iter()
        .filter(|id| !present.contains(id))
        .count();
    let failed = report.failures[failures_before..]
        .iter()
        .filter(|(at, _)| *at >= fault)
        .count();
    match scenario {
        Scenario::FrozenHost => cluster.node(&master).thaw(),
        Scenario::Partition => cluster.netns.as_ref().ok_or("no netns")?.heal(),
        _ => {}
    }
    Ok(Sample {
        outage: report.max_gap_after(fault).unwrap_or_default(),
        lost,
        failed,
    })
}

fn main() {
    let runs: usize = std::env::args()
        .skip_while(|a| a != "--runs")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let scenarios = [
        Scenario::PostmasterKill,
        Scenario::KeeperKill,
        Scenario::FrozenHost,
        Scenario::Partition,
        Scenario::Switchover,
    ];
    let specs = [("default", default_spec(true)), ("tuned", tuned_spec(true))];
    // `--only a,b`: words naming a spec (default, tuned) keep those specs, other words keep
    // the scenarios whose label contains them.
    let only: Vec<String> = std::env::args()
        .skip_while(|a| a != "--only")
        .nth(1)
        .map(|s| s.split(',').map(str::to_owned).collect())
        .unwrap_or_default();
    let (spec_words, scenario_words): (Vec<&String>, Vec<&String>) = only
        .iter()
        .partition(|w| specs.iter().any(|(name, _)| name == w));
    let mut rows = Vec::new();
    for (spec_name, spec) in &specs {
        if !spec_words.is_empty() && !spec_words.iter().any(|w| w == spec_name) {
            continue;
        }
        for scenario in scenarios {
            if !scenario_words.is_empty()
                && !scenario_words
                    .iter()
                    .any(|w| scenario.label().contains(w.as_str()))
            {
                continue;
            }
            let mut samples = Vec::new();
            for run in 0..runs {
                match runtime.block_on(run_once(scenario, spec)) {
                    Ok(s) => {
                        eprintln!(
                            "{} / {spec_name} run {}: outage {:?}, lost {}, failed {}",
                            scenario.label(),
                            run + 1,
                            s.outage,
                            s.lost,
                            s.failed
                        );
                        samples.push(s);
                    }
                    Err(e) => eprintln!(
                        "{} / {spec_name} run {}: FAILED: {e}",
                        scenario.label(),
                        run + 1
                    ),
                }
            }
            let mut outages: Vec<Duration> = samples.iter().map(|s| s.outage).collect();
            outages.sort();
            let ms = |d: Duration| format!("{:.2}", d.as_secs_f64());
            let median = outages.get(outages.len() / 2).copied().unwrap_or_default();
            rows.push(format!(
                "| {} | {spec_name} | {} | {} | {} | {} | {} | {} |",
                scenario.label(),
                samples.len(),
                ms(median),
                ms(outages.first().copied().unwrap_or_default()),
                ms(outages.last().copied().unwrap_or_default()),
                samples.iter().map(|s| s.lost).sum::<usize>(),
                samples.iter().map(|s| s.failed).sum::<usize>(),
            ));
        }
    }
    println!(
        "| scenario | spec | runs | write outage median s | min s | max s | acked writes lost | failed attempts |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in rows {
        println!("{r}");
    }
}
