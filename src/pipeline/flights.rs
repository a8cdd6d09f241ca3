//! Batches in flight: started on Redis ([`Sink::start`]), not yet finished, confirmed in
//! commit order.
//!
//! A batch whose patterns wait for the shared SCAN walk is not closed when the walk reaches the
//! end of the keyspace: the delete loop hands it over, takes the next batch at once (its
//! patterns join the same walk), and confirms each batch when it finishes, oldest first. The
//! acknowledgement thus still moves only forwards and only over confirmed transactions, while
//! patterns that arrive one commit at a time share one pass.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::sync::watch;

use super::deliver::{Taken, delete_with_retry};
use super::{Finish, Limits, Position, Queued, Reporting, Sink};
use crate::change::{Lsn, unix_micros};
use crate::redis::DeleteStats;
use crate::telemetry;

/// A started batch.
pub(super) struct Flight<T, E> {
    /// The position confirmed once it finishes.
    pub(super) end: Position,
    /// Its transactions' end LSNs and commit times, for the delay histogram.
    pub(super) commits: Vec<(Lsn, i64)>,
    /// What it deletes, to start it again if finishing failed.
    pub(super) batch: Taken<T>,
    /// Resolves once all of it is deleted.
    pub(super) finish: Finish<E>,
}

/// The started batches, oldest first.
pub(super) struct Flights<T, E> {
    /// The batches.
    queue: VecDeque<Flight<T, E>>,
    /// Literal keys they hold (deleted already; kept to start a batch again).
    keys: usize,
    /// Patterns they hold, which wait for the walk.
    patterns: usize,
    /// Past either limit no new batch starts: memory stays bounded.
    limits: Limits,
}

impl<T: Queued, E> Flights<T, E> {
    /// No batch in flight; at most `limits` held.
    pub(super) fn new(limits: Limits) -> Self {
        Flights {
            queue: VecDeque::new(),
            keys: 0,
            patterns: 0,
            limits,
        }
    }

    /// Whether a new batch must wait for older ones to finish.
    pub(super) fn is_full(&self) -> bool {
        self.keys >= self.limits.batch_keys || self.patterns >= self.limits.pending_patterns
    }

    /// Whether nothing is in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Adds a started batch behind the others.
    pub(super) fn push(&mut self, flight: Flight<T, E>) {
        let inv = flight.batch.inv();
        self.keys += inv.keys.len();
        self.patterns += inv.patterns.len();
        self.queue.push_back(flight);
    }

    /// The outcome of the oldest batch, once it has one; never resolves while none flies.
    pub(super) async fn landed(&mut self) -> Result<DeleteStats, E> {
        match self.queue.front_mut() {
            Some(flight) => (&mut flight.finish).await,
            None => std::future::pending().await,
        }
    }
}

impl<T: Queued, E: std::error::Error + Send + 'static> Flights<T, E> {
    /// Handles the outcome of the oldest batch: confirms it, or starts it again after a
    /// transient failure. `Ok(false)`: shutdown came while Redis was failing.
    pub(super) async fn land<K: Sink<Error = E>>(
        &mut self,
        outcome: Result<DeleteStats, E>,
        sink: &mut K,
        confirmed: &watch::Sender<Position>,
        report: &Reporting,
        queue_empty: bool,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Result<bool, E> {
        let stats = match outcome {
            Ok(stats) => stats,
            Err(e) if K::is_transient(&e) => {
                report.errors.increment(1);
                tracing::warn!(error = %telemetry::chain(&e), target = report.target.as_deref(),
                    "redis delete failed; starting the batch again");
                let Some(flight) = self.queue.front_mut() else {
                    return Ok(true);
                };
                let batch = flight.batch.batch(flight.end);
                let Some(finish) = delete_with_retry(sink, &batch, report, cancel).await? else {
                    return Ok(false);
                };
                flight.finish = finish;
                return Ok(true);
            }
            Err(e) => return Err(e),
        };
        let Some(flight) = self.queue.pop_front() else {
            return Ok(true);
        };
        let inv = flight.batch.inv();
        self.keys -= inv.keys.len();
        self.patterns -= inv.patterns.len();
        report.keys_deleted.increment(stats.keys_deleted);
        report
            .patterns
            .increment(stats.patterns_scanned + stats.patterns_indexed);
        report.scan_calls.increment(stats.scan_calls);
        drop(flight.batch);
        match self.queue.front() {
            Some(next) => report.set_oldest_unconfirmed(next.commits.first().map(|c| c.1)),
            // Otherwise the next batch, taken at once, records its own.
            None if queue_empty => report.set_oldest_unconfirmed(None),
            None => {}
        }
        let end = flight.end;
        confirmed.send_if_modified(|c| {
            let advance = end > *c;
            if advance {
                *c = end;
            }
            advance
        });
        // After the acknowledgement is on its way, so measuring never delays it.
        let now = unix_micros();
        for &(lsn, commit_time_us) in &flight.commits {
            let delay_us = (now - commit_time_us).max(0);
            report.delay.record(delay_us as f64 / 1e6);
            tracing::debug!(%lsn, target = report.target.as_deref(),
                commit_to_confirmed_us = delay_us, "transaction confirmed");
        }
        report.transactions.increment(flight.commits.len() as u64);
        Ok(true)
    }

    /// At shutdown: confirms the batches in flight as they finish, oldest first, and stops
    /// without confirming the rest once Redis fails.
    pub(super) async fn land_all<K: Sink<Error = E>>(
        &mut self,
        sink: &mut K,
        confirmed: &watch::Sender<Position>,
        report: &Reporting,
    ) -> Result<(), E> {
        // Cancelled already: a batch that fails is not started again.
        let cancel = tokio_util::sync::CancellationToken::new();
        cancel.cancel();
        while !self.is_empty() {
            let outcome = tokio::select! {
                biased;
                outcome = self.landed() => outcome,
                () = fails(sink) => return Ok(()),
            };
            if !self
                .land(outcome, sink, confirmed, report, true, &cancel)
                .await?
            {
                return Ok(());
            }
        }
        Ok(())
    }
}

