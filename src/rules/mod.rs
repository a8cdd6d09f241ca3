//! The rules engine: rule files -> [`RuleSet`] -> for each [`Change`], the Redis keys and patterns
//! to delete ([`Invalidation`]).
//!
//! ```text
//! rules/*.toml ──load──▶ compile (all errors at once) ──▶ RuleSet ──plan(&Change)──▶ Invalidation
//!                                                         (Arc-shared by check, explain and run)
//! ```
//!
//! - `load.rs` reads the files (the only I/O here), `compile.rs` validates them into [`Rule`]s,
//!   `error.rs` says what is wrong and where.
//! - `template.rs` parses key templates once and renders them per change, `glob.rs` is a matcher
//!   with Redis's exact glob semantics plus escaping, so that tests can prove values never widen a
//!   deletion.
//!
//! Planning follows the rules' semantics in their order of importance: never miss (render from the new
//! and the old row; an unknown value becomes `*`), values are data (escaped in patterns), NULL
//! renders nothing, `changed` filters updates, TRUNCATE deletes everything a rule could name, and a
//! table without rules costs one hash lookup.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;

use crate::change::{Change, Op, Row, TableName, Value};
use crate::glob;

mod compile;
mod error;
mod load;
mod template;

pub use error::{RuleError, RuleErrorKind, RuleErrors};
use template::Values;
pub(crate) use template::write_column;
pub use template::{Template, TemplateError};

/// The keys and patterns to delete for one change or a batch of them, de-duplicated.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Invalidation {
    /// Literal keys, deleted with `UNLINK` byte for byte.
    pub keys: HashSet<String>,
    /// Redis glob patterns, resolved with `SCAN ... MATCH`.
    pub patterns: HashSet<String>,
}

impl Invalidation {
    /// Whether there is nothing to delete.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.patterns.is_empty()
    }

    /// The number of keys plus the number of patterns.
    pub fn len(&self) -> usize {
        self.keys.len() + self.patterns.len()
    }

    /// Adds everything `other` holds.
    pub fn merge(&mut self, other: Invalidation) {
        if self.is_empty() {
            // Keep the other side's allocations instead of copying into empty sets.
            *self = other;
        } else {
            self.keys.extend(other.keys);
            self.patterns.extend(other.patterns);
        }
    }

    /// Removes everything, keeping the allocations for the next batch.
    pub fn clear(&mut self) {
        self.keys.clear();
        self.patterns.clear();
    }

    /// Adds a key or pattern given by hand (`invalidator.invalidate(...)`), read exactly as the
    /// text of a key template without placeholders is: text without `*`, `?` or `[` is a literal
    /// key, byte for byte; other text is a Redis glob, a pattern when it holds an unescaped `*`,
    /// `?` or `[`, and otherwise the one key it matches (`a\*b` is the key `a*b`), which is then
    /// deleted with `UNLINK` rather than a `SCAN`. Either way it deletes exactly what the same
    /// key in a rule would.
    pub fn insert_given(&mut self, text: &str) {
        if !glob::has_glob_syntax(text) {
            self.insert(text, false);
        } else if glob::is_pattern(text) {
            self.insert(text, true);
        } else {
            self.keys.insert(glob::unescape(text));
        }
    }

    /// Adds one rendered key; allocates only when it is new.
    fn insert(&mut self, rendered: &str, pattern: bool) {
        let set = if pattern {
            &mut self.patterns
        } else {
            &mut self.keys
        };
        if !set.contains(rendered) {
            set.insert(rendered.to_owned());
        }
    }
}

/// One compiled rule: which changes of which table fire it, and the keys it names.
///
/// The fields describe the rule for `check`, `explain` and logs; planning uses the pre-parsed
/// templates, which only the rules engine builds.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule's name, given or `<file stem>#<index>`.
    pub name: String,
    /// The file that defines it, as named to the loader.
    pub file: String,
    /// The 1-based line of its `[[rule]]` header.
    pub line: usize,
    /// The table whose changes it watches.
    pub table: TableName,
    /// The operations that fire it, sorted and unique.
    pub ops: Vec<Op>,
    /// Columns of which one must differ for an update to fire it; empty means any update.
    pub changed: Vec<String>,
    /// Its key templates as written.
    pub keys: Vec<String>,
    /// The same templates, pre-parsed.
    templates: Vec<Template>,
    /// Every column its templates and `changed` refer to, sorted and unique.
    columns: Vec<String>,
}

