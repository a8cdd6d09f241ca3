//! Creates and repairs the publication and the replication slot, and reads the catalog facts
//! that `check` and `status` report. Idempotent: running it twice changes nothing.
//!
//! Everything here speaks plain SQL through [`Sql`], so the same code runs over the replication
//! connection (`run`) and over an ordinary connection (`setup`, `check`, `status`).

mod inspect;
pub mod notify;
mod publication;
mod trust;

pub use inspect::{
    PluginAllowlist, PluginRefusal, SlotInfo, TableInfo, plugin_allowlist, slot_holder, slot_info,
    table_info,
};
pub use publication::{Hidden, hidden, publication_action, publication_exists, unpublished};
pub use trust::refuse_untrusted_schemas;

use std::collections::BTreeSet;
use std::future::Future;

use crate::change::{Lsn, Op, TableName};
use crate::error::{Classify, Verdict};
use crate::rules::RuleSet;
use crate::source::history::NewHistory;
use crate::source::replication::{ReplicationClient, ReplicationError};
pub use crate::sql::{quote_ident, quote_literal};

/// Rows of text values, as the simple query protocol returns them.
pub type Rows = Vec<Vec<Option<String>>>;

/// A connection that runs SQL text and returns text rows.
pub trait Sql {
    /// Runs `sql` (one statement) and returns its rows.
    fn query(&mut self, sql: &str) -> impl Future<Output = Result<Rows, SetupError>> + Send;
}

impl Sql for ReplicationClient {
    async fn query(&mut self, sql: &str) -> Result<Rows, SetupError> {
        Ok(self.simple_query(sql).await?)
    }
}

impl Sql for tokio_postgres::Client {
    async fn query(&mut self, sql: &str) -> Result<Rows, SetupError> {
        let mut shared: &tokio_postgres::Client = self;
        Sql::query(&mut shared, sql).await
    }
}

/// Runs `sql`, a query of one boolean: whether its first row says true (`t` from a boolean,
/// `true` from a boolean cast to text). No row is false.
pub async fn flag(db: &mut impl Sql, sql: &str) -> Result<bool, SetupError> {
    let rows = db.query(sql).await?;
    Ok(matches!(
        rows.first()
            .and_then(|r| r.first().cloned().flatten())
            .as_deref(),
        Some("t" | "true")
    ))
}

/// A shared client, for two tasks that query one connection.
impl Sql for &tokio_postgres::Client {
    async fn query(&mut self, sql: &str) -> Result<Rows, SetupError> {
        let messages = self.simple_query(sql).await?;
        Ok(messages
            .into_iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                    (0..row.len())
                        .map(|i| row.get(i).map(str::to_owned))
                        .collect(),
                ),
                _ => None,
            })
            .collect())
    }
}

/// Setup or catalog inspection failed.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The replication connection failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// An ordinary connection failed.
    #[error("postgres")]
    Postgres(#[from] tokio_postgres::Error),
    /// Tables named by the rules do not exist.
    #[error("tables named in the rules do not exist: {}", list(.0))]
    MissingTables(Vec<TableName>),
    /// Columns the rules read do not exist in their tables.
    #[error("columns named in the rules do not exist: {}", columns(.0))]
    MissingColumns(Vec<(TableName, Vec<String>)>),
    /// The publication hides changes the rules need, and only its owner can repair that.
    #[error(
        "{}; run `invalidator setup` as the publication's owner, or this SQL: {}",
        .0.iter().map(|h| h.problem.as_str()).collect::<Vec<_>>().join("; "),
        .0.iter().map(|h| h.fix.as_str()).collect::<Vec<_>>().join(" ")
    )]
    Hidden(Vec<Hidden>),
    /// The slot cannot be used as it is.
    #[error("replication slot {slot:?} {problem}")]
    BadSlot {
        /// The slot name.
        slot: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Other roles could plant objects where `setup` would create or call code that runs with
    /// its privileges.
    #[error(
        "schema {schema} ({what}) lets {} create objects in it: {danger}; {fix}",
        .roles.join(", ")
    )]
    UntrustedSchema {
        /// The schema.
        schema: String,
        /// What it is to invalidator.
        what: &'static str,
        /// The roles (or PUBLIC) that may create in it, other than this role and superusers.
        roles: Vec<String>,
        /// What they could do.
        danger: &'static str,
        /// What to do.
        fix: String,
    },
    /// The publication belongs to a role that could change it against the rules.
    #[error(
        "publication {publication} is owned by role {owner}, which is not a superuser and does \
         not own the rules' tables: it could drop tables from the publication at will (each \
         repair then deletes every key of their rules); drop it (DROP PUBLICATION \
         {publication}) and let setup create it, or ALTER PUBLICATION {publication} OWNER TO \
         the tables' owner"
    )]
    UntrustedPublication {
        /// The publication.
        publication: String,
        /// Its owner.
        owner: String,
    },
    /// The server answered something we did not expect.
    #[error("unexpected answer from Postgres to {0}")]
    Unexpected(String),
}

