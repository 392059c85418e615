//! What the build, the tests and the local cluster need from the system, and its installation.
//!
//! Each need is a [`Probe`]: a file or program that the build or a test really uses (a header,
//! a `.proto` include, a binary), with the Debian package that provides it. A package name
//! alone proves nothing: `protobuf-compiler` installed with `--no-install-recommends` has
//! `protoc` but not the well-known `.proto` files that etcd-client's build includes, which
//! live in `libprotobuf-dev`. So the check looks at the files themselves and names the
//! package of each missing one.
//!
//! `cargo xtask deps --check` prints every probe and fails if one is missing;
//! `cargo xtask deps`, and the start of `test`, `up`, `build-ebpf` and `bench`, print the same
//! table, install the packages of the missing probes with apt (as root on Debian), and check
//! again.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

/// A file the build or the tests use, and the Debian package that provides it.
#[derive(Debug)]
pub struct Probe {
    /// Absolute path of the file or program.
    pub path: &'static str,
    /// The Debian package that installs it.
    pub package: &'static str,
    /// Who uses it, said to the user when it is missing.
    pub used_by: &'static str,
}

/// The packages `cargo xtask deps` may install, in install order. Every probe names one of
/// these and every one of these has a probe (a unit test checks both ways).
pub const PACKAGES: &[&str] = &[
    "build-essential",
    "make",
    "pkg-config",
    "protobuf-compiler",
    "libprotobuf-dev",
    "clang-19",
    "bpftool",
    "libbpf-dev",
    "libelf-dev",
    "zlib1g-dev",
    "etcd-server",
    "etcd-client",
    "curl",
    "pgbackrest",
    "postgresql-15",
    "postgresql-client-15",
    "openssl",
    "iproute2",
    "util-linux",
    "passwd",
    "coreutils",
    "procps",
    "bash",
    "openjdk-17-jdk-headless",
    "libpostgresql-jdbc-java",
    "systemd",
    "tar",
];

