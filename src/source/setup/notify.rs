//! Notify mode's part of `setup`: the outbox, the trigger function and each watched table's
//! triggers, planned as [`Action`]s like the rest of setup; the reader in
//! [`crate::source::notify`] only reads what they write.

use std::collections::{BTreeMap, BTreeSet};

use crate::change::TableName;
use crate::rules::RuleSet;
use crate::source::notify::{CHANNEL, ROW_TRIGGER, SCHEMA, TRUNCATE_TRIGGER};
use crate::source::setup::{
    Action, SetupError, Sql, missing_tables, qualified, quote_ident, quote_literal,
};
use crate::source::{TEXT_FORM, invalidate, text_form_clauses};

/// The trigger function's body. It records, of the old and the new row, only the columns named
/// by the trigger's arguments (the columns the table's rules read), in Postgres text form
/// (`hstore(record)` uses each type's output function, under the function's pinned
/// [`TEXT_FORM`] rather than the writer's settings), SQL NULL as JSON null; `ext` is hstore's
/// schema, quoted.
fn function_body(ext: &str) -> String {
    format!(
        "\nDECLARE\n\
         \x20 columns text[] := coalesce(TG_ARGV, '{{}}');\n\
         BEGIN\n\
         \x20 IF TG_LEVEL = 'STATEMENT' THEN\n\
         \x20   INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op)\n\
         \x20   VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, lower(TG_OP));\n\
         \x20 ELSIF TG_OP = 'INSERT' THEN\n\
         \x20   INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op, new)\n\
         \x20   VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', {ext}.hstore_to_jsonb({ext}.slice({ext}.hstore(NEW), columns)));\n\
         \x20 ELSIF TG_OP = 'UPDATE' THEN\n\
         \x20   INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op, old, new)\n\
         \x20   VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', {ext}.hstore_to_jsonb({ext}.slice({ext}.hstore(OLD), columns)), {ext}.hstore_to_jsonb({ext}.slice({ext}.hstore(NEW), columns)));\n\
         \x20 ELSE\n\
         \x20   INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op, old)\n\
         \x20   VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'delete', {ext}.hstore_to_jsonb({ext}.slice({ext}.hstore(OLD), columns)));\n\
         \x20 END IF;\n\
         \x20 PERFORM pg_notify('{CHANNEL}', '');\n\
         \x20 RETURN NULL;\n\
         END\n"
    )
}

/// The trigger function's `search_path`: nothing a writer creates can shadow what it calls.
const CAPTURE_SEARCH_PATH: &str = "SET search_path = pg_catalog, pg_temp";

