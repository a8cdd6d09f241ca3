//! Attacks on what `setup`, `run` and `teardown` trust, by roles that should not be able to
//! cause a deletion or gain anything: the real binary against real Postgres and Redis.

use crate::e2e::{RULES, SCHEMA, barrier};
use crate::sidecar::{Fixture, Mode};
use crate::support::{PgCluster, unique_name};

/// A role without privileges except CREATE on the fixture's database (what a database owner,
/// often the application's own role, has), which creates schema `invalidator` before the
/// operator's first `setup`.
fn squatter(f: &Fixture) -> String {
    let role = unique_name("mallory");
    PgCluster::shared().psql("postgres", &format!("CREATE ROLE {role}"));
    f.sql(&format!(
        "GRANT CREATE ON DATABASE \"{}\" TO {role}; SET ROLE {role}; CREATE SCHEMA invalidator;",
        f.db
    ));
    role
}

/// Whether `role` is a superuser now.
fn is_superuser(role: &str) -> bool {
    PgCluster::shared()
        .psql(
            "postgres",
            &format!("SELECT rolsuper FROM pg_roles WHERE rolname = '{role}'"),
        )
        .trim()
        == "t"
}

#[test]
fn a_role_that_created_schema_invalidator_before_setup_cannot_delete() {
    let f = Fixture::new(SCHEMA, RULES);
    let role = squatter(&f);
    f.sql(&format!(
        "SET ROLE {role}; CREATE TABLE invalidator.requests (id bigserial PRIMARY KEY, \
         key_or_pattern text NOT NULL, literal boolean NOT NULL DEFAULT false)"
    ));
    // The operator's setup, as a superuser, with no [invalidate] roles: nobody may invalidate.
    let (status, out) = f.setup.command(&["setup"]);
    let _sidecar = status.success().then(|| f.setup.start());
    f.cache(&["item:1", "item:2"]);
    let _ = PgCluster::shared().try_psql(
        &f.db,
        &format!(
            "SET ROLE {role}; INSERT INTO invalidator.requests (key_or_pattern) VALUES ('item:*')"
        ),
    );
    if status.success() {
        barrier(&f);
    }
    f.assert_kept(&["item:1", "item:2"]);
    assert!(
        !status.success() && out.contains(&role),
        "setup should refuse a schema invalidator owned by {role}: {out}"
    );
}

#[test]
fn a_role_that_created_schema_invalidator_before_setup_gains_nothing_from_capture() {
    let f = Fixture::new(SCHEMA, RULES);
    let role = squatter(&f);
    // The operator switches to notify mode and runs setup (as a superuser): it installs hstore
    // in the squatter's schema and capture() (SECURITY DEFINER) calls invalidator.hstore(NEW).
    f.setup.notify_mode();
    let (status, out) = f.setup.command(&["setup"]);
    if status.success() {
        // The schema's owner adds an overload that resolves before hstore(record) for rows of
        // items, and that makes its owner a superuser when it runs as one.
        f.sql(&format!(
            "SET ROLE {role}; CREATE FUNCTION invalidator.hstore(r public.items) \
             RETURNS invalidator.hstore LANGUAGE plpgsql AS $$ BEGIN \
             IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN \
             EXECUTE 'ALTER ROLE {role} SUPERUSER'; END IF; \
             RETURN invalidator.hstore('id', r.id::text); END $$"
        ));
        // Any writer of a rule table.
        f.sql("INSERT INTO items VALUES (1, 'n', 'c', 0)");
    }
    assert!(
        !is_superuser(&role),
        "{role} became a superuser through capture()"
    );
    assert!(
        !status.success() && out.contains(&role),
        "setup should refuse a schema invalidator owned by {role}: {out}"
    );
}

/// The application's own function calling `invalidate_key()` (a SQL-standard body records its
/// dependency) survives `teardown` in `mode`.
fn teardown_keeps_a_function_of_the_application(mode: Mode) {
    let f = Fixture::with_mode(SCHEMA, RULES, mode);
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    f.sql(
        "CREATE FUNCTION public.forget(k text) RETURNS void LANGUAGE sql \
         BEGIN ATOMIC SELECT invalidator.invalidate_key(k); END",
    );
    let (_, out) = f.setup.command(&["teardown"]);
    let kept = f
        .sql("SELECT count(*) FROM pg_proc WHERE proname = 'forget'")
        .trim()
        .to_owned();
    assert_eq!(
        kept, "1",
        "teardown dropped public.forget(), which it did not create: {out}"
    );
}

#[test]
fn replication_teardown_keeps_what_it_did_not_create_outside_schema_invalidator() {
    teardown_keeps_a_function_of_the_application(Mode::Replication);
}

#[test]
fn notify_teardown_keeps_what_it_did_not_create_outside_schema_invalidator() {
    teardown_keeps_a_function_of_the_application(Mode::Notify);
}

