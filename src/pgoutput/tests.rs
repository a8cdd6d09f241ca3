//! Wire-level tests: golden bytes written from the protocol documentation, round trips, and the
//! promise that no input, however broken or hostile, makes `decode` or `Decoder::apply` panic.

use proptest::prelude::*;

use super::*;
use crate::change::Lsn;

fn t(s: &str) -> TupleValue {
    TupleValue::Text(s.into())
}

/// One message of every kind and every variant of the optional parts.
pub(super) fn samples() -> Vec<Message> {
    let column = |flags, name: &str, type_oid| Column {
        flags,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    };
    vec![
        Message::Begin(Begin {
            final_lsn: Lsn(0x16_B374_D848),
            timestamp: 800_000_000_000_000,
            xid: 771,
        }),
        Message::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(0x16_B374_D848),
            end_lsn: Lsn(0x16_B374_D878),
            timestamp: 800_000_000_000_000,
        }),
        Message::Origin(Origin {
            commit_lsn: Lsn(77),
            name: "node_a".into(),
        }),
        Message::Relation(Relation {
            id: 16_384,
            namespace: "public".into(),
            name: "cars".into(),
            replica_identity: b'd',
            columns: vec![column(1, "id", 20), column(0, "make", 25)],
        }),
        Message::Type(Type {
            id: 90_000,
            namespace: "public".into(),
            name: "mood".into(),
        }),
        Message::Insert(Insert {
            relation_id: 16_384,
            new: vec![t("1"), TupleValue::Null, TupleValue::UnchangedToast, t("")],
        }),
        Message::Update(Update {
            relation_id: 16_384,
            old: None,
            new: vec![t("1"), t("bmw")],
        }),
        Message::Update(Update {
            relation_id: 16_384,
            old: Some(OldTuple::Key(vec![t("1"), TupleValue::Null])),
            new: vec![t("2"), t("bmw")],
        }),
        Message::Update(Update {
            relation_id: 16_384,
            old: Some(OldTuple::Full(vec![t("1"), t("audi")])),
            new: vec![t("1"), t("bmw")],
        }),
        Message::Delete(Delete {
            relation_id: 16_384,
            old: OldTuple::Key(vec![t("1"), TupleValue::Null]),
        }),
        Message::Delete(Delete {
            relation_id: 16_384,
            old: OldTuple::Full(vec![t("1"), t("Citroën")]),
        }),
        Message::Truncate(Truncate {
            options: 3,
            relation_ids: vec![16_384, 16_390],
        }),
        Message::Logical(LogicalMessage {
            flags: 1,
            lsn: Lsn(99),
            prefix: "invalidator".into(),
            content: vec![0, 1, 2, 0xff],
        }),
    ]
}

#[test]
fn every_message_kind_round_trips() {
    let samples = samples();
    let tags: std::collections::BTreeSet<u8> = samples.iter().map(|m| encode(m)[0]).collect();
    assert_eq!(tags.len(), 10, "one sample of each kind");
    for message in samples {
        assert_eq!(decode(&encode(&message)), Ok(message));
    }
}

#[test]
fn golden_bytes_match_the_documented_layouts() {
    let begin = [
        &b"B"[..],
        &0x16_B374_D848_u64.to_be_bytes(),
        &800_000_000_000_000_i64.to_be_bytes(),
        &771_u32.to_be_bytes(),
    ]
    .concat();
    let relation = [
        &b"R"[..],
        &16_384_u32.to_be_bytes(),
        b"public\0cars\0d",
        &[0, 2],
        b"\x01id\0",
        &20_u32.to_be_bytes(),
        &(-1_i32).to_be_bytes(),
        b"\x00make\0",
        &25_u32.to_be_bytes(),
        &(-1_i32).to_be_bytes(),
    ]
    .concat();
    let update_key = [
        &b"U"[..],
        &16_384_u32.to_be_bytes(),
        b"K\x00\x02t\x00\x00\x00\x011n",
        b"N\x00\x02t\x00\x00\x00\x012t\x00\x00\x00\x03bmw",
    ]
    .concat();
    let truncate = [
        &b"T"[..],
        &2_u32.to_be_bytes(),
        &[3],
        &16_384_u32.to_be_bytes(),
        &16_390_u32.to_be_bytes(),
    ]
    .concat();
    let logical = [
        &b"M\x01"[..],
        &99_u64.to_be_bytes(),
        b"invalidator\0",
        &4_u32.to_be_bytes(),
        &[0, 1, 2, 0xff],
    ]
    .concat();
    let samples = samples();
    for (bytes, index) in [
        (begin, 0),
        (relation, 3),
        (update_key, 7),
        (truncate, 11),
        (logical, 12),
    ] {
        assert_eq!(decode(&bytes).as_ref(), Ok(&samples[index]));
        assert_eq!(encode(&samples[index]), bytes);
    }
}

