//! `invalidator run`: HTTP, the Redis delete loop, and the replication connection (or, in notify
//! mode, the outbox reader) with its reconnect loop, until shutdown.

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::{Lsn, TableName};
use crate::check;
use crate::config::{Config, Mode, PRIMARY_TARGET};
use crate::dry_run::{self, NoDeletes};
use crate::pgoutput::Decoder;
use crate::pipeline::{self, CatchUp, Links, SourceEnd, SourceError, WalStream};
use crate::redact::redact;
use crate::redis::{DeleteError, Deleter, DeleterOptions};
use crate::reload::{self, LiveRules, Reloader};
use crate::rules::RuleSet;
use crate::source::history::{self, Seen};
use crate::source::notify::{self, NotifyError};
use crate::source::replication::{
    ReplicationClient, ReplicationError, ReplicationMessage, ReplicationStream,
};
use crate::source::setup::{self, SetupError, SlotReset};
use crate::source::{connect, drift, invalidate};
use crate::targets::{self, Target};
use crate::telemetry::{self, Health};

/// How often a standby asks the server, over an ordinary session, whether the slot (notify mode:
/// the reader lock) is free: a catalog read, so often enough that a takeover follows within
/// about a second, and quiet in both logs.
const STANDBY_POLL: std::time::Duration = std::time::Duration::from_millis(250);

/// Why `run` stopped with a failure.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The HTTP port could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// A permanent Postgres problem (credentials, privileges, missing tables, a bad slot).
    #[error("postgres: {0}")]
    Postgres(String),
    /// A permanent Redis problem (credentials).
    #[error(transparent)]
    Redis(#[from] DeleteError),
    /// Rules name tables or columns the database lacks.
    #[error(transparent)]
    UnknownNames(#[from] check::UnknownNames),
}

impl WalStream for ReplicationStream {
    async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        ReplicationStream::next(self).await
    }

    async fn send_status(&mut self, flush: Lsn) -> Result<(), ReplicationError> {
        ReplicationStream::send_status(self, flush, flush, flush, false).await
    }
}

impl pipeline::Sink for Deleter {
    type Error = DeleteError;

    fn is_transient(error: &DeleteError) -> bool {
        error.is_transient()
    }

    async fn delete(
        &mut self,
        inv: &crate::rules::Invalidation,
    ) -> Result<crate::redis::DeleteStats, DeleteError> {
        Deleter::delete(self, &inv.keys, &inv.patterns).await
    }

    async fn start(
        &mut self,
        inv: &crate::rules::Invalidation,
    ) -> Result<pipeline::Finish<DeleteError>, DeleteError> {
        Ok(Box::pin(
            Deleter::start(self, &inv.keys, &inv.patterns).await?,
        ))
    }

    async fn ping(&mut self) -> Result<(), DeleteError> {
        Deleter::ping(self).await
    }
}

