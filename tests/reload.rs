//! Hot reload of the rules: file edits and SIGHUP take effect without a restart, broken edits
//! keep the running rules, new tables join the publication (replication) or ask for `setup`
//! (notify).

use std::path::PathBuf;
use std::time::Duration;

use invalidator::rules::RuleSet;

use crate::e2e::{RULES, SCHEMA, barrier};
use crate::sidecar::{Fixture, Mode, Setup, Sidecar, in_both_modes, signal};
use crate::support::{PgCluster, unique_name, wait_until};
use crate::unknown_names::with_rule;

const RELOADS: &str = "invalidator_rules_reloads_total";
const RELOAD_ERRORS: &str = "invalidator_rules_reload_errors_total";

fn rules_file(f: &Fixture) -> PathBuf {
    f.setup.dir.path().join("rules/rules.toml")
}

/// Replaces the rules file with `text`, as an editor would.
fn edit(f: &Fixture, text: &str) {
    std::fs::write(rules_file(f), text).expect("write the rules");
}

fn wait_metric(sidecar: &Sidecar, name: &str, value: f64) {
    wait_until(
        Duration::from_secs(30),
        &format!("{name} is {value}"),
        || {
            sidecar.assert_alive();
            sidecar.metric(name) == value
        },
    );
}

in_both_modes! {
    /// A rule added to the file of a running sidecar applies to the next write, without a
    /// restart, and its per-rule metric appears.
    fn a_new_rule_applies_without_a_restart(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let sidecar = f.setup.start();
        // `plain`'s triggers (notify mode) already record `id`: no setup is needed.
        edit(&f, &format!(
            "{RULES}\n[[rule]]\nname = \"added\"\ntable = \"plain\"\nkeys = [\"added:{{id}}\"]\n"
        ));
        wait_metric(&sidecar, RELOADS, 1.0);
        f.cache(&["added:7", "plain:7"]);
        f.sql("INSERT INTO plain VALUES (7, 'ann')");
        f.wait_deleted(&["added:7", "plain:7"]);
        wait_metric(&sidecar, "invalidator_rule_fired_total{rule=\"added\"}", 1.0);
        assert_eq!(sidecar.metric(RELOAD_ERRORS), 0.0);
    }

    /// A broken edit keeps the running rules: they still invalidate, the log names the file and
    /// line of the problem, and the error is counted.
    fn a_broken_edit_keeps_the_running_rules(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let sidecar = f.setup.start();
        let broken = format!("{RULES}\n[[rule]]\ntable = \"plain\"\nkeys = [\"oops:{{id\"]\n");
        let path = rules_file(&f).display().to_string();
        let expected = RuleSet::compile(&[(path.clone(), broken.clone())])
            .expect_err("the edit is broken")
            .errors()[0]
            .to_string();
        assert!(expected.starts_with(&format!("{path}:")), "{expected}");
        edit(&f, &broken);
        wait_metric(&sidecar, RELOAD_ERRORS, 1.0);
        let log = sidecar.log();
        assert!(
            log.lines().any(|l| l.contains("ERROR") && l.contains(&expected)),
            "the log does not name {expected:?}:\n{log}"
        );
        assert_eq!(sidecar.metric(RELOADS), 0.0);
        f.cache(&["plain:5", "owner:bob"]);
        f.sql("INSERT INTO plain VALUES (5, 'bob')");
        f.wait_deleted(&["plain:5", "owner:bob"]);
    }

    /// An edit whose placeholder names a column the table lacks is rejected: the log names the
    /// rule's file and line and the columns the table has, the error is counted, and the old
    /// rules stay in effect (the misspelt key, a pattern for every change, deletes nothing).
    fn a_reload_naming_a_missing_column_is_rejected_and_the_old_rules_kept(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let sidecar = f.setup.start();
        let (rules, line) = with_rule("plain", "ownr");
        edit(&f, &rules);
        wait_metric(&sidecar, RELOAD_ERRORS, 1.0);
        let expected = format!(
            "{}:{line}: rule \"typo\" on public.plain: public.plain has no column ownr \
             (it has id, owner)",
            rules_file(&f).display()
        );
        let log = sidecar.log();
        assert!(
            log.lines().any(|l| l.contains("ERROR") && l.contains(&expected)),
            "the log does not name {expected:?}:\n{log}"
        );
        assert_eq!(sidecar.metric(RELOADS), 0.0);
        f.cache(&["typo:zed", "plain:5", "owner:bob"]);
        f.sql("INSERT INTO plain VALUES (5, 'bob')");
        f.wait_deleted(&["plain:5", "owner:bob"]);
        barrier(&f);
        f.assert_kept(&["typo:zed"]);
    }

    /// An edit adding a rule on a table that does not exist is rejected, naming the rule's file
    /// and line; the old rules stay in effect.
    fn a_reload_naming_a_missing_table_is_rejected_naming_file_and_line(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let sidecar = f.setup.start();
        let (rules, line) = with_rule("nosuch", "id");
        edit(&f, &rules);
        wait_metric(&sidecar, RELOAD_ERRORS, 1.0);
        let expected = format!(
            "{}:{line}: rule \"typo\" on public.nosuch: table public.nosuch does not exist",
            rules_file(&f).display()
        );
        let log = sidecar.log();
        assert!(
            log.lines().any(|l| l.contains("ERROR") && l.contains(&expected)),
            "the log does not name {expected:?}:\n{log}"
        );
        assert_eq!(sidecar.metric(RELOADS), 0.0);
        f.cache(&["plain:8"]);
        f.sql("INSERT INTO plain VALUES (8, 'cy')");
        f.wait_deleted(&["plain:8"]);
    }
}

