//! Deletes wait until their transactions are visible to new snapshots (replication mode).
//!
//! ```text
//!  source ─▶ queue<Committed> ─▶ gate: what is waiting, one `pg_current_snapshot()` ─▶ queue ─▶ delete loop(s)
//!                                      until every xid of it is visible (usually at once)
//! ```
//!
//! Postgres sends a commit to the walsender once its WAL is flushed, and only then removes the
//! transaction from the proc array, which is what makes it visible to new snapshots. The sidecar
//! can decode and delete inside that gap: a reader that misses (or takes its lease) after the
//! delete may still get a snapshot without the commit, read the old row and cache it, and
//! nothing invalidates it again. So the gate holds a batch until a snapshot taken now sees each
//! of its transactions (by the xid of its Begin message). A snapshot that sees a committed
//! transaction is followed only by snapshots that see it, so from the delete on every reader
//! reads the new row, whatever client, key, pattern or cluster slot.
//!
//! Notify mode needs no gate: its reader finds the outbox rows through a snapshot, so a
//! transaction whose rows it read is already visible to every snapshot taken after.
//!
//! The gate never blocks deletes for long: after [`MAX_WAIT`] (Postgres unreachable, say, when
//! no reader can read the old row from it either) it lets the batch through and counts it.

use std::time::{Duration, Instant};

use crate::config::PostgresConfig;
use crate::telemetry;

/// The longest a batch waits for its transactions to become visible before it is let through.
pub const MAX_WAIT: Duration = Duration::from_secs(1);

/// Between two snapshots of a batch that is not visible yet: the gap lasts microseconds.
const POLL: Duration = Duration::from_millis(1);

/// Asks Postgres for snapshots over one ordinary connection, opened when first needed and
/// again after an error.
pub struct Gate {
    /// Where to connect.
    postgres: PostgresConfig,
    /// The connection, while it works.
    client: Option<tokio_postgres::Client>,
    /// The newest snapshot taken: what it sees, every later one sees too.
    seen: Option<Snapshot>,
}

impl Gate {
    /// A gate that asks the database at `postgres`; connects when first needed.
    pub fn new(postgres: PostgresConfig) -> Gate {
        Gate {
            postgres,
            client: None,
            seen: None,
        }
    }

    /// Returns once a snapshot sees every one of `xids`, or after [`MAX_WAIT`].
    pub async fn wait(&mut self, xids: &[u32]) {
        let started = Instant::now();
        let mut polls = 0u64;
        while !self.seen.as_ref().is_some_and(|s| s.sees_all(xids)) {
            if started.elapsed() >= MAX_WAIT {
                metrics::counter!(telemetry::VISIBILITY_TIMEOUTS_TOTAL).increment(1);
                tracing::warn!(
                    waited_ms = started.elapsed().as_millis() as u64,
                    "transactions not visible to a new snapshot in time (or postgres did not \
                     answer); deleting anyway"
                );
                return;
            }
            if polls > 0 {
                tokio::time::sleep(POLL).await;
            }
            polls += 1;
            // A server that accepts the session and never answers must not hold the batch past
            // the longest wait: nothing else would time the connect's handshake or the query out.
            let left = MAX_WAIT.saturating_sub(started.elapsed());
            match tokio::time::timeout(left, self.snapshot()).await {
                Ok(Ok(snapshot)) => self.seen = Some(snapshot),
                Ok(Err(error)) => {
                    tracing::debug!(%error, "cannot take a snapshot; reconnecting");
                    self.client = None;
                }
                Err(_) => {
                    tracing::debug!("postgres did not answer for a snapshot; reconnecting");
                    self.client = None;
                }
            }
        }
        if polls > 1 {
            metrics::counter!(telemetry::VISIBILITY_WAITS_TOTAL).increment(1);
        }
    }

