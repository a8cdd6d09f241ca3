//! The connections the deleter talks through: one server, or every primary of a cluster.

use super::{DeleteError, DeleterOptions};
use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::{ClusterClient, ClusterClientBuilder};
use ::redis::cluster_async::ClusterConnection;
use ::redis::cluster_routing::{
    AggregateOp, MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo,
    SingleNodeRoutingInfo, SlotAddr,
};
use ::redis::{Client, ClientTlsConfig, Cmd, RedisResult, TlsCertificates, ToRedisArgs, Value};
use futures_util::future::try_join_all;
use std::time::Duration;

/// Keys per UNLINK: large enough to amortise a round trip, small enough that one command never
/// blocks the server noticeably.
pub(super) const KEYS_PER_UNLINK: usize = 1000;

/// UNLINK commands sent per round trip (pipelined, or concurrently in a cluster).
const UNLINKS_PER_ROUND: usize = 8;

/// Keys per SCAN page, a hint to the server (the COUNT argument).
pub(super) const SCAN_COUNT: usize = 1000;

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
    /// The configured URL: the first seed, and the template (scheme, credentials, database) for
    /// the URLs of the other nodes.
    seed_url: String,
    /// What the client is built with, to build it again with more seeds.
    options: DeleterOptions,
    /// TLS material for the client.
    certificates: Option<TlsCertificates>,
    /// Every node CLUSTER SLOTS has announced, primaries and replicas.
    known: Vec<(String, u16)>,
    /// Whether `known` has grown since `client` was built.
    reseed: bool,
}

impl Cluster {
    /// The open connection, or a new one if the last was dropped after an error.
    ///
    /// The driver only ever seeds a new connection from the nodes its client was built with, so
    /// a client built from `[redis] url` alone could never connect again once that node died,
    /// even though its replica took over. New connections are therefore seeded with every node
    /// the cluster has announced.
    async fn connection(&mut self) -> RedisResult<&mut ClusterConnection> {
        let connection = match self.connection.take() {
            Some(connection) => connection,
            None => {
                if self.reseed {
                    let mut seeds = vec![self.seed_url.clone()];
                    seeds.extend(
                        self.known
                            .iter()
                            .map(|(host, port)| with_address(&self.seed_url, host, *port)),
                    );
                    self.client = build_cluster_client(seeds, &self.options, &self.certificates)?;
                    self.reseed = false;
                }
                self.client.get_async_connection().await?
            }
        };
        Ok(self.connection.insert(connection))
    }

    /// Learns the cluster's nodes at connect, so that even a stream of literal keys alone (which
    /// never asks for the topology) can reconnect after the seed node died. Best effort: the
    /// next topology read tries again.
    async fn discover(&mut self) {
        let mut slots = Cmd::new();
        slots.arg("CLUSTER").arg("SLOTS");
        let reply = match self.connection().await {
            Ok(connection) => {
                connection
                    .route_command(
                        slots,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
                    )
                    .await
            }
            Err(err) => Err(err),
        };
        if let Ok(reply) = reply {
            let seed_host = super::host_of(&self.seed_url).to_owned();
            self.learn(&reply, &seed_host);
        }
    }

    /// Remembers the nodes of a CLUSTER SLOTS reply.
    fn learn(&mut self, reply: &Value, seed_host: &str) {
        for address in announced(reply, seed_host) {
            if !self.known.contains(&address) {
                self.known.push(address);
                self.reseed = true;
            }
        }
    }
}

/// A server that a SCAN walks: the only one, or one primary of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Node {
    /// The single server.
    Only,
    /// A cluster primary, by the address the cluster announces.
    Primary {
        /// Its host as CLUSTER SLOTS reports it.
        host: String,
        /// Its port.
        port: u16,
        /// The slot ranges it serves, inclusive at both ends.
        slots: Vec<(u16, u16)>,
    },
}

impl Node {
    /// Whether this server holds the keys of `slot`: the single server holds every slot.
    pub(super) fn owns(&self, slot: u16) -> bool {
        match self {
            Node::Only => true,
            Node::Primary { slots, .. } => slots
                .iter()
                .any(|&(start, end)| (start..=end).contains(&slot)),
        }
    }
}

