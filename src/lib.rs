//! `invalidator` keeps a Redis cache correct by watching Postgres.
//!
//! ```text
//!  Postgres WAL ─▶ source::replication: ReplicationSource (stream + pgoutput::Decoder) ─┐
//!  (or outbox + NOTIFY ─▶ source::notify: OutboxSource, one round = one transaction) ───┤
//!                                                        change::Step{Begin, Change, Manual, Commit}
//!                                                                                       ▼
//!                 pipeline::source_loop: rules::RuleSet::plan, max_transaction_keys, metrics
//!                                                          │ Committed{position, xid, keys, patterns}
//!                                                          ▼ (per transaction, bounded queue)
//!                 pipeline::visibility: replication mode holds each until a new snapshot sees it
//!                                                          ▼
//!                 pipeline::deliver: a Sink: redis::Deleter (UNLINK keys; patterns from the
//!                                    key index, redis::index, or they join one shared SCAN
//!                                    walk per primary, redis::walk; batches in
//!                                    flight confirmed in commit order, pipeline::flights), one
//!                                    per target (targets), or dry_run::LogDeletes
//!                                                          │ confirmed
//!                                                          ▼
//!             Source::acknowledge: flush LSN = end of the last fully deleted transaction
//!                                  (notify mode: delete the confirmed outbox rows)
//! ```
//!
//! Modules:
//! - [`change`]: plain data (LSN, table names, rows, changes, the [`change::Step`]s of a
//!   transaction, `unix_micros`).
//! - [`config`]: the TOML file and environment overrides, validated; opens no connections.
//! - [`endpoint`]: a Postgres URL as the connections read it (the hosts' order and each one's
//!   connect timeout, for both kinds of connection) and CA files, below both `config` and the
//!   connections.
//! - [`error`]: the one place that says what a Postgres or Redis failure means for the run
//!   (retry or reconnect, wait as a standby, stop): the SQLSTATE table, the Redis error kinds
//!   and replies, and the [`error::Classify`] trait.
//! - [`glob`]: Redis glob patterns: the matcher, escaping, literal prefixes.
//! - [`pgoutput`]: decode (and, for tests, encode) pgoutput messages (protocol 1, and 2 for
//!   streamed transactions); no I/O.
//! - [`rules`]: load and compile `rules/*.toml`, plan a change into keys and patterns; no I/O.
//! - [`source`]: the [`source::Source`] trait and its two implementations: the replication
//!   client and its source (`source::replication`), the outbox reader (`source::notify`);
//!   setup of publication, slot and (`source::setup::notify`) the outbox and triggers; the
//!   SQL function `invalidator.invalidate()` (`source::invalidate`); what can change under a
//!   running stream (`source::drift`) and whether a server still holds our history
//!   (`source::history`).
//! - [`sql`]: identifiers and literals quoted for the SQL text the sidecar writes.
//! - [`redact`]: hides passwords in URLs before they reach a log line or an error.
//! - [`redis`]: the deleter: pipelined `UNLINK`, one shared `SCAN` walk per primary for
//!   patterns (`redis::walk`), never `KEYS`, or with `[redis] key_index` the live index of the
//!   keys under the rules' pattern prefixes (`redis::index`), proven current by a barrier
//!   before each use; the guarded-fill Functions library (`redis::library`).
//! - [`pipeline`]: the only place that wires source, rules, Redis and acknowledgement: the one
//!   source loop, the visibility gate, the delete loop and the [`pipeline::Sink`] trait.
//! - [`targets`]: several Redis targets: one delete loop each, acknowledged at their minimum.
//! - [`run`]: the sidecar: picks a source and a sink, HTTP, reconnect loop, the standby's wait.
//! - [`reload`]: hot reload of the rules (file changes and SIGHUP), swapped between transactions.
//! - [`dry_run`]: `run --dry-run`: the sink that logs what would be deleted, and the temporary
//!   slot it reads from.
//! - [`check`], [`explain`]: the developer commands, on the same compiled rules as `run`.
//! - [`setup`]: the `setup` command: what the mode needs for these rules, planned by `source`'s
//!   setup and `invalidate` and by `redis::library`, and doing it; [`status`]: how far behind the slot or the outbox is.
//! - [`init`]: a starter configuration and rules file for an existing database.
//! - [`teardown`]: removes what setup made, in Postgres and Redis.
//! - [`telemetry`]: metric names and the HTTP endpoints.

pub mod change;
pub mod check;
pub mod config;
pub mod dry_run;
pub mod endpoint;
pub mod error;
pub mod explain;
pub mod glob;
pub mod init;
pub mod pgoutput;
pub mod pipeline;
pub mod redact;
pub mod redis;
pub mod reload;
pub mod rules;
pub mod run;
pub mod setup;
pub mod source;
pub mod sql;
pub mod status;
pub mod targets;
pub mod teardown;
pub mod telemetry;
