//! `invalidator.invalidate(key_or_pattern)`, called by applications inside their own
//! transactions, in both modes: the real binary, real Postgres and Redis.

use crate::e2e::{RULES, SCHEMA, barrier};
use crate::sidecar::{Fixture, Mode, in_both_modes};
use crate::support::{PgCluster, unique_name};

/// The prefixes the tests invalidate under, besides the rules' own.
const PREFIXES: &str = r#"prefixes = ["user:", "feed:", "weird", "path", "{user:"]"#;

/// A fixture in `mode` with `[invalidate]` set to `section`, on which `setup` has run (it
/// creates the functions in both modes).
fn fixture_with(mode: Mode, section: &str) -> Fixture {
    let f = Fixture::with_mode(SCHEMA, RULES, Mode::Replication);
    set_invalidate(&f, section);
    f.use_mode(mode);
    if mode == Mode::Replication {
        let (status, out) = f.setup.command(&["setup"]);
        assert!(status.success(), "{out}");
    }
    f
}

/// A fixture with the test prefixes and no roles.
fn fixture(mode: Mode) -> Fixture {
    fixture_with(mode, PREFIXES)
}

/// Replaces the `[invalidate]` section of the configuration with `section`.
fn set_invalidate(f: &Fixture, section: &str) {
    let path = f.setup.config();
    let config = std::fs::read_to_string(&path).expect("read the config");
    let kept = config
        .split_once("\n[invalidate]\n")
        .map_or(config.as_str(), |(before, _)| before);
    std::fs::write(&path, format!("{kept}\n[invalidate]\n{section}\n")).expect("write the config");
}

/// Runs `sql` in the test's database; returns psql's error output when it fails.
fn try_sql(f: &Fixture, sql: &str) -> Result<String, String> {
    PgCluster::shared().try_psql(&f.db, sql)
}

/// A role with LOGIN and no privileges, which is dropped with the cluster.
fn role(f: &Fixture) -> String {
    let role = unique_name("app");
    f.sql(&format!("CREATE ROLE {role}"));
    role
}

