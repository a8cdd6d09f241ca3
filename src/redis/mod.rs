//! The Redis deleter: applies an invalidation (literal keys and glob patterns) to Redis.
//!
//! Literal keys go out as pipelined `UNLINK`s. Patterns are coalesced and resolved with `SCAN`
//! (never `KEYS`, which blocks the server for the whole keyspace), and each page of matches is
//! unlinked before the next page is fetched, so memory stays bounded by a page. Nothing here knows
//! about Postgres: the pipeline hands over sets of strings and gets counts or an error back.

mod connection;
mod error;
mod plan;

pub use self::error::DeleteError;
pub use self::plan::SHARED_PASS_THRESHOLD;

use self::connection::Connection;
use crate::redact::redact;
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
    /// Treat the URL as a seed node of a Redis Cluster: keys are routed by slot and patterns are
    /// scanned on every primary.
    pub cluster: bool,
    /// A CA certificate (PEM) to trust for `rediss://` instead of the system roots, for servers
    /// with a private CA.
    pub tls_ca_pem: Option<Vec<u8>>,
}

impl Default for DeleterOptions {
    fn default() -> Self {
        DeleterOptions {
            connection_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(5),
            cluster: false,
            tls_ca_pem: None,
        }
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
}

/// Deletes keys from one Redis server or cluster, reconnecting after errors.
pub struct Deleter {
    /// The URL with its password hidden, for errors and logs.
    target: String,
    /// The host of the URL, for cluster nodes that do not know their own address.
    seed_host: String,
    /// The connection to Redis.
    connection: Connection,
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
        let connection = Connection::open(url, &target, &options).await?;
        Ok(Deleter {
            seed_host: host_of(url).to_owned(),
            target,
            connection,
        })
    }

    /// The URL this deleter talks to, with its password hidden.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Checks that Redis answers (every primary, for a cluster).
    pub async fn ping(&mut self) -> Result<(), DeleteError> {
        let result = self.connection.ping().await;
        result.map_err(|source| self.failed("PING", source))
    }

    /// Deletes the literal `keys` and every key matching one of `patterns` (Redis globs).
    ///
    /// Missing keys are fine. On error some keys may already be gone; the whole call is safe to
    /// repeat, which is what the pipeline does after a transient error.
    pub async fn delete(
        &mut self,
        keys: &HashSet<String>,
        patterns: &HashSet<String>,
    ) -> Result<DeleteStats, DeleteError> {
        let mut stats = DeleteStats::default();
        if !keys.is_empty() {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            let result = self.connection.unlink(&keys).await;
            stats.keys_deleted += result.map_err(|source| self.failed("UNLINK", source))?;
        }
        let patterns = plan::coalesce(patterns);
        stats.patterns_scanned = patterns.len() as u64;
        let passes = plan::passes(&patterns, crate::rules::glob::matches);
        if !passes.is_empty() {
            let nodes = self.connection.nodes(&self.seed_host).await;
            let nodes = nodes.map_err(|source| self.failed("CLUSTER SLOTS", source))?;
            for pass in &passes {
                for node in &nodes {
                    self.scan_and_unlink(pass, node, &mut stats).await?;
                }
            }
        }
        tracing::debug!(
            keys_deleted = stats.keys_deleted,
            patterns_scanned = stats.patterns_scanned,
            scan_calls = stats.scan_calls,
            "invalidation applied"
        );
        Ok(stats)
    }

    /// Walks `node` with SCAN for `pass` and unlinks the wanted keys in full UNLINK chunks: a
    /// pass over a large keyspace finds a few matches on most pages, and one UNLINK per page
    /// would double its round trips.
    async fn scan_and_unlink(
        &mut self,
        pass: &plan::ScanPass,
        node: &connection::Node,
        stats: &mut DeleteStats,
    ) -> Result<(), DeleteError> {
        let mut cursor = String::from("0");
        let mut doomed: Vec<Vec<u8>> = Vec::new();
        loop {
            let page = self.connection.scan(node, &cursor, pass.match_arg()).await;
            let (next, keys) = page.map_err(|source| self.failed("SCAN", source))?;
            stats.scan_calls += 1;
            doomed.extend(keys.into_iter().filter(|key| pass.wants(key)));
            let done = next == "0";
            if doomed.len() >= connection::KEYS_PER_UNLINK || (done && !doomed.is_empty()) {
                let result = self.connection.unlink(&doomed).await;
                stats.keys_deleted += result.map_err(|source| self.failed("UNLINK", source))?;
                doomed.clear();
            }
            if done {
                return Ok(());
            }
            cursor = next;
        }
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
