//! The index of one server (a single server, or one primary of a cluster): its task, its
//! subscription and its own connection for the barrier.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{
    Fallback, KeyIndexOptions, KeyIndexState, Phase, Seen, Shared, flags, keys, lock, task,
};
use crate::error::Classify;
use crate::redis::DeleterOptions;
use crate::redis::connection::{Connection, Handle, Node};
use crate::redis::topology::Myself;

/// Why a server's index cannot resolve a batch, with the driver error when there was one.
pub(super) type Unproven = (Fallback, Option<::redis::RedisError>);

/// The deleter's side of one server's index.
pub(super) struct NodeIndex {
    /// The state shared with the task.
    shared: Arc<Mutex<Shared>>,
    /// The last barrier token the task has seen on its subscription, and whether the probe
    /// key's creation came before it (since the token before).
    seen: watch::Receiver<Seen>,
    /// Tells the task to start over.
    rebuild: Arc<Notify>,
    /// Its own connection to the server, for the barrier and, on a cluster, `CLUSTER NODES`.
    barrier: Connection,
    /// The private channel barrier tokens are published on, also the start of the probe key.
    channel: String,
    /// The last token published.
    token: u64,
    /// Whether the next barrier creates the probe key: while the flags read last hide `n`.
    probe: bool,
    /// See [`KeyIndexOptions::max_keys`].
    max_keys: usize,
    /// How long the task may take to see a token.
    barrier_timeout: Duration,
    /// Stops the task when the deleter goes.
    _stop: DropGuard,
}

impl NodeIndex {
    /// Starts the index task of the server `client` reaches, on connections of its own: one
    /// for the task's CONFIG and SCAN, one for the barrier, and the subscription. `cluster`:
    /// the server is a cluster primary, whose probe key must hash to a slot it serves.
    pub(super) fn spawn(
        client: ::redis::Client,
        target: String,
        options: &DeleterOptions,
        key_index: &KeyIndexOptions,
        cluster: bool,
    ) -> ::redis::RedisResult<NodeIndex> {
        let stop = CancellationToken::new();
        let (seen_tx, seen) = watch::channel(Seen::default());
        let index = NodeIndex {
            shared: Arc::new(Mutex::new(Shared {
                keys: BTreeSet::new(),
                phase: Phase::Building,
                epoch: 0,
                replid: None,
            })),
            seen,
            rebuild: Arc::new(Notify::new()),
            barrier: Connection::lazy(client.clone(), options)?,
            channel: barrier_channel(),
            token: 0,
            probe: true,
            max_keys: key_index.max_keys.max(1),
            barrier_timeout: options.response_timeout,
            _stop: stop.clone().drop_guard(),
        };
        let prefixes = keys::prefix_free(&key_index.prefixes);
        let shown: Vec<String> = prefixes
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        tracing::info!(target_url = %target, prefixes = ?shown, max_keys = index.max_keys,
            "key index building");
        let db = client.get_connection_info().redis_settings().db();
        let task = task::Task {
            connection: Connection::lazy(client.clone(), options)?,
            client,
            shared: index.shared.clone(),
            seen: seen_tx,
            rebuild: index.rebuild.clone(),
            channel: index.channel.clone(),
            keyspace: keys::channel_prefix(db),
            prefixes,
            max_keys: index.max_keys,
            cluster,
            target,
            connection_timeout: options.connection_timeout,
            response_timeout: options.response_timeout,
        };
        tokio::spawn(task.run(stop));
        Ok(index)
    }

    /// Its state now.
    pub(super) fn state(&self) -> KeyIndexState {
        let shared = lock(&self.shared);
        match &shared.phase {
            Phase::Building => KeyIndexState::Building,
            Phase::Ready => KeyIndexState::Ready {
                keys: shared.keys.len(),
            },
            Phase::Full => KeyIndexState::Full {
                max_keys: self.max_keys,
            },
            Phase::Unavailable(reason) => KeyIndexState::Unavailable(reason.clone()),
        }
    }

    /// The server's `CLUSTER NODES` text, asked on the barrier's connection (a connection
    /// problem replaces it).
    pub(super) async fn cluster_nodes(&mut self) -> ::redis::RedisResult<String> {
        let mut command = ::redis::cmd("CLUSTER");
        command.arg("NODES");
        let reply = match self.barrier.handle().await {
            Ok(mut handle) => handle.on_node(&Node::Only, command).await,
            Err(err) => Err(err),
        };
        let text = reply.and_then(|reply| Ok(::redis::from_redis_value(reply)?));
        if let Err(err) = &text
            && err.is_transient()
        {
            self.barrier.reset();
        }
        text
    }

