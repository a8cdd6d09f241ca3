//! The one place that wires source → rules → Redis → acknowledgement.
//!
//! Two tasks share a bounded queue of committed transactions:
//!
//! ```text
//!  source loop: WAL ─▶ Decoder ─▶ RuleSet::plan ─▶ Committed{end_lsn, keys, patterns} ─┐ bounded
//!       ▲                                                                               ▼ queue
//!       └── standby status (flush = confirmed) ◀── watch<Position> ◀── delete loop: merge, UNLINK/SCAN
//! ```
//!
//! The flush LSN is owned by the delete loop: it moves only after Redis confirmed every delete of
//! a transaction, and only forwards. The source loop only reports it. While the queue is full the
//! source loop stops reading WAL (backpressure) but keeps sending status updates, so the
//! walsender neither times out nor races ahead.
//!
//! Memory stays bounded whatever the size of a transaction: its keys are de-duplicated as they
//! are planned, and once it holds more than `pipeline.max_transaction_keys` of them they are
//! replaced by every pattern the rules of its tables can produce (each placeholder `*`), a
//! superset that never misses; from then on its rows are no longer planned one by one.

mod flights;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::FutureExt;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::{Change, Lsn, Op, TableName};
use crate::config::PipelineConfig;
use crate::pgoutput::{DecodeError, Decoder, Event, Message};
use crate::redis::DeleteStats;
use crate::reload::LiveRules;
use crate::rules::Invalidation;
use crate::source::invalidate::{self, MESSAGE_PREFIX};
use crate::source::replication::{ReplicationError, ReplicationMessage};
use crate::source::setup::SetupError;
use crate::telemetry::{self, Health};

/// Transactions that may wait between the source and the delete loop. Small on purpose: the WAL
/// is the buffer, and what is queued is not yet acknowledged.
pub const QUEUE_DEPTH: usize = 64;

/// A stream of WAL messages that accepts standby status updates: the replication connection,
/// or hand-built WAL in tests.
pub trait WalStream: Send {
    /// The next message; `None` when the server ended the stream. Must be cancel-safe.
    fn next(
        &mut self,
    ) -> impl Future<Output = Result<Option<ReplicationMessage>, ReplicationError>> + Send;

    /// Reports `flush` as the position written, flushed and applied: everything before it is
    /// done and the server may release it.
    fn send_status(
        &mut self,
        flush: Lsn,
    ) -> impl Future<Output = Result<(), ReplicationError>> + Send;
}

/// Says which tables a relation is a partition of, so that a change of a partition fires the
/// rules of its ancestors too: Postgres publishes each partition under its own name.
pub trait Ancestry: Send {
    /// The partition ancestors (nearest first, itself excluded) of the relation with oid
    /// `relation_id`, announced by a Relation message as `table`.
    fn ancestors(
        &mut self,
        relation_id: u32,
        table: &TableName,
    ) -> impl Future<Output = Result<Vec<TableName>, SetupError>> + Send;
}

/// Where invalidations go: Redis, or a recording stand-in in unit tests.
pub trait Sink: Send + 'static {
    /// Why a delete failed.
    type Error: std::error::Error + Send + 'static;

    /// Deletes the keys and everything matching the patterns.
    fn delete(
        &mut self,
        inv: &Invalidation,
    ) -> impl Future<Output = Result<DeleteStats, Self::Error>> + Send;

    /// Starts deleting and returns what finishes it, so the delete loop takes the next batch
    /// while this one's patterns are still being resolved (see [`crate::redis::Resolution`]);
    /// batches are confirmed in order as they finish. The default deletes everything here.
    fn start(
        &mut self,
        inv: &Invalidation,
    ) -> impl Future<Output = Result<Finish<Self::Error>, Self::Error>> + Send {
        async move {
            let stats = self.delete(inv).await?;
            Ok(Box::pin(std::future::ready(Ok(stats))) as Finish<Self::Error>)
        }
    }

    /// Checks that Redis answers, so readiness is right while no change flows.
    fn ping(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether retrying the failed call can succeed.
    fn is_transient(error: &Self::Error) -> bool;
}

/// The rest of a started delete (see [`Sink::start`]).
pub type Finish<E> = Pin<Box<dyn Future<Output = Result<DeleteStats, E>> + Send>>;

/// A confirmed position in one history of the server. `history` counts the times the sidecar
/// started over (a lost slot, a restore, a failover): an LSN of an earlier history says nothing
/// about the current server, whose WAL may not even reach it. Ordered by history, then LSN, so
/// "only forwards" and "the minimum of several targets" keep their meaning across a new history.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    /// The history the LSN belongs to.
    pub history: u64,
    /// The end LSN of the last transaction confirmed in it.
    pub lsn: Lsn,
}

/// The invalidations of one committed transaction, waiting for Redis.
#[derive(Debug)]
pub struct Committed {
    /// The history it was read in (see [`Position`]).
    pub history: u64,
    /// End LSN of the transaction: the flush position once its deletes are confirmed.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// What to delete.
    pub inv: Invalidation,
}

impl Committed {
    /// Where the confirmed position stands once its deletes are confirmed.
    pub fn position(&self) -> Position {
        Position {
            history: self.history,
            lsn: self.end_lsn,
        }
    }
}

/// Why the source loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The replication connection failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The catalog could not say which tables a relation is a partition of.
    #[error("reading the partitions of relation {relation_id}: {source}")]
    Ancestry {
        /// The relation's oid.
        relation_id: u32,
        /// Why.
        #[source]
        source: SetupError,
    },
    /// A WAL message could not be decoded; the stream restarts from the last acknowledged LSN.
    #[error("undecodable WAL message at {lsn}: {source}")]
    Decode {
        /// Start of the XLogData that held the message.
        lsn: Lsn,
        /// What was wrong with it.
        #[source]
        source: DecodeError,
    },
}

impl SourceError {
    /// Whether reconnecting can help. Undecodable messages are retried too: a reconnect rebuilds
    /// the relation cache, and what stays broken keeps the slot where it is rather than skip.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Replication(e) => e.is_transient(),
            SourceError::Ancestry { source, .. } => source.is_transient(),
            SourceError::Decode { .. } => true,
        }
    }
}

/// The handles the source loop shares with the delete loop.
pub struct Links {
    /// Where committed transactions go.
    pub queue: mpsc::Sender<Committed>,
    /// The confirmed position, advanced by the delete loop; closed when that loop stops.
    pub confirmed: watch::Receiver<Position>,
    /// Fires on shutdown: stop reading WAL.
    pub cancel: CancellationToken,
    /// End LSN of the last transaction handed to the queue; kept across reconnects because the
    /// queue outlives a connection.
    pub last_queued: Lsn,
    /// Highest flush position reported to Postgres, so reports never go backwards; start it at
    /// the slot's `confirmed_flush_lsn`.
    pub reported: Lsn,
    /// The history being read (see [`Position`]); transactions are queued in it.
    pub history: u64,
    /// The furthest WAL position this server has shown (its WAL end at connect, then what the
    /// stream sent): no report goes beyond it, whatever a bug elsewhere might compute.
    pub server_end: Lsn,
    /// Dry run: log what each transaction would delete (the delete loop deletes nothing).
    pub dry_run: bool,
    /// A backlog found at connect, reported in the log as it shrinks; see [`CatchUp`].
    pub catch_up: Option<CatchUp>,
    /// The configured prefixes manual invalidation may delete under, besides the rules' own
    /// (see [`invalidate::Allowed`]).
    pub invalidate_prefixes: Arc<[String]>,
}

impl Links {
    /// The confirmed LSN of the current history; `Lsn(0)` while only transactions of an earlier
    /// one are confirmed.
    pub fn confirmed_lsn(&self) -> Lsn {
        let confirmed = *self.confirmed.borrow();
        if confirmed.history == self.history {
            confirmed.lsn
        } else {
            Lsn(0)
        }
    }

    /// Starts a new history on a server whose WAL ends at `server_end`: the positions of the old
    /// one are forgotten, and what is still queued from it no longer moves the acknowledgement.
    pub fn new_history(&mut self, server_end: Lsn) {
        self.history += 1;
        self.reported = Lsn(0);
        self.last_queued = Lsn(0);
        self.server_end = server_end;
        self.catch_up = None;
    }
}

