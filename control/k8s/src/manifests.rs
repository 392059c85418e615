//! The objects of a tendril cluster on Kubernetes, as typed API structs, in the order they
//! are applied: the passwords' Secret, the keepers' headless Service, StatefulSet and
//! disruption budget, the sentinels' Deployment and budget, the proxies' DaemonSet and the
//! node-local Service applications connect to.
//!
//! - Keepers: one pod per PostgreSQL, its stable name (`tendril-<cluster>-keeper-0`) as the
//!   keeper uid (downward API), its IP as the address it advertises, its data on a volume of
//!   its own, never two on one node.
//! - Sentinels: two or more, spread over nodes.
//! - Proxies: one per node on the host network, reached through a Service that keeps traffic
//!   on the client's node (`internalTrafficPolicy: Local`); with the read-only listener, a
//!   second such Service for reads on the standbys. A rolling update starts the new pod
//!   beside the old one, which hands its listening sockets over (`--takeover=auto`).
//! - Passwords only as files from the Secret, never in the environment or the store.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, Deployment, DeploymentSpec,
    RollingUpdateDaemonSet, StatefulSet, StatefulSetSpec,
};
use k8s_openapi::api::core::v1::{
    Affinity, ConfigMap, ConfigMapVolumeSource, Container, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodAffinityTerm, PodAntiAffinity, PodSpec, Probe, Secret, Service,
    ServicePort, ServiceSpec, TCPSocketAction, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde::Serialize;

use crate::options::{Options, SecretSource};
use crate::parts::{
    common_env, env_field, env_value, http_probe, meta, port, resources, secret_mount,
    secret_volume, security_context, selector, template,
};
use crate::{K8sError, REPL_PASSWORD_KEY, SU_PASSWORD_KEY};

/// PostgreSQL's port in a keeper pod.
pub const POSTGRES_PORT: u16 = 5432;
/// The keeper's HTTP endpoints (`/health`, `/status`, `/master`, `/replica`, `/metrics`).
pub const KEEPER_METRICS_PORT: u16 = 8008;
/// The sentinel's HTTP endpoints (`/health`, `/metrics`).
pub const SENTINEL_METRICS_PORT: u16 = 8009;
/// The proxy's client port on each node's address.
pub const PROXY_PORT: u16 = 25432;
/// The proxy's HTTP endpoints (`/health`, `/metrics`).
pub const PROXY_METRICS_PORT: u16 = 25490;
/// The proxy's read-only listener on each node's address (with [`Options::read_only`]).
pub const PROXY_READ_ONLY_PORT: u16 = 25433;
/// The port applications connect to through the node-local Service.
pub const SERVICE_PORT: u16 = 5432;
/// The port of the node-local read-only Service.
pub const READ_ONLY_SERVICE_PORT: u16 = 5433;
/// Where the Secret's files are in each pod.
pub const SECRET_DIR: &str = "/etc/tendril/secret";
/// The keeper's data directory (its volume).
pub const DATA_DIR: &str = "/var/lib/tendril";
/// Where the initial cluster spec is in each sentinel pod.
pub const SPEC_FILE: &str = "/etc/tendril/spec/spec.json";
/// The user and group the image runs the components as.
pub const RUN_AS: i64 = 10001;

/// One object of the set.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Manifest {
    /// The passwords.
    Secret(Box<Secret>),
    /// The initial cluster spec the sentinels write when the store has none.
    ConfigMap(Box<ConfigMap>),
    /// The keepers' headless Service, or the proxies' node-local one.
    Service(Box<Service>),
    /// The keepers.
    StatefulSet(Box<StatefulSet>),
    /// The sentinels.
    Deployment(Box<Deployment>),
    /// The proxies.
    DaemonSet(Box<DaemonSet>),
    /// A disruption budget.
    PodDisruptionBudget(Box<PodDisruptionBudget>),
}

