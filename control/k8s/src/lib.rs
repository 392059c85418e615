//! Kubernetes manifests for a tendril cluster, built from typed Kubernetes API objects
//! (`k8s-openapi`) rather than text templates: [`manifests`] turns validated [`Options`] into
//! the objects, [`to_yaml`] and [`to_json_list`] render them for `kubectl apply -f`. Pure: no I/O, no
//! randomness (the caller generates passwords).

mod manifests;
mod options;
mod parts;

pub use manifests::{
    Component, DATA_DIR, KEEPER_METRICS_PORT, Manifest, POSTGRES_PORT, PROXY_METRICS_PORT,
    PROXY_PORT, PROXY_READ_ONLY_PORT, READ_ONLY_SERVICE_PORT, RUN_AS, SECRET_DIR,
    SENTINEL_METRICS_PORT, SERVICE_PORT, SPEC_FILE, manifests, object_name, selector_labels,
};
pub use options::{Options, Resources, SecretSource};

/// The Secret's key (and file name in the pods) of the superuser's password.
pub const SU_PASSWORD_KEY: &str = "su-password";
/// The Secret's key (and file name in the pods) of the replication user's password.
pub const REPL_PASSWORD_KEY: &str = "repl-password";

/// Why no manifests were made.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// The options are invalid; every problem is listed.
    #[error("invalid options:\n  - {}", .0.join("\n  - "))]
    Options(Vec<String>),
    /// An object could not be rendered.
    #[error("rendering the manifests: {0}")]
    Render(#[from] serde_json::Error),
    /// The objects could not be rendered as YAML, or YAML read back made no sense.
    #[error("YAML: {0}")]
    Yaml(String),
}

/// The objects as YAML documents separated by `---`, in apply order. Every string is
/// quoted, so that no YAML 1.1 reader (kubectl's) takes `on`, `off`, `yes` or `"true"` for
/// a boolean, or `0755` for a number.
pub fn to_yaml(manifests: &[Manifest]) -> Result<String, K8sError> {
    let docs = manifests
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    let options = serde_saphyr::ser_options! { quote_all: true };
    serde_saphyr::to_string_multiple_with_options(&docs, options)
        .map(|text| format!("---\n{text}"))
        .map_err(|e| K8sError::Yaml(e.to_string()))
}

/// YAML documents (as [`to_yaml`] writes them) read back as JSON values.
pub fn parse_yaml(text: &str) -> Result<Vec<serde_json::Value>, K8sError> {
    serde_saphyr::from_multiple(text).map_err(|e| K8sError::Yaml(e.to_string()))
}

/// The objects as one `v1` `List`, which `kubectl apply -f` takes whole.
pub fn to_json_list(manifests: &[Manifest]) -> Result<String, K8sError> {
    let items = manifests
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<Vec<_>, _>>()?;
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": items});
    Ok(serde_json::to_string_pretty(&list)? + "\n")
}
