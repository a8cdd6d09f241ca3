//! `invalidator` keeps a Redis cache correct by watching Postgres.
//!
//! ```text
//!  Postgres WAL ──pgoutput──▶ source::replication ──▶ pgoutput::Decoder ──▶ Change
//!                                                                              │
//!                                                  rules::RuleSet::plan ◀──────┘
//!                                                          │ Invalidation{keys, patterns}
//!                                                          ▼ (per transaction, bounded queue)
//!                                                  redis::Deleter: UNLINK keys, SCAN patterns
//!                                                          │ confirmed
//!                                                          ▼
//!                                  flush LSN = end of the last fully deleted transaction
//! ```
//!
//! Modules:
//! - [`change`]: plain data (LSN, table names, rows, changes).
//! - [`config`]: the TOML file and environment overrides, validated; opens no connections.
//! - [`pgoutput`]: decode (and, for tests, encode) pgoutput protocol v1 messages; no I/O.
//! - [`rules`]: load and compile `rules/*.toml`, plan a change into keys and patterns; no I/O.
//! - [`source`]: the replication client and the setup of publication and slot; in notify mode,
//!   the trigger-filled outbox and its setup; in both, the SQL function
//!   `invalidator.invalidate()` (`source::invalidate`), and `source::teardown`, which removes
//!   all of it again.
//! - [`redact`]: hides passwords in URLs before they reach a log line or an error.
//! - [`redis`]: the deleter: pipelined `UNLINK`, `SCAN` for patterns, never `KEYS`.
//! - [`pipeline`]: the only place that wires source, rules, Redis and acknowledgement.
//! - [`targets`]: several Redis targets: one delete loop each, acknowledged at their minimum.
//! - [`run`]: the sidecar: HTTP, delete loop, reconnect loop, and the standby's wait.
//! - [`reload`]: hot reload of the rules (file changes and SIGHUP), swapped between transactions.
//! - [`dry_run`]: `run --dry-run`: log what would be deleted, from a temporary slot.
//! - [`check`], [`explain`]: the developer commands, on the same compiled rules as `run`.
//! - [`init`]: a starter configuration and rules file for an existing database.
//! - [`telemetry`]: metric names and the HTTP endpoints.

pub mod change;
pub mod check;
pub mod config;
pub mod dry_run;
pub mod endpoint;
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
pub mod source;
pub mod targets;
pub mod teardown;
pub mod telemetry;
