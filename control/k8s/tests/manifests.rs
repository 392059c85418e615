//! The generated manifests: golden files (`UPDATE_EXPECT=1 cargo test -p tendril-k8s`
//! rewrites them; review the diff), parsed back into the typed objects, and one test per
//! invariant a deployment relies on.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::path::PathBuf;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{Container, PodTemplateSpec};
use serde_json::Value;
use tendril_k8s::{
    Component, KEEPER_METRICS_PORT, Manifest, Options, PROXY_METRICS_PORT, PROXY_READ_ONLY_PORT,
    READ_ONLY_SERVICE_PORT, SENTINEL_METRICS_PORT, SecretSource, manifests, object_name,
    parse_yaml, to_json_list, to_yaml,
};

fn options() -> Options {
    let mut o = Options::new(
        "main",
        "registry.example/tendril:0.1.0",
        vec![
            "http://etcd-0.etcd:2379".into(),
            "http://etcd-1.etcd:2379".into(),
        ],
    );
    o.namespace = "db".into();
    o
}

fn generated() -> Options {
    let mut o = options();
    o.keepers = 5;
    o.synchronous_replication = false;
    o.storage_class = Some("fast-ssd".into());
    o.secret = SecretSource::Generate {
        su: "su-Secret-1".into(),
        repl: "repl-Secret-2".into(),
    };
    o
}

fn read_only() -> Options {
    let mut o = options();
    o.read_only = true;
    o
}

#[test]
fn golden_files() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    for (name, o, yaml) in [
        ("existing-secret", options(), false),
        ("generated-secret", generated(), false),
        ("read-only", read_only(), true),
    ] {
        let objects = manifests(&o).unwrap();
        let (text, ext) = if yaml {
            (to_yaml(&objects).unwrap(), "yaml")
        } else {
            (to_json_list(&objects).unwrap(), "json")
        };
        let path = dir.join(format!("{name}.{ext}"));
        if update {
            std::fs::write(&path, &text).unwrap();
        }
        let expected = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            text == expected,
            "{} differs from what is generated; rerun with UPDATE_EXPECT=1 and review the diff",
            path.display()
        );
    }
}

fn items(o: &Options) -> Vec<Value> {
    let list: Value = serde_json::from_str(&to_json_list(&manifests(o).unwrap()).unwrap()).unwrap();
    list["items"].as_array().unwrap().clone()
}

#[test]
fn every_object_parses_back_into_its_typed_struct() {
    use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    fn back<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) {
        let typed: T = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(&serde_json::to_value(typed).unwrap(), v);
    }
    let mut kinds = Vec::new();
    for v in items(&generated()) {
        let kind = v["kind"].as_str().unwrap().to_owned();
        match kind.as_str() {
            "Secret" => back::<Secret>(&v),
            "ConfigMap" => back::<ConfigMap>(&v),
            "Service" => back::<Service>(&v),
            "StatefulSet" => back::<StatefulSet>(&v),
            "Deployment" => back::<Deployment>(&v),
            "DaemonSet" => back::<DaemonSet>(&v),
            "PodDisruptionBudget" => back::<PodDisruptionBudget>(&v),
            other => panic!("unexpected kind {other}"),
        }
        assert_eq!(v["metadata"]["namespace"], "db");
        kinds.push(kind);
    }
    assert_eq!(
        kinds,
        [
            "Secret",
            "ConfigMap",
            "Service",
            "StatefulSet",
            "PodDisruptionBudget",
            "Deployment",
            "PodDisruptionBudget",
            "DaemonSet",
            "Service"
        ]
    );
}

fn workloads(o: &Options) -> Vec<(Component, PodTemplateSpec)> {
    let mut out = Vec::new();
    for m in manifests(o).unwrap() {
        match m {
            Manifest::StatefulSet(s) => out.push((Component::Keeper, s.spec.unwrap().template)),
            Manifest::Deployment(d) => out.push((Component::Sentinel, d.spec.unwrap().template)),
            Manifest::DaemonSet(d) => out.push((Component::Proxy, d.spec.unwrap().template)),
            _ => {}
        }
    }
    assert_eq!(out.len(), 3);
    out
}

fn container(t: &PodTemplateSpec) -> Container {
    t.spec.as_ref().unwrap().containers[0].clone()
}

