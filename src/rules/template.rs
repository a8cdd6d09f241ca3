//! Key templates: parsed once when rules compile, rendered for every change.
//!
//! A template is literal text with placeholders, `booking:{id}` or `day:{starts_at|date}`;
//! `{{` and `}}` stand for literal braces so that Redis Cluster hash tags can be written
//! (`{{user:{id}}}:profile` renders `{user:42}:profile`). Rendering follows the README's rules:
//! a NULL renders nothing, an unknown value becomes `*`, and whenever the result is a pattern every
//! substituted value is glob-escaped so that data can never widen a deletion.

use std::borrow::Cow;
use std::fmt;

use crate::change::{Row, Value, unquote};
use crate::glob;
use crate::sql::quote_ident;

/// A key template, parsed and classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    /// The template as written in the rule file.
    source: String,
    /// Literal text and placeholders, in order.
    segments: Vec<Segment>,
    /// Whether the literal text holds `*`, `?` or `[`, which makes every rendering a pattern.
    pattern: bool,
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Text copied into the key, with `{{` and `}}` already turned into single braces.
    Literal(String),
    /// A column value, passed through filters.
    Placeholder {
        /// The column whose value is substituted.
        column: String,
        /// Filters applied left to right.
        filters: Vec<Filter>,
    },
}

/// A transformation of a substituted value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Filter {
    /// Unicode lowercase.
    Lower,
    /// Unicode uppercase.
    Upper,
    /// The `YYYY-MM-DD` prefix of a date or timestamp.
    Date,
}

/// The filter names, in the order error messages list them.
const FILTERS: &str = "lower, upper, date";

impl Filter {
    /// The filter called `name` in a template, if there is one.
    fn from_name(name: &str) -> Option<Filter> {
        match name {
            "lower" => Some(Filter::Lower),
            "upper" => Some(Filter::Upper),
            "date" => Some(Filter::Date),
            _ => None,
        }
    }

    /// Applies the filter; `date` leaves a value without a date unchanged, but [`gives_up`]
    /// keeps such values away from it.
    fn apply(self, value: Cow<'_, str>) -> Cow<'_, str> {
        match self {
            Filter::Lower => Cow::Owned(value.to_lowercase()),
            Filter::Upper => Cow::Owned(value.to_uppercase()),
            Filter::Date => match (date_prefix(&value), value) {
                (Some(date), Cow::Borrowed(text)) => Cow::Borrowed(&text[..date]),
                (Some(date), Cow::Owned(mut text)) => {
                    text.truncate(date);
                    Cow::Owned(text)
                }
                (None, value) => value,
            },
        }
    }
}

/// Whether the filters cannot name a value for `text`, so the placeholder must render `*`.
///
/// Only `date` gives up, on a value that does not begin with a date (`infinity`, a non-ISO
/// DateStyle, a year past 9999): guessing a date there could miss the cached key, and
/// over-invalidating is the safe side. Checking the raw value is enough because `lower` and `upper`
/// never turn a character into an ASCII digit or `-`, nor one of those into anything else.
fn gives_up(filters: &[Filter], text: &str) -> bool {
    filters.contains(&Filter::Date) && date_prefix(text).is_none()
}

/// The length of the `YYYY-MM-DD` prefix of `text`, when it has one that ends there.
fn date_prefix(text: &str) -> Option<usize> {
    let bytes = text.as_bytes();
    let shape = b"dddd-dd-dd";
    let is_date = bytes.len() >= shape.len()
        && shape.iter().zip(bytes).all(|(&want, &got)| match want {
            b'd' => got.is_ascii_digit(),
            _ => got == want,
        })
        && !bytes.get(shape.len()).is_some_and(u8::is_ascii_digit);
    is_date.then_some(shape.len())
}

/// Why a template could not be parsed; every variant names the template.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template is the empty string.
    #[error("empty key")]
    Empty,
    /// A `{` opens a placeholder that no `}` closes.
    #[error(
        "unclosed \"{{\" at column {column} in key {template:?} (write \"{{{{\" for a literal brace)"
    )]
    Unclosed {
        /// The template as written.
        template: String,
        /// The 1-based character position of the `{`.
        column: usize,
    },
    /// A `}` that closes nothing and is not doubled.
    #[error(
        "unmatched \"}}\" at column {column} in key {template:?} (write \"}}}}\" for a literal brace)"
    )]
    StrayClose {
        /// The template as written.
        template: String,
        /// The 1-based character position of the `}`.
        column: usize,
    },
    /// A placeholder without a column name, such as `{}` or `{|lower}`.
    #[error("placeholder without a column name at column {column} in key {template:?}")]
    EmptyPlaceholder {
        /// The template as written.
        template: String,
        /// The 1-based character position of the placeholder's `{`.
        column: usize,
    },
    /// A placeholder names a filter that does not exist.
    #[error("unknown filter {filter:?} in key {template:?} (filters: {FILTERS})")]
    UnknownFilter {
        /// The template as written.
        template: String,
        /// The filter name as written.
        filter: String,
    },
    /// A quoted column name that no quote closes.
    #[error(
        "unclosed quote at column {column} in key {template:?} (a quoted column name ends with \"; write \"\" for a quote inside it)"
    )]
    UnclosedQuote {
        /// The template as written.
        template: String,
        /// The 1-based character position of the opening quote.
        column: usize,
    },
    /// Text between a quoted column name and the `|` or `}` that must follow it.
    #[error(
        "unexpected text after the quoted column name at column {column} in key {template:?} (expected \"|\" or \"}}\")"
    )]
    AfterQuote {
        /// The template as written.
        template: String,
        /// The 1-based character position of the text.
        column: usize,
    },
    /// An unquoted column name holds whitespace, a control character, a brace or a quote.
    #[error("invalid column name {name:?} in key {template:?} ({QUOTE_HINT})")]
    InvalidColumn {
        /// The template as written.
        template: String,
        /// The column name as written.
        name: String,
    },
}

