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

/// The README's least-privilege install by hand: the owner creates the publication, the
/// sidecar's role creates the slot before its first `run`. That first run is not a lost slot:
/// nothing is flushed, and the stream starts at once.
#[test]
fn a_publication_made_by_hand_with_its_slot_made_first_flushes_nothing_on_day_one() {
    let f = Fixture::new(SCHEMA, RULES);
    let role = unique_name("role");
    let password = "s3cret-never-logged";
    let slot = &f.setup.slot;
    f.sql(&format!(
        "CREATE ROLE {role} WITH LOGIN REPLICATION PASSWORD '{password}';
         GRANT SELECT ON items, plain, shop.orders, sentinel TO {role};
         GRANT USAGE ON SCHEMA shop TO {role};
         CREATE PUBLICATION {slot} FOR TABLE items, plain, shop.orders, sentinel;"
    ));
    let url = PgCluster::shared().url_as(&role, password, &f.db);
    let out = std::process::Command::new("psql")
        .args([url.as_str(), "-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!(
            "SELECT pg_create_logical_replication_slot('{slot}', 'pgoutput')"
        ))
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let limited = Setup::new(&url, &f.redis.url(), RULES);
    let config = std::fs::read_to_string(limited.config()).unwrap();
    std::fs::write(limited.config(), config.replace(&limited.slot, slot)).unwrap();
    // Cached before the first run and never written: only a flush would delete it.
    f.cache(&["item:99", "item:1"]);
    let sidecar = limited.start();
    f.sql("INSERT INTO items VALUES (1, 'a', 'b', 0)");
    f.wait_deleted(&["item:1"]);
    assert!(f.redis.exists("item:99"), "the first run flushed the cache");
    assert_eq!(sidecar.metric_sum("invalidator_slot_resets_total"), 0.0);
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
