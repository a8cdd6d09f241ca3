//! Several Redis targets that receive the same deletes (one cache per region, say): a change is
//! acknowledged only once every target confirmed it.
//!
//! ```text
//!                                       ┌─▶ bounded queue ─▶ delete loop "default" ─▶ watch<Lsn> ─┐
//!  source ─▶ queue<Committed> ─▶ fan-out┼─▶ bounded queue ─▶ delete loop "eu"      ─▶ watch<Lsn> ─┼─▶ min ─▶ confirmed
//!                   (Arc, shared)       └─▶ ...                                                   ┘
//! ```
//!
//! Each target has its own delete loop ([`pipeline::deliver`]): its own batches, backoff,
//! PING-triggered early retry, readiness (`redis <name>: ...`) and metrics (label `target`), so a
//! target that is down never holds the others back. The acknowledged position is the minimum
//! of the targets' confirmed positions. Memory stays bounded: the fan-out hands each transaction
//! (shared, not copied) to every target's queue of [`pipeline::QUEUE_DEPTH`]; when one target
//! is down its queue fills, the fan-out waits on it, the source queue fills behind it, and
//! reading stops: the backpressure of one target, with the others at most a queue ahead.
//!
//! With a single target (no `[[redis.targets]]`) none of this runs: `run` uses
//! [`pipeline::run_deleter`] directly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::select_all;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::pipeline::{self, Committed, Position, Reporting, Sink};
use crate::telemetry::Health;

/// Connects a target's sink, retrying transient failures; `Ok(None)` on shutdown.
pub type Connect<K> =
    Pin<Box<dyn Future<Output = Result<Option<K>, <K as Sink>::Error>> + Send + 'static>>;

/// One Redis target: its name (metric label, `/readyz`) and how to connect to it.
pub struct Target<K: Sink> {
    /// The target's name.
    pub name: String,
    /// Connects it; run inside the target's own task, so a target that is down at start does not
    /// hold the others back either.
    pub connect: Connect<K>,
}

/// Runs one delete loop per target and acknowledges the minimum of their confirmed positions on
/// `confirmed`, until `cancel` fires or the source closes `queue`. A permanent error of any
/// target stops all of them and is returned; `confirmed` is closed (dropped) only once every
/// target's loop has stopped and its last position was taken into account.
pub async fn run_targets<K: Sink>(
    targets: Vec<Target<K>>,
    queue: mpsc::Receiver<Committed>,
    confirmed: watch::Sender<Position>,
    health: Arc<Health>,
    limits: pipeline::Limits,
    cancel: CancellationToken,
) -> Result<(), K::Error> {
    // A permanent error of one target stops the others.
    let stop = cancel.child_token();
    let mut senders = Vec::with_capacity(targets.len());
    let mut positions = Vec::with_capacity(targets.len());
    let mut loops = Vec::with_capacity(targets.len());
    for target in targets {
        let (tx, rx) = mpsc::channel::<Arc<Committed>>(pipeline::QUEUE_DEPTH);
        let (position_tx, position_rx) = watch::channel(Position::default());
        senders.push(tx);
        positions.push(position_rx);
        let reporting = Reporting::target(health.clone(), &target.name);
        let stop = stop.clone();
        loops.push(tokio::spawn(async move {
            let result = async {
                let Some(sink) = target.connect.await? else {
                    return Ok(());
                };
                reporting.set_redis(None);
                pipeline::deliver(sink, rx, position_tx, &reporting, limits, stop.clone()).await
            }
            .await;
            if result.is_err() {
                stop.cancel();
            }
            result
        }));
    }
    let fan_out = tokio::spawn(fan_out(queue, senders, stop.clone()));
    let minimum = tokio::spawn(acknowledge_minimum(positions, confirmed));
    let mut outcome = Ok(());
    for handle in loops {
        let result = handle
            .await
            .unwrap_or_else(|e| panic!("delete loop panicked: {e}"));
        if outcome.is_ok() {
            outcome = result;
        }
    }
    stop.cancel();
    let _ = fan_out.await;
    let _ = minimum.await;
    outcome
}

