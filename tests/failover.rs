//! A database failover: the primary stops, its physical standby is promoted, and the sidecar,
//! given both hosts (`target_session_attrs=read-write`), follows to the new primary by itself.
//!
//! With failover slots (PostgreSQL 17: the slot is created with `failover`, the standby runs
//! `sync_replication_slots` and the primary waits for it with `synchronized_standby_slots`) the
//! new primary holds the slot: streaming goes on from it, nothing is lost and nothing is
//! flushed. Without them (before 17, or a standby that does not synchronize slots) the slot is
//! missing there: the sidecar deletes every key the rules can produce before it streams from a
//! new slot, so nothing stale is left either.
//!
//! The commit made just before the failover is held back from Redis (`CLIENT PAUSE`) until the
//! standby is promoted: the sidecar has not acknowledged it when the primary stops, so only
//! the slot on the new primary (or the flush) can bring its invalidation.

use std::time::Duration;

use crate::sidecar::{Setup, Sidecar};
use crate::support::{PgCluster, RedisServer, StopMode, unique_name, wait_until};

/// One table.
const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v text);";

/// Every change of a row invalidates its one key.
const RULES: &str = "[[rule]]\nname = \"item\"\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

/// A key the rules can produce that no change touches: only a flush deletes it.
const UNTOUCHED: &str = "item:999";

/// How long any one condition may take to come true.
const DEADLINE: Duration = Duration::from_secs(60);

/// How long the standby may take to synchronize the slot: its worker sleeps up to 30 s between
/// rounds while nothing changes, and a new slot takes two rounds (created, then persisted).
const SYNC_DEADLINE: Duration = Duration::from_secs(120);

/// The physical slot the standby streams through.
const STANDBY_SLOT: &str = "standby1";

#[test]
fn a_failover_to_the_promoted_standby_loses_nothing_and_flushes_only_without_failover_slots() {
    let major = PgCluster::installed_major();
    let flushed = fail_over(major >= 17);
    assert_eq!(
        flushed,
        major < 17,
        "on PostgreSQL {major} the failover should {}flush",
        if major < 17 { "" } else { "not " }
    );
}

#[test]
fn a_failover_to_a_standby_that_does_not_synchronize_slots_flushes_and_leaves_nothing_stale() {
    assert!(
        fail_over(false),
        "the slot was missing, so the cache must be flushed"
    );
}

/// Runs the failover; `synchronize` sets up slot synchronization (PostgreSQL 17 only). Returns
/// whether the sidecar flushed the cache. Asserts that every committed change was invalidated.
fn fail_over(synchronize: bool) -> bool {
    let primary = PgCluster::start();
    let db = unique_name("failover");
    primary.create_database(&db);
    primary.psql(&db, SCHEMA);
    let mut settings = vec![("hot_standby_feedback", "on")];
    if synchronize {
        settings.push(("sync_replication_slots", "on"));
    }
    let standby = primary.start_standby(STANDBY_SLOT, &settings);
    if synchronize {
        // Logical changes reach the sidecar only once the standby has them, so the slot it
        // synchronizes never points past its own WAL.
        primary.psql(
            "postgres",
            &format!("ALTER SYSTEM SET synchronized_standby_slots = '{STANDBY_SLOT}'"),
        );
        primary.reload();
    }
    let redis = RedisServer::start();
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let setup = Setup::new(&url, &redis.url(), RULES);
    let sidecar = setup.start();

    // Writes stream from the primary.
    redis.set_keys(["item:1", UNTOUCHED]);
    primary.psql(&db, "INSERT INTO items VALUES (1, 'a')");
    wait_gone(&redis, &sidecar, "item:1");
    if synchronize {
        wait_until(
            SYNC_DEADLINE,
            "the standby holds the synchronized slot",
            || {
                standby.psql(
                    "postgres",
                    &format!(
                        "SELECT synced AND NOT temporary FROM pg_replication_slots \
                     WHERE slot_name = '{}'",
                        setup.slot
                    ),
                ) == "t"
            },
        );
    }

    // A commit the standby has and the sidecar has not confirmed, then the failover.
    redis.set_keys(["item:2"]);
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(600_000)
        .arg("WRITE")
        .exec(&mut redis.connection())
        .expect("CLIENT PAUSE");
    primary.psql(&db, "INSERT INTO items VALUES (2, 'b')");
    let written = primary.psql("postgres", "SELECT pg_current_wal_lsn()");
    wait_until(DEADLINE, "the standby replayed the commit", || {
        standby.psql(
            "postgres",
            &format!("SELECT pg_last_wal_replay_lsn() >= '{written}'"),
        ) == "t"
    });
    primary.stop(StopMode::Immediate);
    standby.promote();
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .exec(&mut redis.connection())
        .expect("CLIENT UNPAUSE");

    // Nothing lost: the held commit, and writes on the new primary.
    wait_gone(&redis, &sidecar, "item:2");
    redis.set_keys(["item:3"]);
    standby.psql(&db, "INSERT INTO items VALUES (3, 'c')");
    wait_gone(&redis, &sidecar, "item:3");
    sidecar.wait_ready();
    let resets = sidecar.metric_sum("invalidator_slot_resets_total");
    assert_eq!(
        resets,
        if redis.exists(UNTOUCHED) { 0.0 } else { 1.0 },
        "a flush is a slot reset\n{}",
        sidecar.log()
    );
    resets > 0.0
}

/// Waits until `key` is deleted, showing the sidecar's log if it never is.
fn wait_gone(redis: &RedisServer, sidecar: &Sidecar, key: &str) {
    let deadline = std::time::Instant::now() + DEADLINE;
    while redis.exists(key) {
        sidecar.assert_alive();
        assert!(
            std::time::Instant::now() < deadline,
            "{key} was never deleted\n{}",
            sidecar.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_slot_replaced_after_a_loss_is_a_failover_slot_again() {
    let major = PgCluster::installed_major();
    if major < 17 {
        eprintln!("PostgreSQL {major} has no failover slots: nothing to check");
        return;
    }
    let pg = PgCluster::start();
    let db = unique_name("failover");
    let url = pg.create_database(&db);
    pg.psql(&db, SCHEMA);
    let redis = RedisServer::start();
    let setup = Setup::new(&url, &redis.url(), RULES);
    let sidecar = setup.start();
    let slot = &setup.slot;
    // Asked of the slot once a walsender streams from it: after the replacement is complete.
    let failover = || {
        pg.psql(
            &db,
            &format!(
                "SELECT failover FROM pg_replication_slots WHERE slot_name = '{slot}' AND active"
            ),
        )
    };
    assert_eq!(failover(), "t", "the slot setup created");

    // Dropped under the running sidecar: it is replaced through a temporary slot and a copy,
    // which never carries the flag.
    pg.psql(
        &db,
        &format!(
            "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots \
             WHERE slot_name = '{slot}'; SELECT pg_drop_replication_slot('{slot}');"
        ),
    );
    wait_until(DEADLINE, "the slot is replaced", || {
        sidecar.assert_alive();
        sidecar.metric_sum("invalidator_slot_resets_total") == 1.0 && !failover().is_empty()
    });
    assert_eq!(
        failover(),
        "t",
        "the slot that replaced it\n{}",
        sidecar.log()
    );
}
