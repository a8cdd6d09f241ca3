//! The live key index (`[redis] key_index = true`): the keys under the rules' pattern prefixes,
//! kept in memory from keyspace notifications, so that a pattern costs its matches instead of a
//! walk of the whole keyspace.
//!
//! ```text
//!  index task: CONFIG SET notify-keyspace-events +Kgxen ─▶ PSUBSCRIBE __keyspace@<db>__:<prefix>*
//!              (+ SUBSCRIBE <barrier channel>) ─▶ SCAN MATCH <prefix>* ─▶ Ready
//!              events: new/set/... insert the key, del/expired/evicted/rename_from/move_from remove it
//!  deleter:    barrier (MULTI; CONFIG GET; [probe key]; PUBLISH <barrier> <token>; EXEC) ─▶ token seen
//!              ─▶ range the set from each pattern's literal prefix ─▶ UNLINK ─▶ WAIT
//! ```
//!
//! The deleter falls back to the shared SCAN walk whenever the index cannot prove itself: still
//! building, unavailable (CONFIG refused, Redis Cluster), full, a pattern outside the indexed
//! prefixes, or a barrier that failed. One batch is resolved entirely by one or the other.
//!
//! Why a barrier proves the index current: Redis runs one command at a time, and a command that
//! creates a key calls the keyspace notification while it runs, which appends the `new` event to
//! the output buffer of every subscriber whose pattern matches before the command returns. The
//! barrier's `PUBLISH` runs after every command that completed before it, so its message lands in
//! the index's subscription buffer behind the events of all those commands, and one connection
//! delivers its buffer in order. The index task applies the messages in that order, so once it
//! has seen the barrier's token, every key created before the `PUBLISH` is in the index, unless a
//! later event removed it again. The `CONFIG GET` in the same transaction shows that the events
//! were still on (`K` and `n`) at that instant; where it cannot show `n` (Redis prints `A` alone
//! when every class is on), the transaction also creates and deletes a probe key, whose `new`
//! event must arrive before the token. The subscription is the one that was already there when
//! the initial `SCAN` started (a new one starts the index over), so a key that existed before it
//! and never changed since was returned by that full `SCAN`. A `PUBLISH` that no subscriber
//! received means the subscription is gone (or the connection now reaches another server).

mod flags;
mod keys;
mod probe;
mod task;

pub use probe::KeyIndexCheck;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::keys::prefix_free;
use super::connection::{Connection, Handle};

/// What the key index covers; `run` builds it from the loaded rules.
#[derive(Clone, Debug)]
pub struct KeyIndexOptions {
    /// The key prefixes to index: the literal prefixes of the rules' pattern templates, fixed at
    /// start. A pattern whose literal prefix is under none of them is resolved by the walk.
    pub prefixes: Vec<String>,
    /// The most keys the index may hold; past that it is dropped and stays off until restart.
    pub max_keys: usize,
}

impl KeyIndexOptions {
    /// Options for the keys under `prefixes`, made prefix-free (a prefix that a shorter one
    /// covers adds nothing, and an empty one covers every key), holding at most `max_keys`.
    pub fn new(prefixes: impl IntoIterator<Item = String>, max_keys: usize) -> KeyIndexOptions {
        let prefixes: Vec<String> = prefixes.into_iter().collect();
        KeyIndexOptions {
            // Each kept prefix is one of the strings given, whole, so it is valid UTF-8.
            prefixes: prefix_free(&prefixes)
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect(),
            max_keys,
        }
    }
}

/// What the key index can do right now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyIndexState {
    /// `[redis] key_index` is off.
    Off,
    /// Subscribing and scanning (at start, or after the index was lost): patterns use the walk.
    Building,
    /// Current, holding `keys` keys: covered patterns are resolved from it.
    Ready {
        /// Keys held.
        keys: usize,
    },
    /// It held more than `max_keys` keys and was dropped; it stays off until restart.
    Full {
        /// The configured limit (`[redis] key_index_max_keys`).
        max_keys: usize,
    },
    /// It cannot work here, for this reason (retried every minute where that can change).
    Unavailable(String),
}

/// The reasons patterns went to the walk instead of the index, as metric labels:
/// building, unavailable, full, a pattern outside the indexed prefixes, a failed barrier.
pub const KEY_INDEX_FALLBACKS: [&str; 5] = ["building", "unavailable", "full", "uncovered", "lost"];

/// What the key index did so far, for metrics and readiness.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyIndexReport {
    /// Its state now.
    pub state: KeyIndexState,
    /// Patterns resolved from it since start.
    pub resolutions: u64,
    /// Patterns resolved by the walk instead, per reason of [`KEY_INDEX_FALLBACKS`] (same order).
    pub fallbacks: [u64; KEY_INDEX_FALLBACKS.len()],
}

/// Why one batch's patterns go to the walk (see [`KEY_INDEX_FALLBACKS`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fallback {
    /// Not built yet.
    Building,
    /// Cannot work here.
    Unavailable,
    /// Dropped for its size.
    Full,
    /// A pattern outside the indexed prefixes.
    Uncovered,
    /// The barrier failed: not proven current.
    Lost,
}

