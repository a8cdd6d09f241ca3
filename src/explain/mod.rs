//! `invalidator explain`: what one change would delete, and which rule deletes what.
//!
//! The change comes from JSON rows (`--old`, `--new`) or from the live database (`--where`,
//! [`rows_from_database`]): the matching rows in Postgres text form, exactly as the WAL carries
//! them, with the old row cut down to what the table's REPLICA IDENTITY sends. The keys and
//! patterns are planned by [`RuleSet::plan`], as `run` plans them; each rule of the table is
//! also planned on its own, so the output says which rule produced which key, and why a rule
//! did not fire.

pub mod command;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value as Json, json};

use crate::change::{Change, Lsn, Op, Row, TableName, Value};
use crate::config::Mode;
use crate::rules::{Invalidation, Rule, RuleSet, write_column};
use crate::source::setup::{self, SetupError, qualified, quote_literal};

/// The JSON given for a row is not usable.
#[derive(Debug, thiserror::Error)]
#[error("--{which}: {message}")]
pub struct ExplainError {
    /// `old` or `new`.
    pub which: &'static str,
    /// What is wrong.
    pub message: String,
}

/// Turns a JSON object into a row in Postgres text form: strings as they are, numbers as
/// written, booleans as `t`/`f`, `null` as NULL, arrays and objects as JSON text. Columns
/// the object lacks are unknown, as when Postgres does not send them.
pub fn row_from_json(which: &'static str, text: &str) -> Result<Row, ExplainError> {
    let object: Map<String, Json> = serde_json::from_str(text).map_err(|e| ExplainError {
        which,
        message: format!("expected a JSON object of column values: {e}"),
    })?;
    let mut columns = Vec::with_capacity(object.len());
    let mut values = Vec::with_capacity(object.len());
    for (column, value) in object {
        values.push(match value {
            Json::Null => Value::Null,
            Json::String(s) => Value::Text(s),
            Json::Bool(b) => Value::Text(if b { "t" } else { "f" }.to_owned()),
            Json::Number(n) => Value::Text(n.to_string()),
            other => Value::Text(other.to_string()),
        });
        columns.push(column);
    }
    Ok(Row::new(Arc::from(columns), values))
}

/// A row without columns: every value unknown.
fn empty() -> Row {
    Row::new(Arc::from(Vec::<String>::new()), Vec::new())
}

/// A change of `table` with the given rows.
fn make(table: &TableName, op: Op, old: Option<Row>, new: Option<Row>) -> Change {
    Change {
        table: table.clone(),
        op,
        old,
        new,
        commit_lsn: Lsn(0),
        commit_time_us: 0,
    }
}

/// What Postgres sends of the old row of an update or delete, which decides the keys a real
/// run renders from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldRow {
    /// The whole old row: REPLICA IDENTITY FULL, or notify mode's triggers (`notify` true).
    Whole {
        /// Whether it is notify mode's triggers rather than REPLICA IDENTITY FULL.
        notify: bool,
    },
    /// Only the identity's columns: a delete sends them, an update only when one of them
    /// changed (the decoder then takes them from the new row). No columns: nothing is sent.
    Key {
        /// `relreplident`: `d` (the primary key), `i` (an index) or `n` (nothing).
        identity: char,
        /// The columns sent.
        columns: Vec<String>,
    },
    /// Not read from the database (why is given): the old row is taken as given.
    Assumed(String),
}

impl OldRow {
    /// What replication mode's server sends for `info` (notify mode: always the whole row).
    pub fn of(mode: Mode, info: &setup::TableInfo) -> OldRow {
        match (mode, info.replica_identity) {
            (Mode::Notify, _) => OldRow::Whole { notify: true },
            (Mode::Replication, 'f') => OldRow::Whole { notify: false },
            (Mode::Replication, identity) => OldRow::Key {
                identity,
                columns: info.identity_columns.clone(),
            },
        }
    }

