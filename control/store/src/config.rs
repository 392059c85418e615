//! How to reach the store: endpoints, timeouts, TLS and credentials, from flags or environment.

use std::path::PathBuf;
use std::time::Duration;

use crate::StoreError;

/// Validated connection settings.
#[derive(Clone)]
pub struct StoreConfig {
    /// etcd client URLs (`http://host:port`, `https://host:port`).
    pub endpoints: Vec<String>,
    /// Deadline of each request.
    pub request_timeout: Duration,
    /// Deadline of each connection attempt.
    pub connect_timeout: Duration,
    /// TLS client settings; required for `https` endpoints with a private CA.
    pub tls: Option<TlsFiles>,
    /// User name and password for etcd authentication.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for StoreConfig {
    // Written by hand so the password never reaches a log line.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("endpoints", &self.endpoints)
            .field("request_timeout", &self.request_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("tls", &self.tls)
            .field("user", &self.credentials.as_ref().map(|(u, _)| u))
            .finish()
    }
}

/// PEM files for TLS.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA bundle that signed the etcd server certificates.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (with `key_file`) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Client key.
    pub key_file: Option<PathBuf>,
}

impl StoreConfig {
    /// Plain-HTTP endpoints with default timeouts.
    pub fn new(endpoints: impl IntoIterator<Item = impl Into<String>>) -> StoreConfig {
        StoreConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            tls: None,
            credentials: None,
        }
    }

    /// Checks the endpoints: at least one, each an http(s) URL with a port, all one scheme.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.endpoints.is_empty() {
            return Err(StoreError::Config("no store endpoint given".into()));
        }
        let mut schemes = Vec::new();
        for e in &self.endpoints {
            let (scheme, rest) = e.split_once("://").ok_or_else(|| {
                StoreError::Config(format!(
                    "endpoint {e:?} must start with http:// or https://"
                ))
            })?;
            if scheme != "http" && scheme != "https" {
                return Err(StoreError::Config(format!(
                    "endpoint {e:?} must start with http:// or https://"
                )));
            }
            let authority = rest.trim_end_matches('/');
            let port_ok = authority
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_ok || authority.contains(['/', ' ']) {
                return Err(StoreError::Config(format!(
                    "endpoint {e:?} must be scheme://host:port"
                )));
            }
            schemes.push(scheme);
        }
        schemes.dedup();
        if schemes.len() > 1 {
            return Err(StoreError::Config(
                "all store endpoints must use the same scheme".into(),
            ));
        }
        if self.tls.is_some() && schemes[0] != "https" {
            return Err(StoreError::Config(
                "TLS files given but the endpoints are http://".into(),
            ));
        }
        if self.request_timeout.is_zero() || self.connect_timeout.is_zero() {
            return Err(StoreError::Config(
                "store timeouts must be greater than zero".into(),
            ));
        }
        Ok(())
    }
}

/// The store flags every tendril binary accepts, each also read from a `TENDRIL_*` variable.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "TENDRIL_STORE_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub store_endpoints: Vec<String>,
    /// Deadline of each store request.
    #[arg(long, env = "TENDRIL_STORE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub store_timeout: Duration,
    /// CA bundle for https endpoints.
    #[arg(long, env = "TENDRIL_STORE_CA_FILE")]
    pub store_ca_file: Option<PathBuf>,
    /// Client certificate for https endpoints.
    #[arg(long, env = "TENDRIL_STORE_CERT_FILE", requires = "store_key_file")]
    pub store_cert_file: Option<PathBuf>,
    /// Client key for https endpoints.
    #[arg(long, env = "TENDRIL_STORE_KEY_FILE", requires = "store_cert_file")]
    pub store_key_file: Option<PathBuf>,
    /// etcd user.
    #[arg(long, env = "TENDRIL_STORE_USER", requires = "store_password_file")]
    pub store_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long, env = "TENDRIL_STORE_PASSWORD_FILE", requires = "store_user")]
    pub store_password_file: Option<PathBuf>,
}

impl StoreArgs {
    /// The validated configuration; reads the password file.
    pub fn to_config(&self) -> Result<StoreConfig, StoreError> {
        let mut config = StoreConfig::new(self.store_endpoints.iter().map(|e| e.trim().to_owned()));
        config.request_timeout = self.store_timeout;
        if self.store_ca_file.is_some() || self.store_cert_file.is_some() {
            config.tls = Some(TlsFiles {
                ca_file: self.store_ca_file.clone(),
                cert_file: self.store_cert_file.clone(),
                key_file: self.store_key_file.clone(),
            });
        }
        if let (Some(user), Some(file)) = (&self.store_user, &self.store_password_file) {
            let password = std::fs::read_to_string(file).map_err(|e| {
                StoreError::Config(format!(
                    "cannot read store password file {}: {e}",
                    file.display()
                ))
            })?;
            let password = password.trim_end_matches(['\r', '\n']).to_owned();
            if password.is_empty() {
                return Err(StoreError::Config(format!(
                    "store password file {} is empty",
                    file.display()
                )));
            }
            config.credentials = Some((user.clone(), password));
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validates_endpoints() {
        assert!(
            StoreConfig::new(["http://127.0.0.1:2379"])
                .validate()
                .is_ok()
        );
        assert!(
            StoreConfig::new(["https://a:1", "https://b:2/"])
                .validate()
                .is_ok()
        );
        let empty: [&str; 0] = [];
        for bad in [
            &empty[..],
            &["127.0.0.1:2379"],
            &["ftp://a:1"],
            &["http://a"],
            &["http://a:notaport"],
            &["http://a:1", "https://b:2"],
            &["http://:1"],
        ] {
            assert!(
                StoreConfig::new(bad.iter().copied()).validate().is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_output_hides_the_password() {
        let mut c = StoreConfig::new(["http://a:1"]);
        c.credentials = Some(("root".into(), "s3cret".into()));
        let text = format!("{c:?}");
        assert!(text.contains("root") && !text.contains("s3cret"), "{text}");
    }
}
