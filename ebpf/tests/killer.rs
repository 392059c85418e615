//! The socket killer against real sockets of another process, as root.
//!
//! This binary has its own `main`: run plainly it runs the tests; with `TENDRIL_TEST_ROLE`
//! set it is the victim process (which holds the sockets) or the prober (which loads the
//! killer with reduced capabilities and says which mechanism it got).

#![allow(clippy::unwrap_used, reason = "a test binary: a failed step panics")]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use tendril_ebpf::{Mechanism, SocketKiller, Target};

fn main() {
    match std::env::var("TENDRIL_TEST_ROLE").as_deref() {
        Ok("victim") => return victim(),
        Ok("probe") => return probe(),
        _ => {}
    }
    if !nix_is_root() {
        eprintln!(
            "SKIPPED: the socket killer tests need root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN); run cargo xtask test as root"
        );
        return;
    }
    let tests: [(&str, fn()); 7] = [
        ("bpf_kills_ipv4_connections_of_another_process", || {
            kills_in_another_process(Mechanism::Bpf, "127.0.0.1")
        }),
        ("bpf_kills_ipv6_connections_of_another_process", || {
            kills_in_another_process(Mechanism::Bpf, "::1")
        }),
        ("netlink_kills_ipv4_connections_of_another_process", || {
            kills_in_another_process(Mechanism::Netlink, "127.0.0.1")
        }),
        ("netlink_kills_ipv6_connections_of_another_process", || {
            kills_in_another_process(Mechanism::Netlink, "::1")
        }),
        (
            "pending_io_uring_recv_completes_with_an_error",
            pending_io_uring_recv_completes_with_an_error,
        ),
        (
            "without_cap_bpf_the_fallback_is_reported",
            without_cap_bpf_the_fallback_is_reported,
        ),
        (
            "walk_over_ten_thousand_sockets",
            walk_over_ten_thousand_sockets,
        ),
    ];
    for (name, test) in tests {
        test();
        println!("test {name} ... ok");
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .is_some_and(|uids| uids.split_whitespace().nth(1) == Some("0"))
}

fn load(mechanism: Mechanism) -> SocketKiller {
    let k = match mechanism {
        Mechanism::Bpf => SocketKiller::load_bpf(),
        Mechanism::Netlink => SocketKiller::load_netlink(),
        Mechanism::None => unreachable!("not a mechanism to test"),
    };
    k.unwrap_or_else(|e| panic!("{e}: this machine (root, kernel 6.18 with BTF) must support it"))
}

/// The victim: two listeners, one connected pair on each; on "check", reports what each
/// socket sees.
fn victim() {
    let ip: IpAddr = std::env::var("TENDRIL_TEST_IP").unwrap().parse().unwrap();
    let la = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    let lb = TcpListener::bind(SocketAddr::new(ip, 0)).unwrap();
    let (pa, pb) = (la.local_addr().unwrap(), lb.local_addr().unwrap());
    let ca = TcpStream::connect(pa).unwrap();
    let (sa, _) = la.accept().unwrap();
    let cb = TcpStream::connect(pb).unwrap();
    let (sb, _) = lb.accept().unwrap();
    println!("{} {}", pa.port(), pb.port());
    std::io::stdout().flush().unwrap();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    let probe = |mut s: &TcpStream| -> String {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Ok(0) => "eof".into(),
            Ok(_) => "data".into(),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                "alive".into()
            }
            Err(e) => e.raw_os_error().map_or("error".into(), |c| c.to_string()),
        }
    };
    let listener = match TcpStream::connect(pa).and_then(|_| la.accept()) {
        Ok(_) => "accepting",
        Err(_) => "dead",
    };
    println!(
        "{} {} {} {} {listener}",
        probe(&ca),
        probe(&sa),
        probe(&cb),
        probe(&sb)
    );
    std::io::stdout().flush().unwrap();
}

