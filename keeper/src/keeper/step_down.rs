//! A master's keeper asked to stop (SIGTERM: a Kubernetes pod deleted, a host shut down)
//! with `--switchover-on-stop`: it asks for a planned switchover first and keeps converging
//! (stopping PostgreSQL when the sentinel says so, reporting) until another keeper runs the
//! master or the deadline passes. Clients then see a switchover (new connections held, no
//! transaction failed) rather than a failover after `fail_interval`.

use std::time::{Duration, Instant, SystemTime};

use tendril_control_model::{ClusterData, DbRole, decode, encode};
use tendril_control_store::{CasOutcome, Expect, Store};

use super::Keeper;
use crate::KeeperError;

impl<S: Store> Keeper<S> {
    /// Switches the master away from this keeper before it stops, within `limit`.
    pub(super) async fn step_down(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        match self.request_switchover().await {
            Ok(Some(old)) => {
                tracing::info!(keeper = %self.uid, db = %old, "stopping: asked for a switchover away from this master first");
            }
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(keeper = %self.uid, error = %e, "stopping: cannot ask for a switchover; stopping the master as it is");
                return;
            }
        }
        while Instant::now() < deadline {
            let pass = self.pass().await;
            self.observe_and_report(pass.err().map(|e| e.to_string()))
                .await;
            if let Ok(Some(kv)) = self.store.get(&self.config.keys.cluster_data()).await
                && let Ok(cd) = decode::<ClusterData>(&kv.value)
            {
                let mine = cd
                    .master_db()
                    .is_some_and(|m| m.spec.keeper_uid == self.uid);
                if !mine && cd.proxy.master.is_some() {
                    tracing::info!(keeper = %self.uid, "stopping: another keeper runs the master");
                    return;
                }
                if mine && cd.switchover.is_none() {
                    tracing::warn!(keeper = %self.uid, "stopping: the switchover was abandoned; stopping the master as it is");
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::warn!(keeper = %self.uid, ?limit, "stopping: the switchover did not finish in time");
    }

    /// Writes a switchover request when this keeper runs the master and a healthy standby
    /// exists; `None` when there is nothing to switch to (or one is already under way).
    async fn request_switchover(&self) -> Result<Option<String>, KeeperError> {
        let key = self.config.keys.cluster_data();
        for _ in 0..5 {
            let Some(kv) = self.store.get(&key).await? else {
                return Ok(None);
            };
            let mut cd: ClusterData = decode(&kv.value)?;
            let mine = cd
                .master_db()
                .is_some_and(|m| m.spec.keeper_uid == self.uid);
            let standby = cd.dbs.values().any(|d| {
                d.spec.role == DbRole::Standby
                    && d.status.healthy
                    && cd
                        .keepers
                        .get(&d.spec.keeper_uid)
                        .is_some_and(|k| k.status.healthy)
            });
            if !mine || !standby {
                return Ok(None);
            }
            let Ok(old) = cd.request_switchover(None, SystemTime::now()) else {
                return Ok(None);
            };
            cd.generation = cd.generation.next();
            cd.change_time = SystemTime::now();
            match self
                .store
                .cas(
                    &key,
                    encode(&cd),
                    Expect::ModRevision(kv.mod_revision),
                    None,
                )
                .await?
            {
                CasOutcome::Written(_) => return Ok(Some(old)),
                CasOutcome::Conflict(_) | CasOutcome::NotLeader => continue,
            }
        }
        Ok(None)
    }
}
