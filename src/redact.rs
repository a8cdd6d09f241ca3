//! Hiding passwords in connection strings before they reach an error message or a log line.
//!
//! Every URL the crate prints (Postgres or Redis) goes through [`redact`] first.

/// The text that stands in for a hidden password.
const MASK: &str = "***";

/// Query parameters and connection-string keywords whose values are secrets: `password` for
/// Postgres, `pass` for a Redis socket URL, and libpq's `sslpassword`.
const SECRET_PARAMS: &[&str] = &["password", "pass", "sslpassword"];

/// Returns `conn` with every password replaced by `***`: the password of a URL's user info
/// (`redis://user:secret@host` → `redis://user:***@host`), `password=`/`pass=` query parameters,
/// and `password=` in a libpq keyword/value string (`host=db password=secret`).
pub fn redact(conn: &str) -> String {
    match url_rest(conn) {
        Some(rest) => {
            let scheme = &conn[..conn.len() - rest.len()];
            format!("{scheme}{}", redact_url_rest(rest))
        }
        None => redact_keywords(conn),
    }
}

/// The part of `conn` after `scheme://` when it starts with a URL scheme, as both clients
/// require; anything else is a keyword/value string, even if a value holds `://`.
fn url_rest(conn: &str) -> Option<&str> {
    let (scheme, rest) = conn.split_once("://")?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    let valid = first.is_ascii_alphabetic()
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    valid.then_some(rest)
}

/// Redacts the part of a URL after `scheme://`.
///
/// The two clients read a URL differently, and a URL that neither can parse is still printed
/// in the error that says so, so every reading's password is hidden:
/// - tokio-postgres takes the user info up to the first `@` of the whole string, past any `/`,
///   `?` or `#`, and the password from its first `:`;
/// - the `url` crate (Redis) takes it up to the last `@` before the path; a person who wrote a
///   raw `@`, `/` or `#` into a password meant the last `@` of all;
/// - query parameters run from a `?` to the next `&` (tokio-postgres does not stop at `#`), and
///   their names are percent-decoded first.
///
/// The spans are masked together, so a URL with an `@` in its query loses a little more than
/// its password (`host:***@z`), never less.
fn redact_url_rest(rest: &str) -> String {
    let mut hidden: Vec<(usize, usize)> = Vec::new();
    if let Some(last_at) = rest.rfind('@')
        && let Some(colon) = rest[..last_at].find(':')
    {
        hidden.push((colon + 1, last_at));
    }
    // Where the query starts depends on the reading (a `?` may be part of a password), so each
    // `?` is tried as its start.
    for (question, _) in rest.match_indices('?') {
        let mut at = question + 1;
        for pair in rest[question + 1..].split('&') {
            if let Some((name, value)) = pair.split_once('=')
                && is_secret(&percent_decoded(name))
            {
                let from = at + name.len() + 1;
                hidden.push((from, from + value.len()));
            }
            at += pair.len() + 1;
        }
    }
    mask(rest, hidden)
}

/// Replaces each of the byte ranges `hidden` of `text` (overlapping or not) with one mask.
fn mask(text: &str, mut hidden: Vec<(usize, usize)>) -> String {
    hidden.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    for (from, to) in hidden {
        if to <= copied {
            continue;
        }
        if from >= copied {
            out.push_str(&text[copied..from]);
            out.push_str(MASK);
        }
        copied = to;
    }
    out.push_str(&text[copied..]);
    out
}

/// `text` with `%XX` escapes decoded (and `+` as a space, as a form-encoded query reads it);
/// bytes that do not decode are kept.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |i: usize| bytes.get(i).and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                // Two hex digits make one byte, below 256.
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
            (b'+', _, _) => out.push(b' '),
            (b, _, _) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Redacts `password = value` in a libpq keyword/value string; values may be single-quoted with
/// backslash escapes.
fn redact_keywords(conn: &str) -> String {
    let mut out = String::with_capacity(conn.len());
    let mut rest = conn;
    while let Some(eq) = rest.find('=') {
        let before = &rest[..eq];
        let keyword = before
            .rsplit(|c: char| c.is_whitespace())
            .find(|word| !word.is_empty())
            .unwrap_or("");
        out.push_str(before);
        out.push('=');
        let after = &rest[eq + 1..];
        let value_start = after.len() - after.trim_start().len();
        let value_len = value_length(&after[value_start..]);
        if is_secret(keyword) {
            out.push_str(&after[..value_start]);
            out.push_str(MASK);
        } else {
            out.push_str(&after[..value_start + value_len]);
        }
        rest = &after[value_start + value_len..];
    }
    out.push_str(rest);
    out
}

/// The length of the keyword value at the start of `text`: a quoted string with its quotes, or
/// everything up to the next whitespace; in both a backslash escapes the next character (so
/// `a\ b` is one value, as tokio-postgres reads it).
fn value_length(text: &str) -> usize {
    let quoted = text.starts_with('\'');
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(usize::from(quoted)) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' if quoted => return i + 1,
            c if !quoted && c.is_whitespace() => return i,
            _ => {}
        }
    }
    text.len()
}

/// Whether a parameter or keyword name holds a secret.
fn is_secret(name: &str) -> bool {
    SECRET_PARAMS
        .iter()
        .any(|secret| name.trim().eq_ignore_ascii_case(secret))
}

#[cfg(test)]
mod tests {
    use super::redact;
    use proptest::prelude::*;

    /// A password: upper-case letters (which nothing else in the generated strings has, so any
    /// upper-case letter in the output is a leak) mixed with every character that ends a part
    /// of a URL somewhere.
    fn password() -> impl Strategy<Value = String> {
        ("[A-Z]", "[A-Z/?#@:&= %+.-]{0,12}").prop_map(|(first, rest)| first + &rest)
    }

