//! The shared pass: one continuous SCAN walk per primary that every pattern joins.
//!
//! Every SCAN walk costs a pass over the whole keyspace, whatever it looks for, so patterns
//! share one. The walk runs while any pattern is pending; a pattern that arrives mid-walk joins
//! at the cursor the walk sends next, and is complete once the walk has wrapped around and comes
//! back to that cursor. Every key SCAN returns is matched against all joined patterns at once
//! (the prefix index of [`plan::JoinedPass`], which each join adds its patterns to and each
//! completion removes them from). Why that is a full SCAN iteration:
//!
//! - SCAN promises every key present during a full iteration (cursor 0 back to 0), because the
//!   cursor is a position in a fixed order of hash buckets (the reverse binary order of the
//!   bucket index), which the table keeps when it grows, shrinks or rehashes. Starting at
//!   cursor `c`, running to the end and on from 0 back to `c` covers that order once, as a full
//!   iteration does. The walk completes a pattern only when it is about to send exactly `c`
//!   again, or else at the end of the lap after the one it joined in (a shrunk table may
//!   never return `c`); both need no knowledge of how a server encodes its cursor.
//! - A cursor is a position, not server state, so after a reconnect to the same server
//!   process the walk resumes where it was and nothing joined is lost. A cursor of another
//!   process (a restart, a failover) means nothing: the server's `run_id` is read when a walk
//!   starts, after every error, and before any pattern completes, and a walk whose server
//!   changed starts over for all its patterns at once. A failing request is retried with
//!   backoff from the same cursor, so an unstable connection slows a walk but never restarts it.
//! - Redis Cluster: one walk per primary, each with its own cursor; a pattern whose keys share
//!   one hash slot joins only the walk of the slot's owner. A key that moves between primaries
//!   (resharding) can slip past both walks, so when a pattern completes its slots are compared
//!   with those it joined under: every slot that changed owner or is migrating now is swept
//!   once more where its keys can be (see [`sweep`]).
//!
//! Found keys are unlinked in full UNLINK chunks, and always before a pattern completes; with
//! `wait_replicas`, replicas confirm them with `WAIT` first.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

mod server;
mod sweep;

use super::connection::{Connection, Handle, KEYS_PER_UNLINK, Node};
use super::{DeleteError, DeleteStats, plan, walks_on};
use crate::error::Classify;
use server::{Failure, Order, Owners, Server, server};

/// What a walk needs to know about its deleter.
pub(super) struct Settings {
    /// The URL with its password hidden, for errors and logs.
    pub(super) target: String,
    /// The host of the URL, for cluster nodes that do not know their own address.
    pub(super) seed_host: String,
    /// Replicas that must confirm the deletes before a pattern is complete.
    pub(super) wait_replicas: u32,
    /// How long `WAIT` lets them take, in milliseconds.
    pub(super) wait_timeout_ms: u64,
}

/// The handle on a running walk: patterns go in, resolutions come back.
pub(super) struct Walk {
    /// Joins for the walk's task; it stops once this is dropped and nothing is pending.
    joins: mpsc::UnboundedSender<Join>,
    /// For the error of a walk that stopped.
    target: String,
}

impl Walk {
    /// Starts the walk's task on its own `connection`.
    pub(super) fn spawn(connection: Connection, settings: Settings) -> Walk {
        let (joins, receiver) = mpsc::unbounded_channel();
        let target = settings.target.clone();
        let walker = Walker {
            connection,
            settings,
            joins: receiver,
            closed: false,
            arrived: Vec::new(),
            tickets: HashMap::new(),
            next_ticket: 0,
            nodes: Vec::new(),
            stale: true,
            doomed: Vec::new(),
            unclaimed: DeleteStats::default(),
        };
        tokio::spawn(walker.run());
        Walk { joins, target }
    }

    /// Hands `patterns` (coalesced, not empty) to the walk; `literal` is what deleting the
    /// batch's literal keys did, added to the resolution's statistics.
    pub(super) fn join(&self, patterns: Vec<String>, literal: DeleteStats) -> Resolution {
        let (done, receiver) = oneshot::channel();
        // A send fails only when the task is gone, and then the receiver says so.
        let _ = self.joins.send(Join { patterns, done });
        Resolution {
            done: Some(receiver),
            literal,
            target: self.target.clone(),
        }
    }
}

