//! Notify mode: triggers copy every row change of the watched tables into an outbox table and
//! `pg_notify` a channel; this source reads the outbox, plans the rows and deletes them from the
//! outbox once Redis confirmed their invalidations. For hosts without logical replication.
//!
//! ```text
//!  INSERT/UPDATE/DELETE/TRUNCATE ─trigger─▶ invalidator.outbox ─(NOTIFY is a hint; poll 1 s)─┐
//!                                                                                          ▼
//!   DELETE ... WHERE id = ANY(confirmed ids) ◀── watch<Position> ◀── delete loop ◀── Committed{round}
//! ```
//!
//! The outbox is the truth: a row stays until its deletes are confirmed, so a crash re-reads it
//! (at least once). Outbox ids are assigned before commit, so a smaller id can become visible
//! after a larger one was read: nothing is ever deleted or skipped by range, only by id. Each
//! read round is one [`Committed`] whose `end_lsn` is the round's sequence number (rounds are
//! queued in order, so the delete loop's confirmed position says which rounds are done).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::change::{Change, Lsn, Op, Row, TableName, Value};
use crate::config::PostgresConfig;
use crate::pipeline::{Committed, Links, SourceEnd};
use crate::reload::LiveRules;
use crate::rules::{Invalidation, RuleSet};
use crate::source::connect::ConnectError;
use crate::source::setup::{
    self, Action, SetupError, Sql, missing_tables, qualified, quote_ident, quote_literal,
};
use crate::source::{TEXT_FORM, invalidate, text_form_clauses};
use crate::telemetry;

/// The schema that holds the outbox and the trigger function.
pub const SCHEMA: &str = crate::source::invalidate::SCHEMA;
/// The channel the trigger notifies.
pub const CHANNEL: &str = "invalidator";
/// The row-level trigger on each watched table.
pub const ROW_TRIGGER: &str = "invalidator_capture";
/// The statement-level TRUNCATE trigger on each watched table.
pub const TRUNCATE_TRIGGER: &str = "invalidator_capture_truncate";
/// Outbox rows read per round.
pub const ROUND_ROWS: i64 = 1000;
/// How often the outbox is read without a notification, and its depth measured.
pub const POLL: Duration = Duration::from_secs(1);
/// Outbox ids read but not yet deleted past which no further round is read: they are excluded
/// from each read, and that list must stay short.
const MAX_HELD: usize = 5 * ROUND_ROWS as usize;
/// The session-level advisory lock (`pg_try_advisory_lock(bigint)`) the outbox reader holds, so
/// one instance reads and the others wait as standbys: FNV-1a of `invalidator.outbox`. Postgres
/// releases it when the session ends, however it ends (`kill -9` included); in `pg_locks` it
/// shows as an advisory lock with `classid` and `objid` its high and low 32 bits.
pub const READER_LOCK: i64 = fnv1a(b"invalidator.outbox");

/// 64-bit FNV-1a, as a signed number (advisory lock keys are `bigint`).
const fn fnv1a(bytes: &[u8]) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash as i64
}

/// The trigger function's body. It records, of the old and the new row, only the columns named
/// by the trigger's arguments (the columns the table's rules read), in Postgres text form
/// (`hstore(record)` uses each type's output function, under the function's pinned
/// [`TEXT_FORM`] rather than the writer's settings), SQL NULL as JSON null; `ext` is hstore's
/// schema, quoted.
fn function_body(ext: &str) -> String {
    format!(
        "\nDECLARE\n\
         \x20 columns text[] := coalesce(TG_ARGV, '{{}}');\n\
         BEGIN\n\
         \x20 IF TG_LEVEL = 'STATEMENT' THEN\n\
         \x20   INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op)\n\
         \x20   VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, lower(TG_OP));\n\
         \x20 ELSIF TG_OP = 'INSERT' THEN\n\
         \x20   INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op, new)\n\
         \x20   VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'insert', {ext}.hstore_to_jsonb({ext}.slice({ext}.hstore(NEW), columns)));\n\
         \x20 ELSIF TG_OP = 'UPDATE' THEN\n\
         \x20   INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op, old, new)\n\
         \x20   VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'update', {ext}.hstore_to_jsonb({ext}.slice({ext}.hstore(OLD), columns)), {ext}.hstore_to_jsonb({ext}.slice({ext}.hstore(NEW), columns)));\n\
         \x20 ELSE\n\
         \x20   INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op, old)\n\
         \x20   VALUES (TG_TABLE_SCHEMA, TG_TABLE_NAME, 'delete', {ext}.hstore_to_jsonb({ext}.slice({ext}.hstore(OLD), columns)));\n\
         \x20 END IF;\n\
         \x20 PERFORM pg_notify('{CHANNEL}', '');\n\
         \x20 RETURN NULL;\n\
         END\n"
    )
}

/// The trigger function's `search_path`: nothing a writer creates can shadow what it calls.
const CAPTURE_SEARCH_PATH: &str = "SET search_path = pg_catalog, pg_temp";

/// The trigger function's settings as `pg_proc.proconfig` lists them, one a line: its
/// `search_path`, then the text form of values ([`TEXT_FORM`]).
fn capture_config() -> String {
    std::iter::once("search_path=pg_catalog, pg_temp".to_owned())
        .chain(
            TEXT_FORM
                .iter()
                .map(|(name, value)| format!("{name}={value}")),
        )
        .collect::<Vec<_>>()
        .join("\n")
}

