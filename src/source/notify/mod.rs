//! Notify mode: triggers copy every row change of the watched tables into an outbox table and
//! `pg_notify` a channel; [`OutboxSource`] reads the outbox in rounds for the pipeline and
//! deletes the rows once Redis confirmed their invalidations. For hosts without logical
//! replication.
//!
//! ```text
//!  INSERT/UPDATE/DELETE/TRUNCATE ─trigger─▶ invalidator.outbox ─(NOTIFY is a hint; poll 1 s)─┐
//!                                                                                          ▼
//!   DELETE ... WHERE id = ANY(confirmed ids) ◀── acknowledge(round) ◀── pipeline ◀── Step{round}
//! ```
//!
//! The outbox is the truth: a row stays until its deletes are confirmed, so a crash re-reads it
//! (at least once). Outbox ids are assigned before commit, so a smaller id can become visible
//! after a larger one was read: nothing is ever deleted or skipped by range, only by id. Each
//! read round is one transaction whose position is the round's sequence number (rounds are
//! queued in order, so the confirmed position says which rounds are done).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};

use crate::change::{Lsn, Manual, Step, TableName};
use crate::config::PostgresConfig;
use crate::error::{Classify, Verdict};
use crate::rules::RuleSet;
use crate::source::Source;
use crate::source::connect::ConnectError;
use crate::source::setup::notify::partition_plan;
use crate::source::setup::{self, SetupError, Sql};
use crate::telemetry::{self, Health};

mod row;

pub use row::{ConvertError, OutboxRow, row_from_json};

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

/// A closed connection reconnects; a deaf one stops, since only another URL helps.
impl Classify for NotifyError {
    fn verdict(&self) -> Verdict {
        match self {
            NotifyError::Postgres(e) => e.verdict(),
            NotifyError::Closed => Verdict::Reconnect,
            NotifyError::Connect(e) => e.verdict(),
            NotifyError::Deaf(_) => Verdict::Stop,
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
    /// Of the rounds in flight that read every row their snapshot saw (not a full one), the
    /// WAL position every change before which they cover (see [`OutboxSource::read_round`]).
    positions: VecDeque<(Lsn, Lsn)>,
    /// Outbox ids whose deletes Redis confirmed, to delete from the outbox.
    done: Vec<i64>,
    /// Sequence number of the last round read.
    last_round: u64,
}

impl Progress {
    /// Moves the rounds up to `confirmed` to `done`; returns the WAL position the last of them
    /// covers, if it has one.
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
        let mut covered = None;
        while let Some(&(round, wal)) = self.positions.front() {
            if round > confirmed {
                break;
            }
            covered = Some(wal);
            self.positions.pop_front();
        }
        covered
    }

    /// Forgets the rounds after `queued`, the last one the pipeline queued: they went with a
    /// connection before they were queued, so holding their ids would keep them from being read
    /// again, and every later round from being confirmed.
    fn forget_unqueued(&mut self, queued: Lsn) {
        self.in_flight.retain(|(round, _)| *round <= queued);
        self.positions.retain(|(round, _)| *round <= queued);
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
    if let Ok((config, _)) = crate::endpoint::parse_url(&postgres.url)
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

/// How the outbox is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// The one reader: holds the reader lock, deletes the rows Redis confirmed, and adds the
    /// truncate triggers of partitions attached after setup.
    Owner,
    /// `run --dry-run`: the rows after this id, none deleted, nothing changed.
    Preview(i64),
}

/// The outbox as a [`Source`]: each read round of rows is one transaction whose position is
/// the round's sequence number (rounds are queued in order, so the confirmed position says
/// which rounds are done); acknowledging deletes the rows of the confirmed rounds by id.
pub struct OutboxSource<'a> {
    /// The listening session (`LISTEN` must have been issued on it).
    client: &'a tokio_postgres::Client,
    /// A hint per notification; closed when the session ends.
    hints: &'a mut mpsc::UnboundedReceiver<()>,
    /// The rules in effect, for the truncate triggers of partitions.
    rules: watch::Receiver<Arc<RuleSet>>,
    /// What is kept across reconnects.
    progress: &'a mut Progress,
    /// Owner or preview.
    reading: Reading,
    /// Reads without a notification, and (owner) measures the outbox.
    poll: tokio::time::Interval,
    /// Looks for partitions attached after setup: at start (the first tick) and while running.
    partitions: tokio::time::Interval,
    /// A round is due: a hint, a poll, or a full round before (a backlog).
    read_now: bool,
    /// A look for partitions is due.
    repair_due: bool,
    /// Steps of the last round (or repair) not yet given.
    steps: VecDeque<Step>,
    /// Where the WAL position up to which every change is invalidated is published, for
    /// `/wait`.
    health: &'a Health,
}

impl<'a> OutboxSource<'a> {
    /// The reader that holds the reader lock on `client`'s session; `rules` says which tables'
    /// partitions need truncate triggers. `queued` is the position of the last transaction the
    /// pipeline queued: the rounds read after it went with the previous connection before they
    /// were queued, so their rows are read again.
    pub fn owner(
        client: &'a tokio_postgres::Client,
        hints: &'a mut mpsc::UnboundedReceiver<()>,
        rules: watch::Receiver<Arc<RuleSet>>,
        progress: &'a mut Progress,
        queued: Lsn,
        health: &'a Health,
    ) -> OutboxSource<'a> {
        progress.forget_unqueued(queued);
        OutboxSource::new(client, hints, rules, progress, Reading::Owner, health)
    }