/// Backlogs smaller than this drain in well under a second and are not reported.
pub const BACKLOG_BYTES: u64 = 16 * 1024 * 1024;
/// How often progress through a backlog is logged.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Progress through the WAL that was waiting when streaming started: from the slot's confirmed
/// position to the server's WAL end at connect (what later commits add is not part of it).
/// Logged at info when it starts, every [`PROGRESS_EVERY`] with the bytes left, the rate and the
/// estimated time, and once when the acknowledged position passes its end.
#[derive(Debug)]
pub struct CatchUp {
    /// The server's WAL end at connect.
    target: Lsn,
    /// Where it started, for the summary.
    start: Lsn,
    /// When it started.
    began: std::time::Instant,
    /// The position and time of the last progress line (or the start).
    last: (Lsn, std::time::Instant),
}

impl CatchUp {
    /// Starts reporting when the backlog from `confirmed` to `server_end` is at least
    /// [`BACKLOG_BYTES`]; logs the first line.
    pub fn start(confirmed: Lsn, server_end: Lsn) -> Option<CatchUp> {
        let behind = server_end.0.saturating_sub(confirmed.0);
        if behind < BACKLOG_BYTES {
            return None;
        }
        tracing::info!(from = %confirmed, to = %server_end, bytes = behind,
            "catching up with a backlog of WAL");
        let now = std::time::Instant::now();
        Some(CatchUp {
            target: server_end,
            start: confirmed,
            began: now,
            last: (confirmed, now),
        })
    }

    /// Notes that `flush` is acknowledged; logs progress when due. `true` once caught up.
    fn observe(&mut self, flush: Lsn) -> bool {
        let now = std::time::Instant::now();
        if flush >= self.target {
            let seconds = now.duration_since(self.began).as_secs_f64();
            tracing::info!(lsn = %flush, bytes = self.target.0 - self.start.0,
                seconds = format_args!("{seconds:.1}"), "caught up with the backlog");
            return true;
        }
        let elapsed = now.duration_since(self.last.1);
        if elapsed >= PROGRESS_EVERY {
            let left = self.target.0 - flush.0;
            let rate = flush.0.saturating_sub(self.last.0.0) as f64 / elapsed.as_secs_f64();
            let eta = if rate > 0.0 {
                format!("{:.0} s", left as f64 / rate)
            } else {
                "unknown (not advancing)".to_owned()
            };
            tracing::info!(lsn = %flush, bytes_left = left,
                mib_per_second = format_args!("{:.1}", rate / (1024.0 * 1024.0)),
                eta = %eta, "catching up");
            self.last = (flush, now);
        }
        false
    }
}

/// State of the source loop that must survive between messages.
struct SourceState {
    /// The transaction being read, if one is open.
    open: Option<Open>,
    /// A committed transaction the queue had no room for yet.
    pending: Option<Committed>,
    /// Distinct keys and patterns past which a transaction falls back to its tables' patterns.
    max_transaction_keys: usize,
    /// The `changes_total` series met so far.
    counters: ChangeCounters,
    /// Dry run: log each transaction's invalidations at its commit.
    dry_run: bool,
    /// The partition ancestors of each partition announced on this stream, by its announced
    /// name: its changes fire their rules too (see [`Ancestry`]).
    ancestors: HashMap<TableName, Vec<TableName>>,
    /// The history transactions are queued in.
    history: u64,
    /// The configured prefixes manual invalidation may delete under, besides the rules' own.
    invalidate_prefixes: Arc<[String]>,
}

/// Handles on the `changes_total{table, op}` series, so counting a change costs a short search
/// rather than building label strings and looking them up in the registry.
#[derive(Default)]
struct ChangeCounters(Vec<(TableName, Op, metrics::Counter)>);

impl ChangeCounters {
    /// Counts one change of `op` to `table`.
    fn count(&mut self, table: &TableName, op: Op) {
        let found = self.0.iter().find(|(t, o, _)| *o == op && t == table);
        if let Some((_, _, counter)) = found {
            counter.increment(1);
            return;
        }
        let counter = metrics::counter!(
            telemetry::CHANGES_TOTAL,
            "table" => table.to_string(),
            "op" => op.as_str()
        );
        counter.increment(1);
        self.0.push((table.clone(), op, counter));
    }
}

/// A transaction being read: its invalidations so far, and what a fallback needs.
struct Open {
    /// What to delete once it commits (its end LSN is set at commit).
    committed: Committed,
    /// The tables with rules it has changed, in order of first change; few (at most the tables
    /// the rules name), so a linear search is the cheapest lookup.
    tables: Vec<TableName>,
    /// Row changes read, with or without rules.
    changes: u64,
    /// The number of distinct keys and patterns it held when it fell back to its tables'
    /// patterns; `None` while its keys are planned row by row.
    fell_back_at: Option<usize>,
    /// Keys and patterns given by hand with `invalidator.invalidate()`: kept apart, because the
    /// fallback to the tables' patterns does not cover them.
    given: Invalidation,
}

impl Open {
    /// Plans one change of a table and of each of its partition `ancestors` (as a change of
    /// that table): row by row while the transaction is small, then only the fallback patterns
    /// of each newly changed table.
    fn plan(
        &mut self,
        live: &mut LiveRules,
        change: &Change,
        ancestors: &[TableName],
        max_keys: usize,
    ) {
        self.changes += 1;
        for ancestor in ancestors {
            if live.rules().has_table(ancestor) {
                let mut copy = change.clone();
                copy.table.clone_from(ancestor);
                self.plan_table(live, &copy, max_keys);
            }
        }
        if live.rules().has_table(&change.table) {
            self.plan_table(live, change, max_keys);
        }
    }

    /// Deletes every key the rules of `table` (which has rules) can produce, whatever else
    /// the transaction holds: a table it counts as changed, so a later fallback keeps them.
    fn flush_table(&mut self, live: &LiveRules, table: TableName) {
        self.committed
            .inv
            .merge(live.rules().everything_for(&table));
        if !self.tables.contains(&table) {
            self.tables.push(table);
        }
    }

    /// Plans `change` for its table, which has rules.
    fn plan_table(&mut self, live: &mut LiveRules, change: &Change, max_keys: usize) {
        if !self.tables.contains(&change.table) {
            self.tables.push(change.table.clone());
            if self.fell_back_at.is_some() {
                self.committed
                    .inv
                    .merge(live.rules().everything_for(&change.table));
            }
        }
        if self.fell_back_at.is_some() {
            return;
        }
        live.plan(change, &mut self.committed.inv);
        let rules = live.rules();
        if self.committed.inv.len() > max_keys {
            self.fell_back_at = Some(self.committed.inv.len());
            // Every key held came from the rules of these tables, and each of those rules
            // rendered with `*` everywhere matches every key it can render for any row.
            let mut fallback = Invalidation::default();
            for table in &self.tables {
                fallback.merge(rules.everything_for(table));
            }
            self.committed.inv = fallback;
        }
    }

    /// Closes the transaction at `end_lsn`; a transaction that fell back is logged and counted.
    /// In a dry run, what it would delete is logged.
    fn commit(mut self, end_lsn: Lsn, max_keys: usize, dry_run: bool) -> Committed {
        self.committed.end_lsn = end_lsn;
        self.committed.inv.merge(std::mem::take(&mut self.given));
        if dry_run && !self.committed.inv.is_empty() {
            let tables = self
                .tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            crate::dry_run::log_would_delete(end_lsn, &tables, &self.committed.inv);
        }
        if let Some(keys) = self.fell_back_at {
            let tables = self
                .tables
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            tracing::warn!(
                lsn = %end_lsn,
                tables = %tables,
                changes = self.changes,
                keys,
                limit = max_keys,
                patterns = self.committed.inv.len(),
                "transaction exceeded pipeline.max_transaction_keys; invalidating every pattern \
                 of its tables' rules instead of its keys"
            );
            metrics::counter!(telemetry::TRANSACTION_FALLBACKS_TOTAL).increment(1);
        }
        self.committed
    }
}

/// Why the source loop returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEnd {
    /// The delete loop stopped (shutdown) and its last confirmed LSN was reported.
    DeleterStopped,
    /// The server ended the stream.
    StreamEnded,
}

