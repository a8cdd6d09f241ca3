//! A connection pooler between invalidator and Postgres is named, with what to do, instead of a
//! bare protocol error (replication) or a reader that never hears a notification (notify mode).

use std::time::Duration;

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Setup};
use crate::support::{PgBouncer, PgCluster};

/// What every refusal says: what stands in the way, and the way around it.
fn assert_names_the_pooler(out: &str) {
    assert!(out.contains("connection pooler"), "{out}");
    assert!(
        out.contains("point postgres.url at PostgreSQL itself"),
        "{out}"
    );
}

#[test]
fn replication_through_pgbouncer_names_the_pooler_and_says_to_connect_directly() {
    let f = Fixture::new(SCHEMA, RULES);
    let bouncer = PgBouncer::start(PgCluster::shared().port());
    let through = Setup::new(&bouncer.url(&f.db), &f.redis.url(), RULES);
    // `setup`, `status` and `check` use SQL only, which a pooler carries; `run` needs
    // replication.
    let (status, out) = through.command(&["run"]);
    assert_eq!(status.code(), Some(1), "{out}");
    assert_names_the_pooler(&out);
    assert!(out.contains("unsupported startup parameter"), "{out}");
}

#[test]
fn notify_mode_through_pgbouncer_in_transaction_mode_names_the_pooler() {
    let f = Fixture::new(SCHEMA, RULES);
    f.setup.notify_mode();
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let bouncer = PgBouncer::start(PgCluster::shared().port());
    let through = Setup::new(&bouncer.url(&f.db), &f.redis.url(), RULES);
    through.notify_mode();
    // Without the check, it would read nothing forever: wait for the exit with a deadline.
    let mut sidecar = through.spawn();
    let status = sidecar.exit_within(Duration::from_secs(60));
    let out = sidecar.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert!(out.contains("LISTEN does not work"), "{out}");
    assert_names_the_pooler(&out);
}

#[test]
fn a_supabase_pooler_url_is_refused_before_connecting() {
    let f = Fixture::new(SCHEMA, RULES);
    // Nothing listens there: the refusal comes from the name alone.
    let url = "postgres://postgres.abc:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres";
    let through = Setup::new(url, &f.redis.url(), RULES);
    // Without the check, it would retry the unreachable host forever.
    let mut sidecar = through.spawn();
    let status = sidecar.exit_within(Duration::from_secs(60));
    let out = sidecar.log();
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{out}");
    assert_names_the_pooler(&out);
    assert!(out.contains("Supabase's pooler, port 6543"), "{out}");
    assert!(
        !out.contains(":pw@"),
        "the password reached the output: {out}"
    );
}
