//! `invalidator check`: what the rules will do, found before a deploy.
//!
//! - offline (`check --offline`, [`offline`]): patterns without a literal prefix, duplicate
//!   rules and rules another rule shadows (`analysis.rs`);
//! - against the live database ([`check`]): tables and columns that do not exist, rules that
//!   broaden to patterns because the table's REPLICA IDENTITY does not send old values or a
//!   column can arrive as an unchanged TOAST value, and whether the database is ready for the
//!   mode: `wal_level`, the replication privilege and the publication, or notify mode's outbox
//!   and triggers (`database.rs`);
//! - with `[redis] key_index`, whether each Redis gives the key index its keyspace events
//!   (`key_index.rs`).
//!
//! Each [`Finding`] is an error (`check` exits 1: the rules or the database need a change
//! before `run` can work as intended) or a warning (it works, but deletes more than it names or
//! does needless work), with the fix to apply. [`Report`] renders them for people or as JSON.

use std::fmt;

use serde_json::json;

use crate::change::TableName;
use crate::config::PostgresConfig;
use crate::redis::library;
use crate::rules::{Rule, RuleErrors, RuleSet};
use crate::source::connect::ConnectError;
use crate::source::setup::{SetupError, Sql};

mod analysis;
mod database;
mod key_index;

/// How serious a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// The rules or the database must change: `check` exits 1.
    Error,
    /// It works, but deletes more than it names, or does needless work.
    Warning,
}

/// What a finding is about; `as_str` is its stable name in the JSON output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// The rules or the configuration could not be loaded (exit 2).
    Rules,
    /// The rule's table does not exist.
    MissingTable,
    /// A column the rule reads does not exist.
    MissingColumn,
    /// The table has no usable replica identity: once published, its updates and deletes fail.
    NoReplicaIdentity,
    /// The REPLICA IDENTITY does not send old values the rule reads: it broadens to patterns.
    ReplicaIdentity,
    /// A placeholder column can arrive as an unchanged TOAST value: it broadens to patterns.
    Toast,
    /// A placeholder on a generated column, which the publication does not send: it broadens
    /// to patterns (replication mode).
    Generated,
    /// A pattern without a literal prefix: it matches keys of every kind.
    NoPrefix,
    /// A key that begins with a placeholder: without its value, it matches keys of every kind.
    LeadingPlaceholder,
    /// Two rules with the same table and keys that fire on a common operation.
    Duplicate,
    /// A rule whose keys another rule always deletes on the same changes.
    Shadowed,
    /// `wal_level` is not `logical` (replication mode).
    WalLevel,
    /// The role lacks what the mode needs (the REPLICATION attribute).
    Privilege,
    /// `output_plugin_libraries` does not let pgoutput load (replication mode).
    OutputPlugin,
    /// The publication lacks a table or an operation, or does not exist (replication mode).
    Publication,
    /// Notify mode's outbox, trigger function or triggers are missing or out of date.
    NotifySetup,
    /// The Redis Functions library for guarded fill is missing, out of date, or unchecked.
    RedisLibrary,
    /// The slot is not a failover slot on a server that has them (17+): a promoted standby
    /// will not have it (replication mode).
    FailoverSlot,
    /// With `[redis] key_index`: a Redis cannot give the key index its keyspace events.
    KeyIndex,
}

impl Kind {
    /// The stable name, e.g. `missing_column`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rules => "rules",
            Kind::MissingTable => "missing_table",
            Kind::MissingColumn => "missing_column",
            Kind::NoReplicaIdentity => "no_replica_identity",
            Kind::ReplicaIdentity => "replica_identity",
            Kind::Toast => "toast",
            Kind::Generated => "generated",
            Kind::NoPrefix => "no_prefix",
            Kind::LeadingPlaceholder => "leading_placeholder",
            Kind::Duplicate => "duplicate",
            Kind::Shadowed => "shadowed",
            Kind::WalLevel => "wal_level",
            Kind::Privilege => "privilege",
            Kind::OutputPlugin => "output_plugin",
            Kind::Publication => "publication",
            Kind::NotifySetup => "notify_setup",
            Kind::RedisLibrary => "redis_library",
            Kind::FailoverSlot => "failover_slot",
            Kind::KeyIndex => "key_index",
        }
    }
}

