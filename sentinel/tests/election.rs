//! Two real sentinel processes against a real etcd: one leads; when it is killed (SIGKILL) the
//! other takes over within the leadership lease TTL + 1 s and carries on with the same cluster
//! data. Idle, they leave the store quiet.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tendril_control_model::{ClusterData, FORMAT_VERSION, KeeperInfo, Keys, decode, encode};
use tendril_control_store::{EtcdStore, Store, StoreConfig};
use tendril_testkit::EtcdServer;

const TTL: Duration = Duration::from_secs(3);

struct Proc {
    child: Child,
    log: std::path::PathBuf,
}

impl Proc {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sentinel(etcd: &EtcdServer, dir: &std::path::Path, name: &str, spec: &std::path::Path) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_tendril-sentinel"))
        .env("TENDRIL_CLUSTER_NAME", "e")
        .env("TENDRIL_STORE_ENDPOINTS", etcd.endpoint())
        .env("TENDRIL_LOG", "info")
        .arg("--initial-cluster-spec")
        .arg(spec)
        .arg("--leader-ttl")
        .arg(format!("{}s", TTL.as_secs()))
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    Proc { child, log }
}

async fn keeper_report(store: &EtcdStore, keys: &Keys, cluster_uid: &str, uid: &str) {
    let info = KeeperInfo {
        format_version: FORMAT_VERSION,
        info_uid: format!(
            "{:x}",
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ),
        uid: uid.into(),
        cluster_uid: cluster_uid.into(),
        boot_uuid: "b".into(),
        pg_binary_version: None,
        postgres_state: None,
        can_be_master: true,
        can_be_synchronous_replica: true,
        priority: 0,
        last_error: None,
        pg_crashes: 0,
        last_pg_crash: None,
        last_fence: None,
    };
    store
        .put(&keys.keeper(uid), encode(&info), None)
        .await
        .unwrap();
}

async fn wait<T>(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what} not reached within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An etcd, two sentinels `a` and `b` with a 1 s sleep interval, and a store client.
struct Two {
    a: Proc,
    b: Proc,
    store: EtcdStore,
    keys: Keys,
    // Kept for the sentinels' lifetime: their logs and their etcd.
    _dir: tempfile::TempDir,
    _etcd: EtcdServer,
}

impl Two {
    async fn start() -> Two {
        tendril_testkit::init_logging();
        let etcd = EtcdServer::start();
        let dir = tempfile::tempdir().unwrap();
        let spec = dir.path().join("spec.json");
        std::fs::write(&spec, r#"{"sleep_interval": "1s"}"#).unwrap();
        let a = sentinel(&etcd, dir.path(), "a", &spec);
        let b = sentinel(&etcd, dir.path(), "b", &spec);
        let store = EtcdStore::connect(&StoreConfig::new([etcd.endpoint()]))
            .await
            .unwrap();
        Two {
            a,
            b,
            store,
            keys: Keys::new("e").unwrap(),
            _dir: dir,
            _etcd: etcd,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_other_takes_over_with_the_same_cluster_data() {
    let mut two = Two::start().await;
    let (store, keys) = (&two.store, &two.keys);

    let cd: ClusterData = wait(
        "cluster data created from the initial spec",
        Duration::from_secs(20),
        async || {
            let kv = store.get(&keys.cluster_data()).await.unwrap()?;
            decode(&kv.value).ok()
        },
    )
    .await;
    let first_leader = wait("a leader elected", Duration::from_secs(20), async || {
        store.leader(&keys.leader()).await.unwrap()
    })
    .await;
    // Only the leader writes: a keeper report makes it record the keeper.
    keeper_report(store, keys, &cd.uid, "k1").await;
    let before: ClusterData = wait(
        "the leader records keeper k1",
        Duration::from_secs(10),
        async || {
            let cd: ClusterData =
                decode(&store.get(&keys.cluster_data()).await.unwrap()?.value).ok()?;
            cd.keepers.contains_key("k1").then_some(cd)
        },
    )
    .await;

    let (leader, follower) = if two.a.log().contains("elected leader") {
        (&mut two.a, &two.b)
    } else {
        (&mut two.b, &two.a)
    };
    assert!(
        leader.log().contains("elected leader"),
        "leader log:\n{}",
        leader.log()
    );
    assert!(
        !follower.log().contains("elected leader"),
        "two leaders:\n{}",
        follower.log()
    );
    leader.child.kill().unwrap();
    leader.child.wait().unwrap();
    let killed = Instant::now();
    let new_leader = wait(
        "the other sentinel elected",
        TTL + Duration::from_secs(1),
        async || {
            store
                .leader(&keys.leader())
                .await
                .unwrap()
                .filter(|l| *l != first_leader)
        },
    )
    .await;
    let took = killed.elapsed();
    println!("leader {first_leader} killed; {new_leader} leads after {took:?} (lease TTL {TTL:?})");
    assert!(took <= TTL + Duration::from_secs(1));

    // The new leader continues the same cluster data: same uid, generations going on.
    keeper_report(store, keys, &cd.uid, "k2").await;
    let after: ClusterData = wait(
        "the new leader records keeper k2",
        Duration::from_secs(10),
        async || {
            let cd: ClusterData =
                decode(&store.get(&keys.cluster_data()).await.unwrap()?.value).ok()?;
            cd.keepers.contains_key("k2").then_some(cd)
        },
    )
    .await;
    assert_eq!(
        after.uid, cd.uid,
        "the new leader must not re-create the cluster"
    );
    assert!(after.generation > before.generation);
    assert!(after.keepers.contains_key("k1"));
    assert!(
        follower.log().contains("elected leader"),
        "follower log:\n{}",
        follower.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sentinels_leave_the_store_quiet() {
    // Sentinels watch the cluster prefix to react in milliseconds; anything they write there
    // on every loop wakes them all again. That once made each sentinel rewrite its report
    // about 40 times a second (and burn a sixth of a core) on an idle cluster.
    let mut two = Two::start().await;
    let (store, keys) = (&two.store, &two.keys);
    wait("a leader elected", Duration::from_secs(20), async || {
        store.leader(&keys.leader()).await.unwrap()
    })
    .await;
    wait(
        "cluster data created from the initial spec",
        Duration::from_secs(20),
        async || store.get(&keys.cluster_data()).await.unwrap(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut watch = store.watch(keys.base(), 0).await.unwrap();
    let mut writes = Vec::new();
    let window = Duration::from_secs(3);
    let _ = tokio::time::timeout(window, async {
        while let Some(event) = watch.next().await {
            writes.push(event);
        }
    })
    .await;
    println!("{} writes in {window:?} on an idle cluster", writes.len());
    for s in [&mut two.a, &mut two.b] {
        assert!(
            s.child.try_wait().unwrap().is_none(),
            "a sentinel exited, so its silence proves nothing:\n{}",
            s.log()
        );
    }
    assert!(
        writes.len() <= 6,
        "idle sentinels wrote {} times in {window:?}: {writes:?}",
        writes.len()
    );
}
