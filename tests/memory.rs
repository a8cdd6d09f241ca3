//! Memory stays bounded for a huge transaction (issue 3, item 8): past
//! `pipeline.max_transaction_keys` distinct keys, the transaction's keys give way to the patterns
//! of its tables' rules. Each test runs the real sidecar against one `INSERT ... SELECT
//! generate_series` transaction and prints the sidecar's peak RSS (`VmHWM`); the bound asserted is
//! a safety net, not a performance figure. `scripts/bench-memory.sh` measures 1M rows with the
//! release binary.

use std::time::{Duration, Instant};

use crate::sidecar::{Fixture, Setup};
use crate::support::wait_until;

/// Rows in the transaction: enough for 400k distinct keys, quick in a debug build.
const ROWS: u64 = 200_000;

/// Two keys per row.
const RULES: &str = r#"
[[rule]]
table = "items"
keys = ["item:{id}", "item:{id}:detail"]
"#;

const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v int NOT NULL);";

/// A safety net against unbounded growth, far above what either run needs.
const PEAK_RSS_LIMIT_KIB: u64 = 512 * 1024;

/// What one run measured.
struct Measured {
    /// The sidecar's peak resident set size, in KiB.
    peak_kib: u64,
    /// `invalidator_transaction_fallbacks_total` after the transaction.
    fallbacks: f64,
    /// The sidecar's log.
    log: String,
    /// The fixture, to look at Redis afterwards.
    fixture: Fixture,
}

/// Sets `pipeline.max_transaction_keys` in the configuration file.
pub fn limit_transaction_keys(setup: &Setup, max: u64) {
    let path = setup.config();
    let text = std::fs::read_to_string(&path).expect("read config");
    assert!(text.contains("[pipeline]\n"), "{text}");
    let text = text.replacen(
        "[pipeline]\n",
        &format!("[pipeline]\nmax_transaction_keys = {max}\n"),
        1,
    );
    std::fs::write(&path, text).expect("write config");
}

/// The peak resident set size of process `pid`, in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

/// Runs the sidecar with `max_transaction_keys` (`None`: the default), inserts `ROWS` rows in
/// one transaction, waits until the slot has confirmed it, and measures.
fn insert_rows_in_one_transaction(max_transaction_keys: Option<u64>) -> Measured {
    let f = Fixture::new(SCHEMA, RULES);
    if let Some(max) = max_transaction_keys {
        limit_transaction_keys(&f.setup, max);
    }
    let sidecar = f.setup.start();
    let last = format!("item:{ROWS}:detail");
    // Keys of the first and last rows, a key of the rules that no row names, and another.
    f.cache(&["item:1", &last, "item:0", "other:1"]);
    let started = Instant::now();
    f.sql(&format!(
        "INSERT INTO items SELECT i, 0 FROM generate_series(1, {ROWS}) i"
    ));
    let after_commit = f.sql("SELECT pg_current_wal_lsn()").trim().to_owned();
    let confirmed = format!(
        "SELECT confirmed_flush_lsn >= '{after_commit}' FROM pg_replication_slots \
         WHERE slot_name = '{}'",
        f.setup.slot
    );
    wait_until(
        Duration::from_secs(300),
        "the slot's confirmed LSN passes the commit",
        || {
            sidecar.assert_alive();
            f.sql(&confirmed).trim() == "t"
        },
    );
    let seconds = started.elapsed().as_secs_f64();
    let pid = sidecar.pid().expect("running");
    let peak_kib = peak_rss_kib(pid);
    let fallbacks = sidecar.metric("invalidator_transaction_fallbacks_total");
    eprintln!(
        "memory: {ROWS} rows in one transaction ({} keys), max_transaction_keys = \
         {}: peak RSS {:.1} MiB (VmHWM of the debug binary), fallbacks \
         {fallbacks}, commit to confirmed {seconds:.1} s",
        2 * ROWS,
        max_transaction_keys.map_or("default".to_owned(), |m| m.to_string()),
        peak_kib as f64 / 1024.0
    );
    // Confirmed means deleted: nothing a row names survives.
    for key in ["item:1", last.as_str()] {
        assert!(!f.redis.exists(key), "{key} survived the transaction");
    }
    f.assert_kept(&["other:1"]);
    let log = sidecar.log();
    drop(sidecar);
    Measured {
        peak_kib,
        fallbacks,
        log,
        fixture: f,
    }
}

#[test]
fn a_transaction_past_the_key_limit_falls_back_to_patterns_with_bounded_memory() {
    let m = insert_rows_in_one_transaction(None);
    assert_eq!(m.fallbacks, 1.0);
    // Logged once, with the table and the counts.
    let warnings: Vec<&str> = m
        .log
        .lines()
        .filter(|l| l.contains("exceeded pipeline.max_transaction_keys"))
        .collect();
    assert_eq!(warnings.len(), 1, "{}", m.log);
    assert!(
        warnings[0].contains("WARN") && warnings[0].contains("tables=public.items"),
        "{}",
        warnings[0]
    );
    // The fallback pattern `item:*` also takes keys that no row named.
    assert!(!m.fixture.redis.exists("item:0"));
    assert!(
        m.peak_kib < PEAK_RSS_LIMIT_KIB,
        "peak RSS {} KiB",
        m.peak_kib
    );
}

#[test]
fn a_transaction_within_the_key_limit_deletes_exactly_its_keys() {
    let m = insert_rows_in_one_transaction(Some(10_000_000));
    assert_eq!(m.fallbacks, 0.0);
    m.fixture.assert_kept(&["item:0"]);
    assert!(
        m.peak_kib < PEAK_RSS_LIMIT_KIB,
        "peak RSS {} KiB",
        m.peak_kib
    );
}
