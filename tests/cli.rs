//! The developer and operator commands as a user runs them: `check` (human and JSON, exit codes
//! 0, 1 and 2), `explain` (JSON rows and `--where` on the live database), `setup --dry-run` and
//! `status`, each against a database of its own in the shared cluster.

use std::process::Command;

use serde_json::Value as Json;

use crate::sidecar::{Setup, binary};
use crate::support::{PgCluster, RedisServer, unique_name};

/// A table per case: `items` (REPLICA IDENTITY FULL), `plain` (DEFAULT, key `id`), `docs` (a
/// text column, DEFAULT), `flags` (a boolean and a date).
const SCHEMA: &str = "
CREATE TABLE items (id int PRIMARY KEY, name text, category text);
ALTER TABLE items REPLICA IDENTITY FULL;
CREATE TABLE plain (id int PRIMARY KEY, owner int);
CREATE TABLE docs (id int PRIMARY KEY, slug text, body jsonb);
CREATE TABLE flags (id int PRIMARY KEY, active boolean, day date);
ALTER TABLE flags REPLICA IDENTITY FULL;
";

const RULES: &str = r#"
[[rule]]
name = "item"
table = "items"
keys = ["item:{id}", "items:category:{category}"]
"#;

/// A configuration whose slot is dropped with it, so `setup` leaves no slot behind in the
/// shared cluster.
struct Config(Setup);

impl std::ops::Deref for Config {
    type Target = Setup;

    fn deref(&self) -> &Setup {
        &self.0
    }
}

impl Drop for Config {
    fn drop(&mut self) {
        let _ = PgCluster::shared().try_psql(
            "postgres",
            &format!(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE slot_name = '{}' AND NOT active",
                self.0.slot
            ),
        );
    }
}

/// A database with `SCHEMA` and a configuration with `rules`; Redis is never contacted.
fn setup(rules: &str) -> (String, Config) {
    let cluster = PgCluster::shared();
    let db = unique_name("cli");
    let url = cluster.create_database(&db);
    cluster.psql(&db, SCHEMA);
    (db, Config(Setup::new(&url, "redis://127.0.0.1:1/0", rules)))
}

/// Runs the binary with `args` and `--config`: exit code, stdout, stderr.
fn invalidator(setup: &Setup, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(binary())
        .args(args)
        .arg("--config")
        .arg(setup.config())
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .output()
        .expect("run invalidator");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `check --format json`: exit code and the parsed document.
fn check_json(setup: &Setup, extra: &[&str]) -> (i32, Json) {
    let mut args = vec!["check", "--format", "json"];
    args.extend(extra);
    let (code, out, err) = invalidator(setup, &args);
    let doc = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
    (code, doc)
}

/// The findings of `kind` among `errors` or `warnings`.
fn of_kind<'a>(doc: &'a Json, list: &str, kind: &str) -> Vec<&'a Json> {
    doc[list]
        .as_array()
        .unwrap_or_else(|| panic!("no {list} in {doc}"))
        .iter()
        .filter(|f| f["kind"] == kind)
        .collect()
}

