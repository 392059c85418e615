//! Runs what the Kubernetes manifests say, as processes: `tendril_k8s::manifests()` is
//! generated, and each pod template becomes a process in a network namespace of its own
//! (its pod IP), with the container's command and environment (downward-API fields filled
//! in, `$(VAR)` expanded), its volumes bind-mounted where the container mounts them (the
//! keeper's claim, the Secret's files, the ConfigMap's spec), and the user the pod runs as.
//! Then: the cluster forms, every readiness probe answers 200 where it points, a client
//! works through the node's proxy, a keeper pod deleted (SIGTERM) and created again in a new
//! namespace (a new IP) on the same volume rejoins, as a StatefulSet does, and the proxy
//! DaemonSet rolled as `maxSurge` does it (the new pod on the node beside the old one, then
//! the old one deleted) fails no transaction of a writer.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, PodSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tendril_control_model::{ClusterData, Keys, decode};
use tendril_control_store::{EtcdStore, Store, StoreConfig};
use tendril_e2e::writer::{Mode, Writer};
use tendril_e2e::{Proc, REPL_PASSWORD, SU_PASSWORD, bin_dir, connect, http_get};
use tendril_k8s::{Manifest, Options, RUN_AS, SecretSource};
use tendril_testkit::{EtcdServer, Netns};

const CLUSTER: &str = "k8s";

/// One running pod: its namespace (network; a node's, shared, for a host-network pod), its
/// process.
struct Pod {
    name: String,
    ns: Arc<Netns>,
    proc: Proc,
}

/// The generated objects' pod specs by component, and the files their volumes hold.
struct Objects {
    keeper: PodSpec,
    sentinel: PodSpec,
    proxy: PodSpec,
    secret: BTreeMap<String, String>,
    spec_map: BTreeMap<String, String>,
}

fn objects(o: &Options) -> Objects {
    let (mut keeper, mut sentinel, mut proxy) = (None, None, None);
    let (mut secret, mut spec_map) = (BTreeMap::new(), BTreeMap::new());
    for m in tendril_k8s::manifests(o).unwrap() {
        match m {
            Manifest::StatefulSet(s) => keeper = s.spec.unwrap().template.spec,
            Manifest::Deployment(d) => sentinel = d.spec.unwrap().template.spec,
            Manifest::DaemonSet(d) => proxy = d.spec.unwrap().template.spec,
            Manifest::Secret(s) => secret = s.string_data.unwrap(),
            Manifest::ConfigMap(c) => spec_map = c.data.unwrap(),
            _ => {}
        }
    }
    Objects {
        keeper: keeper.unwrap(),
        sentinel: sentinel.unwrap(),
        proxy: proxy.unwrap(),
        secret,
        spec_map,
    }
}

/// The container's environment with the downward-API fields and `$(VAR)` references
/// resolved, as the kubelet does.
fn environment(c: &Container, fields: &BTreeMap<&str, String>) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for var in c.env.clone().unwrap_or_default() {
        let value = match (var.value, var.value_from) {
            (Some(v), _) => v,
            (None, Some(from)) => {
                let path = from.field_ref.unwrap().field_path;
                fields
                    .get(path.as_str())
                    .unwrap_or_else(|| panic!("no value for field {path}"))
                    .clone()
            }
            (None, None) => String::new(),
        };
        let mut expanded = value;
        for (k, v) in &out {
            expanded = expanded.replace(&format!("$({k})"), v);
        }
        out.push((var.name, expanded));
    }
    out
}