#[test]
fn empty_input_is_a_truncation_at_the_tag() {
    assert_eq!(
        decode(&[]),
        Err(DecodeError::Truncated {
            offset: 0,
            expected: "message tag",
            needed: 1,
            remaining: 0
        })
    );
}

#[test]
fn every_truncation_of_every_sample_is_an_error() {
    for message in samples() {
        let bytes = encode(&message);
        for len in 0..bytes.len() {
            let err = decode(&bytes[..len]).expect_err("a strict prefix is incomplete");
            assert!(
                matches!(
                    err,
                    DecodeError::Truncated { .. } | DecodeError::Unterminated { .. }
                ),
                "{} cut at {len}: {err}",
                message.kind()
            );
        }
    }
}

#[test]
fn trailing_bytes_after_a_complete_message_are_an_error() {
    for message in samples() {
        let mut bytes = encode(&message);
        let end = bytes.len();
        bytes.push(0);
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::TrailingBytes {
                offset: end,
                count: 1,
                message: message.kind()
            })
        );
    }
}

#[test]
fn an_unknown_tag_is_named() {
    let err = decode(b"Z\0\0\0\0").unwrap_err();
    assert_eq!(err, DecodeError::UnknownTag { tag: Byte(b'Z') });
    assert_eq!(
        err.to_string(),
        "unknown message tag 'Z' (0x5a) at offset 0: expected one of B C O R Y I U D T M, or of \
         the streaming and two-phase S E c A b P p K r"
    );
    assert_eq!(
        decode(&[0x80]),
        Err(DecodeError::UnknownTag { tag: Byte(0x80) })
    );
}

#[test]
fn tuple_kinds_and_markers_are_checked() {
    // Insert of relation 1 whose single column has kind `x`.
    let insert = |kind: u8| [b'I', 0, 0, 0, 1, b'N', 0, 1, kind];
    assert_eq!(
        decode(&insert(b'x')),
        Err(DecodeError::UnknownTupleKind {
            offset: 8,
            found: Byte(b'x')
        })
    );
    assert_eq!(
        decode(&insert(b'b')),
        Err(DecodeError::BinaryColumn { offset: 8 })
    );
    assert_eq!(
        decode(&[b'I', 0, 0, 0, 1, b'K', 0, 0]),
        Err(DecodeError::UnexpectedTupleMarker {
            offset: 5,
            expected: "'N'",
            found: Byte(b'K')
        })
    );
    assert_eq!(
        decode(&[b'U', 0, 0, 0, 1, b'X', 0, 0]),
        Err(DecodeError::UnexpectedTupleMarker {
            offset: 5,
            expected: "'K', 'O' or 'N'",
            found: Byte(b'X')
        })
    );
    // After an old tuple only the new tuple's `N` may follow.
    assert_eq!(
        decode(&[b'U', 0, 0, 0, 1, b'O', 0, 0, b'O', 0, 0]),
        Err(DecodeError::UnexpectedTupleMarker {
            offset: 8,
            expected: "'N'",
            found: Byte(b'O')
        })
    );
    assert_eq!(
        decode(&[b'D', 0, 0, 0, 1, b'N', 0, 0]),
        Err(DecodeError::UnexpectedTupleMarker {
            offset: 5,
            expected: "'K' or 'O'",
            found: Byte(b'N')
        })
    );
}

