//! The rules-only half of `check` (all of `check --offline`): patterns without a literal prefix,
//! duplicate rules and rules that another rule shadows. No I/O: it reads the compiled rules.
//!
//! Shadowing is decided symbolically and soundly: a key template is read as a sequence of glob
//! tokens in which each placeholder is a variable, and one template covers another when its
//! tokens match the other's with `*` absorbing anything (variables included) and a variable
//! matching only the same variable. Both rules render from the same row, so a match holds for
//! every row; when it cannot be shown, nothing is reported.

use crate::change::{Op, unquote};
use crate::rules::{Rule, RuleSet, Template};

use super::{Finding, Kind, Severity};

/// One piece of a key template as written: literal text or a placeholder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Piece {
    /// Literal text, `{{` and `}}` already single braces.
    Text(String),
    /// A placeholder: its column, and its inside as written (`column|filter`), which identifies
    /// the value it renders.
    Value {
        /// The column.
        column: String,
        /// `column` or `column|filter|...`.
        inner: String,
    },
}

/// Splits a template (which compiled, so it is well formed) into its pieces.
pub(super) fn pieces(source: &str) -> Vec<Piece> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut rest = source;
    while let Some(c) = rest.chars().next() {
        let after = &rest[c.len_utf8()..];
        match c {
            '{' | '}' if after.starts_with(c) => {
                text.push(c);
                rest = &after[1..];
            }
            '{' => {
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                // A quoted column name may hold `|` and `}`: the placeholder ends at the first
                // `}` after it.
                let (column, tail) = match unquote(after) {
                    Some((column, tail)) => (column, tail),
                    None => {
                        let end = after.find(['|', '}']).unwrap_or(after.len());
                        (after[..end].to_owned(), &after[end..])
                    }
                };
                let end = tail.find('}').unwrap_or(tail.len());
                let inner = after[..after.len() - tail.len() + end].to_owned();
                out.push(Piece::Value { column, inner });
                rest = tail.get(end + 1..).unwrap_or_default();
            }
            c => {
                text.push(c);
                rest = after;
            }
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    out
}

/// The template with every placeholder, or those of `unknown` columns, as `*`: what it renders
/// when those values are not known. The literal text of a literal template is then escaped, as
/// rendering does.
pub(super) fn widened(template: &Template, unknown: impl Fn(&str) -> bool) -> String {
    let pieces = pieces(template.source());
    let becomes_pattern = template.is_pattern()
        || pieces
            .iter()
            .any(|p| matches!(p, Piece::Value { column, .. } if unknown(column)));
    let mut out = String::new();
    for piece in &pieces {
        match piece {
            Piece::Text(text) if becomes_pattern && !template.is_pattern() => {
                crate::glob::escape_into(text, &mut out);
            }
            Piece::Text(text) => out.push_str(text),
            Piece::Value { column, .. } if unknown(column) => out.push('*'),
            Piece::Value { inner, .. } => {
                out.push('{');
                out.push_str(inner);
                out.push('}');
            }
        }
    }
    out
}

/// A glob token of a template read symbolically.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    /// One literal character.
    Char(char),
    /// `?`: one byte.
    Any,
    /// `[...]` as written, brackets included: one byte of a set.
    Class(String),
    /// `*`: any run of bytes.
    Star,
    /// A placeholder's value, identified by the placeholder as written.
    Var(String),
}

/// Reads a template as glob tokens: the literal text of a pattern template is glob syntax, that
/// of a literal template is characters.
fn tokens(template: &Template) -> Vec<Token> {
    let mut out = Vec::new();
    for piece in pieces(template.source()) {
        match piece {
            Piece::Value { inner, .. } => out.push(Token::Var(inner)),
            Piece::Text(text) if !template.is_pattern() => {
                out.extend(text.chars().map(Token::Char))
            }
            Piece::Text(text) => {
                let mut chars = text.chars().peekable();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => out.push(Token::Char(chars.next().unwrap_or('\\'))),
                        '*' => {
                            if out.last() != Some(&Token::Star) {
                                out.push(Token::Star);
                            }
                        }
                        '?' => out.push(Token::Any),
                        '[' => {
                            // Up to the closing `]`; an unclosed class runs to the end, as in Redis.
                            let mut class = String::from("[");
                            while let Some(c) = chars.next() {
                                class.push(c);
                                if c == '\\' {
                                    class.extend(chars.next());
                                } else if c == ']' {
                                    break;
                                }
                            }
                            out.push(Token::Class(class));
                        }
                        c => out.push(Token::Char(c)),
                    }
                }
            }
        }
    }
    out
}

