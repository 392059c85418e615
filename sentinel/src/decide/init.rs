//! Phase `initializing`: creating the cluster's first master.

use tendril_control_model::{
    ClusterPhase, ClusterRole, Db, DbInitMode, DbRole, DbSpec, FollowConfig, Generation, InitMode,
};

use super::Ctx;

/// One initialisation step: choose the keeper, wait for the master to converge, or start over.
pub(super) fn initialize(ctx: &mut Ctx<'_>) {
    let mode = ctx.cd.spec.init_mode;
    match ctx.cd.master.clone().filter(|m| ctx.cd.dbs.contains_key(m)) {
        None => create_master(ctx, mode),
        Some(master) => {
            record_init_error(ctx, &master);
            // Initialised: a master accepts writes; a standby cluster's leader replicates
            // from the external primary (in recovery, for good).
            let leader = ctx.cd.dbs[&master].spec.is_standby_leader();
            if ctx.good(&master)
                && ctx
                    .db_state(&master)
                    .is_some_and(|s| s.in_recovery == leader)
            {
                finish(ctx, &master);
            } else if ctx.convergence_failed(&master) {
                let keeper = ctx.cd.dbs[&master].spec.keeper_uid.clone();
                ctx.mem.failed_init.insert(keeper.clone());
                ctx.cd.dbs.remove(&master);
                ctx.cd.master = None;
                ctx.event(
                    "init failed",
                    format!("database {master} on keeper {keeper} did not initialise in time; choosing again"),
                );
            }
        }
    }
}

/// Makes an error of the initialising master's keeper (a failing restore command, a recovery
/// that stopped) a cluster event, once per distinct error: the keeper retries, and the
/// operator reads why in the events rather than in one keeper's log.
fn record_init_error(ctx: &mut Ctx<'_>, master: &str) {
    let keeper = ctx.cd.dbs[master].spec.keeper_uid.clone();
    let error = ctx
        .obs
        .keepers
        .get(&keeper)
        .and_then(|i| i.last_error.clone())
        // What a keeper says while it initialises normally.
        .filter(|e| e != "initialising the database");
    if let Some(e) = &error
        && ctx.mem.init_error.as_ref() != Some(e)
    {
        ctx.event(
            "init error",
            format!("database {master} on keeper {keeper}: {e}"),
        );
    }
    if error.is_some() {
        ctx.mem.init_error = error;
    }
}

fn create_master(ctx: &mut Ctx<'_>, mode: InitMode) {
    let keeper = match mode {
        InitMode::New | InitMode::Pitr => {
            // The first healthy keeper allowed to be master, in uid order (deterministic, so
            // two decisions on the same data agree), preferring those that have not failed.
            let eligible: Vec<String> = ctx
                .cd
                .keepers
                .values()
                .filter(|k| k.status.healthy && k.status.can_be_master)
                .map(|k| k.uid.clone())
                .collect();
            let fresh = eligible.iter().find(|k| !ctx.mem.failed_init.contains(*k));
            let Some(k) = fresh.or(eligible.first()).cloned() else {
                return;
            };
            k
        }
        InitMode::Existing => {
            let wanted = ctx
                .cd
                .spec
                .existing_config
                .as_ref()
                .map(|c| c.keeper_uid.clone())
                .unwrap_or_default();
            if !ctx
                .cd
                .keepers
                .get(&wanted)
                .is_some_and(|k| k.status.healthy)
            {
                ctx.event(
                    "waiting",
                    format!("init mode existing: keeper {wanted} has not reported yet"),
                );
                return;
            }
            wanted
        }
    };
    let uid = ctx.new_db_uid(&keeper);
    let spec = &ctx.cd.spec;
    let db = Db {
        uid: uid.clone(),
        generation: Generation::INITIAL,
        change_time: ctx.now.wall,
        spec: DbSpec {
            keeper_uid: keeper.clone(),
            role: DbRole::Master,
            // A standby cluster's leader follows the external primary from the start: cloned
            // from it (init mode new), restored from a backup and then following it (pitr), or
            // an adopted standby of it (existing), it never ends recovery.
            follow: (spec.role == ClusterRole::Standby).then(|| FollowConfig::external(spec)),
            init_mode: match mode {
                InitMode::Existing => DbInitMode::Existing,
                InitMode::Pitr => DbInitMode::Pitr,
                InitMode::New => DbInitMode::New,
            },
            new_config: spec.new_config.clone(),
            pitr_config: spec.pitr_config.clone().filter(|_| mode == InitMode::Pitr),
            // Restored data carries the source cluster's settings (its archive_command
            // among them): they are not this cluster's.
            include_previous_config: spec.merge_pg_parameters && mode != InitMode::Pitr,
            ..DbSpec::default()
        },
        status: Default::default(),
    };
    ctx.cd.dbs.insert(uid.clone(), db);
    ctx.cd.master = Some(uid.clone());
    let what = match spec.role {
        ClusterRole::Master => "master",
        ClusterRole::Standby => "standby leader (following the external primary)",
    };
    ctx.event(
        "init",
        format!(
            "initialising the first {what} {uid} on keeper {keeper} (init mode {})",
            mode.as_str()
        ),
    );
}

fn finish(ctx: &mut Ctx<'_>, master: &str) {
    let merge = ctx.cd.spec.merge_pg_parameters;
    let params = ctx.cd.dbs[master].status.pg_parameters.clone();
    if let Some(db) = ctx.cd.dbs.get_mut(master) {
        db.spec.init_mode = DbInitMode::None;
        db.spec.include_previous_config = false;
    }
    if merge {
        // Keep what initialisation found (initdb's or the adopted data directory's settings),
        // under the user's own values.
        let mut merged = ctx.cd.spec.clone();
        let mut params = params;
        params.extend(merged.pg_parameters);
        merged.pg_parameters = params;
        match merged.validate() {
            Ok(()) => ctx.cd.spec = merged,
            Err(e) => ctx.event("init", format!("not merging the initial parameters: {e}")),
        }
    }
    ctx.cd.phase = ClusterPhase::Normal;
    let what = if ctx.cd.dbs[master].spec.is_standby_leader() {
        "standby leader"
    } else {
        "master"
    };
    ctx.event(
        "initialised",
        format!("{what} {master} is initialised; the cluster is in phase normal"),
    );
}
