//! Rule files (TOML text) -> validated [`Rule`]s, with every error of every file collected.
//!
//! Each file is parsed with toml's span-keeping document parser, and each `[[rule]]` table is
//! deserialized on its own, so one broken rule does not hide the errors of the next one, and every
//! error can name its line.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ops::Range;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;
use toml::de::{DeTable, DeValue, ValueDeserializer};

use crate::change::{Op, TableName};
use crate::rules::error::{RuleError, RuleErrorKind, RuleErrors};
use crate::rules::template::{Template, parse_column};
use crate::rules::{Rule, RuleSet};

/// One `[[rule]]` table as written, before validation.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a [[rule]] table")]
struct RawRule {
    /// The rule's name; defaults to `<file stem>#<index>`.
    name: Option<Spanned<String>>,
    /// The table, `schema.table` or `table`.
    table: Spanned<String>,
    /// The operations that fire the rule; defaults to all four.
    on: Option<Spanned<Vec<Spanned<String>>>>,
    /// Columns of which at least one must change for an update to fire the rule.
    changed: Option<Spanned<Vec<Spanned<String>>>>,
    /// Key templates.
    keys: Spanned<Vec<Spanned<String>>>,
}

/// Compiles rule sources, `(file name for messages, text)`, adding to errors found earlier
/// (reading the files); returns the rule set only when there is no error at all.
pub(crate) fn compile(
    sources: &[(String, String)],
    mut errors: Vec<RuleError>,
) -> Result<RuleSet, RuleErrors> {
    let mut rules = Vec::new();
    let mut names = Vec::new();
    for (file, text) in sources {
        compile_file(file, text, &mut rules, &mut names, &mut errors);
    }
    report_duplicate_names(&names, &mut errors);
    if sources.is_empty() && errors.is_empty() {
        errors.push(RuleError {
            file: String::new(),
            line: None,
            rule: None,
            kind: RuleErrorKind::NoRules,
        });
    }
    if errors.is_empty() {
        Ok(RuleSet::from_rules(rules))
    } else {
        Err(RuleErrors::new(errors))
    }
}

/// Where a rule's name was given (or where the rule starts, for a default name).
struct NameSite {
    /// The rule's name, given or default.
    name: String,
    /// The file holding the rule.
    file: String,
    /// The line of the name, or of the `[[rule]]` header.
    line: usize,
}

/// Reports every rule whose name an earlier rule already took.
fn report_duplicate_names(names: &[NameSite], errors: &mut Vec<RuleError>) {
    let mut first: HashMap<&str, &NameSite> = HashMap::new();
    for site in names {
        match first.entry(&site.name) {
            Entry::Vacant(entry) => {
                entry.insert(site);
            }
            Entry::Occupied(entry) => errors.push(RuleError {
                file: site.file.clone(),
                line: Some(site.line),
                rule: Some(site.name.clone()),
                kind: RuleErrorKind::DuplicateName {
                    first: format!("{}:{}", entry.get().file, entry.get().line),
                },
            }),
        }
    }
}

/// Byte offset -> 1-based line number, for one file.
struct Lines {
    /// The byte offset at which each line starts.
    starts: Vec<usize>,
}

impl Lines {
    /// Indexes the line starts of `text`.
    fn new(text: &str) -> Self {
        let newlines = text.match_indices('\n').map(|(at, _)| at + 1);
        Lines {
            starts: std::iter::once(0).chain(newlines).collect(),
        }
    }

    /// The 1-based line holding byte `offset`.
    fn line(&self, offset: usize) -> usize {
        self.starts.partition_point(|&start| start <= offset)
    }
}

/// What the checks of one file need to know to report an error.
struct FileContext<'a> {
    /// The file name used in messages.
    file: &'a str,
    /// Its line index.
    lines: Lines,
}

impl FileContext<'_> {
    /// An error at `span` (a byte range of the file).
    fn error(&self, span: Range<usize>, rule: Option<&str>, kind: RuleErrorKind) -> RuleError {
        RuleError {
            file: self.file.to_owned(),
            line: Some(self.lines.line(span.start)),
            rule: rule.map(str::to_owned),
            kind,
        }
    }
}

