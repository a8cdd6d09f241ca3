//! Whether the server `run` reconnects to still holds the history its positions belong to.
//!
//! After a failover to a replica or a restore from a base backup, the server behind the same
//! address can be another one: its WAL may end before the position this process acknowledged,
//! or continue a different past. Positions of the old history must never reach it (its slot
//! would skip every change up to them), and what it committed that the old one never showed
//! was missed: it is handled like a lost slot (see [`crate::source::setup::SlotReset`]).

use crate::change::Lsn;
use crate::source::replication::{ReplicationClient, ReplicationError, SystemInfo};

/// What this process saw of the server it streamed from last (`IDENTIFY_SYSTEM`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The cluster's system identifier: another one is another installation.
    pub system_id: String,
    /// The timeline it was on.
    pub timeline: u32,
}

impl Seen {
    /// What `system` says about the server.
    pub fn of(system: &SystemInfo) -> Seen {
        Seen {
            system_id: system.system_id.clone(),
            timeline: system.timeline,
        }
    }
}

/// Why the server is on a new history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewHistory {
    /// Another system identifier: another installation answers at the same address.
    OtherSystem,
    /// Another timeline that did not go through our position (or whose history the server
    /// could not show): a promotion or a point-in-time restore that left our past behind.
    OtherTimeline,
    /// The server's WAL ends before the position we acknowledged: a restore, or a replica
    /// that had not received it.
    WalBehind,
    /// The slot's confirmed position lies beyond the server's WAL: it was pushed there from
    /// another history, and its slot would skip every change up to it.
    SlotAhead,
}

impl NewHistory {
    /// The metric label (`reason`) and log field.
    pub fn label(self) -> &'static str {
        match self {
            NewHistory::OtherSystem => "other_system",
            NewHistory::OtherTimeline => "other_timeline",
            NewHistory::WalBehind => "wal_behind",
            NewHistory::SlotAhead => "slot_ahead",
        }
    }

    /// What happened, for the error log and `setup`'s message.
    pub fn describe(self) -> &'static str {
        match self {
            NewHistory::OtherSystem => "the server has another system identifier",
            NewHistory::OtherTimeline => {
                "the server switched timelines before the position acknowledged to it"
            }
            NewHistory::WalBehind => {
                "the server's WAL ends before the position acknowledged to it (a restore or \
                 a failover)"
            }
            NewHistory::SlotAhead => "the slot's confirmed position is beyond the server's WAL",
        }
    }
}

/// Compares the server `now` (with its slot's confirmed position, if the slot exists) with what
/// this process saw and `acknowledged` before; asks the server for its timeline history when
/// the timeline changed. `None`: the same history, streaming may go on from the slot.
pub async fn compare(
    client: &mut ReplicationClient,
    seen: Option<&Seen>,
    acknowledged: Lsn,
    now: &SystemInfo,
    slot_confirmed: Option<Lsn>,
) -> Result<Option<NewHistory>, ReplicationError> {
    let switch = match seen {
        Some(seen) if seen.system_id == now.system_id && seen.timeline != now.timeline => {
            match client.timeline_history(now.timeline).await {
                Ok(history) => switch_point(&history, seen.timeline),
                // The server has no history to show: no way to tell, so a new history.
                Err(e) if e.code().is_some() => None,
                Err(e) => return Err(e),
            }
        }
        _ => None,
    };
    Ok(judge(seen, acknowledged, now, slot_confirmed, switch))
}

/// The decision of [`compare`], without I/O; `switch` is where the server's history left the
/// timeline we saw, when it did.
fn judge(
    seen: Option<&Seen>,
    acknowledged: Lsn,
    now: &SystemInfo,
    slot_confirmed: Option<Lsn>,
    switch: Option<Lsn>,
) -> Option<NewHistory> {
    if let Some(seen) = seen {
        if seen.system_id != now.system_id {
            return Some(NewHistory::OtherSystem);
        }
        // A timeline that branched off ours at or after our position still holds all we
        // acknowledged: the same history (a promoted replica that had received everything).
        if seen.timeline != now.timeline && switch.is_none_or(|at| acknowledged > at) {
            return Some(NewHistory::OtherTimeline);
        }
        if acknowledged > now.xlog_pos {
            return Some(NewHistory::WalBehind);
        }
    }
    // This one needs no memory: it holds on a first start too.
    if slot_confirmed.is_some_and(|confirmed| confirmed > now.xlog_pos) {
        return Some(NewHistory::SlotAhead);
    }
    None
}

