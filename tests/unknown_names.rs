//! Rules naming a table or a column the database does not have: `run` refuses to start, naming
//! the rule's file and line (and the columns the table has), in both modes. Accepted, such a
//! placeholder never has a value, so its key would become a pattern deleting the whole
//! namespace on every change.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Mode, Setup, binary, http_get, in_both_modes};
use crate::support::{PgCluster, wait_until};

/// The rules with one more rule on `table` keyed on `{column}`, and the line of its `[[rule]]`.
pub fn with_rule(table: &str, column: &str) -> (String, usize) {
    let text = format!(
        "{RULES}\n[[rule]]\nname = \"typo\"\ntable = \"{table}\"\nkeys = [\"typo:{{{column}}}\"]\n"
    );
    let line = text[..text.find("name = \"typo\"").expect("the rule")]
        .lines()
        .count();
    (text, line)
}

/// A running `invalidator run`, killed if the test ends before it exits.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `invalidator run` with its output in `run.log` of the configuration directory.
fn spawn_run(setup: &Setup) -> Running {
    let child = Command::new(binary())
        .arg("run")
        .arg("--config")
        .arg(setup.config())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(setup.dir.path().join("run.log")).expect("log file"))
        .spawn()
        .expect("spawn invalidator run");
    Running(child)
}

/// Waits at most 30 s for `child` to exit (then kills it): its status, if it exited, and its
/// output.
fn wait_exit(setup: &Setup, mut run: Running) -> (Option<ExitStatus>, String) {
    let start = Instant::now();
    let status = loop {
        if let Some(status) = run.0.try_wait().expect("wait") {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(30) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = std::fs::read_to_string(setup.dir.path().join("run.log")).unwrap_or_default();
    (status, log)
}

/// Runs `invalidator run` until it exits, for at most 30 s (then it is killed): the status, if
/// it exited, and its output.
pub fn run_to_exit(f: &Fixture) -> (Option<ExitStatus>, String) {
    wait_exit(&f.setup, spawn_run(&f.setup))
}

/// Replaces the fixture's rules (after notify mode's `setup` ran with the good ones).
fn write_rules(f: &Fixture, text: &str) {
    std::fs::write(f.setup.dir.path().join("rules/rules.toml"), text).expect("write the rules");
}

in_both_modes! {
    /// A placeholder naming a column the table lacks stops `run` at start (exit 1) with the
    /// rule's file and line, the column and the columns the table has; nothing is deleted.
    fn run_refuses_a_rule_naming_a_column_the_table_lacks(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let (rules, line) = with_rule("plain", "ownr");
        write_rules(&f, &rules);
        f.cache(&["typo:zed", "plain:1"]);
        let (status, log) = run_to_exit(&f);
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
        let path = f.setup.dir.path().join("rules/rules.toml").display().to_string();
        let expected = format!(
            "{path}:{line}: rule \"typo\" on public.plain: public.plain has no column ownr \
             (it has id, owner)"
        );
        assert!(log.contains(&expected), "{expected:?} not in:\n{log}");
        f.assert_kept(&["typo:zed", "plain:1"]);
    }

    /// A rule on a table that does not exist stops `run` at start (exit 1), naming the rule's
    /// file and line.
    fn run_refuses_a_rule_on_a_table_that_does_not_exist_naming_file_and_line(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let (rules, line) = with_rule("nosuch", "id");
        write_rules(&f, &rules);
        let (status, log) = run_to_exit(&f);
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
        let path = f.setup.dir.path().join("rules/rules.toml").display().to_string();
        let expected = format!(
            "{path}:{line}: rule \"typo\" on public.nosuch: table public.nosuch does not exist"
        );
        assert!(log.contains(&expected), "{expected:?} not in:\n{log}");
    }

    /// The names are checked on every connection, not only at start: a column renamed while
    /// running stops `run` at its next reconnect, naming the rule's file and line.
    fn a_reconnect_after_a_column_is_renamed_stops_naming_file_and_line(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let child = spawn_run(&f.setup);
        wait_until(Duration::from_secs(30), "the sidecar is ready", || {
            http_get(f.setup.http, "/readyz").is_some_and(|(status, _)| status == 200)
        });
        f.sql(
            "ALTER TABLE plain RENAME COLUMN owner TO holder;
             SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid();",
        );
        let (status, log) = wait_exit(&f.setup, child);
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
        let line = RULES[..RULES.find("name = \"plain\"").expect("the rule")]
            .lines()
            .count();
        let path = f.setup.dir.path().join("rules/rules.toml").display().to_string();
        let expected = format!(
            "{path}:{line}: rule \"plain\" on public.plain: public.plain has no column owner \
             (it has id, holder)"
        );
        assert!(log.contains(&expected), "{expected:?} not in:\n{log}");
    }

    /// A second instance whose rules name a missing column does not wait as a standby to take
    /// over with them: it stops at once, naming the rule's file and line, while the first
    /// instance keeps invalidating.
    fn a_standby_naming_a_missing_column_stops_instead_of_waiting(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let _first = f.setup.start();
        let (rules, line) = with_rule("plain", "ownr");
        let url = PgCluster::shared().url(&f.db);
        let second = Setup::with_slot(&url, &f.redis.url(), &rules, &f.setup.slot);
        if mode == Mode::Notify {
            second.notify_mode();
        }
        let (status, log) = wait_exit(&second, spawn_run(&second));
        assert_eq!(status.and_then(|s| s.code()), Some(1), "{log}");
        let path = second.dir.path().join("rules/rules.toml").display().to_string();
        let expected = format!(
            "{path}:{line}: rule \"typo\" on public.plain: public.plain has no column ownr \
             (it has id, owner)"
        );
        assert!(log.contains(&expected), "{expected:?} not in:\n{log}");
        f.cache(&["plain:3"]);
        f.sql("INSERT INTO plain VALUES (3, 'al')");
        f.wait_deleted(&["plain:3"]);
    }

    /// `setup` refuses such rules too, with the same error, and changes nothing: setting up for
    /// rules `run` refuses would only defer the error.
    fn setup_refuses_a_rule_naming_a_column_the_table_lacks(mode: Mode) {
        let f = Fixture::with_mode(SCHEMA, RULES, mode);
        let (rules, line) = with_rule("plain", "ownr");
        write_rules(&f, &rules);
        let (status, out) = f.setup.command(&["setup"]);
        assert_eq!(status.code(), Some(1), "{out}");
        let path = f.setup.dir.path().join("rules/rules.toml").display().to_string();
        let expected = format!(
            "{path}:{line}: rule \"typo\" on public.plain: public.plain has no column ownr \
             (it has id, owner)"
        );
        assert!(out.contains(&expected), "{expected:?} not in:\n{out}");
    }
}
