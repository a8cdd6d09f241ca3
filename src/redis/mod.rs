//! The Redis deleter: applies an invalidation (literal keys and glob patterns) to Redis.
//!
//! Literal keys go out as pipelined `UNLINK`s. Patterns are coalesced and resolved with `SCAN`
//! (never `KEYS`, which blocks the server for the whole keyspace), and each page of matches is
//! unlinked before the next page is fetched, so memory stays bounded by a page; or, with the
//! live key index (`index`), from the keys it holds once a barrier proved it current. Nothing
//! here knows about Postgres: the pipeline hands over sets of strings and gets counts or an
//! error back.

mod connection;
mod error;
mod index;
pub mod library;
mod plan;
pub mod slot;
mod topology;
mod walk;

pub use self::error::DeleteError;
pub use self::index::{
    KEY_INDEX_FALLBACKS, KeyIndexCheck, KeyIndexOptions, KeyIndexReport, KeyIndexState,
};
pub use self::plan::SHARED_PASS_THRESHOLD;
pub use self::walk::Resolution;

use self::connection::{Connection, Handle, Node};
use crate::error::Classify;
use crate::redact::redact;
use futures_util::future::try_join_all;
use std::collections::HashSet;
use std::fmt;
use std::time::Duration;

/// How the deleter connects; the defaults need no tuning.
#[derive(Clone, Debug)]
pub struct DeleterOptions {
    /// How long one connection attempt (TCP, TLS, AUTH) may take before it counts as failed.
    pub connection_timeout: Duration,
    /// How long one reply may take before the request fails and the connection is replaced, so a
    /// hung or unreachable server yields an error instead of a stuck pipeline.
    pub response_timeout: Duration,
    /// `Some(true)`: the URL is a seed node of a Redis Cluster (keys are routed by slot, patterns
    /// scanned on every primary); `Some(false)`: a single server; `None`: ask the server
    /// (`INFO cluster`) at connect.
    pub cluster: Option<bool>,
    /// A CA certificate (PEM) to trust for `rediss://` instead of the system roots, for servers
    /// with a private CA.
    pub tls_ca_pem: Option<Vec<u8>>,
    /// A client certificate chain (PEM) for servers that demand one (`tls-auth-clients yes`);
    /// needs [`DeleterOptions::tls_key_pem`].
    pub tls_cert_pem: Option<Vec<u8>>,
    /// The private key (PEM) of [`DeleterOptions::tls_cert_pem`].
    pub tls_key_pem: Option<Vec<u8>>,
    /// Replicas (of each primary that deleted something) that must confirm a batch's deletes
    /// with `WAIT` before it counts as done; 0 trusts the primary's reply. Redis replicates
    /// asynchronously, so a delete that a primary confirmed but had not passed on when it died
    /// comes back with the promoted replica; waiting for one replica closes that window.
    pub wait_replicas: u32,
    /// The live key index of the keys under these prefixes (`[redis] key_index`), so covered
    /// patterns cost their matches instead of a walk; `None`: every pattern is walked.
    pub key_index: Option<KeyIndexOptions>,
}

impl Default for DeleterOptions {
    fn default() -> Self {
        DeleterOptions {
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            cluster: None,
            tls_ca_pem: None,
            tls_cert_pem: None,
            tls_key_pem: None,
            wait_replicas: 0,
            key_index: None,
        }
    }
}

impl DeleterOptions {
    /// The options `[redis]` asks for: cluster or not, and the TLS files read into memory.
    pub fn from_config(config: &crate::config::RedisConnectConfig) -> Result<Self, DeleteError> {
        let read = |path: &Option<std::path::PathBuf>| {
            path.as_ref()
                .map(|path| {
                    std::fs::read(path).map_err(|err| DeleteError::InvalidSettings {
                        target: path.display().to_string(),
                        reason: format!("cannot read the file: {err}"),
                    })
                })
                .transpose()
        };
        Ok(DeleterOptions {
            cluster: config.cluster,
            tls_ca_pem: read(&config.ca_file)?,
            tls_cert_pem: read(&config.tls_cert_file)?,
            tls_key_pem: read(&config.tls_key_file)?,
            wait_replicas: config.wait_replicas,
            ..DeleterOptions::default()
        })
    }
}

/// What one [`Deleter::delete`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeleteStats {
    /// Keys that existed and were removed: the sum of the UNLINK replies.
    pub keys_deleted: u64,
    /// Patterns resolved against the keyspace, after coalescing dropped the covered ones.
    pub patterns_scanned: u64,
    /// SCAN commands sent (every page of every pass, on every cluster primary).
    pub scan_calls: u64,
    /// Patterns of this call resolved from the key index instead of the walk (then
    /// `patterns_scanned` and `scan_calls` are 0: one batch is resolved by one or the other).
    pub patterns_indexed: u64,
}

