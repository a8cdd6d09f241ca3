//! The pipeline from hand-built WAL, with a recording sink: no server needed.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::change::{Lsn, TableName};
use crate::config::PipelineConfig;
use crate::pgoutput::{
    Begin, Column, Commit, Delete, Insert, LogicalMessage, Message, OldTuple, Relation, TupleValue,
    encode,
};
use crate::pgoutput::{Decoder, Event};
use crate::redis::DeleteStats;
use crate::reload::LiveRules;
use crate::rules::Invalidation;
use crate::rules::RuleSet;
use crate::source::replication::{
    Ancestry, ReplicationError, ReplicationMessage, ReplicationSource, SourceError, WalProgress,
    WalStream,
};
use crate::source::setup::SetupError;
use crate::telemetry::Health;

/// No relation is a partition of another.
struct NoPartitions;

impl Ancestry for NoPartitions {
    async fn ancestors(&mut self, _: u32, _: &TableName) -> Result<Vec<TableName>, SetupError> {
        Ok(Vec::new())
    }
}

/// WAL fed by the test; messages read and statuses recorded for inspection.
struct ScriptedWal {
    incoming: mpsc::UnboundedReceiver<ReplicationMessage>,
    read: Arc<AtomicUsize>,
    statuses: Arc<Mutex<Vec<Lsn>>>,
}

impl WalStream for ScriptedWal {
    async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        let message = self.incoming.recv().await;
        self.read.fetch_add(1, Ordering::SeqCst);
        Ok(message)
    }

    async fn send_status(&mut self, flush: Lsn) -> Result<(), ReplicationError> {
        self.statuses.lock().unwrap().push(flush);
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("redis is down")]
struct Down;

/// Records what it deletes; fails while `down` is set, and waits while a test holds
/// `slow` for writing (a Redis that is busy, not failing).
#[derive(Clone, Default)]
struct RecordingSink {
    down: Arc<AtomicBool>,
    slow: Arc<tokio::sync::RwLock<()>>,
    calls: Arc<AtomicUsize>,
    deleted: Arc<Mutex<Vec<Invalidation>>>,
}

impl Sink for RecordingSink {
    type Error = Down;

    async fn delete(&mut self, batch: &Batch<'_>) -> Result<DeleteStats, Down> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let _busy = self.slow.read().await;
        if self.down.load(Ordering::SeqCst) {
            return Err(Down);
        }
        self.deleted.lock().unwrap().push(batch.inv.clone());
        Ok(DeleteStats::default())
    }

