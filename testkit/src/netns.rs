//! A network namespace joined to this one by a veth pair: another host for tests (a keeper
//! that can be partitioned, a PostgreSQL reached over a real link rather than loopback).
//! Needs root (`ip netns`, `setns`).

use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace with `ns_ip` inside and `root_ip` on the outside end of a veth pair.
/// Removed (with the pair) when dropped.
#[derive(Debug)]
pub struct Netns {
    /// Namespace name (`ip netns exec NAME ...`).
    pub name: String,
    /// The outside end's name.
    pub root_if: String,
    /// Address of the inside end.
    pub ns_ip: IpAddr,
    /// Address of the outside end.
    pub root_ip: IpAddr,
    /// A second address on the outside end, for the store: [`Netns::cut_store`] makes it
    /// unreachable from inside while every other address stays reachable.
    pub store_ip: IpAddr,
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
    /// Creates the namespace and the veth pair, with addresses and loopback up. Each call
    /// makes a new one (its own name, interfaces and /24), so a test can have several.
    pub fn create() -> Netns {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 250;
        let pid = std::process::id();
        let id = pid % 200 + 20;
        let name = format!("tendril-test-{pid}-{n}");
        let root_if = format!("tt{id}x{n}a");
        let ns_if = format!("tt{id}x{n}b");
        let root_ip: IpAddr = format!("10.{id}.{n}.1").parse().expect("ip");
        let ns_ip: IpAddr = format!("10.{id}.{n}.2").parse().expect("ip");
        let store_ip: IpAddr = format!("10.{id}.{n}.3").parse().expect("ip");
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        let _ = Command::new("ip").args(["link", "del", &root_if]).output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &root_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{root_ip}/24"), "dev", &root_if]);
        ip(&["addr", "add", &format!("{store_ip}/32"), "dev", &root_if]);
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
            store_ip,
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

    /// Cuts the namespace off from [`Netns::store_ip`] only (an unreachable route inside):
    /// a host that loses the store while its clients and peers still reach it.
    pub fn cut_store(&self) {
        self.cut_to(self.store_ip);
    }

    /// Undoes [`Netns::cut_store`].
    pub fn heal_store(&self) {
        self.heal_to(self.store_ip);
    }

    /// Makes `dest` unreachable from inside (an unreachable route): nothing the namespace
    /// sends reaches it, so connections either way fail while every other address stays
    /// reachable. [`Netns::root_ip`] is where connections from this namespace's root side
    /// come from (the proxies, clients on the root side).
    pub fn cut_to(&self, dest: IpAddr) {
        let route = format!("{dest}/32");
        ip(&["-n", &self.name, "route", "add", "unreachable", &route]);
    }

    /// Undoes [`Netns::cut_to`].
    pub fn heal_to(&self, dest: IpAddr) {
        let route = format!("{dest}/32");
        ip(&["-n", &self.name, "route", "del", "unreachable", &route]);
    }

    /// Routes what is not on the veth pair through the root namespace (a default route via
    /// [`Netns::root_ip`], IPv4 forwarding on there): namespaces set up this way reach each
    /// other's [`Netns::ns_ip`], like hosts on one network.
    pub fn route_through_root(&self) {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")
            .unwrap_or_else(|e| panic!("enable IPv4 forwarding: {e}"));
        ip(&[
            "-n",
            &self.name,
            "route",
            "add",
            "default",
            "via",
            &self.root_ip.to_string(),
        ]);
    }
}

/// A thread that entered a namespace to start a child there, kept alive as long as the child
/// runs: the child is told to die with the thread that spawned it (`PR_SET_PDEATHSIG`), so
/// the thread must outlive it. Dropping this ends the thread.
#[derive(Debug)]
pub(crate) struct NamespaceThread {
    stop: Option<std::sync::mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for NamespaceThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts `cmd` inside the namespace `name` (the network namespace is per thread, and a
/// child inherits its thread's).
pub(crate) fn spawn_in(
    name: &str,
    mut cmd: std::process::Command,
) -> (std::io::Result<std::process::Child>, NamespaceThread) {
    let path = format!("/var/run/netns/{name}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    let (child_tx, child_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
    let thread = std::thread::spawn(move || {
        if let Err(e) = nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET) {
            let _ = child_tx.send(Err(std::io::Error::other(format!(
                "setns into {path}: {e}"
            ))));
            return;
        }
        let _ = child_tx.send(cmd.spawn());
        // Until the owner is done with the child.
        let _ = stop_rx.recv();
    });
    let child = child_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the namespace thread died")));
    (
        child,
        NamespaceThread {
            stop: Some(stop),
            thread: Some(thread),
        },
    )
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