    /// The keys of the index that `patterns` match, once a barrier proved it current (see the
    /// module documentation); else why the walk must resolve them. `myself`: the server's own
    /// `CLUSTER NODES` line on a cluster, whose slots the probe key must hash to.
    pub(super) async fn prove(
        &mut self,
        patterns: &[String],
        myself: Option<&Myself>,
    ) -> Result<Vec<Vec<u8>>, Unproven> {
        let epoch = self.ready_epoch().map_err(|why| (why, None))?;
        self.token += 1;
        let token = self.token;
        let probe = self
            .probe
            .then(|| probe_key(&self.channel, myself))
            .flatten();
        let reply = match self.barrier.handle().await {
            Ok(mut handle) => barrier(&mut handle, &self.channel, token, probe.as_deref()).await,
            Err(err) => Err(err),
        };
        let reply = match reply {
            Ok(reply) => reply,
            Err(err) => {
                // A refusal (CONFIG renamed or denied since) is for a rebuild to find out; a
                // connection problem says nothing about the index, only about the connection.
                if task::refused(&err) {
                    self.restart(epoch, "the barrier was refused");
                } else if err.is_transient() {
                    self.barrier.reset();
                }
                return Err((Fallback::Lost, Some(err)));
            }
        };
        let flags = reply.flags.unwrap_or_default();
        self.probe = !flags::shows_new(&flags);
        if reply.receivers == 0 {
            self.restart(epoch, "its subscription is gone");
            return Err((Fallback::Lost, None));
        }
        let seen = self.seen.wait_for(|s| s.token >= token);
        let seen = match tokio::time::timeout(self.barrier_timeout, seen).await {
            Ok(Ok(seen)) => Some(*seen),
            _ => None,
        };
        let Some(seen) = seen else {
            self.restart(
                epoch,
                "its subscription did not deliver the barrier in time",
            );
            return Err((Fallback::Lost, None));
        };
        let created = seen.token == token && seen.probe_created;
        if !flags::proves(&flags, probe.is_some().then_some(created)) {
            // Flags that now hide `n` while this barrier had no probe prove nothing either way:
            // the next one has a probe.
            if probe.is_some() || flags::shows_new(&flags) {
                self.restart(epoch, &format!("notify-keyspace-events is now {flags:?}"));
            }
            return Err((Fallback::Lost, None));
        }
        // A replica's data can be replaced by a full resync without its replication id
        // changing; a primary's only by turning replica, and its promotion changes the id.
        if !reply.primary {
            return Err((Fallback::Lost, None));
        }
        let shared = lock(&self.shared);
        if shared.epoch != epoch || shared.phase != Phase::Ready {
            return Err((Fallback::Lost, None));
        }
        if shared.replid != reply.replid {
            drop(shared);
            self.restart(
                epoch,
                "its server's master_replid changed since the build: a resync may have \
                 replaced its data without events",
            );
            return Err((Fallback::Lost, None));
        }
        Ok(keys::matching(&shared.keys, patterns))
    }

    /// The epoch of a ready index, or why it is not.
    pub(super) fn ready_epoch(&self) -> Result<u64, Fallback> {
        let shared = lock(&self.shared);
        match shared.phase {
            Phase::Ready => Ok(shared.epoch),
            Phase::Building => Err(Fallback::Building),
            Phase::Full => Err(Fallback::Full),
            Phase::Unavailable(_) => Err(Fallback::Unavailable),
        }
    }

    /// Drops the index of `epoch` and has the task rebuild it, unless it started over already.
    fn restart(&self, epoch: u64, why: &str) {
        let mut shared = lock(&self.shared);
        if shared.epoch != epoch || shared.phase != Phase::Ready {
            return;
        }
        tracing::warn!(
            reason = why,
            "key index not proven current; rebuilding it, patterns \
            use the SCAN walk meanwhile"
        );
        shared.epoch += 1;
        shared.phase = Phase::Building;
        shared.keys = BTreeSet::new();
        drop(shared);
        self.rebuild.notify_one();
    }
}

/// Creates and deletes the probe `key` in one transaction (never visible outside it), as a
/// barrier does: what the index task and `check` try once, so that a user who may not write it
/// is told so instead of failing every barrier. Errors come with what was being done.
pub(super) async fn write_probe(
    manager: &mut ::redis::aio::ConnectionManager,
    key: &str,
) -> Result<(), (String, ::redis::RedisError)> {
    let mut pipe = ::redis::pipe();
    pipe.atomic()
        .cmd("SET")
        .arg(key)
        .arg("")
        .ignore()
        .cmd("DEL")
        .arg(key)
        .ignore();
    let written: ::redis::RedisResult<()> = pipe.query_async(manager).await;
    written.map_err(|err| {
        let action = format!(
            "writing the barrier's probe key {key} (needed where notify-keyspace-events shows A, \
             which hides n)"
        );
        (action, err)
    })
}

