//! tendrilctl as a user runs it: the real binary against a real etcd.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use tendril_testkit::{EtcdServer, free_port};

struct Ctl<'a> {
    etcd: &'a EtcdServer,
}

impl Ctl<'_> {
    fn run(&self, args: &[&str]) -> Output {
        self.run_with_stdin(args, None)
    }

    fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tendrilctl"))
            .env("TENDRIL_CLUSTER_NAME", "test")
            .env("TENDRIL_STORE_ENDPOINTS", self.etcd.endpoint())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tendrilctl");
        let mut input = child.stdin.take().expect("stdin");
        if let Some(text) = stdin {
            input.write_all(text.as_bytes()).expect("write stdin");
        }
        drop(input);
        child.wait_with_output().expect("tendrilctl output")
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn assert_exit(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        stdout(o),
        stderr(o)
    );
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {}", stdout(o)))
}

#[test]
fn init_spec_refuse_and_invalid_update_changes_nothing() {
    let etcd = EtcdServer::start();
    let ctl = Ctl { etcd: &etcd };

    let missing = ctl.run(&["spec"]);
    assert_exit(&missing, 1);
    assert!(
        stderr(&missing).contains("does not exist"),
        "{}",
        stderr(&missing)
    );

    let init = ctl.run(&[
        "init",
        r#"{"synchronous_replication": true, "fail_interval": "3s"}"#,
    ]);
    assert_exit(&init, 0);
    assert!(stdout(&init).contains("initialised"), "{}", stdout(&init));

    let spec = json(&ctl.run(&["spec"]));
    assert_eq!(spec["synchronous_replication"], true);
    assert_eq!(spec["fail_interval"], "3s");
    assert_eq!(spec["sleep_interval"], "1s", "defaults filled in");

    let again = ctl.run(&["init"]);
    assert_exit(&again, 1);
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    assert_eq!(
        json(&ctl.run(&["spec"]))["fail_interval"],
        "3s",
        "refused init changed the spec"
    );

    let before = ctl.run(&["clusterdata", "read"]);
    assert_exit(&before, 0);
    let bad = ctl.run(&[
        "update",
        "--patch",
        r#"{"max_standbys": 0, "sleep_interval": "never", "init_mode": "existing", "bogus": 1}"#,
    ]);
    assert_exit(&bad, 1);
    let message = stderr(&bad);
    for field in [
        "max_standbys",
        "sleep_interval",
        "init_mode",
        "existing_config.keeper_uid",
        "bogus",
    ] {
        assert!(
            message.contains(field),
            "{field} not reported in: {message}"
        );
    }
    assert!(message.contains("nothing was changed"), "{message}");
    let after = ctl.run(&["clusterdata", "read"]);
    assert_eq!(
        stdout(&before),
        stdout(&after),
        "invalid update changed the cluster data"
    );

    // A semantic error the patch introduces (init mode is immutable) is refused too.
    let immutable = ctl.run(&[
        "update",
        "--patch",
        r#"{"init_mode": "pitr", "pitr_config": {"data_restore_command": "true"}}"#,
    ]);
    assert_exit(&immutable, 1);
    assert!(
        stderr(&immutable).contains("init_mode"),
        "{}",
        stderr(&immutable)
    );
    assert_eq!(stdout(&before), stdout(&ctl.run(&["clusterdata", "read"])));

    let good = ctl.run(&[
        "update",
        "--patch",
        r#"{"fail_interval": "4s", "pg_parameters": {"work_mem": "8MB"}}"#,
    ]);
    assert_exit(&good, 0);
    let spec = json(&ctl.run(&["spec"]));
    assert_eq!(spec["fail_interval"], "4s");
    assert_eq!(spec["pg_parameters"]["work_mem"], "8MB");
    assert_eq!(
        spec["synchronous_replication"], true,
        "patch kept the other fields"
    );
    let data = json(&ctl.run(&["clusterdata", "read"]));
    let generation_before = json(&before)["generation"].as_u64().unwrap();
    assert_eq!(data["generation"].as_u64().unwrap(), generation_before + 1);

    // null resets a field to its default.
    assert_exit(
        &ctl.run(&["update", "--patch", r#"{"fail_interval": null}"#]),
        0,
    );
    assert_eq!(json(&ctl.run(&["spec"]))["fail_interval"], "5s");
}

#[test]
fn update_from_file_replaces_the_spec_and_force_reinitialises() {
    let etcd = EtcdServer::start();
    let ctl = Ctl { etcd: &etcd };
    assert_exit(&ctl.run(&["init"]), 0);
    let uid = json(&ctl.run(&["clusterdata", "read"]))["uid"].clone();

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spec.json");
    std::fs::write(&file, r#"{"max_standbys": 7}"#).unwrap();
    assert_exit(&ctl.run(&["update", "--file", file.to_str().unwrap()]), 0);
    let spec = json(&ctl.run(&["spec"]));
    assert_eq!(spec["max_standbys"], 7);

    let from_stdin = ctl.run_with_stdin(&["update", "--file", "-"], Some(r#"{"max_standbys": 9}"#));
    assert_exit(&from_stdin, 0);
    assert_eq!(json(&ctl.run(&["spec"]))["max_standbys"], 9);

    let forced = ctl.run(&["init", "--force", r#"{"max_standbys": 2}"#]);
    assert_exit(&forced, 0);
    let data = json(&ctl.run(&["clusterdata", "read"]));
    assert_ne!(
        data["uid"], uid,
        "a forced init is a new cluster incarnation"
    );
    assert_eq!(data["spec"]["max_standbys"], 2);
}

#[test]
fn only_promote_makes_a_standby_cluster_a_master_cluster() {
    let etcd = EtcdServer::start();
    let ctl = Ctl { etcd: &etcd };
    let spec = r#"{"role": "standby", "standby_config": {"standby_settings": {"primary_host": "site-a"}}}"#;
    assert_exit(&ctl.run(&["init", spec]), 0);
    // A whole spec without `role` (copied from the primary site), or a patch resetting it,
    // is refused, and the cluster stays a standby cluster.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("spec.json");
    std::fs::write(&file, r#"{"max_standbys": 7}"#).unwrap();
    for args in [
        &["update", "--file", file.to_str().unwrap()][..],
        &["update", "--patch", r#"{"role": null}"#][..],
        &["update", "--patch", r#"{"role": "master"}"#][..],
    ] {
        let out = ctl.run(args);
        assert_exit(&out, 1);
        assert!(
            stderr(&out).contains("tendrilctl promote"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(json(&ctl.run(&["spec"]))["role"], "standby");
    let out = ctl.run(&["promote"]);
    assert_exit(&out, 0);
    assert!(stdout(&out).contains("promoted"), "{}", stdout(&out));
    assert_eq!(json(&ctl.run(&["spec"]))["role"], "master");
}

#[test]
fn clusterdata_write_validates_and_round_trips() {
    let etcd = EtcdServer::start();
    let ctl = Ctl { etcd: &etcd };
    assert_exit(&ctl.run(&["init"]), 0);
    let original = stdout(&ctl.run(&["clusterdata", "read"]));

    let unconfirmed = ctl.run_with_stdin(&["clusterdata", "write"], Some(&original));
    assert_exit(&unconfirmed, 2);

    for garbage in [
        "not json",
        r#"{"format_version": 99}"#,
        r#"{"format_version": 1}"#,
    ] {
        let out = ctl.run_with_stdin(&["clusterdata", "write", "--yes"], Some(garbage));
        assert_exit(&out, 1);
        assert_eq!(
            stdout(&ctl.run(&["clusterdata", "read"])),
            original,
            "garbage was written"
        );
    }
    let mut edited: serde_json::Value = serde_json::from_str(&original).unwrap();
    edited["spec"]["max_standbys"] = 0.into();
    let invalid = ctl.run_with_stdin(
        &["clusterdata", "write", "--yes"],
        Some(&edited.to_string()),
    );
    assert_exit(&invalid, 1);
    assert!(
        stderr(&invalid).contains("max_standbys"),
        "{}",
        stderr(&invalid)
    );

    edited["spec"]["max_standbys"] = 4.into();
    let valid = ctl.run_with_stdin(
        &["clusterdata", "write", "--yes"],
        Some(&edited.to_string()),
    );
    assert_exit(&valid, 0);
    assert_eq!(json(&ctl.run(&["spec"]))["max_standbys"], 4);
}

#[test]
fn usage_and_store_errors_have_distinct_exit_codes() {
    let etcd = EtcdServer::start();
    let ctl = Ctl { etcd: &etcd };
    assert_exit(&ctl.run(&["no-such-command"]), 2);
    assert_exit(&ctl.run(&["update"]), 2);
    assert_exit(&ctl.run(&["update", "--patch", "{}", "--file", "x"]), 2);
    assert_exit(&ctl.run(&["--cluster-name", "a/b", "spec"]), 2);
    assert_exit(&ctl.run(&["--store-endpoints", "nonsense", "spec"]), 2);
    assert_exit(&ctl.run(&["init", "{not json"]), 1);

    let dead = format!("http://127.0.0.1:{}", free_port());
    let out = ctl.run(&["--store-endpoints", &dead, "spec"]);
    assert_exit(&out, 1);
    assert!(
        stderr(&out).contains(&dead),
        "error must name the endpoint: {}",
        stderr(&out)
    );

    let defaults = Command::new(env!("CARGO_BIN_EXE_tendrilctl"))
        .args(["spec", "--defaults"])
        .output()
        .unwrap();
    assert_exit(&defaults, 0);
    assert_eq!(json(&defaults)["fail_interval"], "5s");
}

#[test]
fn operations_on_a_running_cluster() {
    let etcd = EtcdServer::start();
    let ctl = Ctl { etcd: &etcd };
    assert_exit(&ctl.run(&["init"]), 0);
    // A cluster as a sentinel would have written it: master on k0, standby on k1, k2 free.
    let mut cd = json(&ctl.run(&["clusterdata", "read"]));
    cd["phase"] = "normal".into();
    cd["master"] = "db0".into();
    let keeper = |uid: &str| serde_json::json!({"uid": uid, "status": {"healthy": true}});
    cd["keepers"] = serde_json::json!({"k0": keeper("k0"), "k1": keeper("k1"), "k2": keeper("k2")});
    let now = cd["change_time"].clone();
    let db = |uid: &str, k: &str, role: &str| serde_json::json!({"uid": uid, "generation": 1, "change_time": now, "spec": {"keeper_uid": k, "role": role}});
    cd["dbs"] =
        serde_json::json!({"db0": db("db0", "k0", "master"), "db1": db("db1", "k1", "standby")});
    assert_exit(
        &ctl.run_with_stdin(&["clusterdata", "write", "--yes"], Some(&cd.to_string())),
        0,
    );

    let status = ctl.run(&["status"]);
    assert_exit(&status, 0);
    let text = stdout(&status);
    assert!(
        text.contains("KEEPER") && text.contains("k0") && text.contains("master"),
        "{text}"
    );
    let st = json(&ctl.run(&["status", "--output", "json"]));
    assert_eq!(st["master"], "db0");
    assert_eq!(st["keepers"].as_array().unwrap().len(), 3);

    let refused = ctl.run(&["removekeeper", "k0"]);
    assert_exit(&refused, 1);
    assert!(
        stderr(&refused).contains("runs the master"),
        "{}",
        stderr(&refused)
    );
    assert_exit(&ctl.run(&["removekeeper", "k1"]), 0);
    let after = json(&ctl.run(&["clusterdata", "read"]));
    assert!(
        after["keepers"].get("k1").is_none() && after["dbs"].get("db1").is_none(),
        "{after}"
    );
    assert_exit(&ctl.run(&["removekeeper", "nobody"]), 1);

    assert_exit(&ctl.run(&["failkeeper", "k0"]), 0);
    assert_eq!(
        json(&ctl.run(&["clusterdata", "read"]))["keepers"]["k0"]["status"]["force_fail"],
        true
    );

    // Promoting a cluster that is not a standby cluster is refused, and changes nothing.
    let before = json(&ctl.run(&["clusterdata", "read"]))["generation"].clone();
    let promote = ctl.run(&["promote"]);
    assert_exit(&promote, 1);
    assert!(
        stderr(&promote).contains("not a standby cluster"),
        "{}",
        stderr(&promote)
    );
    assert_eq!(
        json(&ctl.run(&["clusterdata", "read"]))["generation"],
        before
    );

    // A switchover to a keeper without a standby is refused before anything is written.
    let sw = ctl.run(&["switchover", "--to", "k2", "--timeout", "2s"]);
    assert_exit(&sw, 1);
    assert!(stderr(&sw).contains("no standby"), "{}", stderr(&sw));
    assert!(json(&ctl.run(&["clusterdata", "read"]))["switchover"].is_null());
}

#[test]
fn settings_come_from_a_config_file_and_flags_win() {
    let etcd = EtcdServer::start();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tendrilctl.toml");
    std::fs::write(
        &file,
        format!(
            "cluster_name = \"fromfile\"\nstore_endpoints = [\"{}\"]\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    let ctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tendrilctl"))
            .env_remove("TENDRIL_CLUSTER_NAME")
            .env_remove("TENDRIL_STORE_ENDPOINTS")
            .env_remove("TENDRIL_CONFIG")
            .args(args)
            .output()
            .unwrap()
    };
    let config = file.to_str().unwrap();
    assert_exit(&ctl(&["--config", config, "init"]), 0);
    let spec = ctl(&["spec", "--config", config]);
    assert_exit(&spec, 0);
    // The file named the cluster: a flag names another, which has no data.
    let other = ctl(&["--config", config, "--cluster-name", "other", "spec"]);
    assert_exit(&other, 1);
    assert!(stderr(&other).contains("other"), "{}", stderr(&other));

    std::fs::write(&file, "cluster_name = \"x\"\nno_such_key = 1\n").unwrap();
    let bad = ctl(&["--config", config, "spec"]);
    assert_exit(&bad, 2);
    assert!(stderr(&bad).contains("no_such_key"), "{}", stderr(&bad));
}

#[test]
fn k8s_manifests_are_printed_without_a_store() {
    let manifests = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tendrilctl"))
            .env("TENDRIL_CLUSTER_NAME", "main")
            // Nothing listens there: the command must not need the store.
            .env("TENDRIL_STORE_ENDPOINTS", "http://etcd.db.svc:2379")
            .args([
                "k8s",
                "manifests",
                "--image",
                "registry.example/tendril:0.1.0",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let run = |args: &[&str]| manifests(&[&["--output", "json"], args].concat());
    let kinds = |o: &Output| -> Vec<String> {
        json(o)["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["kind"].as_str().unwrap().to_owned())
            .collect()
    };
    let first = run(&[]);
    assert_exit(&first, 0);
    assert_eq!(kinds(&first)[0], "Secret");
    // Each run generates new passwords.
    let second = run(&[]);
    assert_ne!(
        json(&first)["items"][0]["stringData"],
        json(&second)["items"][0]["stringData"]
    );
    let existing = run(&["--secret", "db-passwords", "--keepers", "5"]);
    assert_exit(&existing, 0);
    assert!(!kinds(&existing).contains(&"Secret".to_owned()));
    assert_eq!(json(&existing)["items"][2]["spec"]["replicas"], 5);
    // YAML by default: the same objects.
    let yaml = manifests(&["--secret", "db-passwords", "--keepers", "5", "--read-only"]);
    assert_exit(&yaml, 0);
    let docs = tendril_k8s::parse_yaml(&String::from_utf8_lossy(&yaml.stdout)).unwrap();
    let existing_ro = run(&["--secret", "db-passwords", "--keepers", "5", "--read-only"]);
    assert_eq!(&docs, json(&existing_ro)["items"].as_array().unwrap());
    assert_eq!(docs.last().unwrap()["metadata"]["name"], "tendril-main-ro");
    let bad = run(&["--sentinels", "1", "--storage-size", "big"]);
    assert_exit(&bad, 2);
    assert!(
        stderr(&bad).contains("--sentinels") && stderr(&bad).contains("--storage-size"),
        "{}",
        stderr(&bad)
    );
}