/// Whether every key or pattern `q` renders is matched by what `p` renders for the same row.
fn covers(p: &[Token], q: &[Token]) -> bool {
    match (p.split_first(), q.split_first()) {
        (None, None) => true,
        (Some((Token::Star, rest)), _) => covers(rest, q) || (!q.is_empty() && covers(p, &q[1..])),
        (Some((pt, p_rest)), Some((qt, q_rest))) => one(pt, qt) && covers(p_rest, q_rest),
        _ => false,
    }
}

/// Whether token `p` matches everything the single token `q` stands for.
fn one(p: &Token, q: &Token) -> bool {
    match (p, q) {
        (Token::Char(a), Token::Char(b)) => a == b,
        (Token::Var(a), Token::Var(b)) => a == b,
        // `?` is one byte: a one-byte character, another `?` or a class.
        (Token::Any, Token::Char(c)) => c.is_ascii(),
        (Token::Any, Token::Any | Token::Class(_)) => true,
        (Token::Class(class), Token::Char(c)) => {
            c.is_ascii() && crate::glob::matches(class.as_bytes(), &[*c as u8])
        }
        (Token::Class(a), Token::Class(b)) => a == b,
        _ => false,
    }
}

/// The literal text a pattern template begins with, up to its first glob token or placeholder:
/// `None` when it begins with a placeholder.
fn literal_prefix(template: &Template) -> Option<String> {
    let mut prefix = String::new();
    for token in tokens(template) {
        match token {
            Token::Char(c) => prefix.push(c),
            Token::Var(_) if prefix.is_empty() => return None,
            _ => break,
        }
    }
    Some(prefix)
}

/// Whether every change that fires `b` also fires `a` (same table assumed): `a` fires on each
/// operation `b` fires on, and on every update that fires `b`.
fn fires_whenever(a: &Rule, b: &Rule) -> bool {
    b.ops.iter().all(|op| a.ops.contains(op))
        && (!b.ops.contains(&Op::Update)
            || a.changed.is_empty()
            || (!b.changed.is_empty() && b.changed.iter().all(|c| a.changed.contains(c))))
}

/// The template of `a` that covers `template` for every row, if one does.
fn covering<'a>(a: &'a Rule, template: &Template) -> Option<&'a Template> {
    let q = tokens(template);
    a.templates()
        .iter()
        .find(|candidate| covers(&tokens(candidate), &q))
}

/// `[insert, update]` as written in a rule.
fn ops_list(ops: &[Op]) -> String {
    let names: Vec<&str> = ops.iter().map(|op| op.as_str()).collect();
    format!("[{}]", names.join(", "))
}

/// Everything `check --offline` finds in the rules.
pub(super) fn findings(rules: &RuleSet) -> Vec<Finding> {
    let mut out = Vec::new();
    for rule in rules.rules() {
        prefixes(rule, &mut out);
    }
    let all = rules.rules();
    let mut reported = vec![false; all.len()];
    for (i, a) in all.iter().enumerate() {
        for (j, b) in all.iter().enumerate().skip(i + 1) {
            if a.table != b.table || reported[j] {
                continue;
            }
            let mut a_keys = a.keys.clone();
            let mut b_keys = b.keys.clone();
            a_keys.sort();
            a_keys.dedup();
            b_keys.sort();
            b_keys.dedup();
            let both: Vec<Op> = b
                .ops
                .iter()
                .copied()
                .filter(|op| a.ops.contains(op))
                .collect();
            if a_keys == b_keys && !both.is_empty() {
                reported[j] = true;
                out.push(Finding::about(
                    b,
                    Severity::Warning,
                    Kind::Duplicate,
                    format!(
                        "duplicates rule {:?} ({}:{}): same table and keys, and both fire on {}",
                        a.name,
                        a.file,
                        a.line,
                        ops_list(&both)
                    ),
                    format!(
                        "remove one of the two, or merge them into one rule (on = {})",
                        ops_list(&union(&a.ops, &b.ops))
                    ),
                ));
                continue;
            }
            for (by, shadowed, index) in [(a, b, j), (b, a, i)] {
                if reported[index] || !fires_whenever(by, shadowed) {
                    continue;
                }
                let cover: Option<Vec<String>> = shadowed
                    .templates()
                    .iter()
                    .map(|t| covering(by, t).map(|c| format!("`{t}` by `{c}`")))
                    .collect();
                if let Some(cover) = cover {
                    reported[index] = true;
                    out.push(Finding::about(
                        shadowed,
                        Severity::Warning,
                        Kind::Shadowed,
                        format!(
                            "is shadowed by rule {:?} ({}:{}), which fires on every change that \
                             fires it and always deletes its keys too: {}",
                            by.name,
                            by.file,
                            by.line,
                            cover.join(", ")
                        ),
                        format!(
                            "remove rule {:?}, or narrow rule {:?} (its `on`, `changed` or keys)",
                            shadowed.name, by.name
                        ),
                    ));
                }
            }
        }
    }
    out
}

