//! What the old master's keeper does while a planned switchover drains it: it ends each
//! client session once that session is idle between transactions, so persistent
//! connections (a pool's) close at a moment when no transaction of theirs can fail, and the
//! proxies' drain ends as soon as the last transaction in flight has committed.
//!
//! Why the keeper and not the proxy: a proxy forwarding TLS cannot see where a transaction
//! ends (the ReadyForQuery status is encrypted), while PostgreSQL knows each session's state
//! exactly (`pg_stat_activity.state`).
//!
//! Which idle sessions end, and when ([`Idle`]): a session is ended just after it finishes
//! a transaction (idle for 20 to 50 ms), which leaves its application the longest
//! time before its next request to notice the close: a pool that checks its connections
//! before use (or reads them, as asynchronous drivers do) opens a new one, which the proxies
//! hold until the new master is routable. A session found in the middle of a pause is left
//! until its next transaction ends (ending it then could cross the request its application
//! is about to send), unless it has been idle so long that it is not in use. A session that
//! has not run a query yet is about to: it is ended only once it looks unused. Sessions busy
//! for the whole drain are cut by the proxies when their `--switchover-grace` ends, as
//! before, and whatever is left ends with the shutdown that follows.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_postgres::Client;

/// Which idle sessions are ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idle {
    /// Idle for at least this long: not between two statements sent back to back, nor
    /// between the two round trips of a statement some drivers send in two (tokio-postgres
    /// prepares it first: the session is idle in between, its query already shown).
    pub quiet: Duration,
    /// ... and for less than `quiet + fresh`: just finished a transaction.
    pub fresh: Duration,
    /// Or idle for this long: not in use.
    pub unused: Duration,
}

/// What the keeper ends while a switchover drains its master. `fresh` spans several
/// [`PERIOD`]s, so a scan late by a few milliseconds still finds a session in its window.
pub const IDLE: Idle = Idle {
    quiet: Duration::from_millis(20),
    fresh: Duration::from_millis(30),
    unused: Duration::from_millis(500),
};

/// How often the sessions are looked at.
pub const PERIOD: Duration = Duration::from_millis(5);

/// Ends the client sessions `idle` selects, except the keeper's own; returns how many.
/// Replication connections are not client backends and are never touched: the standbys
/// must receive everything up to the shutdown checkpoint. Clients connected straight to the
/// master (not through a proxy) are ended alike: the master is about to stop. The states
/// are read once per scan, so a session that starts a transaction in the microseconds
/// between the read and its termination is ended in it.
pub async fn end_idle_sessions(client: &Client, idle: &Idle) -> Result<i64, String> {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM ( \
               SELECT pid, query, clock_timestamp() - state_change AS idle \
               FROM pg_stat_activity \
               WHERE backend_type = 'client backend' AND state = 'idle' \
                 AND pid <> pg_backend_pid() \
                 AND application_name IS DISTINCT FROM 'tendril-keeper') s \
             WHERE (query <> '' AND idle >= make_interval(secs => $1::float8) \
                    AND idle < make_interval(secs => $1::float8 + $2::float8)) \
                OR idle >= make_interval(secs => $3::float8)",
            &[
                &idle.quiet.as_secs_f64(),
                &idle.fresh.as_secs_f64(),
                &idle.unused.as_secs_f64(),
            ],
        )
        .await
        .map_err(|e| crate::sql::describe(&e))?;
    Ok(row.get(0))
}

/// The running task that ends idle sessions until dropped (or `limit` passed: a switchover
/// that takes longer is abandoned by the sentinel anyway).
#[derive(Debug)]
pub struct IdleSessionCloser {
    task: JoinHandle<()>,
    ended: Arc<AtomicI64>,
}

impl IdleSessionCloser {
    /// Starts ending `client`'s server's idle sessions every [`PERIOD`].
    pub fn start(client: Client, limit: Duration) -> IdleSessionCloser {
        let ended = Arc::new(AtomicI64::new(0));
        let count = ended.clone();
        let task = tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + limit;
            while tokio::time::Instant::now() < deadline {
                match end_idle_sessions(&client, &IDLE).await {
                    Ok(n) if n > 0 => {
                        count.fetch_add(n, Ordering::Relaxed);
                        tracing::debug!(sessions = n, "switchover: ended idle sessions");
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "switchover: cannot end idle sessions");
                        return;
                    }
                }
                tokio::time::sleep(PERIOD).await;
            }
        });
        tracing::info!("switchover: ending client sessions as they go idle");
        IdleSessionCloser { task, ended }
    }
}

impl IdleSessionCloser {
    /// Whether the task ended by itself (its query failed, or its time ran out).
    pub fn stopped(&self) -> bool {
        self.task.is_finished()
    }
}

impl Drop for IdleSessionCloser {
    fn drop(&mut self) {
        self.task.abort();
        tracing::info!(
            sessions = self.ended.load(Ordering::Relaxed),
            "switchover: stopped ending idle sessions"
        );
    }
}