/// The row trigger's arguments for a table: the columns its rules read, each a SQL literal.
fn trigger_args(columns: &BTreeSet<String>) -> String {
    columns
        .iter()
        .map(|c| quote_literal(c))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Splits `pg_trigger.tgargs` (as hex): each argument ends with a NUL byte.
fn parse_tgargs(hex: &str) -> Option<Vec<String>> {
    let bytes = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let mut args: Vec<String> = bytes
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    // The last argument's NUL leaves an empty piece behind it (and no arguments, one).
    args.pop();
    Some(args)
}

/// What one of our triggers on a table looks like now.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Installed {
    /// `pg_trigger.tgenabled`: `O` and `A` fire on ordinary writes; `D` and `R` do not.
    enabled: String,
    /// Its arguments.
    args: Vec<String>,
    /// Whether it calls `invalidator.capture()`.
    our_function: bool,
}

impl Installed {
    /// Why it is not what we want, if it is not.
    fn problem(&self, wanted_args: &[String]) -> Option<String> {
        if !self.our_function {
            Some(format!("does not call {SCHEMA}.capture()"))
        } else if !matches!(self.enabled.as_str(), "O" | "A") {
            Some("is disabled".to_owned())
        } else if self.args != wanted_args {
            Some(format!(
                "records columns ({}), the rules read ({})",
                self.args.join(", "),
                wanted_args.join(", ")
            ))
        } else {
            None
        }
    }
}

/// Works out what notify mode is missing or has out of date: the tables and the columns the
/// rules read are checked, then the schema, hstore, the outbox, the trigger function (replaced
/// when its body differs), each table's two triggers (the row trigger's arguments must be the
/// columns its rules read today); `invalidator.invalidate()` is [`invalidate::plan`]'s. Idempotent: once everything is
/// in place the plan is empty. `run` refuses to start unless it is.
///
/// A trigger that must change is dropped and created again in one transaction (`BEGIN; DROP
/// TRIGGER; CREATE TRIGGER; COMMIT`), so no write slips between the two; unlike `CREATE OR
/// REPLACE TRIGGER` (PostgreSQL 14) that works on 13 too. Versions before 13 are not supported
/// (`EXECUTE FUNCTION` in trigger definitions needs 11, and hstore's `slice` with trigger
/// arguments is what the function relies on).
pub async fn plan(db: &mut impl Sql, rules: &RuleSet) -> Result<Vec<Action>, SetupError> {
    let tables: BTreeSet<TableName> = rules.tables().cloned().collect();
    let missing = missing_tables(db, &tables).await?;
    if !missing.is_empty() {
        return Err(SetupError::MissingTables(missing));
    }
    let mut lacking = Vec::new();
    for table in &tables {
        let have: BTreeSet<String> = db
            .query(&format!(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass({}) \
                 AND attnum > 0 AND NOT attisdropped",
                quote_literal(&qualified(table))
            ))
            .await?
            .into_iter()
            .filter_map(|r| r.into_iter().next().flatten())
            .collect();
        let absent: Vec<String> = rules
            .columns_for(table)
            .difference(&have)
            .cloned()
            .collect();
        if !absent.is_empty() {
            lacking.push((table.clone(), absent));
        }
    }
    if !lacking.is_empty() {
        return Err(SetupError::MissingColumns(lacking));
    }
    let mut actions = Vec::new();
    let schema = quote_ident(SCHEMA);
    if !invalidate::has_schema(db).await? {
        actions.push(invalidate::create_schema());
    }
    let hstore = db
        .query(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'hstore'",
        )
        .await?;
    let ext = match hstore.into_iter().next().and_then(|r| r.into_iter().next()) {
        Some(Some(ext_schema)) => quote_ident(&ext_schema),
        _ => {
            actions.push(Action {
                why: "create extension hstore (row values in Postgres text form)".to_owned(),
                sql: format!("CREATE EXTENSION IF NOT EXISTS hstore WITH SCHEMA {schema}"),
            });
            schema.clone()
        }
    };
    let outbox = format!("{schema}.outbox");
    let has_outbox = db
        .query(&format!(
            "SELECT to_regclass({}) IS NOT NULL",
            quote_literal(&outbox)
        ))
        .await?;
    if has_outbox
        .first()
        .and_then(|r| r.first().cloned().flatten())
        != Some("t".to_owned())
    {
        actions.push(Action {
            why: format!("create the outbox table {SCHEMA}.outbox"),
            sql: format!(
                "CREATE TABLE IF NOT EXISTS {outbox} (id bigserial PRIMARY KEY, \
                 table_schema text NOT NULL, table_name text NOT NULL, op text NOT NULL, \
                 old jsonb, new jsonb, created_at timestamptz NOT NULL DEFAULT now())"
            ),
        });
    }
    let body = function_body(&ext);
    let function = format!("{schema}.capture()");
    let current = db
        .query(&format!(
            "SELECT prosrc, array_to_string(proconfig, chr(10)) FROM pg_proc \
             WHERE oid = to_regprocedure({})",
            quote_literal(&function)
        ))
        .await?;
    let why = match current.first().map(Vec::as_slice) {
        None => Some(format!("create the trigger function {SCHEMA}.capture()")),
        Some([Some(source), _]) if *source != body => Some(format!(
            "replace the trigger function {SCHEMA}.capture(), whose body is out of date"
        )),
        Some([_, config]) if config.as_deref() != Some(capture_config().as_str()) => Some(format!(
            "replace the trigger function {SCHEMA}.capture(), which writes values in the \
                 writing session's settings (time zone, date style, ...), so their keys \
                 depend on who writes"
        )),
        Some(_) => None,
    };
    if let Some(why) = why {
        actions.push(Action {
            why,
            // SECURITY DEFINER: writers need no privileges on the outbox. The SET clauses pin
            // the text form of values for the function's run, whatever the writer's session
            // or role set. Not executable by PUBLIC: a trigger of another role's making could
            // then write the outbox.
            sql: format!(
                "CREATE OR REPLACE FUNCTION {function} RETURNS trigger LANGUAGE plpgsql \
                 SECURITY DEFINER {CAPTURE_SEARCH_PATH}{} AS {}; \
                 REVOKE ALL ON FUNCTION {function} FROM PUBLIC",
                text_form_clauses(),
                quote_literal(&body)
            ),
        });
    }
    for table in &tables {
        let name = qualified(table);
        let present: BTreeMap<String, Installed> = db
            .query(&format!(
                "SELECT tgname, tgenabled::text, encode(tgargs, 'hex'), \
                 tgfoid = coalesce(to_regprocedure({})::oid, 0) \
                 FROM pg_trigger WHERE tgrelid = to_regclass({}) AND tgname IN ({}, {})",
                quote_literal(&function),
                quote_literal(&name),
                quote_literal(ROW_TRIGGER),
                quote_literal(TRUNCATE_TRIGGER)
            ))
            .await?
            .into_iter()
            .filter_map(|row| match row.as_slice() {
                [Some(tgname), Some(enabled), Some(args), Some(ours)] => Some((
                    tgname.clone(),
                    Installed {
                        enabled: enabled.clone(),
                        args: parse_tgargs(args)?,
                        our_function: ours == "t",
                    },
                )),
                _ => None,
            })
            .collect();
        let columns = rules.columns_for(table);
        let wanted: Vec<String> = columns.iter().cloned().collect();
        let triggers = [
            (
                ROW_TRIGGER,
                "AFTER INSERT OR UPDATE OR DELETE",
                "ROW",
                trigger_args(&columns),
                &wanted[..],
                "row changes",
            ),
            (
                TRUNCATE_TRIGGER,
                "AFTER TRUNCATE",
                "STATEMENT",
                String::new(),
                &[][..],
                "truncates",
            ),
        ];
        for (trigger, events, level, args, wanted, what) in triggers {
            let create = format!(
                "CREATE TRIGGER {} {events} ON {name} FOR EACH {level} \
                 EXECUTE FUNCTION {schema}.capture({args})",
                quote_ident(trigger)
            );
            match present.get(trigger).map(|t| t.problem(wanted)) {
                None => actions.push(Action {
                    why: format!("capture {what} of {table}"),
                    sql: create,
                }),
                Some(Some(problem)) => actions.push(Action {
                    why: format!("replace trigger {trigger} on {table}, which {problem}"),
                    sql: format!(
                        "BEGIN; DROP TRIGGER {} ON {name}; {create}; COMMIT",
                        quote_ident(trigger)
                    ),
                }),
                Some(None) => {}
            }
        }
    }
    actions.extend(
        partition_plan(db, rules)
            .await?
            .into_iter()
            .map(|(_, action)| action),
    );
    Ok(actions)
}

