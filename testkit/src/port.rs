//! Free loopback ports for the servers tests start.
//!
//! Not from the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768-60999 by
//! default): any outgoing connection on the host may take a port from there as its local
//! port between the moment a test picks it and the moment its server binds it, and a
//! PostgreSQL that cannot bind its port fails to start. Ports come from 61000-65535 instead,
//! above that range, each process starting at its own place in it.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

const FIRST: u32 = 61_000;
const COUNT: u32 = 65_536 - FIRST;

/// The next candidate of this process.
static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);

/// A TCP port on 127.0.0.1 that was free a moment ago, outside the ephemeral range. Another
/// test process could still take it before the caller binds it; callers that start servers
/// retry with a new port when that happens.
pub fn free_port() -> u16 {
    // Processes start at different places (by pid) so that they seldom try the same ports.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(2_654_435_761) % COUNT,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..COUNT {
        let port = FIRST + NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = u16::try_from(port).expect("ports stay below 65536");
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    // Every port above the ephemeral range is taken: let the kernel choose.
    let listener = TcpListener::bind("127.0.0.1:0").expect("cannot bind an ephemeral port");
    listener
        .local_addr()
        .expect("bound socket has an address")
        .port()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_bindable_distinct_and_above_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for p in ports {
            assert!(u32::from(p) >= FIRST, "{p}");
            TcpListener::bind(("127.0.0.1", p)).expect("free");
        }
    }
}
