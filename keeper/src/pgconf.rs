//! Generated PostgreSQL configuration: `postgresql.conf`, `pg_hba.conf` and
//! `synchronous_standby_names`. Pure functions: what to write, never how.

use std::collections::{BTreeMap, BTreeSet};

use tendril_control_model::{ClusterData, Db, DbRole, DbSpec, SuReplAccessMode};

/// Prefix of the replication slots and `application_name`s tendril manages.
pub const MANAGED_PREFIX: &str = "tendril_";

/// Listed in `synchronous_standby_names` when fewer real synchronous standbys exist than the
/// minimum (the model's constant, shared with the sentinel).
pub const PLACEHOLDER_STANDBY: &str = tendril_control_model::PLACEHOLDER_SYNC_STANDBY;

/// Parameters the keeper always sets itself; the spec cannot set them (see the model's
/// validation) and they are left out of what the keeper reports.
pub const MANAGED_PARAMETERS: &[&str] = &[
    "listen_addresses",
    "port",
    "unix_socket_directories",
    "hot_standby",
    "max_replication_slots",
    "max_wal_senders",
    "wal_log_hints",
    "synchronous_standby_names",
    "primary_conninfo",
    "primary_slot_name",
    "recovery_target_timeline",
    "restore_command",
    "recovery_min_apply_delay",
    "wal_keep_size",
    "wal_level",
];

/// Whether the keeper leaves parameter `name` out of what it reports and merges: those it
/// sets itself, and those that could end a standby's recovery.
pub fn is_managed(name: &str) -> bool {
    MANAGED_PARAMETERS.contains(&name)
        || tendril_control_model::RECOVERY_ENDING_PARAMETERS.contains(&name)
}

/// The replication slot and application name of a standby database.
pub fn standby_name(db_uid: &str) -> String {
    format!("{MANAGED_PREFIX}{db_uid}")
}

/// Where a standby streams from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// `primary_conninfo`.
    pub conninfo: String,
    /// `primary_slot_name`.
    pub slot: Option<String>,
    /// `restore_command`: the WAL archive, for what streaming cannot give.
    pub restore_command: Option<String>,
    /// `recovery_min_apply_delay` (a standby cluster's leader).
    pub min_apply_delay: Option<String>,
}

/// The upstream a written `postgresql.conf` holds, if any.
pub fn upstream_in_effect(conf: &str) -> Option<Upstream> {
    Some(Upstream {
        conninfo: read_conf_value(conf, "primary_conninfo").filter(|c| !c.is_empty())?,
        slot: read_conf_value(conf, "primary_slot_name"),
        restore_command: read_conf_value(conf, "restore_command"),
        min_apply_delay: read_conf_value(conf, "recovery_min_apply_delay"),
    })
}

/// A libpq connection string: `pairs` quoted, then `extra` (raw keywords the user wrote,
/// which override earlier ones: libpq keeps the last value of a keyword).
pub fn conninfo(pairs: &[(&str, String)], extra: &str) -> String {
    let mut out: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", conninfo_quote(v)))
        .collect();
    if !extra.trim().is_empty() {
        out.push(extra.trim().to_owned());
    }
    out.join(" ")
}

/// Quotes a libpq connection-string value.
pub fn conninfo_quote(value: &str) -> String {
    if !value.is_empty() && !value.contains([' ', '\'', '\\', '=']) {
        return value.to_owned();
    }
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Everything `postgresql.conf` is built from.
#[derive(Debug, Clone)]
pub struct ConfInput<'a> {
    /// The database spec from cluster data.
    pub spec: &'a DbSpec,
    /// Parameters found at initialisation, merged while `include_previous_config` is set.
    pub init_parameters: Option<&'a BTreeMap<String, String>>,
    /// `listen_addresses`.
    pub listen_address: &'a str,
    /// `port`.
    pub port: u16,
    /// `unix_socket_directories`.
    pub socket_dir: &'a str,
    /// The upstream when the database is a standby.
    pub upstream: Option<&'a Upstream>,
    /// `synchronous_standby_names`, already computed.
    pub synchronous_standby_names: &'a str,
    /// While a point-in-time recovery runs: its settings ([`crate::pitr`]).
    pub recovery: Option<&'a tendril_control_model::PitrConfig>,
}

