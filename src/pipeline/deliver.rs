//! The delete loop: takes committed transactions from the queue, merges what is waiting into
//! one batch, deletes it with retries, and only then moves the confirmed position.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::flights::{Flight, Flights};
use super::{Batch, Committed, Finish, Limits, Position, Sink, backoff};
use crate::change::TableName;
use crate::error::Classify;
use crate::redis::{
    DeleteError, DeleteStats, Deleter, KEY_INDEX_FALLBACKS, KeyIndexReport, KeyIndexState,
};
use crate::rules::Invalidation;
use crate::telemetry::{self, Health};

/// Takes committed transactions from the queue, deletes their keys in batches and advances the
/// confirmed LSN. Transient Redis errors are retried forever with capped, jittered exponential
/// backoff; on shutdown the batch in flight is finished (unless Redis is failing) and the loop
/// returns. A permanent Redis error (bad credentials) is returned.
pub async fn run_deleter<K: Sink>(
    sink: K,
    queue: mpsc::Receiver<Committed>,
    confirmed: watch::Sender<Position>,
    health: Arc<Health>,
    limits: Limits,
    cancel: CancellationToken,
) -> Result<(), K::Error> {
    let reporting = Reporting::single(health);
    deliver(sink, queue, confirmed, &reporting, limits, cancel).await
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

impl Sink for Deleter {
    type Error = DeleteError;

    fn is_transient(error: &DeleteError) -> bool {
        Classify::is_transient(error)
    }

    async fn delete(&mut self, batch: &Batch<'_>) -> Result<DeleteStats, DeleteError> {
        Deleter::delete(self, &batch.inv.keys, &batch.inv.patterns).await
    }

    async fn start(&mut self, batch: &Batch<'_>) -> Result<Finish<DeleteError>, DeleteError> {
        let resolution = Deleter::start(self, &batch.inv.keys, &batch.inv.patterns).await?;
        Ok(Box::pin(resolution))
    }

    async fn ping(&mut self) -> Result<(), DeleteError> {
        Deleter::ping(self).await
    }

    fn key_index(&self) -> Option<KeyIndexReport> {
        self.key_index_report()
    }
}

/// One batch of a delete loop: a single transaction as received (nothing copied), or several
/// merged.
pub(super) enum Taken<T> {
    /// The first transaction alone.
    One(T),
    /// Several transactions' invalidations merged, and the tables they changed.
    Merged(Invalidation, Vec<TableName>),
}

impl<T: Queued> Taken<T> {
    /// What the batch deletes.
    pub(super) fn inv(&self) -> &Invalidation {
        match self {
            Taken::One(first) => &first.committed().inv,
            Taken::Merged(inv, _) => inv,
        }
    }

    /// The batch as the sink sees it, confirmed at `end`.
    pub(super) fn batch(&self, end: Position) -> Batch<'_> {
        let tables = match self {
            Taken::One(first) => &first.committed().tables,
            Taken::Merged(_, tables) => tables,
        };
        Batch {
            inv: self.inv(),
            end,
            tables,
        }
    }

    /// Adds `next` to the batch.
    fn add(&mut self, next: T) {
        let empty = Taken::Merged(Invalidation::default(), Vec::new());
        let (mut inv, mut tables) = match std::mem::replace(self, empty) {
            Taken::One(first) => {
                let tables = first.committed().tables.clone();
                (first.into_invalidation(), tables)
            }
            Taken::Merged(inv, tables) => (inv, tables),
        };
        for table in &next.committed().tables {
            if !tables.contains(table) {
                tables.push(table.clone());
            }
        }
        inv.merge(next.into_invalidation());
        *self = Taken::Merged(inv, tables);
    }
}

