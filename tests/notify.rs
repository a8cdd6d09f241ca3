//! Notify mode end to end: triggers fill `invalidator.outbox`, the real binary reads it, deletes
//! the keys and then the outbox rows. The scenarios both sources share (every operation, values,
//! kill -9, SIGTERM, ExoDrive) run in both modes from `e2e` and `exodrive`; these are notify
//! mode's own.

use std::time::Duration;

use crate::e2e::{RULES, SCHEMA, barrier, insert_then_update_invalidate};
use crate::sidecar::{Fixture, Mode, Setup};
use crate::support::{PgCluster, wait_until};
use crate::unknown_names::run_to_exit;

/// A fixture in notify mode, set up with `invalidator setup` as a user would.
fn fixture() -> Fixture {
    Fixture::with_mode(SCHEMA, RULES, Mode::Notify)
}

/// A second configuration for the same database and Redis (its own HTTP port), in notify mode.
fn second_instance(f: &Fixture, rules: &str) -> Setup {
    let url = PgCluster::shared().url(&f.db);
    let setup = Setup::new(&url, &f.redis.url(), rules);
    setup.notify_mode();
    setup
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

/// A fixture in notify mode on which `setup` has not run.
fn fixture_without_setup() -> Fixture {
    let f = Fixture::new(SCHEMA, RULES);
    f.setup.notify_mode();
    f
}

#[test]
fn notify_mode_setup_prints_sql_and_is_idempotent() {
    let f = fixture_without_setup();
    let (status, out) = f.setup.command(&["setup", "--dry-run"]);
    assert!(status.success(), "{out}");
    for expected in [
        "CREATE SCHEMA",
        "CREATE TABLE IF NOT EXISTS \"invalidator\".outbox",
        "hstore",
        "CREATE TRIGGER \"invalidator_capture\" AFTER INSERT OR UPDATE OR DELETE ON \"shop\".\"orders\" \
         FOR EACH ROW EXECUTE FUNCTION \"invalidator\".capture('customer', 'id')",
        "CREATE TRIGGER \"invalidator_capture\" AFTER INSERT OR UPDATE OR DELETE ON \"public\".\"items\" \
         FOR EACH ROW EXECUTE FUNCTION \"invalidator\".capture('category', 'id', 'name', 'price')",
        "CREATE TRIGGER \"invalidator_capture_truncate\" AFTER TRUNCATE ON \"public\".\"items\" \
         FOR EACH STATEMENT EXECUTE FUNCTION \"invalidator\".capture()",
        "CREATE OR REPLACE FUNCTION \"invalidator\".invalidate(key_or_pattern text)",
        "GRANT USAGE ON SCHEMA \"invalidator\" TO PUBLIC",
        "REVOKE ALL ON FUNCTION \"invalidator\".invalidate(text) FROM PUBLIC",
        "REVOKE ALL ON FUNCTION \"invalidator\".capture() FROM PUBLIC",
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

/// Caches `item:1` to `item:300`, then inserts those rows from another thread, one commit per
/// row a few milliseconds apart; returns the keys and the writer.
fn insert_300_items_slowly(f: &Fixture) -> (Vec<String>, std::thread::JoinHandle<String>) {
    let ids: Vec<String> = (1..=300).map(|i| i.to_string()).collect();
    let keys: Vec<String> = ids.iter().map(|i| format!("item:{i}")).collect();
    f.redis.set_keys(keys.iter());
    let db = f.db.clone();
    let statements: String = ids
        .iter()
        .map(|i| format!("INSERT INTO items VALUES ({i}, 'n', 'c', 0); SELECT pg_sleep(0.005);\n"))
        .collect();
    let writer = std::thread::spawn(move || PgCluster::shared().psql(&db, &statements));
    (keys, writer)
}

/// The listener's session is killed by the server while rows are written: the sidecar
/// reconnects, takes the reader lock again and re-reads what it had not confirmed.
#[test]
fn notify_mode_listener_terminated_during_writes_loses_nothing() {
    let f = fixture();
    let _sidecar = f.setup.start();
    let (keys, writer) = insert_300_items_slowly(&f);
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    // The reader is the session that holds the advisory lock.
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_locks \
                     WHERE locktype = 'advisory' AND granted \
                     AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let mut terminated = 0;
    while !writer.is_finished() && terminated < 3 {
        if f.sql(terminate).trim() == "1" {
            terminated += 1;
        }
        std::thread::sleep(Duration::from_millis(150));
    }
    writer.join().expect("writer");
    assert!(terminated > 0, "the reader was never terminated");
    f.wait_deleted(&keys);
    wait_outbox_empty(&f);
}

/// A row wider than NOTIFY's 8000-byte payload limit: the notification carries nothing, the
/// outbox carries the row.
#[test]
fn notify_mode_a_row_wider_than_a_notify_payload_is_invalidated() {
    let f = fixture();
    let _sidecar = f.setup.start();
    let name = "n".repeat(20_000);
    let key = format!("items:name:{name}:page1");
    f.cache(&[&key, "item:1", "items:name:n:page1"]);
    f.sql(&format!("INSERT INTO items VALUES (1, '{name}', 'c', 0)"));
    f.wait_deleted(&[&key, "item:1"]);
    barrier(&f);
    f.assert_kept(&["items:name:n:page1"]);
    wait_outbox_empty(&f);
}

/// A rolled-back transaction leaves no outbox row and deletes nothing.
#[test]
fn notify_mode_a_rolled_back_transaction_invalidates_nothing() {
    let f = fixture();
    let _sidecar = f.setup.start();
    f.cache(&["item:1", "items:category:c", "plain:1"]);
    f.sql(
        "BEGIN; INSERT INTO items VALUES (1, 'n', 'c', 0); INSERT INTO plain VALUES (1, 'o'); \
         ROLLBACK;",
    );
    barrier(&f);
    f.assert_kept(&["item:1", "items:category:c", "plain:1"]);
    wait_outbox_empty(&f);
}

/// The outbox depth and the oldest row's age: in `status` and in `/metrics`, while Redis is down
/// and rows wait; back to zero once they are confirmed.
#[test]
fn notify_mode_outbox_depth_is_in_status_and_metrics() {
    let f = fixture();
    let sidecar = f.setup.start();
    f.redis.kill();
    f.sql("INSERT INTO items VALUES (1, 'n', 'c', 0), (2, 'm', 'c', 0)");
    wait_until(Duration::from_secs(30), "the gauge shows the rows", || {
        sidecar.metric("invalidator_outbox_rows") == 2.0
    });
    wait_until(Duration::from_secs(30), "the oldest row ages", || {
        sidecar.metric("invalidator_outbox_oldest_seconds") > 0.0
    });
    let (status, out) = f.setup.command(&["status"]);
    assert!(
        status.success() && out.contains("outbox: 2 rows waiting, oldest "),
        "{out}"
    );
    f.redis.start_again();
    f.cache(&["item:1", "item:2"]);
    wait_outbox_empty(&f);
    wait_until(
        Duration::from_secs(30),
        "the gauges are back to zero",
        || {
            sidecar.metric("invalidator_outbox_rows") == 0.0
                && sidecar.metric("invalidator_outbox_oldest_seconds") == 0.0
        },
    );
}

/// The trigger records exactly the columns the rules read; when the rules change, `run`
/// refuses to start until `setup` has brought the triggers up to date.
#[test]
fn notify_mode_trigger_columns_follow_the_rules() {
    let f = fixture();
    f.sql("INSERT INTO items VALUES (1, 'n', 'c', 5)");
    let stored = f.sql("SELECT new::text FROM invalidator.outbox ORDER BY id DESC LIMIT 1");
    assert_eq!(
        stored,
        r#"{"id": "1", "name": "n", "price": "5", "category": "c"}"#
    );
    f.sql("DELETE FROM invalidator.outbox");

    // A rule gains nothing new on `items` but `plain` loses `owner`; `shop.orders` gains `customer`
    // only through `changed`.
    let rules = RULES
        .replace(
            r#"keys = ["plain:{id}", "owner:{owner}"]"#,
            r#"keys = ["plain:{id}"]"#,
        )
        .replace(
            r#"keys = ["order:{id}", "customer:{customer|lower}:orders"]"#,
            "on = [\"update\"]\nchanged = [\"customer\"]\nkeys = [\"order:{id}\"]",
        );
    std::fs::write(f.setup.dir.path().join("rules/rules.toml"), &rules).expect("rules");
    let (status, out) = f.setup.command(&["run"]);
    assert_eq!(status.code(), Some(1), "{out}");
    let refusal: Vec<&str> = out.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(refusal.len(), 1, "{out}");
    assert!(
        refusal[0].contains("replace trigger invalidator_capture on public.plain")
            && refusal[0].contains("run `invalidator setup`"),
        "{out}"
    );

    let (status, out) = f.setup.command(&["setup", "--dry-run"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains(
            "BEGIN; DROP TRIGGER \"invalidator_capture\" ON \"public\".\"plain\"; CREATE TRIGGER"
        ) && out.contains(
            "capture('id'); ALTER TABLE \"public\".\"plain\" ENABLE ALWAYS TRIGGER \
             \"invalidator_capture\"; COMMIT"
        ),
        "{out}"
    );
    assert!(
        !out.contains("\"shop\".\"orders\""),
        "orders still reads (customer, id): {out}"
    );
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    assert_eq!(
        f.sql(
            "SELECT encode(tgargs, 'escape') FROM pg_trigger \
             WHERE tgrelid = 'plain'::regclass AND tgname = 'invalidator_capture'"
        ),
        r"id\000"
    );
    let (_, out) = f.setup.command(&["setup"]);
    assert!(out.contains("nothing to do"), "{out}");

    f.sql("INSERT INTO plain VALUES (1, 'secret')");
    assert_eq!(
        f.sql("SELECT new::text FROM invalidator.outbox ORDER BY id DESC LIMIT 1"),
        r#"{"id": "1"}"#
    );
    f.cache(&["plain:1"]);
    let _sidecar = f.setup.start();
    f.wait_deleted(&["plain:1"]);
    wait_outbox_empty(&f);
}

/// A disabled trigger misses every change: `run` refuses, `setup` enables it again.
#[test]
fn notify_mode_run_refuses_a_disabled_or_missing_trigger() {
    let f = fixture();
    f.sql("ALTER TABLE items DISABLE TRIGGER invalidator_capture");
    let (status, out) = f.setup.command(&["run"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("which is disabled"), "{out}");
    f.sql("DROP TRIGGER invalidator_capture_truncate ON plain");
    let (status, out) = f.setup.command(&["run"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(out.contains("capture truncates of public.plain"), "{out}");
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let _sidecar = f.setup.start();
    insert_then_update_invalidate(&f);
}

/// Writes applied with `session_replication_role = replica` (a logical replication subscriber's
/// apply worker, a restore) are invalidated too: the triggers fire always. A trigger that fires
/// only in origin sessions, as one from an older setup does, is out of date until `setup`.
#[test]
fn notify_mode_writes_of_a_replica_role_session_are_invalidated() {
    let f = fixture();
    let fires = |trigger: &str| {
        f.sql(&format!(
            "SELECT tgenabled FROM pg_trigger WHERE tgname = '{trigger}' \
             AND tgrelid = 'items'::regclass"
        ))
        .trim()
        .to_owned()
    };
    assert_eq!(fires("invalidator_capture"), "A");
    assert_eq!(fires("invalidator_capture_truncate"), "A");
    let _sidecar = f.setup.start();
    f.cache(&["item:1"]);
    f.sql(
        "SET session_replication_role = replica; \
         INSERT INTO items VALUES (1, 'n', 'c', 0)",
    );
    f.wait_deleted(&["item:1"]);
    f.cache(&["item:1"]);
    f.sql("SET session_replication_role = replica; TRUNCATE items");
    f.wait_deleted(&["item:1"]);

    f.sql("ALTER TABLE items ENABLE TRIGGER invalidator_capture");
    let (status, out) = f.setup.command(&["check"]);
    assert_ne!(status.code(), Some(0), "{out}");
    assert!(out.contains("replica"), "{out}");
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    assert_eq!(fires("invalidator_capture"), "A");
}

/// A column the rules read that the table lacks stops `setup` (and `run`) with its name.
#[test]
fn notify_mode_setup_refuses_columns_the_table_lacks() {
    let f = fixture();
    let rules = format!("{RULES}\n[[rule]]\ntable = \"plain\"\nkeys = [\"x:{{nope}}\"]\n");
    std::fs::write(f.setup.dir.path().join("rules/rules.toml"), rules).expect("rules");
    for args in [&["setup"][..], &["run"]] {
        let (status, out) = f.setup.command(args);
        assert_eq!(status.code(), Some(1), "{out}");
        assert!(
            out.contains("public.plain has no column nope (it has id, owner)"),
            "{out}"
        );
    }
}

/// Two instances: the second waits as a standby (one reader holds the advisory lock), takes
/// over when the first is killed with -9 during writes, and nothing is lost.
#[test]
fn notify_mode_a_second_instance_waits_as_standby_and_takes_over() {
    let f = fixture();
    let mut first = f.setup.start();
    let other = second_instance(&f, RULES);
    let second = other.spawn();
    wait_until(Duration::from_secs(30), "the second is a standby", || {
        second.assert_alive();
        second
            .get("/readyz")
            .is_some_and(|(status, body)| status == 503 && body.contains("standby"))
    });
    let (keys, writer) = insert_300_items_slowly(&f);
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    wait_until(Duration::from_secs(30), "some keys are deleted", || {
        keys.iter().any(|k| !f.redis.exists(k))
    });
    // Only the first deleted anything so far: the standby reads nothing.
    assert!(
        second.log().contains("waiting as a standby"),
        "{}",
        second.log()
    );
    first.kill9();
    writer.join().expect("writer");
    second.wait_ready();
    f.wait_deleted(&keys);
    wait_outbox_empty(&f);
    assert!(
        second.metric("invalidator_transactions_total") > 0.0,
        "the standby never took over"
    );
}

/// A trigger function installed before the text form of values was pinned (without its `SET`
/// clauses) writes values in the writer's settings: `check` reports it and `run` refuses to
/// start until `setup` has replaced it.
#[test]
fn an_old_capture_function_is_out_of_date_until_setup_pins_the_text_form() {
    let f = fixture();
    f.sql(
        "ALTER FUNCTION invalidator.capture() RESET ALL;
         ALTER FUNCTION invalidator.capture() SET search_path = pg_catalog, pg_temp;",
    );
    let (status, out) = f.setup.command(&["check"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("replace the trigger function invalidator.capture(), which writes values"),
        "{out}"
    );
    let (status, log) = run_to_exit(&f);
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
    assert!(
        log.contains("notify mode is not set up or out of date"),
        "{log}"
    );

    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let config = f.sql(
        "SELECT array_to_string(proconfig, ';') FROM pg_proc \
         WHERE oid = 'invalidator.capture()'::regprocedure",
    );
    assert!(
        config.contains("TimeZone=UTC;DateStyle=ISO, MDY"),
        "{config}"
    );
    let (status, out) = f.setup.command(&["check"]);
    assert_eq!(status.code(), Some(0), "{out}");
    let _sidecar = f.setup.start();
    insert_then_update_invalidate(&f);
}

/// A round of outbox rows is a transaction: past `pipeline.max_transaction_keys` its keys give
/// way to every pattern of its tables' rules, counted and logged once, as in replication mode;
/// the next round is planned row by row again.
#[test]
fn notify_mode_a_round_past_max_transaction_keys_deletes_its_tables_patterns() {
    let f = fixture();
    crate::memory::limit_transaction_keys(&f.setup, 5);
    let sidecar = f.setup.start();
    // Keys of the rows, keys of the rules that no row names, and a key of another table.
    f.cache(&["item:1", "item:20", "item:999", "price:7", "plain:1"]);
    f.sql("INSERT INTO items SELECT i, 'n', 'c', 0 FROM generate_series(1, 20) i");
    f.wait_deleted(&["item:1", "item:20", "item:999", "price:7"]);
    wait_until(Duration::from_secs(10), "the fallback is counted", || {
        sidecar.metric("invalidator_transaction_fallbacks_total") == 1.0
    });
    let log = sidecar.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("exceeded pipeline.max_transaction_keys"))
        .collect();
    assert_eq!(warnings.len(), 1, "{log}");
    assert!(
        warnings[0].contains("tables=public.items"),
        "{}",
        warnings[0]
    );
    wait_outbox_empty(&f);

    f.cache(&["item:998"]);
    f.sql("INSERT INTO items VALUES (21, 'n', 'c', 0)");
    f.wait_deleted(&["item:21"]);
    wait_outbox_empty(&f);
    f.assert_kept(&["item:998", "plain:1"]);
    assert_eq!(
        sidecar.metric("invalidator_transaction_fallbacks_total"),
        1.0
    );
}

/// Notify mode counts what replication mode counts: each change by table and operation, and
/// each rule's firings, keys and patterns.
#[test]
fn notify_mode_counts_changes_per_table_and_rule() {
    let f = fixture();
    let sidecar = f.setup.start();
    f.cache(&["item:1", "plain:1", "order:1"]);
    f.sql(
        "INSERT INTO items VALUES (1, 'a', 'c', 0), (2, 'b', 'c', 0); \
         UPDATE items SET price = 1 WHERE id = 1; \
         INSERT INTO plain VALUES (1, 'ann'); DELETE FROM plain WHERE id = 1; \
         INSERT INTO shop.orders VALUES (1, 'Bob'); TRUNCATE shop.orders",
    );
    f.wait_deleted(&["item:1", "plain:1", "order:1"]);
    wait_outbox_empty(&f);
    let expected = [
        (
            "invalidator_changes_total{table=\"public.items\",op=\"insert\"}",
            2.0,
        ),
        (
            "invalidator_changes_total{table=\"public.items\",op=\"update\"}",
            1.0,
        ),
        (
            "invalidator_changes_total{table=\"public.plain\",op=\"insert\"}",
            1.0,
        ),
        (
            "invalidator_changes_total{table=\"public.plain\",op=\"delete\"}",
            1.0,
        ),
        (
            "invalidator_changes_total{table=\"shop.orders\",op=\"insert\"}",
            1.0,
        ),
        (
            "invalidator_changes_total{table=\"shop.orders\",op=\"truncate\"}",
            1.0,
        ),
        ("invalidator_rule_fired_total{rule=\"item\"}", 3.0),
        ("invalidator_rule_fired_total{rule=\"price\"}", 1.0),
        ("invalidator_rule_fired_total{rule=\"plain\"}", 2.0),
        ("invalidator_rule_fired_total{rule=\"orders\"}", 2.0),
    ];
    wait_until(Duration::from_secs(10), "every series is counted", || {
        expected
            .iter()
            .all(|(series, value)| sidecar.metric(series) == *value)
    });
}
