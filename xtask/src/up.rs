//! `cargo xtask up` / `down`: a local tendril cluster on loopback (etcd, keepers running
//! PostgreSQL 15, sentinels, proxies), for trying tendril out.
//!
//! Everything lives in a state directory (default `/var/tmp/tendril-local`, which PostgreSQL's
//! own user can reach when this runs as root): data, logs, pid files, passwords. The
//! processes run in their own process group, so the cluster outlives `up` with `--detach`;
//! without it, `up` stays in the foreground and Ctrl-C stops the cluster, as `down` does.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::deps;

const CLUSTER: &str = "local";
const ETCD_PORT: u16 = 25479;
const ETCD_PEER_PORT: u16 = 25480;
const PROXY_PORT: u16 = 25432;
/// The first proxy's read-only listener (standbys); the next proxies take the next ports.
const READ_ONLY_PORT: u16 = 25450;
const KEEPER_PORT: u16 = 25440;
const METRICS_PORT: u16 = 25490;

/// Parsed `up` options.
#[derive(Debug)]
struct UpOptions {
    keepers: usize,
    sentinels: usize,
    proxies: usize,
    sync: bool,
    state: PathBuf,
    detach: bool,
    /// Release binaries (the benchmarks), instead of debug ones.
    release: bool,
}

fn default_state() -> PathBuf {
    PathBuf::from("/var/tmp/tendril-local")
}

fn parse(args: &[String]) -> anyhow::Result<UpOptions> {
    let mut o = UpOptions {
        keepers: 3,
        sentinels: 2,
        proxies: 1,
        sync: false,
        state: default_state(),
        detach: false,
        release: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            "--keepers" => o.keepers = value("--keepers")?.parse()?,
            "--sentinels" => o.sentinels = value("--sentinels")?.parse()?,
            "--proxies" => o.proxies = value("--proxies")?.parse()?,
            "--state-dir" => o.state = PathBuf::from(value("--state-dir")?),
            "--sync" => o.sync = true,
            "--detach" => o.detach = true,
            "--release" => o.release = true,
            other => bail!("unknown option {other:?} (cargo xtask help)"),
        }
    }
    if o.keepers == 0
        || o.keepers > 9
        || o.sentinels == 0
        || o.sentinels > 9
        || o.proxies == 0
        || o.proxies > 9
    {
        bail!("use 1 to 9 keepers, sentinels and proxies");
    }
    Ok(o)
}

fn bin_dir(release: bool) -> PathBuf {
    crate::bench::target_dir().join(if release { "release" } else { "debug" })
}

/// `cargo xtask up`.
pub fn up(args: &[String]) -> anyhow::Result<()> {
    let o = parse(args)?;
    deps::ensure(deps::Purpose::Test)?;
    if o.state.join("pids").is_dir() && running_pids(&o.state).next().is_some() {
        bail!(
            "a local cluster already runs from {} (cargo xtask down stops it)",
            o.state.display()
        );
    }
    for port in std::iter::once(ETCD_PORT)
        .chain(std::iter::once(ETCD_PEER_PORT))
        .chain((0..o.keepers).map(|i| KEEPER_PORT + i as u16))
        .chain((0..o.proxies).map(|i| PROXY_PORT + i as u16))
        .chain((0..o.proxies).map(|i| READ_ONLY_PORT + i as u16))
    {
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            bail!(
                "port {port} on 127.0.0.1 is taken; stop what uses it (cargo xtask down, if it is an earlier cluster)"
            );
        }
    }
    eprintln!("building the binaries...");
    let mode: &[&str] = if o.release { &["--release"] } else { &[] };
    crate::cargo_build(&[mode, &["--bins"], &crate::SHIPPED_PACKAGES[..]].concat())?;
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    ctrlc::set_handler(move || s.store(true, Ordering::SeqCst))
        .context("install the Ctrl-C handler")?;
    let result = start_cluster(&o, &stop, started);
    if let Err(e) = result {
        eprintln!(
            "up failed: {e:#}; stopping what was started (logs in {})",
            o.state.join("logs").display()
        );
        down_dir(&o.state);
        return Err(e);
    }
    if o.detach {
        println!("the cluster keeps running; stop it with: cargo xtask down");
        return Ok(());
    }
    println!("press Ctrl-C to stop the cluster (or run cargo xtask down from another terminal)");
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
        if running_pids(&o.state).next().is_none() {
            println!("the cluster was stopped");
            return Ok(());
        }
    }
    println!("\nstopping the cluster...");
    down_dir(&o.state);
    Ok(())
}