/// One thing `check` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// Error or warning.
    pub severity: Severity,
    /// What it is about.
    pub kind: Kind,
    /// The rule's name, for findings about one rule.
    pub rule: Option<String>,
    /// The rule file.
    pub file: Option<String>,
    /// The line of the rule's `[[rule]]` header.
    pub line: Option<usize>,
    /// The table, for findings about a table or a rule.
    pub table: Option<TableName>,
    /// What is wrong, and why it matters.
    pub message: String,
    /// What to do about it: SQL to run, or the change to make to the rule.
    pub fix: Option<String>,
}

impl Finding {
    /// A finding about `rule`.
    fn about(rule: &Rule, severity: Severity, kind: Kind, message: String, fix: String) -> Finding {
        Finding {
            severity,
            kind,
            rule: Some(rule.name.clone()),
            file: Some(rule.file.clone()),
            line: Some(rule.line),
            table: Some(rule.table.clone()),
            message,
            fix: Some(fix),
        }
    }

    /// A finding about a table (or the server, without one) rather than one rule.
    fn general(
        severity: Severity,
        kind: Kind,
        table: Option<&TableName>,
        message: String,
        fix: String,
    ) -> Finding {
        Finding {
            severity,
            kind,
            rule: None,
            file: None,
            line: None,
            table: table.cloned(),
            message,
            fix: Some(fix),
        }
    }

    /// The finding as a JSON object with every field present (`null` when unknown).
    fn to_json(&self) -> serde_json::Value {
        json!({
            "kind": self.kind.as_str(),
            "rule": self.rule,
            "file": self.file,
            "line": self.line,
            "table": self.table.as_ref().map(ToString::to_string),
            "message": self.message,
            "fix": self.fix,
        })
    }
}

impl Finding {
    /// The finding on one line, without its severity and fix: where (file, line, rule, table)
    /// and what, for an error message or a log line.
    pub fn summary(&self) -> String {
        Summary(self).to_string()
    }
}

/// [`Finding::summary`]'s text.
struct Summary<'a>(&'a Finding);

impl fmt::Display for Summary<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let finding = self.0;
        if let Some(file) = &finding.file {
            write!(f, "{file}:")?;
            if let Some(line) = finding.line {
                write!(f, "{line}:")?;
            }
            f.write_str(" ")?;
        }
        match (&finding.rule, &finding.table) {
            (Some(rule), Some(table)) => write!(f, "rule {rule:?} on {table}: ")?,
            (Some(rule), None) => write!(f, "rule {rule:?}: ")?,
            (None, Some(table)) => write!(f, "{table}: ")?,
            (None, None) => {}
        }
        f.write_str(&finding.message)
    }
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.severity {
            Severity::Error => "error: ",
            Severity::Warning => "warning: ",
        })?;
        Summary(self).fmt(f)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n  fix: {fix}")?;
        }
        Ok(())
    }
}

/// Everything `check` found, sorted: server and table findings first, then by file and line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The findings.
    pub findings: Vec<Finding>,
}

impl Report {
    /// Sorts `findings` into a report, warnings about several rules with the same fix grouped
    /// into one (see `group_warnings`).
    pub fn new(findings: Vec<Finding>) -> Report {
        let mut findings = group_warnings(findings);
        findings.sort_by(|a, b| {
            (&a.file, a.line, &a.table, a.kind).cmp(&(&b.file, b.line, &b.table, b.kind))
        });
        Report { findings }
    }

