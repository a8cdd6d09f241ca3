//! The messages of large transactions streamed before they commit (protocol version 2,
//! PostgreSQL 14, `streaming 'on'`) and of two-phase commit (protocol version 3, PostgreSQL 15,
//! `two_phase 'on'`).
//!
//! ```text
//! streamed:   S(xid, first) [R Y I U D T M, each with the xid of its (sub)transaction] E
//!             ... more blocks, interleaved with other transactions ...
//!             c(xid)  commit: every block counts          A(xid, subxid)  abort: drop it
//!                                                          (subxid != xid: only that subxact)
//! two-phase:  b(gid) [changes] P(gid)  ...  K(gid) committed | r(gid) rolled back
//!             p(gid) after the blocks of a streamed transaction: S ... E p ... K | r
//! ```
//!
//! Layouts from the PostgreSQL documentation, "Logical Replication Message Formats"; the xid
//! inside a block is the one field protocol version 2 adds to the version 1 messages, so those
//! keep their types and are wrapped in [`Streamed`].

use super::error::DecodeError;
use super::message::Message;
use super::reader::Reader;
use crate::change::Lsn;

/// `S`: a block of changes of a transaction that has not committed yet starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStart {
    /// The top-level transaction the block belongs to.
    pub xid: u32,
    /// 1 for the transaction's first block, 0 for the others; kept as sent.
    pub first_segment: u8,
}

impl StreamStart {
    /// Whether this is the first block of the transaction.
    pub fn is_first(&self) -> bool {
        self.first_segment == 1
    }
}

/// `c`: a streamed transaction committed; every block of it counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamCommit {
    /// The transaction.
    pub xid: u32,
    /// Flags; unused by Postgres so far, kept so the message round-trips.
    pub flags: u8,
    /// The LSN of the commit record.
    pub commit_lsn: Lsn,
    /// The LSN just past the commit record: what the client acknowledges.
    pub end_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01, as sent.
    pub timestamp: i64,
}

/// `A`: a streamed transaction, or one subtransaction of it, aborted: its changes never happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamAbort {
    /// The top-level transaction.
    pub xid: u32,
    /// The subtransaction that aborted; equal to `xid` when the whole transaction did.
    pub subxid: u32,
    /// Where and when it aborted: sent only with `streaming 'parallel'` (protocol version 4).
    pub abort: Option<AbortPoint>,
}

impl StreamAbort {
    /// Whether the whole transaction aborted, not only a subtransaction.
    pub fn is_top_level(&self) -> bool {
        self.xid == self.subxid
    }
}

/// The position and time of an abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbortPoint {
    /// The LSN of the abort record.
    pub lsn: Lsn,
    /// Abort time in microseconds since 2000-01-01, as sent.
    pub timestamp: i64,
}

/// `b`: a transaction prepared for two-phase commit starts; its changes follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BeginPrepare {
    /// The LSN of the PREPARE TRANSACTION record.
    pub prepare_lsn: Lsn,
    /// The LSN just past it.
    pub end_lsn: Lsn,
    /// Prepare time in microseconds since 2000-01-01, as sent.
    pub timestamp: i64,
    /// The transaction id.
    pub xid: u32,
    /// The global identifier given to PREPARE TRANSACTION.
    pub gid: String,
}

/// `P` (after Begin Prepare and the changes) or `p` (after the blocks of a streamed
/// transaction): the transaction is prepared; it commits or rolls back later.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepare {
    /// Flags; unused by Postgres so far, kept so the message round-trips.
    pub flags: u8,
    /// The LSN of the PREPARE TRANSACTION record.
    pub prepare_lsn: Lsn,
    /// The LSN just past it.
    pub end_lsn: Lsn,
    /// Prepare time in microseconds since 2000-01-01, as sent.
    pub timestamp: i64,
    /// The transaction id.
    pub xid: u32,
    /// The global identifier.
    pub gid: String,
}

/// `K`: COMMIT PREPARED: the prepared transaction's changes now count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitPrepared {
    /// Flags; unused by Postgres so far.
    pub flags: u8,
    /// The LSN of the COMMIT PREPARED record.
    pub commit_lsn: Lsn,
    /// The LSN just past it: what the client acknowledges.
    pub end_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01, as sent.
    pub timestamp: i64,
    /// The transaction id.
    pub xid: u32,
    /// The global identifier.
    pub gid: String,
}

