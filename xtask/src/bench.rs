//! `cargo xtask bench proxy [--quick] [--only TARGETS] [--tests TESTS] [--topology local|remote]`:
//! the proxy benchmark against direct PostgreSQL, HAProxy and PgBouncer in the same rounds (see
//! bench/proxy/README.md); `--only` and `--tests` take comma-separated names and run a focused
//! comparison (direct is always in it). `--topology remote` runs PostgreSQL in a network
//! namespace behind a veth pair (another host, as deployed; no sockmap replica there), `local`
//! (the default) beside the proxies on 127.0.0.1.
//! `cargo xtask bench failover [--runs N] [--only default,partition]`: failover timings of whole clusters (e2e harness).
//! `cargo xtask bench rollout [--topology local|remote]`: new and persistent connections
//! across proxy replacements, tendril's `--takeover` against HAProxy's seamless reload
//! (bench/proxy/rollout.sh).
//! `cargo xtask bench reads`: pgbench -S through a proxy's listen address and through its
//! read-only listener on a local three-keeper cluster (bench/proxy/reads.sh).
//! `cargo xtask bench switches [--topology remote|local]`: context switches per transaction,
//! machine-wide, directly and through tendril (bench/proxy/switches.sh; remote by default).

use std::path::PathBuf;
use std::process::Command;

use crate::{deps, project_root};

/// Runs a benchmark by name.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    match args.first().map(String::as_str) {
        Some("proxy") => proxy(&ProxyArgs::parse(&args[1..])?),
        Some("failover") => failover(&args[1..]),
        Some("fence") => fence(),
        Some("rollout") => rollout(&args[1..]),
        Some("reads") if args.len() == 1 => reads(),
        Some("switches") => switches(&args[1..]),
        _ => {
            anyhow::bail!(
                "usage: cargo xtask bench proxy [--quick] [--only TARGETS] [--tests TESTS] \
                 [--topology local|remote] | failover [--runs N] | fence | rollout \
                 [--topology local|remote] | reads | switches [--topology remote|local]"
            )
        }
    }
}

/// The cargo target directory.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| project_root().join("target"), PathBuf::from)
}

/// The tendril proxies `bench/proxy/tendril-up.sh` starts (name, port, pid file name) and the
/// probe's sockmap replica.
const TENDRIL_TARGETS: [(&str, u16, &str); 7] = [
    ("tendril-default", 25507, "tendril-default"),
    ("tendril-uring", 25500, "tendril-uring"),
    ("tendril-epoll", 25501, "tendril-epoll"),
    ("tendril-kernel", 25502, "tendril-kernel"),
    ("tendril-kernel-pair", 25505, "tendril-kernel-pair"),
    ("tendril-uring-w1", 25506, "tendril-uring-w1"),
    ("sockmap-replica", 25503, "replica"),
];

/// The harness's own targets (bench.py's BUILTIN).
const BUILTIN_TARGETS: [&str; 4] = ["direct", "haproxy", "pgb-session", "pgb-txn"];

/// The target that needs PostgreSQL on 127.0.0.1 (the replica connects to loopback), so
/// only runs in the local topology.
const LOCAL_ONLY_TARGET: &str = "sockmap-replica";

/// Where the harness runs PostgreSQL (bench/proxy/README.md, "Topologies").
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// On 127.0.0.1, beside the proxies and pgbench.
    #[default]
    Local,
    /// In a network namespace behind a veth pair: another host.
    Remote,
}

impl Topology {
    /// The harness's `TOPOLOGY` value.
    fn as_str(self) -> &'static str {
        match self {
            Topology::Local => "local",
            Topology::Remote => "remote",
        }
    }
}

/// Options of `bench proxy`.
#[derive(Debug, Default)]
struct ProxyArgs {
    quick: bool,
    only: Option<Vec<String>>,
    tests: Option<String>,
    topology: Topology,
}

impl ProxyArgs {
    fn parse(args: &[String]) -> anyhow::Result<ProxyArgs> {
        let mut out = ProxyArgs::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--quick" => out.quick = true,
                "--only" => {
                    let list = it
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--only needs a comma-separated list"))?;
                    let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                    for name in &names {
                        let known = BUILTIN_TARGETS.contains(&name.as_str())
                            || TENDRIL_TARGETS.iter().any(|t| t.0 == name);
                        if !known {
                            anyhow::bail!(
                                "unknown target {name:?}; known: {}, {}",
                                BUILTIN_TARGETS.join(", "),
                                TENDRIL_TARGETS.map(|t| t.0).join(", ")
                            );
                        }
                    }
                    out.only = Some(names);
                }
                "--tests" => {
                    let list = it
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--tests needs a comma-separated list"))?;
                    for test in list.split(',') {
                        if !["select", "tpcb", "churn", "lat1"].contains(&test) {
                            anyhow::bail!(
                                "unknown test {test:?}; known: select, tpcb, churn, lat1"
                            );
                        }
                    }
                    out.tests = Some(list.clone());
                }
                "--topology" => {
                    let value = it
                        .next()
                        .ok_or_else(|| anyhow::anyhow!("--topology needs local or remote"))?;
                    out.topology = match value.as_str() {
                        "local" => Topology::Local,
                        "remote" => Topology::Remote,
                        other => anyhow::bail!("--topology {other:?}: local or remote"),
                    };
                }
                other => anyhow::bail!("unknown option {other:?} for bench proxy"),
            }
        }
        let named_local_only = out
            .only
            .as_ref()
            .is_some_and(|only| only.iter().any(|n| n == LOCAL_ONLY_TARGET));
        if out.topology == Topology::Remote && named_local_only {
            anyhow::bail!(
                "{LOCAL_ONLY_TARGET} needs PostgreSQL on 127.0.0.1: not with --topology remote"
            );
        }
        Ok(out)
    }

    fn wants(&self, name: &str) -> bool {
        if name == LOCAL_ONLY_TARGET && self.topology == Topology::Remote {
            return false;
        }
        self.only
            .as_ref()
            .is_none_or(|only| name == "direct" || only.iter().any(|n| n == name))
    }
}