/// What the catalog says about our objects stays so until a person acts; a surprising answer
/// reconnects.
impl Classify for SetupError {
    fn verdict(&self) -> Verdict {
        match self {
            SetupError::Replication(e) => e.verdict(),
            SetupError::Postgres(e) => e.verdict(),
            SetupError::MissingTables(_)
            | SetupError::MissingColumns(_)
            | SetupError::Hidden(_)
            | SetupError::BadSlot { .. }
            | SetupError::UntrustedSchema { .. }
            | SetupError::UntrustedPublication { .. } => Verdict::Stop,
            SetupError::Unexpected(_) => Verdict::Reconnect,
        }
    }
}

fn list(tables: &[TableName]) -> String {
    tables
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn columns(missing: &[(TableName, Vec<String>)]) -> String {
    missing
        .iter()
        .map(|(table, columns)| format!("{table} ({})", columns.join(", ")))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `schema.table`, each part quoted.
pub(crate) fn qualified(table: &TableName) -> String {
    format!(
        "{}.{}",
        quote_ident(&table.schema),
        quote_ident(&table.name)
    )
}

/// One statement setup would run, with why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    /// What it achieves, for `setup --dry-run` and logs.
    pub why: String,
    /// The SQL to run.
    pub sql: String,
}

/// What setup found and will do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    /// The statements to run, in order.
    pub actions: Vec<Action>,
    /// The slot must be recreated because changes were missed and nobody knows which: every key
    /// the rules can produce must go. `actions` then do not create it: `run` does, through a
    /// temporary slot, once Redis has confirmed that flush (see `run`'s `reset_slot`).
    pub reset: Option<SlotReset>,
}

/// Why the slot is recreated and the cache flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotReset {
    /// The slot does not exist although it did (the publication carries no "not created yet"
    /// mark): it was dropped.
    Dropped,
    /// Postgres invalidated it (`wal_status = lost`).
    Lost,
    /// The server is not on the history our positions belong to (a restore, a failover).
    NewHistory(NewHistory),
}

impl SlotReset {
    /// Every reason, so the metric has a series for each from the start.
    pub const ALL: [SlotReset; 6] = [
        SlotReset::Dropped,
        SlotReset::Lost,
        SlotReset::NewHistory(NewHistory::OtherSystem),
        SlotReset::NewHistory(NewHistory::OtherTimeline),
        SlotReset::NewHistory(NewHistory::WalBehind),
        SlotReset::NewHistory(NewHistory::SlotAhead),
    ];

    /// The `reason` label of `invalidator_slot_resets_total`.
    pub fn label(self) -> &'static str {
        match self {
            SlotReset::Dropped => "slot_dropped",
            SlotReset::Lost => "slot_lost",
            SlotReset::NewHistory(history) => history.label(),
        }
    }

    /// What happened, for the error log and `setup`'s refusal.
    pub fn describe(self) -> &'static str {
        match self {
            SlotReset::Dropped => "does not exist although the publication does: it was dropped",
            SlotReset::Lost => "has lost WAL it needed (wal_status = lost)",
            SlotReset::NewHistory(history) => history.describe(),
        }
    }
}

