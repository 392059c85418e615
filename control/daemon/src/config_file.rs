//! Settings from a file: `--config FILE` (or `TENDRIL_CONFIG`) names a TOML file whose keys
//! are the component's flags without the dashes (`hold_timeout = "15s"` for
//! `--hold-timeout 15s`; `-` and `_` both work). One name per setting across flags,
//! environment and file. A flag on the command line wins over its environment variable,
//! which wins over the file, which wins over the default.
//!
//! The file becomes arguments placed before the command line's (the components parse with
//! `args_override_self`, so a later flag overrides an earlier one), and settings whose
//! environment variable is set are left out. Every problem of the file (an unknown key, a
//! value of the wrong kind, one the flag's own parser refuses) is listed at once, before
//! the component starts.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The flag that names the file, and its environment variable.
pub const FLAG: &str = "config";
/// See [`FLAG`].
pub const ENV: &str = "TENDRIL_CONFIG";

/// Why the settings file cannot be used: every problem found.
#[derive(Debug, thiserror::Error)]
#[error("settings file {}:\n  - {}", path.display(), problems.join("\n  - "))]
pub struct ConfigFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, one line each.
    pub problems: Vec<String>,
}

/// The arguments to parse: `argv` with the settings of the file it names (`--config`, or
/// [`ENV`]) placed before its own, for `command` (the component's parser, which must take a
/// `--config` argument and override repeated flags). Without a file, `argv` unchanged.
pub fn args_with_file(
    command: &clap::Command,
    argv: Vec<OsString>,
) -> Result<Vec<OsString>, ConfigFileError> {
    let Some(path) = file_named(&argv) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigFileError {
        path: path.clone(),
        problems: vec![format!("cannot read it: {e}")],
    })?;
    let from_file = settings_args(command, &text, &|name| std::env::var_os(name).is_some())
        .map_err(|problems| ConfigFileError {
            path: path.clone(),
            problems,
        })?;
    let mut out = Vec::with_capacity(argv.len() + from_file.len());
    let mut argv = argv.into_iter();
    out.extend(argv.next());
    out.extend(from_file);
    out.extend(argv);
    Ok(out)
}

/// Parses this process's command line, with the settings file it names (see
/// [`args_with_file`]); clap's own errors exit as usual (usage, `--help`, `--version`).
pub fn parse<P: clap::Parser>() -> Result<P, ConfigFileError> {
    let argv = args_with_file(&P::command(), std::env::args_os().collect())?;
    Ok(P::parse_from(argv))
}

/// The file `argv` (or the environment) names.
fn file_named(argv: &[OsString]) -> Option<PathBuf> {
    let long = format!("--{FLAG}");
    let eq = format!("--{FLAG}=");
    let mut it = argv.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == long {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = a.strip_prefix(&eq) {
            return Some(PathBuf::from(v));
        }
    }
    std::env::var_os(ENV).map(PathBuf::from)
}

