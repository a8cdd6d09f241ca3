//! Plain data shared by every stage: log positions, table names, row values and changes.
//!
//! Nothing here does I/O. The decoder produces these types, the rules engine reads them and the
//! pipeline moves them; keeping them dumb keeps each stage testable on its own.

use std::borrow::Cow;
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
    ///
    /// Either part may be quoted as in SQL, `"my.schema"."Order Items"`, with `""` standing for
    /// a quote inside; a quoted part is taken exactly, and so is an unquoted one (no case
    /// folding: both are compared byte for byte with the names Postgres stores). A name that
    /// holds a dot or a quote, or begins or ends with a space, must be quoted.
    pub fn parse(s: &str) -> Result<Self, TableNameError> {
        let (first, rest) = identifier_part(s, 0)?;
        if rest == s.len() {
            return Ok(TableName::new("public", first));
        }
        // `rest` is at the dot that ends the first part.
        let (second, end) = identifier_part(s, rest + 1)?;
        if end != s.len() {
            return Err(TableNameError::TooManyParts);
        }
        Ok(TableName::new(first, second))
    }
}

/// Why a table name could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableNameError {
    /// An empty schema or table name (``, `.t`, `s.`, `""`).
    #[error("a name is empty")]
    Empty,
    /// An unquoted name that begins or ends with whitespace.
    #[error("spaces around a name (quote it to keep them)")]
    Spaces,
    /// A quote that no closing quote ends.
    #[error(
        "the quote at column {column} is never closed (write \"\" for a quote inside a quoted name)"
    )]
    Unterminated {
        /// The 1-based character position of the opening quote.
        column: usize,
    },
    /// A quote in the middle of an unquoted name.
    #[error(
        "a quote at column {column} in the middle of a name (quote the whole name, and double a quote inside it)"
    )]
    StrayQuote {
        /// The 1-based character position of the quote.
        column: usize,
    },
    /// Text right after the closing quote of a quoted name, where a dot or the end belongs.
    #[error("text after the closing quote at column {column} (a quoted name ends at its quote)")]
    AfterQuote {
        /// The 1-based character position of the text.
        column: usize,
    },
    /// More than two dot-separated parts.
    #[error(
        "more than schema and table (quote a name that holds a dot: \"my.schema\".\"my.table\")"
    )]
    TooManyParts,
}

/// Reads the part of the table name `whole` that starts at byte `from`: a quoted identifier,
/// or unquoted text up to the next dot. Returns the name and the byte where it ends (a dot, or
/// the end of `whole`).
fn identifier_part(whole: &str, from: usize) -> Result<(String, usize), TableNameError> {
    let column = |at: usize| whole[..at].chars().count() + 1;
    let text = &whole[from..];
    if text.starts_with('"') {
        let (name, rest) = unquote(text).ok_or(TableNameError::Unterminated {
            column: column(from),
        })?;
        let end = whole.len() - rest.len();
        if !rest.is_empty() && !rest.starts_with('.') {
            return Err(TableNameError::AfterQuote {
                column: column(end),
            });
        }
        if name.is_empty() {
            return Err(TableNameError::Empty);
        }
        return Ok((name, end));
    }
    let name = &text[..text.find('.').unwrap_or(text.len())];
    if let Some(at) = name.find('"') {
        return Err(TableNameError::StrayQuote {
            column: column(from + at),
        });
    }
    if name.is_empty() {
        return Err(TableNameError::Empty);
    }
    if name.trim() != name {
        return Err(TableNameError::Spaces);
    }
    Ok((name.to_owned(), from + name.len()))
}

/// Reads the quoted identifier at the start of `text` (which begins with `"`), where `""`
/// stands for one quote: the name and the text after its closing quote, or `None` when no
/// quote closes it.
pub(crate) fn unquote(text: &str) -> Option<(String, &str)> {
    let mut name = String::new();
    let mut rest = text.strip_prefix('"')?;
    loop {
        let at = rest.find('"')?;
        name.push_str(&rest[..at]);
        rest = &rest[at + 1..];
        match rest.strip_prefix('"') {
            Some(after) => {
                name.push('"');
                rest = after;
            }
            None => return Some((name, rest)),
        }
    }
}