    /// The report of rules that could not be loaded: one `rules` error per problem, with its
    /// file and line.
    pub fn unusable(errors: &RuleErrors) -> Report {
        Report {
            findings: errors
                .errors()
                .iter()
                .map(|e| Finding {
                    severity: Severity::Error,
                    kind: Kind::Rules,
                    rule: e.rule.clone(),
                    file: (!e.file.is_empty()).then(|| e.file.clone()),
                    line: e.line,
                    table: None,
                    message: e.kind.to_string(),
                    fix: None,
                })
                .collect(),
        }
    }

    /// The report of a configuration that could not be loaded: one `rules` error.
    pub fn unusable_config(message: &str) -> Report {
        Report {
            findings: vec![Finding::general(
                Severity::Error,
                Kind::Rules,
                None,
                message.to_owned(),
                String::new(),
            )],
        }
        .without_fix()
    }

    /// The same findings without fixes.
    fn without_fix(mut self) -> Report {
        for finding in &mut self.findings {
            finding.fix = None;
        }
        self
    }

    /// Whether there is no error (warnings allowed): `check` exits 0.
    pub fn ok(&self) -> bool {
        self.count(Severity::Error) == 0
    }

    /// How many findings have `severity`.
    pub fn count(&self, severity: Severity) -> usize {
        self.findings
            .iter()
            .filter(|f| f.severity == severity)
            .count()
    }

    /// The stable JSON document: `{"ok": bool, "errors": [...], "warnings": [...]}`, each
    /// finding `{"kind", "rule", "file", "line", "table", "message", "fix"}`.
    pub fn to_json(&self) -> String {
        let of = |severity| {
            self.findings
                .iter()
                .filter(|f| f.severity == severity)
                .map(Finding::to_json)
                .collect::<Vec<_>>()
        };
        let doc = json!({
            "ok": self.ok(),
            "errors": of(Severity::Error),
            "warnings": of(Severity::Warning),
        });
        serde_json::to_string_pretty(&doc).unwrap_or_default()
    }

    /// The findings for people, errors first, then a summary line naming the rules checked.
    pub fn human(&self, rules: &RuleSet, what: &str) -> String {
        let mut out = String::new();
        for severity in [Severity::Error, Severity::Warning] {
            for finding in self.findings.iter().filter(|f| f.severity == severity) {
                out.push_str(&finding.to_string());
                out.push('\n');
            }
        }
        let (errors, warnings) = (self.count(Severity::Error), self.count(Severity::Warning));
        let verdict = match (errors, warnings) {
            (0, 0) => "ok".to_owned(),
            (0, w) => format!("ok, {w} warning{}", plural(w)),
            (e, w) => format!("{e} error{}, {w} warning{}", plural(e), plural(w)),
        };
        let (rules, tables) = (rules.rules().len(), rules.tables().count());
        out.push_str(&format!(
            "{rules} rule{} on {tables} table{} {what}: {verdict}",
            plural(rules),
            plural(tables)
        ));
        out
    }
}

/// Warnings of one kind about several rules of one table with the same fix become one finding
/// that lists the rules, each with what is particular to it: the fix is to apply once, and the
/// report stays short for a table with many rules. Errors stay one per rule.
fn group_warnings(findings: Vec<Finding>) -> Vec<Finding> {
    type Group = (Kind, Option<TableName>, Option<String>);
    let mut out = Vec::new();
    let mut groups: Vec<(Group, Vec<Finding>)> = Vec::new();
    for finding in findings {
        if finding.severity != Severity::Warning || finding.rule.is_none() {
            out.push(finding);
            continue;
        }
        let group = (finding.kind, finding.table.clone(), finding.fix.clone());
        match groups.iter_mut().find(|(g, _)| *g == group) {
            Some((_, members)) => members.push(finding),
            None => groups.push((group, vec![finding])),
        }
    }
    for ((kind, table, fix), mut members) in groups {
        if members.len() == 1 {
            out.extend(members.pop());
            continue;
        }
        let messages: Vec<&str> = members.iter().map(|f| f.message.as_str()).collect();
        let head = common_clause(&messages);
        let mut message = if head.is_empty() {
            format!("{} rules:", members.len())
        } else {
            format!("{head}, for {} rules:", members.len())
        };
        for member in &members {
            let rest = member.message[head.len()..].trim_start_matches([',', ';', ':', ' ']);
            message.push_str(&format!(
                "\n    rule {:?} ({}:{})",
                member.rule.as_deref().unwrap_or_default(),
                member.file.as_deref().unwrap_or_default(),
                member.line.unwrap_or_default()
            ));
            if !rest.is_empty() {
                message.push_str(&format!(": {rest}"));
            }
        }
        out.push(Finding {
            severity: Severity::Warning,
            kind,
            rule: None,
            file: None,
            line: None,
            table,
            message,
            fix,
        });
    }
    out
}

