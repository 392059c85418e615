//! The taking side of a handover (see `handover` for the exchange): loading the kernel
//! programs with the old process's maps when it runs the same ones, telling it to stop
//! accepting once the routing table is read, then adopting the connections it sends.

use std::sync::Arc;
use std::time::Duration;

use tendril_ebpf::Inherited;
use tendril_ebpf::client_socket::ClientSocket;
use tendril_ebpf::sockmap::Sockmap;

use crate::config::{self, ProxyConfig};
use crate::shared::Shared;
use crate::{ProxyError, handover, kernel, routing};
use std::net::SocketAddr;

/// Once the routing table is read, tells the proxy whose sockets this one took to stop
/// accepting: from then on the sockets are this process's alone. With `adopting` (this
/// process loaded with the old one's kernel maps), the old process's connections
/// then come over and this thread hands them to the kernel path.
pub(crate) fn tell_when_routing(
    taken: handover::Taken,
    adopting: Option<(std::sync::Weak<kernel::KernelPath>, kernel::Adopts)>,
    shared: Arc<Shared>,
) -> Result<(), ProxyError> {
    std::thread::Builder::new()
        .name("takeover".into())
        .spawn(move || {
            while matches!(
                shared.table.load().backend,
                Err(routing::NoBackend::Starting)
            ) {
                if shared.draining() {
                    return;
                }
                if !shared.alone() && taken.old_gone() {
                    // Killed mid-handover: clients in the queues would wait for nobody.
                    // Accept them and hold them, as a proxy that just started does.
                    tracing::warn!(
                        "the old proxy ended before this one could route: accepting now"
                    );
                    shared.set_alone();
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            let incoming = match taken.ready(adopting.as_ref().map(|(_, a)| *a)) {
                Ok(incoming) => {
                    tracing::info!("took over: the old proxy stopped accepting and drains");
                    incoming
                }
                Err(e) => {
                    // It exited or hangs: the sockets are this process's anyway.
                    tracing::warn!(error = %e, "the old proxy did not confirm it stopped accepting");
                    None
                }
            };
            shared.set_alone();
            shared.own_listeners();
            // Under systemd (NotifyAccess=all) this process becomes the service's main one.
            tendril_daemon::notify(&format!("MAINPID={}\nREADY=1", std::process::id()));
            if let (Some(incoming), Some((kernel, _))) = (incoming, adopting) {
                adopt_connections(incoming, &kernel);
            }
        })
        .map(drop)
        .map_err(|e| ProxyError::Other(format!("spawn takeover thread: {e}")))
}

/// Takes the connections the old process sends (see `handover`) until it closes the stream
/// (it exits once it has none left). A draining process still takes them: the process that
/// took over from it, if any, gets them next, and otherwise they drain here as they would
/// have there.
fn adopt_connections(
    mut incoming: handover::Incoming,
    kernel: &std::sync::Weak<kernel::KernelPath>,
) {
    let _ = incoming.set_timeout(None);
    let (mut adopted, mut refused) = (0u64, 0u64);
    loop {
        let (line, fds) = match incoming.next_line() {
            Ok(Some(next)) => next,
            Ok(None) => break,
            // A signal handled on this thread.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!(error = %e, "the handover of connections broke off");
                break;
            }
        };
        let result = match kernel.upgrade() {
            Some(path) => path.adopt_moved(&line, fds),
            None => Err("this proxy is stopping".into()),
        };
        let word = match result {
            Ok(()) => {
                adopted += 1;
                handover::ADOPTED
            }
            Err(why) => {
                refused += 1;
                tracing::warn!(reason = %why, "refused a connection from the old proxy: it stays there");
                handover::REFUSED
            }
        };
        if let Err(e) = incoming.answer(word) {
            tracing::warn!(error = %e, "cannot answer the old proxy");
            break;
        }
        if adopted.is_power_of_two() && word == handover::ADOPTED {
            tracing::info!(
                adopted,
                "adopted kernel-forwarded connections from the old proxy"
            );
        }
    }
    tracing::info!(
        adopted,
        refused,
        "the old proxy's connections: handover over"
    );
    // The old process is gone or going: what it held and never forgot (killed with
    // connections) would stay in the shared maps for good.
    if let Some(path) = kernel.upgrade() {
        path.control().sweep();
    }
}

/// The kernel programs a proxy loaded, and which of them on the maps of the process it took
/// over from.
#[derive(Default)]
pub(crate) struct Programs {
    pub pair: Option<Sockmap>,
    pub client_socket: Option<ClientSocket>,
    pub adopts: kernel::Adopts,
}

/// Map names in the handover: each object's prefix and its maps' names.
const PAIR: &str = "pair/";
const CLIENT_SOCKET: &str = "client_socket/";

/// One word for the programs a proxy runs (or would run), from each loaded object's
/// fingerprint: a taker shares the maps only when it loads exactly the same objects. Hashed
/// again to 16 hex digits, which keeps the `listeners` line short for takers older than
/// the kernel handover (they read 128 bytes of it).
fn fingerprint(pair: Option<String>, client_socket: Option<String>) -> Option<String> {
    let parts: Vec<String> = [(PAIR, pair), (CLIENT_SOCKET, client_socket)]
        .into_iter()
        .filter_map(|(prefix, fp)| Some(format!("{prefix}{}", fp?)))
        .collect();
    (!parts.is_empty()).then(|| tendril_ebpf::fingerprint(&[parts.join("+").as_bytes()]))
}

/// What this running proxy offers a taker: its programs' fingerprint and maps.
pub(crate) fn share(k: &kernel::KernelPath) -> Option<handover::KernelShare> {
    let pair = k.pair_map();
    let cs = k.client_socket();
    let fingerprint = fingerprint(
        pair.map(|m| m.fingerprint()),
        cs.map(|c| c.fingerprint().to_owned()),
    )?;
    let prefixed = |prefix: &str, maps: Vec<(String, std::os::fd::RawFd)>| {
        maps.into_iter()
            .map(|(name, fd)| (format!("{prefix}{name}"), fd))
            .collect::<Vec<_>>()
    };
    let mut maps = pair.map(|m| prefixed(PAIR, m.maps())).unwrap_or_default();
    maps.extend(
        cs.map(|c| prefixed(CLIENT_SOCKET, c.maps()))
            .unwrap_or_default(),
    );
    Some(handover::KernelShare {
        fingerprint,
        maps,
        control: k.control(),
    })
}

/// The old process's maps, per object, when it runs exactly the programs this one will
/// (`mine`, hashed only then): its connections can then move here (see `handover`).
fn inherit(
    taken: Option<&mut handover::Taken>,
    mine: impl FnOnce() -> Option<String>,
) -> (Option<Inherited>, Option<Inherited>) {
    let Some(taken) = taken else {
        return (None, None);
    };
    let (Some(theirs), Some(mine)) = (taken.kernel.clone(), mine()) else {
        return (None, None);
    };
    if theirs != mine {
        tracing::info!(%theirs, %mine, "the old proxy runs other kernel programs or settings: its kernel-forwarded connections drain there");
        return (None, None);
    }
    match taken.inherit() {
        Ok(all) => {
            let (mut pair, mut cs) = (Inherited::default(), Inherited::default());
            for (name, fd) in all.maps {
                if let Some(n) = name.strip_prefix(PAIR) {
                    pair.maps.push((n.to_owned(), fd));
                } else if let Some(n) = name.strip_prefix(CLIENT_SOCKET) {
                    cs.maps.push((n.to_owned(), fd));
                }
            }
            let some = |i: Inherited| (!i.maps.is_empty()).then_some(i);
            (some(pair), some(cs))
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot get the old proxy's maps: its kernel-forwarded connections drain there");
            (None, None)
        }
    }
}

/// Loads the kernel programs the configuration selects (none for userspace forwarding), on
/// the maps of the process this one takes over from when it runs the same ones.
pub(crate) fn load_programs(
    config: &ProxyConfig,
    listen: SocketAddr,
    read_only_listen: Option<SocketAddr>,
    taken: Option<&mut handover::Taken>,
) -> Result<Programs, ProxyError> {
    let (required, pair) = match config.forwarding.path(config.kernel_client_socket) {
        config::ForwardPath::Userspace(why) => {
            tracing::info!(reason = why, "forwarding in userspace");
            return Ok(Programs::default());
        }
        config::ForwardPath::Kernel { required, pair } => (required, pair),
    };
    // The read-only listener's clients on this host take the path too when it shares the
    // listen address's IP (the program matches one address).
    let read_only_port = read_only_listen
        .filter(|ro| ro.ip() == listen.ip())
        .map(|ro| ro.port());
    let (max, limit) = (config.kernel_max_connections, config.kernel_buffer_limit);
    // Hashed only when an old process offers its maps (the objects are large).
    let mine = || {
        fingerprint(
            pair.then(|| tendril_ebpf::sockmap::fingerprint(max)),
            config.kernel_client_socket.then(|| {
                tendril_ebpf::client_socket::fingerprint(listen, read_only_port, max, limit, limit)
            }),
        )
    };
    let (pair_inherited, cs_inherited) = inherit(taken, mine);
    let mut adopts = kernel::Adopts::default();
    // Under `auto` the pair path is not selectable: its programs stay unloaded.
    let pair_map = if pair {
        let loaded = match &pair_inherited {
            Some(inherited) => match Sockmap::load_with(max, Some(inherited)) {
                Ok(map) => {
                    tracing::info!("pair path on the old proxy's maps: its connections come over");
                    adopts.pair = true;
                    Ok(map)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot load the pair path with the old proxy's maps: its pair-path connections drain there");
                    Sockmap::load(max)
                }
            },
            None => Sockmap::load(max),
        };
        match loaded {
            Ok(map) => Some(map),
            Err(e) if required => {
                return Err(ProxyError::Other(format!(
                    "--forwarding kernel: {e}; use --forwarding auto or userspace"
                )));
            }
            Err(e) => {
                tracing::info!(reason = %e, "forwarding in userspace: the kernel programs cannot load");
                None
            }
        }
    } else {
        None
    };
    let client_socket = if config.kernel_client_socket {
        if read_only_listen.is_some() && read_only_port.is_none() {
            tracing::info!(
                "the read-only listener has another IP than the listen address: its clients on this host are forwarded on the pair path or in userspace"
            );
        }
        load_client_socket(
            (listen, read_only_port),
            (max, limit),
            pair_map.is_some(),
            cs_inherited.as_ref(),
            &mut adopts,
        )
    } else {
        None
    };
    Ok(Programs {
        pair: pair_map,
        client_socket,
        adopts,
    })
}

/// Loads the client-socket programs for clients of `listen` (and of the read-only
/// listener's port on the same IP) on this host, on `inherited` maps when given; `None`,
/// logged, when they cannot load (then such clients take the pair path when `pair`, else
/// userspace).
fn load_client_socket(
    (listen, read_only_port): (SocketAddr, Option<u16>),
    (max, limit): (u32, u64),
    pair: bool,
    inherited: Option<&Inherited>,
    adopts: &mut kernel::Adopts,
) -> Option<ClientSocket> {
    if let Some(inherited) = inherited {
        match ClientSocket::load_with(listen, read_only_port, max, limit, limit, Some(inherited)) {
            Ok(cs) => {
                tracing::info!(
                    "kernel forwarding on the client's own socket, on the old proxy's maps: its connections come over"
                );
                adopts.client_socket = true;
                return Some(cs);
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot load with the old proxy's maps: its kernel-forwarded connections drain there");
            }
        }
    }
    match ClientSocket::load(listen, read_only_port, max, limit, limit) {
        Ok(cs) => {
            tracing::info!("kernel forwarding on the client's own socket for clients on this host");
            Some(cs)
        }
        Err(e) if pair => {
            tracing::warn!(error = %e, "client-socket forwarding unavailable: every connection on the proxy's two sockets");
            None
        }
        Err(e) => {
            tracing::info!(reason = %e, "forwarding in userspace: the client-socket programs cannot load");
            None
        }
    }
}