impl Fallback {
    /// Its metric label.
    pub(super) fn label(self) -> &'static str {
        KEY_INDEX_FALLBACKS[self as usize]
    }
}

/// Where the index stands, shared by the index task and the deleter.
#[derive(Debug)]
struct Shared {
    /// The keys held.
    keys: BTreeSet<Box<[u8]>>,
    /// Its state.
    phase: Phase,
    /// Bumped whenever the index starts over: a proof taken under one epoch says nothing of
    /// another.
    epoch: u64,
}

/// The state of [`Shared`], without the count.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// See [`KeyIndexState::Building`].
    Building,
    /// See [`KeyIndexState::Ready`].
    Ready,
    /// See [`KeyIndexState::Full`].
    Full,
    /// See [`KeyIndexState::Unavailable`].
    Unavailable(String),
}

/// Locks the shared state; a panic while it was held cannot leave worse than stale entries.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// The reason given while the deleter talks to a Redis Cluster.
const CLUSTER: &str = "Redis Cluster: the key index serves a single server for now";

/// The deleter's side of the index.
pub(super) struct Index {
    /// The state shared with the task.
    shared: Arc<Mutex<Shared>>,
    /// The last barrier token the task has seen on its subscription, and whether the probe
    /// key's creation came before it (since the token before).
    seen: watch::Receiver<Seen>,
    /// Tells the task to start over.
    rebuild: Arc<Notify>,
    /// The private channel barrier tokens are published on, also the name of the probe key.
    channel: String,
    /// The last token published.
    token: u64,
    /// Whether the next barrier creates the probe key: while the flags read last hide `n`.
    probe: bool,
    /// The indexed prefixes, prefix-free.
    prefixes: Vec<Vec<u8>>,
    /// See [`KeyIndexOptions::max_keys`].
    max_keys: usize,
    /// How long the task may take to see a token.
    barrier_timeout: Duration,
    /// Patterns resolved so far.
    resolutions: u64,
    /// Fallbacks so far, by [`Fallback`].
    fallbacks: [u64; KEY_INDEX_FALLBACKS.len()],
    /// Stops the task when the deleter goes.
    _stop: DropGuard,
}

/// What the index task is given.
pub(super) struct Spawn<'a> {
    /// Its own connection, for CONFIG and SCAN.
    pub(super) connection: Connection,
    /// The client its subscription is opened from.
    pub(super) client: ::redis::Client,
    /// What to index.
    pub(super) options: &'a KeyIndexOptions,
    /// The URL with its password hidden, for logs.
    pub(super) target: String,
    /// How long the subscription's connection may take.
    pub(super) connection_timeout: Duration,
    /// How long a reply (a subscription's confirmation, a barrier token) may take.
    pub(super) response_timeout: Duration,
}

impl Index {
    /// Starts the index task on its own connections.
    pub(super) fn spawn(spawn: Spawn<'_>) -> Index {
        let stop = CancellationToken::new();
        let (seen_tx, seen) = watch::channel(Seen::default());
        let timeout = spawn.response_timeout;
        let index = Index::new(spawn.options, seen, Phase::Building, stop.clone(), timeout);
        index.log_start(&spawn.target);
        let db = spawn.client.get_connection_info().redis_settings().db();
        let task = task::Task {
            connection: spawn.connection,
            client: spawn.client,
            shared: index.shared.clone(),
            seen: seen_tx,
            rebuild: index.rebuild.clone(),
            channel: index.channel.clone(),
            keyspace: keys::channel_prefix(db),
            prefixes: index.prefixes.clone(),
            max_keys: index.max_keys,
            target: spawn.target,
            connection_timeout: spawn.connection_timeout,
            response_timeout: spawn.response_timeout,
        };
        tokio::spawn(task.run(stop));
        index
    }

    /// An index that cannot work with a Redis Cluster: every pattern goes to the walk.
    pub(super) fn cluster(options: &KeyIndexOptions, target: &str) -> Index {
        tracing::warn!(target_url = %target, "[redis] key_index is on, but {CLUSTER}; \
            patterns are resolved by the SCAN walk");
        let (_, seen) = watch::channel(Seen::default());
        let phase = Phase::Unavailable(CLUSTER.to_owned());
        // No task: nothing ever waits for a token.
        Index::new(
            options,
            seen,
            phase,
            CancellationToken::new(),
            Duration::ZERO,
        )
    }

    /// An index in `phase` whose task (if any) stops with `stop` and may take `barrier_timeout`
    /// to deliver a token.
    fn new(
        options: &KeyIndexOptions,
        seen: watch::Receiver<Seen>,
        phase: Phase,
        stop: CancellationToken,
        barrier_timeout: Duration,
    ) -> Index {
        Index {
            shared: Arc::new(Mutex::new(Shared {
                keys: BTreeSet::new(),
                phase,
                epoch: 0,
            })),
            seen,
            rebuild: Arc::new(Notify::new()),
            channel: barrier_channel(),
            token: 0,
            probe: true,
            prefixes: prefix_free(&options.prefixes),
            max_keys: options.max_keys.max(1),
            barrier_timeout,
            resolutions: 0,
            fallbacks: [0; KEY_INDEX_FALLBACKS.len()],
            _stop: stop.drop_guard(),
        }
    }

