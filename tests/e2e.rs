//! The sidecar end to end: real Postgres, real Redis, the real binary.

use std::time::Duration;

use crate::sidecar::{Fixture, Mode, Setup, Topology, in_both_modes_and_on_a_cluster};
use crate::support::{PgCluster, RedisServer, wait_until};

pub const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, category text, price int);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE TABLE plain (id int PRIMARY KEY, owner text);
CREATE SCHEMA shop;
CREATE TABLE shop.orders (id int PRIMARY KEY, customer text);
CREATE TABLE unwatched (id int PRIMARY KEY, v text);
CREATE TABLE sentinel (id serial PRIMARY KEY);
";

pub const RULES: &str = r#"
[[rule]]
name = "item"
table = "items"
keys = ["item:{id}", "items:category:{category}", "items:name:{name}:*"]

[[rule]]
name = "price"
table = "items"
on = ["update"]
changed = ["price"]
keys = ["price:{id}"]

[[rule]]
name = "plain"
table = "plain"
keys = ["plain:{id}", "owner:{owner}"]

[[rule]]
name = "orders"
table = "shop.orders"
keys = ["order:{id}", "customer:{customer|lower}:orders"]

[[rule]]
name = "sentinel"
table = "sentinel"
keys = ["sentinel:{id}"]
"#;

fn fixture(mode: Mode, topology: Topology) -> Fixture {
    Fixture::with_mode_on(SCHEMA, RULES, mode, topology)
}

/// Inserts a sentinel row and waits for its key: every earlier commit has been processed.
pub fn barrier(f: &Fixture) {
    let id = f.sql("INSERT INTO sentinel DEFAULT VALUES RETURNING id");
    let id = id.trim();
    // The row is committed before its key is cached; cache, then touch it again to invalidate.
    f.cache(&[&format!("sentinel:{id}")]);
    f.sql(&format!("UPDATE sentinel SET id = id WHERE id = {id}"));
    f.wait_deleted(&[&format!("sentinel:{id}")]);
}

/// An insert deletes the keys of the new row; an update those of the old and the new row.
pub fn insert_then_update_invalidate(f: &Fixture) {
    f.cache(&[
        "item:1",
        "items:category:cars",
        "items:name:alpha:page1",
        "item:2",
    ]);
    f.sql("INSERT INTO items VALUES (1, 'alpha', 'cars', 10)");
    f.wait_deleted(&["item:1", "items:category:cars", "items:name:alpha:page1"]);
    f.assert_kept(&["item:2"]);

    f.cache(&["item:1", "items:category:cars", "items:category:boats"]);
    f.sql("UPDATE items SET category = 'boats' WHERE id = 1");
    f.wait_deleted(&["item:1", "items:category:cars", "items:category:boats"]);
}

/// TRUNCATE deletes every key of the table's rules that fire on it, with each placeholder `*`;
/// other tables' keys and rules without `truncate` in `on` stay.
fn truncate_deletes_every_key_of_the_table(f: &Fixture) {
    f.sql("INSERT INTO items VALUES (3, 'c', 'x', 1), (4, 'd', 'y', 1)");
    barrier(f);
    f.cache(&[
        "item:3",
        "item:4",
        "items:category:anything",
        "price:9",
        "plain:99",
    ]);
    f.sql("TRUNCATE items");
    f.wait_deleted(&["item:3", "item:4", "items:category:anything"]);
    barrier(f);
    // Rule "price" lists only updates in `on`, so a truncate does not fire it.
    f.assert_kept(&["plain:99", "price:9"]);
}

