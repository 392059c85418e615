//! The client-socket path's maps when a new connection reuses the four addresses of one the
//! proxy has not cleaned up after yet (a port reused out of TIME_WAIT, or at once when the
//! kernel's TIME_WAIT table is full): real sockets, the programs loaded in the kernel, as root.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use socket2::{Domain, SockRef, Socket, Type};

use tendril_ebpf::client_socket::{ClientKey, ClientSocket, RouteRequest};

/// A connection to `to` from 127.0.0.1:`port`.
fn connect_from(port: u16, to: SocketAddr) -> TcpStream {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    socket.connect(&to.into()).unwrap();
    socket.into()
}

/// Closes with a reset: no TIME_WAIT, so the same four addresses can connect again at once.
fn reset(stream: TcpStream) {
    SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(stream);
}

struct Connection {
    client: TcpStream,
    accepted: TcpStream,
    server: TcpStream,
    _backend: TcpStream,
    request: RouteRequest,
}

/// A client connected to `proxy` from `client_port`, and the proxy's connection to `backend`
/// from `server_port`, as the proxy sees them when it routes.
fn connection(
    local: &ClientSocket,
    proxy: &TcpListener,
    backend: &TcpListener,
    client_port: u16,
    server_port: u16,
) -> Connection {
    let client = connect_from(client_port, proxy.local_addr().unwrap());
    let (accepted, _) = proxy.accept().unwrap();
    let server = connect_from(server_port, backend.local_addr().unwrap());
    let (backend_side, _) = backend.accept().unwrap();
    let key = ClientKey::of_accepted(accepted.as_raw_fd()).unwrap();
    let cookie = local
        .client_cookie(&key)
        .expect("the sockops program notes a client of the listening port");
    let request = RouteRequest {
        key,
        client: cookie,
        backend: ClientKey::of_connected(server.as_raw_fd()).unwrap(),
        accepted: accepted.as_raw_fd(),
        server: server.as_raw_fd(),
        from_client: 0,
        to_server: 0,
    };
    Connection {
        client,
        accepted,
        server,
        _backend: backend_side,
        request,
    }
}

#[test]
fn a_connection_reusing_the_addresses_of_one_not_yet_cleaned_up_is_routed_and_kept() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "SKIPPED: loading the client-socket programs needs root (CAP_BPF, CAP_NET_ADMIN)"
        );
        return;
    }
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let backend = TcpListener::bind("127.0.0.1:0").unwrap();
    let local = ClientSocket::load(proxy.local_addr().unwrap(), None, 1024, 1 << 20, 1 << 20)
        .expect("the client-socket programs load on this machine");
    // Two free ports for the fixed client and server ends.
    let client_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();

    let old = connection(&local, &proxy, &backend, client_port, server_port);
    let old_server = local.route(&old.request).unwrap();
    assert_eq!(local.entries().routes, 1);
    // The old connection ends; the proxy has not cleaned up after it yet.
    let old_request = old.request;
    reset(old.client);
    reset(old.server);
    drop(old.accepted);

    let new = connection(&local, &proxy, &backend, client_port, server_port);
    assert_eq!(
        new.request.key, old_request.key,
        "the same client addresses"
    );
    assert_eq!(
        new.request.backend, old_request.backend,
        "the same addresses towards the backend"
    );
    let new_server = local
        .route(&new.request)
        .expect("the old connection's entries are stale: the new route replaces them");
    assert_ne!(new_server, old_server);
    assert_eq!(local.entries().routes, 1);

    // The old connection's clean-up comes late: it leaves the new route alone.
    local.forget(&old_request.key, &old_request.backend, old_server);
    assert_eq!(
        local.entries().routes,
        1,
        "the new connection's route survives the old one's clean-up"
    );
    assert_eq!(local.entries().servers, 1);

    local.forget(&new.request.key, &new.request.backend, new_server);
    let left = local.entries();
    assert_eq!((left.routes, left.servers, left.replies), (0, 0, 0));
    drop(new);
}