/// A cheap clone of the open connection, so that several SCAN walks (one per cluster primary)
/// run at once, each with its own cursor.
#[derive(Clone)]
pub(super) enum Handle {
    /// The single server's multiplexed, reconnecting connection.
    Single(ConnectionManager),
    /// The cluster connection, which routes by slot or by address.
    Cluster(ClusterConnection),
}

impl Connection {
    /// Connects to `url`, failing with an error that names `target` (the redacted URL).
    pub(super) async fn open(
        url: &str,
        target: &str,
        options: &DeleterOptions,
    ) -> Result<Connection, DeleteError> {
        let certificates = tls_certificates(url, target, options)?;
        if options.cluster == Some(true) {
            return Connection::connect_cluster(url, target, options, certificates).await;
        }
        let client = match certificates.clone() {
            Some(certificates) => Client::build_with_tls(url, certificates),
            None => Client::open(url),
        }
        .map_err(|err| invalid_settings(target, err))?;
        let config = manager_config(options);
        let mut manager = ConnectionManager::new_with_config(client.clone(), config.clone())
            .await
            .map_err(|source| connect_error(target, source))?;
        if options.cluster.is_none() && detect_cluster(&mut manager, target).await? {
            return Connection::connect_cluster(url, target, options, certificates).await;
        }
        Ok(Connection::Single(Box::new(Single {
            client,
            config,
            manager,
        })))
    }

    /// Opens a cluster connection and learns its nodes.
    async fn connect_cluster(
        url: &str,
        target: &str,
        options: &DeleterOptions,
        certificates: Option<TlsCertificates>,
    ) -> Result<Connection, DeleteError> {
        let mut cluster = open_cluster(url, options, certificates)
            .map_err(|err| invalid_settings(target, err))?;
        cluster
            .connection()
            .await
            .map_err(|source| connect_error(target, source))?;
        cluster.discover().await;
        Ok(Connection::Cluster(Box::new(cluster)))
    }

    /// A second connection with the same settings, opened at its first request: the shared
    /// walk's own, so that its long SCAN walks and reconnects never stall the literal deletes.
    pub(super) fn duplicate(&self) -> Connection {
        match self {
            Connection::Single(single) => Connection::Single(Box::new(Single {
                client: single.client.clone(),
                config: single.config.clone(),
                // A lazy manager fails only on settings that already worked; sharing the open
                // one is the fallback that still works.
                manager: ConnectionManager::new_lazy_with_config(
                    single.client.clone(),
                    single.config.clone(),
                )
                .unwrap_or_else(|_| single.manager.clone()),
            })),
            Connection::Cluster(cluster) => Connection::Cluster(Box::new(Cluster {
                client: cluster.client.clone(),
                connection: None,
                seed_url: cluster.seed_url.clone(),
                options: cluster.options.clone(),
                certificates: cluster.certificates.clone(),
                known: cluster.known.clone(),
                reseed: cluster.reseed,
            })),
        }
    }

    /// The client of a single server, for connections of another kind (the key index's
    /// subscription); `None` for a cluster.
    pub(super) fn single_client(&self) -> Option<Client> {
        match self {
            Connection::Single(single) => Some(single.client.clone()),
            Connection::Cluster(_) => None,
        }
    }

    /// A client for the cluster node at `host:port`, with the seed URL's scheme, credentials
    /// and TLS material: for what must reach that node itself and no other (the key index's
    /// subscription, CONFIG and barriers: keyspace notifications are node-local). `None` for a
    /// single server.
    pub(super) fn node_client(&self, host: &str, port: u16) -> Option<RedisResult<Client>> {
        let Connection::Cluster(cluster) = self else {
            return None;
        };
        let url = with_address(&cluster.seed_url, host, port);
        Some(match cluster.certificates.clone() {
            Some(certificates) => Client::build_with_tls(url, certificates),
            None => Client::open(url),
        })
    }

