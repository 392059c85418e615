//! Client loops and process waits shared by the rollout and read-only listener tests.

use std::time::Duration;

use super::{ProxyProc, connect};

/// Connects and asks once, `n` times; the failures, each with how it failed.
pub async fn clients(port: u16, n: usize) -> Vec<String> {
    let mut failed = Vec::new();
    for i in 0..n {
        // A server's error with its message (the Display of tokio-postgres says "db error").
        let said = |e: tokio_postgres::Error| {
            e.as_db_error()
                .map_or_else(|| e.to_string(), |d| d.message().to_owned())
        };
        let attempt = async {
            let c = connect(port).await.map_err(said)?;
            c.simple_query("select 1").await.map_err(said)?;
            Ok::<_, String>(())
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failed.push(format!("client {i}: {e}")),
            Err(_) => failed.push(format!("client {i}: no answer within 5 s")),
        }
    }
    failed
}

/// New connections (one `select 1` each) in a few tasks until [`ConnectLoops::finish`].
pub struct ConnectLoops {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>,
}

impl ConnectLoops {
    pub fn start(port: u16, loops: usize) -> ConnectLoops {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let tasks = (0..loops)
            .map(|_| {
                let stop = stop.clone();
                tokio::spawn(async move {
                    let (mut ok, mut failed) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let f = clients(port, 1).await;
                        ok += usize::from(f.is_empty());
                        failed.extend(f);
                    }
                    (ok, failed)
                })
            })
            .collect();
        ConnectLoops { stop, tasks }
    }

    /// Stops the loops; fails unless every connect succeeded and more than `least` did.
    pub async fn finish(self, least: usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut ok, mut failed) = (0, Vec::new());
        for t in self.tasks {
            let (o, f) = t.await.unwrap();
            ok += o;
            failed.extend(f);
        }
        assert!(
            failed.is_empty(),
            "{} connects failed: {failed:?}",
            failed.len()
        );
        assert!(ok > least, "only {ok} connects in the loops");
    }
}

pub async fn wait_log(p: &ProxyProc, what: &str, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while !p.log_text().contains(what) {
        assert!(
            std::time::Instant::now() < deadline,
            "proxy {} did not log {what:?}:\n{}",
            p.uid,
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `new` took over from the proxy it replaces (it logged so).
pub async fn wait_took_over(new: &ProxyProc) {
    wait_log(
        new,
        "took over: the old proxy stopped accepting",
        Duration::from_secs(10),
    )
    .await;
}

/// Waits until `new` took over from `old`: it logged so, and `old` logged `old_says`.
pub async fn wait_handover(new: &ProxyProc, old: &ProxyProc, old_says: &str) {
    wait_took_over(new).await;
    wait_log(old, old_says, Duration::from_secs(10)).await;
}

pub async fn wait_exit(p: &mut ProxyProc, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "proxy {} did not exit:\n{}",
            p.uid,
            p.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
