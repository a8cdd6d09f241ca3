//! Least privilege: the sidecar runs as a role with REPLICATION and SELECT, not a superuser.

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Setup};
use crate::support::{PgCluster, unique_name};

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
