//! `run --dry-run`: logs what it would delete, deletes nothing, never moves the real slot (it
//! reads from a temporary one), leaves the outbox and its reader lock alone, needs no Redis.

use std::time::Duration;

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Mode, Sidecar};
use crate::support::wait_until;

/// Waits until the log has a dry-run line naming `key`.
fn wait_logged(sidecar: &Sidecar, key: &str) {
    wait_until(
        Duration::from_secs(30),
        &format!("the dry run logs {key}"),
        || {
            sidecar.assert_alive();
            sidecar
                .log()
                .lines()
                .any(|l| l.contains("dry run: would delete") && l.contains(key))
        },
    );
}

/// The real slot's confirmed position.
fn confirmed(f: &Fixture) -> String {
    f.sql(&format!(
        "SELECT confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = '{}'",
        f.setup.slot
    ))
}

#[test]
fn dry_run_deletes_nothing_and_leaves_the_real_slot_where_it_was() {
    let f = Fixture::new(SCHEMA, RULES);
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let before = confirmed(&f);
    assert!(!before.is_empty(), "setup created no slot");

    let mut sidecar = f.setup.spawn_with(&["--dry-run"]);
    sidecar.wait_ready();
    let pid = sidecar.pid().expect("running");
    let temporary = format!("{}_dry_run_{pid}", f.setup.slot);
    assert_eq!(
        f.sql(&format!(
            "SELECT temporary FROM pg_replication_slots WHERE slot_name = '{temporary}'"
        )),
        "t"
    );
    let log = sidecar.log();
    assert!(
        log.contains("a temporary slot cannot see the past"),
        "{log}"
    );

    f.cache(&["item:1", "items:category:cars", "items:name:alpha:page1"]);
    f.sql("INSERT INTO items VALUES (1, 'alpha', 'cars', 10)");
    wait_logged(&sidecar, "item:1");
    let line = sidecar
        .log()
        .lines()
        .find(|l| l.contains("dry run: would delete") && l.contains("item:1"))
        .map(str::to_owned)
        .unwrap_or_default();
    for part in [
        "lsn=",
        "public.items",
        "items:category:cars",
        "items:name:alpha:*",
    ] {
        assert!(line.contains(part), "{part} missing from {line}");
    }
    f.assert_kept(&["item:1", "items:category:cars", "items:name:alpha:page1"]);
    // The real slot did not move, and nothing else read from it.
    assert_eq!(confirmed(&f), before);
    assert_eq!(sidecar.metric("invalidator_keys_deleted_total"), 0.0);

    let status = sidecar.terminate();
    assert!(status.success(), "{status:?}\n{}", sidecar.log());
    wait_until(
        Duration::from_secs(10),
        "the temporary slot is gone",
        || {
            f.sql(&format!(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{temporary}'"
            )) == "0"
        },
    );
    assert_eq!(confirmed(&f), before);
}

/// Notify mode: the dry run reads new outbox rows but deletes none of them, takes no reader
/// lock (a real reader could start beside it), and works with Redis down.
#[test]
fn dry_run_in_notify_mode_leaves_the_outbox_and_needs_no_redis() {
    let f = Fixture::with_mode(SCHEMA, RULES, Mode::Notify);
    f.redis.kill();
    let sidecar = f.setup.spawn_with(&["--dry-run"]);
    sidecar.wait_ready();
    f.sql("INSERT INTO plain VALUES (1, 'ann')");
    wait_logged(&sidecar, "owner:ann");
    assert_eq!(f.sql("SELECT count(*) FROM invalidator.outbox"), "1");
    assert_eq!(
        f.sql(&format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND d.datname = '{}'",
            f.db
        )),
        "0",
        "the dry run took the reader lock"
    );
    // It never tried Redis.
    assert!(
        !sidecar.log().contains("redis unavailable"),
        "{}",
        sidecar.log()
    );
}