    /// The old row a real run sees for `op`, from the rows given (`old` may be absent).
    fn apply(&self, op: Op, old: Option<Row>, new: &Row) -> Row {
        let given = match op {
            Op::Delete => old.unwrap_or_else(|| new.clone()),
            _ => old.unwrap_or_else(empty),
        };
        let OldRow::Key { columns, .. } = self else {
            return given;
        };
        let known = |v: &Value| !matches!(v, Value::Unknown);
        // An update sends the old key only when it changed; otherwise the decoder takes the
        // key from the new row.
        let key_changed = op == Op::Update
            && columns.iter().any(|c| {
                let (was, is) = (given.get(c), new.get(c));
                known(was) && known(is) && was != is
            });
        let values = columns
            .iter()
            .map(|c| match (op, key_changed, new.get(c)) {
                (Op::Update, false, value) if known(value) => value.clone(),
                _ => given.get(c).clone(),
            })
            .collect();
        Row::new(Arc::from(columns.clone()), values)
    }

    /// One sentence for the output: what the old row is, and where that was learnt.
    pub fn describe(&self, table: &TableName) -> String {
        match self {
            OldRow::Whole { notify: true } => "notify mode: the triggers record the whole old \
                row, taken as --old gives it (a column it lacks is unknown)"
                .to_owned(),
            OldRow::Whole { notify: false } => format!(
                "REPLICA IDENTITY FULL of {table}: the whole old row is sent, taken as --old \
                 gives it (a column it lacks is unknown)"
            ),
            OldRow::Key { identity, columns } if columns.is_empty() => format!(
                "REPLICA IDENTITY {} of {table} sends no old row (and once the table is \
                 published, Postgres refuses its UPDATEs and DELETEs): every old value is unknown",
                identity_name(*identity)
            ),
            OldRow::Key { identity, columns } => format!(
                "REPLICA IDENTITY {} of {table}: the old row holds only {}, sent by a delete, and \
                 by an update only when it changes (else it is the new row's); every other old \
                 value is unknown",
                identity_name(*identity),
                columns.join(", ")
            ),
            OldRow::Assumed(why) => format!(
                "assumed, not read from the database ({why}): the old row is --old as given, a \
                 column it lacks unknown, as under REPLICA IDENTITY FULL; under DEFAULT a real \
                 run knows only the primary key of the old row, so keys from its other columns \
                 become patterns"
            ),
        }
    }
}

/// How `ALTER TABLE ... REPLICA IDENTITY` names a `relreplident`.
fn identity_name(identity: char) -> &'static str {
    match identity {
        'd' => "DEFAULT",
        'i' => "USING INDEX",
        'f' => "FULL",
        _ => "NOTHING",
    }
}

/// Builds the change `explain` plans from JSON rows, with the old row cut down to what the
/// server sends (`sent`). A delete given only `--new` takes it as the old row; an update
/// without `--old` has an old row of unknown values, but for the key that `sent` says the
/// decoder takes from the new row.
pub fn change(
    table: &TableName,
    op: Op,
    old: Option<&str>,
    new: Option<&str>,
    sent: &OldRow,
) -> Result<Change, ExplainError> {
    let old = old.map(|t| row_from_json("old", t)).transpose()?;
    let new = new.map(|t| row_from_json("new", t)).transpose()?;
    let (old, new) = match op {
        Op::Insert => (None, Some(new.unwrap_or_else(empty))),
        Op::Update => {
            let new = new.unwrap_or_else(empty);
            (Some(sent.apply(op, old, &new)), Some(new))
        }
        Op::Delete => (Some(sent.apply(op, old, &new.unwrap_or_else(empty))), None),
        Op::Truncate => (None, None),
    };
    Ok(make(table, op, old, new))
}

/// Rows read from the live database for `explain --where`.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The matching rows, every column in Postgres text form.
    pub rows: Vec<Row>,
    /// What the server sends of an old row.
    pub old_row: OldRow,
}

