//! Where each document lives in the store.

use std::fmt;

/// The key layout of one cluster: everything under `/tendril/<cluster>/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    base: String,
}

/// A cluster name that cannot be part of a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cluster name {0:?}: use 1-63 characters of a-z, A-Z, 0-9, '-' and '_'")]
pub struct InvalidClusterName(pub String);

impl Keys {
    /// The layout for `cluster`, which must be a plain name (it becomes a path segment).
    pub fn new(cluster: &str) -> Result<Keys, InvalidClusterName> {
        let valid = !cluster.is_empty()
            && cluster.len() <= 63
            && cluster
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !valid {
            return Err(InvalidClusterName(cluster.to_owned()));
        }
        Ok(Keys {
            base: format!("/tendril/{cluster}/"),
        })
    }

    /// `/tendril/<cluster>/`: the prefix of every key of the cluster.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The cluster data document.
    pub fn cluster_data(&self) -> String {
        format!("{}clusterdata", self.base)
    }

    /// Prefix of the keeper reports.
    pub fn keepers_prefix(&self) -> String {
        format!("{}keepers/", self.base)
    }

    /// One keeper's report.
    pub fn keeper(&self, uid: &str) -> String {
        format!("{}keepers/{uid}", self.base)
    }

    /// Prefix of the proxy reports.
    pub fn proxies_prefix(&self) -> String {
        format!("{}proxies/", self.base)
    }

    /// One proxy's report.
    pub fn proxy(&self, uid: &str) -> String {
        format!("{}proxies/{uid}", self.base)
    }

    /// Prefix of the sentinel reports.
    pub fn sentinels_prefix(&self) -> String {
        format!("{}sentinels/", self.base)
    }

    /// One sentinel's report.
    pub fn sentinel(&self, uid: &str) -> String {
        format!("{}sentinels/{uid}", self.base)
    }

    /// The election name the sentinels campaign on.
    pub fn leader(&self) -> String {
        format!("{}leader", self.base)
    }

    /// The uid at the end of a key under `prefix`, if the key is directly under it.
    pub fn uid_under<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
        key.strip_prefix(prefix)
            .filter(|rest| !rest.is_empty() && !rest.contains('/'))
    }
}

impl fmt::Display for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_out_the_cluster() {
        let k = Keys::new("prod-1").unwrap();
        assert_eq!(k.cluster_data(), "/tendril/prod-1/clusterdata");
        assert_eq!(k.keeper("k1"), "/tendril/prod-1/keepers/k1");
        assert_eq!(k.proxy("p1"), "/tendril/prod-1/proxies/p1");
        assert_eq!(k.sentinel("s1"), "/tendril/prod-1/sentinels/s1");
        assert_eq!(k.leader(), "/tendril/prod-1/leader");
        assert_eq!(
            Keys::uid_under(&k.keeper("k1"), &k.keepers_prefix()),
            Some("k1")
        );
        assert_eq!(
            Keys::uid_under("/tendril/prod-1/keepers/", &k.keepers_prefix()),
            None
        );
        assert_eq!(
            Keys::uid_under("/tendril/prod-1/keepers/a/b", &k.keepers_prefix()),
            None
        );
    }

    #[test]
    fn rejects_names_that_break_paths() {
        for bad in ["", "a/b", "..", "x y", &"a".repeat(64)] {
            assert!(Keys::new(bad).is_err(), "{bad:?}");
        }
    }
}