/// The arguments the settings in `text` stand for, for `command`; settings whose
/// environment variable `env_set` says is set are left out. Every problem, or the arguments.
pub fn settings_args(
    command: &clap::Command,
    text: &str,
    env_set: &dyn Fn(&str) -> bool,
) -> Result<Vec<OsString>, Vec<String>> {
    let table: toml::Table = toml::from_str(text).map_err(|e| vec![format!("not TOML: {e}")])?;
    let mut problems = Vec::new();
    let mut out = Vec::new();
    let mut unknown = false;
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = command
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != FLAG)
        else {
            unknown = true;
            problems.push(format!("{key}: not a setting of {}", command.get_name()));
            continue;
        };
        if arg.get_env().is_some_and(|e| env_set(&e.to_string_lossy())) {
            continue;
        }
        let takes_value = arg.get_action().takes_values();
        let values: Vec<String> = match value {
            toml::Value::Boolean(b) if !takes_value => {
                if *b {
                    out.push(OsString::from(format!("--{long}")));
                }
                continue;
            }
            toml::Value::Boolean(b) => vec![b.to_string()],
            toml::Value::String(s) => vec![s.clone()],
            toml::Value::Integer(i) => vec![i.to_string()],
            toml::Value::Float(f) => vec![f.to_string()],
            toml::Value::Array(items) => {
                let mut each = Vec::new();
                for item in items {
                    match item {
                        toml::Value::String(s) => each.push(s.clone()),
                        toml::Value::Integer(i) => each.push(i.to_string()),
                        other => problems.push(format!(
                            "{key}: a list of {}s is not a value it takes",
                            other.type_str()
                        )),
                    }
                }
                each
            }
            other => {
                problems.push(format!(
                    "{key}: a {} is not a value it takes",
                    other.type_str()
                ));
                continue;
            }
        };
        if !takes_value {
            problems.push(format!("{key}: a switch; write {key} = true or false"));
            continue;
        }
        let delimited = arg.get_value_delimiter();
        let values = match (delimited, values.len()) {
            (Some(d), n) if n > 1 => vec![values.join(&d.to_string())],
            _ => values,
        };
        if values.len() > 1 && !matches!(arg.get_action(), clap::ArgAction::Append) {
            problems.push(format!("{key}: takes one value, not a list"));
            continue;
        }
        for v in values {
            if let Some(why) = refused(command, &long, &v) {
                problems.push(format!("{key} = {value}: {why}"));
                continue;
            }
            out.push(OsString::from(format!("--{long}")));
            out.push(OsString::from(v));
        }
    }
    if unknown {
        problems.push(format!(
            "the settings of {} are its flags' long names: {}",
            command.get_name(),
            names(command).join(", ")
        ));
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(problems)
    }
}

/// Why the flag's own parser refuses `value` for `--long`, if it does: the command parses
/// that flag alone, and only a refused value counts (not the other flags it needs).
fn refused(command: &clap::Command, long: &str, value: &str) -> Option<String> {
    use clap::error::ErrorKind;
    let argv = [
        command.get_name().to_owned(),
        format!("--{long}"),
        value.to_owned(),
    ];
    let err = command.clone().try_get_matches_from(argv).err()?;
    match err.kind() {
        ErrorKind::InvalidValue | ErrorKind::ValueValidation | ErrorKind::InvalidUtf8 => {
            let text = err.to_string();
            let line = text.lines().next().unwrap_or_default();
            Some(line.trim_start_matches("error: ").to_owned())
        }
        _ => None,
    }
}

/// The settings `command` takes, as a file names them.
fn names(command: &clap::Command) -> Vec<String> {
    command
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| *l != FLAG && *l != "help" && *l != "version")
        .map(|l| l.replace('-', "_"))
        .collect()
}

/// The settings a sample file sets or shows commented out (`# name = ...`), for the test
/// that every sample covers every flag.
pub fn sample_keys(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.trim_start_matches('#').trim())
        .filter_map(|l| {
            let (key, _) = l.split_once(" = ")?;
            key.bytes()
                .all(|b| b.is_ascii_lowercase() || b == b'_')
                .then(|| key.to_owned())
        })
        .collect()
}

/// The settings `command` takes that `sample` (a sample file's text) neither sets nor shows.
pub fn missing_from_sample(command: &clap::Command, sample: &str) -> Vec<String> {
    let keys = sample_keys(sample);
    names(command)
        .into_iter()
        .filter(|n| !keys.contains(n))
        .collect()
}