/// `explain --where` could not read its rows.
#[derive(Debug, thiserror::Error)]
pub enum WhereError {
    /// The table does not exist.
    #[error("table {0} does not exist")]
    NoTable(TableName),
    /// No row matches.
    #[error("no row of {table} matches --where {filter:?}")]
    NoRows {
        /// The table.
        table: TableName,
        /// The condition as given.
        filter: String,
    },
    /// Too many rows match.
    #[error("more than {MAX_ROWS} rows of {0} match --where; narrow it")]
    TooMany(TableName),
    /// Reading the catalog failed.
    #[error(transparent)]
    Catalog(#[from] SetupError),
    /// The query failed (a syntax error in the condition, a timeout, ...).
    #[error("--where: {}", .0.as_db_error().map_or_else(|| .0.to_string(), |e| e.message().to_owned()))]
    Query(#[source] tokio_postgres::Error),
}

/// At most this many rows are explained at once.
pub const MAX_ROWS: usize = 1000;

/// How long the query of `--where` may run.
pub const WHERE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads the rows of `table` that match `filter` (the user's own SQL condition), in a READ
/// ONLY transaction with a statement timeout, as one statement (the extended protocol takes no
/// second one). Each value is its type's output function's text (`format('%s', ...)`), which is
/// what pgoutput and the notify triggers send; `::text` differs for some types (`boolean` gives
/// `true` rather than `t`), and the settings that shape it are pinned as theirs are
/// ([`crate::source::TEXT_FORM`]). In replication mode, generated columns are left out
/// (pgoutput does not send them), and so are the old-row columns the REPLICA IDENTITY does not
/// send.
pub async fn rows_from_database(
    client: &mut tokio_postgres::Client,
    table: &TableName,
    filter: &str,
    mode: Mode,
) -> Result<Fetched, WhereError> {
    let Some(info) = setup::table_info(client, table).await? else {
        return Err(WhereError::NoTable(table.clone()));
    };
    let old_row = OldRow::of(mode, &info);
    let generated = unsent_columns(client, table, mode).await?;
    let columns: Vec<String> = info
        .columns
        .into_iter()
        .filter(|c| !generated.contains(c))
        .collect();
    let select: Vec<String> = columns
        .iter()
        .map(|c| {
            let c = setup::quote_ident(c);
            format!("CASE WHEN num_nulls({c}) = 1 THEN NULL ELSE format('%s', {c}) END")
        })
        .collect();
    // The condition stands on lines of its own, so a `--` comment in it ends there.
    let sql = format!(
        "SELECT {} FROM {} WHERE (\n{filter}\n) LIMIT {}",
        if select.is_empty() {
            "1".to_owned()
        } else {
            select.join(", ")
        },
        qualified(table),
        MAX_ROWS + 1
    );
    let found = read_only(client, &sql).await.map_err(WhereError::Query)?;
    if found.is_empty() {
        return Err(WhereError::NoRows {
            table: table.clone(),
            filter: filter.to_owned(),
        });
    }
    if found.len() > MAX_ROWS {
        return Err(WhereError::TooMany(table.clone()));
    }
    let names: Arc<[String]> = Arc::from(columns.clone());
    let mut rows = Vec::with_capacity(found.len());
    for row in found {
        let values = (0..columns.len())
            .map(|i| {
                row.try_get::<_, Option<String>>(i)
                    .map(|v| v.map_or(Value::Null, Value::Text))
            })
            .collect::<Result<Vec<Value>, _>>()
            .map_err(WhereError::Query)?;
        rows.push(Row::new(names.clone(), values));
    }
    Ok(Fetched { rows, old_row })
}

/// The columns replication mode never sends (generated ones): the rows read leave them out, as
/// the WAL does. Notify mode's triggers send every column.
async fn unsent_columns(
    client: &mut tokio_postgres::Client,
    table: &TableName,
    mode: Mode,
) -> Result<BTreeSet<String>, WhereError> {
    if mode != Mode::Replication {
        return Ok(BTreeSet::new());
    }
    let sql = format!(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass({}) \
         AND attnum > 0 AND NOT attisdropped AND attgenerated <> ''",
        quote_literal(&qualified(table))
    );
    Ok(setup::Sql::query(client, &sql)
        .await?
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect())
}

/// Runs `sql` in a READ ONLY transaction with [`WHERE_TIMEOUT`], rolled back, with values in
/// the text form the sources write (see `TEXT_FORM`), whatever this role's settings are.
async fn read_only(
    client: &mut tokio_postgres::Client,
    sql: &str,
) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let tx = client.build_transaction().read_only(true).start().await?;
    let text_form: String = crate::source::TEXT_FORM
        .iter()
        .map(|(name, value)| format!("; SET LOCAL {name} = {}", quote_literal(value)))
        .collect();
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {}{text_form}",
        WHERE_TIMEOUT.as_millis()
    ))
    .await?;
    let found = tx.query(sql, &[]).await?;
    tx.rollback().await?;
    Ok(found)
}