    /// Logs what the index covers.
    fn log_start(&self, target: &str) {
        let prefixes: Vec<String> = self
            .prefixes
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        tracing::info!(target_url = %target, prefixes = ?prefixes, max_keys = self.max_keys,
            "key index building");
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

    /// Its state and what it did so far.
    pub(super) fn report(&self) -> KeyIndexReport {
        KeyIndexReport {
            state: self.state(),
            resolutions: self.resolutions,
            fallbacks: self.fallbacks,
        }
    }

    /// Counts `patterns` that went to the walk because of `why`.
    pub(super) fn fell_back(&mut self, why: Fallback, patterns: usize) {
        self.fallbacks[why as usize] += patterns as u64;
    }

    /// Counts `patterns` resolved from the index.
    pub(super) fn resolved(&mut self, patterns: usize) {
        self.resolutions += patterns as u64;
    }

    /// The keys of the index that `patterns` match, once a barrier on `handle` (the deleter's
    /// connection) proved it current (see the module documentation); else why the walk must
    /// resolve them. A driver error comes with [`Fallback::Lost`], for the deleter to judge.
    pub(super) async fn prove(
        &mut self,
        handle: &mut Handle,
        patterns: &[String],
    ) -> Result<Vec<Vec<u8>>, (Fallback, Option<::redis::RedisError>)> {
        let epoch = self.ready_epoch().map_err(|why| (why, None))?;
        if !patterns.iter().all(|p| keys::covered(p, &self.prefixes)) {
            return Err((Fallback::Uncovered, None));
        }
        self.token += 1;
        let (token, probed) = (self.token, self.probe);
        let (flags, receivers) = match barrier(handle, &self.channel, token, probed).await {
            Ok(reply) => reply,
            Err(err) => {
                // A refusal (CONFIG renamed or denied since) is for a rebuild to find out; a
                // connection problem says nothing about the index.
                if task::refused(&err) {
                    self.restart(epoch, "the barrier was refused");
                }
                return Err((Fallback::Lost, Some(err)));
            }
        };
        let flags = flags.unwrap_or_default();
        self.probe = !flags::shows_new(&flags);
        if receivers == 0 {
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
        if !flags::proves(&flags, probed.then_some(created)) {
            // Flags that now hide `n` while this barrier had no probe prove nothing either way:
            // the next one has a probe.
            if probed || flags::shows_new(&flags) {
                self.restart(epoch, &format!("notify-keyspace-events is now {flags:?}"));
            }
            return Err((Fallback::Lost, None));
        }
        let shared = lock(&self.shared);
        if shared.epoch != epoch || shared.phase != Phase::Ready {
            return Err((Fallback::Lost, None));
        }
        Ok(keys::matching(&shared.keys, patterns))
    }

    /// The epoch of a ready index, or why it is not.
    fn ready_epoch(&self) -> Result<u64, Fallback> {
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

/// What the index task has seen of the barriers.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Seen {
    /// The last token.
    pub(super) token: u64,
    /// Whether the probe key was created (a `new` event on its channel) between the token
    /// before and this one.
    pub(super) probe_created: bool,
}

/// One round trip on the deleter's connection: the flags in force and the barrier's `PUBLISH`
/// in one transaction, so the flags are those of the instant the token was published. Returns
/// the flags and how many subscribers received the token (0: the index's subscription is gone).
///
/// With `probe`, the transaction also creates and deletes the probe key (named like the channel),
/// whose `new` event then precedes the token: Redis's `CONFIG GET` leaves `n` out when every
/// class of `A` is on, so there only the event itself shows that `new` events are published.
/// Inside the transaction the key is never visible to anyone.
async fn barrier(
    handle: &mut Handle,
    channel: &str,
    token: u64,
    probe: bool,
) -> ::redis::RedisResult<(Option<String>, u64)> {
    let Handle::Single(manager) = handle else {
        return Err((
            ::redis::ErrorKind::Client,
            "the key index needs a single server",
        )
            .into());
    };
    let mut pipe = ::redis::pipe();
    pipe.atomic()
        .cmd("CONFIG")
        .arg("GET")
        .arg("notify-keyspace-events");
    if probe {
        pipe.cmd("SET").arg(channel).arg("").cmd("DEL").arg(channel);
    }
    pipe.cmd("PUBLISH").arg(channel).arg(token);
    let replies: Vec<::redis::Value> = pipe.query_async(manager).await?;
    let flags = replies.first().and_then(flags::from_reply);
    let receivers = match replies.last() {
        Some(reply) => ::redis::from_redis_value_ref(reply)?,
        None => 0,
    };
    Ok((flags, receivers))
}

/// A channel no other client uses: the process and a per-process count, so that every deleter
/// (one per target, and in tests many per process) has its own.
fn barrier_channel() -> String {
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