/// Runs the sidecar until `cancel` fires (then finishes the batch in flight, acknowledges it
/// and returns `Ok`), or until a permanent error. With `dry_run`, see [`crate::dry_run`]: it
/// logs what it would delete, deletes nothing, needs no Redis and never moves the real slot.
pub async fn run(
    config: Config,
    rules: Arc<RuleSet>,
    dry_run: bool,
    cancel: CancellationToken,
) -> Result<(), RunError> {
    let metrics = telemetry::install_metrics();
    let health = Health::new();
    let http_cancel = CancellationToken::new();
    let http = match telemetry::bind(config.http_listen).await {
        Ok(listener) => Some(tokio::spawn(telemetry::serve(
            listener,
            metrics,
            health.clone(),
            http_cancel.clone(),
        ))),
        // A dry run is often started beside the real sidecar, with the same configuration.
        Err(e) if dry_run => {
            tracing::warn!(addr = %config.http_listen, error = %e,
                "dry run: cannot listen; continuing without /metrics");
            None
        }
        Err(source) => {
            return Err(RunError::Listen {
                addr: config.http_listen,
                source,
            });
        }
    };
    tracing::info!(
        postgres = %redact(&config.postgres.url),
        redis = %redact(&config.redis_url),
        redis_targets = %config
            .redis_targets
            .iter()
            .map(|t| format!("{}={}", t.name, redact(&t.url)))
            .collect::<Vec<_>>()
            .join(","),
        http = %config.http_listen,
        tables = rules.tables().count(),
        rules = rules.rules().len(),
        dry_run,
        "starting"
    );

    let (queue_tx, queue_rx) = mpsc::channel(pipeline::QUEUE_DEPTH);
    let (confirmed_tx, confirmed_rx) = watch::channel(pipeline::Position::default());
    let deleter_done = CancellationToken::new();
    let delete_loop = {
        let (health, cancel, done) = (health.clone(), cancel.clone(), deleter_done.clone());
        let max = config.pipeline.max_batch_keys;
        let options = DeleterOptions::from_config(&config.redis)?;
        if dry_run {
            tokio::spawn(async move {
                let result =
                    pipeline::run_deleter(NoDeletes, queue_rx, confirmed_tx, health, max, cancel)
                        .await;
                done.cancel();
                result.map_err(|never| match never {})
            })
        } else if !config.redis_targets.is_empty() {
            let named = std::iter::once((PRIMARY_TARGET.to_owned(), config.redis_url.clone()))
                .chain(
                    config
                        .redis_targets
                        .iter()
                        .map(|t| (t.name.clone(), t.url.clone())),
                );
            let targets = named
                .map(|(name, url)| {
                    let (health, cancel, label) = (health.clone(), cancel.clone(), name.clone());
                    let options = options.clone();
                    let connect = async move {
                        connect_redis(&url, &options, &health, Some(&label), &cancel).await
                    };
                    Target {
                        name,
                        connect: Box::pin(connect),
                    }
                })
                .collect();
            tokio::spawn(async move {
                let result =
                    targets::run_targets(targets, queue_rx, confirmed_tx, health, max, cancel)
                        .await;
                done.cancel();
                result
            })
        } else {
            let Some(deleter) =
                connect_redis(&config.redis_url, &options, &health, None, &cancel).await?
            else {
                http_cancel.cancel();
                return Ok(());
            };
            tokio::spawn(async move {
                let result =
                    pipeline::run_deleter(deleter, queue_rx, confirmed_tx, health, max, cancel)
                        .await;
                done.cancel();
                result
            })
        }
    };
    let mut links = Links {
        queue: queue_tx,
        confirmed: confirmed_rx,
        cancel: cancel.clone(),
        last_queued: Lsn(0),
        reported: Lsn(0),
        history: 0,
        server_end: Lsn(0),
        dry_run,
        catch_up: None,
        invalidate_prefixes: config.invalidate.prefixes.clone().into(),
    };
    let (rules_tx, rules_rx) = watch::channel(rules);
    let mut live = LiveRules::watching(rules_rx);
    let reload_cancel = CancellationToken::new();
    let reloader = Reloader {
        path: config.rules_path.clone(),
        postgres: config.postgres.clone(),
        dry_run,
        updates: rules_tx,
    };
    let watcher = tokio::spawn(reload::watch_rules(reloader, reload_cancel.clone()));

    let mut delays = pipeline::backoff();
    // Notify mode: what the outbox source keeps across reconnects.
    let mut progress = notify::Progress::default();
    // Replication mode: the server last streamed from, to tell a new history at a reconnect.
    let mut seen = None;
    let source_result = loop {
        if deleter_done.is_cancelled() {
            break Ok(());
        }
        let mut streamed = false;
        let attempt = match (config.postgres.mode, dry_run) {
            (Mode::Replication, false) => {
                stream_once(
                    &config,
                    &mut live,
                    &mut links,
                    &mut seen,
                    &health,
                    &mut streamed,
                )
                .await
            }
            (Mode::Replication, true) => {
                dry_stream_once(&config, &mut live, &mut links, &health, &mut streamed).await
            }
            (Mode::Notify, false) => {
                outbox_once(
                    &config,
                    &mut live,
                    &mut links,
                    &health,
                    &mut progress,
                    &mut streamed,
                )
                .await
            }
            (Mode::Notify, true) => {
                dry_outbox_once(&config, &mut live, &mut links, &health, &mut streamed).await
            }
        };
        if streamed {
            // The connection worked: the next interruption starts from the shortest delay.
            delays = pipeline::backoff();
        }
        // Whether another instance is active: the next attempt waits for it.
        let mut standby = false;
        match attempt {
            Ok(Streamed::Finished) => break Ok(()),
            Ok(Streamed::Ended) => {
                health.set_source(Some("the server ended the replication stream".to_owned()));
            }
            Err(Failure::Permanent(message)) => {
                break Err(RunError::Postgres(explain_refusal(&config, message).await));
            }
            Err(Failure::UnknownNames(unknown)) => break Err(unknown.into()),
            Err(Failure::Transient {
                reason,
                standby: true,
            }) => {
                health.set_source(Some(format!("standby: {reason}")));
                standby = true;
            }
            Err(Failure::Transient {
                reason,
                standby: false,
            }) => {
                metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "postgres").increment(1);
                // The server by name (its password hidden): an i/o error alone does not say
                // which of several hosts, or which of several databases, failed.
                tracing::warn!(error = %reason, postgres = %redact(&config.postgres.url),
                    mode = ?config.postgres.mode, "postgres source interrupted; reconnecting");
                health.set_source(Some(reason));
            }
        }
        // A standby waits until the holder is gone, then tries at once: a takeover follows
        // within a poll rather than a grown backoff. Other failures back off.
        if standby {
            tokio::select! {
                biased;
                _ = deleter_done.cancelled() => break Ok(()),
                waited = wait_as_standby(&config, &health) => match waited {
                    Ok(()) => continue,
                    Err(Failure::Permanent(message)) => break Err(RunError::Postgres(message)),
                    Err(Failure::UnknownNames(unknown)) => break Err(unknown.into()),
                    Err(Failure::Transient { reason, .. }) => {
                        metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "postgres")
                            .increment(1);
                        tracing::warn!(error = %reason, postgres = %redact(&config.postgres.url),
                            "standby: cannot ask postgres whether the holder is gone; \
                             reconnecting");
                        health.set_source(Some(reason));
                    }
                },
            }
        }
        let delay = delays.next().unwrap_or(std::time::Duration::from_secs(10));
        tokio::select! {
            biased;
            _ = deleter_done.cancelled() => break Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    };
    // The source stopped: make sure the delete loop stops too, then collect its verdict.
    cancel.cancel();
    reload_cancel.cancel();
    let _ = watcher.await;
    let deleted = delete_loop
        .await
        .unwrap_or_else(|e| panic!("delete loop panicked: {e}"));
    http_cancel.cancel();
    if let Some(http) = http {
        let _ = http.await;
    }
    source_result?;
    deleted?;
    tracing::info!("stopped");
    Ok(())
}

