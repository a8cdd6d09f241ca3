//! Metric names, the readiness state, and the HTTP server for `/metrics`, `/healthz`, `/readyz`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use crate::change::Lsn;

/// Row changes read from the source, labelled `table` and `op`.
pub const CHANGES_TOTAL: &str = "invalidator_changes_total";
/// Keys Redis reported as deleted by `UNLINK`.
pub const KEYS_DELETED_TOTAL: &str = "invalidator_keys_deleted_total";
/// Patterns resolved with `SCAN`.
pub const PATTERNS_TOTAL: &str = "invalidator_patterns_total";
/// `SCAN` commands sent: the cost of resolving patterns (a pass over N keys takes N/1000).
pub const SCAN_CALLS_TOTAL: &str = "invalidator_scan_calls_total";
/// Errors, labelled `kind` (`redis`, `postgres`, `decode`).
pub const ERRORS_TOTAL: &str = "invalidator_errors_total";
/// Counter of manual invalidations ignored, by `reason` (see
/// [`crate::source::invalidate::Ignored`]): a logical decoding message, which any role can
/// emit; a key outside the allowed prefixes; a pattern without a literal prefix; a publication
/// repair's request for a table without rules.
pub const IGNORED_INVALIDATIONS_TOTAL: &str = "invalidator_ignored_invalidations_total";
/// The `kind` labels of [`ERRORS_TOTAL`]: Postgres connections lost, Redis requests or
/// connections failed, WAL messages that did not decode. Each series exists from the start.
pub const ERROR_KINDS: &[&str] = &["postgres", "redis", "decode"];
/// Times the replication slot was replaced and every rule's keys were deleted, labelled `reason`
/// (`slot_dropped`, `slot_lost`, or a new history: `other_system`, `other_timeline`,
/// `wal_behind`, `slot_ahead`).
pub const SLOT_RESETS_TOTAL: &str = "invalidator_slot_resets_total";
/// Rule tables found missing from the publication while streaming and added back (their keys
/// flushed).
pub const PUBLICATION_REPAIRS_TOTAL: &str = "invalidator_publication_repairs_total";
/// Transactions whose invalidations Redis confirmed.
pub const TRANSACTIONS_TOTAL: &str = "invalidator_transactions_total";
/// Committed transactions that held more distinct keys than `pipeline.max_transaction_keys` and
/// were invalidated by every pattern of their tables' rules instead.
pub const TRANSACTION_FALLBACKS_TOTAL: &str = "invalidator_transaction_fallbacks_total";
/// Seconds from the commit timestamp in the WAL to the confirmed delete.
pub const COMMIT_TO_DELETE_SECONDS: &str = "invalidator_commit_to_delete_seconds";
/// The flush LSN last acknowledged to Postgres, as a number.
pub const CONFIRMED_LSN: &str = "invalidator_confirmed_lsn";
/// Bytes of WAL the server has that are not yet acknowledged.
pub const REPLICATION_LAG_BYTES: &str = "invalidator_replication_lag_bytes";

/// Seconds the cache may be behind the database: now minus the commit time of the oldest
/// transaction that has been read but whose deletes Redis has not confirmed yet; 0 when every
/// transaction read is confirmed. Computed when `/metrics` is scraped. WAL not read yet is in
/// [`REPLICATION_LAG_BYTES`].
pub const REPLICATION_LAG_SECONDS: &str = "invalidator_replication_lag_seconds";
/// Keys plus patterns per Redis batch (a histogram; batches merge transactions under a backlog).
pub const BATCH_KEYS: &str = "invalidator_batch_keys";
/// Changes that fired a rule, labelled `rule` (its `name`, or the loader's `<file>#<index>`).
pub const RULE_FIRED_TOTAL: &str = "invalidator_rule_fired_total";
/// Literal keys a rule rendered, labelled `rule`, before de-duplication within a transaction.
pub const RULE_KEYS_TOTAL: &str = "invalidator_rule_keys_total";
/// Patterns a rule rendered, labelled `rule`, before de-duplication within a transaction.
pub const RULE_PATTERNS_TOTAL: &str = "invalidator_rule_patterns_total";
/// Rules reloads that took effect (a file change or SIGHUP).
pub const RULES_RELOADS_TOTAL: &str = "invalidator_rules_reloads_total";
/// Rules reloads rejected (broken rules, or the database could not take them); the running
/// rules stayed in effect.
pub const RULES_RELOAD_ERRORS_TOTAL: &str = "invalidator_rules_reload_errors_total";

