//! Creating the local data of the database assigned to this keeper, by its init mode: a new
//! database (initdb), an adopted data directory, a point-in-time recovery from a backup
//! ([`crate::pitr`]), or a standby cloned (pg_basebackup) or rewound (pg_rewind) from the
//! database it follows.

use std::time::{Duration, Instant};

use tendril_control_model::{ClusterData, Db, DbInitMode, FollowConfig};
use tendril_control_store::Store;

use super::{Keeper, followed_endpoint, read_postgresql_conf};
use crate::KeeperError;
use crate::datadir::DbState;
use crate::pgconf;
use crate::sql;

/// First delay before a failed restore from a backup is tried again; it doubles each time.
const RESTORE_RETRY_FIRST: Duration = Duration::from_secs(5);
/// Longest delay between two attempts.
const RESTORE_RETRY_MAX: Duration = Duration::from_secs(300);
/// How long a restored data directory may replay WAL before it accepts connections: as long
/// as PostgreSQL runs (a large backup's recovery takes hours; a deadline would only start
/// it over). PostgreSQL exiting ends the wait at once.
const RECOVERY_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

impl<S: Store> Keeper<S> {
    /// Creates the local data for `db` according to its init mode.
    pub(super) async fn initialize(
        &mut self,
        cd: &ClusterData,
        db: &Db,
    ) -> Result<(), KeeperError> {
        match db.spec.init_mode {
            DbInitMode::None => {
                // The data this database needs is not here (deleted, or another disk): never
                // invent it. The sentinel will fail over.
                return Err(KeeperError::DataDisappeared {
                    db: db.uid.clone(),
                    local: self.db_state.uid.clone(),
                });
            }
            DbInitMode::Pitr => {
                // A failing restore is not rerun on every pass: it empties the data
                // directory and reads the repository each time.
                if let Some((at, _, error)) = &self.restore_backoff
                    && Instant::now() < *at
                {
                    return Err(KeeperError::Postgres(error.clone()));
                }
                self.set_initializing(db)?;
                if let Err(e) = self.init_pitr(cd, db).await {
                    let delay = self
                        .restore_backoff
                        .as_ref()
                        .map_or(RESTORE_RETRY_FIRST, |(_, d, _)| {
                            (*d * 2).min(RESTORE_RETRY_MAX)
                        });
                    let error = format!(
                        "{e} (trying again in {})",
                        humantime::format_duration(delay)
                    );
                    self.restore_backoff = Some((Instant::now() + delay, delay, error.clone()));
                    return Err(KeeperError::Postgres(error));
                }
                self.restore_backoff = None;
                if db.spec.is_standby_leader() {
                    tracing::info!(db = %db.uid, "backup restored: following the external primary");
                } else {
                    tracing::info!(db = %db.uid, "point-in-time recovery done: accepting writes");
                }
                return Ok(());
            }
            DbInitMode::Existing => {
                if !self.data.pgdata_initialised() {
                    return Err(KeeperError::DataVanished(self.data.pgdata()));
                }
                let leader = db.spec.is_standby_leader();
                if leader && !self.data.pgdata().join("standby.signal").exists() {
                    // Adopting a primary as a standby cluster's leader would need a rewind
                    // onto the external primary at best, a fork at worst: refused.
                    return Err(KeeperError::NotAStandby(db.uid.clone()));
                }
                tracing::info!(db = %db.uid, leader, "adopting the existing data directory");
                self.pg.stop().await?;
                let init = read_postgresql_conf(&self.data.pgdata().join("postgresql.conf"));
                self.db_state = DbState {
                    uid: db.uid.clone(),
                    generation: tendril_control_model::Generation::NONE,
                    initializing: false,
                    init_pg_parameters: Some(init),
                };
                self.write_config(cd, db)?;
                self.pg.start(cd.spec.db_wait_ready_timeout).await?;
                // A standby is read-only: its roles are the external primary's.
                if !leader {
                    let client = self.pg.connect(cd.spec.request_timeout).await?;
                    self.setup_roles(&client).await?;
                }
                self.data.save_db_state(&self.db_state)?;
                return Ok(());
            }
            DbInitMode::New | DbInitMode::Resync => {}
        }
        self.set_initializing(db)?;
        match db.spec.init_mode {
            DbInitMode::New if db.spec.is_standby_leader() => self.clone_external(cd, db).await?,
            DbInitMode::New => self.init_new(cd, db).await?,
            _ => self.resync(cd, db).await?,
        }
        self.db_state.initializing = false;
        self.data.save_db_state(&self.db_state)?;
        tracing::info!(db = %db.uid, mode = ?db.spec.init_mode, "database initialised");
        Ok(())
    }

