//! The store against a real etcd: compare-and-swap, watches, leases, election, outages.

use std::time::{Duration, Instant};

use tendril_control_store::{
    CasOutcome, EtcdStore, Expect, KeptLease, Store, StoreConfig, StoreError, WatchEvent,
};
use tendril_testkit::{EtcdServer, free_port, init_logging};

async fn connect(etcd: &EtcdServer) -> EtcdStore {
    EtcdStore::connect(&StoreConfig::new([etcd.endpoint()]))
        .await
        .expect("connect to etcd")
}

/// Waits for the next event that is not an interruption notice, failing after `limit`.
async fn next_change(watch: &mut tendril_control_store::Watch, limit: Duration) -> WatchEvent {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let event = tokio::time::timeout_at(deadline, watch.next())
            .await
            .expect("watch event within the limit")
            .expect("watch still running");
        match event {
            WatchEvent::Interrupted { .. } | WatchEvent::Resumed { .. } => continue,
            other => return other,
        }
    }
}

fn put_key(event: &WatchEvent) -> (&str, &[u8]) {
    match event {
        WatchEvent::Put(kv) => (kv.key.as_str(), kv.value.as_slice()),
        other => panic!("expected a put, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_operations_and_prefix_listing() {
    init_logging();
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    assert_eq!(store.get("/t/a").await.unwrap(), None);
    store.put("/t/a", b"1".to_vec(), None).await.unwrap();
    store.put("/t/b", b"2".to_vec(), None).await.unwrap();
    store.put("/other", b"3".to_vec(), None).await.unwrap();
    let a = store.get("/t/a").await.unwrap().expect("key written");
    assert_eq!(a.value, b"1");
    assert!(a.mod_revision > 0 && a.lease.is_none());
    let listing = store.list("/t/").await.unwrap();
    let keys: Vec<_> = listing.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/t/a", "/t/b"]);
    assert!(listing.revision >= a.mod_revision);
    assert!(store.delete("/t/a").await.unwrap());
    assert!(!store.delete("/t/a").await.unwrap());
    assert_eq!(store.get("/t/a").await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_swap_detects_conflicts() {
    init_logging();
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let key = "/tendril/c/clusterdata";

    let CasOutcome::Written(rev1) = store
        .cas(key, b"v1".to_vec(), Expect::Absent, None)
        .await
        .unwrap()
    else {
        panic!("create on an absent key must succeed")
    };
    // Creating again conflicts and shows what is there.
    match store
        .cas(key, b"other".to_vec(), Expect::Absent, None)
        .await
        .unwrap()
    {
        CasOutcome::Conflict(Some(current)) => {
            assert_eq!(current.value, b"v1");
            assert_eq!(current.mod_revision, rev1);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // Two writers read rev1; the first wins, the second conflicts and changes nothing.
    let first = store
        .cas(key, b"v2".to_vec(), Expect::ModRevision(rev1), None)
        .await
        .unwrap();
    let CasOutcome::Written(rev2) = first else {
        panic!("first writer must win: {first:?}")
    };
    let second = store
        .cas(key, b"v2-late".to_vec(), Expect::ModRevision(rev1), None)
        .await
        .unwrap();
    match second {
        CasOutcome::Conflict(Some(current)) => {
            assert_eq!(current.value, b"v2");
            assert_eq!(current.mod_revision, rev2);
        }
        other => panic!("second writer must conflict, got {other:?}"),
    }
    assert_eq!(store.get(key).await.unwrap().unwrap().value, b"v2");
    // Expecting a revision of a key that does not exist conflicts with nothing there.
    let missing = store.cas(
        "/tendril/c/none",
        b"x".to_vec(),
        Expect::ModRevision(rev2),
        None,
    );
    assert_eq!(missing.await.unwrap(), CasOutcome::Conflict(None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watcher_sees_a_put() {
    init_logging();
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut watch = store.watch("/w/", 0).await.unwrap();
    // Give the watch a moment to be established before writing, as a long-lived watcher is.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = Instant::now();
    store.put("/w/k", b"hello".to_vec(), None).await.unwrap();
    let event = next_change(&mut watch, Duration::from_secs(5)).await;
    let delay = start.elapsed();
    assert_eq!(put_key(&event), ("/w/k", &b"hello"[..]));
    tracing::info!(?delay, "watch delivered a put");
    println!("watch delay from put to event: {delay:?}");
    store.delete("/w/k").await.unwrap();
    match next_change(&mut watch, Duration::from_secs(5)).await {
        WatchEvent::Delete { key, .. } => assert_eq!(key, "/w/k"),
        other => panic!("expected a delete, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_under_an_expired_lease_disappears_within_ttl_plus_one_second() {
    init_logging();
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.unwrap();
    let written = Instant::now();
    store.put("/l/k", b"x".to_vec(), Some(lease)).await.unwrap();
    let kv = store
        .get("/l/k")
        .await
        .unwrap()
        .expect("key present right after the put");
    assert_eq!(kv.lease, Some(lease));
    let gone_at = loop {
        if store.get("/l/k").await.unwrap().is_none() {
            break written.elapsed();
        }
        assert!(
            written.elapsed() < ttl + Duration::from_secs(1),
            "key outlived TTL + 1 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("key under a {ttl:?} lease disappeared after {gone_at:?}");
    // etcd never expires a lease early.
    assert!(
        gone_at >= ttl - Duration::from_millis(100),
        "expired after only {gone_at:?}"
    );
    assert!(
        !store.keep_alive(lease).await.unwrap(),
        "expired lease cannot be renewed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_lease_outlives_its_ttl_and_revoke_deletes_its_keys() {
    init_logging();
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut lease = KeptLease::start(store.clone(), Duration::from_secs(1));
    let id = lease.wait_alive().await;
    store.put("/kl/k", b"x".to_vec(), Some(id)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        store.get("/kl/k").await.unwrap().is_some(),
        "kept lease expired"
    );
    assert!(lease.since_renewed().unwrap() < Duration::from_secs(1));
    lease.revoke(&store).await.unwrap();
    assert!(
        store.get("/kl/k").await.unwrap().is_none(),
        "revoke must delete the key"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn election_hands_over_when_the_leader_lease_is_revoked() {
    init_logging();
    let etcd = EtcdServer::start();
    let a = connect(&etcd).await;
    let b = connect(&etcd).await;
    let name = "/tendril/c/leader";
    assert_eq!(a.leader(name).await.unwrap(), None);

    let mut lease_a = KeptLease::start(a.clone(), Duration::from_secs(5));
    let mut lease_b = KeptLease::start(b.clone(), Duration::from_secs(5));
    let id_a = lease_a.wait_alive().await;
    let id_b = lease_b.wait_alive().await;
    let lead_a = a.campaign(name, "sentinel-a", id_a).await.unwrap();
    assert_eq!(b.leader(name).await.unwrap().as_deref(), Some("sentinel-a"));

    let b2 = b.clone();
    let campaign_b = tokio::spawn(async move { b2.campaign(name, "sentinel-b", id_b).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!campaign_b.is_finished(), "b must wait while a leads");

    // The leader writes guarded by its leadership.
    let CasOutcome::Written(rev) = a
        .cas(
            "/tendril/c/clusterdata",
            b"a".to_vec(),
            Expect::Absent,
            Some(&lead_a),
        )
        .await
        .unwrap()
    else {
        panic!("leader's guarded write must succeed")
    };

    let revoked = Instant::now();
    lease_a.revoke(&a).await.unwrap();
    let lead_b = tokio::time::timeout(Duration::from_secs(5), campaign_b)
        .await
        .expect("b elected within 5 s of a's revocation")
        .unwrap()
        .unwrap();
    println!(
        "election hand-over after revoke took {:?}",
        revoked.elapsed()
    );
    assert_eq!(a.leader(name).await.unwrap().as_deref(), Some("sentinel-b"));
    assert!(b.is_leader(&lead_b).await.unwrap());
    assert!(!a.is_leader(&lead_a).await.unwrap());

    // The deposed leader's guarded write is refused even with the right revision.
    let late = a.cas(
        "/tendril/c/clusterdata",
        b"late".to_vec(),
        Expect::ModRevision(rev),
        Some(&lead_a),
    );
    assert_eq!(late.await.unwrap(), CasOutcome::NotLeader);
    assert_eq!(
        a.get("/tendril/c/clusterdata")
            .await
            .unwrap()
            .unwrap()
            .value,
        b"a"
    );

    // An observer follows the hand-overs, resignation included.
    let mut observer = a.observe(name).await.unwrap();
    assert_eq!(observer.current(), Some("sentinel-b"));
    let mut lease_c = KeptLease::start(a.clone(), Duration::from_secs(5));
    let id_c = lease_c.wait_alive().await;
    let a2 = a.clone();
    let campaign_c = tokio::spawn(async move { a2.campaign(name, "sentinel-c", id_c).await });
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Resigning hands over at once.
    b.resign(&lead_b).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), observer.changed())
        .await
        .unwrap();
    assert_eq!(next.as_deref(), Some("sentinel-c"));
    let lead_c = campaign_c.await.unwrap().unwrap();
    a.resign(&lead_c).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), observer.changed())
        .await
        .unwrap();
    assert_eq!(next, None);
    assert_eq!(a.leader(name).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_resumes_across_an_etcd_restart_without_losing_events() {
    init_logging();
    let mut etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let mut watch = store.watch("/r/", 0).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    store.put("/r/1", b"1".to_vec(), None).await.unwrap();
    assert_eq!(
        put_key(&next_change(&mut watch, Duration::from_secs(5)).await).0,
        "/r/1"
    );

    etcd.kill();
    // The watch notices the outage.
    let interrupted = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(WatchEvent::Interrupted { error }) = watch.next().await {
                return error;
            }
        }
    })
    .await
    .expect("watch reports the outage");
    println!("watch interrupted: {interrupted}");

    etcd.restart();
    // Writes right after the restart, before the watch has reconnected, must all arrive.
    let writer = connect(&etcd).await;
    for i in 2..=6 {
        writer
            .put(&format!("/r/{i}"), i.to_string().into_bytes(), None)
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let event = next_change(&mut watch, Duration::from_secs(15)).await;
        seen.push(put_key(&event).0.to_owned());
    }
    assert_eq!(seen, ["/r/2", "/r/3", "/r/4", "/r/5", "/r/6"]);
    // Nothing delivered twice.
    let extra = tokio::time::timeout(
        Duration::from_millis(500),
        next_change(&mut watch, Duration::from_secs(1)),
    )
    .await;
    assert!(extra.is_err(), "unexpected extra event {extra:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_watch_revision_triggers_a_full_reread() {
    init_logging();
    let etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    let first = store.put("/c/a", b"1".to_vec(), None).await.unwrap();
    store.put("/c/b", b"2".to_vec(), None).await.unwrap();
    store.delete("/c/a").await.unwrap();
    let last = store.put("/c/c", b"3".to_vec(), None).await.unwrap();
    let mut raw = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    raw.compact(last, None).await.unwrap();

    let mut watch = store.watch("/c/", first).await.unwrap();
    match next_change(&mut watch, Duration::from_secs(5)).await {
        WatchEvent::Reset { kvs, revision } => {
            let keys: Vec<_> = kvs.iter().map(|kv| kv.key.as_str()).collect();
            assert_eq!(keys, ["/c/b", "/c/c"]);
            assert!(revision >= last);
        }
        other => panic!("expected a reset after compaction, got {other:?}"),
    }
    // And the watch goes on from there.
    store.put("/c/d", b"4".to_vec(), None).await.unwrap();
    assert_eq!(
        put_key(&next_change(&mut watch, Duration::from_secs(5)).await).0,
        "/c/d"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_reachable_endpoint_gives_a_clear_error_naming_them() {
    init_logging();
    let dead = [
        format!("http://127.0.0.1:{}", free_port()),
        format!("http://127.0.0.1:{}", free_port()),
    ];
    let started = Instant::now();
    let err = EtcdStore::connect(&StoreConfig::new(dead.clone()))
        .await
        .unwrap_err();
    let text = err.to_string();
    println!("{text} (after {:?})", started.elapsed());
    assert!(matches!(err, StoreError::Unavailable { .. }), "{err:?}");
    assert!(err.is_transient());
    for endpoint in &dead {
        assert!(
            text.contains(endpoint.as_str()),
            "{text} does not name {endpoint}"
        );
    }
    assert!(text.contains("no endpoint answered"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_endpoint_among_several_is_tolerated() {
    init_logging();
    let etcd = EtcdServer::start();
    let dead = format!("http://127.0.0.1:{}", free_port());
    let store = EtcdStore::connect(&StoreConfig::new([dead, etcd.endpoint()]))
        .await
        .unwrap();
    for i in 0..10 {
        store
            .put(&format!("/m/{i}"), b"x".to_vec(), None)
            .await
            .expect("put via the live endpoint");
    }
    assert_eq!(store.list("/m/").await.unwrap().kvs.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_reconnects_after_an_outage() {
    init_logging();
    let mut etcd = EtcdServer::start();
    let store = connect(&etcd).await;
    store.put("/o/k", b"1".to_vec(), None).await.unwrap();
    etcd.kill();
    let err = store.get("/o/k").await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.get("/o/k").await {
            Ok(Some(kv)) => {
                assert_eq!(kv.value, b"1");
                break;
            }
            Ok(None) => panic!("data lost across the restart"),
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "still reconnecting");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no reconnect after 15 s: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_authentication() {
    init_logging();
    // Tokens expire after a second unused (300 s by default).
    let etcd = EtcdServer::start_with_args(&["--auth-token-ttl=1"]);
    let mut admin = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    admin.user_add("root", "r00t-pw", None).await.unwrap();
    admin.user_grant_role("root", "root").await.unwrap();
    admin.auth_enable().await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("etcd-password");
    std::fs::write(&password_file, "r00t-pw\n").unwrap();
    let args = tendril_control_store::StoreArgs {
        store_endpoints: vec![etcd.endpoint()],
        store_timeout: Duration::from_secs(5),
        store_ca_file: None,
        store_cert_file: None,
        store_key_file: None,
        store_user: Some("root".into()),
        store_password_file: Some(password_file),
    };
    let config = args.to_config().unwrap();
    let store = EtcdStore::connect(&config)
        .await
        .expect("authenticated connect");
    store.put("/auth/k", b"v".to_vec(), None).await.unwrap();
    assert_eq!(store.get("/auth/k").await.unwrap().unwrap().value, b"v");

    // A member forgets a token unused for --auth-token-ttl (the members a client is not
    // talking to forget it that way), and every token when it restarts: the store
    // authenticates again rather than failing each request with "invalid auth token".
    tokio::time::sleep(Duration::from_secs(3)).await;
    store
        .put("/auth/k", b"after-expiry".to_vec(), None)
        .await
        .expect("a put after the token expired");
    let mut etcd = etcd;
    etcd.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    let read = loop {
        match store.get("/auth/k").await {
            Ok(kv) => break kv,
            Err(e) if e.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("after a restart of etcd: {e}"),
        }
    };
    assert_eq!(read.unwrap().value, b"after-expiry");
    store.put("/auth/k", b"w".to_vec(), None).await.unwrap();

    let anonymous = EtcdStore::connect(&StoreConfig::new([etcd.endpoint()])).await;
    let err = anonymous.expect_err("etcd with auth enabled must refuse an anonymous client");
    assert!(matches!(err, StoreError::Request { .. }), "{err:?}");

    let mut wrong = config.clone();
    wrong.credentials = Some(("root".into(), "wrong".into()));
    let err = EtcdStore::connect(&wrong)
        .await
        .expect_err("wrong password must be refused");
    assert!(err.to_string().contains("authentication failed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_client_certificate() {
    init_logging();
    let etcd = EtcdServer::start_tls();
    let tls = etcd.tls().expect("started with TLS").clone();
    let args = tendril_control_store::StoreArgs {
        store_endpoints: vec![etcd.endpoint()],
        store_timeout: Duration::from_secs(5),
        store_ca_file: Some(tls.ca_cert.clone()),
        store_cert_file: Some(tls.client_cert.clone()),
        store_key_file: Some(tls.client_key.clone()),
        store_user: None,
        store_password_file: None,
    };
    let config = args.to_config().unwrap();
    let store = EtcdStore::connect(&config).await.expect("TLS connect");
    store.put("/tls/k", b"v".to_vec(), None).await.unwrap();
    assert_eq!(store.get("/tls/k").await.unwrap().unwrap().value, b"v");

    // Without the client certificate the server refuses the handshake.
    let mut no_cert = config.clone();
    no_cert.tls = Some(tendril_control_store::TlsFiles {
        ca_file: Some(tls.ca_cert.clone()),
        cert_file: None,
        key_file: None,
    });
    assert!(
        EtcdStore::connect(&no_cert).await.is_err(),
        "connected without a client cert"
    );

    // Plain HTTP against the TLS port fails with the endpoint named.
    let plain = StoreConfig::new([etcd.endpoint().replace("https://", "http://")]);
    let err = EtcdStore::connect(&plain)
        .await
        .expect_err("plain HTTP to a TLS port");
    assert!(
        err.to_string().contains(&etcd.client_port().to_string()),
        "{err}"
    );
}
