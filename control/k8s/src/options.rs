//! What a set of manifests is built from, and its validation: every problem reported at once,
//! before anything is generated.

use std::fmt;

/// The choices behind a set of manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The namespace every object goes in.
    pub namespace: String,
    /// The tendril cluster name (the store prefix, and part of every object name).
    pub cluster: String,
    /// The container image holding the tendril binaries and PostgreSQL 15.
    pub image: String,
    /// Keeper pods (one PostgreSQL each).
    pub keepers: u32,
    /// Sentinel pods (two or more: one leads, the others wait).
    pub sentinels: u32,
    /// The storage class of each keeper's volume; the cluster's default when absent.
    pub storage_class: Option<String>,
    /// The size of each keeper's volume, as a Kubernetes quantity (`20Gi`).
    pub storage_size: String,
    /// etcd client URLs, reachable from the pods.
    pub store_endpoints: Vec<String>,
    /// Synchronous replication in the initial cluster spec.
    pub synchronous_replication: bool,
    /// The Secret holding the superuser's and the replication user's passwords (keys
    /// [`crate::SU_PASSWORD_KEY`] and [`crate::REPL_PASSWORD_KEY`]).
    pub secret: SecretSource,
    /// Resource requests and limits per component.
    pub resources: Resources,
    /// The proxies' read-only listener (reads on the standbys) and its node-local Service.
    pub read_only: bool,
}

/// Where the passwords come from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// A Secret created beforehand by the operator, by name.
    Existing(String),
    /// A Secret generated with these passwords (superuser, replication user).
    Generate {
        /// The superuser's password.
        su: String,
        /// The replication user's password.
        repl: String,
    },
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Existing(name) => f.debug_tuple("Existing").field(name).finish(),
            SecretSource::Generate { .. } => f.write_str("Generate { .. }"),
        }
    }
}

/// CPU and memory, as Kubernetes quantities, per component (requests equal limits for
/// memory; CPU has a request only, so a busy node throttles nothing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    /// Keeper and PostgreSQL: CPU request.
    pub keeper_cpu: String,
    /// Keeper and PostgreSQL: memory.
    pub keeper_memory: String,
    /// Sentinel: CPU request.
    pub sentinel_cpu: String,
    /// Sentinel: memory.
    pub sentinel_memory: String,
    /// Proxy: CPU request.
    pub proxy_cpu: String,
    /// Proxy: memory.
    pub proxy_memory: String,
}

impl Default for Resources {
    fn default() -> Self {
        Resources {
            keeper_cpu: "1".into(),
            keeper_memory: "2Gi".into(),
            sentinel_cpu: "100m".into(),
            sentinel_memory: "64Mi".into(),
            proxy_cpu: "250m".into(),
            proxy_memory: "128Mi".into(),
        }
    }
}

impl Options {
    /// Options with defaults for everything but what has none.
    pub fn new(cluster: &str, image: &str, store_endpoints: Vec<String>) -> Options {
        Options {
            namespace: "default".into(),
            cluster: cluster.into(),
            image: image.into(),
            keepers: 3,
            sentinels: 2,
            storage_class: None,
            storage_size: "20Gi".into(),
            store_endpoints,
            synchronous_replication: true,
            secret: SecretSource::Existing(format!("tendril-{cluster}-passwords")),
            resources: Resources::default(),
            read_only: false,
        }
    }