/// Compiles one file: its valid rules go to `rules`, every rule's name to `names`, and every
/// problem to `errors`.
fn compile_file(
    file: &str,
    text: &str,
    rules: &mut Vec<Rule>,
    names: &mut Vec<NameSite>,
    errors: &mut Vec<RuleError>,
) {
    let cx = FileContext {
        file,
        lines: Lines::new(text),
    };
    let (root, mut syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // After a mistake the parser recovers and often reports echoes of it on the same line;
        // the first error of each line is the useful one. The tree of a broken file is not
        // checked further, because its gaps would only add misleading errors.
        syntax.sort_by_key(|error| error.span().map_or(0, |span| span.start));
        let mut last_line = None;
        for error in syntax {
            let span = error.span().unwrap_or(0..0);
            let line = cx.lines.line(span.start);
            if last_line != Some(line) {
                last_line = Some(line);
                let message = error.message().to_owned();
                errors.push(cx.error(span, None, RuleErrorKind::Syntax { message }));
            }
        }
        return;
    }
    let stem = Path::new(file).file_stem().map_or_else(
        || file.to_owned(),
        |stem| stem.to_string_lossy().into_owned(),
    );
    let errors_before = errors.len();
    let mut count = 0;
    for (key, value) in root.into_inner() {
        if key.get_ref() != "rule" {
            let kind = RuleErrorKind::UnknownTopKey {
                key: key.get_ref().to_string(),
            };
            errors.push(cx.error(key.span(), None, kind));
            continue;
        }
        let span = value.span();
        match value.into_inner() {
            DeValue::Array(items) => {
                for item in items {
                    count += 1;
                    let default_name = format!("{stem}#{count}");
                    compile_rule(&cx, item, default_name, rules, names, errors);
                }
            }
            _ => errors.push(cx.error(span, None, RuleErrorKind::NotRuleArray)),
        }
    }
    if count == 0 && errors.len() == errors_before {
        errors.push(RuleError {
            file: file.to_owned(),
            line: None,
            rule: None,
            kind: RuleErrorKind::NoRulesInFile,
        });
    }
}

/// Compiles one `[[rule]]` table.
fn compile_rule(
    cx: &FileContext<'_>,
    item: Spanned<DeValue<'_>>,
    default_name: String,
    rules: &mut Vec<Rule>,
    names: &mut Vec<NameSite>,
    errors: &mut Vec<RuleError>,
) {
    let header = item.span();
    let line = cx.lines.line(header.start);
    let site = rule_name(cx, &item, default_name, line);
    let name = site.name.clone();
    names.push(site);
    let label = Some(name.as_str());
    let raw = match RawRule::deserialize(ValueDeserializer::from(item)) {
        Ok(raw) => raw,
        Err(error) => {
            let span = error.span().unwrap_or(header);
            let message = error.message().to_owned();
            errors.push(cx.error(span, label, RuleErrorKind::Shape { message }));
            return;
        }
    };
    let errors_before = errors.len();
    let mut report = |span: Range<usize>, kind| errors.push(cx.error(span, label, kind));

    if let Some(given) = &raw.name
        && given.get_ref().is_empty()
    {
        report(given.span(), RuleErrorKind::EmptyName);
    }
    let table = compile_table(&raw.table, &mut report);
    let (ops, ops_complete) = compile_ops(raw.on.as_ref(), &mut report);
    let changed = compile_changed(raw.changed.as_ref(), &ops, ops_complete, &mut report);
    let templates = compile_keys(&raw.keys, &mut report);

    if let Some(table) = table
        && errors.len() == errors_before
    {
        rules.push(Rule::new(
            name,
            cx.file.to_owned(),
            line,
            table,
            ops,
            changed,
            templates,
        ));
    }
}

/// Where the rule is named: by its own non-empty `name` (on that line), else by `default_name`
/// on its header's `line`. Read from the raw table, so messages name the rule even when the
/// rest of it does not deserialize.
fn rule_name(
    cx: &FileContext<'_>,
    item: &Spanned<DeValue<'_>>,
    default_name: String,
    line: usize,
) -> NameSite {
    let given_name = item
        .get_ref()
        .as_table()
        .and_then(|table| table.get("name"))
        .and_then(|name| Some((name.get_ref().as_str()?, name.span())))
        .filter(|(name, _)| !name.is_empty());
    let (name, line) = match given_name {
        Some((name, span)) => (name.to_owned(), cx.lines.line(span.start)),
        None => (default_name, line),
    };
    NameSite {
        name,
        file: cx.file.to_owned(),
        line,
    }
}