/// Reads WAL, plans invalidations per transaction and queues them; reports the confirmed LSN
/// at least every `settings.status_interval`.
pub async fn run_source<S: WalStream>(
    stream: &mut S,
    decoder: &mut Decoder,
    ancestry: &mut impl Ancestry,
    rules: &mut LiveRules,
    links: &mut Links,
    settings: &PipelineConfig,
) -> Result<SourceEnd, SourceError> {
    let mut state = SourceState {
        open: None,
        pending: None,
        max_transaction_keys: settings.max_transaction_keys,
        counters: ChangeCounters::default(),
        dry_run: links.dry_run,
        ancestors: HashMap::new(),
        history: links.history,
        invalidate_prefixes: links.invalidate_prefixes.clone(),
    };
    // A handle of our own, so a reserved permit does not hold a borrow of `links`.
    let queue = links.queue.clone();
    let mut tick = tokio::time::interval(settings.status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reading = state.pending.is_none() && !links.cancel.is_cancelled();
        tokio::select! {
            biased;
            // Acknowledge first: it frees WAL on the server and is what the product promises.
            changed = links.confirmed.changed() => {
                let confirmed = links.confirmed_lsn();
                report(stream, links, confirmed).await?;
                if changed.is_err() {
                    // The delete loop has stopped (shutdown): that was the last ack.
                    return Ok(SourceEnd::DeleterStopped);
                }
            }
            _ = tick.tick() => {
                let confirmed = links.confirmed_lsn();
                report(stream, links, confirmed).await?;
            }
            permit = queue.reserve(), if state.pending.is_some() => {
                let Ok(permit) = permit else { return Ok(SourceEnd::DeleterStopped) };
                if let Some(committed) = state.pending.take() {
                    links.last_queued = links.last_queued.max(committed.end_lsn);
                    permit.send(committed);
                }
            }
            message = stream.next(), if reading => {
                let Some(message) = message? else { return Ok(SourceEnd::StreamEnded) };
                receive(stream, decoder, ancestry, rules, &mut state, links, message).await?;
                // Take what has already arrived before going back to `select!`: a backlog is
                // then read in large buffered reads without a wake-up per message. Bounded, so
                // acknowledgements and status updates are never held for long.
                for _ in 1..BURST {
                    if state.pending.is_some() || links.cancel.is_cancelled() {
                        break;
                    }
                    let Some(message) = stream.next().now_or_never() else { break };
                    let Some(message) = message? else { return Ok(SourceEnd::StreamEnded) };
                    receive(stream, decoder, ancestry, rules, &mut state, links, message).await?;
                }
            }
        }
    }
}

/// Messages handled per wake-up of the source loop at most, when more are already buffered.
const BURST: usize = 1024;

/// Handles one message from the server: plans WAL data, answers keepalives.
async fn receive<S: WalStream>(
    stream: &mut S,
    decoder: &mut Decoder,
    ancestry: &mut impl Ancestry,
    rules: &mut LiveRules,
    state: &mut SourceState,
    links: &mut Links,
    message: ReplicationMessage,
) -> Result<(), SourceError> {
    match message {
        ReplicationMessage::XLogData {
            wal_start,
            wal_end,
            data,
            ..
        } => {
            links.server_end = links.server_end.max(wal_start).max(wal_end);
            // A Relation message precedes the first change of a relation on a stream, and
            // comes again after its definition changed (attached, detached, renamed): the
            // moment to learn what it is a partition of.
            if data.first() == Some(&b'R')
                && let Ok(Message::Relation(relation)) = crate::pgoutput::decode(&data)
            {
                let table = TableName::new(&relation.namespace, &relation.name);
                let ancestors =
                    ancestry
                        .ancestors(relation.id, &table)
                        .await
                        .map_err(|source| SourceError::Ancestry {
                            relation_id: relation.id,
                            source,
                        })?;
                if ancestors.is_empty() {
                    state.ancestors.remove(&table);
                } else {
                    state.ancestors.insert(table, ancestors);
                }
            }
            apply(decoder, rules, state, &data).map_err(|source| {
                metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "decode").increment(1);
                SourceError::Decode {
                    lsn: wal_start,
                    source,
                }
            })
        }
        ReplicationMessage::Keepalive {
            wal_end,
            reply_requested,
            ..
        } => {
            links.server_end = links.server_end.max(wal_end);
            let confirmed = links.confirmed_lsn();
            let flush = idle_flush(state, links, confirmed, wal_end);
            metrics::gauge!(telemetry::REPLICATION_LAG_BYTES)
                .set(wal_end.0.saturating_sub(flush.0) as f64);
            if reply_requested || flush > links.reported {
                report(stream, links, flush).await?;
            }
            Ok(())
        }
    }
}

/// The position that can be acknowledged: the confirmed LSN, or, when nothing is open, queued
/// or unconfirmed, the server's position from a keepalive (no published change lies before it,
/// so the slot need not keep that WAL).
fn idle_flush(state: &SourceState, links: &Links, confirmed: Lsn, server: Lsn) -> Lsn {
    let idle = state.open.is_none() && state.pending.is_none() && links.last_queued <= confirmed;
    if idle {
        confirmed.max(server)
    } else {
        confirmed
    }
}

/// Sends `flush` (never less than reported before, never more than this server has shown: a
/// position it has not written would make its slot skip the changes up to there).
async fn report<S: WalStream>(
    stream: &mut S,
    links: &mut Links,
    flush: Lsn,
) -> Result<(), ReplicationError> {
    // A commit queued from this server's stream is something it wrote.
    let written = links.server_end.max(links.last_queued);
    let flush = flush.max(links.reported).min(written);
    stream.send_status(flush).await?;
    links.reported = flush;
    metrics::gauge!(telemetry::CONFIRMED_LSN).set(flush.0 as f64);
    if links.catch_up.as_mut().is_some_and(|c| c.observe(flush)) {
        links.catch_up = None;
    }
    Ok(())
}

/// Decodes one XLogData payload and plans its changes into the open transaction.
fn apply(
    decoder: &mut Decoder,
    rules: &mut LiveRules,
    state: &mut SourceState,
    data: &[u8],
) -> Result<(), DecodeError> {
    decoder.apply(data, |event| match event {
        Event::Begin { commit_time_us, .. } => {
            // Between transactions: the one place new rules may take over.
            rules.refresh();
            state.open = Some(Open {
                committed: Committed {
                    history: state.history,
                    end_lsn: Lsn(0),
                    commit_time_us,
                    inv: Invalidation::default(),
                },
                tables: Vec::new(),
                changes: 0,
                fell_back_at: None,
                given: Invalidation::default(),
            });
        }
        Event::Change(change)
            if change.table.schema == invalidate::SCHEMA
                && change.table.name == invalidate::REQUESTS =>
        {
            // Written only by invalidator.invalidate() (SECURITY DEFINER) and by the table's
            // owner: the proof that the writer may invalidate by hand. The delete of the row in
            // the same transaction carries nothing.
            match invalidate::request(&change) {
                Some(invalidate::Request::Given(text, literal)) => {
                    let allowed =
                        invalidate::Allowed::new(rules.rules(), &state.invalidate_prefixes);
                    given(state, &allowed, text, literal, change.commit_lsn);
                }
                Some(invalidate::Request::Repair(table)) => {
                    repaired(state, rules, table, change.commit_lsn);
                }
                None => {}
            }
        }
        Event::Change(change) => {
            state.counters.count(&change.table, change.op);
            if let Some(open) = state.open.as_mut() {
                let ancestors = state
                    .ancestors
                    .get(&change.table)
                    .map_or(&[][..], Vec::as_slice);
                open.plan(rules, &change, ancestors, state.max_transaction_keys);
            }
        }
        Event::Commit { end_lsn, .. } => {
            if let Some(open) = state.open.take() {
                rules.count();
                let committed = open.commit(end_lsn, state.max_transaction_keys, state.dry_run);
                state.pending = Some(committed);
            }
        }
        // Any role can emit one, even in a read-only transaction: it proves nothing.
        Event::Message { prefix, .. } if prefix == MESSAGE_PREFIX => {
            invalidate::Ignored::EmittedMessage.record();
        }
        Event::Message { .. } => {}
    })
}

