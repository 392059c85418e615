//! The fence guard: a small process beside the keeper that stops PostgreSQL when the keeper
//! cannot, so a master whose keeper froze (SIGSTOP, a hang) or died (kill -9, a crash) stops
//! taking writes before a sentinel can elect another master, exactly as a master whose
//! keeper lost the store does (see [`crate::fence`]).
//!
//! The keeper starts it (`tendril-keeper fence-guard`, its own process group, so it outlives
//! the keeper) and talks to it over its stdin. While the keeper runs its database as master,
//! every report that reaches the store moves the guard's deadline to the same bound the
//! keeper's own fence uses ([`crate::fence::fence_after`] after the write started) plus
//! [`MARGIN`], so the keeper's clean fast shutdown comes first when the keeper is alive. If
//! the deadline passes, the guard stops the postmaster named by the data directory's
//! `postmaster.pid` with an immediate shutdown (SIGQUIT: every backend exits at once,
//! acknowledging nothing more), then SIGKILL if it is still there a second later. When the
//! keeper's end of the pipe closes, the guard keeps its last deadline and exits after it:
//! a keeper that exits cleanly disarms it first (it stops PostgreSQL itself).
//!
//! Deadlines travel as CLOCK_MONOTONIC readings, which both processes share on one host, so
//! a message read late still means what it meant when written.
//!
//! What it cannot bound: a whole host frozen with the guard in it (a paused virtual machine)
//! thaws with PostgreSQL and the guard together; the guard then fences at once, but a client
//! request already queued may be served first. No hardware watchdog is used.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitCode, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::fence::ReportClock;

/// How long after the keeper's own fence bound the guard acts.
pub const MARGIN: Duration = Duration::from_millis(500);
/// How long an immediate shutdown may take before the postmaster is killed.
const KILL_AFTER: Duration = Duration::from_secs(1);
/// The first argument that makes `tendril-keeper` the guard.
pub const SUBCOMMAND: &str = "fence-guard";

/// A message from the keeper.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardCommand {
    /// Stop the PostgreSQL of `pgdata` at `deadline` (CLOCK_MONOTONIC, ns) unless re-armed.
    Arm { deadline: u64, pgdata: PathBuf },
    /// Nothing to guard.
    Disarm,
}

impl GuardCommand {
    /// One line of the protocol.
    pub fn encode(&self) -> String {
        match self {
            GuardCommand::Arm { deadline, pgdata } => {
                format!("arm {deadline} {}\n", pgdata.display())
            }
            GuardCommand::Disarm => "disarm\n".into(),
        }
    }

    /// Parses one line; None for anything else (ignored, and logged by the guard).
    pub fn parse(line: &str) -> Option<GuardCommand> {
        let line = line.trim_end_matches('\n');
        if line == "disarm" {
            return Some(GuardCommand::Disarm);
        }
        let rest = line.strip_prefix("arm ")?;
        let (deadline, pgdata) = rest.split_once(' ')?;
        Some(GuardCommand::Arm {
            deadline: deadline.parse().ok()?,
            pgdata: PathBuf::from(pgdata),
        })
    }
}

/// What the guard does next, from what it was told and the time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Wait for a message this long (None: indefinitely).
    Wait(Option<Duration>),
    /// The deadline passed: stop this PostgreSQL.
    Fence(PathBuf),
    /// The keeper is gone and nothing is armed: exit.
    Exit,
}

/// The guard's decision. `armed`: the last arming (None after a disarm or a fence);
/// `keeper_gone`: its pipe closed.
pub fn next(armed: Option<&(u64, PathBuf)>, keeper_gone: bool, now: u64) -> Next {
    match armed {
        Some((deadline, pgdata)) if now >= *deadline => Next::Fence(pgdata.clone()),
        Some((deadline, _)) => Next::Wait(Some(Duration::from_nanos(deadline - now))),
        None if keeper_gone => Next::Exit,
        None => Next::Wait(None),
    }
}

