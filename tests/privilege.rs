//! Least privilege: the sidecar runs as a role with REPLICATION and SELECT, not a superuser.

use std::time::Duration;

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Setup};
use crate::support::{PgCluster, unique_name, wait_until};

#[test]
fn runs_as_a_role_with_only_replication_and_select() {
    let f = Fixture::new(SCHEMA, RULES);
    let role = unique_name("role");
    let password = "s3cret-never-logged";
    // The SQL the README gives, run by the owner of the tables.
    f.sql(&format!(
        "CREATE ROLE {role} WITH LOGIN REPLICATION PASSWORD '{password}';
         GRANT SELECT ON items, plain, shop.orders, sentinel TO {role};
         GRANT USAGE ON SCHEMA shop TO {role};"
    ));
    // The owner creates the publication (CREATE PUBLICATION needs table ownership).
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    assert_eq!(
        f.sql(&format!(
            "SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'"
        ))
        .trim(),
        "f"
    );

    let url = PgCluster::shared().url_as(&role, password, &f.db);
    let limited = Setup::new(&url, &f.redis.url(), RULES);
    // Same slot and publication as the owner's setup.
    let config = std::fs::read_to_string(limited.config()).unwrap();
    std::fs::write(
        limited.config(),
        config.replace(&limited.slot, &f.setup.slot),
    )
    .unwrap();
    let (status, out) = limited.command(&["check"]);
    assert!(status.success(), "{out}");
    let sidecar = limited.start();
    f.cache(&["item:1", "order:2"]);
    f.sql("INSERT INTO items VALUES (1, 'a', 'b', 0); INSERT INTO shop.orders VALUES (2, 'c')");
    f.wait_deleted(&["item:1", "order:2"]);
    assert!(
        !sidecar.log().contains(password),
        "the password reached the log"
    );
}

/// Where `output_plugin_libraries` exists (newer minor releases; set here for the test's own
/// database, which the walsender honours too) and lacks pgoutput, the server refuses the slot
/// with a bare 42501: `check` names the setting with the fix, and `run` stops saying so.
#[test]
fn an_output_plugin_allowlist_without_pgoutput_is_named_by_check_and_run() {
    let f = Fixture::new(
        "CREATE TABLE items (id int PRIMARY KEY);",
        "[[rule]]\ntable = \"items\"\nkeys = [\"item:{id}\"]\n",
    );
    let exists = f.sql("SELECT count(*) FROM pg_settings WHERE name = 'output_plugin_libraries'");
    if exists.trim() != "1" {
        eprintln!("skipped: this PostgreSQL has no output_plugin_libraries");
        return;
    }
    f.sql(&format!(
        "ALTER DATABASE \"{}\" SET output_plugin_libraries = 'test_decoding'",
        f.db
    ));
    let (status, out) = f.setup.command(&["check"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "output_plugin_libraries = 'test_decoding' does not list pgoutput, so this server \
             refuses to load it"
        ),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "fix: as a superuser: ALTER DATABASE \"{}\" SET output_plugin_libraries = \
             'test_decoding', 'pgoutput'; (new sessions use it)",
            f.db
        )),
        "{out}"
    );

    let mut sidecar = f.setup.spawn();
    wait_until(
        Duration::from_secs(30),
        "run stops naming the setting",
        || sidecar.log().contains("does not list pgoutput"),
    );
    let status = sidecar.terminate_within(Duration::from_secs(10));
    assert!(status.is_some_and(|s| !s.success()), "{}", sidecar.log());
    assert!(
        sidecar.log().contains("(the server said: "),
        "{}",
        sidecar.log()
    );

    // With pgoutput listed, the same database streams.
    f.sql(&format!(
        "ALTER DATABASE \"{}\" SET output_plugin_libraries = 'pgoutput', 'test_decoding'",
        f.db
    ));
    let (status, out) = f.setup.command(&["check"]);
    assert!(status.success(), "{out}");
    let _sidecar = f.setup.start();
}