    /// `run --dry-run`: reads the outbox rows newer than the newest one now, deletes none and
    /// takes no reader lock, so a real reader keeps working beside it; rows that reader deletes
    /// first, and rows whose ids are below one already read (ids are assigned before commit),
    /// are not shown.
    pub async fn preview(
        client: &'a tokio_postgres::Client,
        hints: &'a mut mpsc::UnboundedReceiver<()>,
        rules: watch::Receiver<Arc<RuleSet>>,
        progress: &'a mut Progress,
        health: &'a Health,
    ) -> Result<OutboxSource<'a>, NotifyError> {
        let newest: i64 = client
            .query_one("SELECT coalesce(max(id), 0) FROM invalidator.outbox", &[])
            .await?
            .try_get(0)?;
        tracing::info!(
            after_id = newest,
            "dry run: reading outbox rows newer than the newest one now; deleting none"
        );
        let preview = Reading::Preview(newest);
        Ok(OutboxSource::new(
            client, hints, rules, progress, preview, health,
        ))
    }

    fn new(
        client: &'a tokio_postgres::Client,
        hints: &'a mut mpsc::UnboundedReceiver<()>,
        rules: watch::Receiver<Arc<RuleSet>>,
        progress: &'a mut Progress,
        reading: Reading,
        health: &'a Health,
    ) -> OutboxSource<'a> {
        let interval = |period| {
            let mut interval = tokio::time::interval(period);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            interval
        };
        OutboxSource {
            client,
            hints,
            rules,
            progress,
            reading,
            poll: interval(POLL),
            partitions: interval(crate::source::drift::CHECK_EVERY),
            read_now: true,
            repair_due: false,
            steps: VecDeque::new(),
            health,
        }
    }

    /// Whether another round may be read: the ids held are excluded from each read, and that
    /// list must stay short.
    fn may_read(&self) -> bool {
        self.reading != Reading::Owner || self.progress.held_len() < MAX_HELD
    }

    /// Reads one round of outbox rows not held already and turns it into steps; returns
    /// whether the round was full.
    ///
    /// For `/wait`, the WAL position P is read in a statement before the round's. An
    /// application that read X = `pg_current_wal_lsn()` after its commit returned, with X < P,
    /// read it before P was read, so its commit is visible to the round's snapshot: once a
    /// round that read every row it saw is confirmed, every change before P is invalidated, and
    /// P - 1 is what `/wait` may report.
    async fn read_round(&mut self) -> Result<bool, NotifyError> {
        let wal: String = self
            .client
            .query_one("SELECT pg_current_wal_lsn()::text", &[])
            .await?
            .get(0);
        let before = wal
            .parse::<Lsn>()
            .map_or(Lsn(0), |p| Lsn(p.0.saturating_sub(1)));
        let columns = "SELECT id, table_schema, table_name, op, old::text, new::text, \
                       (extract(epoch FROM created_at) * 1000000)::bigint FROM invalidator.outbox";
        let rows = match self.reading {
            Reading::Owner => {
                let held = self.progress.held();
                let query = format!("{columns} WHERE id <> ALL($1) ORDER BY id LIMIT $2");
                self.client.query(&query, &[&held, &ROUND_ROWS]).await?
            }
            Reading::Preview(seen) => {
                let query = format!("{columns} WHERE id > $1 ORDER BY id LIMIT $2");
                self.client.query(&query, &[&seen, &ROUND_ROWS]).await?
            }
        };
        if rows.is_empty() {
            // Nothing in flight either: every change before P is invalidated.
            if self.progress.in_flight.is_empty() {
                self.health.acknowledge(before);
                // On an idle server P stands still, and an X equal to it is never passed:
                // while someone waits, a transaction with an xid writes a commit record, so
                // the next round's P is past it (at most one a poll).
                if self.health.has_waiters() {
                    self.client.batch_execute("SELECT txid_current()").await?;
                }
            }
            return Ok(false);
        }
        let full = rows.len() as i64 >= ROUND_ROWS;
        let ancestors = ancestors_of(self.client, &rows).await?;
        let rows = rows
            .iter()
            .map(OutboxRow::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        let first_time = rows.iter().map(|row| row.created_us).min().unwrap_or(0);
        self.progress.last_round += 1;
        let round = Lsn(self.progress.last_round);
        // The transaction boundary here is the round; even a round with nothing to delete is
        // queued, since its confirmation acknowledges its rows.
        self.steps.push_back(Step::Begin {
            commit_time_us: first_time,
            // Read through a snapshot that sees these commits, so every later one does too.
            xid: None,
        });
        for row in rows {
            self.steps.extend(row.steps(&ancestors));
        }
        self.steps.push_back(Step::Commit { position: round });
        match self.reading {
            Reading::Owner => {
                self.progress.in_flight.push_back((round, ids));
                if !full {
                    self.progress.positions.push_back((round, before));
                }
            }
            Reading::Preview(seen) => {
                self.reading = Reading::Preview(ids.last().copied().unwrap_or(seen));
            }
        }
        Ok(full)
    }

    /// Adds the TRUNCATE triggers [`partition_plan`] finds missing, then gives a transaction
    /// that deletes every key the rules of their tables can produce: a TRUNCATE of such a
    /// partition before its trigger existed was missed. Logged at error.
    async fn repair_partitions(&mut self) -> Result<(), SetupError> {
        let rules = self.rules.borrow().clone();
        let mut db = self.client;
        let repairs = partition_plan(&mut db, &rules).await?;
        if repairs.is_empty() {
            return Ok(());
        }
        let mut steps = vec![Step::Begin {
            commit_time_us: crate::change::unix_micros(),
            xid: None,
        }];
        for (table, action) in repairs {
            setup::apply(&mut db, std::slice::from_ref(&action)).await?;
            tracing::error!(table = %table, action = %action.why,
                "a partition lacked the truncate trigger (attached after setup): added it; a \
                 truncate of it until now was missed, so every key of the table's rules is \
                 deleted");
            steps.push(Step::Manual(Manual::Flush(table)));
        }
        // Acknowledges nothing by itself (round numbers start at 1); queued behind what was
        // read.
        steps.push(Step::Commit { position: Lsn(0) });
        self.steps.extend(steps);
        Ok(())
    }
}