/// CLOCK_MONOTONIC in nanoseconds.
pub fn monotonic_ns() -> u64 {
    use nix::time::{ClockId, clock_gettime};
    // CLOCK_MONOTONIC exists on every Linux; a failure would mean no clock at all.
    let ts = clock_gettime(ClockId::CLOCK_MONOTONIC)
        .unwrap_or_else(|_| nix::sys::time::TimeSpec::new(0, 0));
    (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64
}

/// `instant` as a CLOCK_MONOTONIC reading (std's Instant reads the same clock, but opaquely).
fn to_monotonic(instant: Instant) -> u64 {
    let now = Instant::now();
    let ns = monotonic_ns();
    if instant >= now {
        ns + (instant - now).as_nanos() as u64
    } else {
        ns.saturating_sub((now - instant).as_nanos() as u64)
    }
}

/// The guard process: reads commands from stdin until the keeper is gone and nothing is
/// armed. Logs to stderr (the keeper's log).
pub fn run() -> ExitCode {
    let (tx, rx) = std::sync::mpsc::channel::<Option<String>>();
    // A reader thread turns stdin into messages, so the main loop can wait with a timeout.
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) => {
                    if tx.send(Some(l)).is_err() {
                        return;
                    }
                }
                Err(_) => break,
            }
        }
        let _ = tx.send(None);
    });
    let pid = std::process::id();
    let mut armed: Option<(u64, PathBuf)> = None;
    let mut keeper_gone = false;
    loop {
        match next(armed.as_ref(), keeper_gone, monotonic_ns()) {
            Next::Exit => return ExitCode::SUCCESS,
            Next::Fence(pgdata) => {
                eprintln!(
                    "tendril-keeper fence guard (pid {pid}): the keeper did not renew its \
                     report in time; stopping the PostgreSQL of {} (immediate shutdown)",
                    pgdata.display()
                );
                match fence(&pgdata) {
                    Ok(Some(pg)) => eprintln!("fence guard: postgres (pid {pg}) stopped"),
                    Ok(None) => eprintln!("fence guard: postgres was not running"),
                    Err(e) => eprintln!("fence guard: cannot stop postgres: {e}"),
                }
                armed = None;
            }
            Next::Wait(limit) => {
                let message = match limit {
                    Some(d) => match rx.recv_timeout(d) {
                        Ok(m) => m,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
                        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => None,
                    },
                    None => rx.recv().unwrap_or(None),
                };
                match message {
                    None => keeper_gone = true,
                    Some(line) => match GuardCommand::parse(&line) {
                        Some(GuardCommand::Arm { deadline, pgdata }) => {
                            armed = Some((deadline, pgdata))
                        }
                        Some(GuardCommand::Disarm) => armed = None,
                        None => eprintln!("fence guard: ignoring {line:?}"),
                    },
                }
            }
        }
    }
}

/// Stops the postmaster of `pgdata`: SIGQUIT, then SIGKILL after [`KILL_AFTER`]. Returns
/// its pid, or None when none runs there.
fn fence(pgdata: &Path) -> Result<Option<i32>, String> {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    let pid_file = pgdata.join("postmaster.pid");
    let text = match std::fs::read_to_string(&pid_file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", pid_file.display())),
    };
    let pid: i32 = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("{}: no pid on its first line", pid_file.display()))?;
    // The file outlives a crashed postmaster; its pid may belong to another process by now.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    if !String::from_utf8_lossy(argv0).ends_with("postgres") {
        return Ok(None);
    }
    let pid = Pid::from_raw(pid);
    kill(pid, Signal::SIGQUIT).map_err(|e| format!("SIGQUIT to {pid}: {e}"))?;
    let deadline = Instant::now() + KILL_AFTER;
    while Instant::now() < deadline {
        if kill(pid, None).is_err() {
            return Ok(Some(pid.as_raw()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = kill(pid, Signal::SIGKILL);
    Ok(Some(pid.as_raw()))
}

/// Kills the guard named by `pid_file`, if it still runs.
fn stop_previous(pid_file: &Path) {
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return;
    };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline
        .split(|&b| b == 0)
        .nth(1)
        .is_some_and(|arg| arg == SUBCOMMAND.as_bytes())
    {
        tracing::info!(pid, "stopping the fence guard of a previous keeper process");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The keeper's handle on its guard.
#[derive(Debug)]
pub struct Guard {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    child: Child,
    stdin: Option<ChildStdin>,
    /// The data directory to guard while the keeper runs it as master.
    target: Option<PathBuf>,
    /// The keeper's fence bound.
    limit: Duration,
    /// When the last report that reached the store started (shared with the keeper's fence).
    clock: ReportClock,
    /// The last command sent.
    sent: Option<GuardCommand>,
}

impl Guard {
    /// Starts the guard: this executable with [`SUBCOMMAND`], in its own process group. Its
    /// pid goes to `pid_file`; a guard left there by a previous keeper process is stopped
    /// first (this keeper stops that keeper's PostgreSQL itself, and must not have the old
    /// guard stop the one it starts next).
    pub fn spawn(pid_file: &Path, clock: ReportClock) -> std::io::Result<Guard> {
        use std::os::unix::process::CommandExt;
        stop_previous(pid_file);
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg(SUBCOMMAND)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .spawn()?;
        let stdin = child.stdin.take();
        std::fs::write(pid_file, format!("{}\n", child.id()))?;
        tracing::info!(pid = child.id(), "fence guard started");
        Ok(Guard {
            inner: Mutex::new(Inner {
                child,
                stdin,
                target: None,
                limit: Duration::ZERO,
                clock,
                sent: None,
            }),
        })
    }

    /// A report reached the store (recorded in the [`ReportClock`]): move the deadline.
    pub fn renewed(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.send();
        }
    }

    /// What to guard: the data directory while the keeper runs it as master, with the
    /// keeper's fence bound; None otherwise.
    pub fn set_target(&self, pgdata: Option<PathBuf>, limit: Duration) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.target = pgdata;
            inner.limit = limit;
            inner.send();
        }
    }

    /// Disarms the guard and lets it exit (the keeper stops PostgreSQL itself).
    pub fn close(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.target = None;
            inner.send();
            inner.stdin = None;
            let _ = inner.child.try_wait();
        }
    }
}

