//! The pieces every workload is built from: object metadata and labels, environment
//! variables (plain and from the downward API), probes, resources, Prometheus annotations,
//! the pod security context and the passwords' volume.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ContainerPort, EnvVar, EnvVarSource, HTTPGetAction, ObjectFieldSelector, PodSecurityContext,
    PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretVolumeSource, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::manifests::{Component, RUN_AS, SECRET_DIR, secret_name, selector_labels};
use crate::options::Options;

pub(crate) fn meta(o: &Options, name: &str, component: Option<Component>) -> ObjectMeta {
    let mut labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_owned(), "tendril".to_owned()),
        ("app.kubernetes.io/instance".to_owned(), o.cluster.clone()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "tendrilctl".to_owned(),
        ),
    ]);
    if let Some(c) = component {
        labels.insert(
            "app.kubernetes.io/component".to_owned(),
            c.as_str().to_owned(),
        );
    }
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(o.namespace.clone()),
        labels: Some(labels),
        ..ObjectMeta::default()
    }
}

pub(crate) fn selector(o: &Options, component: Component) -> LabelSelector {
    LabelSelector {
        match_labels: Some(selector_labels(&o.cluster, component)),
        ..LabelSelector::default()
    }
}

pub(crate) fn env_value(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value: Some(value.into()),
        ..EnvVar::default()
    }
}

/// An environment variable from the downward API (`metadata.name`, `status.podIP`...).
pub(crate) fn env_field(name: &str, field_path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: field_path.to_owned(),
                ..ObjectFieldSelector::default()
            }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

/// What every component needs: the cluster and the store.
pub(crate) fn common_env(o: &Options) -> Vec<EnvVar> {
    vec![
        env_value("TENDRIL_CLUSTER_NAME", o.cluster.clone()),
        env_value("TENDRIL_STORE_ENDPOINTS", o.store_endpoints.join(",")),
    ]
}

pub(crate) fn http_probe(path: &str, port: u16, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(port)),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Probe::default()
    }
}

pub(crate) fn resources(cpu: &str, memory: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_owned(), Quantity(cpu.to_owned())),
            ("memory".to_owned(), Quantity(memory.to_owned())),
        ])),
        limits: Some(BTreeMap::from([(
            "memory".to_owned(),
            Quantity(memory.to_owned()),
        )])),
        ..ResourceRequirements::default()
    }
}

pub(crate) fn scrape_annotations(port: u16) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), port.to_string()),
        ("prometheus.io/path".to_owned(), "/metrics".to_owned()),
    ])
}

pub(crate) fn template(
    o: &Options,
    component: Component,
    port: u16,
    spec: PodSpec,
) -> PodTemplateSpec {
    let mut metadata = meta(o, "", Some(component));
    metadata.name = None;
    metadata.namespace = None;
    metadata.annotations = Some(scrape_annotations(port));
    PodTemplateSpec {
        metadata: Some(metadata),
        spec: Some(spec),
    }
}

pub(crate) fn security_context() -> PodSecurityContext {
    PodSecurityContext {
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        run_as_non_root: Some(true),
        fs_group: Some(RUN_AS),
        // PostgreSQL wants its data directory 0700: no recursive change on every start.
        fs_group_change_policy: Some("OnRootMismatch".into()),
        ..PodSecurityContext::default()
    }
}

pub(crate) fn port(name: &str, number: u16) -> ContainerPort {
    ContainerPort {
        name: Some(name.into()),
        container_port: i32::from(number),
        ..ContainerPort::default()
    }
}

pub(crate) fn secret_volume(o: &Options) -> Volume {
    Volume {
        name: "passwords".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name(o)),
            default_mode: Some(0o440),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

pub(crate) fn secret_mount() -> VolumeMount {
    VolumeMount {
        name: "passwords".into(),
        mount_path: SECRET_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }
}