/// One part of a table name as a rule writes it: as it is when [`TableName::parse`] reads it
/// back unchanged, quoted when it holds a dot or a quote, is empty, or begins or ends with
/// whitespace.
fn table_part(name: &str) -> Cow<'_, str> {
    if name.is_empty() || name.contains(['.', '"']) || name.trim() != name {
        Cow::Owned(crate::sql::quote_ident(name))
    } else {
        Cow::Borrowed(name)
    }
}

/// `schema.table`, each part quoted where a rule would have to quote it, so that the text
/// names the table unambiguously and parses back to it.
impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", table_part(&self.schema), table_part(&self.name))
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

/// A step of the committed transactions a source reads, in commit order: a transaction is a
/// [`Step::Begin`], its changes and the invalidations it carries by hand, then a
/// [`Step::Commit`]. Steps rather than whole transactions, so that the pipeline holds only what
/// a transaction invalidates, never its rows: a transaction of a million rows costs the keys it
/// renders, and past `pipeline.max_transaction_keys` only its tables' patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A transaction begins.
    Begin {
        /// Its commit time (notify mode: the time of its oldest outbox row), microseconds
        /// since the Unix epoch.
        commit_time_us: i64,
        /// Its transaction id, when it was read from the WAL: its deletes wait until a new
        /// snapshot sees it (a commit reaches the walsender before it is visible). `None` when
        /// it was read through a snapshot already (the outbox) or is the sidecar's own.
        xid: Option<u32>,
    },
    /// A row change of the open transaction.
    Change {
        /// The change.
        change: Change,
        /// The partition ancestors of its table, nearest first: the change fires their rules
        /// too (Postgres, and the triggers, name the partition).
        ancestors: Arc<[TableName]>,
    },
    /// An invalidation the open transaction carries besides its changes.
    Manual(Manual),
    /// The open transaction committed.
    Commit {
        /// Where the source stands once its invalidations are confirmed: the end LSN of the
        /// transaction, or (notify mode) the sequence number of the round of outbox rows.
        position: Lsn,
    },
    /// A block of changes of the streamed transaction `xid`, which has not committed yet, starts
    /// (PostgreSQL 14+, protocol version 2): the Change and Manual steps up to
    /// [`Step::StreamStop`] belong to it, made by its top-level transaction until a
    /// [`Step::Subtransaction`] says otherwise. Blocks of several transactions may alternate,
    /// and whole transactions may come between them.
    StreamStart {
        /// The top-level transaction.
        xid: u32,
        /// Whether this is its first block (after a reconnect the server starts over with it).
        first: bool,
    },
    /// The changes that follow in the block were made by the (sub)transaction `xid`.
    Subtransaction {
        /// The subtransaction, or the top-level transaction itself.
        xid: u32,
    },
    /// The block of a streamed transaction ends.
    StreamStop,
    /// The streamed transaction `xid` committed: every block of it counts.
    StreamCommit {
        /// The top-level transaction, for what must know which transaction became visible.
        xid: u32,
        /// Its end LSN: where the source stands once its invalidations are confirmed.
        position: Lsn,
        /// Its commit time, microseconds since the Unix epoch.
        commit_time_us: i64,
    },
    /// The streamed transaction `xid` aborted (`subxid == xid`), or only its subtransaction
    /// `subxid` did: what those changes planned is dropped.
    StreamAbort {
        /// The top-level transaction.
        xid: u32,
        /// The subtransaction that aborted, or `xid`.
        subxid: u32,
    },
    /// Nothing published lies before `position` on the server (a keepalive): with nothing open,
    /// queued or unconfirmed, it may be acknowledged.
    Idle {
        /// The server's WAL end.
        position: Lsn,
        /// The server asks for a status update now.
        reply: bool,
    },
}

