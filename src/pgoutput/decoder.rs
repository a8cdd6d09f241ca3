//! The stateful half of the decoder: the relation cache and the conversion of row messages into
//! [`Change`]s.
//!
//! Row messages name their table by relation id only, so the decoder remembers the last Relation
//! message for each id. The conversion errs towards "not known": whatever Postgres did not send
//! (non-key columns of a key tuple, the old row under REPLICA IDENTITY DEFAULT, unchanged TOAST
//! values) becomes [`Value::Unknown`], so the rules over-invalidate instead of missing a key.

use std::collections::HashMap;

use super::error::DecodeError;
use super::message::{Message, OldTuple, Relation, TupleValue, decode, decode_streamed};
use crate::change::{Change, Columns, Lsn, Op, Row, TableName, Value};

/// What one message means to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A transaction starts; its changes follow.
    Begin {
        /// The LSN of the transaction's commit record.
        final_lsn: Lsn,
        /// Commit time in microseconds since the Unix epoch.
        commit_time_us: i64,
        /// The transaction id.
        xid: u32,
    },
    /// One row change, or one truncated table.
    Change(Change),
    /// The transaction committed; `end_lsn` is what may be acknowledged once its work is done.
    Commit {
        /// The LSN of the commit record.
        commit_lsn: Lsn,
        /// The LSN just past the commit record.
        end_lsn: Lsn,
        /// Commit time in microseconds since the Unix epoch.
        commit_time_us: i64,
    },
    /// A block of changes of the streamed transaction `xid`, not committed yet, starts (protocol
    /// version 2, `streaming 'on'`): what follows up to [`Event::StreamStop`] belongs to it.
    StreamStart {
        /// The top-level transaction.
        xid: u32,
        /// Whether this is its first block: the server resends a streamed transaction from its
        /// first block after a reconnect.
        first: bool,
    },
    /// The changes that follow in the block were made by the (sub)transaction `xid`: sent
    /// whenever it differs from the previous change's in the block.
    Subtransaction {
        /// The subtransaction, or the top-level transaction itself.
        xid: u32,
    },
    /// The block of a streamed transaction ends.
    StreamStop,
    /// A streamed transaction committed: every block of it counts.
    StreamCommit {
        /// The top-level transaction.
        xid: u32,
        /// The LSN just past the commit record: what may be acknowledged once its work is done.
        end_lsn: Lsn,
        /// Commit time in microseconds since the Unix epoch.
        commit_time_us: i64,
    },
    /// A streamed transaction (`subxid == xid`), or one subtransaction of it, aborted: its
    /// changes never happened.
    StreamAbort {
        /// The top-level transaction.
        xid: u32,
        /// The subtransaction that aborted, or `xid`.
        subxid: u32,
    },
    /// A `pg_logical_emit_message` message, surfaced so the pipeline can use it as a heartbeat or
    /// marker; Postgres sends them only when the stream is started with `messages 'true'`.
    Message {
        /// The prefix the writer chose.
        prefix: String,
        /// The content, arbitrary bytes.
        content: Vec<u8>,
        /// Whether it was emitted inside a transaction (and so arrives between Begin and Commit).
        transactional: bool,
        /// The LSN of the message.
        lsn: Lsn,
    },
}

/// What the decoder remembers of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationInfo {
    /// The table, with an empty namespace read as `pg_catalog` as the protocol defines.
    pub table: TableName,
    /// Column names in table order, shared by every row decoded for this relation.
    pub columns: Columns,
    /// Per column, whether it is part of the replica identity key.
    pub key: Box<[bool]>,
    /// Per column, the oid of its data type.
    pub type_oids: Box<[u32]>,
    /// The replica identity setting (`relreplident`: `d`, `n`, `f` or `i`).
    pub replica_identity: u8,
}

impl From<Relation> for RelationInfo {
    fn from(relation: Relation) -> Self {
        let namespace = if relation.namespace.is_empty() {
            "pg_catalog".to_owned()
        } else {
            relation.namespace
        };
        RelationInfo {
            table: TableName::new(namespace, relation.name),
            key: relation.columns.iter().map(|c| c.is_key()).collect(),
            type_oids: relation.columns.iter().map(|c| c.type_oid).collect(),
            columns: relation.columns.into_iter().map(|c| c.name).collect(),
            replica_identity: relation.replica_identity,
        }
    }
}