/// A key or pattern given by hand with `invalidator.invalidate()` (or one literal key with
/// `invalidate_key()`): the insert of a row of `invalidator.requests`, which joins the
/// invalidation of its transaction, so it is deleted and acknowledged with that transaction,
/// atomically with the writes beside it; a rolled-back transaction never reaches the WAL
/// stream, so it invalidates nothing. What lies outside `allowed` is ignored and counted.
fn given(
    state: &mut SourceState,
    allowed: &invalidate::Allowed,
    text: &str,
    literal: bool,
    lsn: Lsn,
) {
    let Some(open) = state.open.as_mut() else {
        return;
    };
    let inv = &mut open.given;
    allowed.insert(inv, text, literal);
    if inv.len() > state.max_transaction_keys {
        // Nothing narrower covers arbitrary keys given by hand, and nothing wider may go.
        tracing::warn!(%lsn, keys = inv.len(), limit = state.max_transaction_keys,
            "transaction gave more keys by hand than pipeline.max_transaction_keys; deleting \
             every key under the allowed prefixes instead");
        *inv = allowed.everything();
    }
}

/// A publication repair's request, written in the transaction that added `table` back to the
/// publication: every key its rules can produce joins that transaction's invalidation, so the
/// changes it missed while unpublished (all committed before) are covered once that transaction
/// is confirmed, and a crash before then reads the request again. Its patterns are the rules'
/// own, so the manual allow-list does not apply; a table without rules deletes nothing.
fn repaired(state: &mut SourceState, rules: &mut LiveRules, table: Option<TableName>, lsn: Lsn) {
    let Some(open) = state.open.as_mut() else {
        return;
    };
    match table {
        Some(table) if rules.rules().has_table(&table) => {
            tracing::info!(%lsn, table = %table,
                "the publication was repaired for this table: deleting every key its rules can \
                 produce");
            open.flush_table(rules, table);
        }
        _ => invalidate::Ignored::NotARuleTable.record(),
    }
}

/// Takes committed transactions from the queue, deletes their keys in batches and advances the
/// confirmed LSN. Transient Redis errors are retried forever with capped, jittered exponential
/// backoff; on shutdown the batch in flight is finished (unless Redis is failing) and the loop
/// returns. A permanent Redis error (bad credentials) is returned.
pub async fn run_deleter<K: Sink>(
    sink: K,
    queue: mpsc::Receiver<Committed>,
    confirmed: watch::Sender<Position>,
    health: Arc<Health>,
    max_batch_keys: usize,
    cancel: CancellationToken,
) -> Result<(), K::Error> {
    let reporting = Reporting::single(health);
    deliver(sink, queue, confirmed, &reporting, max_batch_keys, cancel).await
}

/// A committed transaction as a delete loop receives it: owned with one Redis target, shared
/// (`Arc`) when several targets receive the same transactions.
pub trait Queued: Send + 'static {
    /// The transaction.
    fn committed(&self) -> &Committed;

    /// Its invalidation, moved out when this is the only holder and copied otherwise.
    fn into_invalidation(self) -> Invalidation;
}

impl Queued for Committed {
    fn committed(&self) -> &Committed {
        self
    }

    fn into_invalidation(self) -> Invalidation {
        self.inv
    }
}

impl Queued for Arc<Committed> {
    fn committed(&self) -> &Committed {
        self
    }

    fn into_invalidation(self) -> Invalidation {
        Arc::try_unwrap(self).map_or_else(|shared| shared.inv.clone(), |owned| owned.inv)
    }
}

/// One batch of a delete loop: a single transaction as received (nothing copied), or several
/// merged.
enum Batch<T> {
    /// The first transaction alone.
    One(T),
    /// Several transactions' invalidations merged.
    Merged(Invalidation),
}

impl<T: Queued> Batch<T> {
    /// What the batch deletes.
    fn inv(&self) -> &Invalidation {
        match self {
            Batch::One(first) => &first.committed().inv,
            Batch::Merged(inv) => inv,
        }
    }

    /// Adds `next` to the batch.
    fn add(&mut self, next: T) {
        let mut inv = match std::mem::replace(self, Batch::Merged(Invalidation::default())) {
            Batch::One(first) => first.into_invalidation(),
            Batch::Merged(inv) => inv,
        };
        inv.merge(next.into_invalidation());
        *self = Batch::Merged(inv);
    }
}

/// Where a delete loop reports: readiness and lag in [`Health`], and the delete-side metrics,
/// labelled `target` when there are several Redis targets.
pub struct Reporting {
    /// Readiness and lag.
    health: Arc<Health>,
    /// The target's name when there are several; `None` for the one `[redis] url`.
    target: Option<String>,
    /// [`telemetry::KEYS_DELETED_TOTAL`].
    keys_deleted: metrics::Counter,
    /// [`telemetry::PATTERNS_TOTAL`].
    patterns: metrics::Counter,
    /// [`telemetry::SCAN_CALLS_TOTAL`].
    scan_calls: metrics::Counter,
    /// [`telemetry::ERRORS_TOTAL`] of kind `redis`.
    errors: metrics::Counter,
    /// [`telemetry::TRANSACTIONS_TOTAL`].
    transactions: metrics::Counter,
    /// [`telemetry::BATCH_KEYS`].
    batch_keys: metrics::Histogram,
    /// [`telemetry::COMMIT_TO_DELETE_SECONDS`].
    delay: metrics::Histogram,
}

impl Reporting {
    /// For the one Redis target: unlabelled series, readiness as `redis: ...`.
    pub fn single(health: Arc<Health>) -> Reporting {
        Reporting {
            health,
            target: None,
            keys_deleted: metrics::counter!(telemetry::KEYS_DELETED_TOTAL),
            patterns: metrics::counter!(telemetry::PATTERNS_TOTAL),
            scan_calls: metrics::counter!(telemetry::SCAN_CALLS_TOTAL),
            errors: metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "redis"),
            transactions: metrics::counter!(telemetry::TRANSACTIONS_TOTAL),
            batch_keys: metrics::histogram!(telemetry::BATCH_KEYS),
            delay: metrics::histogram!(telemetry::COMMIT_TO_DELETE_SECONDS),
        }
    }

    /// For the target `name`, one of several: series labelled `target`, readiness as
    /// `redis <name>: ...`.
    pub fn target(health: Arc<Health>, name: &str) -> Reporting {
        let label = || ("target", name.to_owned());
        let counters = Reporting {
            health,
            target: Some(name.to_owned()),
            keys_deleted: metrics::counter!(telemetry::KEYS_DELETED_TOTAL, &[label()]),
            patterns: metrics::counter!(telemetry::PATTERNS_TOTAL, &[label()]),
            scan_calls: metrics::counter!(telemetry::SCAN_CALLS_TOTAL, &[label()]),
            errors: metrics::counter!(
                telemetry::ERRORS_TOTAL,
                &[("kind", "redis".to_owned()), label()]
            ),
            transactions: metrics::counter!(telemetry::TRANSACTIONS_TOTAL, &[label()]),
            batch_keys: metrics::histogram!(telemetry::BATCH_KEYS, &[label()]),
            delay: metrics::histogram!(telemetry::COMMIT_TO_DELETE_SECONDS, &[label()]),
        };
        // Series that exist from the start, so dashboards see zeros, not gaps.
        for counter in [
            &counters.keys_deleted,
            &counters.patterns,
            &counters.scan_calls,
            &counters.transactions,
        ] {
            counter.increment(0);
        }
        counters
    }

    /// Records why this target's Redis is not usable (`None`: it answers).
    pub fn set_redis(&self, reason: Option<String>) {
        match &self.target {
            None => self.health.set_redis(reason),
            Some(name) => self.health.set_target(name, reason),
        }
    }

    /// Records the commit time of this target's oldest unconfirmed transaction.
    fn set_oldest_unconfirmed(&self, commit_time_us: Option<i64>) {
        match &self.target {
            None => self.health.set_oldest_unconfirmed(commit_time_us),
            Some(name) => self
                .health
                .set_target_oldest_unconfirmed(name, commit_time_us),
        }
    }
}