/// Whether setup may recreate a slot that was lost or dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotLoss {
    /// Recreate it and report [`Plan::reset`] (`run`, which then flushes the cache).
    Recreate,
    /// Refuse with an error (`setup`, which cannot flush the cache).
    Refuse,
}

/// The comment a publication that invalidator created carries until the slot exists, written
/// in the transaction that creates it: a slot missing beside it was never created, which is no
/// loss (a first install that failed halfway). Only the publication's owner can write it.
fn not_created_yet(slot: &str) -> String {
    format!("invalidator: replication slot {slot} not created yet")
}

/// The comment that replaces [`not_created_yet`] once the slot exists: the publication stays
/// marked as invalidator's, so `teardown` drops it and leaves anyone else's alone.
fn created_for(slot: &str) -> String {
    format!("invalidator: created for replication slot {slot}")
}

/// Whether `comment`, a publication's, is one of the marks invalidator writes on a publication
/// it created for `slot`.
pub(crate) fn created_by_invalidator(comment: Option<&str>, slot: &str) -> bool {
    comment.is_some_and(|c| c == not_created_yet(slot) || c == created_for(slot))
}

/// Works out what is missing: tables are checked, then the publication, then the slot (the
/// publication must exist before the slot, or pgoutput fails on WAL older than it). `history`
/// says the server is not on the history of our positions (`run` only): its slot is replaced.
/// Nothing is planned that cannot complete: a slot that must be created is checked first
/// against `wal_level` and the free `max_replication_slots`.
pub async fn plan(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
    publication: &str,
    slot: &str,
    loss: SlotLoss,
    history: Option<NewHistory>,
) -> Result<Plan, SetupError> {
    let missing = missing_tables(db, tables).await?;
    if !missing.is_empty() {
        return Err(SetupError::MissingTables(missing));
    }
    let mut plan = Plan::default();
    let marked = plan_publication(db, tables, publication, slot, &mut plan).await?;
    let info = slot_info(db, slot).await?;
    if let Some(info) = &info {
        refuse_foreign_slot(slot, info)?;
    }
    match slot_need(info.as_ref(), history, marked) {
        SlotNeed::Keep => {
            if marked {
                // A start that stopped between creating the slot and clearing the mark.
                plan.actions.push(unmark(publication, slot));
            }
            Ok(plan)
        }
        SlotNeed::Create => {
            plan.actions.push(create_slot(db, slot).await?);
            plan.actions.push(unmark(publication, slot));
            Ok(plan)
        }
        SlotNeed::Replace { reset, drop } => {
            if let Some(why) = drop {
                plan.actions.push(Action {
                    why: format!("drop replication slot {slot}, which {why}"),
                    sql: format!("SELECT pg_drop_replication_slot({})", quote_literal(slot)),
                });
            }
            match loss {
                SlotLoss::Recreate => {
                    // The replacement is made from a temporary slot: two at once, less the one
                    // dropped.
                    let needed = if info.is_some() { 1 } else { 2 };
                    slot_can_be_created(db, slot, needed).await?;
                    plan.reset = Some(reset);
                    Ok(plan)
                }
                SlotLoss::Refuse => Err(SetupError::BadSlot {
                    slot: slot.to_owned(),
                    problem: format!(
                        "{}; changes were missed, so `invalidator run` must recreate it: it \
                         deletes every key the rules can produce first",
                        reset.describe()
                    ),
                }),
            }
        }
    }
}

/// What the slot needs, as [`slot_need`] decides it.
#[derive(Debug, PartialEq, Eq)]
enum SlotNeed {
    /// It exists, on the history of our positions: nothing.
    Keep,
    /// It was never made (the publication is marked "not created yet"): create it.
    Create,
    /// Changes were missed and nobody knows which: replace it (`run`) or refuse (`setup`),
    /// dropping the one that exists first, for the reason `drop` gives.
    Replace {
        /// Why the slot is replaced.
        reset: SlotReset,
        /// Why the existing slot is dropped; `None` when there is none to drop.
        drop: Option<&'static str>,
    },
}

