//! The pure parts of the index: which prefixes it holds, what an event does to it, and which of
//! its keys a pattern matches.

use std::collections::BTreeSet;
use std::ops::Bound;

/// What a keyspace event says about its key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Effect {
    /// The key is gone.
    Remove,
    /// The key exists (it was created, written or renamed to).
    Insert,
}

/// The effect of the keyspace event `event` (the message's payload). Only `new` is needed for
/// completeness; every other event on a key also means it exists, except those that say it left
/// this database. An entry for a key that is gone is harmless: its `UNLINK` deletes nothing.
pub(super) fn effect(event: &[u8]) -> Effect {
    match event {
        b"del" | b"expired" | b"evicted" | b"rename_from" | b"move_from" | b"keymiss" => {
            Effect::Remove
        }
        _ => Effect::Insert,
    }
}

/// The keyspace channel prefix of database `db`, `__keyspace@0__:`.
pub(super) fn channel_prefix(db: i64) -> String {
    format!("__keyspace@{db}__:")
}

/// The key a keyspace channel of database `db` names: its bytes after the channel prefix.
pub(super) fn key_of<'c>(channel: &'c [u8], prefix: &str) -> Option<&'c [u8]> {
    channel.strip_prefix(prefix.as_bytes())
}

/// `prefix` as the start of a glob that matches it literally: every byte that means something
/// in a Redis glob gets a backslash, so `a*b` matches only keys starting with `a*b`.
pub(super) fn escaped(prefix: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(prefix.len() + 1);
    for &byte in prefix {
        if matches!(byte, b'*' | b'?' | b'[' | b']' | b'\\') {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out
}

/// The glob for every key under `prefix`: `<escaped prefix>*`, for `SCAN MATCH` and, after the
/// channel prefix, for `PSUBSCRIBE`.
pub(super) fn under(prefix: &[u8]) -> Vec<u8> {
    let mut glob = escaped(prefix);
    glob.push(b'*');
    glob
}

/// `prefixes` sorted, without duplicates, and without any that a shorter one covers (`a:`
/// covers `a:b:`): every key under the dropped ones is under the kept ones already. An empty
/// prefix covers everything.
pub(super) fn prefix_free<S: AsRef<[u8]>>(prefixes: &[S]) -> Vec<Vec<u8>> {
    let sorted: BTreeSet<&[u8]> = prefixes.iter().map(AsRef::as_ref).collect();
    let mut kept: Vec<Vec<u8>> = Vec::new();
    for prefix in sorted {
        // In sorted order, a covering prefix sorts right before everything it covers.
        if kept.last().is_some_and(|last| prefix.starts_with(last)) {
            continue;
        }
        kept.push(prefix.to_vec());
    }
    kept
}

/// Whether every key `pattern` can match lies under one of `prefixes`: its glob literal prefix
/// (see [`crate::glob::literal_prefix`]) starts with one of them.
pub(super) fn covered(pattern: &str, prefixes: &[Vec<u8>]) -> bool {
    let literal = crate::glob::literal_prefix(pattern);
    prefixes
        .iter()
        .any(|prefix| literal.as_bytes().starts_with(prefix))
}

/// The keys of `index` that one of `patterns` matches, each once: for each pattern, the keys
/// from its literal prefix on while they keep it, filtered by the Redis-faithful matcher. The
/// cost is the keys under each literal prefix, not the index.
pub(super) fn matching(index: &BTreeSet<Box<[u8]>>, patterns: &[String]) -> Vec<Vec<u8>> {
    let mut found: BTreeSet<&[u8]> = BTreeSet::new();
    for pattern in patterns {
        let literal = crate::glob::literal_prefix(pattern);
        let literal = literal.as_bytes();
        let from = index
            .range::<[u8], _>((Bound::Included(literal), Bound::Unbounded))
            .take_while(|key| key.starts_with(literal));
        found.extend(
            from.filter(|key| crate::glob::matches(pattern.as_bytes(), key))
                .map(|key| &key[..]),
        );
    }
    found.into_iter().map(<[u8]>::to_vec).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_events_that_say_the_key_left_remove_it() {
        for event in ["del", "expired", "evicted", "rename_from", "move_from"] {
            assert_eq!(effect(event.as_bytes()), Effect::Remove, "{event}");
        }
        for event in [
            "new",
            "set",
            "hset",
            "expire",
            "rename_to",
            "move_to",
            "copy_to",
            "restore",
            "lpush",
        ] {
            assert_eq!(effect(event.as_bytes()), Effect::Insert, "{event}");
        }
    }

    #[test]
    fn the_key_is_what_follows_the_channel_prefix_byte_for_byte() {
        let prefix = channel_prefix(3);
        assert_eq!(prefix, "__keyspace@3__:");
        assert_eq!(
            key_of(b"__keyspace@3__:avail:\xff:*", &prefix),
            Some(&b"avail:\xff:*"[..])
        );
        assert_eq!(key_of(b"__keyspace@0__:avail:1", &prefix), None);
    }

    #[test]
    fn glob_bytes_of_a_prefix_are_escaped() {
        assert_eq!(under(b"avail:"), b"avail:*");
        assert_eq!(under(b"a*b?[c]\\:"), b"a\\*b\\?\\[c\\]\\\\:*");
        assert_eq!(under(b""), b"*");
        // The escaped glob matches exactly the keys under the prefix, as Redis decides.
        let glob = under(b"x[1]*:");
        assert!(crate::glob::matches(&glob, b"x[1]*:anything"));
        assert!(!crate::glob::matches(&glob, b"x1*:anything"));
        assert!(!crate::glob::matches(&glob, b"x[1]y:anything"));
    }

    #[test]
    fn a_prefix_covered_by_a_shorter_one_is_dropped() {
        // `bookings:` does not begin with `booking:`, so both stay.
        assert_eq!(
            prefix_free(&["avail:", "booking:", "avail:car:", "avail:", "bookings:"]),
            [
                b"avail:".to_vec(),
                b"booking:".to_vec(),
                b"bookings:".to_vec()
            ]
        );
        assert_eq!(prefix_free(&["a:b", "a:c", "b"]).len(), 3);
        assert_eq!(prefix_free(&["x:", "", "y:"]), [Vec::<u8>::new()]);
        assert!(prefix_free::<&str>(&[]).is_empty());
    }

    #[test]
    fn a_pattern_is_covered_when_its_literal_prefix_is_under_an_indexed_prefix() {
        let prefixes = prefix_free(&["avail:", "a\\*:"]);
        assert!(covered("avail:42:*", &prefixes));
        assert!(covered("avail:*", &prefixes));
        // `avail*` can match `availability`, which is not under `avail:`.
        assert!(!covered("avail*", &prefixes));
        assert!(!covered("booking:*", &prefixes));
        // Prefixes are key text, patterns are globs: the glob `a\*:1:*` names keys that begin
        // with `a*:`, not with the key text `a\*:`; the glob `a\\\*:1:*` does.
        assert!(!covered("a\\*:1:*", &prefixes));
        assert!(covered("a\\\\\\*:1:*", &prefixes));
        assert!(covered("anything*", &prefix_free(&[""])));
    }

    #[test]
    fn matching_ranges_from_the_literal_prefix_and_filters_with_the_glob() {
        let index: BTreeSet<Box<[u8]>> = [
            "avail:1:a",
            "avail:1:b",
            "avail:10:a",
            "avail:2:a",
            "avail:",
            "b",
        ]
        .iter()
        .map(|k| k.as_bytes().into())
        .collect();
        let found = matching(&index, &["avail:1:*".to_owned()]);
        assert_eq!(found, [b"avail:1:a".to_vec(), b"avail:1:b".to_vec()]);
        let found = matching(&index, &["avail:?:a".to_owned(), "avail:1*".to_owned()]);
        // In byte order: `0` sorts before `:`.
        assert_eq!(
            found,
            [
                b"avail:10:a".to_vec(),
                b"avail:1:a".to_vec(),
                b"avail:1:b".to_vec(),
                b"avail:2:a".to_vec()
            ]
        );
        assert!(matching(&index, &["c:*".to_owned()]).is_empty());
    }
}
