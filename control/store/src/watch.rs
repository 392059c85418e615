//! Prefix watches that survive disconnects, etcd restarts and compaction.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::{Inner, convert, list_prefix};
use crate::{KeyValue, Revision};

/// One change seen by a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    /// A key was created or updated.
    Put(KeyValue),
    /// A key was deleted (or its lease expired).
    Delete {
        /// The key.
        key: String,
        /// Revision of the deletion.
        revision: Revision,
    },
    /// The revisions the watch needed were compacted away: this is the whole prefix, read at
    /// `revision`. Replace all state built from earlier events with it.
    Reset {
        /// Every key under the prefix.
        kvs: Vec<KeyValue>,
        /// The revision they were read at.
        revision: Revision,
    },
    /// The connection to etcd broke; the watch is resuming from the next revision. Nothing is
    /// lost, but the consumer may want to know its view could be stale.
    Interrupted {
        /// What went wrong.
        error: String,
    },
    /// The watch is connected again after an interruption.
    Resumed {
        /// The revision it resumes from.
        from: Revision,
    },
}

/// A running watch. Dropping it stops the background task.
#[derive(Debug)]
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    task: JoinHandle<()>,
}

pub(crate) struct WatchSource {
    pub(crate) inner: Arc<Inner>,
    pub(crate) prefix: String,
    pub(crate) from: Revision,
}

impl Watch {
    pub(crate) fn spawn(source: WatchSource) -> Watch {
        let (tx, rx) = mpsc::channel(256);
        let task = tokio::spawn(run(source, tx));
        Watch { rx, task }
    }

    /// The next event; `None` only if the background task ended (it never does by itself).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        self.rx.recv().await
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Why one watch stream ended.
enum StreamEnd {
    /// The consumer went away.
    Closed,
    /// A transport or server error; resume from `next`.
    Broken(String),
    /// The start revision was compacted.
    Compacted,
}

async fn run(source: WatchSource, tx: mpsc::Sender<WatchEvent>) {
    let mut next = source.from;
    let mut backoff = RETRY_MIN;
    let mut interrupted = false;
    loop {
        match stream_once(&source, &tx, &mut next, &mut interrupted).await {
            StreamEnd::Closed => return,
            StreamEnd::Compacted => match list_prefix(&source.inner, &source.prefix).await {
                Ok(listing) => {
                    tracing::warn!(
                        prefix = %source.prefix,
                        wanted = next,
                        revision = listing.revision,
                        "watch revision compacted, re-read the whole prefix"
                    );
                    next = listing.revision + 1;
                    let reset = WatchEvent::Reset {
                        kvs: listing.kvs,
                        revision: listing.revision,
                    };
                    if tx.send(reset).await.is_err() {
                        return;
                    }
                    backoff = RETRY_MIN;
                }
                Err(e) => {
                    if !report(&tx, &mut interrupted, e.to_string()).await {
                        return;
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            },
            StreamEnd::Broken(error) => {
                tracing::debug!(prefix = %source.prefix, next, %error, "watch stream broke, resuming");
                if !report(&tx, &mut interrupted, error).await {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

/// Sends one `Interrupted` per outage; false when the consumer is gone.
async fn report(tx: &mpsc::Sender<WatchEvent>, interrupted: &mut bool, error: String) -> bool {
    if *interrupted {
        return !tx.is_closed();
    }
    *interrupted = true;
    tx.send(WatchEvent::Interrupted { error }).await.is_ok()
}

async fn stream_once(
    source: &WatchSource,
    tx: &mpsc::Sender<WatchEvent>,
    next: &mut Revision,
    interrupted: &mut bool,
) -> StreamEnd {
    let mut options = WatchOptions::new().with_prefix().with_progress_notify();
    if *next > 0 {
        options = options.with_start_revision(*next);
    }
    let prefix = source.prefix.as_str();
    let created = source
        .inner
        .call("watch", |mut c| {
            let options = options.clone();
            async move { c.watch(prefix, Some(options)).await }
        })
        .await;
    let mut stream = match created {
        Ok(stream) => stream,
        Err(e) => return StreamEnd::Broken(e.to_string()),
    };
    loop {
        let resp = tokio::select! {
            resp = stream.message() => resp,
            () = tx.closed() => return StreamEnd::Closed,
        };
        let resp = match resp {
            Ok(Some(resp)) => resp,
            Ok(None) => return StreamEnd::Broken("watch stream ended".into()),
            Err(e) => return StreamEnd::Broken(e.to_string()),
        };
        if resp.compact_revision() > 0 {
            return StreamEnd::Compacted;
        }
        if resp.canceled() {
            return StreamEnd::Broken(format!("watch canceled by etcd: {}", resp.cancel_reason()));
        }
        if resp.created() {
            // The stream is established: from here on events flow again. When starting "now"
            // (no revision yet), pin the position so a later resume does not skip anything.
            if *next <= 0 {
                *next = resp.header().map_or(0, |h| h.revision()) + 1;
            }
            if std::mem::take(interrupted)
                && tx.send(WatchEvent::Resumed { from: *next }).await.is_err()
            {
                return StreamEnd::Closed;
            }
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let revision = kv.mod_revision();
            let out = match event.event_type() {
                EventType::Put => match convert(kv) {
                    Ok(kv) => WatchEvent::Put(kv),
                    Err(e) => {
                        tracing::warn!(error = %e, "skipping a watched key that is not UTF-8");
                        *next = revision + 1;
                        continue;
                    }
                },
                EventType::Delete => WatchEvent::Delete {
                    key: String::from_utf8_lossy(kv.key()).into_owned(),
                    revision,
                },
            };
            // Advance only after the event is handed over, so a resume re-delivers nothing
            // twice and skips nothing.
            if tx.send(out).await.is_err() {
                return StreamEnd::Closed;
            }
            *next = revision + 1;
        }
    }
}
