//! Test support: real servers for integration tests, started on free loopback ports in
//! temporary directories and stopped when dropped (also when the test panics).
//!
//! [`EtcdServer`] runs Debian's `etcd` (package `etcd-server`). Tests use real servers, never
//! mocks, because the behaviour under test (leases expiring, watches resuming across a
//! restart, compaction) only exists in the real thing.
//!
//! [`PgServer`] runs Debian's PostgreSQL 15 with trust authentication on loopback, or inside
//! a [`Netns`] (another host behind a veth pair).
//!
//! Start servers from the test's own thread: the child is told to die with the thread that
//! spawned it (`PR_SET_PDEATHSIG`), so a test runner killed with SIGKILL leaves no etcd behind.

mod etcd;
mod netns;
mod port;
mod postgres;
mod rng;
mod tls;
mod watchdog;

pub use etcd::EtcdServer;
pub use netns::Netns;
pub use port::free_port;
pub use postgres::{PG_BIN, PgServer};
pub use rng::Rng;
pub use tls::{TlsMaterial, make_certificates, make_certificates_for_postgres};
pub use watchdog::{Watchdog, kill_tree, processes};

use std::path::PathBuf;

/// Runs `cmd` to its end; panics, with its standard error, unless it succeeded (a setup
/// step of a test: a failure there is the test's failure).
pub fn run_ok(cmd: &mut std::process::Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", cmd.get_program()));
    assert!(
        out.status.success(),
        "{:?} failed ({}): {}",
        cmd.get_program(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Finds an executable on `PATH` or in the given directories.
pub fn find_binary(name: &str, extra_dirs: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(extra_dirs.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Initialises test logging once (honours `RUST_LOG`, defaults to `info`).
pub fn init_logging() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into());
        // Best effort: a test binary may already have a subscriber.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