/// What to do with a column name that cannot be written as it is.
pub(crate) const QUOTE_HINT: &str = "quote a column name with spaces, braces, \"|\" or quotes, \
     doubling a quote inside: \"first name\"";

/// Whether `name` can be written unquoted as a column name in a template or a `changed` list.
///
/// Whitespace and braces are refused because unquoted they are almost always a typo (`{ id }`);
/// `|` separates filters, and a leading quote starts a quoted name. Any other name is written
/// quoted, as SQL writes it.
pub(crate) fn is_valid_column(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && !matches!(c, '{' | '}' | '|' | '"'))
}

/// Reads a `changed` entry: a column name as it is, or quoted (`"first name"`, with `""` for
/// a quote inside); `None` when it is neither.
pub(crate) fn parse_column(entry: &str) -> Option<String> {
    if entry.starts_with('"') {
        match unquote(entry) {
            Some((name, "")) if !name.is_empty() => Some(name),
            _ => None,
        }
    } else {
        is_valid_column(entry).then(|| entry.to_owned())
    }
}

/// `name` as a `changed` entry or placeholder writes it: as it is when it can be, else quoted.
pub(crate) fn write_column(name: &str) -> String {
    if is_valid_column(name) {
        name.to_owned()
    } else {
        quote_ident(name)
    }
}

/// Where a template takes its values from.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Values<'a> {
    /// The columns of a row; a column the row lacks is unknown.
    Row(&'a Row),
    /// Nothing is known: every placeholder renders `*` (truncate, a missing row, `everything`).
    Unknown,
}

/// The value behind [`Values::Unknown`].
static UNKNOWN: Value = Value::Unknown;

impl<'a> Values<'a> {
    /// The value of `column`.
    pub(crate) fn get(self, column: &str) -> &'a Value {
        match self {
            Values::Row(row) => row.get(column),
            Values::Unknown => &UNKNOWN,
        }
    }
}