/// Waits, as a standby, until no other instance holds the slot (notify mode: the reader lock),
/// asking the server every [`STANDBY_POLL`] over one ordinary session. Logs the holder once,
/// again only when it changes, and once when it is gone.
async fn wait_as_standby(config: &Config, health: &Health) -> Result<(), Failure> {
    let mut db = connect::connect(&config.postgres).await?;
    let slot = &config.postgres.slot;
    let mut logged: Option<String> = None;
    loop {
        let holder = match config.postgres.mode {
            Mode::Replication => setup::slot_holder(&mut db, slot).await?,
            Mode::Notify => notify::reader_lock_holder(&mut db).await?,
        };
        let Some(pid) = holder else {
            match config.postgres.mode {
                Mode::Replication => tracing::info!(slot = %slot, "slot free, taking over"),
                Mode::Notify => tracing::info!("outbox reader lock free, taking over"),
            }
            return Ok(());
        };
        if logged.as_deref() != Some(pid.as_str()) {
            let reason = match config.postgres.mode {
                Mode::Replication => {
                    tracing::info!(slot = %slot, pid = %pid,
                        "standby: slot held by pid {pid}; waiting as a standby");
                    format!("replication slot {slot} is held by pid {pid}")
                }
                Mode::Notify => {
                    tracing::info!(lock = notify::READER_LOCK, pid = %pid,
                        "standby: outbox reader lock held by pid {pid}; waiting as a standby");
                    format!("the outbox reader lock is held by pid {pid}")
                }
            };
            health.set_source(Some(format!("standby: {reason}")));
            logged = Some(pid);
        }
        tokio::time::sleep(STANDBY_POLL).await;
    }
}

