//! The inverse of `decode`: builds the bytes Postgres would send, so that tests and
//! pipeline tests can write WAL by hand without a server.

use super::message::{Message, OldTuple, TupleValue};

/// Encodes a message exactly as pgoutput lays it out (a [`Message::Streamed`] as inside a
/// streamed block, for [`super::decode_streamed`]).
///
/// Strings must not contain NUL, which the wire format cannot carry.
///
/// # Panics
///
/// If a count or length does not fit its wire field: more than 65 535 columns, more than
/// `u32::MAX` relation ids, or a value or content longer than `u32::MAX` bytes.
pub fn encode(message: &Message) -> Vec<u8> {
    let mut w = Vec::with_capacity(64);
    match message {
        Message::Begin(m) => {
            w.push(b'B');
            w.extend_from_slice(&m.final_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.timestamp.to_be_bytes());
            w.extend_from_slice(&m.xid.to_be_bytes());
        }
        Message::Commit(m) => {
            w.push(b'C');
            w.push(m.flags);
            w.extend_from_slice(&m.commit_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.end_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.timestamp.to_be_bytes());
        }
        Message::Origin(m) => {
            w.push(b'O');
            w.extend_from_slice(&m.commit_lsn.0.to_be_bytes());
            cstr(&mut w, &m.name);
        }
        Message::Relation(m) => {
            w.push(b'R');
            w.extend_from_slice(&m.id.to_be_bytes());
            cstr(&mut w, &m.namespace);
            cstr(&mut w, &m.name);
            w.push(m.replica_identity);
            w.extend_from_slice(&count16(m.columns.len()).to_be_bytes());
            for column in &m.columns {
                w.push(column.flags);
                cstr(&mut w, &column.name);
                w.extend_from_slice(&column.type_oid.to_be_bytes());
                w.extend_from_slice(&column.type_modifier.to_be_bytes());
            }
        }
        Message::Type(m) => {
            w.push(b'Y');
            w.extend_from_slice(&m.id.to_be_bytes());
            cstr(&mut w, &m.namespace);
            cstr(&mut w, &m.name);
        }
        Message::Insert(m) => {
            w.push(b'I');
            w.extend_from_slice(&m.relation_id.to_be_bytes());
            w.push(b'N');
            tuple(&mut w, &m.new);
        }
        Message::Update(m) => {
            w.push(b'U');
            w.extend_from_slice(&m.relation_id.to_be_bytes());
            if let Some(old) = &m.old {
                old_tuple(&mut w, old);
            }
            w.push(b'N');
            tuple(&mut w, &m.new);
        }
        Message::Delete(m) => {
            w.push(b'D');
            w.extend_from_slice(&m.relation_id.to_be_bytes());
            old_tuple(&mut w, &m.old);
        }
        Message::Truncate(m) => {
            w.push(b'T');
            w.extend_from_slice(&len32(m.relation_ids.len()).to_be_bytes());
            w.push(m.options);
            for id in &m.relation_ids {
                w.extend_from_slice(&id.to_be_bytes());
            }
        }
        Message::Logical(m) => {
            w.push(b'M');
            w.push(m.flags);
            w.extend_from_slice(&m.lsn.0.to_be_bytes());
            cstr(&mut w, &m.prefix);
            w.extend_from_slice(&len32(m.content.len()).to_be_bytes());
            w.extend_from_slice(&m.content);
        }
        Message::StreamStart(m) => {
            w.push(b'S');
            w.extend_from_slice(&m.xid.to_be_bytes());
            w.push(m.first_segment);
        }
        Message::StreamStop => w.push(b'E'),
        Message::StreamCommit(m) => {
            w.push(b'c');
            w.extend_from_slice(&m.xid.to_be_bytes());
            w.push(m.flags);
            w.extend_from_slice(&m.commit_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.end_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.timestamp.to_be_bytes());
        }
        Message::StreamAbort(m) => {
            w.push(b'A');
            w.extend_from_slice(&m.xid.to_be_bytes());
            w.extend_from_slice(&m.subxid.to_be_bytes());
            if let Some(abort) = m.abort {
                w.extend_from_slice(&abort.lsn.0.to_be_bytes());
                w.extend_from_slice(&abort.timestamp.to_be_bytes());
            }
        }
        Message::BeginPrepare(m) => {
            w.push(b'b');
            w.extend_from_slice(&m.prepare_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.end_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.timestamp.to_be_bytes());
            w.extend_from_slice(&m.xid.to_be_bytes());
            cstr(&mut w, &m.gid);
        }
        Message::Prepare(m) | Message::StreamPrepare(m) => {
            let streamed = matches!(message, Message::StreamPrepare(_));
            w.push(if streamed { b'p' } else { b'P' });
            w.push(m.flags);
            w.extend_from_slice(&m.prepare_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.end_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.timestamp.to_be_bytes());
            w.extend_from_slice(&m.xid.to_be_bytes());
            cstr(&mut w, &m.gid);
        }
        Message::CommitPrepared(m) => {
            w.push(b'K');
            w.push(m.flags);
            w.extend_from_slice(&m.commit_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.end_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.timestamp.to_be_bytes());
            w.extend_from_slice(&m.xid.to_be_bytes());
            cstr(&mut w, &m.gid);
        }
        Message::RollbackPrepared(m) => {
            w.push(b'r');
            w.push(m.flags);
            w.extend_from_slice(&m.prepare_end_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.rollback_end_lsn.0.to_be_bytes());
            w.extend_from_slice(&m.prepare_timestamp.to_be_bytes());
            w.extend_from_slice(&m.rollback_timestamp.to_be_bytes());
            w.extend_from_slice(&m.xid.to_be_bytes());
            cstr(&mut w, &m.gid);
        }
        Message::Streamed(m) => {
            // The version 1 layout with the xid after the tag.
            let inner = encode(&m.message);
            w.push(inner[0]);
            w.extend_from_slice(&m.xid.to_be_bytes());
            w.extend_from_slice(&inner[1..]);
        }
    }
    w
}

/// Writes a NUL-terminated string.
fn cstr(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(s.as_bytes());
    w.push(0);
}

/// Writes an old tuple behind its `K` or `O` marker.
fn old_tuple(w: &mut Vec<u8>, old: &OldTuple) {
    let (marker, values) = match old {
        OldTuple::Key(values) => (b'K', values),
        OldTuple::Full(values) => (b'O', values),
    };
    w.push(marker);
    tuple(w, values);
}

/// Writes TupleData.
fn tuple(w: &mut Vec<u8>, values: &[TupleValue]) {
    w.extend_from_slice(&count16(values.len()).to_be_bytes());
    for value in values {
        match value {
            TupleValue::Null => w.push(b'n'),
            TupleValue::UnchangedToast => w.push(b'u'),
            TupleValue::Text(text) => {
                w.push(b't');
                w.extend_from_slice(&len32(text.len()).to_be_bytes());
                w.extend_from_slice(text.as_bytes());
            }
        }
    }
}

/// Converts a column count to its `Int16` field.
fn count16(n: usize) -> u16 {
    u16::try_from(n).expect("a pgoutput message holds at most 65 535 columns")
}

/// Converts a length or relation count to its `Int32` field.
fn len32(n: usize) -> u32 {
    u32::try_from(n).expect("a pgoutput length or count fits in 32 bits")
}
