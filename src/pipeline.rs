//! The one place that wires source → rules → Redis → acknowledgement.
//!
//! Two tasks share a bounded queue of committed transactions:
//!
//! ```text
//!  source loop: WAL ─▶ Decoder ─▶ RuleSet::plan ─▶ Committed{end_lsn, keys, patterns} ─┐ bounded
//!       ▲                                                                               ▼ queue
//!       └── standby status (flush = confirmed) ◀── watch<Lsn> ◀── delete loop: merge, UNLINK/SCAN
//! ```
//!
//! The flush LSN is owned by the delete loop: it moves only after Redis confirmed every delete of
//! a transaction, and only forwards. The source loop only reports it. While the queue is full the
//! source loop stops reading WAL (backpressure) but keeps sending status updates, so the
//! walsender neither times out nor races ahead.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::Lsn;
use crate::pgoutput::{DecodeError, Decoder, Event};
use crate::redis::DeleteStats;
use crate::rules::{Invalidation, RuleSet};
use crate::source::replication::{ReplicationError, ReplicationMessage};
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

/// Where invalidations go: Redis, or a recording stand-in in unit tests.
pub trait Sink: Send + 'static {
    /// Why a delete failed.
    type Error: std::error::Error + Send + 'static;

    /// Deletes the keys and everything matching the patterns.
    fn delete(
        &mut self,
        inv: &Invalidation,
    ) -> impl Future<Output = Result<DeleteStats, Self::Error>> + Send;

    /// Checks that Redis answers, so readiness is right while no change flows.
    fn ping(&mut self) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Whether retrying the failed call can succeed.
    fn is_transient(error: &Self::Error) -> bool;
}

/// The invalidations of one committed transaction, waiting for Redis.
#[derive(Debug)]
pub struct Committed {
    /// End LSN of the transaction: the flush position once its deletes are confirmed.
    pub end_lsn: Lsn,
    /// Commit time, microseconds since the Unix epoch.
    pub commit_time_us: i64,
    /// What to delete.
    pub inv: Invalidation,
}

/// Why the source loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The replication connection failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
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
            SourceError::Decode { .. } => true,
        }
    }
}

/// The handles the source loop shares with the delete loop.
pub struct Links {
    /// Where committed transactions go.
    pub queue: mpsc::Sender<Committed>,
    /// The confirmed flush LSN, advanced by the delete loop; closed when that loop stops.
    pub confirmed: watch::Receiver<Lsn>,
    /// Fires on shutdown: stop reading WAL.
    pub cancel: CancellationToken,
    /// End LSN of the last transaction handed to the queue; kept across reconnects because the
    /// queue outlives a connection.
    pub last_queued: Lsn,
    /// Highest flush position reported to Postgres, so reports never go backwards; start it at
    /// the slot's `confirmed_flush_lsn`.
    pub reported: Lsn,
}

/// State of the source loop that must survive between messages.
struct SourceState {
    /// Invalidations of the transaction being read, if one is open.
    open: Option<Committed>,
    /// A committed transaction the queue had no room for yet.
    pending: Option<Committed>,
}

/// Why the source loop returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEnd {
    /// The delete loop stopped (shutdown) and its last confirmed LSN was reported.
    DeleterStopped,
    /// The server ended the stream.
    StreamEnded,
}

