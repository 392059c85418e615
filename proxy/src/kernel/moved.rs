//! A kernel-forwarded connection on its way from a proxy that hands over to the proxy that
//! took over from it (a node rollout): what the new process needs besides the two sockets
//! to go on stepping it where the old one stopped, as one line of the handover socket (the
//! sockets ride along as `SCM_RIGHTS`). Both processes' programs work on the same maps (the
//! new one loaded with the old one's, see `tendril_ebpf::Inherited`), so the kernel's state
//! stays where it is: only the thread's own record moves.
//!
//! Only a connection at rest moves (the thread's `moving`): both directions forwarded by the
//! kernel, nothing held or waited for by the thread, no end seen. The record is then how the
//! kernel forwards it (the client-socket route, or the pair's two cookies), the counts the
//! programs compare against (what the thread wrote each way), and what the fence and the
//! metrics need.

use std::net::SocketAddr;

use tendril_ebpf::client_socket::ClientKey;

use tendril_ebpf::sockmap::Joined;

use super::Kind;
use super::client_socket::ClientRoute;
use crate::routing::{Backend, Role};

/// The line's first words.
const HEAD: &str = "conn v1";

/// A connection's record (see the module's documentation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Moved {
    pub peer: SocketAddr,
    pub backend: Backend,
    pub kind: Kind,
    pub base_recv: [u64; 2],
    /// What the thread wrote each way (`Direction::forwarded`).
    pub forwarded: [u64; 2],
}

/// Why a line is not a connection's record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("not a connection record ({0}): {1:?}")]
pub(super) struct BadRecord(&'static str, String);

impl Moved {
    /// The line (without its newline); `None` when the backend's uid cannot be one word
    /// (the connection then stays with the old process, which drains it).
    pub fn encode(&self) -> Option<String> {
        let uid = &self.backend.db_uid;
        if uid.is_empty() || uid.contains(char::is_whitespace) {
            return None;
        }
        let role = match self.backend.role {
            Role::Master => "master",
            Role::Standby => "standby",
        };
        let how = match self.kind {
            Kind::ClientSocket(r) => format!(
                "client_socket {} {} {} {} {} {}",
                key(&r.key),
                r.server,
                r.client,
                key(&r.backend),
                r.from_client,
                r.to_server,
            ),
            Kind::Pair(j) => format!("pair {} {}", j.client, j.server),
        };
        Some(format!(
            "{HEAD} {} {} {role} {uid} {how} {} {} {} {}",
            self.peer,
            self.backend.addr,
            self.base_recv[0],
            self.base_recv[1],
            self.forwarded[0],
            self.forwarded[1],
        ))
    }

    /// Reads a line [`Moved::encode`] wrote.
    pub fn decode(line: &str) -> Result<Moved, BadRecord> {
        let bad = |why| BadRecord(why, line.chars().take(200).collect());
        let rest = line.strip_prefix(HEAD).ok_or_else(|| bad("head"))?;
        let words: Vec<&str> = rest.split_whitespace().collect();
        let [peer, addr, role, uid, how @ .., b0, b1, f0, f1] = words.as_slice() else {
            return Err(bad("word count"));
        };
        let addr_of = |w: &str| w.parse::<SocketAddr>().map_err(|_| bad("address"));
        let num = |w: &str| w.parse::<u64>().map_err(|_| bad("number"));
        let key_of = |n: &str, c: &str, p: &str| -> Result<ClientKey, BadRecord> {
            Ok(ClientKey {
                netns: num(n)?,
                client: addr_of(c)?,
                proxy: addr_of(p)?,
            })
        };
        let role = match *role {
            "master" => Role::Master,
            "standby" => Role::Standby,
            _ => return Err(bad("role")),
        };
        let kind = match how {
            [
                "client_socket",
                kn,
                kc,
                kp,
                server,
                client,
                bn,
                bc,
                bp,
                from,
                to,
            ] => Kind::ClientSocket(ClientRoute {
                key: key_of(kn, kc, kp)?,
                server: num(server)?,
                client: num(client)?,
                backend: key_of(bn, bc, bp)?,
                from_client: num(from)?,
                to_server: num(to)?,
            }),
            ["pair", client, server] => Kind::Pair(Joined {
                client: num(client)?,
                server: num(server)?,
            }),
            [kind, ..] if !matches!(*kind, "client_socket" | "pair") => {
                return Err(bad("path"));
            }
            _ => return Err(bad("word count")),
        };
        Ok(Moved {
            peer: addr_of(peer)?,
            backend: Backend {
                db_uid: (*uid).to_owned(),
                addr: addr_of(addr)?,
                role,
            },
            kind,
            base_recv: [num(b0)?, num(b1)?],
            forwarded: [num(f0)?, num(f1)?],
        })
    }
}

fn key(k: &ClientKey) -> String {
    format!("{} {} {}", k.netns, k.client, k.proxy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Moved {
        let key = |c: &str, p: &str| ClientKey {
            netns: 4026531840,
            client: c.parse().unwrap_or_else(|e| panic!("{c}: {e}")),
            proxy: p.parse().unwrap_or_else(|e| panic!("{p}: {e}")),
        };
        Moved {
            peer: "127.0.0.1:40000".parse().unwrap_or_else(|e| panic!("{e}")),
            backend: Backend {
                db_uid: "a1b2c3".into(),
                addr: "[::1]:5432".parse().unwrap_or_else(|e| panic!("{e}")),
                role: Role::Standby,
            },
            kind: Kind::ClientSocket(ClientRoute {
                key: key("127.0.0.1:40000", "127.0.0.1:25432"),
                server: u64::MAX,
                client: 7,
                backend: key("[::1]:41000", "[::1]:5432"),
                from_client: 93,
                to_server: 93,
            }),
            base_recv: [93, 0],
            forwarded: [12, 1 << 40],
        }
    }

    #[test]
    fn a_record_reads_back_as_written() {
        let mut m = sample();
        for kind in [
            m.kind,
            Kind::Pair(Joined {
                client: 3,
                server: u64::MAX,
            }),
        ] {
            m.kind = kind;
            let line = m.encode().unwrap_or_else(|| panic!("not encodable"));
            assert_eq!(Moved::decode(&line), Ok(m.clone()), "{line}");
        }
    }

    #[test]
    fn a_uid_that_is_not_one_word_keeps_the_connection() {
        let mut m = sample();
        m.backend.db_uid = "two words".into();
        assert_eq!(m.encode(), None);
        m.backend.db_uid = String::new();
        assert_eq!(m.encode(), None);
    }

    #[test]
    fn garbage_is_refused_with_its_reason() {
        let line = sample().encode().unwrap_or_default();
        for (bad, why) in [
            (String::new(), "head"),
            ("conn v2 1 2".to_owned(), "head"),
            (format!("{line} 5"), "word count"),
            (line.replacen("standby", "primary", 1), "role"),
            (line.replacen("127.0.0.1:40000", "nowhere", 1), "address"),
            (line.replacen("client_socket", "carrier_pigeon", 1), "path"),
            (line.replacen("client_socket", "pair", 1), "word count"),
            (line.replacen(" 93 ", " -1 ", 1), "number"),
            (
                line.rsplit_once(' ')
                    .map(|(h, _)| h.to_owned())
                    .unwrap_or_default(),
                "word count",
            ),
        ] {
            match Moved::decode(&bad) {
                Err(BadRecord(reason, _)) => assert_eq!(reason, why, "{bad:?}"),
                Ok(m) => panic!("{bad:?} read as {m:?}"),
            }
        }
    }
}
