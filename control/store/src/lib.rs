//! The store: the one place tendril keeps authoritative state.
//!
//! [`Store`] is the interface every component programs against: get, put, compare-and-swap on
//! a key's mod revision (optionally guarded by the caller still holding leadership), delete,
//! prefix listing, prefix watches, leases and leader election. [`EtcdStore`] implements it on
//! etcd v3, the only backend meant for production.
//!
//! Two properties matter more than the rest:
//! - A [`Watch`] never silently loses an event. It resumes from the revision after the last
//!   one delivered when the connection drops or etcd restarts, and when that revision has been
//!   compacted away it re-reads the whole prefix and delivers it as one [`WatchEvent::Reset`],
//!   so the consumer rebuilds its state instead of crashing or drifting.
//! - Every error says which endpoints were tried when none of them answers.
//!
//! [`KeptLease`] keeps a lease alive in the background and tells its owner how long ago it
//! was last confirmed, which is what a proxy needs to fence itself before the lease can expire.
#![forbid(unsafe_code)]

mod client;
mod config;
mod error;
mod etcd;
mod lease;
mod observe;
mod watch;

use std::future::Future;
use std::time::Duration;

pub use config::{StoreArgs, StoreConfig, TlsFiles};
pub use error::StoreError;
pub use etcd::EtcdStore;
pub use lease::{KeptLease, LeaseState};
pub use observe::LeaderObserver;
pub use watch::{Watch, WatchEvent};

/// An etcd revision: the store-wide version counter.
pub type Revision = i64;

/// A lease id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeaseId(pub i64);

/// A key and its value with the store's bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// Revision of the last write of this key; the token for compare-and-swap.
    pub mod_revision: Revision,
    /// Revision at which the key was created.
    pub create_revision: Revision,
    /// The lease the key is attached to.
    pub lease: Option<LeaseId>,
}

/// Keys under a prefix, read at one revision.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// The keys, sorted.
    pub kvs: Vec<KeyValue>,
    /// The store revision the listing was read at; watch from `revision + 1` to follow it.
    pub revision: Revision,
}

/// What a compare-and-swap expects to find.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// The key must not exist.
    Absent,
    /// The key must exist with this mod revision.
    ModRevision(Revision),
}

/// The result of a compare-and-swap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CasOutcome {
    /// Written at this revision.
    Written(Revision),
    /// The key did not match the expectation; this is what it holds now.
    Conflict(Option<KeyValue>),
    /// The guard failed: the caller no longer holds the leadership it presented.
    NotLeader,
}

/// Proof of leadership returned by [`Store::campaign`]. While the leader's lease lives, its key
/// exists with this create revision; writes guarded by it fail once it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// The election name.
    pub name: String,
    /// The leader's key in the election.
    pub key: String,
    /// Create revision of that key.
    pub revision: Revision,
    /// The lease the leadership is tied to.
    pub lease: LeaseId,
}

/// The store interface. Implementations are cheap to clone and share one connection.
pub trait Store: Clone + Send + Sync + 'static {
    /// Reads one key.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, StoreError>> + Send;

    /// Reads every key under `prefix`.
    fn list(&self, prefix: &str) -> impl Future<Output = Result<Listing, StoreError>> + Send;

    /// Writes a key unconditionally, attached to `lease` if given. Returns the new revision.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<Revision, StoreError>> + Send;

    /// Writes a key only if it matches `expect` and, with `guard`, only while that leadership
    /// is still held.
    fn cas(
        &self,
        key: &str,
        value: Vec<u8>,
        expect: Expect,
        guard: Option<&Leadership>,
    ) -> impl Future<Output = Result<CasOutcome, StoreError>> + Send;

    /// Deletes a key; true if it existed.
    fn delete(&self, key: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Follows every change under `prefix` from revision `from` (inclusive).
    fn watch(
        &self,
        prefix: &str,
        from: Revision,
    ) -> impl Future<Output = Result<Watch, StoreError>> + Send;

    /// Grants a lease of `ttl` (rounded up to whole seconds, at least one).
    fn grant_lease(
        &self,
        ttl: Duration,
    ) -> impl Future<Output = Result<LeaseId, StoreError>> + Send;

    /// Renews a lease once. `Ok(false)` means it has already expired.
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Revokes a lease, deleting every key attached to it.
    fn revoke_lease(&self, lease: LeaseId) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Campaigns in election `name` with `value`, tied to `lease`; returns once elected.
    fn campaign(
        &self,
        name: &str,
        value: &str,
        lease: LeaseId,
    ) -> impl Future<Output = Result<Leadership, StoreError>> + Send;

    /// The current leader's value in election `name`, if any.
    fn leader(&self, name: &str)
    -> impl Future<Output = Result<Option<String>, StoreError>> + Send;

    /// Gives up leadership (the next candidate is elected at once).
    fn resign(
        &self,
        leadership: &Leadership,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Follows election `name`: the current leader, then every change of leader.
    fn observe(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<LeaderObserver, StoreError>> + Send {
        LeaderObserver::start(self, name)
    }

    /// Whether `leadership` is still held (its key still exists with the same create revision).
    fn is_leader(
        &self,
        leadership: &Leadership,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send {
        async move {
            Ok(self
                .get(&leadership.key)
                .await?
                .is_some_and(|kv| kv.create_revision == leadership.revision))
        }
    }
}
