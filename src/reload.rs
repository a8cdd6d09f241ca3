//! Hot reload of the rules: a watcher that reloads `rules.path` when its files change or on
//! SIGHUP, and [`LiveRules`], the source loop's view of the rules in effect, which it swaps
//! between transactions, never inside one.
//!
//! ```text
//!  rules/*.toml ─(mtime, size; every 500 ms)─┐
//!  SIGHUP ───────────────────────────────────┴▶ RuleSet::load ─▶ database ─▶ watch<Arc<RuleSet>>
//!                                 broken: keep, log file:line, count      ready? │
//!                                                                                ▼
//!                              source loop: LiveRules::refresh at the next transaction boundary
//! ```
//!
//! What a reload needs from the database, decided to never lose an invalidation:
//! - replication mode, a table the running rules do not watch: it must be in the publication
//!   first (`ALTER PUBLICATION ... ADD TABLE`, which needs ownership). While that runs, the
//!   union of the old and the new rules is in effect, so a change read meanwhile is planned by
//!   both. If it fails, the old rules come back, and the error is logged and counted. Changes
//!   of the new table committed before the publication held it are not in the stream, and keys
//!   cached from its rows may be stale: the same transaction asks through the WAL for every key
//!   its rules can produce to be deleted (as a start does for a table it finds unpublished).
//! - notify mode, a new table or a table whose rules read other columns: `run` applies no DDL in
//!   notify mode, so the new rules take effect at once and an error says to run `invalidator
//!   setup`. That is never worse than keeping the old rules: a table without triggers sends
//!   nothing either way, and a column the trigger does not record reads as unknown, so its
//!   placeholder becomes `*` (over-invalidation, never a miss). A restart, or a reconnect to
//!   Postgres, stops with an error until `setup` has run, as a start always does; the outbox
//!   keeps every change meanwhile, so nothing is lost.
//! - rules naming a table or a column that does not exist are rejected like broken rules, in
//!   both modes (a placeholder without a column would turn its keys into patterns deleting their
//!   whole namespace): each is logged with its file and line, and the columns the table has; so
//!   is a reload that needs the database while it cannot be reached (SIGHUP, or the next edit,
//!   tries again).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::change::{Change, TableName};
use crate::check::{self, Finding};
use crate::config::{Mode, PostgresConfig};
use crate::rules::{Invalidation, RuleSet, RuleTally};
use crate::source::setup::{self, SetupError};
use crate::source::{connect, drift};
use crate::telemetry;

/// How often the rules' files are looked at. A change is applied once two looks in a row agree,
/// so an editor caught half-way through writing a file is not reported as broken rules.
pub const POLL: Duration = Duration::from_millis(500);

/// The rules in effect for a source loop, with their per-rule counters.
///
/// Planning adds up what each rule did in plain numbers; [`LiveRules::count`] turns them into
/// metrics once per transaction, so a change costs no label lookup and no atomic operation.
pub struct LiveRules {
    /// The rules planning uses now.
    current: Arc<RuleSet>,
    /// Newer rules from the watcher; `None` when the rules never change (tests, tools).
    updates: Option<watch::Receiver<Arc<RuleSet>>>,
    /// Handles on the per-rule series, by rule index.
    counters: Vec<RuleCounters>,
    /// What each rule did since the last [`LiveRules::count`], by rule index.
    tally: Vec<RuleTally>,
}

/// Handles on the three series of one rule.
struct RuleCounters {
    fired: metrics::Counter,
    keys: metrics::Counter,
    patterns: metrics::Counter,
}

impl LiveRules {
    /// The rules in effect now and every later set, for a task beside the one that plans
    /// (which takes them whenever it likes, not at transaction boundaries).
    pub fn subscribe(&self) -> watch::Receiver<Arc<RuleSet>> {
        match &self.updates {
            Some(updates) => updates.clone(),
            None => watch::channel(self.current.clone()).1,
        }
    }

    /// Rules that never change.
    pub fn fixed(rules: Arc<RuleSet>) -> LiveRules {
        LiveRules::build(rules, None)
    }

    /// The rules the watcher sends on `updates`, starting with its current value.
    pub fn watching(mut updates: watch::Receiver<Arc<RuleSet>>) -> LiveRules {
        let rules = updates.borrow_and_update().clone();
        LiveRules::build(rules, Some(updates))
    }

    fn build(rules: Arc<RuleSet>, updates: Option<watch::Receiver<Arc<RuleSet>>>) -> LiveRules {
        let mut live = LiveRules {
            current: rules,
            updates,
            counters: Vec::new(),
            tally: Vec::new(),
        };
        live.index();
        live
    }