/// The trigger function's settings as `pg_proc.proconfig` lists them, one a line: its
/// `search_path`, then the text form of values ([`TEXT_FORM`]).
fn capture_config() -> String {
    std::iter::once("search_path=pg_catalog, pg_temp".to_owned())
        .chain(
            TEXT_FORM
                .iter()
                .map(|(name, value)| format!("{name}={value}")),
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// The row trigger's arguments for a table: the columns its rules read, each a SQL literal.
fn trigger_args(columns: &BTreeSet<String>) -> String {
    columns
        .iter()
        .map(|c| quote_literal(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Splits `pg_trigger.tgargs` (as hex): each argument ends with a NUL byte.
fn parse_tgargs(hex: &str) -> Option<Vec<String>> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let mut args: Vec<String> = bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // The last argument's NUL leaves an empty piece behind it (and no arguments, one).
    args.pop();
    Some(args)
}

/// Why a trigger that fires only in origin sessions is out of date: writes of a session with
/// `session_replication_role = replica`, which is how a logical replication subscriber applies
/// its changes and how some restore and copy tools write, would not reach the outbox.
const REPLICA_ROLE: &str = "does not fire in sessions with session_replication_role = replica \
    (a logical replication subscriber applying changes, some restore tools)";

/// Creates trigger `trigger` of `definition` (`AFTER ... FOR EACH ...`) on `table`, firing in
/// every session ([`REPLICA_ROLE`] says why), in one transaction so that no write finds it
/// firing only in origin sessions; `replace` drops the present one first.
fn create_trigger(trigger: &str, table: &str, definition: &str, replace: bool) -> String {
    let trigger = quote_ident(trigger);
    let drop = if replace {
        format!("DROP TRIGGER {trigger} ON {table}; ")
    } else {
        String::new()
    };
    format!(
        "BEGIN; {drop}CREATE TRIGGER {trigger} {definition}; \
         ALTER TABLE {table} ENABLE ALWAYS TRIGGER {trigger}; COMMIT"
    )
}

/// What one of our triggers on a table looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    /// `pg_trigger.tgenabled`: `A` fires in every session; `O` not in those whose
    /// `session_replication_role` is `replica`; `D` and `R` not on ordinary writes.
    enabled: String,
    /// Its arguments.
    args: Vec<String>,
    /// Whether it calls `invalidator.capture()`.
    our_function: bool,
}

impl Installed {
    /// Why it is not what we want, if it is not.
    fn problem(&self, wanted_args: &[String]) -> Option<String> {
        if !self.our_function {
            Some(format!("does not call {SCHEMA}.capture()"))
        } else if self.enabled == "O" {
            Some(REPLICA_ROLE.to_owned())
        } else if self.enabled != "A" {
            Some("is disabled".to_owned())
        } else if self.args != wanted_args {
            Some(format!(
                "records columns ({}), the rules read ({})",
                self.args.join(", "),
                wanted_args.join(", ")
            ))
        } else {
            None
        }
    }
}

/// Works out what notify mode is missing or has out of date: the tables and the columns the
/// rules read are checked, then the schema, hstore, the outbox, the trigger function (replaced
/// when its body differs), each table's two triggers (the row trigger's arguments must be the
/// columns its rules read today); `invalidator.invalidate()` is [`invalidate::plan`]'s. Idempotent: once everything is
/// in place the plan is empty. `run` refuses to start unless it is.
///
/// A trigger that must change is dropped and created again in one transaction (`BEGIN; DROP
/// TRIGGER; CREATE TRIGGER; COMMIT`), so no write slips between the two; unlike `CREATE OR
/// REPLACE TRIGGER` (PostgreSQL 14) that works on 13 too. Versions before 13 are not supported
/// (`EXECUTE FUNCTION` in trigger definitions needs 11, and hstore's `slice` with trigger
/// arguments is what the function relies on).
pub async fn plan(db: &mut impl Sql, rules: &RuleSet) -> Result<Vec<Action>, SetupError> {
    let tables: BTreeSet<TableName> = rules.tables().cloned().collect();
    let missing = missing_tables(db, &tables).await?;
    if !missing.is_empty() {
        return Err(SetupError::MissingTables(missing));
    }
    refuse_missing_columns(db, rules, &tables).await?;
    let mut actions = Vec::new();
    let schema = quote_ident(SCHEMA);
    if !invalidate::has_schema(db).await? {
        actions.push(invalidate::create_schema());
    }
    let ext = hstore(db, &schema, &mut actions).await?;
    actions.extend(outbox_table(db, &schema).await?);
    let function = format!("{schema}.capture()");
    actions.extend(capture_function(db, &ext, &function).await?);
    for table in &tables {
        actions.extend(triggers(db, rules, table, &schema, &function).await?);
    }
    actions.extend(
        partition_plan(db, rules)
            .await?
            .into_iter()
            .map(|(_, action)| action),
    );
    Ok(actions)
}

/// Refuses rules that read columns their tables lack: the triggers could not record them.
async fn refuse_missing_columns(
    db: &mut impl Sql,
    rules: &RuleSet,
    tables: &BTreeSet<TableName>,
) -> Result<(), SetupError> {
    let mut lacking = Vec::new();
    for table in tables {
        let have: BTreeSet<String> = db
            .query(&format!(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass({}) \
                 AND attnum > 0 AND NOT attisdropped",
                quote_literal(&qualified(table))
            ))
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        let absent: Vec<String> = rules
            .columns_for(table)
            .difference(&have)
            .cloned()
            .collect();
        if !absent.is_empty() {
            lacking.push((table.clone(), absent));
        }
    }
    if !lacking.is_empty() {
        return Err(SetupError::MissingColumns(lacking));
    }
    Ok(())
}

/// The schema hstore is installed in, quoted; when it is not, the action that installs it in
/// `schema` (row values in Postgres text form).
async fn hstore(
    db: &mut impl Sql,
    schema: &str,
    actions: &mut Vec<Action>,
) -> Result<String, SetupError> {
    let hstore = db
        .query(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'hstore'",
        )
        .await?;
    let ext = match hstore.into_iter().next().and_then(|r| r.into_iter().next()) {
        Some(Some(ext_schema)) => quote_ident(&ext_schema),
        _ => {
            actions.push(Action {
                why: "create extension hstore (row values in Postgres text form)".to_owned(),
                sql: format!("CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA {schema}"),
            });
            schema.to_owned()
        }
    };
    Ok(ext)
}

/// The action that creates the outbox table in `schema`, when it is missing.
async fn outbox_table(db: &mut impl Sql, schema: &str) -> Result<Option<Action>, SetupError> {
    let outbox = format!("{schema}.outbox");
    let has_outbox = db
        .query(&format!(
            "SELECT to_regclass({}) IS NOT NULL",
            quote_literal(&outbox)
        ))
        .await?;
    if has_outbox
        .first()
        .and_then(|r| r.first().cloned().flatten())
        != Some("t".to_owned())
    {
        return Ok(Some(Action {
            why: format!("create the outbox table {SCHEMA}.outbox"),
            sql: format!(
                "CREATE TABLE IF NOT EXISTS {outbox} (id bigserial PRIMARY KEY, \
                 table_schema text NOT NULL, table_name text NOT NULL, op text NOT NULL, \
                 old jsonb, new jsonb, created_at timestamptz NOT NULL DEFAULT now())"
            ),
        }));
    }
    Ok(None)
}

/// The action that creates or replaces the trigger function `function` (hstore in `ext`), when
/// it is missing, out of date, or without the pinned settings.
async fn capture_function(
    db: &mut impl Sql,
    ext: &str,
    function: &str,
) -> Result<Option<Action>, SetupError> {
    let body = function_body(ext);
    let current = db
        .query(&format!(
            "SELECT prosrc, array_to_string(proconfig, chr(10)) FROM pg_proc \
             WHERE oid = to_regprocedure({})",
            quote_literal(function)
        ))
        .await?;
    let why = match current.first().map(Vec::as_slice) {
        None => Some(format!("create the trigger function {SCHEMA}.capture()")),
        Some([Some(source), _]) if *source != body => Some(format!(
            "replace the trigger function {SCHEMA}.capture(), whose body is out of date"
        )),
        Some([_, config]) if config.as_deref() != Some(capture_config().as_str()) => Some(format!(
            "replace the trigger function {SCHEMA}.capture(), which writes values in the \
                 writing session's settings (time zone, date style, ...), so their keys \
                 depend on who writes"
        )),
        Some(_) => None,
    };
    Ok(why.map(|why| Action {
        why,
        // SECURITY DEFINER: writers need no privileges on the outbox. The SET clauses pin
        // the text form of values for the function's run, whatever the writer's session
        // or role set. Not executable by PUBLIC: a trigger of another role's making could
        // then write the outbox.
        sql: format!(
            "CREATE OR REPLACE FUNCTION {function} RETURNS trigger LANGUAGE plpgsql \
                 SECURITY DEFINER {CAPTURE_SEARCH_PATH}{} AS {}; \
                 REVOKE ALL ON FUNCTION {function} FROM PUBLIC",
            text_form_clauses(),
            quote_literal(&body)
        ),
    }))
}

/// The actions that create or replace the row and truncate triggers of `table`.
async fn triggers(
    db: &mut impl Sql,
    rules: &RuleSet,
    table: &TableName,
    schema: &str,
    function: &str,
) -> Result<Vec<Action>, SetupError> {
    let mut actions = Vec::new();
    let name = qualified(table);
    let present: BTreeMap<String, Installed> = db
        .query(&format!(
            "SELECT tgname, tgenabled::text, encode(tgargs, 'hex'), \
             tgfoid = coalesce(to_regprocedure({})::oid, 0) \
             FROM pg_trigger WHERE tgrelid = to_regclass({}) AND tgname IN ({}, {})",
            quote_literal(function),
            quote_literal(&name),
            quote_literal(ROW_TRIGGER),
            quote_literal(TRUNCATE_TRIGGER)
        ))
        .await?
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Some(tgname), Some(enabled), Some(args), Some(ours)] => Some((
                tgname.clone(),
                Installed {
                    enabled: enabled.clone(),
                    args: parse_tgargs(args)?,
                    our_function: ours == "t",
                },
            )),
            _ => None,
        })
        .collect();
    let columns = rules.columns_for(table);
    let wanted: Vec<String> = columns.iter().cloned().collect();
    let triggers = [
        (
            ROW_TRIGGER,
            "AFTER INSERT OR UPDATE OR DELETE",
            "ROW",
            trigger_args(&columns),
            &wanted[..],
            "row changes",
        ),
        (
            TRUNCATE_TRIGGER,
            "AFTER TRUNCATE",
            "STATEMENT",
            String::new(),
            &[][..],
            "truncates",
        ),
    ];
    for (trigger, events, level, args, wanted, what) in triggers {
        let definition = format!(
            "{events} ON {name} FOR EACH {level} EXECUTE FUNCTION {schema}.capture({args})"
        );
        match present.get(trigger).map(|t| t.problem(wanted)) {
            None => actions.push(Action {
                why: format!("capture {what} of {table}"),
                sql: create_trigger(trigger, &name, &definition, false),
            }),
            Some(Some(problem)) => actions.push(Action {
                why: format!("replace trigger {trigger} on {table}, which {problem}"),
                sql: create_trigger(trigger, &name, &definition, true),
            }),
            Some(None) => {}
        }
    }
    Ok(actions)
}

