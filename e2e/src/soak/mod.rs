//! The whole-cluster fault soak (`cargo xtask soak cluster`): a cluster of real processes,
//! every keeper on a host of its own (a network namespace), writers and readers through
//! each proxy plus a writer straight to the master, while the nemesis injects faults from a
//! seed. The history goes to a file, the final contents to another, and the checker
//! ([`crate::checker`]) reads only those two.
//!
//! Settings, from the environment (the xtask command sets them from its flags):
//! - `TENDRIL_CLUSTER_SOAK_SECONDS`: how long faults are injected (default 150);
//! - `TENDRIL_CLUSTER_SOAK_SEED`: the seed (default: a fixed one, so the short run in
//!   `cargo xtask test` is always the same sequence of faults; printed);
//! - `TENDRIL_CLUSTER_SOAK_MODE`: `sync` (default) or `async`;
//! - `TENDRIL_CLUSTER_SOAK_KEEPERS`, `_PROXIES`, `_SENTINELS`: 3, 2 and 2 by default;
//! - `TENDRIL_CLUSTER_SOAK_DIR`: where the history and contents go (default: a new
//!   directory under the system's temporary directory, printed).

pub mod nemesis;
pub mod progress;
pub mod workload;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tendril_control_model::ClusterSpec;
use tendril_testkit::Rng;

use crate::checker::{self, Replication};
use crate::history::{self, Event, Route};
use crate::{Cluster, Options, default_spec};
use progress::Progress;
use workload::{Master, Shared, Target};

/// The seed when none is given.
pub const DEFAULT_SEED: u64 = 20_261_203;

/// A soak's settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Seconds of faults.
    pub seconds: u64,
    /// The seed.
    pub seed: u64,
    /// Synchronous replication.
    pub sync: bool,
    /// Keepers (each on its own host).
    pub keepers: usize,
    /// Proxies.
    pub proxies: usize,
    /// Sentinels.
    pub sentinels: usize,
    /// Where the history and final contents go.
    pub dir: PathBuf,
}

impl Settings {
    /// From the `TENDRIL_CLUSTER_SOAK_*` variables; an unparsable value is an error naming it.
    pub fn from_env() -> Result<Settings, String> {
        fn var<T: std::str::FromStr>(name: &str, default: T) -> Result<T, String> {
            match std::env::var(format!("TENDRIL_CLUSTER_SOAK_{name}")) {
                Ok(v) => v
                    .parse()
                    .map_err(|_| format!("TENDRIL_CLUSTER_SOAK_{name}={v:?}: not a number")),
                Err(_) => Ok(default),
            }
        }
        let clock = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        let sync = match std::env::var("TENDRIL_CLUSTER_SOAK_MODE").as_deref() {
            Err(_) | Ok("sync") => true,
            Ok("async") => false,
            Ok(other) => {
                return Err(format!(
                    "TENDRIL_CLUSTER_SOAK_MODE={other:?}: sync or async"
                ));
            }
        };
        let dir = match std::env::var_os("TENDRIL_CLUSTER_SOAK_DIR") {
            Some(d) => PathBuf::from(d),
            None => std::env::temp_dir().join(format!("tendril-cluster-soak-{clock}")),
        };
        Ok(Settings {
            seconds: var("SECONDS", 150)?,
            seed: var("SEED", DEFAULT_SEED)?,
            sync,
            keepers: var("KEEPERS", 3)?,
            proxies: var("PROXIES", 2)?,
            sentinels: var("SENTINELS", 2)?,
            dir,
        })
    }
}

/// What a soak found.
#[derive(Debug)]
pub struct Outcome {
    /// The checker's report.
    pub report: checker::Report,
    /// The history file.
    pub history: PathBuf,
    /// The final contents file.
    pub contents: PathBuf,
    /// Why the cluster did not recover from a fault, when it did not (the run stopped
    /// there; its history is checked all the same).
    pub unrecovered: Option<String>,
    /// Clients that hung past every deadline (each operation has its own), and the final
    /// read when it hung: the data plane left them waiting.
    pub stuck: Vec<String>,
}

