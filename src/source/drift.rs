//! What can change in the catalog under a running replication stream, on a second, ordinary
//! connection: which rule tables a partition belongs to (partitions attached while running
//! included), and whether the publication still publishes every rule table, by its current
//! oid, without hiding what the rules read.
//!
//! A table replaced by rename (create the new one, rename the old away, rename the new in)
//! keeps the old table's place in the publication: the new one's changes are never sent, and
//! the stream cannot say so, since a table outside the publication sends nothing. So the
//! publication is checked every [`CHECK_EVERY`], and at once when a relation the stream
//! announced before comes again under another name (what the renamed-away table does on its
//! next change). A rule table found unpublished (or `invalidator.requests`, where
//! `invalidator.invalidate()` writes) is added back, and every key its rules can
//! produce is deleted after the changes it missed, which committed before the repair. That
//! delete is asked for in the WAL, by a row of `invalidator.requests` written in the repair's
//! own transaction: the stream reads it in order, and it is acknowledged only once Redis
//! confirmed it, so a crash in between reads it again. A role that cannot write that table
//! gets the delete queued after everything read before instead, which a crash loses.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, mpsc, watch};

use crate::change::TableName;
use crate::rules::{Invalidation, RuleSet};
use crate::source::invalidate;
use crate::source::replication::Ancestry;
use crate::source::setup::{self, SetupError, Sql};
use crate::telemetry;

/// How often the publication is checked while streaming.
pub const CHECK_EVERY: Duration = Duration::from_secs(5);

/// Answers [`Ancestry`] from the catalog, and asks for a publication check when a relation
/// comes back under a new name.
pub struct Catalog<'a> {
    /// The ordinary connection.
    client: &'a tokio_postgres::Client,
    /// The name each relation was last announced under, by oid.
    announced: HashMap<u32, TableName>,
    /// Wakes [`watch_publication`].
    recheck: &'a Notify,
}

impl<'a> Catalog<'a> {
    /// Reads the catalog on `client`; a rename wakes whoever waits on `recheck`.
    pub fn new(client: &'a tokio_postgres::Client, recheck: &'a Notify) -> Catalog<'a> {
        Catalog {
            client,
            announced: HashMap::new(),
            recheck,
        }
    }
}

impl Ancestry for Catalog<'_> {
    /// From today's catalog: for a backlog read after a partition was detached, its older
    /// changes then count as the detached table's only.
    async fn ancestors(
        &mut self,
        relation_id: u32,
        table: &TableName,
    ) -> Result<Vec<TableName>, SetupError> {
        if let Some(before) = self.announced.insert(relation_id, table.clone())
            && before != *table
        {
            tracing::info!(relation_id, from = %before, to = %table,
                "a streamed table was renamed; checking the publication");
            self.recheck.notify_one();
        }
        let mut db = self.client;
        let rows = Sql::query(
            &mut db,
            &format!(
                "SELECT n.nspname, c.relname FROM pg_partition_ancestors({relation_id}::oid::regclass) a \
                 JOIN pg_class c ON c.oid = a.relid JOIN pg_namespace n ON n.oid = c.relnamespace \
                 WHERE a.relid <> {relation_id}::oid"
            ),
        )
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|row| match row.as_slice() {
                [Some(schema), Some(name)] => Some(TableName::new(schema, name)),
                _ => None,
            })
            .collect())
    }
}

/// Checks the publication every [`CHECK_EVERY`] and whenever `recheck` fires; returns only
/// with an error. A rule table it does not publish is added back and its keys flushed, through
/// the WAL or else through `flushes`, to be queued after what was read (logged at error, counted in
/// [`telemetry::PUBLICATION_REPAIRS_TOTAL`]); what it hides otherwise ([`setup::hidden`]) is
/// returned as [`SetupError::Hidden`], which stops `run`.
pub async fn watch_publication(
    client: &tokio_postgres::Client,
    rules: &mut watch::Receiver<Arc<RuleSet>>,
    publication: &str,
    flushes: &mpsc::Sender<Invalidation>,
    recheck: &Notify,
) -> SetupError {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now, and the connect just checked.
    tick.tick().await;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = recheck.notified() => {}
        }
        let rules = rules.borrow_and_update().clone();
        let mut db = client;
        match repair(&mut db, &rules, publication).await {
            // The receiver closes only when streaming stops, and then nothing is acknowledged.
            Ok(Some(flush)) => {
                let _ = flushes.send(flush).await;
            }
            Ok(None) => {}
            Err(e) => return e,
        }
    }
}

