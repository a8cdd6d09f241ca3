//! The test harness: private PostgreSQL clusters and Redis servers that tests own, so they can kill
//! and restart them, a TCP proxy that cuts or blackholes connections, and waiting helpers.
//!
//! Servers live in temporary directories and listen on free loopback ports. Each one is shadowed by
//! a watchdog shell process that stops it and removes its directory once the test binary exits, so
//! a crashed or killed test run leaves nothing behind, including the process-wide `shared()` ones
//! (statics are never dropped).

// Each test module uses a different part of this toolkit; what one binary leaves unused is not dead.
#![allow(dead_code, unused_imports)]

mod pg_install;
mod pgbouncer;
mod ports;
mod postgres;
mod proxy;
mod random;
mod redis;
mod tls;
mod wait;
mod watchdog;

pub use self::pgbouncer::PgBouncer;
pub use self::ports::free_port;
pub use self::postgres::{PgCluster, PsqlSession, StopMode};
pub use self::proxy::{CutMode, TcpProxy};
pub use self::random::Random;
pub use self::redis::{RedisCluster, RedisServer};
pub use self::tls::{make_certificates, make_client_certificate};
pub use self::wait::{wait_for, wait_until};
pub use self::watchdog::Watchdog;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Counts names and directories handed out by this process, so no two are ever equal.
static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Returns a name that is unique in this test run and valid as a Postgres identifier, a
/// replication slot name and a Redis key prefix: `prefix` lowercased (other characters become
/// `_`), then the process id and a counter.
pub fn unique_name(prefix: &str) -> String {
    let clean: String = prefix
        .chars()
        .take(40)
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '_') => c,
            _ => '_',
        })
        .collect();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{clean}_{}_{n}", std::process::id())
}

/// Creates a fresh empty directory under the system temp dir and returns its path.
pub(crate) fn scratch_dir(kind: &str) -> PathBuf {
    loop {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "invalidator-{kind}-{}-{n}-{nanos}",
            std::process::id()
        ));
        match std::fs::create_dir(&dir) {
            Ok(()) => return dir,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("cannot create {}: {e}", dir.display()),
        }
    }
}

/// Quotes `text` for `sh` with single quotes, so paths can be put into watchdog scripts.
pub(crate) fn sh_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}