/// Runs a soak. An error means it could not be checked (the final contents could not be
/// read); anomalies, and a fault the cluster did not recover from, are in the outcome.
pub async fn run(s: &Settings) -> Result<Outcome, String> {
    std::fs::create_dir_all(&s.dir).map_err(|e| format!("{}: {e}", s.dir.display()))?;
    println!(
        "cluster soak: seed {} (replay with TENDRIL_CLUSTER_SOAK_SEED={}), {} s of faults, {}, \
         {} keepers, {} proxies, {} sentinels; history in {}",
        s.seed,
        s.seed,
        s.seconds,
        if s.sync { "sync" } else { "async" },
        s.keepers,
        s.proxies,
        s.sentinels,
        s.dir.display()
    );
    let progress = Progress::new(&s.dir);
    progress.step("starting the cluster");
    let cluster_dir = std::sync::Arc::new(std::sync::OnceLock::new());
    let shared = Shared::new();
    progress.line(&format!(
        "the history's times count from {}",
        humantime::format_rfc3339_millis(SystemTime::now() - Duration::from_micros(shared.us()))
    ));
    // The last resort when a step hangs past every timeout below: it names the step, keeps
    // the logs, and fails the run instead of leaving CI to time out without a word.
    let _watchdog = progress::watchdog(
        s,
        Duration::from_secs(s.seconds) + WATCHDOG_MARGIN,
        progress.clone(),
        shared.clone(),
        cluster_dir.clone(),
    );
    let mut cluster = Cluster::start(Options {
        keepers: s.keepers,
        sentinels: s.sentinels,
        proxies: s.proxies,
        spec: default_spec(s.sync),
        partitionable: false,
        isolated: true,
        ..Options::default()
    })
    .await;
    let _ = cluster_dir.set(cluster.dir.path().to_path_buf());
    let proxy_ports: Vec<u16> = cluster.proxies.iter().map(|(_, p)| *p).collect();
    progress.set_proxy_ports(&proxy_ports);
    progress.step("creating the tables");
    bounded(
        "create the tables",
        workload::create_tables("127.0.0.1", cluster.proxy_port()),
    )
    .await?;
    let master: Master = Arc::default();
    let follow = tokio::spawn(follow_master(cluster.routes.clone(), master.clone()));
    let mut clients = Vec::new();
    for (i, port) in proxy_ports.iter().enumerate() {
        let target = Target::Proxy(format!("p{i}"), *port);
        for w in 0..2 {
            clients.push(tokio::spawn(workload::writer(
                shared.clone(),
                format!("p{i}-w{w}"),
                target.clone(),
            )));
        }
        clients.push(tokio::spawn(workload::reader(
            shared.clone(),
            format!("p{i}-r0"),
            target,
        )));
    }
    clients.push(tokio::spawn(workload::writer(
        shared.clone(),
        "direct-w0".into(),
        Target::Direct(master.clone()),
    )));
    let mut rng = Rng::new(s.seed);
    let until = shared.us() + s.seconds * 1_000_000;
    let faults = nemesis::run(
        &mut cluster,
        &shared,
        &progress,
        &mut rng,
        until,
        Duration::from_secs(120),
    )
    .await;
    // Let the clients see the recovered cluster, then stop them: each finishes the
    // operation it is in (or is aborted, its last operation unrecorded), so nothing is
    // acknowledged after the history is taken. Every operation has its own deadline, so
    // a client still running well past it is stuck: it is aborted and named.
    progress.step("stopping the clients");
    tokio::time::sleep(Duration::from_secs(3)).await;
    shared.stop();
    let deadline = tokio::time::Instant::now() + workload::OPERATION * 2 + Duration::from_secs(10);
    let mut stuck = 0;
    for c in clients {
        let abort = c.abort_handle();
        if tokio::time::timeout_at(deadline, c).await.is_err() {
            abort.abort();
            stuck += 1;
        }
    }
    let mut stuck_clients = Vec::new();
    if stuck > 0 {
        let what = format!("{stuck} clients still running past their deadlines: aborted");
        progress.line(&format!("{what}\n{}", progress.sockets()));
        stuck_clients.push(what);
    }
    follow.abort();
    let mut events = shared.history();
    {
        let routes = cluster
            .routes
            .lock()
            .map_err(|_| "routes lock".to_owned())?;
        for (i, (at, route)) in routes.iter().enumerate() {
            events.push(Event::Route(Route {
                at_us: shared.at(*at),
                master: route.as_ref().map(|r| format!("{}:{}", r.address, r.port)),
                seq: i as u64,
            }));
        }
    }
    events.sort_by_key(Event::start_us);
    let history = s.dir.join("history.jsonl");
    history::write(&history, &events).map_err(|e| format!("{}: {e}", history.display()))?;
    // The final contents from the master, through a proxy (which routes only to it). A
    // cluster that did not recover from a fault may still serve them: the history is then
    // checked too, and the run fails on the recovery. A read that does not end is a client
    // the data plane hangs: named, with the sockets, and the contents read another way.
    progress.step("reading the final contents");
    let mut stuck = stuck_clients;
    let mut contents = Err(String::new());
    let master_now = master.lock().ok().and_then(|m| m.clone());
    let ways = proxy_ports
        .iter()
        .enumerate()
        .map(|(i, p)| (format!("proxy p{i}"), ("127.0.0.1".to_owned(), *p)))
        .chain(master_now.map(|m| ("the master directly".to_owned(), m)));
    for (way, (host, port)) in ways {
        contents = bounded(
            &format!("read the final contents through {way}"),
            workload::contents(&host, port),
        )
        .await;
        match &contents {
            Ok(_) => break,
            Err(e) if e.contains("no answer within") => {
                progress.line(&format!("{e}\n{}", progress.sockets()));
                stuck.push(e.clone());
            }
            Err(e) => progress.line(e),
        }
    }
    let contents = contents.map_err(|e| match &faults {
        Err(unrecovered) => format!("{unrecovered}\n(history in {}; {e})", history.display()),
        Ok(_) => e,
    });
    progress.keep_logs(cluster.dir.path());
    let contents = contents?;
    let contents_file = s.dir.join("contents.json");
    history::write_contents(&contents_file, &contents)
        .map_err(|e| format!("{}: {e}", contents_file.display()))?;
    let mode = if s.sync {
        Replication::Sync
    } else {
        Replication::Async
    };
    // A client through a proxy waits at most for the fault and then a failover: the fail
    // interval (the soak's spec leaves it at its default), plus the 3 s the failover itself
    // may take.
    let allowance = ClusterSpec::default().fail_interval + Duration::from_secs(3);
    progress.step("checking the history");
    let report = checker::check(&events, &contents, mode, allowance.as_micros() as u64);
    if let Ok(n) = &faults {
        progress.line(&format!("{n} faults injected"));
    }
    Ok(Outcome {
        report,
        history,
        contents: contents_file,
        unrecovered: faults.err(),
        stuck,
    })
}

/// How long past its faults a soak may run before the watchdog stops it: the recovery
/// wait of the last fault, stopping the clients, and reading the contents, with room.
const WATCHDOG_MARGIN: Duration = Duration::from_secs(12 * 60);

/// Runs a step that talks to the cluster within [`STEP_LIMIT`]; its error, or its not
/// ending, as a message naming it.
async fn bounded<T, E: std::fmt::Display>(
    what: &str,
    step: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(STEP_LIMIT, step).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{what}: {e}")),
        Err(_) => Err(format!(
            "{what}: no answer within {STEP_LIMIT:?} (a proxy holds a client at most 30 s)"
        )),
    }
}

/// See [`bounded`].
const STEP_LIMIT: Duration = Duration::from_secs(90);

/// Keeps `master` at the address the proxies are told to route to (an application with
/// its own discovery), from the cluster's watch of the routing.
async fn follow_master(routes: crate::RouteLog, master: Master) {
    loop {
        let now = routes
            .lock()
            .ok()
            .and_then(|r| r.last().cloned())
            .and_then(|(_, route)| route)
            .map(|r| (r.address, r.port));
        if let Some(now) = now
            && let Ok(mut m) = master.lock()
        {
            *m = Some(now);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
