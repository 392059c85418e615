//! Table-driven decisions: every file in `sentinel/testdata/` is a scenario with a comment
//! saying why, steps that set up reports and time, and after each `run` the expected decision.
//! `UPDATE_EXPECT=1 cargo test -p tendril-sentinel --test decide` rewrites the expectations
//! (review the diff before committing it).
#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

mod support;

use std::path::PathBuf;

#[test]
fn testdata_scenarios() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("testdata directory")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 28,
        "expected the scenario files, found {}",
        files.len()
    );
    let update = std::env::var_os("UPDATE_EXPECT").is_some();
    let mut failures = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read scenario");
        assert!(
            text.starts_with('#'),
            "{} must open with a comment saying why",
            file.display()
        );
        let actual = match support::script::run_script(&text) {
            Ok(a) => a,
            Err(e) => panic!("{}: {e}", file.display()),
        };
        if actual != text {
            if update {
                std::fs::write(file, &actual).expect("rewrite scenario");
            } else {
                failures.push(format!("{}:\n{}", file.display(), diff(&text, &actual)));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "scenarios differ (UPDATE_EXPECT=1 rewrites):\n{}",
        failures.join("\n")
    );
}

fn diff(expected: &str, actual: &str) -> String {
    let e: Vec<&str> = expected.lines().collect();
    let a: Vec<&str> = actual.lines().collect();
    let mut out = String::new();
    for i in 0..e.len().max(a.len()) {
        let (x, y) = (
            e.get(i).copied().unwrap_or(""),
            a.get(i).copied().unwrap_or(""),
        );
        if x != y {
            out.push_str(&format!(
                "  line {}:\n    expected: {x}\n    actual:   {y}\n",
                i + 1
            ));
        }
    }
    out
}