/// [`run_deleter`] for any queue item and any [`Reporting`]: the loop of one Redis target.
pub async fn deliver<K: Sink, T: Queued>(
    mut sink: K,
    mut queue: mpsc::Receiver<T>,
    confirmed: watch::Sender<Position>,
    report: &Reporting,
    max_batch_keys: usize,
    cancel: CancellationToken,
) -> Result<(), K::Error> {
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flights = flights::Flights::new(max_batch_keys);
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => return flights.land_all(&mut sink, &confirmed, report).await,
            outcome = flights.landed() => {
                let empty = queue.is_empty();
                if !flights.land(outcome, &mut sink, &confirmed, report, empty, &cancel).await? {
                    return Ok(());
                }
                continue;
            }
            next = queue.recv(), if !flights.is_full() => match next {
                Some(committed) => committed,
                None => return Ok(()),
            },
            _ = ping.tick() => {
                match sink.ping().await {
                    Ok(()) => report.set_redis(None),
                    Err(e) if K::is_transient(&e) => report.set_redis(Some(telemetry::chain(&e))),
                    Err(e) => return Err(e),
                }
                continue;
            }
        };
        // The queue is in commit order: the first is the oldest unconfirmed transaction.
        let head = first.committed();
        if flights.is_empty() {
            report.set_oldest_unconfirmed(Some(head.commit_time_us));
        }
        // Latency first: the batch is what is already waiting, never a wait for more.
        let mut end = head.position();
        let mut commits = vec![(head.end_lsn, head.commit_time_us)];
        let mut batch = Batch::One(first);
        while batch.inv().len() < max_batch_keys {
            match queue.try_recv() {
                Ok(next) => {
                    let c = next.committed();
                    end = end.max(c.position());
                    commits.push((c.end_lsn, c.commit_time_us));
                    batch.add(next);
                }
                Err(_) => break,
            }
        }
        if !batch.inv().is_empty() {
            report.batch_keys.record(batch.inv().len() as f64);
        }
        let Some(finish) = delete_with_retry(&mut sink, batch.inv(), report, &cancel).await? else {
            return Ok(());
        };
        flights.push(flights::Flight {
            end,
            commits,
            batch,
            finish,
        });
    }
}