/// A driver error and what the deleter was doing when it came, from a task that cannot wrap it.
type Failure = (&'static str, ::redis::RedisError);

/// Deletes keys from one Redis server or cluster, reconnecting after errors.
pub struct Deleter {
    /// The URL with its password hidden, for errors and logs.
    target: String,
    /// The host of the URL, for cluster nodes that do not know their own address.
    seed_host: String,
    /// The connection to Redis.
    connection: Connection,
    /// What it was connected with, for the connections to each primary that `check` opens.
    options: DeleterOptions,
    /// See [`DeleterOptions::wait_replicas`].
    wait_replicas: u32,
    /// How long `WAIT` lets replicas take, in milliseconds: a second, or half the response
    /// timeout if that is shorter, so a missing replica is a clear "not replicated" rather than
    /// a timed-out request.
    wait_timeout_ms: u64,
    /// The shared walk that [`Deleter::start`] hands patterns to, started with the first.
    walk: Option<walk::Walk>,
    /// The live key index, with `[redis] key_index`.
    index: Option<index::Index>,
}

impl fmt::Debug for Deleter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deleter")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Deleter {
    /// Connects to the server at `url` (`redis://` or `rediss://`) with default options.
    pub async fn connect(url: &str) -> Result<Deleter, DeleteError> {
        Deleter::connect_with(url, DeleterOptions::default()).await
    }

    /// Connects to `url` with `options`; fails at once on bad settings or credentials, and with a
    /// transient error when Redis is unreachable (the caller retries with backoff).
    pub async fn connect_with(url: &str, options: DeleterOptions) -> Result<Deleter, DeleteError> {
        let target = redact(url);
        if url.starts_with("rediss") {
            install_tls_provider();
        }
        let mut connection = Connection::open(url, &target, &options).await?;
        let seed_host = host_of(url).to_owned();
        let index = match &options.key_index {
            Some(key_index) => Some(
                index::Index::spawn(&mut connection, &target, &seed_host, &options, key_index)
                    .await
                    .map_err(|err| DeleteError::InvalidSettings {
                        target: target.clone(),
                        reason: err.to_string(),
                    })?,
            ),
            None => None,
        };
        Ok(Deleter {
            seed_host,
            target,
            connection,
            wait_replicas: options.wait_replicas,
            wait_timeout_ms: (options.response_timeout / 2)
                .min(Duration::from_secs(1))
                .as_millis() as u64,
            options,
            walk: None,
            index,
        })
    }

    /// What the live key index can do now: [`KeyIndexState::Off`] without `[redis] key_index`.
    pub fn key_index_state(&self) -> KeyIndexState {
        self.index
            .as_ref()
            .map_or(KeyIndexState::Off, index::Index::state)
    }

    /// The key index's state and what it did so far; `None` without `[redis] key_index`.
    pub fn key_index_report(&self) -> Option<KeyIndexReport> {
        self.index.as_ref().map(index::Index::report)
    }

    /// The URL this deleter talks to, with its password hidden.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Whether it talks to a Redis Cluster (configured, or detected at connect).
    pub fn is_cluster(&self) -> bool {
        self.connection.is_cluster()
    }

    /// Checks that Redis answers (every primary, for a cluster).
    pub async fn ping(&mut self) -> Result<(), DeleteError> {
        let result = self.connection.ping().await;
        result.map_err(|source| self.failed("PING", source))
    }

    /// Deletes the literal `keys` and every key matching one of `patterns` (Redis globs): from
    /// the key index when it is proven current and covers them all, else each walked here.
    ///
    /// Missing keys are fine. On error some keys may already be gone; the whole call is safe to
    /// repeat, which is what the pipeline does after a transient error.
    pub async fn delete(
        &mut self,
        keys: &HashSet<String>,
        patterns: &HashSet<String>,
    ) -> Result<DeleteStats, DeleteError> {
        let mut stats = DeleteStats::default();
        let patterns = plan::coalesce(patterns);
        stats.patterns_scanned = patterns.len() as u64;
        if keys.is_empty() && patterns.is_empty() {
            return Ok(stats);
        }
        let handle = self.connection.handle().await;
        let mut handle = handle.map_err(|source| self.failed("connect", source))?;
        if !keys.is_empty() {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let result = handle.unlink(&keys).await;
            stats.keys_deleted += result.map_err(|source| self.failed("UNLINK", source))?;
        }
        let owned: Vec<String> = patterns.iter().map(|p| (*p).to_owned()).collect();
        if !patterns.is_empty()
            && let Some(indexed) = self.resolve_indexed(&owned).await?
        {
            stats.keys_deleted += indexed.keys_deleted;
            stats.patterns_indexed = indexed.patterns_indexed;
            stats.patterns_scanned = 0;
        } else if !patterns.is_empty() {
            // The topology is read again for every batch with patterns: one small reply next to
            // whole-keyspace walks, and it follows a failover or a resharding that raised no
            // error here. After an error the connection is replaced (see `failed`), so the
            // driver's slot map is fresh as well.
            let nodes = self.connection.nodes(&self.seed_host).await;
            let nodes = nodes.map_err(|source| self.failed("CLUSTER SLOTS", source))?;
            let walks = walks(&patterns, &nodes);
            let results = try_join_all(
                walks
                    .iter()
                    .map(|(node, passes)| walk(handle.clone(), node, passes)),
            )
            .await;
            let results = results.map_err(|(action, source)| self.failed(action, source))?;
            for walked in results {
                stats.keys_deleted += walked.keys_deleted;
                stats.scan_calls += walked.scan_calls;
            }
        }
        self.replicated(&mut handle).await?;
        tracing::debug!(
            keys_deleted = stats.keys_deleted,
            patterns_scanned = stats.patterns_scanned,
            scan_calls = stats.scan_calls,
            "invalidation applied"
        );
        Ok(stats)
    }

    /// With `wait_replicas`, waits until that many replicas confirmed this connection's writes.
    ///
    /// Waited for even when this attempt deleted nothing: an earlier attempt of the same batch
    /// (its reply lost, or not replicated in time) may have deleted the keys, and those deletes
    /// may still be on the primary alone. The UNLINK or SCAN this attempt sent moves the
    /// connection's replication offset to the server's current one (Redis 7), so the `WAIT`
    /// covers the earlier attempt's deletes, on a new connection too.
    async fn replicated(&mut self, handle: &mut Handle) -> Result<(), DeleteError> {
        if self.wait_replicas == 0 {
            return Ok(());
        }
        let confirmed = handle.wait(self.wait_replicas, self.wait_timeout_ms).await;
        let confirmed = confirmed.map_err(|source| self.failed("WAIT", source))?;
        if confirmed < u64::from(self.wait_replicas) {
            return Err(DeleteError::NotReplicated {
                target: self.target.clone(),
                confirmed,
                wanted: self.wait_replicas,
            });
        }
        Ok(())
    }

    /// Deletes the literal `keys` now and resolves `patterns`: from the key index when it is
    /// proven current and covers them all (the [`Resolution`] is then done already), else by
    /// handing them to the shared walk (see [`walk`](self::walk)), which resolves once their
    /// keys are deleted too. A pattern joins the walk where it is, so patterns that arrive while
    /// others are pending share its pass instead of each walking the keyspace. On error nothing
    /// was handed over and the call is safe to repeat.
    pub async fn start(
        &mut self,
        keys: &HashSet<String>,
        patterns: &HashSet<String>,
    ) -> Result<Resolution, DeleteError> {
        let literal = self.delete(keys, &HashSet::new()).await?;
        let patterns = walk::coalesced(patterns);
        if patterns.is_empty() {
            return Ok(Resolution::done(literal));
        }
        if let Some(indexed) = self.resolve_indexed(&patterns).await? {
            return Ok(Resolution::done(DeleteStats {
                keys_deleted: literal.keys_deleted + indexed.keys_deleted,
                ..indexed
            }));
        }
        let walk = self.walk.get_or_insert_with(|| {
            walk::Walk::spawn(
                self.connection.duplicate(),
                walk::Settings {
                    target: self.target.clone(),
                    seed_host: self.seed_host.clone(),
                    wait_replicas: self.wait_replicas,
                    wait_timeout_ms: self.wait_timeout_ms,
                },
            )
        });
        Ok(walk.join(patterns, literal))
    }

    /// Deletes the keys of `patterns` (coalesced) found in the key index, once a barrier proved
    /// it current; `None` when the walk must resolve them (no index, or why is counted).
    async fn resolve_indexed(
        &mut self,
        patterns: &[String],
    ) -> Result<Option<DeleteStats>, DeleteError> {
        let Some(index) = self.index.as_mut() else {
            return Ok(None);
        };
        // Each server's index replaces its own connections after an error.
        let doomed = match index.prove(&mut self.connection, patterns).await {
            Ok(doomed) => doomed,
            Err((why, err)) => {
                index.fell_back(why, patterns.len());
                tracing::debug!(reason = why.label(), error = ?err.as_ref().map(ToString::to_string),
                    "patterns go to the SCAN walk: the key index cannot resolve them");
                return Ok(None);
            }
        };
        // UNLINK through the deleter's connection, which routes each key to its slot's primary.
        let handle = self.connection.handle().await;
        let mut handle = handle.map_err(|source| self.failed("connect", source))?;
        let deleted = handle.unlink(&doomed).await;
        let keys_deleted = deleted.map_err(|source| self.failed("UNLINK", source))?;
        self.replicated(&mut handle).await?;
        if let Some(index) = self.index.as_mut() {
            index.resolved(patterns.len());
        }
        Ok(Some(DeleteStats {
            keys_deleted,
            patterns_indexed: patterns.len() as u64,
            ..DeleteStats::default()
        }))
    }

    /// Wraps a driver error and, when it is transient, replaces the connection so the next call
    /// starts on a fresh one.
    fn failed(&mut self, action: &'static str, source: ::redis::RedisError) -> DeleteError {
        let err = DeleteError::Redis {
            target: self.target.clone(),
            action,
            source,
        };
        if err.is_transient() {
            tracing::debug!(target_url = %self.target, action, "redis request failed, reconnecting");
            self.connection.reset();
        }
        err
    }
}