/// Where a delete loop reports: readiness and lag in [`Health`], and the delete-side metrics,
/// labelled `target` when there are several Redis targets.
pub struct Reporting {
    /// Readiness and lag.
    pub(super) health: Arc<Health>,
    /// The target's name when there are several; `None` for the one `[redis] url`.
    pub(super) target: Option<String>,
    /// [`telemetry::KEYS_DELETED_TOTAL`].
    pub(super) keys_deleted: metrics::Counter,
    /// [`telemetry::PATTERNS_TOTAL`].
    pub(super) patterns: metrics::Counter,
    /// [`telemetry::SCAN_CALLS_TOTAL`].
    pub(super) scan_calls: metrics::Counter,
    /// [`telemetry::ERRORS_TOTAL`] of kind `redis`.
    pub(super) errors: metrics::Counter,
    /// [`telemetry::TRANSACTIONS_TOTAL`].
    pub(super) transactions: metrics::Counter,
    /// [`telemetry::BATCH_KEYS`].
    pub(super) batch_keys: metrics::Histogram,
    /// [`telemetry::COMMIT_TO_DELETE_SECONDS`].
    pub(super) delay: metrics::Histogram,
    /// The key index's series, made when the sink first reports one (`[redis] key_index`).
    key_index: OnceLock<IndexMetrics>,
}

/// The key index's series of one target.
struct IndexMetrics {
    /// [`telemetry::KEY_INDEX_KEYS`].
    keys: metrics::Gauge,
    /// [`telemetry::KEY_INDEX_RESOLUTIONS_TOTAL`].
    resolutions: metrics::Counter,
    /// [`telemetry::KEY_INDEX_FALLBACKS_TOTAL`], one per reason of [`KEY_INDEX_FALLBACKS`].
    fallbacks: Vec<metrics::Counter>,
}