/// The changes `explain --where` plans: one per row read, as `op` would change it. The row is
/// the new row of an insert and the old row of an update or delete (cut down to the REPLICA
/// IDENTITY's columns); an update's new row is the row with the columns of `overlay` (`--new`)
/// set, and an insert's too.
pub fn changes_from_rows(
    table: &TableName,
    op: Op,
    fetched: &Fetched,
    overlay: Option<&Row>,
) -> Vec<Change> {
    let old_of = |row: &Row| match &fetched.old_row {
        OldRow::Whole { .. } | OldRow::Assumed(_) => row.clone(),
        OldRow::Key {
            columns: identity, ..
        } => {
            let (columns, values): (Vec<String>, Vec<Value>) = row
                .columns
                .iter()
                .zip(&row.values)
                .filter(|(c, _)| identity.contains(c))
                .map(|(c, v)| (c.clone(), v.clone()))
                .unzip();
            Row::new(Arc::from(columns), values)
        }
    };
    let new_of = |row: &Row| {
        let Some(overlay) = overlay else {
            return row.clone();
        };
        let mut columns: Vec<String> = row.columns.to_vec();
        let mut values = row.values.clone();
        for (column, value) in overlay.columns.iter().zip(&overlay.values) {
            match columns.iter().position(|c| c == column) {
                Some(i) => values[i] = value.clone(),
                None => {
                    columns.push(column.clone());
                    values.push(value.clone());
                }
            }
        }
        Row::new(Arc::from(columns), values)
    };
    fetched
        .rows
        .iter()
        .map(|row| match op {
            Op::Insert => make(table, op, None, Some(new_of(row))),
            Op::Update => make(table, op, Some(old_of(row)), Some(new_of(row))),
            Op::Delete => make(table, op, Some(old_of(row)), None),
            Op::Truncate => make(table, op, None, None),
        })
        .collect()
}

/// What one rule did for the changes explained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleOutcome {
    /// The rule's name.
    pub rule: String,
    /// Its file.
    pub file: String,
    /// The line of its `[[rule]]` header.
    pub line: usize,
    /// Whether any of the changes fired it.
    pub fired: bool,
    /// Why it did not fire, or why firing rendered nothing.
    pub why: Option<String>,
    /// The literal keys it produced, sorted.
    pub keys: BTreeSet<String>,
    /// The patterns it produced, sorted.
    pub patterns: BTreeSet<String>,
}

/// What a set of changes of one table would delete, and which rule deletes what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// The table.
    pub table: TableName,
    /// The operation.
    pub op: Op,
    /// How many rows were explained (1 for JSON rows, 0 for a truncate).
    pub rows: usize,
    /// The literal keys, sorted: what `run` would `UNLINK`.
    pub keys: BTreeSet<String>,
    /// The patterns, sorted: what `run` would resolve with `SCAN`.
    pub patterns: BTreeSet<String>,
    /// Every rule of the table, in file order.
    pub rules: Vec<RuleOutcome>,
    /// What the old row was taken to be (updates and deletes), and where that was learnt.
    pub old_row: Option<String>,
}

