//! Pure encoding and decoding for the parts of the replication protocol that `postgres-protocol`
//! does not cover: the CopyData sub-messages `w`, `k` and `r`, and the quoting of names inside
//! replication commands. Nothing here does I/O, so all of it is tested without a server.

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes};

use super::{ReplicationError, ReplicationMessage};
use crate::change::Lsn;

/// Tag of an XLogData sub-message: a chunk of WAL, here one pgoutput message.
const XLOG_DATA_TAG: u8 = b'w';
/// Tag of a primary keepalive sub-message.
const KEEPALIVE_TAG: u8 = b'k';
/// Tag of a standby status update sub-message.
const STATUS_UPDATE_TAG: u8 = b'r';

/// Tag, start LSN, end LSN and send time precede the payload of an XLogData message.
const XLOG_DATA_HEADER_LEN: usize = 1 + 8 + 8 + 8;
/// Tag, end LSN, send time and the reply flag make up a keepalive.
const KEEPALIVE_LEN: usize = 1 + 8 + 8 + 1;
/// Tag, three LSNs, the clock and the reply flag make up a status update.
pub(super) const STATUS_UPDATE_LEN: usize = 1 + 8 + 8 + 8 + 8 + 1;

/// Microseconds from the Unix epoch to the Postgres epoch, 2000-01-01 00:00:00 UTC.
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;

/// Decodes the payload of one CopyData message received while streaming.
///
/// The payload is checked against the exact layout before anything is read, so a truncated,
/// oversized or unknown sub-message is an error, never a panic.
pub(super) fn decode_copy_data(mut payload: Bytes) -> Result<ReplicationMessage, ReplicationError> {
    let Some(&tag) = payload.first() else {
        return Err(ReplicationError::Protocol(
            "empty CopyData message while streaming".to_owned(),
        ));
    };
    match tag {
        XLOG_DATA_TAG => {
            if payload.len() < XLOG_DATA_HEADER_LEN {
                return Err(truncated("XLogData", payload.len(), XLOG_DATA_HEADER_LEN));
            }
            payload.advance(1);
            let wal_start = Lsn(payload.get_u64());
            let wal_end = Lsn(payload.get_u64());
            let server_time_us = pg_to_unix_us(payload.get_i64());
            Ok(ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                server_time_us,
                data: payload,
            })
        }
        KEEPALIVE_TAG => {
            if payload.len() != KEEPALIVE_LEN {
                return Err(ReplicationError::Protocol(format!(
                    "keepalive message is {} bytes long, expected {KEEPALIVE_LEN}",
                    payload.len()
                )));
            }
            payload.advance(1);
            let wal_end = Lsn(payload.get_u64());
            let server_time_us = pg_to_unix_us(payload.get_i64());
            let reply_requested = payload.get_u8() != 0;
            Ok(ReplicationMessage::Keepalive {
                wal_end,
                server_time_us,
                reply_requested,
            })
        }
        other => Err(ReplicationError::Protocol(format!(
            "unknown streaming message tag {:?} (0x{other:02x})",
            char::from(other)
        ))),
    }
}

/// The error for a sub-message shorter than its fixed header.
fn truncated(kind: &str, len: usize, needed: usize) -> ReplicationError {
    ReplicationError::Protocol(format!(
        "truncated {kind} message: {len} bytes, at least {needed} needed"
    ))
}

/// Encodes a standby status update; `now_pg_us` is the client clock in Postgres-epoch microseconds.
pub(super) fn encode_status_update(
    write: Lsn,
    flush: Lsn,
    apply: Lsn,
    now_pg_us: i64,
    reply_requested: bool,
) -> [u8; STATUS_UPDATE_LEN] {
    let mut out = [0u8; STATUS_UPDATE_LEN];
    out[0] = STATUS_UPDATE_TAG;
    out[1..9].copy_from_slice(&write.0.to_be_bytes());
    out[9..17].copy_from_slice(&flush.0.to_be_bytes());
    out[17..25].copy_from_slice(&apply.0.to_be_bytes());
    out[25..33].copy_from_slice(&now_pg_us.to_be_bytes());
    out[33] = u8::from(reply_requested);
    out
}

/// The current time in microseconds since the Postgres epoch, as status updates carry it.
pub(super) fn now_pg_us() -> i64 {
    // A clock before 1970 is nonsense; the server only uses this for lag statistics, so 0 is fine.
    let unix_us = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0);
    unix_us.saturating_sub(PG_EPOCH_OFFSET_US)
}

/// Converts a Postgres timestamp (microseconds since 2000-01-01) to microseconds since 1970-01-01,
/// the unit every other timestamp in this crate uses.
fn pg_to_unix_us(pg_us: i64) -> i64 {
    pg_us.saturating_add(PG_EPOCH_OFFSET_US)
}

/// Checks that a slot name is what Postgres accepts: 1 to 63 of `a-z`, `0-9` and `_`.
///
/// Checking here turns a typo into a clear error before any command reaches the server.
pub(super) fn validate_slot_name(slot: &str) -> Result<(), ReplicationError> {
    let valid_chars = slot
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if (1..=63).contains(&slot.len()) && valid_chars {
        Ok(())
    } else {
        Err(ReplicationError::Invalid(format!(
            "replication slot name {slot:?} must be 1 to 63 characters of a-z, 0-9 and _"
        )))
    }
}

/// Checks that a publication name can be sent: 1 to 63 bytes (longer names are truncated by
/// Postgres, so they would silently name another publication) and no NUL.
pub(super) fn validate_publication_name(publication: &str) -> Result<(), ReplicationError> {
    if (1..=63).contains(&publication.len()) && !publication.contains('\0') {
        Ok(())
    } else {
        Err(ReplicationError::Invalid(format!(
            "publication name {publication:?} must be 1 to 63 bytes without NUL"
        )))
    }
}