/// The component names, as they appear in object names and labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// `keeper`.
    Keeper,
    /// `sentinel`.
    Sentinel,
    /// `proxy`.
    Proxy,
}

impl Component {
    /// The word.
    pub fn as_str(self) -> &'static str {
        match self {
            Component::Keeper => "keeper",
            Component::Sentinel => "sentinel",
            Component::Proxy => "proxy",
        }
    }
}

/// The name of `component`'s objects in cluster `cluster`.
pub fn object_name(cluster: &str, component: Component) -> String {
    format!("tendril-{cluster}-{}", component.as_str())
}

/// Every object, in apply order.
pub fn manifests(o: &Options) -> Result<Vec<Manifest>, K8sError> {
    let problems = o.problems();
    if !problems.is_empty() {
        return Err(K8sError::Options(
            problems
                .into_iter()
                .map(|(name, message)| format!("--{name}: {message}"))
                .collect(),
        ));
    }
    let mut out = Vec::new();
    if let SecretSource::Generate { su, repl } = &o.secret {
        out.push(Manifest::Secret(Box::new(Secret {
            metadata: meta(o, &secret_name(o), None),
            type_: Some("Opaque".into()),
            string_data: Some(BTreeMap::from([
                (SU_PASSWORD_KEY.to_owned(), su.clone()),
                (REPL_PASSWORD_KEY.to_owned(), repl.clone()),
            ])),
            ..Secret::default()
        })));
    }
    out.push(Manifest::ConfigMap(Box::new(ConfigMap {
        metadata: meta(o, &spec_name(o), Some(Component::Sentinel)),
        data: Some(BTreeMap::from([(
            "spec.json".to_owned(),
            format!(
                "{{\"synchronous_replication\": {}}}\n",
                o.synchronous_replication
            ),
        )])),
        ..ConfigMap::default()
    })));
    out.push(Manifest::Service(Box::new(keeper_service(o))));
    out.push(Manifest::StatefulSet(Box::new(keepers(o))));
    out.push(Manifest::PodDisruptionBudget(Box::new(budget(
        o,
        Component::Keeper,
        Budget::OneUnavailable,
    ))));
    out.push(Manifest::Deployment(Box::new(sentinels(o))));
    out.push(Manifest::PodDisruptionBudget(Box::new(budget(
        o,
        Component::Sentinel,
        Budget::OneAvailable,
    ))));
    out.push(Manifest::DaemonSet(Box::new(proxies(o))));
    out.push(Manifest::Service(Box::new(proxy_service(
        o,
        &format!("tendril-{}", o.cluster),
        SERVICE_PORT,
        PROXY_PORT,
    ))));
    if o.read_only {
        out.push(Manifest::Service(Box::new(proxy_service(
            o,
            &format!("tendril-{}-ro", o.cluster),
            READ_ONLY_SERVICE_PORT,
            PROXY_READ_ONLY_PORT,
        ))));
    }
    Ok(out)
}

fn spec_name(o: &Options) -> String {
    format!("tendril-{}-spec", o.cluster)
}

pub(crate) fn secret_name(o: &Options) -> String {
    match &o.secret {
        SecretSource::Existing(name) => name.clone(),
        SecretSource::Generate { .. } => format!("tendril-{}-passwords", o.cluster),
    }
}

/// The labels that select `component`'s pods.
pub fn selector_labels(cluster: &str, component: Component) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "tendril".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), cluster.to_owned()),
        (
            "app.kubernetes.io/component".to_owned(),
            component.as_str().to_owned(),
        ),
    ])
}

