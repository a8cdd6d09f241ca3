//! The pgoutput messages and their decoder: those of protocol version 1 here, those of streamed
//! transactions and two-phase commit in `streaming.rs`.
//!
//! The layouts follow the PostgreSQL documentation, "Logical Replication Message Formats". Each
//! type keeps every field that is on the wire, so that `encode` can rebuild the exact bytes.

use super::error::{Byte, DecodeError};
use super::reader::Reader;
use super::streaming::{
    self, BeginPrepare, CommitPrepared, Prepare, RollbackPrepared, StreamAbort, StreamCommit,
    StreamStart, Streamed,
};
use crate::change::Lsn;

/// Microseconds from the Unix epoch (1970-01-01) to the PostgreSQL epoch (2000-01-01).
pub const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Converts a PostgreSQL timestamp (microseconds since 2000-01-01) to microseconds since the Unix
/// epoch; it saturates, so `infinity` (`i64::MAX`) and hostile values cannot overflow.
pub fn pg_to_unix_us(pg_us: i64) -> i64 {
    pg_us.saturating_add(PG_EPOCH_OFFSET_US)
}

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// `B`: a transaction starts.
    Begin(Begin),
    /// `C`: the transaction commits.
    Commit(Commit),
    /// `O`: the transaction came from another node.
    Origin(Origin),
    /// `R`: the shape of a table, sent before its first row on a stream and after a schema change.
    Relation(Relation),
    /// `Y`: a non-built-in data type used by a relation.
    Type(Type),
    /// `I`: a row was inserted.
    Insert(Insert),
    /// `U`: a row was updated.
    Update(Update),
    /// `D`: a row was deleted.
    Delete(Delete),
    /// `T`: tables were truncated.
    Truncate(Truncate),
    /// `M`: a logical decoding message from `pg_logical_emit_message` (only with `messages 'true'`).
    Logical(LogicalMessage),
    /// `S`: a block of a transaction streamed before it commits starts (protocol version 2).
    StreamStart(StreamStart),
    /// `E`: the block ends.
    StreamStop,
    /// `c`: a streamed transaction committed.
    StreamCommit(StreamCommit),
    /// `A`: a streamed transaction, or one of its subtransactions, aborted.
    StreamAbort(StreamAbort),
    /// `b`: a transaction prepared for two-phase commit starts (protocol version 3).
    BeginPrepare(BeginPrepare),
    /// `P`: the transaction that Begin Prepare opened is prepared.
    Prepare(Prepare),
    /// `p`: a streamed transaction is prepared.
    StreamPrepare(Prepare),
    /// `K`: COMMIT PREPARED.
    CommitPrepared(CommitPrepared),
    /// `r`: ROLLBACK PREPARED.
    RollbackPrepared(RollbackPrepared),
    /// A row, relation, type or logical decoding message inside a streamed block, which carries
    /// the xid of its (sub)transaction; only [`decode_streamed`] returns it.
    Streamed(Streamed),
}

/// The start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Begin {
    /// The LSN of the transaction's commit record.
    pub final_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01, as sent.
    pub timestamp: i64,
    /// The transaction id.
    pub xid: u32,
}

/// The end of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commit {
    /// Flags; unused by Postgres so far, kept so the message round-trips.
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: what the client acknowledges.
    pub end_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01, as sent.
    pub timestamp: i64,
}

/// The origin of a transaction replicated from another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The LSN of the commit on the origin server.
    pub commit_lsn: Lsn,
    /// The name of the origin.
    pub name: String,
}

/// The description of a table that later row messages refer to by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// The relation's oid, used as its id in row messages.
    pub id: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    /// The table name.
    pub name: String,
    /// The replica identity setting (`relreplident`: `d`efault, `n`othing, `f`ull or `i`ndex).
    pub replica_identity: u8,
    /// The columns in table order, generated columns excluded.
    pub columns: Vec<Column>,
}

/// One column of a [`Relation`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Flags; bit 1 ([`Column::KEY`]) marks a column of the replica identity key.
    pub flags: u8,
    /// The column name.
    pub name: String,
    /// The oid of the column's data type.
    pub type_oid: u32,
    /// The type modifier (`atttypmod`), -1 when there is none.
    pub type_modifier: i32,
}

impl Column {
    /// The flag bit that marks a key column.
    pub const KEY: u8 = 1;

    /// Whether the column is part of the replica identity key, and so is sent in `K` tuples.
    pub fn is_key(&self) -> bool {
        self.flags & Column::KEY != 0
    }
}

/// The description of a data type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Type {
    /// The type's oid.
    pub id: u32,
    /// The schema; empty for `pg_catalog`.
    pub namespace: String,
    /// The type name.
    pub name: String,
}