/// The operations of either list, in order.
fn union(a: &[Op], b: &[Op]) -> Vec<Op> {
    Op::ALL
        .into_iter()
        .filter(|op| a.contains(op) || b.contains(op))
        .collect()
}

/// Patterns that match keys of every kind: an error when the template itself has no literal
/// prefix, a warning when it begins with a placeholder (a prefix only while the value is known).
fn prefixes(rule: &Rule, out: &mut Vec<Finding>) {
    for template in rule.templates() {
        match literal_prefix(template) {
            Some(prefix) if prefix.is_empty() && template.is_pattern() => out.push(Finding::about(
                rule,
                Severity::Error,
                Kind::NoPrefix,
                format!(
                    "key `{template}` is a pattern without a literal prefix: it matches keys of \
                     every kind in the database{}",
                    if template.source().trim_matches('*').is_empty() {
                        " (`*` deletes the whole cache)"
                    } else {
                        ""
                    }
                ),
                "begin the key with fixed text that names what is cached, e.g. `search:*`"
                    .to_owned(),
            )),
            Some(_) => {}
            None => {
                let widest = widened(template, |_| true);
                out.push(Finding::about(
                    rule,
                    Severity::Warning,
                    Kind::LeadingPlaceholder,
                    format!(
                        "key `{template}` begins with a placeholder: whenever its value is \
                         unknown (a TRUNCATE, a lost slot, an old row the REPLICA IDENTITY does \
                         not send, a transaction too large to plan row by row) it becomes \
                         `{widest}`, which matches keys of every kind{}",
                        if widest.trim_matches('*').is_empty() {
                            " (the whole cache)"
                        } else {
                            ""
                        }
                    ),
                    "begin the key with fixed text, e.g. `profile:{id}` rather than `{id}:profile`"
                        .to_owned(),
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> RuleSet {
        RuleSet::compile(&[("rules/t.toml".to_owned(), text.to_owned())]).unwrap()
    }

    fn t(source: &str) -> Template {
        Template::parse(source).unwrap()
    }

    fn kinds(found: &[Finding]) -> Vec<(Kind, &str)> {
        found
            .iter()
            .map(|f| (f.kind, f.rule.as_deref().unwrap_or("")))
            .collect()
    }

    #[test]
    fn pieces_undouble_braces_and_keep_filters() {
        assert_eq!(
            pieces("{{u:{id|lower}}}:p"),
            [
                Piece::Text("{u:".into()),
                Piece::Value {
                    column: "id".into(),
                    inner: "id|lower".into()
                },
                Piece::Text("}:p".into()),
            ]
        );
        assert_eq!(
            pieces(r#"a:{"x|}"""|lower}:{y}"#),
            [
                Piece::Text("a:".into()),
                Piece::Value {
                    column: "x|}\"".into(),
                    inner: r#""x|}"""|lower"#.into()
                },
                Piece::Text(":".into()),
                Piece::Value {
                    column: "y".into(),
                    inner: "y".into()
                },
            ]
        );
    }

    #[test]
    fn widened_replaces_unknown_placeholders_and_escapes_literal_text() {
        assert_eq!(widened(&t("a:{x}:{y}:*"), |c| c == "x"), "a:*:{y}:*");
        assert_eq!(widened(&t("a]{x}"), |_| true), "a\\]*");
        assert_eq!(widened(&t("a]{x}"), |_| false), "a]{x}");
    }

    #[test]
    fn coverage_is_symbolic_and_sound() {
        let cover = |p: &str, q: &str| covers(&tokens(&t(p)), &tokens(&t(q)));
        assert!(cover("search:*", "search:{location}:x"));
        assert!(cover("booking:{id}:*", "booking:{id}:details"));
        assert!(cover("a:{id}", "a:{id}"));
        assert!(cover("a:?", "a:b"));
        assert!(cover("a:[bc]", "a:b"));
        assert!(cover("*", "anything:{x}"));
        // A different column, filter or literal is not the same value.
        assert!(!cover("booking:{id}:*", "booking:{booking_id}:details"));
        assert!(!cover("a:{id|lower}", "a:{id}"));
        assert!(!cover("a:{id}", "a:*"));
        assert!(!cover("a:?", "a:{x}"));
        assert!(!cover("a:?", "a:é"));
        assert!(!cover("a:[bc]", "a:d"));
        // An escaped `*` is a character, not a wildcard.
        assert!(!cover("a\\*", "a:{x}"));
    }

    #[test]
    fn a_bare_star_or_a_leading_glob_is_an_error_and_a_leading_placeholder_a_warning() {
        let found = findings(&rules(
            "[[rule]]\nname = \"all\"\ntable = \"t\"\nkeys = [\"*\"]\n\
             [[rule]]\nname = \"tail\"\ntable = \"u\"\nkeys = [\"*:foo\", \"ok:*\"]\n\
             [[rule]]\nname = \"lead\"\ntable = \"v\"\nkeys = [\"{id}:profile\", \"{{tag}}:{id}\"]\n",
        ));
        assert_eq!(
            kinds(&found),
            [
                (Kind::NoPrefix, "all"),
                (Kind::NoPrefix, "tail"),
                (Kind::LeadingPlaceholder, "lead")
            ]
        );
        assert_eq!(found[0].severity, Severity::Error);
        assert!(
            found[0].message.contains("whole cache"),
            "{}",
            found[0].message
        );
        assert_eq!(found[2].severity, Severity::Warning);
        assert!(
            found[2].message.contains("`*:profile`"),
            "{}",
            found[2].message
        );
    }

    #[test]
    fn duplicates_need_the_same_keys_and_a_common_operation() {
        let found = findings(&rules(
            "[[rule]]\nname = \"a\"\ntable = \"t\"\non = [\"insert\", \"update\"]\nkeys = [\"k:{id}\", \"j:{id}\"]\n\
             [[rule]]\nname = \"b\"\ntable = \"t\"\non = [\"update\", \"delete\"]\nkeys = [\"j:{id}\", \"k:{id}\"]\n\
             [[rule]]\nname = \"c\"\ntable = \"t\"\non = [\"truncate\"]\nkeys = [\"k:{id}\", \"j:{id}\"]\n\
             [[rule]]\nname = \"d\"\ntable = \"other\"\nkeys = [\"k:{id}\", \"j:{id}\"]\n",
        ));
        assert_eq!(kinds(&found), [(Kind::Duplicate, "b")]);
        assert!(
            found[0].message.contains("\"a\" (rules/t.toml:1)"),
            "{}",
            found[0].message
        );
        assert!(
            found[0]
                .fix
                .as_deref()
                .unwrap()
                .contains("[insert, update, delete]")
        );
    }

    #[test]
    fn a_rule_whose_keys_another_always_deletes_is_shadowed() {
        let found = findings(&rules(
            r#"
[[rule]]
name = "wide"
table = "bookings"
changed = ["car_id", "status"]
keys = ["booking:{id}:*", "search:*"]

[[rule]]
name = "narrow"
table = "bookings"
on = ["update"]
changed = ["status"]
keys = ["booking:{id}:details", "search:{car_id}"]

[[rule]]
name = "fires-more-often"
table = "bookings"
on = ["update"]
keys = ["search:x"]

[[rule]]
name = "other-column"
table = "bookings"
on = ["delete"]
keys = ["booking:{car_id}:x"]
"#,
        ));
        assert_eq!(kinds(&found), [(Kind::Shadowed, "narrow")]);
        assert!(
            found[0]
                .message
                .contains("`booking:{id}:details` by `booking:{id}:*`"),
            "{}",
            found[0].message
        );
    }

    #[test]
    fn the_exodrive_rules_have_no_offline_findings() {
        let set = RuleSet::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/rules"
        )))
        .unwrap();
        let found = findings(&set);
        assert!(found.is_empty(), "{found:#?}");
    }
}
