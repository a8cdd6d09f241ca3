//! The one source loop: whatever the source, it plans each transaction's steps with the rules
//! in effect, bounds what a transaction may hold, queues it for the delete loop and tells the
//! source what Redis confirmed.
//!
//! Memory stays bounded whatever the size of a transaction: its keys are de-duplicated as they
//! are planned, and once it holds more than `pipeline.max_transaction_keys` of them they are
//! replaced by every pattern the rules of its tables can produce (each placeholder `*`), a
//! superset that never misses; from then on its rows are no longer planned one by one.
//!
//! A large transaction may arrive streamed, in blocks, before it commits (PostgreSQL 14+): its
//! keys are collected block by block under the same bound, those of each subtransaction in a
//! set of their own, so that the abort of a subtransaction drops exactly what its rows planned
//! (the same key planned by a row that stays is in that row's set too); an abort of the whole
//! transaction drops everything, and its commit queues it like any other. Blocks of several
//! transactions may alternate, with whole transactions between them.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::FutureExt;

use super::{Committed, Links};
use crate::change::{Change, Lsn, Manual, Op, Step, TableName};
use crate::config::PipelineConfig;
use crate::reload::LiveRules;
use crate::rules::Invalidation;
use crate::source::Source;
use crate::source::invalidate;
use crate::telemetry;

/// State of the source loop that must survive between steps.
struct SourceState {
    /// The transaction being read, if one is open.
    open: Option<Open>,
    /// Streamed transactions not committed yet, by top-level xid: what their blocks planned.
    streams: HashMap<u32, Open>,
    /// The top-level xid of the streamed block being read, if one is.
    block: Option<u32>,
    /// A committed transaction the queue had no room for yet.
    pending: Option<Committed>,
    /// Distinct keys and patterns past which a transaction falls back to its tables' patterns.
    max_transaction_keys: usize,
    /// The `changes_total` series met so far.
    counters: ChangeCounters,
    /// The highest position handed to [`Source::acknowledge`] on this connection.
    acknowledged: Lsn,
    /// The history transactions are queued in.
    history: u64,
    /// The configured prefixes manual invalidation may delete under, besides the rules' own.
    invalidate_prefixes: Arc<[String]>,
}

impl SourceState {
    /// The transaction the steps being read belong to: the streamed one of the block being
    /// read, or the open one.
    fn current(&mut self) -> Option<&mut Open> {
        match self.block {
            Some(xid) => self.streams.get_mut(&xid),
            None => self.open.as_mut(),
        }
    }
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
    /// What to delete once it commits (its end LSN is set at commit), and the tables with
    /// rules it has changed, in order of first change; few (at most the tables the rules name),
    /// so a linear search is the cheapest lookup.
    committed: Committed,
    /// Row changes read, with or without rules.
    changes: u64,
    /// The number of distinct keys and patterns it held when it fell back to its tables'
    /// patterns; `None` while its keys are planned row by row.
    fell_back_at: Option<usize>,
    /// Keys and patterns given by hand with `invalidator.invalidate()`: kept apart, because the
    /// fallback to the tables' patterns does not cover them. Kept when a subtransaction of a
    /// streamed transaction aborts: deleting too much is allowed, missing is not.
    given: Invalidation,
    /// What the rows of each subtransaction of a streamed transaction planned, apart from
    /// `committed.inv` (the top-level rows'), so that its abort drops only that; empty after a
    /// fallback, whose patterns stay whatever aborts.
    subs: HashMap<u32, Invalidation>,
    /// The keys and patterns in `subs`, together.
    sub_keys: usize,
    /// The subtransaction whose rows are being planned; `None` for the top-level transaction.
    sub: Option<u32>,
}

impl Open {
    /// A transaction of `history` committed at `commit_time_us`, with nothing planned yet.
    fn new(history: u64, commit_time_us: i64, xid: Option<u32>) -> Open {
        Open {
            committed: Committed {
                history,
                end_lsn: Lsn(0),
                commit_time_us,
                xid,
                inv: Invalidation::default(),
                tables: Vec::new(),
            },
            changes: 0,
            fell_back_at: None,
            given: Invalidation::default(),
            subs: HashMap::new(),
            sub_keys: 0,
            sub: None,
        }
    }

