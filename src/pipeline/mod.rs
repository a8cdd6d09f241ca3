//! The one place that wires source → rules → Redis → acknowledgement.
//!
//! Two tasks share a bounded queue of committed transactions:
//!
//! ```text
//!  source loop: Source ─Step─▶ RuleSet::plan ─▶ Committed{position, keys, patterns} ─┐ bounded
//!       ▲       (replication stream + decoder, or outbox rounds)                      ▼ queue
//!       └── Source::acknowledge(confirmed) ◀── watch<Position> ◀── delete loop: merge, UNLINK/SCAN
//! ```
//!
//! - `source_loop`: one loop for every [`Source`](crate::source::Source): plans, bounds each
//!   transaction (`pipeline.max_transaction_keys`), counts changes, queues, acknowledges.
//! - `deliver`: the delete loop of one [`Sink`], with retries, readiness and metrics.
//! - `visibility`: in replication mode, between the two, holds each transaction until a new
//!   snapshot sees it.
//!
//! The confirmed position is owned by the delete loop: it moves only after Redis confirmed every
//! delete of a transaction, and only forwards. The source loop only passes it on. While the
//! queue is full the source loop stops reading (backpressure) but keeps acknowledging, so the
//! walsender neither times out nor races ahead.

mod deliver;
mod flights;
mod source_loop;
#[cfg(test)]
mod tests;
mod visibility;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::{Lsn, TableName};
use crate::redis::{DeleteStats, KeyIndexReport};
use crate::rules::Invalidation;

pub use deliver::{Queued, Reporting, deliver, run_deleter};
pub use source_loop::{SourceEnd, run_source};
pub use visibility::gated;

/// Transactions that may wait between the source and the delete loop. Small on purpose: the WAL
/// is the buffer, and what is queued is not yet acknowledged.
pub const QUEUE_DEPTH: usize = 64;

/// How much the delete loop holds in flight, from `[pipeline]`.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Keys and patterns per batch, and literal keys held by the batches in flight.
    pub batch_keys: usize,
    /// Patterns held by the batches in flight: they wait for the walk and cost no SCAN of
    /// their own, so many more of them may wait than keys.
    pub pending_patterns: usize,
}

impl Limits {
    /// The limits of `config`.
    pub fn of(config: &crate::config::PipelineConfig) -> Limits {
        Limits {
            batch_keys: config.max_batch_keys,
            pending_patterns: config.max_pending_patterns,
        }
    }
}

/// What one delete covers: the merged invalidations of one or more committed transactions.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// What to delete.
    pub inv: &'a Invalidation,
    /// Where the confirmed position stands once it is deleted.
    pub end: Position,
    /// The tables with rules its transactions changed.
    pub tables: &'a [TableName],
}

/// Where invalidations go: Redis, the dry run's log, or a recording stand-in in unit tests.
pub trait Sink: Send + 'static {
    /// Why a delete failed.
    type Error: std::error::Error + Send + 'static;

    /// Deletes the keys and everything matching the patterns of `batch`.
    fn delete(
        &mut self,
        batch: &Batch<'_>,
    ) -> impl Future<Output = Result<DeleteStats, Self::Error>> + Send;

    /// Starts deleting and returns what finishes it, so the delete loop takes the next batch
    /// while this one's patterns are still being resolved (see [`crate::redis::Resolution`]);
    /// batches are confirmed in order as they finish. The default deletes everything here.
    fn start(
        &mut self,
        batch: &Batch<'_>,
    ) -> impl Future<Output = Result<Finish<Self::Error>, Self::Error>> + Send {
        async move {
            let stats = self.delete(batch).await?;
            Ok(Box::pin(std::future::ready(Ok(stats))) as Finish<Self::Error>)
        }
    }

    /// Checks that Redis answers, so readiness is right while no change flows.
    fn ping(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether retrying the failed call can succeed.
    fn is_transient(error: &Self::Error) -> bool;

    /// The live key index's state and counts, for a sink that keeps one (`[redis] key_index`).
    fn key_index(&self) -> Option<KeyIndexReport> {
        None
    }
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
    /// The transaction id its deletes wait to see visible (see `visibility`); `None` when
    /// there is nothing to wait for.
    pub xid: Option<u32>,
    /// What to delete.
    pub inv: Invalidation,
    /// The tables with rules it changed (none for a flush), for the dry run's log.
    pub tables: Vec<TableName>,
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

/// The handles the source loop shares with the delete loop.
pub struct Links {
    /// Where committed transactions go.
    pub queue: mpsc::Sender<Committed>,
    /// The confirmed position, advanced by the delete loop; closed when that loop stops.
    pub confirmed: watch::Receiver<Position>,
    /// Fires on shutdown: stop reading.
    pub cancel: CancellationToken,
    /// Position of the last transaction handed to the queue; kept across reconnects because
    /// the queue outlives a connection.
    pub last_queued: Lsn,
    /// The history being read (see [`Position`]); transactions are queued in it.
    pub history: u64,
    /// The configured prefixes manual invalidation may delete under, besides the rules' own
    /// (see [`crate::source::invalidate::Allowed`]).
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

    /// Starts a new history: what is still queued from the old one no longer moves the
    /// acknowledgement.
    pub fn new_history(&mut self) {
        self.history += 1;
        self.last_queued = Lsn(0);
    }
}

/// Queues a delete that no transaction read carries (a repair, the flush after a lost slot)
/// behind what is queued already. It acknowledges nothing by itself: what is read after it is
/// acknowledged after it.
pub async fn queue_flush(queue: &mpsc::Sender<Committed>, history: u64, inv: Invalidation) {
    let flush = Committed {
        history,
        end_lsn: Lsn(0),
        commit_time_us: crate::change::unix_micros(),
        // The sidecar's own delete: no transaction to wait for.
        xid: None,
        inv,
        tables: Vec::new(),
    };
    // The queue closes only when the delete loop has stopped, and then nothing is acknowledged.
    let _ = queue.send(flush).await;
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