    /// Builds the per-rule handles and tallies for the current rules (at start and on a swap).
    fn index(&mut self) {
        self.counters = self
            .current
            .rules()
            .iter()
            .map(|rule| RuleCounters {
                fired: metrics::counter!(telemetry::RULE_FIRED_TOTAL, "rule" => rule.name.clone()),
                keys: metrics::counter!(telemetry::RULE_KEYS_TOTAL, "rule" => rule.name.clone()),
                patterns: metrics::counter!(
                    telemetry::RULE_PATTERNS_TOTAL,
                    "rule" => rule.name.clone()
                ),
            })
            .collect();
        self.tally = vec![RuleTally::default(); self.counters.len()];
    }

    /// The rules in effect.
    pub fn rules(&self) -> &RuleSet {
        &self.current
    }

    /// Adds to `out` what `change` invalidates, counting what each rule did.
    pub fn plan(&mut self, change: &Change, out: &mut Invalidation) {
        self.current.plan_tallied(change, out, &mut self.tally);
    }

    /// Adds what the rules did since the last call to their metrics: once per transaction.
    pub fn count(&mut self) {
        for (tally, counters) in self.tally.iter_mut().zip(&self.counters) {
            if tally.fired == 0 {
                continue;
            }
            counters.fired.increment(tally.fired);
            counters.keys.increment(tally.keys);
            counters.patterns.increment(tally.patterns);
            *tally = RuleTally::default();
        }
    }

    /// Takes newer rules from the watcher, if any. Call only between transactions: a
    /// transaction is planned by one rule set from its first change to its commit.
    pub fn refresh(&mut self) {
        let Some(updates) = self.updates.as_mut() else {
            return;
        };
        // An atomic load when nothing changed; the watcher's side closing changes nothing.
        if !updates.has_changed().unwrap_or(false) {
            return;
        }
        let rules = updates.borrow_and_update().clone();
        self.count();
        self.current = rules;
        self.index();
        tracing::debug!(
            rules = self.current.rules().len(),
            tables = self.current.tables().count(),
            "new rules in effect"
        );
    }
}

/// What the watcher needs to check new rules against the database.
pub struct Reloader {
    /// The rules directory or file.
    pub path: PathBuf,
    /// The Postgres settings (mode, publication, URL).
    pub postgres: PostgresConfig,
    /// Dry run: never change the database (no `ALTER PUBLICATION`).
    pub dry_run: bool,
    /// Where the rules in effect are published.
    pub updates: watch::Sender<Arc<RuleSet>>,
}

/// Watches the rules until `cancel` fires: reloads when their files change (polled, see
/// [`POLL`]) and at once on SIGHUP.
///
/// Polling rather than inotify: it needs no new crate and it works everywhere the files can
/// live: network and overlay filesystems, and Kubernetes ConfigMap volumes, whose update swaps a
/// symlinked directory (an inotify watch on the files sees nothing). A look is one `stat` per
/// rule file every 500 ms, done inline on the current-thread runtime: microseconds, less than a
/// thread hand-off would cost.
pub async fn watch_rules(reloader: Reloader, cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(hangup) => Some(hangup),
        Err(e) => {
            tracing::warn!(error = %e, "cannot install a SIGHUP handler; rules reload on file changes only");
            None
        }
    };
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut loaded = fingerprint(&reloader.path);
    let mut last = loaded.clone();
    loop {
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return,
            Some(()) = async { hangup.as_mut()?.recv().await } => {
                tracing::info!(path = %reloader.path.display(), "SIGHUP: reloading the rules");
                loaded = fingerprint(&reloader.path);
                last = loaded.clone();
                reloader.reload().await;
            }
            _ = tick.tick() => {
                let now = fingerprint(&reloader.path);
                // Changed since the last load, and the same as a look ago: the write is done.
                if now != loaded && now == last {
                    tracing::info!(path = %reloader.path.display(), "rules changed; reloading");
                    loaded = now.clone();
                    reloader.reload().await;
                }
                last = now;
            }
        }
    }
}