    async fn ping(&mut self) -> Result<(), Down> {
        if self.down.load(Ordering::SeqCst) {
            return Err(Down);
        }
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
    relation_of(1, "items")
}

/// A table `public.<name>` with one text column `id`.
fn relation_of(id: u32, name: &str) -> Message {
    Message::Relation(Relation {
        id,
        namespace: "public".into(),
        name: name.into(),
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
    read: Arc<AtomicUsize>,
    statuses: Arc<Mutex<Vec<Lsn>>>,
    cancel: CancellationToken,
    deleter: tokio::task::JoinHandle<()>,
    source: tokio::task::JoinHandle<Result<SourceEnd, SourceError>>,
}

const ITEM_RULES: &str = "[[rule]]\ntable = \"items\"\nkeys = [\"item:{id}\"]\n";

/// Settings for tests: a long status interval (time is paused) and `max_transaction_keys`.
fn settings(max_transaction_keys: usize) -> PipelineConfig {
    PipelineConfig {
        wait_visible: false,
        max_batch_keys: 10_000,
        max_pending_patterns: 100_000,
        status_interval: Duration::from_secs(1),
        max_transaction_keys,
    }
}

impl Harness {
    fn start(sink: RecordingSink) -> Harness {
        Harness::with(sink, ITEM_RULES, settings(100_000))
    }

    /// Starts both loops with `rules` and `settings`; relation 1 (`items`) is announced.
    fn with(sink: RecordingSink, rules: &str, settings: PipelineConfig) -> Harness {
        let rules = RuleSet::compile(&[("rules.toml".to_owned(), rules.to_owned())])
            .expect("rules compile");
        Harness::live(sink, LiveRules::fixed(Arc::new(rules)), settings)
    }

    /// Starts both loops with `rules` as the source loop's rules.
    fn live(sink: RecordingSink, mut rules: LiveRules, settings: PipelineConfig) -> Harness {
        let (wal_tx, wal_rx) = mpsc::unbounded_channel();
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let read = Arc::new(AtomicUsize::new(0));
        let mut stream = ScriptedWal {
            incoming: wal_rx,
            read: read.clone(),
            statuses: statuses.clone(),
        };
        let (queue_tx, queue_rx) = mpsc::channel(QUEUE_DEPTH);
        let (confirmed_tx, confirmed_rx) = watch::channel(Position::default());
        let cancel = CancellationToken::new();
        let mut links = Links {
            queue: queue_tx,
            confirmed: confirmed_rx,
            cancel: cancel.clone(),
            last_queued: Lsn(0),
            history: 0,
            invalidate_prefixes: ["user:", "weird", "k:"].map(str::to_owned).into(),
        };
        let deleter = {
            let (sink, cancel, settings) = (sink.clone(), cancel.clone(), settings.clone());
            tokio::spawn(async move {
                let health = Health::new();
                let max = Limits::of(&settings);
                let _ = run_deleter(sink, queue_rx, confirmed_tx, health, max, cancel).await;
            })
        };
        let source = tokio::spawn(async move {
            let (mut ancestry, mut progress) = (NoPartitions, WalProgress::default());
            let health = Health::new();
            let mut source =
                ReplicationSource::new(&mut stream, &mut ancestry, &mut progress, &health);
            run_source(&mut source, &mut rules, &mut links, &settings).await
        });
        wal_tx.send(xlog(relation())).unwrap();
        Harness {
            wal: wal_tx,
            read,
            statuses,
            cancel,
            deleter,
            source,
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
        self.deleter.await.unwrap();
        let end = self.source.await.unwrap();
        assert_eq!(end.expect("source loop"), SourceEnd::DeleterStopped);
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

/// Lets every other task run until none can make progress without time passing.
async fn settle() {
    for _ in 0..1_000 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_quiet_stream_deletes_each_transaction_at_once_without_waiting() {
    let sink = RecordingSink::default();
    let h = Harness::start(sink.clone());
    let start = tokio::time::Instant::now();
    for end in [0x100, 0x200] {
        h.send(transaction(&["1"], end));
        // Only yields: a batch that waited on a timer would never be deleted here, because
        // paused time stands still while tasks are runnable.
        settle().await;
        assert_eq!(h.highest_ack(), Lsn(end));
    }
    assert_eq!(tokio::time::Instant::now(), start, "no delay while quiet");
    assert_eq!(sink.deleted.lock().unwrap().len(), 2, "one batch each");
    h.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_backlog_is_merged_into_batches_of_distinct_keys_up_to_the_bound() {
    let sink = RecordingSink::default();
    let max_batch_keys = 6;
    let settings = PipelineConfig {
        max_batch_keys,
        ..settings(100_000)
    };
    let h = Harness::with(sink.clone(), ITEM_RULES, settings);
    // Redis is busy with the first transaction while eight more commit behind it.
    let busy = sink.slow.write().await;
    h.send(transaction(&["0"], 0x100));
    settle().await;
    assert_eq!(sink.calls.load(Ordering::SeqCst), 1);
    for i in 1..=8u64 {
        // Each transaction shares a key with the one before it.
        let ids = [(i - 1).to_string(), i.to_string()];
        h.send(transaction(&[&ids[0], &ids[1]], 0x100 * (i + 1)));
    }
    settle().await;
    drop(busy);
    h.wait_for_ack(0x900).await;

    let batches: Vec<Vec<String>> = sink
        .deleted
        .lock()
        .unwrap()
        .iter()
        .map(|inv| {
            let mut keys: Vec<String> = inv.keys.iter().cloned().collect();
            keys.sort();
            keys
        })
        .collect();
    assert_eq!(batches[0], ["item:0"]);
    // The backlog went out in a few batches, not eight; a batch takes whole transactions
    // until it holds `max_batch_keys`, so it ends past the bound by less than one of them.
    assert!(batches.len() < 5, "{batches:?}");
    assert!(
        batches.iter().all(|b| b.len() < max_batch_keys + 2),
        "{batches:?}"
    );
    let mut all: Vec<String> = batches[1..].concat();
    all.sort();
    let expected: Vec<String> = {
        let mut keys: Vec<String> = (0..=8).map(|i| format!("item:{i}")).collect();
        keys.sort();
        keys
    };
    // Duplicates within a batch are gone; only a key shared across a batch boundary repeats.
    all.dedup();
    assert_eq!(all, expected);
    h.stop().await;
}

/// A logical decoding message with `prefix` and `content`.
fn emitted(prefix: &str, content: &[u8], transactional: bool, lsn: u64) -> ReplicationMessage {
    xlog(Message::Logical(LogicalMessage {
        flags: if transactional {
            LogicalMessage::TRANSACTIONAL
        } else {
            0
        },
        lsn: Lsn(lsn),
        prefix: prefix.into(),
        content: content.to_vec(),
    }))
}

fn set(items: &[&str]) -> std::collections::HashSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// `invalidator.requests` as relation 9: `id`, `key_or_pattern`, `literal`.
fn requests_relation() -> ReplicationMessage {
    let column = |name: &str, type_oid| Column {
        flags: 0,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    xlog(Message::Relation(Relation {
        id: 9,
        namespace: "invalidator".into(),
        name: "requests".into(),
        replica_identity: b'd',
        columns: vec![
            column("id", 20),
            column("key_or_pattern", 25),
            column("literal", 16),
        ],
    }))
}

/// What `invalidator.invalidate()` (or `invalidate_key()` when `literal`) writes: the insert
/// of a request row, then its delete.
fn requested(id: u32, text: &str, literal: bool) -> [ReplicationMessage; 2] {
    let flag = if literal { "t" } else { "f" };
    [
        xlog(Message::Insert(Insert {
            relation_id: 9,
            new: vec![
                TupleValue::Text(id.to_string()),
                TupleValue::Text(text.to_owned()),
                TupleValue::Text(flag.into()),
            ],
        })),
        xlog(Message::Delete(Delete {
            relation_id: 9,
            old: OldTuple::Key(vec![
                TupleValue::Text(id.to_string()),
                TupleValue::Null,
                TupleValue::Null,
            ]),
        })),
    ]
}

/// `invalidator.invalidate()` inside a transaction: its keys are deleted in the same batch
/// as the transaction's rows and acknowledged with it, never before its commit; what lies
/// outside the allowed prefixes, and a logical decoding message, delete nothing.
#[tokio::test(start_paused = true)]
async fn an_invalidate_request_joins_its_transaction_under_the_allowed_prefixes() {
    let sink = RecordingSink::default();
    let h = Harness::start(sink.clone());
    let mut messages = transaction(&["1"], 0x200);
    let commit = messages.pop().unwrap();
    messages.push(requests_relation());
    messages.extend(requested(1, "user:42", false));
    messages.extend(requested(2, "user:*:feed", false));
    messages.extend(requested(3, "weird\\*key", false));
    messages.extend(requested(4, "user:[x]", true));
    messages.extend(requested(5, "other:1", false));
    messages.extend(requested(6, "*", false));
    messages.extend([
        emitted("invalidator", b"user:43", true, 0x150),
        emitted("someone-else", b"not:ours", true, 0x180),
    ]);
    h.send(messages);
    settle().await;
    assert_eq!(h.highest_ack(), Lsn(0), "acknowledged before the commit");
    assert!(sink.deleted.lock().unwrap().is_empty());
    h.send(vec![commit]);
    h.wait_for_ack(0x200).await;
    h.stop().await;
    let deleted = sink.deleted.lock().unwrap().clone();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(
        deleted[0].keys,
        set(&["item:1", "user:42", "weird*key", "user:[x]"])
    );
    assert_eq!(deleted[0].patterns, set(&["user:*:feed"]));
}

/// A publication repair's request row (`invalidator.requests` as a current `setup` makes
/// it, relation 10): every key of its table's rules joins its transaction, allow-list or
/// not; a table without rules, or text that names no table, deletes nothing.
#[tokio::test(start_paused = true)]
async fn a_repair_request_deletes_every_key_of_its_table_with_its_transaction() {
    let sink = RecordingSink::default();
    let h = Harness::start(sink.clone());
    let mut messages = transaction(&["1"], 0x200);
    let commit = messages.pop().unwrap();
    let column = |name: &str, type_oid| Column {
        flags: 0,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    messages.push(xlog(Message::Relation(Relation {
        id: 10,
        namespace: "invalidator".into(),
        name: "requests".into(),
        replica_identity: b'd',
        columns: vec![
            column("id", 20),
            column("key_or_pattern", 25),
            column("literal", 16),
            column("repair", 25),
        ],
    })));
    for (id, table) in [(1, "public.items"), (2, "public.other"), (3, "a.b.c")] {
        messages.push(xlog(Message::Insert(Insert {
            relation_id: 10,
            new: vec![
                TupleValue::Text(id.to_string()),
                TupleValue::Text(String::new()),
                TupleValue::Text("f".into()),
                TupleValue::Text(table.into()),
            ],
        })));
    }
    h.send(messages);
    settle().await;
    assert!(sink.deleted.lock().unwrap().is_empty());
    h.send(vec![commit]);
    h.wait_for_ack(0x200).await;
    h.stop().await;
    let deleted = sink.deleted.lock().unwrap().clone();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].keys, set(&["item:1"]));
    assert_eq!(deleted[0].patterns, set(&["item:*"]));
}

/// Reloaded rules take over at the next transaction: a transaction open when they arrive is
/// planned by the old rules to its commit, never by a mix.
#[tokio::test(start_paused = true)]
async fn new_rules_take_over_between_transactions_never_inside_one() {
    let compile = |text: &str| {
        Arc::new(
            RuleSet::compile(&[("rules.toml".to_owned(), text.to_owned())]).expect("rules compile"),
        )
    };
    let (updates, rx) = watch::channel(compile(ITEM_RULES));
    let sink = RecordingSink::default();
    let h = Harness::live(sink.clone(), LiveRules::watching(rx), settings(100_000));
    let mut messages = transaction(&["1", "2"], 0x100);
    let commit = messages.pop().unwrap();
    let second = messages.pop().unwrap();
    h.send(messages);
    settle().await;
    updates.send_replace(compile(
        "[[rule]]\ntable = \"items\"\nkeys = [\"new:{id}\"]\n",
    ));
    h.send(vec![second, commit]);
    h.wait_for_ack(0x100).await;
    h.send(transaction(&["3"], 0x200));
    h.wait_for_ack(0x200).await;
    h.stop().await;
    let deleted = sink.deleted.lock().unwrap().clone();
    assert_eq!(deleted.len(), 2, "{deleted:?}");
    assert_eq!(deleted[0].keys, set(&["item:1", "item:2"]));
    assert_eq!(deleted[1].keys, set(&["new:3"]));
}

/// A logical decoding message with our prefix, which any role can emit, deletes nothing,
/// inside a transaction or outside one.
#[tokio::test(start_paused = true)]
async fn an_emitted_message_deletes_nothing() {
    let sink = RecordingSink::default();
    let h = Harness::start(sink.clone());
    h.send(vec![emitted("invalidator", b"user:7", false, 0x180)]);
    let mut messages = transaction(&["1"], 0x200);
    let commit = messages.pop().unwrap();
    messages.push(emitted("invalidator", b"user:8", true, 0x190));
    messages.push(commit);
    h.send(messages);
    h.wait_for_ack(0x200).await;
    h.stop().await;
    let deleted = sink.deleted.lock().unwrap().clone();
    assert_eq!(deleted.len(), 1, "{deleted:?}");
    assert_eq!(deleted[0].keys, set(&["item:1"]));
}

/// Keys given by hand survive the fallback to the tables' patterns, which cannot cover them;
/// past the limit themselves, they become a pattern for each allowed prefix, never `*`.
#[tokio::test(start_paused = true)]
async fn keys_given_by_hand_survive_the_fallback_and_are_bounded_too() {
    let sink = RecordingSink::default();
    let h = Harness::with(sink.clone(), ITEM_RULES, settings(3));
    let ids: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let mut messages = transaction(&ids, 0x200);
    let commit = messages.pop().unwrap();
    messages.push(requests_relation());
    messages.extend(requested(1, "user:1", false));
    messages.push(commit);
    h.send(messages);
    h.wait_for_ack(0x200).await;

    let mut messages = transaction(&[], 0x300);
    let commit = messages.pop().unwrap();
    for i in 0..5 {
        messages.extend(requested(10 + i, &format!("k:{i}"), false));
    }
    messages.push(commit);
    h.send(messages);
    h.wait_for_ack(0x300).await;
    h.stop().await;
    let deleted = sink.deleted.lock().unwrap().clone();
    assert_eq!(deleted[0].keys, set(&["user:1"]));
    assert_eq!(deleted[0].patterns, set(&["item:*"]));
    assert!(deleted[1].keys.is_empty());
    assert_eq!(
        deleted[1].patterns,
        set(&["item:*", "k:*", "user:*", "weird*"])
    );
}

/// An insert of one row with `id` into relation `relation`.
fn insert(relation: u32, id: &str) -> ReplicationMessage {
    xlog(Message::Insert(Insert {
        relation_id: relation,
        new: vec![TupleValue::Text(id.into())],
    }))
}

/// Wraps `changes` in a transaction ending at `end`.
fn wrapped(changes: Vec<ReplicationMessage>, end: u64) -> Vec<ReplicationMessage> {
    let mut out = transaction(&[], end);
    let commit = out.pop().unwrap();
    out.extend(changes);
    out.push(commit);
    out
}

const FALLBACK_RULES: &str = r#"
[[rule]]
table = "items"
keys = ["item:{id}", "item:{id}:*", "items:all"]

[[rule]]
table = "tags"
on = ["insert"]
keys = ["tag:{id}"]

[[rule]]
table = "notes"
keys = ["note:{id|upper}"]
"#;

#[tokio::test(start_paused = true)]
async fn a_transaction_past_max_transaction_keys_deletes_its_tables_patterns() {
    let sink = RecordingSink::default();
    let h = Harness::with(sink.clone(), FALLBACK_RULES, settings(10));
    h.send(vec![
        xlog(relation_of(2, "tags")),
        xlog(relation_of(3, "notes")),
        xlog(relation_of(4, "logs")),
    ]);
    // A table changed before the limit, the one that crosses it (values that look like
    // globs included), one already covered, one first changed after it, one without rules.
    let mut changes = vec![insert(2, "t1")];
    let ids: Vec<String> = (0..50)
        .map(|i| format!("{i}"))
        .chain(["*".into(), "[x]".into(), "a\\b".into(), "?".into()])
        .collect();
    changes.extend(ids.iter().map(|id| insert(1, id)));
    changes.extend([insert(2, "t2"), insert(3, "n1"), insert(4, "l1")]);
    h.send(wrapped(changes.clone(), 0x100));
    h.wait_for_ack(0x100).await;

    // The next transaction is small again: planned row by row.
    h.send(wrapped(vec![insert(1, "next")], 0x200));
    h.wait_for_ack(0x200).await;
    h.stop().await;

    let deleted = sink.deleted.lock().unwrap().clone();
    assert_eq!(deleted.len(), 2, "{deleted:?}");
    let fallback = &deleted[0];
    let set = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
    assert_eq!(fallback.keys, set(&["items:all"]));
    assert_eq!(
        fallback.patterns,
        set(&["item:*", "item:*:*", "tag:*", "note:*"])
    );
    assert_eq!(
        deleted[1].keys,
        set(&["item:next", "items:all"]),
        "the fallback must not outlive its transaction"
    );

    // Never fewer deletions than row-by-row planning: every key those rows render is
    // deleted, by name or by a pattern that matches it.
    let rules = RuleSet::compile(&[("rules.toml".to_owned(), FALLBACK_RULES.to_owned())])
        .expect("rules compile");
    let mut decoder = Decoder::default();
    let mut planned = Invalidation::default();
    let relations = [
        relation(),
        relation_of(2, "tags"),
        relation_of(3, "notes"),
        relation_of(4, "logs"),
    ];
    let messages = relations
        .into_iter()
        .map(xlog)
        .chain(wrapped(changes, 0x100));
    for message in messages {
        let ReplicationMessage::XLogData { data, .. } = message else {
            unreachable!()
        };
        decoder
            .apply(&data, |event| {
                if let Event::Change(change) = event {
                    rules.plan(&change, &mut planned);
                }
            })
            .expect("decodes");
    }
    let covered = |key: &str| {
        fallback.keys.contains(key)
            || fallback
                .patterns
                .iter()
                .any(|p| crate::glob::matches(p.as_bytes(), key.as_bytes()))
    };
    assert!(planned.keys.len() > 50, "{planned:?}");
    for key in &planned.keys {
        assert!(
            covered(key),
            "{key} would have been deleted but is not covered"
        );
    }
    // The rows' patterns are covered too: a key each one matches (its escapes as the bytes
    // they stand for, each `*` as some text) is matched by the fallback.
    for pattern in &planned.patterns {
        let example = instance(pattern);
        assert!(
            crate::glob::matches(pattern.as_bytes(), example.as_bytes()),
            "{example:?} should match {pattern:?}"
        );
        assert!(
            covered(&example),
            "{example} (from {pattern}) is not covered"
        );
    }
}

/// A key that `pattern` (made of text, `\` escapes and `*`) matches.
fn instance(pattern: &str) -> String {
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.extend(chars.next()),
            '*' => out.push_str("any"),
            c => out.push(c),
        }
    }
    out
}

/// Garbage in the WAL: stop with a decode error (the caller reconnects from the last
/// acknowledged LSN), never panic, never acknowledge the transaction it was part of.
#[tokio::test(start_paused = true)]
async fn hostile_wal_is_an_error_and_never_acknowledges_past_it() {
    let unknown_relation = Message::Insert(Insert {
        relation_id: 99,
        new: vec![TupleValue::Text("1".into())],
    });
    let mut truncated = encode(&Message::Insert(Insert {
        relation_id: 1,
        new: vec![TupleValue::Text("12345".into())],
    }));
    truncated.truncate(truncated.len() - 2);
    let hostile: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("unknown tag", b"Z\x00\x01".to_vec()),
        ("truncated insert", truncated),
        ("unknown relation", encode(&unknown_relation)),
    ];
    for (what, bytes) in hostile {
        let h = Harness::start(RecordingSink::default());
        h.send(transaction(&["1"], 0x100));
        h.wait_for_ack(0x100).await;
        let mut open = transaction(&["2"], 0x200);
        let commit = open.pop().unwrap();
        h.send(open);
        h.send(vec![
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x180),
                wal_end: Lsn(0x180),
                server_time_us: 0,
                data: Bytes::from(bytes),
            },
            commit,
            keepalive(0x300),
        ]);
        let end = h.source.await.unwrap();
        match end {
            Err(e @ SourceError::Decode { .. }) => {
                assert_eq!(
                    crate::error::Classify::verdict(&e),
                    crate::error::Verdict::Reconnect,
                    "{what}: a decode error must reconnect"
                );
                assert!(e.to_string().contains("0/180"), "{what}: {e}");
            }
            other => panic!("{what}: expected a decode error, got {other:?}"),
        }
        let acked = h.statuses.lock().unwrap().iter().copied().max();
        assert_eq!(
            acked,
            Some(Lsn(0x100)),
            "{what}: acknowledged past the bad message"
        );
        h.cancel.cancel();
        h.deleter.await.unwrap();
    }
}

/// While Redis is down, reading stops once the queue is full (the WAL stays on the server),
/// status updates keep flowing so the walsender does not time out, and nothing is lost.
#[tokio::test(start_paused = true)]
async fn reading_stops_while_redis_is_down_but_status_updates_continue() {
    let sink = RecordingSink::default();
    sink.down.store(true, Ordering::SeqCst);
    let h = Harness::start(sink.clone());
    let transactions = 10 * QUEUE_DEPTH as u64;
    for t in 1..=transactions {
        h.send(transaction(&[&t.to_string()], t * 0x100));
    }
    tokio::time::sleep(Duration::from_secs(60)).await;
    let (read_before, statuses_before) = (
        h.read.load(Ordering::SeqCst),
        h.statuses.lock().unwrap().len(),
    );
    tokio::time::sleep(Duration::from_secs(60)).await;
    // The queue, the batch the delete loop retries, and one transaction waiting for room are
    // all that is held; the rest stays in the WAL.
    let read = h.read.load(Ordering::SeqCst);
    assert_eq!(read, read_before, "kept reading while Redis was down");
    assert!(
        read < 1 + 3 * transactions as usize,
        "read everything: {read}"
    );
    assert!(
        h.statuses.lock().unwrap().len() > statuses_before,
        "no status updates while blocked"
    );
    assert_eq!(h.highest_ack(), Lsn(0));

    sink.down.store(false, Ordering::SeqCst);
    h.wait_for_ack(transactions * 0x100).await;
    let deleted: usize = sink
        .deleted
        .lock()
        .unwrap()
        .iter()
        .map(|inv| inv.keys.len())
        .sum();
    assert_eq!(deleted as u64, transactions);
    h.stop().await;
}

mod streaming;