/// Connects to Redis (the target named `target`, when there are several), retrying transient
/// failures until it answers; `None` on shutdown.
async fn connect_redis(
    url: &str,
    options: &DeleterOptions,
    health: &Health,
    target: Option<&str>,
    cancel: &CancellationToken,
) -> Result<Option<Deleter>, DeleteError> {
    let mut delays = pipeline::backoff();
    loop {
        match Deleter::connect_with(url, options.clone()).await {
            Ok(deleter) => return Ok(Some(deleter)),
            Err(e) if e.is_transient() => {
                let error = telemetry::chain(&e);
                tracing::warn!(%error, target, "redis unavailable; retrying");
                match target {
                    None => {
                        metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "redis").increment(1);
                        health.set_redis(Some(error));
                    }
                    Some(name) => {
                        metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "redis",
                            "target" => name.to_owned())
                        .increment(1);
                        health.set_target(name, Some(error));
                    }
                }
            }
            Err(e) => return Err(e),
        }
        let delay = delays.next().unwrap_or(std::time::Duration::from_secs(10));
        tokio::select! {
            biased;
            _ = cancel.cancelled() => return Ok(None),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// How one connection's stream ended without an error.
enum Streamed {
    /// Shutdown completed: the delete loop finished and the last ack was sent.
    Finished,
    /// The server closed the stream; reconnect.
    Ended,
}

/// How one connection's stream failed.
enum Failure {
    /// Worth retrying; `standby` when another instance holds the slot.
    Transient { reason: String, standby: bool },
    /// Not worth retrying.
    Permanent(String),
    /// The rules name tables or columns the database lacks: not worth retrying either.
    UnknownNames(check::UnknownNames),
}

impl From<SetupError> for Failure {
    fn from(e: SetupError) -> Self {
        classify(e.is_transient(), telemetry::chain(&e), None)
    }
}

impl From<ReplicationError> for Failure {
    fn from(e: ReplicationError) -> Self {
        classify(e.is_transient(), telemetry::chain(&e), e.code())
    }
}

impl From<connect::ConnectError> for Failure {
    fn from(e: connect::ConnectError) -> Self {
        classify(e.is_transient(), telemetry::chain(&e), None)
    }
}

impl From<NotifyError> for Failure {
    fn from(e: NotifyError) -> Self {
        classify(e.is_transient(), telemetry::chain(&e), None)
    }
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        let code = match &e {
            SourceError::Replication(r) => r.code(),
            SourceError::Ancestry { .. } | SourceError::Decode { .. } => None,
        };
        classify(e.is_transient(), telemetry::chain(&e), code)
    }
}

/// Refuses rules that name a table or a column the database lacks, before anything is set up or
/// streamed: a placeholder whose column does not exist never has a value, so every key it is in
/// would become a pattern deleting its whole namespace on every change. Checked on every
/// connection (a start, a reconnect, a standby's takeover): the schema may have changed since.
async fn check_names(db: &mut impl setup::Sql, rules: &RuleSet) -> Result<(), Failure> {
    let unknown = check::unknown_names(db, rules).await?;
    if unknown.is_empty() {
        return Ok(());
    }
    Err(Failure::UnknownNames(check::UnknownNames(unknown)))
}

/// A permanent failure in replication mode, said in terms of its cause when the server's
/// `output_plugin_libraries` does not allow pgoutput: the server's own answer is a bare
/// "permission denied" (42501) on slot creation or START_REPLICATION. Asked only once the run
/// gives up, over an ordinary connection; when that cannot answer, `message` stands as it is.
async fn explain_refusal(config: &Config, message: String) -> String {
    if config.postgres.mode != Mode::Replication {
        return message;
    }
    let Ok(mut client) = connect::connect(&config.postgres).await else {
        return message;
    };
    match setup::plugin_allowlist(&mut client).await {
        Ok(list) => with_refusal(message, list.as_ref()),
        Err(_) => message,
    }
}

/// `message` led by the refusal of `list` when there is one (see [`explain_refusal`]).
fn with_refusal(message: String, list: Option<&setup::PluginAllowlist>) -> String {
    match list.and_then(setup::PluginAllowlist::refusal) {
        Some(refusal) => format!(
            "{}; fix: {} (the server said: {message})",
            refusal.problem, refusal.fix
        ),
        None => message,
    }
}

/// The one place that turns an error into "retry" or "give up".
fn classify(transient: bool, reason: String, code: Option<&str>) -> Failure {
    if transient {
        Failure::Transient {
            reason,
            // 55006 object_in_use: the slot is streaming to another walsender.
            standby: code == Some("55006"),
        }
    } else {
        Failure::Permanent(reason)
    }
}

/// The safety action after a lost or dropped slot, or a server on a new history: changes were
/// missed and nobody knows which, so every key and pattern the rules can produce is deleted.
/// It is the first transaction of the new history, queued once the temporary slot that will
/// become the new one exists, so whatever the old slot missed is covered and whatever the new
/// one reads is invalidated after it.
async fn flush_everything(rules: &RuleSet, links: &Links) {
    let flush = pipeline::Committed {
        history: links.history,
        // Acknowledges nothing by itself; the new slot's transactions queue behind it.
        end_lsn: Lsn(0),
        commit_time_us: pipeline::unix_micros(),
        inv: rules.everything(),
    };
    // The queue closes only when the delete loop has stopped, and then nothing is acknowledged.
    let _ = links.queue.send(flush).await;
}