    /// Every problem, as `(option, message)`; empty when the options can be built.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if !dns_label(&self.namespace, 63) {
            out.push(("namespace", "must be a DNS label (a-z, 0-9, -)".to_owned()));
        }
        // The longest object name is tendril-<cluster>-sentinel (a Deployment whose pods
        // add up to 16 characters of suffix); pod names must stay within 63.
        if !dns_label(&self.cluster, 30) {
            out.push((
                "cluster",
                "must be a DNS label of at most 30 characters (a-z, 0-9, -), as it names \
                 Kubernetes objects"
                    .to_owned(),
            ));
        }
        if self.image.trim().is_empty() || self.image.contains(char::is_whitespace) {
            out.push(("image", "must be an image reference".to_owned()));
        }
        if self.keepers == 0 {
            out.push(("keepers", "must be at least 1".to_owned()));
        }
        if self.sentinels < 2 {
            out.push((
                "sentinels",
                "must be at least 2: a sentinel that dies must not stop failovers".to_owned(),
            ));
        }
        if self.store_endpoints.is_empty() {
            out.push((
                "store-endpoints",
                "must name at least one etcd URL".to_owned(),
            ));
        }
        for e in &self.store_endpoints {
            if e.contains("://127.") || e.contains("://localhost") || e.contains("://[::1]") {
                out.push((
                    "store-endpoints",
                    format!("{e} is a loopback address: each pod would reach itself"),
                ));
            }
        }
        let quantities = [
            ("storage-size", &self.storage_size),
            ("keeper-cpu", &self.resources.keeper_cpu),
            ("keeper-memory", &self.resources.keeper_memory),
            ("sentinel-cpu", &self.resources.sentinel_cpu),
            ("sentinel-memory", &self.resources.sentinel_memory),
            ("proxy-cpu", &self.resources.proxy_cpu),
            ("proxy-memory", &self.resources.proxy_memory),
        ];
        for (name, q) in quantities {
            if !quantity(q) {
                out.push((
                    name,
                    format!("{q:?} is not a Kubernetes quantity (20Gi, 500m)"),
                ));
            }
        }
        match &self.secret {
            SecretSource::Existing(name) if !dns_label(name, 253) => {
                out.push(("secret", "must name a Secret (a-z, 0-9, -)".to_owned()));
            }
            SecretSource::Generate { su, repl } if su.is_empty() || repl.is_empty() => {
                out.push(("secret", "generated passwords must not be empty".to_owned()));
            }
            _ => {}
        }
        out
    }
}

/// A DNS-1123 label of at most `max` characters.
fn dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// A Kubernetes quantity in its common forms: digits with an optional fraction and an
/// optional suffix (`m`, `k`, `M`, `G`, `T`, `Ki`, `Mi`, `Gi`, `Ti`).
fn quantity(s: &str) -> bool {
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    !number.is_empty()
        && number.parse::<f64>().is_ok()
        && ["", "m", "k", "M", "G", "T", "Ki", "Mi", "Gi", "Ti"].contains(&suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Options {
        Options::new(
            "main",
            "tendril:0.1.0",
            vec!["http://etcd-0.etcd:2379".into()],
        )
    }

    #[test]
    fn defaults_are_valid_and_each_bad_option_is_named() {
        assert!(valid().problems().is_empty(), "{:?}", valid().problems());
        type Change = fn(&mut Options);
        let cases: Vec<(&str, Change)> = vec![
            ("namespace", (|o| o.namespace = "Prod".into())),
            ("cluster", (|o| o.cluster = "main_db".into())),
            ("cluster", (|o| o.cluster = "a".repeat(31))),
            ("image", (|o| o.image = " ".into())),
            ("keepers", (|o| o.keepers = 0)),
            ("sentinels", (|o| o.sentinels = 1)),
            ("store-endpoints", (|o| o.store_endpoints.clear())),
            (
                "store-endpoints",
                (|o| o.store_endpoints = vec!["http://127.0.0.1:2379".into()]),
            ),
            ("storage-size", (|o| o.storage_size = "20 GB".into())),
            (
                "proxy-memory",
                (|o| o.resources.proxy_memory = "lots".into()),
            ),
            (
                "secret",
                (|o| {
                    o.secret = SecretSource::Generate {
                        su: String::new(),
                        repl: "x".into(),
                    }
                }),
            ),
        ];
        for (name, change) in cases {
            let mut o = valid();
            change(&mut o);
            let problems = o.problems();
            assert!(
                problems.iter().any(|(n, _)| *n == name),
                "{name}: {problems:?}"
            );
        }
    }

    #[test]
    fn generated_passwords_stay_out_of_debug_output() {
        let mut o = valid();
        o.secret = SecretSource::Generate {
            su: "hunter2".into(),
            repl: "hunter3".into(),
        };
        let text = format!("{o:?}");
        assert!(!text.contains("hunter"), "{text}");
    }
}
