//! The live key index (`[redis] key_index = true`): the keys under the rules' pattern prefixes,
//! kept in memory from keyspace notifications, so that a pattern costs its matches instead of a
//! walk of the whole keyspace.
//!
//! ```text
//!  index task: CONFIG SET notify-keyspace-events +Kgxen ─▶ PSUBSCRIBE __keyspace@<db>__:<prefix>*
//!              (+ SUBSCRIBE <barrier channel>) ─▶ INFO replication ─▶ SCAN MATCH <prefix>* ─▶ Ready
//!              events: new/set/... insert the key, del/expired/evicted/rename_from/move_from remove it
//!  deleter:    barrier (MULTI; CONFIG GET; INFO replication; [probe key]; PUBLISH <barrier> <token>;
//!              EXEC) ─▶ token seen ─▶ range the set from each pattern's literal prefix ─▶ UNLINK ─▶ WAIT
//!  cluster:    one such index per primary, each on its own connections to that primary; per batch:
//!              every primary's CLUSTER NODES ─▶ every barrier ─▶ every CLUSTER NODES again, equal
//! ```
//!
//! The deleter falls back to the shared SCAN walk whenever the index cannot prove itself: still
//! building (or a cluster's primaries just changed), unavailable (CONFIG refused), full, a
//! pattern outside the indexed prefixes, a barrier that failed, or a cluster slot moving. One
//! batch is resolved entirely by one or the other.
//!
//! Why a barrier proves a server's index current: Redis runs one command at a time, and a
//! command that creates a key calls the keyspace notification while it runs, which appends the
//! `new` event to the output buffer of every subscriber whose pattern matches before the command
//! returns. The barrier's `PUBLISH` runs after every command that completed before it, so its
//! message lands in the index's subscription buffer behind the events of all those commands, and
//! one connection delivers its buffer in order. The index task applies the messages in that
//! order, so once it has seen the barrier's token, every key created before the `PUBLISH` is in
//! the index, unless a later event removed it again. The `CONFIG GET` in the same transaction
//! shows that the events were still on (`K` and `n`) at that instant; where it cannot show `n`
//! (Redis prints `A` alone when every class is on), the transaction also creates and deletes a
//! probe key, whose `new` event must arrive before the token. The subscription is the one that
//! was already there when the initial `SCAN` started (a new one starts the index over), so a key
//! that existed before it and never changed since was returned by that full `SCAN`. A `PUBLISH`
//! that no subscriber received means the subscription is gone (or the connection now reaches
//! another server).
//!
//! Data that arrives without events: a full resync replaces a replica's whole dataset and
//! announces no key. The build records the server's `master_replid` after its subscription is
//! confirmed and before its first SCAN page, and every barrier reads it again in its transaction:
//! a primary's data is replaced only by turning replica (which takes its primary's id) and being
//! promoted again (which draws a new one), so the same id at both instants shows that no resync
//! came in between, and another one starts the index over. A replica can resync without its id
//! changing, so a barrier proves nothing while the server is one (`role:master` in the same
//! reply). `REPLICAOF` and back on a single server, and a fail back to the same address in a
//! cluster, are both caught so.
//!
//! On a Redis Cluster, keyspace notifications are node-local, and so is a `PUBLISH`'s delivery
//! to a node's own subscribers during the command, and its reply (only that node's receivers).
//! Each primary therefore has a server index of its own, subscribed, scanned and barriered on
//! connections to that primary alone, with a probe key whose hash tag falls in a slot it serves.
//! A batch is proven thus: (1) read every indexed primary's `CLUSTER NODES`; the primaries any
//! of them names must be exactly the indexed ones (else the indexes are reconciled and the batch
//! falls back as building), none may show a migrating or importing slot on its own line (else
//! `moving`); (2) every primary that serves a slot passes its barrier, each at some instant t_N
//! between the reads; (3) read them again: every own line (slots, markers, role, configuration
//! epoch) and the set of primaries must equal the first read (else `moving`). The union of the
//! primaries' matches is unlinked through the cluster connection, which routes each key to its
//! slot's primary.
//!
//! Why that misses no key K present on its slot's owner from before the batch to its end: let O
//! own K's slot s at the first read. At the second read O's line is unchanged, so O owns s then
//! too. A key reaches another primary only by `RESTORE` (what `MIGRATE` sends) into a node that
//! imports its slot or serves it, and a slot changes owner only by `CLUSTER SETSLOT ... NODE`
//! after importing, which bumps the importer's configuration epoch, or by a failover, which
//! bumps the new primary's epoch and changes the roles: each of these shows in a line of one of
//! the reads unless it was undone within the window, and undoing it changes an epoch again. So
//! O owned s throughout, K stayed on O, and the barrier at t_O proves that K (created before t_O,
//! not removed since) is in O's index. A primary that serves no slot holds no key a client can
//! reach, and a slot imported into it shows its marker, so it is not asked. Keys moved out of
//! a slot and back within the window without a marker at either read were absent from their
//! owner in between, which the promise does not cover. The cluster connection's slot map is read
//! again whenever the topology differs from the last proven batch's, so the UNLINKs follow it,
//! and whenever a primary's index started over since (a primary restarted at its address shows
//! the same line, and the connection to the killed process would only time out).