    /// A snapshot taken now.
    async fn snapshot(&mut self) -> Result<Snapshot, String> {
        if self.client.is_none() {
            let client = crate::source::connect::connect(&self.postgres).await;
            self.client = Some(client.map_err(|e| telemetry::chain(&e))?);
        }
        let client = self.client.as_ref().expect("connected above");
        let row = client
            .query_one("SELECT pg_current_snapshot()::text", &[])
            .await
            .map_err(|e| telemetry::chain(&e))?;
        let text: String = row.get(0);
        Snapshot::parse(&text).ok_or_else(|| format!("unexpected snapshot {text:?}"))
    }
}

/// `pg_current_snapshot()`: `xmin:xmax:xip,...`, 64-bit transaction ids with their epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    /// Every transaction below it has finished.
    xmin: u64,
    /// No transaction at or past it has finished.
    xmax: u64,
    /// The transactions in between still running.
    xip: Vec<u64>,
}

impl Snapshot {
    /// Parses the text form of a `pg_snapshot`.
    fn parse(text: &str) -> Option<Snapshot> {
        let mut parts = text.trim().splitn(3, ':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<_>>()?,
        };
        Some(Snapshot { xmin, xmax, xip })
    }

    /// Whether it sees every one of `xids`, each a committed transaction's 32-bit id.
    fn sees_all(&self, xids: &[u32]) -> bool {
        xids.iter().all(|&xid| self.sees(xid))
    }

    /// Whether it sees the committed transaction `xid` (32 bits, as the Begin message has it):
    /// widened to the full id nearest `xmax` (within 2^31 either way, as Postgres widens them),
    /// it is visible when below `xmax` and not still running. An older snapshot is asked about
    /// newer transactions too (the gate keeps its newest), and one at or past its `xmax` must
    /// stay unseen, not be taken for the epoch before. Ids below 3 are special (bootstrap,
    /// frozen) and always visible.
    fn sees(&self, xid: u32) -> bool {
        if xid < 3 {
            return true;
        }
        let ahead = i64::from(xid.wrapping_sub(self.xmax as u32) as i32);
        let Some(full) = self.xmax.checked_add_signed(ahead) else {
            // Before the first epoch: no such transaction has finished.
            return false;
        };
        full < self.xmin || (full < self.xmax && !self.xip.contains(&full))
    }
}

#[cfg(test)]
mod tests {
    use super::Snapshot;

    #[test]
    fn a_snapshot_sees_what_finished_before_it_and_not_what_still_runs() {
        let s = Snapshot::parse("100:110:103,107").unwrap();
        assert_eq!(s.xip, vec![103, 107]);
        assert!(s.sees(99) && s.sees(100) && s.sees(104) && s.sees(109));
        assert!(!s.sees(103) && !s.sees(107), "still running");
        assert!(
            !s.sees(110) && !s.sees(200),
            "not finished when it was taken"
        );
        assert!(s.sees_all(&[]) && s.sees_all(&[101, 102]) && !s.sees_all(&[101, 103]));
        assert!(s.sees(2), "special ids");
        assert_eq!(Snapshot::parse("5:5:").unwrap().xip, Vec::<u64>::new());
        assert_eq!(Snapshot::parse("5:x:"), None);
        assert_eq!(Snapshot::parse("5"), None);
    }

    #[test]
    fn a_32_bit_xid_is_read_in_the_epoch_of_the_snapshot() {
        let epoch = 3u64 << 32;
        // Just past a wraparound: xmax is in epoch 3, the transaction in epoch 2.
        let s = Snapshot::parse(&format!("{}:{}:{}", epoch - 10, epoch + 5, epoch - 2)).unwrap();
        assert!(s.sees(u32::MAX - 5), "epoch 2, finished");
        assert!(!s.sees(u32::MAX - 1), "epoch 2, still running");
        assert!(s.sees(4), "epoch 3, below xmax");
        assert!(!s.sees(5), "epoch 3, at xmax");
        assert!(
            !s.sees(6) && !s.sees(1 << 20),
            "epoch 3, newer than the snapshot: not the finished epoch 2 one"
        );
        let first = Snapshot::parse("100:110:").unwrap();
        assert!(!first.sees(u32::MAX - 5), "no epoch before the first");
    }
}
