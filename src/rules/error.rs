//! Rule loading errors: each names the file, the line and the rule, and all are reported at once.

use std::fmt;
use std::io;

use crate::change::TableNameError;
use crate::rules::template::{QUOTE_HINT, TemplateError};

/// Every problem found while loading rules, sorted by file then line.
#[derive(Debug)]
pub struct RuleErrors {
    /// The errors, sorted by file, then line (errors without a line first).
    errors: Vec<RuleError>,
}

impl RuleErrors {
    /// Sorts the errors by file then line; the order within one line is kept.
    pub(crate) fn new(mut errors: Vec<RuleError>) -> Self {
        errors.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
        RuleErrors { errors }
    }

    /// The errors, sorted by file then line.
    pub fn errors(&self) -> &[RuleError] {
        &self.errors
    }
}

impl fmt::Display for RuleErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for RuleErrors {}

/// One problem in the rules, located as precisely as we know.
#[derive(Debug)]
pub struct RuleError {
    /// The rule file (or directory) as named to the loader, e.g. `rules/bookings.toml`.
    pub file: String,
    /// The 1-based line, when the problem has one.
    pub line: Option<usize>,
    /// The rule's name (given or default), when the problem is inside a rule.
    pub rule: Option<String>,
    /// What is wrong.
    pub kind: RuleErrorKind,
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.file.is_empty() {
            write!(f, "{}:", self.file)?;
            if let Some(line) = self.line {
                write!(f, "{line}:")?;
            }
            f.write_str(" ")?;
        }
        if let Some(rule) = &self.rule {
            write!(f, "rule {rule:?}: ")?;
        }
        write!(f, "{}", self.kind)
    }
}

impl std::error::Error for RuleError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.kind)
    }
}

/// What is wrong with a rule file or rule.
#[derive(Debug, thiserror::Error)]
pub enum RuleErrorKind {
    /// The file or directory could not be read.
    #[error("cannot read: {source}")]
    Io {
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A rules directory without any `*.toml` file.
    #[error("no *.toml rule files in this directory")]
    NoRuleFiles,
    /// No rule sources were given at all.
    #[error("no rules: give at least one rule file")]
    NoRules,
    /// The file is not valid TOML.
    #[error("TOML syntax error: {message}")]
    Syntax {
        /// The TOML parser's description.
        message: String,
    },
    /// A top-level key other than `rule`.
    #[error("unknown key {key:?}: a rules file holds only [[rule]] tables")]
    UnknownTopKey {
        /// The key as written.
        key: String,
    },
    /// `rule` is not an array of tables (typically `[rule]` instead of `[[rule]]`).
    #[error("\"rule\" must be an array of tables: write [[rule]]")]
    NotRuleArray,
    /// A file that defines no rule.
    #[error("no [[rule]] tables in this file")]
    NoRulesInFile,
    /// A rule's shape is wrong: unknown or missing field, or a value of the wrong type.
    #[error("{message}")]
    Shape {
        /// The deserializer's description, e.g. "unknown field `tabel`, expected one of ...".
        message: String,
    },
    /// `name = ""`.
    #[error("name is empty")]
    EmptyName,
    /// Two rules share a name, which would make logs and metrics ambiguous.
    #[error("duplicate rule name, first defined at {first}")]
    DuplicateName {
        /// `file:line` of the first rule with this name.
        first: String,
    },
    /// The `table` value is not `schema.table` or `table`.
    #[error(
        "invalid table name {table:?}: {reason} (expected \"schema.table\" or \"table\", each part quoted where it needs to be, as in \"my.schema\".\"Order Items\")"
    )]
    InvalidTable {
        /// The table as written.
        table: String,
        /// What is wrong with it.
        reason: TableNameError,
    },
    /// An `on` entry that is not an operation.
    #[error("unknown operation {op:?} in on (operations: insert, update, delete, truncate)")]
    UnknownOp {
        /// The entry as written.
        op: String,
    },
    /// `on = []`, a rule that would never fire.
    #[error("on is empty, so the rule would never fire")]
    EmptyOn,
    /// `changed` on a rule that does not fire on updates, where it could never apply.
    #[error("changed applies to updates only, but on has no \"update\"")]
    ChangedWithoutUpdate,
    /// `changed = []`, which would stop the rule from ever firing on an update.
    #[error("changed is empty: remove it to fire on every update")]
    EmptyChanged,
    /// A `changed` entry that cannot be a column name.
    #[error("invalid column name {column:?} in changed ({QUOTE_HINT})")]
    InvalidChangedColumn {
        /// The entry as written.
        column: String,
    },
    /// `keys = []`, a rule that would delete nothing.
    #[error("keys is empty, so the rule would delete nothing")]
    NoKeys,
    /// A key template that does not parse.
    #[error(transparent)]
    Template(#[from] TemplateError),
}
