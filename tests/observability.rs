//! What operators see: per-rule metrics, batch sizes, lag in seconds, the log format, and
//! progress through a backlog at start.

use std::time::Duration;

use crate::e2e::{RULES, SCHEMA};
use crate::sidecar::{Fixture, Sidecar};
use crate::support::wait_until;

fn wait_metric(sidecar: &Sidecar, name: &str, what: &str, ok: impl Fn(f64) -> bool) {
    wait_until(Duration::from_secs(30), &format!("{name} {what}"), || {
        sidecar.assert_alive();
        ok(sidecar.metric(name))
    });
}

/// `invalidator_rule_fired_total`, `_keys_total` and `_patterns_total` count per rule name;
/// a rule that did not fire has no count; each Redis batch is in `invalidator_batch_keys`.
#[test]
fn per_rule_metrics_count_firings_keys_and_patterns() {
    let f = Fixture::new(SCHEMA, RULES);
    let sidecar = f.setup.start();
    f.cache(&["item:1", "items:category:cars", "items:name:alpha:page1"]);
    f.sql("INSERT INTO items VALUES (1, 'alpha', 'cars', 10)");
    f.wait_deleted(&["item:1", "items:category:cars", "items:name:alpha:page1"]);
    // Rule "item": keys item:1 and items:category:cars, pattern items:name:alpha:*.
    wait_metric(
        &sidecar,
        "invalidator_rule_fired_total{rule=\"item\"}",
        "is 1",
        |v| v == 1.0,
    );
    assert_eq!(
        sidecar.metric("invalidator_rule_keys_total{rule=\"item\"}"),
        2.0
    );
    assert_eq!(
        sidecar.metric("invalidator_rule_patterns_total{rule=\"item\"}"),
        1.0
    );
    // "price" fires on updates that change the price only.
    assert_eq!(
        sidecar.metric("invalidator_rule_fired_total{rule=\"price\"}"),
        0.0
    );
    f.sql("UPDATE items SET price = 11 WHERE id = 1");
    wait_metric(
        &sidecar,
        "invalidator_rule_fired_total{rule=\"price\"}",
        "is 1",
        |v| v == 1.0,
    );
    assert_eq!(
        sidecar.metric("invalidator_rule_fired_total{rule=\"item\"}"),
        2.0
    );
    wait_metric(&sidecar, "invalidator_batch_keys_count", "is 2", |v| {
        v == 2.0
    });
    // 3 keys and patterns, then item's 3 again plus price:1 (the rows are equal elsewhere).
    assert_eq!(sidecar.metric("invalidator_batch_keys_sum"), 7.0);
    // Everything read is confirmed: no lag.
    wait_metric(
        &sidecar,
        "invalidator_replication_lag_seconds",
        "is 0",
        |v| v == 0.0,
    );
}

/// While Redis is down, `invalidator_replication_lag_seconds` grows from the commit time of the
/// waiting transaction; once it is deleted, the lag is 0 again.
#[test]
fn lag_seconds_grows_while_a_transaction_waits_and_returns_to_zero() {
    let f = Fixture::new(SCHEMA, RULES);
    let sidecar = f.setup.start();
    let lag = "invalidator_replication_lag_seconds";
    assert_eq!(sidecar.metric(lag), 0.0);
    f.redis.kill();
    f.sql("INSERT INTO plain VALUES (1, 'ann')");
    wait_metric(&sidecar, lag, "passes 1 s", |v| v >= 1.0);
    let first = sidecar.metric(lag);
    wait_metric(&sidecar, lag, "keeps growing", |v| v > first);
    f.redis.start_again();
    wait_metric(&sidecar, lag, "is 0 again", |v| v == 0.0);
}

/// `--log-format` overrides the configuration; without either, the default `auto` writes JSON
/// when stderr is not a terminal.
#[test]
fn log_format_flag_beats_the_config_and_auto_means_json_off_a_terminal() {
    let f = Fixture::new(SCHEMA, RULES);
    let json_lines = |out: &str| {
        out.lines()
            .filter(|l| l.starts_with('{') && l.contains("\"level\":\"INFO\""))
            .count()
    };
    // The harness's configuration says text; the flag wins (`setup` logs each action).
    let (status, out) = f.setup.command(&["--log-format", "json", "setup"]);
    assert!(status.success(), "{out}");
    assert!(json_lines(&out) > 0, "no JSON log line:\n{out}");

    // Drop `format = "text"`: the default is auto, and the output here is a pipe.
    let path = f.setup.config();
    let config = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, config.replace("format = \"text\"\n", "")).unwrap();
    f.sql(&format!(
        "SELECT pg_drop_replication_slot('{}')",
        f.setup.slot
    ));
    f.sql(&format!("DROP PUBLICATION \"{}\"", f.setup.slot));
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    assert!(json_lines(&out) > 0, "auto did not choose JSON:\n{out}");

    f.sql(&format!(
        "SELECT pg_drop_replication_slot('{}')",
        f.setup.slot
    ));
    f.sql(&format!("DROP PUBLICATION \"{}\"", f.setup.slot));
    let (status, out) = f.setup.command(&["setup", "--log-format", "text"]);
    assert!(status.success(), "{out}");
    assert_eq!(json_lines(&out), 0, "--log-format text gave JSON:\n{out}");
    assert!(out.contains(" INFO "), "{out}");
}