/// The parameters to write, later sources overriding earlier ones: the initial parameters,
/// the spec's, then the ones replication and the keeper need.
pub fn parameters(input: &ConfInput<'_>) -> BTreeMap<String, String> {
    let mut p = BTreeMap::new();
    if input.spec.include_previous_config
        && let Some(init) = input.init_parameters
    {
        p.extend(init.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    p.extend(
        input
            .spec
            .pg_parameters
            .iter()
            .map(|(k, v)| (k.clone(), v.clone())),
    );
    let user_wal_level = p.get("wal_level").cloned();
    let user_keep = p.get("wal_keep_size").cloned();
    let user_retry = p.contains_key("wal_retrieve_retry_interval");
    let user_status = p.contains_key("wal_receiver_status_interval");
    let mut set = |k: &str, v: String| {
        p.insert(k.to_owned(), v);
    };
    // `logical` is the only wal_level a user may choose: anything lower breaks replication.
    set(
        "wal_level",
        if user_wal_level.as_deref() == Some("logical") {
            "logical"
        } else {
            "replica"
        }
        .into(),
    );
    set("wal_keep_size", user_keep.unwrap_or_else(|| "128MB".into()));
    // PostgreSQL waits 5 s before a standby retries a lost primary: with synchronous
    // replication every commit waits that long after a master restart or a failover.
    if !user_retry {
        set("wal_retrieve_retry_interval", "500ms".into());
    }
    // A standby that caught up counts as synchronous only from its next reply; when every
    // commit is already waiting for it no new WAL triggers one, and the default 10 s status
    // interval would keep commits blocked that long after a failover.
    if !user_status {
        set("wal_receiver_status_interval", "1s".into());
    }
    set("hot_standby", "on".into());
    set("listen_addresses", input.listen_address.into());
    set("port", input.port.to_string());
    set("unix_socket_directories", input.socket_dir.into());
    set("max_replication_slots", input.spec.max_standbys.to_string());
    set(
        "max_wal_senders",
        (2 * input.spec.max_standbys + 2 + input.spec.additional_wal_senders).to_string(),
    );
    if input.spec.use_pg_rewind {
        set("wal_log_hints", "on".into());
    }
    set(
        "synchronous_standby_names",
        input.synchronous_standby_names.into(),
    );
    if let Some(up) = input.upstream {
        set("primary_conninfo", up.conninfo.clone());
        if let Some(slot) = &up.slot {
            set("primary_slot_name", slot.clone());
        }
        // PostgreSQL turns to the archive whenever streaming cannot give what it needs.
        if let Some(command) = &up.restore_command {
            set("restore_command", command.clone());
        }
        if let Some(delay) = &up.min_apply_delay {
            set("recovery_min_apply_delay", delay.clone());
        }
    }
    if let Some(pitr) = input.recovery {
        for (name, value) in crate::pitr::recovery_parameters(pitr) {
            set(name, value);
        }
    }
    p
}

/// Quotes a value for `postgresql.conf`.
pub fn quote(value: &str) -> String {
    format!("'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
}

/// The text of `postgresql.conf`.
pub fn render_conf(parameters: &BTreeMap<String, String>) -> String {
    let mut out = String::from(
        "# Generated by tendril-keeper on every loop; edits are overwritten.\n\
         # Change parameters with `tendrilctl update --patch '{\"pg_parameters\": {...}}'`.\n",
    );
    for (name, value) in parameters {
        out.push_str(name);
        out.push_str(" = ");
        out.push_str(&quote(value));
        out.push('\n');
    }
    out
}

/// Reads back a value this module wrote (`name = 'value'`).
pub fn read_conf_value(text: &str, name: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(" = ")?;
        if key != name {
            return None;
        }
        let inner = value.strip_prefix('\'')?.strip_suffix('\'')?;
        Some(inner.replace("''", "'").replace("\\\\", "\\"))
    })
}

/// Users and how they authenticate, for `pg_hba.conf`.
#[derive(Debug, Clone)]
pub struct HbaInput<'a> {
    /// The superuser.
    pub su_user: &'a str,
    /// The replication user.
    pub repl_user: &'a str,
    /// `all` or `strict`.
    pub mode: SuReplAccessMode,
    /// With `strict`: the other databases' addresses.
    pub peer_addresses: Vec<String>,
    /// The user lines of the spec; `None` for the defaults.
    pub user_lines: Option<&'a [String]>,
}

