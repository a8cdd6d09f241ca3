//! Free loopback ports.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::{Mutex, OnceLock, PoisonError};

/// Returns a loopback TCP port that was free a moment ago and that this process never handed out
/// before.
///
/// The kernel picks the port (bind to port 0), so parallel tests and test binaries rarely collide;
/// remembering what was handed out closes the window inside one process, where a port released by
/// one test could otherwise be given to the next one before the first server binds it. A server
/// start still retries with another port, because another process can take the port meanwhile.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(Default::default);
    loop {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind an ephemeral port");
        let port = listener
            .local_addr()
            .expect("read the bound address")
            .port();
        drop(listener);
        if handed_out
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(port)
        {
            return port;
        }
    }
}
