//! Which forwarding path a connection takes once the kernel path is on, and why: one pure
//! function over what is known of the connection, asked again after each failed attempt
//! (a refused route, a full map). Every choice is counted by its reason
//! (`tendril_proxy_kernel_path_total{path, reason}`). Where a connection goes when the
//! client-socket path cannot take it depends on the proxy's setting: the pair path with
//! `--forwarding kernel`, userspace with `auto` (see [`Reason::path`]).

/// A forwarding path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Routed on the client's own socket (a client on this host).
    ClientSocket,
    /// Both proxy sockets joined to the sockmap.
    Pair,
    /// Copied by the worker.
    Userspace,
}

impl Path {
    pub fn label(self) -> &'static str {
        match self {
            Path::ClientSocket => "client_socket",
            Path::Pair => "pair",
            Path::Userspace => "userspace",
        }
    }
}

/// Why a connection took its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The client is on this host and ready: the client-socket path.
    ClientOnHost,
    /// The client-socket programs are off (`--kernel-client-socket=false`) or did not load.
    ClientSocketOff,
    /// The client is not on this host, or in another network namespace.
    ClientElsewhere,
    /// The client sent nothing within the wait for its first bytes (where the program
    /// learns how it reads).
    ClientSilent,
    /// The server socket's addresses could not be read.
    ServerUnkeyed,
    /// The client reads in blocking mode (the client-socket path could wake it without data).
    ClientBlocks,
    /// The client-socket program refused the route.
    RouteRefused,
    /// The sockmap is full.
    MapFull,
    /// The kernel refused the pair (or a descriptor could not be duplicated).
    JoinRefused,
}

impl Reason {
    /// Every reason, in the metric's order.
    pub const ALL: [Reason; 9] = [
        Reason::ClientOnHost,
        Reason::ClientSocketOff,
        Reason::ClientElsewhere,
        Reason::ClientSilent,
        Reason::ServerUnkeyed,
        Reason::ClientBlocks,
        Reason::RouteRefused,
        Reason::MapFull,
        Reason::JoinRefused,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Reason::ClientOnHost => "client_on_host",
            Reason::ClientSocketOff => "client_socket_off",
            Reason::ClientElsewhere => "client_elsewhere",
            Reason::ClientSilent => "client_silent",
            Reason::ServerUnkeyed => "server_unkeyed",
            Reason::ClientBlocks => "client_blocks",
            Reason::RouteRefused => "route_refused",
            Reason::MapFull => "map_full",
            Reason::JoinRefused => "join_refused",
        }
    }

    /// The reason's index in [`Reason::ALL`].
    pub fn index(self) -> usize {
        Reason::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    /// The path a connection with this reason takes. `pair`: whether the pair path is
    /// selectable (`--forwarding kernel`); without it (`--forwarding auto`, where the
    /// default path is only one that passed the fault matrix and the soaks with the best
    /// figures: the client-socket path for clients on this host, userspace for the rest),
    /// what the client-socket path cannot take stays in userspace.
    pub fn path(self, pair: bool) -> Path {
        match self {
            Reason::ClientOnHost => Path::ClientSocket,
            Reason::MapFull | Reason::JoinRefused => Path::Userspace,
            _ if pair => Path::Pair,
            _ => Path::Userspace,
        }
    }
}

/// Why joining the pair failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JoinFailure {
    MapFull,
    Refused,
}

/// What is known of a connection when its path is chosen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Facts {
    /// The client-socket programs are loaded.
    pub programs: bool,
    /// The client's socket joined the client sockhash at connect (it is on this host, in
    /// the proxy's network namespace).
    pub on_host: bool,
    /// It sent nothing within the wait for its first bytes.
    pub silent: bool,
    /// The server socket's connection could be keyed as a backend on this host sees it.
    pub server_keyed: bool,
    /// The program saw the client send in blocking mode.
    pub blocks: bool,
    /// The client-socket route was tried and refused.
    pub route_refused: bool,
    /// Joining the pair was tried and failed.
    pub join: Option<JoinFailure>,
}

/// Why a connection takes its path ([`Reason::path`] says which). The client-socket path
/// only for a client on this host that is ready for it; else the pair path where it is
/// selectable; userspace when the pair cannot join.
pub fn choose(f: &Facts) -> Reason {
    match f.join {
        Some(JoinFailure::MapFull) => return Reason::MapFull,
        Some(JoinFailure::Refused) => return Reason::JoinRefused,
        None => {}
    }
    if !f.programs {
        Reason::ClientSocketOff
    } else if !f.on_host {
        Reason::ClientElsewhere
    } else if f.silent {
        Reason::ClientSilent
    } else if !f.server_keyed {
        Reason::ServerUnkeyed
    } else if f.blocks {
        Reason::ClientBlocks
    } else if f.route_refused {
        Reason::RouteRefused
    } else {
        Reason::ClientOnHost
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready() -> Facts {
        Facts {
            programs: true,
            on_host: true,
            server_keyed: true,
            ..Facts::default()
        }
    }

    #[test]
    fn a_ready_client_on_this_host_takes_the_client_socket_path() {
        assert_eq!(choose(&ready()), Reason::ClientOnHost);
        assert_eq!(Reason::ClientOnHost.path(true), Path::ClientSocket);
        assert_eq!(Reason::ClientOnHost.path(false), Path::ClientSocket);
    }

    #[test]
    fn each_missing_fact_gives_the_pair_path_or_userspace_with_its_reason() {
        let cases = [
            (
                Facts {
                    programs: false,
                    ..ready()
                },
                Reason::ClientSocketOff,
            ),
            (
                Facts {
                    on_host: false,
                    ..ready()
                },
                Reason::ClientElsewhere,
            ),
            (
                Facts {
                    silent: true,
                    ..ready()
                },
                Reason::ClientSilent,
            ),
            (
                Facts {
                    server_keyed: false,
                    ..ready()
                },
                Reason::ServerUnkeyed,
            ),
            (
                Facts {
                    blocks: true,
                    ..ready()
                },
                Reason::ClientBlocks,
            ),
            (
                Facts {
                    route_refused: true,
                    ..ready()
                },
                Reason::RouteRefused,
            ),
        ];
        for (facts, want) in cases {
            assert_eq!(choose(&facts), want, "{facts:?}");
            assert_eq!(want.path(true), Path::Pair, "--forwarding kernel");
            assert_eq!(want.path(false), Path::Userspace, "--forwarding auto");
        }
    }

    #[test]
    fn a_failed_join_leaves_userspace_whatever_else_holds() {
        for base in [ready(), Facts::default()] {
            let full = Facts {
                join: Some(JoinFailure::MapFull),
                ..base
            };
            assert_eq!(choose(&full), Reason::MapFull);
            let refused = Facts {
                join: Some(JoinFailure::Refused),
                route_refused: true,
                ..base
            };
            assert_eq!(choose(&refused), Reason::JoinRefused);
            for pair in [true, false] {
                assert_eq!(Reason::JoinRefused.path(pair), Path::Userspace);
                assert_eq!(Reason::MapFull.path(pair), Path::Userspace);
            }
        }
    }

    #[test]
    fn labels_are_distinct_and_indexed_in_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i);
        }
        let mut labels: Vec<_> = Reason::ALL.iter().map(|r| r.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), Reason::ALL.len());
    }
}