    /// Drops what the rows of the aborted subtransaction `xid` planned.
    fn abort_sub(&mut self, xid: u32) {
        if let Some(inv) = self.subs.remove(&xid) {
            self.sub_keys -= inv.len();
        }
    }

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
        if !self.committed.tables.contains(&table) {
            self.committed.tables.push(table);
        }
    }

    /// Plans `change` for its table, which has rules.
    fn plan_table(&mut self, live: &mut LiveRules, change: &Change, max_keys: usize) {
        if !self.committed.tables.contains(&change.table) {
            self.committed.tables.push(change.table.clone());
            if self.fell_back_at.is_some() {
                self.committed
                    .inv
                    .merge(live.rules().everything_for(&change.table));
            }
        }
        if self.fell_back_at.is_some() {
            return;
        }
        match self.sub {
            Some(xid) => {
                let inv = self.subs.entry(xid).or_default();
                let before = inv.len();
                live.plan(change, inv);
                self.sub_keys += inv.len() - before;
            }
            None => live.plan(change, &mut self.committed.inv),
        }
        let rules = live.rules();
        let held = self.committed.inv.len() + self.sub_keys;
        if held > max_keys {
            self.fell_back_at = Some(held);
            self.subs.clear();
            self.sub_keys = 0;
            // Every key held came from the rules of these tables, and each of those rules
            // rendered with `*` everywhere matches every key it can render for any row.
            let mut fallback = Invalidation::default();
            for table in &self.committed.tables {
                fallback.merge(rules.everything_for(table));
            }
            self.committed.inv = fallback;
        }
    }

    /// Closes the transaction at `end_lsn`; a transaction that fell back is logged and counted.
    fn commit(mut self, end_lsn: Lsn, max_keys: usize) -> Committed {
        self.committed.end_lsn = end_lsn;
        self.committed.inv.merge(std::mem::take(&mut self.given));
        for (_, inv) in self.subs.drain() {
            self.committed.inv.merge(inv);
        }
        if let Some(keys) = self.fell_back_at {
            let tables = self
                .committed
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

/// Reads the source, plans invalidations per transaction and queues them; tells the source the
/// confirmed position as it moves and at least every `settings.status_interval`.
pub async fn run_source<S: Source>(
    source: &mut S,
    rules: &mut LiveRules,
    links: &mut Links,
    settings: &PipelineConfig,
) -> Result<SourceEnd, S::Error> {
    let mut state = SourceState {
        open: None,
        streams: HashMap::new(),
        block: None,
        pending: None,
        max_transaction_keys: settings.max_transaction_keys,
        counters: ChangeCounters::default(),
        acknowledged: Lsn(0),
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
            // Acknowledge first: it frees WAL (or outbox rows) and is what the product promises.
            changed = links.confirmed.changed() => {
                acknowledge(source, &mut state, links.confirmed_lsn()).await?;
                if changed.is_err() {
                    // The delete loop has stopped (shutdown): that was the last ack.
                    return Ok(SourceEnd::DeleterStopped);
                }
            }
            _ = tick.tick() => acknowledge(source, &mut state, links.confirmed_lsn()).await?,
            permit = queue.reserve(), if state.pending.is_some() => {
                let Ok(permit) = permit else { return Ok(SourceEnd::DeleterStopped) };
                if let Some(committed) = state.pending.take() {
                    links.last_queued = links.last_queued.max(committed.end_lsn);
                    permit.send(committed);
                }
            }
            ready = source.ready(), if reading => {
                if !ready? {
                    return Ok(SourceEnd::StreamEnded);
                }
                take(source, rules, &mut state, links).await?;
                // Take what has already arrived before going back to `select!`: a backlog is
                // then read in large buffered reads without a wake-up per message. Bounded, so
                // acknowledgements and status updates are never held for long.
                for _ in 1..BURST {
                    if state.pending.is_some() || links.cancel.is_cancelled() {
                        break;
                    }
                    let Some(ready) = source.ready().now_or_never() else { break };
                    if !ready? {
                        return Ok(SourceEnd::StreamEnded);
                    }
                    take(source, rules, &mut state, links).await?;
                }
            }
        }
    }
}

/// Wake-ups of the source handled at most at once, when more input is already buffered.
const BURST: usize = 1024;

/// Tells the source that `position` is confirmed.
async fn acknowledge<S: Source>(
    source: &mut S,
    state: &mut SourceState,
    position: Lsn,
) -> Result<(), S::Error> {
    source.acknowledge(position).await?;
    state.acknowledged = state.acknowledged.max(position);
    Ok(())
}

/// Handles the steps that have arrived, until a committed transaction waits for room.
async fn take<S: Source>(
    source: &mut S,
    rules: &mut LiveRules,
    state: &mut SourceState,
    links: &Links,
) -> Result<(), S::Error> {
    while state.pending.is_none() {
        let Some(step) = source.step().await? else {
            return Ok(());
        };
        match step {
            Step::Begin {
                commit_time_us,
                xid,
            } => {
                // Between transactions: the one place new rules may take over, unless a
                // streamed transaction is half read (its rows would be planned by two rule sets).
                if state.streams.is_empty() {
                    rules.refresh();
                }
                state.open = Some(Open::new(state.history, commit_time_us, xid));
            }
            Step::Change { change, ancestors } => {
                state.counters.count(&change.table, change.op);
                let max_keys = state.max_transaction_keys;
                if let Some(open) = state.current() {
                    open.plan(rules, &change, &ancestors, max_keys);
                }
            }
            Step::StreamStart { xid, first } => {
                let history = state.history;
                let open = state.streams.entry(xid).or_insert_with(|| {
                    let mut open = Open::new(history, 0, Some(xid));
                    if !first {
                        // The server starts a streamed transaction over with its first block
                        // on every connection, so this cannot happen; if it did, what the
                        // blocks not seen planned is unknown.
                        tracing::warn!(
                            xid,
                            "a streamed transaction began with a later block; \
                            deleting every key the rules can produce at its commit"
                        );
                        open.given.merge(rules.rules().everything());
                    }
                    open
                });
                open.sub = None;
                state.block = Some(xid);
            }
            Step::Subtransaction { xid } => {
                if let Some(top) = state.block
                    && let Some(open) = state.streams.get_mut(&top)
                {
                    open.sub = (xid != top).then_some(xid);
                }
            }
            Step::StreamStop => state.block = None,
            Step::StreamAbort { xid, subxid } => {
                if xid == subxid {
                    state.streams.remove(&xid);
                } else if let Some(open) = state.streams.get_mut(&xid) {
                    open.abort_sub(subxid);
                }
            }
            Step::StreamCommit {
                xid,
                position,
                commit_time_us,
            } => {
                let mut open = state
                    .streams
                    .remove(&xid)
                    .unwrap_or_else(|| Open::new(state.history, commit_time_us, Some(xid)));
                open.committed.commit_time_us = commit_time_us;
                rules.count();
                state.pending = Some(open.commit(position, state.max_transaction_keys));
            }
            Step::Manual(manual) => carried(state, rules, manual),
            Step::Commit { position } => {
                if let Some(open) = state.open.take() {
                    rules.count();
                    let committed = open.commit(position, state.max_transaction_keys);
                    state.pending = Some(committed);
                }
            }
            Step::Idle { position, reply } => {
                let confirmed = links.confirmed_lsn();
                let flush = idle_flush(state, links, confirmed, position);
                metrics::gauge!(telemetry::REPLICATION_LAG_BYTES)
                    .set(position.0.saturating_sub(flush.0) as f64);
                if reply || flush > state.acknowledged {
                    acknowledge(source, state, flush).await?;
                }
            }
        }
    }
    Ok(())
}

/// The position that can be acknowledged: the confirmed LSN, or, when nothing is open, queued
/// or unconfirmed, the server's position from a keepalive (no published change lies before it,
/// so the slot need not keep that WAL). A streamed transaction not committed yet is open: its
/// rows lie before the keepalive's position, and nothing is gained by passing them, since the
/// server keeps their WAL until it commits or aborts whatever is acknowledged.
fn idle_flush(state: &SourceState, links: &Links, confirmed: Lsn, server: Lsn) -> Lsn {
    let idle = state.open.is_none()
        && state.streams.is_empty()
        && state.pending.is_none()
        && links.last_queued <= confirmed;
    if idle {
        confirmed.max(server)
    } else {
        confirmed
    }
}

/// Adds an invalidation the open transaction carries besides its changes.
fn carried(state: &mut SourceState, rules: &LiveRules, manual: Manual) {
    let allowed = || invalidate::Allowed::new(rules.rules(), &state.invalidate_prefixes);
    match manual {
        Manual::Given { text, literal } => {
            let allowed = allowed();
            given(state, &allowed, &text, literal);
        }
        Manual::Unreadable => {
            let everything = allowed().everything();
            if let Some(open) = state.current() {
                open.given.merge(everything);
            }
        }
        Manual::Repair(table) => repaired(state, rules, table),
        Manual::Flush(table) => {
            if let Some(open) = state.current()
                && rules.rules().has_table(&table)
            {
                open.flush_table(rules, table);
            }
        }
    }
}

/// A key or pattern given by hand with `invalidator.invalidate()` (or one literal key with
/// `invalidate_key()`): the insert of a row of `invalidator.requests`, which joins the
/// invalidation of its transaction, so it is deleted and acknowledged with that transaction,
/// atomically with the writes beside it; a rolled-back transaction never reaches the WAL
/// stream, so it invalidates nothing. What lies outside `allowed` is ignored and counted.
fn given(state: &mut SourceState, allowed: &invalidate::Allowed, text: &str, literal: bool) {
    let max_keys = state.max_transaction_keys;
    let Some(open) = state.current() else {
        return;
    };
    let inv = &mut open.given;
    allowed.insert(inv, text, literal);
    if inv.len() > max_keys {
        // Nothing narrower covers arbitrary keys given by hand, and nothing wider may go.
        tracing::warn!(
            keys = inv.len(),
            limit = max_keys,
            "transaction gave more keys by hand than pipeline.max_transaction_keys; deleting \
             every key under the allowed prefixes instead"
        );
        *inv = allowed.everything();
    }
}

/// A publication repair's request, written in the transaction that added `table` back to the
/// publication: every key its rules can produce joins that transaction's invalidation, so the
/// changes it missed while unpublished (all committed before) are covered once that transaction
/// is confirmed, and a crash before then reads the request again. Its patterns are the rules'
/// own, so the manual allow-list does not apply; a table without rules deletes nothing.
fn repaired(state: &mut SourceState, rules: &LiveRules, table: Option<TableName>) {
    let Some(open) = state.current() else {
        return;
    };
    match table {
        Some(table) if rules.rules().has_table(&table) => {
            tracing::info!(table = %table,
                "the publication was repaired for this table: deleting every key its rules can \
                 produce");
            open.flush_table(rules, table);
        }
        _ => invalidate::Ignored::NotARuleTable.record(),
    }
}
