//! The connections the deleter talks through: one server, or every primary of a cluster.

use super::{DeleteError, DeleterOptions};
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use ::redis::{Client, Cmd, RedisResult, TlsCertificates, ToRedisArgs, Value};
use futures_util::future::try_join_all;
use std::time::Duration;

/// Keys per UNLINK: large enough to amortise a round trip, small enough that one command never
/// blocks the server noticeably.
pub(super) const KEYS_PER_UNLINK: usize = 1000;

/// UNLINK commands sent per round trip (pipelined, or concurrently in a cluster).
const UNLINKS_PER_ROUND: usize = 8;

/// Keys per SCAN page, a hint to the server (the COUNT argument).
const SCAN_COUNT: usize = 1000;

/// A connection to a single server or to a cluster; the variants are boxed because the driver's
/// client and configuration types take hundreds of bytes.
pub(super) enum Connection {
    /// One server (or a proxy in front of several), through a reconnecting manager.
    Single(Box<Single>),
    /// A Redis Cluster; the driver routes keys by slot and follows topology changes.
    Cluster(Box<Cluster>),
}

/// The single-server connection and what is needed to replace it.
pub(super) struct Single {
    /// Opens connections; kept to build a fresh manager after an error.
    client: Client,
    /// Timeouts and reconnect policy of the manager.
    config: ConnectionManagerConfig,
    /// The multiplexed connection that reconnects after I/O errors.
    manager: ConnectionManager,
}

/// The cluster connection, opened again after an error.
pub(super) struct Cluster {
    /// Opens cluster connections.
    client: ClusterClient,
    /// The open connection; `None` after an error, until the next request opens a new one.
    connection: Option<ClusterConnection>,
}

impl Cluster {
    /// The open connection, or a new one if the last was dropped after an error.
    async fn connection(&mut self) -> RedisResult<&mut ClusterConnection> {
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => self.client.get_async_connection().await?,
        };
        Ok(self.connection.insert(connection))
    }
}

/// A server that a SCAN walks: the only one, or one primary of a cluster.
pub(super) enum Node {
    /// The single server.
    Only,
    /// A cluster primary, by the address the cluster announces.
    Primary {
        /// Its host as CLUSTER SLOTS reports it.
        host: String,
        /// Its port.
        port: u16,
    },
}

