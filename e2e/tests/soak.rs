//! The whole-cluster fault soak (see `tendril_e2e::soak`): `cargo xtask test` runs it
//! briefly with a fixed seed; `cargo xtask soak cluster` runs it as long as asked. It fails
//! on any anomaly the checker finds (in synchronous mode: an acknowledged write lost, two
//! masters, a read that missed an acknowledged write or went backwards), and when the
//! cluster does not recover from a fault.
//!
//! Needs root (network namespaces): on these machines it is there, so it fails loudly.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use tendril_e2e::soak::{Settings, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_soak_with_random_faults_loses_no_acknowledged_write() {
    let settings = Settings::from_env().unwrap();
    let outcome = match run(&settings).await {
        Ok(o) => o,
        Err(e) => panic!(
            "the soak did not finish (seed {}; replay with TENDRIL_CLUSTER_SOAK_SEED={}): {e}",
            settings.seed, settings.seed
        ),
    };
    println!("{}", outcome.report);
    if let Some(why) = &outcome.unrecovered {
        panic!(
            "seed {}: {why}\n(history {}; what it showed until then:)\n{}",
            settings.seed,
            outcome.history.display(),
            outcome.report
        );
    }
    assert!(
        outcome.stuck.is_empty(),
        "seed {}: clients hung (history {}, logs beside it):\n{}\n{}",
        settings.seed,
        outcome.history.display(),
        outcome.stuck.join("\n"),
        outcome.report
    );
    assert!(
        outcome.report.anomalies.is_empty(),
        "seed {}: {} anomalies (history {}, contents {}):\n{}",
        settings.seed,
        outcome.report.anomalies.len(),
        outcome.history.display(),
        outcome.contents.display(),
        outcome.report
    );
    // A soak that injected nothing or acknowledged nothing proves nothing.
    assert!(outcome.report.acked > 0, "{}", outcome.report);
    assert!(
        outcome.report.faults.values().sum::<usize>() > 0,
        "{}",
        outcome.report
    );
}