/// The TRUNCATE triggers the partitions of the rules' tables lack, each with its rule table.
/// A row trigger on a partitioned table is cloned to every partition, present and future, but
/// a statement-level trigger is not, and a TRUNCATE of one partition fires only that
/// partition's: so each partition, at any depth, needs its own. `run` adds them itself, at
/// start and for partitions attached while it runs (see [`repair_partitions`]).
pub async fn partition_plan(
    db: &mut impl Sql,
    rules: &RuleSet,
) -> Result<Vec<(TableName, Action)>, SetupError> {
    let function = quote_literal(&format!("{}.capture()", quote_ident(SCHEMA)));
    let mut out = Vec::new();
    for table in rules.tables() {
        let root = format!("to_regclass({})", quote_literal(&qualified(table)));
        let rows = db
            .query(&format!(
                "SELECT n.nspname, c.relname, (SELECT CASE WHEN t.tgfoid = \
                 coalesce(to_regprocedure({function})::oid, 0) AND t.tgenabled = 'A' \
                 THEN 'ok' ELSE 'bad' END FROM pg_trigger t WHERE t.tgrelid = p.relid \
                 AND t.tgname = {}) FROM pg_partition_tree({root}) p \
                 JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE p.relid <> {root} ORDER BY p.level, c.relname",
                quote_literal(TRUNCATE_TRIGGER)
            ))
            .await?;
        for row in rows {
            let [Some(schema), Some(name), state] = row.as_slice() else {
                continue;
            };
            let partition = TableName::new(schema, name);
            // A partition with rules of its own gets its triggers as a rule table.
            if rules.has_table(&partition) || state.as_deref() == Some("ok") {
                continue;
            }
            let on = qualified(&partition);
            let definition = format!(
                "AFTER TRUNCATE ON {on} FOR EACH STATEMENT EXECUTE FUNCTION {}.capture()",
                quote_ident(SCHEMA)
            );
            let action = match state {
                None => Action {
                    why: format!("capture truncates of {partition}, a partition of {table}"),
                    sql: create_trigger(TRUNCATE_TRIGGER, &on, &definition, false),
                },
                Some(_) => Action {
                    why: format!(
                        "replace trigger {TRUNCATE_TRIGGER} on {partition}, a partition of \
                         {table}, which does not fire in every session or does not call \
                         {SCHEMA}.capture()"
                    ),
                    sql: create_trigger(TRUNCATE_TRIGGER, &on, &definition, true),
                },
            };
            out.push((table.clone(), action));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_arguments_are_read_back_from_tgargs() {
        // encode(tgargs, 'hex') of ('id', 'car_id'), of no arguments, and of ('').
        assert_eq!(
            parse_tgargs("6964006361725f696400"),
            Some(vec!["id".to_owned(), "car_id".to_owned()])
        );
        assert_eq!(parse_tgargs(""), Some(vec![]));
        assert_eq!(parse_tgargs("00"), Some(vec![String::new()]));
        assert_eq!(parse_tgargs("zz"), None);
        let columns: BTreeSet<String> = ["id".to_owned(), "it's".to_owned()].into();
        assert_eq!(trigger_args(&columns), "'id', 'it''s'");
    }

    #[test]
    fn a_trigger_is_out_of_date_when_disabled_foreign_or_recording_other_columns() {
        let wanted = ["car_id".to_owned(), "id".to_owned()];
        let good = Installed {
            enabled: "A".into(),
            args: wanted.to_vec(),
            our_function: true,
        };
        assert_eq!(good.problem(&wanted), None);
        let origin = Installed {
            enabled: "O".into(),
            ..good.clone()
        };
        assert_eq!(origin.problem(&wanted).as_deref(), Some(REPLICA_ROLE));
        let fewer = Installed {
            args: vec!["id".into()],
            ..good.clone()
        };
        assert_eq!(
            fewer.problem(&wanted).as_deref(),
            Some("records columns (id), the rules read (car_id, id)")
        );
        for enabled in ["D", "R"] {
            let off = Installed {
                enabled: enabled.into(),
                ..good.clone()
            };
            assert_eq!(off.problem(&wanted).as_deref(), Some("is disabled"));
        }
        let foreign = Installed {
            our_function: false,
            ..good
        };
        assert!(foreign.problem(&wanted).is_some());
    }

    #[test]
    fn the_trigger_function_records_only_its_arguments_columns() {
        let body = function_body("\"ext\"");
        assert!(body.contains("coalesce(TG_ARGV, '{}')"));
        assert_eq!(body.matches("\"ext\".slice(\"ext\".hstore(").count(), 4);
        assert!(!body.contains("hstore_to_jsonb(\"ext\".hstore("));
    }
}
