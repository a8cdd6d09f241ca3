//! Two-phase commit: a prepared transaction invalidates at COMMIT PREPARED, and one rolled back
//! with ROLLBACK PREPARED invalidates nothing. The stream does not ask for `two_phase`, so the
//! server decodes a prepared transaction when it is committed, as one ordinary transaction, and
//! never sends one that is rolled back; keys are deleted only once the changes are visible.

use std::time::Duration;

use crate::sidecar::Setup;
use crate::support::{PgCluster, RedisServer, unique_name, wait_until};

/// One table.
const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v text);";

/// Every change of a row invalidates its one key.
const RULES: &str = "[[rule]]\nname = \"item\"\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

#[test]
fn a_prepared_transaction_invalidates_at_commit_prepared_and_never_when_rolled_back() {
    let pg = PgCluster::start_with(&[("max_prepared_transactions", "4")]);
    let db = unique_name("two_phase");
    let url = pg.create_database(&db);
    pg.psql(&db, SCHEMA);
    let redis = RedisServer::start();
    let setup = Setup::new(&url, &redis.url(), RULES);
    let sidecar = setup.start();
    redis.set_keys(["item:1", "item:2", "item:3"]);

    pg.psql(
        &db,
        "BEGIN; INSERT INTO items VALUES (1, 'a'); PREPARE TRANSACTION 'kept';
         BEGIN; INSERT INTO items VALUES (2, 'b'); PREPARE TRANSACTION 'dropped';",
    );
    // Prepared is not committed: a change committed after both is invalidated, they are not.
    pg.psql(&db, "INSERT INTO items VALUES (3, 'c')");
    wait_until(Duration::from_secs(30), "item:3 is deleted", || {
        sidecar.assert_alive();
        !redis.exists("item:3")
    });
    assert!(redis.exists("item:1"), "deleted at PREPARE");
    assert!(redis.exists("item:2"), "deleted at PREPARE");

    pg.psql(&db, "ROLLBACK PREPARED 'dropped'; COMMIT PREPARED 'kept'");
    wait_until(Duration::from_secs(30), "item:1 is deleted", || {
        sidecar.assert_alive();
        !redis.exists("item:1")
    });
    // Everything up to the COMMIT PREPARED is confirmed, and the rolled-back insert deleted
    // nothing.
    let end = pg.psql(&db, "SELECT pg_current_wal_lsn()");
    wait_until(
        Duration::from_secs(30),
        "the slot confirmed the commit",
        || {
            pg.psql(
                &db,
                &format!(
                    "SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots \
                 WHERE slot_name = '{}'",
                    setup.slot
                ),
            ) == "t"
        },
    );
    assert!(
        redis.exists("item:2"),
        "a rolled-back transaction deleted its key"
    );
}