#[test]
fn hostile_lengths_and_counts_are_refused_without_allocating() {
    let huge_text = [
        b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0x7f, 0xff, 0xff, 0xff, b'a',
    ];
    assert_eq!(
        decode(&huge_text),
        Err(DecodeError::Truncated {
            offset: 13,
            expected: "column value",
            needed: 0x7fff_ffff,
            remaining: 1
        })
    );
    let negative_text = [b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0xff, 0xff, 0xff, 0xff];
    assert!(matches!(
        decode(&negative_text),
        Err(DecodeError::Truncated {
            needed: 0xffff_ffff,
            ..
        })
    ));
    let huge_tuple = [b'I', 0, 0, 0, 1, b'N', 0xff, 0xff, b'n'];
    assert!(matches!(
        decode(&huge_tuple),
        Err(DecodeError::Truncated {
            expected: "tuple columns",
            needed: 65_535,
            ..
        })
    ));
    let huge_truncate = [b'T', 0x7f, 0xff, 0xff, 0xff, 0, 0, 0, 0, 1];
    assert!(matches!(
        decode(&huge_truncate),
        Err(DecodeError::Truncated {
            expected: "relation ids",
            needed: 0x1_ffff_fffc,
            ..
        })
    ));
    let huge_relation = [&b"R\0\0\0\x01s\0t\0d"[..], &[0xff, 0xff]].concat();
    assert!(matches!(
        decode(&huge_relation),
        Err(DecodeError::Truncated {
            expected: "columns",
            ..
        })
    ));
    let huge_content = [&b"M\0"[..], &[0; 8], b"p\0", &[0x7f, 0xff, 0xff, 0xff]].concat();
    assert!(matches!(
        decode(&huge_content),
        Err(DecodeError::Truncated {
            expected: "message content",
            ..
        })
    ));
}

#[test]
fn invalid_utf8_is_an_error_in_names_and_values() {
    let name = [&b"O"[..], &[0; 8], b"n\xffx\0"].concat();
    assert_eq!(
        decode(&name),
        Err(DecodeError::InvalidUtf8 {
            offset: 9,
            expected: "origin name"
        })
    );
    let value = [b'I', 0, 0, 0, 1, b'N', 0, 1, b't', 0, 0, 0, 2, 0xc3, 0x28];
    assert_eq!(
        decode(&value),
        Err(DecodeError::InvalidUtf8 {
            offset: 9,
            expected: "column value"
        })
    );
}

#[test]
fn errors_say_what_was_expected_and_where() {
    let err = decode(&[b'B', 0, 0]).unwrap_err();
    assert_eq!(
        err.to_string(),
        "truncated message: expected final LSN (8 bytes) at offset 1, but only 2 bytes remain"
    );
}

#[test]
fn timestamps_convert_to_the_unix_epoch() {
    assert_eq!(pg_to_unix_us(0), 946_684_800_000_000);
    assert_eq!(pg_to_unix_us(i64::MAX), i64::MAX);
    let [Message::Begin(begin), Message::Commit(commit), ..] = &samples()[..] else {
        unreachable!("the samples start with a begin and a commit");
    };
    assert_eq!(
        begin.commit_time_us(),
        800_000_000_000_000 + PG_EPOCH_OFFSET_US
    );
    assert_eq!(commit.commit_time_us(), begin.commit_time_us());
}

/// A string the wire can carry: anything without NUL.
fn name() -> impl Strategy<Value = String> {
    "[^\0]{0,12}"
}

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

fn tuple() -> impl Strategy<Value = Vec<TupleValue>> {
    prop::collection::vec(
        prop_oneof![
            Just(TupleValue::Null),
            Just(TupleValue::UnchangedToast),
            any::<String>().prop_map(TupleValue::Text),
        ],
        0..6,
    )
}