/// The longest start that every message shares and that ends a clause: before `, `, `; ` or
/// `: `, or at the end of every message; empty when there is none.
fn common_clause<'a>(messages: &[&'a str]) -> &'a str {
    let Some((first, others)) = messages.split_first() else {
        return "";
    };
    let mut shared = first.len();
    for other in others {
        shared = first
            .char_indices()
            .zip(other.chars())
            .find(|((_, a), b)| a != b)
            .map_or(shared.min(other.len()).min(first.len()), |((at, _), _)| at)
            .min(shared);
    }
    let ends_clause = |at: usize| {
        messages.iter().all(|m| {
            m.len() == at
                || [", ", "; ", ": "]
                    .iter()
                    .any(|sep| m[at..].starts_with(sep))
        })
    };
    (1..=shared)
        .rev()
        .filter(|&at| first.is_char_boundary(at))
        .find(|&at| ends_clause(at))
        .map_or("", |at| &first[..at])
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// The rules-only checks (`check --offline`): no-prefix patterns, duplicates, shadowed rules.
pub fn offline(rules: &RuleSet) -> Report {
    Report::new(analysis::findings(rules))
}

/// Every check: the rules-only ones and those against the connected database, as
/// `postgres.mode` reads changes.
pub async fn check(
    db: &mut impl Sql,
    rules: &RuleSet,
    postgres: &PostgresConfig,
) -> Result<Report, SetupError> {
    let mut findings = analysis::findings(rules);
    findings.extend(database::findings(db, rules, postgres).await?);
    Ok(Report::new(findings))
}

/// What each Redis has of the guarded-fill library: an error where a primary has an older (or
/// edited) text, whose replies may differ from the documented ones; a warning where it is
/// missing (`FCALL` fails loudly there), newer than this build, without Redis Functions, or
/// could not be reached.
pub fn library_findings(targets: &[library::Target]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for target in targets {
        let nodes = match &target.nodes {
            Ok(nodes) => nodes,
            Err(reason) => {
                findings.push(Finding::general(
                    Severity::Warning,
                    Kind::RedisLibrary,
                    None,
                    format!(
                        "redis {} could not be reached, so the Redis Functions library {} was \
                         not checked there: {reason}",
                        target.target,
                        library::NAME
                    ),
                    "run check again once it answers".to_owned(),
                ));
                continue;
            }
        };
        for node in nodes {
            let (severity, fix) = match node.state {
                library::State::Current => continue,
                // Loud, not wrong: a client calling it gets "Function not found".
                library::State::Missing => (Severity::Warning, "invalidator setup"),
                // Quiet: a client gets other replies than the ones this build documents.
                library::State::Older(_) | library::State::Changed => {
                    (Severity::Error, "invalidator setup")
                }
                library::State::Newer(_) => (Severity::Warning, "upgrade this invalidator"),
                library::State::Unsupported => (Severity::Warning, "upgrade Redis to 7 or later"),
            };
            findings.push(Finding::general(
                severity,
                Kind::RedisLibrary,
                None,
                format!(
                    "the Redis Functions library {} on {}: {} (FCALL invalidator_get and \
                     invalidator_fill need version {})",
                    library::NAME,
                    node.node,
                    node.state.describe(),
                    library::version()
                ),
                fix.to_owned(),
            ));
        }
    }
    findings
}