mod cluster;
mod flags;
mod keys;
mod node;
mod probe;
mod task;

pub use probe::KeyIndexCheck;

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};

use self::keys::prefix_free;
use self::node::{NodeIndex, Unproven};
use super::DeleterOptions;
use super::connection::Connection;

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
/// building, unavailable, full, a pattern outside the indexed prefixes, a failed barrier, a
/// cluster slot migrating (or the cluster's slots changing while the batch was proven).
pub const KEY_INDEX_FALLBACKS: [&str; 6] = [
    "building",
    "unavailable",
    "full",
    "uncovered",
    "lost",
    "moving",
];

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
    /// A cluster slot is migrating, or the slots changed owner while the batch was proven.
    Moving,
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
    /// The server's `master_replid` when this epoch's build started (after its subscription
    /// was confirmed, before its first SCAN page): a barrier that sees another one may be
    /// looking at data a resync replaced without events.
    replid: Option<String>,
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

/// The deleter's side of the index: one server's, or one per primary of a cluster.
pub(super) struct Index {
    /// The index of each server.
    servers: Servers,
    /// The indexed prefixes, prefix-free.
    prefixes: Vec<Vec<u8>>,
    /// Patterns resolved so far.
    resolutions: u64,
    /// Fallbacks so far, by [`Fallback`].
    fallbacks: [u64; KEY_INDEX_FALLBACKS.len()],
}

/// The servers indexed.
enum Servers {
    /// A single server.
    Single(NodeIndex),
    /// Every primary of a cluster.
    Cluster(cluster::Primaries),
}

impl Index {
    /// Starts the index of the deleter's `connection` (a single server, or a cluster whose
    /// primaries are learnt here and at every resolution): each server's task on connections
    /// of its own. `seed_host` stands for a cluster node that does not know its own address.
    pub(super) async fn spawn(
        connection: &mut Connection,
        target: &str,
        seed_host: &str,
        options: &DeleterOptions,
        key_index: &KeyIndexOptions,
    ) -> Result<Index, ::redis::RedisError> {
        let servers = match connection.single_client() {
            Some(client) => Servers::Single(NodeIndex::spawn(
                client,
                target.to_owned(),
                options,
                key_index,
                false,
            )?),
            None => {
                let mut primaries = cluster::Primaries::new(target, seed_host, options, key_index);
                // Best effort: the first resolution learns them otherwise.
                let _ = primaries.prove(connection, &[]).await;
                Servers::Cluster(primaries)
            }
        };
        Ok(Index {
            servers,
            prefixes: prefix_free(&key_index.prefixes),
            resolutions: 0,
            fallbacks: [0; KEY_INDEX_FALLBACKS.len()],
        })
    }

    /// Its state now: on a cluster, Ready (holding the sum of the keys) only when every
    /// primary's index is, else the worst state among them.
    pub(super) fn state(&self) -> KeyIndexState {
        match &self.servers {
            Servers::Single(index) => index.state(),
            Servers::Cluster(primaries) => primaries.state(),
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

    /// The keys that `patterns` match, once every server's index was proven current (see the
    /// module documentation); else why the walk must resolve them. `connection` is the
    /// deleter's, through which a cluster's primaries are first learnt. A driver error comes
    /// with the reason, for the log.
    pub(super) async fn prove(
        &mut self,
        connection: &mut Connection,
        patterns: &[String],
    ) -> Result<Vec<Vec<u8>>, Unproven> {
        if !patterns.iter().all(|p| keys::covered(p, &self.prefixes)) {
            return Err((Fallback::Uncovered, None));
        }
        match &mut self.servers {
            Servers::Single(index) => index.prove(patterns, None).await,
            Servers::Cluster(primaries) => primaries.prove(connection, patterns).await,
        }
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