impl RelationInfo {
    /// Converts tuple data to row values, checking the column count against the relation.
    fn values(&self, relation_id: u32, tuple: Vec<TupleValue>) -> Result<Vec<Value>, DecodeError> {
        if tuple.len() != self.columns.len() {
            return Err(DecodeError::ColumnCountMismatch {
                relation_id,
                expected: self.columns.len(),
                found: tuple.len(),
            });
        }
        // Same size and alignment, so this collect reuses the tuple's allocation.
        Ok(tuple
            .into_iter()
            .map(|value| match value {
                TupleValue::Null => Value::Null,
                TupleValue::UnchangedToast => Value::Unknown,
                TupleValue::Text(text) => Value::Text(text),
            })
            .collect())
    }

    /// Converts an old tuple; in a key tuple the non-key columns are placeholder nulls, not data.
    fn old_values(&self, relation_id: u32, old: OldTuple) -> Result<Vec<Value>, DecodeError> {
        match old {
            OldTuple::Full(tuple) => self.values(relation_id, tuple),
            OldTuple::Key(tuple) => {
                let mut values = self.values(relation_id, tuple)?;
                for (value, &key) in values.iter_mut().zip(self.key.iter()) {
                    if !key {
                        *value = Value::Unknown;
                    }
                }
                Ok(values)
            }
        }
    }

    /// The old row of an update that sent none: the key did not change, so the new row's key
    /// values are the old ones; everything else is unknown.
    fn key_of(&self, new: &[Value]) -> Vec<Value> {
        new.iter()
            .zip(self.key.iter())
            .map(|(value, &key)| if key { value.clone() } else { Value::Unknown })
            .collect()
    }

    /// Builds a row that shares the relation's column names.
    fn row(&self, values: Vec<Value>) -> Row {
        Row::new(self.columns.clone(), values)
    }
}

/// The transaction between a Begin and its Commit, whose position every change carries.
#[derive(Debug, Clone, Copy)]
struct Transaction {
    /// The Begin's final LSN, which is the commit LSN.
    commit_lsn: Lsn,
    /// Commit time in microseconds since the Unix epoch.
    commit_time_us: i64,
}

/// A block of a streamed transaction between its Stream Start and Stream Stop.
#[derive(Debug, Clone, Copy)]
struct Block {
    /// The (sub)transaction of the last change of the block, or the top-level one at its start.
    xid: u32,
}

/// What the changes of a streamed block carry for a commit not yet known.
const STREAMED: Transaction = Transaction {
    commit_lsn: Lsn(0),
    commit_time_us: 0,
};

/// Turns a stream of pgoutput messages into [`Event`]s, keeping the relation cache.
///
/// Pure: it does no I/O. One decoder serves one replication stream; call [`Decoder::clear`] when a
/// new stream starts, because Postgres resends the Relation messages there.
#[derive(Debug, Default)]
pub struct Decoder {
    /// Relation id to what its last Relation message said.
    relations: HashMap<u32, RelationInfo>,
    /// The open transaction, if a Begin came without its Commit yet.
    transaction: Option<Transaction>,
    /// The open block of a streamed transaction, if a Stream Start came without its Stop yet.
    block: Option<Block>,
}

impl Decoder {
    /// A decoder with an empty relation cache, outside any transaction.
    pub fn new() -> Self {
        Decoder::default()
    }

    /// What the cache holds for a relation id, if a Relation message described it.
    pub fn relation(&self, id: u32) -> Option<&RelationInfo> {
        self.relations.get(&id)
    }

    /// Forgets every relation and the open transaction, for a new stream after a reconnect.
    pub fn clear(&mut self) {
        self.relations.clear();
        self.transaction = None;
        self.block = None;
    }

