//! `run --dry-run`: stream and plan as `run` does, and in place of the Redis deleter a sink,
//! [`LogDeletes`], that logs what each transaction would delete and deletes nothing.
//!
//! - Replication mode reads from a temporary logical slot (`<slot>_dry_run_<pid>`, created with
//!   `CREATE_REPLICATION_SLOT ... TEMPORARY`, dropped by Postgres when the connection ends), so
//!   the real slot never moves. A new slot starts at the current WAL position: changes committed
//!   before it are not shown (a reconnect starts a new one, so changes in between are not shown
//!   either). The publication must exist; the dry run changes nothing in the database.
//! - Notify mode reads outbox rows newer than the newest one at start, never deletes any and
//!   does not take the reader lock, so the real reader keeps working beside it. Rows the real
//!   reader deletes before the dry run reads them are not shown, and, ids being assigned before
//!   commit, neither is a row whose id is smaller than one already read.
//! - Redis is not needed: the dry run never connects to it.

use crate::pipeline::{Batch, Sink};
use crate::redis::DeleteStats;

/// How many keys, and separately patterns, one log line shows; the rest is counted.
pub const SHOWN: usize = 20;

/// A temporary slot's name: the configured slot, cut so that the whole stays within Postgres's
/// 63 bytes, then `_<purpose>_<pid>` (`dry_run` here, `reset` for the replacement of a lost
/// slot; two processes at once do not collide).
pub fn temporary_slot_name(slot: &str, purpose: &str, pid: u32) -> String {
    let suffix = format!("_{purpose}_{pid}");
    let keep = 63usize.saturating_sub(suffix.len()).min(slot.len());
    // Slot names are ASCII (validated), so any cut is on a character boundary.
    format!("{}{suffix}", &slot[..keep])
}

/// Up to [`SHOWN`] items, sorted, comma-separated, then how many more.
fn shown(items: &std::collections::HashSet<String>) -> String {
    let mut sorted: Vec<&str> = items.iter().map(String::as_str).collect();
    sorted.sort_unstable();
    let mut text = sorted
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if sorted.len() > SHOWN {
        text.push_str(&format!(", ... and {} more", sorted.len() - SHOWN));
    }
    text
}

/// The delete loop's sink in a dry run, in place of Redis: logs what each batch (a transaction,
/// or in notify mode a round of outbox rows; several when they wait together) would delete,
/// deletes nothing and confirms at once, so the temporary slot is acknowledged as `run` would
/// acknowledge the real one.
#[derive(Debug, Default)]
pub struct LogDeletes;

impl Sink for LogDeletes {
    type Error = std::convert::Infallible;

    async fn delete(&mut self, batch: &Batch<'_>) -> Result<DeleteStats, Self::Error> {
        let tables = batch
            .tables
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let inv = batch.inv;
        tracing::info!(
            lsn = %batch.end.lsn,
            tables,
            keys = inv.keys.len(),
            patterns = inv.patterns.len(),
            would_delete_keys = %shown(&inv.keys),
            would_delete_patterns = %shown(&inv.patterns),
            "dry run: would delete"
        );
        Ok(DeleteStats::default())
    }

    async fn ping(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    fn is_transient(_: &Self::Error) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_temporary_slot_name_fits_postgres() {
        assert_eq!(
            temporary_slot_name("invalidator", "dry_run", 42),
            "invalidator_dry_run_42"
        );
        let long = "s".repeat(63);
        let name = temporary_slot_name(&long, "dry_run", 4_194_304);
        assert_eq!(name.len(), 63);
        assert!(name.ends_with("_dry_run_4194304"), "{name}");
    }

    #[test]
    fn a_long_list_is_cut_and_counted() {
        let items: std::collections::HashSet<String> =
            (0..25).map(|i| format!("k:{i:02}")).collect();
        let text = shown(&items);
        assert!(text.starts_with("k:00, k:01"), "{text}");
        assert!(text.ends_with("k:19, ... and 5 more"), "{text}");
    }
}