/// The TRUNCATE triggers the partitions of the rules' tables lack, each with its rule table.
/// A row trigger on a partitioned table is cloned to every partition, present and future, but
/// a statement-level trigger is not, and a TRUNCATE of one partition fires only that
/// partition's: so each partition, at any depth, needs its own. `run` adds them itself, at
/// start and for partitions attached while it runs (see [`repair_partitions`]).
pub async fn partition_plan(
    db: &mut impl Sql,
    rules: &RuleSet,
) -> Result<Vec<(TableName, Action)>, SetupError> {
    let function = quote_literal(&format!("{}.capture()", quote_ident(SCHEMA)));
    let mut out = Vec::new();
    for table in rules.tables() {
        let root = format!("to_regclass({})", quote_literal(&qualified(table)));
        let rows = db
            .query(&format!(
                "SELECT n.nspname, c.relname, (SELECT CASE WHEN t.tgfoid = \
                 coalesce(to_regprocedure({function})::oid, 0) AND t.tgenabled IN ('O', 'A') \
                 THEN 'ok' ELSE 'bad' END FROM pg_trigger t WHERE t.tgrelid = p.relid \
                 AND t.tgname = {}) FROM pg_partition_tree({root}) p \
                 JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE p.relid <> {root} ORDER BY p.level, c.relname",
                quote_literal(TRUNCATE_TRIGGER)
            ))
            .await?;
        for row in rows {
            let [Some(schema), Some(name), state] = row.as_slice() else {
                continue;
            };
            let partition = TableName::new(schema, name);
            // A partition with rules of its own gets its triggers as a rule table.
            if rules.has_table(&partition) || state.as_deref() == Some("ok") {
                continue;
            }
            let on = qualified(&partition);
            let trigger = quote_ident(TRUNCATE_TRIGGER);
            let create = format!(
                "CREATE TRIGGER {trigger} AFTER TRUNCATE ON {on} FOR EACH STATEMENT \
                 EXECUTE FUNCTION {}.capture()",
                quote_ident(SCHEMA)
            );
            let action = match state {
                None => Action {
                    why: format!("capture truncates of {partition}, a partition of {table}"),
                    sql: create,
                },
                Some(_) => Action {
                    why: format!(
                        "replace trigger {TRUNCATE_TRIGGER} on {partition}, a partition of \
                         {table}, which is disabled or does not call {SCHEMA}.capture()"
                    ),
                    sql: format!("BEGIN; DROP TRIGGER {trigger} ON {on}; {create}; COMMIT"),
                },
            };
            out.push((table.clone(), action));
        }
    }
    Ok(out)
}

