//! The sweep of the slots that moved while patterns waited for the walks (Redis Cluster).
//!
//! A key that moves between primaries while a pattern's walks run can slip past both walks, so
//! before a pattern completes, every slot that changed owner since it joined, or is migrating
//! now, is read once more where its keys can be: a migrating slot on its migrating side first,
//! then on its importing side (keys only move from the first to the second, so a key missed on
//! one is on the other); a stable slot on its owner alone, since a primary holds keys only of
//! the slots it serves or imports; a slot no primary serves on every primary. The keys read on
//! an importing side are unlinked on that node behind `ASKING`, not routed to the slot's owner:
//! a slot imported without its source marked migrating sends no UNLINK there.
//!
//! A slot is read with `CLUSTER COUNTKEYSINSLOT` and `GETKEYSINSLOT`: a request or two per slot.
//! A failover moves every slot of the failed primary at once (5,461 of them with three
//! primaries), which would be over ten thousand requests, so where one primary has more slots
//! to sweep than a SCAN of it has pages, it is walked once with SCAN instead, from cursor 0 back
//! to 0. That returns every key present throughout, of those slots as of the others, in far
//! fewer requests.

use std::collections::{BTreeSet, HashMap};

use super::super::connection::{Handle, KEYS_PER_UNLINK, Node, SCAN_COUNT};
use super::super::topology::Myself;
use super::super::{plan, slot};
use super::Walker;
use super::server::{Failure, Owners, keys_in_slot, query};

impl Walker {
    /// Sweeps, for the `ready` tickets' patterns, every slot that changed owner since one of
    /// them joined or is migrating now.
    pub(super) async fn sweep_moved(
        &mut self,
        handle: &mut Handle,
        ready: &[u64],
    ) -> Result<(), Failure> {
        let nodes = self.connection.nodes(&self.settings.seed_host).await;
        let nodes = nodes.map_err(|e| ("CLUSTER SLOTS", e))?;
        let now = Owners::of(&nodes);
        let migrating = migrating(handle, &nodes).await?;
        let mut slots: BTreeSet<u16> = migrating.keys().copied().collect();
        let mut patterns: BTreeSet<&str> = BTreeSet::new();
        for id in ready {
            let ticket = &self.tickets[id];
            patterns.extend(ticket.patterns.iter().map(String::as_str));
            if let Some(then) = &ticket.owners {
                slots.extend(
                    (0..slot::SLOTS)
                        .filter(|&s| then.by_slot[usize::from(s)] != now.by_slot[usize::from(s)]),
                );
            }
        }
        if slots.is_empty() {
            return Ok(());
        }
        let patterns: Vec<&str> = patterns.into_iter().collect();
        let pass = plan::shared_pass(&patterns, crate::glob::matches);
        tracing::info!(
            slots = slots.len(),
            "redis slots moved during a walk; sweeping them"
        );
        let owner = |s: u16| {
            let (host, port) = now.by_slot[usize::from(s)].as_ref()?;
            nodes.iter().position(|node| {
                matches!(node, Node::Primary { host: h, port: p, .. } if h == host && p == port)
            })
        };
        // The stable slots to read on each primary.
        let mut stable: Vec<Vec<u16>> = vec![Vec::new(); nodes.len()];
        for s in slots {
            let Some(sides) = migrating.get(&s) else {
                match owner(s) {
                    Some(i) => stable[i].push(s),
                    None => stable.iter_mut().for_each(|on| on.push(s)),
                }
                continue;
            };
            let last = owner(s).filter(|i| !sides.contains(i));
            for &i in sides.iter().chain(&last) {
                let keys = keys_in_slot(handle, &nodes[i], s).await?;
                if nodes[i].owns(s) {
                    self.found(handle, &pass, keys).await?;
                    continue;
                }
                // The importing side: its keys are where a routed UNLINK may not go.
                let doomed: Vec<Vec<u8>> = keys.into_iter().filter(|k| pass.wants(k)).collect();
                let deleted = handle.unlink_asking(&nodes[i], &doomed).await;
                self.unclaimed.keys_deleted += deleted.map_err(|e| ("UNLINK", e))?;
            }
        }
        for (node, slots) in nodes.iter().zip(&stable) {
            if slots.is_empty() {
                continue;
            }
            let keys: u64 = query(handle, node, ::redis::cmd("DBSIZE"), "DBSIZE").await?;
            if keys / SCAN_COUNT as u64 + 1 < slots.len() as u64 {
                self.scan_all(handle, node, &pass).await?;
                continue;
            }
            for &s in slots {
                let keys = keys_in_slot(handle, node, s).await?;
                self.found(handle, &pass, keys).await?;
            }
        }
        Ok(())
    }

    /// Walks `node` once, from cursor 0 back to 0, for the keys `pass` wants.
    async fn scan_all(
        &mut self,
        handle: &mut Handle,
        node: &Node,
        pass: &plan::ScanPass,
    ) -> Result<(), Failure> {
        let mut cursor = "0".to_owned();
        loop {
            let page = handle.scan(node, &cursor, pass.match_arg()).await;
            let (next, keys) = page.map_err(|e| ("SCAN", e))?;
            self.unclaimed.scan_calls += 1;
            self.found(handle, pass, keys).await?;
            if next == "0" {
                return Ok(());
            }
            cursor = next;
        }
    }

    /// Keeps the `keys` that `pass` wants for deletion, unlinking once a full chunk waits.
    async fn found(
        &mut self,
        handle: &mut Handle,
        pass: &plan::ScanPass,
        keys: Vec<Vec<u8>>,
    ) -> Result<(), Failure> {
        self.doomed
            .extend(keys.into_iter().filter(|key| pass.wants(key)));
        if self.doomed.len() >= KEYS_PER_UNLINK {
            self.unlink(handle).await?;
        }
        Ok(())
    }
}

/// The slots each primary's `CLUSTER NODES` shows as migrating or importing, with the primaries
/// (indexes into `nodes`) to read them on: the migrating side first.
async fn migrating(
    handle: &mut Handle,
    nodes: &[Node],
) -> Result<HashMap<u16, Vec<usize>>, Failure> {
    let mut migrating: HashMap<u16, Vec<usize>> = HashMap::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut command = ::redis::cmd("CLUSTER");
        command.arg("NODES");
        let text: String = query(handle, node, command, "CLUSTER NODES").await?;
        let markers = Myself::of(&text).map(|me| me.markers).unwrap_or_default();
        for (slot, from_here) in markers {
            let sides = migrating.entry(slot).or_default();
            if from_here {
                sides.insert(0, i);
            } else {
                sides.push(i);
            }
        }
    }
    Ok(migrating)
}