/// Reads WAL, plans invalidations per transaction and queues them; reports the confirmed LSN.
pub async fn run_source<S: WalStream>(
    stream: &mut S,
    decoder: &mut Decoder,
    rules: &RuleSet,
    links: &mut Links,
    status_interval: Duration,
) -> Result<SourceEnd, SourceError> {
    let mut state = SourceState {
        open: None,
        pending: None,
    };
    // A handle of our own, so a reserved permit does not hold a borrow of `links`.
    let queue = links.queue.clone();
    let mut tick = tokio::time::interval(status_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let reading = state.pending.is_none() && !links.cancel.is_cancelled();
        tokio::select! {
            biased;
            // Acknowledge first: it frees WAL on the server and is what the product promises.
            changed = links.confirmed.changed() => {
                let confirmed = *links.confirmed.borrow();
                report(stream, links, confirmed).await?;
                if changed.is_err() {
                    // The delete loop has stopped (shutdown): that was the last ack.
                    return Ok(SourceEnd::DeleterStopped);
                }
            }
            _ = tick.tick() => {
                let confirmed = *links.confirmed.borrow();
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
                match message? {
                    None => return Ok(SourceEnd::StreamEnded),
                    Some(ReplicationMessage::XLogData { wal_start, data, .. }) => {
                        apply(decoder, rules, &mut state, &data).map_err(|source| {
                            metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "decode")
                                .increment(1);
                            SourceError::Decode { lsn: wal_start, source }
                        })?;
                    }
                    Some(ReplicationMessage::Keepalive { wal_end, reply_requested, .. }) => {
                        let confirmed = *links.confirmed.borrow();
                        let flush = idle_flush(&state, links, confirmed, wal_end);
                        metrics::gauge!(telemetry::REPLICATION_LAG_BYTES)
                            .set(wal_end.0.saturating_sub(flush.0) as f64);
                        if reply_requested || flush > links.reported {
                            report(stream, links, flush).await?;
                        }
                    }
                }
            }
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

async fn report<S: WalStream>(
    stream: &mut S,
    links: &mut Links,
    flush: Lsn,
) -> Result<(), ReplicationError> {
    let flush = flush.max(links.reported);
    stream.send_status(flush).await?;
    links.reported = flush;
    metrics::gauge!(telemetry::CONFIRMED_LSN).set(flush.0 as f64);
    Ok(())
}

/// Decodes one XLogData payload and plans its changes into the open transaction.
fn apply(
    decoder: &mut Decoder,
    rules: &RuleSet,
    state: &mut SourceState,
    data: &[u8],
) -> Result<(), DecodeError> {
    decoder.apply(data, |event| match event {
        Event::Begin { commit_time_us, .. } => {
            state.open = Some(Committed {
                end_lsn: Lsn(0),
                commit_time_us,
                inv: Invalidation::default(),
            });
        }
        Event::Change(change) => {
            metrics::counter!(
                telemetry::CHANGES_TOTAL,
                "table" => change.table.to_string(),
                "op" => change.op.as_str()
            )
            .increment(1);
            if let Some(open) = state.open.as_mut() {
                rules.plan(&change, &mut open.inv);
            }
        }
        Event::Commit { end_lsn, .. } => {
            if let Some(mut committed) = state.open.take() {
                committed.end_lsn = end_lsn;
                state.pending = Some(committed);
            }
        }
        _ => {}
    })
}

/// Takes committed transactions from the queue, deletes their keys in batches and advances the
/// confirmed LSN. Transient Redis errors are retried forever with capped, jittered exponential
/// backoff; on shutdown the batch in flight is finished (unless Redis is failing) and the loop
/// returns. A permanent Redis error (bad credentials) is returned.
pub async fn run_deleter<K: Sink>(
    mut sink: K,
    mut queue: mpsc::Receiver<Committed>,
    confirmed: watch::Sender<Lsn>,
    health: Arc<Health>,
    max_batch_keys: usize,
    cancel: CancellationToken,
) -> Result<(), K::Error> {
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(()),
            next = queue.recv() => match next {
                Some(committed) => committed,
                None => return Ok(()),
            },
            _ = ping.tick() => {
                match sink.ping().await {
                    Ok(()) => health.set_redis(None),
                    Err(e) if K::is_transient(&e) => health.set_redis(Some(e.to_string())),
                    Err(e) => return Err(e),
                }
                continue;
            }
        };
        // Latency first: the batch is what is already waiting, never a wait for more.
        let mut batch = first;
        let mut commit_times = vec![batch.commit_time_us];
        while batch.inv.len() < max_batch_keys {
            match queue.try_recv() {
                Ok(next) => {
                    batch.inv.merge(next.inv);
                    batch.end_lsn = batch.end_lsn.max(next.end_lsn);
                    commit_times.push(next.commit_time_us);
                }
                Err(_) => break,
            }
        }
        if !delete_with_retry(&mut sink, &batch.inv, &health, &cancel).await? {
            return Ok(());
        }
        let now = unix_micros();
        for t in &commit_times {
            let seconds = (now - t).max(0) as f64 / 1e6;
            metrics::histogram!(telemetry::COMMIT_TO_DELETE_SECONDS).record(seconds);
        }
        metrics::counter!(telemetry::TRANSACTIONS_TOTAL).increment(commit_times.len() as u64);
        confirmed.send_if_modified(|c| {
            let advance = batch.end_lsn > *c;
            if advance {
                *c = batch.end_lsn;
            }
            advance
        });
    }
}