impl Rule {
    /// Builds a rule from validated parts.
    fn new(
        name: String,
        file: String,
        line: usize,
        table: TableName,
        ops: Vec<Op>,
        changed: Vec<String>,
        templates: Vec<Template>,
    ) -> Rule {
        let mut columns: Vec<String> = templates
            .iter()
            .flat_map(Template::columns)
            .map(str::to_owned)
            .chain(changed.iter().cloned())
            .collect();
        columns.sort();
        columns.dedup();
        Rule {
            name,
            file,
            line,
            table,
            ops,
            changed,
            keys: templates.iter().map(|t| t.source().to_owned()).collect(),
            templates,
            columns,
        }
    }

    /// The parsed key templates, in the order of `keys`.
    pub fn templates(&self) -> &[Template] {
        &self.templates
    }

    /// Every column the rule's templates and `changed` refer to, sorted and unique.
    pub fn columns(&self) -> &[String] {
        &self.columns
    }

    /// Whether an update from `old` to `new` fires the rule.
    fn fires_on_update(&self, old: Values<'_>, new: Values<'_>) -> bool {
        // An unknown value on either side may hide a change, so it counts as one.
        self.changed.is_empty()
            || self
                .changed
                .iter()
                .any(|column| match (old.get(column), new.get(column)) {
                    (Value::Unknown, _) | (_, Value::Unknown) => true,
                    (old, new) => old != new,
                })
    }

    /// Renders every key of the rule for one row into `out`, through the scratch buffer `buf`,
    /// and counts what it rendered into `tally`.
    fn render_into(
        &self,
        values: Values<'_>,
        buf: &mut String,
        out: &mut Invalidation,
        tally: &mut RuleTally,
    ) {
        for template in &self.templates {
            if let Some(pattern) = template.render(values, buf) {
                if pattern {
                    tally.patterns += 1;
                } else {
                    tally.keys += 1;
                }
                out.insert(buf, pattern);
            }
        }
    }
}

/// What one rule did over some changes, for the per-rule metrics: plain numbers, added up
/// while planning and turned into metrics once per transaction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RuleTally {
    /// Changes that fired the rule (its table, an operation in `on`, and `changed` satisfied).
    pub fired: u64,
    /// Literal keys it rendered, before de-duplication within the transaction.
    pub keys: u64,
    /// Patterns it rendered, before de-duplication within the transaction.
    pub patterns: u64,
}

/// Renders every key of `rules` with every placeholder as `*`.
fn render_unknown<'a>(rules: impl IntoIterator<Item = &'a Rule>) -> Invalidation {
    let mut out = Invalidation::default();
    let mut buf = String::new();
    for rule in rules {
        rule.render_into(
            Values::Unknown,
            &mut buf,
            &mut out,
            &mut RuleTally::default(),
        );
    }
    out
}

/// Compiled rules, indexed by table; shared by `check`, `explain` and `run`.
#[derive(Debug, Clone)]
pub struct RuleSet {
    /// Every rule, in file order then order within the file.
    rules: Vec<Rule>,
    /// For each table with rules, the indices of its rules in `rules`.
    by_table: HashMap<TableName, Vec<usize>>,
    /// The tables with rules, sorted.
    tables: Vec<TableName>,
}

impl RuleSet {
    /// Loads the rules at `path`: every `*.toml` file of a directory (sorted by name, not
    /// recursive), or one file; every error of every file is reported at once.
    pub fn load(path: &Path) -> Result<RuleSet, RuleErrors> {
        let (sources, errors) = load::read_sources(path);
        compile::compile(&sources, errors)
    }

    /// Compiles rules from `(file name for messages, TOML text)` pairs; every error of every
    /// source is reported at once.
    pub fn compile(sources: &[(String, String)]) -> Result<RuleSet, RuleErrors> {
        compile::compile(sources, Vec::new())
    }

    /// Indexes validated rules by table.
    fn from_rules(rules: Vec<Rule>) -> RuleSet {
        let mut by_table: HashMap<TableName, Vec<usize>> = HashMap::new();
        for (index, rule) in rules.iter().enumerate() {
            by_table.entry(rule.table.clone()).or_default().push(index);
        }
        let mut tables: Vec<TableName> = by_table.keys().cloned().collect();
        tables.sort();
        RuleSet {
            rules,
            by_table,
            tables,
        }
    }