in_both_modes_and_on_a_cluster! {
    fn insert_update_delete_and_truncate_delete_their_keys(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let _sidecar = f.setup.start();

        insert_then_update_invalidate(&f);

        f.cache(&["item:1", "items:category:boats"]);
        f.sql("DELETE FROM items WHERE id = 1");
        f.wait_deleted(&["item:1", "items:category:boats"]);

        truncate_deletes_every_key_of_the_table(&f);
    }

    fn changed_fires_only_when_its_columns_change(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let _sidecar = f.setup.start();
        f.sql("INSERT INTO items VALUES (1, 'alpha', 'cars', 10)");
        barrier(&f);

        f.cache(&["price:1"]);
        f.sql("UPDATE items SET name = 'beta' WHERE id = 1");
        barrier(&f);
        f.assert_kept(&["price:1"]);

        f.sql("UPDATE items SET price = 11 WHERE id = 1");
        f.wait_deleted(&["price:1"]);
    }

    fn row_values_with_glob_characters_never_widen_a_deletion(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let _sidecar = f.setup.start();
        let bystanders = [
            "items:name:abc:page1",
            "items:name:x:page1",
            "items:name:a:page1",
            "items:category:a",
            "items:category:b",
            "item:12",
        ];
        f.cache(&bystanders);
        f.cache(&[
            "items:name:*:page1",
            "items:name:?:page1",
            "items:name:[a]:page1",
            r"items:name:\:page1",
            "items:category:[ab]",
            "items:category:*",
        ]);
        f.sql(
            r"INSERT INTO items VALUES (1, '*', '[ab]', 0), (2, '?', '*', 0), (3, '[a]', NULL, 0), (4, '\', NULL, 0)",
        );
        f.wait_deleted(&[
            "items:name:*:page1",
            "items:name:?:page1",
            "items:name:[a]:page1",
            r"items:name:\:page1",
            "items:category:[ab]",
            "items:category:*",
        ]);
        barrier(&f);
        f.assert_kept(&bystanders);
    }

    fn a_null_value_renders_no_key(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let _sidecar = f.setup.start();
        f.cache(&[
            "items:category:",
            "items:category:null",
            "items:category:NULL",
            "item:1",
        ]);
        f.sql("INSERT INTO items VALUES (1, 'n', NULL, 0)");
        f.wait_deleted(&["item:1"]);
        barrier(&f);
        f.assert_kept(&[
            "items:category:",
            "items:category:null",
            "items:category:NULL",
        ]);
    }

    fn a_delete_under_default_replica_identity_never_misses_a_key(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let _sidecar = f.setup.start();
        f.sql("INSERT INTO plain VALUES (1, 'bob'), (2, 'alice')");
        barrier(&f);
        f.cache(&["plain:1", "owner:bob", "owner:alice", "plain:2"]);
        f.sql("DELETE FROM plain WHERE id = 1");
        f.wait_deleted(&["plain:1", "owner:bob"]);
        barrier(&f);
        match mode {
            // The old row in the WAL carries only the primary key: owner is unknown, so
            // owner:{owner} broadens to owner:* and alice's key goes too.
            Mode::Replication => assert!(
                !f.redis.exists("owner:alice"),
                "owner:{{owner}} should have become owner:*"
            ),
            // The trigger sees the whole old row: the key is exact.
            Mode::Notify => f.assert_kept(&["owner:alice"]),
        }
        f.assert_kept(&["plain:2"]);
    }

    fn a_table_outside_public_with_a_filter(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let _sidecar = f.setup.start();
        f.cache(&["order:7", "customer:alice:orders", "customer:ALICE:orders"]);
        f.sql("INSERT INTO shop.orders VALUES (7, 'ALICE')");
        f.wait_deleted(&["order:7", "customer:alice:orders"]);
        f.assert_kept(&["customer:ALICE:orders"]);
    }

    fn unicode_values_render_byte_for_byte(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let _sidecar = f.setup.start();
        let keys = ["items:category:Zürich 東京 🚗", "items:name:Ünïcødé:p"];
        f.cache(&keys);
        f.cache(&["items:category:Zurich"]);
        f.sql("INSERT INTO items VALUES (1, 'Ünïcødé', 'Zürich 東京 🚗', 0)");
        f.wait_deleted(&keys);
        f.assert_kept(&["items:category:Zurich"]);
    }

    fn a_ten_thousand_row_transaction_deletes_every_key(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let _sidecar = f.setup.start();
        let keys: Vec<String> = (1..=10_000).map(|i| format!("item:{i}")).collect();
        f.redis.set_keys(keys.iter());
        f.sql(
            "INSERT INTO items SELECT i, 'n' || i, 'c' || (i % 10), i FROM generate_series(1, 10000) i",
        );
        wait_until(Duration::from_secs(60), "10k keys are deleted", || {
            f.redis.scan_keys("item:*").is_empty()
        });
    }

    fn changes_of_tables_without_rules_delete_nothing(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let sidecar = f.setup.start();
        f.cache(&["unwatched:1", "item:1", "1"]);
        f.sql("INSERT INTO unwatched VALUES (1, 'x'); UPDATE unwatched SET v = 'y'; DELETE FROM unwatched");
        barrier(&f);
        f.assert_kept(&["unwatched:1", "item:1", "1"]);
        let body = sidecar.get("/metrics").unwrap().1;
        assert!(
            !body.contains("unwatched"),
            "unwatched changes were read: {body}"
        );
    }

    fn kill_9_during_a_stream_of_commits_loses_nothing(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        const N: usize = 600;
        let keys: Vec<String> = (1..=N).map(|i| format!("item:{i}")).collect();
        f.redis.set_keys(keys.iter());
        let mut sidecar = f.setup.start();
        let db = f.db.clone();
        let writer = std::thread::spawn(move || {
            for chunk in (1..=N).collect::<Vec<_>>().chunks(20) {
                // One commit per row, 20 rows per psql call.
                let sql: String = chunk
                    .iter()
                    .map(|i| format!("INSERT INTO items VALUES ({i}, 'n', 'c', 0);"))
                    .collect();
                PgCluster::shared().psql(&db, &sql);
            }
        });
        // Kill the sidecar three times while commits stream, restarting it each time.
        for round in 1..=3 {
            wait_until(Duration::from_secs(30), "some keys are deleted", || {
                f.redis.scan_keys("item:*").len() < N * (4 - round) / 4 + 1
            });
            sidecar.kill9();
            sidecar = f.setup.start();
        }
        writer.join().unwrap();
        wait_until(Duration::from_secs(60), "every key is deleted", || {
            f.redis.scan_keys("item:*").is_empty()
        });
        drop(sidecar);
    }

    fn sigterm_exits_zero_after_acknowledging(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let mut sidecar = f.setup.start();
        f.cache(&["item:1"]);
        f.sql("INSERT INTO items VALUES (1, 'a', 'b', 0)");
        f.wait_deleted(&["item:1"]);
        let status = sidecar.terminate();
        assert!(
            status.success(),
            "exit status {status}; log:\n{}",
            sidecar.log()
        );
        // The slot's confirmed position (or the outbox) covers the insert: nothing is left to
        // replay.
        f.wait_acknowledged(mode);
    }

    fn http_endpoints_answer(mode: Mode, topology: Topology) {
        let f = fixture(mode, topology);
        let sidecar = f.setup.start();
        assert_eq!(sidecar.get("/healthz").map(|r| r.0), Some(200));
        assert_eq!(sidecar.get("/readyz").map(|r| r.0), Some(200));
        f.cache(&["item:1"]);
        f.sql("INSERT INTO items VALUES (1, 'a', 'b', 0)");
        f.wait_deleted(&["item:1"]);
        // The delay histogram is recorded just after the acknowledgement, so it may trail the
        // delete by a moment.
        wait_until(Duration::from_secs(10), "the delay histogram has a sample", || {
            sidecar.metric("invalidator_commit_to_delete_seconds_count") >= 1.0
        });
        let metrics = sidecar.get("/metrics").unwrap().1;
        for series in [
            "invalidator_changes_total{",
            "invalidator_keys_deleted_total",
            "invalidator_patterns_total",
            "invalidator_scan_calls_total",
            "invalidator_commit_to_delete_seconds_bucket",
            "invalidator_confirmed_lsn",
            "invalidator_replication_lag_bytes",
        ] {
            assert!(
                metrics.contains(series),
                "{series} missing from:\n{metrics}"
            );
        }
        assert!(sidecar.metric("invalidator_keys_deleted_total") >= 1.0);
    }

    fn values_of_any_type_render_in_postgres_text_form(mode: Mode, topology: Topology) {
        let schema = "
            CREATE TYPE mood AS ENUM ('happy', 'sad');
            CREATE DOMAIN positive AS int CHECK (VALUE > 0);
            CREATE TABLE exotic (id int PRIMARY KEY, m mood, tags text[], doc jsonb, p positive,
                                 at timestamptz, r numrange, b boolean);
            CREATE TABLE sentinel (id serial PRIMARY KEY);";
        let rules = r#"
            [[rule]]
            table = "exotic"
            keys = ["x:{m}:{tags}:{p}:{b}", "doc:{doc}", "day:{at|date}", "range:{r}"]
            [[rule]]
            table = "sentinel"
            keys = ["sentinel:{id}"]
        "#;
        let f = Fixture::with_mode_on(schema, rules, mode, topology);
        let _sidecar = f.setup.start();
        let keys = [
            "x:happy:{a,\"b c\"}:7:t",
            r#"doc:{"k": [1, 2]}"#,
            "day:2026-11-26",
            "range:[1.5,3)",
        ];
        f.cache(&keys);
        f.sql(
            "SET timezone = 'UTC'; INSERT INTO exotic VALUES (1, 'happy', ARRAY['a', 'b c'], \
             '{\"k\": [1, 2]}', 7, '2026-11-26 23:00:00+00', '[1.5,3)', true)",
        );
        f.wait_deleted(&keys);
    }
}

