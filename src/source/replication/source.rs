//! The replication source: a started replication stream and the decoder, yielding the
//! committed transactions as [`Step`]s and acknowledging with standby status updates.
//!
//! ```text
//!  ReplicationStream ─XLogData─▶ Decoder ─Event─▶ Step{Begin, Change, Manual, Commit}
//!                                                  Step{StreamStart, Subtransaction, StreamStop,
//!                                                       StreamCommit, StreamAbort} (14+)
//!          │        ─Keepalive─────────────────▶ Step::Idle
//!          ▲
//!          └── standby status (flush = acknowledged; never past what this server has shown)
//! ```

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::change::{Lsn, Manual, Step, TableName};
use crate::error::{Classify, Verdict};
use crate::pgoutput::{DecodeError, Decoder, Event, Message};
use crate::source::Source;
use crate::source::invalidate::{self, MESSAGE_PREFIX};
use crate::source::replication::{ReplicationError, ReplicationMessage, ReplicationStream};
use crate::source::setup::SetupError;
use crate::telemetry::{self, Health};

/// A stream of WAL messages that accepts standby status updates: the replication connection,
/// or hand-built WAL in tests.
pub trait WalStream: Send {
    /// The next message; `None` when the server ended the stream. Must be cancel-safe.
    fn next(
        &mut self,
    ) -> impl Future<Output = Result<Option<ReplicationMessage>, ReplicationError>> + Send;

    /// Reports `flush` as the position written, flushed and applied: everything before it is
    /// done and the server may release it.
    fn send_status(
        &mut self,
        flush: Lsn,
    ) -> impl Future<Output = Result<(), ReplicationError>> + Send;
}

impl WalStream for ReplicationStream {
    async fn next(&mut self) -> Result<Option<ReplicationMessage>, ReplicationError> {
        ReplicationStream::next(self).await
    }

    async fn send_status(&mut self, flush: Lsn) -> Result<(), ReplicationError> {
        ReplicationStream::send_status(self, flush, flush, flush, false).await
    }
}

/// Says which tables a relation is a partition of, so that a change of a partition fires the
/// rules of its ancestors too: Postgres publishes each partition under its own name.
pub trait Ancestry: Send {
    /// The partition ancestors (nearest first, itself excluded) of the relation with oid
    /// `relation_id`, announced by a Relation message as `table`.
    fn ancestors(
        &mut self,
        relation_id: u32,
        table: &TableName,
    ) -> impl Future<Output = Result<Vec<TableName>, SetupError>> + Send;
}

/// Why the replication source stopped.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The replication connection failed.
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    /// The catalog could not say which tables a relation is a partition of.
    #[error("reading the partitions of relation {relation_id}: {source}")]
    Ancestry {
        /// The relation's oid.
        relation_id: u32,
        /// Why.
        #[source]
        source: SetupError,
    },
    /// A WAL message could not be decoded; the stream restarts from the last acknowledged LSN.
    #[error("undecodable WAL message at {lsn}: {source}")]
    Decode {
        /// Start of the XLogData that held the message.
        lsn: Lsn,
        /// What was wrong with it.
        #[source]
        source: DecodeError,
    },
}

/// Undecodable messages reconnect too: a reconnect rebuilds the relation cache, and what stays
/// broken keeps the slot where it is rather than skip.
impl Classify for SourceError {
    fn verdict(&self) -> Verdict {
        match self {
            SourceError::Replication(e) => e.verdict(),
            SourceError::Ancestry { source, .. } => source.verdict(),
            SourceError::Decode { .. } => Verdict::Reconnect,
        }
    }
}

/// What the replication side keeps across reconnects: what was reported to the server, and how
/// far this server's WAL is known to reach.
#[derive(Debug, Default)]
pub struct WalProgress {
    /// Highest flush position reported to Postgres, so reports never go backwards; start it at
    /// the slot's `confirmed_flush_lsn`.
    pub reported: Lsn,
    /// The furthest WAL position this server has shown (its WAL end at connect, then what the
    /// stream sent): no report goes beyond it, whatever a bug elsewhere might compute.
    pub server_end: Lsn,
    /// A backlog found at connect, reported in the log as it shrinks; see [`CatchUp`].
    pub catch_up: Option<CatchUp>,
}

impl WalProgress {
    /// Forgets the positions of an old history, on a server whose WAL ends at `server_end`.
    pub fn new_history(&mut self, server_end: Lsn) {
        self.reported = Lsn(0);
        self.server_end = server_end;
        self.catch_up = None;
    }
}