/// Where the timeline `old` ends in a timeline history file (`TIMELINE_HISTORY`: lines of
/// parent timeline, switch point and reason; `#` comments), or `None` when it is not there.
fn switch_point(history: &str, old: u32) -> Option<Lsn> {
    history.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let parent: u32 = fields.next()?.parse().ok()?;
        let at: Lsn = fields.next()?.parse().ok()?;
        (parent == old).then_some(at)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(system_id: &str, timeline: u32, xlog_pos: u64) -> SystemInfo {
        SystemInfo {
            system_id: system_id.to_owned(),
            timeline,
            xlog_pos: Lsn(xlog_pos),
            dbname: Some("db".to_owned()),
        }
    }

    fn seen(system_id: &str, timeline: u32) -> Seen {
        Seen {
            system_id: system_id.to_owned(),
            timeline,
        }
    }

    #[test]
    fn the_same_server_further_on_is_the_same_history() {
        let was = seen("7", 1);
        assert_eq!(
            judge(
                Some(&was),
                Lsn(100),
                &server("7", 1, 100),
                Some(Lsn(90)),
                None
            ),
            None
        );
        // A slot behind our position is a server restarted before it saved the slot: the
        // changes since are sent again, which is harmless.
        assert_eq!(
            judge(
                Some(&was),
                Lsn(100),
                &server("7", 1, 200),
                Some(Lsn(50)),
                None
            ),
            None
        );
        assert_eq!(
            judge(None, Lsn(0), &server("7", 1, 200), Some(Lsn(200)), None),
            None
        );
    }

    #[test]
    fn a_server_behind_our_position_is_a_new_history() {
        let was = seen("7", 1);
        let now = server("7", 1, 99);
        assert_eq!(
            judge(Some(&was), Lsn(100), &now, None, None),
            Some(NewHistory::WalBehind)
        );
    }

    #[test]
    fn another_system_is_a_new_history_wherever_its_wal_ends() {
        let now = server("8", 1, 1000);
        assert_eq!(
            judge(Some(&seen("7", 1)), Lsn(100), &now, Some(Lsn(500)), None),
            Some(NewHistory::OtherSystem)
        );
    }

    #[test]
    fn a_slot_ahead_of_the_wal_is_a_new_history_even_on_a_first_start() {
        assert_eq!(
            judge(None, Lsn(0), &server("7", 1, 100), Some(Lsn(101)), None),
            Some(NewHistory::SlotAhead)
        );
    }

    #[test]
    fn a_timeline_is_continuous_only_when_it_left_ours_at_or_after_our_position() {
        let was = seen("7", 1);
        let now = server("7", 2, 1000);
        assert_eq!(
            judge(Some(&was), Lsn(100), &now, None, Some(Lsn(100))),
            None
        );
        assert_eq!(
            judge(Some(&was), Lsn(101), &now, None, Some(Lsn(100))),
            Some(NewHistory::OtherTimeline)
        );
        // Our timeline is not in its history: no way to tell.
        assert_eq!(
            judge(Some(&was), Lsn(1), &now, None, None),
            Some(NewHistory::OtherTimeline)
        );
    }

    #[test]
    fn the_switch_point_of_a_timeline_is_read_from_its_history_file() {
        let history = "1\t0/3000158\tno recovery target specified\n\n\
                       # a comment\n2\t0/5000000\tat restore point \"x\"\n";
        assert_eq!(switch_point(history, 1), Some("0/3000158".parse().unwrap()));
        assert_eq!(switch_point(history, 2), Some("0/5000000".parse().unwrap()));
        assert_eq!(switch_point(history, 3), None);
        assert_eq!(switch_point("", 1), None);
    }
}