/// Resolves once every key present from the join to the end that matches one of the patterns
/// is deleted (and, with `wait_replicas`, replicated); the statistics then include the literal
/// keys deleted before.
pub struct Resolution {
    /// The walk's answer; `None` for a batch without patterns.
    done: Option<oneshot::Receiver<Result<DeleteStats, DeleteError>>>,
    /// What deleting the literal keys did.
    literal: DeleteStats,
    /// For the error of a walk that stopped.
    target: String,
}

impl Resolution {
    /// A resolution with nothing left to wait for.
    pub(super) fn done(literal: DeleteStats) -> Resolution {
        Resolution {
            done: None,
            literal,
            target: String::new(),
        }
    }
}

impl Future for Resolution {
    type Output = Result<DeleteStats, DeleteError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let literal = self.literal;
        let Some(done) = self.done.as_mut() else {
            return Poll::Ready(Ok(literal));
        };
        let answer = std::task::ready!(Pin::new(done).poll(cx));
        Poll::Ready(match answer {
            Ok(Ok(walked)) => Ok(DeleteStats {
                keys_deleted: literal.keys_deleted + walked.keys_deleted,
                ..walked
            }),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(DeleteError::WalkStopped {
                target: self.target.clone(),
            }),
        })
    }
}

/// Patterns handed to the walk, and where to say that they are done.
struct Join {
    /// Coalesced patterns.
    patterns: Vec<String>,
    /// Gets the statistics once they are complete, or a permanent error.
    done: oneshot::Sender<Result<DeleteStats, DeleteError>>,
}

/// A join the walk works on.
struct Ticket {
    /// Its patterns, for the sweep of moved slots.
    patterns: Vec<String>,
    /// How many node walks have not completed it yet.
    waiting: usize,
    /// The slot owners when it joined (a cluster), to find the slots that moved since.
    owners: Option<Arc<Owners>>,
    /// Where the answer goes.
    done: oneshot::Sender<Result<DeleteStats, DeleteError>>,
}

/// A ticket's place in one node's walk.
struct Joiner {
    /// The ticket.
    ticket: u64,
    /// Its patterns that this node must be walked for.
    patterns: Vec<String>,
    /// The cursor the walk sent next when it joined: where it is complete.
    start: String,
    /// Laps the walk finished since it joined (SCAN returned cursor 0).
    laps: u8,
}

impl Joiner {
    /// Whether the walk of a server with cursor `order`, about to send `cursor`, has covered a
    /// full iteration since the join.
    fn complete_at(&self, cursor: &str, order: Order) -> bool {
        self.laps >= 2 || (self.laps == 1 && order.reached(cursor, &self.start))
    }
}

/// The walk of one server.
struct NodeWalk {
    /// The server.
    node: Node,
    /// The `run_id` of the server process the cursor belongs to; `None` before it is read.
    run_id: Option<String>,
    /// How that server orders its cursors.
    order: Order,
    /// Whether `run_id` must be read again before the next SCAN (after an error).
    verify: bool,
    /// The cursor to send next.
    cursor: String,
    /// The tickets walked here, in the order they joined.
    joiners: VecDeque<Joiner>,
    /// The filter for all joiners' patterns.
    pass: plan::JoinedPass,
    /// The keys of the last page, not matched yet.
    page: Vec<Vec<u8>>,
}

impl NodeWalk {
    /// A walk of `node` that has not started.
    fn new(node: Node) -> NodeWalk {
        NodeWalk {
            node,
            run_id: None,
            order: Order::Exact,
            verify: true,
            cursor: "0".to_owned(),
            joiners: VecDeque::new(),
            pass: plan::JoinedPass::new(crate::glob::matches),
            page: Vec::new(),
        }
    }

    /// Whether its next page is worth sending now: a joiner still needs it. One whose
    /// iteration ends at the cursor does not, so a lone pattern costs no page past its lap.
    fn wants_page(&self) -> bool {
        self.joiners
            .iter()
            .any(|j| !j.complete_at(&self.cursor, self.order))
    }