/// Backlogs smaller than this drain in well under a second and are not reported.
pub const BACKLOG_BYTES: u64 = 16 * 1024 * 1024;
/// How often progress through a backlog is logged.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Progress through the WAL that was waiting when streaming started: from the slot's confirmed
/// position to the server's WAL end at connect (what later commits add is not part of it).
/// Logged at info when it starts, every [`PROGRESS_EVERY`] with the bytes left, the rate and the
/// estimated time, and once when the acknowledged position passes its end.
#[derive(Debug)]
pub struct CatchUp {
    /// The server's WAL end at connect.
    target: Lsn,
    /// Where it started, for the summary.
    start: Lsn,
    /// When it started.
    began: std::time::Instant,
    /// The position and time of the last progress line (or the start).
    last: (Lsn, std::time::Instant),
}

impl CatchUp {
    /// Starts reporting when the backlog from `confirmed` to `server_end` is at least
    /// [`BACKLOG_BYTES`]; logs the first line.
    pub fn start(confirmed: Lsn, server_end: Lsn) -> Option<CatchUp> {
        let behind = server_end.0.saturating_sub(confirmed.0);
        if behind < BACKLOG_BYTES {
            return None;
        }
        tracing::info!(from = %confirmed, to = %server_end, bytes = behind,
            "catching up with a backlog of WAL");
        let now = std::time::Instant::now();
        Some(CatchUp {
            target: server_end,
            start: confirmed,
            began: now,
            last: (confirmed, now),
        })
    }

    /// Notes that `flush` is acknowledged; logs progress when due. `true` once caught up.
    fn observe(&mut self, flush: Lsn) -> bool {
        let now = std::time::Instant::now();
        if flush >= self.target {
            let seconds = now.duration_since(self.began).as_secs_f64();
            tracing::info!(lsn = %flush, bytes = self.target.0 - self.start.0,
                seconds = format_args!("{seconds:.1}"), "caught up with the backlog");
            return true;
        }
        let elapsed = now.duration_since(self.last.1);
        if elapsed >= PROGRESS_EVERY {
            let left = self.target.0 - flush.0;
            let rate = flush.0.saturating_sub(self.last.0.0) as f64 / elapsed.as_secs_f64();
            let eta = if rate > 0.0 {
                format!("{:.0} s", left as f64 / rate)
            } else {
                "unknown (not advancing)".to_owned()
            };
            tracing::info!(lsn = %flush, bytes_left = left,
                mib_per_second = format_args!("{:.1}", rate / (1024.0 * 1024.0)),
                eta = %eta, "catching up");
            self.last = (flush, now);
        }
        false
    }
}

/// A started replication stream as a [`Source`]: it owns the decoder (one per connection: the
/// relation cache is the stream's) and learns the partition ancestors of each relation it
/// announces.
pub struct ReplicationSource<'a, S, A> {
    /// The stream.
    stream: &'a mut S,
    /// Where partition ancestors are looked up.
    ancestry: &'a mut A,
    /// What is kept across reconnects.
    progress: &'a mut WalProgress,
    /// The decoder of this stream.
    decoder: Decoder,
    /// The partition ancestors of each partition announced on this stream, by its announced
    /// name.
    ancestors: HashMap<TableName, Arc<[TableName]>>,
    /// A message read and not yet decoded.
    arrived: Option<ReplicationMessage>,
    /// Steps decoded and not yet given.
    steps: VecDeque<Step>,
    /// Where each acknowledged position is published, for `/wait`.
    health: &'a Health,
}

