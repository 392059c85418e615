//! Table tests of the direction state machine: every file of `proxy/testdata/direction/`.
//!
//! A line is `<input> => <expected>`; `#` starts a comment. States are written
//! `<flow>[+fin|+reset][+eof]` (flows: kernel, reading, blocked, behind, parked),
//! `shut:fin`, `shut:reset` or `dead`. Facts are `key=value` words (mode, held, passed,
//! fwd, redirected, base, written, received, base_recv, allow, last, backlog) or flags
//! (fin, delivered); unnamed facts are zero, absent or false. The file's name says which
//! function a line runs:
//!
//! - `events.txt`: `<state> <hangup|reset|peer-reset> => <state>`
//! - `pair.txt`, `sends.txt`, `replies.txt`: `<state> <facts..> => <state> <action>`
//! - `settle.txt`: `<client dir> <backend dir> [first=client|backend] [window] [unacked]
//!   => keep|flush|close:client|close:backend|cut`

use super::*;
use std::collections::HashMap;
use std::path::PathBuf;

fn state(word: &str) -> Result<DirState, String> {
    match word {
        "shut:fin" => return Ok(DirState::Shut(End::Fin)),
        "shut:reset" => return Ok(DirState::Shut(End::Reset)),
        "dead" => return Ok(DirState::Dead),
        _ => {}
    }
    let mut parts = word.split('+');
    let flow = match parts.next() {
        Some("kernel") => Flow::Kernel,
        Some("reading") => Flow::Reading,
        Some("blocked") => Flow::Blocked,
        Some("behind") => Flow::Behind,
        Some("parked") => Flow::Parked,
        _ => return Err(format!("unknown state {word:?}")),
    };
    let (mut end, mut eof_read) = (None, false);
    for p in parts {
        match p {
            "fin" => end = Some(End::Fin),
            "reset" => end = Some(End::Reset),
            "eof" => eof_read = true,
            _ => return Err(format!("unknown state suffix {p:?} in {word:?}")),
        }
    }
    Ok(DirState::Live {
        flow,
        end,
        eof_read,
    })
}

fn action(word: &str) -> Result<Action, String> {
    Ok(match word {
        "read" => Action::Read,
        "write" => Action::Write,
        "look" => Action::Look,
        "shut" => Action::Shut,
        "wait" => Action::Wait,
        "cut" => Action::Cut,
        _ => return Err(format!("unknown action {word:?}")),
    })
}

/// `key=value` words and bare flags.
struct Facts(HashMap<String, String>);

impl Facts {
    fn parse(words: &[&str]) -> Facts {
        Facts(
            words
                .iter()
                .map(|w| match w.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (w.to_string(), String::new()),
                })
                .collect(),
        )
    }

    fn check(&self, known: &[&str]) -> Result<(), String> {
        match self.0.keys().find(|k| !known.contains(&k.as_str())) {
            Some(k) => Err(format!("fact {k:?} does not apply here")),
            None => Ok(()),
        }
    }

    fn num(&self, key: &str) -> Result<u64, String> {
        self.0.get(key).map_or(Ok(0), |v| {
            v.parse().map_err(|_| format!("{key}={v} is not a number"))
        })
    }

    fn opt(&self, key: &str) -> Result<Option<u64>, String> {
        self.0.get(key).map(|_| self.num(key)).transpose()
    }

    fn flag(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }

    fn mode(&self) -> Result<Mode, String> {
        Ok(match self.0.get("mode").map(String::as_str) {
            None | Some("kernel") => Mode::Kernel,
            Some("user") => Mode::User,
            Some("draining") => Mode::Draining,
            Some("failed") => Mode::Failed,
            Some(m) => return Err(format!("unknown mode {m:?}")),
        })
    }

    fn last(&self) -> Result<Option<Outcome>, String> {
        Ok(match self.0.get("last").map(String::as_str) {
            None => None,
            Some("eof") => Some(Outcome::Eof),
            Some("empty") => Some(Outcome::Empty),
            Some("full") => Some(Outcome::Full),
            Some("reset") => Some(Outcome::Reset),
            Some(l) => return Err(format!("unknown outcome {l:?}")),
        })
    }

    fn yes_no(&self, key: &str) -> Result<Option<bool>, String> {
        Ok(match self.0.get(key).map(String::as_str) {
            None => None,
            Some("yes") => Some(true),
            Some("no") => Some(false),
            Some(v) => return Err(format!("{key}={v}: yes or no")),
        })
    }
}