    pub(super) fn set_initializing(&mut self, db: &Db) -> Result<(), KeeperError> {
        self.db_state = DbState {
            uid: db.uid.clone(),
            generation: tendril_control_model::Generation::NONE,
            initializing: true,
            init_pg_parameters: None,
        };
        self.data.save_db_state(&self.db_state)?;
        self.report_initializing();
        Ok(())
    }

    async fn init_new(&mut self, cd: &ClusterData, db: &Db) -> Result<(), KeeperError> {
        tracing::info!(db = %db.uid, "initdb");
        self.pg.stop().await?;
        self.wipe_pgdata()?;
        self.pg.prepare_dirs(true)?;
        let pwfile = self.data.root().join(".su-password");
        self.pg
            .write_file(&pwfile, self.config.su.password.as_bytes())?;
        let new_config = db.spec.new_config.clone().unwrap_or_default();
        let result = self
            .pg
            .initdb(
                &pwfile,
                new_config.locale.as_deref(),
                new_config.encoding.as_deref(),
                new_config.data_checksums,
            )
            .await;
        let _ = std::fs::remove_file(&pwfile);
        result?;
        self.db_state.init_pg_parameters = Some(read_postgresql_conf(
            &self.data.pgdata().join("postgresql.conf"),
        ));
        self.write_config(cd, db)?;
        self.pg.start(cd.spec.db_wait_ready_timeout).await?;
        let client = self.pg.connect(cd.spec.request_timeout).await?;
        self.setup_roles(&client).await
    }

    /// A new standby cluster's leader: a base backup of the external primary, then streaming
    /// from it. The clone's configuration and roles are the primary's: this cluster's spec
    /// decides the configuration, and the roles stay (a standby cannot change them).
    pub(super) async fn clone_external(
        &mut self,
        cd: &ClusterData,
        db: &Db,
    ) -> Result<(), KeeperError> {
        let Some(FollowConfig::External {
            standby_settings: Some(settings),
            ..
        }) = &db.spec.follow
        else {
            return Err(KeeperError::Spec(format!(
                "database {} leads a standby cluster without standby_config.standby_settings",
                db.uid
            )));
        };
        let primary = self.external_primary(db, settings)?;
        let conninfo = pgconf::conninfo(&primary.pairs, &settings.primary_conninfo);
        self.pg.stop().await?;
        self.wipe_pgdata()?;
        self.pg.prepare_dirs(true)?;
        tracing::info!(db = %db.uid, %conninfo, "new standby cluster: base backup of the external primary");
        self.pg
            .base_backup_from(&conninfo, &primary.password)
            .await?;
        self.db_state.init_pg_parameters = None;
        self.make_standby(cd, db)?;
        self.pg.start(RECOVERY_WAIT).await
    }

