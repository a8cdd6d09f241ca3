//! Streamed transactions (protocol version 2) from hand-built WAL: keys collected block by
//! block, dropped on abort, deleted and acknowledged at the stream commit.

use super::*;
use crate::pgoutput::{StreamAbort, StreamCommit, StreamStart, Streamed};

/// The start of a block of the streamed transaction `xid`.
fn start(xid: u32, first: bool) -> ReplicationMessage {
    xlog(Message::StreamStart(StreamStart {
        xid,
        first_segment: u8::from(first),
    }))
}

fn stop() -> ReplicationMessage {
    xlog(Message::StreamStop)
}

/// Inside a block: the insert of item `id` by the (sub)transaction `xid`.
fn streamed_insert(xid: u32, id: &str) -> ReplicationMessage {
    xlog(Message::Streamed(Streamed {
        xid,
        message: Box::new(Message::Insert(Insert {
            relation_id: 1,
            new: vec![TupleValue::Text(id.into())],
        })),
    }))
}

/// A block of `xid` whose rows are `(subtransaction, id)`.
fn block(xid: u32, first: bool, rows: &[(u32, &str)]) -> Vec<ReplicationMessage> {
    let mut out = vec![start(xid, first)];
    out.extend(rows.iter().map(|(sub, id)| streamed_insert(*sub, id)));
    out.push(stop());
    out
}

fn stream_commit(xid: u32, end: u64) -> ReplicationMessage {
    xlog(Message::StreamCommit(StreamCommit {
        xid,
        flags: 0,
        commit_lsn: Lsn(end - 1),
        end_lsn: Lsn(end),
        timestamp: 0,
    }))
}

fn stream_abort(xid: u32, subxid: u32) -> ReplicationMessage {
    xlog(Message::StreamAbort(StreamAbort {
        xid,
        subxid,
        abort: None,
    }))
}

/// Every key the sink deleted.
fn deleted_keys(sink: &RecordingSink) -> std::collections::HashSet<String> {
    sink.deleted
        .lock()
        .unwrap()
        .iter()
        .flat_map(|inv| inv.keys.iter().cloned())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn interleaved_streamed_transactions_invalidate_at_commit_and_never_when_aborted() {
    let sink = RecordingSink::default();
    let h = Harness::start(sink.clone());
    // Two streamed transactions alternate, with a whole transaction between their blocks.
    h.send(block(900, true, &[(900, "a1"), (900, "a2")]));
    h.send(block(901, true, &[(901, "b1")]));
    h.send(transaction(&["c1"], 0x100));
    h.send(block(900, false, &[(900, "a3"), (900, "a1")]));
    h.send(block(901, false, &[(901, "b2")]));
    h.wait_for_ack(0x100).await;
    assert_eq!(
        deleted_keys(&sink),
        set(&["item:c1"]),
        "deleted before a commit"
    );

    h.send(vec![stream_abort(901, 901), stream_commit(900, 0x300)]);
    h.wait_for_ack(0x300).await;
    h.stop().await;
    assert_eq!(
        deleted_keys(&sink),
        set(&["item:c1", "item:a1", "item:a2", "item:a3"])
    );
}

#[tokio::test(start_paused = true)]
async fn a_subtransaction_abort_drops_only_what_its_rows_planned() {
    let sink = RecordingSink::default();
    let h = Harness::start(sink.clone());
    // 905 aborts with its child 906 (the server names each); 907 stays. Key `1` is planned by
    // the top level and by 905: it stays.
    h.send(block(
        900,
        true,
        &[(900, "1"), (905, "2"), (905, "1"), (906, "3")],
    ));
    h.send(block(900, false, &[(907, "4"), (905, "5"), (900, "6")]));
    h.send(vec![
        stream_abort(900, 906),
        stream_abort(900, 905),
        stream_commit(900, 0x200),
    ]);
    h.wait_for_ack(0x200).await;
    h.stop().await;
    assert_eq!(deleted_keys(&sink), set(&["item:1", "item:4", "item:6"]));
}

#[tokio::test(start_paused = true)]
async fn ack_never_passes_an_open_streamed_transaction() {
    let sink = RecordingSink::default();
    let h = Harness::start(sink.clone());
    h.send(block(900, true, &[(900, "1")]));
    h.send(vec![keepalive(0x500)]);
    settle().await;
    assert_eq!(
        h.highest_ack(),
        Lsn(0),
        "passed an open streamed transaction"
    );

    // A whole transaction between its blocks is acknowledged, the keepalive beyond it is not.
    h.send(transaction(&["2"], 0x200));
    h.wait_for_ack(0x200).await;
    h.send(vec![keepalive(0x500)]);
    settle().await;
    assert_eq!(h.highest_ack(), Lsn(0x200));

    h.send(vec![stream_commit(900, 0x600)]);
    h.wait_for_ack(0x600).await;
    h.send(vec![keepalive(0x700)]);
    h.wait_for_ack(0x700).await;
    h.stop().await;
    assert_eq!(deleted_keys(&sink), set(&["item:1", "item:2"]));
}

#[tokio::test(start_paused = true)]
async fn a_streamed_transaction_past_max_transaction_keys_falls_back_whatever_aborts() {
    let sink = RecordingSink::default();
    let h = Harness::with(sink.clone(), ITEM_RULES, settings(4));
    // Keys of the top level and of subtransactions count together towards the bound.
    h.send(block(900, true, &[(900, "1"), (900, "2"), (905, "3")]));
    h.send(block(900, false, &[(906, "4"), (906, "5")]));
    h.send(vec![stream_abort(900, 906), stream_commit(900, 0x200)]);
    h.wait_for_ack(0x200).await;
    // The next one stays under the bound and is planned row by row.
    h.send(block(901, true, &[(901, "7"), (908, "8")]));
    h.send(vec![stream_abort(901, 908), stream_commit(901, 0x300)]);
    h.wait_for_ack(0x300).await;
    h.stop().await;
    let deleted = sink.deleted.lock().unwrap().clone();
    assert_eq!(deleted.len(), 2, "{deleted:?}");
    assert!(deleted[0].keys.is_empty(), "{deleted:?}");
    assert_eq!(deleted[0].patterns, set(&["item:*"]));
    assert_eq!(deleted[1].keys, set(&["item:7"]));
}
