//! Plain data shared by every stage: log positions, table names, row values and changes.
//!
//! Nothing here does I/O. The decoder produces these types, the rules engine reads them and the
//! pipeline moves them; keeping them dumb keeps each stage testable on its own.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// A position in the Postgres write-ahead log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text form of an LSN was not `XXXXXXXX/XXXXXXXX`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid LSN {0:?}: expected two hexadecimal numbers separated by '/'")]
pub struct ParseLsnError(pub String);

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_owned());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn((u64::from(hi) << 32) | u64::from(lo)))
    }
}

/// A schema-qualified table name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TableName {
    /// The schema, e.g. `public`.
    pub schema: String,
    /// The table within the schema.
    pub name: String,
}

impl TableName {
    /// Builds a name from its two parts.
    pub fn new(schema: impl Into<String>, name: impl Into<String>) -> Self {
        TableName {
            schema: schema.into(),
            name: name.into(),
        }
    }

    /// Parses `schema.table`, or a bare `table` meaning `public.table`.
    pub fn parse(s: &str) -> Self {
        match s.split_once('.') {
            Some((schema, name)) => TableName::new(schema, name),
            None => TableName::new("public", s),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.name)
    }
}

/// The kind of a row change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// A row was inserted.
    Insert,
    /// A row was updated.
    Update,
    /// A row was deleted.
    Delete,
    /// The whole table was truncated.
    Truncate,
}

impl Op {
    /// Every operation, in a fixed order.
    pub const ALL: [Op; 4] = [Op::Insert, Op::Update, Op::Delete, Op::Truncate];

    /// The lowercase name used in rules, the CLI and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Update => "update",
            Op::Delete => "delete",
            Op::Truncate => "truncate",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Op {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Op::ALL
            .into_iter()
            .find(|op| op.as_str() == s)
            .ok_or_else(|| {
                format!("unknown operation {s:?}: expected insert, update, delete or truncate")
            })
    }
}

/// One column value of a row, as Postgres sent it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// The value in Postgres text form.
    Text(String),
    /// The value exists but was not sent: an unchanged TOAST value, or a column missing from an
    /// old row because of the table's REPLICA IDENTITY. Rules treat it as "could be anything".
    Unknown,
}

/// The ordered column names of a table, shared by all rows decoded with the same relation.
pub type Columns = Arc<[String]>;

/// One row: column names with their values, in table order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Column names, shared with the relation they came from.
    pub columns: Columns,
    /// One value per column.
    pub values: Vec<Value>,
}

/// The value returned for a column the row does not hold.
static UNKNOWN: Value = Value::Unknown;

impl Row {
    /// Builds a row; `values` must have one entry per column.
    pub fn new(columns: Columns, values: Vec<Value>) -> Self {
        debug_assert_eq!(columns.len(), values.len());
        Row { columns, values }
    }

    /// The value of a column; a column the row does not hold is `Unknown`.
    pub fn get(&self, column: &str) -> &Value {
        self.columns
            .iter()
            .position(|c| c == column)
            .and_then(|i| self.values.get(i))
            .unwrap_or(&UNKNOWN)
    }
}

/// One committed row change of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The table that changed.
    pub table: TableName,
    /// What happened to it.
    pub op: Op,
    /// The row before the change (update, delete); columns it lacks are `Unknown`.
    pub old: Option<Row>,
    /// The row after the change (insert, update).
    pub new: Option<Row>,
    /// The LSN of the commit record of the transaction.
    pub commit_lsn: Lsn,
    /// Commit time, in microseconds since the Unix epoch.
    pub commit_time_us: i64,
}