fn keeper_service(o: &Options) -> Service {
    Service {
        metadata: meta(
            o,
            &object_name(&o.cluster, Component::Keeper),
            Some(Component::Keeper),
        ),
        spec: Some(ServiceSpec {
            // Headless: the StatefulSet's pods get stable DNS names; clients go through the
            // proxies, never here.
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(&o.cluster, Component::Keeper)),
            ports: Some(vec![ServicePort {
                name: Some("postgres".into()),
                port: i32::from(POSTGRES_PORT),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

fn keepers(o: &Options) -> StatefulSet {
    let name = object_name(&o.cluster, Component::Keeper);
    let mut vars = common_env(o);
    vars.extend([
        // The pod's stable name is the keeper's uid: a rescheduled pod is the same keeper.
        env_field("TENDRIL_KEEPER_UID", "metadata.name"),
        env_field("TENDRIL_PG_ADVERTISE_ADDRESS", "status.podIP"),
        env_value("TENDRIL_DATA_DIR", DATA_DIR),
        env_value("TENDRIL_PG_LISTEN_ADDRESS", "0.0.0.0"),
        env_value("TENDRIL_PG_PORT", POSTGRES_PORT.to_string()),
        env_value(
            "TENDRIL_PG_SU_PASSWORDFILE",
            format!("{SECRET_DIR}/{SU_PASSWORD_KEY}"),
        ),
        env_value(
            "TENDRIL_PG_REPL_PASSWORDFILE",
            format!("{SECRET_DIR}/{REPL_PASSWORD_KEY}"),
        ),
        env_value(
            "TENDRIL_METRICS_ADDRESS",
            format!("0.0.0.0:{KEEPER_METRICS_PORT}"),
        ),
        // A master's pod deleted (a rollout, a drain) switches over first: clients see held
        // connections, not a failover. Within the grace period below.
        env_value("TENDRIL_SWITCHOVER_ON_STOP", "30s"),
    ]);
    let container = Container {
        name: "keeper".into(),
        image: Some(o.image.clone()),
        command: Some(vec!["tendril-keeper".into()]),
        env: Some(vars),
        ports: Some(vec![
            port("postgres", POSTGRES_PORT),
            port("metrics", KEEPER_METRICS_PORT),
        ]),
        // Ready while PostgreSQL answers; alive while the keeper answers at all (PostgreSQL
        // is down on purpose during a base backup or a rewind).
        readiness_probe: Some(http_probe("/health", KEEPER_METRICS_PORT, 5, 3)),
        liveness_probe: Some(http_probe("/status", KEEPER_METRICS_PORT, 10, 6)),
        resources: Some(resources(
            &o.resources.keeper_cpu,
            &o.resources.keeper_memory,
        )),
        volume_mounts: Some(vec![
            VolumeMount {
                name: "data".into(),
                mount_path: DATA_DIR.into(),
                ..VolumeMount::default()
            },
            secret_mount(),
        ]),
        ..Container::default()
    };
    let spec = PodSpec {
        containers: vec![container],
        volumes: Some(vec![secret_volume(o)]),
        security_context: Some(security_context()),
        automount_service_account_token: Some(false),
        // The pod's pause process is PID 1 and reaps what PostgreSQL leaves orphaned (the
        // backends of a postmaster killed with -9); the keeper reaps only its children.
        share_process_namespace: Some(true),
        // The switchover (at most 30 s), then a fast shutdown of PostgreSQL.
        termination_grace_period_seconds: Some(60),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                // Never two keepers on one node: a node's loss takes one copy of the data.
                required_during_scheduling_ignored_during_execution: Some(vec![PodAffinityTerm {
                    label_selector: Some(selector(o, Component::Keeper)),
                    topology_key: "kubernetes.io/hostname".into(),
                    ..PodAffinityTerm::default()
                }]),
                ..PodAntiAffinity::default()
            }),
            ..Affinity::default()
        }),
        ..PodSpec::default()
    };
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: o.storage_class.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_owned(),
                    Quantity(o.storage_size.clone()),
                )])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    StatefulSet {
        metadata: meta(o, &name, Some(Component::Keeper)),
        spec: Some(StatefulSetSpec {
            service_name: Some(name),
            replicas: Some(i32::try_from(o.keepers).unwrap_or(i32::MAX)),
            // Keepers start together: the sentinel chooses among those that report.
            pod_management_policy: Some("Parallel".into()),
            selector: selector(o, Component::Keeper),
            template: template(o, Component::Keeper, KEEPER_METRICS_PORT, spec),
            volume_claim_templates: Some(vec![claim]),
            ..StatefulSetSpec::default()
        }),
        ..StatefulSet::default()
    }
}

