//! Rules naming a table or a column the database does not have: `run` refuses to start, naming
//! the rule's file and line (and the columns the table has), in both modes. Accepted, such a
//! placeholder never has a value, so its key would become a pattern deleting the whole
//! namespace on every change.

use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, binary, in_both_modes};

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

/// Runs `invalidator run` until it exits, for at most 30 s (then it is killed): the status, if
/// it exited, and its output.
pub fn run_to_exit(f: &Fixture) -> (Option<ExitStatus>, String) {
    let log = f.setup.dir.path().join("run.log");
    let mut child = Command::new(binary())
        .arg("run")
        .arg("--config")
        .arg(f.setup.config())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log file"))
        .spawn()
        .expect("spawn invalidator run");
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
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
}