/// One column value of tuple data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TupleValue {
    /// `n`: SQL NULL.
    Null,
    /// `u`: an unchanged TOAST value, whose content Postgres does not send.
    UnchangedToast,
    /// `t`: the value in text form.
    Text(String),
}

/// The old row sent with an update or a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldTuple {
    /// `K`: only the key columns hold values; the others are sent as nulls that mean "not sent".
    Key(Vec<TupleValue>),
    /// `O`: the whole old row (REPLICA IDENTITY FULL).
    Full(Vec<TupleValue>),
}

/// An inserted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Insert {
    /// The relation the row belongs to.
    pub relation_id: u32,
    /// The new row.
    pub new: Vec<TupleValue>,
}

/// An updated row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    /// The relation the row belongs to.
    pub relation_id: u32,
    /// The old row or key; absent when the key did not change and the identity is not FULL.
    pub old: Option<OldTuple>,
    /// The new row.
    pub new: Vec<TupleValue>,
}

/// A deleted row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    /// The relation the row belonged to.
    pub relation_id: u32,
    /// The old row or key.
    pub old: OldTuple,
}

/// Truncated tables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Truncate {
    /// Option bits: 1 for CASCADE, 2 for RESTART IDENTITY.
    pub options: u8,
    /// The relations that were truncated.
    pub relation_ids: Vec<u32>,
}

/// A message written with `pg_logical_emit_message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalMessage {
    /// Flags; bit 1 ([`LogicalMessage::TRANSACTIONAL`]) marks a transactional message.
    pub flags: u8,
    /// The LSN of the message.
    pub lsn: Lsn,
    /// The prefix the writer chose, which says who the message is for.
    pub prefix: String,
    /// The content, arbitrary bytes.
    pub content: Vec<u8>,
}

impl LogicalMessage {
    /// The flag bit that marks a transactional message.
    pub const TRANSACTIONAL: u8 = 1;

    /// Whether the message was emitted inside a transaction and arrives between its Begin and Commit.
    pub fn is_transactional(&self) -> bool {
        self.flags & LogicalMessage::TRANSACTIONAL != 0
    }
}

impl Begin {
    /// Commit time in microseconds since the Unix epoch.
    pub fn commit_time_us(&self) -> i64 {
        pg_to_unix_us(self.timestamp)
    }
}

impl Commit {
    /// Commit time in microseconds since the Unix epoch.
    pub fn commit_time_us(&self) -> i64 {
        pg_to_unix_us(self.timestamp)
    }
}

impl Message {
    /// The lowercase name of the message kind, used in errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Begin(_) => "begin",
            Message::Commit(_) => "commit",
            Message::Origin(_) => "origin",
            Message::Relation(_) => "relation",
            Message::Type(_) => "type",
            Message::Insert(_) => "insert",
            Message::Update(_) => "update",
            Message::Delete(_) => "delete",
            Message::Truncate(_) => "truncate",
            Message::Logical(_) => "logical decoding",
            Message::StreamStart(_) => "stream start",
            Message::StreamStop => "stream stop",
            Message::StreamCommit(_) => "stream commit",
            Message::StreamAbort(_) => "stream abort",
            Message::BeginPrepare(_) => "begin prepare",
            Message::Prepare(_) => "prepare",
            Message::StreamPrepare(_) => "stream prepare",
            Message::CommitPrepared(_) => "commit prepared",
            Message::RollbackPrepared(_) => "rollback prepared",
            Message::Streamed(streamed) => streamed.message.kind(),
        }
    }
}

/// Decodes one pgoutput message (the payload of one `XLogData` frame).
///
/// Every field is bounds-checked; a truncated, over-long or malformed message is an error, never a
/// panic, and a declared length or count is checked against the bytes left before it allocates.
pub fn decode(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader::new(data);
    let tag = r.u8("message tag")?;
    let message = body(tag, &mut r)?;
    r.finish(message.kind())?;
    Ok(message)
}

/// Decodes one message inside a streamed block (after Stream Start, up to Stream Stop), where
/// the row, relation, type and logical decoding messages carry an xid after their tag: those
/// come back as [`Message::Streamed`], any other as [`decode`] reads it.
pub fn decode_streamed(data: &[u8]) -> Result<Message, DecodeError> {
    let mut r = Reader::new(data);
    let tag = r.u8("message tag")?;
    let message = if streaming::XID_TAGS.contains(&tag) {
        let xid = r.u32("xid")?;
        Message::Streamed(Streamed {
            xid,
            message: Box::new(body(tag, &mut r)?),
        })
    } else {
        body(tag, &mut r)?
    };
    r.finish(message.kind())?;
    Ok(message)
}