impl Source for OutboxSource<'_> {
    type Error = NotifyError;

    async fn ready(&mut self) -> Result<bool, NotifyError> {
        loop {
            if !self.steps.is_empty() || self.repair_due || (self.read_now && self.may_read()) {
                return Ok(true);
            }
            tokio::select! {
                biased;
                hint = self.hints.recv() => {
                    if hint.is_none() {
                        return Err(NotifyError::Closed);
                    }
                    while self.hints.try_recv().is_ok() {}
                    self.read_now = true;
                }
                _ = self.poll.tick() => {
                    if self.reading == Reading::Owner {
                        // Measured here, not per round: count(*) on a long outbox costs.
                        measure(self.client).await;
                    }
                    self.read_now = true;
                }
                _ = self.partitions.tick(), if self.reading == Reading::Owner => {
                    self.repair_due = true;
                }
            }
        }
    }

    async fn step(&mut self) -> Result<Option<Step>, NotifyError> {
        if self.steps.is_empty() {
            if self.repair_due {
                self.repair_due = false;
                self.repair_partitions().await?;
            } else if self.read_now && self.may_read() {
                // A full round means a backlog: read the next one straight away.
                self.read_now = self.read_round().await?;
            }
        }
        Ok(self.steps.pop_front())
    }

    /// Deletes the rows of the rounds up to `position` from the outbox.
    async fn acknowledge(&mut self, position: Lsn) -> Result<(), NotifyError> {
        if self.reading != Reading::Owner {
            return Ok(());
        }
        if let Some(covered) = self.progress.confirm(position) {
            self.health.acknowledge(covered);
            // A round right after, so `/wait` learns a position past the commits just
            // confirmed without waiting for the poll.
            self.read_now = true;
        }
        if self.progress.done.is_empty() {
            return Ok(());
        }
        self.client
            .execute(
                "DELETE FROM invalidator.outbox WHERE id = ANY($1)",
                &[&self.progress.done],
            )
            .await?;
        self.progress.done.clear();
        Ok(())
    }
}

/// The partition ancestors of each table the outbox `rows` name (tables that are no partition
/// are left out): the row trigger of a partitioned table is cloned to its partitions, and a
/// trigger records the partition it fired on, so a change of a partition fires the rules of
/// each ancestor too. Read from today's catalog, once per round.
async fn ancestors_of(
    client: &tokio_postgres::Client,
    rows: &[tokio_postgres::Row],
) -> Result<HashMap<TableName, Arc<[TableName]>>, NotifyError> {
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
    Ok(out.into_iter().map(|(t, a)| (t, a.into())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Op, Value};
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

    #[test]
    fn rounds_never_queued_are_read_again_after_a_reconnect() {
        let mut progress = Progress::default();
        progress.in_flight.push_back((Lsn(1), vec![1]));
        progress.in_flight.push_back((Lsn(2), vec![2, 3]));
        progress.forget_unqueued(Lsn(1));
        assert_eq!(progress.held(), vec![1]);
        progress.confirm(Lsn(1));
        assert_eq!(progress.done, vec![1]);
        assert!(progress.in_flight.is_empty());
    }
}