    /// Adds `joiner` to the walk and its patterns to the filter.
    fn join(&mut self, joiner: Joiner) {
        for pattern in &joiner.patterns {
            self.pass.join(pattern.as_bytes());
        }
        self.joiners.push_back(joiner);
    }

    /// Whether a joiner has covered a full iteration.
    fn any_complete(&self) -> bool {
        let done = |j: &Joiner| j.complete_at(&self.cursor, self.order);
        match self.order {
            Order::Exact => self.joiners.iter().any(done),
            _ => self.joiners.front().is_some_and(done),
        }
    }

    /// Takes the joiners that have covered a full iteration.
    ///
    /// Where the server's cursors are ordered, a joiner is done only once every earlier one
    /// is: it joined later in the same lap, or in a later lap. So those are the first few, and
    /// a page costs no look at every joiner; elsewhere any of them may be done.
    fn take_complete(&mut self) -> Vec<Joiner> {
        let (cursor, order) = (&self.cursor, self.order);
        if order == Order::Exact {
            let (done, walking): (VecDeque<Joiner>, VecDeque<Joiner>) =
                std::mem::take(&mut self.joiners)
                    .into_iter()
                    .partition(|j| j.complete_at(cursor, order));
            self.joiners = walking;
            return done.into();
        }
        let done = self
            .joiners
            .iter()
            .take_while(|j| j.complete_at(cursor, order))
            .count();
        self.joiners.drain(..done).collect()
    }

    /// Records the server it talks to, and starts over when that is another process.
    fn serves(&mut self, server: Server) {
        if self
            .run_id
            .as_ref()
            .is_some_and(|known| *known != server.run_id)
        {
            self.restart(server.run_id);
        } else {
            self.run_id = Some(server.run_id);
        }
        self.order = server.order;
        self.verify = false;
    }

    /// Starts the walk over: the cursor belongs to a server process that is gone.
    fn restart(&mut self, run_id: String) {
        tracing::info!(node = ?self.node, "the redis server changed; its walk starts over");
        self.cursor = "0".to_owned();
        for joiner in &mut self.joiners {
            joiner.start = "0".to_owned();
            joiner.laps = 0;
        }
        self.run_id = Some(run_id);
    }
}

/// The walk's task and all its state.
struct Walker {
    /// Its own connection.
    connection: Connection,
    /// See [`Settings`].
    settings: Settings,
    /// Joins from the deleter.
    joins: mpsc::UnboundedReceiver<Join>,
    /// Whether the deleter is gone (no more joins).
    closed: bool,
    /// Joins received but not yet given a place in the walks.
    arrived: Vec<Join>,
    /// The joins being worked on.
    tickets: HashMap<u64, Ticket>,
    /// The id of the next ticket.
    next_ticket: u64,
    /// One walk per server.
    nodes: Vec<NodeWalk>,
    /// Whether the topology must be read again (at start, after an error).
    stale: bool,
    /// Keys found and not yet unlinked.
    doomed: Vec<Vec<u8>>,
    /// Deletes and SCAN calls not yet reported with a completed ticket.
    unclaimed: DeleteStats,
}

