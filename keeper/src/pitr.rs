//! Point-in-time recovery (`init_mode: pitr`): what the keeper runs and writes to create the
//! cluster's first master from a backup. The steps (in `keeper.rs`): wipe PGDATA, run the
//! spec's `data_restore_command` with `%d` standing for PGDATA, write `postgresql.conf` with
//! the parameters below and `recovery.signal`, start PostgreSQL, and wait until it has
//! promoted itself at the recovery target (or at the end of the archive). Only then does
//! the keeper report the database initialised, and the sentinel finish the cluster's
//! initialisation.

use tendril_control_model::PitrConfig;

/// The data restore command with `%d` replaced by `pgdata` (and `%%` by `%`), for `sh -c`.
/// The data directory is quoted for the shell.
pub fn restore_command_line(template: &str, pgdata: &str) -> String {
    let quoted = format!("'{}'", pgdata.replace('\'', r"'\''"));
    let mut out = String::with_capacity(template.len() + quoted.len());
    let mut chars = template.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('%', Some('d')) => {
                chars.next();
                out.push_str(&quoted);
            }
            ('%', Some('%')) => {
                chars.next();
                out.push('%');
            }
            _ => out.push(c),
        }
    }
    out
}

/// The recovery parameters of `postgresql.conf` while the restored data recovers: the
/// archive's `restore_command`, the recovery target (if any), and promotion once the target
/// is reached. Without a target, recovery replays the whole archive and then promotes.
pub fn recovery_parameters(pitr: &PitrConfig) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(archive) = &pitr.archive_recovery_settings {
        out.push(("restore_command", archive.restore_command.clone()));
    }
    if let Some(t) = &pitr.recovery_target_settings {
        for (name, value) in [
            ("recovery_target", &t.recovery_target),
            ("recovery_target_lsn", &t.recovery_target_lsn),
            ("recovery_target_name", &t.recovery_target_name),
            ("recovery_target_time", &t.recovery_target_time),
            ("recovery_target_xid", &t.recovery_target_xid),
            ("recovery_target_timeline", &t.recovery_target_timeline),
            ("recovery_target_inclusive", &t.recovery_target_inclusive),
        ] {
            if let Some(v) = value {
                out.push((name, v.clone()));
            }
        }
    }
    out.push(("recovery_target_action", "promote".into()));
    out
}

/// The last `lines` lines of a command's output, joined for an error message.
pub fn output_tail(stdout: &[u8], stderr: &[u8], lines: usize) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(stdout),
        String::from_utf8_lossy(stderr)
    );
    let all: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    all[all.len().saturating_sub(lines)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_control_model::{ArchiveRecoverySettings, RecoveryTargetSettings};

    #[test]
    fn the_data_directory_replaces_percent_d_quoted() {
        assert_eq!(
            restore_command_line("pgbackrest restore --pg1-path=%d --x=100%%", "/var/lib/a b"),
            "pgbackrest restore --pg1-path='/var/lib/a b' --x=100%"
        );
        assert_eq!(
            restore_command_line("cp -a /b/. %d/", "/it's"),
            r"cp -a /b/. '/it'\''s'/"
        );
        assert_eq!(restore_command_line("echo %x %", "/d"), "echo %x %");
    }

    #[test]
    fn recovery_promotes_at_the_target_with_the_archive() {
        let pitr = PitrConfig {
            data_restore_command: "x".into(),
            archive_recovery_settings: Some(ArchiveRecoverySettings {
                restore_command: "get %f %p".into(),
            }),
            recovery_target_settings: Some(RecoveryTargetSettings {
                recovery_target_name: Some("before".into()),
                recovery_target_inclusive: Some("false".into()),
                ..Default::default()
            }),
        };
        assert_eq!(
            recovery_parameters(&pitr),
            vec![
                ("restore_command", "get %f %p".to_owned()),
                ("recovery_target_name", "before".to_owned()),
                ("recovery_target_inclusive", "false".to_owned()),
                ("recovery_target_action", "promote".to_owned()),
            ]
        );
        let bare = PitrConfig::default();
        assert_eq!(
            recovery_parameters(&bare),
            vec![("recovery_target_action", "promote".to_owned())]
        );
    }

    #[test]
    fn the_tail_keeps_the_last_lines_of_both_streams() {
        assert_eq!(output_tail(b"a\nb\n", b"c\n\nd\n", 3), "b | c | d");
    }
}