fn proxy(args: &ProxyArgs) -> anyhow::Result<()> {
    let bench = harness_with_release()?;
    // The probe's minimal sockmap proxy, the reference for the kernel path
    // (bench/proxy/replica/); it connects to PostgreSQL on 127.0.0.1, so local topology only.
    let replica = target_dir().join("sockmap-replica");
    let local = args.topology == Topology::Local;
    if local {
        crate::run(
            Command::new("bash")
                .arg(bench.join("replica/build.sh"))
                .arg(&replica),
        )?;
    } else {
        eprintln!(
            "note: --topology remote: no {LOCAL_ONLY_TARGET} (it needs PostgreSQL on 127.0.0.1)"
        );
    }
    let run_dir = "/tmp/proxy-anchor/run";
    let extra: Vec<String> = TENDRIL_TARGETS
        .iter()
        .filter(|t| args.wants(t.0))
        .map(|(name, port, pid)| format!("{name}:{port}::{run_dir}/{pid}.pid"))
        .collect();
    let builtin: Vec<&str> = BUILTIN_TARGETS
        .into_iter()
        .filter(|t| args.wants(t))
        .collect();
    let mut cmd = Command::new("bash");
    cmd.arg(bench.join("run_all.sh"))
        .current_dir(&bench)
        .env("TENDRIL_BIN", target_dir().join("release"))
        .env("PRE_BENCH_HOOK", bench.join("tendril-up.sh"))
        .env("EXTRA_TARGET", extra.join(","))
        .env("TARGETS", builtin.join(","))
        .env("TOPOLOGY", args.topology.as_str());
    if local {
        cmd.env("REPLICA_DIR", &replica);
    }
    if let Some(tests) = &args.tests {
        cmd.env("TESTS", tests);
    }
    if args.quick {
        cmd.env("ROUNDS", "1")
            .env("DURATION_SCALE", "0.25")
            .env("MAX_LOAD", "100");
    }
    crate::run(&mut cmd)
}

/// `cargo xtask bench rollout [--topology local|remote]`: release binaries, the harness's
/// set-up, then bench/proxy/rollout.sh.
fn rollout(args: &[String]) -> anyhow::Result<()> {
    let topology = topology_only(args, Topology::Local).ok_or_else(|| {
        anyhow::anyhow!("usage: cargo xtask bench rollout [--topology local|remote]")
    })?;
    let bench = harness_with_release()?;
    crate::run(
        Command::new("bash")
            .arg(bench.join("run_all.sh"))
            .current_dir(&bench)
            .env("TENDRIL_BIN", target_dir().join("release"))
            .env("PRE_BENCH_HOOK", bench.join("tendril-up.sh"))
            .env(
                "BENCH_CMD",
                format!("bash {}", bench.join("rollout.sh").display()),
            )
            .env("TOPOLOGY", topology.as_str()),
    )
}

/// `cargo xtask bench switches [--topology remote|local]`: release binaries, then
/// bench/proxy/switches.sh (which sets up and tears down the harness itself).
fn switches(args: &[String]) -> anyhow::Result<()> {
    let topology = topology_only(args, Topology::Remote).ok_or_else(|| {
        anyhow::anyhow!("usage: cargo xtask bench switches [--topology remote|local]")
    })?;
    let bench = harness_with_release()?;
    crate::run(
        Command::new("bash")
            .arg(bench.join("switches.sh"))
            .current_dir(&bench)
            .env("TENDRIL_BIN", target_dir().join("release"))
            .env("TOPOLOGY", topology.as_str()),
    )
}

/// The topology of a benchmark whose only option is `--topology` (`default` without it);
/// None for anything else.
fn topology_only(args: &[String], default: Topology) -> Option<Topology> {
    match args {
        [] => Some(default),
        [flag, value] if flag == "--topology" && value == "local" => Some(Topology::Local),
        [flag, value] if flag == "--topology" && value == "remote" => Some(Topology::Remote),
        _ => None,
    }
}