impl Template {
    /// Parses a template such as `availability:{car_id}:*` or `{{user:{id|lower}}}:profile`.
    pub fn parse(source: &str) -> Result<Template, TemplateError> {
        if source.is_empty() {
            return Err(TemplateError::Empty);
        }
        let column_at = |byte: usize| source[..byte].chars().count() + 1;
        let mut segments = Vec::new();
        let mut literal = String::new();
        let mut rest = source;
        while let Some(at) = rest.find(['{', '}']) {
            literal.push_str(&rest[..at]);
            let offset = source.len() - rest.len() + at;
            let brace = &rest[at..at + 1];
            let after = &rest[at + 1..];
            if let Some(doubled) = after.strip_prefix(brace) {
                literal.push_str(brace);
                rest = doubled;
            } else if brace == "}" {
                return Err(TemplateError::StrayClose {
                    template: source.to_owned(),
                    column: column_at(offset),
                });
            } else {
                if !literal.is_empty() {
                    segments.push(Segment::Literal(std::mem::take(&mut literal)));
                }
                let (placeholder, after) = parse_placeholder(source, offset)?;
                segments.push(placeholder);
                rest = after;
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        let pattern = segments.iter().any(
            |segment| matches!(segment, Segment::Literal(text) if glob::has_glob_syntax(text)),
        );
        Ok(Template {
            source: source.to_owned(),
            segments,
            pattern,
        })
    }

    /// The text every key rendered from this template begins with: its literal text before the
    /// first placeholder, up to the first unescaped glob character when it is a pattern.
    pub fn literal_prefix(&self) -> String {
        let Some(Segment::Literal(text)) = self.segments.first() else {
            return String::new();
        };
        if self.pattern {
            glob::literal_prefix(text)
        } else {
            text.clone()
        }
    }

    /// The template as written in the rule file.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether every key rendered from this template is a pattern (its text holds `*`, `?` or `[`);
    /// a literal template still renders a pattern when one of its values is unknown.
    pub fn is_pattern(&self) -> bool {
        self.pattern
    }

    /// The columns the placeholders name, in template order (a column may repeat).
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.placeholders().map(|(column, _)| column)
    }

    /// Renders the key for `values` into `out` (which is cleared first).
    ///
    /// Returns `None` when a placeholder's value is NULL (no key for this row), otherwise whether
    /// the rendered key is a pattern.
    pub(crate) fn render(&self, values: Values<'_>, out: &mut String) -> Option<bool> {
        out.clear();
        // First pass: NULL anywhere means no key, and one value we cannot name turns the whole key
        // into a pattern, which changes how every other value must be written.
        let mut pattern = self.pattern;
        for (column, filters) in self.placeholders() {
            match values.get(column) {
                Value::Null => return None,
                Value::Text(text) if !gives_up(filters, text) => {}
                Value::Text(_) | Value::Unknown => pattern = true,
            }
        }
        for segment in &self.segments {
            match segment {
                // The literal text of a pattern template is glob syntax by its author's intent;
                // that of a literal template means its bytes, so it is escaped when an unknown
                // value forces the key to be a pattern.
                Segment::Literal(text) if pattern && !self.pattern => glob::escape_into(text, out),
                Segment::Literal(text) => out.push_str(text),
                Segment::Placeholder { column, filters } => match values.get(column) {
                    Value::Text(text) if !gives_up(filters, text) => {
                        let value = filters
                            .iter()
                            .fold(Cow::Borrowed(text.as_str()), |value, filter| {
                                filter.apply(value)
                            });
                        if pattern {
                            glob::escape_into(&value, out);
                        } else {
                            out.push_str(&value);
                        }
                    }
                    _ => out.push('*'),
                },
            }
        }
        Some(pattern)
    }

    /// The placeholders' columns with their filters, in template order.
    fn placeholders(&self) -> impl Iterator<Item = (&str, &[Filter])> {
        self.segments.iter().filter_map(|segment| match segment {
            Segment::Placeholder { column, filters } => Some((column.as_str(), filters.as_slice())),
            Segment::Literal(_) => None,
        })
    }
}

impl fmt::Display for Template {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// Parses the placeholder whose `{` is at byte `open` of `template`: `{column}`,
/// `{column|filter|filter}`, or the same with a quoted column name (`{"first name"|lower}`,
/// where `""` stands for a quote). Returns it and the text after its `}`.
fn parse_placeholder(template: &str, open: usize) -> Result<(Segment, &str), TemplateError> {
    let column_at = |byte: usize| template[..byte].chars().count() + 1;
    let column = column_at(open);
    let inner = &template[open + 1..];
    let unclosed = || TemplateError::Unclosed {
        template: template.to_owned(),
        column,
    };
    let (name, rest) = if inner.starts_with('"') {
        let (name, rest) = unquote(inner).ok_or_else(|| TemplateError::UnclosedQuote {
            template: template.to_owned(),
            column: column + 1,
        })?;
        if !rest.starts_with(['|', '}']) {
            let at = template.len() - rest.len();
            return Err(if rest.is_empty() {
                unclosed()
            } else {
                TemplateError::AfterQuote {
                    template: template.to_owned(),
                    column: column_at(at),
                }
            });
        }
        if name.is_empty() {
            return Err(TemplateError::EmptyPlaceholder {
                template: template.to_owned(),
                column,
            });
        }
        (name, rest)
    } else {
        let end = inner.find(['|', '}']).ok_or_else(unclosed)?;
        let name = &inner[..end];
        if name.is_empty() {
            return Err(TemplateError::EmptyPlaceholder {
                template: template.to_owned(),
                column,
            });
        }
        if !is_valid_column(name) {
            return Err(TemplateError::InvalidColumn {
                template: template.to_owned(),
                name: name.to_owned(),
            });
        }
        (name.to_owned(), &inner[end..])
    };
    let close = rest.find('}').ok_or_else(unclosed)?;
    let filters = match &rest[..close] {
        "" => Vec::new(),
        list => list
            .strip_prefix('|')
            .unwrap_or(list)
            .split('|')
            .map(|filter| {
                Filter::from_name(filter).ok_or_else(|| TemplateError::UnknownFilter {
                    template: template.to_owned(),
                    filter: filter.to_owned(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    Ok((
        Segment::Placeholder {
            column: name,
            filters,
        },
        &rest[close + 1..],
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row(pairs: &[(&str, Value)]) -> Row {
        let columns = pairs.iter().map(|(c, _)| c.to_string()).collect();
        Row::new(columns, pairs.iter().map(|(_, v)| v.clone()).collect())
    }

    fn text(s: &str) -> Value {
        Value::Text(s.to_owned())
    }

    /// Renders `template` for `row`: `None` for no key, else `(key, is_pattern)`.
    fn render(template: &str, row: &Row) -> Option<(String, bool)> {
        let template = Template::parse(template).expect("template parses");
        let mut out = String::from("stale buffer content");
        let pattern = template.render(Values::Row(row), &mut out)?;
        Some((out, pattern))
    }

    fn key(s: &str) -> Option<(String, bool)> {
        Some((s.to_owned(), false))
    }

    fn pattern(s: &str) -> Option<(String, bool)> {
        Some((s.to_owned(), true))
    }

    #[test]
    fn parses_literals_placeholders_and_filters() {
        let t = Template::parse("day:{starts_at|date}:{city|lower|upper}").unwrap();
        assert_eq!(t.source(), "day:{starts_at|date}:{city|lower|upper}");
        assert_eq!(t.to_string(), t.source());
        assert_eq!(t.columns().collect::<Vec<_>>(), ["starts_at", "city"]);
        assert!(!t.is_pattern());
        assert_eq!(Template::parse("fleet:all").unwrap().columns().count(), 0);
    }

    #[test]
    fn doubled_braces_are_literal_braces() {
        let t = Template::parse("{{user:{id}}}:profile").unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["id"]);
        let r = row(&[("id", text("42"))]);
        assert_eq!(
            render("{{user:{id}}}:profile", &r),
            key("{user:42}:profile")
        );
        assert_eq!(render("{{{id}}}", &r), key("{42}"));
        assert_eq!(render("{{id}}", &r), key("{id}"));
        assert_eq!(render("a}}b{{c", &r), key("a}b{c"));
    }

    #[test]
    fn literal_text_with_glob_characters_makes_a_pattern() {
        for source in ["a:*", "a:?", "a:[xy]", "dashboard:metrics:*", "a\\*b"] {
            assert!(Template::parse(source).unwrap().is_pattern(), "{source}");
        }
        for source in ["a:b", "a:]", "a\\b", "{{x}}", "{id}"] {
            assert!(!Template::parse(source).unwrap().is_pattern(), "{source}");
        }
        // A glob character inside a value does not make the template a pattern.
        let r = row(&[("id", text("*"))]);
        assert_eq!(render("user:{id}", &r), key("user:*"));
    }

    #[test]
    fn reports_template_errors_with_positions() {
        let cases = [
            ("", TemplateError::Empty),
            (
                "a:{id",
                TemplateError::Unclosed {
                    template: "a:{id".into(),
                    column: 3,
                },
            ),
            (
                "é:{id}}",
                TemplateError::StrayClose {
                    template: "é:{id}}".into(),
                    column: 7,
                },
            ),
            (
                "a:{}",
                TemplateError::EmptyPlaceholder {
                    template: "a:{}".into(),
                    column: 3,
                },
            ),
            (
                "{|lower}",
                TemplateError::EmptyPlaceholder {
                    template: "{|lower}".into(),
                    column: 1,
                },
            ),
            (
                "x:{id|lowr}",
                TemplateError::UnknownFilter {
                    template: "x:{id|lowr}".into(),
                    filter: "lowr".into(),
                },
            ),
            (
                "x:{id|}",
                TemplateError::UnknownFilter {
                    template: "x:{id|}".into(),
                    filter: "".into(),
                },
            ),
            (
                "x:{ id }",
                TemplateError::InvalidColumn {
                    template: "x:{ id }".into(),
                    name: " id ".into(),
                },
            ),
            (
                "x:{a{b}",
                TemplateError::InvalidColumn {
                    template: "x:{a{b}".into(),
                    name: "a{b".into(),
                },
            ),
        ];
        for (source, expected) in cases {
            assert_eq!(Template::parse(source), Err(expected), "{source:?}");
        }
    }

    #[test]
    fn quoted_column_names_hold_every_odd_character() {
        let r = row(&[
            ("first name", text("Ada")),
            ("a|b{c}", text("X")),
            ("say \"hi\"", text("q")),
            ("}", text("brace")),
            ("{{", text("two")),
            ("x.y", text("dot")),
            ("", text("never")),
        ]);
        assert_eq!(render(r#"u:{"first name"}"#, &r), key("u:Ada"));
        assert_eq!(render(r#"u:{"a|b{c}"|lower}"#, &r), key("u:x"));
        assert_eq!(render(r#"u:{"say ""hi"""}"#, &r), key("u:q"));
        assert_eq!(render(r#"{"}"}:{"{{"}"#, &r), key("brace:two"));
        assert_eq!(render(r#"{{{"x.y"}}}"#, &r), key("{dot}"));
        assert_eq!(
            render(r#"{"first name"|upper|lower}:*"#, &r),
            pattern("ada:*")
        );
        // A quoted name that is a plain name is that name.
        let t = Template::parse(r#"{"id"}:{"first name"}"#).unwrap();
        assert_eq!(t.columns().collect::<Vec<_>>(), ["id", "first name"]);
        // Matching is exact: no case folding, no trimming.
        let upper = row(&[("Name", text("N"))]);
        assert_eq!(render(r#"{"Name"}"#, &upper), key("N"));
        assert_eq!(render(r#"{"name"}"#, &upper), pattern("*"));
        assert_eq!(render(r#"{" Name"}"#, &upper), pattern("*"));
    }

    #[test]
    fn a_broken_quoted_column_name_is_a_clear_error() {
        let cases = [
            (
                r#"a:{"first name}"#,
                TemplateError::UnclosedQuote {
                    template: r#"a:{"first name}"#.into(),
                    column: 4,
                },
            ),
            (
                r#"a:{"x""}"#,
                TemplateError::UnclosedQuote {
                    template: r#"a:{"x""}"#.into(),
                    column: 4,
                },
            ),
            (
                r#"a:{"x"y}"#,
                TemplateError::AfterQuote {
                    template: r#"a:{"x"y}"#.into(),
                    column: 7,
                },
            ),
            (
                r#"a:{"x""#,
                TemplateError::Unclosed {
                    template: r#"a:{"x""#.into(),
                    column: 3,
                },
            ),
            (
                r#"a:{"x"|lower"#,
                TemplateError::Unclosed {
                    template: r#"a:{"x"|lower"#.into(),
                    column: 3,
                },
            ),
            (
                r#"a:{""}"#,
                TemplateError::EmptyPlaceholder {
                    template: r#"a:{""}"#.into(),
                    column: 3,
                },
            ),
            (
                r#"a:{"x"|lowr}"#,
                TemplateError::UnknownFilter {
                    template: r#"a:{"x"|lowr}"#.into(),
                    filter: "lowr".into(),
                },
            ),
            (
                r#"a:{x"y}"#,
                TemplateError::InvalidColumn {
                    template: r#"a:{x"y}"#.into(),
                    name: "x\"y".into(),
                },
            ),
        ];
        for (source, expected) in cases {
            assert_eq!(Template::parse(source), Err(expected), "{source:?}");
        }
        assert_eq!(
            Template::parse(r#"a:{"first name}"#)
                .unwrap_err()
                .to_string(),
            r#"unclosed quote at column 4 in key "a:{\"first name}" (a quoted column name ends with "; write "" for a quote inside it)"#
        );
        assert_eq!(
            Template::parse("x:{first name}").unwrap_err().to_string(),
            r#"invalid column name "first name" in key "x:{first name}" (quote a column name with spaces, braces, "|" or quotes, doubling a quote inside: "first name")"#
        );
    }

    #[test]
    fn changed_entries_are_plain_or_quoted_column_names() {
        assert_eq!(parse_column("id").as_deref(), Some("id"));
        assert_eq!(
            parse_column(r#""first name""#).as_deref(),
            Some("first name")
        );
        assert_eq!(parse_column(r#""a""b""#).as_deref(), Some("a\"b"));
        for bad in ["a b", r#""open"#, r#""x"y"#, r#""""#, "", "a|b", r#"a"b"#] {
            assert_eq!(parse_column(bad), None, "{bad:?}");
        }
        for name in ["id", "first name", "a|b{c}", "q\"", "x"] {
            assert_eq!(parse_column(&write_column(name)).as_deref(), Some(name));
        }
    }

    #[test]
    fn error_messages_name_the_template_and_the_fix() {
        let message = |s: &str| Template::parse(s).unwrap_err().to_string();
        assert_eq!(
            message("x:{id|lowr}"),
            "unknown filter \"lowr\" in key \"x:{id|lowr}\" (filters: lower, upper, date)"
        );
        assert_eq!(
            message("a:{id"),
            "unclosed \"{\" at column 3 in key \"a:{id\" (write \"{{\" for a literal brace)"
        );
        assert_eq!(
            message("a}"),
            "unmatched \"}\" at column 2 in key \"a}\" (write \"}}\" for a literal brace)"
        );
    }

    #[test]
    fn substitutes_values_byte_for_byte_in_literal_keys() {
        let r = row(&[("id", text("a*b?[c]\\d")), ("name", text("Zoë 🚗"))]);
        assert_eq!(render("booking:{id}", &r), key("booking:a*b?[c]\\d"));
        assert_eq!(render("car:{name}", &r), key("car:Zoë 🚗"));
    }

    #[test]
    fn escapes_every_glob_character_of_values_in_patterns() {
        let r = row(&[("id", text("a*b?[c]\\d"))]);
        assert_eq!(
            render("availability:{id}:*", &r),
            pattern("availability:a\\*b\\?\\[c\\]\\\\d:*")
        );
    }

    #[test]
    fn null_renders_no_key() {
        let r = row(&[("id", text("1")), ("customer_id", Value::Null)]);
        assert_eq!(render("customer:{customer_id}:bookings", &r), None);
        assert_eq!(render("b:{id}:{customer_id}", &r), None);
        assert_eq!(render("booking:{id}", &r), key("booking:1"));
    }

    #[test]
    fn unknown_values_become_stars_and_make_a_pattern() {
        let r = row(&[("id", text("a*1")), ("note", Value::Unknown)]);
        assert_eq!(render("b:{id}:{note}", &r), pattern("b:a\\*1:*"));
        // A column the row does not carry at all is unknown too.
        assert_eq!(render("b:{missing|upper}", &r), pattern("b:*"));
        // The literal text of a literal template means its bytes, so it is escaped as a pattern.
        assert_eq!(render("a\\b]:{note}", &r), pattern("a\\\\b\\]:*"));
        // A hash tag keeps its braces: they mean nothing to a glob.
        assert_eq!(
            render("{{user:{note}}}:profile", &r),
            pattern("{user:*}:profile")
        );
    }

    #[test]
    fn filters_apply_before_escaping() {
        let r = row(&[
            ("city", text("Zoë*Ville")),
            ("day", text("2024-03-05 10:00:00+00")),
        ]);
        assert_eq!(render("c:{city|lower}", &r), key("c:zoë*ville"));
        assert_eq!(render("c:{city|upper}:*", &r), pattern("c:ZOË\\*VILLE:*"));
        assert_eq!(render("d:{day|date}", &r), key("d:2024-03-05"));
        assert_eq!(render("d:{day|date|upper}", &r), key("d:2024-03-05"));
        assert_eq!(render("{city|lower|upper}", &r), key("ZOË*VILLE"));
    }

    #[test]
    fn date_takes_the_day_or_gives_up_with_a_star() {
        let r = row(&[
            ("d", text("2024-03-05")),
            ("bc", text("0044-03-15 BC")),
            ("inf", text("infinity")),
            ("dmy", text("05/03/2024")),
            ("big", text("12345-01-01")),
            ("short", text("2024-03-0")),
            ("n", text("x")),
        ]);
        assert_eq!(render("{d|date}", &r), key("2024-03-05"));
        assert_eq!(render("{bc|date}", &r), key("0044-03-15"));
        assert_eq!(render("k:{inf|date}", &r), pattern("k:*"));
        assert_eq!(render("k:{dmy|date}", &r), pattern("k:*"));
        assert_eq!(render("k:{big|date}", &r), pattern("k:*"));
        assert_eq!(render("k:{short|date}", &r), pattern("k:*"));
        // The other values of a key that gave up are escaped like any pattern.
        assert_eq!(render("{n}*:{inf|date}", &r), pattern("x*:*"));
        assert_eq!(render("a]:{n}:{inf|date}", &r), pattern("a\\]:x:*"));
    }

    /// `gives_up` checks the raw value, which is right only if `lower` and `upper` never create or
    /// remove an ASCII digit or `-`: checked for every Unicode scalar value.
    #[test]
    fn case_mapping_never_creates_or_removes_digits_or_dashes() {
        let datelike = |c: char| c.is_ascii_digit() || c == '-';
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            for mapped in [
                c.to_lowercase().collect::<String>(),
                c.to_uppercase().collect(),
            ] {
                if datelike(c) {
                    assert_eq!(mapped, c.to_string());
                } else {
                    assert!(!mapped.chars().any(datelike), "{c:?} maps to {mapped:?}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn rendering_never_panics(source in "\\PC{0,12}", value in "\\PC{0,8}") {
            if let Ok(template) = Template::parse(&source) {
                let columns: Vec<String> = template.columns().map(str::to_owned).collect();
                let values = columns.iter().map(|_| Value::Text(value.clone())).collect();
                let r = Row::new(columns.into(), values);
                let mut out = String::new();
                template.render(Values::Row(&r), &mut out);
            }
        }
    }
}
