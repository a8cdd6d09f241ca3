//! Redis Cluster hash slots: which slot a key lives in, and the one slot every key matching a
//! pattern lives in when its literal prefix holds a complete hash tag. Pure code, no I/O.

/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16384;

/// CRC16/XMODEM (polynomial 0x1021, initial value 0, no reflection), the checksum Redis Cluster
/// hashes keys with.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`: the CRC16 of its hash tag if it has one, else of the whole key.
pub fn key_slot(key: &[u8]) -> u16 {
    crc16(hash_tag(key).unwrap_or(key)) % SLOTS
}

/// Redis's hash tag of `key`: the bytes between the first `{` and the first `}` after it, when
/// they are not empty.
fn hash_tag(key: &[u8]) -> Option<&[u8]> {
    let open = key.iter().position(|&b| b == b'{')?;
    let rest = &key[open + 1..];
    let close = rest.iter().position(|&b| b == b'}')?;
    (close > 0).then(|| &rest[..close])
}

/// The slot that holds every key matching the glob `pattern`, when one does: the pattern's
/// literal prefix (its escapes undone, up to the first unescaped `*`, `?` or `[`) holds a
/// complete hash tag. Every matching key begins with that prefix, so its first `{` and the first
/// `}` after it, and the tag between them, are the prefix's.
///
/// `None` (scan every primary) when the tag is missing, empty, or not closed before a glob byte:
/// `{user:*}:x` matches keys of many tags.
pub fn pattern_slot(pattern: &[u8]) -> Option<u16> {
    let prefix = literal_prefix(pattern);
    hash_tag(&prefix).map(crc16).map(|crc| crc % SLOTS)
}

/// The bytes every key matching `pattern` begins with: escapes undone (`\x` matches `x`; a
/// trailing `\` matches itself, as in Redis's matcher), up to the first unescaped glob byte.
fn literal_prefix(pattern: &[u8]) -> Vec<u8> {
    let mut prefix = Vec::with_capacity(pattern.len());
    let mut bytes = pattern.iter();
    while let Some(&byte) = bytes.next() {
        match byte {
            b'*' | b'?' | b'[' => break,
            b'\\' => prefix.push(*bytes.next().unwrap_or(&b'\\')),
            _ => prefix.push(byte),
        }
    }
    prefix
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_matches_the_standard_check_value() {
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(crc16(b""), 0);
    }

    #[test]
    fn key_slots_match_the_values_redis_documents() {
        // From the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"somekey"), 11058);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(
            key_slot(b"{user1000}.following"),
            key_slot(b"{user1000}.followers")
        );
    }

    #[test]
    fn the_hash_tag_follows_redis_rule() {
        assert_eq!(hash_tag(b"{a}b"), Some(&b"a"[..]));
        assert_eq!(hash_tag(b"x{a}{b}"), Some(&b"a"[..]));
        assert_eq!(hash_tag(b"{{a}}"), Some(&b"{a"[..]));
        // An empty tag hashes the whole key; so does an unclosed one.
        assert_eq!(hash_tag(b"{}a"), None);
        assert_eq!(hash_tag(b"{}{a}"), None);
        assert_eq!(hash_tag(b"{a"), None);
        assert_eq!(hash_tag(b"a}{"), None);
    }

    #[test]
    fn a_pattern_with_a_closed_literal_tag_has_one_slot() {
        let slot = key_slot(b"user:42");
        assert_eq!(pattern_slot(b"{user:42}:*"), Some(slot));
        assert_eq!(pattern_slot(b"{user:42}:profile:?"), Some(slot));
        assert_eq!(pattern_slot(b"cache:{user:42}:[ab]*"), Some(slot));
        // A rendered `{{user:{id}}}:profile` with id 42, and a later `{` that is not the first.
        assert_eq!(pattern_slot(b"{user:42}:{x}*"), Some(slot));
        assert_eq!(pattern_slot(b"{user:42}"), Some(slot));
    }

    #[test]
    fn escapes_are_undone_before_the_tag_is_read() {
        // A row value `a*b` escaped inside the tag: the keys hold `{a*b}`.
        assert_eq!(pattern_slot(br"{a\*b}:*"), Some(key_slot(b"{a*b}")));
        assert_eq!(pattern_slot(br"\{t}:*"), Some(key_slot(b"t")));
        assert_eq!(pattern_slot(br"{t\}:*"), Some(key_slot(b"t")));
    }

    #[test]
    fn a_tag_not_closed_before_a_glob_byte_spans_every_slot() {
        assert_eq!(pattern_slot(b"{user:*}:profile"), None);
        assert_eq!(pattern_slot(b"{user:?}"), None);
        assert_eq!(pattern_slot(b"{user:[12]}"), None);
        assert_eq!(pattern_slot(b"user:{42"), None);
        assert_eq!(pattern_slot(b"user:*"), None);
        assert_eq!(pattern_slot(b"*{a}"), None);
        // `{}` is no tag, and the first `{` decides: `{}{a}*` hashes whole keys.
        assert_eq!(pattern_slot(b"{}:*"), None);
        assert_eq!(pattern_slot(b"{}{a}*"), None);
    }
}