    /// Point-in-time recovery (see [`crate::pitr`]). While it runs, PostgreSQL admits local
    /// connections only, without a password (the restored roles may have other passwords
    /// than this cluster's; the socket directory is postgres' own), and no other host.
    async fn init_pitr(&mut self, cd: &ClusterData, db: &Db) -> Result<(), KeeperError> {
        let Some(pitr) = db.spec.pitr_config.as_ref() else {
            return Err(KeeperError::Postgres(
                "init mode pitr without pitr_config in the database spec".into(),
            ));
        };
        self.pg.stop().await?;
        self.wipe_pgdata()?;
        self.pg.prepare_dirs(true)?;
        let pgdata = self.data.pgdata();
        let line = crate::pitr::restore_command_line(
            &pitr.data_restore_command,
            &pgdata.to_string_lossy(),
        );
        tracing::info!(db = %db.uid, command = %line, "restoring a base backup");
        self.pg.run_shell("data_restore_command", &line).await?;
        for leftover in ["postmaster.pid", "standby.signal", "backup_label.old"] {
            let _ = std::fs::remove_file(pgdata.join(leftover));
        }
        // The restored configuration is the source cluster's (its archive_command among
        // others): this cluster's spec alone decides.
        self.db_state.init_pg_parameters = None;
        if db.spec.is_standby_leader() {
            // A standby cluster restored from a backup: it catches up from the archive and
            // streams from the external primary, in recovery for good. Its roles are the
            // primary's (read-only here).
            self.make_standby(cd, db)?;
            tracing::info!(db = %db.uid, "restored: following the external primary");
            self.pg.start(RECOVERY_WAIT).await?;
            self.db_state.initializing = false;
            return self.data.save_db_state(&self.db_state);
        }
        self.write_config(cd, db)?;
        self.pg
            .write_file(&pgdata.join("pg_hba.conf"), b"local all all trust\n")?;
        self.pg.write_file(&pgdata.join("recovery.signal"), b"")?;
        tracing::info!(db = %db.uid, "archive recovery");
        self.pg.start(RECOVERY_WAIT).await?;
        let mut paused_reported = false;
        loop {
            if let Some(status) = self.pg.poll_exit() {
                return Err(KeeperError::Postgres(format!(
                    "recovery stopped ({status}): {}",
                    self.pg.log_problems()
                )));
            }
            let (in_recovery, paused) = match self.pg.connect(cd.spec.request_timeout).await {
                Ok(client) => sql::recovery_state(&client).await.unwrap_or((true, false)),
                Err(_) => (true, false),
            };
            if !in_recovery {
                break;
            }
            // PostgreSQL pauses (rather than exits) when the WAL it replays needs a larger
            // setting than this cluster's (max_connections and the like): say so.
            if paused && !paused_reported {
                paused_reported = true;
                let why = format!("point-in-time recovery paused: {}", self.pg.log_problems());
                tracing::warn!(db = %db.uid, "{why}");
                self.report_initializing_because(why);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let client = self.pg.connect(cd.spec.request_timeout).await?;
        sql::setup_superuser(&client, &self.config.su.user, &self.config.su.password).await?;
        self.setup_roles(&client).await?;
        drop(client);
        // Done, and recorded at once: a keeper restarted now must not restore again.
        self.db_state.initializing = false;
        self.data.save_db_state(&self.db_state)?;
        // The configuration loses the recovery settings and gets the cluster's hba. The
        // recovery targets only change at a restart (a reload would leave PostgreSQL
        // "pending restart"); nothing is connected yet.
        self.write_config(cd, db)?;
        self.pg.restart(cd.spec.db_wait_ready_timeout).await
    }

    async fn resync(&mut self, cd: &ClusterData, db: &Db) -> Result<(), KeeperError> {
        let (source, source_system_id) = followed_endpoint(cd, db)?;
        self.pg.stop().await?;
        let mut rewound = false;
        if db.spec.use_pg_rewind && self.data.pgdata_initialised() {
            let local = self.pg.system_id_offline().await.ok();
            if local.is_some() && local == source_system_id {
                tracing::info!(db = %db.uid, source = ?source, "resync by pg_rewind");
                // pg_rewind copies the source's postgresql.auto.conf; it must be a file.
                let _ = std::fs::remove_file(self.data.pgdata().join("postgresql.auto.conf"));
                match self.pg.rewind(&source).await {
                    Ok(()) => rewound = true,
                    Err(e) => {
                        tracing::warn!(db = %db.uid, error = %e, "pg_rewind failed, falling back to a base backup")
                    }
                }
            } else {
                tracing::info!(db = %db.uid, "system identifiers differ, pg_rewind cannot work");
            }
        }
        if rewound {
            self.make_standby(cd, db)?;
            match self.pg.start(cd.spec.db_wait_ready_timeout).await {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::warn!(db = %db.uid, error = %e, "rewound data does not start, falling back to a base backup");
                    self.pg.stop().await?;
                }
            }
        }
        let bootstrapped = self
            .bootstrap_from_backup(db, source_system_id.as_deref())
            .await?;
        if !bootstrapped {
            tracing::info!(db = %db.uid, source = ?source, "resync by pg_basebackup");
            self.wipe_pgdata()?;
            self.pg.prepare_dirs(true)?;
            self.pg.base_backup(&source, &self.config.repl).await?;
        }
        self.make_standby(cd, db)?;
        // A backup restored by the bootstrap command replays archived WAL before it accepts
        // connections: no deadline but PostgreSQL's own exit.
        let wait = if bootstrapped {
            RECOVERY_WAIT
        } else {
            cd.spec.db_wait_ready_timeout
        };
        self.pg.start(wait).await
    }

    /// With `standby_bootstrap` in the spec: restores the latest backup into an empty PGDATA
    /// (the standby then catches up from the archive and streams). False without it, or if
    /// the command fails: a pg_basebackup from the master still makes the standby.
    async fn bootstrap_from_backup(
        &mut self,
        db: &Db,
        source_system_id: Option<&str>,
    ) -> Result<bool, KeeperError> {
        let Some(bootstrap) = &db.spec.standby_bootstrap else {
            return Ok(false);
        };
        self.wipe_pgdata()?;
        self.pg.prepare_dirs(true)?;
        let pgdata = self.data.pgdata();
        let line = crate::pitr::restore_command_line(&bootstrap.command, &pgdata.to_string_lossy());
        tracing::info!(db = %db.uid, command = %line, "new standby from the backup repository");
        match self.pg.run_shell("standby_bootstrap.command", &line).await {
            Ok(()) => {
                let _ = std::fs::remove_file(pgdata.join("postmaster.pid"));
                // A backup of another cluster (a stanza mixed up) can never follow this one.
                let restored = self.pg.system_id_offline().await.ok();
                if source_system_id.is_some() && restored.as_deref() != source_system_id {
                    tracing::warn!(db = %db.uid, ?restored, source = ?source_system_id, "the restored backup is of another database system, falling back to pg_basebackup");
                    return Ok(false);
                }
                Ok(true)
            }
            Err(e) => {
                tracing::warn!(db = %db.uid, error = %e, "standby bootstrap failed, falling back to pg_basebackup");
                Ok(false)
            }
        }
    }

    pub(super) fn make_standby(&mut self, cd: &ClusterData, db: &Db) -> Result<(), KeeperError> {
        let signal = self.data.pgdata().join("standby.signal");
        self.pg.write_file(&signal, b"")?;
        // Drop recovery leftovers a rewind or a backup may carry.
        let _ = std::fs::remove_file(self.data.pgdata().join("recovery.signal"));
        let _ = std::fs::remove_file(self.data.pgdata().join("backup_label.old"));
        self.write_config(cd, db).map(|_| ())
    }

    /// The replication role with this cluster's password (the superuser's is set by initdb,
    /// or [`sql::setup_superuser`] for restored data).
    async fn setup_roles(&self, client: &tokio_postgres::Client) -> Result<(), KeeperError> {
        sql::setup_roles(
            client,
            &self.config.su.user,
            &self.config.repl.user,
            &self.config.repl.password,
        )
        .await
    }
}