/// Everything `cargo xtask test` and `cargo xtask up` need: building (Rust with C parts and
/// the BPF objects) and running the tests and the local cluster.
pub const PROBES: &[Probe] = &[
    // Building the Rust crates.
    Probe {
        path: "/usr/bin/cc",
        package: "build-essential",
        used_by: "C parts of crates (libbpf-sys builds libbpf)",
    },
    Probe {
        path: "/usr/bin/make",
        package: "make",
        used_by: "libbpf-sys builds its vendored libbpf with make",
    },
    Probe {
        path: "/usr/bin/pkg-config",
        package: "pkg-config",
        used_by: "libbpf-sys finds libelf and zlib with it",
    },
    Probe {
        path: "/usr/include/libelf.h",
        package: "libelf-dev",
        used_by: "libbpf (built by libbpf-sys) links libelf",
    },
    Probe {
        path: "/usr/include/zlib.h",
        package: "zlib1g-dev",
        used_by: "libbpf (built by libbpf-sys) links zlib",
    },
    Probe {
        path: "/usr/bin/protoc",
        package: "protobuf-compiler",
        used_by: "etcd-client's build compiles etcd's .proto files",
    },
    Probe {
        path: "/usr/include/google/protobuf/descriptor.proto",
        package: "libprotobuf-dev",
        used_by: "etcd's .proto files import protobuf's well-known types",
    },
    // Building the BPF objects (ebpf/bpf/build.sh).
    Probe {
        path: "/usr/bin/clang-19",
        package: "clang-19",
        used_by: "the BPF programs are C compiled with clang >= 19 (Debian's clang 14 lacks kfunc BTF)",
    },
    Probe {
        path: "/usr/sbin/bpftool",
        package: "bpftool",
        used_by: "generates vmlinux.h from the kernel's BTF",
    },
    Probe {
        path: "/usr/include/bpf/bpf_helpers.h",
        package: "libbpf-dev",
        used_by: "BPF helper headers",
    },
    // Running the tests and the local cluster.
    Probe {
        path: "/usr/bin/etcd",
        package: "etcd-server",
        used_by: "the store, proxy and end-to-end tests and the local cluster run a real etcd",
    },
    Probe {
        path: "/usr/bin/etcdctl",
        package: "etcd-client",
        used_by: "the deployment guide's test runs its etcdctl commands (docs/deploy.md)",
    },
    Probe {
        path: "/usr/bin/pgbackrest",
        package: "pgbackrest",
        used_by: "the point-in-time recovery tests archive, back up and restore with pgBackRest",
    },
    Probe {
        path: "/usr/bin/curl",
        package: "curl",
        used_by: "the deployment guide's test runs its health checks (docs/deploy.md)",
    },
    Probe {
        path: "/usr/lib/postgresql/15/bin/initdb",
        package: "postgresql-15",
        used_by: "the keeper initialises PostgreSQL 15",
    },
    Probe {
        path: "/usr/lib/postgresql/15/bin/postgres",
        package: "postgresql-15",
        used_by: "keeper, proxy and end-to-end tests run a real PostgreSQL 15",
    },
    Probe {
        path: "/usr/lib/postgresql/15/bin/pg_ctl",
        package: "postgresql-15",
        used_by: "the keeper starts and stops PostgreSQL",
    },
    Probe {
        path: "/usr/lib/postgresql/15/bin/pg_rewind",
        package: "postgresql-15",
        used_by: "the keeper rewinds a former master",
    },
    Probe {
        path: "/usr/lib/postgresql/15/bin/pgbench",
        package: "postgresql-15",
        used_by: "proxy tests and benchmarks drive load with pgbench",
    },
    Probe {
        path: "/usr/lib/postgresql/15/bin/pg_basebackup",
        package: "postgresql-client-15",
        used_by: "the keeper clones standbys",
    },
    Probe {
        path: "/usr/lib/postgresql/15/bin/psql",
        package: "postgresql-client-15",
        used_by: "tests and the local cluster's instructions connect with psql",
    },
    Probe {
        path: "/usr/bin/openssl",
        package: "openssl",
        used_by: "TLS tests make certificates",
    },
    Probe {
        path: "/usr/bin/ip",
        package: "iproute2",
        used_by: "partition tests make network namespaces",
    },
    Probe {
        path: "/usr/bin/ss",
        package: "iproute2",
        used_by: "kernel forwarding tests list sockets",
    },
    Probe {
        path: "/usr/bin/setpriv",
        package: "util-linux",
        used_by: "the killer test drops capabilities",
    },
    Probe {
        path: "/usr/sbin/useradd",
        package: "passwd",
        used_by: "the Kubernetes test creates the pods' user",
    },
    Probe {
        path: "/usr/bin/md5sum",
        package: "coreutils",
        used_by: "forwarding tests checksum streams",
    },
    Probe {
        path: "/usr/bin/timeout",
        package: "coreutils",
        used_by: "the deployment guide's test bounds each command block it runs",
    },
    Probe {
        path: "/usr/bin/sleep",
        package: "coreutils",
        used_by: "the test watchdog's test starts a process to kill",
    },
    Probe {
        path: "/usr/bin/kill",
        package: "procps",
        used_by: "`cargo xtask down` signals the local cluster's process groups",
    },
    Probe {
        path: "/usr/bin/bash",
        package: "bash",
        used_by: "build and benchmark scripts",
    },
    Probe {
        path: "/usr/lib/jvm/java-17-openjdk-amd64/bin/javac",
        package: "openjdk-17-jdk-headless",
        used_by: "the pgjdbc test compiles its client",
    },
    Probe {
        path: "/usr/lib/jvm/java-17-openjdk-amd64/bin/java",
        package: "openjdk-17-jdk-headless",
        used_by: "the pgjdbc test runs its client",
    },
    Probe {
        path: "/usr/share/java/postgresql.jar",
        package: "libpostgresql-jdbc-java",
        used_by: "the pgjdbc test: the JDBC driver Debian ships",
    },
    Probe {
        path: "/usr/bin/systemd-analyze",
        package: "systemd",
        used_by: "the repository check verifies the shipped systemd units",
    },
    Probe {
        path: "/bin/tar",
        package: "tar",
        used_by: "cargo xtask dist packs the tarball",
    },
];

