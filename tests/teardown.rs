//! `invalidator teardown` as an operator runs it, against real servers: it removes what `setup`
//! and `run` created in either mode (and a Redis Functions library of its name), prints it with
//! `--dry-run`, has nothing to do the second time, and refuses while an instance runs.

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Mode, in_both_modes};

/// Sets up `mode` as a user would (`setup`, then a `run` that processed one change and stopped)
/// and replaces the Redis Functions library `setup` loaded with another of its name (as an
/// older version would have left it).
fn installed(mode: Mode) -> Fixture {
    let f = Fixture::with_mode(SCHEMA, RULES, mode);
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let mut sidecar = f.setup.start();
    f.cache(&["item:1"]);
    f.sql("INSERT INTO items VALUES (1, 'n', 'c', 0)");
    f.wait_deleted(&["item:1"]);
    sidecar.terminate();
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg("#!lua name=invalidator\nredis.register_function('noop', function() return 1 end)")
        .query(&mut f.redis.server().connection())
        .expect("FUNCTION LOAD");
    f
}

/// The first column of the first row of `sql`, trimmed.
fn one(f: &Fixture, sql: &str) -> String {
    f.sql(sql).trim().to_owned()
}

/// Whether the Redis Functions library `invalidator` is loaded.
fn has_library(f: &Fixture) -> bool {
    let libraries: Vec<redis::Value> = redis::cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg("invalidator")
        .query(&mut f.redis.server().connection())
        .expect("FUNCTION LIST");
    !libraries.is_empty()
}

/// What is left: slot, publication, schema invalidator, triggers on `items`, hstore, library.
fn left(f: &Fixture) -> [bool; 6] {
    let slot = &f.setup.slot;
    [
        one(
            f,
            &format!("SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"),
        ) != "0",
        one(
            f,
            &format!("SELECT count(*) FROM pg_publication WHERE pubname = '{slot}'"),
        ) != "0",
        one(
            f,
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'invalidator'",
        ) != "0",
        one(
            f,
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'items'::regclass \
             AND NOT tgisinternal",
        ) != "0",
        one(
            f,
            "SELECT count(*) FROM pg_extension WHERE extname = 'hstore'",
        ) != "0",
        has_library(f),
    ]
}

in_both_modes! {
    fn teardown_removes_everything_setup_and_run_created(mode: Mode) {
        let f = installed(mode);
        let before = left(&f);
        assert!(before[2] && before[5], "setup left no schema or the library is missing");
        let (status, out) = f.setup.command(&["teardown"]);
        assert!(status.success(), "{out}");
        assert!(out.contains("done: "), "{out}");
        assert_eq!(
            left(&f),
            [false; 6],
            "[slot, publication, schema, triggers, hstore, library] left after: {out}"
        );
    }

    fn teardown_refuses_while_another_instance_holds_the_slot(mode: Mode) {
        let f = installed(mode);
        let _sidecar = f.setup.start();
        let pid = match mode {
            Mode::Replication => one(
                &f,
                &format!(
                    "SELECT active_pid FROM pg_replication_slots WHERE slot_name = '{}'",
                    f.setup.slot
                ),
            ),
            Mode::Notify => one(
                &f,
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted \
                 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            ),
        };
        assert!(!pid.is_empty(), "no holder");
        let before = left(&f);
        let (status, out) = f.setup.command(&["teardown"]);
        assert_eq!(status.code(), Some(1), "{out}");
        assert!(out.contains(&format!("pid {pid}")), "{out}");
        assert!(out.contains("nothing was removed"), "{out}");
        assert_eq!(left(&f), before, "{out}");
    }
}

#[test]
fn teardown_dry_run_prints_and_changes_nothing() {
    let f = installed(Mode::Notify);
    let before = left(&f);
    let (status, out) = f.setup.command(&["teardown", "--dry-run"]);
    assert!(status.success(), "{out}");
    for expected in [
        "DROP TRIGGER IF EXISTS \"invalidator_capture\" ON \"public\".\"items\";",
        "DROP EXTENSION hstore;",
        "DROP SCHEMA \"invalidator\" CASCADE;",
        "FUNCTION DELETE invalidator",
    ] {
        assert!(out.contains(expected), "no {expected:?} in:\n{out}");
    }
    assert_eq!(left(&f), before, "{out}");

    let f = installed(Mode::Replication);
    let before = left(&f);
    let (status, out) = f.setup.command(&["teardown", "--dry-run"]);
    assert!(status.success(), "{out}");
    for expected in [
        format!("SELECT pg_drop_replication_slot('{}');", f.setup.slot),
        format!("DROP PUBLICATION \"{}\";", f.setup.slot),
        "FUNCTION DELETE invalidator".to_owned(),
    ] {
        assert!(out.contains(&expected), "no {expected:?} in:\n{out}");
    }
    assert_eq!(left(&f), before, "{out}");
}

