//! The etcd v3 backend.
//!
//! One client per endpoint, one of them current. A request that cannot even connect moves on
//! to the next endpoint at once (it was never sent, so retrying is safe); any other transport
//! failure makes the next request start from the next endpoint. etcd-client's own balanced
//! channel is not used for this because it keeps sending a share of requests to a dead member.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, TxnOp, TxnOpResponse,
};

use crate::watch::{Watch, WatchSource};
use crate::{
    CasOutcome, Expect, KeyValue, Leadership, LeaseId, Listing, Revision, Store, StoreConfig,
    StoreError,
};

/// A connection to an etcd v3 cluster. Clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    clients: Vec<Client>,
    current: AtomicUsize,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .finish()
    }
}

impl EtcdStore {
    /// Connects and checks that at least one endpoint answers; the error names the endpoints
    /// when none does.
    pub async fn connect(config: &StoreConfig) -> Result<EtcdStore, StoreError> {
        let store = EtcdStore::connect_lazy(config).await?;
        store.get("/tendril/").await?;
        Ok(store)
    }

    /// Prepares a connection without contacting etcd, so a long-running process can start
    /// while the store is down and keep retrying. With credentials, etcd is asked for a token
    /// at once.
    pub async fn connect_lazy(config: &StoreConfig) -> Result<EtcdStore, StoreError> {
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
            options = options.with_user(user, password);
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
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                clients,
                current: AtomicUsize::new(0),
                endpoints,
            }),
        })
    }

    /// The endpoints, comma-separated, as used in error messages.
    pub fn endpoints(&self) -> &str {
        &self.inner.endpoints
    }

    /// Runs `call` on the current endpoint, moving on to the next ones while it cannot connect.
    async fn call<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.inner.call(op, call).await
    }

    pub(crate) fn inner(&self) -> Arc<Inner> {
        self.inner.clone()
    }
}

impl Inner {
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

fn revision_of(header: Option<&etcd_client::ResponseHeader>) -> Revision {
    header.map_or(0, |h| h.revision())
}

impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let resp = self
            .call("get", |mut c| async move { c.get(key, None).await })
            .await?;
        resp.kvs().first().map(convert).transpose()
    }

    async fn list(&self, prefix: &str) -> Result<Listing, StoreError> {
        list_prefix(&self.inner, prefix).await
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let resp = self
            .call("put", |mut c| {
                let value = value.clone();
                async move {
                    c.put(key, value, lease.map(|l| PutOptions::new().with_lease(l.0)))
                        .await
                }
            })
            .await?;
        Ok(revision_of(resp.header()))
    }

    async fn cas(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        guard: Option<&Leadership>,
    ) -> Result<CasOutcome, StoreError> {
        let txn = || {
            let mut compares = vec![match expect {
                Expect::Absent => Compare::create_revision(key, CompareOp::Equal, 0),
                Expect::ModRevision(rev) => Compare::mod_revision(key, CompareOp::Equal, rev),
            }];
            let mut on_failure = vec![TxnOp::get(key, None)];
            if let Some(g) = guard {
                compares.push(Compare::create_revision(
                    g.key.as_str(),
                    CompareOp::Equal,
                    g.revision,
                ));
                on_failure.push(TxnOp::get(g.key.as_str(), None));
            }
            etcd_client::Txn::new()
                .when(compares)
                .and_then(vec![TxnOp::put(key, value.clone(), None)])
                .or_else(on_failure)
        };
        let resp = self.call("cas", |mut c| {
            let txn = txn();
            async move { c.txn(txn).await }
        });
        let resp = resp.await?;
        if resp.succeeded() {
            return Ok(CasOutcome::Written(revision_of(resp.header())));
        }
        let mut gets = resp.op_responses().into_iter().filter_map(|op| match op {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let current = match gets.next() {
            Some(get) => get.kvs().first().map(convert).transpose()?,
            None => None,
        };
        if let Some(g) = guard {
            let held = gets.next().is_some_and(|get| {
                get.kvs()
                    .first()
                    .is_some_and(|kv| kv.create_revision() == g.revision)
            });
            if !held {
                return Ok(CasOutcome::NotLeader);
            }
        }
        Ok(CasOutcome::Conflict(current))
    }

    async fn delete(&self, key: &str) -> Result<bool, StoreError> {
        let resp = self
            .call("delete", |mut c| async move { c.delete(key, None).await })
            .await?;
        Ok(resp.deleted() > 0)
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<Watch, StoreError> {
        Ok(Watch::spawn(WatchSource {
            inner: self.inner(),
            prefix: prefix.to_owned(),
            from,
        }))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, StoreError> {
        let secs = i64::try_from(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0))
            .unwrap_or(i64::MAX)
            .max(1);
        let resp = self
            .call("lease grant", |mut c| async move {
                c.lease_grant(secs, None).await
            })
            .await?;
        if !resp.error().is_empty() {
            return Err(StoreError::Request {
                op: "lease grant",
                detail: resp.error().to_owned(),
            });
        }
        Ok(LeaseId(resp.id()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        // etcd-client sends one renewal when it opens the stream and fails if the lease is
        // gone; that single exchange is all a one-shot renewal needs.
        let result = self
            .call("lease keep-alive", |mut c| async move {
                c.lease_keep_alive(lease.0).await.map(|_| ())
            })
            .await;
        match result {
            Ok(()) => Ok(true),
            Err(StoreError::LeaseNotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self
            .call("lease revoke", |mut c| async move {
                c.lease_revoke(lease.0).await
            })
            .await
        {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn campaign(
        &self,
        name: &str,
        value: &str,
        lease: LeaseId,
    ) -> Result<Leadership, StoreError> {
        loop {
            let attempt = self
                .call("campaign", |c| async move {
                    c.election_client().campaign(name, value, lease.0).await
                })
                .await;
            match attempt {
                Ok(resp) => {
                    let leader = resp.leader().ok_or_else(|| StoreError::Request {
                        op: "campaign",
                        detail: "etcd returned no leader key".into(),
                    })?;
                    let key = leader
                        .key_str()
                        .map_err(|_| StoreError::NotUtf8 { what: "key" })?;
                    return Ok(Leadership {
                        name: name.to_owned(),
                        key: key.to_owned(),
                        revision: leader.rev(),
                        lease: LeaseId(leader.lease()),
                    });
                }
                // A campaign blocks until elected, longer than the request deadline, which
                // cancels it; it is renewed at once. etcd keeps the candidate's key, so its
                // place in the queue is not lost. A lost lease ends the campaign with an error.
                Err(StoreError::Unavailable { detail, .. })
                    if detail.contains("Timeout expired") =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn leader(&self, name: &str) -> Result<Option<String>, StoreError> {
        let result = self
            .call("leader", |c| async move {
                c.election_client().leader(name).await
            })
            .await;
        match result {
            Ok(resp) => match resp.kv() {
                Some(kv) => Ok(Some(
                    kv.value_str()
                        .map_err(|_| StoreError::NotUtf8 { what: "value" })?
                        .to_owned(),
                )),
                None => Ok(None),
            },
            Err(StoreError::Request { detail, .. }) if detail.contains("election: no leader") => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        // Resigning is deleting our key if it is still ours, as etcd's Resign RPC does.
        let key = leadership.key.as_str();
        let revision = leadership.revision;
        self.call("resign", |mut c| async move {
            let txn = etcd_client::Txn::new()
                .when(vec![Compare::create_revision(
                    key,
                    CompareOp::Equal,
                    revision,
                )])
                .and_then(vec![TxnOp::delete(key, None)]);
            c.txn(txn).await
        })
        .await?;
        Ok(())
    }
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
