//! Faults: signals to a node's processes, and a network namespace that can be cut off.

use std::net::IpAddr;
use std::process::Command;

use nix::sys::signal::Signal;

use crate::Node;

/// A network namespace joined to this one by a veth pair: `ns_ip` inside, `root_ip` outside.
#[derive(Debug)]
pub struct Netns {
    /// Namespace name.
    pub name: String,
    /// The outside end's name.
    pub root_if: String,
    /// Address of the inside end.
    pub ns_ip: IpAddr,
    /// Address of the outside end.
    pub root_ip: IpAddr,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("run ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// Creates the namespace and the veth pair, with addresses and loopback up. Needs root.
    pub fn create() -> Netns {
        let id = std::process::id() % 200 + 20;
        let name = format!("tendril-e2e-{}", std::process::id());
        let root_if = format!("te2e{id}a");
        let ns_if = format!("te2e{id}b");
        let root_ip: IpAddr = format!("10.{id}.0.1").parse().expect("ip");
        let ns_ip: IpAddr = format!("10.{id}.0.2").parse().expect("ip");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &root_if]).output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{root_ip}/24"), "dev", &root_if]);
        ip(&["link", "set", &root_if, "up"]);
        ip(&[
            "netns",
            "exec",
            &name,
            "ip",
            "addr",
            "add",
            &format!("{ns_ip}/24"),
            "dev",
            &ns_if,
        ]);
        ip(&["netns", "exec", &name, "ip", "link", "set", &ns_if, "up"]);
        ip(&["netns", "exec", &name, "ip", "link", "set", "lo", "up"]);
        Netns {
            name,
            root_if,
            ns_ip,
            root_ip,
        }
    }

    /// Cuts the namespace off: nothing crosses the veth pair.
    pub fn partition(&self) {
        ip(&["link", "set", &self.root_if, "down"]);
    }

    /// Restores the link.
    pub fn heal(&self) {
        ip(&["link", "set", &self.root_if, "up"]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.root_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

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