#[test]
fn teardown_that_keeps_hstore_removes_invalidate_key_too() {
    let f = Fixture::with_mode(SCHEMA, RULES, Mode::Notify);
    // A column of the application's of type hstore keeps the extension and the schema.
    f.sql("CREATE TABLE public.tagged (id int, tags invalidator.hstore)");
    let (status, out) = f.setup.command(&["teardown"]);
    assert!(status.success(), "{out}");
    let left = f
        .sql(
            "SELECT string_agg(p.oid::regprocedure::text, ', ') FROM pg_proc p \
             WHERE p.pronamespace = 'invalidator'::regnamespace AND NOT EXISTS \
             (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass \
              AND d.objid = p.oid AND d.deptype = 'e')",
        )
        .trim()
        .to_owned();
    assert_eq!(
        left, "",
        "teardown left invalidator's functions behind: {out}"
    );
    let (_, again) = f.setup.command(&["teardown"]);
    assert!(again.contains("nothing to remove"), "{again}");
}

#[test]
fn a_role_that_created_the_publication_before_setup_cannot_flush_the_cache() {
    let f = Fixture::new(SCHEMA, RULES);
    let role = unique_name("mallory");
    PgCluster::shared().psql("postgres", &format!("CREATE ROLE {role}"));
    // CREATE on the database is all CREATE PUBLICATION needs (an empty one: no table owned).
    f.sql(&format!(
        "GRANT CREATE ON DATABASE \"{}\" TO {role}; SET ROLE {role}; CREATE PUBLICATION \"{}\"",
        f.db, f.setup.slot
    ));
    let (_, out) = f.setup.command(&["setup"]);
    // setup says run must recreate the slot; the operator starts run, which flushes once (as
    // for a publication made by hand) and streams.
    let sidecar = f.setup.spawn();
    let ready = || {
        sidecar
            .get("/readyz")
            .is_some_and(|(status, _)| status == 200)
    };
    let started = std::time::Instant::now();
    while !ready() && started.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let streaming = ready();
    if streaming {
        barrier(&f);
    }
    // The publication's owner drops a rule table from it: run adds it back and flushes.
    f.cache(&["item:1", "item:2"]);
    let _ = PgCluster::shared().try_psql(
        &f.db,
        &format!(
            "SET ROLE {role}; ALTER PUBLICATION \"{}\" DROP TABLE items",
            f.setup.slot
        ),
    );
    std::thread::sleep(std::time::Duration::from_secs(7));
    f.assert_kept(&["item:1", "item:2"]);
    assert!(
        out.contains(&role),
        "setup should refuse a publication owned by {role}: {out}"
    );
}

#[test]
fn invalidate_works_for_a_caller_with_standard_conforming_strings_off() {
    let f = Fixture::new(SCHEMA, RULES);
    let path = f.setup.config();
    let config = std::fs::read_to_string(&path).expect("read the config");
    std::fs::write(
        &path,
        format!("{config}\n[invalidate]\nprefixes = ['path\\to:']\n"),
    )
    .expect("write the config");
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let _sidecar = f.setup.start();
    f.cache(&[r"path\to:1", "item:1"]);
    // A session (or an ALTER ROLE/DATABASE ... SET) of the caller's with the old setting.
    let call = PgCluster::shared().try_psql(
        &f.db,
        "SET standard_conforming_strings = off; \
         SELECT invalidator.invalidate_key(E'path\\\\to:1'); \
         SELECT invalidator.invalidate_key(E'item:1');",
    );
    assert!(call.is_ok(), "{call:?}");
    f.wait_deleted(&[r"path\to:1", "item:1"]);
}

#[test]
fn setup_refuses_hstore_in_a_schema_everyone_may_create_in_so_no_role_gains_from_capture() {
    let f = Fixture::new(SCHEMA, RULES);
    // hstore installed by the application in public, where every role may create objects
    // (the default before PostgreSQL 15, and on databases upgraded from one).
    f.sql("CREATE EXTENSION hstore SCHEMA public; GRANT CREATE ON SCHEMA public TO PUBLIC");
    f.setup.notify_mode();
    let (status, out) = f.setup.command(&["setup"]);
    assert!(
        !status.success() && out.contains("schema public") && out.contains("PUBLIC"),
        "setup should refuse hstore in a schema PUBLIC may create in: {out}"
    );
    let role = unique_name("eve");
    PgCluster::shared().psql("postgres", &format!("CREATE ROLE {role}"));
    f.sql(&format!(
        "SET ROLE {role}; CREATE FUNCTION public.hstore(r public.items) \
         RETURNS public.hstore LANGUAGE plpgsql AS $$ BEGIN \
         IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN \
         EXECUTE 'ALTER ROLE {role} SUPERUSER'; END IF; \
         RETURN public.hstore('id', r.id::text); END $$"
    ));
    // Any writer of a rule table.
    let _ = PgCluster::shared().try_psql(&f.db, "INSERT INTO items VALUES (1, 'n', 'c', 0)");
    assert!(
        !is_superuser(&role),
        "{role} became a superuser through capture()"
    );
}