/// Adds the TRUNCATE triggers [`partition_plan`] finds missing, then queues a delete of every
/// key the rules of their tables can produce: a TRUNCATE of such a partition before its
/// trigger existed was missed. Logged at error.
pub async fn repair_partitions(
    client: &tokio_postgres::Client,
    rules: &RuleSet,
    queue: &mpsc::Sender<Committed>,
) -> Result<(), SetupError> {
    let mut db = client;
    let repairs = partition_plan(&mut db, rules).await?;
    if repairs.is_empty() {
        return Ok(());
    }
    let mut flush = Invalidation::default();
    for (table, action) in &repairs {
        setup::apply(&mut db, std::slice::from_ref(action)).await?;
        tracing::error!(table = %table, action = %action.why,
            "a partition lacked the truncate trigger (attached after setup): added it; a \
             truncate of it until now was missed, so every key of the table's rules is deleted");
        flush.merge(rules.everything_for(table));
    }
    // Acknowledges nothing by itself (round numbers start at 1); queued behind what was read.
    let _ = queue
        .send(Committed {
            history: 0,
            end_lsn: Lsn(0),
            commit_time_us: crate::pipeline::unix_micros(),
            // issue 15: the sidecar's own flush; no transaction to wait for.
            xid: None,
            inv: flush,
        })
        .await;
    Ok(())
}

/// Outbox rows waiting and the age in seconds of the oldest (`None` when empty).
pub async fn depth(client: &tokio_postgres::Client) -> Result<(i64, Option<f64>), NotifyError> {
    let row = client
        .query_one(
            "SELECT count(*), (extract(epoch FROM now() - min(created_at)))::float8 \
             FROM invalidator.outbox",
            &[],
        )
        .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Measures the outbox for `/metrics`; a failure is left to the next read to report.
async fn measure(client: &tokio_postgres::Client) {
    if let Ok((rows, oldest)) = depth(client).await {
        metrics::gauge!(telemetry::OUTBOX_ROWS).set(rows as f64);
        metrics::gauge!(telemetry::OUTBOX_OLDEST_SECONDS).set(oldest.unwrap_or(0.0).max(0.0));
    }
}

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

/// Why the notify source stopped.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// A query failed or the connection broke.
    #[error(transparent)]
    Postgres(#[from] SetupError),
    /// The connection closed.
    #[error("the notify connection closed")]
    Closed,
    /// The connection could not be opened (URL, TLS, server).
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A notification sent over a second session never reached the listening one.
    #[error(
        "LISTEN does not work on this connection: a NOTIFY sent over a second session did not \
         arrive within {0:?}. A connection pooler in transaction mode (PgBouncer, Supavisor on \
         port 6543) does this, and it breaks the reader's session lock too; point postgres.url \
         at PostgreSQL itself, or at a pooler in session mode"
    )]
    Deaf(Duration),
}

impl NotifyError {
    /// Whether reconnecting can help.
    pub fn is_transient(&self) -> bool {
        match self {
            NotifyError::Postgres(e) => e.is_transient(),
            NotifyError::Closed => true,
            NotifyError::Connect(e) => e.is_transient(),
            NotifyError::Deaf(_) => false,
        }
    }
}

impl From<tokio_postgres::Error> for NotifyError {
    fn from(e: tokio_postgres::Error) -> Self {
        NotifyError::Postgres(SetupError::Postgres(e))
    }
}

/// What the notify source keeps across reconnects: the rounds the delete loop still holds and the
/// ids confirmed but not yet deleted from the outbox.
#[derive(Debug, Default)]
pub struct Progress {
    /// Rounds handed out and not yet confirmed: sequence number and outbox ids, in order.
    in_flight: VecDeque<(Lsn, Vec<i64>)>,
    /// issue 15: per round that read every row its snapshot saw (not a full one), the WAL
    /// position `/wait` may report once it is confirmed (see [`read_round`]).
    positions: VecDeque<(Lsn, Lsn)>,
    /// A planned round the queue had no room for yet (its ids are in `in_flight`).
    pending: Option<Committed>,
    /// Outbox ids whose deletes Redis confirmed, to delete from the outbox.
    done: Vec<i64>,
    /// Sequence number of the last round read.
    last_round: u64,
}

impl Progress {
    /// Moves the rounds up to `confirmed` to `done`; returns the WAL position of the last of
    /// them that has one, for `/wait`.
    fn confirm(&mut self, confirmed: Lsn) -> Option<Lsn> {
        while self
            .in_flight
            .front()
            .is_some_and(|(seq, _)| *seq <= confirmed)
        {
            if let Some((_, ids)) = self.in_flight.pop_front() {
                self.done.extend(ids);
            }
        }
        let mut wal = None;
        while let Some(&(round, at)) = self.positions.front() {
            if round > confirmed {
                break;
            }
            wal = Some(at);
            self.positions.pop_front();
        }
        wal
    }

    /// Every id read and still in the outbox: never read again while held.
    fn held(&self) -> Vec<i64> {
        self.in_flight
            .iter()
            .flat_map(|(_, ids)| ids.iter().copied())
            .chain(self.done.iter().copied())
            .collect()
    }

    /// How many ids are held.
    fn held_len(&self) -> usize {
        self.in_flight
            .iter()
            .map(|(_, ids)| ids.len())
            .sum::<usize>()
            + self.done.len()
    }
}

