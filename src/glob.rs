//! Redis glob patterns: a matcher with the exact semantics of Redis's `stringmatchlen` (what
//! `SCAN ... MATCH` and `KEYS` use), escaping of data, and a test for "is this a pattern".
//!
//! The matcher exists so that tests can prove, without a server, that an escaped row value only
//! ever matches itself; it follows Redis's behaviour including its quirks (listed on [`matches`]),
//! because a matcher that is "more correct" than Redis would prove nothing about Redis.

/// Redis gives up on a pattern whose `*`s nest deeper than this (its defence against abusive
/// patterns); the same pattern must fail here too.
const MAX_NESTING: u32 = 1000;

/// Whether `subject` matches the Redis glob `pattern`, exactly as Redis (`SCAN MATCH`) decides.
///
/// `*` matches any run of bytes, `?` one byte, `[abc]` one of a set, `[^abc]` one outside it,
/// `[a-z]` a range (reversed ranges such as `[z-a]` work too), and `\` makes the next byte literal,
/// inside and outside brackets. Redis's quirks are kept on purpose:
/// - an unclosed `[abc` behaves as `[abc]`, a lone `[` at the end matches nothing and `[^` any byte;
/// - a `\` at the very end of the pattern is a literal backslash;
/// - an empty subject matches only the empty pattern (`*` does not match an empty key;
///   Redis's `SCAN` and `KEYS` special-case the pattern `*` before they ever call the matcher);
/// - range bounds compare as signed bytes, as Redis does on x86-64 where C's `char` is signed;
/// - more than 1000 nested `*` never match.
pub fn matches(pattern: &[u8], subject: &[u8]) -> bool {
    let mut hopeless = false;
    match_at(pattern, subject, 0, &mut hopeless)
}

/// Matches one pattern suffix against one subject suffix.
///
/// `hopeless` is Redis's "skip longer matches" shortcut, kept because it also decides the result
/// when the nesting limit is hit: once the tail after some `*` matches no suffix of the subject,
/// letting an earlier `*` swallow more bytes cannot help, so every enclosing `*` stops at once.
fn match_at(mut pattern: &[u8], mut subject: &[u8], nesting: u32, hopeless: &mut bool) -> bool {
    if nesting > MAX_NESTING {
        return false;
    }
    while let (Some(&p), Some(&s)) = (pattern.first(), subject.first()) {
        match p {
            b'*' => {
                let tail = skip_stars(pattern);
                if tail.is_empty() {
                    return true;
                }
                // The tail starts with a byte that consumes one subject byte, so it can never
                // match the empty suffix: only non-empty suffixes are worth trying.
                while !subject.is_empty() {
                    if match_at(tail, subject, nesting + 1, hopeless) {
                        return true;
                    }
                    if *hopeless {
                        return false;
                    }
                    subject = &subject[1..];
                }
                *hopeless = true;
                return false;
            }
            b'?' => pattern = &pattern[1..],
            b'[' => {
                let (hit, end) = bracket(pattern, s);
                if !hit {
                    return false;
                }
                pattern = pattern.get(end + 1..).unwrap_or_default();
            }
            b'\\' if pattern.len() >= 2 => {
                if pattern[1] != s {
                    return false;
                }
                pattern = &pattern[2..];
            }
            _ => {
                if p != s {
                    return false;
                }
                pattern = &pattern[1..];
            }
        }
        subject = &subject[1..];
        if subject.is_empty() {
            // Trailing stars match the empty rest of the subject.
            pattern = skip_stars(pattern);
        }
    }
    pattern.is_empty() && subject.is_empty()
}

/// The pattern after its leading run of `*`.
fn skip_stars(pattern: &[u8]) -> &[u8] {
    let stars = pattern.iter().take_while(|&&b| b == b'*').count();
    &pattern[stars..]
}

