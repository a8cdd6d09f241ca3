//! What `invalidator check` asks of a server for the key index: are the notification flags it
//! needs set, and if not, may this user set them; may this user subscribe to its channels; and,
//! where the flags show `A`, write its probe key.

use std::time::Duration;

use super::{flags, keys, node};
use crate::redis::connection::{Connection, Handle, Node};
use crate::redis::topology::{self, Myself};
use crate::redis::{DeleteError, Deleter};

/// Whether a server gives the key index the keyspace events it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyIndexCheck {
    /// `notify-keyspace-events` has every flag it needs already.
    Set,
    /// Flags are missing, and this user may set them: `run` adds them to `now`, making `wanted`.
    Settable {
        /// The flags now.
        now: String,
        /// What `run` sets.
        wanted: String,
    },
    /// Flags are missing (or unknown) and cannot be set here: the index is unavailable and
    /// patterns are walked.
    Refused {
        /// The flags now, when they could be read.
        now: Option<String>,
        /// The server's answer.
        reason: String,
    },
    /// The user may not subscribe to the index's channels (Redis 7 gives a new ACL user none):
    /// the index is unavailable and patterns are walked, whatever the flags.
    NoChannels {
        /// The server's answer.
        reason: String,
    },
    /// The flags show `A`, which hides `n`, so every barrier writes a probe key, and this user
    /// may not: the index is unavailable and patterns are walked.
    NoProbe {
        /// The server's answer.
        reason: String,
    },
}

impl Deleter {
    /// Whether the key index can get its keyspace events here: the server's answer (named
    /// `None`), or each cluster primary's, named by its address. Setting
    /// `notify-keyspace-events` to the value it has changes nothing and proves the permission
    /// to change it. A connection problem is an error.
    pub async fn key_index_check(
        &mut self,
    ) -> Result<Vec<(Option<String>, KeyIndexCheck)>, DeleteError> {
        let nodes = self.connection.cluster_nodes().await;
        let Some(text) = nodes.map_err(|source| self.failed("CLUSTER NODES", source))? else {
            let handle = self.connection.handle().await;
            let mut handle = handle.map_err(|source| self.failed("connect", source))?;
            let client = self.connection.single_client();
            let timeout = self.options.response_timeout;
            let found = check(&mut handle, client, false, timeout).await;
            return Ok(vec![(None, found.map_err(|(a, s)| self.failed(a, s))?)]);
        };
        let mut checks = Vec::new();
        for (host, port) in topology::primaries(&text, &self.seed_host) {
            let client = match self.connection.node_client(&host, port) {
                Some(client) => client,
                None => continue,
            };
            let connection = client
                .clone()
                .and_then(|c| Ok((c.clone(), Connection::lazy(c, &self.options)?)));
            let timeout = self.options.response_timeout;
            let found = match connection {
                Ok((client, mut connection)) => match connection.handle().await {
                    Ok(mut handle) => check(&mut handle, Some(client), true, timeout).await,
                    Err(source) => Err(("connect", source)),
                },
                Err(source) => Err(("connect", source)),
            };
            let found = found.map_err(|(a, s)| self.failed(a, s))?;
            checks.push((Some(format!("{host}:{port}")), found));
        }
        Ok(checks)
    }
}