/// The probe key of the index on `channel`: the channel with a hash tag, `{}` on a single
/// server, and on a cluster primary (`myself`) one whose slot it serves, so that the primary
/// itself writes it; `None` for a primary that serves no slot.
pub(super) fn probe_key(channel: &str, myself: Option<&Myself>) -> Option<String> {
    let Some(myself) = myself else {
        return Some(format!("{channel}{{}}"));
    };
    // A primary serving one slot of 16384 needs at most a few ten thousand tries.
    (0u32..1 << 20)
        .map(|n| n.to_string())
        .find(|tag| myself.owns(crate::redis::slot::key_slot(tag.as_bytes())))
        .map(|tag| format!("{channel}{{{tag}}}"))
}

/// What one barrier transaction answered.
struct Barrier {
    /// `notify-keyspace-events` at that instant, if it could be read.
    flags: Option<String>,
    /// The server's `master_replid` then.
    replid: Option<String>,
    /// Whether it was a primary then.
    primary: bool,
    /// How many subscribers received the token (0: the index's subscription is gone).
    receivers: u64,
}

/// One round trip on the barrier's connection: the flags in force, the replication id and role,
/// and the barrier's `PUBLISH` in one transaction, so all are those of the instant the token
/// was published.
///
/// With `probe`, the transaction also creates and deletes the probe key, whose `new` event then
/// precedes the token: Redis's `CONFIG GET` leaves `n` out when every class of `A` is on, so
/// there only the event itself shows that `new` events are published. Inside the transaction
/// the key is never visible to anyone.
async fn barrier(
    handle: &mut Handle,
    channel: &str,
    token: u64,
    probe: Option<&str>,
) -> ::redis::RedisResult<Barrier> {
    let Handle::Single(manager) = handle else {
        return Err((
            ::redis::ErrorKind::Client,
            "the key index's barrier needs a connection to one server",
        )
            .into());
    };
    let mut pipe = ::redis::pipe();
    pipe.atomic()
        .cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events")
        .cmd("INFO")
        .arg("replication");
    if let Some(key) = probe {
        pipe.cmd("SET").arg(key).arg("").cmd("DEL").arg(key);
    }
    pipe.cmd("PUBLISH").arg(channel).arg(token);
    let replies: Vec<::redis::Value> = pipe.query_async(manager).await?;
    let info: String = match replies.get(1) {
        Some(reply) => ::redis::from_redis_value_ref(reply)?,
        None => String::new(),
    };
    let receivers = match replies.last() {
        Some(reply) => ::redis::from_redis_value_ref(reply)?,
        None => 0,
    };
    Ok(Barrier {
        flags: replies.first().and_then(flags::from_reply),
        replid: replid(&info),
        primary: info.lines().any(|line| line.trim_end() == "role:master"),
        receivers,
    })
}

/// The `master_replid` of an `INFO replication` text.
pub(super) fn replid(info: &str) -> Option<String> {
    info.lines()
        .find_map(|line| line.trim_end().strip_prefix("master_replid:"))
        .map(str::to_owned)
}

/// A channel no other client uses: the process and a per-process count, so that every index
/// (one per server, and in tests many per process) has its own.
pub(super) fn barrier_channel() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "invalidator:key-index:{}:{started}:{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_primary_probes_a_key_of_its_own_slots_and_a_single_server_any() {
        assert_eq!(probe_key("c", None).as_deref(), Some("c{}"));
        let myself = Myself::of("a 1.2.3.4:1@2 myself,master - 0 0 1 connected 16383").unwrap();
        let key = probe_key("c", Some(&myself)).expect("a key");
        assert_eq!(crate::redis::slot::key_slot(key.as_bytes()), 16383);
        assert!(key.starts_with("c{"));
        let none = Myself::of("a 1.2.3.4:1@2 myself,master - 0 0 1 connected").unwrap();
        assert_eq!(probe_key("c", Some(&none)), None);
    }

    #[test]
    fn the_replication_id_is_read_from_info() {
        let info = "# Replication\r\nrole:master\r\nmaster_replid:abc\r\nmaster_replid2:000\r\n";
        assert_eq!(replid(info).as_deref(), Some("abc"));
        assert_eq!(replid("role:master"), None);
    }
}