fn sentinels(o: &Options) -> Deployment {
    let mut vars = common_env(o);
    vars.push(env_value("TENDRIL_INITIAL_CLUSTER_SPEC", SPEC_FILE));
    vars.push(env_value(
        "TENDRIL_METRICS_ADDRESS",
        format!("0.0.0.0:{SENTINEL_METRICS_PORT}"),
    ));
    let container = Container {
        name: "sentinel".into(),
        image: Some(o.image.clone()),
        command: Some(vec!["tendril-sentinel".into()]),
        env: Some(vars),
        ports: Some(vec![port("metrics", SENTINEL_METRICS_PORT)]),
        readiness_probe: Some(http_probe("/health", SENTINEL_METRICS_PORT, 5, 3)),
        liveness_probe: Some(http_probe("/health", SENTINEL_METRICS_PORT, 10, 6)),
        resources: Some(resources(
            &o.resources.sentinel_cpu,
            &o.resources.sentinel_memory,
        )),
        volume_mounts: Some(vec![VolumeMount {
            name: "spec".into(),
            mount_path: SPEC_FILE.trim_end_matches("/spec.json").into(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    let spec = PodSpec {
        containers: vec![container],
        volumes: Some(vec![Volume {
            name: "spec".into(),
            config_map: Some(ConfigMapVolumeSource {
                name: spec_name(o),
                ..ConfigMapVolumeSource::default()
            }),
            ..Volume::default()
        }]),
        security_context: Some(security_context()),
        automount_service_account_token: Some(false),
        affinity: Some(Affinity {
            pod_anti_affinity: Some(PodAntiAffinity {
                preferred_during_scheduling_ignored_during_execution: Some(vec![
                    WeightedPodAffinityTerm {
                        weight: 100,
                        pod_affinity_term: PodAffinityTerm {
                            label_selector: Some(selector(o, Component::Sentinel)),
                            topology_key: "kubernetes.io/hostname".into(),
                            ..PodAffinityTerm::default()
                        },
                    },
                ]),
                ..PodAntiAffinity::default()
            }),
            ..Affinity::default()
        }),
        ..PodSpec::default()
    };
    Deployment {
        metadata: meta(
            o,
            &object_name(&o.cluster, Component::Sentinel),
            Some(Component::Sentinel),
        ),
        spec: Some(DeploymentSpec {
            replicas: Some(i32::try_from(o.sentinels).unwrap_or(i32::MAX)),
            selector: selector(o, Component::Sentinel),
            template: template(o, Component::Sentinel, SENTINEL_METRICS_PORT, spec),
            ..DeploymentSpec::default()
        }),
        ..Deployment::default()
    }
}

fn proxies(o: &Options) -> DaemonSet {
    let mut vars = common_env(o);
    vars.extend([
        env_field("NODE_IP", "status.hostIP"),
        env_value("TENDRIL_LISTEN_ADDRESS", format!("$(NODE_IP):{PROXY_PORT}")),
        env_value(
            "TENDRIL_METRICS_ADDRESS",
            format!("$(NODE_IP):{PROXY_METRICS_PORT}"),
        ),
        // The kernel paths need BPF privileges a pod does not have by default.
        env_value("TENDRIL_FORWARDING", "userspace"),
        env_value("TENDRIL_DRAIN_TIMEOUT", "30s"),
        // A rolling update's new pod takes the running pod's listening sockets (the same
        // kernel sockets: no connect refused); the first pod on a node starts on its own.
        env_value("TENDRIL_TAKEOVER", "auto"),
        // The old pod's process, drained, waits for its deletion: exiting would have the
        // kubelet restart it, and the restarted process take the sockets back.
        env_value("TENDRIL_AFTER_HANDOVER", "wait"),
    ]);
    let mut ports = vec![
        port("postgres", PROXY_PORT),
        port("metrics", PROXY_METRICS_PORT),
    ];
    if o.read_only {
        vars.push(env_value(
            "TENDRIL_READ_ONLY_LISTEN_ADDRESS",
            format!("$(NODE_IP):{PROXY_READ_ONLY_PORT}"),
        ));
        ports.push(port("postgres-ro", PROXY_READ_ONLY_PORT));
    }
    let container = Container {
        name: "proxy".into(),
        image: Some(o.image.clone()),
        command: Some(vec!["tendril-proxy".into()]),
        env: Some(vars),
        ports: Some(ports),
        // Ready while it routes to a master; alive while it accepts connections (it holds
        // them during a switchover, and refuses them with a reason when no master exists).
        readiness_probe: Some(http_probe("/health", PROXY_METRICS_PORT, 2, 2)),
        liveness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(i32::from(PROXY_PORT)),
                ..TCPSocketAction::default()
            }),
            period_seconds: Some(10),
            failure_threshold: Some(6),
            ..Probe::default()
        }),
        resources: Some(resources(&o.resources.proxy_cpu, &o.resources.proxy_memory)),
        ..Container::default()
    };
    let spec = PodSpec {
        containers: vec![container],
        host_network: Some(true),
        dns_policy: Some("ClusterFirstWithHostNet".into()),
        security_context: Some(security_context()),
        automount_service_account_token: Some(false),
        // The drain: open sessions finish within TENDRIL_DRAIN_TIMEOUT.
        termination_grace_period_seconds: Some(45),
        ..PodSpec::default()
    };
    DaemonSet {
        metadata: meta(
            o,
            &object_name(&o.cluster, Component::Proxy),
            Some(Component::Proxy),
        ),
        spec: Some(DaemonSetSpec {
            selector: selector(o, Component::Proxy),
            template: template(o, Component::Proxy, PROXY_METRICS_PORT, spec),
            // The new pod starts beside the old one and takes its listening sockets; the
            // old one drains, then is deleted: a node never goes without a proxy.
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_surge: Some(IntOrString::Int(1)),
                    max_unavailable: Some(IntOrString::Int(0)),
                }),
            }),
            ..DaemonSetSpec::default()
        }),
        ..DaemonSet::default()
    }
}