/// Decides from what the server has (`info`, none when the slot does not exist), whether the
/// server is on a new history, and whether the publication is `marked` "not created yet": a
/// missing slot of a marked publication was never made, which is no loss; a missing slot of
/// an unmarked one was dropped.
fn slot_need(info: Option<&SlotInfo>, history: Option<NewHistory>, marked: bool) -> SlotNeed {
    let replace = |reset, drop| SlotNeed::Replace { reset, drop };
    match (info, history) {
        (None, Some(history)) => replace(SlotReset::NewHistory(history), None),
        (None, None) if marked => SlotNeed::Create,
        (None, None) => replace(SlotReset::Dropped, None),
        (Some(info), _) if info.wal_status.as_deref() == Some("lost") => {
            replace(SlotReset::Lost, Some("lost WAL it needed"))
        }
        (Some(_), Some(history)) => replace(
            SlotReset::NewHistory(history),
            Some("holds a position of another history of the server"),
        ),
        (Some(_), None) => SlotNeed::Keep,
    }
}

/// Creates the slot (a failover slot where the server has them), once it is known that it can
/// be created.
async fn create_slot(db: &mut impl Sql, slot: &str) -> Result<Action, SetupError> {
    slot_can_be_created(db, slot, 1).await?;
    let failover = has_failover_slots(db).await?;
    Ok(Action {
        why: format!(
            "create logical replication slot {slot} (pgoutput{})",
            if failover { ", failover" } else { "" }
        ),
        sql: format!(
            "SELECT lsn FROM pg_create_logical_replication_slot({}, 'pgoutput'{})",
            quote_literal(slot),
            if failover { ", failover => true" } else { "" }
        ),
    })
}

/// Replaces the publication's "not created yet" mark with [`created_for`], once the slot exists.
fn unmark(publication: &str, slot: &str) -> Action {
    Action {
        why: format!("mark publication {publication} as created by invalidator, its slot now made"),
        sql: format!(
            "COMMENT ON PUBLICATION {} IS {}",
            quote_ident(publication),
            quote_literal(&created_for(slot))
        ),
    }
}

/// Plans the publication's creation (marked "slot not created yet" in the same transaction) or
/// the tables it lacks; returns whether it is (or will be) marked, so the slot counts as never
/// made rather than dropped.
async fn plan_publication(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
    publication: &str,
    slot: &str,
    plan: &mut Plan,
) -> Result<bool, SetupError> {
    let (publication_existed, action) = publication_action(db, tables, publication).await?;
    let marked = if publication_existed {
        marked_not_created(db, publication, slot).await?
    } else {
        true
    };
    if let Some(mut action) = action {
        if !publication_existed {
            // One simple query is one transaction: the publication never exists unmarked.
            action.sql = format!(
                "{}; COMMENT ON PUBLICATION {} IS {}",
                action.sql,
                quote_ident(publication),
                quote_literal(&not_created_yet(slot))
            );
        }
        plan.actions.push(action);
    }
    Ok(marked)
}

/// Refuses a slot of another plugin or another database: it is not ours to use or replace.
fn refuse_foreign_slot(slot: &str, info: &SlotInfo) -> Result<(), SetupError> {
    let problem = if info.plugin.as_deref() != Some("pgoutput") {
        format!(
            "uses plugin {:?}, not pgoutput; drop it or choose another slot name",
            info.plugin.clone().unwrap_or_default()
        )
    } else if !info.same_database {
        "belongs to another database; choose another slot name".to_owned()
    } else {
        return Ok(());
    };
    Err(SetupError::BadSlot {
        slot: slot.to_owned(),
        problem,
    })
}

