//! The keeper's data directory: the exclusive lock, the keeper's and the database's local
//! state, and the PostgreSQL data directory inside it.
//!
//! ```text
//! <data-dir>/lock           exclusive lock held while the keeper runs
//! <data-dir>/keeper.json    {uid, cluster_uid}
//! <data-dir>/db.json        {uid, generation, initializing, init_pg_parameters}
//! <data-dir>/postgres/      PGDATA
//! <data-dir>/run/           PostgreSQL's unix socket
//! <data-dir>/postgres.log   PostgreSQL's output
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tendril_control_model::Generation;

use crate::KeeperError;

/// The keeper's own state: who it is and which cluster incarnation it belongs to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeeperState {
    /// The keeper uid, generated once.
    pub uid: String,
    /// The cluster uid last seen.
    #[serde(default)]
    pub cluster_uid: Option<String>,
}

/// What the local PostgreSQL data holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DbState {
    /// The database uid the data belongs to; empty when there is none.
    pub uid: String,
    /// The spec generation fully applied.
    pub generation: Generation,
    /// An initialisation (initdb, base backup, rewind) started and has not finished: the data
    /// cannot be trusted.
    pub initializing: bool,
    /// Parameters found at initialisation.
    #[serde(default)]
    pub init_pg_parameters: Option<BTreeMap<String, String>>,
}

/// The data directory, locked for this process.
#[derive(Debug)]
pub struct DataDir {
    root: PathBuf,
    // Held for the life of the keeper: the lock is released when the file is closed.
    _lock: File,
}

impl DataDir {
    /// Creates the directory if needed and takes its exclusive lock.
    pub fn open(root: &Path) -> Result<DataDir, KeeperError> {
        std::fs::create_dir_all(root).map_err(|e| KeeperError::io("create data dir", root, e))?;
        let lock_path = root.join("lock");
        let lock = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| KeeperError::io("open lock file", &lock_path, e))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(KeeperError::Locked(root.to_path_buf()));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(KeeperError::io("lock data dir", &lock_path, e));
            }
        }
        Ok(DataDir {
            root: root.to_path_buf(),
            _lock: lock,
        })
    }

    /// The data directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// PGDATA.
    pub fn pgdata(&self) -> PathBuf {
        self.root.join("postgres")
    }

    /// PostgreSQL's socket directory.
    pub fn socket_dir(&self) -> PathBuf {
        self.root.join("run")
    }

    /// PostgreSQL's log file.
    pub fn log_file(&self) -> PathBuf {
        self.root.join("postgres.log")
    }

    /// Whether PGDATA holds an initialised cluster.
    pub fn pgdata_initialised(&self) -> bool {
        self.pgdata().join("PG_VERSION").is_file()
    }

    /// Reads the keeper state, if saved.
    pub fn load_keeper_state(&self) -> Result<Option<KeeperState>, KeeperError> {
        self.load("keeper.json")
    }

    /// Saves the keeper state.
    pub fn save_keeper_state(&self, state: &KeeperState) -> Result<(), KeeperError> {
        self.save("keeper.json", state)
    }

    /// Reads the database state (default when never saved).
    pub fn load_db_state(&self) -> Result<DbState, KeeperError> {
        Ok(self.load("db.json")?.unwrap_or_default())
    }

    /// Saves the database state.
    pub fn save_db_state(&self, state: &DbState) -> Result<(), KeeperError> {
        self.save("db.json", state)
    }

    fn load<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<Option<T>, KeeperError> {
        let path = self.root.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| KeeperError::Corrupt {
                        path,
                        detail: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(KeeperError::io("read", &path, e)),
        }
    }

    fn save<T: Serialize>(&self, name: &str, value: &T) -> Result<(), KeeperError> {
        let bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
        write_atomic(&self.root.join(name), &bytes, 0o600)
    }
}

/// Writes a file so that a crash leaves either the old or the new content: a temporary file,
/// fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KeeperError> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut file = File::options()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| KeeperError::io("create", &tmp, e))?;
    file.write_all(bytes)
        .map_err(|e| KeeperError::io("write", &tmp, e))?;
    file.sync_all()
        .map_err(|e| KeeperError::io("fsync", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| KeeperError::io("rename", path, e))?;
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_open_is_refused_while_locked() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDir::open(dir.path()).unwrap();
        let second = DataDir::open(dir.path()).unwrap_err();
        assert!(matches!(second, KeeperError::Locked(_)), "{second}");
        assert!(second.to_string().contains("exclusive lock"), "{second}");
        drop(first);
        assert!(DataDir::open(dir.path()).is_ok(), "lock released on drop");
    }

    #[test]
    fn states_round_trip_and_corruption_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let d = DataDir::open(dir.path()).unwrap();
        assert_eq!(d.load_keeper_state().unwrap(), None);
        assert_eq!(d.load_db_state().unwrap(), DbState::default());
        let ks = KeeperState {
            uid: "k1".into(),
            cluster_uid: Some("c".into()),
        };
        d.save_keeper_state(&ks).unwrap();
        assert_eq!(d.load_keeper_state().unwrap(), Some(ks));
        let ds = DbState {
            uid: "db".into(),
            generation: Generation(3),
            ..DbState::default()
        };
        d.save_db_state(&ds).unwrap();
        assert_eq!(d.load_db_state().unwrap(), ds);
        std::fs::write(dir.path().join("db.json"), b"{garbage").unwrap();
        let err = d.load_db_state().unwrap_err();
        assert!(matches!(err, KeeperError::Corrupt { .. }), "{err}");
    }
}