/// Names, sizes and modification times of the rule files (the `*.toml` files of a directory, or
/// the one file), sorted; what changes when the rules are edited.
fn fingerprint(path: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let stat = |file: PathBuf| {
        // `metadata` follows symlinks: a ConfigMap update changes the target.
        let meta = std::fs::metadata(&file).ok();
        let size = meta.as_ref().map_or(0, std::fs::Metadata::len);
        let modified = meta.and_then(|m| m.modified().ok());
        (file, size, modified)
    };
    if !path.is_dir() {
        return vec![stat(path.to_path_buf())];
    }
    let mut files: Vec<_> = std::fs::read_dir(path)
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|file| file.extension().is_some_and(|ext| ext == "toml"))
                .map(stat)
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Why new rules were not taken.
#[derive(Debug, thiserror::Error)]
enum Rejected {
    /// The database check or change failed.
    #[error(transparent)]
    Database(#[from] SetupError),
    /// No connection for the check.
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
    /// The new rules name tables or columns the database lacks (each finding says which, with
    /// its file and line).
    #[error("the new rules name what the database lacks")]
    UnknownNames(Vec<Finding>),
}

impl Reloader {
    /// Loads the rules and, when they compile and the database can take them, puts them in
    /// effect; otherwise keeps the running rules, logs why and counts it.
    async fn reload(&self) {
        let new = match RuleSet::load(&self.path) {
            Ok(rules) => Arc::new(rules),
            Err(errors) => {
                // Each problem on its own line, with its file and line.
                for error in errors.errors() {
                    tracing::error!(error = %error, "rules reload rejected; the running rules stay in effect");
                }
                metrics::counter!(telemetry::RULES_RELOAD_ERRORS_TOTAL).increment(1);
                return;
            }
        };
        let old = self.updates.borrow().clone();
        match self.prepare(&old, &new).await {
            Ok(()) => {
                self.updates.send_replace(new.clone());
                metrics::counter!(telemetry::RULES_RELOADS_TOTAL).increment(1);
                tracing::info!(
                    rules = new.rules().len(),
                    tables = new.tables().count(),
                    "rules reloaded; they apply from the next transaction"
                );
            }
            Err(Rejected::UnknownNames(unknown)) => {
                metrics::counter!(telemetry::RULES_RELOAD_ERRORS_TOTAL).increment(1);
                // Each on its own line, with its file and line, as for rules that do not load.
                for finding in unknown {
                    tracing::error!(error = %finding.summary(),
                        "rules reload rejected; the running rules stay in effect");
                }
            }
            Err(e) => {
                // The union may be in effect: the old rules come back.
                self.updates.send_replace(old);
                metrics::counter!(telemetry::RULES_RELOAD_ERRORS_TOTAL).increment(1);
                tracing::error!(
                    error = %telemetry::chain(&e),
                    "rules reload rejected; the running rules stay in effect (fix it, then edit \
                     the rules or send SIGHUP to retry)"
                );
            }
        }
    }

    /// Makes the database ready for `new` (see the module documentation).
    async fn prepare(&self, old: &Arc<RuleSet>, new: &Arc<RuleSet>) -> Result<(), Rejected> {
        let gained: BTreeSet<TableName> = new
            .tables()
            .filter(|t| !old.has_table(t))
            .cloned()
            .collect();
        let columns_changed = new
            .tables()
            .any(|t| new.columns_for(t) != old.columns_for(t));
        // The names the running rules read were checked when they took effect.
        if gained.is_empty() && !columns_changed {
            return Ok(());
        }
        let mut db = connect::connect(&self.postgres).await?;
        let unknown = check::unknown_names(&mut db, new).await?;
        if !unknown.is_empty() {
            return Err(Rejected::UnknownNames(unknown));
        }
        match self.postgres.mode {
            Mode::Replication if gained.is_empty() => Ok(()),
            Mode::Replication => self.extend_publication(&mut db, old, new, &gained).await,
            Mode::Notify => {
                let actions = setup::notify::plan(&mut db, new).await?;
                if !actions.is_empty() {
                    let missing: Vec<&str> = actions.iter().map(|a| a.why.as_str()).collect();
                    tracing::error!(
                        setup_would = %missing.join("; "),
                        "the new rules need `invalidator setup` (notify mode): until it runs, \
                         changes of tables without triggers are not captured, and columns the \
                         triggers do not record read as unknown (their keys become patterns); \
                         a restart, or a reconnect to Postgres, stops with an error until then \
                         (the outbox keeps every change meanwhile)"
                    );
                }
                Ok(())
            }
        }
    }

