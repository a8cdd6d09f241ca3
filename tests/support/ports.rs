//! Free loopback ports.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Returns a loopback TCP port that was free a moment ago and that this process never handed out
/// before.
///
/// The ports come from below the kernel's ephemeral range, never from it: there, a server a test
/// has killed leaves its port to the kernel, which may then hand it out as the source port of an
/// outgoing connection, so a client reconnecting to the dead server can connect to itself (TCP
/// simultaneous open) and read its own commands back as replies, or the port is taken when the
/// test starts the server again. Each process starts at an offset of its own and walks the range,
/// so parallel test binaries rarely collide; a server start still retries with another port,
/// because another process can take one meanwhile.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = range();
    let size = u32::from(high - low);
    let offset = std::process::id().wrapping_mul(7919) % size;
    loop {
        let step = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(step < size, "no free port left in {low}..{high}");
        let port = low + ((offset + step) % size) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// The ports to hand out: the 16384 below the start of the ephemeral range (32768 on Linux).
fn range() -> (u16, u16) {
    let start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = start.max(16384 + 1024);
    (high - 16384, high)
}