/// What the harness scripts need: the test dependencies, the reference proxies, pidstat and
/// perf (bench/proxy/install.sh) and the release binaries. Returns bench/proxy.
fn harness_with_release() -> anyhow::Result<PathBuf> {
    deps::ensure(deps::Purpose::Test)?;
    let bench = project_root().join("bench/proxy");
    let installed = [
        "/usr/sbin/haproxy",
        "/usr/sbin/pgbouncer",
        "/usr/bin/pidstat",
        "/usr/bin/perf",
    ]
    .iter()
    .all(|p| std::path::Path::new(p).exists());
    if !installed {
        crate::run(Command::new("bash").arg(bench.join("install.sh")))?;
    }
    build_release(&["-p", "tendril-proxy", "-p", "tendril-control"])?;
    Ok(bench)
}

/// `cargo xtask bench reads`: a local cluster of release binaries (`cargo xtask up
/// --release`, in a state directory of its own), bench/proxy/reads.sh, then the cluster
/// stopped whatever the result.
fn reads() -> anyhow::Result<()> {
    let state = "/var/tmp/tendril-bench-reads";
    crate::up::up(&["--detach", "--release", "--state-dir", state].map(String::from))?;
    let bench = project_root().join("bench/proxy");
    let result = crate::run(
        Command::new("bash")
            .arg(bench.join("reads.sh"))
            .current_dir(&bench)
            .env("STATE", state),
    );
    crate::up::down(&["--state-dir", state].map(String::from))?;
    result
}

/// `cargo build --release` with `args` (packages, `--bins`).
fn build_release(args: &[&str]) -> anyhow::Result<()> {
    crate::cargo_build(&[&["--release"], args].concat())
}

/// The shipped binaries and the end-to-end crate's (the failover and fence benchmarks), in
/// release mode.
fn build_release_with_e2e() -> anyhow::Result<()> {
    build_release(
        &[
            &["--bins"],
            &crate::SHIPPED_PACKAGES[..],
            &["-p", "tendril-e2e"],
        ]
        .concat(),
    )
}

/// `cargo xtask bench failover [--runs N] [--only WORDS]`: release binaries, then the failover timing runs.
fn failover(args: &[String]) -> anyhow::Result<()> {
    deps::ensure(deps::Purpose::Test)?;
    build_release_with_e2e()?;
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
    build_release_with_e2e()?;
    let release = target_dir().join("release");
    crate::run(Command::new(release.join("fence-bench")).env("TENDRIL_BIN_DIR", &release))
}

#[cfg(test)]
mod tests {
    use super::ProxyArgs;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn only_keeps_direct_and_the_named_targets() {
        let parsed = ProxyArgs::parse(&args(&["--only", "haproxy,tendril-uring-w1"])).unwrap();
        assert!(parsed.wants("direct"));
        assert!(parsed.wants("haproxy"));
        assert!(parsed.wants("tendril-uring-w1"));
        assert!(!parsed.wants("tendril-uring"));
        assert!(!parsed.wants("pgb-txn"));
        assert!(ProxyArgs::parse(&[]).unwrap().wants("pgb-txn"));
    }

    #[test]
    fn unknown_names_are_refused_with_the_known_ones() {
        let err = ProxyArgs::parse(&args(&["--only", "haproxy,nginx"])).unwrap_err();
        assert!(err.to_string().contains("\"nginx\""), "{err}");
        assert!(err.to_string().contains("tendril-uring-w1"), "{err}");
        assert!(ProxyArgs::parse(&args(&["--tests", "select,bogus"])).is_err());
        assert!(ProxyArgs::parse(&args(&["--only"])).is_err());
        assert!(ProxyArgs::parse(&args(&["--fast"])).is_err());
    }

    #[test]
    fn topology_defaults_to_local_and_remote_drops_the_replica() {
        let local = ProxyArgs::parse(&[]).unwrap();
        assert_eq!(local.topology.as_str(), "local");
        assert!(local.wants("sockmap-replica"));
        let explicit = ProxyArgs::parse(&args(&["--topology", "local", "--quick"])).unwrap();
        assert_eq!(explicit.topology.as_str(), "local");
        assert!(explicit.quick);
        let remote = ProxyArgs::parse(&args(&["--tests", "lat1", "--topology", "remote"])).unwrap();
        assert_eq!(remote.topology.as_str(), "remote");
        assert!(remote.wants("direct"));
        assert!(remote.wants("tendril-kernel"));
        assert!(!remote.wants("sockmap-replica"));
    }

    #[test]
    fn bad_topologies_are_refused() {
        let err = |a: &[&str]| ProxyArgs::parse(&args(a)).unwrap_err().to_string();
        assert!(err(&["--topology", "moon"]).contains("local or remote"));
        assert!(err(&["--topology"]).contains("local or remote"));
        let only_replica = ["--only", "sockmap-replica", "--topology", "remote"];
        assert!(err(&only_replica).contains("sockmap-replica"));
        assert!(ProxyArgs::parse(&args(&["--only", "sockmap-replica"])).is_ok());
    }
}