/// The major version in a `server_version` parameter: `15.20 (Debian 15.20-0+deb12u1)` is 15,
/// `9.6.24` is 9, `14beta1` is 14; 0 when it does not start with a number.
pub(super) fn major_version(server_version: &str) -> u32 {
    let digits: String = server_version
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xlog_data(start: u64, end: u64, time: i64, data: &[u8]) -> Bytes {
        let mut out = vec![XLOG_DATA_TAG];
        out.extend_from_slice(&start.to_be_bytes());
        out.extend_from_slice(&end.to_be_bytes());
        out.extend_from_slice(&time.to_be_bytes());
        out.extend_from_slice(data);
        out.into()
    }

    fn keepalive(end: u64, time: i64, reply: u8) -> Bytes {
        let mut out = vec![KEEPALIVE_TAG];
        out.extend_from_slice(&end.to_be_bytes());
        out.extend_from_slice(&time.to_be_bytes());
        out.push(reply);
        out.into()
    }

    #[test]
    fn decodes_xlog_data_with_unix_time() {
        let msg = decode_copy_data(xlog_data(0x1_0000_0010, 0x1_0000_0020, 5, b"B123")).unwrap();
        assert_eq!(
            msg,
            ReplicationMessage::XLogData {
                wal_start: Lsn(0x1_0000_0010),
                wal_end: Lsn(0x1_0000_0020),
                server_time_us: PG_EPOCH_OFFSET_US + 5,
                data: Bytes::from_static(b"B123"),
            }
        );
    }

    #[test]
    fn decodes_xlog_data_with_empty_payload() {
        let msg = decode_copy_data(xlog_data(1, 2, 3, b"")).unwrap();
        assert!(matches!(msg, ReplicationMessage::XLogData { data, .. } if data.is_empty()));
    }

    #[test]
    fn decodes_keepalives() {
        assert_eq!(
            decode_copy_data(keepalive(42, 0, 1)).unwrap(),
            ReplicationMessage::Keepalive {
                wal_end: Lsn(42),
                server_time_us: PG_EPOCH_OFFSET_US,
                reply_requested: true,
            }
        );
        assert!(matches!(
            decode_copy_data(keepalive(42, 0, 0)).unwrap(),
            ReplicationMessage::Keepalive {
                reply_requested: false,
                ..
            }
        ));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let full = xlog_data(1, 2, 3, b"");
        for len in 0..full.len() {
            let err = decode_copy_data(full.slice(..len)).unwrap_err();
            assert!(matches!(err, ReplicationError::Protocol(_)), "{len}: {err}");
        }
        let full = keepalive(1, 2, 0);
        for len in 1..full.len() {
            assert!(decode_copy_data(full.slice(..len)).is_err(), "{len}");
        }
    }

    #[test]
    fn a_keepalive_with_trailing_bytes_is_an_error() {
        let mut long = keepalive(1, 2, 0).to_vec();
        long.push(0);
        assert!(decode_copy_data(long.into()).is_err());
    }

    #[test]
    fn unknown_tags_are_errors() {
        let err = decode_copy_data(Bytes::from_static(b"zzzz")).unwrap_err();
        assert!(
            err.to_string().contains("unknown streaming message tag"),
            "{err}"
        );
    }

    #[test]
    fn extreme_timestamps_saturate() {
        let msg = decode_copy_data(xlog_data(0, 0, i64::MAX, b"")).unwrap();
        assert!(matches!(
            msg,
            ReplicationMessage::XLogData {
                server_time_us: i64::MAX,
                ..
            }
        ));
    }

    #[test]
    fn major_versions_are_read_from_server_version() {
        assert_eq!(major_version("15.20 (Debian 15.20-0+deb12u1)"), 15);
        assert_eq!(major_version("9.6.24"), 9);
        assert_eq!(major_version("14beta1"), 14);
        assert_eq!(major_version("13.0"), 13);
        assert_eq!(major_version("devel"), 0);
    }

    #[test]
    fn status_update_layout() {
        let out = encode_status_update(Lsn(1), Lsn(2), Lsn(3), 4, true);
        assert_eq!(out[0], b'r');
        assert_eq!(&out[1..9], &1u64.to_be_bytes());
        assert_eq!(&out[9..17], &2u64.to_be_bytes());
        assert_eq!(&out[17..25], &3u64.to_be_bytes());
        assert_eq!(&out[25..33], &4i64.to_be_bytes());
        assert_eq!(out[33], 1);
        assert_eq!(
            encode_status_update(Lsn(1), Lsn(2), Lsn(3), 4, false)[33],
            0
        );
    }

    #[test]
    fn the_clock_is_after_2020_in_postgres_epoch() {
        // 2020-01-01 is 20 years after the Postgres epoch.
        assert!(now_pg_us() > 20 * 365 * 24 * 3600 * 1_000_000);
    }

    #[test]
    fn slot_names_are_checked() {
        for ok in ["a", "invalidator", "slot_2", &"x".repeat(63)] {
            validate_slot_name(ok).unwrap();
        }
        for bad in [
            "",
            "Upper",
            "with-dash",
            "sp ace",
            "quo\"te",
            &"x".repeat(64),
            "é",
        ] {
            let err = validate_slot_name(bad).unwrap_err();
            assert!(matches!(err, ReplicationError::Invalid(_)), "{bad}");
        }
    }

    #[test]
    fn publication_names_are_checked() {
        validate_publication_name("It's \"Pub\"").unwrap();
        assert!(validate_publication_name("").is_err());
        assert!(validate_publication_name("a\0b").is_err());
        assert!(validate_publication_name(&"p".repeat(64)).is_err());
    }
}