/// With `[redis] key_index`: keys the live key index holds (0 while it is not ready).
pub const KEY_INDEX_KEYS: &str = "invalidator_key_index_keys";
/// With `[redis] key_index`: patterns resolved from the key index instead of a SCAN walk.
pub const KEY_INDEX_RESOLUTIONS_TOTAL: &str = "invalidator_key_index_resolutions_total";
/// With `[redis] key_index`: patterns resolved by the SCAN walk instead of the key index,
/// labelled `reason` ([`crate::redis::KEY_INDEX_FALLBACKS`]: `building`, `unavailable`, `full`,
/// `uncovered`, `lost`).
pub const KEY_INDEX_FALLBACKS_TOTAL: &str = "invalidator_key_index_fallbacks_total";

/// Replication mode: batches whose deletes waited for a new snapshot to see their transactions
/// (the first snapshot did not yet).
pub const VISIBILITY_WAITS_TOTAL: &str = "invalidator_visibility_waits_total";
/// Replication mode: batches let through unseen after the longest wait (Postgres did not
/// answer, or a transaction stayed invisible): their readers may cache an old row.
pub const VISIBILITY_TIMEOUTS_TOTAL: &str = "invalidator_visibility_timeouts_total";

/// `GET /wait` requests waiting now (at most [`MAX_WAITERS`]).
pub const WAIT_REQUESTS: &str = "invalidator_wait_requests";

/// Notify mode: rows waiting in the outbox, measured once a second.
pub const OUTBOX_ROWS: &str = "invalidator_outbox_rows";
/// Notify mode: age of the oldest row waiting in the outbox (0 when it is empty).
pub const OUTBOX_OLDEST_SECONDS: &str = "invalidator_outbox_oldest_seconds";

/// An error with its causes, `outer: inner: innermost`, for logs, `/readyz` and the CLI: our
/// errors keep the cause in `source()` rather than repeat it in their own message. A cause whose
/// text the message already ends with (some libraries print their cause too) is not repeated.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(e) = cause {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        cause = e.source();
    }
    text
}