impl IndexMetrics {
    /// The series, labelled `target` when `target` names one of several, each at 0.
    fn new(target: Option<&str>) -> IndexMetrics {
        let labels = |more: Option<(&'static str, &'static str)>| {
            let mut labels: Vec<(&'static str, String)> = Vec::new();
            labels.extend(more.map(|(k, v)| (k, v.to_owned())));
            labels.extend(target.map(|t| ("target", t.to_owned())));
            labels
        };
        let metrics = IndexMetrics {
            keys: metrics::gauge!(telemetry::KEY_INDEX_KEYS, &labels(None)),
            resolutions: metrics::counter!(telemetry::KEY_INDEX_RESOLUTIONS_TOTAL, &labels(None)),
            fallbacks: KEY_INDEX_FALLBACKS
                .iter()
                .map(|&reason| {
                    let labels = labels(Some(("reason", reason)));
                    metrics::counter!(telemetry::KEY_INDEX_FALLBACKS_TOTAL, &labels)
                })
                .collect(),
        };
        metrics.keys.set(0.0);
        metrics.resolutions.absolute(0);
        metrics.fallbacks.iter().for_each(|c| c.absolute(0));
        metrics
    }
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
            key_index: OnceLock::new(),
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
            key_index: OnceLock::new(),
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

    /// Mirrors what the sink's key index reports (nothing without one) into its series and a
    /// `/readyz` note while it is not ready. The counts are the sink's own totals, so the
    /// series only ever move forwards and each count is made in one place, the deleter.
    pub(super) fn key_index(&self, report: Option<KeyIndexReport>) {
        let Some(report) = report else {
            return;
        };
        let series = self
            .key_index
            .get_or_init(|| IndexMetrics::new(self.target.as_deref()));
        let keys = match report.state {
            KeyIndexState::Ready { keys } => keys,
            _ => 0,
        };
        series.keys.set(keys as f64);
        series.resolutions.absolute(report.resolutions);
        for (counter, &count) in series.fallbacks.iter().zip(&report.fallbacks) {
            counter.absolute(count);
        }
        let note = index_note(&report.state).map(|note| match &self.target {
            None => note,
            Some(name) => format!("redis {name}: {note}"),
        });
        let topic = match &self.target {
            None => "key_index".to_owned(),
            Some(name) => format!("key_index {name}"),
        };
        self.health.set_note(&topic, note);
    }

    /// Records the commit time of this target's oldest unconfirmed transaction.
    pub(super) fn set_oldest_unconfirmed(&self, commit_time_us: Option<i64>) {
        match &self.target {
            None => self.health.set_oldest_unconfirmed(commit_time_us),
            Some(name) => self
                .health
                .set_target_oldest_unconfirmed(name, commit_time_us),
        }
    }
}

/// What `/readyz` notes about a key index that is not ready; `None` when it is (or is off).
fn index_note(state: &KeyIndexState) -> Option<String> {
    let why = match state {
        KeyIndexState::Off | KeyIndexState::Ready { .. } => return None,
        KeyIndexState::Building => "building".to_owned(),
        KeyIndexState::Full { max_keys } => format!(
            "full (more than {max_keys} keys; raise [redis] key_index_max_keys and restart)"
        ),
        KeyIndexState::Unavailable(reason) => format!("unavailable ({reason})"),
    };
    Some(format!("key index {why}: patterns use the SCAN walk"))
}

/// [`run_deleter`] for any queue item and any [`Reporting`]: the loop of one Redis target.
pub async fn deliver<K: Sink, T: Queued>(
    mut sink: K,
    mut queue: mpsc::Receiver<T>,
    confirmed: watch::Sender<Position>,
    report: &Reporting,
    limits: Limits,
    cancel: CancellationToken,
) -> Result<(), K::Error> {
    let mut ping = tokio::time::interval(Duration::from_secs(5));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flights = Flights::new(limits);
    report.key_index(sink.key_index());
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
                // The index changes with the keyspace, batches or not.
                report.key_index(sink.key_index());
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
        let mut batch = Taken::One(first);
        while batch.inv().len() < limits.batch_keys {
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
        let Some(finish) = delete_with_retry(&mut sink, &batch.batch(end), report, &cancel).await?
        else {
            return Ok(());
        };
        // The deleter has chosen between the index and the walk for this batch.
        report.key_index(sink.key_index());
        flights.push(Flight {
            end,
            commits,
            batch,
            finish,
        });
    }
}

/// Starts the delete until Redis takes it. `Ok(None)`: shutdown came while Redis was failing,
/// so nothing may be acknowledged.
pub(super) async fn delete_with_retry<K: Sink>(
    sink: &mut K,
    batch: &Batch<'_>,
    report: &Reporting,
    cancel: &CancellationToken,
) -> Result<Option<Finish<K::Error>>, K::Error> {
    if batch.inv.is_empty() {
        return Ok(Some(Box::pin(std::future::ready(Ok(
            DeleteStats::default(),
        )))));
    }
    let mut delays = backoff();
    loop {
        match sink.start(batch).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_index_that_is_not_ready_is_a_note_saying_why() {
        assert_eq!(index_note(&KeyIndexState::Off), None);
        assert_eq!(index_note(&KeyIndexState::Ready { keys: 3 }), None);
        assert_eq!(
            index_note(&KeyIndexState::Building).as_deref(),
            Some("key index building: patterns use the SCAN walk")
        );
        let full = index_note(&KeyIndexState::Full { max_keys: 10 }).unwrap();
        assert!(full.contains("more than 10 keys") && full.contains("key_index_max_keys"));
        let refused = index_note(&KeyIndexState::Unavailable("CONFIG refused".to_owned()));
        assert!(refused.unwrap().contains("unavailable (CONFIG refused)"));
    }

    #[test]
    fn the_key_index_note_names_the_target_and_goes_once_it_is_ready() {
        let health = Health::new();
        let report = Reporting::target(health.clone(), "eu");
        let mut index = KeyIndexReport {
            state: KeyIndexState::Building,
            resolutions: 0,
            fallbacks: [0; KEY_INDEX_FALLBACKS.len()],
        };
        report.key_index(Some(index.clone()));
        assert_eq!(
            health.notes(),
            ["redis eu: key index building: patterns use the SCAN walk"]
        );
        index.state = KeyIndexState::Ready { keys: 5 };
        report.key_index(Some(index));
        assert!(health.notes().is_empty());
        // A sink without an index leaves no note at all.
        report.key_index(None);
        assert!(health.notes().is_empty());
    }
}