    /// Decodes one message as this stream lays it out here: inside a streamed block, the
    /// messages that carry an xid are read with it, and given without it.
    pub fn decode(&self, data: &[u8]) -> Result<Message, DecodeError> {
        if self.block.is_none() {
            return decode(data);
        }
        Ok(match decode_streamed(data)? {
            Message::Streamed(streamed) => *streamed.message,
            other => other,
        })
    }

    /// Decodes one message and passes what it means to `emit`.
    ///
    /// Relation messages update the cache; Type and Origin messages are absorbed. On error nothing
    /// is emitted for the message, and the stream should be restarted (after [`Decoder::clear`]):
    /// every error here means the bytes are not what Postgres sends, or a message was lost.
    ///
    /// The messages of streamed transactions (protocol version 2) are read; those of two-phase
    /// commit are refused, since the stream never asks for them.
    pub fn apply(&mut self, data: &[u8], mut emit: impl FnMut(Event)) -> Result<(), DecodeError> {
        let message = match self.block {
            Some(_) => decode_streamed(data)?,
            None => decode(data)?,
        };
        self.message(message, &mut emit)
    }

    /// Passes what one decoded message means to `emit`.
    fn message(
        &mut self,
        message: Message,
        emit: &mut impl FnMut(Event),
    ) -> Result<(), DecodeError> {
        let kind = message.kind();
        match message {
            Message::Begin(begin) => {
                if self.transaction.is_some() || self.block.is_some() {
                    return Err(DecodeError::NestedBegin);
                }
                let commit_time_us = begin.commit_time_us();
                self.transaction = Some(Transaction {
                    commit_lsn: begin.final_lsn,
                    commit_time_us,
                });
                emit(Event::Begin {
                    final_lsn: begin.final_lsn,
                    commit_time_us,
                    xid: begin.xid,
                });
            }
            Message::Commit(commit) => {
                self.open(kind)?;
                self.transaction = None;
                emit(Event::Commit {
                    commit_lsn: commit.commit_lsn,
                    end_lsn: commit.end_lsn,
                    commit_time_us: commit.commit_time_us(),
                });
            }
            Message::Origin(_) | Message::Type(_) => {}
            Message::Relation(relation) => {
                // A schema change resends the relation under the same id: the new one wins.
                self.relations.insert(relation.id, relation.into());
            }
            Message::Insert(insert) => {
                let txn = self.open(kind)?;
                let rel = self.cached(insert.relation_id)?;
                let new = rel.values(insert.relation_id, insert.new)?;
                emit(change(txn, rel, Op::Insert, None, Some(new)));
            }
            Message::Update(update) => {
                let txn = self.open(kind)?;
                let rel = self.cached(update.relation_id)?;
                let mut new = rel.values(update.relation_id, update.new)?;
                let old = match update.old {
                    Some(old) => {
                        let old = rel.old_values(update.relation_id, old)?;
                        // An unchanged TOAST value is by definition the old value. Only text is
                        // copied: a NULL beside `u` contradicts the protocol, and keeping
                        // `Unknown` then over-invalidates instead of rendering no key.
                        for (new, old) in new.iter_mut().zip(&old) {
                            if *new == Value::Unknown && matches!(old, Value::Text(_)) {
                                new.clone_from(old);
                            }
                        }
                        old
                    }
                    None => rel.key_of(&new),
                };
                emit(change(txn, rel, Op::Update, Some(old), Some(new)));
            }
            Message::Delete(delete) => {
                let txn = self.open(kind)?;
                let rel = self.cached(delete.relation_id)?;
                let old = rel.old_values(delete.relation_id, delete.old)?;
                emit(change(txn, rel, Op::Delete, Some(old), None));
            }
            Message::Truncate(truncate) => {
                let txn = self.open(kind)?;
                // Look every id up before emitting, so an error emits nothing.
                let rels = truncate
                    .relation_ids
                    .iter()
                    .map(|&id| self.cached(id))
                    .collect::<Result<Vec<_>, _>>()?;
                for rel in rels {
                    emit(change(txn, rel, Op::Truncate, None, None));
                }
            }
            Message::Logical(message) => emit(Event::Message {
                transactional: message.is_transactional(),
                prefix: message.prefix,
                content: message.content,
                lsn: message.lsn,
            }),
            Message::StreamStart(start) => {
                if self.transaction.is_some() || self.block.is_some() {
                    return Err(DecodeError::OutOfPlace { message: kind });
                }
                self.block = Some(Block { xid: start.xid });
                emit(Event::StreamStart {
                    xid: start.xid,
                    first: start.is_first(),
                });
            }
            Message::StreamStop => {
                if self.block.take().is_none() {
                    return Err(DecodeError::OutOfPlace { message: kind });
                }
                emit(Event::StreamStop);
            }
            Message::StreamCommit(commit) => {
                self.between(kind)?;
                emit(Event::StreamCommit {
                    xid: commit.xid,
                    end_lsn: commit.end_lsn,
                    commit_time_us: super::pg_to_unix_us(commit.timestamp),
                });
            }
            Message::StreamAbort(abort) => {
                self.between(kind)?;
                emit(Event::StreamAbort {
                    xid: abort.xid,
                    subxid: abort.subxid,
                });
            }
            Message::Streamed(streamed) => {
                let block = self
                    .block
                    .as_mut()
                    .ok_or(DecodeError::OutOfPlace { message: kind })?;
                if block.xid != streamed.xid {
                    block.xid = streamed.xid;
                    emit(Event::Subtransaction { xid: streamed.xid });
                }
                return self.message(*streamed.message, emit);
            }
            Message::BeginPrepare(_)
            | Message::Prepare(_)
            | Message::StreamPrepare(_)
            | Message::CommitPrepared(_)
            | Message::RollbackPrepared(_) => {
                return Err(DecodeError::NotRequested { message: kind });
            }
        }
        Ok(())
    }

