//! Following who leads an election.

use std::collections::BTreeMap;

use crate::{Revision, Store, StoreError, Watch, WatchEvent};

/// Follows an election: yields the leader's value each time it changes. The leader is the
/// candidate whose key under `<name>/` was created first, as etcd's election API defines it.
/// Built on a [`Watch`], so it survives disconnects and etcd restarts like one.
#[derive(Debug)]
pub struct LeaderObserver {
    prefix: String,
    watch: Watch,
    /// Candidate key → (create revision, value).
    candidates: BTreeMap<String, (Revision, String)>,
    current: Option<String>,
}

impl LeaderObserver {
    pub(crate) async fn start<S: Store>(
        store: &S,
        name: &str,
    ) -> Result<LeaderObserver, StoreError> {
        let prefix = format!("{name}/");
        let listing = store.list(&prefix).await?;
        let watch = store.watch(&prefix, listing.revision + 1).await?;
        let mut observer = LeaderObserver {
            prefix,
            watch,
            candidates: BTreeMap::new(),
            current: None,
        };
        observer.reset(listing.kvs);
        observer.current = observer.leader();
        Ok(observer)
    }

    /// The leader's value as last seen.
    pub fn current(&self) -> Option<&str> {
        self.current.as_deref()
    }

    /// Waits until the leader changes and returns the new one (`None`: no leader).
    pub async fn changed(&mut self) -> Option<String> {
        loop {
            let Some(event) = self.watch.next().await else {
                std::future::pending::<()>().await;
                continue;
            };
            match event {
                WatchEvent::Put(kv) => {
                    let value = String::from_utf8_lossy(&kv.value).into_owned();
                    self.candidates.insert(kv.key, (kv.create_revision, value));
                }
                WatchEvent::Delete { key, .. } => {
                    self.candidates.remove(&key);
                }
                WatchEvent::Reset { kvs, .. } => self.reset(kvs),
                WatchEvent::Interrupted { .. } | WatchEvent::Resumed { .. } => continue,
            }
            let leader = self.leader();
            if leader != self.current {
                self.current.clone_from(&leader);
                return leader;
            }
        }
    }

    fn reset(&mut self, kvs: Vec<crate::KeyValue>) {
        self.candidates = kvs
            .into_iter()
            .filter(|kv| kv.key.starts_with(&self.prefix))
            .map(|kv| {
                let value = String::from_utf8_lossy(&kv.value).into_owned();
                (kv.key, (kv.create_revision, value))
            })
            .collect();
    }

    fn leader(&self) -> Option<String> {
        self.candidates
            .values()
            .min_by_key(|(rev, _)| *rev)
            .map(|(_, value)| value.clone())
    }
}