/// The text of `pg_hba.conf`.
pub fn render_hba(input: &HbaInput<'_>) -> String {
    const AUTH: &str = "md5";
    let su = hba_user(input.su_user);
    let repl = hba_user(input.repl_user);
    let mut lines = vec![
        "# Generated by tendril-keeper; edits are overwritten. Set pg_hba in the cluster spec."
            .to_owned(),
        format!("local all {su} {AUTH}"),
        format!("local replication {repl} {AUTH}"),
    ];
    let sources: Vec<String> = match input.mode {
        SuReplAccessMode::All => vec!["0.0.0.0/0".into(), "::0/0".into()],
        SuReplAccessMode::Strict => input.peer_addresses.iter().map(|a| host_mask(a)).collect(),
    };
    for source in &sources {
        lines.push(format!("host all {su} {source} {AUTH}"));
        lines.push(format!("host replication {repl} {source} {AUTH}"));
    }
    match input.user_lines {
        Some(user) => lines.extend(user.iter().cloned()),
        None => {
            lines.push(format!("host all all 0.0.0.0/0 {AUTH}"));
            lines.push(format!("host all all ::0/0 {AUTH}"));
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn hba_user(user: &str) -> String {
    if user.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        user.to_owned()
    } else {
        format!("\"{}\"", user.replace('"', "\"\""))
    }
}

fn host_mask(address: &str) -> String {
    match address.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(ip)) => format!("{ip}/32"),
        Ok(std::net::IpAddr::V6(ip)) => format!("{ip}/128"),
        // A host name: pg_hba.conf resolves it itself.
        Err(_) => address.to_owned(),
    }
}

/// The addresses of every database but `own`, for strict access mode.
pub fn peer_addresses(cd: &ClusterData, own: &Db) -> Vec<String> {
    let set: BTreeSet<String> = cd
        .dbs
        .values()
        .filter(|db| db.uid != own.uid)
        .filter_map(|db| db.status.listen_address.clone())
        .collect();
    set.into_iter().collect()
}

/// The standby names a master wants in `synchronous_standby_names`: its internal synchronous
/// standbys and the external names, plus the placeholder when there are fewer than `min_sync`.
/// Empty when synchronous replication is off.
pub fn wanted_sync_names(spec: &DbSpec, min_sync: u32) -> BTreeSet<String> {
    if spec.role != DbRole::Master || !spec.synchronous_replication {
        return BTreeSet::new();
    }
    let mut names: BTreeSet<String> = spec
        .synchronous_standbys
        .iter()
        .map(|uid| standby_name(uid))
        .collect();
    names.extend(spec.external_synchronous_standbys.iter().cloned());
    if names.is_empty() && min_sync > 0 {
        names.insert(PLACEHOLDER_STANDBY.to_owned());
    }
    names
}

/// The next set to apply, so a change never leaves the master without a standby known to be
/// in sync: new members are first added beside the old ones, and the old ones leave only once
/// every new member is reported `sync`.
pub fn next_sync_names(
    applied: &BTreeSet<String>,
    wanted: &BTreeSet<String>,
    in_sync: &BTreeSet<String>,
) -> BTreeSet<String> {
    // Going to the placeholder is always safe: no commit completes until a real standby is
    // listed and in sync.
    if applied.is_empty()
        || wanted.is_empty()
        || wanted.is_subset(applied)
        || wanted.contains(PLACEHOLDER_STANDBY)
    {
        return wanted.clone();
    }
    let newcomers_in_sync = wanted
        .difference(applied)
        .all(|name| in_sync.contains(name));
    if newcomers_in_sync {
        wanted.clone()
    } else {
        applied.union(wanted).cloned().collect()
    }
}