impl Inner {
    fn command(&self) -> GuardCommand {
        match (&self.target, self.clock.last()) {
            (Some(pgdata), Some(renewed)) => GuardCommand::Arm {
                deadline: to_monotonic(renewed + self.limit + MARGIN),
                pgdata: pgdata.clone(),
            },
            _ => GuardCommand::Disarm,
        }
    }

    fn send(&mut self) {
        let command = self.command();
        if self.sent.as_ref() == Some(&command) {
            return;
        }
        let Some(stdin) = self.stdin.as_mut() else {
            return;
        };
        match stdin.write_all(command.encode().as_bytes()) {
            Ok(()) => self.sent = Some(command),
            Err(e) => {
                tracing::error!(error = %e, "the fence guard is gone; a frozen keeper's master is no longer bounded");
                self.stdin = None;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip() {
        for c in [
            GuardCommand::Disarm,
            GuardCommand::Arm {
                deadline: 123_456_789,
                pgdata: PathBuf::from("/var/lib/tendril/k 0/postgres"),
            },
        ] {
            assert_eq!(GuardCommand::parse(&c.encode()), Some(c));
        }
        for bad in ["", "arm", "arm x /p", "arm 12", "fence now"] {
            assert_eq!(GuardCommand::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_guard_fences_at_the_deadline_and_not_before() {
        let p = PathBuf::from("/pg");
        let armed = (1_000, p.clone());
        // (armed, keeper gone, now) -> next
        let table = [
            (
                Some(&armed),
                false,
                400,
                Next::Wait(Some(Duration::from_nanos(600))),
            ),
            (Some(&armed), false, 1_000, Next::Fence(p.clone())),
            (Some(&armed), false, 5_000, Next::Fence(p.clone())),
            // The keeper died: its last deadline still holds.
            (
                Some(&armed),
                true,
                999,
                Next::Wait(Some(Duration::from_nanos(1))),
            ),
            (Some(&armed), true, 1_000, Next::Fence(p.clone())),
            (None, false, 5_000, Next::Wait(None)),
            (None, true, 5_000, Next::Exit),
        ];
        for (armed, gone, now, want) in table {
            assert_eq!(next(armed, gone, now), want, "{armed:?} {gone} {now}");
        }
    }

    #[test]
    fn monotonic_readings_follow_instants() {
        let now = Instant::now();
        let later = to_monotonic(now + Duration::from_secs(3));
        let earlier = to_monotonic(now);
        let diff = later - earlier;
        // Two clock readings apart: close, not exact.
        assert!(
            diff.abs_diff(3_000_000_000) < 500_000_000,
            "{diff} ns apart, not 3 s"
        );
    }
}
