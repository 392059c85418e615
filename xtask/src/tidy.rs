//! Repository policy, checked as tests.

#[cfg(test)]
use std::path::{Path, PathBuf};

/// Every `.rs` file under `dir`, skipping `target` and hidden directories.
#[cfg(test)]
pub(crate) fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::rust_files;
    use crate::project_root;

    #[test]
    fn every_rust_file_opens_with_a_doc_comment() {
        let mut files = Vec::new();
        rust_files(&project_root(), &mut files);
        assert!(
            files.len() > 10,
            "found only {} files: wrong root?",
            files.len()
        );
        let offenders: Vec<String> = files
            .iter()
            .filter(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                !text.trim_start().starts_with("//!")
            })
            .map(|f| f.display().to_string())
            .collect();
        assert!(
            offenders.is_empty(),
            "files without a //! doc opening: {offenders:#?}"
        );
    }

    /// The shipped units, as `systemd-analyze verify` reads them: every directive known and
    /// valid. Their programs are replaced by /bin/true (not installed here); the arguments
    /// stay.
    #[test]
    fn the_systemd_units_verify() {
        let units = project_root().join("deploy/systemd");
        let dir = std::env::temp_dir().join(format!("tendril-units-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut copies = Vec::new();
        for entry in std::fs::read_dir(&units).unwrap().flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            let text = ["keeper", "sentinel", "proxy"].iter().fold(text, |t, c| {
                t.replace(&format!("/usr/local/bin/tendril-{c}"), "/bin/true")
            });
            let copy = dir.join(entry.file_name());
            std::fs::write(&copy, text).unwrap();
            copies.push(copy);
        }
        assert_eq!(
            copies.len(),
            3,
            "keeper, sentinel and proxy units: {copies:?}"
        );
        let out = std::process::Command::new("/usr/bin/systemd-analyze")
            .arg("verify")
            .args(&copies)
            .output()
            .expect("systemd-analyze (package systemd, installed by cargo xtask deps)");
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(out.status.success() && said.trim().is_empty(), "{said}");
    }

    #[test]
    fn no_ignored_tests() {
        let mut files = Vec::new();
        rust_files(&project_root(), &mut files);
        let marker = ["#[", "ignore"].concat();
        let offenders: Vec<String> = files
            .iter()
            .filter(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .contains(&marker)
            })
            .map(|f| f.display().to_string())
            .collect();
        assert!(offenders.is_empty(), "ignored tests: {offenders:#?}");
    }
}