/// Starts the delete until Redis takes it. `Ok(None)`: shutdown came while Redis was failing,
/// so nothing may be acknowledged.
async fn delete_with_retry<K: Sink>(
    sink: &mut K,
    inv: &Invalidation,
    report: &Reporting,
    cancel: &CancellationToken,
) -> Result<Option<Finish<K::Error>>, K::Error> {
    if inv.is_empty() {
        return Ok(Some(Box::pin(std::future::ready(Ok(
            DeleteStats::default(),
        )))));
    }
    let mut delays = backoff();
    loop {
        match sink.start(inv).await {
            Ok(finish) => {
                report.set_redis(None);
                return Ok(Some(finish));
            }
            Err(e) if K::is_transient(&e) => {
                report.errors.increment(1);
                let error = telemetry::chain(&e);
                report.set_redis(Some(error.clone()));
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(%error, target = report.target.as_deref(), retry_in = ?delay,
                    "redis delete failed; not acknowledging");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(delay) => {}
                    // A long backoff should not outlast the outage: retry as soon as Redis
                    // answers again.
                    _ = answers_again(sink) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Returns once a `PING` succeeds, trying every quarter second.
async fn answers_again<K: Sink>(sink: &mut K) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if sink.ping().await.is_ok() {
            return;
        }
    }
}

/// Capped exponential backoff with jitter, forever: transient failures never give up.
pub fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Now, in microseconds since the Unix epoch.
pub fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::pgoutput::{
        Begin, Column, Commit, Delete, Insert, LogicalMessage, Message, OldTuple, Relation,
        TupleValue, encode,
    };
    use crate::rules::RuleSet;

    /// No relation is a partition of another.
    struct NoPartitions;

    impl Ancestry for NoPartitions {
        async fn ancestors(&mut self, _: u32, _: &TableName) -> Result<Vec<TableName>, SetupError> {
            Ok(Vec::new())
        }
    }

    /// WAL fed by the test; messages read and statuses recorded for inspection.
    struct ScriptedWal {
        incoming: mpsc::UnboundedReceiver<ReplicationMessage>,
        read: Arc<AtomicUsize>,
        statuses: Arc<Mutex<Vec<Lsn>>>,
    }

    impl WalStream for ScriptedWal {
        async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
            let message = self.incoming.recv().await;
            self.read.fetch_add(1, Ordering::SeqCst);
            Ok(message)
        }

        async fn send_status(&mut self, flush: Lsn) -> Result<(), ReplicationError> {
            self.statuses.lock().unwrap().push(flush);
            Ok(())
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("redis is down")]
    struct Down;

    /// Records what it deletes; fails while `down` is set, and waits while a test holds
    /// `slow` for writing (a Redis that is busy, not failing).
    #[derive(Clone, Default)]
    struct RecordingSink {
        down: Arc<AtomicBool>,
        slow: Arc<tokio::sync::RwLock<()>>,
        calls: Arc<AtomicUsize>,
        deleted: Arc<Mutex<Vec<Invalidation>>>,
    }

    impl Sink for RecordingSink {
        type Error = Down;

        async fn delete(&mut self, inv: &Invalidation) -> Result<DeleteStats, Down> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let _busy = self.slow.read().await;
            if self.down.load(Ordering::SeqCst) {
                return Err(Down);
            }
            self.deleted.lock().unwrap().push(inv.clone());
            Ok(DeleteStats::default())
        }

        async fn ping(&mut self) -> Result<(), Down> {
            if self.down.load(Ordering::SeqCst) {
                return Err(Down);
            }
            Ok(())
        }

        fn is_transient(_: &Down) -> bool {
            true
        }
    }

    fn xlog(message: Message) -> ReplicationMessage {
        ReplicationMessage::XLogData {
            wal_start: Lsn(0),
            wal_end: Lsn(0),
            server_time_us: 0,
            data: Bytes::from(encode(&message)),
        }
    }

    fn keepalive(at: u64) -> ReplicationMessage {
        ReplicationMessage::Keepalive {
            wal_end: Lsn(at),
            server_time_us: 0,
            reply_requested: true,
        }
    }

    fn relation() -> Message {
        relation_of(1, "items")
    }

    /// A table `public.<name>` with one text column `id`.
    fn relation_of(id: u32, name: &str) -> Message {
        Message::Relation(Relation {
            id,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'f',
            columns: vec![Column {
                flags: 1,
                name: "id".into(),
                type_oid: 25,
                type_modifier: -1,
            }],
        })
    }

    /// The messages of one committed transaction inserting `ids`, ending at `end`.
    fn transaction(ids: &[&str], end: u64) -> Vec<ReplicationMessage> {
        let mut out = vec![xlog(Message::Begin(Begin {
            final_lsn: Lsn(end - 1),
            timestamp: 0,
            xid: end as u32,
        }))];
        for id in ids {
            out.push(xlog(Message::Insert(Insert {
                relation_id: 1,
                new: vec![TupleValue::Text((*id).into())],
            })));
        }
        out.push(xlog(Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(end - 1),
            end_lsn: Lsn(end),
            timestamp: 0,
        })));
        out
    }

    struct Harness {
        wal: mpsc::UnboundedSender<ReplicationMessage>,
        read: Arc<AtomicUsize>,
        statuses: Arc<Mutex<Vec<Lsn>>>,
        cancel: CancellationToken,
        deleter: tokio::task::JoinHandle<()>,
        source: tokio::task::JoinHandle<Result<SourceEnd, SourceError>>,
    }

    const ITEM_RULES: &str = "[[rule]]\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

    /// Settings for tests: a long status interval (time is paused) and `max_transaction_keys`.
    fn settings(max_transaction_keys: usize) -> PipelineConfig {
        PipelineConfig {
            max_batch_keys: 10_000,
            status_interval: Duration::from_secs(1),
            max_transaction_keys,
        }
    }

    impl Harness {
        fn start(sink: RecordingSink) -> Harness {
            Harness::with(sink, ITEM_RULES, settings(100_000))
        }

        /// Starts both loops with `rules` and `settings`; relation 1 (`items`) is announced.
        fn with(sink: RecordingSink, rules: &str, settings: PipelineConfig) -> Harness {
            let rules = RuleSet::compile(&[("rules.toml".to_owned(), rules.to_owned())])
                .expect("rules compile");
            Harness::live(sink, LiveRules::fixed(Arc::new(rules)), settings)
        }

        /// Starts both loops with `rules` as the source loop's rules.
        fn live(sink: RecordingSink, mut rules: LiveRules, settings: PipelineConfig) -> Harness {
            let (wal_tx, wal_rx) = mpsc::unbounded_channel();
            let statuses = Arc::new(Mutex::new(Vec::new()));
            let read = Arc::new(AtomicUsize::new(0));
            let mut stream = ScriptedWal {
                incoming: wal_rx,
                read: read.clone(),
                statuses: statuses.clone(),
            };
            let (queue_tx, queue_rx) = mpsc::channel(QUEUE_DEPTH);
            let (confirmed_tx, confirmed_rx) = watch::channel(Position::default());
            let cancel = CancellationToken::new();
            let mut links = Links {
                queue: queue_tx,
                confirmed: confirmed_rx,
                cancel: cancel.clone(),
                last_queued: Lsn(0),
                reported: Lsn(0),
                history: 0,
                server_end: Lsn(0),
                dry_run: false,
                catch_up: None,
                invalidate_prefixes: ["user:", "weird", "k:"].map(str::to_owned).into(),
            };
            let deleter = {
                let (sink, cancel, settings) = (sink.clone(), cancel.clone(), settings.clone());
                tokio::spawn(async move {
                    let health = Health::new();
                    let max = settings.max_batch_keys;
                    let _ = run_deleter(sink, queue_rx, confirmed_tx, health, max, cancel).await;
                })
            };
            let source = tokio::spawn(async move {
                let mut decoder = Decoder::default();
                let mut ancestry = NoPartitions;
                run_source(
                    &mut stream,
                    &mut decoder,
                    &mut ancestry,
                    &mut rules,
                    &mut links,
                    &settings,
                )
                .await
            });
            wal_tx.send(xlog(relation())).unwrap();
            Harness {
                wal: wal_tx,
                read,
                statuses,
                cancel,
                deleter,
                source,
            }
        }

        fn send(&self, messages: Vec<ReplicationMessage>) {
            for m in messages {
                self.wal.send(m).unwrap();
            }
        }

        fn highest_ack(&self) -> Lsn {
            self.statuses
                .lock()
                .unwrap()
                .iter()
                .copied()
                .max()
                .unwrap_or_default()
        }

        async fn wait_for_ack(&self, lsn: u64) {
            for _ in 0..10_000 {
                if self.highest_ack() >= Lsn(lsn) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!(
                "no acknowledgement of {lsn:#x}; saw {:?}",
                self.statuses.lock().unwrap()
            );
        }

        async fn stop(self) -> Vec<Lsn> {
            self.cancel.cancel();
            self.deleter.await.unwrap();
            let end = self.source.await.unwrap();
            assert_eq!(end.expect("source loop"), SourceEnd::DeleterStopped);
            let statuses = self.statuses.lock().unwrap().clone();
            assert!(
                statuses.windows(2).all(|w| w[0] <= w[1]),
                "acks went backwards: {statuses:?}"
            );
            statuses
        }
    }

    #[tokio::test(start_paused = true)]
    async fn ack_never_passes_an_unconfirmed_commit() {
        let sink = RecordingSink::default();
        sink.down.store(true, Ordering::SeqCst);
        let h = Harness::start(sink.clone());
        h.send(transaction(&["1"], 0x100));
        h.send(transaction(&["2"], 0x200));
        h.send(vec![keepalive(0x300)]);
        // Let backoff retries and status ticks run for a long (virtual) while.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(h.highest_ack(), Lsn(0), "acknowledged while Redis was down");
        assert!(sink.deleted.lock().unwrap().is_empty());

        sink.down.store(false, Ordering::SeqCst);
        h.wait_for_ack(0x200).await;
        let deleted: Vec<String> = sink
            .deleted
            .lock()
            .unwrap()
            .iter()
            .flat_map(|inv| inv.keys.iter().cloned())
            .collect();
        assert!(deleted.contains(&"item:1".to_owned()) && deleted.contains(&"item:2".to_owned()));
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_position_is_acknowledged_only_when_nothing_is_in_flight() {
        let h = Harness::start(RecordingSink::default());
        // A transaction that has begun but not committed holds the ack below the keepalive.
        let mut open = transaction(&["1"], 0x100);
        let commit = open.pop().unwrap();
        h.send(open);
        h.send(vec![keepalive(0x500)]);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(h.highest_ack() < Lsn(0x100), "{:?}", h.highest_ack());

        h.send(vec![commit]);
        h.wait_for_ack(0x100).await;
        h.send(vec![keepalive(0x500)]);
        h.wait_for_ack(0x500).await;
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_acknowledges_what_was_deleted() {
        let sink = RecordingSink::default();
        let h = Harness::start(sink.clone());
        h.send(transaction(&["1", "2"], 0x100));
        h.wait_for_ack(0x100).await;
        let statuses = h.stop().await;
        assert_eq!(statuses.last(), Some(&Lsn(0x100)));
        assert_eq!(sink.deleted.lock().unwrap().len(), 1);
    }

    /// Lets every other task run until none can make progress without time passing.
    async fn settle() {
        for _ in 0..1_000 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_stream_deletes_each_transaction_at_once_without_waiting() {
        let sink = RecordingSink::default();
        let h = Harness::start(sink.clone());
        let start = tokio::time::Instant::now();
        for end in [0x100, 0x200] {
            h.send(transaction(&["1"], end));
            // Only yields: a batch that waited on a timer would never be deleted here, because
            // paused time stands still while tasks are runnable.
            settle().await;
            assert_eq!(h.highest_ack(), Lsn(end));
        }
        assert_eq!(tokio::time::Instant::now(), start, "no delay while quiet");
        assert_eq!(sink.deleted.lock().unwrap().len(), 2, "one batch each");
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_backlog_is_merged_into_batches_of_distinct_keys_up_to_the_bound() {
        let sink = RecordingSink::default();
        let max_batch_keys = 6;
        let settings = PipelineConfig {
            max_batch_keys,
            ..settings(100_000)
        };
        let h = Harness::with(sink.clone(), ITEM_RULES, settings);
        // Redis is busy with the first transaction while eight more commit behind it.
        let busy = sink.slow.write().await;
        h.send(transaction(&["0"], 0x100));
        settle().await;
        assert_eq!(sink.calls.load(Ordering::SeqCst), 1);
        for i in 1..=8u64 {
            // Each transaction shares a key with the one before it.
            let ids = [(i - 1).to_string(), i.to_string()];
            h.send(transaction(&[&ids[0], &ids[1]], 0x100 * (i + 1)));
        }
        settle().await;
        drop(busy);
        h.wait_for_ack(0x900).await;

        let batches: Vec<Vec<String>> = sink
            .deleted
            .lock()
            .unwrap()
            .iter()
            .map(|inv| {
                let mut keys: Vec<String> = inv.keys.iter().cloned().collect();
                keys.sort();
                keys
            })
            .collect();
        assert_eq!(batches[0], ["item:0"]);
        // The backlog went out in a few batches, not eight; a batch takes whole transactions
        // until it holds `max_batch_keys`, so it ends past the bound by less than one of them.
        assert!(batches.len() < 5, "{batches:?}");
        assert!(
            batches.iter().all(|b| b.len() < max_batch_keys + 2),
            "{batches:?}"
        );
        let mut all: Vec<String> = batches[1..].concat();
        all.sort();
        let expected: Vec<String> = {
            let mut keys: Vec<String> = (0..=8).map(|i| format!("item:{i}")).collect();
            keys.sort();
            keys
        };
        // Duplicates within a batch are gone; only a key shared across a batch boundary repeats.
        all.dedup();
        assert_eq!(all, expected);
        h.stop().await;
    }

    /// A logical decoding message with `prefix` and `content`.
    fn emitted(prefix: &str, content: &[u8], transactional: bool, lsn: u64) -> ReplicationMessage {
        xlog(Message::Logical(LogicalMessage {
            flags: if transactional {
                LogicalMessage::TRANSACTIONAL
            } else {
                0
            },
            lsn: Lsn(lsn),
            prefix: prefix.into(),
            content: content.to_vec(),
        }))
    }

    fn set(items: &[&str]) -> std::collections::HashSet<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    /// `invalidator.requests` as relation 9: `id`, `key_or_pattern`, `literal`.
    fn requests_relation() -> ReplicationMessage {
        let column = |name: &str, type_oid| Column {
            flags: 0,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        xlog(Message::Relation(Relation {
            id: 9,
            namespace: "invalidator".into(),
            name: "requests".into(),
            replica_identity: b'd',
            columns: vec![
                column("id", 20),
                column("key_or_pattern", 25),
                column("literal", 16),
            ],
        }))
    }

    /// What `invalidator.invalidate()` (or `invalidate_key()` when `literal`) writes: the insert
    /// of a request row, then its delete.
    fn requested(id: u32, text: &str, literal: bool) -> [ReplicationMessage; 2] {
        let flag = if literal { "t" } else { "f" };
        [
            xlog(Message::Insert(Insert {
                relation_id: 9,
                new: vec![
                    TupleValue::Text(id.to_string()),
                    TupleValue::Text(text.to_owned()),
                    TupleValue::Text(flag.into()),
                ],
            })),
            xlog(Message::Delete(Delete {
                relation_id: 9,
                old: OldTuple::Key(vec![
                    TupleValue::Text(id.to_string()),
                    TupleValue::Null,
                    TupleValue::Null,
                ]),
            })),
        ]
    }

    /// `invalidator.invalidate()` inside a transaction: its keys are deleted in the same batch
    /// as the transaction's rows and acknowledged with it, never before its commit; what lies
    /// outside the allowed prefixes, and a logical decoding message, delete nothing.
    #[tokio::test(start_paused = true)]
    async fn an_invalidate_request_joins_its_transaction_under_the_allowed_prefixes() {
        let sink = RecordingSink::default();
        let h = Harness::start(sink.clone());
        let mut messages = transaction(&["1"], 0x200);
        let commit = messages.pop().unwrap();
        messages.push(requests_relation());
        messages.extend(requested(1, "user:42", false));
        messages.extend(requested(2, "user:*:feed", false));
        messages.extend(requested(3, "weird\\*key", false));
        messages.extend(requested(4, "user:[x]", true));
        messages.extend(requested(5, "other:1", false));
        messages.extend(requested(6, "*", false));
        messages.extend([
            emitted("invalidator", b"user:43", true, 0x150),
            emitted("someone-else", b"not:ours", true, 0x180),
        ]);
        h.send(messages);
        settle().await;
        assert_eq!(h.highest_ack(), Lsn(0), "acknowledged before the commit");
        assert!(sink.deleted.lock().unwrap().is_empty());
        h.send(vec![commit]);
        h.wait_for_ack(0x200).await;
        h.stop().await;
        let deleted = sink.deleted.lock().unwrap().clone();
        assert_eq!(deleted.len(), 1, "{deleted:?}");
        assert_eq!(
            deleted[0].keys,
            set(&["item:1", "user:42", "weird*key", "user:[x]"])
        );
        assert_eq!(deleted[0].patterns, set(&["user:*:feed"]));
    }

    /// A publication repair's request row (`invalidator.requests` as a current `setup` makes
    /// it, relation 10): every key of its table's rules joins its transaction, allow-list or
    /// not; a table without rules, or text that names no table, deletes nothing.
    #[tokio::test(start_paused = true)]
    async fn a_repair_request_deletes_every_key_of_its_table_with_its_transaction() {
        let sink = RecordingSink::default();
        let h = Harness::start(sink.clone());
        let mut messages = transaction(&["1"], 0x200);
        let commit = messages.pop().unwrap();
        let column = |name: &str, type_oid| Column {
            flags: 0,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        messages.push(xlog(Message::Relation(Relation {
            id: 10,
            namespace: "invalidator".into(),
            name: "requests".into(),
            replica_identity: b'd',
            columns: vec![
                column("id", 20),
                column("key_or_pattern", 25),
                column("literal", 16),
                column("repair", 25),
            ],
        })));
        for (id, table) in [(1, "public.items"), (2, "public.other"), (3, "a.b.c")] {
            messages.push(xlog(Message::Insert(Insert {
                relation_id: 10,
                new: vec![
                    TupleValue::Text(id.to_string()),
                    TupleValue::Text(String::new()),
                    TupleValue::Text("f".into()),
                    TupleValue::Text(table.into()),
                ],
            })));
        }
        h.send(messages);
        settle().await;
        assert!(sink.deleted.lock().unwrap().is_empty());
        h.send(vec![commit]);
        h.wait_for_ack(0x200).await;
        h.stop().await;
        let deleted = sink.deleted.lock().unwrap().clone();
        assert_eq!(deleted.len(), 1, "{deleted:?}");
        assert_eq!(deleted[0].keys, set(&["item:1"]));
        assert_eq!(deleted[0].patterns, set(&["item:*"]));
    }

    /// Reloaded rules take over at the next transaction: a transaction open when they arrive is
    /// planned by the old rules to its commit, never by a mix.
    #[tokio::test(start_paused = true)]
    async fn new_rules_take_over_between_transactions_never_inside_one() {
        let compile = |text: &str| {
            Arc::new(
                RuleSet::compile(&[("rules.toml".to_owned(), text.to_owned())])
                    .expect("rules compile"),
            )
        };
        let (updates, rx) = watch::channel(compile(ITEM_RULES));
        let sink = RecordingSink::default();
        let h = Harness::live(sink.clone(), LiveRules::watching(rx), settings(100_000));
        let mut messages = transaction(&["1", "2"], 0x100);
        let commit = messages.pop().unwrap();
        let second = messages.pop().unwrap();
        h.send(messages);
        settle().await;
        updates.send_replace(compile(
            "[[rule]]\ntable = \"items\"\nkeys = [\"new:{id}\"]\n",
        ));
        h.send(vec![second, commit]);
        h.wait_for_ack(0x100).await;
        h.send(transaction(&["3"], 0x200));
        h.wait_for_ack(0x200).await;
        h.stop().await;
        let deleted = sink.deleted.lock().unwrap().clone();
        assert_eq!(deleted.len(), 2, "{deleted:?}");
        assert_eq!(deleted[0].keys, set(&["item:1", "item:2"]));
        assert_eq!(deleted[1].keys, set(&["new:3"]));
    }

    /// A logical decoding message with our prefix, which any role can emit, deletes nothing,
    /// inside a transaction or outside one.
    #[tokio::test(start_paused = true)]
    async fn an_emitted_message_deletes_nothing() {
        let sink = RecordingSink::default();
        let h = Harness::start(sink.clone());
        h.send(vec![emitted("invalidator", b"user:7", false, 0x180)]);
        let mut messages = transaction(&["1"], 0x200);
        let commit = messages.pop().unwrap();
        messages.push(emitted("invalidator", b"user:8", true, 0x190));
        messages.push(commit);
        h.send(messages);
        h.wait_for_ack(0x200).await;
        h.stop().await;
        let deleted = sink.deleted.lock().unwrap().clone();
        assert_eq!(deleted.len(), 1, "{deleted:?}");
        assert_eq!(deleted[0].keys, set(&["item:1"]));
    }

    /// Keys given by hand survive the fallback to the tables' patterns, which cannot cover them;
    /// past the limit themselves, they become a pattern for each allowed prefix, never `*`.
    #[tokio::test(start_paused = true)]
    async fn keys_given_by_hand_survive_the_fallback_and_are_bounded_too() {
        let sink = RecordingSink::default();
        let h = Harness::with(sink.clone(), ITEM_RULES, settings(3));
        let ids: Vec<String> = (0..10).map(|i| i.to_string()).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let mut messages = transaction(&ids, 0x200);
        let commit = messages.pop().unwrap();
        messages.push(requests_relation());
        messages.extend(requested(1, "user:1", false));
        messages.push(commit);
        h.send(messages);
        h.wait_for_ack(0x200).await;

        let mut messages = transaction(&[], 0x300);
        let commit = messages.pop().unwrap();
        for i in 0..5 {
            messages.extend(requested(10 + i, &format!("k:{i}"), false));
        }
        messages.push(commit);
        h.send(messages);
        h.wait_for_ack(0x300).await;
        h.stop().await;
        let deleted = sink.deleted.lock().unwrap().clone();
        assert_eq!(deleted[0].keys, set(&["user:1"]));
        assert_eq!(deleted[0].patterns, set(&["item:*"]));
        assert!(deleted[1].keys.is_empty());
        assert_eq!(
            deleted[1].patterns,
            set(&["item:*", "k:*", "user:*", "weird*"])
        );
    }

    /// An insert of one row with `id` into relation `relation`.
    fn insert(relation: u32, id: &str) -> ReplicationMessage {
        xlog(Message::Insert(Insert {
            relation_id: relation,
            new: vec![TupleValue::Text(id.into())],
        }))
    }

    /// Wraps `changes` in a transaction ending at `end`.
    fn wrapped(changes: Vec<ReplicationMessage>, end: u64) -> Vec<ReplicationMessage> {
        let mut out = transaction(&[], end);
        let commit = out.pop().unwrap();
        out.extend(changes);
        out.push(commit);
        out
    }

    const FALLBACK_RULES: &str = r#"
[[rule]]
table = "items"
keys = ["item:{id}", "item:{id}:*", "items:all"]

[[rule]]
table = "tags"
on = ["insert"]
keys = ["tag:{id}"]

[[rule]]
table = "notes"
keys = ["note:{id|upper}"]
"#;

    #[tokio::test(start_paused = true)]
    async fn a_transaction_past_max_transaction_keys_deletes_its_tables_patterns() {
        let sink = RecordingSink::default();
        let h = Harness::with(sink.clone(), FALLBACK_RULES, settings(10));
        h.send(vec![
            xlog(relation_of(2, "tags")),
            xlog(relation_of(3, "notes")),
            xlog(relation_of(4, "logs")),
        ]);
        // A table changed before the limit, the one that crosses it (values that look like
        // globs included), one already covered, one first changed after it, one without rules.
        let mut changes = vec![insert(2, "t1")];
        let ids: Vec<String> = (0..50)
            .map(|i| format!("{i}"))
            .chain(["*".into(), "[x]".into(), "a\\b".into(), "?".into()])
            .collect();
        changes.extend(ids.iter().map(|id| insert(1, id)));
        changes.extend([insert(2, "t2"), insert(3, "n1"), insert(4, "l1")]);
        h.send(wrapped(changes.clone(), 0x100));
        h.wait_for_ack(0x100).await;

        // The next transaction is small again: planned row by row.
        h.send(wrapped(vec![insert(1, "next")], 0x200));
        h.wait_for_ack(0x200).await;
        h.stop().await;

        let deleted = sink.deleted.lock().unwrap().clone();
        assert_eq!(deleted.len(), 2, "{deleted:?}");
        let fallback = &deleted[0];
        let set = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        assert_eq!(fallback.keys, set(&["items:all"]));
        assert_eq!(
            fallback.patterns,
            set(&["item:*", "item:*:*", "tag:*", "note:*"])
        );
        assert_eq!(
            deleted[1].keys,
            set(&["item:next", "items:all"]),
            "the fallback must not outlive its transaction"
        );

        // Never fewer deletions than row-by-row planning: every key those rows render is
        // deleted, by name or by a pattern that matches it.
        let rules = RuleSet::compile(&[("rules.toml".to_owned(), FALLBACK_RULES.to_owned())])
            .expect("rules compile");
        let mut decoder = Decoder::default();
        let mut planned = Invalidation::default();
        let relations = [
            relation(),
            relation_of(2, "tags"),
            relation_of(3, "notes"),
            relation_of(4, "logs"),
        ];
        let messages = relations
            .into_iter()
            .map(xlog)
            .chain(wrapped(changes, 0x100));
        for message in messages {
            let ReplicationMessage::XLogData { data, .. } = message else {
                unreachable!()
            };
            decoder
                .apply(&data, |event| {
                    if let Event::Change(change) = event {
                        rules.plan(&change, &mut planned);
                    }
                })
                .expect("decodes");
        }
        let covered = |key: &str| {
            fallback.keys.contains(key)
                || fallback
                    .patterns
                    .iter()
                    .any(|p| crate::rules::glob::matches(p.as_bytes(), key.as_bytes()))
        };
        assert!(planned.keys.len() > 50, "{planned:?}");
        for key in &planned.keys {
            assert!(
                covered(key),
                "{key} would have been deleted but is not covered"
            );
        }
        // The rows' patterns are covered too: a key each one matches (its escapes as the bytes
        // they stand for, each `*` as some text) is matched by the fallback.
        for pattern in &planned.patterns {
            let example = instance(pattern);
            assert!(
                crate::rules::glob::matches(pattern.as_bytes(), example.as_bytes()),
                "{example:?} should match {pattern:?}"
            );
            assert!(
                covered(&example),
                "{example} (from {pattern}) is not covered"
            );
        }
    }

    /// A key that `pattern` (made of text, `\` escapes and `*`) matches.
    fn instance(pattern: &str) -> String {
        let mut out = String::new();
        let mut chars = pattern.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => out.extend(chars.next()),
                '*' => out.push_str("any"),
                c => out.push(c),
            }
        }
        out
    }

    /// Garbage in the WAL: stop with a decode error (the caller reconnects from the last
    /// acknowledged LSN), never panic, never acknowledge the transaction it was part of.
    #[tokio::test(start_paused = true)]
    async fn hostile_wal_is_an_error_and_never_acknowledges_past_it() {
        let unknown_relation = Message::Insert(Insert {
            relation_id: 99,
            new: vec![TupleValue::Text("1".into())],
        });
        let mut truncated = encode(&Message::Insert(Insert {
            relation_id: 1,
            new: vec![TupleValue::Text("12345".into())],
        }));
        truncated.truncate(truncated.len() - 2);
        let hostile: Vec<(&str, Vec<u8>)> = vec![
            ("empty", Vec::new()),
            ("unknown tag", b"Z\x00\x01".to_vec()),
            ("truncated insert", truncated),
            ("unknown relation", encode(&unknown_relation)),
        ];
        for (what, bytes) in hostile {
            let h = Harness::start(RecordingSink::default());
            h.send(transaction(&["1"], 0x100));
            h.wait_for_ack(0x100).await;
            let mut open = transaction(&["2"], 0x200);
            let commit = open.pop().unwrap();
            h.send(open);
            h.send(vec![
                ReplicationMessage::XLogData {
                    wal_start: Lsn(0x180),
                    wal_end: Lsn(0x180),
                    server_time_us: 0,
                    data: Bytes::from(bytes),
                },
                commit,
                keepalive(0x300),
            ]);
            let end = h.source.await.unwrap();
            match end {
                Err(e @ SourceError::Decode { .. }) => {
                    assert!(e.is_transient(), "{what}: a decode error must reconnect");
                    assert!(e.to_string().contains("0/180"), "{what}: {e}");
                }
                other => panic!("{what}: expected a decode error, got {other:?}"),
            }
            let acked = h.statuses.lock().unwrap().iter().copied().max();
            assert_eq!(
                acked,
                Some(Lsn(0x100)),
                "{what}: acknowledged past the bad message"
            );
            h.cancel.cancel();
            h.deleter.await.unwrap();
        }
    }

    /// While Redis is down, reading stops once the queue is full (the WAL stays on the server),
    /// status updates keep flowing so the walsender does not time out, and nothing is lost.
    #[tokio::test(start_paused = true)]
    async fn reading_stops_while_redis_is_down_but_status_updates_continue() {
        let sink = RecordingSink::default();
        sink.down.store(true, Ordering::SeqCst);
        let h = Harness::start(sink.clone());
        let transactions = 10 * QUEUE_DEPTH as u64;
        for t in 1..=transactions {
            h.send(transaction(&[&t.to_string()], t * 0x100));
        }
        tokio::time::sleep(Duration::from_secs(60)).await;
        let (read_before, statuses_before) = (
            h.read.load(Ordering::SeqCst),
            h.statuses.lock().unwrap().len(),
        );
        tokio::time::sleep(Duration::from_secs(60)).await;
        // The queue, the batch the delete loop retries, and one transaction waiting for room are
        // all that is held; the rest stays in the WAL.
        let read = h.read.load(Ordering::SeqCst);
        assert_eq!(read, read_before, "kept reading while Redis was down");
        assert!(
            read < 1 + 3 * transactions as usize,
            "read everything: {read}"
        );
        assert!(
            h.statuses.lock().unwrap().len() > statuses_before,
            "no status updates while blocked"
        );
        assert_eq!(h.highest_ack(), Lsn(0));

        sink.down.store(false, Ordering::SeqCst);
        h.wait_for_ack(transactions * 0x100).await;
        let deleted: usize = sink
            .deleted
            .lock()
            .unwrap()
            .iter()
            .map(|inv| inv.keys.len())
            .sum();
        assert_eq!(deleted as u64, transactions);
        h.stop().await;
    }
}
