//! Rules on partitioned tables, and the publication drifting while `run` streams: every
//! partition (present, attached later, or below a sub-partition) is covered for every
//! operation, and a publication that hides what the rules read is refused.

use std::time::Duration;

use crate::e2e::barrier;
use crate::sidecar::{Fixture, Mode, in_both_modes};
use crate::support::wait_until;

const SCHEMA: &str = "
CREATE TABLE events (id int, region text, name text, PRIMARY KEY (id, region))
  PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
CREATE TABLE events_ap PARTITION OF events FOR VALUES IN ('ap') PARTITION BY RANGE (id);
CREATE TABLE events_ap_low PARTITION OF events_ap FOR VALUES FROM (MINVALUE) TO (100);
CREATE TABLE events_ap_high PARTITION OF events_ap FOR VALUES FROM (100) TO (MAXVALUE);
CREATE TABLE items (id int PRIMARY KEY, name text, category text, price int);
CREATE TABLE plain (id int PRIMARY KEY, owner text);
CREATE TABLE sentinel (id serial PRIMARY KEY);
";

const RULES: &str = r#"
[[rule]]
name = "event"
table = "events"
keys = ["event:{id}:{region}", "region:{region}:*"]

[[rule]]
name = "item"
table = "items"
keys = ["item:{id}", "items:name:{name}"]

[[rule]]
name = "plain"
table = "plain"
keys = ["plain:{id}"]

[[rule]]
name = "sentinel"
table = "sentinel"
keys = ["sentinel:{id}"]
"#;

fn fixture(mode: Mode) -> Fixture {
    Fixture::with_mode(SCHEMA, RULES, mode)
}

/// Caches `keys`, runs `sql`, and waits until they are gone.
fn deletes(f: &Fixture, sql: &str, keys: &[&str]) {
    f.cache(keys);
    f.sql(sql);
    f.wait_deleted(keys);
}

/// Insert, an update that moves the row to another partition, delete, a truncate of the parent
/// and of one partition: each deletes the keys of the parent's rules.
fn every_operation_on(f: &Fixture) {
    deletes(
        f,
        "INSERT INTO events VALUES (1, 'eu', 'a')",
        &["event:1:eu", "region:eu:list"],
    );
    deletes(
        f,
        "UPDATE events SET region = 'us' WHERE id = 1",
        &[
            "event:1:eu",
            "event:1:us",
            "region:eu:list",
            "region:us:list",
        ],
    );
    deletes(
        f,
        "DELETE FROM events WHERE id = 1",
        &["event:1:us", "region:us:list"],
    );
    f.sql("INSERT INTO events VALUES (2, 'eu', 'b'), (3, 'us', 'c')");
    barrier(f);
    deletes(f, "TRUNCATE events", &["event:2:eu", "region:eu:list"]);
    f.sql("INSERT INTO events VALUES (4, 'us', 'd')");
    barrier(f);
    deletes(f, "TRUNCATE events_us", &["event:4:us", "region:us:list"]);
}

in_both_modes! {
    fn a_rule_on_a_partitioned_table_covers_every_partition_and_operation(mode: Mode) {
        let f = fixture(mode);
        let mut sidecar = f.setup.start();
        every_operation_on(&f);
        // A second start finds the publication (or the triggers) as the first left them.
        assert!(sidecar.terminate().success(), "{}", sidecar.log());
        let _sidecar = f.setup.start();
        every_operation_on(&f);
    }

    fn a_partition_attached_while_running_is_covered(mode: Mode) {
        let f = fixture(mode);
        let _sidecar = f.setup.start();
        barrier(&f);
        f.sql("CREATE TABLE events_sa PARTITION OF events FOR VALUES IN ('sa')");
        f.sql(
            "CREATE TABLE events_af (LIKE events INCLUDING ALL); \
             ALTER TABLE events ATTACH PARTITION events_af FOR VALUES IN ('af')",
        );
        deletes(&f, "INSERT INTO events VALUES (5, 'sa', 'e')", &["event:5:sa"]);
        deletes(&f, "INSERT INTO events VALUES (6, 'af', 'f')", &["event:6:af"]);
        if mode == Mode::Notify {
            // A truncate trigger is not cloned to a new partition: `run` adds it.
            wait_until(Duration::from_secs(30), "the new partitions capture truncates", || {
                f.sql(
                    "SELECT count(*) FROM pg_trigger WHERE tgname = 'invalidator_capture_truncate' \
                     AND tgrelid IN ('events_sa'::regclass, 'events_af'::regclass)",
                )
                .trim()
                    == "2"
            });
        }
        f.sql("INSERT INTO events VALUES (7, 'sa', 'g'), (8, 'af', 'h')");
        barrier(&f);
        deletes(&f, "TRUNCATE events_sa", &["event:7:sa", "region:sa:x"]);
        deletes(&f, "TRUNCATE events_af", &["event:8:af", "region:af:x"]);
    }

    fn a_sub_partitioned_table_is_covered(mode: Mode) {
        let f = fixture(mode);
        let _sidecar = f.setup.start();
        deletes(&f, "INSERT INTO events VALUES (10, 'ap', 'a')", &["event:10:ap"]);
        deletes(
            &f,
            "UPDATE events SET id = 150 WHERE id = 10",
            &["event:10:ap", "event:150:ap"],
        );
        f.sql("INSERT INTO events VALUES (20, 'ap', 'b')");
        barrier(&f);
        deletes(&f, "TRUNCATE events_ap_low", &["event:20:ap", "region:ap:x"]);
        deletes(&f, "TRUNCATE events_ap", &["event:150:ap", "region:ap:y"]);
        f.sql("INSERT INTO events VALUES (30, 'ap', 'c')");
        barrier(&f);
        deletes(&f, "DELETE FROM events_ap_low WHERE id = 30", &["event:30:ap"]);
    }
}

