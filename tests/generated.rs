//! Keys on generated columns in replication mode: pgoutput leaves generated columns out of the
//! rows it sends (until PostgreSQL 18, and there only for a publication that asks for them), so
//! such a key has no value and broadens to a pattern. `check` says so, and what it says is what
//! `run` does.

use crate::e2e::barrier;
use crate::sidecar::{Fixture, Mode};
use crate::support::PgCluster;

const SCHEMA: &str = "
CREATE TABLE cars (id int PRIMARY KEY, make text,
    slug text GENERATED ALWAYS AS (lower(make)) STORED);
CREATE TABLE sentinel (id serial PRIMARY KEY);
";

const RULES: &str = r#"
[[rule]]
name = "car"
table = "cars"
keys = ["car:{id}", "make:{slug}"]

[[rule]]
name = "sentinel"
table = "sentinel"
keys = ["sentinel:{id}"]
"#;

#[test]
fn check_warns_of_keys_on_generated_columns_the_publication_does_not_send() {
    let f = Fixture::with_mode(SCHEMA, RULES, Mode::Replication);
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let (_, out) = f.setup.command(&["check"]);
    assert!(out.contains("slug (generated as lower(make))"), "{out}");
    assert!(out.contains("`make:{slug}` becomes `make:*`"), "{out}");
    assert!(!out.contains("`car:{id}` becomes"), "{out}");

    // What it warns of is what run does: a change deletes every key under `make:`.
    let sidecar = f.setup.start();
    barrier(&f);
    f.cache(&["car:1", "make:bmw", "make:audi"]);
    f.sql("INSERT INTO cars (id, make) VALUES (1, 'BMW')");
    f.wait_deleted(&["car:1", "make:bmw", "make:audi"]);

    if PgCluster::installed_major() < 18 {
        return;
    }
    // From 18 the publication can send them: the warning goes, and keys are exact again.
    f.sql(&format!(
        "ALTER PUBLICATION \"{}\" SET (publish_generated_columns = stored)",
        f.setup.slot
    ));
    let (_, out) = f.setup.command(&["check"]);
    assert!(!out.contains("generated as"), "{out}");
    f.cache(&["car:2", "make:audi", "make:vw"]);
    f.sql("INSERT INTO cars (id, make) VALUES (2, 'Audi')");
    f.wait_deleted(&["car:2", "make:audi"]);
    barrier(&f);
    assert!(f.redis.exists("make:vw"), "{}", sidecar.log());
}