    /// A single-server connection through `client`, opened at its first request, with the
    /// timeouts of `options`.
    pub(super) fn lazy(client: Client, options: &DeleterOptions) -> RedisResult<Connection> {
        let config = manager_config(options);
        let manager = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Connection::Single(Box::new(Single {
            client,
            config,
            manager,
        })))
    }

    /// The `CLUSTER NODES` text of one node of the cluster (any that answers); `None` for a
    /// single server.
    pub(super) async fn cluster_nodes(&mut self) -> RedisResult<Option<String>> {
        let Connection::Cluster(cluster) = self else {
            return Ok(None);
        };
        let mut nodes = Cmd::new();
        nodes.arg("CLUSTER").arg("NODES");
        let reply = cluster
            .connection()
            .await?
            .route_command(
                nodes,
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        Ok(Some(::redis::from_redis_value(reply)?))
    }

    /// Whether this is a cluster connection (configured or detected).
    pub(super) fn is_cluster(&self) -> bool {
        matches!(self, Connection::Cluster(_))
    }

    /// A clone of the open connection (opening a cluster connection if the last was dropped).
    pub(super) async fn handle(&mut self) -> RedisResult<Handle> {
        Ok(match self {
            Connection::Single(single) => Handle::Single(single.manager.clone()),
            Connection::Cluster(cluster) => Handle::Cluster(cluster.connection().await?.clone()),
        })
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
        cluster.learn(&reply, seed_host);
        primaries(reply, seed_host)
    }
}

impl Handle {
    /// Waits until `replicas` replicas of every primary have confirmed this connection's writes,
    /// or `timeout_ms` passed; returns how many did (the least over the primaries: a primary
    /// that took no write answers at once).
    pub(super) async fn wait(&mut self, replicas: u32, timeout_ms: u64) -> RedisResult<u64> {
        let mut wait = ::redis::cmd("WAIT");
        wait.arg(replicas).arg(timeout_ms);
        match self {
            Handle::Single(manager) => wait.query_async(manager).await,
            Handle::Cluster(connection) => {
                let routing = RoutingInfo::MultiNode((
                    MultipleNodeRoutingInfo::AllMasters,
                    Some(ResponsePolicy::Aggregate(AggregateOp::Min)),
                ));
                let reply = connection.route_command(wait, routing).await?;
                Ok(::redis::from_redis_value(reply)?)
            }
        }
    }