/// Runs one line of `file`: Ok(None) when it holds, Ok(Some(got)) when it does not.
fn run(file: &str, input: &[&str], want: &[&str]) -> Result<Option<String>, String> {
    let Some((first, rest)) = input.split_first() else {
        return Err("empty input".into());
    };
    match file {
        "events.txt" => {
            let event = match rest {
                ["hangup"] => Event::Hangup,
                ["reset"] => Event::Reset,
                ["peer-reset"] => Event::PeerReset,
                _ => return Err(format!("events: one event expected, got {rest:?}")),
            };
            let [expected] = want else {
                return Err("events: one state expected".into());
            };
            let got = on_event(state(first)?, event);
            Ok((got != state(expected)?).then(|| format!("{got:?}")))
        }
        "settle.txt" => {
            let client = state(first)?;
            let Some((backend, flags)) = rest.split_first() else {
                return Err("settle: two states expected".into());
            };
            let backend = state(backend)?;
            let facts = Facts::parse(flags);
            facts.check(&["first", "window", "unacked"])?;
            let first_end = match facts.0.get("first").map(String::as_str) {
                None => None,
                Some("client") => Some(0),
                Some("backend") => Some(1),
                Some(f) => return Err(format!("first={f}: client or backend")),
            };
            let got = settle([client, backend], first_end, facts.flag("window"), || {
                facts.flag("unacked")
            });
            let expected = match want {
                ["keep"] => Settle::Keep { flush: false },
                ["flush"] => Settle::Keep { flush: true },
                ["close:client"] => Settle::Close(CloseReason::Client),
                ["close:backend"] => Settle::Close(CloseReason::Backend),
                ["cut"] => Settle::Cut(CloseReason::Error),
                _ => return Err(format!("settle: unknown outcome {want:?}")),
            };
            Ok((got != expected).then(|| format!("{got:?}")))
        }
        "pair.txt" | "sends.txt" | "replies.txt" => {
            let from = state(first)?;
            let facts = Facts::parse(rest);
            let got = match file {
                "pair.txt" => {
                    facts.check(&[
                        "mode",
                        "held",
                        "passed",
                        "fwd",
                        "redirected",
                        "base",
                        "written",
                        "received",
                        "base_recv",
                        "last",
                    ])?;
                    pair_step(
                        from,
                        &PairFacts {
                            mode: facts.mode()?,
                            held: facts.num("held")?,
                            passed: facts.num("passed")?,
                            forwarded: facts.num("fwd")?,
                            redirected: facts.num("redirected")?,
                            base: facts.num("base")?,
                            written: facts.opt("written")?,
                            received: facts.opt("received")?,
                            base_recv: facts.num("base_recv")?,
                            last: facts.last()?,
                        },
                    )
                }
                "sends.txt" => {
                    facts.check(&["held", "last"])?;
                    sends_step(
                        from,
                        &SendFacts {
                            held: facts.num("held")?,
                            last: facts.last()?,
                        },
                    )
                }
                _ => {
                    facts.check(&[
                        "mode",
                        "held",
                        "passed",
                        "fwd",
                        "allow",
                        "fin",
                        "delivered",
                        "backlog",
                        "last",
                    ])?;
                    replies_step(
                        from,
                        &ReplyFacts {
                            mode: facts.mode()?,
                            held: facts.num("held")?,
                            passed: facts.num("passed")?,
                            forwarded: facts.num("fwd")?,
                            allow: facts.num("allow")?,
                            fin: facts.flag("fin"),
                            delivered: facts.flag("delivered"),
                            backlog_delivered: facts.yes_no("backlog")?,
                            last: facts.last()?,
                        },
                    )
                }
            };
            let [next, act] = want else {
                return Err("a state and an action expected".into());
            };
            let expected = (state(next)?, action(act)?);
            Ok((got != expected).then(|| format!("{:?} {:?}", got.0, got.1)))
        }
        _ => Err(format!("no step function for {file}")),
    }
}

#[test]
fn direction_tables() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/direction");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("testdata/direction")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    let mut failures = Vec::new();
    let mut lines = 0;
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(path).expect("read table");
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap().trim();
            if line.is_empty() {
                continue;
            }
            lines += 1;
            let Some((input, want)) = line.split_once("=>") else {
                failures.push(format!("{name}:{}: no `=>`", n + 1));
                continue;
            };
            let input: Vec<&str> = input.split_whitespace().collect();
            let want: Vec<&str> = want.split_whitespace().collect();
            match run(&name, &input, &want) {
                Ok(None) => {}
                Ok(Some(got)) => failures.push(format!("{name}:{}: {line}\n    got {got}", n + 1)),
                Err(e) => failures.push(format!("{name}:{}: {e}", n + 1)),
            }
        }
    }
    assert!(
        files.len() >= 5 && lines > 50,
        "expected the five tables, found {} files and {lines} lines",
        files.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Every state meets every event in `events.txt` (the table is complete).
#[test]
fn every_state_meets_every_event() {
    let text = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/direction/events.txt"),
    )
    .expect("events table");
    let covered: Vec<(String, String)> = text
        .lines()
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect();
    let mut missing = Vec::new();
    for flow in ["kernel", "reading", "blocked", "behind", "parked"] {
        for suffix in ["", "+fin", "+reset", "+fin+eof"] {
            for event in ["hangup", "reset", "peer-reset"] {
                let s = format!("{flow}{suffix}");
                if !covered.contains(&(s.clone(), event.to_string())) {
                    missing.push(format!("{s} {event}"));
                }
            }
        }
    }
    for s in ["shut:fin", "shut:reset", "dead"] {
        for event in ["hangup", "reset", "peer-reset"] {
            if !covered.contains(&(s.to_string(), event.to_string())) {
                missing.push(format!("{s} {event}"));
            }
        }
    }
    assert!(missing.is_empty(), "events.txt lacks: {missing:?}");
}