/// Connects an ordinary session (TLS as `sslmode` says) and spawns its driver, which forwards
/// every notification as a hint; the receiver closes when the connection ends.
pub async fn connect(
    postgres: &PostgresConfig,
) -> Result<(tokio_postgres::Client, mpsc::UnboundedReceiver<()>), NotifyError> {
    // A URL that does not parse fails in `open`, with its own message.
    if let Ok((config, _)) = crate::source::connect::parse_url(&postgres.url)
        && let Some(pooler) = crate::source::connect::supabase_pooler(&config, false)
    {
        return Err(ConnectError::from(pooler).into());
    }
    let (client, mut connection) = crate::source::connect::open(postgres).await?;
    let (hint_tx, hint_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(tokio_postgres::AsyncMessage::Notification(_)) => {
                    let _ = hint_tx.send(());
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "notify connection failed");
                    break;
                }
            }
        }
    });
    Ok((client, hint_rx))
}

/// How long [`prove_listen`] waits for its notification.
const PROBE_WAIT: Duration = Duration::from_secs(5);

/// Proves that the session behind `hints` receives notifications, once it listens on
/// [`CHANNEL`]: a second session sends one. Postgres delivers it in milliseconds; a pooler in
/// transaction mode hands the listening server session to others between transactions, and the
/// notification goes to whoever holds it then, or nowhere. The extra hint only wakes the reader.
pub async fn prove_listen(
    postgres: &PostgresConfig,
    hints: &mut mpsc::UnboundedReceiver<()>,
) -> Result<(), NotifyError> {
    let sender = crate::source::connect::connect(postgres).await?;
    sender
        .execute("SELECT pg_notify($1, 'probe')", &[&CHANNEL])
        .await?;
    match tokio::time::timeout(PROBE_WAIT, hints.recv()).await {
        Ok(Some(())) => Ok(()),
        Ok(None) => Err(NotifyError::Closed),
        Err(_) => Err(NotifyError::Deaf(PROBE_WAIT)),
    }
}

/// Tries to take the reader lock on the session of `client`: `false` when another instance
/// holds it (this one is then a standby).
pub async fn take_reader_lock(client: &tokio_postgres::Client) -> Result<bool, NotifyError> {
    let row = client
        .query_one("SELECT pg_try_advisory_lock($1)", &[&READER_LOCK])
        .await?;
    Ok(row.try_get(0)?)
}

/// The process id of the session holding the reader lock in this database, or `None` when
/// nobody does: a standby polls this instead of opening a session per attempt, and `teardown`
/// refuses while it is held.
pub async fn reader_lock_holder(db: &mut impl Sql) -> Result<Option<String>, SetupError> {
    let key = READER_LOCK as u64;
    let rows = db
        .query(&format!(
            "SELECT pid::text FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             AND classid = {} AND objid = {} AND objsubid = 1",
            key >> 32,
            key & 0xffff_ffff
        ))
        .await?;
    Ok(rows
        .into_iter()
        .next()
        .and_then(|row| row.into_iter().next().flatten()))
}

/// Reads the outbox, queues each round and deletes confirmed rows from it, until the delete loop
/// stops (shutdown: the last confirmed rows are deleted first) or the connection fails. `LISTEN`
/// must have been issued on `client`.
pub async fn stream(
    client: &tokio_postgres::Client,
    hints: &mut mpsc::UnboundedReceiver<()>,
    rules: &mut LiveRules,
    links: &mut Links,
    progress: &mut Progress,
) -> Result<SourceEnd, NotifyError> {
    // Confirmations that arrived while disconnected.
    if let Some(wal) = progress.confirm(links.confirmed_lsn()) {
        links.health.acknowledge(wal);
    }
    acknowledge(client, progress).await?;
    let queue = links.queue.clone();
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Partitions attached after setup, found at start (the first tick) and while running.
    let mut partitions = tokio::time::interval(crate::source::drift::CHECK_EVERY);
    partitions.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_now = true;
    loop {
        let reading = progress.pending.is_none()
            && progress.held_len() < MAX_HELD
            && !links.cancel.is_cancelled();
        tokio::select! {
            biased;
            // Acknowledge first: it is what keeps the outbox short.
            changed = links.confirmed.changed() => {
                if let Some(wal) = progress.confirm(links.confirmed_lsn()) {
                    links.health.acknowledge(wal);
                }
                acknowledge(client, progress).await?;
                // issue 15: a round right after, so `/wait` learns a position past the
                // commits just confirmed without waiting for the poll.
                read_now = true;
                if changed.is_err() {
                    // The delete loop has stopped (shutdown): that was the last confirmation.
                    return Ok(SourceEnd::DeleterStopped);
                }
            }
            permit = queue.reserve(), if progress.pending.is_some() => {
                let Ok(permit) = permit else { return Ok(SourceEnd::DeleterStopped) };
                if let Some(round) = progress.pending.take() {
                    links.last_queued = links.last_queued.max(round.end_lsn);
                    permit.send(round);
                }
            }
            () = std::future::ready(()), if reading && read_now => {
                // A full round means a backlog: read the next one straight away.
                let prefixes = &links.invalidate_prefixes;
                read_now = read_round(client, rules, progress, prefixes, &links.health).await?;
            }
            hint = hints.recv(), if reading => {
                if hint.is_none() {
                    return Err(NotifyError::Closed);
                }
                while hints.try_recv().is_ok() {}
                read_now = true;
            }
            _ = poll.tick() => {
                // The depth is measured here, not per round: count(*) on a long outbox costs.
                measure(client).await;
                read_now |= reading;
            }
            _ = partitions.tick() => {
                rules.refresh();
                repair_partitions(client, rules.rules(), &queue).await?;
            }
        }
    }
}

