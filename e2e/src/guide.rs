//! The command blocks of a guide (docs/deploy.md) and where each runs, for the test that runs
//! the guide literally. Every `sh` block is preceded by a marker comment:
//!
//! - `<!-- deploy-test: on db1 db2 -->`: run it on those hosts, in that order;
//! - `<!-- deploy-test: instead: NAME (why) -->`: the test does its own step NAME there (a
//!   step no test can run as written, such as copying files to hosts over ssh).
//!
//! A block without a marker is an error, so a new block is never silently left out.

/// Where a block runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// On these hosts, in order.
    On(Vec<String>),
    /// The test's own step of this name.
    Instead(String),
}

/// A command block of the guide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Line of the opening fence (1-based), for messages.
    pub line: usize,
    /// Where it runs.
    pub target: Target,
    /// The commands.
    pub text: String,
}

const MARKER: &str = "<!-- deploy-test:";

/// The `sh` blocks of `markdown`, or what is wrong with the markers.
pub fn blocks(markdown: &str) -> Result<Vec<Block>, String> {
    let mut out = Vec::new();
    let mut marker: Option<(usize, Target)> = None;
    let mut lines = markdown.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix(MARKER) {
            let body = rest
                .strip_suffix("-->")
                .ok_or_else(|| format!("line {}: a marker ends with -->", i + 1))?
                .trim();
            marker = Some((
                i + 1,
                parse_target(body).map_err(|e| format!("line {}: {e}", i + 1))?,
            ));
            continue;
        }
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let mut text = String::new();
        let mut closed = false;
        for (_, inner) in lines.by_ref() {
            if inner.trim_end() == "```" {
                closed = true;
                break;
            }
            text.push_str(inner);
            text.push('\n');
        }
        if !closed {
            return Err(format!("line {}: a block is not closed", i + 1));
        }
        if info.trim() != "sh" {
            if marker.is_some() {
                return Err(format!("line {}: a marked block must be ```sh", i + 1));
            }
            continue;
        }
        let (at, target) = marker
            .take()
            .ok_or_else(|| format!("line {}: a sh block without a deploy-test marker", i + 1))?;
        if at + 1 != i + 1 {
            return Err(format!(
                "line {at}: a marker must be on the line just before its block"
            ));
        }
        out.push(Block {
            line: i + 1,
            target,
            text,
        });
    }
    if let Some((at, _)) = marker {
        return Err(format!("line {at}: a marker with no block after it"));
    }
    Ok(out)
}

fn parse_target(body: &str) -> Result<Target, String> {
    if let Some(hosts) = body.strip_prefix("on ") {
        let hosts: Vec<String> = hosts.split_whitespace().map(str::to_owned).collect();
        if hosts.is_empty() {
            return Err("`on` names no host".into());
        }
        return Ok(Target::On(hosts));
    }
    if let Some(step) = body.strip_prefix("instead:") {
        let name = step.split_whitespace().next().unwrap_or_default();
        if name.is_empty() || !step.contains('(') {
            return Err("`instead:` needs a step name and (why)".into());
        }
        return Ok(Target::Instead(name.to_owned()));
    }
    Err(format!(
        "unknown marker {body:?}: `on HOST...` or `instead: STEP (why)`"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_place_blocks_and_every_sh_block_needs_one() {
        let guide = "# T\n\n<!-- deploy-test: on db1 db2 -->\n```sh\necho a\necho b\n```\n\n\
                     ```\nnot run\n```\n<!-- deploy-test: instead: copy (no ssh) -->\n```sh\nscp x\n```\n";
        assert_eq!(
            blocks(guide).unwrap(),
            vec![
                Block {
                    line: 4,
                    target: Target::On(vec!["db1".into(), "db2".into()]),
                    text: "echo a\necho b\n".into(),
                },
                Block {
                    line: 13,
                    target: Target::Instead("copy".into()),
                    text: "scp x\n".into(),
                },
            ]
        );
        for (bad, why) in [
            ("```sh\nls\n```\n", "without a deploy-test marker"),
            (
                "<!-- deploy-test: on db1 -->\n\n```sh\nls\n```\n",
                "just before",
            ),
            (
                "<!-- deploy-test: on -->\n```sh\nls\n```\n",
                "unknown marker",
            ),
            (
                "<!-- deploy-test: instead: x -->\n```sh\nls\n```\n",
                "(why)",
            ),
            ("<!-- deploy-test: on db1 -->\n```sh\nls\n", "not closed"),
            ("<!-- deploy-test: on db1 -->\n", "no block after"),
        ] {
            let e = blocks(bad).unwrap_err();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }
}
