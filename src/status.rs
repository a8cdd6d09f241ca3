//! `invalidator status`: how far behind the sidecar is, as the database sees it (the slot, or in
//! notify mode the outbox).

use std::fmt;

use crate::config::{Config, Mode};
use crate::source::connect::{self, ConnectError};
use crate::source::notify::{self, NotifyError};
use crate::source::setup::{self, SetupError, SlotInfo};

/// Why `status` could not answer.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// No ordinary connection.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The slot could not be read.
    #[error(transparent)]
    Slot(#[from] SetupError),
    /// The outbox could not be read, most often because setup has not made it.
    #[error("reading invalidator.outbox (run `invalidator setup`)")]
    Outbox(#[source] NotifyError),
}

/// What `status` found.
#[derive(Debug)]
pub enum Status {
    /// Replication mode: the slot, `None` when it does not exist.
    Slot {
        /// The slot's name.
        name: String,
        /// What the server says of it.
        info: Option<SlotInfo>,
    },
    /// Notify mode: rows waiting in the outbox, and the age of the oldest in seconds.
    Outbox {
        /// Rows waiting.
        waiting: i64,
        /// Age of the oldest, in seconds; `None` when it is empty.
        oldest: Option<f64>,
    },
}

impl Status {
    /// Whether what the sidecar needs is there: a missing slot is a failure.
    pub fn ok(&self) -> bool {
        !matches!(self, Status::Slot { info: None, .. })
    }
}

/// The line `status` prints.
impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Outbox { waiting, oldest } => {
                let age = oldest.map_or_else(|| "none".to_owned(), |s| format!("{s:.1} s"));
                write!(f, "outbox: {waiting} rows waiting, oldest {age}")
            }
            Status::Slot { name, info: None } => {
                write!(f, "slot {name}: does not exist (run `invalidator setup`)")
            }
            Status::Slot {
                name,
                info: Some(info),
            } => {
                let state = match &info.active_pid {
                    Some(pid) if info.active => format!("active (pid {pid})"),
                    _ => "inactive".to_owned(),
                };
                let confirmed = info
                    .confirmed_flush
                    .map_or_else(|| "none".to_owned(), |l| l.to_string());
                let lag = info
                    .lag_bytes
                    .map_or_else(|| "unknown".to_owned(), |b| b.to_string());
                let wal_status = info.wal_status.as_deref().unwrap_or("unknown");
                let failover = match info.failover {
                    Some(true) => ", failover on",
                    Some(false) => ", failover off",
                    None => "",
                };
                write!(
                    f,
                    "slot {name}: {state}, confirmed {confirmed}, lag {lag} bytes, wal_status \
                     {wal_status}{failover}"
                )
            }
        }
    }
}

/// Asks the database how far behind the sidecar is.
pub async fn status(config: &Config) -> Result<Status, StatusError> {
    let mut db = connect::connect(&config.postgres).await?;
    match config.postgres.mode {
        Mode::Notify => {
            let (waiting, oldest) = notify::depth(&db).await.map_err(StatusError::Outbox)?;
            Ok(Status::Outbox { waiting, oldest })
        }
        Mode::Replication => {
            let name = config.postgres.slot.clone();
            let info = setup::slot_info(&mut db, &name).await?;
            Ok(Status::Slot { name, info })
        }
    }
}