/// An invalidation a transaction carries besides its changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Manual {
    /// A key or pattern given by hand with `invalidator.invalidate()`, or one literal key with
    /// `invalidate_key()`: deleted only under the allowed prefixes.
    Given {
        /// The key or pattern.
        text: String,
        /// Whether it is one literal key.
        literal: bool,
    },
    /// A row written by `invalidate()` that could not be read: every key under the allowed
    /// prefixes, since what it named is not known.
    Unreadable,
    /// A publication repair's request: every key the rules of the table can produce (`None`:
    /// the request names no table).
    Repair(Option<TableName>),
    /// Every key the rules of the table can produce, if it has rules: a change that could not
    /// be read, or a truncate trigger added late.
    Flush(TableName),
}

/// Now, in microseconds since the Unix epoch.
pub fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn table(schema: &str, name: &str) -> Result<TableName, TableNameError> {
        Ok(TableName::new(schema, name))
    }

    #[test]
    fn a_table_name_is_schema_dot_table_or_a_bare_name_in_public() {
        assert_eq!(TableName::parse("bookings"), table("public", "bookings"));
        assert_eq!(
            TableName::parse("billing.payments"),
            table("billing", "payments")
        );
        // Unquoted names are taken as written, without SQL's case folding.
        assert_eq!(
            TableName::parse("Billing.Order Items"),
            table("Billing", "Order Items")
        );
    }

    #[test]
    fn quoted_parts_hold_any_character_and_doubled_quotes() {
        let cases = [
            (r#""my.schema"."Order Items""#, ("my.schema", "Order Items")),
            (r#""a.b""#, ("public", "a.b")),
            (r#"s."t.u""#, ("s", "t.u")),
            (r#""s".t"#, ("s", "t")),
            (r#""say ""hi""".t"#, ("say \"hi\"", "t")),
            (r#""""""#, ("public", "\"")),
            (
                r#""a|b{c}"." lead and trail ""#,
                ("a|b{c}", " lead and trail "),
            ),
            (r#""Zoë 🚗"."x,y;z'""#, ("Zoë 🚗", "x,y;z'")),
        ];
        for (text, (schema, name)) in cases {
            assert_eq!(TableName::parse(text), table(schema, name), "{text}");
        }
    }

    #[test]
    fn a_malformed_table_name_says_what_is_wrong() {
        let cases = [
            ("", TableNameError::Empty),
            ("s.", TableNameError::Empty),
            (".t", TableNameError::Empty),
            (r#""""#, TableNameError::Empty),
            (r#"s."""#, TableNameError::Empty),
            ("s. t", TableNameError::Spaces),
            (" t", TableNameError::Spaces),
            ("a.b.c", TableNameError::TooManyParts),
            (r#""a"."b".c"#, TableNameError::TooManyParts),
            (r#""my.schema"#, TableNameError::Unterminated { column: 1 }),
            (r#"s."t"""#, TableNameError::Unterminated { column: 3 }),
            (r#"é."t"#, TableNameError::Unterminated { column: 3 }),
            (r#"a"b"#, TableNameError::StrayQuote { column: 2 }),
            (r#""a"b"#, TableNameError::AfterQuote { column: 4 }),
            (r#""a" .t"#, TableNameError::AfterQuote { column: 4 }),
        ];
        for (text, expected) in cases {
            assert_eq!(TableName::parse(text), Err(expected), "{text:?}");
        }
        assert_eq!(
            TableName::parse(r#""my.schema"#).unwrap_err().to_string(),
            "the quote at column 1 is never closed (write \"\" for a quote inside a quoted name)"
        );
    }

    #[test]
    fn display_quotes_only_what_needs_quoting() {
        assert_eq!(
            TableName::new("public", "bookings").to_string(),
            "public.bookings"
        );
        assert_eq!(
            TableName::new("s", "Order Items").to_string(),
            "s.Order Items"
        );
        assert_eq!(
            TableName::new("my.schema", "say \"hi\"").to_string(),
            r#""my.schema"."say ""hi""""#
        );
        assert_eq!(TableName::new(" x", "").to_string(), r#"" x"."""#);
    }

    proptest! {
        #[test]
        fn display_parses_back_to_the_same_name(schema in "\\PC{1,8}", name in "\\PC{1,8}") {
            let table = TableName::new(schema, name);
            prop_assert_eq!(TableName::parse(&table.to_string()), Ok(table));
        }
    }
}