/// In notify mode the triggers of every partition, present, below a sub-partition or attached
/// while running, fire for writes of a session with `session_replication_role = replica`.
#[test]
fn notify_mode_partitions_capture_writes_of_a_replica_role_session() {
    let f = fixture(Mode::Notify);
    let _sidecar = f.setup.start();
    barrier(&f);
    f.sql("CREATE TABLE events_sa PARTITION OF events FOR VALUES IN ('sa')");
    wait_until(
        Duration::from_secs(30),
        "the new partition captures truncates",
        || {
            f.sql(
                "SELECT count(*) FROM pg_trigger WHERE tgname = 'invalidator_capture_truncate' \
             AND tgrelid = 'events_sa'::regclass",
            )
            .trim()
                == "1"
        },
    );
    let replica = |sql: &str| format!("SET session_replication_role = replica; {sql}");
    for (region, id) in [("eu", 1), ("ap", 2), ("sa", 3)] {
        deletes(
            &f,
            &replica(&format!(
                "INSERT INTO events VALUES ({id}, '{region}', 'a')"
            )),
            &[&format!("event:{id}:{region}")],
        );
    }
    deletes(&f, &replica("TRUNCATE events_sa"), &["region:sa:x"]);
    deletes(&f, &replica("TRUNCATE events_ap_low"), &["region:ap:x"]);
}

#[test]
fn a_rule_on_a_partitioned_table_works_with_a_for_all_tables_publication() {
    let f = fixture(Mode::Replication);
    f.sql(&format!(
        "CREATE PUBLICATION \"{0}\" FOR ALL TABLES; \
         SELECT pg_create_logical_replication_slot('{0}', 'pgoutput')",
        f.setup.slot
    ));
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let mut sidecar = f.setup.start();
    every_operation_on(&f);
    assert!(sidecar.terminate().success(), "{}", sidecar.log());
    let _sidecar = f.setup.start();
    every_operation_on(&f);
}

/// Replaces `items` by rename (create the new one, rename the old away, rename the new in),
/// then updates row 1 in the new table, which no publication holds yet.
fn replace_items_by_rename(f: &Fixture) {
    f.sql(
        "CREATE TABLE items_new (LIKE items INCLUDING ALL); \
         INSERT INTO items_new SELECT * FROM items; \
         BEGIN; ALTER TABLE items RENAME TO items_old; ALTER TABLE items_new RENAME TO items; \
         COMMIT; \
         UPDATE items SET name = 'uno' WHERE id = 1",
    );
}

#[test]
fn a_table_replaced_by_rename_while_running_is_republished_and_flushed() {
    let f = fixture(Mode::Replication);
    let sidecar = f.setup.start();
    f.sql("INSERT INTO items VALUES (1, 'one', 'x', 1)");
    barrier(&f);
    f.cache(&["item:1", "items:name:one", "item:2", "plain:1"]);
    replace_items_by_rename(&f);
    // That update was made while the new table was not published: only a flush of the table's
    // patterns can cover it.
    f.wait_deleted(&["item:1", "items:name:one", "item:2"]);
    // Republished: its changes stream again.
    barrier(&f);
    deletes(
        &f,
        "INSERT INTO items VALUES (3, 'three', 'x', 3)",
        &["item:3"],
    );
    f.assert_kept(&["plain:1"]);
    let log = sidecar.log();
    assert!(log.contains("public.items"), "{log}");
    // Without `setup`, there is no invalidator.requests to ask for the flush in the WAL.
    assert!(log.contains("not crash-safe"), "{log}");
    assert_eq!(sidecar.metric("invalidator_publication_repairs_total"), 1.0);
}