/// Installs the process-wide Prometheus recorder once and returns its handle.
pub fn install_metrics() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full(COMMIT_TO_DELETE_SECONDS.to_owned()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                        10.0, 30.0, 60.0,
                    ],
                )
                .expect("bucket list is not empty")
                .set_buckets_for_metric(
                    Matcher::Full(BATCH_KEYS.to_owned()),
                    &[
                        1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0,
                        5000.0, 10000.0, 20000.0, 50000.0, 100000.0,
                    ],
                )
                .expect("bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder can only be present in tests that install their own; the
            // handle still renders what this one records.
            let _ = metrics::set_global_recorder(recorder);
            // Series that exist from the start, so dashboards and alerts see zeros, not gaps.
            metrics::counter!(KEYS_DELETED_TOTAL).absolute(0);
            metrics::counter!(PATTERNS_TOTAL).absolute(0);
            metrics::counter!(SCAN_CALLS_TOTAL).absolute(0);
            metrics::counter!(TRANSACTIONS_TOTAL).absolute(0);
            metrics::counter!(TRANSACTION_FALLBACKS_TOTAL).absolute(0);
            for reset in crate::source::setup::SlotReset::ALL {
                metrics::counter!(SLOT_RESETS_TOTAL, "reason" => reset.label()).absolute(0);
            }
            for kind in ERROR_KINDS {
                metrics::counter!(ERRORS_TOTAL, "kind" => *kind).absolute(0);
            }
            metrics::counter!(PUBLICATION_REPAIRS_TOTAL).absolute(0);
            metrics::counter!(VISIBILITY_WAITS_TOTAL).absolute(0);
            metrics::counter!(VISIBILITY_TIMEOUTS_TOTAL).absolute(0);
            for ignored in crate::source::invalidate::Ignored::ALL {
                metrics::counter!(IGNORED_INVALIDATIONS_TOTAL, "reason" => ignored.label())
                    .absolute(0);
            }
            metrics::gauge!(CONFIRMED_LSN).set(0.0);
            metrics::gauge!(REPLICATION_LAG_BYTES).set(0.0);
            metrics::gauge!(REPLICATION_LAG_SECONDS).set(0.0);
            metrics::counter!(RULES_RELOADS_TOTAL).absolute(0);
            metrics::counter!(RULES_RELOAD_ERRORS_TOTAL).absolute(0);
            metrics::gauge!(OUTBOX_ROWS).set(0.0);
            metrics::gauge!(OUTBOX_OLDEST_SECONDS).set(0.0);
            metrics::gauge!(WAIT_REQUESTS).set(0.0);
            handle
        })
        .clone()
}

/// What `/readyz` reports: ready only while changes stream and Redis answers; and, for
/// [`REPLICATION_LAG_SECONDS`], the commit time of the oldest unconfirmed transaction.
#[derive(Debug, Default)]
pub struct Health {
    state: Mutex<HealthState>,
    /// The WAL position up to which every change is invalidated, for `/wait`.
    acknowledged: Acknowledged,
    /// Commit time (microseconds since the Unix epoch) of the oldest transaction read and not
    /// yet confirmed; 0 when there is none. Written by the delete loop once per batch.
    oldest_unconfirmed_us: AtomicI64,
}

/// The position of [`Health::acknowledge`], watched by `/wait`.
#[derive(Debug)]
struct Acknowledged(tokio::sync::watch::Sender<Lsn>);

impl Default for Acknowledged {
    fn default() -> Self {
        Acknowledged(tokio::sync::watch::Sender::new(Lsn(0)))
    }
}

#[derive(Debug, Default)]
struct HealthState {
    /// Why the source is not streaming, or `None` while it streams.
    source: Option<String>,
    /// Why Redis is not usable, or `None` while it answers.
    redis: Option<String>,
    /// With several Redis targets, each one's state by name; empty with one target.
    targets: std::collections::BTreeMap<String, TargetHealth>,
    /// Conditions worth saying that do not make the sidecar unready (a key index still
    /// building), by topic.
    notes: std::collections::BTreeMap<String, String>,
}

/// The state of one of several Redis targets.
#[derive(Debug, Default)]
struct TargetHealth {
    /// Why it is not usable, or `None` while it answers.
    down: Option<String>,
    /// Commit time of its oldest transaction not yet confirmed (microseconds), or 0.
    oldest_unconfirmed_us: i64,
}

impl Health {
    /// A new state: not ready until the source streams.
    pub fn new() -> Arc<Health> {
        let health = Health::default();
        health.set_source(Some("starting".to_owned()));
        Arc::new(health)
    }

    /// Records why the source is not streaming (`None`: it streams).
    pub fn set_source(&self, reason: Option<String>) {
        self.lock().source = reason;
    }

    /// Records why Redis is not usable (`None`: it answers).
    pub fn set_redis(&self, reason: Option<String>) {
        self.lock().redis = reason;
    }

    /// Records why the Redis target `name` (one of several) is not usable (`None`: it answers).
    pub fn set_target(&self, name: &str, reason: Option<String>) {
        self.lock().targets.entry(name.to_owned()).or_default().down = reason;
    }