/// Decides the bracket expression at `pattern[0] == b'['` for the subject byte `s`.
///
/// Returns whether `s` is accepted (negation applied) and the index of the last pattern byte the
/// expression occupies: its `]`, or the pattern's last byte when the bracket is never closed.
fn bracket(pattern: &[u8], s: u8) -> (bool, usize) {
    let len = pattern.len();
    let mut i = 1;
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut hit = false;
    loop {
        let left = len.saturating_sub(i);
        if left >= 2 && pattern[i] == b'\\' {
            i += 1;
            hit |= pattern[i] == s;
        } else if left >= 1 && pattern[i] == b']' {
            break;
        } else if left == 0 {
            // Unclosed: the expression ends with the pattern's last byte.
            i = len - 1;
            break;
        } else if left >= 3 && pattern[i + 1] == b'-' {
            hit |= in_range(pattern[i], pattern[i + 2], s);
            i += 2;
        } else {
            hit |= pattern[i] == s;
        }
        i += 1;
    }
    (hit != negate, i)
}

/// Whether `s` lies between two range bounds, in either order, comparing bytes as signed the
/// way Redis does on x86-64 (so `[a-\xff]` covers the bytes `0xff` and `0x00..=b'a'`).
fn in_range(a: u8, b: u8, s: u8) -> bool {
    let (a, b, s) = (a as i8, b as i8, s as i8);
    a.min(b) <= s && s <= a.max(b)
}

/// The bytes that have a meaning in a Redis glob and are escaped in data.
fn is_glob_byte(c: char) -> bool {
    matches!(c, '*' | '?' | '[' | ']' | '\\')
}

/// Returns `value` with every glob character (`*`, `?`, `[`, `]`, `\`) escaped by a backslash,
/// so that as a pattern it matches exactly `value`.
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    escape_into(value, &mut out);
    out
}

/// Appends `value` to `out` with every glob character escaped, as [`escape`] does.
pub fn escape_into(value: &str, out: &mut String) {
    // Copy runs without glob characters in one go; most values have none at all.
    let mut rest = value;
    while let Some(at) = rest.find(is_glob_byte) {
        out.push_str(&rest[..at]);
        out.push('\\');
        out.push_str(&rest[at..at + 1]);
        rest = &rest[at + 1..];
    }
    out.push_str(rest);
}

/// Whether `text` holds any of `*`, `?` and `[`, escaped or not: what makes the text of a key
/// template (or a key given by hand to `invalidator.invalidate()`) glob syntax rather than a
/// literal key used byte for byte.
pub fn has_glob_syntax(text: &str) -> bool {
    text.contains(['*', '?', '['])
}

/// The text every key named by `text` begins with, read as a key given by hand is (see
/// [`crate::rules::Invalidation::insert_given`]): text without glob syntax is itself; glob text
/// is unescaped up to its first unescaped `*`, `?` or `[`. Empty when a pattern starts with one.
pub fn literal_prefix(text: &str) -> String {
    if !has_glob_syntax(text) {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '*' | '?' | '[' => break,
            '\\' => out.push(chars.next().unwrap_or('\\')),
            c => out.push(c),
        }
    }
    out
}

/// The one key that `pattern` matches when it holds no unescaped `*`, `?` or `[` (see
/// [`is_pattern`]): each `\x` becomes `x`, and a `\` at the very end stays a backslash, as
/// Redis's matcher reads them.
pub fn unescape(pattern: &str) -> String {
    let mut out = String::with_capacity(pattern.len());
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.push(chars.next().unwrap_or('\\')),
            c => out.push(c),
        }
    }
    out
}