/// Returns once a `PING` fails, trying every quarter second.
async fn fails<K: Sink>(sink: &mut K) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if sink.ping().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::sync::{mpsc, oneshot, watch};
    use tokio_util::sync::CancellationToken;

    use super::super::{Batch, Committed, Finish, Limits, Position, Sink, run_deleter};
    use crate::change::Lsn;
    use crate::redis::DeleteStats;
    use crate::rules::Invalidation;
    use crate::telemetry::Health;

    /// A sink whose started deletes finish only when the test opens their gate, as patterns
    /// that wait for the shared walk.
    #[derive(Clone, Default)]
    struct Gated {
        /// The gate of each started delete: the sender that finishes it.
        started: Arc<Mutex<Vec<Option<oneshot::Sender<()>>>>>,
    }

    impl Gated {
        fn count(&self) -> usize {
            self.started.lock().unwrap().len()
        }

        fn open(&self, i: usize) {
            let gate = self.started.lock().unwrap()[i].take();
            gate.expect("a gate opens once").send(()).unwrap();
        }
    }

    impl Sink for Gated {
        type Error = std::io::Error;

        async fn delete(&mut self, _: &Batch<'_>) -> Result<DeleteStats, std::io::Error> {
            unreachable!("deletes are started")
        }

        fn start(
            &mut self,
            _: &Batch<'_>,
        ) -> impl Future<Output = Result<Finish<std::io::Error>, std::io::Error>> + Send {
            let (gate, opened) = oneshot::channel();
            self.started.lock().unwrap().push(Some(gate));
            async move {
                let finish = async move {
                    let _ = opened.await;
                    Ok(DeleteStats::default())
                };
                Ok(Box::pin(finish) as Finish<std::io::Error>)
            }
        }

        async fn ping(&mut self) -> Result<(), std::io::Error> {
            Ok(())
        }

        fn is_transient(_: &std::io::Error) -> bool {
            true
        }
    }

    fn pattern_commit(end: u64, pattern: &str) -> Committed {
        let mut inv = Invalidation::default();
        inv.patterns.insert(pattern.to_owned());
        Committed {
            history: 0,
            end_lsn: Lsn(end),
            commit_time_us: 0,
            xid: None,
            inv,
            tables: Vec::new(),
        }
    }

    async fn until(what: &str, mut done: impl FnMut() -> bool) {
        for _ in 0..10_000 {
            if done() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn a_batch_starts_while_an_earlier_one_resolves_and_acks_stay_in_commit_order() {
        let sink = Gated::default();
        let (queue, queue_rx) = mpsc::channel(8);
        let (confirmed_tx, confirmed) = watch::channel(Position::default());
        let cancel = CancellationToken::new();
        let deleter = tokio::spawn(run_deleter(
            sink.clone(),
            queue_rx,
            confirmed_tx,
            Health::new(),
            Limits {
                batch_keys: 10_000,
                pending_patterns: 100_000,
            },
            cancel.clone(),
        ));
        queue.send(pattern_commit(10, "a:*")).await.unwrap();
        until("the first batch starts", || sink.count() == 1).await;
        queue.send(pattern_commit(20, "b:*")).await.unwrap();
        until("the second batch starts beside it", || sink.count() == 2).await;
        sink.open(1);
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            confirmed.borrow().lsn,
            Lsn(0),
            "acknowledged past a pending batch"
        );
        sink.open(0);
        until("both are acknowledged", || {
            confirmed.borrow().lsn == Lsn(20)
        })
        .await;
        cancel.cancel();
        deleter.await.unwrap().unwrap();
    }

    /// Starts a delete loop on `sink` with `limits`; returns its queue and its task.
    fn deleting(
        sink: &Gated,
        limits: Limits,
        cancel: &CancellationToken,
    ) -> (
        mpsc::Sender<Committed>,
        tokio::task::JoinHandle<Result<(), std::io::Error>>,
    ) {
        let (queue, queue_rx) = mpsc::channel(8);
        let (confirmed_tx, _) = watch::channel(Position::default());
        let deleter = tokio::spawn(run_deleter(
            sink.clone(),
            queue_rx,
            confirmed_tx,
            Health::new(),
            limits,
            cancel.clone(),
        ));
        (queue, deleter)
    }

    #[tokio::test]
    async fn patterns_in_flight_are_bounded_by_their_own_limit_not_by_the_keys() {
        let sink = Gated::default();
        let cancel = CancellationToken::new();
        let limits = Limits {
            batch_keys: 1,
            pending_patterns: 3,
        };
        let (queue, deleter) = deleting(&sink, limits, &cancel);
        for (i, pattern) in ["a:*", "b:*", "c:*", "d:*"].into_iter().enumerate() {
            queue
                .send(pattern_commit(10 * (i as u64 + 1), pattern))
                .await
                .unwrap();
            // One at a time, so each is a batch of its own.
            until("the batch starts", || sink.count() == (i + 1).min(3)).await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            sink.count(),
            3,
            "a batch started past the pending patterns limit"
        );
        sink.open(0);
        until("the fourth starts once one lands", || sink.count() == 4).await;
        // At shutdown the loop lands what flies.
        (1..4).for_each(|i| sink.open(i));
        cancel.cancel();
        deleter.await.unwrap().unwrap();
    }
}