    /// Like [`Health::set_oldest_unconfirmed`], for the Redis target `name` (one of several):
    /// the lag is that of the target furthest behind.
    pub fn set_target_oldest_unconfirmed(&self, name: &str, commit_time_us: Option<i64>) {
        let value = commit_time_us.map_or(0, |us| us.max(1));
        let mut state = self.lock();
        state
            .targets
            .entry(name.to_owned())
            .or_default()
            .oldest_unconfirmed_us = value;
        let oldest = state
            .targets
            .values()
            .map(|t| t.oldest_unconfirmed_us)
            .filter(|&us| us != 0)
            .min()
            .unwrap_or(0);
        self.oldest_unconfirmed_us.store(oldest, Ordering::Relaxed);
    }

    /// Records the commit time of the oldest transaction read and not yet confirmed (`None`:
    /// every transaction read is confirmed).
    pub fn set_oldest_unconfirmed(&self, commit_time_us: Option<i64>) {
        // A commit time of 0 (the epoch) never occurs, so it can stand for none.
        let value = commit_time_us.map_or(0, |us| us.max(1));
        self.oldest_unconfirmed_us.store(value, Ordering::Relaxed);
    }

    /// [`REPLICATION_LAG_SECONDS`] at `now_us`: how long the oldest unconfirmed transaction has
    /// been committed, or 0.
    pub fn lag_seconds(&self, now_us: i64) -> f64 {
        match self.oldest_unconfirmed_us.load(Ordering::Relaxed) {
            0 => 0.0,
            oldest => (now_us - oldest).max(0) as f64 / 1e6,
        }
    }

    /// `Ok` when ready, else the one-line reason.
    pub fn readiness(&self) -> Result<(), String> {
        let state = self.lock();
        match (&state.source, &state.redis) {
            // Both: Redis first, since at start the source waits for it ("starting" alone would
            // hide why).
            (Some(source), Some(redis)) => Err(format!("redis: {redis}; {source}")),
            (Some(reason), None) => Err(reason.clone()),
            (None, Some(reason)) => Err(format!("redis: {reason}")),
            (None, None) => {
                let down: Vec<String> = state
                    .targets
                    .iter()
                    .filter_map(|(name, t)| Some(format!("redis {name}: {}", t.down.as_ref()?)))
                    .collect();
                if down.is_empty() {
                    Ok(())
                } else {
                    Err(down.join("; "))
                }
            }
        }
    }

    /// Records a note on `topic` for `/readyz` (`None`: nothing to say); notes never change
    /// readiness.
    pub fn set_note(&self, topic: &str, note: Option<String>) {
        let mut state = self.lock();
        match note {
            Some(note) => state.notes.insert(topic.to_owned(), note),
            None => state.notes.remove(topic),
        };
    }

    /// The notes, in the order of their topics.
    pub fn notes(&self) -> Vec<String> {
        self.lock().notes.values().cloned().collect()
    }

    /// Records that every change up to `lsn` is invalidated (positions only go forwards), and
    /// answers the `/wait` requests it satisfies.
    pub fn acknowledge(&self, lsn: Lsn) {
        self.acknowledged.0.send_if_modified(|current| {
            let advance = lsn > *current;
            if advance {
                *current = lsn;
            }
            advance
        });
    }

    /// Whether a `/wait` request is waiting.
    pub fn has_waiters(&self) -> bool {
        self.acknowledged.0.receiver_count() > 0
    }

