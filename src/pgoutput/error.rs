//! The one error type of the decoder: what was wrong with the bytes, and where.

use std::fmt;

/// Why a pgoutput message could not be decoded or applied.
///
/// Offsets count bytes from the start of the message (its tag is at offset 0), so an error can be
/// matched against a hex dump of the `XLogData` payload.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The message ended (or a declared length or count ran past its end) before a field was complete.
    #[error(
        "truncated message: expected {expected} ({needed} bytes) at offset {offset}, but only {remaining} bytes remain"
    )]
    Truncated {
        /// Where the field starts.
        offset: usize,
        /// The field that was being read.
        expected: &'static str,
        /// How many bytes the field needs, as declared or fixed by the format.
        needed: u64,
        /// How many bytes the message still had.
        remaining: usize,
    },
    /// A NUL-terminated string had no NUL before the end of the message.
    #[error("unterminated string: expected {expected} ending in NUL at offset {offset}")]
    Unterminated {
        /// Where the string starts.
        offset: usize,
        /// The field that was being read.
        expected: &'static str,
    },
    /// A string or column value was not UTF-8, although the stream is requested in UTF-8.
    #[error("invalid UTF-8 in {expected} at offset {offset}")]
    InvalidUtf8 {
        /// Where the string starts.
        offset: usize,
        /// The field that was being read.
        expected: &'static str,
    },
    /// The first byte names no pgoutput message.
    #[error(
        "unknown message tag {tag} at offset 0: expected one of B C O R Y I U D T M, or of the \
         streaming and two-phase S E c A b P p K r"
    )]
    UnknownTag {
        /// The tag byte that was found.
        tag: Byte,
    },
    /// A row message did not have the tuple marker (`K`, `O` or `N`) the format requires here.
    #[error("unexpected tuple marker {found} at offset {offset}: expected {expected}")]
    UnexpectedTupleMarker {
        /// Where the marker is.
        offset: usize,
        /// The markers allowed here.
        expected: &'static str,
        /// The byte that was found.
        found: Byte,
    },
    /// A column of tuple data had a kind other than `n`, `u` or `t`.
    #[error("unknown tuple column kind {found} at offset {offset}: expected 'n', 'u' or 't'")]
    UnknownTupleKind {
        /// Where the kind byte is.
        offset: usize,
        /// The byte that was found.
        found: Byte,
    },
    /// A column was sent in binary form, which only protocol version 2 and later may do.
    #[error(
        "binary column value ('b') at offset {offset}: expected 'n', 'u' or 't' in protocol version 1"
    )]
    BinaryColumn {
        /// Where the kind byte is.
        offset: usize,
    },
    /// Bytes followed a complete message, which means the framing or the format is not what we think.
    #[error("{count} trailing bytes at offset {offset} after a complete {message} message")]
    TrailingBytes {
        /// Where the complete message ended.
        offset: usize,
        /// How many bytes were left over.
        count: usize,
        /// The kind of message that was complete.
        message: &'static str,
    },
    /// A row or truncate message named a relation that no Relation message has described.
    #[error("unknown relation id {0}: no Relation message was received for it on this stream")]
    UnknownRelation(u32),
    /// A tuple had a different number of columns than its relation.
    #[error("relation {relation_id} has {expected} columns, but a tuple for it has {found}")]
    ColumnCountMismatch {
        /// The relation the tuple belongs to.
        relation_id: u32,
        /// The column count of the cached Relation message.
        expected: usize,
        /// The column count of the tuple.
        found: usize,
    },
    /// A message that belongs inside a transaction came without a Begin before it.
    #[error("{message} message outside a transaction: no Begin before it")]
    OutsideTransaction {
        /// The kind of message.
        message: &'static str,
    },
    /// A message of two-phase commit, which a stream started without `two_phase` never
    /// carries.
    #[error("{message} message on a stream started without two-phase commit")]
    NotRequested {
        /// The kind of message.
        message: &'static str,
    },
    /// A message of a streamed transaction where none can be: a Stream Start inside a
    /// transaction or block, a Stream Stop outside a block, a Stream Commit or Abort inside one.
    #[error("{message} message out of place in the blocks of streamed transactions")]
    OutOfPlace {
        /// The kind of message.
        message: &'static str,
    },
    /// A Begin came while a transaction was open, so the previous Commit was lost.
    #[error("begin message inside a transaction: the previous Commit is missing")]
    NestedBegin,
}

/// A byte from the wire, shown as a character when it is printable ASCII and always in hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Byte(pub u8);

impl fmt::Display for Byte {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_ascii_graphic() {
            write!(f, "'{}' (0x{:02x})", char::from(self.0), self.0)
        } else {
            write!(f, "0x{:02x}", self.0)
        }
    }
}
