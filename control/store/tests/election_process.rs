//! Election hand-over when the leader's process dies (SIGKILL), not just its lease.
//!
//! This test has its own `main`: run plainly it is the test; run with `TENDRIL_TEST_CAMPAIGN`
//! set it is the leader process, which campaigns, says `ELECTED` and waits to be killed.
#![expect(
    clippy::unwrap_used,
    reason = "a test binary with its own main: a failed step panics"
)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tendril_control_store::{EtcdStore, KeptLease, Store, StoreConfig};
use tendril_testkit::EtcdServer;

const NAME: &str = "/tendril/proc/leader";
const LEASE_TTL: Duration = Duration::from_secs(2);

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    if let Ok(endpoint) = std::env::var("TENDRIL_TEST_CAMPAIGN") {
        runtime.block_on(leader_process(endpoint));
        return;
    }
    election_hands_over_when_the_leader_process_dies(&runtime);
    println!("test election_hands_over_when_the_leader_process_dies ... ok");
}

async fn leader_process(endpoint: String) {
    // Die with the test: the parent holds our stdin open until it kills us, and a panicking
    // parent closes it.
    std::thread::spawn(|| {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        std::process::exit(0);
    });
    let store = EtcdStore::connect(&StoreConfig::new([endpoint]))
        .await
        .expect("connect");
    let mut lease = KeptLease::start(store.clone(), LEASE_TTL);
    let id = lease.wait_alive().await;
    store
        .campaign(NAME, "doomed-leader", id)
        .await
        .expect("campaign");
    println!("ELECTED");
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
    }
}

fn election_hands_over_when_the_leader_process_dies(runtime: &tokio::runtime::Runtime) {
    let etcd = EtcdServer::start();
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env("TENDRIL_TEST_CAMPAIGN", etcd.endpoint())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the leader process");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("piped stdout"))
        .read_line(&mut line)
        .expect("read the leader's output");
    assert_eq!(line.trim(), "ELECTED", "leader process did not get elected");

    runtime.block_on(async {
        let store = EtcdStore::connect(&StoreConfig::new([etcd.endpoint()]))
            .await
            .unwrap();
        assert_eq!(
            store.leader(NAME).await.unwrap().as_deref(),
            Some("doomed-leader")
        );
        let mut lease = KeptLease::start(store.clone(), Duration::from_secs(5));
        let id = lease.wait_alive().await;
        let contender = store.clone();
        let campaign = tokio::spawn(async move { contender.campaign(NAME, "survivor", id).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!campaign.is_finished(), "elected while the leader lives");

        child.kill().expect("SIGKILL the leader");
        child.wait().expect("reap the leader");
        let killed = Instant::now();
        let leadership = tokio::time::timeout(LEASE_TTL + Duration::from_secs(2), campaign)
            .await
            .expect("hand-over within the leader's lease TTL + 2 s")
            .unwrap()
            .unwrap();
        println!(
            "election hand-over after the leader's SIGKILL took {:?}",
            killed.elapsed()
        );
        assert!(store.is_leader(&leadership).await.unwrap());
        assert_eq!(
            store.leader(NAME).await.unwrap().as_deref(),
            Some("survivor")
        );
    });
}