/// SIGHUP reloads at once, even when the file looks unchanged to the poller (same size, same
/// modification time): the new key applies.
#[test]
fn sighup_reloads_the_rules() {
    let f = Fixture::new(SCHEMA, RULES);
    let sidecar = f.setup.start();
    let path = rules_file(&f);
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    let edited = RULES.replace("\"plain:{id}\"", "\"PLAIN:{id}\"");
    assert_eq!(edited.len(), RULES.len());
    assert_ne!(edited, RULES);
    edit(&f, &edited);
    std::fs::File::options()
        .write(true)
        .open(&path)
        .and_then(|file| file.set_modified(before))
        .expect("restore the modification time");
    signal(sidecar.pid().expect("running"), "HUP");
    wait_metric(&sidecar, RELOADS, 1.0);
    assert!(sidecar.log().contains("SIGHUP: reloading the rules"));
    f.cache(&["PLAIN:3", "plain:3"]);
    f.sql("INSERT INTO plain VALUES (3, 'cy')");
    f.wait_deleted(&["PLAIN:3"]);
    f.assert_kept(&["plain:3"]);
}

/// Replication mode: a rule on a table the publication does not hold yet adds the table to the
/// publication, and that table's changes are invalidated from then on.
#[test]
fn a_new_table_joins_the_publication_and_is_invalidated() {
    let f = Fixture::new(SCHEMA, RULES);
    let sidecar = f.setup.start();
    let published = || {
        f.sql(&format!(
            "SELECT count(*) FROM pg_publication_tables WHERE pubname = '{}' \
             AND tablename = 'unwatched'",
            f.setup.slot
        ))
    };
    assert_eq!(published(), "0");
    edit(
        &f,
        &format!("{RULES}\n[[rule]]\ntable = \"unwatched\"\nkeys = [\"unwatched:{{id}}\"]\n"),
    );
    wait_metric(&sidecar, RELOADS, 1.0);
    assert_eq!(published(), "1");
    assert!(
        sidecar
            .log()
            .contains("streams the new rules' tables from now on")
    );
    f.cache(&["unwatched:1"]);
    f.sql("INSERT INTO unwatched VALUES (1, 'v')");
    f.wait_deleted(&["unwatched:1"]);
    assert_eq!(sidecar.metric(RELOAD_ERRORS), 0.0);
}

/// Replication mode: keys of a table no rule watched may have been cached from rows that changed
/// since, and were never invalidated. A reload that gains the table deletes them, through the
/// WAL as a start does, whether the publication had to be extended or publishes every table.
#[test]
fn a_reload_that_gains_a_table_deletes_its_keys_cached_before() {
    for all_tables in [false, true] {
        let f = Fixture::new(SCHEMA, RULES);
        let (status, out) = f.setup.command(&["setup"]);
        assert!(status.success(), "{out}");
        if all_tables {
            let name = &f.setup.slot;
            f.sql(&format!(
                "DROP PUBLICATION \"{name}\"; CREATE PUBLICATION \"{name}\" FOR ALL TABLES"
            ));
        }
        let sidecar = f.setup.start();
        barrier(&f);
        // Cached, then changed while no rule watched the table: stale from now on.
        f.sql("INSERT INTO unwatched VALUES (5, 'old')");
        f.cache(&["unwatched:5", "bystander:5"]);
        f.sql("UPDATE unwatched SET v = 'new' WHERE id = 5");
        barrier(&f);
        assert!(f.redis.exists("unwatched:5"));
        edit(
            &f,
            &format!("{RULES}\n[[rule]]\ntable = \"unwatched\"\nkeys = [\"unwatched:{{id}}\"]\n"),
        );
        wait_metric(&sidecar, RELOADS, 1.0);
        f.wait_deleted(&["unwatched:5"]);
        barrier(&f);
        assert!(
            f.redis.exists("bystander:5"),
            "all tables {all_tables}: {}",
            sidecar.log()
        );
        assert_eq!(sidecar.metric(RELOAD_ERRORS), 0.0);
    }
}

