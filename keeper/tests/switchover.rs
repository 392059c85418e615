//! What the old master's keeper ends while a planned switchover drains it
//! (`tendril_keeper::switchover`): sessions that just finished a transaction, and sessions
//! idle so long they are unused; nothing else — not a session in the middle of a pause, not
//! one that has not run its first query yet, not one inside a transaction, not one running
//! a statement, not the caller's own.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::time::{Duration, Instant};

use tendril_keeper::switchover::{Idle, end_idle_sessions};
use tendril_testkit::PgServer;
use tokio_postgres::{Client, NoTls};

async fn connect(pg: &PgServer) -> Client {
    let (client, conn) = tokio_postgres::connect(&pg.conninfo(), NoTls)
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

async fn wait_closed(client: &Client, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !client.is_closed() {
        assert!(Instant::now() < deadline, "{what} was not closed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_sessions_idle_between_transactions_are_ended() {
    let pg = PgServer::start();
    let keeper = connect(&pg).await;
    let paused = connect(&pg).await;
    paused.simple_query("SELECT 1").await.unwrap();
    let never_queried = connect(&pg).await;
    let in_transaction = connect(&pg).await;
    in_transaction
        .batch_execute("BEGIN; CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let busy = connect(&pg).await;
    let running =
        tokio::spawn(async move { busy.simple_query("SELECT pg_sleep(3)").await.map(|_| ()) });
    let start = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Everything idle is in the middle of a pause (idle for 500 ms, more than 5 + 20 ms),
    // and not unused for an hour: nothing ends.
    let mid_pause = Idle {
        quiet: Duration::from_millis(5),
        fresh: Duration::from_millis(20),
        unused: HOUR,
    };
    assert_eq!(end_idle_sessions(&keeper, &mid_pause).await.unwrap(), 0);

    // A transaction just finished (idle for 50 ms, within 10 + 200 ms): that session ends,
    // but not the one that never ran a query, idle as long.
    let finished = connect(&pg).await;
    let not_yet = connect(&pg).await;
    finished.simple_query("SELECT 1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let just_finished = Idle {
        quiet: Duration::from_millis(10),
        fresh: Duration::from_millis(200),
        unused: HOUR,
    };
    assert_eq!(end_idle_sessions(&keeper, &just_finished).await.unwrap(), 1);
    wait_closed(&finished, "the session that just finished a transaction").await;
    assert!(!not_yet.is_closed() && !paused.is_closed());

    // Unused for 1 s: the paused session and the one that never ran a query end (idle for
    // 1.25 s), not the one connected 0.5 s later.
    tokio::time::sleep(Duration::from_millis(1250).saturating_sub(start.elapsed())).await;
    let unused = Idle {
        quiet: HOUR,
        fresh: HOUR,
        unused: Duration::from_secs(1),
    };
    assert_eq!(end_idle_sessions(&keeper, &unused).await.unwrap(), 2);
    wait_closed(&paused, "the paused session").await;
    wait_closed(&never_queried, "the session that never ran a query").await;
    assert!(!not_yet.is_closed(), "idle for less than 1 s");

    assert!(!keeper.is_closed(), "the caller's own session goes on");
    running
        .await
        .unwrap()
        .expect("the running statement finishes");
    in_transaction
        .batch_execute("COMMIT")
        .await
        .expect("the open transaction commits");
    let rows = keeper
        .query_one("SELECT count(*) FROM t", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), 1);
}
