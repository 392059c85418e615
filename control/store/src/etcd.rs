//! The etcd v3 backend: the [`Store`] operations on top of the shared connection
//! ([`crate::client`]) and the watch ([`crate::watch`]).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, PutOptions, TxnOp, TxnOpResponse};

use crate::client::{Inner, convert, list_prefix};
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
        Ok(EtcdStore {
            inner: Arc::new(Inner::connect(config).await?),
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