/// Why `check` could not check against the database.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// No ordinary connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A catalog query failed.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A Redis refused the connection for good (credentials, settings).
    #[error(transparent)]
    Redis(#[from] crate::redis::DeleteError),
}

/// `invalidator check`: the rules-only checks when `offline`, else every check against the
/// database and against each Redis's guarded-fill library (and, with `[redis] key_index`, its
/// keyspace events); with what the report was checked against, for its last line.
pub async fn run(
    config: &crate::config::Config,
    rules: &RuleSet,
    offline: bool,
) -> Result<(Report, &'static str), CheckError> {
    if offline {
        return Ok((self::offline(rules), "checked offline"));
    }
    let postgres = &config.postgres;
    let mut db = crate::source::connect::connect(postgres).await?;
    let report = check(&mut db, rules, postgres).await?;
    let mut redis = library::inspect(config).await?;
    let mut findings = report.findings;
    findings.extend(library_findings(&redis));
    if config.redis.key_index {
        findings.extend(key_index::findings(&mut redis).await);
    }
    Ok((Report::new(findings), "checked against the database"))
}

/// The rules' tables that do not exist, and the rules naming a column (in a placeholder or in
/// `changed`) that their table lacks, sorted by file and line: what `run` (on every
/// connection), `setup` and a reload refuse, since such a placeholder never has a value, so
/// every key it is in would become a pattern matching the whole namespace.
pub async fn unknown_names(db: &mut impl Sql, rules: &RuleSet) -> Result<Vec<Finding>, SetupError> {
    Ok(Report::new(database::unknown_names(db, rules).await?).findings)
}