/// Checks a sample settings file shipped with a component (for its tests): it shows every
/// setting of `P`, and parses to what `required` alone (the command line of the settings
/// without a default, program name first) parses to. What is wrong, or nothing.
pub fn check_sample<P: clap::Parser + std::fmt::Debug>(
    path: &Path,
    required: &[&str],
) -> Result<(), String> {
    let sample = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let command = P::command();
    let missing = missing_from_sample(&command, &sample);
    if !missing.is_empty() {
        return Err(format!("{} does not show {missing:?}", path.display()));
    }
    let from_file = settings_args(&command, &sample, &|_| false)
        .map_err(|p| format!("{}: {}", path.display(), p.join("; ")))?;
    let name = required.first().copied().unwrap_or_default();
    let argv = std::iter::once(OsString::from(name)).chain(from_file);
    let parsed = P::try_parse_from(argv).map_err(|e| e.to_string())?;
    let defaults = P::try_parse_from(required).map_err(|e| e.to_string())?;
    let (parsed, defaults) = (format!("{parsed:#?}"), format!("{defaults:#?}"));
    if parsed == defaults {
        Ok(())
    } else {
        Err(format!(
            "{} parses to\n{parsed}\nnot to the defaults\n{defaults}",
            path.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[derive(Debug, Parser, PartialEq)]
    #[command(name = "demo", args_override_self = true)]
    struct Demo {
        #[arg(long, env = "DEMO_NAME")]
        name: String,
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        hold_timeout: std::time::Duration,
        #[arg(long, value_delimiter = ',', default_value = "a")]
        endpoints: Vec<String>,
        #[arg(long)]
        takeover: bool,
        #[arg(long, default_value_t = 1)]
        workers: u32,
        #[arg(long)]
        config: Option<PathBuf>,
    }

    fn parse(text: &str, cli: &[&str], env: &[&str]) -> Result<Demo, Vec<String>> {
        let file = settings_args(&Demo::command(), text, &|n| env.contains(&n))?;
        let argv = std::iter::once(OsString::from("demo"))
            .chain(file)
            .chain(cli.iter().map(OsString::from));
        Demo::try_parse_from(argv).map_err(|e| vec![e.to_string()])
    }

    #[test]
    fn a_file_sets_what_flags_do_and_flags_win() {
        let text = r#"
            name = "c1"
            hold-timeout = "30s"
            endpoints = ["http://a:2379", "http://b:2379"]
            takeover = true
            workers = 4
        "#;
        let d = parse(text, &[], &[]).unwrap();
        assert_eq!(d.name, "c1");
        assert_eq!(d.hold_timeout, std::time::Duration::from_secs(30));
        assert_eq!(d.endpoints, ["http://a:2379", "http://b:2379"]);
        assert!(d.takeover);
        assert_eq!(d.workers, 4);
        let d = parse(text, &["--workers", "2", "--name", "c2"], &[]).unwrap();
        assert_eq!(
            (d.workers, d.name.as_str()),
            (2, "c2"),
            "the command line wins"
        );
    }

    #[test]
    fn a_set_environment_variable_wins_over_the_file() {
        let args = settings_args(&Demo::command(), "name = \"c1\"\nworkers = 3", &|n| {
            n == "DEMO_NAME"
        })
        .unwrap();
        assert_eq!(args, ["--workers", "3"].map(OsString::from));
    }

    #[test]
    fn every_problem_is_listed() {
        let text = r#"
            nmae = "typo"
            hold_timeout = "15 parsecs"
            workers = "many"
            takeover = "yes"
            endpoints = [{ a = 1 }]
        "#;
        let problems = parse(text, &[], &[]).unwrap_err();
        assert_eq!(problems.len(), 6, "{problems:#?}");
        let all = problems.join("\n");
        for expected in [
            "nmae: not a setting of demo",
            "the settings of demo are its flags' long names: name, hold_timeout, endpoints",
            "hold_timeout = \"15 parsecs\": invalid value",
            "workers = \"many\": invalid value",
            "takeover: a switch",
            "endpoints: a list of tables",
        ] {
            assert!(all.contains(expected), "{expected:?} missing from:\n{all}");
        }
        assert_eq!(
            parse("not toml", &[], &[]).unwrap_err()[0]
                .split(':')
                .next(),
            Some("not TOML")
        );
    }

    #[test]
    fn the_file_is_found_from_the_flag_or_the_environment() {
        let argv = |a: &[&str]| a.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            file_named(&argv(&["x", "--config", "/etc/a.toml"])),
            Some(PathBuf::from("/etc/a.toml"))
        );
        assert_eq!(
            file_named(&argv(&["x", "--config=/etc/b.toml"])),
            Some(PathBuf::from("/etc/b.toml"))
        );
        let missing = args_with_file(&Demo::command(), argv(&["x", "--config", "/no/such.toml"]))
            .unwrap_err()
            .to_string();
        assert!(
            missing.starts_with("settings file /no/such.toml:\n  - cannot read it"),
            "{missing}"
        );
    }

    #[test]
    fn sample_keys_include_commented_settings() {
        let sample = "# The name.\nname = \"c\"\n# workers = 2\n# Not a setting: a = b\n";
        assert_eq!(sample_keys(sample), ["name", "workers"]);
        assert_eq!(
            missing_from_sample(&Demo::command(), sample),
            ["hold_timeout", "endpoints", "takeover"]
        );
    }
}