/// `synchronous_standby_names` for a set of names: every listed standby must acknowledge
/// (`N (a, b)`), deliberately not a quorum, so whichever one survives a failure has every
/// commit.
pub fn render_sync_names(names: &BTreeSet<String>) -> String {
    match names.len() {
        0 => String::new(),
        1 => names
            .iter()
            .next()
            .map(|n| quote_ident(n))
            .unwrap_or_default(),
        n => format!(
            "{n} ({})",
            names
                .iter()
                .map(|s| quote_ident(s))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

fn quote_ident(name: &str) -> String {
    if name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        name.to_owned()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Parses `synchronous_standby_names` as PostgreSQL accepts it: `name`, `N (a, b)`,
/// `FIRST N (...)`, `ANY N (...)`, or a plain list.
pub fn parse_sync_names(value: &str) -> BTreeSet<String> {
    let value = value.trim();
    let list = match (value.find('('), value.rfind(')')) {
        (Some(open), Some(close)) if open < close => &value[open + 1..close],
        _ => value,
    };
    list.split(',')
        .map(|s| s.trim().trim_matches('"').to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tendril_control_model::ClusterSpec;

    fn set(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| (*s).to_owned()).collect()
    }

    fn master_spec() -> DbSpec {
        DbSpec {
            role: DbRole::Master,
            ..DbSpec::default()
        }
    }

    #[test]
    fn mandatory_parameters_override_the_user() {
        let mut spec = master_spec();
        spec.pg_parameters.insert("work_mem".into(), "8MB".into());
        spec.pg_parameters
            .insert("wal_level".into(), "minimal".into());
        spec.use_pg_rewind = true;
        let p = parameters(&ConfInput {
            spec: &spec,
            init_parameters: None,
            listen_address: "10.0.0.1",
            port: 5433,
            socket_dir: "/run/t",
            upstream: None,
            synchronous_standby_names: "",
            recovery: None,
        });
        assert_eq!(p["work_mem"], "8MB");
        assert_eq!(p["wal_level"], "replica");
        assert_eq!(p["listen_addresses"], "10.0.0.1");
        assert_eq!(p["port"], "5433");
        assert_eq!(p["max_replication_slots"], "20");
        assert_eq!(p["max_wal_senders"], "47");
        assert_eq!(p["wal_log_hints"], "on");
        assert_eq!(p["wal_retrieve_retry_interval"], "500ms");
        assert_eq!(p["wal_receiver_status_interval"], "1s");
        assert!(!p.contains_key("primary_conninfo"));
    }

    #[test]
    fn logical_wal_level_and_init_parameters() {
        let mut spec = master_spec();
        spec.pg_parameters
            .insert("wal_level".into(), "logical".into());
        spec.include_previous_config = true;
        let init: BTreeMap<String, String> =
            [("max_connections".to_owned(), "100".to_owned())].into();
        let up = Upstream {
            conninfo: "host=a".into(),
            slot: Some("tendril_x".into()),
            restore_command: Some("fetch %f %p".into()),
            min_apply_delay: Some("5min".into()),
        };
        let p = parameters(&ConfInput {
            spec: &spec,
            init_parameters: Some(&init),
            listen_address: "*",
            port: 5432,
            socket_dir: "/tmp",
            upstream: Some(&up),
            synchronous_standby_names: "",
            recovery: None,
        });
        assert_eq!(p["wal_level"], "logical");
        assert_eq!(p["max_connections"], "100");
        assert_eq!(p["primary_conninfo"], "host=a");
        assert_eq!(p["primary_slot_name"], "tendril_x");
        assert_eq!(p["restore_command"], "fetch %f %p");
        assert_eq!(p["recovery_min_apply_delay"], "5min");
    }

    #[test]
    fn the_upstream_in_effect_is_read_back_from_the_written_file() {
        let up = Upstream {
            conninfo: "host=a password='it''s'".into(),
            slot: Some("site_b".into()),
            restore_command: None,
            min_apply_delay: Some("5min".into()),
        };
        let p = parameters(&ConfInput {
            spec: &master_spec(),
            init_parameters: None,
            listen_address: "*",
            port: 5432,
            socket_dir: "/tmp",
            upstream: Some(&up),
            synchronous_standby_names: "",
            recovery: None,
        });
        assert_eq!(upstream_in_effect(&render_conf(&p)), Some(up));
        assert_eq!(upstream_in_effect("port = 5432\n"), None);
    }

    #[test]
    fn conninfo_quotes_values_and_appends_the_extra_keywords() {
        let pairs = [
            ("host", "db one".to_owned()),
            ("user", "it's".to_owned()),
            ("port", "5432".to_owned()),
        ];
        assert_eq!(
            conninfo(&pairs, " sslrootcert=/x "),
            "host='db one' user='it\\'s' port=5432 sslrootcert=/x"
        );
        assert_eq!(conninfo(&pairs[2..], ""), "port=5432");
        assert_eq!(conninfo_quote(""), "''");
        assert_eq!(conninfo_quote("a=b"), "'a=b'");
    }

    #[test]
    fn conf_values_are_quoted_and_read_back() {
        let mut p = BTreeMap::new();
        p.insert("a".to_owned(), "it's \\ fine".to_owned());
        p.insert("b".to_owned(), String::new());
        let text = render_conf(&p);
        assert!(text.contains("a = 'it''s \\\\ fine'\n"), "{text}");
        assert_eq!(read_conf_value(&text, "a").as_deref(), Some("it's \\ fine"));
        assert_eq!(read_conf_value(&text, "b").as_deref(), Some(""));
        assert_eq!(read_conf_value(&text, "c"), None);
    }

    #[test]
    fn hba_modes() {
        let all = render_hba(&HbaInput {
            su_user: "postgres",
            repl_user: "repl",
            mode: SuReplAccessMode::All,
            peer_addresses: vec![],
            user_lines: None,
        });
        assert!(all.contains("host replication repl 0.0.0.0/0 md5"));
        assert!(all.contains("host all all ::0/0 md5"));
        let custom = vec!["hostssl all app 10.0.0.0/8 scram-sha-256".to_owned()];
        let strict = render_hba(&HbaInput {
            su_user: "Admin",
            repl_user: "repl",
            mode: SuReplAccessMode::Strict,
            peer_addresses: vec!["10.0.0.2".into(), "fe80::1".into(), "db3.local".into()],
            user_lines: Some(&custom),
        });
        assert!(strict.contains("host all Admin 10.0.0.2/32 md5"));
        assert!(strict.contains("host replication repl fe80::1/128 md5"));
        assert!(strict.contains("host replication repl db3.local md5"));
        assert!(!strict.contains("0.0.0.0/0"));
        assert!(strict.ends_with("hostssl all app 10.0.0.0/8 scram-sha-256\n"));
        let none: Vec<String> = vec![];
        let nobody = render_hba(&HbaInput {
            su_user: "postgres",
            repl_user: "repl",
            mode: SuReplAccessMode::All,
            peer_addresses: vec![],
            user_lines: Some(&none),
        });
        assert!(
            !nobody.contains("host all all"),
            "an empty pg_hba admits no ordinary user"
        );
    }

    #[test]
    fn wanted_sync_names_with_placeholder() {
        let mut spec = master_spec();
        assert!(wanted_sync_names(&spec, 1).is_empty(), "sync off");
        spec.synchronous_replication = true;
        assert_eq!(wanted_sync_names(&spec, 1), set(&[PLACEHOLDER_STANDBY]));
        assert!(wanted_sync_names(&spec, 0).is_empty(), "min 0 never blocks");
        spec.synchronous_standbys = vec!["b".into(), "a".into()];
        spec.external_synchronous_standbys = vec!["ext".into()];
        assert_eq!(
            wanted_sync_names(&spec, 1),
            set(&["tendril_a", "tendril_b", "ext"])
        );
        spec.role = DbRole::Standby;
        assert!(
            wanted_sync_names(&spec, 1).is_empty(),
            "standbys have no sync standbys"
        );
    }

    #[test]
    fn sync_changes_happen_in_two_steps() {
        let old = set(&["tendril_a"]);
        let new = set(&["tendril_b"]);
        // b not yet in sync: keep a and add b.
        assert_eq!(
            next_sync_names(&old, &new, &set(&["tendril_a"])),
            set(&["tendril_a", "tendril_b"])
        );
        // b in sync: a may go.
        let both = set(&["tendril_a", "tendril_b"]);
        assert_eq!(
            next_sync_names(&both, &new, &set(&["tendril_a", "tendril_b"])),
            new
        );
        // From nothing, or to nothing, or removing members: directly.
        assert_eq!(next_sync_names(&set(&[]), &new, &set(&[])), new);
        assert_eq!(next_sync_names(&old, &set(&[]), &set(&[])), set(&[]));
        assert_eq!(next_sync_names(&both, &old, &set(&[])), old);
        // The placeholder is never in sync, so it stays until a real standby is; going to it
        // is immediate.
        let placeholder = set(&[PLACEHOLDER_STANDBY]);
        assert_eq!(next_sync_names(&old, &placeholder, &old), placeholder);
        assert_eq!(
            next_sync_names(&placeholder, &old, &set(&[])),
            set(&[PLACEHOLDER_STANDBY, "tendril_a"])
        );
        assert_eq!(next_sync_names(&placeholder, &old, &old), old);
    }

    #[test]
    fn renders_and_parses_sync_names() {
        assert_eq!(render_sync_names(&set(&[])), "");
        assert_eq!(render_sync_names(&set(&["tendril_a"])), "tendril_a");
        assert_eq!(
            render_sync_names(&set(&["tendril_b", "tendril_a"])),
            "2 (tendril_a, tendril_b)"
        );
        assert_eq!(render_sync_names(&set(&["Ext"])), "\"Ext\"");
        for text in [
            "",
            "tendril_a",
            "2 (tendril_a, tendril_b)",
            "FIRST 1 (a, \"B\")",
            "ANY 2 (x,y)",
            "a, b",
        ] {
            let parsed = parse_sync_names(text);
            assert_eq!(
                parse_sync_names(&render_sync_names(&parsed)),
                parsed,
                "{text}"
            );
        }
        assert_eq!(parse_sync_names("FIRST 1 (a, \"B\")"), set(&["a", "B"]));
        assert_eq!(
            parse_sync_names("2 (tendril_a, tendril_b)"),
            set(&["tendril_a", "tendril_b"])
        );
    }

    #[test]
    fn default_db_spec_matches_cluster_defaults() {
        let spec = DbSpec::default();
        assert_eq!(spec.max_standbys, ClusterSpec::default().max_standbys);
    }
}