#[test]
fn malformed_rules_make_check_and_run_exit_2_naming_the_file() {
    let redis = RedisServer::start();
    let setup = Setup::new(
        "postgres://nobody@127.0.0.1:1/none",
        &redis.url(),
        "[[rule]]\ntable = \"items\"\nkeys = [\"item:{id\"]\n",
    );
    for args in [&["check", "--offline"][..], &["check"], &["run"]] {
        let (status, out) = setup.command(args);
        assert_eq!(status.code(), Some(2), "{args:?}: {out}");
        assert!(
            out.contains("rules.toml:3"),
            "{args:?} does not name file and line: {out}"
        );
    }
}

#[test]
fn check_reports_missing_columns_and_broadening_rules() {
    let rules = format!(
        "{RULES}\n[[rule]]\nname = \"ghost\"\ntable = \"items\"\nkeys = [\"ghost:{{nope}}\"]\n"
    );
    let f = Fixture::new(SCHEMA, &rules);
    let (status, out) = f.setup.command(&["check"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains("rule \"ghost\"") && out.contains("nope"),
        "{out}"
    );
    assert!(
        out.contains("rule \"plain\"") && out.contains("owner"),
        "{out}"
    );
    assert!(
        !out.contains("rule \"item\""),
        "items has REPLICA IDENTITY FULL: {out}"
    );
}

#[test]
fn setup_is_idempotent_and_status_reports_the_slot() {
    let f = fixture(Mode::Replication, Topology::Single);
    let (status, out) = f.setup.command(&["setup", "--dry-run"]);
    assert!(status.success(), "{out}");
    assert!(out.contains("CREATE PUBLICATION"), "{out}");
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success() && out.contains("nothing to do"), "{out}");
    let (status, out) = f.setup.command(&["status"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("slot {}: inactive", f.setup.slot)),
        "{out}"
    );
}

