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
        pids.extend(
            tendril_testkit::processes()
                .into_iter()
                .filter(|(_, ppid)| *ppid == postmaster)
                .map(|(pid, _)| pid),
        );
        pids
    }

    /// The keeper's fence guard, from the pid file the keeper writes.
    fn guard_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.data_dir.join("fence-guard.pid")).ok()?;
        text.trim().parse().ok()
    }

    /// Freezes the host: SIGSTOP to the keeper, its fence guard and every PostgreSQL
    /// process (a host that stops runs nothing, the guard included).
    pub fn freeze(&self) {
        self.keeper.signal(Signal::SIGSTOP);
        let mut frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(guard) = self.guard_pid() {
            signal(guard, Signal::SIGSTOP);
            frozen.push(guard);
        }
        drop(frozen);
        self.stop_postgres();
    }

    /// SIGSTOP to the postmaster first (so that it forks no backend that escapes), then to
    /// each of its children; remembered for the thaw.
    fn stop_postgres(&self) {
        let mut frozen = self.frozen.lock().unwrap_or_else(|e| e.into_inner());
        let Some(postmaster) = self.postmaster_pid() else {
            return;
        };
        signal(postmaster, Signal::SIGSTOP);
        frozen.push(postmaster);
        for pid in self.postgres_pids() {
            if pid != postmaster {
                signal(pid, Signal::SIGSTOP);
                frozen.push(pid);
            }
        }
    }

    /// Pauses this node's PostgreSQL alone (SIGSTOP to every PostgreSQL process; the
    /// keeper runs on): a standby that falls behind, a master that stops answering.
    /// [`Node::thaw`] resumes it.
    pub fn pause_postgres(&self) {
        self.stop_postgres();
    }

    /// A host crash: `kill -9` of the keeper, its fence guard and every PostgreSQL process
    /// at once. [`Node::restart_keeper`] boots it again.
    pub fn crash(&mut self) {
        self.keeper.kill();
        for pid in self.guard_pid().into_iter().chain(self.postgres_pids()) {
            signal(pid, Signal::SIGKILL);
        }
    }

    /// Thaws the host: every process the freeze stopped.
    pub fn thaw(&self) {
        let frozen = std::mem::take(&mut *self.frozen.lock().unwrap_or_else(|e| e.into_inner()));
        for pid in frozen {
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