    /// Replication mode: adds the tables the new rules gained to the publication, with the
    /// union of old and new rules in effect meanwhile.
    async fn extend_publication(
        &self,
        db: &mut tokio_postgres::Client,
        old: &Arc<RuleSet>,
        new: &Arc<RuleSet>,
        gained: &BTreeSet<TableName>,
    ) -> Result<(), Rejected> {
        // A view or a sequence has a catalog entry but cannot be published.
        let missing = setup::missing_tables(db, gained).await?;
        if !missing.is_empty() {
            return Err(SetupError::MissingTables(missing).into());
        }
        let publication = &self.postgres.publication;
        let all: BTreeSet<TableName> = new.tables().cloned().collect();
        let (_, action) = setup::publication_action(db, &all, publication).await?;
        if self.dry_run {
            if action.is_some() {
                tracing::warn!(
                    publication = %publication,
                    tables = %list(gained),
                    "dry run: the publication lacks tables of the new rules and a dry run \
                     changes nothing; their changes are not shown until `invalidator setup` adds \
                     them"
                );
            }
            return Ok(());
        }
        // Until the ALTER is done, and a moment after (the stream may already carry the new
        // table's changes before this task learns the ALTER committed), plan with both; the
        // request to delete the gained tables' keys is planned by them too.
        self.updates.send_replace(Arc::new(old.union(new)));
        // Keys of a table no rule watched may have been cached and never invalidated: they are
        // deleted through the WAL, as at a start that finds the table unpublished.
        match drift::publish_with_flush(db, action.clone(), gained).await? {
            Some(combined) => setup::apply(db, &[combined]).await?,
            None => {
                setup::apply(db, action.as_slice()).await?;
                tracing::warn!(
                    tables = %list(gained),
                    "keys of these tables cached before this reload are not deleted: this role \
                     cannot write invalidator.requests (or it is missing or out of date: run \
                     `invalidator setup`); delete them by hand if they may be stale"
                );
            }
        }
        tracing::info!(
            publication = %publication,
            tables = %list(gained),
            "the publication streams the new rules' tables from now on, and their keys cached \
             before are deleted; their changes committed before now are not in the stream"
        );
        Ok(())
    }
}

fn list(tables: &BTreeSet<TableName>) -> String {
    tables
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::change::{Lsn, Op, Row, Value};

    fn rules(text: &str) -> Arc<RuleSet> {
        Arc::new(RuleSet::compile(&[("r.toml".to_owned(), text.to_owned())]).unwrap())
    }

    fn insert(table: &str, id: &str) -> Change {
        Change {
            table: TableName::parse(table).unwrap(),
            op: Op::Insert,
            old: None,
            new: Some(Row::new(
                vec!["id".to_owned()].into(),
                vec![Value::Text(id.to_owned())],
            )),
            commit_lsn: Lsn(1),
            commit_time_us: 0,
        }
    }

    #[test]
    fn new_rules_apply_only_after_refresh() {
        let (tx, rx) = watch::channel(rules("[[rule]]\ntable = \"a\"\nkeys = [\"a:{id}\"]\n"));
        let mut live = LiveRules::watching(rx);
        tx.send_replace(rules("[[rule]]\ntable = \"b\"\nkeys = [\"b:{id}\"]\n"));
        let mut out = Invalidation::default();
        live.plan(&insert("a", "1"), &mut out);
        live.plan(&insert("b", "1"), &mut out);
        assert_eq!(out.keys.len(), 1, "swapped before refresh: {out:?}");
        assert!(out.keys.contains("a:1"));
        live.refresh();
        let mut out = Invalidation::default();
        live.plan(&insert("a", "2"), &mut out);
        live.plan(&insert("b", "2"), &mut out);
        assert_eq!(out.keys.into_iter().collect::<Vec<_>>(), ["b:2"]);
    }

    #[test]
    fn the_union_plans_what_either_would() {
        let old = rules("[[rule]]\nname = \"x\"\ntable = \"a\"\nkeys = [\"old:{id}\"]\n");
        let new = rules(
            "[[rule]]\nname = \"x\"\ntable = \"a\"\nkeys = [\"new:{id}\"]\n\n\
             [[rule]]\ntable = \"b\"\nkeys = [\"b:{id}\"]\n",
        );
        let both = old.union(&new);
        let mut out = Invalidation::default();
        both.plan(&insert("a", "1"), &mut out);
        both.plan(&insert("b", "1"), &mut out);
        let mut keys: Vec<_> = out.keys.into_iter().collect();
        keys.sort();
        assert_eq!(keys, ["b:1", "new:1", "old:1"]);
    }

    #[test]
    fn the_fingerprint_changes_with_size_or_time_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.toml"), "x").unwrap();
        let before = fingerprint(dir.path());
        std::fs::write(dir.path().join("notes.md"), "not rules").unwrap();
        assert_eq!(fingerprint(dir.path()), before);
        std::fs::write(dir.path().join("a.toml"), "xy").unwrap();
        assert_ne!(fingerprint(dir.path()), before);
    }
}