    /// Waits until [`Health::acknowledge`] reached `lsn`; false after `timeout`.
    pub async fn wait_acknowledged(&self, lsn: Lsn, timeout: Duration) -> bool {
        let mut acknowledged = self.acknowledged.0.subscribe();
        let reached = acknowledged.wait_for(|at| *at >= lsn);
        matches!(tokio::time::timeout(timeout, reached).await, Ok(Ok(_)))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HealthState> {
        // The state is two strings; a panic while holding the lock cannot leave it torn.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone)]
struct AppState {
    metrics: PrometheusHandle,
    health: Arc<Health>,
    /// One permit per `/wait` request that may wait at once.
    waiters: Arc<tokio::sync::Semaphore>,
}

/// Binds the HTTP listener; separate from [`serve`] so that a taken port fails at startup.
pub async fn bind(listen: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(listen).await
}

/// Serves `/metrics`, `/healthz` and `/readyz` until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: PrometheusHandle,
    health: Arc<Health>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/wait", get(wait))
        .with_state(AppState {
            metrics,
            health,
            waiters: Arc::new(tokio::sync::Semaphore::new(MAX_WAITERS)),
        });
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
}

/// `GET /readyz`: `ready` or the reason, then one `note: ...` line per note.
async fn readyz(State(state): State<AppState>) -> (StatusCode, String) {
    let (status, mut body) = match state.health.readiness() {
        Ok(()) => (StatusCode::OK, "ready\n".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, format!("{reason}\n")),
    };
    for note in state.health.notes() {
        body.push_str(&format!("note: {note}\n"));
    }
    (status, body)
}

/// The longest `/wait` may be asked to wait.
pub const MAX_WAIT_MS: u64 = 600_000;

/// How many `/wait` requests may wait at once. Each holds a connection, and so a file
/// descriptor, for up to [`MAX_WAIT_MS`]: unbounded, a client that opens them faster than they
/// end would leave none for `/metrics`, `/readyz` and the sidecar's own connections, whose
/// default limit is often 1024. A wait lasts about a millisecond while the sidecar keeps up, so
/// this many serve hundreds of thousands of waits a second.
pub const MAX_WAITERS: usize = 512;

/// `GET /wait?lsn=X/Y&timeout_ms=N`: 200 once every change up to the position is invalidated,
/// 504 after the timeout, 400 for a query that is not that, 503 when [`MAX_WAITERS`] requests
/// are waiting already (retry, or read the database).
async fn wait(
    State(state): State<AppState>,
    axum::extract::RawQuery(query): axum::extract::RawQuery,
) -> (StatusCode, String) {
    let bad = |why: String| (StatusCode::BAD_REQUEST, format!("{why}\n"));
    let (mut lsn, mut timeout_ms) = (None, None);
    for (name, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        match &*name {
            "lsn" => lsn = Some(value.into_owned()),
            "timeout_ms" => timeout_ms = Some(value.into_owned()),
            other => {
                return bad(format!(
                    "unknown parameter {other:?}: expected lsn and timeout_ms"
                ));
            }
        }
    }
    let lsn = match lsn.as_deref().map(str::parse::<Lsn>) {
        Some(Ok(lsn)) => lsn,
        Some(Err(e)) => return bad(format!("lsn: {e}")),
        None => {
            return bad("lsn is missing: /wait?lsn=<pg_lsn>&timeout_ms=<milliseconds>".to_owned());
        }
    };
    let timeout_ms = match timeout_ms.as_deref().map(str::parse::<u64>) {
        Some(Ok(ms)) if ms <= MAX_WAIT_MS => ms,
        Some(_) => {
            return bad(format!(
                "timeout_ms: expected milliseconds from 0 to {MAX_WAIT_MS}"
            ));
        }
        None => return bad("timeout_ms is missing".to_owned()),
    };
    let Ok(_permit) = state.waiters.try_acquire() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_WAITERS} /wait requests are waiting already; retry later\n"),
        );
    };
    if state
        .health
        .wait_acknowledged(lsn, Duration::from_millis(timeout_ms))
        .await
    {
        (StatusCode::OK, format!("invalidated up to {lsn}\n"))
    } else {
        (
            StatusCode::GATEWAY_TIMEOUT,
            format!("not yet invalidated up to {lsn} after {timeout_ms} ms\n"),
        )
    }
}