#[test]
fn check_passes_the_exodrive_rules_on_their_migrations() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut files: Vec<_> = std::fs::read_dir(format!("{root}/migrations"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let cluster = PgCluster::shared();
    let db = unique_name("cli_exodrive");
    let url = cluster.create_database(&db);
    for file in files {
        cluster.psql(&db, &std::fs::read_to_string(file).unwrap());
    }
    // A Redis of its own: `setup` loads the guarded-fill library there, and `check` finds it.
    let redis = RedisServer::start();
    let setup = Config(Setup::new(&url, &redis.url(), ""));
    let rules = setup.dir.path().join("rules");
    std::fs::remove_file(rules.join("rules.toml")).unwrap();
    for entry in std::fs::read_dir(format!("{root}/rules")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, rules.join(path.file_name().unwrap())).unwrap();
    }

    let (code, doc) = check_json(&setup, &[]);
    assert_eq!(code, 0, "{doc}");
    assert_eq!(doc["ok"], true, "{doc}");
    assert_eq!(doc["errors"], serde_json::json!([]), "{doc}");
    // Before the first `run` or `setup`, the publication does not exist: they create it.
    let publication = of_kind(&doc, "warnings", "publication");
    assert_eq!(publication.len(), 1, "{doc}");
    assert!(
        publication[0]["fix"]
            .as_str()
            .unwrap()
            .starts_with("CREATE PUBLICATION"),
        "{doc}"
    );

    // Nor is the guarded-fill library loaded in Redis: setup loads it.
    let library = of_kind(&doc, "warnings", "redis_library");
    assert_eq!(library.len(), 1, "{doc}");
    assert!(
        library[0]["message"]
            .as_str()
            .unwrap()
            .contains("not loaded"),
        "{doc}"
    );

    let (code, out, err) = invalidator(&setup, &["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("done: load the Redis Functions library invalidator version 2"),
        "{out}"
    );
    let (code, out, err) = invalidator(&setup, &["check"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.ends_with("tables checked against the database: ok\n"),
        "{out}"
    );
    let (code, out, _) = invalidator(&setup, &["check", "--offline"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.ends_with("tables checked offline: ok\n"), "{out}");
}

#[test]
fn check_reports_a_missing_column_with_file_and_line_and_exits_1() {
    let (_db, setup) = setup(&format!(
        "{RULES}\n[[rule]]\nname = \"ghost\"\ntable = \"items\"\nkeys = [\"ghost:{{nope}}\"]\n\
         \n[[rule]]\nname = \"nowhere\"\ntable = \"missing\"\nkeys = [\"m:{{id}}\"]\n"
    ));
    let (code, out, err) = invalidator(&setup, &["check"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(
            "rules.toml:7: rule \"ghost\" on public.items: public.items has no column nope"
        ),
        "{out}"
    );
    assert!(out.contains("2 errors"), "{out}");

    let (code, doc) = check_json(&setup, &[]);
    assert_eq!(code, 1);
    assert_eq!(doc["ok"], false);
    let missing = of_kind(&doc, "errors", "missing_column");
    assert_eq!(missing.len(), 1, "{doc}");
    assert_eq!(missing[0]["rule"], "ghost");
    assert_eq!(missing[0]["line"], 7);
    assert_eq!(missing[0]["table"], "public.items");
    assert!(missing[0]["file"].as_str().unwrap().ends_with("rules.toml"));
    let table = of_kind(&doc, "errors", "missing_table");
    assert_eq!(table[0]["rule"], "nowhere", "{doc}");
}

#[test]
fn check_warns_that_default_replica_identity_broadens_and_gives_the_fix() {
    let (_db, setup) = setup(
        "[[rule]]\nname = \"plain\"\ntable = \"plain\"\nkeys = [\"plain:{id}\", \"owner:{owner}:plain\"]\n",
    );
    let (code, out, err) = invalidator(&setup, &["check"]);
    assert_eq!(code, 0, "warnings only: {out}{err}");
    assert!(
        out.contains("`owner:{owner}:plain` becomes `owner:*:plain`"),
        "{out}"
    );
    assert!(
        out.contains("  fix: ALTER TABLE \"public\".\"plain\" REPLICA IDENTITY FULL;"),
        "{out}"
    );
    let (code, doc) = check_json(&setup, &[]);
    assert_eq!(code, 0);
    let warning = of_kind(&doc, "warnings", "replica_identity");
    assert_eq!(warning.len(), 1, "{doc}");
    assert_eq!(warning[0]["rule"], "plain");
    // The key column is sent: `plain:{id}` stays exact and is not named.
    assert!(
        !warning[0]["message"]
            .as_str()
            .unwrap()
            .contains("plain:{id}"),
        "{doc}"
    );

    // FULL makes the warning go away.
    PgCluster::shared().psql(&_db, "ALTER TABLE plain REPLICA IDENTITY FULL");
    let (code, doc) = check_json(&setup, &[]);
    assert_eq!(code, 0);
    assert!(
        of_kind(&doc, "warnings", "replica_identity").is_empty(),
        "{doc}"
    );
}

#[test]
fn check_warns_of_placeholders_on_toastable_columns() {
    let (db, setup) = setup(
        "[[rule]]\nname = \"doc\"\ntable = \"docs\"\non = [\"update\"]\nkeys = [\"doc:{id}\", \"page:{slug}\"]\n\
         \n[[rule]]\nname = \"flag\"\ntable = \"flags\"\nkeys = [\"flag:{id}:{active}\"]\n",
    );
    let (code, doc) = check_json(&setup, &[]);
    assert_eq!(code, 0, "{doc}");
    let toast = of_kind(&doc, "warnings", "toast");
    assert_eq!(toast.len(), 1, "{doc}");
    assert_eq!(toast[0]["rule"], "doc");
    let message = toast[0]["message"].as_str().unwrap();
    assert!(message.contains("slug (text)"), "{message}");
    assert!(
        message.contains("`page:{slug}` becomes `page:*`"),
        "{message}"
    );
    assert!(!message.contains("doc:{id}"), "{message}");
    assert_eq!(
        toast[0]["fix"].as_str().unwrap().split(" (").next(),
        Some("ALTER TABLE \"public\".\"docs\" REPLICA IDENTITY FULL;")
    );
    PgCluster::shared().psql(&db, "ALTER TABLE docs REPLICA IDENTITY FULL");
    let (_, doc) = check_json(&setup, &[]);
    assert!(of_kind(&doc, "warnings", "toast").is_empty(), "{doc}");
}

#[test]
fn check_refuses_a_pattern_without_a_literal_prefix_even_offline() {
    let (_db, setup) = setup(&format!(
        "{RULES}\n[[rule]]\nname = \"everything\"\ntable = \"items\"\non = [\"truncate\"]\nkeys = [\"*\"]\n\
         \n[[rule]]\nname = \"lead\"\ntable = \"items\"\nkeys = [\"{{id}}:profile\"]\n"
    ));
    for extra in [&["--offline"][..], &[]] {
        let (code, doc) = check_json(&setup, extra);
        assert_eq!(code, 1, "{extra:?}: {doc}");
        let errors = of_kind(&doc, "errors", "no_prefix");
        assert_eq!(errors.len(), 1, "{doc}");
        assert_eq!(errors[0]["rule"], "everything");
        assert!(
            errors[0]["message"]
                .as_str()
                .unwrap()
                .contains("deletes the whole cache"),
            "{doc}"
        );
        let warnings = of_kind(&doc, "warnings", "leading_placeholder");
        assert_eq!(warnings[0]["rule"], "lead", "{doc}");
    }
    let (code, out, _) = invalidator(&setup, &["check", "--offline"]);
    assert_eq!(code, 1);
    assert!(out.contains("error: "), "{out}");
    assert!(out.contains("checked offline: 1 error, 1 warning"), "{out}");
}

#[test]
fn check_warns_of_duplicate_and_shadowed_rules() {
    let (_db, setup) = setup(&format!(
        "{RULES}\n[[rule]]\nname = \"again\"\ntable = \"items\"\non = [\"delete\"]\n\
         keys = [\"items:category:{{category}}\", \"item:{{id}}\"]\n\
         \n[[rule]]\nname = \"all-items\"\ntable = \"items\"\nkeys = [\"item:*\"]\n\
         \n[[rule]]\nname = \"one-item\"\ntable = \"items\"\non = [\"update\"]\nkeys = [\"item:{{id}}:x\"]\n"
    ));
    let (code, doc) = check_json(&setup, &["--offline"]);
    assert_eq!(code, 0, "{doc}");
    let duplicate = of_kind(&doc, "warnings", "duplicate");
    assert_eq!(duplicate.len(), 1, "{doc}");
    assert_eq!(duplicate[0]["rule"], "again");
    assert!(
        duplicate[0]["message"]
            .as_str()
            .unwrap()
            .contains("duplicates rule \"item\""),
        "{doc}"
    );
    let shadowed = of_kind(&doc, "warnings", "shadowed");
    assert_eq!(shadowed.len(), 1, "{doc}");
    assert_eq!(shadowed[0]["rule"], "one-item");
}

#[test]
fn check_reports_a_table_missing_from_the_publication() {
    let (db, setup) = setup(RULES);
    let (code, out, err) = invalidator(&setup, &["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    // The rules gain a table after the publication was created.
    let more = format!(
        "{RULES}\n[[rule]]\nname = \"plain\"\ntable = \"plain\"\nkeys = [\"plain:{{id}}\"]\n"
    );
    std::fs::write(setup.dir.path().join("rules/rules.toml"), &more).unwrap();
    let (code, doc) = check_json(&setup, &[]);
    assert_eq!(code, 0, "the owner's run adds it at start: {doc}");
    let warning = of_kind(&doc, "warnings", "publication");
    assert_eq!(warning.len(), 1, "{doc}");
    assert!(
        warning[0]["message"]
            .as_str()
            .unwrap()
            .contains("lacks public.plain"),
        "{doc}"
    );
    assert_eq!(
        warning[0]["fix"],
        format!(
            "ALTER PUBLICATION \"{0}\" ADD TABLE \"public\".\"plain\";",
            setup.slot
        )
    );

    // A role that owns neither the table nor the publication cannot add it: `run` would stop.
    let role = unique_name("cli_role");
    PgCluster::shared().psql(&db, &format!("CREATE ROLE {role} WITH LOGIN REPLICATION"));
    let url = PgCluster::shared().url_as(&role, "unused", &db);
    let limited = Setup::with_slot(&url, "redis://127.0.0.1:1/0", &more, &setup.slot);
    let (code, doc) = check_json(&limited, &[]);
    assert_eq!(code, 1, "{doc}");
    let error = of_kind(&doc, "errors", "publication");
    assert_eq!(error.len(), 1, "{doc}");
    assert!(
        error[0]["message"]
            .as_str()
            .unwrap()
            .contains("would stop at start"),
        "{doc}"
    );
}

#[test]
fn check_in_notify_mode_reports_missing_setup_and_a_missing_trigger() {
    let (db, setup) = setup(RULES);
    setup.notify_mode();
    let (code, doc) = check_json(&setup, &[]);
    assert_eq!(code, 1, "{doc}");
    let missing = of_kind(&doc, "errors", "notify_setup");
    assert_eq!(
        missing.len(),
        1,
        "one finding for a database never set up: {doc}"
    );
    assert!(
        missing[0]["fix"]
            .as_str()
            .unwrap()
            .starts_with("invalidator setup"),
        "{doc}"
    );
    // Replication-only checks do not apply.
    assert!(of_kind(&doc, "warnings", "publication").is_empty(), "{doc}");

    let (code, out, err) = invalidator(&setup, &["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = invalidator(&setup, &["check"]);
    assert_eq!(code, 0, "{out}{err}");

    PgCluster::shared().psql(&db, "DROP TRIGGER invalidator_capture ON items");
    let (code, doc) = check_json(&setup, &[]);
    assert_eq!(code, 1, "{doc}");
    let trigger = of_kind(&doc, "errors", "notify_setup");
    assert_eq!(trigger.len(), 1, "{doc}");
    assert_eq!(trigger[0]["table"], "public.items");
    assert!(
        trigger[0]["fix"]
            .as_str()
            .unwrap()
            .starts_with("BEGIN; CREATE TRIGGER \"invalidator_capture\""),
        "{doc}"
    );
}

#[test]
fn check_with_rules_that_do_not_load_exits_2_with_a_json_document() {
    let (_db, setup) = setup("[[rule]]\ntable = \"items\"\nkeys = [\"item:{id\"]\n");
    let (code, out, err) = invalidator(&setup, &["check", "--format", "json"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("rules.toml:3"), "{err}");
    let doc: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["ok"], false);
    assert_eq!(doc["errors"][0]["kind"], "rules");
    assert_eq!(doc["errors"][0]["line"], 3);
}

#[test]
fn explain_attributes_each_key_of_json_rows_to_its_rule() {
    let (_db, setup) = setup(&format!(
        "{RULES}\n[[rule]]\nname = \"category\"\ntable = \"items\"\non = [\"update\"]\n\
         changed = [\"category\"]\nkeys = [\"items:category:{{category}}:*\"]\n"
    ));
    let (code, out, err) = invalidator(
        &setup,
        &[
            "explain",
            "--table",
            "items",
            "--op",
            "update",
            "--old",
            r#"{"id": 1, "name": "a", "category": "x"}"#,
            "--new",
            r#"{"id": 1, "name": "b", "category": "y"}"#,
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let doc: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(
        doc["keys"],
        serde_json::json!(["item:1", "items:category:x", "items:category:y"])
    );
    assert_eq!(
        doc["patterns"],
        serde_json::json!(["items:category:x:*", "items:category:y:*"])
    );
    assert_eq!(doc["rules"][0]["rule"], "item");
    assert_eq!(doc["rules"][0]["fired"], true);
    assert_eq!(doc["rules"][1]["rule"], "category");
    assert_eq!(
        doc["rules"][1]["patterns"],
        serde_json::json!(["items:category:x:*", "items:category:y:*"])
    );

    // The same change, only the name: `category` does not fire, and says why.
    let (code, out, _) = invalidator(
        &setup,
        &[
            "explain",
            "--format",
            "human",
            "--table",
            "items",
            "--op",
            "update",
            "--old",
            r#"{"id": 1, "name": "a", "category": "x"}"#,
            "--new",
            r#"{"id": 1, "name": "b", "category": "x"}"#,
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("update on public.items (1 row): 2 keys, 0 patterns\n"),
        "{out}"
    );
    assert!(out.contains("    key      item:1\n"), "{out}");
    assert!(
        out.contains("rule \"category\" (") && out.contains(": not fired: the update changed none"),
        "{out}"
    );
}

#[test]
fn explain_where_reads_rows_from_the_database_in_wal_text_form() {
    let (db, setup) = setup(
        "[[rule]]\nname = \"flag\"\ntable = \"flags\"\nkeys = [\"flag:{id}:{active}\", \"day:{day}\"]\n\
         \n[[rule]]\nname = \"plain\"\ntable = \"plain\"\nkeys = [\"owner:{owner}\"]\n",
    );
    PgCluster::shared().psql(
        &db,
        "INSERT INTO flags VALUES (1, true, '2026-12-01'), (2, NULL, '2026-12-02');
         INSERT INTO plain VALUES (7, 70)",
    );
    let explain = |args: &[&str]| {
        let mut all = vec!["explain"];
        all.extend(args);
        invalidator(&setup, &all)
    };
    // A boolean is `t`, as pgoutput sends it (not `true`, as `::text` would give); NULL
    // renders no key for that row. Both rows are planned together.
    let (code, out, err) = explain(&[
        "--table",
        "flags",
        "--op",
        "delete",
        "--where",
        "id IN (1, 2)",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let doc: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["rows"], 2);
    assert_eq!(
        doc["keys"],
        serde_json::json!(["day:2026-12-01", "day:2026-12-02", "flag:1:t"])
    );
    assert_eq!(doc["rules"][0]["rule"], "flag");

    // An update: the row read is the old row, --new sets columns on it for the new row. Under
    // REPLICA IDENTITY DEFAULT the old row holds the key only, so its key broadens.
    let (code, out, err) = explain(&[
        "--table",
        "plain",
        "--op",
        "update",
        "--where",
        "id = 7 -- a comment",
        "--new",
        r#"{"owner": 71}"#,
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let doc: Json = serde_json::from_str(&out).unwrap();
    assert_eq!(doc["keys"], serde_json::json!(["owner:71"]), "{doc}");
    assert_eq!(doc["patterns"], serde_json::json!(["owner:*"]), "{doc}");

    // No row: a clear error, exit 1. A statement that writes cannot run.
    let (code, out, err) = explain(&["--table", "plain", "--op", "delete", "--where", "id = 8"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("no row of public.plain matches --where"),
        "{err}"
    );
    let (code, _, err) = explain(&[
        "--table",
        "plain",
        "--op",
        "delete",
        "--where",
        "id = 7; DELETE FROM plain",
    ]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(
        PgCluster::shared()
            .psql(&db, "SELECT count(*) FROM plain")
            .trim(),
        "1"
    );
}

#[test]
fn explain_exits_2_for_an_unknown_table_or_bad_json() {
    let (_db, setup) = setup(RULES);
    let (code, _, err) = invalidator(
        &setup,
        &[
            "explain", "--table", "itemz", "--op", "insert", "--new", "{}",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("no rule watches table public.itemz (tables with rules: public.items)"),
        "{err}"
    );
    let (code, _, err) = invalidator(
        &setup,
        &[
            "explain",
            "--table",
            "items",
            "--op",
            "insert",
            "--new",
            "{\"id\": ",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--new: expected a JSON object"), "{err}");
    let (code, _, err) = invalidator(
        &setup,
        &[
            "explain", "--table", "items", "--op", "truncate", "--where", "true",
        ],
    );
    assert_eq!(code, 2, "{err}");
}

#[test]
fn setup_dry_run_prints_the_sql_and_changes_nothing() {
    let (db, setup) = setup(RULES);
    let (code, out, err) = invalidator(&setup, &["setup", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "CREATE PUBLICATION \"{}\" FOR TABLE \"public\".\"items\";",
            setup.slot
        )),
        "{out}"
    );
    assert!(out.contains("pg_create_logical_replication_slot"), "{out}");
    let count = |sql: &str| PgCluster::shared().psql(&db, sql).trim().to_owned();
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM pg_publication WHERE pubname = '{}'",
            setup.slot
        )),
        "0"
    );
    assert_eq!(
        count(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{}'",
            setup.slot
        )),
        "0"
    );
    // Notify mode: the outbox, the function and the triggers, and again nothing is created.
    setup.notify_mode();
    let (code, out, err) = invalidator(&setup, &["setup", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("CREATE TRIGGER \"invalidator_capture\""),
        "{out}"
    );
    assert_eq!(
        count("SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal"),
        "0"
    );
    assert_eq!(
        count("SELECT to_regclass('invalidator.outbox') IS NULL"),
        "t"
    );
}

#[test]
fn check_warns_of_a_slot_that_is_not_a_failover_slot_where_the_server_has_them() {
    let (db, setup) = setup(RULES);
    let pg = PgCluster::shared();
    let (_, doc) = check_json(&setup, &[]);
    assert!(
        of_kind(&doc, "warnings", "failover_slot").is_empty(),
        "{doc}"
    );
    // A slot made by hand, without failover.
    pg.psql(
        &db,
        &format!(
            "SELECT pg_create_logical_replication_slot('{}', 'pgoutput')",
            setup.slot
        ),
    );
    let (_, doc) = check_json(&setup, &[]);
    let warned = of_kind(&doc, "warnings", "failover_slot");
    if pg.major() >= 17 {
        assert_eq!(warned.len(), 1, "{doc}");
        let (_, out, _) = invalidator(&setup, &["status"]);
        assert!(out.trim_end().ends_with(", failover off"), "{out}");
    } else {
        assert!(warned.is_empty(), "{doc}");
    }
    pg.psql(
        &db,
        &format!("SELECT pg_drop_replication_slot('{}')", setup.slot),
    );
}

#[test]
fn status_prints_the_slot_or_the_outbox() {
    let (_db, setup) = setup(RULES);
    let (code, out, _) = invalidator(&setup, &["status"]);
    assert_eq!(code, 1, "{out}");
    assert_eq!(
        out,
        format!(
            "slot {}: does not exist (run `invalidator setup`)\n",
            setup.slot
        )
    );
    let (code, out, err) = invalidator(&setup, &["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = invalidator(&setup, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    let line = out.trim_end();
    let rest = line
        .strip_prefix(&format!("slot {}: inactive, confirmed ", setup.slot))
        .unwrap_or_else(|| panic!("{line}"));
    let (lsn, rest) = rest.split_once(", lag ").unwrap();
    assert!(lsn.contains('/'), "{line}");
    let (lag, rest) = rest.split_once(" bytes, wal_status ").unwrap();
    assert!(lag.parse::<u64>().is_ok(), "{line}");
    // `setup` creates a failover slot where the server has them.
    let expected = if PgCluster::shared().major() >= 17 {
        "reserved, failover on"
    } else {
        "reserved"
    };
    assert_eq!(rest, expected, "{line}");

    setup.notify_mode();
    let (code, out, err) = invalidator(&setup, &["setup"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = invalidator(&setup, &["status"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(out, "outbox: 0 rows waiting, oldest none\n");
}

#[test]
fn passwords_with_slash_hash_or_at_never_reach_the_starting_line_status_or_check() {
    let cluster = PgCluster::shared();
    let db = unique_name("redact");
    cluster.create_database(&db);
    cluster.psql(&db, SCHEMA);
    // tokio-postgres reads the user info up to the first `@`, past `/` and `#`: this URL
    // connects (trust authentication) with the password `se/cret#x`.
    let pg = format!(
        "postgres://postgres:se/cret#x@127.0.0.1:{}/{db}",
        cluster.port()
    );
    let setup = Config(Setup::new(&pg, "redis://:red/pw@127.0.0.1:1/0", RULES));
    let leaks = |what: &str, text: &str| {
        for secret in ["cret", "red/pw", "/pw"] {
            assert!(!text.contains(secret), "{what} shows {secret:?}:\n{text}");
        }
    };

    let (_, out, err) = invalidator(&setup, &["check"]);
    leaks("check", &format!("{out}{err}"));
    let (_, out, err) = invalidator(&setup, &["status"]);
    leaks("status", &format!("{out}{err}"));
    let sidecar = setup.spawn();
    crate::support::wait_until(
        std::time::Duration::from_secs(30),
        "the starting line",
        || sidecar.log().contains("starting"),
    );
    leaks("run", &sidecar.log());
    assert!(sidecar.log().contains("postgres:***@"), "{}", sidecar.log());
}

#[test]
fn init_writes_a_starter_config_and_rules_for_the_database_and_never_overwrites() {
    let cluster = PgCluster::shared();
    let db = unique_name("init");
    cluster.create_database(&db);
    cluster.psql(
        &db,
        "CREATE TABLE orders (id int PRIMARY KEY, customer int);
         CREATE SCHEMA sales;
         CREATE TABLE sales.lines (order_id int, line int, PRIMARY KEY (order_id, line));
         CREATE TABLE audit (at timestamptz);
         CREATE TABLE events (id int, day date, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
         CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');",
    );
    let dir = tempfile::tempdir().unwrap();
    // Trust authentication: the password is accepted and must not be written anywhere.
    let url = format!(
        "postgres://postgres:init-s3cret@127.0.0.1:{}/{db}",
        cluster.port()
    );
    let init = |args: &[&str], env_url: Option<&str>| {
        let mut command = Command::new(binary());
        command
            .arg("init")
            .args(args)
            .current_dir(dir.path())
            .env_remove("DATABASE_URL");
        if let Some(url) = env_url {
            command.env("DATABASE_URL", url);
        }
        let out = command.output().expect("run init");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };

    let (code, out) = init(&[], Some(&url));
    assert_eq!(code, 0, "{out}");
    let config = std::fs::read_to_string(dir.path().join("invalidator.toml")).unwrap();
    let rules = std::fs::read_to_string(dir.path().join("rules/tables.toml")).unwrap();
    for text in [&config, &rules, &out] {
        assert!(
            !text.contains("init-s3cret"),
            "the password was written:\n{text}"
        );
    }
    assert!(
        config.contains(&format!(
            "url = \"postgres://postgres@127.0.0.1:{}/{db}\"",
            cluster.port()
        )),
        "{config}"
    );
    for rule in [
        "# table = \"orders\"\n# keys = [\"orders:{id}\"]",
        "# table = \"sales.lines\"\n# keys = [\"sales.lines:{order_id}:{line}\"]",
        "# table = \"events\"\n# keys = [\"events:{id}:{day}\"]",
        "# audit: no primary key; EDIT",
    ] {
        assert!(rules.contains(rule), "no {rule:?} in:\n{rules}");
    }
    assert!(
        !rules.contains("events_2026"),
        "a partition got its own rule:\n{rules}"
    );

    // Run again (with --database-url this time): it says what exists, exits 1, keeps the files.
    let (code, out) = init(&["--database-url", &url], None);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("invalidator.toml already exists"), "{out}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("invalidator.toml")).unwrap(),
        config
    );

    // Edited (the orders rule uncommented), the starter files pass `check` against the database.
    let edited = rules.replace(
        "# [[rule]]\n# name = \"orders\"\n# table = \"orders\"\n# keys = [\"orders:{id}\"]",
        "[[rule]]\nname = \"orders\"\ntable = \"orders\"\nkeys = [\"orders:{id}\"]",
    );
    std::fs::write(dir.path().join("rules/tables.toml"), edited).unwrap();
    let out = Command::new(binary())
        .args(["check", "--offline"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    // Without a database URL it says how to give one.
    let (code, out) = init(&[], None);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("--database-url"), "{out}");
}

#[test]
fn without_a_config_file_the_error_says_defaults_are_used_and_a_bad_variable_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let run = |vars: &[(&str, &str)]| {
        let out = Command::new(binary())
            .args(["check", "--offline"])
            .current_dir(dir.path())
            .envs(vars.iter().copied())
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("./invalidator.toml does not exist, so defaults and the environment are used"),
        "{err}"
    );
    let (code, err) = run(&[("INVALIDATOR_POSTGRES_SLOT", "Bad-Slot")]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("INVALIDATOR_POSTGRES_SLOT (environment, [postgres.slot])"),
        "{err}"
    );
}

#[test]
fn explain_under_default_identity_keeps_literal_keys_on_the_primary_key_and_says_what_it_assumed() {
    let (_db, setup) = setup(
        "[[rule]]\nname = \"plain\"\ntable = \"plain\"\nkeys = [\"plain:{id}\", \"owner:{owner}\"]\n",
    );
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "--table", "plain"];
        all.extend(args);
        let (code, out, err) = invalidator(&setup, &all);
        assert_eq!(code, 0, "{out}{err}");
        serde_json::from_str::<Json>(&out).unwrap()
    };
    // An update that keeps the key: Postgres sends no old row, and a real run takes the old
    // key from the new row, so `plain:7` stays a literal key; the old owner is unknown.
    let doc = explain(&["--op", "update", "--new", r#"{"id": 7, "owner": 71}"#]);
    assert_eq!(
        doc["keys"],
        serde_json::json!(["owner:71", "plain:7"]),
        "{doc}"
    );
    assert_eq!(doc["patterns"], serde_json::json!(["owner:*"]), "{doc}");
    let said = doc["old_row"].as_str().unwrap();
    assert!(
        said.starts_with("REPLICA IDENTITY DEFAULT of public.plain: the old row holds only id"),
        "{said}"
    );
    // A delete sends only the old key, however much of the row is given.
    for row in [r#"{"id": 7}"#, r#"{"id": 7, "owner": 70}"#] {
        for flag in ["--old", "--new"] {
            let doc = explain(&["--op", "delete", flag, row]);
            assert_eq!(
                doc["keys"],
                serde_json::json!(["plain:7"]),
                "{flag} {row}: {doc}"
            );
            assert_eq!(
                doc["patterns"],
                serde_json::json!(["owner:*"]),
                "{flag} {row}: {doc}"
            );
        }
    }
    // Offline, the rows are taken as given, and the output says so.
    let doc = explain(&[
        "--op",
        "delete",
        "--old",
        r#"{"id": 7, "owner": 70}"#,
        "--offline",
    ]);
    assert_eq!(
        doc["keys"],
        serde_json::json!(["owner:70", "plain:7"]),
        "{doc}"
    );
    let said = doc["old_row"].as_str().unwrap();
    assert!(
        said.starts_with("assumed, not read from the database (--offline)"),
        "{said}"
    );
    let (code, out, _) = invalidator(
        &setup,
        &[
            "explain",
            "--format",
            "human",
            "--table",
            "plain",
            "--op",
            "update",
            "--new",
            r#"{"id": 7}"#,
            "--offline",
        ],
    );
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("\n  old row: assumed, not read from the database (--offline)"),
        "{out}"
    );
}

/// `target_session_attrs` values of libpq that the connections do not honour (`primary`,
/// `standby`, `prefer-standby`) or that would send the SQL connection (the visibility gate's,
/// setup's) to a standby while replication goes to the primary (`read-only`) are refused at
/// load, naming the parameter and what to use; `read-write` and `any` pass.
#[test]
fn target_session_attrs_the_sidecar_cannot_honour_are_refused_naming_what_to_use() {
    let (db, config) = setup(RULES);
    let port = PgCluster::shared().port();
    for (attrs, refused) in [
        ("primary", true),
        ("standby", true),
        ("prefer-standby", true),
        ("read-only", true),
        ("read-write", false),
        ("any", false),
    ] {
        let url = format!(
            "postgres://postgres:s3cret@127.0.0.1:1,127.0.0.1:{port}/{db}?target_session_attrs={attrs}"
        );
        let with = Config(Setup::with_slot(
            &url,
            "redis://127.0.0.1:1/0",
            RULES,
            &config.0.slot,
        ));
        let (code, out, err) = invalidator(&with.0, &["status"]);
        let text = format!("{out}{err}");
        assert!(!text.contains("s3cret"), "{attrs}: {text}");
        let named = text.contains(&format!("target_session_attrs={attrs} is not supported"));
        assert_eq!(named, refused, "{attrs} (exit {code}): {text}");
        if refused {
            assert!(text.contains("use read-write"), "{attrs}: {text}");
        }
    }
}

/// With several hosts, one that accepts the connection and never answers (a hung server, a
/// dropped network) is passed over after `connect_timeout` for the SQL sessions too, as libpq
/// does and as the replication connection does: `status` reaches the next host and reports
/// what it found there.
#[test]
fn a_hung_first_host_is_passed_over_by_the_sql_sessions_after_the_connect_timeout() {
    let (db, config) = setup(RULES);
    let cluster = PgCluster::shared();
    let hung = crate::support::TcpProxy::start(cluster.port());
    hung.cut(crate::support::CutMode::Blackhole);
    let url = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/{db}?connect_timeout=2",
        hung.port(),
        cluster.port()
    );
    let with = Config(Setup::with_slot(
        &url,
        "redis://127.0.0.1:1/0",
        RULES,
        &config.0.slot,
    ));
    let mut child = Command::new(binary())
        .args(["status", "--config"])
        .arg(with.0.config())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run invalidator status");
    // 30 s, polled: the child must be killed (not left hanging) when it does not exit.
    let exited = (0..1500).any(|_| {
        let done = child.try_wait().unwrap().is_some();
        if !done {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        done
    });
    if !exited {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(exited, "status hung on the first host: {stdout}{stderr}");
    // The second host's answer (no slot yet: `setup` was not run).
    assert_eq!(
        stdout,
        format!(
            "slot {}: does not exist (run `invalidator setup`)\n",
            with.0.slot
        ),
        "{stderr}"
    );
}