#[test]
fn a_dry_run_script_run_as_printed_drops_nothing_but_what_it_names() {
    let f = installed(Mode::Notify);
    // A table whose name carries a statement after a line break, captured as setup would.
    let odd = "\"odd\nDROP TABLE items; --\"";
    f.sql(&format!(
        "CREATE TABLE {odd} (id int); CREATE TRIGGER t AFTER INSERT ON {odd} \
         FOR EACH ROW EXECUTE FUNCTION invalidator.capture()"
    ));
    let (status, out) = f.setup.command(&["teardown", "--dry-run"]);
    assert!(status.success(), "{out}");
    // The database's part, as an operator would pipe it to psql.
    let script = out.split("-- redis:").next().expect("the SQL part");
    f.sql(script);
    assert_eq!(
        one(&f, "SELECT to_regclass('items') IS NOT NULL"),
        "t",
        "the printed script dropped items:\n{out}"
    );
    assert_eq!(
        one(&f, "SELECT count(*) FROM pg_trigger WHERE tgname = 't'"),
        "0",
        "{out}"
    );
}

#[test]
fn teardown_is_idempotent() {
    let f = installed(Mode::Notify);
    let (status, out) = f.setup.command(&["teardown"]);
    assert!(status.success(), "{out}");
    for args in [&["teardown"][..], &["teardown", "--dry-run"]] {
        let (status, out) = f.setup.command(args);
        assert!(status.success(), "{out}");
        assert_nothing_to_remove(&out);
    }
}

/// `out` says there is nothing to remove, and lists no statement and nothing done.
fn assert_nothing_to_remove(out: &str) {
    assert!(out.starts_with("nothing to remove\n"), "{out}");
    assert!(
        !out.lines()
            .any(|l| l.starts_with("done:") || l.starts_with("-- ")),
        "{out}"
    );
}

#[test]
fn teardown_keeps_hstore_and_its_schema_while_a_table_uses_it() {
    let f = installed(Mode::Notify);
    assert_eq!(
        one(
            &f,
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n \
             ON n.oid = e.extnamespace WHERE e.extname = 'hstore'"
        ),
        "invalidator",
        "setup installs hstore in its schema"
    );
    f.sql("CREATE TABLE tagged (id int PRIMARY KEY, tags invalidator.hstore)");
    let (status, out) = f.setup.command(&["teardown"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains("kept: extension hstore and schema invalidator"),
        "{out}"
    );
    assert_eq!(
        one(
            &f,
            "SELECT to_regclass('invalidator.outbox') IS NULL \
             AND to_regprocedure('invalidator.capture()') IS NULL \
             AND to_regprocedure('invalidator.invalidate(text)') IS NULL \
             AND to_regclass('tagged') IS NOT NULL"
        ),
        "t",
        "{out}"
    );
    let (status, out) = f.setup.command(&["teardown"]);
    assert!(status.success(), "{out}");
    assert_nothing_to_remove(&out);
}

#[test]
fn teardown_keeps_a_publication_invalidator_did_not_create() {
    let f = Fixture::new(SCHEMA, RULES);
    let publication = &f.setup.slot;
    // Someone else's publication, and a slot made for it by hand.
    f.sql(&format!(
        "CREATE PUBLICATION \"{publication}\" FOR TABLE unwatched; \
         SELECT pg_create_logical_replication_slot('{publication}', 'pgoutput')"
    ));
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let (status, out) = f.setup.command(&["teardown"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains(&format!("kept: publication {publication}")),
        "{out}"
    );
    assert_eq!(
        one(
            &f,
            &format!("SELECT count(*) FROM pg_publication WHERE pubname = '{publication}'")
        ),
        "1"
    );
    let (_, out) = f.setup.command(&["teardown"]);
    assert_nothing_to_remove(&out);
}

#[test]
fn teardown_reports_an_unreachable_redis_and_removes_the_rest() {
    let f = installed(Mode::Replication);
    let config = std::fs::read_to_string(f.setup.config()).expect("read the config");
    let config = config.replace(&f.redis.url(), "redis://127.0.0.1:1/0");
    std::fs::write(f.setup.config(), config).expect("write the config");
    let (status, out) = f.setup.command(&["teardown"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains("not checked: redis redis://127.0.0.1:1/0"),
        "{out}"
    );
    let [slot, publication, schema, ..] = left(&f);
    assert!(!slot && !publication && !schema, "{out}");
}
