//! tendril-keeper: runs beside one PostgreSQL instance and converges it to the database spec
//! the cluster data assigns to it (initdb, base backup, replication, promote, pg_rewind,
//! generated configuration, crash restart), and reports its state under its leased key.
//!
//! The implementation lands with the Keeper issue; the crate exists so the workspace has its
//! final shape and later work adds to it rather than moving it.
#![forbid(unsafe_code)]
