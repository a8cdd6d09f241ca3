//! The replication slot lost or dropped, or a server from another history (a restore, a
//! failover): changes were missed, so every key the rules can produce is deleted before
//! streaming resumes from a new slot. A slot that never existed is not lost.

use std::time::Duration;

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Setup};
use crate::support::{PgCluster, RedisServer, StopMode, unique_name, wait_until};

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
    assert_eq!(sidecar.metric_sum("invalidator_slot_resets_total"), 1.0);
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
    assert_eq!(sidecar.metric_sum("invalidator_slot_resets_total"), 1.0);
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

/// The slot's confirmed position in `db` of `pg`, compared with `lsn`: whether it is at or past.
fn slot_passed(pg: &PgCluster, db: &str, slot: &str, lsn: &str) -> bool {
    pg.psql(
        db,
        &format!(
            "SELECT confirmed_flush_lsn >= '{lsn}' FROM pg_replication_slots \
             WHERE slot_name = '{slot}'"
        ),
    )
    .trim()
        == "t"
}

#[test]
fn a_restored_server_behind_our_position_is_a_new_history_and_nothing_stays_stale() {
    let pg = PgCluster::start();
    let db = unique_name("db");
    let url = pg.create_database(&db);
    pg.psql(&db, SCHEMA);
    let redis = RedisServer::start();
    let setup = Setup::new(&url, &redis.url(), RULES);
    let sidecar = setup.start();
    let backup = pg.base_backup();

    // The original goes on for 40 MB of WAL and a watched change, which the sidecar
    // acknowledges: its position is now far beyond the end of the backup's WAL.
    pg.psql(
        &db,
        "INSERT INTO unwatched SELECT i, repeat('x', 1000) FROM generate_series(1, 40000) i",
    );
    pg.psql(&db, "INSERT INTO items VALUES (1, 'a', 'x', 0)");
    let end = pg.psql(&db, "SELECT pg_current_wal_lsn()");
    wait_until(
        Duration::from_secs(60),
        "the sidecar acknowledged it all",
        || slot_passed(&pg, &db, &setup.slot, end.trim()),
    );

    // The backup takes the original's place on the same port: its WAL ends 40 MB earlier.
    redis.set_keys(["item:99"]);
    pg.restore(&backup);
    wait_until(Duration::from_secs(60), "the cache is flushed", || {
        !redis.exists("item:99")
    });
    sidecar.wait_ready();
    // Whatever was reported to the restored server holds at the next reconnect.
    let streams = sidecar.log().matches("streaming").count();
    pg.psql(
        &db,
        &format!(
            "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots \
             WHERE slot_name = '{}'",
            setup.slot
        ),
    );
    wait_until(Duration::from_secs(30), "the sidecar streams again", || {
        sidecar.log().matches("streaming").count() > streams
    });
    sidecar.wait_ready();

    // A change on the restored server, at a position below the one acknowledged before.
    redis.set_keys(["item:2"]);
    pg.psql(&db, "INSERT INTO items VALUES (2, 'b', 'y', 0)");
    wait_until(Duration::from_secs(30), "item:2 is deleted", || {
        !redis.exists("item:2")
    });
    // And the server's slot never holds a position its WAL has not reached.
    let ahead = pg.psql(
        &db,
        &format!(
            "SELECT confirmed_flush_lsn > pg_current_wal_lsn() FROM pg_replication_slots \
             WHERE slot_name = '{}'",
            setup.slot
        ),
    );
    assert_eq!(ahead.trim(), "f", "{}", sidecar.log());
    assert_eq!(sidecar.metric_sum("invalidator_slot_resets_total"), 1.0);
    assert!(sidecar.log().contains("new history"), "{}", sidecar.log());
}

#[test]
fn a_crash_before_the_lost_slot_flush_is_confirmed_flushes_again_on_the_next_start() {
    let f = Fixture::new(SCHEMA, RULES);
    let mut sidecar = f.setup.start();
    sidecar.kill9();
    let slot = &f.setup.slot;
    f.sql(&format!("SELECT pg_drop_replication_slot('{slot}')"));
    f.cache(&PRODUCIBLE);
    f.cache(&FOREIGN);

    // Redis takes no writes, so the flush the lost slot calls for cannot be confirmed; the
    // sidecar dies while it waits.
    let mut redis = f.redis.server().connection();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(120_000)
        .arg("WRITE")
        .query::<()>(&mut redis)
        .expect("CLIENT PAUSE");
    let mut crashing = f.setup.spawn();
    wait_until(Duration::from_secs(30), "the flush is under way", || {
        crashing
            .log()
            .contains("replication slot was lost or dropped")
    });
    // Long enough for the UNLINK to reach the paused server (it waits there, unanswered).
    wait_until(Duration::from_secs(30), "the delete waits on Redis", || {
        f.redis.server().has_blocked_client()
    });
    crashing.kill9();
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query::<()>(&mut redis)
        .expect("CLIENT UNPAUSE");
    f.assert_kept(&PRODUCIBLE);

    // The next start must flush again: nothing confirmed the first one.
    let sidecar = f.setup.start();
    f.wait_deleted(&PRODUCIBLE);
    f.assert_kept(&FOREIGN);
    assert_eq!(sidecar.metric_sum("invalidator_slot_resets_total"), 1.0);
}