#[test]
fn passwords_are_only_in_the_secret_and_reach_pods_as_files() {
    for v in items(&generated()) {
        let text = v.to_string();
        let holds = text.contains("su-Secret-1") || text.contains("repl-Secret-2");
        assert_eq!(holds, v["kind"] == "Secret", "{text}");
    }
    for (component, t) in workloads(&generated()) {
        for var in container(&t).env.unwrap_or_default() {
            assert!(
                !var.name.contains("PASSWORD") || var.name.ends_with("PASSWORDFILE"),
                "{component:?}: {}",
                var.name
            );
        }
    }
    let (_, keeper) = &workloads(&generated())[0];
    let spec = keeper.spec.as_ref().unwrap();
    let volume = spec.volumes.as_ref().unwrap()[0].clone();
    assert_eq!(
        volume.secret.unwrap().secret_name.as_deref(),
        Some("tendril-main-passwords")
    );
}

#[test]
fn probes_point_at_the_endpoints_each_component_serves() {
    for (component, t) in workloads(&options()) {
        let c = container(&t);
        let (port, served): (u16, &[&str]) = match component {
            Component::Keeper => (
                KEEPER_METRICS_PORT,
                &["/health", "/status", "/master", "/replica", "/metrics"],
            ),
            Component::Sentinel => (SENTINEL_METRICS_PORT, &["/health", "/metrics"]),
            Component::Proxy => (PROXY_METRICS_PORT, &["/health", "/metrics"]),
        };
        let declared: Vec<i32> = c
            .ports
            .clone()
            .unwrap()
            .iter()
            .map(|p| p.container_port)
            .collect();
        // The component listens where the probe looks.
        let metrics = c
            .env
            .clone()
            .unwrap()
            .into_iter()
            .find(|e| e.name == "TENDRIL_METRICS_ADDRESS")
            .and_then(|e| e.value)
            .unwrap();
        assert!(
            metrics.ends_with(&format!(":{port}")),
            "{component:?}: {metrics}"
        );
        for probe in [c.readiness_probe.clone(), c.liveness_probe.clone()] {
            let probe = probe.unwrap();
            if let Some(get) = probe.http_get {
                assert!(
                    served.contains(&get.path.as_deref().unwrap()),
                    "{component:?}"
                );
                assert_eq!(
                    get.port,
                    k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(port))
                );
            } else {
                let k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) =
                    probe.tcp_socket.unwrap().port
                else {
                    panic!("a named port");
                };
                assert!(declared.contains(&p), "{component:?}: {p}");
            }
        }
        let annotations = t.metadata.unwrap().annotations.unwrap();
        assert_eq!(annotations["prometheus.io/port"], port.to_string());
    }
}

#[test]
fn keeper_pod_names_are_keeper_uids() {
    let o = generated();
    let name = object_name(&o.cluster, Component::Keeper);
    for i in 0..o.keepers {
        let pod = format!("{name}-{i}");
        assert!(tendril_keeper::config::valid_uid(&pod), "{pod}");
    }
    let (_, keeper) = &workloads(&o)[0];
    let uid = container(keeper)
        .env
        .unwrap()
        .into_iter()
        .find(|e| e.name == "TENDRIL_KEEPER_UID")
        .unwrap();
    assert_eq!(
        uid.value_from.unwrap().field_ref.unwrap().field_path,
        "metadata.name"
    );
}

#[test]
fn keepers_never_share_a_node_and_budgets_select_their_pods() {
    let (_, keeper) = &workloads(&options())[0];
    // Not the keeper as PID 1: orphaned PostgreSQL processes are reaped.
    assert_eq!(
        keeper.spec.clone().unwrap().share_process_namespace,
        Some(true)
    );
    let terms = keeper
        .spec
        .clone()
        .unwrap()
        .affinity
        .unwrap()
        .pod_anti_affinity
        .unwrap()
        .required_during_scheduling_ignored_during_execution
        .unwrap();
    assert_eq!(terms[0].topology_key, "kubernetes.io/hostname");
    let pod_labels = |c: Component| {
        workloads(&options())
            .into_iter()
            .find(|(k, _)| *k == c)
            .unwrap()
            .1
            .metadata
            .unwrap()
            .labels
            .unwrap()
    };
    assert_eq!(
        terms[0]
            .label_selector
            .clone()
            .unwrap()
            .match_labels
            .unwrap(),
        tendril_k8s::selector_labels("main", Component::Keeper)
    );
    for m in manifests(&options()).unwrap() {
        if let Manifest::PodDisruptionBudget(b) = m {
            let selected = b.spec.unwrap().selector.unwrap().match_labels.unwrap();
            let component = if selected["app.kubernetes.io/component"] == "keeper" {
                Component::Keeper
            } else {
                Component::Sentinel
            };
            let labels = pod_labels(component);
            for (k, v) in &selected {
                assert_eq!(labels.get(k), Some(v), "{component:?}");
            }
        }
    }
}

