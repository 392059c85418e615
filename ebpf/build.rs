//! Builds the BPF objects with `bpf/build.sh` (the same step `cargo xtask build-ebpf` runs).
//! Without clang, bpftool, libbpf headers or kernel BTF the crate still builds: the loader
//! then reports the socket killer unavailable, with this build's error, and the proxy falls
//! back to netlink SOCK_DESTROY.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=bpf");
    println!("cargo:rerun-if-env-changed=TENDRIL_EBPF_SKIP");
    println!("cargo:rerun-if-env-changed=CLANG_BPF");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let error = if std::env::var_os("TENDRIL_EBPF_SKIP").is_some() {
        Some("the BPF build was skipped (TENDRIL_EBPF_SKIP)".to_owned())
    } else {
        match Command::new("bash").arg("bpf/build.sh").arg(&out).output() {
            Ok(o) if o.status.success() => None,
            Ok(o) => Some(
                String::from_utf8_lossy(&o.stderr)
                    .trim()
                    .replace('\n', " | "),
            ),
            Err(e) => Some(format!("cannot run bash: {e}")),
        }
    };
    match error {
        None => println!("cargo:rustc-env=TENDRIL_BPF_BUILD_ERROR="),
        Some(e) => {
            println!(
                "cargo:warning=BPF programs not built ({e}); install clang-19 bpftool libbpf-dev, or run cargo xtask build-ebpf"
            );
            for object in ["killer.bpf.o", "sockmap.bpf.o", "client_socket.bpf.o"] {
                std::fs::write(out.join(object), b"").expect("write placeholder object");
            }
            println!("cargo:rustc-env=TENDRIL_BPF_BUILD_ERROR={e}");
        }
    }
}
