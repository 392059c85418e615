//! What a soak is doing, kept where a person reads it after the run: each step and fault
//! is printed and appended to `soak.log` in the soak's directory; the processes' logs are
//! copied to `logs/` there when the run ends; and a watchdog ([`watchdog`]) names the step
//! and keeps the logs when a run hangs.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tendril_testkit::Watchdog;

use crate::soak::Settings;
use crate::soak::workload::Shared;

/// The soak's journal.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    dir: PathBuf,
    step: Mutex<String>,
    journal: Mutex<Option<std::fs::File>>,
    proxy_ports: Mutex<Vec<u16>>,
}

impl Progress {
    /// A journal in `dir` (`soak.log`, appended to).
    pub fn new(dir: &Path) -> Arc<Progress> {
        let journal = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("soak.log"))
            .ok();
        Arc::new(Progress {
            start: Instant::now(),
            dir: dir.to_path_buf(),
            step: Mutex::new(String::new()),
            journal: Mutex::new(journal),
            proxy_ports: Mutex::new(Vec::new()),
        })
    }

    /// Records a line: printed, and appended to the journal.
    pub fn line(&self, text: &str) {
        // The wall clock too: the processes' logs are in it.
        let line = format!(
            "cluster soak {:>8.3}s ({}) {text}",
            self.start.elapsed().as_secs_f64(),
            humantime::format_rfc3339_millis(std::time::SystemTime::now())
        );
        println!("{line}");
        if let Some(f) = self
            .journal
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = writeln!(f, "{line}");
        }
    }

    /// Records the step the soak is at (what the watchdog names if it never ends).
    pub fn step(&self, text: &str) {
        *self.step.lock().unwrap_or_else(|e| e.into_inner()) = text.to_owned();
        self.line(text);
    }

    /// The proxies' ports, for the sockets the watchdog lists.
    pub fn set_proxy_ports(&self, ports: &[u16]) {
        *self.proxy_ports.lock().unwrap_or_else(|e| e.into_inner()) = ports.to_vec();
    }

    /// The TCP sockets on the proxies' ports (see [`proxy_sockets`]).
    pub fn sockets(&self) -> String {
        let ports = self
            .proxy_ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        proxy_sockets(&ports)
    }

    /// Copies the processes' logs from the cluster's directory to `logs/` in the soak's
    /// (the cluster's directory goes away with it): each component's log, and each
    /// keeper's PostgreSQL log as `<keeper>-postgres.log`.
    pub fn keep_logs(&self, cluster_dir: &Path) {
        let to = self.dir.join("logs");
        if let Err(e) = std::fs::create_dir_all(&to) {
            self.line(&format!("cannot keep the logs in {}: {e}", to.display()));
            return;
        }
        for entry in std::fs::read_dir(cluster_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path.is_dir() {
                let pg = path.join("postgres.log");
                if pg.is_file() {
                    let _ = std::fs::copy(&pg, to.join(format!("{name}-postgres.log")));
                }
            } else if name.ends_with(".log") {
                let _ = std::fs::copy(&path, to.join(&name));
            }
        }
        self.line(&format!("process logs kept in {}", to.display()));
    }
}

/// The end of each process log in `cluster_dir`.
fn logs_tail(cluster_dir: &Path, lines: usize) -> String {
    let mut out = String::new();
    let mut logs: Vec<PathBuf> = std::fs::read_dir(cluster_dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        out.push_str(&crate::log_tail(&log.display().to_string(), &text, lines));
    }
    out
}

/// The TCP sockets on the proxies' ports, with their owners and queues.
fn proxy_sockets(ports: &[u16]) -> String {
    let Ok(out) = std::process::Command::new("ss").arg("-tanpo").output() else {
        return "ss did not run\n".into();
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let wanted: Vec<String> = ports.iter().map(|p| format!(":{p} ")).collect();
    let mut lines: Vec<&str> = text
        .lines()
        .filter(|l| wanted.iter().any(|w| l.contains(w.as_str())))
        .collect();
    let total = lines.len();
    lines.truncate(60);
    format!(
        "{total} sockets on the proxies' ports:\n{}\n",
        lines.join("\n")
    )
}

/// Stops every PostgreSQL under `cluster_dir` (and its children), including any whose
/// keeper was killed: they are not the test's descendants any more.
fn kill_postgres(cluster_dir: &Path) {
    for entry in std::fs::read_dir(cluster_dir)
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(pid) = crate::postmaster_pid_in(&entry.path()) {
            tendril_testkit::kill_tree(pid, true);
        }
    }
}

/// Arms the soak's watchdog: after `limit`, it prints the step, the journal's end, the last
/// events of the history, the processes' logs and the proxies' sockets, keeps the logs,
/// stops every process and fails the run.
pub fn watchdog(
    s: &Settings,
    limit: Duration,
    progress: Arc<Progress>,
    shared: Arc<Shared>,
    cluster_dir: Arc<OnceLock<PathBuf>>,
) -> Watchdog {
    let seed = s.seed;
    let journal = s.dir.join("soak.log");
    let (p, dir) = (progress.clone(), cluster_dir.clone());
    Watchdog::arm(
        &format!("the cluster soak (seed {seed})"),
        limit,
        move || {
            let step = p.step.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut out = format!("stuck at: {step}\n---- the journal's end ----\n");
            let text = std::fs::read_to_string(&journal).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            for l in &lines[lines.len().saturating_sub(20)..] {
                out.push_str(l);
                out.push('\n');
            }
            out.push_str("---- the history's last events ----\n");
            let events = shared.history();
            for e in &events[events.len().saturating_sub(20)..] {
                out.push_str(&serde_json::to_string(e).unwrap_or_default());
                out.push('\n');
            }
            if let Some(d) = dir.get() {
                out.push_str(&logs_tail(d, 15));
            }
            out.push_str(&p.sockets());
            out
        },
        move || {
            if let Some(d) = cluster_dir.get() {
                progress.keep_logs(d);
                kill_postgres(d);
            }
        },
    )
}
