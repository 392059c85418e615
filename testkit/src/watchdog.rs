//! A last resort against a test that never ends: a thread that, when a deadline passes
//! before the test disarms it, writes what the test says about itself to stderr (straight
//! to the file descriptor, which the test harness does not capture), kills every process
//! the test started, and exits the test binary with a failure.
//!
//! Timeouts inside a test bound what they wrap; they cannot fire when the test's own
//! threads are blocked, and a hung test in CI shows nothing until the job's limit kills it
//! with all of its output. The watchdog turns that into a failure that names the step.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Disarms the watchdog when dropped (also when the test panics: the panic is the failure).
#[derive(Debug)]
pub struct Watchdog {
    done: Arc<AtomicBool>,
}

impl Watchdog {
    /// Arms a watchdog for `what`, firing after `limit`. `report` says where the test is
    /// (called on the watchdog's thread when it fires, so it must not wait on the test).
    /// `cleanup` runs before the processes are killed (e.g. to keep logs).
    pub fn arm(
        what: &str,
        limit: Duration,
        report: impl Fn() -> String + Send + 'static,
        cleanup: impl FnOnce() + Send + 'static,
    ) -> Watchdog {
        let done = Arc::new(AtomicBool::new(false));
        let flag = done.clone();
        let label = what.to_owned();
        let deadline = Instant::now() + limit;
        let spawned = std::thread::Builder::new()
            .name("test-watchdog".into())
            .spawn(move || {
                while Instant::now() < deadline {
                    if flag.load(Ordering::Relaxed) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                if flag.load(Ordering::Relaxed) {
                    return;
                }
                let mut err = std::io::stderr().lock();
                let _ = writeln!(
                    err,
                    "\n==== {label}: no end within {limit:?}; the watchdog stops it ====\n{}",
                    report()
                );
                let _ = writeln!(err, "---- threads of the test ----\n{}", threads());
                let _ = err.flush();
                drop(err);
                cleanup();
                let killed = kill_descendants();
                let _ = writeln!(
                    std::io::stderr(),
                    "==== {label}: killed {killed} processes it started; exiting ===="
                );
                std::process::exit(101);
            });
        if let Err(e) = spawned {
            // Without the thread the test still runs; it only loses the last resort.
            let _ = writeln!(std::io::stderr(), "{what}: no watchdog thread: {e}");
        }
        Watchdog { done }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Each thread of this process with where the kernel has it waiting.
fn threads() -> String {
    let mut out = String::new();
    for entry in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        let read = |f: &str| {
            std::fs::read_to_string(path.join(f))
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        out.push_str(&format!(
            "{} {} wchan={} syscall={}\n",
            entry.file_name().to_string_lossy(),
            read("comm"),
            read("wchan"),
            read("syscall")
        ));
    }
    out
}

/// (pid, parent pid) of every process, from `/proc`.
pub fn processes() -> Vec<(i32, i32)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // "pid (comm) state ppid ...": the comm may hold spaces, so split after ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
        if let Some(ppid) = ppid {
            out.push((pid, ppid));
        }
    }
    out
}

/// SIGCONT then SIGKILL to every descendant of this process; returns how many.
fn kill_descendants() -> usize {
    kill_tree(std::process::id() as i32, false)
}

/// SIGCONT then SIGKILL to every descendant of `root` (and to `root` itself when
/// `with_root`), found again until none is left, since a dying parent's children move to
/// init; returns how many were signalled. For a test's cleanup of processes it lost track
/// of (a PostgreSQL orphaned by its killed keeper).
pub fn kill_tree(root: i32, with_root: bool) -> usize {
    let mut killed = std::collections::BTreeSet::new();
    let mut family: std::collections::BTreeSet<i32> = [root].into();
    for _ in 0..10 {
        let all = processes();
        loop {
            let before = family.len();
            for (pid, ppid) in &all {
                if family.contains(ppid) {
                    family.insert(*pid);
                }
            }
            if family.len() == before {
                break;
            }
        }
        let targets: Vec<i32> = family
            .iter()
            .copied()
            .filter(|p| (with_root || *p != root) && !killed.contains(p))
            .collect();
        if targets.is_empty() {
            break;
        }
        for pid in &targets {
            let pid = nix::unistd::Pid::from_raw(*pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        killed.extend(targets);
        std::thread::sleep(Duration::from_millis(100));
    }
    killed.len()
}
