//! Free loopback ports.

use std::net::TcpListener;

/// A TCP port on 127.0.0.1 that was free a moment ago. Another process could take it before
/// the caller binds it; callers that start servers retry with a new port when that happens.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind an ephemeral port");
    listener
        .local_addr()
        .expect("bound socket has an address")
        .port()
}
