//! `invalidator check` against the live database: do the rules' tables and columns exist, and
//! does each table's REPLICA IDENTITY send the old values the rules need?

use std::fmt;

use crate::config::Mode;
use crate::rules::RuleSet;
use crate::source::setup::{self, SetupError, Sql};

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The rule cannot work as written: `check` exits 1.
    Error,
    /// The rule works but deletes more than it names.
    Warning,
}

/// One thing `check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// `file:line` of the rule, or the table for table-level findings.
    pub location: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{level}: {}: {}", self.location, self.message)
    }
}

/// Checks every rule against the catalog of the connected database. In notify mode the
/// triggers see whole old rows, so REPLICA IDENTITY does not matter and is not checked.
pub async fn against_database(
    db: &mut impl Sql,
    rules: &RuleSet,
    mode: Mode,
) -> Result<Vec<Finding>, SetupError> {
    let mut findings = Vec::new();
    for table in rules.tables() {
        let Some(info) = setup::table_info(db, table).await? else {
            findings.push(Finding {
                severity: Severity::Error,
                location: table.to_string(),
                message: "table does not exist".to_owned(),
            });
            continue;
        };
        if mode == Mode::Replication && info.replica_identity == 'n' {
            findings.push(Finding {
                severity: Severity::Error,
                location: table.to_string(),
                message: "REPLICA IDENTITY NOTHING: updates and deletes cannot be published; \
                          use DEFAULT (with a primary key) or FULL"
                    .to_owned(),
            });
        }
        for rule in rules.rules().iter().filter(|r| &r.table == table) {
            let location = format!("{}:{}: rule {:?}", rule.file, rule.line, rule.name);
            let columns = rule.columns();
            let missing: Vec<&str> = columns
                .iter()
                .map(String::as_str)
                .filter(|c| !info.columns.iter().any(|have| have == c))
                .collect();
            if !missing.is_empty() {
                findings.push(Finding {
                    severity: Severity::Error,
                    location: location.clone(),
                    message: format!("{table} has no column {}", missing.join(", ")),
                });
                continue;
            }
            let reads_old = rule
                .ops
                .iter()
                .any(|op| matches!(op, crate::change::Op::Update | crate::change::Op::Delete));
            let unsent: Vec<&str> = columns
                .iter()
                .map(String::as_str)
                .filter(|c| !info.identity_columns.iter().any(|have| have == c))
                .collect();
            if mode == Mode::Replication && reads_old && !unsent.is_empty() {
                findings.push(Finding {
                    severity: Severity::Warning,
                    location,
                    message: format!(
                        "REPLICA IDENTITY of {table} does not send the old value of {}: \
                         updates and deletes render those placeholders as `*` and delete \
                         more than needed; run `ALTER TABLE {table} REPLICA IDENTITY FULL` \
                         to make them exact",
                        unsent.join(", ")
                    ),
                });
            }
        }
    }
    findings.sort_by(|a, b| (a.severity, &a.location).cmp(&(b.severity, &b.location)));
    Ok(findings)
}
