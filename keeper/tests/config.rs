//! Generated configuration: parameters reloaded or restarted as the spec allows, ALTER SYSTEM
//! neutralised, additional slots kept, an existing data dir adopted, a foreign data dir
//! refused.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use support::{Env, change, db, params, wait_count};
use tendril_control_model::{ClusterSpec, DbInitMode, DbRole};

async fn show(client: &tokio_postgres::Client, name: &str) -> String {
    client
        .query_one(&format!("SHOW {name}"), &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parameters_restarts_alter_system_slots_and_adoption() {
    let env = Env::new().await;
    let mut k0 = env.keeper("k0");
    let spec = ClusterSpec::default();
    let mut cd = env.new_cluster(spec.clone());
    env.write(&mut cd).await;
    env.sync_statuses(&mut cd, &["k0"]).await;
    let mut db0 = db("db0", "k0", DbRole::Master, DbInitMode::New, None, &spec);
    db0.spec.include_previous_config = true;
    cd.dbs.insert("db0".into(), db0.clone());
    cd.master = Some("db0".into());
    env.write(&mut cd).await;
    let info = env.wait_converged("k0", &db0, false).await;
    // initdb's own settings are kept and reported.
    let reported = info.postgres_state.unwrap().pg_parameters;
    assert_eq!(
        reported.get("max_connections").map(String::as_str),
        Some("100"),
        "{reported:?}"
    );

    // A reloadable parameter applies without a restart.
    let pid = k0.postmaster_pid().unwrap();
    change(&mut cd, "db0", |s| {
        s.pg_parameters = params(&[("work_mem", "7MB")])
    });
    env.write(&mut cd).await;
    env.wait_converged("k0", &cd.dbs["db0"].clone(), false)
        .await;
    let client = k0.sql().await;
    wait_until(|| async { show(&client, "work_mem").await == "7MB" }).await;
    assert_eq!(
        k0.postmaster_pid(),
        Some(pid),
        "a reload must not restart postgres"
    );

    // One that needs a restart waits for it while automatic restarts are off...
    change(&mut cd, "db0", |s| {
        s.pg_parameters = params(&[("work_mem", "7MB"), ("max_connections", "42")])
    });
    env.write(&mut cd).await;
    env.wait_info(
        "k0",
        "pending restart reported",
        Duration::from_secs(30),
        |i| i.postgres_state.as_ref().is_some_and(|s| s.pending_restart),
    )
    .await;
    assert_eq!(show(&client, "max_connections").await, "100");
    assert_eq!(k0.postmaster_pid(), Some(pid));
    // ...and happens once they are allowed.
    cd.spec.automatic_pg_restart = true;
    env.write(&mut cd).await;
    env.wait_info(
        "k0",
        "restarted with the new value",
        Duration::from_secs(60),
        |i| {
            i.postgres_state
                .as_ref()
                .is_some_and(|s| !s.pending_restart && s.healthy)
        },
    )
    .await;
    let client = k0.sql().await;
    assert_eq!(show(&client, "max_connections").await, "42");
    assert_ne!(k0.postmaster_pid(), Some(pid));

    // ALTER SYSTEM cannot override the spec.
    let err = client
        .batch_execute("ALTER SYSTEM SET work_mem = '1GB'")
        .await;
    assert!(err.is_err(), "ALTER SYSTEM must fail");

    // Additional slots are created and kept; a manual slot is left alone; a stray managed one
    // goes.
    client
        .batch_execute(
            "SELECT pg_create_physical_replication_slot('manual_slot'); \
             SELECT pg_create_physical_replication_slot('tendril_stray')",
        )
        .await
        .unwrap();
    change(&mut cd, "db0", |s| {
        s.additional_replication_slots = vec!["backup_a".into()]
    });
    env.write(&mut cd).await;
    env.wait_converged("k0", &cd.dbs["db0"].clone(), false)
        .await;
    wait_count(
        k0.port,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name IN ('backup_a', 'manual_slot')",
        2,
        Duration::from_secs(10),
    )
    .await;
    wait_count(
        k0.port,
        "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'tendril_stray'",
        0,
        Duration::from_secs(10),
    )
    .await;
    client
        .batch_execute("CREATE TABLE t (id int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    drop(client);

    // A cluster data that expects another PostgreSQL cluster: postgres is stopped, not used.
    env.sync_statuses(&mut cd, &["k0"]).await;
    let real_system_id = cd.dbs["db0"].status.system_id.clone().unwrap();
    cd.dbs.get_mut("db0").unwrap().status.system_id = Some("1234567890".into());
    env.write(&mut cd).await;
    env.wait_info(
        "k0",
        "the mismatch reported",
        Duration::from_secs(30),
        |i| {
            i.last_error
                .as_deref()
                .is_some_and(|e| e.contains("system identifier mismatch"))
                && i.postgres_state.as_ref().is_some_and(|s| !s.running)
        },
    )
    .await;
    cd.dbs.get_mut("db0").unwrap().status.system_id = Some(real_system_id);

    // Adopt the existing data directory under a new database uid (init mode existing).
    k0.stop();
    k0.start();
    cd.dbs.remove("db0");
    env.sync_statuses(&mut cd, &["k0"]).await;
    let existing = db(
        "db5",
        "k0",
        DbRole::Master,
        DbInitMode::Existing,
        None,
        &spec,
    );
    cd.dbs.insert("db5".into(), existing.clone());
    cd.master = Some("db5".into());
    env.write(&mut cd).await;
    env.wait_converged("k0", &existing, false).await;
    wait_count(
        k0.port,
        "SELECT count(*) FROM t",
        1,
        Duration::from_secs(10),
    )
    .await;
}

async fn wait_until<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..100 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("condition not reached in 10 s");
}