/// `r`: ROLLBACK PREPARED: the prepared transaction's changes never happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackPrepared {
    /// Flags; unused by Postgres so far.
    pub flags: u8,
    /// The end LSN of the prepared transaction.
    pub prepare_end_lsn: Lsn,
    /// The LSN just past the ROLLBACK PREPARED record: what the client acknowledges.
    pub rollback_end_lsn: Lsn,
    /// Prepare time in microseconds since 2000-01-01, as sent.
    pub prepare_timestamp: i64,
    /// Rollback time in microseconds since 2000-01-01, as sent.
    pub rollback_timestamp: i64,
    /// The transaction id.
    pub xid: u32,
    /// The global identifier.
    pub gid: String,
}

/// A version 1 message inside a streamed block, with the xid of the (sub)transaction that made
/// it: Relation, Type, Insert, Update, Delete, Truncate or a logical decoding message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streamed {
    /// The (sub)transaction the message belongs to; a Stream Abort names it.
    pub xid: u32,
    /// The message, laid out as in protocol version 1 after the xid.
    pub message: Box<Message>,
}

/// The tags of the version 1 messages that carry an xid inside a streamed block.
pub(super) const XID_TAGS: &[u8] = b"RYIUDTM";

/// Decodes the body (after the tag) of a streaming or two-phase message, or `None` when `tag`
/// is not one.
pub(super) fn decode_body(tag: u8, r: &mut Reader<'_>) -> Result<Option<Message>, DecodeError> {
    Ok(Some(match tag {
        b'S' => Message::StreamStart(StreamStart {
            xid: r.u32("xid")?,
            first_segment: r.u8("first segment flag")?,
        }),
        b'E' => Message::StreamStop,
        b'c' => Message::StreamCommit(StreamCommit {
            xid: r.u32("xid")?,
            flags: r.u8("commit flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            timestamp: r.i64("commit timestamp")?,
        }),
        b'A' => {
            let xid = r.u32("xid")?;
            let subxid = r.u32("subtransaction xid")?;
            // The abort position follows only in protocol version 4 with parallel streaming;
            // the message's length says which.
            let abort = if r.is_empty() {
                None
            } else {
                Some(AbortPoint {
                    lsn: Lsn(r.u64("abort LSN")?),
                    timestamp: r.i64("abort timestamp")?,
                })
            };
            Message::StreamAbort(StreamAbort { xid, subxid, abort })
        }
        b'b' => Message::BeginPrepare(BeginPrepare {
            prepare_lsn: Lsn(r.u64("prepare LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            timestamp: r.i64("prepare timestamp")?,
            xid: r.u32("xid")?,
            gid: r.cstr("gid")?,
        }),
        b'P' => Message::Prepare(prepare(r)?),
        b'p' => Message::StreamPrepare(prepare(r)?),
        b'K' => Message::CommitPrepared(CommitPrepared {
            flags: r.u8("commit flags")?,
            commit_lsn: Lsn(r.u64("commit LSN")?),
            end_lsn: Lsn(r.u64("end LSN")?),
            timestamp: r.i64("commit timestamp")?,
            xid: r.u32("xid")?,
            gid: r.cstr("gid")?,
        }),
        b'r' => Message::RollbackPrepared(RollbackPrepared {
            flags: r.u8("rollback flags")?,
            prepare_end_lsn: Lsn(r.u64("prepare end LSN")?),
            rollback_end_lsn: Lsn(r.u64("rollback end LSN")?),
            prepare_timestamp: r.i64("prepare timestamp")?,
            rollback_timestamp: r.i64("rollback timestamp")?,
            xid: r.u32("xid")?,
            gid: r.cstr("gid")?,
        }),
        _ => return Ok(None),
    }))
}

/// The body shared by Prepare and Stream Prepare.
fn prepare(r: &mut Reader<'_>) -> Result<Prepare, DecodeError> {
    Ok(Prepare {
        flags: r.u8("prepare flags")?,
        prepare_lsn: Lsn(r.u64("prepare LSN")?),
        end_lsn: Lsn(r.u64("end LSN")?),
        timestamp: r.i64("prepare timestamp")?,
        xid: r.u32("xid")?,
        gid: r.cstr("gid")?,
    })
}

#[cfg(test)]
pub(super) mod tests {
    use proptest::prelude::*;

    use super::super::{
        Begin, Decoder, Event, Insert, TupleValue, decode, decode_streamed, encode,
    };
    use super::*;

    /// One message of every streaming and two-phase kind, with and without the optional parts.
    pub(in crate::pgoutput) fn samples() -> Vec<Message> {
        let prepare = Prepare {
            flags: 0,
            prepare_lsn: Lsn(0x1_0000_0100),
            end_lsn: Lsn(0x1_0000_0130),
            timestamp: 800_000_000_000_000,
            xid: 900,
            gid: "order-17".into(),
        };
        vec![
            Message::StreamStart(StreamStart {
                xid: 900,
                first_segment: 1,
            }),
            Message::StreamStop,
            Message::StreamCommit(StreamCommit {
                xid: 900,
                flags: 0,
                commit_lsn: Lsn(0x1_0000_0200),
                end_lsn: Lsn(0x1_0000_0230),
                timestamp: 800_000_000_000_001,
            }),
            Message::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 901,
                abort: None,
            }),
            Message::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 900,
                abort: Some(AbortPoint {
                    lsn: Lsn(0x1_0000_0300),
                    timestamp: 800_000_000_000_002,
                }),
            }),
            Message::BeginPrepare(BeginPrepare {
                prepare_lsn: Lsn(0x1_0000_0100),
                end_lsn: Lsn(0x1_0000_0130),
                timestamp: 800_000_000_000_000,
                xid: 900,
                gid: "order-17".into(),
            }),
            Message::Prepare(prepare.clone()),
            Message::StreamPrepare(prepare),
            Message::CommitPrepared(CommitPrepared {
                flags: 0,
                commit_lsn: Lsn(0x1_0000_0400),
                end_lsn: Lsn(0x1_0000_0430),
                timestamp: 800_000_000_000_003,
                xid: 900,
                gid: "order-17".into(),
            }),
            Message::RollbackPrepared(RollbackPrepared {
                flags: 0,
                prepare_end_lsn: Lsn(0x1_0000_0130),
                rollback_end_lsn: Lsn(0x1_0000_0530),
                prepare_timestamp: 800_000_000_000_000,
                rollback_timestamp: 800_000_000_000_004,
                xid: 900,
                gid: "order-17".into(),
            }),
        ]
    }

    /// The version 1 messages that carry an xid inside a streamed block, one of each tag.
    fn streamable() -> Vec<Message> {
        super::super::tests::samples()
            .into_iter()
            .filter(|m| XID_TAGS.contains(&encode(m)[0]))
            .collect()
    }

    /// Whether `bytes` is a Stream Abort without its optional abort position: a message that
    /// is complete although it is a prefix of one with the position.
    fn abort_without_position(bytes: &[u8]) -> bool {
        bytes.len() == 9 && bytes[0] == b'A'
    }

    #[test]
    fn every_streaming_and_two_phase_kind_round_trips() {
        let samples = samples();
        let tags: std::collections::BTreeSet<u8> = samples.iter().map(|m| encode(m)[0]).collect();
        assert_eq!(tags, b"AEKPSbcpr".iter().copied().collect());
        for message in samples {
            assert_eq!(decode(&encode(&message)), Ok(message.clone()));
            // Outside the version 1 kinds a block holds, both readings agree.
            assert_eq!(decode_streamed(&encode(&message)), Ok(message));
        }
    }

    #[test]
    fn golden_bytes_match_the_documented_layouts() {
        let lsn = |n: u64| n.to_be_bytes();
        let ts = |n: i64| n.to_be_bytes();
        let xid = 900_u32.to_be_bytes();
        let golden: [Vec<u8>; 10] = [
            [&b"S"[..], &xid, &[1]].concat(),
            b"E".to_vec(),
            [
                &b"c"[..],
                &xid,
                &[0],
                &lsn(0x1_0000_0200),
                &lsn(0x1_0000_0230),
                &ts(800_000_000_000_001),
            ]
            .concat(),
            [&b"A"[..], &xid, &901_u32.to_be_bytes()].concat(),
            [
                &b"A"[..],
                &xid,
                &xid,
                &lsn(0x1_0000_0300),
                &ts(800_000_000_000_002),
            ]
            .concat(),
            [
                &b"b"[..],
                &lsn(0x1_0000_0100),
                &lsn(0x1_0000_0130),
                &ts(800_000_000_000_000),
                &xid,
                b"order-17\0",
            ]
            .concat(),
            [
                &b"P\0"[..],
                &lsn(0x1_0000_0100),
                &lsn(0x1_0000_0130),
                &ts(800_000_000_000_000),
                &xid,
                b"order-17\0",
            ]
            .concat(),
            [
                &b"p\0"[..],
                &lsn(0x1_0000_0100),
                &lsn(0x1_0000_0130),
                &ts(800_000_000_000_000),
                &xid,
                b"order-17\0",
            ]
            .concat(),
            [
                &b"K\0"[..],
                &lsn(0x1_0000_0400),
                &lsn(0x1_0000_0430),
                &ts(800_000_000_000_003),
                &xid,
                b"order-17\0",
            ]
            .concat(),
            [
                &b"r\0"[..],
                &lsn(0x1_0000_0130),
                &lsn(0x1_0000_0530),
                &ts(800_000_000_000_000),
                &ts(800_000_000_000_004),
                &xid,
                b"order-17\0",
            ]
            .concat(),
        ];
        for (bytes, message) in golden.iter().zip(samples()) {
            assert_eq!(decode(bytes), Ok(message.clone()), "{}", message.kind());
            assert_eq!(&encode(&message), bytes, "{}", message.kind());
        }
    }

    #[test]
    fn inside_a_block_row_messages_carry_the_xid_after_the_tag() {
        let insert = Message::Insert(Insert {
            relation_id: 16_384,
            new: vec![TupleValue::Text("1".into())],
        });
        let bytes = [
            &b"I"[..],
            &901_u32.to_be_bytes(),
            &16_384_u32.to_be_bytes(),
            b"N\x00\x01t\x00\x00\x00\x011",
        ]
        .concat();
        let streamed = Message::Streamed(Streamed {
            xid: 901,
            message: Box::new(insert.clone()),
        });
        assert_eq!(decode_streamed(&bytes), Ok(streamed.clone()));
        assert_eq!(encode(&streamed), bytes);
        assert_eq!(streamed.kind(), "insert");
        // Read as version 1, the xid is taken for the relation id and the rest does not fit.
        assert!(decode(&bytes).is_err());
        for message in streamable() {
            let streamed = Message::Streamed(Streamed {
                xid: 7,
                message: Box::new(message),
            });
            assert_eq!(decode_streamed(&encode(&streamed)), Ok(streamed));
        }
    }

    #[test]
    fn only_the_subtransaction_abort_names_another_xid() {
        let [.., Message::StreamAbort(sub), Message::StreamAbort(top)] = &samples()[..5] else {
            unreachable!("samples 3 and 4 are the aborts");
        };
        assert!(!sub.is_top_level());
        assert!(top.is_top_level());
        let [Message::StreamStart(start), ..] = &samples()[..] else {
            unreachable!("the samples start with a stream start");
        };
        assert!(start.is_first());
    }

    #[test]
    fn every_truncation_is_an_error_but_the_abort_without_its_position() {
        let mut messages = samples();
        messages.extend(streamable().into_iter().map(|message| {
            Message::Streamed(Streamed {
                xid: 7,
                message: Box::new(message),
            })
        }));
        for message in messages {
            let bytes = encode(&message);
            for len in 0..bytes.len() {
                match decode_streamed(&bytes[..len]) {
                    Ok(_) => assert!(
                        abort_without_position(&bytes[..len]),
                        "{} cut at {len} decoded",
                        message.kind()
                    ),
                    Err(err) => assert!(
                        matches!(
                            err,
                            DecodeError::Truncated { .. } | DecodeError::Unterminated { .. }
                        ),
                        "{} cut at {len}: {err}",
                        message.kind()
                    ),
                }
            }
        }
        // Half an abort position is neither form.
        let half = [&b"A"[..], &[0; 8], &[0; 8]].concat();
        assert!(matches!(
            decode(&half),
            Err(DecodeError::Truncated {
                expected: "abort timestamp",
                ..
            })
        ));
    }

    #[test]
    fn the_decoder_refuses_two_phase_messages_it_never_asks_for() {
        let mut decoder = Decoder::new();
        let two_phase = samples().into_iter().filter(|m| {
            matches!(
                m,
                Message::BeginPrepare(_)
                    | Message::Prepare(_)
                    | Message::StreamPrepare(_)
                    | Message::CommitPrepared(_)
                    | Message::RollbackPrepared(_)
            )
        });
        for message in two_phase {
            let err = decoder
                .apply(&encode(&message), |_| panic!("nothing is emitted"))
                .unwrap_err();
            assert_eq!(
                err,
                DecodeError::NotRequested {
                    message: message.kind()
                }
            );
        }
        // And the stream still decodes after them.
        let begin = Message::Begin(Begin {
            final_lsn: Lsn(1),
            timestamp: 0,
            xid: 1,
        });
        let mut events = 0;
        decoder.apply(&encode(&begin), |_| events += 1).unwrap();
        assert_eq!(events, 1);
    }

    /// The Relation of `public.cars (id key)`, with relation id 7.
    fn cars() -> Message {
        Message::Relation(super::super::Relation {
            id: 7,
            namespace: "public".into(),
            name: "cars".into(),
            replica_identity: b'd',
            columns: vec![super::super::Column {
                flags: 1,
                name: "id".into(),
                type_oid: 23,
                type_modifier: -1,
            }],
        })
    }

    /// A message of (sub)transaction `xid` inside a streamed block.
    fn within(xid: u32, message: Message) -> Vec<u8> {
        encode(&Message::Streamed(Streamed {
            xid,
            message: Box::new(message),
        }))
    }

    /// The insert of car `id`.
    fn insert(id: &str) -> Message {
        Message::Insert(Insert {
            relation_id: 7,
            new: vec![TupleValue::Text(id.into())],
        })
    }

    #[test]
    fn streamed_blocks_give_their_changes_with_the_subtransaction_that_made_them() {
        let mut decoder = Decoder::new();
        let mut events: Vec<String> = Vec::new();
        let start =
            |xid, first_segment| encode(&Message::StreamStart(StreamStart { xid, first_segment }));
        let wal = [
            start(900, 1),
            within(900, cars()),
            within(900, insert("1")),
            within(901, insert("2")),
            within(901, insert("3")),
            encode(&Message::StreamStop),
            start(900, 0),
            within(900, insert("4")),
            encode(&Message::StreamStop),
            encode(&Message::StreamAbort(StreamAbort {
                xid: 900,
                subxid: 901,
                abort: None,
            })),
            encode(&Message::StreamCommit(StreamCommit {
                xid: 900,
                flags: 0,
                commit_lsn: Lsn(0x500),
                end_lsn: Lsn(0x530),
                timestamp: 0,
            })),
        ];
        for data in &wal {
            decoder
                .apply(data, |event| {
                    events.push(match event {
                        Event::Change(change) => {
                            format!("change {:?}", change.new.unwrap().get("id"))
                        }
                        other => format!("{other:?}"),
                    })
                })
                .unwrap();
        }
        assert_eq!(
            events,
            [
                "StreamStart { xid: 900, first: true }",
                "change Text(\"1\")",
                "Subtransaction { xid: 901 }",
                "change Text(\"2\")",
                "change Text(\"3\")",
                "StreamStop",
                "StreamStart { xid: 900, first: false }",
                "change Text(\"4\")",
                "StreamStop",
                "StreamAbort { xid: 900, subxid: 901 }",
                format!(
                    "StreamCommit {{ xid: 900, end_lsn: Lsn(1328), commit_time_us: {} }}",
                    super::super::PG_EPOCH_OFFSET_US
                )
                .as_str(),
            ]
        );
    }

    #[test]
    fn streamed_messages_out_of_place_are_errors() {
        let commit = encode(&Message::StreamCommit(StreamCommit {
            xid: 900,
            flags: 0,
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            timestamp: 0,
        }));
        let start = encode(&Message::StreamStart(StreamStart {
            xid: 900,
            first_segment: 1,
        }));
        let begin = encode(&Message::Begin(Begin {
            final_lsn: Lsn(1),
            timestamp: 0,
            xid: 1,
        }));
        let out_of_place = |message| DecodeError::OutOfPlace { message };
        let mut decoder = Decoder::new();
        assert_eq!(
            decoder.apply(&encode(&Message::StreamStop), |_| {}),
            Err(out_of_place("stream stop"))
        );
        decoder.apply(&start, |_| {}).unwrap();
        assert_eq!(
            decoder.apply(&start, |_| {}),
            Err(out_of_place("stream start"))
        );
        assert_eq!(
            decoder.apply(&commit, |_| {}),
            Err(out_of_place("stream commit"))
        );
        assert_eq!(decoder.apply(&begin, |_| {}), Err(DecodeError::NestedBegin));
        let mut decoder = Decoder::new();
        decoder.apply(&begin, |_| {}).unwrap();
        assert_eq!(
            decoder.apply(&start, |_| {}),
            Err(out_of_place("stream start"))
        );
        assert_eq!(
            decoder.apply(&commit, |_| {}),
            Err(out_of_place("stream commit"))
        );
    }

    fn gid() -> impl Strategy<Value = String> {
        "[^\0]{0,12}"
    }

    fn lsn() -> impl Strategy<Value = Lsn> {
        any::<u64>().prop_map(Lsn)
    }

    /// Any streaming or two-phase message.
    pub(in crate::pgoutput) fn message() -> impl Strategy<Value = Message> {
        let prepare = || {
            (any::<u8>(), lsn(), lsn(), any::<i64>(), any::<u32>(), gid()).prop_map(
                |(flags, prepare_lsn, end_lsn, timestamp, xid, gid)| Prepare {
                    flags,
                    prepare_lsn,
                    end_lsn,
                    timestamp,
                    xid,
                    gid,
                },
            )
        };
        prop_oneof![
            (any::<u32>(), any::<u8>()).prop_map(|(xid, first_segment)| {
                Message::StreamStart(StreamStart { xid, first_segment })
            }),
            Just(Message::StreamStop),
            (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
                |(xid, flags, commit_lsn, end_lsn, timestamp)| {
                    Message::StreamCommit(StreamCommit {
                        xid,
                        flags,
                        commit_lsn,
                        end_lsn,
                        timestamp,
                    })
                }
            ),
            (
                any::<u32>(),
                any::<u32>(),
                prop::option::of((lsn(), any::<i64>()))
            )
                .prop_map(|(xid, subxid, abort)| {
                    Message::StreamAbort(StreamAbort {
                        xid,
                        subxid,
                        abort: abort.map(|(lsn, timestamp)| AbortPoint { lsn, timestamp }),
                    })
                }),
            (lsn(), lsn(), any::<i64>(), any::<u32>(), gid()).prop_map(
                |(prepare_lsn, end_lsn, timestamp, xid, gid)| {
                    Message::BeginPrepare(BeginPrepare {
                        prepare_lsn,
                        end_lsn,
                        timestamp,
                        xid,
                        gid,
                    })
                }
            ),
            prepare().prop_map(Message::Prepare),
            prepare().prop_map(Message::StreamPrepare),
            (any::<u8>(), lsn(), lsn(), any::<i64>(), any::<u32>(), gid()).prop_map(
                |(flags, commit_lsn, end_lsn, timestamp, xid, gid)| {
                    Message::CommitPrepared(CommitPrepared {
                        flags,
                        commit_lsn,
                        end_lsn,
                        timestamp,
                        xid,
                        gid,
                    })
                }
            ),
            (
                any::<u8>(),
                lsn(),
                lsn(),
                any::<i64>(),
                any::<i64>(),
                any::<u32>(),
                gid()
            )
                .prop_map(
                    |(
                        flags,
                        prepare_end_lsn,
                        rollback_end_lsn,
                        prepare_ts,
                        rollback_ts,
                        xid,
                        gid,
                    )| {
                        Message::RollbackPrepared(RollbackPrepared {
                            flags,
                            prepare_end_lsn,
                            rollback_end_lsn,
                            prepare_timestamp: prepare_ts,
                            rollback_timestamp: rollback_ts,
                            xid,
                            gid,
                        })
                    }
                ),
        ]
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(message in message()) {
            prop_assert_eq!(decode(&encode(&message)), Ok(message));
        }

        #[test]
        fn decode_streamed_inverts_encode(message in super::super::tests::message(), xid in any::<u32>()) {
            let message = if XID_TAGS.contains(&encode(&message)[0]) {
                Message::Streamed(Streamed { xid, message: Box::new(message) })
            } else {
                message
            };
            prop_assert_eq!(decode_streamed(&encode(&message)), Ok(message));
        }

        #[test]
        fn decode_streamed_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_streamed(&bytes);
        }
    }
}