/// The rule's `table`, parsed; `None` once reported, so the rule is not built.
fn compile_table(
    table: &Spanned<String>,
    report: &mut impl FnMut(Range<usize>, RuleErrorKind),
) -> Option<TableName> {
    match TableName::parse(table.get_ref()) {
        Ok(table) => Some(table),
        Err(reason) => {
            let kind = RuleErrorKind::InvalidTable {
                table: table.get_ref().clone(),
                reason,
            };
            report(table.span(), kind);
            None
        }
    }
}

/// The rule's `keys`, parsed; every template that does not parse is reported, and an empty
/// list too, since a rule that deletes nothing is a mistake.
fn compile_keys(
    keys: &Spanned<Vec<Spanned<String>>>,
    report: &mut impl FnMut(Range<usize>, RuleErrorKind),
) -> Vec<Template> {
    if keys.get_ref().is_empty() {
        report(keys.span(), RuleErrorKind::NoKeys);
    }
    let mut templates = Vec::new();
    for key in keys.get_ref() {
        match Template::parse(key.get_ref()) {
            Ok(template) => templates.push(template),
            Err(error) => report(key.span(), RuleErrorKind::Template(error)),
        }
    }
    templates
}

/// The rule's `on` (every operation when absent), sorted; `false` with it when an entry was
/// reported, so later checks that depend on it stay quiet.
fn compile_ops(
    on: Option<&Spanned<Vec<Spanned<String>>>>,
    report: &mut impl FnMut(Range<usize>, RuleErrorKind),
) -> (Vec<Op>, bool) {
    let mut ops = Vec::new();
    let mut ops_complete = true;
    match on {
        None => ops.extend(Op::ALL),
        Some(on) if on.get_ref().is_empty() => {
            ops_complete = false;
            report(on.span(), RuleErrorKind::EmptyOn);
        }
        Some(on) => {
            for entry in on.get_ref() {
                match entry.get_ref().parse::<Op>() {
                    Ok(op) => ops.push(op),
                    Err(_) => {
                        ops_complete = false;
                        let op = entry.get_ref().clone();
                        report(entry.span(), RuleErrorKind::UnknownOp { op });
                    }
                }
            }
        }
    }
    ops.sort();
    ops.dedup();
    (ops, ops_complete)
}