/// Replaces the slot after `reset`, so that the flush it calls for survives a crash at any
/// instant: the new slot is made as a temporary one (it vanishes with this session), the flush
/// is queued and confirmed by Redis, and only then is the temporary slot copied into the
/// permanent one (`pg_copy_logical_replication_slot`: same position). Until the copy, the slot
/// is missing, so the next start flushes again. `Ok(false)` on shutdown.
async fn reset_slot(
    client: &mut ReplicationClient,
    config: &Config,
    live: &mut LiveRules,
    links: &mut Links,
    health: &Health,
    server_end: Lsn,
    reset: SlotReset,
) -> Result<bool, Failure> {
    let slot = &config.postgres.slot;
    metrics::counter!(telemetry::SLOT_RESETS_TOTAL, "reason" => reset.label()).increment(1);
    links.new_history(server_end);
    let everything = live.rules().everything();
    let flush = config.postgres.flush_on_slot_loss;
    let reason = format!("replication slot {slot} {}", reset.describe());
    match reset {
        SlotReset::NewHistory(_) => tracing::error!(slot = %slot, reason = reset.label(),
            keys = everything.keys.len(), patterns = everything.patterns.len(), flush,
            "{reason}: the server is on a new history, so changes were missed; forgetting \
             the old positions, replacing the slot and deleting every key the rules can \
             produce (unless postgres.flush_on_slot_loss = false)"),
        SlotReset::Dropped | SlotReset::Lost => tracing::error!(slot = %slot,
            reason = reset.label(), keys = everything.keys.len(),
            patterns = everything.patterns.len(), flush,
            "{reason}: replication slot was lost or dropped, so changes were missed; \
             replacing it and deleting every key the rules can produce (unless \
             postgres.flush_on_slot_loss = false)"),
    }
    let temporary = dry_run::temporary_slot_name(slot, "reset", std::process::id());
    client
        .simple_query(&format!(
            "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
            setup::quote_ident(&temporary)
        ))
        .await?;
    if flush {
        flush_everything(live.rules(), links).await;
        health.set_source(Some(format!(
            "replacing replication slot {slot}: waiting for Redis to confirm the flush"
        )));
        // The flush is the first transaction of the new history: confirmed once the
        // confirmed position has reached that history.
        while links.confirmed.borrow().history < links.history {
            tokio::select! {
                biased;
                _ = links.cancel.cancelled() => return Ok(false),
                changed = links.confirmed.changed() => if changed.is_err() { return Ok(false) },
            }
        }
    } else {
        tracing::error!(slot = %slot, "the missed changes are NOT invalidated \
            (postgres.flush_on_slot_loss = false)");
    }
    client
        .simple_query(&format!(
            "SELECT 1 FROM pg_copy_logical_replication_slot({}, {}, false)",
            setup::quote_literal(&temporary),
            setup::quote_literal(slot)
        ))
        .await?;
    client
        .simple_query(&format!(
            "SELECT pg_drop_replication_slot({})",
            setup::quote_literal(&temporary)
        ))
        .await?;
    tracing::info!(slot = %slot, "replication slot replaced; the flush is confirmed");
    Ok(true)
}