    /// A query parameter: a secret one (its name possibly percent-encoded) with a password that
    /// has no raw `&` (which ends a value for every client), or an ordinary one.
    fn parameter() -> impl Strategy<Value = String> {
        prop_oneof![
            (
                prop::sample::select(vec!["password", "pass", "pass%77ord", "sslpassword"]),
                password()
            )
                .prop_map(|(name, value)| format!("{name}={}", value.replace('&', "%26"))),
            ("[a-z_]{1,8}", "[a-z0-9@:/.-]{0,8}")
                .prop_map(|(name, value)| format!("{name}={value}")),
        ]
    }

    /// A URL of either client, its password in the user info, in the query, or both.
    fn url() -> impl Strategy<Value = String> {
        (
            prop::sample::select(vec!["postgres", "postgresql", "redis", "rediss"]),
            "[a-z0-9]{0,6}",
            prop::option::of(password()),
            "[a-z0-9.]{1,10}(:[0-9]{1,5})?",
            "(/[a-z0-9]{0,6})?",
            prop::collection::vec(parameter(), 0..3),
        )
            .prop_map(|(scheme, user, password, host, path, params)| {
                let userinfo = match password {
                    Some(password) => format!("{user}:{password}@"),
                    None if user.is_empty() => String::new(),
                    None => format!("{user}@"),
                };
                let query = if params.is_empty() {
                    String::new()
                } else {
                    format!("?{}", params.join("&"))
                };
                format!("{scheme}://{userinfo}{host}{path}{query}")
            })
    }

    /// A libpq keyword/value string whose password is quoted or escaped as tokio-postgres reads it.
    fn keywords() -> impl Strategy<Value = String> {
        (password(), any::<bool>(), "[a-z0-9]{1,8}").prop_map(|(password, quoted, host)| {
            let value = if quoted {
                format!("'{}'", password.replace('\\', "\\\\").replace('\'', "\\'"))
            } else {
                password.replace(' ', "\\ ")
            };
            format!("host={host} password = {value} dbname=app")
        })
    }

    proptest! {
        #[test]
        fn no_password_byte_of_any_url_form_reaches_the_redacted_text(
            conn in prop_oneof![url(), keywords()]
        ) {
            let shown = redact(&conn);
            prop_assert!(
                !shown.contains(|c: char| c.is_ascii_uppercase()),
                "{conn:?} became {shown:?}"
            );
            // What each client would send as the password is hidden too, whole (a password of
            // one or two symbols may stand in the output as punctuation).
            let postgres = conn.parse::<tokio_postgres::Config>().ok().and_then(|config| {
                config.get_password().map(|p| String::from_utf8_lossy(p).into_owned())
            });
            let redis = ::redis::IntoConnectionInfo::into_connection_info(conn.as_str())
                .ok()
                .and_then(|info| info.redis_settings().password().map(str::to_owned));
            for password in postgres.into_iter().chain(redis) {
                prop_assert!(
                    password.len() < 3 || !shown.contains(&password),
                    "{conn:?} became {shown:?}"
                );
            }
        }
    }

    #[test]
    fn a_password_with_slash_hash_or_at_is_hidden_whole() {
        assert_eq!(
            redact("postgres://inv:se/cret#x@host/db"),
            "postgres://inv:***@host/db"
        );
        assert_eq!(redact("redis://:red/pw@host"), "redis://:***@host");
        assert_eq!(
            redact("postgres://host/db?password=se@cret#x&sslmode=require"),
            "postgres://host/db?password=***&sslmode=require"
        );
        assert_eq!(
            redact("postgres://host/db?pass%77ord=secret"),
            "postgres://host/db?pass%77ord=***"
        );
        assert_eq!(
            redact("host=db password=se\\ cret dbname=app"),
            "host=db password=*** dbname=app"
        );
        // A value that holds `://` does not make a keyword string a URL.
        assert_eq!(redact("password=a://b host=db"), "password=*** host=db");
    }

    #[test]
    fn hides_the_password_of_a_url() {
        assert_eq!(
            redact("redis://user:s3cret@127.0.0.1:6379/0"),
            "redis://user:***@127.0.0.1:6379/0"
        );
        assert_eq!(
            redact("rediss://:s3cret@cache:6380"),
            "rediss://:***@cache:6380"
        );
        assert_eq!(
            redact("postgres://app:p%40ss@db/app?sslmode=require"),
            "postgres://app:***@db/app?sslmode=require"
        );
    }

    #[test]
    fn a_raw_at_sign_in_the_password_does_not_leak_its_tail() {
        assert_eq!(redact("redis://u:a@b@host/0"), "redis://u:***@host/0");
    }

    #[test]
    fn leaves_urls_without_password_alone() {
        for url in [
            "redis://127.0.0.1:6379/0",
            "redis://user@host",
            "postgres://postgres@127.0.0.1:5432/db",
            "redis+unix:///run/redis.sock?db=1",
        ] {
            assert_eq!(redact(url), url);
        }
    }

    #[test]
    fn hides_password_query_parameters() {
        assert_eq!(
            redact("redis+unix:///run/redis.sock?db=1&pass=s3cret"),
            "redis+unix:///run/redis.sock?db=1&pass=***"
        );
        assert_eq!(
            redact("postgres://db/app?password=s3cret&sslmode=disable#x"),
            "postgres://db/app?password=***&sslmode=disable#x"
        );
    }

    #[test]
    fn hides_the_password_of_a_keyword_string() {
        assert_eq!(
            redact("host=db user=app password=s3cret dbname=app"),
            "host=db user=app password=*** dbname=app"
        );
        assert_eq!(
            redact("host=db password = 's3 \\'cret' port=5432"),
            "host=db password = *** port=5432"
        );
    }
}