/// Plans the SCAN passes of each server: every pattern on every server, except that a pattern
/// whose keys all live in one slot (a complete hash tag in its literal prefix, see
/// [`slot::pattern_slot`]) goes only to the primary that owns that slot. A slot that no primary
/// claims (a cluster being set up) sends its pattern everywhere, as if it had no tag.
fn walks<'n>(patterns: &[&str], nodes: &'n [Node]) -> Vec<(&'n Node, Vec<plan::ScanPass>)> {
    nodes
        .iter()
        .filter_map(|node| {
            let mine: Vec<&str> = patterns
                .iter()
                .copied()
                .filter(|pattern| walks_on(pattern, node, nodes))
                .collect();
            let passes = plan::passes(&mine, crate::glob::matches);
            (!passes.is_empty()).then_some((node, passes))
        })
        .collect()
}

/// Whether `node`, one of `nodes`, must be walked for `pattern` (see [`walks`]).
fn walks_on(pattern: &str, node: &Node, nodes: &[Node]) -> bool {
    let cluster = nodes.len() > 1 || nodes.iter().any(|n| matches!(n, Node::Primary { .. }));
    let slot = cluster.then(|| slot::pattern_slot(pattern.as_bytes()));
    match slot.flatten() {
        Some(slot) => node.owns(slot) || !nodes.iter().any(|other| other.owns(slot)),
        None => true,
    }
}

