//! System packages the build and the tests need, installed with apt when missing.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

/// Why packages are wanted (later: the local cluster and benchmarks need more).
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// `cargo xtask test`.
    Test,
}

/// A Debian package and a file that proves it is installed.
struct Package {
    name: &'static str,
    probe: &'static str,
    why: &'static str,
}

const TEST_PACKAGES: &[Package] = &[
    Package {
        name: "protobuf-compiler",
        probe: "/usr/bin/protoc",
        why: "etcd-client compiles etcd's protobuf files",
    },
    Package {
        name: "etcd-server",
        probe: "/usr/bin/etcd",
        why: "store tests run a real etcd",
    },
    Package {
        name: "clang-19",
        probe: "/usr/bin/clang-19",
        why: "the BPF socket killer is C compiled with clang (Debian's default clang 14 cannot emit kfunc calls)",
    },
    Package {
        name: "bpftool",
        probe: "/usr/sbin/bpftool",
        why: "generates vmlinux.h for the BPF programs",
    },
    Package {
        name: "libbpf-dev",
        probe: "/usr/include/bpf/bpf_helpers.h",
        why: "BPF helper headers",
    },
    Package {
        name: "libelf-dev",
        probe: "/usr/include/libelf.h",
        why: "libbpf-rs builds libbpf, which needs libelf",
    },
    Package {
        name: "zlib1g-dev",
        probe: "/usr/include/zlib.h",
        why: "libbpf needs zlib",
    },
    Package {
        name: "pkg-config",
        probe: "/usr/bin/pkg-config",
        why: "libbpf-sys finds libelf and zlib with it",
    },
    Package {
        name: "util-linux",
        probe: "/usr/bin/setpriv",
        why: "the killer test drops capabilities with setpriv",
    },
    Package {
        name: "iproute2",
        probe: "/usr/bin/ss",
        why: "the partition tests use ip netns, the kernel forwarding test ss",
    },
    Package {
        name: "postgresql-15",
        probe: "/usr/lib/postgresql/15/bin/postgres",
        why: "keeper and end-to-end tests run a real PostgreSQL 15",
    },
];

/// Installs whatever is missing for `purpose`, or explains what to install.
pub fn ensure(purpose: Purpose) -> anyhow::Result<()> {
    let wanted = match purpose {
        Purpose::Test => TEST_PACKAGES,
    };
    let missing: Vec<&Package> = wanted
        .iter()
        .filter(|p| !Path::new(p.probe).exists())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let names: Vec<&str> = missing.iter().map(|p| p.name).collect();
    for p in &missing {
        eprintln!("missing {} ({})", p.name, p.why);
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("install these packages (Debian names): {}", names.join(" "));
    }
    // `id -u` tells root without a libc dependency.
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "run as root, or install first: apt-get install -y {}",
            names.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        crate::run(&mut cmd)
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&names);
    apt(&install)?;
    let still: Vec<&str> = missing
        .iter()
        .filter(|p| !Path::new(p.probe).exists())
        .map(|p| p.name)
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get finished but these are still missing: {}",
            still.join(" ")
        );
    }
    Ok(())
}
