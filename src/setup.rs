//! `invalidator setup`: what the configured mode needs in the database for these rules (the
//! publication and slot, or the outbox and its triggers, and `invalidator.invalidate()`), and in
//! every Redis (the guarded-fill library), and doing it. The pieces are planned in
//! [`crate::source::setup`], [`crate::source::invalidate`] and [`crate::redis::library`]; this is
//! the command that puts them together.

use std::collections::BTreeSet;
use std::fmt;

use crate::change::TableName;
use crate::check;
use crate::config::{Config, Mode};
use crate::redis::{DeleteError, library};
use crate::rules::RuleSet;
use crate::source::connect::{self, ConnectError};
use crate::source::invalidate;
use crate::source::setup::{self as catalog, Action, SetupError, Sql};

/// Why `setup` could not plan or apply its changes.
#[derive(Debug, thiserror::Error)]
pub enum SetupCommandError {
    /// No ordinary connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// A catalog query or a change failed, or the schemas are not safe to set up in.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The rules name tables or columns the database lacks: setting up for rules that `run`
    /// refuses would only defer the error.
    #[error(transparent)]
    UnknownNames(#[from] check::UnknownNames),
    /// A Redis refused the connection for good (credentials) or cannot take the library.
    #[error(transparent)]
    Redis(#[from] DeleteError),
}

/// What `setup` found to do.
#[derive(Debug)]
pub struct Done {
    /// The changes, in order.
    pub actions: Vec<Action>,
    /// What to say when there is nothing to do.
    pub in_place: &'static str,
    /// Whether the changes were only planned (`--dry-run`), not made.
    pub dry_run: bool,
    /// What each Redis has of the library, and what was (or would be) loaded.
    pub redis: Vec<library::Target>,
}

/// What `setup` prints: each change done, or with `--dry-run` its SQL, one statement a change.
impl fmt::Display for Done {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let loaded = self.redis.iter().all(|t| t.nodes.is_ok());
        if self.actions.is_empty() && loaded && !self.redis.iter().any(library::Target::needs_load)
        {
            writeln!(f, "{}", self.in_place)?;
        }
        for action in &self.actions {
            match self.dry_run {
                true => writeln!(f, "-- {}\n{};", action.why, action.sql)?,
                false => writeln!(f, "done: {}", action.why)?,
            }
        }
        for line in self.redis.iter().flat_map(|t| t.lines(self.dry_run)) {
            writeln!(f, "{line}")?;
        }
        Ok(())
    }
}

/// Plans what the configured mode needs for `rules` and, unless `dry_run`, applies it.
pub async fn setup(
    config: &Config,
    rules: &RuleSet,
    dry_run: bool,
) -> Result<Done, SetupCommandError> {
    let mut db = connect::connect(&config.postgres).await?;
    catalog::refuse_untrusted_schemas(&mut db, config.postgres.mode == Mode::Notify).await?;
    let unknown = check::unknown_names(&mut db, rules).await?;
    if !unknown.is_empty() {
        return Err(check::UnknownNames(unknown).into());
    }
    // Before anything changes: a Redis that cannot take the library stops setup here.
    let redis = library::inspect(config).await?;
    for target in &redis {
        target.loadable()?;
    }
    let mut done = match config.postgres.mode {
        Mode::Replication => Done {
            actions: replication(&mut db, config, rules).await?,
            in_place: "publication, slot, invalidator.invalidate() and the Redis Functions \
                       library are in place; nothing to do",
            dry_run,
            redis,
        },
        Mode::Notify => Done {
            actions: notify(&mut db, config, rules).await?,
            in_place: "outbox, triggers, invalidator.invalidate() and the Redis Functions \
                       library are in place; nothing to do",
            dry_run,
            redis,
        },
    };
    if !dry_run {
        if !done.actions.is_empty() {
            catalog::apply(&mut db, &done.actions).await?;
        }
        for target in &mut done.redis {
            target.apply().await?;
        }
    }
    Ok(done)
}

/// Replication mode: repairs of what the publication hides, then publication and slot, then
/// `invalidator.invalidate()`.
async fn replication(
    db: &mut impl Sql,
    config: &Config,
    rules: &RuleSet,
) -> Result<Vec<Action>, SetupError> {
    let publication = &config.postgres.publication;
    let mut tables: BTreeSet<TableName> = rules.tables().cloned().collect();
    if invalidate::has_requests(db).await? {
        tables.insert(invalidate::requests_table());
    }
    let hidden = catalog::hidden(db, rules, publication).await?;
    let mut actions: Vec<Action> = hidden
        .into_iter()
        .map(|h| Action {
            why: format!("repair: {}", h.problem),
            sql: h.fix.trim_end_matches(';').to_owned(),
        })
        .collect();
    let slot = &config.postgres.slot;
    let loss = catalog::SlotLoss::Refuse;
    actions.extend(
        catalog::plan(db, &tables, publication, slot, loss, None)
            .await?
            .actions,
    );
    // Only here, not in `run`: its role may lack CREATE on the database.
    let (mode, invalidate) = (Mode::Replication, &config.invalidate);
    actions.extend(invalidate::plan(db, mode, false, rules, invalidate, Some(publication)).await?);
    Ok(actions)
}

/// Notify mode: the outbox, its functions and triggers, then `invalidator.invalidate()`.
async fn notify(
    db: &mut impl Sql,
    config: &Config,
    rules: &RuleSet,
) -> Result<Vec<Action>, SetupError> {
    let mut actions = catalog::notify::plan(db, rules).await?;
    let invalidate = &config.invalidate;
    actions.extend(invalidate::plan(db, Mode::Notify, true, rules, invalidate, None).await?);
    Ok(actions)
}