/// Connects, checks that the server is on the history of our positions, repairs the publication
/// and slot, and streams until the connection ends; sets `streamed` once streaming has started.
async fn stream_once(
    config: &Config,
    live: &mut LiveRules,
    links: &mut Links,
    seen: &mut Option<Seen>,
    health: &Health,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    // Between connections is between transactions.
    live.refresh();
    let mut client = connect_replication(config, "invalidator").await?;
    check_names(&mut client, live.rules()).await?;
    // Asked before anything else is done: a standby would otherwise log and be refused at
    // START_REPLICATION, an ERROR in the server's log, on every attempt.
    if let Some(pid) = setup::slot_holder(&mut client, &config.postgres.slot).await? {
        return Err(Failure::Transient {
            reason: format!(
                "replication slot {} is held by pid {pid}",
                config.postgres.slot
            ),
            standby: true,
        });
    }
    let system = client.identify_system().await?;
    tracing::info!(
        system_id = %system.system_id,
        timeline = system.timeline,
        wal = %system.xlog_pos,
        "connected"
    );
    warn_if_stale(&mut client, config, live.rules()).await?;
    // What the publication hides is refused before anything is changed (only its owner can
    // repair that); a rule table replaced (or dropped from it) while no instance ran is
    // unpublished now: added back with the delete of its keys, before the stream starts, so the
    // delete is read after what the table missed. A missing publication is setup's to create.
    let publication = &config.postgres.publication;
    if setup::publication_exists(&mut client, publication).await? {
        drift::repair(&mut client, live.rules(), publication, &links.queue).await?;
    }
    let slot_name = &config.postgres.slot;
    let before = setup::slot_info(&mut client, slot_name).await?;
    let diverged = history::compare(
        &mut client,
        seen.as_ref(),
        links.reported,
        &system,
        before.and_then(|info| info.confirmed_flush),
    )
    .await?;
    let mut tables: BTreeSet<TableName> = live.rules().tables().cloned().collect();
    if invalidate::has_requests(&mut client).await? {
        tables.insert(invalidate::requests_table());
    }
    let plan = setup::plan(
        &mut client,
        &tables,
        &config.postgres.publication,
        slot_name,
        setup::SlotLoss::Recreate,
        diverged,
    )
    .await?;
    setup::apply(&mut client, &plan.actions).await?;
    *seen = Some(Seen::of(&system));
    links.server_end = system.xlog_pos;
    if let Some(reset) = plan.reset {
        let replaced = reset_slot(
            &mut client,
            config,
            live,
            links,
            health,
            system.xlog_pos,
            reset,
        )
        .await?;
        if !replaced {
            return Ok(Streamed::Finished);
        }
    }
    // Never report less than the slot already has: an older position would be ignored at
    // best, and it could move the slot backwards on servers that do not guard against it. The
    // slot's position is one this server has written: one beyond its WAL was replaced above.
    let slot = setup::slot_info(&mut client, slot_name).await?;
    if let Some(flush) = slot.and_then(|info| info.confirmed_flush) {
        links.reported = links.reported.max(flush);
        links.server_end = links.server_end.max(flush);
    }
    links.catch_up = CatchUp::start(links.reported, system.xlog_pos);
    let stream = client
        .start_replication(slot_name, Lsn(0), &config.postgres.publication)
        .await?;
    tracing::info!(slot = %slot_name, from = %links.reported, "streaming");
    stream_until_end(stream, config, live, links, health, streamed, Watch::Repair).await
}

/// Warns when `invalidator.invalidate()` is missing or out of date for these rules and the
/// `[invalidate]` settings (`setup` would change it): callers then get errors for keys the
/// rules now allow, or the functions' grants are not the configured ones. Not an error, since
/// the sidecar enforces its own allow-list whatever the functions say, and `run` never changes
/// them (its role may lack the privileges).
async fn warn_if_stale(
    db: &mut impl setup::Sql,
    config: &Config,
    rules: &crate::rules::RuleSet,
) -> Result<(), SetupError> {
    let publication =
        (config.postgres.mode == Mode::Replication).then_some(config.postgres.publication.as_str());
    let actions = invalidate::plan(
        db,
        config.postgres.mode,
        true,
        rules,
        &config.invalidate,
        publication,
    )
    .await?;
    if !actions.is_empty() {
        let stale: Vec<&str> = actions.iter().map(|a| a.why.as_str()).collect();
        tracing::warn!(setup_would = %stale.join("; "),
            "invalidator.invalidate() is missing or out of date; run `invalidator setup`");
    }
    Ok(())
}

/// Whether the publication is watched while streaming (see [`drift::watch_publication`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Watch {
    /// Yes: repair what may be repaired, stop on the rest.
    Repair,
    /// No: a dry run changes nothing.
    Not,
}

/// Connects a replication session as `[postgres]` says (URL, sslmode, CA).
async fn connect_replication(
    config: &Config,
    application_name: &str,
) -> Result<ReplicationClient, Failure> {
    let (pg, check_host) = connect::parse_url(&config.postgres.url)
        .map_err(|e| Failure::Permanent(format!("invalid postgres url: {e}")))?;
    let ca_file = config.postgres.ca_file.as_deref();
    Ok(ReplicationClient::connect_with_tls(&pg, application_name, ca_file, check_host).await?)
}