    /// Combines two rule sets: every rule of `self`, then every rule of `other`. Planning with
    /// it deletes what either would. Used while a reload extends the publication, so that a
    /// change read in between is planned by both the old and the new rules.
    pub fn union(&self, other: &RuleSet) -> RuleSet {
        RuleSet::from_rules(self.rules.iter().chain(&other.rules).cloned().collect())
    }

    /// Adds to `out` the keys and patterns that `change` invalidates.
    pub fn plan(&self, change: &Change, out: &mut Invalidation) {
        self.plan_tallied(change, out, &mut []);
    }

    /// [`RuleSet::plan`], also counting into `tally[i]` what rule `i` (an index into
    /// [`RuleSet::rules`]) did; rules past the end of `tally` are not counted.
    pub fn plan_tallied(&self, change: &Change, out: &mut Invalidation, tally: &mut [RuleTally]) {
        let Some(indices) = self.by_table.get(&change.table) else {
            return;
        };
        // A row the operation should carry but does not is treated as wholly unknown: rendering
        // `*` over-invalidates, where skipping it could miss.
        fn row(row: &Option<Row>) -> Values<'_> {
            row.as_ref().map_or(Values::Unknown, Values::Row)
        }
        let mut buf = String::new();
        let mut unused = RuleTally::default();
        for &index in indices {
            let Some(rule) = self.rules.get(index) else {
                continue;
            };
            if !rule.ops.contains(&change.op) {
                continue;
            }
            let tally = match tally.get_mut(index) {
                Some(tally) => tally,
                None => &mut unused,
            };
            let fired = match change.op {
                Op::Insert => {
                    rule.render_into(row(&change.new), &mut buf, out, tally);
                    true
                }
                Op::Delete => {
                    rule.render_into(row(&change.old), &mut buf, out, tally);
                    true
                }
                Op::Update => {
                    let (old, new) = (row(&change.old), row(&change.new));
                    let fires = rule.fires_on_update(old, new);
                    if fires {
                        // Both sides: a booking moved from car A to car B stales both cars.
                        rule.render_into(new, &mut buf, out, tally);
                        rule.render_into(old, &mut buf, out, tally);
                    }
                    fires
                }
                Op::Truncate => {
                    rule.render_into(Values::Unknown, &mut buf, out, tally);
                    true
                }
            };
            tally.fired += u64::from(fired);
        }
    }

    /// Every key and pattern the rules can produce, each placeholder as `*`: what to delete when
    /// changes may have been lost (a replication slot was dropped or invalidated).
    pub fn everything(&self) -> Invalidation {
        render_unknown(&self.rules)
    }

    /// Every key and pattern the rules of `table` can produce, each placeholder as `*`, whatever
    /// the operation: a superset of what any change of that table plans, used when a transaction
    /// changes too many rows to hold their keys one by one. Empty for a table without rules.
    pub fn everything_for(&self, table: &TableName) -> Invalidation {
        let indices = self.by_table.get(table).map_or(&[][..], Vec::as_slice);
        render_unknown(indices.iter().filter_map(|&index| self.rules.get(index)))
    }

    /// Every column the rules of `table` read (their placeholders, filtered or not, and their
    /// `changed` lists), sorted: what notify mode's trigger records of each row. Empty for a
    /// table without rules, or whose rules name no column.
    pub fn columns_for(&self, table: &TableName) -> BTreeSet<String> {
        let indices = self.by_table.get(table).map_or(&[][..], Vec::as_slice);
        indices
            .iter()
            .filter_map(|&index| self.rules.get(index))
            .flat_map(|rule| rule.columns.iter().cloned())
            .collect()
    }

    /// Whether any rule watches `table`.
    pub fn has_table(&self, table: &TableName) -> bool {
        self.by_table.contains_key(table)
    }

    /// The tables that have rules, sorted and unique.
    pub fn tables(&self) -> impl Iterator<Item = &TableName> {
        self.tables.iter()
    }

    /// Every rule, in file order then order within the file.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The literal prefixes of the pattern templates (those whose text holds `*`, `?` or `[`),
    /// sorted and unique, without the empty one: what the key index holds (`[redis] key_index`).
    /// A template that starts with a placeholder names no prefix, and indexing every key for it
    /// would make the index as large as the keyspace; its patterns are walked.
    pub fn pattern_prefixes(&self) -> Vec<String> {
        let prefixes: BTreeSet<String> = self
            .rules
            .iter()
            .flat_map(|rule| rule.templates.iter().filter(|t| t.is_pattern()))
            .map(Template::literal_prefix)
            .filter(|prefix| !prefix.is_empty())
            .collect();
        prefixes.into_iter().collect()
    }

    /// The literal prefixes of every key template, sorted and unique, without the empty one (a
    /// template that starts with a placeholder, which names no prefix at all): the default
    /// allow-list of `invalidator.invalidate()`.
    pub fn key_prefixes(&self) -> Vec<String> {
        let prefixes: BTreeSet<String> = self
            .rules
            .iter()
            .flat_map(|rule| rule.templates.iter().map(Template::literal_prefix))
            .filter(|prefix| !prefix.is_empty())
            .collect();
        prefixes.into_iter().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Lsn, Row};
    use proptest::prelude::*;

    fn rules(text: &str) -> RuleSet {
        RuleSet::compile(&[("rules/test.toml".to_owned(), text.to_owned())]).unwrap()
    }

    #[test]
    fn the_key_index_prefixes_are_those_of_pattern_templates_with_a_literal_start() {
        let set = rules(
            r#"
[[rule]]
table = "bookings"
keys = ["availability:{car_id}:*", "booking:{id}", "{tenant}:x:*", "dash:*"]

[[rule]]
table = "cars"
keys = ["availability:{id}:*", "car:{id}"]
"#,
        );
        assert_eq!(set.pattern_prefixes(), ["availability:", "dash:"]);
    }

    /// A row from `(column, value)` pairs; `None` is SQL NULL. A column left out is unknown.
    fn row(pairs: &[(&str, Option<&str>)]) -> Row {
        let columns = pairs.iter().map(|(c, _)| c.to_string()).collect();
        let values = pairs
            .iter()
            .map(|(_, v)| v.map_or(Value::Null, |v| Value::Text(v.to_owned())))
            .collect();
        Row::new(columns, values)
    }

    /// `row` with `column` marked as sent-but-unknown, like an unchanged TOAST value.
    fn unknown(mut row: Row, column: &str) -> Row {
        if let Some(at) = row.columns.iter().position(|c| c == column) {
            row.values[at] = Value::Unknown;
        }
        row
    }

    fn change(table: &str, op: Op, old: Option<Row>, new: Option<Row>) -> Change {
        Change {
            table: TableName::parse(table).unwrap(),
            op,
            old,
            new,
            commit_lsn: Lsn(1),
            commit_time_us: 0,
        }
    }

    fn plan(set: &RuleSet, change: &Change) -> (Vec<String>, Vec<String>) {
        let mut out = Invalidation::default();
        set.plan(change, &mut out);
        sorted(out)
    }

    fn sorted(out: Invalidation) -> (Vec<String>, Vec<String>) {
        let mut keys: Vec<String> = out.keys.into_iter().collect();
        let mut patterns: Vec<String> = out.patterns.into_iter().collect();
        keys.sort();
        patterns.sort();
        (keys, patterns)
    }

    const BOOKINGS: &str = r#"