/// Whether `publication` carries the "slot not created yet" mark for `slot`, and this role
/// could clear it once the slot exists. A mark it cannot clear would stay after the slot is
/// created, and a later loss would pass for a first install: it counts as no mark.
async fn marked_not_created(
    db: &mut impl Sql,
    publication: &str,
    slot: &str,
) -> Result<bool, SetupError> {
    flag(
        db,
        &format!(
            "SELECT coalesce(obj_description(oid, 'pg_publication') = {}, false) \
             AND pg_has_role(pubowner, 'USAGE') FROM pg_publication WHERE pubname = {}",
            quote_literal(&not_created_yet(slot)),
            quote_literal(publication)
        ),
    )
    .await
}

/// Fails, before anything is created, when `needed` slots cannot be created: `wal_level` is
/// not `logical`, or `max_replication_slots` leaves too few free.
async fn slot_can_be_created(db: &mut impl Sql, slot: &str, needed: i64) -> Result<(), SetupError> {
    let rows = db
        .query(
            "SELECT current_setting('wal_level'), current_setting('max_replication_slots'), \
             (SELECT count(*) FROM pg_replication_slots)::text",
        )
        .await?;
    let unexpected = || SetupError::Unexpected("the query of wal_level and slots".to_owned());
    let [Some(wal_level), Some(max), Some(used)] = rows
        .into_iter()
        .next()
        .and_then(|row| <[Option<String>; 3]>::try_from(row).ok())
        .ok_or_else(unexpected)?
    else {
        return Err(unexpected());
    };
    let problem = if wal_level != "logical" {
        format!(
            "cannot be created: logical decoding needs wal_level = logical and the server has \
             wal_level = {wal_level}; set it and restart Postgres (nothing was created)"
        )
    } else {
        let (max, used) = (
            max.parse::<i64>().map_err(|_| unexpected())?,
            used.parse::<i64>().map_err(|_| unexpected())?,
        );
        if max - used >= needed {
            return Ok(());
        }
        format!(
            "cannot be created: max_replication_slots = {max} and {used} slots exist, {needed} \
             more needed; raise it or drop unused slots (nothing was created)"
        )
    };
    Err(SetupError::BadSlot {
        slot: slot.to_owned(),
        problem,
    })
}

/// Runs the actions in order.
pub async fn apply(db: &mut impl Sql, actions: &[Action]) -> Result<(), SetupError> {
    for action in actions {
        tracing::info!(action = %action.why, "setup");
        db.query(&action.sql).await?;
    }
    Ok(())
}

/// The tables that do not exist (or are not ordinary or partitioned tables).
pub async fn missing_tables(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
) -> Result<Vec<TableName>, SetupError> {
    let mut missing = Vec::new();
    for table in tables {
        let rows = db
            .query(&format!(
                "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE n.nspname = {} AND c.relname = {} AND c.relkind IN ('r', 'p')",
                quote_literal(&table.schema),
                quote_literal(&table.name)
            ))
            .await?;
        if rows.is_empty() {
            missing.push(table.clone());
        }
    }
    Ok(missing)
}

/// Whether the server has failover slots (PostgreSQL 17): a logical slot created with
/// `failover` is kept in step on standbys with `sync_replication_slots = on`, so after a
/// promotion streaming goes on from it instead of from a new slot and a flush.
pub(crate) async fn has_failover_slots(db: &mut impl Sql) -> Result<bool, SetupError> {
    Ok(crate::source::invalidate::server_version(db).await? >= 170_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_is_invalidators_only_with_a_mark_for_its_slot() {
        let slot = "invalidator";
        assert!(created_by_invalidator(Some(&not_created_yet(slot)), slot));
        assert!(created_by_invalidator(Some(&created_for(slot)), slot));
        assert!(!created_by_invalidator(Some(&created_for("other")), slot));
        assert!(!created_by_invalidator(Some("ours, by hand"), slot));
        assert!(!created_by_invalidator(None, slot));
    }

    #[test]
    fn quoting_doubles_the_quote_character() {
        assert_eq!(quote_ident("we\"ird"), "\"we\"\"ird\"");
        assert_eq!(quote_literal("o'clock"), "'o''clock'");
        assert_eq!(
            qualified(&TableName::new("Sales", "order items")),
            "\"Sales\".\"order items\""
        );
    }
}