fn kills_in_another_process(mechanism: Mechanism, ip: &str) {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("TENDRIL_TEST_ROLE", "victim")
        .env("TENDRIL_TEST_IP", ip)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let ports: Vec<u16> = line
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let target = SocketAddr::new(ip.parse().unwrap(), ports[0]);
    let mut killer = load(mechanism);
    let report = killer.kill(&[Target::peer(target)]).unwrap();
    println!("  {mechanism:?} {ip}: {report:?}");
    assert_eq!(
        report.destroyed, 1,
        "exactly the client socket to the target: {report:?}"
    );
    assert_eq!(report.mechanism, mechanism);
    child.stdin.as_mut().unwrap().write_all(b"check\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let seen: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        seen[0],
        libc::ECONNABORTED.to_string(),
        "the target's client sees ECONNABORTED: {line}"
    );
    assert!(
        seen[1] == libc::ECONNRESET.to_string() || seen[1] == "eof",
        "the target's server side sees the connection end: {line}"
    );
    assert_eq!(
        &seen[2..4],
        ["alive", "alive"],
        "the unrelated connection survives: {line}"
    );
    assert_eq!(seen[4], "accepting", "the listener survives: {line}");
    let _ = child.wait();
}

fn pending_io_uring_recv_completes_with_an_error() {
    use std::os::fd::AsRawFd;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (_server, _) = listener.accept().unwrap();
    let mut ring = io_uring::IoUring::new(8).unwrap();
    let mut buf = vec![0u8; 64];
    let recv = io_uring::opcode::Recv::new(
        io_uring::types::Fd(client.as_raw_fd()),
        buf.as_mut_ptr(),
        64,
    )
    .build()
    .user_data(7);
    // SAFETY: the buffer and the socket outlive the operation: we wait for its completion
    // below before either is dropped.
    unsafe { ring.submission().push(&recv).unwrap() };
    ring.submit().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let mut killer = load(Mechanism::Bpf);
    let report = killer
        .kill(&[Target::peer(listener.local_addr().unwrap())])
        .unwrap();
    assert_eq!(report.destroyed, 1, "{report:?}");
    ring.submit_and_wait(1).unwrap();
    let cqe = ring.completion().next().unwrap();
    assert_eq!(cqe.user_data(), 7);
    assert_eq!(
        cqe.result(),
        -libc::ECONNABORTED,
        "the pending recv completes with ECONNABORTED"
    );
    drop(buf);
}

/// The prober: load with whatever capabilities this process has and say what it got.
fn probe() {
    let k = SocketKiller::load();
    let why: Vec<String> = k.fallbacks().iter().map(ToString::to_string).collect();
    println!(
        "mechanism={} fallbacks={}",
        k.mechanism().label(),
        why.join(" | ")
    );
}

fn without_cap_bpf_the_fallback_is_reported() {
    let setpriv = ["/usr/bin/setpriv", "/bin/setpriv"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists());
    let setpriv = setpriv.expect("setpriv (util-linux) is needed to drop capabilities");
    let out = Command::new(setpriv)
        .args([
            "--bounding-set=-bpf,-perfmon,-sys_admin",
            "--inh-caps=-bpf,-perfmon,-sys_admin",
            "--",
        ])
        .arg(std::env::current_exe().unwrap())
        .env("TENDRIL_TEST_ROLE", "probe")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    println!("  without CAP_BPF: {}", text.trim());
    assert!(
        text.contains("mechanism=netlink"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("CAP_BPF"),
        "the fallback names the missing capability: {text}"
    );
}

fn walk_over_ten_thousand_sockets() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut held = Vec::new();
    for _ in 0..5_000 {
        let c = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (s, _) = listener.accept().unwrap();
        held.push((c, s));
    }
    let mut killer = load(Mechanism::Bpf);
    let nobody = Target::peer("127.0.0.1:1".parse().unwrap());
    let mut times = Vec::new();
    for _ in 0..5 {
        let report = killer.count(&[nobody]).unwrap();
        assert!(report.scanned >= 10_000, "{report:?}");
        assert_eq!(report.matched, 0);
        times.push(report.elapsed);
    }
    let counted = killer
        .count(&[Target::peer(listener.local_addr().unwrap())])
        .unwrap();
    assert_eq!(
        counted.matched, 5_000,
        "count mode sees every client socket to the listener"
    );
    times.sort();
    println!(
        "  BPF walk over >= 10,000 sockets: min {:?}, median {:?}, max {:?}",
        times[0], times[2], times[4]
    );
    let mut netlink = load(Mechanism::Netlink);
    let t = netlink.count(&[nobody]).unwrap();
    println!("  netlink dump over {} sockets: {:?}", t.scanned, t.elapsed);
    drop(held);
}