/// Runs the source loop on a started stream until it ends, with a second, ordinary connection
/// that learns what partitions belong to and (`watch`) watches the publication; sets
/// `streamed` and keeps readiness in step.
async fn stream_until_end(
    mut stream: ReplicationStream,
    config: &Config,
    live: &mut LiveRules,
    links: &mut Links,
    health: &Health,
    streamed: &mut bool,
    watch: Watch,
) -> Result<Streamed, Failure> {
    let catalog = connect::connect(&config.postgres).await?;
    let recheck = tokio::sync::Notify::new();
    let mut follower = live.follower();
    let queue = links.queue.clone();
    *streamed = true;
    health.set_source(None);
    let mut decoder = Decoder::default();
    let mut ancestry = drift::Catalog::new(&catalog, &recheck);
    let source = pipeline::run_source(
        &mut stream,
        &mut decoder,
        &mut ancestry,
        live,
        links,
        &config.pipeline,
    );
    let watcher = async {
        match watch {
            Watch::Repair => {
                let publication = &config.postgres.publication;
                drift::watch_publication(&catalog, &mut follower, publication, &queue, &recheck)
                    .await
            }
            Watch::Not => std::future::pending().await,
        }
    };
    let outcome = tokio::select! {
        biased;
        outcome = source => outcome,
        error = watcher => {
            health.set_source(Some("reconnecting to postgres".to_owned()));
            return Err(error.into());
        }
    };
    health.set_source(Some("reconnecting to postgres".to_owned()));
    match outcome? {
        SourceEnd::DeleterStopped => {
            stream.finish().await;
            Ok(Streamed::Finished)
        }
        SourceEnd::StreamEnded => Ok(Streamed::Ended),
    }
}

/// [`stream_once`] for a dry run: reads the publication from a temporary slot that starts at
/// the current WAL position and disappears with the connection; creates and changes nothing
/// else, so the real slot stays where it is.
async fn dry_stream_once(
    config: &Config,
    live: &mut LiveRules,
    links: &mut Links,
    health: &Health,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    live.refresh();
    let mut client = connect_replication(config, "invalidator-dry-run").await?;
    check_names(&mut client, live.rules()).await?;
    let publication = &config.postgres.publication;
    let tables = live.rules().tables().cloned().collect();
    let (existed, action) = setup::publication_action(&mut client, &tables, publication).await?;
    if !existed {
        return Err(Failure::Permanent(format!(
            "dry run: publication {publication} does not exist and a dry run creates nothing; \
             run `invalidator setup` first"
        )));
    }
    if let Some(action) = action {
        tracing::warn!(publication = %publication, missing = %action.sql,
            "dry run: the publication lacks tables of the rules; their changes are not shown \
             until `invalidator setup` adds them");
    }
    let slot = dry_run::temporary_slot_name(&config.postgres.slot, "dry_run", std::process::id());
    let command = format!(
        "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput NOEXPORT_SNAPSHOT",
        setup::quote_ident(&slot)
    );
    let rows = client.simple_query(&command).await?;
    let start = rows
        .first()
        .and_then(|row| row.get(1).cloned().flatten())
        .and_then(|lsn| lsn.parse::<Lsn>().ok())
        .unwrap_or(Lsn(0));
    links.reported = links.reported.max(start);
    links.server_end = links.server_end.max(start);
    tracing::info!(
        slot = %slot,
        real_slot = %config.postgres.slot,
        from = %start,
        "dry run: streaming from a temporary slot at the current WAL position; changes \
         committed before it are not shown (a temporary slot cannot see the past); the real \
         slot does not move and nothing is deleted"
    );
    let stream = client.start_replication(&slot, Lsn(0), publication).await?;
    stream_until_end(stream, config, live, links, health, streamed, Watch::Not).await
}

