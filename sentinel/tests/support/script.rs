//! A small language for sentinel scenarios: set up cluster data and reports, advance time, run
//! `decide`, and render what it decided. Used by the table-driven cases in `testdata/` and by
//! the property tests.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tendril_control_model::{
    ClusterData, ClusterPhase, ClusterSpec, Db, DbInitMode, DbRole, DbSpec, DbStatus,
    FORMAT_VERSION, FollowConfig, Generation, Keeper, KeeperInfo, KeeperStatus, Lsn, PostgresState,
    ProxyInfo, ProxyRoute, Switchover, SwitchoverPhase, TimelineHistoryEntry,
};
use tendril_sentinel::{Memory, Now, Observations, decide};

/// A keeper's report as the script describes it; turned into a `KeeperInfo` at each run.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub db: Option<String>,
    pub healthy: bool,
    pub recovery: bool,
    pub xlog: Lsn,
    pub tl: u32,
    pub sync: Vec<String>,
    pub generation: Option<u64>,
    pub stopped: bool,
    pub checkpoint: Option<Lsn>,
    pub sysid: String,
    pub other_cluster: bool,
    pub frozen: bool,
    pub info_uid: u64,
    pub addr: Option<(String, u16)>,
    pub history: Vec<TimelineHistoryEntry>,
    pub older_wal: Option<String>,
    pub can_be_master: bool,
    pub can_be_sync: bool,
    pub priority: i32,
}

/// The scenario state.
pub struct World {
    pub cd: ClusterData,
    pub reports: BTreeMap<String, Report>,
    pub proxies: BTreeMap<String, ProxyInfo>,
    pub mem: Memory,
    pub now: Duration,
    pub writes: u64,
    /// Source of report ids: every fresh report gets a new one, as a live keeper's does.
    pub next_info: u64,
}

impl Default for World {
    fn default() -> Self {
        World::new()
    }
}

impl World {
    pub fn new() -> World {
        let spec = ClusterSpec::default();
        let mut cd = ClusterData::new("cluster", spec, UNIX_EPOCH);
        cd.phase = ClusterPhase::Normal;
        World {
            cd,
            reports: BTreeMap::new(),
            proxies: BTreeMap::new(),
            mem: Memory::default(),
            now: Duration::ZERO,
            writes: 0,
            next_info: 0,
        }
    }

    pub fn wall(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(1_800_000_000) + self.now
    }

    /// The observations as the loop would read them now.
    pub fn observations(&mut self) -> Observations {
        let mut obs = Observations::default();
        for (uid, r) in &mut self.reports {
            if !r.frozen {
                self.next_info += 1;
                r.info_uid = self.next_info;
            }
            let db_uid = r.db.clone().or_else(|| {
                self.cd
                    .dbs
                    .values()
                    .find(|d| d.spec.keeper_uid == *uid)
                    .map(|d| d.uid.clone())
            });
            let postgres_state = db_uid.map(|db_uid| {
                let db = self.cd.dbs.get(&db_uid);
                let generation = r
                    .generation
                    .map_or_else(|| db.map_or(Generation::NONE, |d| d.generation), Generation);
                let (address, port) = r
                    .addr
                    .clone()
                    .or_else(|| {
                        db.and_then(|d| Some((d.status.listen_address.clone()?, d.status.port?)))
                    })
                    .unwrap_or_else(|| ("127.0.0.1".into(), 5432));
                PostgresState {
                    uid: db_uid.clone(),
                    generation,
                    listen_address: address,
                    port,
                    running: !r.stopped,
                    healthy: r.healthy && !r.stopped,
                    in_recovery: r.recovery,
                    system_id: r.sysid.clone(),
                    timeline_id: r.tl,
                    xlog_pos: r.xlog,
                    checkpoint_lsn: r.checkpoint,
                    timelines_history: r.history.clone(),
                    synchronous_standbys: r.sync.clone(),
                    older_wal_file: r.older_wal.clone(),
                    ..PostgresState::default()
                }
            });
            obs.keepers.insert(
                uid.clone(),
                KeeperInfo {
                    format_version: FORMAT_VERSION,
                    info_uid: format!("{uid}-{}", r.info_uid),
                    uid: uid.clone(),
                    cluster_uid: if r.other_cluster {
                        "other".into()
                    } else {
                        self.cd.uid.clone()
                    },
                    boot_uuid: format!("boot-{uid}"),
                    pg_binary_version: None,
                    postgres_state,
                    can_be_master: r.can_be_master,
                    can_be_synchronous_replica: r.can_be_sync,
                    priority: r.priority,
                    last_error: None,
                    pg_crashes: 0,
                    last_pg_crash: None,
                    last_fence: None,
                },
            );
        }
        obs.proxies = self.proxies.clone();
        obs
    }

