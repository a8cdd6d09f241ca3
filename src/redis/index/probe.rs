//! What `invalidator check` asks of a server for the key index: are the notification flags it
//! needs set, and if not, may this user set them.

use super::flags;
use crate::redis::connection::Node;
use crate::redis::{DeleteError, Deleter};

/// Whether a server gives the key index the keyspace events it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyIndexCheck {
    /// `notify-keyspace-events` has every flag it needs already.
    Set,
    /// Flags are missing, and this user may set them: `run` adds them to `now`, making `wanted`.
    Settable {
        /// The flags now.
        now: String,
        /// What `run` sets.
        wanted: String,
    },
    /// Flags are missing (or unknown) and cannot be set here: the index is unavailable and
    /// patterns are walked.
    Refused {
        /// The flags now, when they could be read.
        now: Option<String>,
        /// The server's answer.
        reason: String,
    },
    /// A Redis Cluster: the key index serves a single server for now.
    Cluster,
}

impl Deleter {
    /// Whether the key index can get its keyspace events here. Setting `notify-keyspace-events`
    /// to the value it has changes nothing and proves the permission to change it. A connection
    /// problem is an error.
    pub async fn key_index_check(&mut self) -> Result<KeyIndexCheck, DeleteError> {
        if self.is_cluster() {
            return Ok(KeyIndexCheck::Cluster);
        }
        let handle = self.connection.handle().await;
        let mut handle = handle.map_err(|source| self.failed("connect", source))?;
        let mut get = ::redis::cmd("CONFIG");
        get.arg("GET").arg("notify-keyspace-events");
        let now = match handle.on_node(&Node::Only, get).await {
            Ok(reply) => flags::from_reply(&reply),
            Err(err) if err.code().is_some() => {
                return Ok(KeyIndexCheck::Refused {
                    now: None,
                    reason: format!("CONFIG GET: {err}"),
                });
            }
            Err(source) => return Err(self.failed("CONFIG GET", source)),
        };
        let Some(now) = now else {
            return Ok(KeyIndexCheck::Refused {
                now: None,
                reason: "CONFIG GET notify-keyspace-events returned nothing".to_owned(),
            });
        };
        let Some(wanted) = flags::merged(&now) else {
            return Ok(KeyIndexCheck::Set);
        };
        let mut same = ::redis::cmd("CONFIG");
        same.arg("SET").arg("notify-keyspace-events").arg(&now);
        match handle.on_node(&Node::Only, same).await {
            Ok(_) => Ok(KeyIndexCheck::Settable { now, wanted }),
            Err(err) if err.code().is_some() => Ok(KeyIndexCheck::Refused {
                now: Some(now),
                reason: format!("CONFIG SET: {err}"),
            }),
            Err(source) => Err(self.failed("CONFIG SET", source)),
        }
    }
}