async fn render_metrics(State(state): State<AppState>) -> String {
    // A gauge of an age must be computed when read: set once, it would stand still while a
    // batch waits for Redis.
    let lag = state.health.lag_seconds(crate::change::unix_micros());
    metrics::gauge!(REPLICATION_LAG_SECONDS).set(lag);
    let waiting = MAX_WAITERS - state.waiters.available_permits();
    metrics::gauge!(WAIT_REQUESTS).set(waiting as f64);
    state.metrics.render()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_shows_every_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("refused"));
        assert_eq!(chain(&e), "outer: refused");

        #[derive(Debug, thiserror::Error)]
        #[error("db error: {0}")]
        struct Repeats(#[source] std::io::Error);
        let e = Repeats(std::io::Error::other("ERROR: no such table"));
        assert_eq!(chain(&e), "db error: ERROR: no such table");
    }

    #[test]
    fn readiness_needs_both_source_and_redis() {
        let health = Health::new();
        assert_eq!(health.readiness(), Err("starting".to_owned()));
        health.set_source(None);
        assert_eq!(health.readiness(), Ok(()));
        health.set_redis(Some("connection refused".to_owned()));
        assert_eq!(
            health.readiness(),
            Err("redis: connection refused".to_owned())
        );
        health.set_redis(None);
        health.set_source(Some("standby".to_owned()));
        assert_eq!(health.readiness(), Err("standby".to_owned()));
    }

    #[test]
    fn notes_are_kept_by_topic_and_never_change_readiness() {
        let health = Health::new();
        health.set_source(None);
        health.set_note("key_index", Some("key index building".to_owned()));
        health.set_note("a", Some("first".to_owned()));
        assert_eq!(health.readiness(), Ok(()));
        assert_eq!(health.notes(), ["first", "key index building"]);
        health.set_note("key_index", None);
        assert_eq!(health.notes(), ["first"]);
    }

    #[test]
    fn at_start_an_unreachable_redis_is_the_reason_given() {
        let health = Health::new();
        health.set_redis(Some("connection refused".to_owned()));
        assert_eq!(
            health.readiness(),
            Err("redis: connection refused; starting".to_owned())
        );
    }

    #[test]
    fn readiness_names_each_target_that_is_down() {
        let health = Health::new();
        health.set_source(None);
        health.set_target("default", None);
        health.set_target("eu", Some("connection refused".to_owned()));
        assert_eq!(
            health.readiness(),
            Err("redis eu: connection refused".to_owned())
        );
        health.set_target("default", Some("timed out".to_owned()));
        assert_eq!(
            health.readiness(),
            Err("redis default: timed out; redis eu: connection refused".to_owned())
        );
        health.set_target("default", None);
        health.set_target("eu", None);
        assert_eq!(health.readiness(), Ok(()));
    }

    #[test]
    fn with_several_targets_the_lag_is_that_of_the_one_furthest_behind() {
        let health = Health::new();
        health.set_target_oldest_unconfirmed("default", Some(9_000_000));
        health.set_target_oldest_unconfirmed("eu", Some(7_500_000));
        assert_eq!(health.lag_seconds(10_000_000), 2.5);
        health.set_target_oldest_unconfirmed("eu", None);
        assert_eq!(health.lag_seconds(10_000_000), 1.0);
        health.set_target_oldest_unconfirmed("default", None);
        assert_eq!(health.lag_seconds(10_000_000), 0.0);
    }

    #[test]
    fn lag_seconds_is_the_age_of_the_oldest_unconfirmed_commit_or_zero() {
        let health = Health::new();
        assert_eq!(health.lag_seconds(10_000_000), 0.0);
        health.set_oldest_unconfirmed(Some(7_500_000));
        assert_eq!(health.lag_seconds(10_000_000), 2.5);
        // A commit stamped later than our clock (skew) is no lag, not a negative one.
        assert_eq!(health.lag_seconds(7_000_000), 0.0);
        health.set_oldest_unconfirmed(None);
        assert_eq!(health.lag_seconds(10_000_000), 0.0);
    }
}
