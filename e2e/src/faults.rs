//! Faults: signals to a node's processes, and a network namespace that can be cut off.

use nix::sys::signal::Signal;

use crate::Node;

pub use tendril_testkit::Netns;

fn signal(pid: i32, s: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), s);
}

impl Node {
    /// `kill -9` of the postmaster.
    pub fn kill_postmaster(&self) -> i32 {
        let pid = self.postmaster_pid().expect("postgres runs");
        signal(pid, Signal::SIGKILL);
        pid
    }

    /// `kill -9` of the keeper (postgres keeps running, orphaned).
    pub fn kill_keeper(&mut self) {
        self.keeper.kill();
    }

    /// Every PostgreSQL process of this node: the postmaster and its children (backends,
    /// walsenders, background workers).
    fn postgres_pids(&self) -> Vec<i32> {
        let Some(postmaster) = self.postmaster_pid() else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // "pid (comm) state ppid ...": the comm may hold spaces, so split after ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<i32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Freezes the host: SIGSTOP to the keeper and every PostgreSQL process.
    pub fn freeze(&self) {
        self.keeper.signal(Signal::SIGSTOP);
        for pid in self.postgres_pids() {
            signal(pid, Signal::SIGSTOP);
        }
    }

    /// Thaws the host.
    pub fn thaw(&self) {
        for pid in self.postgres_pids() {
            signal(pid, Signal::SIGCONT);
        }
        self.keeper.signal(Signal::SIGCONT);
    }

    /// Starts the keeper again.
    pub fn restart_keeper(&mut self) {
        self.keeper.kill();
        self.keeper.start();
    }
}
