//! The `explain` command: from its flags (JSON rows or `--where`) to the [`Explanation`], with
//! the usage mistakes said as such.

use super::{Explanation, OldRow, WhereError};
use crate::change::{Op, TableName};
use crate::config::{Config, Mode};
use crate::rules::RuleSet;
use crate::source::connect::{self, ConnectError};
use crate::source::setup;

/// What `explain` is asked, as its flags give it.
#[derive(Debug)]
pub struct Request {
    /// `--table`, as typed.
    pub table: String,
    /// `--op`.
    pub op: Op,
    /// `--old`.
    pub old: Option<String>,
    /// `--new`.
    pub new: Option<String>,
    /// `--where`.
    pub filter: Option<String>,
    /// `--offline`.
    pub offline: bool,
}

/// Why `explain` gave no explanation.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The flags do not make a change (bad JSON, a table no rule watches, flags that do not go
    /// together): a usage problem, like unusable rules.
    #[error("{0}")]
    Usage(String),
    /// `--where` needs the database, which cannot be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// `--where` could not read its rows.
    #[error(transparent)]
    Where(#[from] WhereError),
}

/// An explanation, and what to warn about on the way.
#[derive(Debug)]
pub struct Answer {
    /// What the change would delete.
    pub explanation: Explanation,
    /// The database could not be reached to ask what its old rows hold, so that is assumed.
    pub warning: Option<String>,
}

/// Explains the change `request` describes, with the rows from the flags or the database.
pub async fn run(
    config: &Config,
    rules: &RuleSet,
    request: Request,
) -> Result<Answer, CommandError> {
    let Request {
        table,
        op,
        old,
        new,
        filter,
        offline,
    } = request;
    let usage = |message: &str| Err(CommandError::Usage(message.to_owned()));
    let name = TableName::parse(&table)
        .map_err(|e| CommandError::Usage(format!("--table {table:?}: {e}")))?;
    if !rules.has_table(&name) {
        let watched: Vec<String> = rules.tables().map(ToString::to_string).collect();
        return Err(CommandError::Usage(format!(
            "no rule watches table {name} (tables with rules: {})",
            watched.join(", ")
        )));
    }
    let Some(filter) = filter else {
        return from_json(config, rules, &name, op, (old, new), offline).await;
    };
    match () {
        () if op == Op::Truncate => usage("--where has no meaning for a truncate"),
        () if offline => {
            usage("--offline and --where do not go together: --where reads the database")
        }
        () if old.is_some() => {
            usage("--old and --where do not go together: the row read is the old row")
        }
        () if new.is_some() && op == Op::Delete => usage("--new has no meaning for a delete"),
        () => from_database(config, rules, &name, op, new.as_deref(), &filter).await,
    }
}

/// The change of the JSON rows `--old` and `--new`, with what the server sends of the old row.
async fn from_json(
    config: &Config,
    rules: &RuleSet,
    name: &TableName,
    op: Op,
    (old, new): (Option<String>, Option<String>),
    offline: bool,
) -> Result<Answer, CommandError> {
    let usage = |e: super::ExplainError| CommandError::Usage(e.to_string());
    // Neither has an old row, so what the server sends of one does not matter.
    if matches!(op, Op::Insert | Op::Truncate) {
        let sent = OldRow::Whole { notify: false };
        let change = super::change(name, op, None, new.as_deref(), &sent).map_err(usage)?;
        let explanation = super::explain_changes(rules, name, op, &[change]);
        return Ok(Answer {
            explanation,
            warning: None,
        });
    }
    let (sent, warning) = old_row_sent(config, name, offline).await;
    let change = super::change(name, op, old.as_deref(), new.as_deref(), &sent).map_err(usage)?;
    let mut explanation = super::explain_changes(rules, name, op, &[change]);
    explanation.old_row = Some(sent.describe(name));
    Ok(Answer {
        explanation,
        warning,
    })
}

/// The changes of the rows `--where` reads, with `--new`'s columns set on them.
async fn from_database(
    config: &Config,
    rules: &RuleSet,
    name: &TableName,
    op: Op,
    new: Option<&str>,
    filter: &str,
) -> Result<Answer, CommandError> {
    let overlay = new
        .map(|text| super::row_from_json("new", text))
        .transpose()
        .map_err(|e| CommandError::Usage(e.to_string()))?;
    let mut db = connect::connect(&config.postgres).await?;
    let fetched = super::rows_from_database(&mut db, name, filter, config.postgres.mode).await?;
    let changes = super::changes_from_rows(name, op, &fetched, overlay.as_ref());
    let mut explanation = super::explain_changes(rules, name, op, &changes);
    if op != Op::Insert {
        explanation.old_row = Some(fetched.old_row.describe(name));
    }
    Ok(Answer {
        explanation,
        warning: None,
    })
}

/// What the server sends of `table`'s old rows, for `explain` of JSON rows: notify mode's
/// triggers send them whole; in replication mode the table's REPLICA IDENTITY decides, read
/// from the database unless `offline`. A database that cannot answer makes it an assumption,
/// which the output states (with a warning), rather than an error: the rules can still be
/// explained.
async fn old_row_sent(
    config: &Config,
    table: &TableName,
    offline: bool,
) -> (OldRow, Option<String>) {
    if config.postgres.mode == Mode::Notify {
        return (OldRow::Whole { notify: true }, None);
    }
    if offline {
        return (OldRow::Assumed("--offline".to_owned()), None);
    }
    let mut db = match connect::connect(&config.postgres).await {
        Ok(db) => db,
        Err(e) => {
            let warning = format!("explaining without the database: {e}");
            let assumed = format!("the database could not be reached: {e}");
            return (OldRow::Assumed(assumed), Some(warning));
        }
    };
    let sent = match setup::table_info(&mut db, table).await {
        Ok(Some(info)) => OldRow::of(config.postgres.mode, &info),
        Ok(None) => OldRow::Assumed(format!("{table} does not exist in the database")),
        Err(e) => OldRow::Assumed(format!("its catalog could not be read: {e}")),
    };
    (sent, None)
}