/// Why `rule` does not fire on `change`, if it does not.
fn why_not(rule: &Rule, change: &Change) -> Option<String> {
    if !rule.ops.contains(&change.op) {
        let on: Vec<&str> = rule.ops.iter().map(|op| op.as_str()).collect();
        return Some(format!(
            "does not fire on {} (on = [{}])",
            change.op,
            on.join(", ")
        ));
    }
    if change.op != Op::Update || rule.changed.is_empty() {
        return None;
    }
    let get = |row: &Option<Row>, column: &str| {
        row.as_ref()
            .map_or(Value::Unknown, |r| r.get(column).clone())
    };
    let differs = rule.changed.iter().any(|c| {
        let (old, new) = (get(&change.old, c), get(&change.new, c));
        old == Value::Unknown || new == Value::Unknown || old != new
    });
    (!differs).then(|| {
        format!(
            "the update changed none of its `changed` columns ({})",
            rule.changed.join(", ")
        )
    })
}

/// `rule` alone, compiled from its own parts, so that planning with it is exactly
/// [`RuleSet::plan`] for that one rule.
fn alone(rule: &Rule) -> Option<RuleSet> {
    let mut table = toml::Table::new();
    table.insert("name".into(), rule.name.clone().into());
    table.insert("table".into(), rule.table.to_string().into());
    let ops: Vec<toml::Value> = rule.ops.iter().map(|op| op.as_str().into()).collect();
    table.insert("on".into(), ops.into());
    if !rule.changed.is_empty() {
        let changed: Vec<String> = rule.changed.iter().map(|c| write_column(c)).collect();
        table.insert("changed".into(), changed.into());
    }
    table.insert("keys".into(), rule.keys.clone().into());
    let mut doc = toml::Table::new();
    doc.insert("rule".into(), vec![toml::Value::Table(table)].into());
    let text = toml::to_string(&doc).ok()?;
    RuleSet::compile(&[(rule.file.clone(), text)]).ok()
}

/// Plans `changes` (all of `table`, all `op`): the whole plan as `run` makes it, and each rule
/// of the table on its own.
pub fn explain_changes(
    rules: &RuleSet,
    table: &TableName,
    op: Op,
    changes: &[Change],
) -> Explanation {
    let mut all = Invalidation::default();
    for change in changes {
        rules.plan(change, &mut all);
    }
    let outcomes = rules
        .rules()
        .iter()
        .filter(|r| &r.table == table)
        .map(|rule| {
            let single = alone(rule);
            let mut mine = Invalidation::default();
            let mut fired = false;
            let mut why = None;
            for change in changes {
                match why_not(rule, change) {
                    Some(reason) => why = why.or(Some(reason)),
                    None => {
                        fired = true;
                        if let Some(single) = &single {
                            single.plan(change, &mut mine);
                        }
                    }
                }
            }
            if fired {
                why = mine.is_empty().then(|| {
                    "fired, but a value its keys need is NULL, so they name no key".to_owned()
                });
            }
            RuleOutcome {
                rule: rule.name.clone(),
                file: rule.file.clone(),
                line: rule.line,
                fired,
                why,
                keys: mine.keys.into_iter().collect(),
                patterns: mine.patterns.into_iter().collect(),
            }
        })
        .collect();
    Explanation {
        table: table.clone(),
        op,
        rows: changes
            .iter()
            .filter(|c| c.old.is_some() || c.new.is_some())
            .count(),
        keys: all.keys.into_iter().collect(),
        patterns: all.patterns.into_iter().collect(),
        rules: outcomes,
        old_row: None,
    }
}