    /// The open transaction, which a message of `kind` needs: a Begin's, or a streamed block's,
    /// whose commit is not known yet.
    fn open(&self, kind: &'static str) -> Result<Transaction, DecodeError> {
        self.transaction
            .or(self.block.map(|_| STREAMED))
            .ok_or(DecodeError::OutsideTransaction { message: kind })
    }

    /// Checks that neither a transaction nor a streamed block is open, as a message of `kind`
    /// that ends a streamed transaction needs.
    fn between(&self, kind: &'static str) -> Result<(), DecodeError> {
        if self.transaction.is_some() || self.block.is_some() {
            return Err(DecodeError::OutOfPlace { message: kind });
        }
        Ok(())
    }

    /// The cached relation for an id that a row or truncate message names.
    fn cached(&self, id: u32) -> Result<&RelationInfo, DecodeError> {
        self.relations
            .get(&id)
            .ok_or(DecodeError::UnknownRelation(id))
    }
}

/// Builds the change event for one row or table of the open transaction.
fn change(
    txn: Transaction,
    rel: &RelationInfo,
    op: Op,
    old: Option<Vec<Value>>,
    new: Option<Vec<Value>>,
) -> Event {
    Event::Change(Change {
        table: rel.table.clone(),
        op,
        old: old.map(|values| rel.row(values)),
        new: new.map(|values| rel.row(values)),
        commit_lsn: txn.commit_lsn,
        commit_time_us: txn.commit_time_us,
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::pgoutput::{
        Begin, Column, Commit, Delete, Insert, LogicalMessage, Origin, PG_EPOCH_OFFSET_US,
        Truncate, Type, Update, encode,
    };

    const CARS: u32 = 16_384;
    const BOOKINGS: u32 = 16_390;
    const FINAL_LSN: Lsn = Lsn(0x16_B374_D848);
    const PG_TIME: i64 = 800_000_000_000_000;

    /// `public.cars (id key, make, notes)`, or under another name for the replacement test.
    fn cars(name: &str) -> Message {
        Message::Relation(Relation {
            id: CARS,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'd',
            columns: [("id", true), ("make", false), ("notes", false)]
                .into_iter()
                .map(|(name, key)| Column {
                    flags: u8::from(key),
                    name: name.into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn begin() -> Message {
        Message::Begin(Begin {
            final_lsn: FINAL_LSN,
            timestamp: PG_TIME,
            xid: 771,
        })
    }

    fn commit() -> Message {
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: FINAL_LSN,
            end_lsn: Lsn(FINAL_LSN.0 + 48),
            timestamp: PG_TIME,
        })
    }

    fn t(s: &str) -> TupleValue {
        TupleValue::Text(s.into())
    }

    fn v(s: &str) -> Value {
        Value::Text(s.into())
    }

    /// Applies messages to a decoder that already saw `cars` and a Begin, and returns the events.
    fn run(messages: &[Message]) -> Result<Vec<Event>, DecodeError> {
        let mut decoder = Decoder::new();
        let mut events = Vec::new();
        for message in [cars("cars"), begin()].iter().chain(messages) {
            decoder.apply(&encode(message), |e| events.push(e))?;
        }
        Ok(events.split_off(1))
    }

    /// The single change that `message` produces inside a transaction.
    fn one_change(message: Message) -> Change {
        match run(&[message]).expect("applies").as_slice() {
            [Event::Change(change)] => change.clone(),
            other => panic!("expected one change, got {other:?}"),
        }
    }

    fn values(row: &Option<Row>) -> &[Value] {
        &row.as_ref().expect("row present").values
    }

    #[test]
    fn a_transaction_becomes_begin_changes_commit_with_unix_times() {
        let mut decoder = Decoder::new();
        let mut events = Vec::new();
        let insert = Message::Insert(Insert {
            relation_id: CARS,
            new: vec![t("1"), t("bmw"), TupleValue::Null],
        });
        for m in [cars("cars"), begin(), insert, commit()] {
            decoder.apply(&encode(&m), |e| events.push(e)).unwrap();
        }
        let unix = PG_TIME + PG_EPOCH_OFFSET_US;
        let columns: Columns = ["id", "make", "notes"].map(String::from).into();
        assert_eq!(
            events,
            vec![
                Event::Begin {
                    final_lsn: FINAL_LSN,
                    commit_time_us: unix,
                    xid: 771
                },
                Event::Change(Change {
                    table: TableName::new("public", "cars"),
                    op: Op::Insert,
                    old: None,
                    new: Some(Row::new(columns, vec![v("1"), v("bmw"), Value::Null])),
                    commit_lsn: FINAL_LSN,
                    commit_time_us: unix,
                }),
                Event::Commit {
                    commit_lsn: FINAL_LSN,
                    end_lsn: Lsn(FINAL_LSN.0 + 48),
                    commit_time_us: unix
                },
            ]
        );
    }

    #[test]
    fn update_with_full_old_row_keeps_it() {
        let change = one_change(Message::Update(Update {
            relation_id: CARS,
            old: Some(OldTuple::Full(vec![t("1"), t("audi"), TupleValue::Null])),
            new: vec![t("1"), t("bmw"), TupleValue::Null],
        }));
        assert_eq!(change.op, Op::Update);
        assert_eq!(values(&change.old), [v("1"), v("audi"), Value::Null]);
        assert_eq!(values(&change.new), [v("1"), v("bmw"), Value::Null]);
    }

    #[test]
    fn update_with_key_tuple_makes_non_key_columns_unknown_not_null() {
        let change = one_change(Message::Update(Update {
            relation_id: CARS,
            old: Some(OldTuple::Key(vec![
                t("1"),
                TupleValue::Null,
                TupleValue::Null,
            ])),
            new: vec![t("2"), t("bmw"), TupleValue::Null],
        }));
        assert_eq!(
            values(&change.old),
            [v("1"), Value::Unknown, Value::Unknown]
        );
        assert_eq!(values(&change.new), [v("2"), v("bmw"), Value::Null]);
    }

    #[test]
    fn update_without_old_tuple_takes_the_key_from_the_new_row() {
        let change = one_change(Message::Update(Update {
            relation_id: CARS,
            old: None,
            new: vec![t("1"), t("bmw"), TupleValue::Null],
        }));
        assert_eq!(
            values(&change.old),
            [v("1"), Value::Unknown, Value::Unknown]
        );
        assert_eq!(values(&change.new), [v("1"), v("bmw"), Value::Null]);
    }

    #[test]
    fn update_without_old_tuple_or_key_knows_nothing_of_the_old_row() {
        let mut decoder = Decoder::new();
        let mut keyless = cars("cars");
        if let Message::Relation(r) = &mut keyless {
            r.replica_identity = b'n';
            r.columns.iter_mut().for_each(|c| c.flags = 0);
        }
        let update = Message::Update(Update {
            relation_id: CARS,
            old: None,
            new: vec![t("1"), t("bmw"), t("x")],
        });
        let mut events = Vec::new();
        for m in [keyless, begin(), update] {
            decoder.apply(&encode(&m), |e| events.push(e)).unwrap();
        }
        let Some(Event::Change(change)) = events.pop() else {
            panic!("expected a change, got {events:?}");
        };
        assert_eq!(
            values(&change.old),
            [Value::Unknown, Value::Unknown, Value::Unknown]
        );
    }

    #[test]
    fn unchanged_toast_is_unknown_unless_the_old_row_knows_it() {
        let no_old = one_change(Message::Update(Update {
            relation_id: CARS,
            old: None,
            new: vec![t("1"), t("bmw"), TupleValue::UnchangedToast],
        }));
        assert_eq!(values(&no_old.new)[2], Value::Unknown);

        let full_old = one_change(Message::Update(Update {
            relation_id: CARS,
            old: Some(OldTuple::Full(vec![t("1"), t("audi"), t("long text")])),
            new: vec![t("1"), t("bmw"), TupleValue::UnchangedToast],
        }));
        assert_eq!(values(&full_old.new), [v("1"), v("bmw"), v("long text")]);

        let unknown_old = one_change(Message::Update(Update {
            relation_id: CARS,
            old: Some(OldTuple::Full(vec![
                t("1"),
                TupleValue::UnchangedToast,
                TupleValue::Null,
            ])),
            new: vec![
                t("1"),
                TupleValue::UnchangedToast,
                TupleValue::UnchangedToast,
            ],
        }));
        assert_eq!(values(&unknown_old.old)[1], Value::Unknown);
        // Neither an unknown nor a (contradictory) NULL old value is copied into the new row.
        assert_eq!(
            values(&unknown_old.new),
            [v("1"), Value::Unknown, Value::Unknown]
        );

        let insert = one_change(Message::Insert(Insert {
            relation_id: CARS,
            new: vec![t("1"), TupleValue::UnchangedToast, TupleValue::Null],
        }));
        assert_eq!(values(&insert.new)[1], Value::Unknown);
    }

    #[test]
    fn delete_takes_the_old_row_from_a_key_or_full_tuple() {
        let key = one_change(Message::Delete(Delete {
            relation_id: CARS,
            old: OldTuple::Key(vec![t("7"), TupleValue::Null, TupleValue::Null]),
        }));
        assert_eq!((key.op, key.new), (Op::Delete, None));
        assert_eq!(values(&key.old), [v("7"), Value::Unknown, Value::Unknown]);

        let full = one_change(Message::Delete(Delete {
            relation_id: CARS,
            old: OldTuple::Full(vec![t("7"), t("bmw"), TupleValue::Null]),
        }));
        assert_eq!(values(&full.old), [v("7"), v("bmw"), Value::Null]);
    }

    #[test]
    fn truncate_emits_one_change_per_relation() {
        let bookings = Message::Relation(Relation {
            id: BOOKINGS,
            namespace: String::new(),
            name: "bookings".into(),
            replica_identity: b'f',
            columns: vec![],
        });
        let truncate = Message::Truncate(Truncate {
            options: 1,
            relation_ids: vec![CARS, BOOKINGS],
        });
        let events = run(&[bookings, truncate]).unwrap();
        let tables: Vec<_> = events
            .iter()
            .map(|e| match e {
                Event::Change(c) if c.op == Op::Truncate && c.old.is_none() && c.new.is_none() => {
                    c.table.to_string()
                }
                other => panic!("expected a truncate change, got {other:?}"),
            })
            .collect();
        // An empty namespace is pg_catalog, as the protocol says.
        assert_eq!(tables, ["public.cars", "pg_catalog.bookings"]);
    }

    #[test]
    fn truncate_naming_an_unknown_relation_emits_nothing() {
        let mut decoder = Decoder::new();
        let mut events = Vec::new();
        for m in [cars("cars"), begin()] {
            decoder.apply(&encode(&m), |_| {}).unwrap();
        }
        let truncate = Message::Truncate(Truncate {
            options: 0,
            relation_ids: vec![CARS, 99],
        });
        let err = decoder.apply(&encode(&truncate), |e| events.push(e));
        assert_eq!(err, Err(DecodeError::UnknownRelation(99)));
        assert!(events.is_empty());
    }

    #[test]
    fn a_row_for_an_unknown_relation_is_an_error_not_a_skip() {
        let insert = Message::Insert(Insert {
            relation_id: 42,
            new: vec![],
        });
        assert_eq!(run(&[insert]), Err(DecodeError::UnknownRelation(42)));
    }

    #[test]
    fn a_tuple_with_the_wrong_column_count_is_an_error() {
        let expected = Err(DecodeError::ColumnCountMismatch {
            relation_id: CARS,
            expected: 3,
            found: 2,
        });
        let insert = Message::Insert(Insert {
            relation_id: CARS,
            new: vec![t("1"), t("bmw")],
        });
        assert_eq!(run(&[insert]), expected);
        let delete = Message::Delete(Delete {
            relation_id: CARS,
            old: OldTuple::Key(vec![t("1"), TupleValue::Null]),
        });
        assert_eq!(run(&[delete]), expected);
    }

    #[test]
    fn a_relation_message_replaces_the_cached_relation() {
        let mut decoder = Decoder::new();
        decoder.apply(&encode(&cars("cars")), |_| {}).unwrap();
        assert_eq!(decoder.relation(CARS).unwrap().table.name, "cars");
        let two_columns = Message::Relation(Relation {
            id: CARS,
            namespace: "fleet".into(),
            name: "vehicles".into(),
            replica_identity: b'f',
            columns: vec![Column {
                flags: 0,
                name: "vin".into(),
                type_oid: 1043,
                type_modifier: 21,
            }],
        });
        decoder.apply(&encode(&two_columns), |_| {}).unwrap();
        let rel = decoder.relation(CARS).unwrap();
        assert_eq!(rel.table, TableName::new("fleet", "vehicles"));
        assert_eq!(&*rel.columns, ["vin".to_owned()]);
        assert_eq!((&*rel.key, &*rel.type_oids), (&[false][..], &[1043][..]));
        assert_eq!(rel.replica_identity, b'f');
        let mut events = Vec::new();
        decoder.apply(&encode(&begin()), |_| {}).unwrap();
        let insert = Message::Insert(Insert {
            relation_id: CARS,
            new: vec![t("WVW")],
        });
        decoder.apply(&encode(&insert), |e| events.push(e)).unwrap();
        assert!(matches!(&events[..], [Event::Change(c)] if c.table.name == "vehicles"));
    }

    #[test]
    fn rows_and_commits_outside_a_transaction_are_errors() {
        let mut decoder = Decoder::new();
        decoder.apply(&encode(&cars("cars")), |_| {}).unwrap();
        let insert = Message::Insert(Insert {
            relation_id: CARS,
            new: vec![t("1"), t("bmw"), TupleValue::Null],
        });
        let truncate = Message::Truncate(Truncate {
            options: 0,
            relation_ids: vec![CARS],
        });
        for (message, kind) in [
            (insert, "insert"),
            (truncate, "truncate"),
            (commit(), "commit"),
        ] {
            assert_eq!(
                decoder.apply(&encode(&message), |_| {}),
                Err(DecodeError::OutsideTransaction { message: kind })
            );
        }
    }

    #[test]
    fn a_begin_inside_a_transaction_is_an_error() {
        assert_eq!(run(&[begin()]), Err(DecodeError::NestedBegin));
    }

    #[test]
    fn clear_forgets_relations_and_the_open_transaction() {
        let mut decoder = Decoder::new();
        for m in [cars("cars"), begin()] {
            decoder.apply(&encode(&m), |_| {}).unwrap();
        }
        decoder.clear();
        assert_eq!(decoder.relation(CARS), None);
        // A new stream starts with a Begin, which must not look nested.
        decoder.apply(&encode(&begin()), |_| {}).unwrap();
    }

    #[test]
    fn origin_and_type_are_absorbed_and_logical_messages_surface() {
        let origin = Message::Origin(Origin {
            commit_lsn: Lsn(5),
            name: "node_a".into(),
        });
        let ty = Message::Type(Type {
            id: 90_000,
            namespace: "public".into(),
            name: "mood".into(),
        });
        let heartbeat = Message::Logical(LogicalMessage {
            flags: LogicalMessage::TRANSACTIONAL,
            lsn: Lsn(9),
            prefix: "invalidator".into(),
            content: b"beat".to_vec(),
        });
        assert_eq!(
            run(&[origin, ty, heartbeat]).unwrap(),
            [Event::Message {
                prefix: "invalidator".into(),
                content: b"beat".to_vec(),
                transactional: true,
                lsn: Lsn(9),
            }]
        );
    }

    /// The value a wire column stands for when nothing better is known.
    fn plain(value: &TupleValue) -> Value {
        match value {
            TupleValue::Null => Value::Null,
            TupleValue::UnchangedToast => Value::Unknown,
            TupleValue::Text(text) => Value::Text(text.clone()),
        }
    }

    fn tuple_of(n: usize) -> impl Strategy<Value = Vec<TupleValue>> {
        let value = prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            "[a-c]{0,2}".prop_map(TupleValue::Text),
        ];
        prop::collection::vec(value, n)
    }

    /// Key flags, an optional old tuple (`true` for `K`) and a new tuple, all of one width.
    type UpdateParts = (Vec<bool>, Option<(bool, Vec<TupleValue>)>, Vec<TupleValue>);

    fn update_parts() -> impl Strategy<Value = UpdateParts> {
        (0usize..6).prop_flat_map(|n| {
            (
                prop::collection::vec(any::<bool>(), n),
                prop::option::of((any::<bool>(), tuple_of(n))),
                tuple_of(n),
            )
        })
    }

    proptest! {
        /// Placeholders never become data: what Postgres did not send is `Unknown`, and a value
        /// is only ever copied from the same column of the same row change.
        #[test]
        fn update_conversion_never_invents_values((key, old, new) in update_parts()) {
            let relation = Message::Relation(Relation {
                id: CARS,
                namespace: "public".into(),
                name: "cars".into(),
                replica_identity: b'd',
                columns: key
                    .iter()
                    .enumerate()
                    .map(|(i, &key)| Column {
                        flags: u8::from(key),
                        name: format!("c{i}"),
                        type_oid: 25,
                        type_modifier: -1,
                    })
                    .collect(),
            });
            let update = Message::Update(Update {
                relation_id: CARS,
                old: old.clone().map(|(is_key, tuple)| {
                    if is_key { OldTuple::Key(tuple) } else { OldTuple::Full(tuple) }
                }),
                new: new.clone(),
            });
            let mut decoder = Decoder::new();
            let mut events = Vec::new();
            for m in [relation, begin(), update] {
                decoder.apply(&encode(&m), |e| events.push(e)).unwrap();
            }
            let Some(Event::Change(change)) = events.pop() else {
                panic!("expected a change, got {events:?}");
            };
            let (got_old, got_new) = (values(&change.old), values(&change.new));
            for i in 0..key.len() {
                let want_old = match &old {
                    Some((false, tuple)) => plain(&tuple[i]),
                    Some((true, tuple)) if key[i] => plain(&tuple[i]),
                    None if key[i] => plain(&new[i]),
                    _ => Value::Unknown,
                };
                let want_new = match (&new[i], &want_old) {
                    (TupleValue::UnchangedToast, Value::Text(_)) if old.is_some() => want_old.clone(),
                    (value, _) => plain(value),
                };
                prop_assert_eq!(&got_old[i], &want_old, "old column {}", i);
                prop_assert_eq!(&got_new[i], &want_new, "new column {}", i);
            }
        }
    }
}
