//! Decoder for the `pgoutput` logical replication plugin, protocol version 1. Pure: no I/O, no tokio.
//!
//! ```text
//! XLogData payload ──decode──▶ Message ──Decoder::apply──▶ Event::{Begin, Change, Commit, Message}
//!                  ◀──encode──           (relation cache)
//! ```
//!
//! - `message.rs`: the wire messages and [`decode`], every read bounds-checked by `reader.rs`.
//! - `encode.rs`: [`encode`], the exact inverse, so tests can build WAL by hand.
//! - `decoder.rs`: the stateful [`Decoder`], which keeps the relation cache and turns row messages
//!   into [`Change`](crate::change::Change)s, marking what Postgres did not send as `Unknown`.
//! - `error.rs`: [`DecodeError`], which names the field and offset of every failure.

mod decoder;
mod encode;
mod error;
mod message;
mod reader;
#[cfg(test)]
mod tests;

pub use decoder::{Decoder, Event, RelationInfo};
pub use encode::encode;
pub use error::{Byte, DecodeError};
pub use message::{
    Begin, Column, Commit, Delete, Insert, LogicalMessage, Message, OldTuple, Origin,
    PG_EPOCH_OFFSET_US, Relation, Truncate, TupleValue, Type, Update, decode, pg_to_unix_us,
};
