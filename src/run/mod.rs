//! `invalidator run`: HTTP, the Redis delete loop, and the replication connection (or, in notify
//! mode, the outbox reader) with its reconnect loop, until shutdown.

mod library;
mod outbox;
mod replication;

use outbox::outbox_once;
use replication::stream_once;

use std::sync::Arc;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::change::Lsn;
use crate::check;
use crate::config::{Config, Mode, PRIMARY_TARGET};
use crate::dry_run::LogDeletes;
use crate::error::{Classify, Verdict};
use crate::pipeline::{self, Links};
use crate::redact::redact;
use crate::redis::{DeleteError, Deleter, DeleterOptions, KeyIndexOptions};
use crate::reload::{self, LiveRules, Reloader};
use crate::rules::RuleSet;
use crate::source::history::Seen;
use crate::source::notify::{self, NotifyError};
use crate::source::replication::{ReplicationError, SourceError, WalProgress};
use crate::source::setup::{self, SetupError};
use crate::source::visibility::Gate;
use crate::source::{connect, invalidate};
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

/// Runs the sidecar until `shutdown` fires (then finishes the batch in flight, acknowledges it
/// and returns `Ok`), or until a permanent error. With `dry_run`, see [`crate::dry_run`]: it
/// logs what it would delete, deletes nothing, needs no Redis and never moves the real slot.
///
/// `shutdown` is the root of the run's one tree of tokens: HTTP stops on its child, and the
/// pipeline (source loop and delete loop) on another, which also fires when the delete loop
/// ends or the source gives up, so one side never runs on without the other; the rules
/// watcher is the pipeline's child.
pub async fn run(
    config: Config,
    rules: Arc<RuleSet>,
    dry_run: bool,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let health = Health::new();
    let http_stop = shutdown.child_token();
    let pipeline_stop = shutdown.child_token();
    let http = serve_http(&config, &health, dry_run, &http_stop).await?;
    log_start(&config, &rules, dry_run);
    let (queue_tx, queue_rx) = mpsc::channel(pipeline::QUEUE_DEPTH);
    // Deletes wait until their transactions are visible to new snapshots; the outbox is read
    // through a snapshot, so notify mode's already are, and a dry run deletes nothing.
    let gate =
        config.postgres.mode == Mode::Replication && !dry_run && config.pipeline.wait_visible;
    let queue_rx = if gate {
        let visible = Gate::new(config.postgres.clone());
        pipeline::gated(queue_rx, visible, pipeline_stop.child_token())
    } else {
        queue_rx
    };
    let (confirmed_tx, confirmed_rx) = watch::channel(pipeline::Position::default());
    let delete_loop = spawn_delete_loop(
        &config,
        &rules,
        &health,
        dry_run,
        &pipeline_stop,
        queue_rx,
        confirmed_tx,
    );
    let Some(delete_loop) = delete_loop.await? else {
        http_stop.cancel();
        return Ok(());
    };
    // A dry run changes nothing in Redis, the library included.
    let library = if dry_run {
        None
    } else {
        let urls = config.redis_urls().map(str::to_owned).collect();
        let options = DeleterOptions::from_config(&config.redis)?;
        let stop = pipeline_stop.child_token();
        Some(tokio::spawn(library::keep_loaded(urls, options, stop)))
    };
    let links = Links {
        queue: queue_tx,
        confirmed: confirmed_rx,
        cancel: pipeline_stop.clone(),
        last_queued: Lsn(0),
        history: 0,
        invalidate_prefixes: config.invalidate.prefixes.clone().into(),
    };
    let (rules_tx, rules_rx) = watch::channel(rules);
    let reloader = Reloader {
        path: config.rules_path.clone(),
        postgres: config.postgres.clone(),
        dry_run,
        updates: rules_tx,
    };
    let watcher = tokio::spawn(reload::watch_rules(reloader, pipeline_stop.child_token()));
    let mut session = Session {
        config: &config,
        live: LiveRules::watching(rules_rx),
        links,
        health: health.clone(),
        wal: WalProgress::default(),
        seen: None,
        progress: notify::Progress::default(),
        dry_run,
    };
    let source_result = read_until_stopped(&mut session, &pipeline_stop).await;
    // The source stopped: make sure the delete loop stops too, then collect its verdict.
    pipeline_stop.cancel();
    let _ = watcher.await;
    if let Some(library) = library {
        let _ = library.await;
    }
    let deleted = delete_loop
        .await
        .unwrap_or_else(|e| panic!("delete loop panicked: {e}"));
    http_stop.cancel();
    if let Some(http) = http {
        let _ = http.await;
    }
    source_result?;
    deleted?;
    tracing::info!("stopped");
    Ok(())
}

