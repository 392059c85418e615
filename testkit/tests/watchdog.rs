//! The watchdog stops a hung test: this test runs itself again as a child that arms a
//! one-second watchdog, starts a process and then blocks its own thread forever; the child
//! must exit with a failure, print its report past the harness's capture, and leave the
//! process it started dead.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::process::Command;
use std::time::{Duration, Instant};

use tendril_testkit::Watchdog;

const CHILD: &str = "TENDRIL_WATCHDOG_TEST_CHILD";

#[test]
fn a_hung_test_is_stopped_with_its_report_and_its_processes_killed() {
    if let Some(pid_file) = std::env::var_os(CHILD) {
        // The child: a test that hangs while a process it started runs.
        #[allow(
            clippy::zombie_processes,
            reason = "the watchdog kills it, and this process exits before any reaping"
        )]
        let sleeper = Command::new("sleep").arg("1000").spawn().unwrap();
        std::fs::write(&pid_file, sleeper.id().to_string()).unwrap();
        let _w = Watchdog::arm(
            "the hanging child",
            Duration::from_secs(1),
            || "stuck at: the step the report names".into(),
            || eprintln!("cleanup ran"),
        );
        std::thread::sleep(Duration::from_secs(600));
        panic!("the watchdog did not stop the test");
    }
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("sleeper.pid");
    let started = Instant::now();
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "a_hung_test_is_stopped_with_its_report_and_its_processes_killed",
            "--test-threads",
            "1",
        ])
        .env(CHILD, &pid_file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(101), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(300),
        "the child ran its whole sleep"
    );
    assert!(
        stderr.contains("the hanging child: no end within 1s")
            && stderr.contains("stuck at: the step the report names"),
        "{stderr}"
    );
    assert!(stderr.contains("killed 1 processes"), "{stderr}");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // Killed, and reaped by init now that its parent is gone: no /proc entry, or a zombie
    // on its way.
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z "),
        "the sleeper survived: {state}"
    );
}