#[test]
fn with_key_index_the_rules_pattern_prefixes_are_indexed_and_resolve_patterns_end_to_end() {
    let f = fixture(Mode::Replication, Topology::Single);
    let path = f.setup.config();
    let config = std::fs::read_to_string(&path).expect("read the config");
    let config = config.replacen("[redis]\n", "[redis]\nkey_index = true\n", 1);
    std::fs::write(&path, config).expect("write the config");
    let sidecar = f.setup.start();
    wait_until(Duration::from_secs(20), "the key index is ready", || {
        sidecar
            .get("/readyz")
            .is_some_and(|(status, body)| status == 200 && !body.contains("note: key index"))
    });
    // `items:name:{name}:*` is the rules' one pattern template: its prefix is indexed.
    f.cache(&[
        "items:name:alpha:page1",
        "items:name:alpha:page2",
        "items:name:beta:1",
    ]);
    f.sql("INSERT INTO items VALUES (1, 'alpha', 'cars', 10)");
    f.wait_deleted(&["items:name:alpha:page1", "items:name:alpha:page2"]);
    barrier(&f);
    f.assert_kept(&["items:name:beta:1"]);
    wait_until(Duration::from_secs(10), "the resolution is counted", || {
        sidecar.metric("invalidator_key_index_resolutions_total") >= 1.0
    });
    let metrics = sidecar.get("/metrics").unwrap().1;
    for reason in invalidator::redis::KEY_INDEX_FALLBACKS {
        let series = format!("invalidator_key_index_fallbacks_total{{reason=\"{reason}\"}}");
        assert!(
            metrics.contains(&series),
            "{series} missing from:\n{metrics}"
        );
    }
    assert!(metrics.contains("invalidator_key_index_keys"), "{metrics}");
}