/// A backlog of more than 16 MiB at start is announced in the log, and its end too.
#[test]
fn a_backlog_at_start_is_logged_until_caught_up() {
    let f = Fixture::new(SCHEMA, RULES);
    let (status, out) = f.setup.command(&["setup"]);
    assert!(status.success(), "{out}");
    // About 20 MiB of WAL while nothing reads the slot (a table outside the publication: its
    // WAL is still what the slot holds back).
    f.sql("INSERT INTO unwatched SELECT g, repeat('x', 1500) FROM generate_series(1, 14000) g");
    f.cache(&["plain:1"]);
    f.sql("INSERT INTO plain VALUES (1, 'ann')");
    let sidecar = f.setup.start();
    f.wait_deleted(&["plain:1"]);
    wait_until(Duration::from_secs(30), "caught up is logged", || {
        sidecar.log().contains("caught up with the backlog")
    });
    let log = sidecar.log();
    let start = log
        .lines()
        .find(|l| l.contains("catching up with a backlog of WAL"))
        .unwrap_or_else(|| panic!("no backlog line:\n{log}"));
    let bytes: u64 = start
        .split("bytes=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no byte count in {start}"));
    assert!(bytes >= 16 * 1024 * 1024, "{start}");
}

/// Redis unreachable at start: `/readyz` names it from the first attempt (not only "starting"),
/// and every `invalidator_errors_total{kind}` series exists at 0 from the start, so the shipped
/// alerts can fire on the first error.
#[test]
fn redis_unreachable_at_start_is_the_readiness_reason_and_error_series_start_at_zero() {
    let f = Fixture::new(SCHEMA, RULES);
    let port = crate::support::free_port();
    let config = std::fs::read_to_string(f.setup.config()).unwrap();
    let config = config.replace(&f.redis.url(), &format!("redis://127.0.0.1:{port}/0"));
    std::fs::write(f.setup.config(), config).unwrap();
    let sidecar = f.setup.spawn();
    wait_until(Duration::from_secs(30), "/readyz names redis", || {
        sidecar.assert_alive();
        sidecar.get("/readyz").is_some_and(|(status, body)| {
            status == 503 && body.starts_with("redis: ") && body.contains("refused")
        })
    });
    let (_, metrics) = sidecar.get("/metrics").expect("metrics");
    for kind in ["postgres", "decode"] {
        let series = format!("invalidator_errors_total{{kind=\"{kind}\"}} 0");
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }
    assert!(sidecar.metric("invalidator_errors_total{kind=\"redis\"}") >= 1.0);
}

/// A Postgres that cannot be reached is named in the log (its password hidden).
#[test]
fn a_failed_postgres_connection_is_logged_with_its_host_and_no_password() {
    let f = Fixture::new(SCHEMA, RULES);
    let port = crate::support::free_port();
    let config = std::fs::read_to_string(f.setup.config()).unwrap();
    let url = config
        .lines()
        .find_map(|l| l.strip_prefix("url = \"postgres"))
        .map(|rest| format!("postgres{}", rest.trim_end_matches('"')))
        .expect("postgres url");
    let dead = format!("postgres://postgres:pg-s3cret@127.0.0.1:{port}/nowhere");
    std::fs::write(f.setup.config(), config.replace(&url, &dead)).unwrap();
    let sidecar = f.setup.spawn();
    let named = format!("postgres://postgres:***@127.0.0.1:{port}/nowhere");
    wait_until(Duration::from_secs(30), "the log names the host", || {
        sidecar.assert_alive();
        sidecar
            .log()
            .lines()
            .any(|l| l.contains("postgres source interrupted") && l.contains(&named))
    });
    assert!(!sidecar.log().contains("pg-s3cret"), "{}", sidecar.log());
}