/// The rule's `changed` columns, each reported when it is not a column name, and the list when
/// it is empty or the rule does not fire on updates.
fn compile_changed(
    changed: Option<&Spanned<Vec<Spanned<String>>>>,
    ops: &[Op],
    ops_complete: bool,
    report: &mut impl FnMut(Range<usize>, RuleErrorKind),
) -> Vec<String> {
    let mut columns = Vec::new();
    if let Some(list) = changed {
        if list.get_ref().is_empty() {
            report(list.span(), RuleErrorKind::EmptyChanged);
        }
        // With a broken `on` we cannot tell whether updates were meant; its error says enough.
        if ops_complete && !ops.contains(&Op::Update) {
            report(list.span(), RuleErrorKind::ChangedWithoutUpdate);
        }
        for entry in list.get_ref() {
            if let Some(column) = parse_column(entry.get_ref()) {
                columns.push(column);
            } else {
                let column = entry.get_ref().clone();
                report(entry.span(), RuleErrorKind::InvalidChangedColumn { column });
            }
        }
    }
    columns
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rules::TemplateError;

    fn compile(files: &[(&str, &str)]) -> Result<RuleSet, RuleErrors> {
        let sources: Vec<(String, String)> = files
            .iter()
            .map(|(name, text)| (name.to_string(), text.to_string()))
            .collect();
        RuleSet::compile(&sources)
    }

    /// The error report, one line per error.
    fn errors(files: &[(&str, &str)]) -> Vec<String> {
        let errors = compile(files).expect_err("rules should not compile");
        errors.to_string().lines().map(str::to_owned).collect()
    }

    const BOOKINGS: &str = r#"# Bookings: what a write to bookings makes stale.
[[rule]]
name = "booking-availability"
table = "bookings"
on = ["insert", "update", "delete"]
changed = ["car_id", "start_date"]
keys = [
  "availability:{car_id}:*",
  "customer:{customer_id}:bookings",
]

[[rule]]
table = "public.bookings"
keys = ["booking:{id}", "booking:{id}:*"]

[[rule]]
table = "billing.payments"
on = ["truncate", "insert", "insert"]
keys = ["dashboard:metrics:*"]
"#;

    #[test]
    fn compiles_rules_with_defaults() {
        let set = compile(&[("rules/bookings.toml", BOOKINGS)]).unwrap();
        let rules = set.rules();
        assert_eq!(rules.len(), 3);

        let first = &rules[0];
        assert_eq!(first.name, "booking-availability");
        assert_eq!(first.file, "rules/bookings.toml");
        assert_eq!(first.line, 2);
        assert_eq!(&first.table, &TableName::new("public", "bookings"));
        assert_eq!(first.ops, [Op::Insert, Op::Update, Op::Delete]);
        assert_eq!(first.changed, ["car_id", "start_date"]);
        assert_eq!(
            first.keys,
            ["availability:{car_id}:*", "customer:{customer_id}:bookings"]
        );
        assert_eq!(first.columns(), ["car_id", "customer_id", "start_date"]);
        assert!(first.templates()[0].is_pattern());

        let second = &rules[1];
        assert_eq!(second.name, "bookings#2");
        assert_eq!(second.line, 12);
        assert_eq!(second.ops, Op::ALL);
        assert!(second.changed.is_empty());
        assert_eq!(second.columns(), ["id"]);

        let third = &rules[2];
        assert_eq!(third.name, "bookings#3");
        assert_eq!(&third.table, &TableName::new("billing", "payments"));
        assert_eq!(third.ops, [Op::Insert, Op::Truncate]);
        assert!(third.columns().is_empty());

        let tables: Vec<String> = set.tables().map(ToString::to_string).collect();
        assert_eq!(tables, ["billing.payments", "public.bookings"]);
    }

    #[test]
    fn reports_every_error_of_every_file_sorted_by_file_and_line() {
        let cars = r#"[[rule]]
name = "car"
table = "cars"
on = ["insert", "updte"]
keys = ["car:{id|lowr}", "car:{id"]

[[rule]]
table = "cars"
keys = []
"#;
        let bookings = r#"[[rule]]
table = "bookings"
tabel = "bookings"
keys = ["x"]

[[rule]]
name = "car"
keys = ["y"]

[[rule]]
name = "b"
table = "bookings"
on = ["insert"]
changed = ["car_id"]
keys = ["booking:{id}}"]
"#;
        let broken = "[[rule]]\ntable = \"cars\"\nkeys = [\"a\" \"b\"]\n";
        assert_eq!(
            errors(&[
                ("rules/cars.toml", cars),
                ("rules/bookings.toml", bookings),
                ("rules/broken.toml", broken),
            ]),
            [
                "rules/bookings.toml:3: rule \"bookings#1\": unknown field `tabel`, expected one of `name`, `table`, `on`, `changed`, `keys`",
                "rules/bookings.toml:6: rule \"car\": missing field `table`",
                "rules/bookings.toml:7: rule \"car\": duplicate rule name, first defined at rules/cars.toml:2",
                "rules/bookings.toml:14: rule \"b\": changed applies to updates only, but on has no \"update\"",
                "rules/bookings.toml:15: rule \"b\": unmatched \"}\" at column 13 in key \"booking:{id}}\" (write \"}}\" for a literal brace)",
                "rules/broken.toml:3: TOML syntax error: missing comma between array elements, expected `,`",
                "rules/cars.toml:4: rule \"car\": unknown operation \"updte\" in on (operations: insert, update, delete, truncate)",
                "rules/cars.toml:5: rule \"car\": unknown filter \"lowr\" in key \"car:{id|lowr}\" (filters: lower, upper, date)",
                "rules/cars.toml:5: rule \"car\": unclosed \"{\" at column 5 in key \"car:{id\" (write \"{{\" for a literal brace)",
                "rules/cars.toml:9: rule \"cars#2\": keys is empty, so the rule would delete nothing",
            ]
        );
    }

    #[test]
    fn the_message_format_matches_the_documented_example() {
        let text = format!(
            "{}[[rule]]\nname = \"booking-availability\"\ntable = \"bookings\"\nkeys = [\"x:{{id|lowr}}\"]\n",
            "#\n".repeat(8)
        );
        assert_eq!(
            errors(&[("rules/bookings.toml", &text)]),
            [
                "rules/bookings.toml:12: rule \"booking-availability\": unknown filter \"lowr\" in key \"x:{id|lowr}\" (filters: lower, upper, date)"
            ]
        );
    }

    #[test]
    fn reports_shape_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "[rule]\ntable = \"t\"\nkeys = [\"k\"]\n",
                "a.toml:1: \"rule\" must be an array of tables: write [[rule]]",
            ),
            (
                "[[rules]]\ntable = \"t\"\n",
                "a.toml:1: unknown key \"rules\": a rules file holds only [[rule]] tables",
            ),
            ("# nothing yet\n", "a.toml: no [[rule]] tables in this file"),
            ("rule = []\n", "a.toml: no [[rule]] tables in this file"),
            (
                "rule = [1]\n",
                "a.toml:1: rule \"a#1\": invalid type: integer `1`, expected a [[rule]] table",
            ),
            (
                "[[rule]]\ntable = \"t\"\n",
                "a.toml:1: rule \"a#1\": missing field `keys`",
            ),
            (
                "[[rule]]\ntable = 5\nkeys = [\"k\"]\n",
                "a.toml:2: rule \"a#1\": invalid type: integer `5`, expected a string",
            ),
            (
                "[[rule]]\ntable = \"t\"\nkeys = [\"k\", 3]\n",
                "a.toml:3: rule \"a#1\": invalid type: integer `3`, expected a string",
            ),
            (
                "[[rule]]\nname = \"\"\ntable = \"t\"\nkeys = [\"k\"]\n",
                "a.toml:2: rule \"a#1\": name is empty",
            ),
            (
                "[[rule]]\ntable = \"\"\nkeys = [\"k\"]\n",
                "a.toml:2: rule \"a#1\": invalid table name \"\": a name is empty (expected \"schema.table\" or \"table\", each part quoted where it needs to be, as in \"my.schema\".\"Order Items\")",
            ),
            (
                "[[rule]]\ntable = \"s. t\"\nkeys = [\"k\"]\n",
                "a.toml:2: rule \"a#1\": invalid table name \"s. t\": spaces around a name (quote it to keep them) (expected \"schema.table\" or \"table\", each part quoted where it needs to be, as in \"my.schema\".\"Order Items\")",
            ),
            (
                "[[rule]]\ntable = \"t\"\non = []\nkeys = [\"k\"]\n",
                "a.toml:3: rule \"a#1\": on is empty, so the rule would never fire",
            ),
            (
                "[[rule]]\ntable = \"t\"\nchanged = []\nkeys = [\"k\"]\n",
                "a.toml:3: rule \"a#1\": changed is empty: remove it to fire on every update",
            ),
            (
                "[[rule]]\ntable = \"t\"\nchanged = [\"a b\"]\nkeys = [\"k\"]\n",
                "a.toml:3: rule \"a#1\": invalid column name \"a b\" in changed (quote a column name with spaces, braces, \"|\" or quotes, doubling a quote inside: \"first name\")",
            ),
            (
                "[[rule]]\ntable = \"t\"\nkeys = [\"\"]\n",
                "a.toml:3: rule \"a#1\": empty key",
            ),
        ];
        for (text, expected) in cases {
            assert_eq!(
                errors(&[("rules/a.toml", text)]),
                [format!("rules/{expected}")],
                "{text}"
            );
        }
    }

    #[test]
    fn quoted_identifiers_name_any_schema_table_and_column() {
        let text = r#"[[rule]]
table = '"my.schema"."Order Items"'
changed = ['"first name"', "qty"]
keys = ['item:{"first name"}:{"a|b{c}"|lower}', "all:{qty}"]
"#;
        let set = compile(&[("rules/a.toml", text)]).unwrap();
        let rule = &set.rules()[0];
        assert_eq!(rule.table, TableName::new("my.schema", "Order Items"));
        assert_eq!(rule.table.to_string(), r#""my.schema".Order Items"#);
        assert_eq!(rule.changed, ["first name", "qty"]);
        assert_eq!(rule.columns(), ["a|b{c}", "first name", "qty"]);
    }

    #[test]
    fn a_broken_quote_is_an_error_with_its_file_and_line() {
        let text = "[[rule]]\ntable = '\"my.schema.t'\nkeys = ['k']\n\n[[rule]]\ntable = 't'\n\
                    changed = ['\"open']\nkeys = ['k:{\"first name}']\n";
        assert_eq!(
            errors(&[("rules/a.toml", text)]),
            [
                "rules/a.toml:2: rule \"a#1\": invalid table name \"\\\"my.schema.t\": the quote at column 1 is never closed (write \"\" for a quote inside a quoted name) (expected \"schema.table\" or \"table\", each part quoted where it needs to be, as in \"my.schema\".\"Order Items\")",
                "rules/a.toml:7: rule \"a#2\": invalid column name \"\\\"open\" in changed (quote a column name with spaces, braces, \"|\" or quotes, doubling a quote inside: \"first name\")",
                "rules/a.toml:8: rule \"a#2\": unclosed quote at column 4 in key \"k:{\\\"first name}\" (a quoted column name ends with \"; write \"\" for a quote inside it)",
            ]
        );
    }

    #[test]
    fn an_unknown_operation_does_not_also_blame_changed() {
        let text = "[[rule]]\ntable = \"t\"\non = [\"updat\"]\nchanged = [\"c\"]\nkeys = [\"k\"]\n";
        assert_eq!(
            errors(&[("a.toml", text)]),
            [
                "a.toml:3: rule \"a#1\": unknown operation \"updat\" in on (operations: insert, update, delete, truncate)"
            ]
        );
    }

    #[test]
    fn keeps_one_syntax_error_per_line() {
        let text = "[[rule]]\nname = \"x\nkeys = [\n[[rule]\nfoo = = 1\n";
        let lines = errors(&[("a.toml", text)]);
        let numbers: Vec<&str> = lines.iter().map(|l| l.split(':').nth(1).unwrap()).collect();
        let mut unique = numbers.clone();
        unique.dedup();
        assert_eq!(numbers, unique);
        assert!(
            lines[0].starts_with("a.toml:2: TOML syntax error: "),
            "{lines:?}"
        );
    }

    #[test]
    fn default_names_can_collide_with_given_ones() {
        let text = "[[rule]]\ntable = \"t\"\nkeys = [\"k\"]\n\n[[rule]]\nname = \"a#1\"\ntable = \"t\"\nkeys = [\"k\"]\n";
        assert_eq!(
            errors(&[("rules/a.toml", text)]),
            ["rules/a.toml:6: rule \"a#1\": duplicate rule name, first defined at rules/a.toml:1"]
        );
    }

    #[test]
    fn no_sources_is_an_error() {
        assert_eq!(errors(&[]), ["no rules: give at least one rule file"]);
    }

    #[test]
    fn errors_are_exposed_with_their_parts() {
        let errors = compile(&[
            ("b.toml", "x = 1\n"),
            ("a.toml", "[[rule]]\ntable = \"t\"\nkeys = [\"{\"]\n"),
        ])
        .unwrap_err();
        let errors = errors.errors();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].file, "a.toml");
        assert_eq!(errors[0].line, Some(3));
        assert_eq!(errors[0].rule.as_deref(), Some("a#1"));
        assert!(matches!(
            errors[0].kind,
            RuleErrorKind::Template(TemplateError::Unclosed { column: 1, .. })
        ));
        assert_eq!(errors[1].file, "b.toml");
        assert_eq!(errors[1].rule, None);
        assert!(matches!(
            errors[1].kind,
            RuleErrorKind::UnknownTopKey { .. }
        ));
    }
}