/// Walks `node` with SCAN for each of `passes` and unlinks the wanted keys in full UNLINK chunks:
/// a pass over a large keyspace finds a few matches on most pages, and one UNLINK per page would
/// double its round trips. Runs beside the walks of the other primaries, on its own handle.
async fn walk(
    mut handle: Handle,
    node: &Node,
    passes: &[plan::ScanPass],
) -> Result<DeleteStats, Failure> {
    let mut stats = DeleteStats::default();
    for pass in passes {
        let mut cursor = String::from("0");
        let mut doomed: Vec<Vec<u8>> = Vec::new();
        loop {
            let page = handle.scan(node, &cursor, pass.match_arg()).await;
            let (next, keys) = page.map_err(|source| ("SCAN", source))?;
            stats.scan_calls += 1;
            doomed.extend(keys.into_iter().filter(|key| pass.wants(key)));
            let done = next == "0";
            if doomed.len() >= connection::KEYS_PER_UNLINK || (done && !doomed.is_empty()) {
                let deleted = handle.unlink(&doomed).await;
                stats.keys_deleted += deleted.map_err(|source| ("UNLINK", source))?;
                doomed.clear();
            }
            if done {
                break;
            }
            cursor = next;
        }
    }
    Ok(stats)
}

/// Makes sure rustls has a crypto provider before the driver builds a TLS config.
///
/// The driver enables rustls without one, and rustls panics when none is installed; installing
/// ring explicitly also stays correct if another dependency ever enables a second provider. An
/// error only means a provider is installed already.
fn install_tls_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The host part of a URL (`redis://user:pw@host:port/db` → `host`), or "" if there is none.
fn host_of(url: &str) -> &str {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    match host_port.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host_port.split(':').next().unwrap_or(""),
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_skips_credentials_port_and_path() {
        assert_eq!(
            host_of("redis://u:p@cache.internal:6379/0"),
            "cache.internal"
        );
        assert_eq!(host_of("rediss://10.0.0.1"), "10.0.0.1");
        assert_eq!(host_of("redis://[::1]:7000"), "::1");
    }
}