    /// Runs `command` on the server (named `None`), or on every primary of a cluster (each named
    /// by its address), and returns each one's reply: for commands about the server itself, such
    /// as `FUNCTION`, whose answer may differ from primary to primary.
    pub(super) async fn on_primaries(
        &mut self,
        command: Cmd,
    ) -> RedisResult<Vec<(Option<String>, RedisResult<Value>)>> {
        match self {
            Handle::Single(manager) => Ok(vec![(None, command.query_async(manager).await)]),
            Handle::Cluster(connection) => {
                // Without a response policy the driver answers with a map of address to reply,
                // errors included, instead of failing the whole command for one primary.
                let routing = RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None));
                let reply = connection.route_command(command, routing).await?;
                let Value::Map(replies) = reply else {
                    return Err((
                        ::redis::ErrorKind::UnexpectedReturnType,
                        "expected one reply per primary",
                    )
                        .into());
                };
                Ok(replies
                    .into_iter()
                    .map(|(address, reply)| {
                        let address = match address {
                            Value::BulkString(bytes) => {
                                String::from_utf8_lossy(&bytes).into_owned()
                            }
                            other => format!("{other:?}"),
                        };
                        let reply = match reply {
                            Value::ServerError(e) => Err(e.into()),
                            value => Ok(value),
                        };
                        (Some(address), reply)
                    })
                    .collect())
            }
        }
    }

    /// Deletes `keys` with UNLINK and returns how many existed.
    pub(super) async fn unlink<K: ToRedisArgs + Sync>(&mut self, keys: &[K]) -> RedisResult<u64> {
        let mut deleted = 0;
        for round in keys.chunks(KEYS_PER_UNLINK * UNLINKS_PER_ROUND) {
            let chunks = round.chunks(KEYS_PER_UNLINK);
            let counts: Vec<u64> = match self {
                Handle::Single(manager) => {
                    let mut pipe = ::redis::pipe();
                    for chunk in chunks {
                        pipe.cmd("UNLINK").arg(chunk);
                    }
                    pipe.query_async(manager).await?
                }
                // One UNLINK per slot, routed to the slot's primary and sent concurrently over
                // the driver's multiplexed node connections. Not one multi-slot UNLINK: redis
                // 1.8.1 silently leaves out the keys of a slot whose primary has no connection
                // (a failed primary still in its slot map) and sums the rest, so a delete would
                // be confirmed that never happened. A single-slot route instead falls back to
                // another node, follows MOVED and refreshes the slot map, or fails.
                Handle::Cluster(connection) => {
                    let mut slots: std::collections::BTreeMap<u16, Vec<Vec<u8>>> =
                        std::collections::BTreeMap::new();
                    for key in round.iter().flat_map(ToRedisArgs::to_redis_args) {
                        let slot = super::slot::key_slot(&key);
                        slots.entry(slot).or_default().push(key);
                    }
                    let unlinks = slots.iter().flat_map(|(&slot, keys)| {
                        keys.chunks(KEYS_PER_UNLINK).map(move |chunk| (slot, chunk))
                    });
                    try_join_all(unlinks.map(|(slot, chunk)| {
                        let mut cluster = connection.clone();
                        let mut unlink = ::redis::cmd("UNLINK");
                        unlink.arg(chunk);
                        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(
                            Route::new(slot, SlotAddr::Master),
                        ));
                        async move {
                            let reply = cluster.route_command(unlink, route).await?;
                            RedisResult::Ok(::redis::from_redis_value::<u64>(reply)?)
                        }
                    }))
                    .await?
                }
            };
            deleted += counts.iter().sum::<u64>();
        }
        Ok(deleted)
    }

    /// Deletes `keys`, found on the cluster primary `node` in a slot it imports, on that node
    /// itself, each slot's behind an `ASKING`: an UNLINK routed to the slot's owner reaches
    /// them only if the owner redirects it (its slot marked migrating), and a slot imported
    /// without that (an operator's half-begun resharding) would keep them, to be served once
    /// the slot is handed over. A node that does not import the slot (any more) answers MOVED,
    /// and no client can reach the key there: nothing is deleted. Returns how many existed.
    pub(super) async fn unlink_asking(
        &mut self,
        node: &Node,
        keys: &[Vec<u8>],
    ) -> RedisResult<u64> {
        let (Handle::Cluster(connection), Node::Primary { host, port, .. }) = (self, node) else {
            return Ok(0);
        };
        let mut slots: std::collections::BTreeMap<u16, Vec<&Vec<u8>>> =
            std::collections::BTreeMap::new();
        for key in keys {
            slots
                .entry(super::slot::key_slot(key))
                .or_default()
                .push(key);
        }
        let mut deleted = 0;
        for chunk in slots.values().flat_map(|keys| keys.chunks(KEYS_PER_UNLINK)) {
            // One pipeline, written as one buffer: nothing else on the node's multiplexed
            // connection comes between the ASKING and its UNLINK.
            let mut pipe = ::redis::pipe();
            pipe.cmd("ASKING").cmd("UNLINK").arg(chunk);
            let route = SingleNodeRoutingInfo::ByAddress {
                host: host.clone(),
                port: *port,
            };
            match connection.route_pipeline(pipe, 1, 1, route).await {
                Ok(replies) => {
                    if let Some(reply) = replies.first() {
                        deleted += ::redis::from_redis_value_ref::<u64>(reply)?;
                    }
                }
                Err(err) if err.code() == Some("MOVED") => {}
                Err(err) => return Err(err),
            }
        }
        Ok(deleted)
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
        Ok(::redis::from_redis_value(self.on_node(node, scan).await?)?)
    }

    /// Runs `command` on `node` itself (not routed by key): for SCAN, INFO and the cluster's
    /// per-node commands.
    pub(super) async fn on_node(&mut self, node: &Node, command: Cmd) -> RedisResult<Value> {
        match (self, node) {
            (Handle::Cluster(connection), Node::Primary { host, port, .. }) => {
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                connection.route_command(command, routing).await
            }
            (Handle::Single(manager), _) => command.query_async(manager).await,
            (Handle::Cluster(_), Node::Only) => Err(::redis::RedisError::from((
                ::redis::ErrorKind::Client,
                "a cluster command needs a primary to run on",
            ))),
        }
    }
}

