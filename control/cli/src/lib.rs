//! tendrilctl, the administration CLI: the commands as functions over any [`Store`], so they
//! are tested against a real etcd, and the argument parsing that `main.rs` hands them.
//!
//! Every command that changes cluster data reads it, changes it, and writes it back with a
//! compare-and-swap on the revision it read, retrying a few times when the sentinel wrote in
//! between. Nothing is written unless the whole change is valid.
#![forbid(unsafe_code)]

pub mod args;
pub mod ops;
mod run;

pub use run::run;

use std::time::SystemTime;

use serde_json::Value;
use tendril_control_model::{
    ClusterData, ClusterSpec, DecodeError, Keys, SpecErrors, decode, encode, merge_patch,
};
use tendril_control_store::{CasOutcome, Expect, Revision, Store, StoreError};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The store could not be used.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// No cluster data under this name.
    #[error(
        "cluster {cluster:?} does not exist in the store (no {key}); create it with `tendrilctl init`"
    )]
    NoCluster {
        /// The cluster name.
        cluster: String,
        /// The key looked up.
        key: String,
    },
    /// `init` on an existing cluster without `--force`.
    #[error(
        "cluster {cluster:?} already exists (generation {generation}); `init --force` replaces it \
         and every keeper will re-initialise"
    )]
    AlreadyExists {
        /// The cluster name.
        cluster: String,
        /// Its current generation.
        generation: u64,
    },
    /// The spec, or the change to it, is invalid. Nothing was written.
    #[error("{0}\nnothing was changed")]
    Spec(SpecErrors),
    /// Stored or given cluster data cannot be used.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// Bad input that is not a spec error (unreadable file, not JSON).
    #[error("{0}")]
    Input(String),
    /// The command line is wrong (exit code 2).
    #[error("{0}")]
    Usage(String),
    /// The Kubernetes manifests cannot be made from these options.
    #[error(transparent)]
    K8s(#[from] tendril_k8s::K8sError),
    /// Other writers kept changing the cluster data.
    #[error("cluster data kept changing under us ({0} attempts); try again")]
    Contended(u32),
}

impl CtlError {
    /// The process exit code: 2 for usage errors (including a bad store configuration),
    /// 1 for every other failure.
    pub fn exit_code(&self) -> u8 {
        match self {
            CtlError::Usage(_)
            | CtlError::Store(StoreError::Config(_))
            | CtlError::K8s(tendril_k8s::K8sError::Options(_)) => 2,
            _ => 1,
        }
    }
}

/// How `update` changes the spec.
#[derive(Debug, Clone)]
pub enum SpecChange {
    /// A JSON merge patch (RFC 7386) applied to the current spec; `null` resets a field to its
    /// default.
    Patch(Value),
    /// A whole new spec; fields left out take their defaults.
    Replace(Value),
}

const CAS_ATTEMPTS: u32 = 3;

/// The commands, bound to one cluster of one store.
#[derive(Debug, Clone)]
pub struct Ctl<S> {
    pub(crate) store: S,
    pub(crate) cluster: String,
    pub(crate) keys: Keys,
}

impl<S: Store> Ctl<S> {
    /// Commands for `cluster` (already validated into `keys`).
    pub fn new(store: S, cluster: &str, keys: Keys) -> Ctl<S> {
        Ctl {
            store,
            cluster: cluster.to_owned(),
            keys,
        }
    }

    /// Writes a brand-new cluster data document with `spec`. Refuses to replace an existing
    /// cluster unless `force`.
    pub async fn init(&self, spec: ClusterSpec, force: bool) -> Result<ClusterData, CtlError> {
        let cd = ClusterData::new(new_uid(), spec, SystemTime::now());
        let key = self.keys.cluster_data();
        if force {
            self.store.put(&key, encode(&cd), None).await?;
            return Ok(cd);
        }
        match self
            .store
            .cas(&key, encode(&cd), Expect::Absent, None)
            .await?
        {
            CasOutcome::Written(_) => Ok(cd),
            CasOutcome::Conflict(current) => {
                let generation = current
                    .and_then(|kv| decode::<ClusterData>(&kv.value).ok())
                    .map_or(0, |existing| existing.generation.0);
                Err(CtlError::AlreadyExists {
                    cluster: self.cluster.clone(),
                    generation,
                })
            }
            // Only a guarded write can fail this way; init writes unguarded.
            CasOutcome::NotLeader => Err(CtlError::Contended(1)),
        }
    }

    /// The cluster data and the revision it was read at.
    pub async fn read(&self) -> Result<(ClusterData, Revision), CtlError> {
        let kv = self.read_raw().await?;
        Ok((decode::<ClusterData>(&kv.value)?, kv.mod_revision))
    }

    /// The stored cluster data as it is, even if this build cannot use it.
    pub async fn read_raw(&self) -> Result<tendril_control_store::KeyValue, CtlError> {
        let key = self.keys.cluster_data();
        self.store
            .get(&key)
            .await?
            .ok_or_else(|| CtlError::NoCluster {
                cluster: self.cluster.clone(),
                key,
            })
    }

    /// Changes the spec. Every error in the change is reported together and nothing is
    /// written unless the whole new spec is valid.
    pub async fn update(&self, change: &SpecChange) -> Result<ClusterData, CtlError> {
        for _ in 0..CAS_ATTEMPTS {
            let (mut cd, revision) = self.read().await?;
            let new_spec = match change {
                SpecChange::Patch(patch) => {
                    let mut value = cd.spec.to_json_value();
                    merge_patch(&mut value, patch);
                    // Fields the patch removed with null fall back to their defaults.
                    cd.spec.update_from_json_value(&value)
                }
                SpecChange::Replace(value) => cd.spec.update_from_json_value(value),
            }
            .map_err(CtlError::Spec)?;
            if new_spec == cd.spec {
                return Ok(cd);
            }
            cd.spec = new_spec;
            cd.generation = cd.generation.next();
            cd.change_time = SystemTime::now();
            let key = self.keys.cluster_data();
            match self
                .store
                .cas(&key, encode(&cd), Expect::ModRevision(revision), None)
                .await?
            {
                CasOutcome::Written(_) => return Ok(cd),
                CasOutcome::Conflict(_) | CasOutcome::NotLeader => continue,
            }
        }
        Err(CtlError::Contended(CAS_ATTEMPTS))
    }

    /// Replaces the cluster data wholesale (a recovery tool). The document must decode and its
    /// spec be valid.
    pub async fn write_cluster_data(&self, bytes: &[u8]) -> Result<ClusterData, CtlError> {
        let cd: ClusterData = decode(bytes)?;
        self.store
            .put(&self.keys.cluster_data(), encode(&cd), None)
            .await?;
        Ok(cd)
    }
}

/// A fresh random uid: eight hexadecimal digits, as stolon's.
pub fn new_uid() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// Parses a spec given as JSON text (a file, stdin or an argument).
pub fn parse_json(text: &str, what: &str) -> Result<Value, CtlError> {
    serde_json::from_str(text)
        .map_err(|e| CtlError::Input(format!("{what} is not valid JSON: {e}")))
}