impl Explanation {
    /// The stable JSON document: `keys` and `patterns` (sorted, what `run` would delete, as
    /// before), and `table`, `op`, `rows`, and `rules`: each rule of the table with `rule`,
    /// `file`, `line`, `fired`, `why` (null when it fired and named keys) and its own `keys`
    /// and `patterns`.
    pub fn to_json(&self) -> String {
        let rules: Vec<Json> = self
            .rules
            .iter()
            .map(|r| {
                json!({
                    "rule": r.rule,
                    "file": r.file,
                    "line": r.line,
                    "fired": r.fired,
                    "why": r.why,
                    "keys": r.keys,
                    "patterns": r.patterns,
                })
            })
            .collect();
        let doc = json!({
            "table": self.table.to_string(),
            "op": self.op.as_str(),
            "rows": self.rows,
            "keys": self.keys,
            "patterns": self.patterns,
            "rules": rules,
            "old_row": self.old_row,
        });
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    /// The same for people: a summary line, then each rule with what it deletes.
    pub fn human(&self) -> String {
        let mut out = String::new();
        let rows = match self.rows {
            1 => "1 row".to_owned(),
            n => format!("{n} rows"),
        };
        let _ = writeln!(
            out,
            "{} on {} ({rows}): {} key{}, {} pattern{}",
            self.op,
            self.table,
            self.keys.len(),
            if self.keys.len() == 1 { "" } else { "s" },
            self.patterns.len(),
            if self.patterns.len() == 1 { "" } else { "s" },
        );
        if let Some(old_row) = &self.old_row {
            let _ = writeln!(out, "  old row: {old_row}");
        }
        if self.rules.is_empty() {
            let _ = writeln!(out, "  no rule watches {}", self.table);
        }
        for rule in &self.rules {
            let _ = write!(out, "  rule {:?} ({}:{})", rule.rule, rule.file, rule.line);
            match &rule.why {
                Some(why) if !rule.fired => {
                    let _ = writeln!(out, ": not fired: {why}");
                }
                Some(why) => {
                    let _ = writeln!(out, ": {why}");
                }
                None => out.push('\n'),
            }
            for key in &rule.keys {
                let _ = writeln!(out, "    key      {key}");
            }
            for pattern in &rule.patterns {
                let _ = writeln!(out, "    pattern  {pattern}");
            }
        }
        out.pop();
        out
    }
}

/// Plans `change` with `rules` and renders the result as JSON.
pub fn explain(rules: &RuleSet, change: &Change) -> String {
    explain_changes(
        rules,
        &change.table,
        change.op,
        std::slice::from_ref(change),
    )
    .to_json()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_take_postgres_text_form() {
        let row = row_from_json("new", r#"{"a": "x", "b": 42, "c": true, "d": null}"#).unwrap();
        assert_eq!(row.get("a"), &Value::Text("x".into()));
        assert_eq!(row.get("b"), &Value::Text("42".into()));
        assert_eq!(row.get("c"), &Value::Text("t".into()));
        assert_eq!(row.get("d"), &Value::Null);
        assert_eq!(row.get("missing"), &Value::Unknown);
    }

    #[test]
    fn bad_json_names_the_flag() {
        let err = row_from_json("old", "[1]").unwrap_err();
        assert!(
            err.to_string().starts_with("--old: expected a JSON object"),
            "{err}"
        );
    }

    fn bookings() -> TableName {
        TableName::new("public", "bookings")
    }

    fn exodrive() -> RuleSet {
        RuleSet::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/rules"
        )))
        .unwrap()
    }

    /// The union of what each rule produced is exactly what the whole rule set plans.
    fn assert_attribution_is_complete(e: &Explanation) {
        let mut keys = BTreeSet::new();
        let mut patterns = BTreeSet::new();
        for rule in &e.rules {
            keys.extend(rule.keys.iter().cloned());
            patterns.extend(rule.patterns.iter().cloned());
        }
        assert_eq!((keys, patterns), (e.keys.clone(), e.patterns.clone()));
    }

    #[test]
    fn every_key_is_attributed_to_the_rules_that_produce_it() {
        let rules = exodrive();
        let old = r#"{"id":"b1","car_id":"c1","customer_id":"u1","start_date":"2026-12-01","end_date":"2026-12-03","overall_status":"confirmed"}"#;
        let moved = r#"{"id":"b1","car_id":"c2","customer_id":"u1","start_date":"2026-12-01","end_date":"2026-12-03","overall_status":"confirmed"}"#;
        for (op, old, new) in [
            (Op::Insert, None, Some(moved)),
            (Op::Update, Some(old), Some(moved)),
            (Op::Update, Some(old), Some(old)),
            (Op::Update, None, Some(moved)),
            (Op::Delete, Some(old), None),
            (Op::Truncate, None, None),
        ] {
            let change = change(&bookings(), op, old, new, &FULL).unwrap();
            let e = explain_changes(&rules, &change.table, op, std::slice::from_ref(&change));
            assert_attribution_is_complete(&e);
        }
        let change = change(&bookings(), Op::Update, Some(old), Some(moved), &FULL).unwrap();
        let e = explain_changes(&rules, &bookings(), Op::Update, &[change]);
        let availability = e
            .rules
            .iter()
            .find(|r| r.rule == "booking-availability")
            .unwrap();
        assert!(availability.fired);
        assert!(availability.patterns.contains("availability:c1:*"));
        assert!(availability.patterns.contains("availability:c2:*"));
    }

    #[test]
    fn a_rule_that_does_not_fire_says_why() {
        let rules = exodrive();
        let row = r#"{"id":"b1","car_id":"c1","customer_id":"u1","start_date":"2026-12-01","end_date":"2026-12-03","overall_status":"confirmed","deleted_at":null,"notes":"a"}"#;
        let change = change(&bookings(), Op::Update, Some(row), Some(row), &FULL).unwrap();
        let e = explain_changes(&rules, &bookings(), Op::Update, &[change]);
        let availability = e
            .rules
            .iter()
            .find(|r| r.rule == "booking-availability")
            .unwrap();
        assert!(!availability.fired);
        assert!(
            availability
                .why
                .as_deref()
                .unwrap()
                .starts_with("the update changed none of its `changed` columns (car_id"),
            "{availability:?}"
        );
        let doc: Json = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(doc["op"], "update");
        assert_eq!(doc["rows"], 1);
        assert!(
            doc["rules"]
                .as_array()
                .unwrap()
                .iter()
                .any(|r| r["fired"] == false)
        );
        assert!(
            e.human().contains("not fired: the update changed none"),
            "{}",
            e.human()
        );
    }

    const FULL: OldRow = OldRow::Whole { notify: false };

    fn default_identity() -> OldRow {
        OldRow::Key {
            identity: 'd',
            columns: vec!["id".to_owned()],
        }
    }

    /// The old row `explain` plans with, as `(column, value)` pairs of what is known.
    fn old_row(
        sent: &OldRow,
        op: Op,
        old: Option<&str>,
        new: Option<&str>,
    ) -> Vec<(String, Value)> {
        let change = change(&bookings(), op, old, new, sent).unwrap();
        let old = change.old.unwrap();
        ["id", "car_id"]
            .iter()
            .map(|c| (c.to_string(), old.get(c).clone()))
            .filter(|(_, v)| v != &Value::Unknown)
            .collect()
    }

    #[test]
    fn under_default_identity_the_old_row_is_the_key_the_server_sends() {
        let text = |s: &str| Value::Text(s.to_owned());
        let whole = r#"{"id": "b1", "car_id": "c1"}"#;
        let moved = r#"{"id": "b1", "car_id": "c2"}"#;
        let rekeyed = r#"{"id": "b2", "car_id": "c2"}"#;
        let key = default_identity();
        // A delete sends the key of the old row, whether given as --old or --new.
        assert_eq!(
            old_row(&key, Op::Delete, Some(whole), None),
            [("id".into(), text("b1"))]
        );
        assert_eq!(
            old_row(&key, Op::Delete, None, Some(r#"{"id": "b1"}"#)),
            [("id".into(), text("b1"))]
        );
        // An update that keeps the key sends no old row: the decoder takes the new row's key.
        assert_eq!(
            old_row(&key, Op::Update, None, Some(moved)),
            [("id".into(), text("b1"))]
        );
        assert_eq!(
            old_row(&key, Op::Update, Some(whole), Some(moved)),
            [("id".into(), text("b1"))]
        );
        // An update that changes the key sends the old key.
        assert_eq!(
            old_row(&key, Op::Update, Some(whole), Some(rekeyed)),
            [("id".into(), text("b1"))]
        );
        // FULL sends the whole old row; NOTHING sends none.
        assert_eq!(
            old_row(&FULL, Op::Delete, Some(whole), None),
            [("id".into(), text("b1")), ("car_id".into(), text("c1"))]
        );
        let nothing = OldRow::Key {
            identity: 'n',
            columns: Vec::new(),
        };
        assert_eq!(old_row(&nothing, Op::Delete, Some(whole), None), []);
        assert_eq!(old_row(&nothing, Op::Update, Some(whole), Some(moved)), []);
        // Offline, --old is taken as given, and an update without it knows nothing.
        let assumed = OldRow::Assumed("--offline".into());
        assert_eq!(old_row(&assumed, Op::Update, None, Some(moved)), []);
        assert_eq!(old_row(&assumed, Op::Delete, Some(whole), None).len(), 2);
    }

    #[test]
    fn the_old_row_says_what_was_assumed_or_read() {
        let table = bookings();
        let offline = OldRow::Assumed("--offline".into()).describe(&table);
        assert!(
            offline.starts_with(
                "assumed, not read from the database (--offline): the old row is --old as given"
            ),
            "{offline}"
        );
        assert!(
            offline.contains("under DEFAULT a real run knows only the primary key"),
            "{offline}"
        );
        let key = default_identity().describe(&table);
        assert!(
            key.starts_with(
                "REPLICA IDENTITY DEFAULT of public.bookings: the old row holds only id"
            ),
            "{key}"
        );
        let rules = exodrive();
        let change = change(&table, Op::Delete, Some("{}"), None, &FULL).unwrap();
        let mut e = explain_changes(&rules, &table, Op::Delete, &[change]);
        e.old_row = Some(offline.clone());
        assert!(
            e.human().contains(&format!("\n  old row: {offline}\n")),
            "{}",
            e.human()
        );
        let doc: Json = serde_json::from_str(&e.to_json()).unwrap();
        assert_eq!(doc["old_row"], Json::String(offline));
    }

    #[test]
    fn rows_from_the_database_become_changes_as_the_wal_carries_them() {
        let columns: Arc<[String]> = Arc::from(vec!["id".to_owned(), "car".to_owned()]);
        let row = Row::new(
            columns,
            vec![Value::Text("1".into()), Value::Text("a".into())],
        );
        let fetched = Fetched {
            rows: vec![row],
            old_row: OldRow::Key {
                identity: 'd',
                columns: vec!["id".to_owned()],
            },
        };
        let table = TableName::new("public", "t");
        let overlay = row_from_json("new", r#"{"car": "b"}"#).unwrap();
        let changes = changes_from_rows(&table, Op::Update, &fetched, Some(&overlay));
        let change = &changes[0];
        let old = change.old.as_ref().unwrap();
        assert_eq!(old.get("id"), &Value::Text("1".into()));
        assert_eq!(old.get("car"), &Value::Unknown);
        let new = change.new.as_ref().unwrap();
        assert_eq!(new.get("car"), &Value::Text("b".into()));
        assert_eq!(new.get("id"), &Value::Text("1".into()));
        let delete = changes_from_rows(&table, Op::Delete, &fetched, None);
        assert_eq!(delete[0].old.as_ref().unwrap().get("car"), &Value::Unknown);
    }
}
