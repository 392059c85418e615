//! `cargo xtask bench proxy [--quick]`: the proxy benchmark against direct PostgreSQL, HAProxy
//! and PgBouncer in the same rounds (see bench/proxy/README.md).
//! `cargo xtask bench failover [--runs N] [--only default,partition]`: failover timings of whole clusters (e2e harness).

use std::path::PathBuf;
use std::process::Command;

use crate::{deps, project_root};

/// Runs a benchmark by name.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("proxy") => proxy(args.iter().any(|a| a == "--quick")),
        Some("failover") => failover(&args[1..]),
        Some("fence") => fence(),
        _ => {
            anyhow::bail!("usage: cargo xtask bench proxy [--quick] | failover [--runs N] | fence")
        }
    }
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| project_root().join("target"), PathBuf::from)
}

fn proxy(quick: bool) -> anyhow::Result<()> {
    deps::ensure(deps::Purpose::Test)?;
    let bench = project_root().join("bench/proxy");
    let installed = [
        "/usr/sbin/haproxy",
        "/usr/sbin/pgbouncer",
        "/usr/bin/pidstat",
    ]
    .iter()
    .all(|p| std::path::Path::new(p).exists());
    if !installed {
        crate::run(Command::new("bash").arg(bench.join("install.sh")))?;
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(Command::new(&cargo).args([
        "build",
        "--release",
        "-p",
        "tendril-proxy",
        "-p",
        "tendril-control",
    ]))?;
    // The probe's minimal sockmap proxy, the reference for the kernel path
    // (bench/proxy/replica/).
    let replica = target_dir().join("sockmap-replica");
    crate::run(
        Command::new("bash")
            .arg(bench.join("replica/build.sh"))
            .arg(&replica),
    )?;
    let run_dir = "/tmp/proxy-anchor/run";
    let mut cmd = Command::new("bash");
    cmd.arg(bench.join("run_all.sh"))
        .current_dir(&bench)
        .env("TENDRIL_BIN", target_dir().join("release"))
        .env("REPLICA_DIR", &replica)
        .env("PRE_BENCH_HOOK", bench.join("tendril-up.sh"))
        .env(
            "EXTRA_TARGET",
            format!(
                "tendril-uring:25500::{run_dir}/tendril-uring.pid,tendril-epoll:25501::{run_dir}/tendril-epoll.pid,tendril-kernel:25502::{run_dir}/tendril-kernel.pid,tendril-kernel-pair:25505::{run_dir}/tendril-kernel-pair.pid,sockmap-replica:25503::{run_dir}/replica.pid"
            ),
        );
    if quick {
        cmd.env("ROUNDS", "1")
            .env("DURATION_SCALE", "0.25")
            .env("MAX_LOAD", "100");
    }
    crate::run(&mut cmd)
}

/// `cargo xtask bench failover [--runs N] [--only WORDS]`: release binaries, then the failover timing runs.
fn failover(args: &[String]) -> anyhow::Result<()> {
    deps::ensure(deps::Purpose::Test)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(Command::new(&cargo).args([
        "build",
        "--release",
        "--bins",
        "-p",
        "tendril-keeper",
        "-p",
        "tendril-sentinel",
        "-p",
        "tendril-proxy",
        "-p",
        "tendril-control",
        "-p",
        "tendril-e2e",
    ]))?;
    let release = target_dir().join("release");
    crate::run(
        Command::new(release.join("failover-bench"))
            .args(args)
            .env("TENDRIL_BIN_DIR", &release),
    )
}

/// `cargo xtask bench fence`: cluster-data write to last old-master connection closed.
fn fence() -> anyhow::Result<()> {
    deps::ensure(deps::Purpose::Test)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    crate::run(Command::new(&cargo).args([
        "build",
        "--release",
        "--bins",
        "-p",
        "tendril-proxy",
        "-p",
        "tendril-keeper",
        "-p",
        "tendril-sentinel",
        "-p",
        "tendril-control",
        "-p",
        "tendril-e2e",
    ]))?;
    let release = target_dir().join("release");
    crate::run(Command::new(release.join("fence-bench")).env("TENDRIL_BIN_DIR", &release))
}
