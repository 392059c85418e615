//! Project automation, run as `cargo xtask <command>`:
//!
//! - `up` / `down`: a local cluster (etcd, keepers, sentinels, proxies) on loopback.
//! - `test`: what CI runs. Installs missing system packages (as root on Debian), then checks
//!   formatting, runs clippy with warnings denied, and runs every test.
//! - `deps [--check]`: the probe table of system files the build and tests use (deps.rs), and
//!   without `--check` the installation of what is missing.
//! - `build-ebpf`: compiles the BPF objects (the loader's build script runs the same step).
//! - `bench proxy`: the proxy benchmark (bench/proxy/README.md).
//!
//! Commands are plain `std::process::Command` calls from the workspace root, so this crate
//! builds in seconds on a fresh machine, before anything it installs is needed.

mod bench;
mod deps;
mod dist;
mod soak;
mod test;
mod tidy;
mod up;

use std::path::PathBuf;
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(&args[1..]),
        Some("deps") => deps::run(&args[1..]),
        Some("dist") => dist::run(&args[1..]),
        Some("bench") => bench::run(&args[1..]),
        Some("soak") => soak::run(&args[1..]),
        Some("build-ebpf") => build_ebpf(),
        Some("up") => up::up(&args[1..]),
        Some("down") => up::down(&args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            return if args.is_empty() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
        Some(other) => {
            eprint!("unknown command {other:?}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

const USAGE: &str = "\
usage: cargo xtask <command>

commands:
  up [--keepers N] [--sentinels N] [--proxies N] [--sync] [--state-dir DIR] [--detach]
     [--release]
                     a local HA cluster on loopback: etcd, keepers, sentinels, proxy
  down [--state-dir DIR]
                     stop it
  test [--no-lint]   install what the tests need, then fmt check, clippy, every test
  deps [--check]     print each file the build and tests use, whether present, and its
                     Debian package; without --check, install what is missing (root)
  build-ebpf         compile the BPF programs (clang) into <target>/bpf
  dist               a tarball for hosts: release binaries, systemd units, sample settings
  bench proxy [--quick] [--only T,..] [--tests T,..] [--topology local|remote]
                     pgbench: direct vs tendril vs HAProxy vs PgBouncer (bench/proxy);
                     remote: PostgreSQL in a network namespace behind a veth pair
  bench failover [--runs N]
                     failover timings of whole clusters under faults
  bench fence        cluster-data write to the last old-master connection closed
  bench reads        pgbench -S through the master listener and the read-only listener
                     (two standbys) of a local cluster, with CPU per transaction
  soak proxy [--minutes N | --seconds N] [--seed S] [--paths P,..] [--topology T]
                     the proxy under clients and random faults (seed printed, replayable);
                     paths: userspace-io-uring, userspace-epoll, kernel-pair,
                     kernel-client-socket, default; topology: remote (default), local, both
  soak cluster [--minutes N | --seconds N] [--seed S] [--mode sync|async] [--keepers N]
               [--proxies N] [--sentinels N] [--dir D]
                     a whole cluster (keepers on hosts of their own) under writers,
                     readers and random faults; the checker reads the history it writes
";

/// `cargo xtask build-ebpf`: the same `ebpf/bpf/build.sh` the loader's build script runs.
fn build_ebpf() -> anyhow::Result<()> {
    deps::ensure(deps::Purpose::Test)?;
    let out = bench::target_dir().join("bpf");
    run(Command::new("bash")
        .arg(project_root().join("ebpf/bpf/build.sh"))
        .arg(&out))
}

/// The workspace root.
pub fn project_root() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")), PathBuf::from);
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// The packages of the shipped binaries (keeper, sentinel, proxy, tendrilctl), as cargo
/// arguments.
pub const SHIPPED_PACKAGES: [&str; 8] = [
    "-p",
    "tendril-keeper",
    "-p",
    "tendril-sentinel",
    "-p",
    "tendril-proxy",
    "-p",
    "tendril-control",
];

/// `cargo build` (the cargo running xtask) with `args`.
pub fn cargo_build(args: &[&str]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    run(Command::new(cargo).arg("build").args(args))
}

/// Runs a command from the workspace root, echoing it, and fails if it fails.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    cmd.current_dir(project_root());
    eprintln!("$ {}", display(cmd));
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {}: {e}", display(cmd)))?;
    if !status.success() {
        anyhow::bail!("{} failed ({status})", display(cmd));
    }
    Ok(())
}

fn display(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}
