//! Standby clusters: cluster B follows cluster A (an external primary, reached through A's
//! proxy), both in one etcd under different names. Rows written on A reach B's standby
//! leader and B's standby; B refuses writes. B's leader killed: B elects a new leader that
//! keeps following A, on A's timeline, and the old one rejoins as its standby. A failed over:
//! B follows A's new master across the timeline switch without re-initialising. `tendrilctl
//! promote` on B: B accepts writes and holds every row A acknowledged before; A is untouched.
//! A running standby of a plain PostgreSQL adopted with `init_mode: existing` stays a
//! standby. A standby cluster restored from a pgBackRest backup (`init_mode: pitr`) then
//! streams from its primary.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tendril_control_model::FollowConfig;
use tendril_e2e::{Cluster, Options, REPL_PASSWORD, SU_PASSWORD, connect, tuned_spec};
use tendril_testkit::{PG_BIN, PgServer};
use tokio_postgres::error::SqlState;

/// A master's current timeline, from the name of its current WAL file.
const TIMELINE: &str =
    "SELECT ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::bigint";
/// The timeline a standby receives.
const RECEIVED_TIMELINE: &str =
    "SELECT coalesce((SELECT received_tli FROM pg_stat_wal_receiver), 0)::bigint";

/// A tuned spec for a standby cluster of the PostgreSQL at 127.0.0.1:`port`.
fn standby_spec(port: u16, extra: serde_json::Value) -> String {
    let mut spec: serde_json::Value = serde_json::from_str(&tuned_spec(false)).unwrap();
    spec["role"] = "standby".into();
    spec["standby_config"] = serde_json::json!({"standby_settings": {"primary_host": "127.0.0.1", "primary_port": port}});
    for (k, v) in extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    spec.to_string()
}