/// The first line of a run: where it reads and deletes (passwords hidden), and what it watches.
fn log_start(config: &Config, rules: &RuleSet, dry_run: bool) {
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
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `cancel` fires; `None` when a dry run
/// cannot listen (it is often started beside the real sidecar, with the same configuration).
async fn serve_http(
    config: &Config,
    health: &Arc<Health>,
    dry_run: bool,
    cancel: &CancellationToken,
) -> Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>, RunError> {
    let metrics = telemetry::install_metrics();
    match telemetry::bind(config.http_listen).await {
        Ok(listener) => Ok(Some(tokio::spawn(telemetry::serve(
            listener,
            metrics,
            health.clone(),
            cancel.clone(),
        )))),
        Err(e) if dry_run => {
            tracing::warn!(addr = %config.http_listen, error = %e,
                "dry run: cannot listen; continuing without /metrics");
            Ok(None)
        }
        Err(source) => Err(RunError::Listen {
            addr: config.http_listen,
            source,
        }),
    }
}

/// The delete loop's task, with its sink picked: the dry run's log, several Redis targets, or
/// the one Redis (connected first; `None` on shutdown before it answered). It stops when `stop`
/// fires, and fires it when it ends, whatever the reason.
async fn spawn_delete_loop(
    config: &Config,
    rules: &RuleSet,
    health: &Arc<Health>,
    dry_run: bool,
    stop: &CancellationToken,
    queue: mpsc::Receiver<pipeline::Committed>,
    confirmed: watch::Sender<pipeline::Position>,
) -> Result<Option<DeleteLoop>, RunError> {
    let health = health.clone();
    let max = pipeline::Limits::of(&config.pipeline);
    let mut options = DeleterOptions::from_config(&config.redis)?;
    // Fixed at start: patterns of rules reloaded later with new prefixes are walked.
    if config.redis.key_index {
        options.key_index = Some(KeyIndexOptions::new(
            rules.pattern_prefixes(),
            config.redis.key_index_max_keys,
        ));
    }
    let cancel = stop.clone();
    let task = if dry_run {
        let deleted = pipeline::run_deleter(LogDeletes, queue, confirmed, health, max, cancel);
        stopping(stop, async move {
            deleted.await.map_err(|never| match never {})
        })
    } else if !config.redis_targets.is_empty() {
        let named = std::iter::once((PRIMARY_TARGET.to_owned(), config.redis_url.clone())).chain(
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
        let deleted = targets::run_targets(targets, queue, confirmed, health, max, cancel);
        stopping(stop, deleted)
    } else {
        let Some(deleter) =
            connect_redis(&config.redis_url, &options, &health, None, &cancel).await?
        else {
            return Ok(None);
        };
        stopping(
            stop,
            pipeline::run_deleter(deleter, queue, confirmed, health, max, cancel),
        )
    };
    Ok(Some(task))
}

/// Spawns the delete loop `deleting`, firing `stop` once it has ended.
fn stopping(
    stop: &CancellationToken,
    deleting: impl Future<Output = Result<(), DeleteError>> + Send + 'static,
) -> DeleteLoop {
    let stop = stop.clone();
    tokio::spawn(async move {
        let result = deleting.await;
        stop.cancel();
        result
    })
}

/// The delete loop's task: its verdict once it stops.
type DeleteLoop = tokio::task::JoinHandle<Result<(), DeleteError>>;

/// Reads from the source of the configured mode, reconnecting with backoff (a standby waits for
/// the holder instead), until `stop` fires (shutdown, or the delete loop ended) or a permanent
/// failure.
async fn read_until_stopped(
    session: &mut Session<'_>,
    stop: &CancellationToken,
) -> Result<(), RunError> {
    let (config, health) = (session.config, session.health.clone());
    let mut delays = pipeline::backoff();
    loop {
        if stop.is_cancelled() {
            return Ok(());
        }
        let mut streamed = false;
        let attempt = match config.postgres.mode {
            Mode::Replication => stream_once(session, &mut streamed).await,
            Mode::Notify => outbox_once(session, &mut streamed).await,
        };
        if streamed {
            // The connection worked: the next interruption starts from the shortest delay.
            delays = pipeline::backoff();
        }
        // A standby waits until the holder is gone, then tries at once: a takeover follows
        // within a poll rather than a grown backoff. Other failures back off.
        let next = after_attempt(attempt, config, &health).await;
        if let Next::Stop(result) = next {
            return result;
        }
        if let Next::Standby = next {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return Ok(()),
                waited = wait_as_standby(config, &health) => match waited {
                    Ok(()) => continue,
                    Err(failure) if failure.verdict() == Verdict::Stop => {
                        return Err(failure.stopped());
                    }
                    Err(failure) => {
                        let reason = telemetry::chain(&failure);
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
            _ = stop.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// What the reconnect loop does after an attempt.
enum Next {
    /// Stop the run with this verdict.
    Stop(Result<(), RunError>),
    /// Another instance is active: wait for it to go.
    Standby,
    /// Reconnect after a backoff.
    Reconnect,
}

/// Decides what the end of one attempt means for the run: the one place a failure turns into
/// stopping, waiting as a standby or reconnecting.
async fn after_attempt(
    attempt: Result<Streamed, Failure>,
    config: &Config,
    health: &Health,
) -> Next {
    match attempt {
        Ok(Streamed::Finished) => Next::Stop(Ok(())),
        Ok(Streamed::Ended) => {
            health.set_source(Some("the server ended the replication stream".to_owned()));
            Next::Reconnect
        }
        Err(failure) => match failure.verdict() {
            Verdict::Stop => Next::Stop(Err(explain_refusal(config, failure.stopped()).await)),
            Verdict::Standby => {
                let reason = telemetry::chain(&failure);
                health.set_source(Some(format!("standby: {reason}")));
                Next::Standby
            }
            Verdict::Reconnect => {
                let reason = telemetry::chain(&failure);
                metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "postgres").increment(1);
                // The server by name (its password hidden): an i/o error alone does not say which
                // of several hosts, or which of several databases, failed.
                tracing::warn!(error = %reason, postgres = %redact(&config.postgres.url),
                    mode = ?config.postgres.mode, "postgres source interrupted; reconnecting");
                health.set_source(Some(reason));
                Next::Reconnect
            }
        },
    }
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

/// What a run keeps across connections.
struct Session<'a> {
    /// The configuration.
    config: &'a Config,
    /// The rules in effect for the source loop.
    live: LiveRules,
    /// The source loop's side of the queue to the delete loop.
    links: Links,
    /// Readiness.
    health: Arc<Health>,
    /// Replication mode: what was reported to the server.
    wal: WalProgress,
    /// Replication mode: the server last streamed from, to tell a new history at a reconnect.
    seen: Option<Seen>,
    /// Notify mode: the rounds of outbox rows still in flight.
    progress: notify::Progress,
    /// `run --dry-run`: read without changing anything (a temporary slot, no outbox row deleted,
    /// no publication repaired).
    dry_run: bool,
}

/// How one connection's stream ended without an error.
enum Streamed {
    /// Shutdown completed: the delete loop finished and the last ack was sent.
    Finished,
    /// The server closed the stream; reconnect.
    Ended,
}

/// How one connection's attempt failed, as the error it was: [`after_attempt`] decides from its
/// [`Verdict`].
#[derive(Debug, thiserror::Error)]
enum Failure {
    /// Setup or a catalog query.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// The replication connection.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// An ordinary connection could not be opened.
    #[error(transparent)]
    Connect(#[from] connect::ConnectError),
    /// The outbox reader.
    #[error(transparent)]
    Notify(#[from] NotifyError),
    /// The replication source.
    #[error(transparent)]
    Source(#[from] SourceError),
    /// The rules name tables or columns the database lacks.
    #[error(transparent)]
    UnknownNames(#[from] check::UnknownNames),
    /// Another instance holds the slot (notify mode: the reader lock).
    #[error("{0}")]
    Held(String),
    /// `postgres.url` does not parse.
    #[error("invalid postgres url: {0}")]
    Url(tokio_postgres::Error),
    /// Notify mode: `run` applies no DDL, and what `setup` would do is not done.
    #[error(
        "notify mode is not set up or out of date (setup would: {}); run `invalidator setup`",
        .0.join("; ")
    )]
    NotSetUp(Vec<String>),
    /// A dry run found no publication to read, and creates nothing.
    #[error(
        "dry run: publication {0} does not exist and a dry run creates nothing; run \
         `invalidator setup` first"
    )]
    NoPublication(String),
}

/// The errors it carries say their own verdict; run's own conditions are said here.
impl Classify for Failure {
    fn verdict(&self) -> Verdict {
        match self {
            Failure::Setup(e) => e.verdict(),
            Failure::Replication(e) => e.verdict(),
            Failure::Connect(e) => e.verdict(),
            Failure::Notify(e) => e.verdict(),
            Failure::Source(e) => e.verdict(),
            Failure::Held(_) => Verdict::Standby,
            Failure::UnknownNames(_)
            | Failure::Url(_)
            | Failure::NotSetUp(_)
            | Failure::NoPublication(_) => Verdict::Stop,
        }
    }
}

impl Failure {
    /// The run's error once this failure stops it.
    fn stopped(self) -> RunError {
        match self {
            Failure::UnknownNames(unknown) => unknown.into(),
            other => RunError::Postgres(telemetry::chain(&other)),
        }
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
    Err(check::UnknownNames(unknown).into())
}

/// A failure that stops the run in replication mode, said in terms of its cause when the
/// server's `output_plugin_libraries` does not allow pgoutput: the server's own answer is a bare
/// "permission denied" (42501) on slot creation or START_REPLICATION. Asked only once the run
/// gives up, over an ordinary connection; when that cannot answer, the error stands as it is.
async fn explain_refusal(config: &Config, error: RunError) -> RunError {
    let RunError::Postgres(message) = error else {
        return error;
    };
    if config.postgres.mode != Mode::Replication {
        return RunError::Postgres(message);
    }
    let Ok(mut client) = connect::connect(&config.postgres).await else {
        return RunError::Postgres(message);
    };
    RunError::Postgres(match setup::plugin_allowlist(&mut client).await {
        Ok(list) => with_refusal(message, list.as_ref()),
        Err(_) => message,
    })
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
