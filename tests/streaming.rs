//! Large transactions streamed before they commit (protocol version 2, PostgreSQL 14+): the
//! test cluster's `logical_decoding_work_mem` is 64 kB, so a few thousand rows are sent in
//! blocks; each test checks `pg_stat_replication_slots.stream_txns`, which proves the server
//! streamed (protocol 1 would decode each transaction at its commit, spilling it instead).

use std::collections::HashSet;
use std::time::Duration;

use crate::sidecar::Setup;
use crate::support::{PgCluster, RedisServer, unique_name, wait_until};

/// One table.
const SCHEMA: &str = "CREATE TABLE items (id int PRIMARY KEY, v text);";

/// Every change of a row invalidates its one key.
const RULES: &str = "[[rule]]\nname = \"item\"\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

/// Rows per transaction: well past 64 kB of decoded changes.
const ROWS: u32 = 4_000;

const DEADLINE: Duration = Duration::from_secs(60);

/// A cluster that streams transactions past 64 kB, a database with the table, and Redis; or
/// `None` before PostgreSQL 14, which cannot stream.
fn rig() -> Option<(PgCluster, String, String, RedisServer)> {
    let pg = PgCluster::start_with(&[("logical_decoding_work_mem", "64kB")]);
    if pg.major() < 14 {
        eprintln!("PostgreSQL {} streams no transaction: skipped", pg.major());
        return None;
    }
    let db = unique_name("streaming");
    let url = pg.create_database(&db);
    pg.psql(&db, SCHEMA);
    Some((pg, db, url, RedisServer::start()))
}

/// `item:{id}` for each id.
fn keys(ids: impl IntoIterator<Item = u32>) -> Vec<String> {
    ids.into_iter().map(|id| format!("item:{id}")).collect()
}

/// The `item:*` keys still cached.
fn cached(redis: &RedisServer) -> HashSet<String> {
    redis.scan_keys("item:*").into_iter().collect()
}

/// The statement inserting rows `from..=to`.
fn insert(from: u32, to: u32) -> String {
    format!("INSERT INTO items SELECT g, 'v' FROM generate_series({from}, {to}) g;\n")
}

/// How many transactions the server has streamed on `slot`.
fn streamed(pg: &PgCluster, db: &str, slot: &str) -> u64 {
    let out = pg.psql(
        db,
        &format!(
            "SELECT coalesce(sum(stream_txns), 0) FROM pg_stat_replication_slots \
             WHERE slot_name = '{slot}'"
        ),
    );
    out.parse().expect("stream_txns")
}

/// Waits until the slot has confirmed everything written so far.
fn wait_confirmed(pg: &PgCluster, db: &str, slot: &str) {
    let end = pg.psql(db, "SELECT pg_current_wal_lsn()");
    wait_until(DEADLINE, "the slot confirmed what was written", || {
        pg.psql(
            db,
            &format!(
                "SELECT confirmed_flush_lsn >= '{end}' FROM pg_replication_slots \
                 WHERE slot_name = '{slot}'"
            ),
        ) == "t"
    });
}

#[test]
fn a_streamed_commit_invalidates_and_a_streamed_abort_deletes_nothing() {
    let Some((pg, db, url, redis)) = rig() else {
        return;
    };
    let setup = Setup::new(&url, &redis.url(), RULES);
    let sidecar = setup.start();
    let rolled_back = 100_001..=100_000 + ROWS;
    redis.set_keys(keys(1..=ROWS));
    redis.set_keys(keys(rolled_back.clone()));

    pg.psql(
        &db,
        &format!(
            "BEGIN; {}ROLLBACK; BEGIN; {}COMMIT;",
            insert(*rolled_back.start(), *rolled_back.end()),
            insert(1, ROWS)
        ),
    );
    wait_until(DEADLINE, "the committed rows' keys are deleted", || {
        sidecar.assert_alive();
        cached(&redis)
            .iter()
            .all(|k| k.len() == "item:100001".len())
    });
    wait_confirmed(&pg, &db, &setup.slot);
    wait_until(DEADLINE, "the server reports both streamed", || {
        streamed(&pg, &db, &setup.slot) >= 2
    });
    assert_eq!(
        cached(&redis),
        keys(rolled_back).into_iter().collect(),
        "the rolled-back transaction deleted keys"
    );
}

#[test]
fn a_rolled_back_subtransaction_deletes_none_of_its_rows_and_the_rest_all() {
    let Some((pg, db, url, redis)) = rig() else {
        return;
    };
    let setup = Setup::new(&url, &redis.url(), RULES);
    let sidecar = setup.start();
    redis.set_keys(keys(1..=3 * ROWS));

    // Rows before, inside and after the rolled-back savepoint, and a released one that stays.
    pg.psql(
        &db,
        &format!(
            "BEGIN; {}SAVEPOINT gone; {}SAVEPOINT nested; {}ROLLBACK TO SAVEPOINT gone; \
             SAVEPOINT kept; {}RELEASE SAVEPOINT kept; COMMIT;",
            insert(1, ROWS),
            insert(ROWS + 1, ROWS + ROWS / 2),
            insert(ROWS + ROWS / 2 + 1, 2 * ROWS),
            insert(2 * ROWS + 1, 3 * ROWS),
        ),
    );
    let gone: HashSet<String> = keys(ROWS + 1..=2 * ROWS).into_iter().collect();
    wait_until(DEADLINE, "the kept rows' keys are deleted", || {
        sidecar.assert_alive();
        cached(&redis).is_subset(&gone)
    });
    wait_confirmed(&pg, &db, &setup.slot);
    wait_until(DEADLINE, "the server reports it streamed", || {
        streamed(&pg, &db, &setup.slot) >= 1
    });
    assert_eq!(
        cached(&redis),
        gone,
        "keys of rolled-back rows were deleted"
    );
}

#[test]
fn a_kill_9_in_the_middle_of_a_streamed_transaction_loses_nothing() {
    let Some((pg, db, url, redis)) = rig() else {
        return;
    };
    let setup = Setup::new(&url, &redis.url(), RULES);
    let mut sidecar = setup.start();
    redis.set_keys(keys(1..=2 * ROWS));

    let mut session = pg.session(&db);
    session.send(&format!("BEGIN;\n{}", insert(1, ROWS)));
    wait_until(DEADLINE, "the open transaction is streamed", || {
        sidecar.assert_alive();
        streamed(&pg, &db, &setup.slot) >= 1
    });
    sidecar.kill9();
    session.send(&format!("{}COMMIT;\n", insert(ROWS + 1, 2 * ROWS)));
    session.finish();
    assert_eq!(
        cached(&redis).len(),
        2 * ROWS as usize,
        "deleted before the commit"
    );

    let sidecar = setup.start();
    wait_until(DEADLINE, "every key of the transaction is deleted", || {
        sidecar.assert_alive();
        cached(&redis).is_empty()
    });
    wait_confirmed(&pg, &db, &setup.slot);
}
