//! The connection to etcd that the store's requests and its watches share, and the mapping of
//! client errors to [`StoreError`].
//!
//! One client per endpoint, one of them current. A request that cannot even connect moves on
//! to the next endpoint at once (it was never sent, so retrying is safe); any other transport
//! failure makes the next request start from the next endpoint. etcd-client's own balanced
//! channel is not used for this because it keeps sending a share of requests to a dead member.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};

use crate::{KeyValue, LeaseId, Listing, StoreConfig, StoreError};

pub(crate) struct Inner {
    clients: Vec<Client>,
    current: AtomicUsize,
    pub(crate) endpoints: String,
}

impl Inner {
    /// Prepares one client per endpoint without contacting etcd (with credentials, etcd is
    /// asked for a token at once).
    pub(crate) async fn connect(config: &StoreConfig) -> Result<Inner, StoreError> {
        config.validate()?;
        let endpoints = config.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_timeout(config.request_timeout)
            .with_connect_timeout(config.connect_timeout)
            // HTTP/2 pings notice a frozen or unreachable member well before TCP would.
            .with_keep_alive(Duration::from_secs(1), config.request_timeout)
            .with_keep_alive_while_idle(true)
            // A member cut off from the quorum must not serve stale watches and reads.
            .with_require_leader(true);
        if let Some(tls) = &config.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        if let Some((user, password)) = &config.credentials {
            // A member forgets its tokens when it restarts (and a simple token expires after
            // five idle minutes): without a refresh, every request that member serves would
            // fail with "invalid auth token" until this process restarts.
            options = options
                .with_user(user, password)
                .with_auto_token_refresh(true);
        }
        let mut clients = Vec::with_capacity(config.endpoints.len());
        let mut last_error = None;
        for endpoint in &config.endpoints {
            match Client::connect([endpoint], Some(options.clone())).await {
                Ok(client) => clients.push(client),
                Err(e) => last_error = Some(classify("connect", &endpoints, e)),
            }
        }
        if clients.is_empty() {
            return Err(last_error.unwrap_or_else(|| StoreError::Config("no endpoint".into())));
        }
        Ok(Inner {
            clients,
            current: AtomicUsize::new(0),
            endpoints,
        })
    }

    pub(crate) async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let n = self.clients.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let idx = (start + i) % n;
            match call(self.clients[idx].clone()).await {
                Ok(value) => {
                    self.current.store(idx, Ordering::Relaxed);
                    return Ok(value);
                }
                Err(e) => {
                    let never_sent = is_connect_error(&e);
                    let err = classify(op, &self.endpoints, e);
                    if never_sent {
                        last = Some(err);
                        continue;
                    }
                    if err.is_transient() {
                        self.current.store((idx + 1) % n, Ordering::Relaxed);
                    }
                    return Err(err);
                }
            }
        }
        self.current.store((start + 1) % n, Ordering::Relaxed);
        Err(last.unwrap_or_else(|| StoreError::Config("no endpoint".into())))
    }
}

fn is_connect_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            s.code() == tonic::Code::Unavailable
                && (s.message().contains("connect error")
                    || s.message().contains("Connection refused"))
        }
        etcd_client::Error::TransportError(_) => true,
        _ => false,
    }
}

fn tls_options(tls: &crate::TlsFiles) -> Result<etcd_client::TlsOptions, StoreError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path)
            .map_err(|e| StoreError::Config(format!("cannot read {}: {e}", path.display())))
    };
    let mut options = etcd_client::TlsOptions::new().with_enabled_roots();
    if let Some(ca) = &tls.ca_file {
        options = options.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
        options = options.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(options)
}

pub(crate) fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = kv
        .key_str()
        .map_err(|_| StoreError::NotUtf8 { what: "key" })?;
    Ok(KeyValue {
        key: key.to_owned(),
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        create_revision: kv.create_revision(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    })
}

pub(crate) async fn list_prefix(inner: &Inner, prefix: &str) -> Result<Listing, StoreError> {
    let resp = inner
        .call("list", |mut c| async move {
            c.get(prefix, Some(GetOptions::new().with_prefix())).await
        })
        .await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let kvs = resp
        .kvs()
        .iter()
        .map(convert)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Listing { kvs, revision })
}

/// Maps a client error to a [`StoreError`], naming the endpoints for every outage.
pub(crate) fn classify(op: &'static str, endpoints: &str, e: etcd_client::Error) -> StoreError {
    use tonic::Code;
    let unavailable = |detail: String| StoreError::Unavailable {
        endpoints: endpoints.to_owned(),
        detail,
    };
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            let message = s.message().to_owned();
            if message.contains("requested lease not found") {
                return StoreError::LeaseNotFound(0);
            }
            match s.code() {
                Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled => {
                    unavailable(format!("{op}: {message}"))
                }
                // etcd answers "no leader" while it has lost its quorum.
                _ if message.contains("no leader") && !message.contains("election") => {
                    unavailable(format!("{op}: {message}"))
                }
                // The connection broke below gRPC (TLS mismatch, reset, HTTP/2 error).
                Code::Unknown | Code::Internal if message.contains("transport error") => {
                    let detail = std::error::Error::source(&s)
                        .map_or_else(|| message.clone(), |cause| format!("{message}: {cause}"));
                    unavailable(format!("{op}: {detail}"))
                }
                _ => StoreError::Request {
                    op,
                    detail: message,
                },
            }
        }
        etcd_client::Error::LeaseKeepAliveError(m) if m.contains("lease not found") => {
            StoreError::LeaseNotFound(0)
        }
        etcd_client::Error::TransportError(t) => unavailable(format!("{op}: {t}")),
        etcd_client::Error::IoError(io) => unavailable(format!("{op}: {io}")),
        etcd_client::Error::InvalidUri(u) => StoreError::Config(format!("{u}")),
        etcd_client::Error::InvalidArgs(a) => StoreError::Config(a),
        other => StoreError::Request {
            op,
            detail: other.to_string(),
        },
    }
}