fn start_cluster(o: &UpOptions, stop: &AtomicBool, started: Instant) -> anyhow::Result<()> {
    let state = &o.state;
    let _ = std::fs::remove_dir_all(state);
    for d in ["pids", "logs", "data"] {
        std::fs::create_dir_all(state.join(d))
            .with_context(|| format!("create {}", state.display()))?;
    }
    // PostgreSQL runs as its own user when we are root: it must reach the data directories.
    set_mode(state, 0o755)?;
    set_mode(&state.join("data"), 0o755)?;
    let password = format!("{:016x}", random());
    std::fs::write(state.join("su.pw"), &password)?;
    std::fs::write(state.join("repl.pw"), format!("{:016x}", random()))?;
    set_mode(&state.join("su.pw"), 0o600)?;
    set_mode(&state.join("repl.pw"), 0o600)?;
    let endpoint = format!("http://127.0.0.1:{ETCD_PORT}");
    let bins = bin_dir(o.release);

    step(stop, started, "starting etcd", || {
        spawn(
            state,
            "etcd",
            Command::new("etcd").args([
                "--name=local".to_owned(),
                format!("--data-dir={}", state.join("data/etcd").display()),
                format!("--listen-client-urls={endpoint}"),
                format!("--advertise-client-urls={endpoint}"),
                format!("--listen-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{ETCD_PEER_PORT}"),
                format!("--initial-cluster=local=http://127.0.0.1:{ETCD_PEER_PORT}"),
            ]),
        )?;
        wait_until(stop, Duration::from_secs(30), || {
            ctl(&bins, &endpoint, &["clusterdata", "read"])
                .map(|o| String::from_utf8_lossy(&o.stderr).contains("does not exist"))
                .unwrap_or(false)
        })
    })?;
    let spec = format!(
        r#"{{"synchronous_replication": {}, "use_pg_rewind": true}}"#,
        o.sync
    );
    step(stop, started, "initialising the cluster data", || {
        let out = ctl(&bins, &endpoint, &["init", &spec])?;
        if !out.status.success() {
            bail!("tendrilctl init: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    })?;
    step(
        stop,
        started,
        &format!(
            "starting {} keepers, {} sentinels, {} proxies",
            o.keepers, o.sentinels, o.proxies
        ),
        || {
            for i in 0..o.keepers {
                let data = state.join(format!("data/keeper{i}"));
                spawn(
                    state,
                    &format!("keeper{i}"),
                    Command::new(bins.join("tendril-keeper")).args([
                        "--cluster-name".to_owned(),
                        CLUSTER.into(),
                        "--store-endpoints".into(),
                        endpoint.clone(),
                        "--uid".into(),
                        format!("keeper{i}"),
                        "--data-dir".into(),
                        data.to_string_lossy().into_owned(),
                        "--pg-port".into(),
                        (KEEPER_PORT + i as u16).to_string(),
                        "--pg-su-passwordfile".into(),
                        state.join("su.pw").to_string_lossy().into_owned(),
                        "--pg-repl-passwordfile".into(),
                        state.join("repl.pw").to_string_lossy().into_owned(),
                    ]),
                )?;
            }
            for i in 0..o.sentinels {
                spawn(
                    state,
                    &format!("sentinel{i}"),
                    Command::new(bins.join("tendril-sentinel")).args([
                        "--cluster-name".to_owned(),
                        CLUSTER.into(),
                        "--store-endpoints".into(),
                        endpoint.clone(),
                        "--metrics-address".into(),
                        format!("127.0.0.1:{}", METRICS_PORT + 1 + i as u16),
                    ]),
                )?;
            }
            for i in 0..o.proxies {
                spawn(
                    state,
                    &format!("proxy{i}"),
                    Command::new(bins.join("tendril-proxy")).args([
                        "--cluster-name".to_owned(),
                        CLUSTER.into(),
                        "--store-endpoints".into(),
                        endpoint.clone(),
                        "--listen-address".into(),
                        format!("127.0.0.1:{}", PROXY_PORT + i as u16),
                        "--read-only-listen-address".into(),
                        format!("127.0.0.1:{}", READ_ONLY_PORT + i as u16),
                        "--metrics-address".into(),
                        format!("127.0.0.1:{}", METRICS_PORT - 1 - i as u16),
                        "--uid".into(),
                        format!("proxy{i}"),
                    ]),
                )?;
            }
            Ok(())
        },
    )?;
    let uri = format!("postgres://postgres:{password}@127.0.0.1:{PROXY_PORT}/postgres");
    step(
        stop,
        started,
        "waiting for the master (initdb, then published to the proxy)",
        || {
            wait_until(stop, Duration::from_secs(120), || {
                Command::new("/usr/lib/postgresql/15/bin/psql")
                    .args([uri.as_str(), "-Atqc", "SELECT 1"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            })
        },
    )?;
    let standbys = o.keepers - 1;
    step(
        stop,
        started,
        &format!("waiting for {standbys} standbys to stream"),
        || {
            wait_until(stop, Duration::from_secs(120), || {
                ctl(&bins, &endpoint, &["status"])
                    .map(|out| {
                        String::from_utf8_lossy(&out.stdout)
                            .matches("streaming")
                            .count()
                            >= standbys
                    })
                    .unwrap_or(false)
            })
        },
    )?;
    println!(
        "\ntendril cluster {CLUSTER:?} is up in {:.1} s. Connect through the proxy:\n",
        started.elapsed().as_secs_f64()
    );
    println!("    psql {uri}\n");
    println!("Read-only, on a standby (the master when none is eligible):\n");
    println!("    psql postgres://postgres:{password}@127.0.0.1:{READ_ONLY_PORT}/postgres\n");
    println!("tendrilctl, for this cluster:\n");
    println!("    export TENDRIL_CLUSTER_NAME={CLUSTER} TENDRIL_STORE_ENDPOINTS={endpoint}");
    println!("    {} status\n", bins.join("tendrilctl").display());
    if let Ok(out) = ctl(&bins, &endpoint, &["status"]) {
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    println!("\nlogs: {}", state.join("logs").display());
    Ok(())
}

fn step(
    stop: &AtomicBool,
    started: Instant,
    what: &str,
    f: impl FnOnce() -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    if stop.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    eprint!("{what}... ");
    let t = Instant::now();
    f()?;
    eprintln!(
        "ok ({:.1} s, {:.1} s in total)",
        t.elapsed().as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn wait_until(
    stop: &AtomicBool,
    limit: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while !check() {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted");
        }
        if Instant::now() > deadline {
            bail!("not ready within {} s", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

fn ctl(bins: &Path, endpoint: &str, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Command::new(bins.join("tendrilctl"))
        .env("TENDRIL_CLUSTER_NAME", CLUSTER)
        .env("TENDRIL_STORE_ENDPOINTS", endpoint)
        .args(args)
        .output()
        .context("run tendrilctl")
}

fn spawn(state: &Path, name: &str, cmd: &mut Command) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(state.join("logs").join(format!("{name}.log")))?;
    let child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .with_context(|| format!("start {name}"))?;
    std::fs::write(state.join("pids").join(name), child.id().to_string())?;
    Ok(())
}

fn running_pids(state: &Path) -> impl Iterator<Item = (String, u32)> {
    let entries = std::fs::read_dir(state.join("pids"))
        .into_iter()
        .flatten()
        .flatten();
    entries.filter_map(|e| {
        let pid: u32 = std::fs::read_to_string(e.path())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then(|| (e.file_name().to_string_lossy().into_owned(), pid))
    })
}

/// Whether a process runs (a zombie, exited but not yet reaped by its parent, does not).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        !s.lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
    })
}

/// `cargo xtask down [--state-dir DIR]`.
pub fn down(args: &[String]) -> anyhow::Result<()> {
    let state = match args {
        [flag, dir] if flag == "--state-dir" => PathBuf::from(dir),
        [] => default_state(),
        _ => bail!("usage: cargo xtask down [--state-dir DIR]"),
    };
    if running_pids(&state).next().is_none() {
        println!("no local cluster runs from {}", state.display());
        return Ok(());
    }
    down_dir(&state);
    Ok(())
}

/// Stops proxies, sentinels, keepers (which stop PostgreSQL), then etcd.
fn down_dir(state: &Path) {
    for prefix in ["proxy", "sentinel", "keeper", "etcd"] {
        let pids: Vec<(String, u32)> = running_pids(state)
            .filter(|(n, _)| n.starts_with(prefix))
            .collect();
        for (_, pid) in &pids {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while pids.iter().any(|(_, pid)| alive(*pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for (name, pid) in pids {
            if alive(pid) {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            println!("stopped {name}");
            let _ = std::fs::remove_file(state.join("pids").join(name));
        }
    }
}

fn set_mode(path: &Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}

fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_up_options() {
        let args: Vec<String> = [
            "--keepers",
            "2",
            "--sync",
            "--detach",
            "--state-dir",
            "/tmp/x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let o = parse(&args).unwrap();
        assert_eq!(
            (o.keepers, o.sentinels, o.proxies, o.sync, o.detach),
            (2, 2, 1, true, true)
        );
        assert_eq!(o.state, PathBuf::from("/tmp/x"));
        assert!(parse(&["--keepers".into(), "0".into()]).is_err());
        assert!(parse(&["--bogus".into()]).is_err());
    }

    #[test]
    fn project_root_has_the_workspace() {
        assert!(crate::project_root().join("Cargo.toml").is_file());
    }
}
