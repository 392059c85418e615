//! A pgBackRest repository for tests of WAL archiving, backups and point-in-time recovery:
//! Debian's pgbackrest, run as postgres, with its repository, logs and locks in a temporary
//! directory.

use std::path::Path;
use std::process::Command;

use crate::{Cluster, Options, SU_PASSWORD};

/// A pgBackRest repository and its settings, owned by postgres (which runs the commands).
#[derive(Debug)]
pub struct Repository {
    dir: tempfile::TempDir,
}

impl Repository {
    /// Creates the repository and its settings file (stanza `main`).
    pub fn create() -> Repository {
        assert!(
            Path::new("/usr/bin/pgbackrest").exists(),
            "pgbackrest missing: cargo xtask deps installs Debian's pgbackrest"
        );
        let dir = tempfile::Builder::new()
            .prefix("tendril-pgbackrest-")
            .tempdir()
            .unwrap();
        let postgres = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("the postgres user (Debian's postgresql package)");
        for sub in ["", "repo", "log", "lock", "spool"] {
            let path = dir.path().join(sub);
            std::fs::create_dir_all(&path).unwrap();
            std::os::unix::fs::chown(
                &path,
                Some(postgres.uid.as_raw()),
                Some(postgres.gid.as_raw()),
            )
            .unwrap();
        }
        let p = dir.path().display();
        std::fs::write(
            dir.path().join("pgbackrest.conf"),
            format!(
                "[global]\nrepo1-path={p}/repo\nlog-path={p}/log\nlock-path={p}/lock\n\
                 spool-path={p}/spool\nstart-fast=y\nlog-level-console=warn\n\
                 log-level-file=info\narchive-timeout=30\n\n[main]\n"
            ),
        )
        .unwrap();
        Repository { dir }
    }

    /// `pgbackrest` with this repository's settings and the stanza, as the archive and
    /// restore commands in the spec write it. A relative WAL path (`%p`) is resolved
    /// against `--pg1-path`, which is the data directory the command runs in.
    pub fn command(&self) -> String {
        format!(
            "pgbackrest --config={} --stanza=main",
            self.dir.path().join("pgbackrest.conf").display()
        )
    }

    /// Runs a pgBackRest command against `cluster`'s master, as postgres.
    pub fn run(&self, cluster: &Cluster, master: &str, args: &str) -> String {
        let node = cluster.node(master);
        let line = format!(
            "{} --pg1-path={} --pg1-socket-path={} --pg1-port={} {args}",
            self.command(),
            node.data_dir.join("postgres").display(),
            node.data_dir.join("run").display(),
            node.port
        );
        let out = Command::new("setpriv")
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "sh",
                "-c",
                &line,
            ])
            .env("PGPASSWORD", SU_PASSWORD)
            .current_dir("/")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{line}: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// The spec of a cluster that archives to `repo` (`archive_mode = on`: on its master), with
/// `pg_parameters` added.
pub fn archiving_spec(repo: &Repository, pg_parameters: serde_json::Value) -> serde_json::Value {
    let mut parameters = serde_json::json!({
        "archive_mode": "on",
        "archive_command": format!("{} --pg1-path=\"$PWD\" archive-push %p", repo.command()),
    });
    if let (Some(all), Some(more)) = (parameters.as_object_mut(), pg_parameters.as_object()) {
        all.extend(more.clone());
    }
    serde_json::json!({"use_pg_rewind": true, "pg_parameters": parameters})
}

/// A cluster of two keepers with `spec` (see [`archiving_spec`]), its stanza created and a
/// full backup taken; and its master.
pub async fn archiving_cluster(repo: &Repository, spec: serde_json::Value) -> (Cluster, String) {
    let source = Cluster::start(Options {
        keepers: 2,
        sentinels: 1,
        proxies: 1,
        spec: spec.to_string(),
        ..Options::default()
    })
    .await;
    let master = source.master_keeper().await.unwrap();
    repo.run(&source, &master, "stanza-create");
    repo.run(&source, &master, "backup --type=full");
    (source, master)
}