#[test]
fn a_crash_before_the_drift_flush_is_confirmed_flushes_again_on_the_next_start() {
    let f = fixture(Mode::Replication);
    // `setup` makes invalidator.requests, which `run` (its owner here) writes the flush into.
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let mut running = f.setup.start();
    f.sql("INSERT INTO items VALUES (1, 'one', 'x', 1)");
    barrier(&f);
    f.cache(&["item:1", "items:name:one", "plain:1"]);

    // Redis takes no writes, so the flush the repair calls for cannot be confirmed; the sidecar
    // dies while it waits.
    let mut redis = f.redis.server().connection();
    redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(120_000)
        .arg("WRITE")
        .query::<()>(&mut redis)
        .expect("CLIENT PAUSE");
    replace_items_by_rename(&f);
    let publication = &f.setup.slot;
    wait_until(
        Duration::from_secs(30),
        "the new table is published",
        || {
            f.sql(&format!(
            "SELECT count(*) FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
             WHERE p.pubname = '{publication}' AND r.prrelid = 'items'::regclass"
        ))
        .trim()
            == "1"
        },
    );
    // Long enough for the UNLINK to reach the paused server (it waits there, unanswered).
    wait_until(Duration::from_secs(30), "the delete waits on Redis", || {
        f.redis.server().has_blocked_client()
    });
    running.kill9();
    redis::cmd("CLIENT")
        .arg("UNPAUSE")
        .query::<()>(&mut redis)
        .expect("CLIENT UNPAUSE");
    f.assert_kept(&["item:1", "items:name:one"]);

    // The next start finds the table published, and must flush all the same: nothing
    // confirmed the first flush.
    let _sidecar = f.setup.start();
    f.wait_deleted(&["item:1", "items:name:one"]);
    f.assert_kept(&["plain:1"]);
}

/// The rename happens while no sidecar runs: the next start finds the new table unpublished,
/// adds it back and deletes its keys (the changes made since the rename were never published).
#[test]
fn a_table_replaced_by_rename_while_the_sidecar_was_down_is_flushed_at_the_next_start() {
    let f = fixture(Mode::Replication);
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let mut running = f.setup.start();
    f.sql("INSERT INTO items VALUES (1, 'one', 'x', 1)");
    barrier(&f);
    running.terminate();
    f.cache(&["item:1", "items:name:one", "plain:1"]);
    replace_items_by_rename(&f);
    let _sidecar = f.setup.start();
    f.wait_deleted(&["item:1", "items:name:one"]);
    f.assert_kept(&["plain:1"]);
}

#[test]
fn run_refuses_a_publication_that_hides_what_the_rules_read() {
    let f = fixture(Mode::Replication);
    let publication = format!("\"{}\"", f.setup.slot);
    let tables = "events, items, plain, sentinel";
    let cases = [
        (
            format!(
                "CREATE PUBLICATION {publication} FOR TABLE {tables} WITH (publish = 'insert, update')"
            ),
            "does not publish delete, truncate",
        ),
        (
            format!(
                "CREATE PUBLICATION {publication} FOR TABLE events, items WHERE (id > 100), plain, sentinel"
            ),
            "row filter",
        ),
        (
            format!(
                "CREATE PUBLICATION {publication} FOR TABLE events, items (id), plain, sentinel"
            ),
            "column list",
        ),
        (
            format!(
                "CREATE PUBLICATION {publication} FOR TABLE {tables} \
                 WITH (publish_via_partition_root = true)"
            ),
            "publish_via_partition_root",
        ),
    ];
    f.sql(&format!(
        "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
        f.setup.slot
    ));
    for (create, problem) in cases {
        f.sql(&format!(
            "DROP PUBLICATION IF EXISTS {publication}; {create}"
        ));
        let (status, out) = f.setup.command(&["run"]);
        assert_eq!(status.code(), Some(1), "{create}: {out}");
        assert!(out.contains(problem), "{create}: {out}");
        let (status, out) = f.setup.command(&["check"]);
        assert_eq!(status.code(), Some(1), "{create}: {out}");
        assert!(out.contains(problem), "check, {create}: {out}");
    }
}