/// Runs `sql` through the cluster's first proxy, connecting again while it refuses.
async fn through_proxy(cluster: &Cluster, sql: &str) -> Result<i64, tokio_postgres::Error> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match connect("127.0.0.1", cluster.proxy_port()).await {
            Ok(c) => {
                let rows = c.simple_query(sql).await?;
                return Ok(rows
                    .iter()
                    .find_map(|m| match m {
                        tokio_postgres::SimpleQueryMessage::Row(r) => {
                            r.get(0).and_then(|v| v.parse().ok())
                        }
                        _ => None,
                    })
                    .unwrap_or(0));
            }
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Waits until every keeper of `cluster` sees `query` answer `expected`.
async fn wait_everywhere(cluster: &Cluster, query: &str, expected: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = cluster.count_on_each(query).await;
        if seen.values().all(|v| *v == Some(expected)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {query} is not {expected} on every keeper of {}: {seen:?}\n{}\n{}",
            cluster.name,
            cluster.describe().await,
            cluster.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The keeper running the cluster's master (its standby leader in a standby cluster).
async fn leader(cluster: &Cluster) -> (String, String) {
    let cd = cluster.cluster_data().await;
    let m = cd.master_db().unwrap();
    (m.spec.keeper_uid.clone(), m.uid.clone())
}

async fn query_on(cluster: &Cluster, keeper: &str, sql: &str) -> i64 {
    let c = cluster.node(keeper).sql().await.unwrap();
    c.query_one(sql, &[]).await.unwrap().get(0)
}

/// Waits until the standby leader on `keeper` receives timeline `tl`.
async fn wait_received_timeline(cluster: &Cluster, keeper: &str, tl: i64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let seen = query_on(cluster, keeper, RECEIVED_TIMELINE).await;
        if seen == tl {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the leader on {keeper} receives timeline {seen}, not {tl}\n{}",
            cluster.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn assert_read_only(result: Result<i64, tokio_postgres::Error>, what: &str) {
    let e = result.expect_err(what);
    assert_eq!(
        e.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{what}: {e}"
    );
}

/// Cluster A, the primary: two keepers with synchronous replication, `wal_log_hints` as
/// `rewind` says, and a table `t` holding ids 1 to 100.
async fn primary(rewind: bool) -> Cluster {
    let mut spec: serde_json::Value = serde_json::from_str(&tuned_spec(true)).unwrap();
    spec["use_pg_rewind"] = rewind.into();
    let a = Cluster::start(Options {
        keepers: 2,
        sentinels: 1,
        proxies: 1,
        spec: spec.to_string(),
        ..Options::default()
    })
    .await;
    through_proxy(&a, "CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    through_proxy(&a, "INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    a
}

/// Cluster B, `keepers` keepers following A through A's proxy (init mode new).
async fn standby_of(a: &Cluster, keepers: usize) -> Cluster {
    Cluster::start(Options {
        keepers,
        sentinels: 1,
        proxies: 1,
        name: "e2e-b".into(),
        etcd: Some(a.etcd()),
        spec: standby_spec(a.proxy_port(), serde_json::json!({})),
        ..Options::default()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cluster_follows_fails_over_follows_a_failover_and_promotes() {
    let mut a = primary(true).await;

    // B clones A through A's proxy (init mode new), and its standby clones B's leader.
    let mut b = standby_of(&a, 2).await;
    through_proxy(&a, "INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    wait_everywhere(&b, "SELECT count(*) FROM t", 200, "rows written on A").await;
    assert_read_only(
        through_proxy(&b, "INSERT INTO t VALUES (-1)").await,
        "a write through B's proxy",
    );
    let status = String::from_utf8(b.ctl(&["status"]).stdout).unwrap();
    let following = format!(
        "standby cluster: follows the external primary 127.0.0.1:{}",
        a.proxy_port()
    );
    assert!(status.contains(&following), "{status}");
    assert!(status.contains("standby leader"), "{status}");
    let a_timeline = through_proxy(&a, TIMELINE).await.unwrap();
    // A read-only listener sends reads to B's standby, not to its leader.
    let (_, _, read_only) = b.add_read_only_proxy(&["--read-only-fallback", "reject"]);
    let (b_leader_now, _) = leader(&b).await;
    let standby_port = b
        .nodes
        .iter()
        .find(|n| n.uid != b_leader_now)
        .map(|n| i64::from(n.port))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let port = match connect("127.0.0.1", read_only).await {
            Ok(c) => c
                .query_one("SELECT inet_server_port()::bigint", &[])
                .await
                .ok()
                .map(|r| r.get::<_, i64>(0)),
            Err(_) => None,
        };
        if port == Some(standby_port) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reads through B's read-only listener went to {port:?}, not B's standby"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // B's leader dies: B elects a new one, which keeps following A (no promotion: the
    // same timeline as A's), and the old one rejoins as its standby.
    let (old_leader, _) = leader(&b).await;
    b.node_mut(&old_leader).crash();
    let new_leader = b
        .wait_new_master(&old_leader, Duration::from_secs(60))
        .await;
    through_proxy(&a, "INSERT INTO t SELECT generate_series(201, 300)")
        .await
        .unwrap();
    b.node_mut(&old_leader).keeper.start();
    b.wait_healthy(2, Duration::from_secs(90)).await;
    wait_everywhere(
        &b,
        "SELECT count(*) FROM t",
        300,
        "rows written on A after B's failover",
    )
    .await;
    wait_received_timeline(&b, &new_leader, a_timeline).await;
    let cd = b.cluster_data().await;
    assert!(
        cd.master_db()
            .is_some_and(|m| matches!(m.spec.follow, Some(FollowConfig::External { .. }))),
        "{cd:?}"
    );
    assert_read_only(
        through_proxy(&b, "INSERT INTO t VALUES (-1)").await,
        "a write through B's proxy after B's failover",
    );
    // A planned switchover inside B moves the leadership back, still following A.
    b.make_master(&old_leader).await;
    through_proxy(&a, "INSERT INTO t SELECT generate_series(10101, 10110)")
        .await
        .unwrap();
    wait_everywhere(
        &b,
        "SELECT count(*) FROM t",
        310,
        "rows written on A after B's switchover",
    )
    .await;
    wait_received_timeline(&b, &old_leader, a_timeline).await;
    assert_read_only(
        through_proxy(&b, "INSERT INTO t VALUES (-1)").await,
        "a write through B's proxy after B's switchover",
    );
    through_proxy(&a, "DELETE FROM t WHERE id BETWEEN 10101 AND 10110")
        .await
        .unwrap();

    // A fails over to a standby that has less WAL than B's leader (see [`fork`]): B's
    // leader is rewound onto A's new timeline (the same database, not re-initialised) and
    // follows A again, and the rows A lost are gone from B as well.
    let (_, b_leader_db) = leader(&b).await;
    fork(&mut a, &b).await;
    through_proxy(&a, "INSERT INTO t SELECT generate_series(301, 400)")
        .await
        .unwrap();
    assert_eq!(
        through_proxy(&a, "SELECT count(*) FROM t").await.unwrap(),
        400,
        "A's new master holds the local commits: the test made no fork"
    );
    let a_new_timeline = through_proxy(&a, TIMELINE).await.unwrap();
    assert!(
        a_new_timeline > a_timeline,
        "A's failover did not switch timelines"
    );
    wait_everywhere(
        &b,
        "SELECT count(*) FROM t",
        400,
        "rows written on A after A's failover",
    )
    .await;
    let (b_leader, b_leader_db_now) = leader(&b).await;
    assert_eq!(
        b_leader_db_now, b_leader_db,
        "B's leader was re-initialised"
    );
    wait_received_timeline(&b, &b_leader, a_new_timeline).await;
    assert!(
        b.node(&b_leader)
            .keeper
            .log_text()
            .contains("rewinding onto timeline"),
        "B's leader followed without a rewind: the test made no fork"
    );

    // Promote B: it accepts writes, holds all of A's rows, and A is untouched. A session
    // opened through B's proxy before stays open and can write after.
    let session = connect("127.0.0.1", b.proxy_port()).await.unwrap();
    let out = b.ctl(&["promote"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    b.wait_cd(
        "B's leader no longer follows A",
        Duration::from_secs(30),
        |cd| cd.master_db().is_some_and(|m| m.spec.follow.is_none()),
    )
    .await;
    b.wait_healthy(2, Duration::from_secs(60)).await;
    through_proxy(&b, "INSERT INTO t VALUES (1000000)")
        .await
        .unwrap();
    session
        .batch_execute("INSERT INTO t VALUES (1000001)")
        .await
        .unwrap();
    wait_everywhere(&b, "SELECT count(*) FROM t", 402, "B after its promotion").await;
    assert_eq!(
        through_proxy(&b, "SELECT count(*) FROM t WHERE id <= 400")
            .await
            .unwrap(),
        400
    );
    through_proxy(&a, "INSERT INTO t VALUES (401)")
        .await
        .unwrap();
    assert_eq!(
        through_proxy(&a, "SELECT count(*) FROM t WHERE id >= 1000000")
            .await
            .unwrap(),
        0,
        "B's write reached A"
    );
    let cd = b.cluster_data().await;
    assert!(
        cd.events.iter().any(|e| e.kind == "promote cluster"),
        "{:?}",
        cd.events
    );
    let status = String::from_utf8(b.ctl(&["status"]).stdout).unwrap();
    assert!(!status.contains("standby cluster"), "{status}");
    // A is not a standby cluster: promoting it is refused.
    let out = a.ctl(&["promote"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not a standby cluster"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes A fail over to a standby that has less WAL than B's leader: A's standby is
/// paused; A's master commits ids 10001 to 10010 locally (synchronous_commit = local: never
/// acknowledged by a synchronous standby, so A may lose them), which B's leader receives;
/// A's master host dies; the standby's WAL receiver dies with what it had not read, and the
/// standby resumes and is promoted. A's new timeline forks before B's leader's position.
/// The old master's keeper starts again (A's synchronous commits need a standby).
async fn fork(a: &mut Cluster, b: &Cluster) {
    let a_master = a.master_keeper().await.unwrap();
    let a_standby = a
        .keeper_uids()
        .into_iter()
        .find(|k| *k != a_master)
        .unwrap();
    a.node(&a_standby).pause_postgres();
    a.node(&a_master)
        .sql()
        .await
        .unwrap()
        .batch_execute(
            "SET synchronous_commit = local; INSERT INTO t SELECT generate_series(10001, 10010)",
        )
        .await
        .unwrap();
    let (b_leader, _) = leader(b).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while query_on(b, &b_leader, "SELECT count(*) FROM t WHERE id > 10000").await != 10 {
        assert!(
            Instant::now() < deadline,
            "B's leader did not receive the local commits"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.node_mut(&a_master).crash();
    kill_wal_receiver(a.node(&a_standby).postmaster_pid().unwrap());
    a.node(&a_standby).thaw();
    a.wait_new_master(&a_master, Duration::from_secs(60)).await;
    a.node_mut(&a_master).keeper.start();
}

/// SIGKILL to the WAL receiver among the children of `postmaster` (stopped or not): what
/// it had not read from its socket is lost, as in a crash of its host.
fn kill_wal_receiver(postmaster: i32) {
    let receiver = tendril_testkit::processes()
        .into_iter()
        .filter(|(_, ppid)| *ppid == postmaster)
        .map(|(pid, _)| pid)
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("walreceiver"))
        })
        .expect("a WAL receiver");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(receiver),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
}

/// Gives `path` and everything under it to the postgres OS user.
fn chown_postgres(path: &Path) {
    let user = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
    if path.is_dir() && !path.is_symlink() {
        for entry in std::fs::read_dir(path).unwrap() {
            chown_postgres(&entry.unwrap().path());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_cannot_be_rewound_keeps_its_data() {
    // A without wal_log_hints (use_pg_rewind off) and without data checksums: pg_rewind
    // cannot rewind anything that follows it.
    let mut a = primary(false).await;
    let b = standby_of(&a, 1).await;
    wait_everywhere(&b, "SELECT count(*) FROM t", 100, "rows written on A").await;
    let (_, leader_db) = leader(&b).await;
    fork(&mut a, &b).await;
    // The leader's keeper finds the fork, pg_rewind's dry run refuses, and nothing is
    // wiped: the leader keeps its data (the rows A lost included) and serves it, read-only.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !b
        .node("k0")
        .keeper
        .log_text()
        .contains("the rewind cannot start")
    {
        assert!(
            Instant::now() < deadline,
            "B's keeper did not find the fork\n{}",
            b.logs_tail()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    wait_everywhere(
        &b,
        "SELECT count(*) FROM t",
        110,
        "B's leader after the dry run",
    )
    .await;
    assert_eq!(
        query_on(&b, "k0", "SELECT pg_is_in_recovery()::int::bigint").await,
        1
    );
    assert_eq!(
        leader(&b).await.1,
        leader_db,
        "B's leader was re-initialised"
    );
    assert!(!b.node("k0").data_dir.join("standby-leader-repair").exists());
    // Status says it does not follow.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = String::from_utf8(b.ctl(&["status"]).stdout).unwrap();
        if status.contains("in recovery, not streaming") {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Runs `sql` on a plain PostgreSQL (trust authentication on loopback).
async fn on_plain(pg: &PgServer, sql: &str) {
    connect("127.0.0.1", pg.port())
        .await
        .unwrap()
        .batch_execute(sql)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_standby_of_a_plain_postgresql_adopted_is_never_promoted() {
    // Named as a StatefulSet names its pods.
    const KEEPER: &str = "tendril-keeper-0";
    // The external primary is a plain PostgreSQL, with the roles the standby cluster's
    // keepers log in with (its standbys replicate them).
    let primary = PgServer::start();
    on_plain(
        &primary,
        &format!(
            "ALTER ROLE postgres PASSWORD '{SU_PASSWORD}'; \
             CREATE ROLE repl LOGIN REPLICATION PASSWORD '{REPL_PASSWORD}'; \
             CREATE ROLE site_c LOGIN REPLICATION PASSWORD 'site-c-secret'; \
             SELECT pg_create_physical_replication_slot('site_c'); \
             CREATE TABLE t (id int PRIMARY KEY); \
             INSERT INTO t SELECT generate_series(1, 10)"
        ),
    )
    .await;
    // A standby replays nothing that needs more than its own settings: the primary runs
    // with max_connections 200, so the standby cluster does too. The leader replicates as
    // its own role, whose password is in a file on the keeper's host, through a slot.
    // The role must give its password (the rest of the primary trusts loopback).
    let hba = primary.data_dir().join("pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!("host replication site_c 127.0.0.1/32 scram-sha-256\n{rules}"),
    )
    .unwrap();
    on_plain(&primary, "SELECT pg_reload_conf()").await;
    let password_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(password_file.path(), "site-c-secret\n").unwrap();
    let mut spec: serde_json::Value = serde_json::from_str(&standby_spec(
        primary.port(),
        serde_json::json!({
            "init_mode": "existing",
            "existing_config": {"keeper_uid": KEEPER},
            "pg_parameters": {"max_connections": "200"},
        }),
    ))
    .unwrap();
    let settings = &mut spec["standby_config"]["standby_settings"];
    settings["user"] = "site_c".into();
    settings["password_file"] = password_file.path().to_str().unwrap().into();
    settings["primary_slot_name"] = "site_c".into();
    settings["sslmode"] = "disable".into();
    let spec = spec.to_string();
    let mut c = Cluster::start(Options {
        keepers: 0,
        sentinels: 1,
        proxies: 1,
        name: "e2e-c".into(),
        spec,
        wait_healthy: false,
        ..Options::default()
    })
    .await;
    // A running standby of the primary, made by hand, as an operator would have one.
    let root = c.dir.path().join(KEEPER);
    let pgdata = root.join("postgres");
    std::fs::create_dir_all(&root).unwrap();
    tendril_testkit::run_ok(
        Command::new(format!("{PG_BIN}/pg_basebackup"))
            .args(["-D", pgdata.to_str().unwrap(), "-R", "-X", "stream"])
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &primary.port().to_string(),
                "-U",
                "repl",
            ]),
    );
    assert!(pgdata.join("standby.signal").exists());
    chown_postgres(&pgdata);
    std::fs::set_permissions(&pgdata, std::fs::Permissions::from_mode(0o700)).unwrap();
    let postgres = nix::unistd::User::from_name("postgres").unwrap().unwrap();
    let options = format!(
        "-c listen_addresses='' -c max_connections=200 -k {}",
        pgdata.display()
    );
    tendril_testkit::run_ok(
        Command::new(format!("{PG_BIN}/pg_ctl"))
            .uid(postgres.uid.as_raw())
            .gid(postgres.gid.as_raw())
            .arg("-D")
            .arg(&pgdata)
            .args(["-o", &options, "-l"])
            .arg(pgdata.join("startup.log"))
            .args(["-w", "start"]),
    );

    // The keeper stops it, writes the cluster's configuration and runs it as the leader.
    c.add_keeper(KEEPER);
    c.wait_healthy(1, Duration::from_secs(90)).await;
    on_plain(&primary, "INSERT INTO t SELECT generate_series(11, 20)").await;
    wait_everywhere(
        &c,
        "SELECT count(*) FROM t",
        20,
        "rows written on the primary",
    )
    .await;
    // Several sentinel and keeper loops later it is still a standby.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        query_on(&c, KEEPER, "SELECT pg_is_in_recovery()::int::bigint").await,
        1,
        "the adopted standby was promoted"
    );
    assert_read_only(
        through_proxy(&c, "INSERT INTO t VALUES (-1)").await,
        "a write through C's proxy",
    );
    let cd = c.cluster_data().await;
    assert!(
        !cd.events.iter().any(|e| e.kind.starts_with("promote")),
        "{:?}",
        cd.events
    );
    let status = String::from_utf8(c.ctl(&["status"]).stdout).unwrap();
    let following = format!(
        "standby cluster: follows the external primary 127.0.0.1:{}",
        primary.port()
    );
    assert!(status.contains(&following), "{status}");
    // The primary serves the leader as its role, through its slot.
    let primary_client = connect("127.0.0.1", primary.port()).await.unwrap();
    let row = primary_client
        .query_one(
            "SELECT usename::text, (SELECT active FROM pg_replication_slots \
             WHERE slot_name = 'site_c') FROM pg_stat_replication",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "site_c");
    assert_eq!(row.get::<_, Option<bool>>(1), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_cluster_restored_from_a_backup_then_streams() {
    use tendril_e2e::pgbackrest::{Repository, archiving_cluster, archiving_spec};
    let repo = Repository::create();
    let (a, master) = archiving_cluster(&repo, archiving_spec(&repo, serde_json::json!({}))).await;
    through_proxy(&a, "CREATE TABLE t (id int PRIMARY KEY)")
        .await
        .unwrap();
    through_proxy(&a, "INSERT INTO t SELECT generate_series(1, 100)")
        .await
        .unwrap();
    // The rows are in the archive (a backup taken before them, their WAL archived after).
    repo.run(&a, &master, "check");
    let archive = serde_json::json!({
        "restore_command": format!("{} --pg1-path=\"$PWD\" archive-get %f \"%p\"", repo.command()),
    });
    let spec = standby_spec(
        a.proxy_port(),
        serde_json::json!({
            "init_mode": "pitr",
            "pitr_config": {
                "data_restore_command": format!("{} --pg1-path=%d restore", repo.command()),
                "archive_recovery_settings": archive,
            },
        }),
    );
    let mut spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    spec["standby_config"]["archive_recovery_settings"] = archive.clone();
    let b = Cluster::start(Options {
        keepers: 1,
        sentinels: 1,
        proxies: 1,
        name: "e2e-b".into(),
        etcd: Some(a.etcd()),
        spec: spec.to_string(),
        ..Options::default()
    })
    .await;
    wait_everywhere(
        &b,
        "SELECT count(*) FROM t",
        100,
        "rows restored from the backup",
    )
    .await;
    // Then it streams from A.
    through_proxy(&a, "INSERT INTO t SELECT generate_series(101, 200)")
        .await
        .unwrap();
    wait_everywhere(
        &b,
        "SELECT count(*) FROM t",
        200,
        "rows written on A after the restore",
    )
    .await;
    assert_eq!(
        query_on(&b, "k0", "SELECT pg_is_in_recovery()::int::bigint").await,
        1
    );
    assert_read_only(
        through_proxy(&b, "INSERT INTO t VALUES (-1)").await,
        "a write through B's proxy",
    );
    let cd = b.cluster_data().await;
    assert!(
        cd.events
            .iter()
            .any(|e| e.reason.contains("standby leader") && e.reason.contains("init mode pitr")),
        "{:?}",
        cd.events
    );
    let streaming = query_on(
        &b,
        "k0",
        "SELECT count(*) FROM pg_stat_wal_receiver WHERE status = 'streaming'",
    )
    .await;
    assert_eq!(streaming, 1, "B's leader does not stream from A");
}