/// What one server answers (see [`Deleter::key_index_check`]), through `handle` and, for the
/// subscription, `client` (the same server; `cluster`: a cluster primary); a connection
/// problem is the request that failed and why.
async fn check(
    handle: &mut Handle,
    client: Option<::redis::Client>,
    cluster: bool,
    timeout: Duration,
) -> Result<KeyIndexCheck, (&'static str, ::redis::RedisError)> {
    let mut get = ::redis::cmd("CONFIG");
    get.arg("GET").arg("notify-keyspace-events");
    let now = match handle.on_node(&Node::Only, get).await {
        Ok(reply) => flags::from_reply(&reply),
        Err(err) if err.code().is_some() => {
            return Ok(KeyIndexCheck::Refused {
                now: None,
                reason: format!("CONFIG GET: {err}"),
            });
        }
        Err(source) => return Err(("CONFIG GET", source)),
    };
    let Some(now) = now else {
        return Ok(KeyIndexCheck::Refused {
            now: None,
            reason: "CONFIG GET notify-keyspace-events returned nothing".to_owned(),
        });
    };
    // `run` makes the index unavailable where its subscription is refused, whatever the
    // flags: a user allowed CONFIG but no channel would otherwise pass here.
    if let Some(client) = client
        && let Some(reason) = subscription_refused(&client, timeout).await?
    {
        return Ok(KeyIndexCheck::NoChannels { reason });
    }
    // `run` keeps `A` (the flags it adds do not remove it), and `A` hides `n`: the index then
    // writes its probe key at every barrier, and is unavailable where it may not.
    if !flags::shows_new(&now)
        && let Some(reason) = probe_refused(handle, cluster).await?
    {
        return Ok(KeyIndexCheck::NoProbe { reason });
    }
    let Some(wanted) = flags::merged(&now) else {
        return Ok(KeyIndexCheck::Set);
    };
    let mut same = ::redis::cmd("CONFIG");
    same.arg("SET").arg("notify-keyspace-events").arg(&now);
    match handle.on_node(&Node::Only, same).await {
        Ok(_) => Ok(KeyIndexCheck::Settable { now, wanted }),
        Err(err) if err.code().is_some() => Ok(KeyIndexCheck::Refused {
            now: Some(now),
            reason: format!("CONFIG SET: {err}"),
        }),
        Err(source) => Err(("CONFIG SET", source)),
    }
}

/// Subscribes as the index does, to a barrier channel and its probe keys' keyspace pattern, and
/// unsubscribes by closing: the server's refusal if it refuses. ACL grants a pattern only
/// literally (or with every channel), so one the index's cannot equal shows what the index
/// meets; the prefixes' patterns need the same grant.
async fn subscription_refused(
    client: &::redis::Client,
    timeout: Duration,
) -> Result<Option<String>, (&'static str, ::redis::RedisError)> {
    let timed_out = || {
        let err: ::redis::RedisError =
            (::redis::ErrorKind::Io, "the subscription timed out").into();
        ("SUBSCRIBE", err)
    };
    let channel = node::barrier_channel();
    let db = client.get_connection_info().redis_settings().db();
    let probes = [
        keys::channel_prefix(db).as_bytes(),
        &keys::under(format!("{channel}{{").as_bytes()),
    ]
    .concat();
    let subscribed = tokio::time::timeout(timeout, async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(&channel).await?;
        pubsub.psubscribe(&probes).await
    });
    match subscribed.await.map_err(|_| timed_out())? {
        Ok(()) => Ok(None),
        Err(err) if err.code().is_some() => Ok(Some(format!(
            "SUBSCRIBE and PSUBSCRIBE of the key index's channels: {err}"
        ))),
        Err(source) => Err(("SUBSCRIBE", source)),
    }
}

/// Writes a probe key as the index does (created and deleted in one transaction, hash-tagged
/// into one of a cluster primary's own slots): the server's refusal if it refuses. A primary
/// that serves no slot has no probe key yet, so nothing is written.
async fn probe_refused(
    handle: &mut Handle,
    cluster: bool,
) -> Result<Option<String>, (&'static str, ::redis::RedisError)> {
    let myself = if cluster {
        let mut nodes = ::redis::cmd("CLUSTER");
        nodes.arg("NODES");
        let reply = handle.on_node(&Node::Only, nodes).await;
        let text = reply.and_then(|reply| Ok(::redis::from_redis_value::<String>(reply)?));
        match text {
            Ok(text) => Myself::of(&text),
            Err(err) if err.code().is_some() => {
                return Ok(Some(format!("CLUSTER NODES: {err}")));
            }
            Err(source) => return Err(("CLUSTER NODES", source)),
        }
    } else {
        None
    };
    if cluster && myself.is_none() {
        return Ok(None);
    }
    let Some(key) = node::probe_key(&node::barrier_channel(), myself.as_ref()) else {
        return Ok(None);
    };
    let Handle::Single(manager) = handle else {
        return Ok(None);
    };
    match node::write_probe(manager, &key).await {
        Ok(()) => Ok(None),
        Err((action, err)) if err.code().is_some() => Ok(Some(format!("{action}: {err}"))),
        Err((_, source)) => Err(("writing the probe key", source)),
    }
}