/// Deletes until Redis confirms. `Ok(false)`: shutdown came while Redis was failing, so nothing
/// may be acknowledged.
async fn delete_with_retry<K: Sink>(
    sink: &mut K,
    inv: &Invalidation,
    health: &Health,
    cancel: &CancellationToken,
) -> Result<bool, K::Error> {
    if inv.is_empty() {
        return Ok(true);
    }
    let mut delays = backoff();
    loop {
        match sink.delete(inv).await {
            Ok(stats) => {
                health.set_redis(None);
                metrics::counter!(telemetry::KEYS_DELETED_TOTAL).increment(stats.keys_deleted);
                metrics::counter!(telemetry::PATTERNS_TOTAL).increment(stats.patterns_scanned);
                return Ok(true);
            }
            Err(e) if K::is_transient(&e) => {
                metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "redis").increment(1);
                health.set_redis(Some(e.to_string()));
                let delay = delays.next().unwrap_or(Duration::from_secs(10));
                tracing::warn!(error = %e, retry_in = ?delay, "redis delete failed; not acknowledging");
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => return Ok(false),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(e),
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

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};

    use bytes::Bytes;

    use super::*;
    use crate::pgoutput::{Begin, Column, Commit, Insert, Message, Relation, TupleValue, encode};

    /// WAL fed by the test; statuses recorded for inspection.
    struct ScriptedWal {
        incoming: mpsc::UnboundedReceiver<ReplicationMessage>,
        statuses: Arc<Mutex<Vec<Lsn>>>,
    }

    impl WalStream for ScriptedWal {
        async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
            Ok(self.incoming.recv().await)
        }

        async fn send_status(&mut self, flush: Lsn) -> Result<(), ReplicationError> {
            self.statuses.lock().unwrap().push(flush);
            Ok(())
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("redis is down")]
    struct Down;

    /// Records what it deletes; fails while `down` is set.
    #[derive(Clone, Default)]
    struct RecordingSink {
        down: Arc<AtomicBool>,
        deleted: Arc<Mutex<Vec<Invalidation>>>,
    }

    impl Sink for RecordingSink {
        type Error = Down;

        async fn delete(&mut self, inv: &Invalidation) -> Result<DeleteStats, Down> {
            if self.down.load(Ordering::SeqCst) {
                return Err(Down);
            }
            self.deleted.lock().unwrap().push(inv.clone());
            Ok(DeleteStats::default())
        }

        async fn ping(&mut self) -> Result<(), Down> {
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
        Message::Relation(Relation {
            id: 1,
            namespace: "public".into(),
            name: "items".into(),
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
        statuses: Arc<Mutex<Vec<Lsn>>>,
        cancel: CancellationToken,
        tasks: Vec<tokio::task::JoinHandle<()>>,
    }

    impl Harness {
        fn start(sink: RecordingSink) -> Harness {
            let rules = RuleSet::compile(&[(
                "items.toml".to_owned(),
                "[[rule]]\ntable = \"items\"\nkeys = [\"item:{id}\"]\n".to_owned(),
            )])
            .expect("rules compile");
            let (wal_tx, wal_rx) = mpsc::unbounded_channel();
            let statuses = Arc::new(Mutex::new(Vec::new()));
            let mut stream = ScriptedWal {
                incoming: wal_rx,
                statuses: statuses.clone(),
            };
            let (queue_tx, queue_rx) = mpsc::channel(QUEUE_DEPTH);
            let (confirmed_tx, confirmed_rx) = watch::channel(Lsn(0));
            let cancel = CancellationToken::new();
            let mut links = Links {
                queue: queue_tx,
                confirmed: confirmed_rx,
                cancel: cancel.clone(),
                last_queued: Lsn(0),
                reported: Lsn(0),
            };
            let deleter = {
                let (sink, cancel) = (sink.clone(), cancel.clone());
                tokio::spawn(async move {
                    let health = Health::new();
                    let _ = run_deleter(sink, queue_rx, confirmed_tx, health, 10_000, cancel).await;
                })
            };
            let source = tokio::spawn(async move {
                let mut decoder = Decoder::default();
                let interval = Duration::from_secs(1);
                let end = run_source(&mut stream, &mut decoder, &rules, &mut links, interval).await;
                assert_eq!(end.expect("source loop"), SourceEnd::DeleterStopped);
            });
            wal_tx.send(xlog(relation())).unwrap();
            Harness {
                wal: wal_tx,
                statuses,
                cancel,
                tasks: vec![deleter, source],
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
            for task in self.tasks {
                task.await.unwrap();
            }
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
}