    /// One sentinel loop: decide, and write as the loop would. Returns the decision's events
    /// and whether it wrote.
    pub fn run(&mut self) -> (Vec<tendril_control_model::Event>, bool) {
        let obs = self.observations();
        let now = Now {
            mono: self.now,
            wall: self.wall(),
        };
        let decision = decide(&self.cd, &obs, &mut self.mem, now);
        if decision.write {
            let mut next = decision.cluster_data;
            next.generation = self.cd.generation.next();
            next.change_time = now.wall;
            self.cd = next;
            self.mem.last_write = Some(self.now);
            self.writes += 1;
        }
        (decision.events, decision.write)
    }

    /// Renders the cluster data compactly.
    pub fn render(&self) -> String {
        let cd = &self.cd;
        let mut out = String::new();
        let phase = match cd.phase {
            ClusterPhase::Initializing => "initializing",
            ClusterPhase::Normal => "normal",
        };
        let _ = writeln!(
            out,
            "cluster gen={} phase={phase} master={}",
            cd.generation,
            cd.master.as_deref().unwrap_or("-")
        );
        let route = match &cd.proxy.master {
            Some(r) => format!("{} {}:{}", r.db_uid, r.address, r.port),
            None => "none".into(),
        };
        let hold = if cd.proxy.hold { " hold" } else { "" };
        let _ = writeln!(out, "proxy gen={} route={route}{hold}", cd.proxy.generation);
        if let Some(sw) = &cd.switchover {
            let _ = writeln!(
                out,
                "switchover phase={:?} target={} old={}",
                sw.phase,
                sw.target_db.as_deref().unwrap_or("-"),
                sw.old_master.as_deref().unwrap_or("-")
            );
        }
        for k in cd.keepers.values() {
            let mut flags = vec![if k.status.healthy {
                "healthy"
            } else {
                "unhealthy"
            }];
            if k.status.force_fail {
                flags.push("force-fail");
            }
            let _ = writeln!(out, "keeper {} {}", k.uid, flags.join(" "));
        }
        for d in cd.dbs.values() {
            let s = &d.spec;
            let mut line = format!(
                "db {} keeper={} {}",
                d.uid,
                s.keeper_uid,
                match s.role {
                    DbRole::Master => "master",
                    DbRole::Standby => "standby",
                }
            );
            match &s.follow {
                Some(FollowConfig::Internal { db_uid }) => {
                    let _ = write!(line, " follow={db_uid}");
                }
                Some(FollowConfig::External { .. }) => line.push_str(" follow=external"),
                None => {}
            }
            let _ = write!(line, " gen={}", d.generation);
            if s.init_mode != DbInitMode::None {
                let _ = write!(
                    line,
                    " init={}",
                    format!("{:?}", s.init_mode).to_lowercase()
                );
            }
            if s.stop {
                line.push_str(" stop");
            }
            if !s.pg_parameters.is_empty() {
                let params: Vec<String> = s
                    .pg_parameters
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                let _ = write!(line, " params={}", params.join(","));
            }
            if s.use_pg_rewind {
                line.push_str(" rewind");
            }
            if !s.additional_replication_slots.is_empty() {
                let _ = write!(line, " slots={}", s.additional_replication_slots.join(","));
            }
            if !s.followers.is_empty() {
                let _ = write!(line, " followers={}", s.followers.join(","));
            }
            if s.synchronous_replication {
                let _ = write!(line, " sync=[{}]", s.synchronous_standbys.join(","));
                let _ = write!(line, " known=[{}]", d.status.synchronous_standbys.join(","));
                if !s.external_synchronous_standbys.is_empty() {
                    let _ = write!(line, " ext=[{}]", s.external_synchronous_standbys.join(","));
                }
            }
            line.push_str(if d.status.healthy {
                " healthy"
            } else {
                " unhealthy"
            });
            let _ = writeln!(out, "{line}");
        }
        out
    }

