//! How standbys secure their replication connection to their upstream: the `sslmode` and
//! `sslrootcert` of the `primary_conninfo` the keeper writes. Part of the cluster spec
//! (`replication_tls`), copied into every database spec by the sentinel.

use serde::{Deserialize, Serialize};

/// libpq's `sslmode` for the standbys' connection to their upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// TLS if the upstream insists.
    Allow,
    /// TLS when the upstream offers it, not verified (the default without `replication_tls`).
    Prefer,
    /// TLS or no connection, not verified.
    Require,
    /// TLS, the upstream's certificate signed by `sslrootcert`.
    VerifyCa,
    /// As `verify-ca`, and the certificate names the host the standby connects to.
    VerifyFull,
}

impl SslMode {
    /// Every mode, in libpq's order.
    pub const ALL: [SslMode; 6] = [
        SslMode::Disable,
        SslMode::Allow,
        SslMode::Prefer,
        SslMode::Require,
        SslMode::VerifyCa,
        SslMode::VerifyFull,
    ];

    /// The libpq spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether the upstream's certificate is checked (needs a root certificate).
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// TLS settings of the standbys' replication connections.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplicationTls {
    /// libpq `sslmode`.
    pub sslmode: SslMode,
    /// The CA certificate that signed the masters' certificates: a path that exists on every
    /// database host (libpq `sslrootcert`). Required by `verify-ca` and `verify-full`.
    #[serde(default)]
    pub sslrootcert: Option<String>,
}

impl ReplicationTls {
    /// The `primary_conninfo` keywords and values these settings add.
    pub fn conninfo(&self) -> Vec<(&'static str, String)> {
        let mut out = vec![("sslmode", self.sslmode.as_str().to_owned())];
        if let Some(root) = &self.sslrootcert {
            out.push(("sslrootcert", root.clone()));
        }
        out
    }

    /// Problems, as (field, message) pairs under `replication_tls`.
    pub(crate) fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        match &self.sslrootcert {
            None if self.sslmode.verifies() => out.push((
                "replication_tls.sslrootcert",
                format!(
                    "is required with sslmode {} (the CA certificate on every database host)",
                    self.sslmode.as_str()
                ),
            )),
            Some(path) if !path.starts_with('/') || path.contains(['\n', '\r', '\0']) => {
                out.push((
                    "replication_tls.sslrootcert",
                    "must be an absolute path on one line".to_owned(),
                ))
            }
            _ => {}
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libpq_spellings_and_names_the_root_certificate() {
        let tls: ReplicationTls = serde_json::from_str(
            r#"{"sslmode": "verify-full", "sslrootcert": "/etc/tendril/tls/ca.crt"}"#,
        )
        .expect("parses");
        assert_eq!(
            tls.conninfo(),
            [
                ("sslmode", "verify-full".to_owned()),
                ("sslrootcert", "/etc/tendril/tls/ca.crt".to_owned())
            ]
        );
        assert!(tls.problems().is_empty());
        assert!(serde_json::from_str::<ReplicationTls>(r#"{"sslmode": "strict"}"#).is_err());
        assert!(
            serde_json::from_str::<ReplicationTls>(r#"{"sslmode": "require", "root": "/x"}"#)
                .is_err()
        );
    }

    #[test]
    fn verification_needs_an_absolute_root_certificate() {
        let verify = |root: Option<&str>| ReplicationTls {
            sslmode: SslMode::VerifyCa,
            sslrootcert: root.map(str::to_owned),
        };
        assert_eq!(verify(None).problems().len(), 1);
        assert_eq!(verify(Some("ca.crt")).problems().len(), 1);
        assert!(verify(Some("/ca.crt")).problems().is_empty());
        let require = ReplicationTls {
            sslmode: SslMode::Require,
            sslrootcert: None,
        };
        assert!(require.problems().is_empty());
    }
}
