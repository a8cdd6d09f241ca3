//! An outbox row as the trigger stored it, and how it becomes the steps of a change.

use std::collections::HashMap;
use std::sync::Arc;

use crate::change::{Change, Lsn, Manual, Op, Row, Step, TableName, Value};
use crate::source::invalidate;

/// An outbox row that cannot be turned into a change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConvertError {
    /// The `op` column holds something else than the four operations.
    #[error("unknown operation {0:?}")]
    Op(String),
    /// A row column is not a JSON object.
    #[error("row is not a JSON object")]
    NotAnObject,
    /// An `invalidate()` row does not carry a JSON string.
    #[error("invalidate() row does not hold a JSON string")]
    NotAString,
    /// A row column is not JSON.
    #[error("row is not JSON: {0}")]
    Json(String),
}

/// Turns a row stored by the trigger (a JSON object of column name to text, or null) into a
/// [`Row`]: a string is the text form, JSON null is SQL NULL, and a column the object lacks
/// reads as `Unknown`. Other JSON values (never written by the trigger) keep their JSON text.
pub fn row_from_json(json: &serde_json::Value) -> Result<Row, ConvertError> {
    let serde_json::Value::Object(map) = json else {
        return Err(ConvertError::NotAnObject);
    };
    let mut columns = Vec::with_capacity(map.len());
    let mut values = Vec::with_capacity(map.len());
    for (column, value) in map {
        columns.push(column.clone());
        values.push(match value {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::String(s) => Value::Text(s.clone()),
            other => Value::Text(other.to_string()),
        });
    }
    Ok(Row::new(Arc::from(columns), values))
}

/// One outbox row as read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRow {
    /// The outbox id: what acknowledging deletes.
    pub id: i64,
    /// The table that changed.
    pub table: TableName,
    /// `insert`, `update`, `delete` or `truncate`.
    pub op: String,
    /// The old row as JSON text, if any.
    pub old: Option<String>,
    /// The new row as JSON text, if any.
    pub new: Option<String>,
    /// When the change was written (its transaction's start), microseconds since the epoch.
    pub created_us: i64,
}

impl OutboxRow {
    /// The row as the reader's query returns it.
    pub(super) fn from_row(row: &tokio_postgres::Row) -> Result<OutboxRow, tokio_postgres::Error> {
        Ok(OutboxRow {
            id: row.try_get(0)?,
            table: TableName::new(row.try_get::<_, String>(1)?, row.try_get::<_, String>(2)?),
            op: row.try_get(3)?,
            old: row.try_get(4)?,
            new: row.try_get(5)?,
            created_us: row.try_get(6)?,
        })
    }

    /// What the row gives the pipeline: its change (firing the rules of its table's partition
    /// `ancestors` too), or the key or pattern an `invalidate()` row names. A row that cannot
    /// be read is never skipped: it deletes everything it may have named.
    pub(super) fn steps(self, ancestors: &HashMap<TableName, Arc<[TableName]>>) -> Vec<Step> {
        let ancestors_of = |table: &TableName| {
            ancestors
                .get(table)
                .cloned()
                .unwrap_or_else(|| Arc::from([]))
        };
        if self.op == invalidate::OUTBOX_OP || self.op == invalidate::OUTBOX_KEY_OP {
            let manual = match self.given() {
                Ok(text) => Manual::Given {
                    text,
                    literal: self.op == invalidate::OUTBOX_KEY_OP,
                },
                Err(e) => {
                    tracing::error!(id = self.id, error = %e,
                        "unreadable invalidate() row in the outbox; deleting every key under \
                         the allowed prefixes");
                    Manual::Unreadable
                }
            };
            return vec![Step::Manual(manual)];
        }
        match self.change() {
            Ok(change) => {
                let ancestors = ancestors_of(&change.table);
                vec![Step::Change { change, ancestors }]
            }
            Err(e) => {
                tracing::warn!(id = self.id, table = %self.table, error = %e,
                    "unreadable outbox row; invalidating every pattern of its table's rules");
                std::iter::once(self.table.clone())
                    .chain(ancestors_of(&self.table).iter().cloned())
                    .map(|table| Step::Manual(Manual::Flush(table)))
                    .collect()
            }
        }
    }

    /// The key or pattern an `invalidate()` row carries: its `new` column, a JSON string.
    pub fn given(&self) -> Result<String, ConvertError> {
        let text = self.new.as_deref().ok_or(ConvertError::NotAString)?;
        match serde_json::from_str(text).map_err(|e| ConvertError::Json(e.to_string()))? {
            serde_json::Value::String(given) => Ok(given),
            _ => Err(ConvertError::NotAString),
        }
    }

    /// The change the row records.
    pub fn change(&self) -> Result<Change, ConvertError> {
        let op: Op = self
            .op
            .parse()
            .map_err(|_| ConvertError::Op(self.op.clone()))?;
        let row = |text: &Option<String>| -> Result<Option<Row>, ConvertError> {
            text.as_deref()
                .map(|t| {
                    let json =
                        serde_json::from_str(t).map_err(|e| ConvertError::Json(e.to_string()))?;
                    row_from_json(&json)
                })
                .transpose()
        };
        Ok(Change {
            table: self.table.clone(),
            op,
            old: row(&self.old)?,
            new: row(&self.new)?,
            commit_lsn: Lsn(self.id as u64),
            commit_time_us: self.created_us,
        })
    }
}