#[test]
fn a_first_install_that_failed_to_create_the_slot_is_not_a_lost_slot() {
    let pg = PgCluster::start_with(&[("wal_level", "replica")]);
    let db = unique_name("db");
    let url = pg.create_database(&db);
    pg.psql(&db, SCHEMA);
    let redis = RedisServer::start();
    let setup = Setup::new(&url, &redis.url(), RULES);

    // Neither `setup` nor `run` can create the slot with wal_level = replica.
    for command in ["setup", "run"] {
        let (status, out) = setup.command(&[command]);
        assert_eq!(status.code(), Some(1), "{command}: {out}");
        assert!(out.contains("wal_level"), "{command}: {out}");
    }

    // Fixed, the first install completes without flushing anything.
    pg.psql("postgres", "ALTER SYSTEM SET wal_level = logical");
    pg.restart(StopMode::Fast);
    redis.set_keys(PRODUCIBLE.iter().chain(&FOREIGN));
    let (status, out) = setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let sidecar = setup.start();
    redis.set_keys(["item:5"]);
    pg.psql(&db, "INSERT INTO items VALUES (5, 'e', 'z', 0)");
    wait_until(Duration::from_secs(30), "item:5 is deleted", || {
        !redis.exists("item:5")
    });
    for k in PRODUCIBLE.iter().chain(&FOREIGN) {
        assert!(redis.exists(k), "{k} was flushed on a first install");
    }
    assert_eq!(sidecar.metric_sum("invalidator_slot_resets_total"), 0.0);
    assert!(!sidecar.log().contains("lost"), "{}", sidecar.log());
}

#[test]
fn a_publication_whose_slot_was_never_created_is_not_a_lost_slot() {
    let f = Fixture::new(SCHEMA, RULES);
    // The tables' owner lacks REPLICATION: its `setup` creates the publication, then cannot
    // create the slot.
    let owner = unique_name("owner");
    f.sql(&format!(
        "CREATE ROLE {owner} WITH LOGIN PASSWORD 'pw';
         ALTER TABLE items OWNER TO {owner}; ALTER TABLE plain OWNER TO {owner};
         ALTER TABLE shop.orders OWNER TO {owner}; ALTER TABLE sentinel OWNER TO {owner};
         GRANT USAGE ON SCHEMA shop TO {owner}; GRANT CREATE ON DATABASE \"{}\" TO {owner};",
        f.db
    ));
    let as_owner = Setup::new(
        &PgCluster::shared().url_as(&owner, "pw", &f.db),
        &f.redis.url(),
        RULES,
    );
    let config = std::fs::read_to_string(as_owner.config()).unwrap();
    std::fs::write(
        as_owner.config(),
        config.replace(&as_owner.slot, &f.setup.slot),
    )
    .unwrap();
    let (status, out) = as_owner.command(&["setup"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("replication"), "{out}");
    assert_eq!(
        f.sql(&format!(
            "SELECT count(*) FROM pg_publication WHERE pubname = '{}'",
            f.setup.slot
        )),
        "1"
    );

    // `run`, as a role that may create slots, finishes the install: nothing was missed.
    f.cache(&PRODUCIBLE);
    let sidecar = f.setup.start();
    f.cache(&["item:5"]);
    f.sql("INSERT INTO items VALUES (5, 'e', 'z', 0)");
    f.wait_deleted(&["item:5"]);
    f.assert_kept(&PRODUCIBLE);
    assert_eq!(sidecar.metric_sum("invalidator_slot_resets_total"), 0.0);
    // Once the slot exists, a loss is a loss again.
    drop(sidecar);
    let slot = &f.setup.slot;
    f.sql(&format!(
        "SELECT pg_terminate_backend(active_pid, 5000) FROM pg_replication_slots \
         WHERE slot_name = '{slot}' AND active; SELECT pg_drop_replication_slot('{slot}');"
    ));
    let sidecar = f.setup.start();
    f.wait_deleted(&PRODUCIBLE);
    assert_eq!(sidecar.metric_sum("invalidator_slot_resets_total"), 1.0);
}
