//! Creates and repairs the publication and the replication slot, and reads the catalog facts
//! that `check` and `status` report. Idempotent: running it twice changes nothing.
//!
//! Everything here speaks plain SQL through [`Sql`], so the same code runs over the replication
//! connection (`run`) and over an ordinary connection (`setup`, `check`, `status`).

pub mod notify;

use std::collections::BTreeSet;
use std::future::Future;

use crate::change::{Lsn, Op, TableName};
use crate::rules::RuleSet;
use crate::source::history::NewHistory;
use crate::source::replication::{ReplicationClient, ReplicationError};

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

impl SetupError {
    /// Whether trying again later can help.
    pub fn is_transient(&self) -> bool {
        match self {
            SetupError::Replication(e) => e.is_transient(),
            SetupError::Postgres(e) => e
                .as_db_error()
                .is_none_or(|db| crate::error::transient_sqlstate(db.code().code())),
            SetupError::MissingTables(_)
            | SetupError::MissingColumns(_)
            | SetupError::Hidden(_)
            | SetupError::BadSlot { .. }
            | SetupError::UntrustedSchema { .. }
            | SetupError::UntrustedPublication { .. } => false,
            SetupError::Unexpected(_) => true,
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

/// Quotes an identifier for SQL text.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Quotes a string literal for SQL text (standard_conforming_strings is on since 9.1).
pub fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
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

/// Refuses a publication whose owner is neither a superuser, nor this role, nor a member of the
/// owner of every rule table: that owner (any role with `CREATE` on the database can make the
/// publication first) could drop tables from it at will, and each repair deletes every key of
/// their rules, or mark it to hide a lost slot.
async fn refuse_untrusted_publication(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
    publication: &str,
) -> Result<(), SetupError> {
    let names: Vec<String> = tables
        .iter()
        .map(|t| quote_literal(&qualified(t)))
        .collect();
    let rows = db
        .query(&format!(
            "SELECT r.rolname FROM pg_publication p JOIN pg_roles r ON r.oid = p.pubowner \
             WHERE p.pubname = {} AND NOT r.rolsuper AND r.rolname <> current_user \
             AND EXISTS (SELECT 1 FROM unnest(ARRAY[{}]::text[]) AS t(name) \
                         JOIN pg_class c ON c.oid = to_regclass(t.name) \
                         WHERE NOT pg_has_role(p.pubowner, c.relowner, 'USAGE'))",
            quote_literal(publication),
            if names.is_empty() {
                "NULL".to_owned()
            } else {
                names.join(", ")
            }
        ))
        .await?;
    match rows
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
    {
        Some(owner) => Err(SetupError::UntrustedPublication {
            publication: publication.to_owned(),
            owner,
        }),
        None => Ok(()),
    }
}

/// The roles, other than the current one and superusers, that may create objects in `schema`:
/// its owner and every grantee of CREATE, `PUBLIC` included (the database's owner standing in
/// for `pg_database_owner`). Empty when the schema does not exist.
async fn creators(db: &mut impl Sql, schema: &str) -> Result<Vec<String>, SetupError> {
    let rows = db
        .query(&format!(
            "WITH s AS (SELECT oid, nspowner, nspacl FROM pg_namespace WHERE nspname = {}), \
             c AS (SELECT nspowner AS role FROM s UNION \
                   SELECT a.grantee FROM s, aclexplode(s.nspacl) a \
                   WHERE a.privilege_type = 'CREATE'), \
             r AS (SELECT c.role, CASE WHEN c.role = (SELECT oid FROM pg_roles \
                   WHERE rolname = 'pg_database_owner') THEN (SELECT datdba FROM pg_database \
                   WHERE datname = current_database()) ELSE c.role END AS effective FROM c) \
             SELECT coalesce(p.rolname, 'PUBLIC') FROM r LEFT JOIN pg_roles p \
             ON p.oid = r.effective \
             WHERE r.role = 0 OR NOT (p.rolsuper OR p.rolname = current_user) ORDER BY 1",
            quote_literal(schema)
        ))
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect())
}

/// Refuses, before `setup` creates anything, the schemas where other roles could plant what
/// runs with `setup`'s privileges: schema `invalidator` made by another role (it could then
/// write `invalidator.requests`, or add triggers and functions there), and, in notify mode, the
/// schema hstore lives in, where a function named `hstore` for a table's row type would be
/// called by the `SECURITY DEFINER` `capture()` instead of the extension's.
pub async fn refuse_untrusted_schemas(db: &mut impl Sql, notify: bool) -> Result<(), SetupError> {
    let ours = crate::source::invalidate::SCHEMA;
    let roles = creators(db, ours).await?;
    if !roles.is_empty() {
        return Err(SetupError::UntrustedSchema {
            schema: ours.to_owned(),
            what: "invalidator's own",
            roles,
            danger: "they could write invalidator.requests or plant functions and triggers that \
                     run as its owner",
            fix: format!(
                "drop it if you did not create it (DROP SCHEMA {} CASCADE), or run setup as \
                 its owner",
                quote_ident(ours)
            ),
        });
    }
    if !notify {
        return Ok(());
    }
    let hstore = db
        .query(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'hstore'",
        )
        .await?;
    let Some(Some(schema)) = hstore.into_iter().next().and_then(|r| r.into_iter().next()) else {
        return Ok(());
    };
    let roles = creators(db, &schema).await?;
    if roles.is_empty() {
        return Ok(());
    }
    Err(SetupError::UntrustedSchema {
        fix: format!(
            "REVOKE CREATE ON SCHEMA {} FROM {} (or move hstore: ALTER EXTENSION hstore SET \
             SCHEMA <a schema only you may create in>)",
            quote_ident(&schema),
            roles.join(", ")
        ),
        schema,
        what: "where extension hstore is installed",
        roles,
        danger: "a function named hstore for a table's row type would be called by the \
                 trigger function invalidator.capture(), which runs as its owner",
    })
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
    let unmark = Action {
        why: format!("mark publication {publication} as created by invalidator, its slot now made"),
        sql: format!(
            "COMMENT ON PUBLICATION {} IS {}",
            quote_ident(publication),
            quote_literal(&created_for(slot))
        ),
    };
    let drop = |why: &str| Action {
        why: format!("drop replication slot {slot}, which {why}"),
        sql: format!("SELECT pg_drop_replication_slot({})", quote_literal(slot)),
    };
    let info = slot_info(db, slot).await?;
    let reset = match &info {
        None => match history {
            Some(history) => Some(SlotReset::NewHistory(history)),
            None if marked => None,
            None => Some(SlotReset::Dropped),
        },
        Some(info) if info.plugin.as_deref() != Some("pgoutput") => {
            return Err(SetupError::BadSlot {
                slot: slot.to_owned(),
                problem: format!(
                    "uses plugin {:?}, not pgoutput; drop it or choose another slot name",
                    info.plugin.clone().unwrap_or_default()
                ),
            });
        }
        Some(info) if !info.same_database => {
            return Err(SetupError::BadSlot {
                slot: slot.to_owned(),
                problem: "belongs to another database; choose another slot name".to_owned(),
            });
        }
        Some(info) if info.wal_status.as_deref() == Some("lost") => {
            plan.actions.push(drop("lost WAL it needed"));
            Some(SlotReset::Lost)
        }
        Some(_) => match history {
            Some(history) => {
                plan.actions
                    .push(drop("holds a position of another history of the server"));
                Some(SlotReset::NewHistory(history))
            }
            None => {
                if marked {
                    // A start that stopped between creating the slot and clearing the mark.
                    plan.actions.push(unmark);
                }
                return Ok(plan);
            }
        },
    };
    let Some(reset) = reset else {
        slot_can_be_created(db, slot, 1).await?;
        let failover = has_failover_slots(db).await?;
        plan.actions.push(Action {
            why: format!(
                "create logical replication slot {slot} (pgoutput{})",
                if failover { ", failover" } else { "" }
            ),
            sql: format!(
                "SELECT lsn FROM pg_create_logical_replication_slot({}, 'pgoutput'{})",
                quote_literal(slot),
                if failover { ", failover => true" } else { "" }
            ),
        });
        plan.actions.push(unmark);
        return Ok(plan);
    };
    match loss {
        SlotLoss::Recreate => {
            // The replacement is made from a temporary slot: two at once, less the one dropped.
            slot_can_be_created(db, slot, if info.is_some() { 1 } else { 2 }).await?;
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

/// Whether `publication` exists.
pub async fn publication_exists(db: &mut impl Sql, publication: &str) -> Result<bool, SetupError> {
    Ok(!db
        .query(&format!(
            "SELECT 1 FROM pg_publication WHERE pubname = {}",
            quote_literal(publication)
        ))
        .await?
        .is_empty())
}

/// What the publication needs so that it holds every one of `tables`: created when it does not
/// exist, else the tables it does not publish added (see [`unpublished`]; tables it has beyond
/// them stay). Returns whether it existed, and the statement, if one is needed. A partitioned
/// table is added itself, with `publish_via_partition_root` left false: every partition,
/// present and future, is then published under its own name, and a TRUNCATE of one partition
/// too (which Postgres does not publish when it publishes partitions as their root).
pub async fn publication_action(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
    publication: &str,
) -> Result<(bool, Option<Action>), SetupError> {
    if !publication_exists(db, publication).await? {
        let names: Vec<String> = tables.iter().map(qualified).collect();
        return Ok((
            false,
            Some(Action {
                why: format!(
                    "create publication {publication} for {} tables",
                    names.len()
                ),
                sql: format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    quote_ident(publication),
                    names.join(", ")
                ),
            }),
        ));
    }
    refuse_untrusted_publication(db, tables, publication).await?;
    let unpublished = unpublished(db, tables, publication).await?;
    let gained: Vec<String> = unpublished.iter().map(qualified).collect();
    if gained.is_empty() {
        return Ok((true, None));
    }
    Ok((
        true,
        Some(Action {
            why: format!(
                "add {} tables the rules gained to publication {publication}",
                gained.len()
            ),
            sql: format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote_ident(publication),
                gained.join(", ")
            ),
        }),
    ))
}

/// Whether the server has failover slots (PostgreSQL 17): a logical slot created with
/// `failover` is kept in step on standbys with `sync_replication_slots = on`, so after a
/// promotion streaming goes on from it instead of from a new slot and a flush.
pub(crate) async fn has_failover_slots(db: &mut impl Sql) -> Result<bool, SetupError> {
    Ok(crate::source::invalidate::server_version(db).await? >= 170_000)
}

/// The ones of `tables` (which must exist) that the existing `publication` does not publish, by
/// their current oid: a table is published when the publication is `FOR ALL TABLES`, or names
/// it or one of its partition ancestors, or (PostgreSQL 15) the schema of one of those.
/// `pg_publication_tables` cannot say this: it lists the partitions of a partitioned table
/// instead of the table.
pub async fn unpublished(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
    publication: &str,
) -> Result<Vec<TableName>, SetupError> {
    let schemas = if crate::source::invalidate::server_version(db).await? >= 150_000 {
        " OR EXISTS (SELECT 1 FROM pg_publication_namespace s JOIN pg_class a \
         ON a.relnamespace = s.pnnspid WHERE s.pnpubid = p.oid AND a.oid IN (SELECT t.oid \
         UNION SELECT relid FROM pg_partition_ancestors(t.oid)))"
    } else {
        ""
    };
    let mut out = Vec::new();
    for table in tables {
        let rows = db
            .query(&format!(
                "SELECT (p.puballtables OR EXISTS (SELECT 1 FROM pg_publication_rel r \
                 WHERE r.prpubid = p.oid AND r.prrelid IN (SELECT t.oid UNION SELECT relid \
                 FROM pg_partition_ancestors(t.oid))){schemas})::text \
                 FROM pg_publication p, (SELECT to_regclass({})::oid AS oid) t \
                 WHERE p.pubname = {}",
                quote_literal(&qualified(table)),
                quote_literal(publication)
            ))
            .await?;
        if rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .as_deref()
            != Some("true")
        {
            out.push(table.clone());
        }
    }
    Ok(out)
}

/// Something about the publication that makes rules miss changes and that `run` does not
/// repair itself: it refuses to start (and stops) while it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hidden {
    /// The rule table concerned, when it is one table.
    pub table: Option<TableName>,
    /// What is wrong, in a sentence.
    pub problem: String,
    /// The SQL that repairs it, to run as the publication's owner.
    pub fix: String,
}

/// What the existing `publication` hides from the rules: an operation they fire on that it
/// does not publish; partitions published as their root (`publish_via_partition_root`), which
/// drops a TRUNCATE of one partition; and (PostgreSQL 15) a row filter, or a column list
/// without every column the rules read, on a rule table, an ancestor or a partition of one.
/// Empty when the publication does not exist.
pub async fn hidden(
    db: &mut impl Sql,
    rules: &RuleSet,
    publication: &str,
) -> Result<Vec<Hidden>, SetupError> {
    let version = crate::source::invalidate::server_version(db).await?;
    let via_root = if version >= 130_000 {
        "pubviaroot"
    } else {
        "false"
    };
    let rows = db
        .query(&format!(
            "SELECT pubinsert::text, pubupdate::text, pubdelete::text, pubtruncate::text, \
             {via_root}::text FROM pg_publication WHERE pubname = {}",
            quote_literal(publication)
        ))
        .await?;
    let Some([ops @ .., via_root]) = rows.first().map(Vec::as_slice) else {
        return Ok(Vec::new());
    };
    let name = quote_ident(publication);
    let mut out = Vec::new();
    let lacking: Vec<&str> = Op::ALL
        .into_iter()
        .zip(ops)
        .filter(|(op, on)| {
            on.as_deref() != Some("true") && rules.rules().iter().any(|r| r.ops.contains(op))
        })
        .map(|(op, _)| op.as_str())
        .collect();
    if !lacking.is_empty() {
        out.push(Hidden {
            table: None,
            problem: format!(
                "publication {publication} does not publish {}, on which rules fire: those \
                 changes are never seen",
                lacking.join(", ")
            ),
            fix: format!(
                "ALTER PUBLICATION {name} SET (publish = 'insert, update, delete, truncate');"
            ),
        });
    }
    let partitioned: Vec<&TableName> = {
        let mut found = Vec::new();
        for table in rules.tables() {
            let partitioned = flag(
                db,
                &format!(
                    "SELECT relkind = 'p' OR relispartition FROM pg_class \
                     WHERE oid = to_regclass({})",
                    quote_literal(&qualified(table))
                ),
            )
            .await?;
            if partitioned {
                found.push(table);
            }
        }
        found
    };
    if via_root.as_deref() == Some("true") && !partitioned.is_empty() {
        out.push(Hidden {
            table: None,
            problem: format!(
                "publication {publication} has publish_via_partition_root = true, so Postgres \
                 does not publish a TRUNCATE of one partition of {}",
                partitioned
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            fix: format!("ALTER PUBLICATION {name} SET (publish_via_partition_root = false);"),
        });
    }
    if version < 150_000 {
        return Ok(out);
    }
    for table in rules.tables() {
        let oid = format!("to_regclass({})", quote_literal(&qualified(table)));
        let rows = db
            .query(&format!(
                "SELECT r.prrelid::regclass::text, (r.prqual IS NOT NULL)::text, \
                 (SELECT json_agg(attname)::text FROM pg_attribute WHERE attrelid = r.prrelid \
                 AND attnum = ANY(r.prattrs::int2[])) \
                 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                 WHERE p.pubname = {} AND (r.prqual IS NOT NULL OR r.prattrs IS NOT NULL) \
                 AND r.prrelid IN (SELECT {oid}::oid UNION SELECT relid FROM \
                 pg_partition_ancestors({oid}) UNION SELECT relid FROM pg_partition_tree({oid}))",
                quote_literal(publication)
            ))
            .await?;
        let read = rules.columns_for(table);
        for row in rows {
            let [Some(entry), Some(filtered), columns] = row.as_slice() else {
                continue;
            };
            let fix = format!(
                "BEGIN; ALTER PUBLICATION {name} DROP TABLE {entry}; \
                 ALTER PUBLICATION {name} ADD TABLE {entry}; COMMIT;"
            );
            if filtered == "true" {
                out.push(Hidden {
                    table: Some(table.clone()),
                    problem: format!(
                        "publication {publication} publishes {entry} with a row filter: \
                         changes of the rows it leaves out are never seen by the rules of \
                         {table}"
                    ),
                    fix: fix.clone(),
                });
            }
            let published: BTreeSet<String> = columns
                .as_deref()
                .and_then(|c| serde_json::from_str::<Vec<String>>(c).ok())
                .map_or_else(BTreeSet::new, |c| c.into_iter().collect());
            let unseen: Vec<&str> = read.difference(&published).map(String::as_str).collect();
            if columns.is_some() && !unseen.is_empty() {
                out.push(Hidden {
                    table: Some(table.clone()),
                    problem: format!(
                        "publication {publication} publishes {entry} with a column list \
                         without {}, which the rules of {table} read",
                        unseen.join(", ")
                    ),
                    fix,
                });
            }
        }
    }
    Ok(out)
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

/// The server's `output_plugin_libraries`: newer minor releases of PostgreSQL let a replication
/// connection load only the output plugins it lists (older ones have no such setting and load
/// any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginAllowlist {
    /// The setting as `pg_settings` shows it, e.g. `pgoutput, test_decoding`.
    pub setting: String,
    /// Its `pg_settings.context`: `postmaster` takes effect at a restart, the others at a
    /// reload.
    pub context: String,
    /// Where the value comes from (`pg_settings.source`): `database` and `user` values
    /// (`ALTER DATABASE/ROLE ... SET`) override the server's, so the fix goes there.
    pub source: String,
    /// The connected database, for an `ALTER DATABASE` fix.
    pub database: String,
    /// The connected role, for an `ALTER ROLE` fix.
    pub role: String,
}

/// Why the server will not load pgoutput, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginRefusal {
    /// What is wrong, naming the setting and its value.
    pub problem: String,
    /// The SQL that allows pgoutput, and how to make it take effect.
    pub fix: String,
}

impl PluginAllowlist {
    /// Why pgoutput cannot load, or `None` when the list holds it (by name, or as a path or
    /// file name ending in `pgoutput`).
    pub fn refusal(&self) -> Option<PluginRefusal> {
        let libraries = list_elements(&self.setting);
        let allowed = libraries.iter().any(|entry| {
            let file = entry.rsplit('/').next().unwrap_or(entry);
            file.strip_suffix(".so").unwrap_or(file) == "pgoutput"
        });
        if allowed {
            return None;
        }
        // One literal per element: a single 'a, b' would be one element named "a, b".
        let value = libraries
            .iter()
            .map(String::as_str)
            .chain(["pgoutput"])
            .map(quote_literal)
            .collect::<Vec<_>>()
            .join(", ");
        let fix = match self.source.as_str() {
            "database" => format!(
                "ALTER DATABASE {} SET output_plugin_libraries = {value}; (new sessions use it)",
                quote_ident(&self.database)
            ),
            "user" => format!(
                "ALTER ROLE {} SET output_plugin_libraries = {value}; (new sessions use it)",
                quote_ident(&self.role)
            ),
            _ if self.context == "postmaster" => format!(
                "ALTER SYSTEM SET output_plugin_libraries = {value}; then restart PostgreSQL"
            ),
            _ => format!(
                "ALTER SYSTEM SET output_plugin_libraries = {value}; then SELECT pg_reload_conf();"
            ),
        };
        Some(PluginRefusal {
            problem: format!(
                "output_plugin_libraries = {} does not list pgoutput, so this server refuses to \
                 load it for logical replication (error 42501): `run` cannot create its slot or \
                 stream",
                quote_literal(&self.setting)
            ),
            fix: format!("as a superuser: {fix}"),
        })
    }
}

/// The elements of a list setting as the server splits it: at commas, each element trimmed,
/// or in double quotes (keeping commas and spaces, `""` for a quote).
fn list_elements(setting: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = setting.trim_start();
    while !rest.is_empty() {
        let element = match crate::change::unquote(rest) {
            Some((name, after)) => {
                rest = after;
                name
            }
            None => {
                let end = rest.find(',').unwrap_or(rest.len());
                let name = rest[..end].trim().to_owned();
                rest = &rest[end..];
                name
            }
        };
        if !element.is_empty() {
            out.push(element);
        }
        rest = rest.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    out
}

/// Reads `output_plugin_libraries`; `None` where the server has no such setting.
pub async fn plugin_allowlist(db: &mut impl Sql) -> Result<Option<PluginAllowlist>, SetupError> {
    let rows = db
        .query(
            "SELECT setting, context, source, current_database()::text, current_user::text \
             FROM pg_settings WHERE name = 'output_plugin_libraries'",
        )
        .await?;
    Ok(match rows.first().map(Vec::as_slice) {
        Some(
            [
                setting,
                Some(context),
                Some(source),
                Some(database),
                Some(role),
            ],
        ) => Some(PluginAllowlist {
            setting: setting.clone().unwrap_or_default(),
            context: context.clone(),
            source: source.clone(),
            database: database.clone(),
            role: role.clone(),
        }),
        _ => None,
    })
}

/// What the server says about a replication slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// The output plugin.
    pub plugin: Option<String>,
    /// Whether it belongs to the connected database.
    pub same_database: bool,
    /// Whether a walsender streams from it now.
    pub active: bool,
    /// Process id of that walsender.
    pub active_pid: Option<String>,
    /// The last position a consumer acknowledged.
    pub confirmed_flush: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL between the confirmed position and the server's current one.
    pub lag_bytes: Option<i64>,
    /// Whether it is a failover slot, which standbys synchronize; `None` before PostgreSQL 17,
    /// which has none.
    pub failover: Option<bool>,
}

/// Reads the slot, or `None` when it does not exist.
pub async fn slot_info(db: &mut impl Sql, slot: &str) -> Result<Option<SlotInfo>, SetupError> {
    let rows = db
        .query(&format!(
            "SELECT plugin, database = current_database(), active, active_pid::text, \
             confirmed_flush_lsn::text, wal_status, \
             (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
              ELSE pg_current_wal_lsn() END - confirmed_flush_lsn)::bigint::text, \
             to_jsonb(s) ->> 'failover' \
             FROM pg_replication_slots s WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    // `failover` is read through jsonb: a column that is missing before 17 is then NULL.
    let [
        plugin,
        same_db,
        active,
        pid,
        flush,
        wal_status,
        lag,
        failover,
    ] = <[Option<String>; 8]>::try_from(row)
        .map_err(|_| SetupError::Unexpected("the slot query".to_owned()))?;
    Ok(Some(SlotInfo {
        plugin,
        same_database: same_db.as_deref() == Some("t"),
        active: active.as_deref() == Some("t"),
        active_pid: pid,
        confirmed_flush: flush.and_then(|s| s.parse().ok()),
        wal_status,
        lag_bytes: lag.and_then(|s| s.parse().ok()),
        failover: failover.map(|f| f == "true"),
    }))
}

/// The process id of the walsender streaming from `slot`, or `None` when the slot is free or
/// does not exist: how a standby waits, and how `teardown` refuses, without asking for the slot
/// itself (each refused `START_REPLICATION` is an ERROR in the server's log).
pub async fn slot_holder(db: &mut impl Sql, slot: &str) -> Result<Option<String>, SetupError> {
    let rows = db
        .query(&format!(
            "SELECT coalesce(active_pid::text, '') FROM pg_replication_slots \
             WHERE slot_name = {} AND active",
            quote_literal(slot)
        ))
        .await?;
    Ok(rows.into_iter().next().map(|row| {
        row.into_iter()
            .next()
            .flatten()
            .filter(|pid| !pid.is_empty())
            .unwrap_or_else(|| "unknown".to_owned())
    }))
}

/// Facts about one table that decide what a rule can rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Column names in table order.
    pub columns: Vec<String>,
    /// `d` default, `f` full, `i` index, `n` nothing.
    pub replica_identity: char,
    /// Columns Postgres sends in the old row of an update or delete under that identity.
    pub identity_columns: Vec<String>,
}

/// Reads a table's columns and replica identity, or `None` when it does not exist.
pub async fn table_info(
    db: &mut impl Sql,
    table: &TableName,
) -> Result<Option<TableInfo>, SetupError> {
    let oid = format!(
        "(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = {} AND c.relname = {})",
        quote_literal(&table.schema),
        quote_literal(&table.name)
    );
    let ident = db
        .query(&format!(
            "SELECT relreplident::text FROM pg_class WHERE oid = {oid}"
        ))
        .await?;
    let Some(replica_identity) = ident
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|s| s.chars().next())
    else {
        return Ok(None);
    };
    let columns = first_column(
        db.query(&format!(
            "SELECT attname FROM pg_attribute WHERE attrelid = {oid} AND attnum > 0 \
             AND NOT attisdropped ORDER BY attnum"
        ))
        .await?,
    );
    let identity_columns = match replica_identity {
        'f' => columns.clone(),
        'n' => Vec::new(),
        _ => {
            // DEFAULT uses the primary key; INDEX uses the chosen index.
            let which = if replica_identity == 'i' {
                "indisreplident"
            } else {
                "indisprimary"
            };
            first_column(
                db.query(&format!(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a \
                     ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = {oid} AND i.{which} ORDER BY a.attnum"
                ))
                .await?,
            )
        }
    };
    Ok(Some(TableInfo {
        columns,
        replica_identity,
        identity_columns,
    }))
}

fn first_column(rows: Rows) -> Vec<String> {
    rows.into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist(setting: &str, context: &str) -> PluginAllowlist {
        PluginAllowlist {
            setting: setting.to_owned(),
            context: context.to_owned(),
            source: "configuration file".to_owned(),
            database: "shop".to_owned(),
            role: "app".to_owned(),
        }
    }

    #[test]
    fn an_allowlist_without_pgoutput_is_refused_with_the_fix() {
        for allowed in [
            "pgoutput, test_decoding",
            "test_decoding,pgoutput",
            "\"pgoutput\"",
            "$libdir/pgoutput",
            "/usr/lib/postgresql/18/lib/pgoutput.so",
        ] {
            assert_eq!(allowlist(allowed, "sighup").refusal(), None, "{allowed}");
        }
        let refusal = allowlist("test_decoding, wal2json", "sighup")
            .refusal()
            .unwrap();
        assert_eq!(
            refusal.problem,
            "output_plugin_libraries = 'test_decoding, wal2json' does not list pgoutput, so \
             this server refuses to load it for logical replication (error 42501): `run` \
             cannot create its slot or stream"
        );
        assert_eq!(
            refusal.fix,
            "as a superuser: ALTER SYSTEM SET output_plugin_libraries = \
             'test_decoding', 'wal2json', 'pgoutput'; then SELECT pg_reload_conf();"
        );
        let empty = allowlist("", "postmaster").refusal().unwrap();
        assert_eq!(
            empty.fix,
            "as a superuser: ALTER SYSTEM SET output_plugin_libraries = 'pgoutput'; then \
             restart PostgreSQL"
        );
        // A value set for the database or the role is fixed there: it overrides the server's.
        let database = PluginAllowlist {
            source: "database".to_owned(),
            ..allowlist("test_decoding", "superuser")
        };
        assert_eq!(
            database.refusal().unwrap().fix,
            "as a superuser: ALTER DATABASE \"shop\" SET output_plugin_libraries = \
             'test_decoding', 'pgoutput'; (new sessions use it)"
        );
        let role = PluginAllowlist {
            source: "user".to_owned(),
            ..allowlist("test_decoding", "superuser")
        };
        assert!(
            role.refusal()
                .unwrap()
                .fix
                .starts_with("as a superuser: ALTER ROLE \"app\" SET"),
        );
        // A quoted element keeps its comma: "pgoutput, x" is one library, not pgoutput.
        assert!(
            allowlist("\"pgoutput, x\"", "superuser")
                .refusal()
                .is_some()
        );
        assert_eq!(
            list_elements(" a ,\"b, c\", \"d\"\"e\" ,, f"),
            ["a", "b, c", "d\"e", "f"]
        );
        // A name that merely contains pgoutput is another library.
        assert!(allowlist("pgoutput_ext", "sighup").refusal().is_some());
    }

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