/// Reads the distinct primaries and their slot ranges from a CLUSTER SLOTS reply: per slot range
/// `[start, end, [host, port, id, ...], replicas...]`. An empty host means the answering node,
/// which is the seed only in the one case Redis sends it (a lone node that never met another).
fn primaries(reply: Value, seed_host: &str) -> RedisResult<Vec<Node>> {
    let ranges: Vec<Vec<Value>> = ::redis::from_redis_value(reply)?;
    let mut found: Vec<Node> = Vec::new();
    for range in ranges {
        let mut fields = range.into_iter();
        let (Some(start), Some(end), Some(primary)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let range: (u16, u16) = (
            ::redis::from_redis_value(start)?,
            ::redis::from_redis_value(end)?,
        );
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
        let known = found.iter_mut().find_map(|node| match node {
            Node::Primary {
                host: h,
                port: p,
                slots,
            } if *h == host && *p == port => Some(slots),
            _ => None,
        });
        match known {
            Some(slots) => slots.push(range),
            None => found.push(Node::Primary {
                host,
                port,
                slots: vec![range],
            }),
        }
    }
    Ok(found)
}

/// The TLS material `options` give, if any: a client certificate needs its key, and either
/// needs a rediss:// URL, or it would silently go unused.
fn tls_certificates(
    url: &str,
    target: &str,
    options: &DeleterOptions,
) -> Result<Option<TlsCertificates>, DeleteError> {
    let refuse = |reason: &str| DeleteError::InvalidSettings {
        target: target.to_owned(),
        reason: reason.to_owned(),
    };
    let client_tls = match (&options.tls_cert_pem, &options.tls_key_pem) {
        (Some(cert), Some(key)) => Some(ClientTlsConfig {
            client_cert: cert.clone(),
            client_key: key.clone(),
        }),
        (None, None) => None,
        _ => {
            return Err(refuse(
                "a TLS client certificate needs both its certificate and its key",
            ));
        }
    };
    let certificates =
        (options.tls_ca_pem.is_some() || client_tls.is_some()).then(|| TlsCertificates {
            client_tls,
            root_cert: options.tls_ca_pem.clone(),
        });
    if certificates.is_some() && !url.starts_with("rediss://") {
        return Err(refuse(
            "a CA file or client certificate needs a rediss:// URL",
        ));
    }
    Ok(certificates)
}

/// Whether the server behind `manager` runs in cluster mode, for `[redis] cluster` unset. A
/// server that cannot be asked for a reason that passes fails the connect; one that refuses
/// to say is taken for a single server.
async fn detect_cluster(
    manager: &mut ConnectionManager,
    target: &str,
) -> Result<bool, DeleteError> {
    match cluster_enabled(manager).await {
        Ok(enabled) => {
            tracing::info!(target_url = %target, cluster = enabled,
                "redis mode detected from INFO cluster");
            Ok(enabled)
        }
        Err(err) if crate::error::Classify::is_transient(&err) => Err(DeleteError::Redis {
            target: target.to_owned(),
            action: "INFO cluster",
            source: err,
        }),
        // INFO renamed, disabled or denied by ACL: the server does not say, so it is
        // taken for a single one; set `[redis] cluster` to say otherwise.
        Err(err) => {
            tracing::warn!(target_url = %target, error = %err,
                "cannot detect redis cluster mode; assuming a single server \
                 (set [redis] cluster to choose)");
            Ok(false)
        }
    }
}

/// How a single-server connection times out and reconnects.
fn manager_config(options: &DeleterOptions) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(options.connection_timeout))
        .set_response_timeout(Some(options.response_timeout))
        // One quick retry rides out a blip; longer outages are the pipeline's backoff.
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_millis(500))
}

/// Settings the driver refused; its URL errors are fixed texts that never echo the URL or the
/// password.
fn invalid_settings(target: &str, err: ::redis::RedisError) -> DeleteError {
    DeleteError::InvalidSettings {
        target: target.to_owned(),
        reason: err.to_string(),
    }
}

/// The first connection failed.
fn connect_error(target: &str, source: ::redis::RedisError) -> DeleteError {
    DeleteError::Redis {
        target: target.to_owned(),
        action: "connect",
        source,
    }
}

/// Builds the cluster client; the caller opens the first connection.
fn open_cluster(
    url: &str,
    options: &DeleterOptions,
    certificates: Option<TlsCertificates>,
) -> RedisResult<Cluster> {
    Ok(Cluster {
        client: build_cluster_client(vec![url.to_owned()], options, &certificates)?,
        connection: None,
        seed_url: url.to_owned(),
        options: options.clone(),
        certificates,
        known: Vec::new(),
        reseed: false,
    })
}

/// A cluster client seeded with `seeds`.
fn build_cluster_client(
    seeds: Vec<String>,
    options: &DeleterOptions,
    certificates: &Option<TlsCertificates>,
) -> RedisResult<ClusterClient> {
    let mut builder = ClusterClientBuilder::new(seeds)
        .connection_timeout(options.connection_timeout)
        .response_timeout(options.response_timeout)
        // The pipeline retries with its own backoff; the driver's retries only add delay.
        .retries(1);
    if let Some(certificates) = certificates {
        builder = builder.certs(certificates.clone());
    }
    builder.build()
}