impl Walker {
    /// Walks while anything is pending; returns once the deleter is gone and nothing is.
    async fn run(mut self) {
        let mut delays = crate::pipeline::backoff();
        loop {
            // Answers nobody waits for any more are not worth a walk.
            self.tickets.retain(|_, ticket| !ticket.done.is_closed());
            if self.tickets.is_empty() && self.arrived.is_empty() {
                if self.closed {
                    return;
                }
                match self.joins.recv().await {
                    Some(join) => self.arrived.push(join),
                    None => return,
                }
            }
            loop {
                match self.joins.try_recv() {
                    Ok(join) => self.arrived.push(join),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        self.closed = true;
                        break;
                    }
                }
            }
            match self.round().await {
                Ok(()) => delays = crate::pipeline::backoff(),
                Err((action, source)) => {
                    let err = DeleteError::Redis {
                        target: self.settings.target.clone(),
                        action,
                        source,
                    };
                    if !err.is_transient() {
                        self.fail_all(action, &err);
                        continue;
                    }
                    let delay = delays.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %crate::telemetry::chain(&err),
                        target_url = %self.settings.target, retry_in = ?delay,
                        "redis walk failed; resuming at the same cursor");
                    self.connection.reset();
                    self.stale = true;
                    for node in &mut self.nodes {
                        node.verify = true;
                    }
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Answers every ticket with a permanent error and forgets them.
    fn fail_all(&mut self, action: &'static str, err: &DeleteError) {
        tracing::error!(error = %crate::telemetry::chain(err), target_url = %self.settings.target,
            "redis walk failed permanently");
        let source = match err {
            DeleteError::Redis { source, .. } => source.clone(),
            _ => return,
        };
        for (_, ticket) in self.tickets.drain() {
            let _ = ticket.done.send(Err(DeleteError::Redis {
                target: self.settings.target.clone(),
                action,
                source: source.clone(),
            }));
        }
        for node in &mut self.nodes {
            node.joiners.clear();
            node.pass = plan::JoinedPass::new(crate::glob::matches);
        }
        self.arrived.clear();
    }

    /// One step: admit what arrived, send every walk's next SCAN, and while those pages are on
    /// their way, filter the pages that came last, complete what is due and answer what is
    /// done.
    ///
    /// Overlapping the two keeps Redis serving SCAN pages while the keys of the page before are
    /// matched and unlinked, instead of each waiting for the other. It changes nothing a pattern
    /// sees: a join is admitted before the SCAN of the cursor it starts at is sent, and the
    /// joiners completing at that cursor need only the pages before it, which are filtered and
    /// unlinked before they complete. A page sent to a server process that turns out to be
    /// another one when a completion reads its `run_id` is dropped, as the walk starts over.
    async fn round(&mut self) -> Result<(), Failure> {
        let mut handle = self.connection.handle().await.map_err(|e| ("connect", e))?;
        if self.stale || !self.arrived.is_empty() {
            self.refresh().await?;
        }
        self.admit();
        for node in self.nodes.iter_mut().filter(|n| n.verify) {
            if !node.joiners.is_empty() {
                node.serves(server(&mut handle, &node.node).await?);
            }
        }
        let scans = join_all(
            self.nodes
                .iter()
                .enumerate()
                .filter(|(_, node)| node.wants_page())
                .map(|(i, node)| {
                    let mut handle = handle.clone();
                    let (target, cursor) = (node.node.clone(), node.cursor.clone());
                    let (match_arg, run_id) = (node.pass.match_arg(), node.run_id.clone());
                    async move {
                        let page = handle.scan(&target, &cursor, match_arg.as_deref()).await;
                        (i, run_id, page)
                    }
                }),
        );
        let (pages, between) = tokio::join!(scans, self.between_pages(&mut handle));
        between?;
        let mut failed = None;
        for (i, run_id, page) in pages {
            let node = &mut self.nodes[i];
            match page {
                // Sent to a process the walk no longer follows: it started over meanwhile.
                Ok(_) if node.run_id != run_id => {}
                Ok((next, keys)) => {
                    self.unclaimed.scan_calls += 1;
                    node.page = keys;
                    if next == "0" {
                        for joiner in &mut node.joiners {
                            joiner.laps = joiner.laps.saturating_add(1);
                        }
                    }
                    node.cursor = next;
                }
                Err(source) => failed = Some(("SCAN", source)),
            }
        }
        match failed {
            Some(failure) => Err(failure),
            None => Ok(()),
        }
    }

    /// What a round does while its SCAN pages are on their way: matches the keys of the pages
    /// that came last, completes the joiners that are due and answers the finished tickets.
    async fn between_pages(&mut self, handle: &mut Handle) -> Result<(), Failure> {
        for node in &mut self.nodes {
            let pass = &node.pass;
            self.doomed.extend(
                std::mem::take(&mut node.page)
                    .into_iter()
                    .filter(|key| pass.wants(key)),
            );
        }
        self.complete(handle).await?;
        self.finish(handle).await?;
        if self.doomed.len() >= KEYS_PER_UNLINK {
            self.unlink(handle).await?;
        }
        Ok(())
    }

    /// Reads the topology: walks of servers that are gone end (their slots are swept when their
    /// tickets finish, see [`Walker::finish`]), new primaries get a walk.
    async fn refresh(&mut self) -> Result<(), Failure> {
        let nodes = self.connection.nodes(&self.settings.seed_host).await;
        let nodes = nodes.map_err(|e| ("CLUSTER SLOTS", e))?;
        let address = |node: &Node| match node {
            Node::Only => None,
            Node::Primary { host, port, .. } => Some((host.clone(), *port)),
        };
        let mut kept = Vec::with_capacity(nodes.len());
        for node in nodes {
            let existing = self
                .nodes
                .iter()
                .position(|walk| address(&walk.node) == address(&node));
            let walk = match existing {
                Some(i) => {
                    let mut walk = self.nodes.swap_remove(i);
                    walk.node = node;
                    walk
                }
                None => NodeWalk::new(node),
            };
            kept.push(walk);
        }
        for gone in std::mem::replace(&mut self.nodes, kept) {
            tracing::info!(node = ?gone.node, "a redis primary left the topology; its slots \
                are swept instead");
            for joiner in gone.joiners {
                if let Some(ticket) = self.tickets.get_mut(&joiner.ticket) {
                    ticket.waiting -= 1;
                }
            }
        }
        self.stale = false;
        Ok(())
    }

    /// Gives every arrived join a place at the current cursor of each walk it needs.
    fn admit(&mut self) {
        if self.arrived.is_empty() {
            return;
        }
        let topology: Vec<Node> = self.nodes.iter().map(|walk| walk.node.clone()).collect();
        let cluster = topology.iter().any(|n| matches!(n, Node::Primary { .. }));
        let owners = cluster.then(|| Arc::new(Owners::of(&topology)));
        for join in std::mem::take(&mut self.arrived) {
            let id = self.next_ticket;
            self.next_ticket += 1;
            let mut waiting = 0;
            for walk in &mut self.nodes {
                let mine: Vec<String> = join
                    .patterns
                    .iter()
                    .filter(|pattern| walks_on(pattern, &walk.node, &topology))
                    .cloned()
                    .collect();
                if mine.is_empty() {
                    continue;
                }
                waiting += 1;
                let start = walk.cursor.clone();
                walk.join(Joiner {
                    ticket: id,
                    patterns: mine,
                    start,
                    laps: 0,
                });
            }
            self.tickets.insert(
                id,
                Ticket {
                    patterns: join.patterns,
                    waiting,
                    owners: owners.clone(),
                    done: join.done,
                },
            );
        }
    }

    /// Removes the joiners whose full iteration is done, once their keys are unlinked and the
    /// server is proven to be the one they joined.
    async fn complete(&mut self, handle: &mut Handle) -> Result<(), Failure> {
        if !self.nodes.iter().any(NodeWalk::any_complete) {
            return Ok(());
        }
        self.unlink(handle).await?;
        for node in &mut self.nodes {
            if !node.any_complete() {
                continue;
            }
            let known = node.run_id.clone();
            node.serves(server(handle, &node.node).await?);
            if node.run_id != known {
                continue;
            }
            for joiner in node.take_complete() {
                for pattern in &joiner.patterns {
                    node.pass.leave(pattern.as_bytes());
                }
                if let Some(ticket) = self.tickets.get_mut(&joiner.ticket) {
                    ticket.waiting -= 1;
                }
            }
        }
        Ok(())
    }

    /// Answers the tickets that no walk waits for any more: after sweeping the slots that moved
    /// while they waited, and after replicas confirmed the deletes.
    async fn finish(&mut self, handle: &mut Handle) -> Result<(), Failure> {
        let ready: Vec<u64> = self
            .tickets
            .iter()
            .filter(|(_, t)| t.waiting == 0)
            .map(|(&id, _)| id)
            .collect();
        if ready.is_empty() {
            return Ok(());
        }
        if self.connection.is_cluster() {
            self.sweep_moved(handle, &ready).await?;
        }
        self.unlink(handle).await?;
        if self.settings.wait_replicas > 0 {
            let confirmed = handle
                .wait(self.settings.wait_replicas, self.settings.wait_timeout_ms)
                .await
                .map_err(|e| ("WAIT", e))?;
            if confirmed < u64::from(self.settings.wait_replicas) {
                return Err((
                    "WAIT",
                    ::redis::RedisError::from((
                        ::redis::ErrorKind::Io,
                        "fewer replicas than redis.wait_replicas confirmed the deletes",
                    )),
                ));
            }
        }
        for id in ready {
            if let Some(ticket) = self.tickets.remove(&id) {
                let mut stats = std::mem::take(&mut self.unclaimed);
                stats.patterns_scanned = ticket.patterns.len() as u64;
                let _ = ticket.done.send(Ok(stats));
            }
        }
        Ok(())
    }

    /// Unlinks the keys found so far.
    async fn unlink(&mut self, handle: &mut Handle) -> Result<(), Failure> {
        if self.doomed.is_empty() {
            return Ok(());
        }
        let deleted = handle.unlink(&self.doomed).await;
        self.unclaimed.keys_deleted += deleted.map_err(|e| ("UNLINK", e))?;
        self.doomed.clear();
        Ok(())
    }
}

/// Patterns a batch hands to the walk: coalesced, as owned strings.
pub(super) fn coalesced(patterns: &HashSet<String>) -> Vec<String> {
    plan::coalesce(patterns)
        .into_iter()
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn joiner(start: &str, laps: u8) -> Joiner {
        Joiner {
            ticket: 0,
            patterns: Vec::new(),
            start: start.to_owned(),
            laps,
        }
    }

    #[test]
    fn a_joiner_completes_once_the_next_lap_passes_its_cursor_or_ends() {
        // In a table of 8 buckets the reverse binary order is 0 4 2 6 1 5 3 7.
        let at_two = joiner("2", 1);
        for order in [Order::Reversed, Order::Exact] {
            assert!(!joiner("2", 0).complete_at("2", order));
            assert!(!at_two.complete_at("4", order));
            assert!(at_two.complete_at("2", order));
            assert!(joiner("2", 2).complete_at("4", order));
        }
        // Past it without landing on it: pages of the second lap end elsewhere.
        assert!(at_two.complete_at("6", Order::Reversed));
        assert!(at_two.complete_at("1", Order::Reversed));
        assert!(!at_two.complete_at("6", Order::Exact));
    }

    #[test]
    fn a_joiner_at_cursor_zero_completes_at_the_end_of_its_lap() {
        for order in [Order::Reversed, Order::SlotThenReversed, Order::Exact] {
            assert!(joiner("0", 1).complete_at("0", order));
        }
    }

    #[test]
    fn the_done_joiners_are_taken_from_the_front_where_cursors_are_ordered_else_from_anywhere() {
        let walk = |order: Order, joiners: &[(&str, u8)]| {
            let mut walk = NodeWalk::new(Node::Only);
            walk.order = order;
            walk.cursor = "6".to_owned();
            for (ticket, &(start, laps)) in joiners.iter().enumerate() {
                walk.join(Joiner {
                    ticket: ticket as u64,
                    ..joiner(start, laps)
                });
            }
            walk
        };
        let tickets = |joiners: Vec<Joiner>| joiners.iter().map(|j| j.ticket).collect::<Vec<_>>();
        // Reverse binary order of 8 buckets: 0 4 2 6 1 5 3 7; the walk is about to send 6.
        let mut ordered = walk(Order::Reversed, &[("4", 2), ("2", 1), ("6", 1), ("1", 0)]);
        assert!(ordered.any_complete());
        assert_eq!(tickets(ordered.take_complete()), [0, 1, 2]);
        assert_eq!(ordered.joiners.len(), 1);
        assert!(!ordered.any_complete());
        let mut exact = walk(Order::Exact, &[("2", 1), ("6", 1), ("4", 0)]);
        assert!(exact.any_complete());
        assert_eq!(tickets(exact.take_complete()), [1]);
        assert_eq!(tickets(exact.joiners.drain(..).collect()), [0, 2]);
    }

    #[test]
    fn per_slot_cursors_go_slot_by_slot() {
        let cursor = |slot: u64, inner: u64| ((inner << 14) | slot).to_string();
        let start = joiner(&cursor(5, 4), 1);
        let order = Order::SlotThenReversed;
        assert!(!start.complete_at(&cursor(4, 7), order));
        assert!(!start.complete_at(&cursor(5, 0), order));
        assert!(start.complete_at(&cursor(5, 2), order));
        assert!(start.complete_at(&cursor(6, 0), order));
    }
}