fn old_tuple() -> impl Strategy<Value = OldTuple> {
    prop_oneof![
        tuple().prop_map(OldTuple::Key),
        tuple().prop_map(OldTuple::Full)
    ]
}

pub(super) fn message() -> impl Strategy<Value = Message> {
    let column = (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| Column {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    );
    prop_oneof![
        (lsn(), any::<i64>(), any::<u32>()).prop_map(|(final_lsn, timestamp, xid)| {
            Message::Begin(Begin {
                final_lsn,
                timestamp,
                xid,
            })
        }),
        (any::<u8>(), lsn(), lsn(), any::<i64>()).prop_map(
            |(flags, commit_lsn, end_lsn, timestamp)| Message::Commit(Commit {
                flags,
                commit_lsn,
                end_lsn,
                timestamp,
            })
        ),
        (lsn(), name()).prop_map(|(commit_lsn, name)| Message::Origin(Origin { commit_lsn, name })),
        (
            any::<u32>(),
            name(),
            name(),
            any::<u8>(),
            prop::collection::vec(column, 0..5)
        )
            .prop_map(|(id, namespace, name, replica_identity, columns)| {
                Message::Relation(Relation {
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (any::<u32>(), name(), name()).prop_map(|(id, namespace, name)| Message::Type(Type {
            id,
            namespace,
            name
        })),
        (any::<u32>(), tuple())
            .prop_map(|(relation_id, new)| Message::Insert(Insert { relation_id, new })),
        (any::<u32>(), prop::option::of(old_tuple()), tuple()).prop_map(
            |(relation_id, old, new)| Message::Update(Update {
                relation_id,
                old,
                new
            })
        ),
        (any::<u32>(), old_tuple())
            .prop_map(|(relation_id, old)| Message::Delete(Delete { relation_id, old })),
        (any::<u8>(), prop::collection::vec(any::<u32>(), 0..5)).prop_map(
            |(options, relation_ids)| Message::Truncate(Truncate {
                options,
                relation_ids
            })
        ),
        (
            any::<u8>(),
            lsn(),
            name(),
            prop::collection::vec(any::<u8>(), 0..16)
        )
            .prop_map(
                |(flags, lsn, prefix, content)| Message::Logical(LogicalMessage {
                    flags,
                    lsn,
                    prefix,
                    content,
                })
            ),
    ]
}

/// A small message whose relation ids are few, so that decoder sequences hit the cache.
fn stream_message() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![message(), super::streaming::tests::message()].prop_map(|mut message| {
        match &mut message {
            Message::Relation(r) => r.id %= 3,
            Message::Insert(m) => m.relation_id %= 3,
            Message::Update(m) => m.relation_id %= 3,
            Message::Delete(m) => m.relation_id %= 3,
            Message::Truncate(m) => m.relation_ids.iter_mut().for_each(|id| *id %= 3),
            _ => {}
        }
        encode(&message)
    })
}

proptest! {
    #[test]
    fn decode_inverts_encode(message in message()) {
        prop_assert_eq!(decode(&encode(&message)), Ok(message));
    }

    #[test]
    fn decode_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode(&bytes);
    }

    #[test]
    fn decode_never_panics_on_cut_or_mutated_messages(
        message in message(),
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
    ) {
        let mut bytes = encode(&message);
        let strict_prefix = cut.index(bytes.len());
        prop_assert!(decode(&bytes[..strict_prefix]).is_err());
        for (at, byte) in flips {
            let at = at.index(bytes.len());
            bytes[at] = byte;
        }
        let _ = decode(&bytes);
        let _ = decode(&bytes[..strict_prefix]);
    }

    #[test]
    fn decoder_never_panics_on_any_message_sequence(
        stream in prop::collection::vec(stream_message(), 0..12),
    ) {
        let mut decoder = Decoder::new();
        for bytes in stream {
            let _ = decoder.apply(&bytes, |_| {});
        }
    }
}