/// What the kernel must offer; no package provides it.
const KERNEL_BTF: &str = "/sys/kernel/btf/vmlinux";

/// Why packages are wanted (later: benchmarks' own packages could join here).
#[derive(Debug, Clone, Copy)]
pub enum Purpose {
    /// `cargo xtask test`, `up`, `build-ebpf`: build and run everything.
    Test,
}

/// One probe's result.
#[derive(Debug)]
pub struct Outcome<'a> {
    pub probe: &'a Probe,
    pub present: bool,
}

/// Looks at every probe under `root` (`/` on the machine; a scratch directory in tests).
pub fn check<'a>(probes: &'a [Probe], root: &Path) -> Vec<Outcome<'a>> {
    probes
        .iter()
        .map(|probe| Outcome {
            probe,
            present: under(root, probe.path).exists(),
        })
        .collect()
}

fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// The packages to install for the missing probes, once each, in [`PACKAGES`] order.
pub fn packages_for(outcomes: &[Outcome<'_>]) -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|package| {
            outcomes
                .iter()
                .any(|o| !o.present && o.probe.package == *package)
        })
        .collect()
}

/// The table printed by `deps --check` and at the start of `test` and `up`.
pub fn report(outcomes: &[Outcome<'_>]) -> String {
    let width = outcomes
        .iter()
        .map(|o| o.probe.path.len())
        .max()
        .unwrap_or(0);
    let mut out = format!(
        "{:width$}  {:7}  {:20}  used by\n",
        "probe", "result", "package"
    );
    for o in outcomes {
        let result = if o.present { "ok" } else { "MISSING" };
        out.push_str(&format!(
            "{:width$}  {:7}  {:20}  {}\n",
            o.probe.path, result, o.probe.package, o.probe.used_by
        ));
    }
    out
}

fn probes(purpose: Purpose) -> &'static [Probe] {
    match purpose {
        Purpose::Test => PROBES,
    }
}

/// `cargo xtask deps [--check]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    match args {
        [] => ensure(Purpose::Test),
        [flag] if flag == "--check" => {
            let outcomes = check(probes(Purpose::Test), Path::new("/"));
            eprint!("{}", report(&outcomes));
            check_kernel()?;
            let missing = packages_for(&outcomes);
            if !missing.is_empty() {
                bail!(
                    "missing files; install: apt-get install -y --no-install-recommends {}",
                    missing.join(" ")
                );
            }
            eprintln!("deps: every probe found");
            Ok(())
        }
        _ => bail!("usage: cargo xtask deps [--check]"),
    }
}

fn check_kernel() -> anyhow::Result<()> {
    if Path::new(KERNEL_BTF).exists() {
        Ok(())
    } else {
        bail!(
            "{KERNEL_BTF} is missing: this kernel has no BTF (CONFIG_DEBUG_INFO_BTF), so the BPF \
             programs cannot be built; no package can add it"
        )
    }
}