/// Every node address in a CLUSTER SLOTS reply, primaries and replicas; an empty host is
/// `seed_host` (see [`primaries`]). A reply of another shape yields nothing.
fn announced(reply: &Value, seed_host: &str) -> Vec<(String, u16)> {
    let Ok(ranges) = ::redis::from_redis_value_ref::<Vec<Vec<Value>>>(reply) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for node in ranges.iter().flat_map(|range| range.iter().skip(2)) {
        let Ok(fields) = ::redis::from_redis_value_ref::<Vec<Value>>(node) else {
            continue;
        };
        let [host, port, ..] = fields.as_slice() else {
            continue;
        };
        let (Ok(host), Ok(port)) = (
            ::redis::from_redis_value_ref::<String>(host),
            ::redis::from_redis_value_ref::<u16>(port),
        ) else {
            continue;
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
    found
}

/// `url` with its host and port replaced: the same scheme, credentials and database.
fn with_address(url: &str, host: &str, port: u16) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("redis", url));
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let credentials = authority
        .rsplit_once('@')
        .map_or(String::new(), |(user, _)| format!("{user}@"));
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    format!("{scheme}://{credentials}{host}:{port}{tail}")
}

/// Asks a server whether it runs in cluster mode (`INFO cluster` says `cluster_enabled:1`).
async fn cluster_enabled(manager: &mut ConnectionManager) -> RedisResult<bool> {
    let info: String = ::redis::cmd("INFO")
        .arg("cluster")
        .query_async(manager)
        .await?;
    Ok(info
        .lines()
        .any(|line| line.trim_end() == "cluster_enabled:1"))
}

#[cfg(test)]
mod tests {
    #[test]
    fn other_nodes_get_the_seed_url_with_their_address() {
        assert_eq!(
            with_address("rediss://app:pw@seed.internal:7000/0?x=1", "10.0.0.2", 7001),
            "rediss://app:pw@10.0.0.2:7001/0?x=1"
        );
        assert_eq!(
            with_address("redis://127.0.0.1:7000", "::1", 7002),
            "redis://[::1]:7002"
        );
    }

    #[test]
    fn every_announced_node_is_known_replicas_included() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(0),
                Value::Int(99),
                node("a", 1),
                node("b", 2),
            ]),
            Value::Array(vec![
                Value::Int(100),
                Value::Int(16383),
                node("", 3),
                node("a", 1),
            ]),
        ]);
        assert_eq!(
            announced(&reply, "seed"),
            [
                ("a".to_owned(), 1),
                ("b".to_owned(), 2),
                ("seed".to_owned(), 3)
            ]
        );
    }

    use super::*;

    fn node(host: &str, port: u16, slots: &[(u16, u16)]) -> Node {
        Node::Primary {
            host: host.into(),
            port,
            slots: slots.to_vec(),
        }
    }

    fn range(start: i64, end: i64, host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ]),
        ])
    }

    #[test]
    fn cluster_slots_give_each_primary_its_ranges() {
        let reply = Value::Array(vec![
            range(0, 5460, "10.0.0.1", 7000),
            range(5461, 10922, "10.0.0.2", 7001),
            range(10923, 12000, "10.0.0.3", 7002),
            range(12001, 16383, "10.0.0.1", 7000),
        ]);
        let nodes = primaries(reply, "seed").expect("parse");
        assert_eq!(
            nodes,
            [
                node("10.0.0.1", 7000, &[(0, 5460), (12001, 16383)]),
                node("10.0.0.2", 7001, &[(5461, 10922)]),
                node("10.0.0.3", 7002, &[(10923, 12000)]),
            ]
        );
        assert!(nodes[0].owns(16383) && nodes[0].owns(0) && !nodes[0].owns(5461));
        assert!(Node::Only.owns(42));
    }

    #[test]
    fn an_empty_host_is_the_seed() {
        let nodes = primaries(Value::Array(vec![range(0, 16383, "", 7000)]), "seed");
        assert_eq!(nodes.expect("parse"), [node("seed", 7000, &[(0, 16383)])]);
    }
}