[[rule]]
name = "booking-availability"
table = "bookings"
on = ["insert", "update", "delete"]
changed = ["car_id", "start_date", "end_date", "overall_status"]
keys = ["availability:{car_id}:*", "customer:{customer_id}:bookings"]

[[rule]]
name = "booking"
table = "bookings"
keys = ["booking:{id}", "booking:{id}:*", "dashboard:metrics:*"]
"#;

    fn booking(id: &str, car: &str, customer: Option<&str>, status: &str) -> Row {
        row(&[
            ("id", Some(id)),
            ("car_id", Some(car)),
            ("customer_id", customer),
            ("start_date", Some("2024-03-05")),
            ("end_date", Some("2024-03-07")),
            ("overall_status", Some(status)),
            ("notes", Some("n")),
        ])
    }

    /// The per-rule tally counts firings and renderings (before de-duplication), and nothing
    /// for a rule that does not fire.
    #[test]
    fn plan_tallied_counts_what_each_rule_did() {
        let set = rules(BOOKINGS);
        let mut tally = vec![RuleTally::default(); set.rules().len()];
        let mut out = Invalidation::default();
        let old = booking("b1", "c1", Some("u1"), "open");
        let notes_only = change("bookings", Op::Update, Some(old.clone()), Some(old.clone()));
        set.plan_tallied(&notes_only, &mut out, &mut tally);
        let moved = booking("b1", "c2", Some("u1"), "open");
        let update = change("bookings", Op::Update, Some(old), Some(moved));
        set.plan_tallied(&update, &mut out, &mut tally);
        // "booking-availability" fired once (the car changed), rendering from both rows: two
        // patterns and two keys (the customer key twice, the same text).
        assert_eq!(
            tally[0],
            RuleTally {
                fired: 1,
                keys: 2,
                patterns: 2
            }
        );
        // "booking" fires on every update: three templates from two rows, twice.
        assert_eq!(
            tally[1],
            RuleTally {
                fired: 2,
                keys: 4,
                patterns: 8
            }
        );
        // A shorter tally counts nothing and plans the same.
        let mut plain = Invalidation::default();
        set.plan_tallied(&update, &mut plain, &mut []);
        let mut expected = Invalidation::default();
        set.plan(&update, &mut expected);
        assert_eq!(plain, expected);
    }

    #[test]
    fn an_insert_renders_the_new_row() {
        let set = rules(BOOKINGS);
        let insert = change(
            "bookings",
            Op::Insert,
            None,
            Some(booking("7", "A", Some("c1"), "new")),
        );
        assert_eq!(
            plan(&set, &insert),
            (
                vec!["booking:7".into(), "customer:c1:bookings".into()],
                vec![
                    "availability:A:*".into(),
                    "booking:7:*".into(),
                    "dashboard:metrics:*".into()
                ],
            )
        );
    }

    #[test]
    fn columns_for_lists_every_column_a_tables_rules_read() {
        let set = rules(
            r#"
[[rule]]
table = "bookings"
changed = ["overall_status"]
keys = ["availability:{car_id}:*", "day:{start_date|date}", "c:{customer_id|lower|upper}"]

[[rule]]
table = "bookings"
keys = ["booking:{id}", "{{user:{customer_id}}}:x", "fleet:all"]

[[rule]]
table = "shop.cars"
keys = ["fleet:all"]
"#,
        );
        let columns = |t: &str| -> Vec<String> {
            set.columns_for(&TableName::parse(t).unwrap())
                .into_iter()
                .collect()
        };
        assert_eq!(
            columns("bookings"),
            [
                "car_id",
                "customer_id",
                "id",
                "overall_status",
                "start_date"
            ]
        );
        assert!(columns("shop.cars").is_empty());
        assert!(columns("unwatched").is_empty());
    }

    #[test]
    fn keys_given_by_hand_read_like_rule_keys() {
        let given = |texts: &[&str]| {
            let mut out = Invalidation::default();
            for text in texts {
                out.insert_given(text);
            }
            sorted(out)
        };
        // No glob syntax: a literal key, byte for byte, backslashes and braces included.
        assert_eq!(
            given(&["user:42", "a\\b", "{user:1}:profile", "a]"]),
            (
                vec![
                    "a\\b".into(),
                    "a]".into(),
                    "user:42".into(),
                    "{user:1}:profile".into()
                ],
                vec![]
            )
        );
        // Unescaped `*`, `?` or `[`: a pattern, as given.
        assert_eq!(
            given(&["user:*", "a?", "a[bc]", "x\\**"]),
            (
                vec![],
                vec!["a?".into(), "a[bc]".into(), "user:*".into(), "x\\**".into()]
            )
        );
        // Glob syntax whose every glob byte is escaped: the one key it matches.
        assert_eq!(
            given(&["weird\\*key", "q\\?\\[x\\]"]),
            (vec!["q?[x]".into(), "weird*key".into()], vec![])
        );
        // The same classification as a rule whose key is the same text.
        let set = rules("[[rule]]\ntable = \"t\"\nkeys = [\"weird\\\\*key\", \"a\\\\b\"]\n");
        let mut from_rule = Invalidation::default();
        set.plan(&change("t", Op::Truncate, None, None), &mut from_rule);
        let (keys, patterns) = sorted(from_rule);
        assert_eq!(keys, ["a\\b"]);
        assert!(glob::matches(patterns[0].as_bytes(), b"weird*key"));
        assert!(!glob::matches(patterns[0].as_bytes(), b"weirdXkey"));
    }

    #[test]
    fn a_delete_renders_the_old_row() {
        let set = rules(BOOKINGS);
        let delete = change(
            "bookings",
            Op::Delete,
            Some(booking("7", "A", Some("c1"), "x")),
            None,
        );
        let (keys, patterns) = plan(&set, &delete);
        assert_eq!(keys, ["booking:7", "customer:c1:bookings"]);
        assert_eq!(
            patterns,
            ["availability:A:*", "booking:7:*", "dashboard:metrics:*"]
        );
    }

    #[test]
    fn a_booking_moved_between_cars_invalidates_both_cars() {
        let set = rules(BOOKINGS);
        let update = change(
            "bookings",
            Op::Update,
            Some(booking("7", "A", Some("c1"), "confirmed")),
            Some(booking("7", "B", Some("c2"), "confirmed")),
        );
        let (keys, patterns) = plan(&set, &update);
        assert_eq!(
            keys,
            ["booking:7", "customer:c1:bookings", "customer:c2:bookings"]
        );
        assert_eq!(
            patterns,
            [
                "availability:A:*",
                "availability:B:*",
                "booking:7:*",
                "dashboard:metrics:*"
            ]
        );
    }

    #[test]
    fn changed_filters_updates_only() {
        let set = rules(BOOKINGS);
        let notes_only = change(
            "bookings",
            Op::Update,
            Some(booking("7", "A", Some("c1"), "confirmed")),
            Some(row(&[
                ("id", Some("7")),
                ("car_id", Some("A")),
                ("customer_id", Some("c1")),
                ("start_date", Some("2024-03-05")),
                ("end_date", Some("2024-03-07")),
                ("overall_status", Some("confirmed")),
                ("notes", Some("changed")),
            ])),
        );
        // Only the rule without `changed` fires, and equal sides render one set of keys.
        let (keys, patterns) = plan(&set, &notes_only);
        assert_eq!(keys, ["booking:7"]);
        assert_eq!(patterns, ["booking:7:*", "dashboard:metrics:*"]);

        let status = change(
            "bookings",
            Op::Update,
            Some(booking("7", "A", Some("c1"), "confirmed")),
            Some(booking("7", "A", Some("c1"), "cancelled")),
        );
        let (keys, _) = plan(&set, &status);
        assert_eq!(keys, ["booking:7", "customer:c1:bookings"]);
    }

    #[test]
    fn an_unknown_old_value_counts_as_changed_and_renders_a_star() {
        let set = rules(BOOKINGS);
        // REPLICA IDENTITY DEFAULT: the old row carries the key only.
        let update = change(
            "bookings",
            Op::Update,
            Some(row(&[("id", Some("7"))])),
            Some(booking("7", "A", Some("c1"), "confirmed")),
        );
        let (keys, patterns) = plan(&set, &update);
        assert_eq!(keys, ["booking:7", "customer:c1:bookings"]);
        assert_eq!(
            patterns,
            [
                "availability:*:*",
                "availability:A:*",
                "booking:7:*",
                "customer:*:bookings",
                "dashboard:metrics:*",
            ]
        );
    }

    #[test]
    fn a_missing_old_row_is_wholly_unknown() {
        let set = rules(BOOKINGS);
        let update = change(
            "bookings",
            Op::Update,
            None,
            Some(booking("7", "A", None, "x")),
        );
        let (keys, patterns) = plan(&set, &update);
        assert_eq!(keys, ["booking:7"]);
        assert!(patterns.contains(&"booking:*".to_owned()));
        assert!(patterns.contains(&"customer:*:bookings".to_owned()));
    }

    #[test]
    fn null_renders_no_key_for_that_row_only() {
        let set = rules(BOOKINGS);
        let update = change(
            "bookings",
            Op::Update,
            Some(booking("7", "A", None, "confirmed")),
            Some(booking("7", "A", Some("c2"), "cancelled")),
        );
        let (keys, _) = plan(&set, &update);
        assert_eq!(keys, ["booking:7", "customer:c2:bookings"]);
    }

    #[test]
    fn truncate_fires_every_rule_with_stars_and_ignores_changed() {
        let extra = r#"
[[rule]]
table = "bookings"
on = ["truncate", "update"]
changed = ["id"]
keys = ["{{b:{id}}}:x", 'b\{id}']
"#;
        let set = rules(&format!("{BOOKINGS}{extra}"));
        let truncate = change("public.bookings", Op::Truncate, None, None);
        // booking-availability has no truncate in `on`; the other two fire with every value `*`,
        // and the literal text of literal templates is escaped.
        assert_eq!(
            plan(&set, &truncate),
            (
                vec![],
                vec![
                    "b\\\\*".into(),
                    "booking:*".into(),
                    "booking:*:*".into(),
                    "dashboard:metrics:*".into(),
                    "{b:*}:x".into(),
                ]
            )
        );
    }

    #[test]
    fn values_are_escaped_only_in_patterns() {
        let set = rules(BOOKINGS);
        let insert = change(
            "bookings",
            Op::Insert,
            None,
            Some(booking("*", "[A]", Some("?"), "x")),
        );
        let (keys, patterns) = plan(&set, &insert);
        assert_eq!(keys, ["booking:*", "customer:?:bookings"]);
        assert_eq!(
            patterns,
            [
                "availability:\\[A\\]:*",
                "booking:\\*:*",
                "dashboard:metrics:*"
            ]
        );

        // An unknown value turns a literal template into a pattern: now the values are escaped.
        let toasted = unknown(booking("*", "[A]", Some("c1"), "x"), "id");
        let insert = change("bookings", Op::Insert, None, Some(toasted));
        let (keys, patterns) = plan(&set, &insert);
        assert_eq!(keys, ["customer:c1:bookings"]);
        assert_eq!(
            patterns,
            [
                "availability:\\[A\\]:*",
                "booking:*",
                "booking:*:*",
                "dashboard:metrics:*"
            ]
        );
    }

    #[test]
    fn tables_without_rules_and_ops_without_rules_plan_nothing() {
        let set = rules(BOOKINGS);
        let mut out = Invalidation::default();
        set.plan(
            &change("cars", Op::Insert, None, Some(row(&[("id", Some("1"))]))),
            &mut out,
        );
        set.plan(
            &change(
                "audit.bookings",
                Op::Delete,
                Some(booking("7", "A", None, "x")),
                None,
            ),
            &mut out,
        );
        assert!(out.is_empty());

        let insert_only =
            rules("[[rule]]\ntable = \"cars\"\non = [\"insert\"]\nkeys = [\"car:{id}\"]\n");
        insert_only.plan(
            &change("cars", Op::Delete, Some(row(&[("id", Some("1"))])), None),
            &mut out,
        );
        assert!(out.is_empty());
    }

    #[test]
    fn plan_adds_to_what_out_already_holds() {
        let set = rules(BOOKINGS);
        let mut out = Invalidation::default();
        out.keys.insert("earlier".into());
        set.plan(
            &change(
                "bookings",
                Op::Insert,
                None,
                Some(booking("7", "A", None, "x")),
            ),
            &mut out,
        );
        assert!(out.keys.contains("earlier") && out.keys.contains("booking:7"));
    }

    #[test]
    fn everything_names_every_key_with_stars() {
        let set = rules(&format!(
            "{BOOKINGS}\n[[rule]]\ntable = \"cars\"\nkeys = [\"fleet:all\", \"car:{{id|lower}}\"]\n"
        ));
        assert_eq!(
            sorted(set.everything()),
            (
                vec!["fleet:all".into()],
                vec![
                    "availability:*:*".into(),
                    "booking:*".into(),
                    "booking:*:*".into(),
                    "car:*".into(),
                    "customer:*:bookings".into(),
                    "dashboard:metrics:*".into(),
                ]
            )
        );
    }

    #[test]
    fn everything_for_a_table_names_that_tables_keys_with_stars() {
        let set = rules(&format!(
            "{BOOKINGS}\n[[rule]]\ntable = \"cars\"\non = [\"delete\"]\nkeys = [\"fleet:all\", \"car:{{id|lower}}\"]\n"
        ));
        // Every rule of the table, whatever its `on` and `changed`.
        assert_eq!(
            sorted(set.everything_for(&TableName::parse("bookings").unwrap())),
            (
                vec![],
                vec![
                    "availability:*:*".into(),
                    "booking:*".into(),
                    "booking:*:*".into(),
                    "customer:*:bookings".into(),
                    "dashboard:metrics:*".into(),
                ]
            )
        );
        assert_eq!(
            sorted(set.everything_for(&TableName::parse("public.cars").unwrap())),
            (vec!["fleet:all".into()], vec!["car:*".into()])
        );
        assert!(
            set.everything_for(&TableName::parse("audit.cars").unwrap())
                .is_empty()
        );
        assert!(set.has_table(&TableName::parse("cars").unwrap()));
        assert!(!set.has_table(&TableName::parse("audit.cars").unwrap()));

        // Together, the tables give what `everything` gives.
        let mut all = Invalidation::default();
        for table in set.tables() {
            all.merge(set.everything_for(table));
        }
        assert_eq!(all, set.everything());
    }

    #[test]
    fn everything_for_a_table_matches_every_key_its_changes_render() {
        let set = rules(BOOKINGS);
        let fallback = set.everything_for(&TableName::parse("bookings").unwrap());
        let mut planned = Invalidation::default();
        for (id, car, customer) in [
            ("7", "A", "c1"),
            ("*", "[x]", "?"),
            ("b\\1", "car 2", "c:3"),
        ] {
            set.plan(
                &change(
                    "bookings",
                    Op::Update,
                    Some(booking(id, car, Some(customer), "old")),
                    Some(booking(id, "Z", Some(customer), "new")),
                ),
                &mut planned,
            );
        }
        for key in &planned.keys {
            assert!(
                fallback
                    .patterns
                    .iter()
                    .any(|p| glob::matches(p.as_bytes(), key.as_bytes())),
                "{key} is not covered by {fallback:?}"
            );
        }
    }

    #[test]
    fn exposes_tables_and_rules_for_introspection() {
        let set = rules(&format!(
            "[[rule]]\ntable = \"z.t\"\nkeys = [\"k\"]\n{BOOKINGS}\n[[rule]]\ntable = \"a.t\"\nkeys = [\"k\"]\n"
        ));
        let tables: Vec<String> = set.tables().map(ToString::to_string).collect();
        assert_eq!(tables, ["a.t", "public.bookings", "z.t"]);
        let names: Vec<&str> = set.rules().iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            ["test#1", "booking-availability", "booking", "test#4"]
        );
    }

    #[test]
    fn a_rule_set_can_be_shared_between_threads() {
        fn shareable<T: Send + Sync>() {}
        shareable::<RuleSet>();
        shareable::<Invalidation>();
    }

    #[test]
    fn invalidation_merges_counts_and_clears() {
        let mut a = Invalidation::default();
        assert!(a.is_empty());
        let mut b = Invalidation::default();
        b.insert("k1", false);
        b.insert("p:*", true);
        b.insert("k1", false);
        a.merge(b.clone());
        assert_eq!(a, b);
        let mut c = Invalidation::default();
        c.insert("k2", false);
        c.insert("p:*", true);
        a.merge(c);
        assert_eq!(a.len(), 3);
        assert_eq!(a.keys.len(), 2);
        a.clear();
        assert!(a.is_empty());
        assert_eq!(a.len(), 0);
    }

    proptest! {
        /// Row values never widen a deletion: with `b` unknown (absent), the pattern rendered for `a = v`
        /// matches exactly the keys a literal render of `a = v` could produce, whatever `b` is.
        #[test]
        fn row_values_never_widen_a_deletion(v in "\\PC*", w in "\\PC*", rest in "\\PC*") {
            let set = rules("[[rule]]\ntable = \"t\"\nkeys = [\"k:{a}:{b}\", \"{a|upper}*\"]\n");
            let insert = change("t", Op::Insert, None, Some(row(&[("a", Some(&v))])));
            let mut out = Invalidation::default();
            set.plan(&insert, &mut out);
            prop_assert!(out.keys.is_empty());
            prop_assert_eq!(out.patterns.len(), 2);
            let prefix = format!("k:{v}:");
            let pattern = format!("{}*", glob::escape(&prefix));
            let upper = v.to_uppercase();
            let upper_pattern = format!("{}*", glob::escape(&upper));
            prop_assert!(out.patterns.contains(&pattern));
            prop_assert!(out.patterns.contains(&upper_pattern));

            for candidate in [format!("k:{w}:{rest}"), format!("k:{v}:{rest}"), format!("k:{v}{rest}"), format!("{upper}{rest}"), w.clone()] {
                let widened = glob::matches(pattern.as_bytes(), candidate.as_bytes());
                prop_assert_eq!(widened, candidate.starts_with(&prefix), "key {:?}", candidate);
                // Redis's `*` needs a non-empty subject, hence the last condition.
                let widened = glob::matches(upper_pattern.as_bytes(), candidate.as_bytes());
                let expected = candidate.starts_with(&upper) && !candidate.is_empty();
                prop_assert_eq!(widened, expected, "key {:?}", candidate);
            }
        }

        /// A value full of glob characters still renders a literal key byte for byte.
        #[test]
        fn literal_keys_use_values_byte_for_byte(v in "[a*?\\[\\]\\\\{}]{1,8}") {
            let set = rules("[[rule]]\ntable = \"t\"\nkeys = [\"k:{a}\"]\n");
            let mut out = Invalidation::default();
            set.plan(&change("t", Op::Delete, Some(row(&[("a", Some(&v))])), None), &mut out);
            prop_assert!(out.patterns.is_empty());
            let key = format!("k:{v}");
            prop_assert!(out.keys.contains(&key));
        }
    }
}