/// Deletes the confirmed ids from the outbox.
async fn acknowledge(
    client: &tokio_postgres::Client,
    progress: &mut Progress,
) -> Result<(), NotifyError> {
    if progress.done.is_empty() {
        return Ok(());
    }
    client
        .execute(
            "DELETE FROM invalidator.outbox WHERE id = ANY($1)",
            &[&progress.done],
        )
        .await?;
    progress.done.clear();
    Ok(())
}

/// Reads one round of outbox rows not held already and plans it into `progress.pending`;
/// returns whether the round was full.
///
/// issue 15, `/wait` in notify mode: the WAL position P is read in a statement before the
/// round's. An application that read X = `pg_current_wal_lsn()` after its commit returned, with
/// X < P, read it before P was read, so its commit was visible to the round's snapshot: once a
/// round that read every row it saw is confirmed, every change before P is invalidated, and
/// P - 1 is what `/wait` reports.
async fn read_round(
    client: &tokio_postgres::Client,
    rules: &mut LiveRules,
    progress: &mut Progress,
    invalidate_prefixes: &[String],
    health: &crate::telemetry::Health,
) -> Result<bool, NotifyError> {
    let position: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    let before = position
        .parse::<Lsn>()
        .map_or(Lsn(0), |p| Lsn(p.0.saturating_sub(1)));
    let held = progress.held();
    let rows = client
        .query(
            "SELECT id, table_schema, table_name, op, old::text, new::text, \
             (extract(epoch FROM created_at) * 1000000)::bigint \
             FROM invalidator.outbox WHERE id <> ALL($1) ORDER BY id LIMIT $2",
            &[&held, &ROUND_ROWS],
        )
        .await?;
    if rows.is_empty() {
        // Nothing in flight either: everything before P is done.
        if progress.in_flight.is_empty() && progress.pending.is_none() {
            health.acknowledge(before);
            // On an idle server P stands still, and an X equal to it is never passed: while
            // someone waits, a transaction with an xid writes a commit record, so the next
            // round's P is past it (at most one a poll).
            if health.has_waiters() {
                client.batch_execute("SELECT txid_current()").await?;
            }
        }
        return Ok(false);
    }
    let full = rows.len() as i64 >= ROUND_ROWS;
    let ancestors = ancestors_of(client, &rows).await?;
    let (ids, first_time, inv) = plan_rows(rules, rows, &ancestors, invalidate_prefixes)?;
    progress.last_round += 1;
    let round = Lsn(progress.last_round);
    progress.in_flight.push_back((round, ids));
    if !full {
        progress.positions.push_back((round, before));
    }
    // Even a round with nothing to delete is queued: its confirmation acknowledges its rows.
    progress.pending = Some(Committed {
        // Notify mode never starts a new history: the outbox is the truth.
        history: 0,
        end_lsn: round,
        commit_time_us: first_time,
        // issue 15: read through a snapshot that sees these commits, so every later snapshot
        // does too: nothing to wait for (see `source::visibility`).
        xid: None,
        inv,
    });
    Ok(full)
}

/// The partition ancestors of each table the outbox `rows` name (tables that are no partition
/// are left out): the row trigger of a partitioned table is cloned to its partitions, and a
/// trigger records the partition it fired on, so a change of a partition fires the rules of
/// each ancestor too. Read from today's catalog, once per round.
async fn ancestors_of(
    client: &tokio_postgres::Client,
    rows: &[tokio_postgres::Row],
) -> Result<HashMap<TableName, Vec<TableName>>, NotifyError> {
    let mut schemas = Vec::new();
    let mut names = Vec::new();
    for row in rows {
        let (schema, name) = (row.try_get::<_, &str>(1)?, row.try_get::<_, &str>(2)?);
        if !schemas
            .iter()
            .zip(&names)
            .any(|(s, n)| *s == schema && *n == name)
        {
            schemas.push(schema);
            names.push(name);
        }
    }
    let found = client
        .query(
            "SELECT t.s, t.n, an.nspname::text, ac.relname::text \
             FROM unnest($1::text[], $2::text[]) AS t(s, n) \
             CROSS JOIN LATERAL (SELECT to_regclass(quote_ident(t.s) || '.' || quote_ident(t.n)) \
             AS oid) r CROSS JOIN LATERAL pg_partition_ancestors(r.oid) a \
             JOIN pg_class ac ON ac.oid = a.relid JOIN pg_namespace an ON an.oid = ac.relnamespace \
             WHERE a.relid <> r.oid",
            &[&schemas, &names],
        )
        .await?;
    let mut out: HashMap<TableName, Vec<TableName>> = HashMap::new();
    for row in found {
        let table = TableName::new(row.try_get::<_, String>(0)?, row.try_get::<_, String>(1)?);
        let ancestor = TableName::new(row.try_get::<_, String>(2)?, row.try_get::<_, String>(3)?);
        out.entry(table).or_default().push(ancestor);
    }
    Ok(out)
}