/// Starts `spec`'s container as pod `name` in `ns`, its volumes from `volumes` (volume
/// name to host directory) mounted where the container says.
fn start_pod(
    work: &Path,
    name: &str,
    ns: Arc<Netns>,
    spec: &PodSpec,
    fields: &BTreeMap<&str, String>,
    volumes: &BTreeMap<String, PathBuf>,
) -> Pod {
    let c = &spec.containers[0];
    let mut script = String::from("set -e\n");
    for m in c.volume_mounts.clone().unwrap_or_default() {
        let source = volumes
            .get(&m.name)
            .unwrap_or_else(|| panic!("{name}: no volume {}", m.name));
        // The mount point on the real root (an empty directory).
        std::fs::create_dir_all(&m.mount_path).unwrap();
        script.push_str(&format!(
            "mount --bind {} {}\n",
            source.display(),
            m.mount_path
        ));
    }
    let program = bin_dir().join(&c.command.clone().unwrap()[0]);
    script.push_str(&format!(
        "exec setpriv --reuid={RUN_AS} --regid={RUN_AS} --clear-groups {}\n",
        program.display()
    ));
    let command = ["ip", "netns", "exec", &ns.name, "sh", "-c", &script]
        .map(String::from)
        .to_vec();
    let proc = Proc::spawn(name, work, command, environment(c, fields));
    Pod {
        name: name.to_owned(),
        ns,
        proc,
    }
}

/// A directory owned by the pods' user.
fn pod_dir(path: &Path, mode: u32) -> PathBuf {
    std::fs::create_dir_all(path).unwrap();
    let id = u32::try_from(RUN_AS).unwrap();
    std::os::unix::fs::chown(path, Some(id), Some(id)).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    path.to_owned()
}

/// Files `data` in a new directory, as the kubelet writes a Secret or a ConfigMap volume.
fn files(dir: &Path, data: &BTreeMap<String, String>, mode: u32) -> PathBuf {
    pod_dir(dir, 0o750);
    for (k, v) in data {
        let path = dir.join(k);
        std::fs::write(&path, v).unwrap();
        let id = u32::try_from(RUN_AS).unwrap();
        std::os::unix::fs::chown(&path, Some(0), Some(id)).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }
    dir.to_owned()
}

/// The pods' user: initdb needs a passwd entry for the uid PostgreSQL runs as.
fn ensure_pod_user() {
    if nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(u32::try_from(RUN_AS).unwrap()))
        .unwrap()
        .is_none()
    {
        tendril_testkit::run_ok(std::process::Command::new("useradd").args([
            "--uid",
            &RUN_AS.to_string(),
            "--user-group",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "tendril-pod",
        ]));
    }
}

/// Every readiness probe of `spec` answers 200 on `ip`.
fn ready(spec: &PodSpec, ip: IpAddr) -> Result<(), String> {
    let c = &spec.containers[0];
    let get = c.readiness_probe.clone().unwrap().http_get.unwrap();
    let IntOrString::Int(port) = get.port else {
        return Err("a named port".into());
    };
    let path = get.path.unwrap();
    let addr = SocketAddr::new(ip, u16::try_from(port).unwrap());
    match http_get(addr, &path) {
        Some((200, _)) => Ok(()),
        other => Err(format!("{addr}{path}: {other:?}")),
    }
}

async fn cluster_data(store: &EtcdStore) -> Option<ClusterData> {
    let key = Keys::new(CLUSTER).unwrap().cluster_data();
    let kv = store.get(&key).await.ok()??;
    decode(&kv.value).ok()
}

/// Every pod with its spec.
fn pods<'a>(
    objects: &'a Objects,
    keepers: &'a [Pod],
    sentinels: &'a [Pod],
    proxy: &'a Pod,
) -> Vec<(&'a PodSpec, &'a Pod)> {
    keepers
        .iter()
        .map(|p| (&objects.keeper, p))
        .chain(sentinels.iter().map(|p| (&objects.sentinel, p)))
        .chain([(&objects.proxy, proxy)])
        .collect()
}

