//! Notify mode end to end: triggers fill `invalidator.outbox`, the real binary reads it, deletes
//! the keys and then the outbox rows.

use std::time::Duration;

use crate::e2e::{
    RULES, SCHEMA, barrier, insert_then_update_invalidate, truncate_deletes_every_key_of_the_table,
};
use crate::sidecar::Fixture;
use crate::support::wait_until;

/// A fixture whose configuration sets `postgres.mode = "notify"`.
fn fixture() -> Fixture {
    let f = Fixture::new(SCHEMA, RULES);
    let path = f.setup.config();
    let config = std::fs::read_to_string(&path).expect("config");
    let config = config.replacen("[postgres]\n", "[postgres]\nmode = \"notify\"\n", 1);
    std::fs::write(&path, config).expect("config");
    f
}

/// Rows waiting in the outbox.
fn outbox_rows(f: &Fixture) -> u64 {
    f.sql("SELECT count(*) FROM invalidator.outbox")
        .trim()
        .parse()
        .expect("a count")
}

fn wait_outbox_empty(f: &Fixture) {
    wait_until(Duration::from_secs(30), "the outbox is empty", || {
        outbox_rows(f) == 0
    });
}

#[test]
fn notify_mode_insert_update_delete_and_truncate_delete_their_keys() {
    let f = fixture();
    let _sidecar = f.setup.start();

    insert_then_update_invalidate(&f);

    // Triggers see the whole old row, whatever the replica identity.
    f.sql("INSERT INTO plain VALUES (1, 'bob'), (2, 'alice')");
    barrier(&f);
    f.cache(&[
        "item:1",
        "items:category:boats",
        "plain:1",
        "owner:bob",
        "owner:alice",
    ]);
    f.sql("DELETE FROM items WHERE id = 1");
    f.sql("DELETE FROM plain WHERE id = 1");
    f.wait_deleted(&["item:1", "items:category:boats", "plain:1", "owner:bob"]);
    barrier(&f);
    f.assert_kept(&["owner:alice"]);

    truncate_deletes_every_key_of_the_table(&f);
    wait_outbox_empty(&f);
}

#[test]
fn notify_mode_values_are_postgres_text_and_never_widen() {
    let f = fixture();
    let _sidecar = f.setup.start();
    let bystanders = [
        "items:name:abc:page1",
        "items:name:a:page1",
        "items:category:a",
        "items:category:b",
        "items:category:",
        "items:category:null",
        "item:12",
    ];
    f.cache(&bystanders);
    let exact = [
        "items:name:*:page1",
        "items:name:[a]:page1",
        r"items:name:\:page1",
        "items:category:[ab]",
        "items:category:*",
        "item:1",
        "item:2",
        "item:3",
    ];
    f.cache(&exact);
    f.sql(r"INSERT INTO items VALUES (1, '*', '[ab]', 0), (2, '[a]', '*', 0), (3, '\', NULL, 0)");
    f.wait_deleted(&exact);
    barrier(&f);
    f.assert_kept(&bystanders);
}

#[test]
fn notify_mode_kill_9_during_commits_loses_nothing() {
    let f = fixture();
    let mut sidecar = f.setup.start();
    let ids: Vec<String> = (1..=300).map(|i| i.to_string()).collect();
    let keys: Vec<String> = ids.iter().map(|i| format!("item:{i}")).collect();
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    f.cache(&keys);
    // One commit per row, from another thread, while the sidecar is killed.
    let writer = {
        let db = f.db.clone();
        let statements: String = ids
            .iter()
            .map(|i| {
                format!("INSERT INTO items VALUES ({i}, 'n', 'c', 0); SELECT pg_sleep(0.01);\n")
            })
            .collect();
        std::thread::spawn(move || crate::support::PgCluster::shared().psql(&db, &statements))
    };
    wait_until(Duration::from_secs(30), "some keys are deleted", || {
        keys.iter().any(|k| !f.redis.exists(k))
    });
    sidecar.kill9();
    writer.join().expect("writer");
    assert!(
        outbox_rows(&f) > 0,
        "the writes after the kill should wait in the outbox"
    );

    // Whatever was read but not confirmed is still in the outbox: read again after a restart.
    let _sidecar = f.setup.start();
    f.wait_deleted(&keys);
    wait_outbox_empty(&f);
}

#[test]
fn notify_mode_keeps_outbox_rows_until_redis_confirms() {
    let f = fixture();
    let mut sidecar = f.setup.start();
    f.redis.kill();
    f.sql("INSERT INTO items VALUES (1, 'n', 'c', 0), (2, 'm', 'c', 0)");
    // Nothing can be confirmed while Redis is down: the rows stay, across a kill -9 too.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(outbox_rows(&f), 2);
    sidecar.kill9();
    assert_eq!(outbox_rows(&f), 2);

    f.redis.start_again();
    f.cache(&["item:1", "item:2", "items:category:c"]);
    let _sidecar = f.setup.start();
    f.wait_deleted(&["item:1", "item:2", "items:category:c"]);
    wait_outbox_empty(&f);
}

#[test]
fn notify_mode_sigterm_exits_zero_after_acknowledging() {
    let f = fixture();
    let mut sidecar = f.setup.start();
    f.cache(&["item:1"]);
    f.sql("INSERT INTO items VALUES (1, 'n', 'c', 0)");
    f.wait_deleted(&["item:1"]);
    let status = sidecar
        .terminate_within(Duration::from_secs(30))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", sidecar.log());
    assert_eq!(outbox_rows(&f), 0);
}

#[test]
fn notify_mode_setup_prints_sql_and_is_idempotent() {
    let f = fixture();
    let (status, out) = f.setup.command(&["setup", "--dry-run"]);
    assert!(status.success(), "{out}");
    for expected in [
        "CREATE SCHEMA",
        "CREATE TABLE IF NOT EXISTS \"invalidator\".outbox",
        "hstore",
        "CREATE TRIGGER \"invalidator_capture\" AFTER INSERT OR UPDATE OR DELETE ON \"shop\".\"orders\"",
        "CREATE TRIGGER \"invalidator_capture_truncate\" AFTER TRUNCATE ON \"public\".\"items\"",
    ] {
        assert!(out.contains(expected), "missing {expected:?} in:\n{out}");
    }
    // A dry run changes nothing.
    assert_eq!(
        f.sql("SELECT count(*) FROM pg_namespace WHERE nspname = 'invalidator'")
            .trim(),
        "0"
    );
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    assert!(out.contains("nothing to do"), "{out}");
    let (status, out) = f.setup.command(&["status"]);
    assert!(
        status.success() && out.contains("outbox: 0 rows waiting"),
        "{out}"
    );
}
