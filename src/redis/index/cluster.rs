//! The key index of a Redis Cluster: one server index per primary, each on connections to that
//! primary alone, proven together between two reads of every primary's own `CLUSTER NODES` line.

use std::collections::BTreeMap;

use futures_util::future::join_all;

use super::node::{NodeIndex, Unproven};
use super::{Fallback, KeyIndexOptions, KeyIndexState};
use crate::error::Classify;
use crate::redis::DeleterOptions;
use crate::redis::connection::Connection;
use crate::redis::topology::{self, Myself};

/// A primary, by the address the cluster announces.
type Address = (String, u16);

/// The index of every primary.
pub(super) struct Primaries {
    /// Each primary's index, by address.
    nodes: BTreeMap<Address, NodeIndex>,
    /// The URL with its password hidden, for logs.
    target: String,
    /// The host of the URL, for a node that does not know its own address.
    seed_host: String,
    /// The deleter's settings, for the connections to each primary.
    options: DeleterOptions,
    /// What to index.
    key_index: KeyIndexOptions,
    /// The topology the last batch was proven under, and the epoch of each serving primary's
    /// index then.
    proven: Option<(Topology, BTreeMap<Address, u64>)>,
}

/// What the primaries said of the cluster at one instant, to compare with another.
#[derive(Debug, PartialEq, Eq)]
struct Topology {
    /// The primaries any of them knows.
    primaries: Vec<Address>,
    /// Each indexed primary's own line (`None`: it sent none).
    myself: BTreeMap<Address, Option<Myself>>,
}

impl Primaries {
    /// No primary yet: the first [`Primaries::prove`] learns them.
    pub(super) fn new(
        target: &str,
        seed_host: &str,
        options: &DeleterOptions,
        key_index: &KeyIndexOptions,
    ) -> Primaries {
        Primaries {
            nodes: BTreeMap::new(),
            target: target.to_owned(),
            seed_host: seed_host.to_owned(),
            options: options.clone(),
            key_index: key_index.clone(),
            proven: None,
        }
    }

    /// Ready (with the sum of the keys) when every primary's index is, else the worst state of
    /// one: Unavailable (naming the primary), Full, Building.
    pub(super) fn state(&self) -> KeyIndexState {
        let rank = |state: &KeyIndexState| match state {
            KeyIndexState::Unavailable(_) => 0,
            KeyIndexState::Full { .. } => 1,
            KeyIndexState::Off | KeyIndexState::Building => 2,
            KeyIndexState::Ready { .. } => 3,
        };
        let mut keys = 0;
        let mut worst: Option<(Address, KeyIndexState)> = None;
        for (address, index) in &self.nodes {
            let state = index.state();
            if let KeyIndexState::Ready { keys: held } = state {
                keys += held;
            }
            if worst.as_ref().is_none_or(|(_, w)| rank(&state) < rank(w)) {
                worst = Some((address.clone(), state));
            }
        }
        match worst {
            None => KeyIndexState::Building,
            Some((_, KeyIndexState::Ready { .. })) => KeyIndexState::Ready { keys },
            Some(((host, port), KeyIndexState::Unavailable(reason))) => {
                KeyIndexState::Unavailable(format!("primary {host}:{port}: {reason}"))
            }
            Some((_, state)) => state,
        }
    }

