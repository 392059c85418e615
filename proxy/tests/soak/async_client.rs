//! The soak's asynchronous client: tokio-postgres on a tokio runtime, the way Rust services
//! connect. Its socket is registered edge-triggered and a read shorter than its buffer is
//! taken to mean the socket is empty, so a path that leaves bytes where such a read does not
//! reach them hangs it (the blocking clients beside it would not notice). It asks for results
//! of random sizes, some consumed slowly (tokio-postgres then stops reading its socket), and
//! checks each: every row, in order.

use std::time::{Duration, Instant};

use futures_util::StreamExt;

use crate::clients::{Run, SLACK};
use crate::nemesis::{HELD, Rng};

/// How long a result of up to 61,000 rows (about 4 MB) takes on a direct connection here,
/// with room (tokio-postgres unoptimised in tests, two cores shared by every client).
const EXPECTED: Duration = Duration::from_secs(2);

/// Loops until the run ends: connect, a few results, again after any fault.
pub fn async_client(run: &Run, mut rng: Rng) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    while run.going() {
        rt.block_on(session(run, &mut rng));
    }
}

async fn session(run: &Run, rng: &mut Rng) {
    let conninfo = format!(
        "host=127.0.0.1 port={} user=postgres dbname=postgres application_name={} connect_timeout=10",
        run.addr.port(),
        crate::clients::APPLICATION
    );
    let since = Instant::now();
    let limit = HELD + SLACK + EXPECTED;
    let client = match tokio::time::timeout(
        limit,
        tokio_postgres::connect(&conninfo, tokio_postgres::NoTls),
    )
    .await
    {
        Ok(Ok((client, conn))) => {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            client
        }
        // Refused or ended by a fault: connect again.
        Ok(Err(_)) => {
            run.report.count("async connect refused");
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        Err(_) => {
            run.report.fail(format!(
                "async client: no connection within {:?}",
                since.elapsed()
            ));
            return;
        }
    };
    for _ in 0..1 + rng.below(4) {
        if !run.going() {
            return;
        }
        let rows = 1_000 + rng.below(60_000) as i64;
        let slow = rng.below(2) == 0;
        let what = format!(
            "async client: {rows} rows{}",
            if slow { " read slowly" } else { "" }
        );
        let since = Instant::now();
        let pauses = if slow { 4 } else { 0 };
        let expected = EXPECTED + Duration::from_millis(20) * pauses;
        match tokio::time::timeout(expected + SLACK, result(&client, rows, slow)).await {
            Ok(Ok((n, sum))) => {
                run.report.took(&what, since.elapsed(), expected);
                run.report.count("async result");
                let want = rows * (rows + 1) / 2;
                if n != rows || sum != want {
                    run.report.fail(format!(
                        "{what}: got {n} rows summing to {sum}, expected {rows} summing to {want}"
                    ));
                }
            }
            // A fault ended the session: connect again.
            Ok(Err(_)) => {
                run.report.count("async result ended by a fault");
                return;
            }
            Err(_) => {
                run.report.fail(format!(
                    "{what}: no result within {:?} (expected {expected:?})",
                    since.elapsed()
                ));
                return;
            }
        }
    }
}

/// Rows `1..=rows` and their sum; `slow`: taken with pauses, so the client stops reading.
async fn result(
    client: &tokio_postgres::Client,
    rows: i64,
    slow: bool,
) -> Result<(i64, i64), tokio_postgres::Error> {
    let sql = format!("select g, repeat('x', 40) from generate_series(1, {rows}::bigint) g");
    let params: [i64; 0] = [];
    let stream = client.query_raw(sql.as_str(), params).await?;
    let mut stream = std::pin::pin!(stream);
    let (mut n, mut sum, mut last) = (0i64, 0i64, 0i64);
    while let Some(row) = stream.next().await {
        let g: i64 = row?.get(0);
        // In order, none twice, none missing.
        if g != last + 1 {
            return Ok((-1, g));
        }
        last = g;
        n += 1;
        sum += g;
        if slow && n % (rows / 4).max(1) == 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok((n, sum))
}
