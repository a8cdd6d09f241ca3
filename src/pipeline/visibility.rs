//! The stage between the source loop and the delete loop that holds each transaction until a
//! new snapshot sees it (see [`crate::source::visibility`] for why).

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Committed, QUEUE_DEPTH};
use crate::source::visibility::Gate;

/// Puts `gate` between `queue` and the queue it returns: each transaction of `queue` comes out
/// in order, once a snapshot sees it. Stops when `cancel` fires or `queue` closes (then the
/// returned queue closes too).
pub fn gated(
    mut queue: mpsc::Receiver<Committed>,
    mut gate: Gate,
    cancel: CancellationToken,
) -> mpsc::Receiver<Committed> {
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    tokio::spawn(async move {
        loop {
            let first = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                next = queue.recv() => match next {
                    Some(committed) => committed,
                    None => return,
                },
            };
            // What is already waiting goes through on one snapshot.
            let mut batch = vec![first];
            while batch.len() < QUEUE_DEPTH {
                match queue.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
            let xids: Vec<u32> = batch.iter().filter_map(|c| c.xid).collect();
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                () = gate.wait(&xids) => {}
            }
            for committed in batch {
                if tx.send(committed).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}
