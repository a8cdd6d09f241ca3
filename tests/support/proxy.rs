//! A TCP proxy that can cut connections, to simulate outages and hung servers.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

/// What the proxy does with connections while it is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CutMode {
    /// Close every new connection at once, as a server that is down (the client sees EOF).
    Refuse,
    /// Accept new connections and never forward a byte, as a hung server or a dropped network
    /// (the client sees a timeout).
    Blackhole,
}

/// A forwarder from a free loopback port to `127.0.0.1:<target>`, running on its own threads so
/// it works from sync and async tests alike; dropping it closes everything.
pub struct TcpProxy {
    /// The port clients connect to.
    port: u16,
    /// State shared with the accept and copy threads.
    shared: Arc<Shared>,
    /// The accept loop, joined on drop.
    accept: Option<JoinHandle<()>>,
}

/// State shared by the proxy's threads.
struct Shared {
    /// The port on 127.0.0.1 that connections are forwarded to.
    target: u16,
    /// What the proxy does now, and the connections it holds.
    state: Mutex<State>,
}

/// The mutable part of [`Shared`].
#[derive(Default)]
struct State {
    /// `None` while forwarding, else how new connections are treated.
    cut: Option<CutMode>,
    /// Forwarded connections by id: the client side and the server side.
    links: HashMap<u64, (TcpStream, TcpStream)>,
    /// Connections accepted while blackholed, held open until `restore`.
    held: Vec<TcpStream>,
    /// The id of the next forwarded connection.
    next_id: u64,
    /// Set on drop so the accept loop ends.
    stopping: bool,
}

impl TcpProxy {
    /// Starts a proxy that forwards to `127.0.0.1:target`.
    pub fn start(target: u16) -> TcpProxy {
        let listener = TcpListener::bind(("127.0.0.1", 0)).expect("bind the proxy port");
        let port = listener
            .local_addr()
            .expect("read the proxy address")
            .port();
        let shared = Arc::new(Shared {
            target,
            state: Mutex::new(State::default()),
        });
        let accept = {
            let shared = Arc::clone(&shared);
            std::thread::spawn(move || shared.accept_loop(listener))
        };
        TcpProxy {
            port,
            shared,
            accept: Some(accept),
        }
    }

    /// The port clients connect to on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Drops every current connection, then treats new ones as `mode` says until `restore`.
    pub fn cut(&self, mode: CutMode) {
        let mut state = self.shared.lock();
        state.cut = Some(mode);
        for (_, (client, server)) in state.links.drain() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }

    /// Treats new connections as `mode` says until `restore`, leaving the current ones working:
    /// a server that still streams on its open sessions but takes no new one.
    pub fn cut_new(&self, mode: CutMode) {
        self.shared.lock().cut = Some(mode);
    }

    /// Forwards new connections again, closing those held while blackholed.
    pub fn restore(&self) {
        let mut state = self.shared.lock();
        state.cut = None;
        for held in state.held.drain(..) {
            let _ = held.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.cut(CutMode::Refuse);
        self.restore();
        self.shared.lock().stopping = true;
        // Wake the blocking accept so the loop sees `stopping`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(accept) = self.accept.take() {
            let _ = accept.join();
        }
    }
}

impl Shared {
    /// Locks the state, ignoring poisoning (a copy thread that panicked must not wedge the proxy).
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Accepts connections until the proxy is dropped.
    fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for incoming in listener.incoming() {
            let Ok(client) = incoming else { continue };
            let cut = {
                let state = self.lock();
                if state.stopping {
                    return;
                }
                state.cut
            };
            match cut {
                Some(CutMode::Refuse) => drop(client),
                Some(CutMode::Blackhole) => self.lock().held.push(client),
                None => self.forward(client),
            }
        }
    }

    /// Connects to the target and starts copying both ways.
    fn forward(self: &Arc<Self>, client: TcpStream) {
        let Ok(server) = TcpStream::connect(("127.0.0.1", self.target)) else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let (Ok(client_copy), Ok(server_copy)) = (client.try_clone(), server.try_clone()) else {
            return;
        };
        let id = {
            let mut state = self.lock();
            // A cut that came while we connected must not miss this connection.
            if state.cut.is_some() {
                return;
            }
            let id = state.next_id;
            state.next_id += 1;
            state.links.insert(id, (client_copy, server_copy));
            id
        };
        for (from, to) in [(&client, &server), (&server, &client)] {
            let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                self.close(id);
                return;
            };
            let shared = Arc::clone(self);
            std::thread::spawn(move || {
                pump(from, to);
                shared.close(id);
            });
        }
    }

    /// Shuts down both sides of link `id` (either direction ending ends the connection).
    fn close(&self, id: u64) {
        if let Some((client, server)) = self.lock().links.remove(&id) {
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
        }
    }
}

/// Copies bytes from `from` to `to` until either side ends or fails.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}
