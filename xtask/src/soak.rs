//! `cargo xtask soak proxy [--minutes N | --seconds N] [--seed S] [--paths P,..]
//! [--topology remote|local|both]`: the proxy's fault soak (proxy/tests/soak), as long as
//! asked. `cargo xtask soak cluster [--minutes N | --seconds N] [--seed S] [--mode
//! sync|async] [--keepers N] [--proxies N] [--sentinels N] [--dir D]`: the whole-cluster
//! fault soak (e2e/tests/soak.rs, `tendril_e2e::soak`), with a seed from the clock unless
//! given. `cargo xtask test` runs both briefly.

use std::process::Command;

use crate::deps;

/// The soak's settings, passed to the test as `TENDRIL_SOAK_*` variables.
#[derive(Debug, Default, PartialEq, Eq)]
struct SoakArgs {
    seconds: Option<u64>,
    seed: Option<u64>,
    paths: Option<String>,
    topology: Option<String>,
}

impl SoakArgs {
    fn parse(args: &[String]) -> anyhow::Result<SoakArgs> {
        let mut out = SoakArgs::default();
        let mut it = args.iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
            };
            let number = |v: &String| {
                v.parse::<u64>()
                    .map_err(|_| anyhow::anyhow!("{flag} {v:?}: not a number"))
            };
            match flag.as_str() {
                "--minutes" => out.seconds = Some(number(value()?)? * 60),
                "--seconds" => out.seconds = Some(number(value()?)?),
                "--seed" => out.seed = Some(number(value()?)?),
                "--paths" => out.paths = Some(value()?.clone()),
                "--topology" => {
                    let v = value()?;
                    anyhow::ensure!(
                        ["remote", "local", "both"].contains(&v.as_str()),
                        "--topology {v:?}: remote, local or both"
                    );
                    out.topology = Some(v.clone());
                }
                other => anyhow::bail!("unknown option {other:?} (cargo xtask help)"),
            }
        }
        Ok(out)
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        let mut env = Vec::new();
        if let Some(s) = self.seconds {
            env.push(("TENDRIL_SOAK_SECONDS", s.to_string()));
        }
        if let Some(s) = self.seed {
            env.push(("TENDRIL_SOAK_SEED", s.to_string()));
        }
        if let Some(p) = &self.paths {
            env.push(("TENDRIL_SOAK_PATHS", p.clone()));
        }
        if let Some(t) = &self.topology {
            env.push(("TENDRIL_SOAK_TOPOLOGY", t.clone()));
        }
        env
    }
}

/// The cluster soak's settings, passed to the test as `TENDRIL_CLUSTER_SOAK_*` variables.
fn cluster_env(args: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    let mut seeded = false;
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .map_err(|_| anyhow::anyhow!("{flag} {value:?}: not a number"))
        };
        let (name, v) = match flag.as_str() {
            "--minutes" => ("SECONDS", (number()? * 60).to_string()),
            "--seconds" => ("SECONDS", number()?.to_string()),
            "--seed" => {
                seeded = true;
                ("SEED", number()?.to_string())
            }
            "--keepers" => ("KEEPERS", number()?.to_string()),
            "--proxies" => ("PROXIES", number()?.to_string()),
            "--sentinels" => ("SENTINELS", number()?.to_string()),
            "--mode" => {
                anyhow::ensure!(
                    value == "sync" || value == "async",
                    "--mode {value:?}: sync or async"
                );
                ("MODE", value.clone())
            }
            "--dir" => ("DIR", value.clone()),
            other => anyhow::bail!("unknown option {other:?} (cargo xtask help)"),
        };
        env.push((format!("TENDRIL_CLUSTER_SOAK_{name}"), v));
    }
    if !seeded {
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs());
        env.push(("TENDRIL_CLUSTER_SOAK_SEED".into(), clock.to_string()));
    }
    Ok(env)
}

/// Runs a soak by name.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    match args.first().map(String::as_str) {
        Some("proxy") => {
            let soak = SoakArgs::parse(&args[1..])?;
            deps::ensure(deps::Purpose::Test)?;
            crate::run(
                Command::new(cargo)
                    .args(["test", "--locked", "-p", "tendril-proxy", "--test", "soak"])
                    .args(["--", "--nocapture"])
                    .envs(soak.env()),
            )
        }
        Some("cluster") => {
            let env = cluster_env(&args[1..])?;
            deps::ensure(deps::Purpose::Test)?;
            // The harness runs the binaries beside the test's (see tendril_e2e::bin_dir).
            crate::run(Command::new(&cargo).args(["build", "--locked", "--workspace", "--bins"]))?;
            crate::run(
                Command::new(cargo)
                    .args(["test", "--locked", "-p", "tendril-e2e", "--test", "soak"])
                    .args(["--", "--nocapture"])
                    .envs(env),
            )
        }
        _ => anyhow::bail!(
            "usage: cargo xtask soak proxy [--minutes N | --seconds N] [--seed S] \
             [--paths P,..] [--topology remote|local|both]\n       \
             cargo xtask soak cluster [--minutes N | --seconds N] [--seed S] \
             [--mode sync|async] [--keepers N] [--proxies N] [--sentinels N] [--dir D]"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn flags_become_the_soak_settings() {
        let soak = SoakArgs::parse(&args(&[
            "--minutes",
            "10",
            "--seed",
            "42",
            "--paths",
            "kernel-pair",
            "--topology",
            "both",
        ]))
        .unwrap();
        assert_eq!(
            soak.env(),
            vec![
                ("TENDRIL_SOAK_SECONDS", "600".to_owned()),
                ("TENDRIL_SOAK_SEED", "42".to_owned()),
                ("TENDRIL_SOAK_PATHS", "kernel-pair".to_owned()),
                ("TENDRIL_SOAK_TOPOLOGY", "both".to_owned()),
            ]
        );
        assert!(SoakArgs::parse(&[]).unwrap().env().is_empty());
    }

    #[test]
    fn bad_flags_say_what_is_wrong() {
        let err = |a: &[&str]| SoakArgs::parse(&args(a)).unwrap_err().to_string();
        assert!(err(&["--minutes", "ten"]).contains("not a number"));
        assert!(err(&["--seed"]).contains("needs a value"));
        assert!(err(&["--topology", "moon"]).contains("remote, local or both"));
        assert!(err(&["--fast"]).contains("unknown option"));
    }
}
