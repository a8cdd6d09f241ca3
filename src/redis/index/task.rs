//! The index task: sets the notification flags, subscribes, scans, then follows the events until
//! the subscription is lost, and starts over.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use super::keys::{self, Effect};
use super::{Phase, Seen, Shared, flags, lock};
use crate::redis::connection::{Connection, Handle, Node};
use crate::redis::topology::Myself;

/// How long an index that cannot work here waits before it asks again (the flags may have been
/// set by hand, CONFIG granted).
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(60);

/// Messages applied under one lock of the shared state.
const MESSAGES_PER_LOCK: usize = 1024;

/// The task and what it owns.
pub(super) struct Task {
    /// Its own connection, for CONFIG and SCAN.
    pub(super) connection: Connection,
    /// The client its subscriptions are opened from.
    pub(super) client: ::redis::Client,
    /// The state shared with the deleter.
    pub(super) shared: Arc<Mutex<Shared>>,
    /// The last barrier token seen, for the deleter.
    pub(super) seen: watch::Sender<Seen>,
    /// The deleter's request to start over.
    pub(super) rebuild: Arc<Notify>,
    /// The barrier channel, also the name of the probe key.
    pub(super) channel: String,
    /// `__keyspace@<db>__:`.
    pub(super) keyspace: String,
    /// The prefixes to index, prefix-free.
    pub(super) prefixes: Vec<Vec<u8>>,
    /// The most keys it may hold.
    pub(super) max_keys: usize,
    /// Whether the server is a cluster primary, whose probe key must hash to a slot it serves.
    pub(super) cluster: bool,
    /// The URL with its password hidden, for logs.
    pub(super) target: String,
    /// How long opening the subscription may take.
    pub(super) connection_timeout: Duration,
    /// How long a subscription's confirmation may take.
    pub(super) response_timeout: Duration,
}

/// Why one build-and-follow ended.
#[derive(Debug)]
enum Ended {
    /// More than `max_keys` keys: it stays off until restart.
    Full,
    /// It cannot work here, for this reason.
    Unavailable(String),
    /// Redis went away, the subscription ended or a request failed: start over after a backoff.
    Lost(String),
    /// The deleter found it unproven: start over now.
    Rebuild,
}

/// One SCAN page in flight.
type Page = Pin<Box<dyn Future<Output = ::redis::RedisResult<(String, Vec<Vec<u8>>)>> + Send>>;