/// Decodes what follows the tag of a message.
fn body(tag: u8, r: &mut Reader<'_>) -> Result<Message, DecodeError> {
    Ok(match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: Lsn(r.u64("final LSN")?),
            timestamp: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            timestamp: r.i64("commit timestamp")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: Lsn(r.u64("origin commit LSN")?),
            name: r.cstr("origin name")?,
        }),
        b'R' => Message::Relation(relation(r)?),
        b'Y' => Message::Type(Type {
            id: r.u32("type oid")?,
            namespace: r.cstr("type namespace")?,
            name: r.cstr("type name")?,
        }),
        b'I' => {
            let relation_id = r.u32("relation id")?;
            expect_marker(r, b'N', "'N'")?;
            Message::Insert(Insert {
                relation_id,
                new: tuple(r)?,
            })
        }
        b'U' => {
            let relation_id = r.u32("relation id")?;
            let offset = r.offset();
            let old = match r.u8("tuple marker")? {
                b'N' => None,
                b'K' => Some(OldTuple::Key(tuple(r)?)),
                b'O' => Some(OldTuple::Full(tuple(r)?)),
                found => return Err(unexpected_marker(offset, "'K', 'O' or 'N'", found)),
            };
            // The new tuple follows an old one behind its own marker.
            if old.is_some() {
                expect_marker(r, b'N', "'N'")?;
            }
            Message::Update(Update {
                relation_id,
                old,
                new: tuple(r)?,
            })
        }
        b'D' => {
            let relation_id = r.u32("relation id")?;
            let offset = r.offset();
            let old = match r.u8("tuple marker")? {
                b'K' => OldTuple::Key(tuple(r)?),
                b'O' => OldTuple::Full(tuple(r)?),
                found => return Err(unexpected_marker(offset, "'K' or 'O'", found)),
            };
            Message::Delete(Delete { relation_id, old })
        }
        b'T' => {
            let count = r.u32("relation count")?;
            let options = r.u8("truncate options")?;
            let count = usize::try_from(count).unwrap_or(usize::MAX);
            r.check_count(count, 4, "relation ids")?;
            let mut relation_ids = Vec::with_capacity(count);
            for _ in 0..count {
                relation_ids.push(r.u32("relation id")?);
            }
            Message::Truncate(Truncate {
                options,
                relation_ids,
            })
        }
        b'M' => Message::Logical(LogicalMessage {
            flags: r.u8("message flags")?,
            lsn: Lsn(r.u64("message LSN")?),
            prefix: r.cstr("message prefix")?,
            content: r.len_prefixed("message content")?.to_vec(),
        }),
        tag => match streaming::decode_body(tag, r)? {
            Some(message) => message,
            None => return Err(DecodeError::UnknownTag { tag: Byte(tag) }),
        },
    })
}

/// Decodes the body of a Relation message.
fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.cstr("relation namespace")?;
    let name = r.cstr("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let count = usize::from(r.u16("column count")?);
    // A column is at least a flag, an empty name's NUL, a type oid and a modifier: 10 bytes.
    r.check_count(count, 10, "columns")?;
    let mut columns = Vec::with_capacity(count);
    for _ in 0..count {
        columns.push(Column {
            flags: r.u8("column flags")?,
            name: r.cstr("column name")?,
            type_oid: r.u32("column type oid")?,
            type_modifier: r.i32("column type modifier")?,
        });
    }
    Ok(Relation {
        id,
        namespace,
        name,
        replica_identity,
        columns,
    })
}

/// Decodes TupleData: a column count, then one kind byte (and maybe a value) per column.
fn tuple(r: &mut Reader<'_>) -> Result<Vec<TupleValue>, DecodeError> {
    let count = usize::from(r.u16("tuple column count")?);
    // Each column is at least its kind byte.
    r.check_count(count, 1, "tuple columns")?;
    let mut values = Vec::with_capacity(count);
    for _ in 0..count {
        let offset = r.offset();
        values.push(match r.u8("tuple column kind")? {
            b'n' => TupleValue::Null,
            b'u' => TupleValue::UnchangedToast,
            b't' => TupleValue::Text(r.text("column value")?),
            b'b' => return Err(DecodeError::BinaryColumn { offset }),
            found => {
                return Err(DecodeError::UnknownTupleKind {
                    offset,
                    found: Byte(found),
                });
            }
        });
    }
    Ok(values)
}

/// Reads a tuple marker that must be `want`.
fn expect_marker(r: &mut Reader<'_>, want: u8, expected: &'static str) -> Result<(), DecodeError> {
    let offset = r.offset();
    match r.u8("tuple marker")? {
        found if found == want => Ok(()),
        found => Err(unexpected_marker(offset, expected, found)),
    }
}

/// The error for a tuple marker that is not allowed where it stands.
fn unexpected_marker(offset: usize, expected: &'static str, found: u8) -> DecodeError {
    DecodeError::UnexpectedTupleMarker {
        offset,
        expected,
        found: Byte(found),
    }
}
