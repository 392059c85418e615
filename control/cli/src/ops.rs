//! Operations on a running cluster: status, switchover, failkeeper, removekeeper, promote.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;
use tendril_control_model::{
    ClusterData, ClusterPhase, ClusterRole, DbRole, Event, FollowConfig, KeeperInfo, ProxyInfo,
    decode, encode,
};
use tendril_control_store::{CasOutcome, Expect, Store};

use crate::{Ctl, CtlError};

/// Everything `tendrilctl status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Cluster name.
    pub cluster: String,
    /// Cluster uid.
    pub uid: String,
    /// Phase.
    pub phase: String,
    /// Cluster data generation.
    pub generation: u64,
    /// The sentinel leader's uid, if any.
    pub sentinel_leader: Option<String>,
    /// Sentinels reporting.
    pub sentinels: Vec<String>,
    /// The master database.
    pub master: Option<String>,
    /// A standby cluster: the external primary it follows.
    pub standby_of: Option<String>,
    /// What the proxies are told to route to.
    pub proxy_route: Option<String>,
    /// The proxy-section generation.
    pub proxy_generation: u64,
    /// Whether new connections are held (switchover).
    pub hold: bool,
    /// A switchover in progress.
    pub switchover: Option<String>,
    /// Keepers and their databases.
    pub keepers: Vec<KeeperRow>,
    /// Proxies and what they applied.
    pub proxies: Vec<ProxyRow>,
    /// The sentinel's recent decisions.
    pub events: Vec<Event>,
}

/// One keeper in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct KeeperRow {
    /// Keeper uid.
    pub keeper: String,
    /// The sentinel's verdict.
    pub healthy: bool,
    /// Whether it reports now.
    pub reporting: bool,
    /// Its database.
    pub db: Option<String>,
    /// master or standby.
    pub role: Option<String>,
    /// Whom it follows.
    pub follows: Option<String>,
    /// PostgreSQL state from the keeper's report.
    pub postgres: String,
    /// Current WAL position.
    pub lsn: Option<String>,
    /// Bytes behind the master.
    pub lag_bytes: Option<u64>,
    /// Listed and known in sync.
    pub synchronous: bool,
    /// A standby: whether the proxies' read-only listeners send it new connections
    /// (`eligible`), or why not.
    pub reads: Option<String>,
    /// Spec generation wanted / reached.
    pub generation: String,
    /// Advertised address.
    pub address: Option<String>,
    /// The keeper's last error.
    pub last_error: Option<String>,
    /// Its master's last self-fence (when, how long, why).
    pub last_fence: Option<String>,
    /// WAL archiving, where its instance archives (`pg_stat_archiver`).
    pub archiving: Option<tendril_control_model::ArchiverState>,
}

/// One proxy in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct ProxyRow {
    /// Proxy uid.
    pub proxy: String,
    /// Generation applied.
    pub generation: u64,
    /// Whether that is the current one.
    pub current: bool,
    /// Its client address.
    pub listen: Option<String>,
    /// Its read-only listener's address.
    pub read_only_listen: Option<String>,
}