impl Task {
    /// Builds and follows the index, starting over whenever it is lost, until `stop` fires (the
    /// deleter is gone) or it is full. Each reason is logged once until the index is ready again.
    pub(super) async fn run(mut self, stop: CancellationToken) {
        let mut delays = crate::pipeline::backoff();
        let mut said: Option<String> = None;
        loop {
            let ended = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                ended = self.serve() => ended,
            };
            if lock(&self.shared).phase == Phase::Ready {
                delays = crate::pipeline::backoff();
                said = None;
            }
            let wait = match ended {
                Ended::Full => return self.full(),
                // Backed off too: a cause that persists must not make every batch a rebuild.
                // Building at once: nothing follows the events while it waits.
                Ended::Rebuild => {
                    self.drop_keys();
                    delays.next().unwrap_or(Duration::from_secs(10))
                }
                Ended::Unavailable(reason) => {
                    if said.as_ref() != Some(&reason) {
                        tracing::warn!(target_url = %self.target, %reason,
                            "key index unavailable; patterns use the SCAN walk (it needs CONFIG \
                             GET and SET, or notify-keyspace-events with Kgxen set and CONFIG GET)");
                    }
                    lock(&self.shared).phase = Phase::Unavailable(reason.clone());
                    said = Some(reason);
                    UNAVAILABLE_RETRY
                }
                Ended::Lost(reason) => {
                    if said.as_ref() != Some(&reason) {
                        tracing::warn!(target_url = %self.target, %reason,
                            "key index lost; rebuilding it, patterns use the SCAN walk meanwhile");
                    }
                    self.lost();
                    said = Some(reason);
                    delays.next().unwrap_or(Duration::from_secs(10))
                }
            };
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// One build, then the events until it ends.
    async fn serve(&mut self) -> Ended {
        let epoch = self.begin();
        let mut handle = match self.connection.handle().await {
            Ok(handle) => handle,
            Err(err) => return Ended::Lost(format!("cannot connect: {err}")),
        };
        if let Err(ended) = self.configure(&mut handle).await {
            return ended;
        }
        lock(&self.shared).phase = Phase::Building;
        let stream = match self.subscribe().await {
            Ok(stream) => stream,
            Err(ended) => return ended,
        };
        if let Err(ended) = self.record_replid(&mut handle, epoch).await {
            return ended;
        }
        self.follow(handle, stream, epoch).await
    }

    /// Starts over: a new epoch and an empty set. Unavailable stays so until the flags are set,
    /// so that a retry does not flicker through Building.
    fn begin(&mut self) -> u64 {
        // A request to start over that came before this start is answered by it.
        let _ = self.rebuild.notified().now_or_never();
        let mut shared = lock(&self.shared);
        shared.epoch += 1;
        shared.keys = BTreeSet::new();
        shared.replid = None;
        if !matches!(shared.phase, Phase::Unavailable(_)) {
            shared.phase = Phase::Building;
        }
        shared.epoch
    }

    /// Makes sure the server publishes the events the index needs, adding the missing flags to
    /// those set. A refusal (CONFIG renamed or denied, a server without `n`) makes the index
    /// unavailable; anything else is a lost connection.
    async fn configure(&mut self, handle: &mut Handle) -> Result<(), Ended> {
        let mut get = ::redis::cmd("CONFIG");
        get.arg("GET").arg("notify-keyspace-events");
        let reply = handle.on_node(&Node::Only, get).await;
        let reply = reply.map_err(|e| judge("CONFIG GET notify-keyspace-events", e))?;
        let Some(now) = flags::from_reply(&reply) else {
            return Err(Ended::Unavailable(
                "CONFIG GET notify-keyspace-events returned nothing".to_owned(),
            ));
        };
        if let Some(wanted) = flags::merged(&now) {
            let mut set = ::redis::cmd("CONFIG");
            set.arg("SET").arg("notify-keyspace-events").arg(&wanted);
            let action = format!("CONFIG SET notify-keyspace-events {wanted}");
            handle
                .on_node(&Node::Only, set)
                .await
                .map_err(|e| judge(&action, e))?;
            tracing::info!(target_url = %self.target, was = %now, now = %wanted,
                "notify-keyspace-events set for the key index");
        }
        if !flags::shows_new(&now) {
            self.try_probe(handle).await?;
        }
        Ok(())
    }

    /// Writes the barrier's probe key once (created and deleted in one transaction), so that a
    /// user who may not write it makes the index unavailable here instead of failing every
    /// barrier: where the flags hide `n`, every barrier needs it. A cluster primary that serves
    /// no slot has no probe key yet (and no barrier), so there is nothing to try.
    async fn try_probe(&mut self, handle: &mut Handle) -> Result<(), Ended> {
        let myself = if self.cluster {
            let mut nodes = ::redis::cmd("CLUSTER");
            nodes.arg("NODES");
            let reply = handle.on_node(&Node::Only, nodes).await;
            let text = reply.and_then(|reply| Ok(::redis::from_redis_value::<String>(reply)?));
            let text = text.map_err(|e| judge("CLUSTER NODES", e))?;
            Myself::of(&text)
        } else {
            None
        };
        if self.cluster && myself.is_none() {
            return Err(Ended::Lost(
                "CLUSTER NODES has no line of its own".to_owned(),
            ));
        }
        let Some(key) = super::node::probe_key(&self.channel, myself.as_ref()) else {
            return Ok(());
        };
        let Handle::Single(manager) = handle else {
            return Err(Ended::Lost(
                "the key index needs a connection to one server".to_owned(),
            ));
        };
        let written = super::node::write_probe(manager, &key).await;
        written.map_err(|(action, e)| judge(&action, e))
    }

    /// Records the server's `master_replid` for the build of `epoch`: asked after the
    /// subscription is confirmed and before the first SCAN page, so that a resync that replaces
    /// the data after this build saw it changes the id a barrier reads.
    async fn record_replid(&mut self, handle: &mut Handle, epoch: u64) -> Result<(), Ended> {
        let mut info = ::redis::cmd("INFO");
        info.arg("replication");
        let reply = handle.on_node(&Node::Only, info).await;
        let text = reply.and_then(|reply| Ok(::redis::from_redis_value::<String>(reply)?));
        let text = text.map_err(|e| Ended::Lost(format!("INFO replication failed: {e}")))?;
        let mut shared = lock(&self.shared);
        if shared.epoch != epoch {
            return Err(Ended::Rebuild);
        }
        shared.replid = super::node::replid(&text);
        Ok(())
    }

    /// Opens the subscription: the barrier channel and every prefix's keyspace channels, both
    /// confirmed before the scan starts, so no key created during the scan can be missed.
    async fn subscribe(&mut self) -> Result<::redis::aio::PubSubStream, Ended> {
        let timeout = |what: &str| Ended::Lost(format!("{what} timed out"));
        let pubsub = tokio::time::timeout(self.connection_timeout, self.client.get_async_pubsub());
        let pubsub = pubsub.await.map_err(|_| timeout("connect"))?;
        let (mut sink, stream) = pubsub.map_err(|e| judge("connect", e))?.split();
        let channels: Vec<Vec<u8>> = self
            .prefixes
            .iter()
            .map(|prefix| [self.keyspace.as_bytes(), &keys::under(prefix)].concat())
            .collect();
        // Every probe key is the channel with a hash tag (see `node::probe_key`).
        let probes = [
            self.keyspace.as_bytes(),
            &keys::under(self.probe_start().as_bytes()),
        ]
        .concat();
        let subscribed = tokio::time::timeout(self.response_timeout, async {
            sink.subscribe(&self.channel).await?;
            sink.psubscribe(&probes).await?;
            // No prefixes (rules without pattern templates): every pattern is uncovered.
            if channels.is_empty() {
                return Ok(());
            }
            sink.psubscribe(&channels).await
        });
        // A refusal (NOPERM: Redis 7 gives a new ACL user no channels) makes the index
        // unavailable here, as a refused CONFIG does, instead of a rebuild that never succeeds.
        subscribed
            .await
            .map_err(|_| timeout("PSUBSCRIBE"))?
            .map_err(|e| judge("SUBSCRIBE and PSUBSCRIBE of the keyspace channels", e))?;
        Ok(stream)
    }

    /// Scans every prefix while applying the events, marks the index ready, and follows the
    /// events until the subscription ends or the index must start over.
    async fn follow(
        &mut self,
        handle: Handle,
        mut stream: ::redis::aio::PubSubStream,
        epoch: u64,
    ) -> Ended {
        let started = Instant::now();
        let mut prefix = 0;
        let mut probe_created = false;
        let mut page = self.page(&handle, prefix, "0");
        if page.is_none() {
            // No prefixes: nothing to scan, and every pattern is uncovered.
            self.ready(epoch, started);
        }
        loop {
            tokio::select! {
                biased;
                _ = self.rebuild.notified() => return Ended::Rebuild,
                // Before the events, so that a busy keyspace cannot hold the scan back.
                done = async { page.as_mut().expect("guarded by the condition").await },
                    if page.is_some() => {
                    let (next, found) = match done {
                        Ok(done) => done,
                        Err(err) => return Ended::Lost(format!("SCAN failed: {err}")),
                    };
                    if let Err(ended) = self.insert(epoch, found) {
                        return ended;
                    }
                    // Cursor 0 ends this prefix's SCAN, and starts the next one's.
                    if next == "0" {
                        prefix += 1;
                    }
                    page = self.page(&handle, prefix, &next);
                    if page.is_none() {
                        self.ready(epoch, started);
                    }
                }
                message = stream.next() => {
                    let Some(message) = message else {
                        return Ended::Lost("the subscription ended".to_owned());
                    };
                    let mut batch = vec![message];
                    while batch.len() < MESSAGES_PER_LOCK {
                        match stream.next().now_or_never() {
                            Some(Some(message)) => batch.push(message),
                            // Ended: the next round says so.
                            _ => break,
                        }
                    }
                    if let Err(ended) = self.apply(epoch, &batch, &mut probe_created) {
                        return ended;
                    }
                }
            }
        }
    }

    /// The SCAN page of prefix number `prefix` at `cursor`; `None` once every prefix is done.
    fn page(&self, handle: &Handle, prefix: usize, cursor: &str) -> Option<Page> {
        let glob = keys::under(self.prefixes.get(prefix)?);
        let (mut handle, cursor) = (handle.clone(), cursor.to_owned());
        Some(Box::pin(async move {
            handle.scan(&Node::Only, &cursor, Some(&glob)).await
        }))
    }

    /// What every probe key of this index begins with: its channel and the opening brace of
    /// the hash tag.
    fn probe_start(&self) -> String {
        format!("{}{{", self.channel)
    }

    /// Adds keys a SCAN returned.
    fn insert(&self, epoch: u64, found: Vec<Vec<u8>>) -> Result<(), Ended> {
        let mut shared = lock(&self.shared);
        if shared.epoch != epoch {
            return Err(Ended::Rebuild);
        }
        shared
            .keys
            .extend(found.into_iter().map(Vec::into_boxed_slice));
        self.check_size(&shared)
    }

    /// Applies keyspace events in the order they came, and passes on the last barrier token
    /// among them once the events before it are applied, with whether the probe key was
    /// created since the token before (`probe_created` carries that across batches).
    fn apply(
        &self,
        epoch: u64,
        batch: &[::redis::Msg],
        probe_created: &mut bool,
    ) -> Result<(), Ended> {
        let mut seen = None;
        let mut shared = lock(&self.shared);
        if shared.epoch != epoch {
            return Err(Ended::Rebuild);
        }
        for message in batch {
            let Ok(channel) = message.get_channel::<Vec<u8>>() else {
                continue;
            };
            if channel == self.channel.as_bytes() {
                let payload = std::str::from_utf8(message.get_payload_bytes());
                if let Some(token) = payload.ok().and_then(|p| p.parse::<u64>().ok()) {
                    seen = Some(Seen {
                        token,
                        probe_created: std::mem::take(probe_created),
                    });
                }
                continue;
            }
            let Some(key) = keys::key_of(&channel, &self.keyspace) else {
                continue;
            };
            if key.starts_with(self.probe_start().as_bytes()) {
                *probe_created |= message.get_payload_bytes() == b"new";
                continue;
            }
            match keys::effect(message.get_payload_bytes()) {
                Effect::Remove => {
                    shared.keys.remove(key);
                }
                Effect::Insert => {
                    if !shared.keys.contains(key) {
                        shared.keys.insert(key.into());
                    }
                }
            }
        }
        // Past the cap the set is still a superset of the keys: a barrier whose events are all
        // applied is passed on, so its batch is not held until its timeout.
        let size = self.check_size(&shared);
        drop(shared);
        if let Some(seen) = seen {
            self.seen.send_replace(seen);
        }
        size
    }

    /// Whether the index is over its limit. Past it while following events, the set may hold
    /// keys that went without an event (`FLUSHDB`, `FLUSHALL`, `SWAPDB`): only a fresh scan can
    /// say whether Redis holds that many, so the index starts over, and is full only when a
    /// build finds more.
    fn check_size(&self, shared: &Shared) -> Result<(), Ended> {
        if shared.keys.len() <= self.max_keys {
            return Ok(());
        }
        if shared.phase == Phase::Ready {
            tracing::info!(target_url = %self.target, keys = shared.keys.len(),
                max_keys = self.max_keys,
                "key index past key_index_max_keys; scanning again before giving up, since keys \
                 flushed without events stay in it until then");
            return Err(Ended::Rebuild);
        }
        Err(Ended::Full)
    }

    /// Marks the index of `epoch` ready, unless it started over meanwhile.
    fn ready(&self, epoch: u64, started: Instant) {
        let mut shared = lock(&self.shared);
        if shared.epoch != epoch {
            return;
        }
        shared.phase = Phase::Ready;
        tracing::info!(target_url = %self.target, keys = shared.keys.len(),
            seconds = started.elapsed().as_secs_f64(), "key index ready");
    }

    /// Drops what a lost index held (the next build starts from nothing) and its connection,
    /// which may be the broken part.
    fn lost(&mut self) {
        self.connection.reset();
        self.drop_keys();
    }

    /// Drops what the index held: the next build starts from nothing, and no barrier is proven
    /// by a set that nothing keeps current.
    fn drop_keys(&self) {
        let mut shared = lock(&self.shared);
        shared.epoch += 1;
        shared.keys = BTreeSet::new();
        shared.phase = Phase::Building;
    }

    /// Frees the set for good and says which setting to raise.
    fn full(&self) {
        let mut shared = lock(&self.shared);
        shared.epoch += 1;
        shared.keys = BTreeSet::new();
        shared.phase = Phase::Full;
        tracing::warn!(target_url = %self.target, max_keys = self.max_keys,
            "key index dropped: more than [redis] key_index_max_keys keys under its prefixes; \
             patterns use the SCAN walk until restart (raise key_index_max_keys, \
             INVALIDATOR_REDIS_KEY_INDEX_MAX_KEYS)");
    }
}

/// Whether the server refused a request (renamed, denied, invalid), rather than being busy for
/// a moment or unreachable.
pub(super) fn refused(err: &::redis::RedisError) -> bool {
    let busy = matches!(
        err.code(),
        Some("LOADING" | "BUSY" | "TRYAGAIN" | "MASTERDOWN")
    );
    err.code().is_some() && !busy
}

/// What a failed CONFIG request means: a refusal (the index cannot work here until that
/// changes), or a lost index (a connection problem).
fn judge(action: &str, err: ::redis::RedisError) -> Ended {
    if refused(&err) {
        Ended::Unavailable(format!("{action} refused: {err}"))
    } else {
        Ended::Lost(format!("{action}: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_reply_is_a_refusal_and_a_connection_problem_a_loss() {
        let reply = |code: &str| ::redis::make_extension_error(code.to_owned(), None);
        for code in ["NOPERM", "ERR"] {
            assert!(
                matches!(judge("CONFIG SET", reply(code)), Ended::Unavailable(_)),
                "{code}"
            );
        }
        assert!(matches!(
            judge("CONFIG GET", reply("LOADING")),
            Ended::Lost(_)
        ));
        let io = std::io::Error::from(std::io::ErrorKind::ConnectionReset).into();
        assert!(matches!(judge("CONFIG GET", io), Ended::Lost(_)));
    }
}