/// Notify mode: connects an ordinary session, checks that `setup` has put the outbox, the
/// functions and the triggers in place (permanent failure if not), takes the reader lock (a
/// standby if another instance holds it), listens, and reads the outbox until the connection
/// fails or shutdown; sets `streamed` once reading.
async fn outbox_once(
    config: &Config,
    live: &mut LiveRules,
    links: &mut Links,
    health: &Health,
    progress: &mut notify::Progress,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    live.refresh();
    let (mut client, mut hints) = notify::connect(&config.postgres).await?;
    check_names(&mut client, live.rules()).await?;
    // `run` applies no DDL in notify mode: what `setup` would do must already be done, or
    // changes could be missed (a trigger that records too few columns) without anyone knowing.
    let mut actions = notify::plan(&mut client, live.rules()).await?;
    // Except the truncate triggers of partitions attached after setup: the reader adds them.
    let repairs = notify::partition_plan(&mut client, live.rules()).await?;
    actions.retain(|action| !repairs.iter().any(|(_, repair)| repair == action));
    warn_if_stale(&mut client, config, live.rules()).await?;
    if !actions.is_empty() {
        let missing: Vec<&str> = actions.iter().map(|a| a.why.as_str()).collect();
        return Err(Failure::Permanent(format!(
            "notify mode is not set up or out of date (setup would: {}); run `invalidator setup`",
            missing.join("; ")
        )));
    }
    // One reader at a time: the others wait as standbys until its session ends.
    if !notify::take_reader_lock(&client).await? {
        return Err(Failure::Transient {
            reason: "another instance reads the outbox".to_owned(),
            standby: true,
        });
    }
    client
        .batch_execute(&format!("LISTEN {}", setup::quote_ident(notify::CHANNEL)))
        .await
        .map_err(NotifyError::from)?;
    notify::prove_listen(&config.postgres, &mut hints).await?;
    *streamed = true;
    health.set_source(None);
    tracing::info!(channel = notify::CHANNEL, "reading the outbox");
    let outcome = notify::stream(&client, &mut hints, live, links, progress).await;
    health.set_source(Some("reconnecting to postgres".to_owned()));
    match outcome? {
        SourceEnd::DeleterStopped => Ok(Streamed::Finished),
        SourceEnd::StreamEnded => Ok(Streamed::Ended),
    }
}

/// [`outbox_once`] for a dry run: no reader lock and no outbox row deleted (see
/// [`notify::dry_stream`]); an out-of-date setup is a warning, since previewing rules before
/// running `setup` is what a dry run is for.
async fn dry_outbox_once(
    config: &Config,
    live: &mut LiveRules,
    links: &mut Links,
    health: &Health,
    streamed: &mut bool,
) -> Result<Streamed, Failure> {
    live.refresh();
    let (mut client, mut hints) = notify::connect(&config.postgres).await?;
    check_names(&mut client, live.rules()).await?;
    let actions = notify::plan(&mut client, live.rules()).await?;
    if !actions.is_empty() {
        let missing: Vec<&str> = actions.iter().map(|a| a.why.as_str()).collect();
        tracing::warn!(setup_would = %missing.join("; "),
            "dry run: notify mode is not set up or out of date for these rules; it shows what \
             the installed triggers let them see");
    }
    client
        .batch_execute(&format!("LISTEN {}", setup::quote_ident(notify::CHANNEL)))
        .await
        .map_err(NotifyError::from)?;
    *streamed = true;
    health.set_source(None);
    let outcome = notify::dry_stream(&client, &mut hints, live, links).await;
    health.set_source(Some("reconnecting to postgres".to_owned()));
    match outcome? {
        // The delete loop deletes nothing here; wait for it so the last line is "stopped".
        SourceEnd::DeleterStopped => Ok(Streamed::Finished),
        SourceEnd::StreamEnded => Ok(Streamed::Ended),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_pgoutput_is_named_instead_of_a_bare_permission_error() {
        let bare = "postgres error 42501: permission denied".to_owned();
        // No such setting (PostgreSQL releases before it), or pgoutput listed: unchanged.
        assert_eq!(with_refusal(bare.clone(), None), bare);
        let allowed = setup::PluginAllowlist {
            setting: "pgoutput, test_decoding".to_owned(),
            context: "sighup".to_owned(),
            source: "configuration file".to_owned(),
            database: "d".to_owned(),
            role: "r".to_owned(),
        };
        assert_eq!(with_refusal(bare.clone(), Some(&allowed)), bare);
        let refused = setup::PluginAllowlist {
            setting: "test_decoding".to_owned(),
            context: "sighup".to_owned(),
            source: "configuration file".to_owned(),
            database: "d".to_owned(),
            role: "r".to_owned(),
        };
        assert_eq!(
            with_refusal(bare.clone(), Some(&refused)),
            "output_plugin_libraries = 'test_decoding' does not list pgoutput, so this server \
             refuses to load it for logical replication (error 42501): `run` cannot create its \
             slot or stream; fix: as a superuser: ALTER SYSTEM SET output_plugin_libraries = \
             'test_decoding', 'pgoutput'; then SELECT pg_reload_conf(); (the server said: postgres \
             error 42501: permission denied)"
        );
    }
}