/// Waits until the pods are ready (their probes), a master is routed and `keepers`
/// databases are healthy.
async fn wait_ready(store: &EtcdStore, pods: &[(&PodSpec, &Pod)], keepers: usize, logs: &Path) {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let probes: Vec<String> = pods
            .iter()
            .filter_map(|(spec, pod)| {
                ready(spec, pod.ns.ns_ip)
                    .err()
                    .map(|e| format!("{}: {e}", pod.name))
            })
            .collect();
        let cd = cluster_data(store).await;
        let healthy = cd.as_ref().is_some_and(|cd| {
            cd.proxy.master.is_some()
                && cd.dbs.len() == keepers
                && cd
                    .dbs
                    .values()
                    .all(|d| d.status.healthy && d.status.current_generation == d.generation)
        });
        if probes.is_empty() && healthy {
            return;
        }
        if Instant::now() > deadline {
            let mut tails = String::new();
            for e in std::fs::read_dir(logs).unwrap().flatten() {
                if e.path().extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    tails.push_str(&tendril_e2e::log_tail(
                        &e.file_name().to_string_lossy(),
                        &text,
                        15,
                    ));
                }
            }
            panic!("not ready: probes {probes:?}, cluster data {cd:?}\n{tails}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifests_run_as_processes() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "running the manifests needs root (network namespaces, bind mounts, the pods' user)"
    );
    tendril_testkit::init_logging();
    ensure_pod_user();
    let work = tempfile::Builder::new()
        .prefix("tendril-k8s-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(work.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The node the proxy runs on, and etcd on an address every pod routes to.
    let node = Netns::create();
    node.route_through_root();
    let etcd = EtcdServer::start_also_on_each(&[node.root_ip]);
    let endpoint = etcd.endpoint_on(node.root_ip);
    let mut o = Options::new(CLUSTER, "unused", vec![endpoint.clone()]);
    o.keepers = 2;
    o.synchronous_replication = false;
    o.secret = SecretSource::Generate {
        su: SU_PASSWORD.into(),
        repl: REPL_PASSWORD.into(),
    };
    let objects = objects(&o);
    let store = EtcdStore::connect(&StoreConfig::new([etcd.endpoint()]))
        .await
        .unwrap();

    let mut volumes: BTreeMap<String, PathBuf> = BTreeMap::new();
    volumes.insert(
        "passwords".into(),
        files(&work.path().join("secret"), &objects.secret, 0o440),
    );
    volumes.insert(
        "spec".into(),
        files(&work.path().join("spec"), &objects.spec_map, 0o444),
    );
    let keeper_name = |i: usize| format!("tendril-{CLUSTER}-keeper-{i}");
    let start_keeper = |i: usize, volumes: &BTreeMap<String, PathBuf>| {
        let ns = Netns::create();
        ns.route_through_root();
        let name = keeper_name(i);
        let mut v = volumes.clone();
        v.insert(
            "data".into(),
            pod_dir(&work.path().join(format!("data-{name}")), 0o700),
        );
        let fields = BTreeMap::from([
            ("metadata.name", name.clone()),
            ("status.podIP", ns.ns_ip.to_string()),
        ]);
        start_pod(
            work.path(),
            &name,
            Arc::new(ns),
            &objects.keeper,
            &fields,
            &v,
        )
    };
    let mut keepers: Vec<Pod> = (0..2).map(|i| start_keeper(i, &volumes)).collect();
    let sentinels: Vec<Pod> = (0..2)
        .map(|i| {
            let ns = Netns::create();
            ns.route_through_root();
            let name = format!("tendril-{CLUSTER}-sentinel-{i}");
            let fields = BTreeMap::from([("status.podIP", ns.ns_ip.to_string())]);
            start_pod(
                work.path(),
                &name,
                Arc::new(ns),
                &objects.sentinel,
                &fields,
                &volumes,
            )
        })
        .collect();
    let proxy_fields = BTreeMap::from([
        ("status.hostIP", node.ns_ip.to_string()),
        ("status.podIP", node.ns_ip.to_string()),
    ]);
    let proxy_ip = node.ns_ip;
    let node = Arc::new(node);
    let mut proxy = start_pod(
        work.path(),
        &format!("tendril-{CLUSTER}-proxy-node0"),
        node.clone(),
        &objects.proxy,
        &proxy_fields,
        &volumes,
    );
    wait_ready(
        &store,
        &pods(&objects, &keepers, &sentinels, &proxy),
        2,
        work.path(),
    )
    .await;

    // A client on the node, through its proxy.
    let port = tendril_k8s::PROXY_PORT;
    let client = connect(&proxy_ip.to_string(), port).await.unwrap();
    client
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    drop(client);
    let cd = cluster_data(&store).await.unwrap();
    let master_keeper = cd.master_db().unwrap().spec.keeper_uid.clone();
    assert!(
        master_keeper.starts_with(&format!("tendril-{CLUSTER}-keeper-")),
        "the pod name is the keeper uid: {master_keeper}"
    );

    // The master's pod is deleted and created again, elsewhere (a new IP), on its volume.
    let i = keepers
        .iter()
        .position(|p| p.name == master_keeper)
        .unwrap();
    let mut old = keepers.remove(i);
    let old_ip = old.ns.ns_ip;
    old.proc.stop();
    drop(old);
    keepers.insert(i, start_keeper(i, &volumes));
    let new_ip = keepers[i].ns.ns_ip;
    assert_ne!(old_ip, new_ip);
    wait_ready(
        &store,
        &pods(&objects, &keepers, &sentinels, &proxy),
        2,
        work.path(),
    )
    .await;
    let cd = cluster_data(&store).await.unwrap();
    let rejoined = cd
        .dbs
        .values()
        .find(|d| d.spec.keeper_uid == master_keeper)
        .unwrap();
    assert_eq!(
        rejoined.status.listen_address.as_deref(),
        Some(new_ip.to_string().as_str()),
        "the pod advertises its new IP"
    );
    let client = connect(&proxy_ip.to_string(), port).await.unwrap();
    client
        .batch_execute("INSERT INTO t VALUES (2)")
        .await
        .unwrap();
    let n: i64 = client
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    let events = cd.events;
    assert!(
        events.iter().any(|e| e.kind == "switchover done"),
        "deleting the master's pod switched over: {events:?}"
    );
    drop(client);
    // A session open across the roll: the old pod serves it until it ends.
    let session = connect(&proxy_ip.to_string(), port).await.unwrap();

    // The proxy DaemonSet rolled (maxSurge) under a writer with a new connection per
    // transaction: the new pod starts on the node beside the old one and takes its
    // listening sockets; the old one drains, waits, and exits when its pod is deleted.
    let writer = Writer::start_to(&proxy_ip.to_string(), port, 4, Mode::PerTransaction, 1000).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rolled = start_pod(
        work.path(),
        &format!("tendril-{CLUSTER}-proxy-node0-b"),
        node.clone(),
        &objects.proxy,
        &proxy_fields,
        &volumes,
    );
    let logged = |pod: &Pod, what: &str| pod.proc.log_text().contains(what);
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logged(&rolled, "took over: the old proxy stopped accepting") {
        assert!(
            Instant::now() < deadline,
            "no handover:\n{}\n{}",
            tendril_e2e::log_tail("old proxy", &proxy.proc.log_text(), 20),
            tendril_e2e::log_tail("new proxy", &rolled.proc.log_text(), 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let n: i64 = session
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "the session opened before the handover goes on");
    drop(session);
    while !logged(&proxy, "handed over and drained: waiting for SIGTERM") {
        assert!(
            Instant::now() < deadline,
            "{}",
            tendril_e2e::log_tail("old proxy", &proxy.proc.log_text(), 20)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Drained, it stays until its pod is deleted (exiting would have it restarted).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut old_proxy = proxy.proc.child.take().unwrap();
    assert!(old_proxy.try_wait().unwrap().is_none());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(old_proxy.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = old_proxy.wait().unwrap();
    assert!(status.success(), "the old proxy pod's process: {status}");
    wait_ready(
        &store,
        &pods(&objects, &keepers, &sentinels, &rolled),
        2,
        work.path(),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let report = writer.stop().await;
    assert!(
        report.failures.is_empty(),
        "the proxy rollout failed transactions: {:?}",
        report.failures
    );
    assert!(report.acked.len() > 20, "{} writes", report.acked.len());
}