/// Plans one round of outbox rows with the rules in effect (taking newer ones first: a round is
/// the transaction boundary here), each change for its table and for the table's partition
/// `ancestors`; returns their ids, the oldest row's time and what to delete. A row written by
/// `invalidator.invalidate()` or `invalidate_key()` deletes what it names only under the
/// allowed prefixes: the rules' and `invalidate_prefixes`.
fn plan_rows(
    rules: &mut LiveRules,
    rows: Vec<tokio_postgres::Row>,
    ancestors: &HashMap<TableName, Vec<TableName>>,
    invalidate_prefixes: &[String],
) -> Result<(Vec<i64>, i64, Invalidation), NotifyError> {
    rules.refresh();
    let allowed = invalidate::Allowed::new(rules.rules(), invalidate_prefixes);
    let mut inv = Invalidation::default();
    let mut ids = Vec::with_capacity(rows.len());
    let mut first_time = i64::MAX;
    for row in rows {
        let outbox = OutboxRow {
            id: row.try_get(0)?,
            table: TableName::new(row.try_get::<_, String>(1)?, row.try_get::<_, String>(2)?),
            op: row.try_get(3)?,
            old: row.try_get(4)?,
            new: row.try_get(5)?,
            created_us: row.try_get(6)?,
        };
        ids.push(outbox.id);
        first_time = first_time.min(outbox.created_us);
        if outbox.op == invalidate::OUTBOX_OP || outbox.op == invalidate::OUTBOX_KEY_OP {
            match outbox.given() {
                Ok(text) => allowed.insert(&mut inv, &text, outbox.op == invalidate::OUTBOX_KEY_OP),
                Err(e) => {
                    // Never skip: not knowing what it named, everything it may name goes.
                    tracing::error!(id = outbox.id, error = %e,
                        "unreadable invalidate() row in the outbox; deleting every key under \
                         the allowed prefixes");
                    inv.merge(allowed.everything());
                }
            }
            continue;
        }
        match outbox.change() {
            Ok(change) => {
                metrics::counter!(
                    telemetry::CHANGES_TOTAL,
                    "table" => change.table.to_string(),
                    "op" => change.op.as_str()
                )
                .increment(1);
                rules.plan(&change, &mut inv);
                for ancestor in ancestors.get(&change.table).into_iter().flatten() {
                    let mut copy = change.clone();
                    copy.table.clone_from(ancestor);
                    rules.plan(&copy, &mut inv);
                }
            }
            Err(e) => {
                // Never skip: whatever the row was, every key its table's rules make goes.
                tracing::warn!(id = outbox.id, table = %outbox.table, error = %e,
                    "unreadable outbox row; invalidating every pattern of its table's rules");
                inv.merge(rules.rules().everything_for(&outbox.table));
                for ancestor in ancestors.get(&outbox.table).into_iter().flatten() {
                    inv.merge(rules.rules().everything_for(ancestor));
                }
            }
        }
    }
    rules.count();
    Ok((ids, first_time, inv))
}

