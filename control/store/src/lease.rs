//! A lease kept alive in the background.

use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::{LeaseId, Store, StoreError};

/// The state of a [`KeptLease`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseState {
    /// Not granted yet (the store has not answered).
    Pending,
    /// Granted and last confirmed by etcd at `renewed_at`.
    Alive {
        /// The lease.
        id: LeaseId,
        /// When etcd last confirmed it. Past `renewed_at + ttl` it may have expired.
        renewed_at: Instant,
    },
}

/// Grants a lease and renews it every third of its TTL until dropped or revoked.
///
/// If the lease expires anyway (a store outage longer than the TTL), a new one is granted and
/// its id changes: the owner watches [`KeptLease::changed`] and writes its keys again under
/// the new lease.
#[derive(Debug)]
pub struct KeptLease {
    state: watch::Receiver<LeaseState>,
    ttl: Duration,
    task: JoinHandle<()>,
}

impl KeptLease {
    /// Starts keeping a lease of `ttl` on `store`. Returns at once; the first grant happens in
    /// the background (see [`KeptLease::wait_alive`]).
    pub fn start<S: Store>(store: S, ttl: Duration) -> KeptLease {
        let (tx, rx) = watch::channel(LeaseState::Pending);
        let task = tokio::spawn(keep(store, ttl, tx));
        KeptLease {
            state: rx,
            ttl,
            task,
        }
    }

    /// The TTL asked for.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The current state.
    pub fn state(&self) -> LeaseState {
        self.state.borrow().clone()
    }

    /// The lease id, if one is granted.
    pub fn id(&self) -> Option<LeaseId> {
        match *self.state.borrow() {
            LeaseState::Alive { id, .. } => Some(id),
            LeaseState::Pending => None,
        }
    }

    /// How long ago etcd last confirmed the lease; `None` if never.
    pub fn since_renewed(&self) -> Option<Duration> {
        match *self.state.borrow() {
            LeaseState::Alive { renewed_at, .. } => Some(renewed_at.elapsed()),
            LeaseState::Pending => None,
        }
    }

    /// Waits until a lease is granted and returns its id.
    pub async fn wait_alive(&mut self) -> LeaseId {
        loop {
            if let Some(id) = self.id() {
                return id;
            }
            if self.state.changed().await.is_err() {
                // The task never ends on its own; if it did, wait forever like a lost lease.
                std::future::pending::<()>().await;
            }
        }
    }

    /// Waits for the next state change (a renewal or a new lease).
    pub async fn changed(&mut self) {
        if self.state.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Stops renewing and revokes the lease, deleting the keys attached to it.
    pub async fn revoke<S: Store>(self, store: &S) -> Result<(), StoreError> {
        self.task.abort();
        match self.id() {
            Some(id) => store.revoke_lease(id).await,
            None => Ok(()),
        }
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn keep<S: Store>(store: S, ttl: Duration, tx: watch::Sender<LeaseState>) {
    let period = (ttl / 3).max(Duration::from_millis(100));
    let retry = (ttl / 10).max(Duration::from_millis(100));
    let mut current: Option<LeaseId> = None;
    loop {
        let outcome = match current {
            None => store.grant_lease(ttl).await.map(Some),
            Some(id) => match store.keep_alive(id).await {
                Ok(true) => Ok(Some(id)),
                Ok(false) | Err(StoreError::LeaseNotFound(_)) => {
                    tracing::warn!(lease = id.0, "lease expired, granting a new one");
                    Ok(None)
                }
                Err(e) => Err(e),
            },
        };
        match outcome {
            Ok(Some(id)) => {
                current = Some(id);
                tx.send_replace(LeaseState::Alive {
                    id,
                    renewed_at: Instant::now(),
                });
                tokio::time::sleep(period).await;
            }
            Ok(None) => current = None,
            Err(e) => {
                tracing::debug!(error = %e, "lease renewal failed, retrying");
                tokio::time::sleep(retry).await;
            }
        }
    }
}
