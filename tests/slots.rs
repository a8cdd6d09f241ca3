//! The replication slot lost or dropped: changes were missed, so every key the rules can
//! produce is deleted before streaming resumes from a new slot.

use std::time::Duration;

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Setup};
use crate::support::{PgCluster, RedisServer, unique_name, wait_until};

/// Keys the rules can produce (all deleted by the safety action) and keys they cannot.
const PRODUCIBLE: [&str; 4] = ["item:1", "item:2", "items:category:x", "order:9"];
const FOREIGN: [&str; 2] = ["session:1", "other:item:1"];

#[test]
fn a_slot_dropped_while_running_is_recreated_after_deleting_every_rule_key() {
    let f = Fixture::new(SCHEMA, RULES);
    let sidecar = f.setup.start();
    f.sql("INSERT INTO items VALUES (1, 'a', 'x', 0)");
    crate::e2e::barrier(&f);
    f.cache(&PRODUCIBLE);
    f.cache(&FOREIGN);

    // Drop the slot under the running sidecar, then change a row while no slot exists: that
    // change is missed by any slot.
    let slot = &f.setup.slot;
    f.sql(&format!(
        "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots \
         WHERE slot_name = '{slot}'; SELECT pg_drop_replication_slot('{slot}');"
    ));
    f.sql("UPDATE items SET name = 'b' WHERE id = 1");

    f.wait_deleted(&PRODUCIBLE);
    f.assert_kept(&FOREIGN);
    sidecar.wait_ready();
    assert_eq!(sidecar.metric("invalidator_slot_resets_total"), 1.0);
    assert!(
        sidecar
            .log()
            .contains("replication slot was lost or dropped"),
        "{}",
        sidecar.log()
    );
    // And it streams again from the new slot.
    f.cache(&["item:3"]);
    f.sql("INSERT INTO items VALUES (3, 'c', 'y', 0)");
    f.wait_deleted(&["item:3"]);
}

#[test]
fn a_lost_slot_is_dropped_and_recreated_after_deleting_every_rule_key() {
    let pg = PgCluster::start_with(&[("max_slot_wal_keep_size", "1MB")]);
    let db = unique_name("db");
    let url = pg.create_database(&db);
    pg.psql(&db, SCHEMA);
    let redis = RedisServer::start();
    let setup = Setup::new(&url, &redis.url(), RULES);
    let mut sidecar = setup.start();
    sidecar.kill9();

    // While it is down, a change, then more WAL than the slot may keep: the slot is lost.
    redis.set_keys(PRODUCIBLE.iter().chain(&FOREIGN));
    pg.psql(&db, "INSERT INTO items VALUES (2, 'a', 'x', 0)");
    wait_until(Duration::from_secs(60), "the slot is lost", || {
        pg.psql(
            &db,
            "INSERT INTO unwatched SELECT i, repeat('x', 1000) FROM generate_series(1, 3000) i \
             ON CONFLICT (id) DO UPDATE SET v = excluded.v; SELECT pg_switch_wal(); CHECKPOINT;",
        );
        pg.psql(
            &db,
            &format!(
                "SELECT wal_status FROM pg_replication_slots WHERE slot_name = '{}'",
                setup.slot
            ),
        )
        .trim()
            == "lost"
    });
    // `setup` refuses: it cannot flush the cache.
    let (status, out) = setup.command(&["setup"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("lost") && out.contains("invalidator run"),
        "{out}"
    );

    let sidecar = setup.start();
    wait_until(Duration::from_secs(30), "every rule key is deleted", || {
        PRODUCIBLE.iter().all(|k| !redis.exists(k))
    });
    for k in FOREIGN {
        assert!(
            redis.exists(k),
            "{k} is not a key of any rule and should be kept"
        );
    }
    assert_eq!(sidecar.metric("invalidator_slot_resets_total"), 1.0);
}

#[test]
fn an_idle_slot_follows_the_server_while_other_tables_and_databases_write() {
    let f = Fixture::new(SCHEMA, RULES);
    let _sidecar = f.setup.start();
    let other = unique_name("db");
    PgCluster::shared().create_database(&other);
    for round in 0..20 {
        f.sql(&format!(
            "INSERT INTO unwatched SELECT i, 'x' FROM generate_series({0} * 100, {0} * 100 + 99) i",
            round
        ));
        PgCluster::shared().psql(
            &other,
            "CREATE TABLE IF NOT EXISTS t (v int); INSERT INTO t VALUES (1)",
        );
    }
    let server = f.sql("SELECT pg_current_wal_lsn()");
    let slot = &f.setup.slot;
    // Nothing published changed, yet the slot must not hold the WAL written meanwhile.
    wait_until(
        Duration::from_secs(30),
        "the slot's confirmed LSN passes the server's",
        || {
            f.sql(&format!(
            "SELECT confirmed_flush_lsn >= '{}' FROM pg_replication_slots WHERE slot_name = '{slot}'",
            server.trim()
        ))
        .trim()
            == "t"
        },
    );
}
