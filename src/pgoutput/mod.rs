//! Decoder for the `pgoutput` logical replication plugin. Pure: no I/O, no tokio. The stream is
//! read with protocol version 1, or version 2 with large transactions streamed in blocks before
//! they commit (PostgreSQL 14+), which `Decoder` follows; the messages of two-phase commit
//! (version 3) decode too, and `Decoder` refuses them, since the stream never asks for them.
//!
//! ```text
//! XLogData payload ──decode──▶ Message ──Decoder::apply──▶ Event::{Begin, Change, Commit, Message,
//!                                                        StreamStart, Subtransaction, StreamStop,
//!                                                        StreamCommit, StreamAbort}
//!                  ◀──encode──           (relation cache)
//! ```
//!
//! - `message.rs`: the wire messages and [`decode`], every read bounds-checked by `reader.rs`.
//! - `streaming.rs`: the messages of streamed transactions and of two-phase commit, and the xid
//!   that version 1 messages carry inside a streamed block ([`decode_streamed`]).
//! - `encode.rs`: [`encode`], the exact inverse, so tests can build WAL by hand.
//! - `decoder.rs`: the stateful [`Decoder`], which keeps the relation cache and turns row messages
//!   into [`Change`](crate::change::Change)s, marking what Postgres did not send as `Unknown`.
//! - `error.rs`: [`DecodeError`], which names the field and offset of every failure.

mod decoder;
mod encode;
mod error;
mod message;
mod reader;
mod streaming;
#[cfg(test)]
mod tests;

pub use decoder::{Decoder, Event, RelationInfo};
pub use encode::encode;
pub use error::{Byte, DecodeError};
pub use message::{
    Begin, Column, Commit, Delete, Insert, LogicalMessage, Message, OldTuple, Origin,
    PG_EPOCH_OFFSET_US, Relation, Truncate, TupleValue, Type, Update, decode, decode_streamed,
    pg_to_unix_us,
};
pub use streaming::{
    AbortPoint, BeginPrepare, CommitPrepared, Prepare, RollbackPrepared, StreamAbort, StreamCommit,
    StreamStart, Streamed,
};
