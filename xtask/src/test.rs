//! `cargo xtask test`: what CI runs.

use std::process::Command;

use crate::deps;

/// Installs dependencies, then runs the format check, clippy and every test.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let lint = !args.iter().any(|a| a == "--no-lint");
    if let Some(unknown) = args.iter().find(|a| a.as_str() != "--no-lint") {
        anyhow::bail!("unknown option {unknown:?} (cargo xtask help)");
    }
    deps::ensure(deps::Purpose::Test)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    if lint {
        crate::run(Command::new(&cargo).args(["fmt", "--all", "--", "--check"]))?;
        crate::run(Command::new(&cargo).args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--locked",
            "--",
            "-D",
            "warnings",
        ]))?;
    }
    // Two cores: build with both, and let each test binary run two tests at a time. Each etcd
    // test starts its own etcd, so tests do not share state.
    crate::run(
        Command::new(&cargo)
            .args(["test", "--workspace", "--locked", "--no-fail-fast"])
            .env("RUST_TEST_THREADS", "2")
            .env("RUST_BACKTRACE", "1"),
    )?;
    eprintln!("xtask test: all checks passed");
    Ok(())
}