/// `run --dry-run` in notify mode: reads the outbox rows newer than the newest one at start,
/// plans each round and logs what it would delete. It deletes no outbox row and takes no reader
/// lock, so a real reader keeps working beside it; rows that reader deletes first, and rows
/// whose ids are below one already read (ids are assigned before commit), are not shown.
pub async fn dry_stream(
    client: &tokio_postgres::Client,
    hints: &mut mpsc::UnboundedReceiver<()>,
    rules: &mut LiveRules,
    links: &Links,
) -> Result<SourceEnd, NotifyError> {
    let newest: i64 = client
        .query_one("SELECT coalesce(max(id), 0) FROM invalidator.outbox", &[])
        .await?
        .try_get(0)?;
    tracing::info!(
        after_id = newest,
        "dry run: reading outbox rows newer than the newest one now; deleting none"
    );
    let mut seen = newest;
    let mut poll = tokio::time::interval(POLL);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut read_now = true;
    loop {
        tokio::select! {
            biased;
            _ = links.cancel.cancelled() => return Ok(SourceEnd::DeleterStopped),
            () = std::future::ready(()), if read_now => {
                let rows = client
                    .query(
                        "SELECT id, table_schema, table_name, op, old::text, new::text, \
                         (extract(epoch FROM created_at) * 1000000)::bigint \
                         FROM invalidator.outbox WHERE id > $1 ORDER BY id LIMIT $2",
                        &[&seen, &ROUND_ROWS],
                    )
                    .await?;
                read_now = rows.len() as i64 >= ROUND_ROWS;
                if rows.is_empty() {
                    continue;
                }
                let mut tables = BTreeSet::new();
                for row in &rows {
                    let (schema, name) = (row.try_get::<_, &str>(1)?, row.try_get::<_, &str>(2)?);
                    tables.insert(TableName::new(schema, name).to_string());
                }
                let ancestors = ancestors_of(client, &rows).await?;
                let (ids, _, inv) = plan_rows(rules, rows, &ancestors, &links.invalidate_prefixes)?;
                let first = ids.first().copied().unwrap_or(seen);
                seen = ids.last().copied().unwrap_or(seen);
                if !inv.is_empty() {
                    let tables = tables.into_iter().collect::<Vec<_>>().join(", ");
                    let position = format!("outbox ids {first}..{seen}");
                    crate::dry_run::log_would_delete(position, &tables, &inv);
                }
            }
            hint = hints.recv() => {
                if hint.is_none() {
                    return Err(NotifyError::Closed);
                }
                while hints.try_recv().is_ok() {}
                read_now = true;
            }
            _ = poll.tick() => read_now = true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_strings_are_text_null_is_null_and_absent_is_unknown() {
        let row = row_from_json(&json!({"id": "7", "name": "*", "gone": null, "empty": ""}))
            .expect("an object");
        assert_eq!(row.get("id"), &Value::Text("7".into()));
        assert_eq!(row.get("name"), &Value::Text("*".into()));
        assert_eq!(row.get("gone"), &Value::Null);
        assert_eq!(row.get("empty"), &Value::Text(String::new()));
        assert_eq!(row.get("missing"), &Value::Unknown);
        // Not written by the trigger, but never dropped: the JSON text stands in.
        let odd = row_from_json(&json!({"n": 1, "b": true})).expect("an object");
        assert_eq!(odd.get("n"), &Value::Text("1".into()));
        assert_eq!(odd.get("b"), &Value::Text("true".into()));
    }

    #[test]
    fn a_row_that_is_not_an_object_is_an_error() {
        assert_eq!(row_from_json(&json!(["1"])), Err(ConvertError::NotAnObject));
        assert_eq!(row_from_json(&json!("x")), Err(ConvertError::NotAnObject));
    }

    fn outbox(op: &str, old: Option<&str>, new: Option<&str>) -> OutboxRow {
        OutboxRow {
            id: 42,
            table: TableName::new("public", "items"),
            op: op.to_owned(),
            old: old.map(str::to_owned),
            new: new.map(str::to_owned),
            created_us: 5,
        }
    }

    #[test]
    fn outbox_rows_become_changes() {
        let update = outbox("update", Some(r#"{"id": "1"}"#), Some(r#"{"id": "2"}"#))
            .change()
            .expect("converts");
        assert_eq!(update.op, Op::Update);
        assert_eq!(update.old.unwrap().get("id"), &Value::Text("1".into()));
        assert_eq!(update.new.unwrap().get("id"), &Value::Text("2".into()));
        assert_eq!(update.commit_lsn, Lsn(42));

        let truncate = outbox("truncate", None, None).change().expect("converts");
        assert_eq!(
            (truncate.op, truncate.old, truncate.new),
            (Op::Truncate, None, None)
        );

        assert_eq!(
            outbox("merge", None, None).change(),
            Err(ConvertError::Op("merge".into()))
        );
        assert!(matches!(
            outbox("insert", None, Some("{")).change(),
            Err(ConvertError::Json(_))
        ));
    }

    #[test]
    fn trigger_arguments_are_read_back_from_tgargs() {
        // encode(tgargs, 'hex') of ('id', 'car_id'), of no arguments, and of ('').
        assert_eq!(
            parse_tgargs("6964006361725f696400"),
            Some(vec!["id".to_owned(), "car_id".to_owned()])
        );
        assert_eq!(parse_tgargs(""), Some(vec![]));
        assert_eq!(parse_tgargs("00"), Some(vec![String::new()]));
        assert_eq!(parse_tgargs("zz"), None);
        let columns: BTreeSet<String> = ["id".to_owned(), "it's".to_owned()].into();
        assert_eq!(trigger_args(&columns), "'id', 'it''s'");
    }

    #[test]
    fn a_trigger_is_out_of_date_when_disabled_foreign_or_recording_other_columns() {
        let wanted = ["car_id".to_owned(), "id".to_owned()];
        let good = Installed {
            enabled: "O".into(),
            args: wanted.to_vec(),
            our_function: true,
        };
        assert_eq!(good.problem(&wanted), None);
        let always = Installed {
            enabled: "A".into(),
            ..good.clone()
        };
        assert_eq!(always.problem(&wanted), None);
        let fewer = Installed {
            args: vec!["id".into()],
            ..good.clone()
        };
        assert_eq!(
            fewer.problem(&wanted).as_deref(),
            Some("records columns (id), the rules read (car_id, id)")
        );
        for enabled in ["D", "R"] {
            let off = Installed {
                enabled: enabled.into(),
                ..good.clone()
            };
            assert_eq!(off.problem(&wanted).as_deref(), Some("is disabled"));
        }
        let foreign = Installed {
            our_function: false,
            ..good
        };
        assert!(foreign.problem(&wanted).is_some());
    }

    #[test]
    fn the_trigger_function_records_only_its_arguments_columns() {
        let body = function_body("\"ext\"");
        assert!(body.contains("coalesce(TG_ARGV, '{}')"));
        assert_eq!(body.matches("\"ext\".slice(\"ext\".hstore(").count(), 4);
        assert!(!body.contains("hstore_to_jsonb(\"ext\".hstore("));
    }

    #[test]
    fn the_reader_lock_key_is_fixed() {
        // Documented for operators who look at pg_locks; it must never change between versions.
        assert_eq!(READER_LOCK, fnv1a(b"invalidator.outbox"));
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325_u64 as i64);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c_u64 as i64);
    }

    #[test]
    fn invalidate_rows_carry_a_json_string() {
        let row = |new: Option<&str>| OutboxRow {
            op: "invalidate".into(),
            ..outbox("invalidate", None, new)
        };
        assert_eq!(
            row(Some(r#""user:\\*""#)).given(),
            Ok(r"user:\*".to_owned())
        );
        assert_eq!(row(Some("1")).given(), Err(ConvertError::NotAString));
        assert_eq!(row(None).given(), Err(ConvertError::NotAString));
    }

    #[test]
    fn confirmation_releases_whole_rounds_in_order() {
        let mut progress = Progress::default();
        progress.in_flight.push_back((Lsn(1), vec![5, 3]));
        progress.in_flight.push_back((Lsn(2), vec![4]));
        progress.confirm(Lsn(0));
        assert!(progress.done.is_empty());
        assert_eq!(progress.held(), vec![5, 3, 4]);
        progress.confirm(Lsn(1));
        assert_eq!(progress.done, vec![5, 3]);
        assert_eq!(progress.held_len(), 3);
        progress.confirm(Lsn(2));
        assert_eq!(progress.done, vec![5, 3, 4]);
        assert!(progress.in_flight.is_empty());
    }
}