    /// The keys of every primary's index that `patterns` match, once all were proven current
    /// between two reads of the topology that agree and show no slot moving (see the module
    /// documentation); else why not. A change in the set of primaries spawns and drops indexes
    /// and gives [`Fallback::Building`].
    pub(super) async fn prove(
        &mut self,
        connection: &mut Connection,
        patterns: &[String],
    ) -> Result<Vec<Vec<u8>>, Unproven> {
        let first = self.read(connection).await?;
        if !first.primaries.iter().eq(self.nodes.keys()) {
            self.reconcile(connection, &first.primaries);
            return Err((Fallback::Building, None));
        }
        let mut serving = Vec::new();
        for (address, myself) in &first.myself {
            let Some(myself) = myself else {
                return Err((Fallback::Lost, None));
            };
            if !myself.markers.is_empty() {
                return Err((Fallback::Moving, None));
            }
            // A primary that serves no slot has no key a client can reach: a slot being
            // imported into it shows on its line.
            if !myself.slots.is_empty() {
                serving.push((address.clone(), myself.clone()));
            }
        }
        // The reason that lasts longest is the one to report: unavailable, full, building.
        let unready = serving
            .iter()
            .filter_map(|(address, _)| self.nodes[address].ready_epoch().err())
            .min_by_key(|why| match why {
                Fallback::Unavailable => 0,
                Fallback::Full => 1,
                _ => 2,
            });
        if let Some(why) = unready {
            return Err((why, None));
        }
        // All ready now, so every serving primary has an epoch.
        let epochs: BTreeMap<Address, u64> = serving
            .iter()
            .filter_map(|(address, _)| {
                Some((address.clone(), self.nodes[address].ready_epoch().ok()?))
            })
            .collect();
        // The UNLINKs of this batch go through the deleter's connection, which must follow
        // neither a slot map older than a change of the topology (a failover, a fail back, a
        // resharding) to a primary that no longer serves the slot, nor a connection to a
        // primary whose index started over: that most often lost its server (a restart at the
        // same address shows the same line), and an UNLINK on it would wait out its timeout.
        let now = (first, epochs);
        if self.proven.as_ref().is_some_and(|last| *last != now) {
            connection.reset();
        }
        let proofs = join_all(self.nodes.iter_mut().filter_map(|(address, index)| {
            let (_, myself) = serving.iter().find(|(a, _)| a == address)?;
            Some(index.prove(patterns, Some(myself)))
        }))
        .await;
        let mut doomed = Vec::new();
        for proof in proofs {
            doomed.extend(proof?);
        }
        if self.read(connection).await? != now.0 {
            return Err((Fallback::Moving, None));
        }
        self.proven = Some(now);
        Ok(doomed)
    }

    /// Every indexed primary's `CLUSTER NODES`, asked of each directly and at once (of the
    /// deleter's connection while none is indexed). A primary that does not answer is a loss,
    /// unless the others no longer count it (a failover moved its slots away).
    async fn read(&mut self, connection: &mut Connection) -> Result<Topology, Unproven> {
        if self.nodes.is_empty() {
            let text = match connection.cluster_nodes().await {
                Ok(text) => text.unwrap_or_default(),
                Err(err) => {
                    if err.is_transient() {
                        connection.reset();
                    }
                    return Err((Fallback::Lost, Some(err)));
                }
            };
            return Ok(Topology {
                primaries: topology::primaries(&text, &self.seed_host),
                myself: BTreeMap::new(),
            });
        }
        let replies =
            join_all(self.nodes.iter_mut().map(|(address, index)| async move {
                (address.clone(), index.cluster_nodes().await)
            }))
            .await;
        let mut primaries = Vec::new();
        let mut myself = BTreeMap::new();
        let mut failed = None;
        for (address, reply) in replies {
            match reply {
                Ok(text) => {
                    primaries.extend(topology::primaries(&text, &self.seed_host));
                    myself.insert(address, Myself::of(&text));
                }
                Err(err) => failed = Some((address, err)),
            }
        }
        primaries.sort();
        primaries.dedup();
        if let Some((address, err)) = failed {
            if myself.is_empty() || primaries.contains(&address) {
                return Err((Fallback::Lost, Some(err)));
            }
            // Gone from every view that answered: the comparison with the indexed set drops it.
            myself.insert(address, None);
        }
        Ok(Topology { primaries, myself })
    }

    /// Spawns an index for each primary in `primaries` that has none and drops those of the
    /// others.
    fn reconcile(&mut self, connection: &Connection, primaries: &[Address]) {
        self.nodes.retain(|address, _| {
            let kept = primaries.contains(address);
            if !kept {
                tracing::info!(target_url = %self.target, primary = %format!("{}:{}", address.0, address.1),
                    "key index of a former primary dropped");
            }
            kept
        });
        for (host, port) in primaries {
            let address = (host.clone(), *port);
            if self.nodes.contains_key(&address) {
                continue;
            }
            let target = format!("{} (primary {host}:{port})", self.target);
            let spawned = match connection.node_client(host, *port) {
                Some(Ok(client)) => {
                    NodeIndex::spawn(client, target, &self.options, &self.key_index, true)
                }
                Some(Err(err)) => Err(err),
                None => continue,
            };
            match spawned {
                Ok(index) => {
                    self.nodes.insert(address, index);
                }
                // Settings that worked for the seed: the next resolution tries again.
                Err(err) => {
                    tracing::warn!(target_url = %self.target, primary = %format!("{host}:{port}"),
                    error = %err, "cannot start the key index of a primary")
                }
            }
        }
    }
}