impl Connection {
    /// Connects to `url`, failing with an error that names `target` (the redacted URL).
    pub(super) async fn open(
        url: &str,
        target: &str,
        options: &DeleterOptions,
    ) -> Result<Connection, DeleteError> {
        let invalid = |err: ::redis::RedisError| DeleteError::InvalidSettings {
            target: target.to_owned(),
            // The driver's URL errors are fixed texts that never echo the URL or the password.
            reason: err.to_string(),
        };
        let connect_error = |source| DeleteError::Redis {
            target: target.to_owned(),
            action: "connect",
            source,
        };
        let certificates = options.tls_ca_pem.as_ref().map(|ca| TlsCertificates {
            client_tls: None,
            root_cert: Some(ca.clone()),
        });
        if options.cluster {
            let mut builder = ClusterClientBuilder::new(vec![url])
                .connection_timeout(options.connection_timeout)
                .response_timeout(options.response_timeout)
                // The pipeline retries with its own backoff; the driver's retries only add delay.
                .retries(1);
            if let Some(certificates) = certificates {
                builder = builder.certs(certificates);
            }
            let client = builder.build().map_err(invalid)?;
            let connection = client.get_async_connection().await.map_err(connect_error)?;
            return Ok(Connection::Cluster(Box::new(Cluster {
                client,
                connection: Some(connection),
            })));
        }
        let client = match certificates {
            Some(certificates) => Client::build_with_tls(url, certificates),
            None => Client::open(url),
        }
        .map_err(invalid)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(options.connection_timeout))
            .set_response_timeout(Some(options.response_timeout))
            // One quick retry rides out a blip; longer outages are the pipeline's backoff.
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let manager = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(connect_error)?;
        Ok(Connection::Single(Box::new(Single {
            client,
            config,
            manager,
        })))
    }

    /// Replaces the connection after an error, so the next request starts on a fresh one.
    ///
    /// The driver reconnects a single server only after I/O errors, so a connection whose replies
    /// timed out (a half-open socket) or whose setup failed with LOADING would stay broken; and a
    /// cluster connection was seen to time out on every multi-slot UNLINK after a primary
    /// restarted, although the cluster was healthy again.
    pub(super) fn reset(&mut self) {
        match self {
            Connection::Single(single) => {
                // A lazy manager does no I/O and fails only on settings that already worked.
                if let Ok(manager) = ConnectionManager::new_lazy_with_config(
                    single.client.clone(),
                    single.config.clone(),
                ) {
                    single.manager = manager;
                }
            }
            Connection::Cluster(cluster) => cluster.connection = None,
        }
    }

    /// Checks that the server (every primary of a cluster) answers.
    pub(super) async fn ping(&mut self) -> RedisResult<()> {
        let ping = ::redis::cmd("PING");
        match self {
            Connection::Single(single) => ping.query_async(&mut single.manager).await,
            Connection::Cluster(cluster) => ping.query_async(cluster.connection().await?).await,
        }
    }

    /// Deletes `keys` with UNLINK and returns how many existed.
    pub(super) async fn unlink<K: ToRedisArgs + Sync>(&mut self, keys: &[K]) -> RedisResult<u64> {
        let mut deleted = 0;
        for round in keys.chunks(KEYS_PER_UNLINK * UNLINKS_PER_ROUND) {
            let chunks = round.chunks(KEYS_PER_UNLINK);
            let counts: Vec<u64> = match self {
                Connection::Single(single) => {
                    let mut pipe = ::redis::pipe();
                    for chunk in chunks {
                        pipe.cmd("UNLINK").arg(chunk);
                    }
                    pipe.query_async(&mut single.manager).await?
                }
                // The driver splits a multi-key UNLINK by slot and sums the replies; a pipeline
                // could not span slots, so the chunks go out concurrently instead.
                Connection::Cluster(cluster) => {
                    let connection = cluster.connection().await?;
                    try_join_all(chunks.map(|chunk| {
                        let mut cluster = connection.clone();
                        let mut unlink = ::redis::cmd("UNLINK");
                        unlink.arg(chunk);
                        async move { unlink.query_async::<u64>(&mut cluster).await }
                    }))
                    .await?
                }
            };
            deleted += counts.iter().sum::<u64>();
        }
        Ok(deleted)
    }

    /// The servers a full SCAN must walk: the one server, or every primary of the cluster.
    pub(super) async fn nodes(&mut self, seed_host: &str) -> RedisResult<Vec<Node>> {
        let Connection::Cluster(cluster) = self else {
            return Ok(vec![Node::Only]);
        };
        let mut slots = Cmd::new();
        slots.arg("CLUSTER").arg("SLOTS");
        let reply = cluster
            .connection()
            .await?
            .route_command(
                slots,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        primaries(reply, seed_host)
    }

    /// Runs one SCAN step on `node` and returns the next cursor and the page of keys.
    pub(super) async fn scan(
        &mut self,
        node: &Node,
        cursor: &str,
        match_arg: Option<&[u8]>,
    ) -> RedisResult<(String, Vec<Vec<u8>>)> {
        let mut scan = ::redis::cmd("SCAN");
        scan.arg(cursor);
        if let Some(pattern) = match_arg {
            scan.arg("MATCH").arg(pattern);
        }
        scan.arg("COUNT").arg(SCAN_COUNT);
        match (self, node) {
            (Connection::Cluster(cluster), Node::Primary { host, port }) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let connection = cluster.connection().await?;
                let reply = connection.route_command(scan, routing).await?;
                Ok(::redis::from_redis_value(reply)?)
            }
            (Connection::Single(single), _) => scan.query_async(&mut single.manager).await,
            (Connection::Cluster(_), Node::Only) => Err(::redis::RedisError::from((
                ::redis::ErrorKind::Client,
                "a cluster SCAN needs a primary to run on",
            ))),
        }
    }
}

/// Reads the distinct primaries from a CLUSTER SLOTS reply: per slot range `[start, end,
/// [host, port, id, ...], replicas...]`. An empty host means the answering node, which is the seed
/// only in the one case Redis sends it (a lone node that never met another).
fn primaries(reply: Value, seed_host: &str) -> RedisResult<Vec<Node>> {
    let ranges: Vec<Vec<Value>> = ::redis::from_redis_value(reply)?;
    let mut found: Vec<(String, u16)> = Vec::new();
    for range in ranges {
        let Some(primary) = range.into_iter().nth(2) else {
            continue;
        };
        let (host, port): (String, u16) =
            match ::redis::from_redis_value::<Vec<Value>>(primary)?.as_slice() {
                [host, port, ..] => (
                    ::redis::from_redis_value_ref(host)?,
                    ::redis::from_redis_value_ref(port)?,
                ),
                _ => continue,
            };
        let host = if host.is_empty() {
            seed_host.to_owned()
        } else {
            host
        };
        if !found.contains(&(host.clone(), port)) {
            found.push((host, port));
        }
    }
    Ok(found
        .into_iter()
        .map(|(host, port)| Node::Primary { host, port })
        .collect())
}
