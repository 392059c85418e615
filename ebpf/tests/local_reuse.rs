//! The client-socket path's maps when a new connection reuses the four addresses of one the
//! proxy has not cleaned up after yet (a port reused out of TIME_WAIT, or at once when the
//! kernel's TIME_WAIT table is full): real sockets, the programs loaded in the kernel, as root.

#![allow(clippy::unwrap_used, reason = "a test: a failed step panics")]

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd};

use tendril_ebpf::local::{ClientKey, Local, RouteRequest};

/// A connection to `to` from 127.0.0.1:`port` (0: any port).
fn connect_from(port: u16, to: SocketAddr) -> TcpStream {
    // SAFETY: plain socket calls on a descriptor this function owns until it is wrapped.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let stream = TcpStream::from_raw_fd(fd);
        let local = sockaddr(SocketAddr::from(([127, 0, 0, 1], port)));
        let rc = libc::bind(
            fd,
            (&local as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "bind :{port}: {}", std::io::Error::last_os_error());
        let remote = sockaddr(to);
        let rc = libc::connect(
            fd,
            (&remote as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(rc, 0, "connect {to}: {}", std::io::Error::last_os_error());
        stream
    }
}

fn sockaddr(addr: SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = addr else {
        panic!("IPv4 only here")
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// Closes with a reset: no TIME_WAIT, so the same four addresses can connect again at once.
fn reset(stream: TcpStream) {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a live descriptor with a correctly sized value.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
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
    local: &Local,
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
    let local = Local::load(proxy.local_addr().unwrap(), 1024, 1 << 20, 1 << 20)
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
