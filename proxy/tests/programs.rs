//! Which BPF programs a proxy loads: under the default `--forwarding auto` the pair path is
//! not selectable, so only the client-socket programs are loaded (the pair path's stay out
//! of the kernel, with their maps); `--forwarding kernel` loads both.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::time::Duration;

use support::loops::clients;
use support::{Env, ProxyProc, wait_routed};

/// The BPF programs and maps the process holds descriptors of.
fn bpf_descriptors(pid: u32) -> (usize, usize) {
    let mut programs = 0;
    let mut maps = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        match target.to_string_lossy().as_ref() {
            "anon_inode:bpf-prog" => programs += 1,
            "anon_inode:bpf-map" => maps += 1,
            _ => {}
        }
    }
    (programs, maps)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_loads_the_client_socket_programs_only() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "loading BPF programs needs root (CAP_BPF)"
    );
    let mut env = Env::new().await;
    let pg = support::pg();
    env.route(Some(("db1", pg.port())), false).await;
    let auto = ProxyProc::start(&env, "auto", &[], &[]);
    let kernel = ProxyProc::start(&env, "kernel", &["--forwarding", "kernel"], &[]);
    for p in [&auto, &kernel] {
        wait_routed(p.port, pg.port(), Duration::from_secs(10)).await;
        assert!(clients(p.port, 3).await.is_empty());
    }
    assert!(
        auto.log_text()
            .contains("pair_path=false client_socket_path=true"),
        "{}",
        auto.log_text()
    );
    assert!(
        kernel
            .log_text()
            .contains("pair_path=true client_socket_path=true"),
        "{}",
        kernel.log_text()
    );
    // Local clients took the client-socket path on both.
    assert!(
        auto.path_total("client_socket") >= 3.0,
        "{}",
        auto.metrics()
    );
    let (auto_programs, auto_maps) = bpf_descriptors(auto.child.id());
    let (kernel_programs, kernel_maps) = bpf_descriptors(kernel.child.id());
    assert!(
        auto_programs < kernel_programs && auto_maps < kernel_maps,
        "auto holds {auto_programs} programs and {auto_maps} maps, kernel {kernel_programs} and {kernel_maps}"
    );
}