impl<'a, S: WalStream, A: Ancestry> ReplicationSource<'a, S, A> {
    /// Reads `stream`, looking up partitions with `ancestry`; publishes what it acknowledges
    /// to `health`.
    pub fn new(
        stream: &'a mut S,
        ancestry: &'a mut A,
        progress: &'a mut WalProgress,
        health: &'a Health,
    ) -> ReplicationSource<'a, S, A> {
        ReplicationSource {
            stream,
            ancestry,
            progress,
            decoder: Decoder::default(),
            ancestors: HashMap::new(),
            arrived: None,
            steps: VecDeque::new(),
            health,
        }
    }

    /// Decodes one message from the server into steps.
    async fn receive(&mut self, message: ReplicationMessage) -> Result<(), SourceError> {
        match message {
            ReplicationMessage::XLogData {
                wal_start,
                wal_end,
                data,
                ..
            } => {
                let progress = &mut *self.progress;
                progress.server_end = progress.server_end.max(wal_start).max(wal_end);
                // A Relation message precedes the first change of a relation on a stream, and
                // comes again after its definition changed (attached, detached, renamed): the
                // moment to learn what it is a partition of.
                if data.first() == Some(&b'R')
                    && let Ok(Message::Relation(relation)) = self.decoder.decode(&data)
                {
                    let table = TableName::new(&relation.namespace, &relation.name);
                    let ancestors =
                        self.ancestry
                            .ancestors(relation.id, &table)
                            .await
                            .map_err(|source| SourceError::Ancestry {
                                relation_id: relation.id,
                                source,
                            })?;
                    if ancestors.is_empty() {
                        self.ancestors.remove(&table);
                    } else {
                        self.ancestors.insert(table, ancestors.into());
                    }
                }
                self.decode(&data).map_err(|source| {
                    metrics::counter!(telemetry::ERRORS_TOTAL, "kind" => "decode").increment(1);
                    SourceError::Decode {
                        lsn: wal_start,
                        source,
                    }
                })
            }
            ReplicationMessage::Keepalive {
                wal_end,
                reply_requested,
                ..
            } => {
                self.progress.server_end = self.progress.server_end.max(wal_end);
                self.steps.push_back(Step::Idle {
                    position: wal_end,
                    reply: reply_requested,
                });
                Ok(())
            }
        }
    }

    /// Decodes one XLogData payload into steps.
    fn decode(&mut self, data: &[u8]) -> Result<(), DecodeError> {
        let (steps, ancestors) = (&mut self.steps, &self.ancestors);
        self.decoder.apply(data, |event| match event {
            Event::Begin {
                commit_time_us,
                xid,
                ..
            } => steps.push_back(Step::Begin {
                commit_time_us,
                xid: Some(xid),
            }),
            Event::Change(change)
                if change.table.schema == invalidate::SCHEMA
                    && change.table.name == invalidate::REQUESTS =>
            {
                // Written only by invalidator.invalidate() (SECURITY DEFINER) and by the
                // table's owner: the proof that the writer may invalidate by hand. The delete of
                // the row in the same transaction carries nothing.
                let manual = match invalidate::request(&change) {
                    Some(invalidate::Request::Given(text, literal)) => Manual::Given {
                        text: text.to_owned(),
                        literal,
                    },
                    Some(invalidate::Request::Repair(table)) => Manual::Repair(table),
                    None => return,
                };
                steps.push_back(Step::Manual(manual));
            }
            Event::Change(change) => {
                let ancestors = ancestors
                    .get(&change.table)
                    .cloned()
                    .unwrap_or_else(|| Arc::from([]));
                steps.push_back(Step::Change { change, ancestors });
            }
            Event::Commit { end_lsn, .. } => steps.push_back(Step::Commit { position: end_lsn }),
            Event::StreamStart { xid, first } => steps.push_back(Step::StreamStart { xid, first }),
            Event::Subtransaction { xid } => steps.push_back(Step::Subtransaction { xid }),
            Event::StreamStop => steps.push_back(Step::StreamStop),
            Event::StreamCommit {
                xid,
                end_lsn,
                commit_time_us,
            } => steps.push_back(Step::StreamCommit {
                xid,
                position: end_lsn,
                commit_time_us,
            }),
            Event::StreamAbort { xid, subxid } => {
                steps.push_back(Step::StreamAbort { xid, subxid });
            }
            // Any role can emit one, even in a read-only transaction: it proves nothing.
            Event::Message { prefix, .. } if prefix == MESSAGE_PREFIX => {
                invalidate::Ignored::EmittedMessage.record();
            }
            Event::Message { .. } => {}
        })
    }
}

impl<S: WalStream, A: Ancestry> Source for ReplicationSource<'_, S, A> {
    type Error = SourceError;

    async fn ready(&mut self) -> Result<bool, SourceError> {
        if self.arrived.is_some() || !self.steps.is_empty() {
            return Ok(true);
        }
        match self.stream.next().await? {
            Some(message) => {
                self.arrived = Some(message);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    async fn step(&mut self) -> Result<Option<Step>, SourceError> {
        loop {
            if let Some(step) = self.steps.pop_front() {
                if let Step::Commit { position } | Step::StreamCommit { position, .. } = step {
                    // A commit given to the pipeline is something this server wrote.
                    self.progress.server_end = self.progress.server_end.max(position);
                }
                return Ok(Some(step));
            }
            let Some(message) = self.arrived.take() else {
                return Ok(None);
            };
            self.receive(message).await?;
        }
    }

    /// Sends `position` (never less than reported before, never more than this server has
    /// shown: a position it has not written would make its slot skip the changes up to there).
    async fn acknowledge(&mut self, position: Lsn) -> Result<(), SourceError> {
        let progress = &mut *self.progress;
        let flush = position.max(progress.reported).min(progress.server_end);
        self.stream.send_status(flush).await?;
        progress.reported = flush;
        // Every change before it is invalidated: what `/wait` answers from.
        self.health.acknowledge(flush);
        metrics::gauge!(telemetry::CONFIRMED_LSN).set(flush.0 as f64);
        if progress.catch_up.as_mut().is_some_and(|c| c.observe(flush)) {
            progress.catch_up = None;
        }
        Ok(())
    }
}