/// Hands every transaction of `queue` to every target's queue, in order, sharing it; waits for
/// room in each (the backpressure of the slowest target). Stops on `stop`, when the source
/// closes `queue`, or when a target's loop has stopped.
async fn fan_out(
    mut queue: mpsc::Receiver<Committed>,
    senders: Vec<mpsc::Sender<Arc<Committed>>>,
    stop: CancellationToken,
) {
    loop {
        let next = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            next = queue.recv() => next,
        };
        let Some(committed) = next else { return };
        let committed = Arc::new(committed);
        for sender in &senders {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                sent = sender.send(committed.clone()) => if sent.is_err() { return },
            }
        }
    }
}

/// Publishes on `confirmed` the minimum of the targets' positions whenever one moves (only
/// forwards); returns, closing `confirmed`, once every target's loop has stopped.
async fn acknowledge_minimum(
    targets: Vec<watch::Receiver<Position>>,
    confirmed: watch::Sender<Position>,
) {
    let mut latest: Vec<Position> = targets.iter().map(|t| *t.borrow()).collect();
    // (index into `latest`, receiver) of the loops still running.
    let mut open: Vec<(usize, watch::Receiver<Position>)> =
        targets.into_iter().enumerate().collect();
    while !open.is_empty() {
        let (changed, i, rest) =
            select_all(open.iter_mut().map(|(_, rx)| Box::pin(rx.changed()))).await;
        drop(rest);
        let (index, rx) = &mut open[i];
        latest[*index] = *rx.borrow_and_update();
        if changed.is_err() {
            open.remove(i);
        }
        let minimum = latest.iter().copied().min().unwrap_or_default();
        confirmed.send_if_modified(|c| {
            let advance = minimum > *c;
            if advance {
                *c = minimum;
            }
            advance
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::Lsn;
    use crate::redis::DeleteStats;
    use crate::rules::Invalidation;
    use std::collections::HashSet;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    /// Small batches, so the targets see several.
    const LIMITS: pipeline::Limits = pipeline::Limits {
        batch_keys: 100,
        pending_patterns: 100,
    };

    #[derive(Debug, thiserror::Error)]
    #[error("down")]
    struct Down {
        permanent: bool,
    }

    /// A target that records its deletes and fails transiently while `down` is set.
    #[derive(Clone, Default)]
    struct Fake {
        deleted: Arc<Mutex<HashSet<String>>>,
        down: Arc<AtomicBool>,
        refuse: bool,
    }

    impl Sink for Fake {
        type Error = Down;

        async fn delete(&mut self, batch: &pipeline::Batch<'_>) -> Result<DeleteStats, Down> {
            if self.refuse {
                return Err(Down { permanent: true });
            }
            if self.down.load(Ordering::SeqCst) {
                return Err(Down { permanent: false });
            }
            self.deleted
                .lock()
                .unwrap()
                .extend(batch.inv.keys.iter().cloned());
            Ok(DeleteStats::default())
        }

        async fn ping(&mut self) -> Result<(), Down> {
            if self.down.load(Ordering::SeqCst) {
                Err(Down { permanent: false })
            } else {
                Ok(())
            }
        }

        fn is_transient(error: &Down) -> bool {
            !error.permanent
        }
    }

    fn target(name: &str, fake: &Fake) -> Target<Fake> {
        let fake = fake.clone();
        Target {
            name: name.to_owned(),
            connect: Box::pin(async move { Ok(Some(fake)) }),
        }
    }

    fn committed(key: &str, end: u64) -> Committed {
        let mut inv = Invalidation::default();
        inv.keys.insert(key.to_owned());
        Committed {
            history: 0,
            end_lsn: Lsn(end),
            commit_time_us: 1,
            xid: None,
            inv,
            tables: Vec::new(),
        }
    }

    async fn wait(what: &str, mut condition: impl FnMut() -> bool) {
        for _ in 0..2000 {
            if condition() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("timed out waiting until {what}");
    }

    #[tokio::test]
    async fn the_acknowledged_position_is_the_minimum_over_targets() {
        let (main, eu) = (Fake::default(), Fake::default());
        eu.down.store(true, Ordering::SeqCst);
        let (queue_tx, queue_rx) = mpsc::channel(pipeline::QUEUE_DEPTH);
        let (confirmed_tx, confirmed_rx) = watch::channel(Position::default());
        let health = Health::new();
        health.set_source(None);
        let cancel = CancellationToken::new();
        let run = tokio::spawn(run_targets(
            vec![target("default", &main), target("eu", &eu)],
            queue_rx,
            confirmed_tx,
            health.clone(),
            LIMITS,
            cancel.clone(),
        ));
        for i in 1..=10 {
            queue_tx
                .send(committed(&format!("k{i}"), i * 10))
                .await
                .unwrap();
        }
        // The healthy target deletes everything while the other is down...
        wait("default deleted all", || {
            main.deleted.lock().unwrap().len() == 10
        })
        .await;
        wait("/readyz names eu", || {
            health
                .readiness()
                .is_err_and(|r| r.starts_with("redis eu: "))
        })
        .await;
        // ...and nothing is acknowledged, since eu confirmed nothing.
        assert_eq!(confirmed_rx.borrow().lsn, Lsn(0));
        assert!(eu.deleted.lock().unwrap().is_empty());
        eu.down.store(false, Ordering::SeqCst);
        wait("everything acknowledged", || {
            confirmed_rx.borrow().lsn == Lsn(100)
        })
        .await;
        assert_eq!(eu.deleted.lock().unwrap().len(), 10);
        wait("ready", || health.readiness().is_ok()).await;
        cancel.cancel();
        run.await.unwrap().unwrap();
        assert!(
            confirmed_rx.has_changed().is_err(),
            "confirmed closed at the end"
        );
    }

    #[tokio::test]
    async fn a_target_down_for_long_stops_the_queue_with_bounded_memory() {
        let (main, eu) = (Fake::default(), Fake::default());
        eu.down.store(true, Ordering::SeqCst);
        let (queue_tx, queue_rx) = mpsc::channel(pipeline::QUEUE_DEPTH);
        let (confirmed_tx, confirmed_rx) = watch::channel(Position::default());
        let cancel = CancellationToken::new();
        let run = tokio::spawn(run_targets(
            vec![target("default", &main), target("eu", &eu)],
            queue_rx,
            confirmed_tx,
            Health::new(),
            LIMITS,
            cancel.clone(),
        ));
        let mut sent = 0u64;
        loop {
            let attempt = queue_tx.try_send(committed(&format!("k{sent}"), sent + 1));
            if attempt.is_err() {
                // Full: give the loops a moment to make room, then check once more.
                tokio::time::sleep(Duration::from_millis(50)).await;
                if queue_tx.capacity() == 0 {
                    break;
                }
                continue;
            }
            sent += 1;
            assert!(
                sent < 10 * pipeline::QUEUE_DEPTH as u64,
                "the queue never filled"
            );
        }
        // The source queue, the fan-out's hand, eu's queue and the batch in flight.
        assert!(
            sent <= 3 * pipeline::QUEUE_DEPTH as u64 + 2,
            "{sent} queued"
        );
        assert_eq!(confirmed_rx.borrow().lsn, Lsn(0));
        eu.down.store(false, Ordering::SeqCst);
        wait("everything acknowledged", || {
            confirmed_rx.borrow().lsn == Lsn(sent)
        })
        .await;
        assert_eq!(eu.deleted.lock().unwrap().len() as u64, sent);
        assert_eq!(main.deleted.lock().unwrap().len() as u64, sent);
        cancel.cancel();
        run.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_permanent_error_of_one_target_stops_all_and_is_returned() {
        let main = Fake::default();
        let eu = Fake {
            refuse: true,
            ..Fake::default()
        };
        let (queue_tx, queue_rx) = mpsc::channel(pipeline::QUEUE_DEPTH);
        let (confirmed_tx, confirmed_rx) = watch::channel(Position::default());
        let run = tokio::spawn(run_targets(
            vec![target("default", &main), target("eu", &eu)],
            queue_rx,
            confirmed_tx,
            Health::new(),
            LIMITS,
            CancellationToken::new(),
        ));
        queue_tx.send(committed("k", 10)).await.unwrap();
        let err = run.await.unwrap().unwrap_err();
        assert!(err.permanent);
        assert_eq!(confirmed_rx.borrow().lsn, Lsn(0));
    }
}