    /// Executes one script line (not `run`).
    pub fn apply(&mut self, line: &str) -> Result<(), String> {
        let mut words = line.split_whitespace();
        let Some(verb) = words.next() else {
            return Ok(());
        };
        let rest: Vec<&str> = words.collect();
        let kv = |name: &str| {
            rest.iter()
                .find_map(|w| w.strip_prefix(&format!("{name}=")))
        };
        let flag = |name: &str| rest.contains(&name);
        match verb {
            "spec" => {
                let json = line.trim_start().strip_prefix("spec").unwrap_or("").trim();
                let mut value = self.cd.spec.to_json_value();
                let patch: serde_json::Value =
                    serde_json::from_str(json).map_err(|e| e.to_string())?;
                tendril_control_model::merge_patch(&mut value, &patch);
                self.cd.spec = ClusterSpec::from_json_value(&value).map_err(|e| e.to_string())?;
            }
            "phase" => {
                self.cd.phase = match rest.first().copied() {
                    Some("initializing") => ClusterPhase::Initializing,
                    _ => ClusterPhase::Normal,
                };
            }
            "keeper" => {
                let uid = rest.first().ok_or("keeper needs a uid")?.to_string();
                let status = KeeperStatus {
                    healthy: !flag("unhealthy"),
                    last_healthy_time: Some(self.wall()),
                    boot_uuid: Some(format!("boot-{uid}")),
                    force_fail: flag("force-fail"),
                    can_be_master: !flag("cannot-master"),
                    can_be_synchronous_replica: !flag("cannot-sync"),
                    priority: kv("priority")
                        .map_or(Ok(0), str::parse)
                        .map_err(|e| format!("{e}"))?,
                    ..KeeperStatus::default()
                };
                self.cd.keepers.insert(uid.clone(), Keeper { uid, status });
            }
            "force-fail" => {
                let uid = rest.first().ok_or("force-fail needs a keeper")?;
                self.cd
                    .keepers
                    .get_mut(*uid)
                    .ok_or("no such keeper")?
                    .status
                    .force_fail = true;
            }
            "db" => {
                let uid = rest.first().ok_or("db needs a uid")?.to_string();
                let role = if flag("master") {
                    DbRole::Master
                } else {
                    DbRole::Standby
                };
                let (address, port) = parse_addr(kv("addr").unwrap_or("127.0.0.1:5432"))?;
                let generation = Generation(
                    kv("gen")
                        .map_or(Ok(1), str::parse)
                        .map_err(|e| format!("{e}"))?,
                );
                let db = Db {
                    uid: uid.clone(),
                    generation,
                    change_time: self.wall(),
                    spec: DbSpec {
                        keeper_uid: kv("keeper").ok_or("db needs keeper=")?.to_owned(),
                        role,
                        init_mode: parse_init(kv("init").unwrap_or("none"))?,
                        follow: kv("follow").map(|f| match f {
                            "external" => FollowConfig::external(&self.cd.spec),
                            _ => FollowConfig::Internal {
                                db_uid: f.to_owned(),
                            },
                        }),
                        followers: list(kv("followers")),
                        synchronous_replication: kv("sync").is_some(),
                        synchronous_standbys: list(kv("sync")),
                        external_synchronous_standbys: list(kv("ext")),
                        stop: flag("stop"),
                        ..DbSpec::default()
                    },
                    status: DbStatus {
                        healthy: !flag("unhealthy"),
                        current_generation: if flag("converging") {
                            Generation(generation.0 - 1)
                        } else {
                            generation
                        },
                        listen_address: Some(address),
                        port: Some(port),
                        system_id: Some(kv("sysid").unwrap_or("7000").to_owned()),
                        timeline_id: kv("tl")
                            .map_or(Ok(1), str::parse)
                            .map_err(|e| format!("{e}"))?,
                        xlog_pos: parse_lsn(kv("xlog").unwrap_or("0/3000000"))?,
                        synchronous_standbys: list(kv("known-sync")),
                        timelines_history: parse_history(kv("history"))?,
                        older_wal_file: kv("older-wal").map(str::to_owned),
                        ..DbStatus::default()
                    },
                };
                self.cd.dbs.insert(uid, db);
            }
            "master" => self.cd.master = rest.first().map(|s| (*s).to_owned()),
            "route" => {
                let target = rest.first().ok_or("route needs a db or none")?;
                self.cd.proxy.master = if *target == "none" {
                    None
                } else {
                    let db = self.cd.dbs.get(*target).ok_or("route to an unknown db")?;
                    Some(ProxyRoute {
                        db_uid: (*target).to_owned(),
                        address: db.status.listen_address.clone().unwrap_or_default(),
                        port: db.status.port.unwrap_or_default(),
                    })
                };
                self.cd.proxy.hold = flag("hold");
                if let Some(g) = kv("gen") {
                    self.cd.proxy.generation = Generation(g.parse().map_err(|e| format!("{e}"))?);
                }
            }
            "switchover" => {
                self.cd.switchover = Some(Switchover {
                    target_keeper: kv("target").map(str::to_owned),
                    requested_at: self.wall(),
                    phase: SwitchoverPhase::Requested,
                    target_db: None,
                    old_master: None,
                    fence_generation: None,
                    outcome: None,
                });
            }
            "report" => {
                let uid = rest.first().ok_or("report needs a keeper")?.to_string();
                let previous = self.reports.get(&uid).cloned().unwrap_or(Report {
                    healthy: true,
                    tl: 1,
                    xlog: parse_lsn("0/3000000")?,
                    sysid: "7000".into(),
                    can_be_master: true,
                    can_be_sync: true,
                    ..Report::default()
                });
                let r = Report {
                    db: kv("db").map(str::to_owned).or(previous.db.clone()),
                    healthy: if flag("unhealthy") {
                        false
                    } else if flag("healthy") {
                        true
                    } else {
                        previous.healthy
                    },
                    recovery: if flag("recovery") {
                        true
                    } else if flag("primary") {
                        false
                    } else {
                        previous.recovery
                    },
                    xlog: kv("xlog").map_or(Ok(previous.xlog), parse_lsn)?,
                    tl: kv("tl")
                        .map_or(Ok(previous.tl), |t| t.parse().map_err(|e| format!("{e}")))?,
                    sync: kv("sync").map_or(previous.sync.clone(), |s| list(Some(s))),
                    generation: match kv("gen") {
                        Some("current") => None,
                        Some(g) => Some(g.parse().map_err(|e| format!("{e}"))?),
                        None => previous.generation,
                    },
                    stopped: if flag("stopped") {
                        true
                    } else if flag("running") {
                        false
                    } else {
                        previous.stopped
                    },
                    checkpoint: kv("checkpoint")
                        .map(parse_lsn)
                        .transpose()?
                        .or(previous.checkpoint),
                    sysid: kv("sysid").map_or(previous.sysid.clone(), str::to_owned),
                    other_cluster: flag("other-cluster"),
                    frozen: flag("frozen"),
                    info_uid: previous.info_uid,
                    addr: kv("addr")
                        .map(parse_addr)
                        .transpose()?
                        .or(previous.addr.clone()),
                    history: kv("history")
                        .map_or(Ok(previous.history.clone()), |h| parse_history(Some(h)))?,
                    older_wal: kv("older-wal")
                        .map(str::to_owned)
                        .or(previous.older_wal.clone()),
                    can_be_master: if flag("cannot-master") {
                        false
                    } else {
                        previous.can_be_master
                    },
                    can_be_sync: if flag("cannot-sync") {
                        false
                    } else {
                        previous.can_be_sync
                    },
                    priority: kv("priority").map_or(Ok(previous.priority), |p| {
                        p.parse().map_err(|e| format!("{e}"))
                    })?,
                };
                self.reports.insert(uid, r);
            }
            "silent" => {
                for uid in &rest {
                    self.reports.remove(*uid);
                }
            }
            "proxy" => {
                let uid = rest.first().ok_or("proxy needs a uid")?.to_string();
                let generation = match kv("gen") {
                    Some("acked") | None => self.cd.proxy.generation,
                    Some(g) => Generation(g.parse().map_err(|e| format!("{e}"))?),
                };
                self.proxies.insert(
                    uid.clone(),
                    ProxyInfo {
                        format_version: FORMAT_VERSION,
                        uid,
                        generation,
                        proxy_timeout: Duration::from_secs(5),
                        listen: None,
                        read_only_listen: None,
                    },
                );
            }
            "noproxy" => {
                for uid in &rest {
                    self.proxies.remove(*uid);
                }
            }
            "at" => {
                let t = rest.first().ok_or("at needs a time")?;
                self.now = humantime::parse_duration(t).map_err(|e| e.to_string())?;
            }
            "leader-change" => self.mem = Memory::default(),
            other => return Err(format!("unknown verb {other:?}")),
        }
        Ok(())
    }
}

