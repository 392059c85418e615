//! The soak's fault driver: at random moments, from a seeded generator, it ends backends
//! (pg_terminate_backend, a query cancel, kill -9 of one backend, which resets them all),
//! crashes and restarts the postmaster, fences the proxy as a failover does (no master,
//! then the master again) or holds it as a switchover does, and replaces the proxy with a
//! new process (`--takeover`, a node rollout: kernel-forwarded connections move, the others
//! drain in the old process). The seed fixes the sequence of faults and of every client's
//! choices; the interleaving with the clients is the machine's.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::clients::{APPLICATION, Report};
use crate::support::{Env, ProxyProc};
use tendril_testkit::{PG_BIN, PgServer};

/// The longest the nemesis holds new connections (a switchover's pause).
pub const HOLD_MAX: Duration = Duration::from_millis(500);

/// The longest a new connection may be held: a hold, plus the proxy's switchover drain
/// (`--switchover-grace`, 1 s by default), which runs before the next routing table applies.
pub const HELD: Duration = Duration::from_millis(1500);

pub use tendril_testkit::Rng;

/// Runs SQL on PostgreSQL directly; None when it is down or restarting.
fn admin(pg: &PgServer, sql: &str) -> Option<String> {
    let out = Command::new(format!("{PG_BIN}/psql"))
        .args(["-h", &pg.host().to_string(), "-p", &pg.port().to_string()])
        .args(["-U", "postgres", "-d", "postgres", "-XAtc", sql])
        .env("PGCONNECT_TIMEOUT", "3")
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The soak's client backends (its raw sessions, pgbench's and psql's), by pid.
fn client_backends(pg: &PgServer) -> Vec<u32> {
    let sql = format!(
        "select pid from pg_stat_activity where backend_type = 'client backend' \
         and pid <> pg_backend_pid() \
         and (application_name in ('{APPLICATION}', 'pgbench', 'psql')) order by pid"
    );
    admin(pg, &sql)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

fn pick(rng: &mut Rng, pids: &[u32]) -> Option<u32> {
    (!pids.is_empty()).then(|| pids[rng.below(pids.len() as u64) as usize])
}

/// The proxy under soak and the processes it replaced (each must exit once its own
/// connections ended).
pub struct Proxies<'a> {
    pub current: ProxyProc,
    pub replaced: Vec<ProxyProc>,
    /// The path's flags, which every new process gets too.
    pub flags: &'a [&'a str],
    pub name: String,
}

impl Proxies<'_> {
    /// Starts a new process with `--takeover` and waits until it serves.
    fn take_over(&mut self, env: &Env) -> Result<(), String> {
        let listen = format!("127.0.0.1:{}", self.current.port);
        let mut args = vec!["--listen-address", listen.as_str(), "--takeover"];
        args.extend_from_slice(self.flags);
        let uid = format!("soak-{}-{}", self.name, self.replaced.len() + 1);
        let new = ProxyProc::start(env, &uid, &args, &[]);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !new
            .log_text()
            .contains("took over: the old proxy stopped accepting")
        {
            if Instant::now() >= deadline {
                return Err(format!("{uid} did not take over:\n{}", new.log_text()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.replaced
            .push(std::mem::replace(&mut self.current, new));
        Ok(())
    }
}

/// Injects faults until `until`, logging each with its time since `start`.
pub async fn run(
    env: &mut Env,
    pg: &mut PgServer,
    proxies: &mut Proxies<'_>,
    rng: &mut Rng,
    (start, until): (Instant, Instant),
    report: &Report,
) {
    let route = |pg: &PgServer| Some(("db1", pg.host(), pg.port()));
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(450))).await;
        let at = start.elapsed();
        let roll = rng.below(100);
        let what: String = match roll {
            0..30 => {
                let pid = pick(rng, &client_backends(pg));
                if let Some(pid) = pid {
                    admin(pg, &format!("select pg_terminate_backend({pid})"));
                }
                report.count("fault: terminate backend");
                format!("pg_terminate_backend({pid:?})")
            }
            30..45 => {
                let pid = pick(rng, &client_backends(pg));
                if let Some(pid) = pid {
                    admin(pg, &format!("select pg_cancel_backend({pid})"));
                }
                report.count("fault: cancel query");
                format!("pg_cancel_backend({pid:?})")
            }
            45..50 => {
                let pid = pick(rng, &client_backends(pg));
                if let Some(pid) = pid {
                    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                    tokio::task::block_in_place(|| crate::support::wait_ready(pg));
                }
                report.count("fault: kill -9 backend");
                format!("kill -9 backend {pid:?} (crash reset)")
            }
            50..54 => {
                let down = Duration::from_millis(rng.below(300));
                tokio::task::block_in_place(|| {
                    pg.kill_postmaster();
                    std::thread::sleep(down);
                    pg.restart();
                    crate::support::wait_ready(pg);
                });
                report.count("fault: postmaster crash");
                format!("kill -9 postmaster, restarted after {down:?}")
            }
            54..77 => {
                let gap = Duration::from_millis(rng.below(300));
                env.route_to(None, false).await;
                tokio::time::sleep(gap).await;
                env.route_to(route(pg), false).await;
                report.count("fault: failover fence");
                format!("fence (no master) for {gap:?}")
            }
            77..95 => {
                let gap = Duration::from_millis(50 + rng.below(HOLD_MAX.as_millis() as u64 - 50));
                env.route_to(None, true).await;
                tokio::time::sleep(gap).await;
                env.route_to(route(pg), false).await;
                report.count("fault: switchover hold");
                format!("switchover hold for {gap:?}")
            }
            _ => {
                let took = tokio::task::block_in_place(|| proxies.take_over(env));
                report.count("fault: takeover");
                match took {
                    Ok(()) => format!("takeover by {}", proxies.current.uid),
                    Err(e) => {
                        report.fail(format!("takeover failed: {e}"));
                        "takeover failed".into()
                    }
                }
            }
        };
        println!("soak {:>8.3}s fault: {what}", at.as_secs_f64());
    }
}