/// Whether `s` used as a pattern could match more than one key: it holds an unescaped `*`, `?`
/// or `[`.
pub fn is_pattern(s: &str) -> bool {
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        match b {
            b'\\' => {
                bytes.next();
            }
            b'*' | b'?' | b'[' => return true,
            _ => {}
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Cases checked against a real `redis-server` 7.0 with `SET` and `SCAN 0 MATCH`.
    const REDIS_CASES: &[(&str, &str, bool)] = &[
        // The examples of the KEYS documentation.
        ("h?llo", "hello", true),
        ("h?llo", "hallo", true),
        ("h?llo", "hllo", false),
        ("h*llo", "hllo", true),
        ("h*llo", "heeeello", true),
        ("h[ae]llo", "hello", true),
        ("h[ae]llo", "hallo", true),
        ("h[ae]llo", "hillo", false),
        ("h[^e]llo", "hallo", true),
        ("h[^e]llo", "hbllo", true),
        ("h[^e]llo", "hello", false),
        ("h[a-b]llo", "hallo", true),
        ("h[a-b]llo", "hbllo", true),
        ("h[a-b]llo", "hcllo", false),
        // Literals, stars and question marks.
        ("", "", true),
        ("", "a", false),
        ("abc", "abc", true),
        ("abc", "abcd", false),
        ("abcd", "abc", false),
        ("*", "anything", true),
        ("*", "", false),
        ("**", "", false),
        ("a*", "a", true),
        ("a**", "a", true),
        ("a*b", "ab", true),
        ("a*b", "axxb", true),
        ("a*b", "axxbx", false),
        ("*b*", "abc", true),
        ("*b*", "acd", false),
        ("a*b*c", "abbbc", true),
        ("a*?", "a", false),
        ("a*?", "ab", true),
        ("?", "", false),
        ("??", "a", false),
        ("*a", "a", true),
        ("*:*", "user:1", true),
        // Escapes outside brackets.
        ("a\\*b", "a*b", true),
        ("a\\*b", "axb", false),
        ("a\\?", "a?", true),
        ("a\\[b", "a[b", true),
        ("a\\\\b", "a\\b", true),
        ("\\a", "a", true),
        ("a\\", "a\\", true),
        ("a\\", "a", false),
        ("\\", "\\", true),
        // Brackets.
        ("[abc]", "b", true),
        ("[abc]", "d", false),
        ("[^abc]", "d", true),
        ("[^abc]", "a", false),
        ("[a-c]", "b", true),
        ("[c-a]", "b", true),
        ("[c-a]", "d", false),
        ("[a-]", "]", true),
        ("[a-]", "_", true),
        ("[a-]", "b", false),
        ("[-a]", "-", true),
        ("[]", "]", false),
        ("[]a]", "a", false),
        ("[]a]", "]a]", false),
        ("[^]", "x", true),
        ("[^]x", "ax", true),
        ("[\\]]", "]", true),
        ("[\\-]", "-", true),
        ("[\\^a]", "^", true),
        ("[a\\]", "]", true),
        ("[a\\]", "a", true),
        ("[a\\]", "\\", false),
        ("[\\", "\\", true),
        // Unclosed brackets.
        ("[", "[", false),
        ("[abc", "b", true),
        ("[abc", "d", false),
        ("a[", "a", false),
        ("a[", "ab", false),
        ("[^", "x", true),
        ("[^", "", false),
        ("x[a-", "xa", true),
        ("x[a-", "x-", true),
        // Signed byte ranges: 0xff is -1, below 'a'.
        ("[a-\u{7f}]", "z", true),
        // Hash tags are plain bytes to the matcher.
        ("{user:*}:profile", "{user:42}:profile", true),
        ("{user:\\*}:profile", "{user:42}:profile", false),
    ];

    #[test]
    fn agrees_with_redis_on_its_cases() {
        for &(pattern, subject, expected) in REDIS_CASES {
            assert_eq!(
                matches(pattern.as_bytes(), subject.as_bytes()),
                expected,
                "pattern {pattern:?} subject {subject:?}"
            );
        }
    }

    #[test]
    fn ranges_compare_signed_bytes_like_redis_on_x86_64() {
        assert!(matches(b"[a-\xff]", b"\xff"));
        assert!(matches(b"[a-\xff]", b"\x00"));
        assert!(!matches(b"[a-\xff]", b"b"));
        assert!(matches(b"[\x80-\xff]", b"\x90"));
        assert!(!matches(b"[\x80-\xff]", b"a"));
    }

    #[test]
    fn matches_bytes_that_are_not_utf8() {
        assert!(matches(b"a*\xfe", b"a\x00\xfe"));
        assert!(matches(b"?", b"\xc3"));
        assert!(!matches(b"?", "é".as_bytes()));
        assert!(matches(b"??", "é".as_bytes()));
    }

    #[test]
    fn gives_up_beyond_a_thousand_nested_stars() {
        let shallow = "*a".repeat(1000);
        let deep = "*a".repeat(1002);
        assert!(matches(shallow.as_bytes(), "a".repeat(1000).as_bytes()));
        assert!(!matches(deep.as_bytes(), "a".repeat(1002).as_bytes()));
    }

    #[test]
    fn abusive_patterns_finish_quickly() {
        let pattern = format!("{}b", "a*".repeat(40));
        let subject = "a".repeat(200);
        assert!(!matches(pattern.as_bytes(), subject.as_bytes()));
    }

    #[test]
    fn escape_prefixes_every_glob_character() {
        assert_eq!(escape("plain:42"), "plain:42");
        assert_eq!(escape("*?[]\\"), "\\*\\?\\[\\]\\\\");
        assert_eq!(escape("a*b"), "a\\*b");
        assert_eq!(escape("é*ü"), "é\\*ü");
        let mut out = String::from("k:");
        escape_into("[x]", &mut out);
        assert_eq!(out, "k:\\[x\\]");
    }

    #[test]
    fn is_pattern_ignores_escaped_characters() {
        assert!(is_pattern("a*"));
        assert!(is_pattern("a?"));
        assert!(is_pattern("a[b]"));
        assert!(is_pattern("a\\\\*"));
        assert!(!is_pattern("plain:42"));
        assert!(!is_pattern("a]"));
        assert!(!is_pattern("a\\*\\?\\["));
        assert!(!is_pattern("trailing\\"));
    }

    #[test]
    fn the_literal_prefix_stops_at_the_first_unescaped_glob_character() {
        assert_eq!(literal_prefix("user:1"), "user:1");
        assert_eq!(literal_prefix(r"path\to"), r"path\to");
        assert_eq!(literal_prefix("feed:1:*"), "feed:1:");
        assert_eq!(literal_prefix(r"weird\*key"), "weird*key");
        assert_eq!(literal_prefix(r"a\[b?c"), "a[b");
        assert_eq!(literal_prefix("*:x"), "");
        assert_eq!(literal_prefix("[ab]x"), "");
    }

    #[test]
    fn unescape_reads_escapes_as_redis_does() {
        assert_eq!(unescape("plain:42"), "plain:42");
        assert_eq!(unescape("a\\*b\\?c\\[d\\]"), "a*b?c[d]");
        assert_eq!(unescape("a\\\\b"), "a\\b");
        assert_eq!(unescape("\\x"), "x");
        assert_eq!(unescape("trailing\\"), "trailing\\");
        for text in ["a\\*b", "a\\\\b", "\\x", "trailing\\", "\\[\\]"] {
            assert!(!is_pattern(text));
            assert!(
                matches(text.as_bytes(), unescape(text).as_bytes()),
                "{text}"
            );
        }
    }

    #[test]
    fn glob_syntax_is_any_star_question_mark_or_bracket() {
        assert!(has_glob_syntax("a*") && has_glob_syntax("a\\?") && has_glob_syntax("[x"));
        assert!(!has_glob_syntax("a\\b") && !has_glob_syntax("a]") && !has_glob_syntax("{x}"));
    }

    proptest! {
        #[test]
        fn an_unescaped_non_pattern_matches_exactly_its_unescaping(
            v in "[ab*?\\[\\]\\\\^-]{0,8}",
            w in "[ab*?\\[\\]\\\\^-]{0,8}",
        ) {
            if !is_pattern(&v) {
                prop_assert_eq!(matches(v.as_bytes(), w.as_bytes()), unescape(&v) == w);
            }
        }

        #[test]
        fn an_escaped_value_matches_only_itself(v in ".*", w in ".*") {
            prop_assert_eq!(matches(escape(&v).as_bytes(), w.as_bytes()), v == w);
        }

        #[test]
        fn an_escaped_glob_heavy_value_matches_only_itself(
            v in "[ab*?\\[\\]\\\\^-]{0,8}",
            w in "[ab*?\\[\\]\\\\^-]{0,8}",
        ) {
            prop_assert!(matches(escape(&v).as_bytes(), v.as_bytes()));
            prop_assert_eq!(matches(escape(&v).as_bytes(), w.as_bytes()), v == w);
        }

        #[test]
        fn an_escaped_value_is_never_a_pattern(v in ".*") {
            prop_assert!(!is_pattern(&escape(&v)));
        }

        #[test]
        fn the_matcher_never_panics(
            p in proptest::collection::vec(any::<u8>(), 0..24),
            s in proptest::collection::vec(any::<u8>(), 0..24),
        ) {
            matches(&p, &s);
        }
    }
}