in_both_modes! {
    fn invalidate_deletes_a_key_a_pattern_and_a_key_with_escaped_glob_bytes(mode: Mode) {
        let f = fixture(mode);
        let _sidecar = f.setup.start();
        let deleted = ["user:1", "feed:1:a", "feed:1:b", "weird*key", r"path\to", "{user:1}:x"];
        let kept = [
            "user:2", "user:10", "feed:2:a", "weirdXkey", r"weird\*key", "pathto", "{user:2}:x",
        ];
        f.cache(&deleted);
        f.cache(&kept);
        f.sql(
            r"SELECT invalidator.invalidate('user:1');
              SELECT invalidator.invalidate('feed:1:*');
              SELECT invalidator.invalidate('weird\*key');
              SELECT invalidator.invalidate('path\to');
              SELECT invalidator.invalidate('{user:1}:x');",
        );
        f.wait_deleted(&deleted);
        barrier(&f);
        f.assert_kept(&kept);
    }

    fn invalidate_is_atomic_with_its_transaction(mode: Mode) {
        let f = fixture(mode);
        let _sidecar = f.setup.start();
        // Committed beside a row write: both go.
        f.cache(&["item:1", "user:1", "user:1:feed"]);
        f.sql(
            "BEGIN; INSERT INTO items VALUES (1, 'n', 'c', 0);
             SELECT invalidator.invalidate('user:1'); SELECT invalidator.invalidate('user:1:*');
             COMMIT;",
        );
        f.wait_deleted(&["item:1", "user:1", "user:1:feed"]);

        // Rolled back: nothing goes, neither the row's keys nor the ones given by hand.
        f.cache(&["item:2", "user:2", "user:2:feed"]);
        f.sql(
            "BEGIN; INSERT INTO items VALUES (2, 'n', 'c', 0);
             SELECT invalidator.invalidate('user:2'); SELECT invalidator.invalidate('user:2:*');
             ROLLBACK;",
        );
        barrier(&f);
        f.assert_kept(&["item:2", "user:2", "user:2:feed"]);

        // A NULL or empty argument is the caller's bug: an error in their transaction.
        for arg in ["''", "NULL"] {
            let err = PgCluster::shared()
                .try_psql(&f.db, &format!("SELECT invalidator.invalidate({arg})"))
                .expect_err("an empty argument is refused");
            assert!(err.contains("needs a key or a pattern"), "{err}");
        }
    }

    fn invalidate_can_be_called_by_a_configured_role_without_other_privileges(mode: Mode) {
        let role = unique_name("app");
        PgCluster::shared().psql("postgres", &format!("CREATE ROLE {role}"));
        let f = fixture_with(mode, &format!("{PREFIXES}\nroles = [\"{role}\"]"));
        let _sidecar = f.setup.start();
        f.cache(&["user:3", "user:4"]);
        f.sql(&format!(
            "SET ROLE {role}; SELECT invalidator.invalidate('user:3');
             SELECT invalidator.invalidate_key('user:4'); RESET ROLE;"
        ));
        f.wait_deleted(&["user:3", "user:4"]);
    }

    fn a_role_without_execute_on_invalidate_cannot_delete(mode: Mode) {
        let f = fixture(mode);
        let sidecar = f.setup.start();
        let role = role(&f);
        f.cache(&["user:3", "user:4"]);
        for call in ["invalidator.invalidate('user:3')", "invalidator.invalidate_key('user:4')"] {
            let err = try_sql(&f, &format!("SET ROLE {role}; SELECT {call}"))
                .expect_err("a role without EXECUTE is refused");
            assert!(err.contains("permission denied"), "{err}");
        }
        // Nor can it write what the functions write, or make a trigger write the outbox.
        let writes = match mode {
            Mode::Replication => vec![
                "INSERT INTO invalidator.requests (key_or_pattern, literal) VALUES ('user:3', false)",
            ],
            Mode::Notify => vec![
                "INSERT INTO invalidator.outbox (table_schema, table_name, op, new) \
                 VALUES ('', '', 'invalidate', '\"user:3\"')",
            ],
        };
        for write in writes {
            let err = try_sql(&f, &format!("SET ROLE {role}; {write}"))
                .expect_err("a role without privileges cannot write the table");
            assert!(err.contains("permission denied"), "{err}");
        }
        if mode == Mode::Notify {
            let table = unique_name("mine");
            f.sql(&format!("CREATE TABLE {table} (id int); ALTER TABLE {table} OWNER TO {role}"));
            let err = try_sql(
                &f,
                &format!(
                    "SET ROLE {role}; CREATE TRIGGER t AFTER INSERT ON {table} FOR EACH \
                     STATEMENT EXECUTE FUNCTION invalidator.capture()"
                ),
            )
            .expect_err("capture() is not for other roles' tables");
            assert!(err.contains("permission denied"), "{err}");
        }
        barrier(&f);
        f.assert_kept(&["user:3", "user:4"]);
        sidecar.assert_alive();
    }

    fn setup_grants_invalidate_only_to_the_configured_roles(mode: Mode) {
        let app = unique_name("app");
        let other = unique_name("other");
        PgCluster::shared().psql("postgres", &format!("CREATE ROLE {app}; CREATE ROLE {other}"));
        let f = fixture_with(mode, &format!("{PREFIXES}\nroles = [\"{app}\"]"));
        let may = |role: &str, function: &str| {
            f.sql(&format!(
                "SELECT has_function_privilege('{role}', 'invalidator.{function}(text)', 'EXECUTE')"
            ))
            .trim()
                == "t"
        };
        let public = |function: &str| {
            f.sql(&format!(
                "SELECT count(*) FROM pg_proc p, aclexplode(coalesce(p.proacl, \
                 acldefault('f', p.proowner))) a WHERE p.oid = \
                 to_regprocedure('invalidator.{function}') AND a.grantee = 0"
            ))
            .trim()
                != "0"
        };
        for function in ["invalidate", "invalidate_key"] {
            assert!(may(&app, function), "{app} may call {function}()");
            assert!(!may(&other, function), "{other} may not call {function}()");
            assert!(!public(&format!("{function}(text)")), "PUBLIC may not call {function}()");
        }
        if mode == Mode::Notify {
            assert!(!public("capture()"), "PUBLIC may not use capture()");
        }
        let (_, out) = f.setup.command(&["setup"]);
        assert!(out.contains("nothing to do"), "{out}");

        // No roles configured: the grant goes at the next setup, and only superusers may call.
        set_invalidate(&f, PREFIXES);
        let (status, out) = f.setup.command(&["setup", "--dry-run"]);
        assert!(status.success() && out.contains("REVOKE ALL ON FUNCTION"), "{out}");
        let (status, out) = f.setup.command(&["setup"]);
        assert!(status.success(), "{out}");
        for function in ["invalidate", "invalidate_key"] {
            assert!(!may(&app, function), "{app} may no longer call {function}()");
        }
        let (_, out) = f.setup.command(&["setup"]);
        assert!(out.contains("nothing to do"), "{out}");
    }

    fn invalidate_refuses_a_key_outside_the_allowed_prefixes_in_the_callers_transaction(m: Mode) {
        let f = fixture(m);
        let _sidecar = f.setup.start();
        f.cache(&["secret:1", "item:7", "user:5"]);
        for (call, error) in [
            ("invalidator.invalidate('secret:1')", "outside the allowed key prefixes"),
            ("invalidator.invalidate('secre*')", "outside the allowed key prefixes"),
            ("invalidator.invalidate_key('secret:1')", "outside the allowed key prefixes"),
            ("invalidator.invalidate('*')", "has no literal prefix"),
            ("invalidator.invalidate('[u]ser:5')", "has no literal prefix"),
        ] {
            let err = try_sql(
                &f,
                &format!("BEGIN; INSERT INTO items VALUES (7, 'n', 'c', 0); SELECT {call}; COMMIT;"),
            )
            .expect_err("a key outside the allow-list is refused");
            assert!(err.contains(error), "{call}: {err}");
        }
        // The error rolled back the caller's transaction: its write is gone with it.
        assert_eq!(f.sql("SELECT count(*) FROM items WHERE id = 7").trim(), "0");
        // The rules' own prefixes are allowed by default.
        f.sql("SELECT invalidator.invalidate('item:7')");
        f.wait_deleted(&["item:7"]);
        barrier(&f);
        f.assert_kept(&["secret:1", "user:5"]);
    }

    fn invalidate_key_never_widens_to_a_pattern(mode: Mode) {
        let f = fixture(mode);
        let _sidecar = f.setup.start();
        let deleted = ["user:*", r"user:\*", "user:[12]"];
        let kept = ["user:1", "user:2", "user:x"];
        f.cache(&deleted);
        f.cache(&kept);
        f.sql(
            r"SELECT invalidator.invalidate_key('user:*');
              SELECT invalidator.invalidate_key('user:\*');
              SELECT invalidator.invalidate_key('user:[12]');",
        );
        f.wait_deleted(&deleted);
        barrier(&f);
        f.assert_kept(&kept);
    }

    fn a_stale_allow_list_in_the_database_cannot_widen_what_the_sidecar_deletes(mode: Mode) {
        let f = fixture_with(mode, r#"prefixes = ["user:", "extra:"]"#);
        // The sidecar runs with a narrower list than the one setup wrote into the functions.
        set_invalidate(&f, r#"prefixes = ["user:"]"#);
        let sidecar = f.setup.start();
        f.cache(&["extra:1", "user:1"]);
        f.sql("SELECT invalidator.invalidate('extra:*'); SELECT invalidator.invalidate('user:1');");
        f.wait_deleted(&["user:1"]);
        barrier(&f);
        f.assert_kept(&["extra:1"]);
        let ignored = r#"invalidator_ignored_invalidations_total{reason="outside_prefixes"}"#;
        assert_eq!(sidecar.metric(ignored), 1.0);
        assert!(sidecar.log().contains("out of date"), "{}", sidecar.log());
    }
}

/// A logical decoding message with invalidator's prefix, which any role can emit (even in a
/// read-only transaction, without EXECUTE on `invalidate()`), deletes nothing, inside a
/// transaction or outside one; it is counted and logged.
#[test]
fn an_emitted_message_that_did_not_come_through_invalidate_deletes_nothing() {
    let f = fixture(Mode::Replication);
    let sidecar = f.setup.start();
    let role = role(&f);
    f.cache(&["user:9", "item:1", "sentinel:x"]);
    f.sql(&format!(
        "SET ROLE {role};
         BEGIN READ ONLY; SELECT pg_logical_emit_message(true, 'invalidator', '*'); COMMIT;
         SELECT pg_logical_emit_message(false, 'invalidator', 'user:9');
         RESET ROLE;"
    ));
    barrier(&f);
    f.assert_kept(&["user:9", "item:1", "sentinel:x"]);
    let ignored = r#"invalidator_ignored_invalidations_total{reason="emitted_message"}"#;
    assert_eq!(sidecar.metric(ignored), 2.0);
    for reason in ["outside_prefixes", "no_literal_prefix"] {
        let series = format!("invalidator_ignored_invalidations_total{{reason=\"{reason}\"}} 0");
        let (_, body) = sidecar.get("/metrics").expect("metrics answer");
        assert!(body.contains(&series), "{body}");
    }
}

/// In replication mode `setup` creates the function (and `--dry-run` shows it); `run` does not,
/// since its role may lack CREATE on the database.
#[test]
fn replication_mode_setup_creates_the_function_and_run_does_not() {
    let f = Fixture::with_mode(SCHEMA, RULES, Mode::Replication);
    set_invalidate(&f, PREFIXES);
    let exists = || {
        f.sql("SELECT count(*) FROM pg_proc WHERE oid = to_regprocedure('invalidator.invalidate(text)')")
            .trim()
            .to_owned()
    };
    let sidecar = f.setup.start();
    assert_eq!(exists(), "0");
    drop(sidecar);
    let (status, out) = f.setup.command(&["setup", "--dry-run"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains("CREATE OR REPLACE FUNCTION \"invalidator\".invalidate(key_or_pattern text)")
            && out.contains("INSERT INTO invalidator.requests")
            && out.contains("ADD TABLE \"invalidator\".\"requests\""),
        "{out}"
    );
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    assert_eq!(exists(), "1");
    let (_, out) = f.setup.command(&["setup"]);
    assert!(out.contains("nothing to do"), "{out}");
}

/// `invalidator.requests` taken out of the publication is added back while running, like a
/// rule table: manual invalidations are seen again.
#[test]
fn replication_mode_the_requests_table_is_put_back_into_the_publication() {
    let f = fixture(Mode::Replication);
    let sidecar = f.setup.start();
    f.sql(&format!(
        "ALTER PUBLICATION \"{}\" DROP TABLE invalidator.requests",
        f.setup.slot
    ));
    crate::support::wait_until(
        std::time::Duration::from_secs(30),
        "invalidator.requests is published again",
        || {
            f.sql(&format!(
                "SELECT count(*) FROM pg_publication_tables WHERE pubname = '{}' \
                 AND schemaname = 'invalidator' AND tablename = 'requests'",
                f.setup.slot
            ))
            .trim()
                == "1"
        },
    );
    f.cache(&["user:11"]);
    f.sql("SELECT invalidator.invalidate('user:11')");
    f.wait_deleted(&["user:11"]);
    assert!(
        sidecar.log().contains("invalidator.requests"),
        "{}",
        sidecar.log()
    );
}

/// A requests table made by an older `setup` lacks the column the publication repair writes:
/// `run` says it is out of date (manual invalidations still work), and `setup` adds it.
#[test]
fn replication_mode_setup_adds_the_repair_column_to_an_older_requests_table() {
    let f = fixture(Mode::Replication);
    f.sql("ALTER TABLE invalidator.requests DROP COLUMN repair");
    let sidecar = f.setup.start();
    f.cache(&["user:12"]);
    f.sql("SELECT invalidator.invalidate('user:12')");
    f.wait_deleted(&["user:12"]);
    let log = sidecar.log();
    assert!(log.contains("add the column repair"), "{log}");
    drop(sidecar);
    let (status, out) = f.setup.command(&["setup", "--dry-run"]);
    assert!(status.success(), "{out}");
    assert!(
        out.contains("ADD COLUMN IF NOT EXISTS repair text"),
        "{out}"
    );
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let (_, out) = f.setup.command(&["setup"]);
    assert!(out.contains("nothing to do"), "{out}");
}