impl<S: Store> Ctl<S> {
    /// Gathers the status.
    pub async fn status(&self) -> Result<Status, CtlError> {
        let (cd, _) = self.read().await?;
        let infos: BTreeMap<String, KeeperInfo> = self
            .store
            .list(&self.keys.keepers_prefix())
            .await?
            .kvs
            .iter()
            .filter_map(|kv| decode::<KeeperInfo>(&kv.value).ok())
            .map(|i| (i.uid.clone(), i))
            .collect();
        let proxies: Vec<ProxyInfo> = self
            .store
            .list(&self.keys.proxies_prefix())
            .await?
            .kvs
            .iter()
            .filter_map(|kv| decode::<ProxyInfo>(&kv.value).ok())
            .collect();
        let sentinels: Vec<String> = self
            .store
            .list(&self.keys.sentinels_prefix())
            .await?
            .kvs
            .iter()
            .filter_map(|kv| {
                tendril_control_model::Keys::uid_under(&kv.key, &self.keys.sentinels_prefix())
                    .map(str::to_owned)
            })
            .collect();
        let leader = self.store.leader(&self.keys.leader()).await?;
        let master = cd.master_db();
        let master_pos = master.map(|m| {
            infos
                .get(&m.spec.keeper_uid)
                .and_then(|i| i.postgres_state.as_ref())
                .filter(|s| s.uid == m.uid && s.healthy)
                .map_or(m.status.xlog_pos, |s| s.xlog_pos)
        });
        let read_routes = tendril_control_model::reads::standbys(&cd);
        let mut keepers = Vec::new();
        for (uid, keeper) in &cd.keepers {
            let info = infos.get(uid).filter(|i| i.cluster_uid == cd.uid);
            let db = cd.dbs.values().find(|d| d.spec.keeper_uid == *uid);
            let state = info
                .and_then(|i| i.postgres_state.as_ref())
                .filter(|s| db.is_some_and(|d| d.uid == s.uid));
            let postgres = match state {
                None => "no data".to_owned(),
                Some(s) if !s.running => "stopped".to_owned(),
                Some(s) if !s.healthy => "unhealthy".to_owned(),
                Some(s) if s.in_recovery && s.streaming => "streaming".to_owned(),
                // A standby whose upstream is gone, or a standby leader that cannot follow
                // its external primary.
                Some(s) if s.in_recovery => "in recovery, not streaming".to_owned(),
                Some(_) => "accepting writes".to_owned(),
            };
            let synchronous = db.is_some_and(|d| {
                master.is_some_and(|m| {
                    m.spec.synchronous_standbys.contains(&d.uid)
                        && m.status.synchronous_standbys.contains(&d.uid)
                })
            });
            keepers.push(KeeperRow {
                keeper: uid.clone(),
                healthy: keeper.status.healthy,
                reporting: info.is_some(),
                db: db.map(|d| d.uid.clone()),
                role: db.map(|d| match d.spec.role {
                    DbRole::Master if d.spec.is_standby_leader() => "standby leader".to_owned(),
                    DbRole::Master => "master".to_owned(),
                    DbRole::Standby => "standby".to_owned(),
                }),
                follows: db.and_then(|d| match &d.spec.follow {
                    Some(FollowConfig::Internal { db_uid }) => Some(db_uid.clone()),
                    Some(FollowConfig::External {
                        standby_settings, ..
                    }) => Some(external_primary(standby_settings.as_ref())),
                    None => None,
                }),
                postgres,
                lsn: state.map(|s| s.xlog_pos.to_string()),
                lag_bytes: match (state, master_pos, db) {
                    (Some(s), Some(m), Some(d)) if d.spec.role == DbRole::Standby => {
                        Some(m.bytes_ahead_of(s.xlog_pos))
                    }
                    _ => None,
                },
                synchronous,
                reads: None,
                generation: db.map_or("-".into(), |d| {
                    format!("{}/{}", d.generation, d.status.current_generation)
                }),
                address: state.map(|s| format!("{}:{}", s.listen_address, s.port)),
                last_error: info.and_then(|i| i.last_error.clone()),
                last_fence: info.and_then(|i| i.last_fence.clone()),
                archiving: state.and_then(|s| s.archiver.clone()),
            });
        }
        for row in &mut keepers {
            row.reads = read_routes
                .iter()
                .find(|r| Some(&r.db_uid) == row.db.as_ref())
                .map(|r| {
                    r.eligible
                        .err()
                        .map_or("eligible", |why| why.label())
                        .to_owned()
                });
        }
        let recent = cd.events.len().saturating_sub(10);
        Ok(Status {
            cluster: self.cluster.clone(),
            uid: cd.uid.clone(),
            phase: match cd.phase {
                ClusterPhase::Initializing => "initializing".into(),
                ClusterPhase::Normal => "normal".into(),
            },
            generation: cd.generation.0,
            sentinel_leader: leader,
            sentinels,
            master: cd.master.clone(),
            standby_of: (cd.spec.role == ClusterRole::Standby).then(|| {
                external_primary(
                    cd.spec
                        .standby_config
                        .as_ref()
                        .and_then(|c| c.standby_settings.as_ref()),
                )
            }),
            proxy_route: cd
                .proxy
                .master
                .as_ref()
                .map(|r| format!("{} at {}:{}", r.db_uid, r.address, r.port)),
            proxy_generation: cd.proxy.generation.0,
            hold: cd.proxy.hold,
            switchover: cd.switchover.as_ref().map(|s| {
                format!(
                    "{:?} to {}",
                    s.phase,
                    s.target_db
                        .as_deref()
                        .or(s.target_keeper.as_deref())
                        .unwrap_or("best standby")
                )
            }),
            keepers,
            proxies: proxies
                .iter()
                .map(|p| ProxyRow {
                    proxy: p.uid.clone(),
                    generation: p.generation.0,
                    current: p.generation == cd.proxy.generation,
                    listen: p.listen.clone(),
                    read_only_listen: p.read_only_listen.clone(),
                })
                .collect(),
            events: cd.events[recent..].to_vec(),
        })
    }

