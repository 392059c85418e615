//! The Dockerfile the documentation tells users to build agrees with the manifests and the
//! code: it cannot be built where tendril is developed (no container runtime), so what the
//! manifests rely on is checked in its text.
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::path::PathBuf;

use tendril_k8s::{Manifest, Options, RUN_AS, manifests};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dockerfile() -> String {
    std::fs::read_to_string(root().join("Dockerfile")).unwrap()
}

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn instructions() -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in dockerfile().lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(part) => current.push_str(part),
            None => {
                current.push_str(line);
                out.push(std::mem::take(&mut current));
            }
        }
    }
    out
}

#[test]
fn the_image_holds_every_command_the_manifests_run() {
    let built = instructions()
        .into_iter()
        .find(|i| i.starts_with("RUN ") && i.contains("cargo build"))
        .unwrap();
    let o = Options::new("main", "img", vec!["http://etcd:2379".into()]);
    for m in manifests(&o).unwrap() {
        let spec = match m {
            Manifest::StatefulSet(s) => s.spec.unwrap().template.spec,
            Manifest::Deployment(d) => d.spec.unwrap().template.spec,
            Manifest::DaemonSet(d) => d.spec.unwrap().template.spec,
            _ => continue,
        };
        let command = spec.unwrap().containers[0].command.clone().unwrap();
        assert!(
            built.contains(&format!("target/release/{}", command[0])),
            "{} is not copied into the image: {built}",
            command[0]
        );
    }
    assert!(
        instructions().contains(&"COPY --from=build /out/ /usr/local/bin/".to_owned()),
        "the binaries must land on PATH"
    );
}

#[test]
fn the_image_runs_as_the_user_the_pods_run_as() {
    let instructions = instructions();
    assert!(instructions.contains(&format!("USER {RUN_AS}:{RUN_AS}")));
    let setup = instructions.iter().find(|i| i.contains("useradd")).unwrap();
    assert!(setup.contains(&format!("useradd --uid {RUN_AS} --gid {RUN_AS}")));
    assert!(setup.contains(&format!("groupadd --gid {RUN_AS}")));
}

#[test]
fn the_image_has_postgresql_where_the_keeper_looks_and_the_pinned_toolchain() {
    let runtime = instructions()
        .into_iter()
        .find(|i| i.contains("apt-get install") && i.contains("postgresql-"))
        .unwrap();
    // The keeper's default --pg-bin-path.
    let keeper_config = std::fs::read_to_string(root().join("keeper/src/config.rs")).unwrap();
    assert!(keeper_config.contains("default_value = \"/usr/lib/postgresql/15/bin\""));
    assert!(runtime.contains("postgresql-15 "), "{runtime}");
    assert!(instructions().contains(&"FROM debian:12-slim".to_owned()));

    let toolchain = std::fs::read_to_string(root().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .unwrap()
        .trim_matches('"');
    assert!(
        instructions().contains(&format!("FROM rust:{channel}-bookworm AS build")),
        "the build stage must use the pinned toolchain {channel}"
    );
}
