//! Hiding passwords in connection strings before they reach an error message or a log line.
//!
//! Every URL the crate prints (Postgres or Redis) goes through [`redact`] first.

/// The text that stands in for a hidden password.
const MASK: &str = "***";

/// Query parameters and connection-string keywords whose values are secrets.
const SECRET_PARAMS: &[&str] = &["password", "pass"];

/// Returns `conn` with every password replaced by `***`: the password of a URL's user info
/// (`redis://user:secret@host` → `redis://user:***@host`), `password=`/`pass=` query parameters,
/// and `password=` in a libpq keyword/value string (`host=db password=secret`).
pub fn redact(conn: &str) -> String {
    match conn.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", redact_url_rest(rest)),
        None => redact_keywords(conn),
    }
}

/// Redacts the part of a URL after `scheme://`: user info, then query parameters.
fn redact_url_rest(rest: &str) -> String {
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    // The last `@` ends the user info: a password may itself contain a raw `@`.
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _password)) => format!("{user}:{MASK}@{host}"),
            None => format!("{userinfo}@{host}"),
        },
        None => authority.to_owned(),
    };
    let (path, query) = match tail.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (tail, None),
    };
    let Some(query) = query else {
        return format!("{authority}{path}");
    };
    let (query, fragment) = match query.split_once('#') {
        Some((query, fragment)) => (query, Some(fragment)),
        None => (query, None),
    };
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret(name) => format!("{name}={MASK}"),
            _ => pair.to_owned(),
        })
        .collect();
    let mut out = format!("{authority}{path}?{}", query.join("&"));
    if let Some(fragment) = fragment {
        out.push('#');
        out.push_str(fragment);
    }
    out
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
/// everything up to the next whitespace.
fn value_length(text: &str) -> usize {
    if !text.starts_with('\'') {
        return text.find(char::is_whitespace).unwrap_or(text.len());
    }
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(1) {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '\'' => return i + 1,
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