/// Rules naming what the database lacks, as the error that stops `run` and `setup`: one line per
/// finding of [`unknown_names`], with its file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the rules name what the database lacks (fix the rules, or the schema):{}",
    .0.iter().map(|f| format!("\n  {}", f.summary())).collect::<String>()
)]
pub struct UnknownNames(pub Vec<Finding>);

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(severity: Severity, rule: Option<&str>) -> Finding {
        Finding {
            severity,
            kind: Kind::MissingColumn,
            rule: rule.map(str::to_owned),
            file: rule.map(|_| "rules/a.toml".to_owned()),
            line: rule.map(|_| 3),
            table: Some(TableName::parse("items").unwrap()),
            message: "public.items has no column nope".to_owned(),
            fix: Some("fix it".to_owned()),
        }
    }

    fn warning(kind: Kind, rule: &str, line: usize, message: &str, fix: &str) -> Finding {
        Finding {
            severity: Severity::Warning,
            kind,
            rule: Some(rule.to_owned()),
            file: Some("rules/b.toml".to_owned()),
            line: Some(line),
            table: Some(TableName::new("public", "bookings")),
            message: message.to_owned(),
            fix: Some(fix.to_owned()),
        }
    }

    #[test]
    fn warnings_with_the_same_fix_are_one_finding_listing_the_rules() {
        const FULL: &str = "ALTER TABLE \"public\".\"bookings\" REPLICA IDENTITY FULL;";
        let sends = "REPLICA IDENTITY DEFAULT of public.bookings sends only id in the old row";
        let report = Report::new(vec![
            warning(
                Kind::ReplicaIdentity,
                "a",
                3,
                &format!("{sends}, so the keys broaden: `c:{{car}}` becomes `c:*`"),
                FULL,
            ),
            finding(Severity::Error, Some("ghost")),
            warning(
                Kind::ReplicaIdentity,
                "b",
                9,
                &format!("{sends}; `changed` cannot compare car"),
                FULL,
            ),
            warning(Kind::Toast, "c", 12, "body can be stored out of line", FULL),
            warning(Kind::NoPrefix, "d", 20, "no prefix", "add one"),
            warning(Kind::NoPrefix, "e", 30, "no prefix", "add one"),
        ]);
        let grouped: Vec<&Finding> = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Warning && f.rule.is_none())
            .collect();
        assert_eq!(grouped.len(), 2, "{report:#?}");
        let identity = grouped
            .iter()
            .find(|f| f.kind == Kind::ReplicaIdentity)
            .unwrap();
        assert_eq!(
            identity.to_string(),
            format!(
                "warning: public.bookings: {sends}, for 2 rules:\n    rule \"a\" (rules/b.toml:3): \
                 so the keys broaden: `c:{{car}}` becomes `c:*`\n    rule \"b\" (rules/b.toml:9): \
                 `changed` cannot compare car\n  fix: {FULL}"
            )
        );
        let prefix = grouped.iter().find(|f| f.kind == Kind::NoPrefix).unwrap();
        assert_eq!(
            prefix.message,
            "no prefix, for 2 rules:\n    rule \"d\" (rules/b.toml:20)\n    rule \"e\" (rules/b.toml:30)"
        );
        // A warning alone, another kind with the same fix, and errors stay as they are.
        assert_eq!(report.count(Severity::Warning), 3);
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.rule.as_deref() == Some("c"))
        );
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.rule.as_deref() == Some("ghost"))
        );
    }

    #[test]
    fn the_shared_clause_ends_at_a_clause_boundary() {
        assert_eq!(common_clause(&["a b, c", "a b, d"]), "a b");
        assert_eq!(common_clause(&["a b; c: d", "a b; c: e"]), "a b; c");
        assert_eq!(common_clause(&["same", "same"]), "same");
        assert_eq!(common_clause(&["abc", "abd"]), "");
        assert_eq!(common_clause(&["é, x", "é, y"]), "é");
    }

    #[test]
    fn json_has_ok_errors_and_warnings_with_every_field() {
        let report = Report::new(vec![
            finding(Severity::Warning, None),
            finding(Severity::Error, Some("ghost")),
        ]);
        let doc: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(doc["ok"], false);
        assert_eq!(
            doc["errors"][0],
            json!({"kind": "missing_column", "rule": "ghost", "file": "rules/a.toml", "line": 3,
                   "table": "public.items", "message": "public.items has no column nope",
                   "fix": "fix it"})
        );
        assert_eq!(doc["warnings"][0]["rule"], serde_json::Value::Null);
        assert_eq!(doc["warnings"][0]["table"], "public.items");
    }

    #[test]
    fn a_summary_is_one_line_with_where_and_what() {
        assert_eq!(
            finding(Severity::Error, Some("ghost")).summary(),
            "rules/a.toml:3: rule \"ghost\" on public.items: public.items has no column nope"
        );
        assert_eq!(
            finding(Severity::Warning, None).summary(),
            "public.items: public.items has no column nope"
        );
    }

    #[test]
    fn human_output_names_file_line_rule_and_fix() {
        let rules = RuleSet::compile(&[(
            "rules/a.toml".to_owned(),
            "[[rule]]\ntable = \"items\"\nkeys = [\"k\"]\n".to_owned(),
        )])
        .unwrap();
        let report = Report::new(vec![finding(Severity::Error, Some("ghost"))]);
        assert_eq!(
            report.human(&rules, "checked"),
            "error: rules/a.toml:3: rule \"ghost\" on public.items: public.items has no column \
             nope\n  fix: fix it\n1 rule on 1 table checked: 1 error, 0 warnings"
        );
        assert!(!report.ok());
        assert_eq!(
            Report::default().human(&rules, "checked"),
            "1 rule on 1 table checked: ok"
        );
    }
}