fn proxy_service(o: &Options, name: &str, port: u16, target: u16) -> Service {
    Service {
        metadata: meta(o, name, Some(Component::Proxy)),
        spec: Some(ServiceSpec {
            selector: Some(selector_labels(&o.cluster, Component::Proxy)),
            // Each application pod talks to the proxy on its own node.
            internal_traffic_policy: Some("Local".into()),
            ports: Some(vec![ServicePort {
                name: Some("postgres".into()),
                port: i32::from(port),
                target_port: Some(IntOrString::Int(i32::from(target))),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// How many of a component's pods a voluntary disruption (a node drain) may take.
#[derive(Debug, Clone, Copy)]
enum Budget {
    /// One at a time (keepers: each drain is a failover or a resync at most).
    OneUnavailable,
    /// At least one left (sentinels: someone must decide).
    OneAvailable,
}

fn budget(o: &Options, component: Component, kind: Budget) -> PodDisruptionBudget {
    let one = Some(IntOrString::Int(1));
    let (max_unavailable, min_available) = match kind {
        Budget::OneUnavailable => (one, None),
        Budget::OneAvailable => (None, one),
    };
    PodDisruptionBudget {
        metadata: meta(o, &object_name(&o.cluster, component), Some(component)),
        spec: Some(PodDisruptionBudgetSpec {
            selector: Some(selector(o, component)),
            max_unavailable,
            min_available,
            ..PodDisruptionBudgetSpec::default()
        }),
        ..PodDisruptionBudget::default()
    }
}