#[test]
fn yaml_reads_back_as_the_same_objects_with_strings_kept_strings() {
    for o in [generated(), read_only()] {
        let yaml = to_yaml(&manifests(&o).unwrap()).unwrap();
        assert_eq!(parse_yaml(&yaml).unwrap(), items(&o));
    }
    // "on" and "0755" would be a boolean and a number to a YAML 1.1 reader.
    let mut o = generated();
    o.secret = SecretSource::Generate {
        su: "on".into(),
        repl: "0755".into(),
    };
    let yaml = to_yaml(&manifests(&o).unwrap()).unwrap();
    assert!(
        yaml.contains("su-password: 'on'") && yaml.contains("repl-password: '0755'"),
        "{yaml}"
    );
}

fn env_of(c: &Container, name: &str) -> Option<String> {
    c.env
        .clone()
        .unwrap()
        .into_iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value)
}

#[test]
fn a_proxy_rolling_update_hands_the_listening_sockets_over() {
    let daemon_set = manifests(&options())
        .unwrap()
        .into_iter()
        .find_map(|m| match m {
            Manifest::DaemonSet(d) => Some(d),
            _ => None,
        })
        .unwrap();
    let spec = daemon_set.spec.unwrap();
    let rolling = spec.update_strategy.unwrap().rolling_update.unwrap();
    // The new pod runs beside the old one (host network: the same address) ...
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.host_network, Some(true));
    // ... takes its sockets, and the old one waits for its deletion once drained ...
    let c = &pod.containers[0];
    assert_eq!(env_of(c, "TENDRIL_TAKEOVER").as_deref(), Some("auto"));
    assert_eq!(env_of(c, "TENDRIL_AFTER_HANDOVER").as_deref(), Some("wait"));
    // ... and its drain ends within the grace period.
    let drain = humantime::parse_duration(&env_of(c, "TENDRIL_DRAIN_TIMEOUT").unwrap()).unwrap();
    let grace = pod.termination_grace_period_seconds.unwrap();
    assert!(
        drain.as_secs() + 5 < u64::try_from(grace).unwrap(),
        "{drain:?} {grace}"
    );
}

#[test]
fn the_read_only_service_reaches_the_proxies_read_only_listener() {
    let services: Vec<_> = manifests(&read_only())
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            Manifest::Service(s) => Some(*s),
            _ => None,
        })
        .collect();
    let ro = services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("tendril-main-ro"))
        .unwrap()
        .spec
        .clone()
        .unwrap();
    assert_eq!(ro.internal_traffic_policy.as_deref(), Some("Local"));
    assert_eq!(
        ro.selector.unwrap(),
        tendril_k8s::selector_labels("main", Component::Proxy)
    );
    let port = &ro.ports.unwrap()[0];
    assert_eq!(port.port, i32::from(READ_ONLY_SERVICE_PORT));
    let (_, proxy) = workloads(&read_only()).pop().unwrap();
    let c = container(&proxy);
    assert_eq!(
        env_of(&c, "TENDRIL_READ_ONLY_LISTEN_ADDRESS").unwrap(),
        format!("$(NODE_IP):{PROXY_READ_ONLY_PORT}")
    );
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    assert_eq!(
        port.target_port,
        Some(IntOrString::Int(i32::from(PROXY_READ_ONLY_PORT)))
    );
    assert!(
        c.ports
            .unwrap()
            .iter()
            .any(|p| p.container_port == i32::from(PROXY_READ_ONLY_PORT))
    );
    // Without the option: neither the listener nor the Service.
    assert!(
        env_of(
            &container(&workloads(&options()).pop().unwrap().1),
            "TENDRIL_READ_ONLY_LISTEN_ADDRESS"
        )
        .is_none()
    );
    assert!(
        !items(&options())
            .iter()
            .any(|v| v["metadata"]["name"] == "tendril-main-ro")
    );
}

#[test]
fn invalid_options_make_nothing_and_say_why() {
    let mut o = options();
    o.sentinels = 1;
    o.cluster = "Main".into();
    let e = manifests(&o).unwrap_err().to_string();
    assert!(e.contains("--sentinels") && e.contains("--cluster"), "{e}");
}