/// Prints the probe table, installs the packages of whatever is missing, and checks again.
pub fn ensure(purpose: Purpose) -> anyhow::Result<()> {
    let wanted = probes(purpose);
    let outcomes = check(wanted, Path::new("/"));
    eprint!("{}", report(&outcomes));
    check_kernel()?;
    let names = packages_for(&outcomes);
    if names.is_empty() {
        return Ok(());
    }
    if !Path::new("/usr/bin/apt-get").exists() {
        bail!("install these packages (Debian names): {}", names.join(" "));
    }
    // `id -u` tells root without a libc dependency.
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "run as root, or install first: apt-get install -y --no-install-recommends {}",
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
    let after = check(wanted, Path::new("/"));
    let still: Vec<String> = after
        .iter()
        .filter(|o| !o.present)
        .map(|o| format!("{} (from {})", o.probe.path, o.probe.package))
        .collect();
    if !still.is_empty() {
        bail!(
            "apt-get finished but these files are still missing: {}",
            still.join(", ")
        );
    }
    eprintln!("deps: installed {}; every probe found", names.join(" "));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_names_a_package_of_the_install_list() {
        for probe in PROBES {
            assert!(
                PACKAGES.contains(&probe.package),
                "{} names {}, which `deps` never installs",
                probe.path,
                probe.package
            );
            assert!(
                probe.path.starts_with('/'),
                "{} is not absolute",
                probe.path
            );
        }
    }

    #[test]
    fn every_installed_package_is_proven_by_a_probe() {
        for package in PACKAGES {
            assert!(
                PROBES.iter().any(|p| p.package == *package),
                "{package} is installed but no probe checks a file of it"
            );
        }
    }

    #[test]
    fn the_protobuf_includes_are_probed_as_files_of_libprotobuf_dev() {
        // The regression this module exists for: protoc present, its includes absent.
        let probe = PROBES
            .iter()
            .find(|p| p.path.ends_with("google/protobuf/descriptor.proto"))
            .expect("descriptor.proto is probed");
        assert_eq!(probe.package, "libprotobuf-dev");
    }

    /// A scratch directory standing for `/`, holding the given files.
    fn fake_root(name: &str, files: &[&str]) -> PathBuf {
        let root = std::env::temp_dir().join(format!("xtask-deps-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for file in files {
            let path = under(&root, file);
            std::fs::create_dir_all(path.parent().expect("absolute path has a parent"))
                .expect("mkdir");
            std::fs::write(&path, b"").expect("write");
        }
        root
    }

    #[test]
    fn a_missing_file_names_its_package_once() {
        // Everything present but protobuf's includes and PostgreSQL's server binaries.
        let present: Vec<&str> = PROBES
            .iter()
            .map(|p| p.path)
            .filter(|p| !p.ends_with(".proto") && !p.contains("postgresql/15/bin/p"))
            .collect();
        let root = fake_root("missing", &present);
        let outcomes = check(PROBES, &root);
        let _ = std::fs::remove_dir_all(&root);
        assert_eq!(
            packages_for(&outcomes),
            ["libprotobuf-dev", "postgresql-15", "postgresql-client-15"]
        );
        let table = report(&outcomes);
        assert!(
            table.contains(
                "/usr/include/google/protobuf/descriptor.proto  MISSING  libprotobuf-dev"
            ),
            "{table}"
        );
        assert!(table.contains("/usr/bin/protoc"), "{table}");
    }

    #[test]
    fn nothing_to_install_when_every_file_is_there() {
        let all: Vec<&str> = PROBES.iter().map(|p| p.path).collect();
        let root = fake_root("all", &all);
        let outcomes = check(PROBES, &root);
        let _ = std::fs::remove_dir_all(&root);
        assert!(packages_for(&outcomes).is_empty());
    }

    /// Every program the workspace's code starts by name is one the install step provides.
    #[test]
    fn every_program_started_by_name_is_probed() {
        let mut files = Vec::new();
        crate::tidy::rust_files(&crate::project_root(), &mut files);
        let needle = "Command::new(\"";
        let mut programs = std::collections::BTreeSet::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            for (at, _) in text.match_indices(needle) {
                let rest = &text[at + needle.len()..];
                if let Some(end) = rest.find('"') {
                    programs.insert(rest[..end].to_string());
                }
            }
        }
        // Programs that are not part of the build or tests' system needs: apt and the
        // toolchain itself, and the commands this module runs to install.
        let exempt = ["apt-get", "id", "cargo", "rustc"];
        for program in programs {
            if exempt.contains(&program.as_str()) {
                continue;
            }
            // A path must be probed as such; a bare name, by a probe of that file name.
            let probed = |p: &Probe| {
                p.path == program || p.path.rsplit('/').next() == Some(program.as_str())
            };
            assert!(
                PROBES.iter().any(probed),
                "{program} is started by the code but no probe installs it"
            );
        }
    }
}
