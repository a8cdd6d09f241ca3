//! `invalidator.invalidate(key_or_pattern)`, called by applications inside their own
//! transactions, in both modes: the real binary, real Postgres and Redis.

use crate::e2e::{RULES, SCHEMA, barrier};
use crate::sidecar::{Fixture, Mode, in_both_modes};
use crate::support::{PgCluster, unique_name};

/// A fixture in `mode` on which `setup` has run (it creates the function in both modes).
fn fixture(mode: Mode) -> Fixture {
    let f = Fixture::with_mode(SCHEMA, RULES, mode);
    if mode == Mode::Replication {
        let (status, out) = f.setup.command(&["setup"]);
        assert!(status.success(), "{out}");
    }
    f
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

    fn invalidate_can_be_called_by_a_role_without_other_privileges(mode: Mode) {
        let f = fixture(mode);
        let _sidecar = f.setup.start();
        let role = unique_name("app");
        f.sql(&format!("CREATE ROLE {role}"));
        f.cache(&["user:3"]);
        f.sql(&format!(
            "SET ROLE {role}; SELECT invalidator.invalidate('user:3'); RESET ROLE;"
        ));
        f.wait_deleted(&["user:3"]);
    }
}

/// `pg_logical_emit_message(false, ...)` with our prefix is sent outside any transaction: it is
/// invalidated as a transaction of its own.
#[test]
fn replication_mode_a_non_transactional_message_is_invalidated() {
    let f = fixture(Mode::Replication);
    let _sidecar = f.setup.start();
    f.cache(&["user:9", "user:10"]);
    f.sql("SELECT pg_logical_emit_message(false, 'invalidator', 'user:9')");
    f.wait_deleted(&["user:9"]);
    barrier(&f);
    f.assert_kept(&["user:10"]);
}

/// In replication mode `setup` creates the function (and `--dry-run` shows it); `run` does not,
/// since its role may lack CREATE on the database.
#[test]
fn replication_mode_setup_creates_the_function_and_run_does_not() {
    let f = Fixture::with_mode(SCHEMA, RULES, Mode::Replication);
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
            && out.contains("pg_logical_emit_message(true, ''invalidator'', key_or_pattern)"),
        "{out}"
    );
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    assert_eq!(exists(), "1");
    let (_, out) = f.setup.command(&["setup"]);
    assert!(out.contains("nothing to do"), "{out}");
}
