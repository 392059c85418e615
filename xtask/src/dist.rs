//! `cargo xtask dist`: a tarball to install tendril on hosts without a Rust toolchain: the
//! release binaries, the systemd units and the sample settings files, laid out as the units
//! expect them once unpacked in `/` (`usr/local/bin/`, `etc/systemd/system/`,
//! `etc/tendril/*.toml.sample`). Written to `<target>/dist/tendril-<version>-<arch>-linux.tar.gz`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use crate::project_root;

/// The binaries the tarball carries.
const BINARIES: [&str; 4] = [
    "tendril-keeper",
    "tendril-sentinel",
    "tendril-proxy",
    "tendrilctl",
];

/// What goes where in the tarball: (source, path in the tarball), for `release` (the
/// directory of the release binaries) and the repository at `root`.
fn layout(root: &Path, release: &Path) -> Vec<(PathBuf, String)> {
    let mut out: Vec<(PathBuf, String)> = BINARIES
        .iter()
        .map(|b| (release.join(b), format!("usr/local/bin/{b}")))
        .collect();
    for component in ["keeper", "sentinel", "proxy"] {
        out.push((
            root.join(format!("deploy/systemd/tendril-{component}.service")),
            format!("etc/systemd/system/tendril-{component}.service"),
        ));
        // A sample, not the file the unit reads: unpacking never overwrites settings.
        out.push((
            root.join(format!("deploy/config/{component}.toml")),
            format!("etc/tendril/{component}.toml.sample"),
        ));
    }
    out.push((
        root.join("README.md"),
        "usr/local/share/doc/tendril/README.md".into(),
    ));
    out
}

/// `cargo xtask dist`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(args.is_empty(), "usage: cargo xtask dist");
    crate::cargo_build(
        &[
            &["--release", "--locked", "--bins"],
            &crate::SHIPPED_PACKAGES[..],
        ]
        .concat(),
    )?;
    let target = crate::bench::target_dir();
    let staging = target.join("dist/staging");
    let _ = std::fs::remove_dir_all(&staging);
    for (from, to) in layout(&project_root(), &target.join("release")) {
        let dest = staging.join(&to);
        std::fs::create_dir_all(dest.parent().context("a path in the tarball")?)?;
        std::fs::copy(&from, &dest).with_context(|| format!("copy {}", from.display()))?;
    }
    let name = format!(
        "tendril-{}-{}-linux.tar.gz",
        env!("CARGO_PKG_VERSION"),
        std::env::consts::ARCH
    );
    let tarball = target.join("dist").join(&name);
    crate::run(
        Command::new("tar")
            .arg("--owner=root")
            .arg("--group=root")
            .arg("-czf")
            .arg(&tarball)
            .arg("-C")
            .arg(&staging)
            .args(["usr", "etc"]),
    )?;
    println!("{}", tarball.display());
    println!(
        "install on a host: tar -xzf {name} -C / (then copy each etc/tendril/*.toml.sample to its .toml and edit it)"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tarball_carries_every_binary_unit_and_sample_the_repository_has() {
        let root = project_root();
        let files = layout(&root, Path::new("/release"));
        for (from, _) in files.iter().filter(|(f, _)| !f.starts_with("/release")) {
            assert!(from.is_file(), "{} is missing", from.display());
        }
        let units = std::fs::read_dir(root.join("deploy/systemd"))
            .unwrap()
            .count();
        let samples = std::fs::read_dir(root.join("deploy/config"))
            .unwrap()
            .count();
        let carried = |prefix: &str| {
            files
                .iter()
                .filter(|(_, to)| to.starts_with(prefix))
                .count()
        };
        assert_eq!(carried("etc/systemd/system/"), units, "every unit");
        assert_eq!(carried("etc/tendril/"), samples, "every sample");
        // The units run the binaries from where the tarball puts them.
        for (from, to) in &files {
            if to.starts_with("etc/systemd/system/") {
                let unit = std::fs::read_to_string(from).unwrap();
                let exec = unit
                    .lines()
                    .find_map(|l| l.strip_prefix("ExecStart="))
                    .unwrap();
                let program = exec
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_start_matches('/');
                assert!(
                    files.iter().any(|(_, t)| t == program),
                    "{to} runs {program}, which the tarball does not carry"
                );
            }
        }
    }
}