    /// Asks for a planned switchover and waits until the sentinel finished (or gave up).
    /// Returns what the sentinel said.
    pub async fn switchover(
        &self,
        to: Option<&str>,
        timeout: Duration,
    ) -> Result<String, CtlError> {
        let started = Instant::now();
        let old_master = self
            .change(|cd| {
                cd.request_switchover(to, SystemTime::now())
                    .map_err(CtlError::Input)
            })
            .await?;
        let events_before = self.read().await?.0.events.len();
        loop {
            let (cd, _) = self.read().await?;
            let fresh: Vec<&Event> = cd
                .events
                .iter()
                .skip(events_before.saturating_sub(1))
                .collect();
            if let Some(e) = fresh
                .iter()
                .rev()
                .find(|e| e.kind == "switchover abandoned")
            {
                return Err(CtlError::Input(format!(
                    "switchover abandoned: {}",
                    e.reason
                )));
            }
            if cd.switchover.is_none()
                && cd.master.as_deref() != Some(old_master.as_str())
                && cd.proxy.master.is_some()
            {
                let done = fresh
                    .iter()
                    .rev()
                    .find(|e| e.kind == "switchover done")
                    .map(|e| e.reason.clone());
                return Ok(
                    done.unwrap_or_else(|| format!("switchover done in {:?}", started.elapsed()))
                );
            }
            if started.elapsed() > timeout {
                return Err(CtlError::Input(format!(
                    "the switchover did not finish within {} (now: {:?})",
                    humantime::format_duration(timeout),
                    cd.switchover.map(|s| s.phase)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Marks a keeper failed for the sentinel's next decision.
    pub async fn failkeeper(&self, keeper: &str) -> Result<(), CtlError> {
        self.change(|cd| {
            let k = cd.keepers.get_mut(keeper).ok_or_else(|| {
                CtlError::Input(format!("keeper {keeper} is not part of the cluster"))
            })?;
            k.status.force_fail = true;
            Ok(())
        })
        .await
    }

    /// Forgets a keeper and its database; refused for the master's keeper.
    pub async fn removekeeper(&self, keeper: &str) -> Result<(), CtlError> {
        self.change(|cd| {
            if !cd.keepers.contains_key(keeper) {
                return Err(CtlError::Input(format!(
                    "keeper {keeper} is not part of the cluster"
                )));
            }
            if cd.master_db().is_some_and(|m| m.spec.keeper_uid == keeper) {
                return Err(CtlError::Input(format!(
                    "keeper {keeper} runs the master; switch over first (tendrilctl switchover)"
                )));
            }
            cd.keepers.remove(keeper);
            cd.dbs.retain(|_, d| d.spec.keeper_uid != keeper);
            Ok(())
        })
        .await
    }

    /// Promotes a standby cluster: its leader stops following the external primary and
    /// becomes writable (the sentinel and its keeper do it). Refused on a master cluster.
    pub async fn promote(&self) -> Result<(), CtlError> {
        self.change(|cd| {
            if cd.spec.role == ClusterRole::Master {
                return Err(CtlError::Input(format!(
                    "cluster {:?} is not a standby cluster (its role is master): there is \
                     nothing to promote; nothing was changed",
                    self.cluster
                )));
            }
            cd.spec.role = ClusterRole::Master;
            Ok(())
        })
        .await
    }

    /// Read, change, compare-and-swap; retried when the sentinel wrote in between.
    async fn change<T>(
        &self,
        mut f: impl FnMut(&mut ClusterData) -> Result<T, CtlError>,
    ) -> Result<T, CtlError> {
        for _ in 0..5 {
            let (mut cd, revision) = self.read().await?;
            let out = f(&mut cd)?;
            cd.generation = cd.generation.next();
            cd.change_time = SystemTime::now();
            match self
                .store
                .cas(
                    &self.keys.cluster_data(),
                    encode(&cd),
                    Expect::ModRevision(revision),
                    None,
                )
                .await?
            {
                CasOutcome::Written(_) => return Ok(out),
                _ => continue,
            }
        }
        Err(CtlError::Contended(5))
    }
}

/// The external primary a standby cluster follows, as `host:port` (or its conninfo).
fn external_primary(settings: Option<&tendril_control_model::StandbySettings>) -> String {
    match settings {
        Some(s) => match &s.primary_host {
            Some(host) => format!("{host}:{}", s.primary_port.unwrap_or(5432)),
            None => format!("({})", s.primary_conninfo),
        },
        None => "(not configured)".into(),
    }
}

/// Renders the status as a table.
pub fn render_table(s: &Status) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "cluster {} (uid {})  phase {}  generation {}\n",
        s.cluster, s.uid, s.phase, s.generation
    ));
    out.push_str(&format!(
        "sentinel leader: {}  ({} sentinel{} reporting)\n",
        s.sentinel_leader.as_deref().unwrap_or("none"),
        s.sentinels.len(),
        if s.sentinels.len() == 1 { "" } else { "s" }
    ));
    if let Some(primary) = &s.standby_of {
        out.push_str(&format!(
            "standby cluster: follows the external primary {primary}; read-only until \
             `tendrilctl promote`\n"
        ));
    }
    out.push_str(&format!(
        "proxies route to: {}{}  (proxy generation {}{})\n",
        s.proxy_route
            .as_deref()
            .unwrap_or("nothing: no master routable"),
        if s.standby_of.is_some() && s.proxy_route.is_some() {
            " (the standby leader, read-only)"
        } else {
            ""
        },
        s.proxy_generation,
        if s.hold {
            ", holding new connections"
        } else {
            ""
        }
    ));
    if let Some(sw) = &s.switchover {
        out.push_str(&format!("switchover in progress: {sw}\n"));
    }
    out.push('\n');
    let headers = [
        "KEEPER", "HEALTHY", "DB", "ROLE", "POSTGRES", "LSN", "LAG", "SYNC", "READS", "GEN",
        "ADDRESS",
    ];
    let rows: Vec<Vec<String>> = s
        .keepers
        .iter()
        .map(|k| {
            vec![
                k.keeper.clone(),
                if k.healthy {
                    "yes".into()
                } else if k.reporting {
                    "no".into()
                } else {
                    "no (silent)".into()
                },
                k.db.clone().unwrap_or_else(|| "-".into()),
                match (&k.role, &k.follows) {
                    (Some(r), Some(f)) => format!("{r} of {f}"),
                    (Some(r), None) => r.clone(),
                    _ => "-".into(),
                },
                k.postgres.clone(),
                k.lsn.clone().unwrap_or_else(|| "-".into()),
                k.lag_bytes.map_or("-".into(), |b| format!("{b} B")),
                if k.synchronous {
                    "sync".into()
                } else {
                    "-".into()
                },
                k.reads.clone().unwrap_or_else(|| "-".into()),
                k.generation.clone(),
                k.address.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&table(&headers, &rows));
    for k in &s.keepers {
        let archiving = k.archiving.as_ref().map(|a| a.summary());
        for line in [&k.last_error, &k.last_fence, &archiving]
            .into_iter()
            .flatten()
        {
            out.push_str(&format!("  {}: {line}\n", k.keeper));
        }
    }
    out.push('\n');
    let prows: Vec<Vec<String>> = s
        .proxies
        .iter()
        .map(|p| {
            vec![
                p.proxy.clone(),
                p.generation.to_string(),
                if p.current {
                    "yes".into()
                } else {
                    "no (behind)".into()
                },
                p.listen.clone().unwrap_or_else(|| "-".into()),
                p.read_only_listen.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    if prows.is_empty() {
        out.push_str("no proxy reporting\n");
    } else {
        let headers = ["PROXY", "GENERATION", "CURRENT", "LISTEN", "READ-ONLY"];
        out.push_str(&table(&headers, &prows));
    }
    if !s.events.is_empty() {
        out.push_str("\nrecent events:\n");
        for e in &s.events {
            out.push_str(&format!(
                "  {}  gen {}  {}: {}\n",
                humantime::format_rfc3339_seconds(e.time),
                e.generation,
                e.kind,
                e.reason
            ));
        }
    }
    out
}

fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l.push('\n');
        l
    };
    let mut out = line(headers.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