/// One check of [`watch_publication`], also made by `run` at every connect before it streams
/// (a table replaced while no instance ran is found there): rule tables the publication does
/// not publish are added back, their keys deleted: through the WAL, or else by the flush this
/// returns, which the caller queues after what was read before.
pub async fn repair(
    db: &mut impl Sql,
    rules: &RuleSet,
    publication: &str,
) -> Result<Option<Invalidation>, SetupError> {
    let hidden = setup::hidden(db, rules, publication).await?;
    if !hidden.is_empty() {
        return Err(SetupError::Hidden(hidden));
    }
    let mut tables: BTreeSet<TableName> = rules.tables().cloned().collect();
    // invalidator.invalidate()'s requests belong in the publication too: outside it, manual
    // invalidations are never seen.
    tables.insert(invalidate::requests_table());
    // A rule table dropped has no changes to miss; once created again, it is unpublished.
    let missing = setup::missing_tables(db, &tables).await?;
    let present: BTreeSet<TableName> = tables
        .into_iter()
        .filter(|t| !missing.contains(t))
        .collect();
    let unpublished = setup::unpublished(db, &present, publication).await?;
    if unpublished.is_empty() {
        return Ok(None);
    }
    let (_, action) = setup::publication_action(db, &present, publication).await?;
    let requests = invalidate::requests_table();
    let flushed = unpublished.iter().filter(|t| rules.has_table(t));
    let queued = match publish_with_flush(db, action.clone(), flushed).await? {
        Some(combined) => {
            setup::apply(db, &[combined]).await?;
            // A request written in the transaction that publishes its own table (or creates
            // the publication) is not counted on to be read: those are queued as well.
            unpublished.contains(&requests)
        }
        None => {
            setup::apply(db, action.as_slice()).await?;
            tracing::warn!(
                publication,
                "not crash-safe: this role cannot write invalidator.requests (or it is \
                 missing or out of date: run `invalidator setup`), so the delete of the keys \
                 of the tables added back is only queued in memory, and a crash before Redis \
                 confirms it leaves them stale"
            );
            true
        }
    };
    let mut flush = Invalidation::default();
    for table in &unpublished {
        flush.merge(rules.everything_for(table));
    }
    let names = unpublished
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    if unpublished.contains(&invalidate::requests_table()) {
        tracing::error!(
            publication,
            "publication did not publish invalidator.requests: added it back; calls of \
             invalidator.invalidate() committed until now were not seen"
        );
    }
    tracing::error!(publication, tables = %names, keys = flush.keys.len(),
        patterns = flush.patterns.len(),
        "publication did not publish these tables of the rules (replaced by rename, removed \
         from it, or new in the rules since the last run): added them back; their changes \
         until now were missed, so every key their rules can produce is deleted");
    metrics::counter!(telemetry::PUBLICATION_REPAIRS_TOTAL).increment(unpublished.len() as u64);
    Ok(queued.then_some(flush))
}

/// One statement that runs `publish` (the `ALTER PUBLICATION` or `CREATE PUBLICATION` to run,
/// if any) and, in the same transaction, asks through the WAL for every key the rules of
/// `flushed` can produce to be deleted; `None` when this role cannot write
/// `invalidator.requests`, and the caller must flush another way.
///
/// One simple query is one transaction: the request commits with the publication's change or
/// not at all, and is read from the WAL after every change committed before it, so a
/// crash before Redis confirmed the delete reads the request again. Used wherever a table
/// starts being streamed whose keys may have been cached without being invalidated: one
/// added back ([`repair`]), and one a hot reload of the rules gained.
pub async fn publish_with_flush<'t>(
    db: &mut impl Sql,
    publish: Option<setup::Action>,
    flushed: impl IntoIterator<Item = &'t TableName>,
) -> Result<Option<setup::Action>, SetupError> {
    if !invalidate::can_request_repairs(db).await? {
        return Ok(None);
    }
    let requests = invalidate::repair_requests(flushed);
    Ok(Some(match publish {
        Some(mut action) => {
            action.sql.push_str(&requests);
            action
        }
        None => setup::Action {
            why: "delete the keys of tables that start being streamed".to_owned(),
            sql: requests.trim_start_matches("; ").to_owned(),
        },
    }))
}