fn list(value: Option<&str>) -> Vec<String> {
    value.map_or_else(Vec::new, |v| {
        v.split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    })
}

fn parse_lsn(text: &str) -> Result<Lsn, String> {
    text.parse()
        .map_err(|e: tendril_control_model::ParseLsnError| e.to_string())
}

fn parse_addr(text: &str) -> Result<(String, u16), String> {
    let (host, port) = text.rsplit_once(':').ok_or("addr is host:port")?;
    Ok((host.to_owned(), port.parse().map_err(|e| format!("{e}"))?))
}

fn parse_init(text: &str) -> Result<DbInitMode, String> {
    Ok(match text {
        "none" => DbInitMode::None,
        "new" => DbInitMode::New,
        "existing" => DbInitMode::Existing,
        "resync" => DbInitMode::Resync,
        "pitr" => DbInitMode::Pitr,
        other => return Err(format!("unknown init mode {other}")),
    })
}

/// `1@0/3000000,2@0/5000000`: timeline 1 ended at 0/3000000, timeline 2 at 0/5000000.
fn parse_history(text: Option<&str>) -> Result<Vec<TimelineHistoryEntry>, String> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    text.split(',')
        .map(|entry| {
            let (tl, lsn) = entry.split_once('@').ok_or("history entries are tl@lsn")?;
            Ok(TimelineHistoryEntry {
                timeline_id: tl.parse().map_err(|e| format!("{e}"))?,
                switch_point: parse_lsn(lsn)?,
                reason: String::new(),
            })
        })
        .collect()
}

/// Runs a whole script file, returning the file with every `run` block's expected output
/// replaced by the actual one.
pub fn run_script(text: &str) -> Result<String, String> {
    let mut world = World::new();
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    let mut n = 0;
    while let Some(line) = lines.next() {
        n += 1;
        out.push_str(line);
        out.push('\n');
        let code = line.split('#').next().unwrap_or("").trim();
        if code.is_empty() {
            continue;
        }
        if code == "run" {
            let (events, wrote) = world.run();
            // Skip the old expectation block.
            if lines.peek().map(|l| l.trim()) == Some("----") {
                lines.next();
                for l in lines.by_ref() {
                    if l.trim() == "----" {
                        break;
                    }
                }
            }
            out.push_str("----\n");
            out.push_str(if wrote { "write\n" } else { "no write\n" });
            out.push_str(&world.render());
            for e in events {
                let _ = writeln!(out, "event {}: {}", e.kind, e.reason);
            }
            out.push_str("----\n");
            continue;
        }
        world
            .apply(code)
            .map_err(|e| format!("line {n}: {e}: {line}"))?;
    }
    Ok(out)
}