/// Rules naming a table that does not exist are rejected like broken rules: the old rules keep
/// working, and the log names the table.
#[test]
fn a_rule_on_a_missing_table_is_rejected() {
    let f = Fixture::new(SCHEMA, RULES);
    let sidecar = f.setup.start();
    edit(
        &f,
        &format!("{RULES}\n[[rule]]\ntable = \"nosuch\"\nkeys = [\"nosuch:{{id}}\"]\n"),
    );
    wait_metric(&sidecar, RELOAD_ERRORS, 1.0);
    assert!(sidecar.log().contains("public.nosuch"), "{}", sidecar.log());
    assert_eq!(sidecar.metric(RELOADS), 0.0);
    f.cache(&["plain:9"]);
    f.sql("INSERT INTO plain VALUES (9, 'di')");
    f.wait_deleted(&["plain:9"]);
}

/// Notify mode: a new table needs triggers, which `run` does not install. The new rules apply at
/// once (the other tables keep being invalidated), the log says to run `setup`, and once it has
/// run the new table is invalidated too, without a restart.
#[test]
fn notify_mode_asks_for_setup_when_a_new_table_appears() {
    let f = Fixture::with_mode(SCHEMA, RULES, Mode::Notify);
    let sidecar = f.setup.start();
    edit(
        &f,
        &format!("{RULES}\n[[rule]]\ntable = \"unwatched\"\nkeys = [\"unwatched:{{id}}\"]\n"),
    );
    wait_metric(&sidecar, RELOADS, 1.0);
    let log = sidecar.log();
    assert!(
        log.lines()
            .any(|l| l.contains("ERROR") && l.contains("need `invalidator setup`")),
        "{log}"
    );
    f.cache(&["plain:4"]);
    f.sql("INSERT INTO plain VALUES (4, 'ed')");
    f.wait_deleted(&["plain:4"]);

    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    f.cache(&["unwatched:2"]);
    f.sql("INSERT INTO unwatched VALUES (2, 'v')");
    f.wait_deleted(&["unwatched:2"]);
    sidecar.assert_alive();
}

/// Replication mode, as a role that does not own the tables: `ALTER PUBLICATION` fails, so the
/// reload is rejected, the error is logged and counted, and exactly the old rules stay in effect
/// (neither the new ones nor the union used while the publication was being extended).
#[test]
fn a_publication_the_role_cannot_extend_keeps_the_old_rules() {
    let f = Fixture::new(SCHEMA, RULES);
    let role = unique_name("role");
    f.sql(&format!(
        "CREATE ROLE {role} WITH LOGIN REPLICATION PASSWORD 'pw';
         GRANT SELECT ON items, plain, shop.orders, sentinel, unwatched TO {role};
         GRANT USAGE ON SCHEMA shop TO {role};"
    ));
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    let url = PgCluster::shared().url_as(&role, "pw", &f.db);
    let limited = Setup::new(&url, &f.redis.url(), RULES);
    let config = std::fs::read_to_string(limited.config()).unwrap();
    std::fs::write(
        limited.config(),
        config.replace(&limited.slot, &f.setup.slot),
    )
    .unwrap();
    let sidecar = limited.start();

    let edited = RULES.replace("\"plain:{id}\"", "\"PLAIN:{id}\"")
        + "\n[[rule]]\ntable = \"unwatched\"\nkeys = [\"unwatched:{id}\"]\n";
    std::fs::write(limited.dir.path().join("rules/rules.toml"), edited).unwrap();
    wait_metric(&sidecar, RELOAD_ERRORS, 1.0);
    let log = sidecar.log();
    assert!(
        log.lines().any(|l| l.contains("ERROR")
            && l.contains("rules reload rejected")
            && l.contains("must be owner")),
        "{log}"
    );
    assert_eq!(sidecar.metric(RELOADS), 0.0);
    f.cache(&["plain:6", "PLAIN:6"]);
    f.sql("INSERT INTO plain VALUES (6, 'fay')");
    f.wait_deleted(&["plain:6"]);
    // A barrier: a later write is done, so the first one was fully planned.
    f.cache(&["plain:7"]);
    f.sql("INSERT INTO plain VALUES (7, 'gus')");
    f.wait_deleted(&["plain:7"]);
    f.assert_kept(&["PLAIN:6"]);
}
