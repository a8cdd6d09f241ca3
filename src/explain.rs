//! `invalidator explain`: builds a change from JSON rows and shows what the rules would delete.

use std::sync::Arc;

use serde_json::{Map, Value as Json};

use crate::change::{Change, Lsn, Op, Row, TableName, Value};
use crate::rules::{Invalidation, RuleSet};

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

/// Builds the change `explain` plans. An update without `--old` has an old row whose values
/// are all unknown, which is what the rules see when Postgres does not send the old row.
pub fn change(
    table: &str,
    op: Op,
    old: Option<&str>,
    new: Option<&str>,
) -> Result<Change, ExplainError> {
    let old = old.map(|t| row_from_json("old", t)).transpose()?;
    let new = new.map(|t| row_from_json("new", t)).transpose()?;
    let empty = || Row::new(Arc::from(Vec::<String>::new()), Vec::new());
    let (old, new) = match op {
        Op::Insert => (None, Some(new.unwrap_or_else(empty))),
        Op::Update => (
            Some(old.unwrap_or_else(empty)),
            Some(new.unwrap_or_else(empty)),
        ),
        Op::Delete => (Some(old.or(new).unwrap_or_else(empty)), None),
        Op::Truncate => (None, None),
    };
    Ok(Change {
        table: TableName::parse(table),
        op,
        old,
        new,
        commit_lsn: Lsn(0),
        commit_time_us: 0,
    })
}

/// The plan as pretty JSON: `{"keys": [...], "patterns": [...]}`, each sorted.
pub fn render(inv: &Invalidation) -> String {
    let mut keys: Vec<&String> = inv.keys.iter().collect();
    let mut patterns: Vec<&String> = inv.patterns.iter().collect();
    keys.sort();
    patterns.sort();
    let out = serde_json::json!({ "keys": keys, "patterns": patterns });
    serde_json::to_string_pretty(&out).unwrap_or_default()
}

/// Plans `change` with `rules` and renders the result.
pub fn explain(rules: &RuleSet, change: &Change) -> String {
    let mut inv = Invalidation::default();
    rules.plan(change, &mut inv);
    render(&inv)
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
}
