//! The Redis Functions library `invalidator`: guarded fill for cache-aside readers.
//!
//! ```text
//!  FCALL invalidator_get  1 <key> <lease_ms>                  → ["hit", value] | ["fill", token] | ["wait", ms]
//!  FCALL invalidator_fill 1 <key> <token> <value> <ttl_ms>    → 1 stored | 0 refused
//! ```
//!
//! The lease is kept in the key (a hash, see `library.lua`), so the deletes the sidecar makes
//! destroy it too. `setup` loads the library on every primary ([`Deleter::load_library`]),
//! `check` says where it is missing or out of date ([`Deleter::library_states`]), `teardown`
//! deletes it ([`Deleter::delete_library`]).

use super::{DeleteError, Deleter};
use crate::error::Classify;
use ::redis::Value;

/// The library's name, as `FUNCTION LIST` and `FUNCTION DELETE` know it.
pub const NAME: &str = "invalidator";

/// The library's text, loaded as it is with `FUNCTION LOAD REPLACE`.
pub const CODE: &str = include_str!("library.lua");

/// The version this build loads: the `local VERSION = N` line of [`CODE`].
pub fn version() -> u32 {
    version_of(CODE).expect("library.lua declares its VERSION")
}

/// The `local VERSION = N` of a library's text, if it has one.
fn version_of(code: &str) -> Option<u32> {
    code.lines()
        .find_map(|line| line.trim().strip_prefix("local VERSION ="))
        .and_then(|n| n.trim().parse().ok())
}

/// What one Redis server (one primary of a cluster) has of the library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum State {
    /// Exactly the text this build loads.
    Current,
    /// Not loaded.
    Missing,
    /// An older version (or text without a version): `setup` replaces it.
    Older(Option<u32>),
    /// A newer version, loaded by a newer build: `setup` leaves it.
    Newer(u32),
    /// This version's number with other text (edited by hand): `setup` replaces it.
    Changed,
    /// The server has no Redis Functions (before Redis 7).
    Unsupported,
}

impl State {
    /// Whether `setup` should load this build's text over it.
    pub fn needs_load(&self) -> bool {
        matches!(self, State::Missing | State::Older(_) | State::Changed)
    }

    /// For people: what is there, e.g. "version 1 (older than 2)".
    pub fn describe(&self) -> String {
        let ours = version();
        match self {
            State::Current => format!("version {ours}"),
            State::Missing => "not loaded".to_owned(),
            State::Older(Some(v)) => format!("version {v}, older than {ours}"),
            State::Older(None) => format!("a text without a version, older than {ours}"),
            State::Newer(v) => format!("version {v}, newer than {ours}"),
            State::Changed => format!("version {ours} with other text (changed by hand?)"),
            State::Unsupported => {
                "no Redis Functions on this server (they need Redis 7)".to_owned()
            }
        }
    }

    /// The state of a library whose loaded text is `code` (`None`: not loaded).
    fn of(code: Option<&str>) -> State {
        let Some(code) = code else {
            return State::Missing;
        };
        if code == CODE {
            return State::Current;
        }
        match version_of(code) {
            Some(v) if v > version() => State::Newer(v),
            Some(v) if v == version() => State::Changed,
            v => State::Older(v),
        }
    }
}

/// One server (one cluster primary) and what it has of the library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// The URL (password hidden) of a single server, or a primary's address.
    pub node: String,
    /// What it has.
    pub state: State,
}

impl Deleter {
    /// What every primary (the one server) has of the library.
    pub async fn library_states(&mut self) -> Result<Vec<Node>, DeleteError> {
        let mut list = ::redis::cmd("FUNCTION");
        list.arg("LIST")
            .arg("LIBRARYNAME")
            .arg(NAME)
            .arg("WITHCODE");
        let replies = self.on_primaries("FUNCTION LIST", list).await?;
        let mut nodes = Vec::with_capacity(replies.len());
        for (node, reply) in replies {
            let state = match reply {
                // LIBRARYNAME matches by substring: only the exact name counts.
                Ok(Value::Array(libraries)) => State::of(
                    libraries
                        .iter()
                        .filter(|library| field(library, "library_name") == Some(NAME))
                        .find_map(|library| field(library, "library_code")),
                ),
                Ok(_) => State::Missing,
                Err(e) if unknown_command(&e) => State::Unsupported,
                Err(source) => return Err(self.failed("FUNCTION LIST", source)),
            };
            nodes.push(Node { node, state });
        }
        Ok(nodes)
    }

    /// Whether the library is loaded, in any version, on at least one primary.
    pub async fn has_library(&mut self) -> Result<bool, DeleteError> {
        let nodes = self.library_states().await?;
        Ok(nodes
            .iter()
            .any(|n| !matches!(n.state, State::Missing | State::Unsupported)))
    }

    /// Loads this build's library on every primary with `FUNCTION LOAD REPLACE` (idempotent).
    pub async fn load_library(&mut self) -> Result<(), DeleteError> {
        let mut load = ::redis::cmd("FUNCTION");
        load.arg("LOAD").arg("REPLACE").arg(CODE);
        for (_, reply) in self.on_primaries("FUNCTION LOAD", load).await? {
            reply.map_err(|source| self.failed("FUNCTION LOAD", source))?;
        }
        Ok(())
    }

    /// Deletes the library from every primary that has it; where it is not, nothing happens.
    pub async fn delete_library(&mut self) -> Result<(), DeleteError> {
        let mut delete = ::redis::cmd("FUNCTION");
        delete.arg("DELETE").arg(NAME);
        for (_, reply) in self.on_primaries("FUNCTION DELETE", delete).await? {
            match reply {
                Ok(_) => {}
                Err(e) if e.to_string().to_lowercase().contains("library not found") => {}
                Err(e) if unknown_command(&e) => {}
                Err(source) => return Err(self.failed("FUNCTION DELETE", source)),
            }
        }
        Ok(())
    }

    /// Runs `command` on every primary: each one's name (the target for a single server) and
    /// reply.
    async fn on_primaries(
        &mut self,
        action: &'static str,
        command: ::redis::Cmd,
    ) -> Result<Vec<(String, ::redis::RedisResult<Value>)>, DeleteError> {
        let handle = self.connection.handle().await;
        let mut handle = handle.map_err(|source| self.failed("connect", source))?;
        let replies = handle.on_primaries(command).await;
        let replies = replies.map_err(|source| self.failed(action, source))?;
        Ok(replies
            .into_iter()
            .map(|(node, reply)| (node.unwrap_or_else(|| self.target.clone()), reply))
            .collect())
    }
}

/// One configured Redis as `setup` and `check` found it, and the connection to load the
/// library with.
#[derive(Debug)]
pub struct Target {
    /// Its URL, password hidden.
    pub target: String,
    /// What each primary has, or why it could not be asked (unreachable).
    pub nodes: Result<Vec<Node>, String>,
    /// The connection, when it could be reached.
    deleter: Option<Deleter>,
}

/// Connects to every Redis in `config` and reads what it has of the library. `setup` does this
/// before it changes anything (and asks [`Target::loadable`]), so bad credentials or a server
/// without Redis Functions stop it before the database is touched; an unreachable Redis is
/// reported, not an error (as for `teardown`): the database's part can still be set up, and
/// `check` says what is missing.
pub async fn inspect(config: &crate::config::Config) -> Result<Vec<Target>, DeleteError> {
    let options = super::DeleterOptions::from_config(&config.redis)?;
    let mut targets = Vec::new();
    for url in config.redis_urls() {
        let target = crate::redact::redact(url);
        let found = async {
            let mut deleter = Deleter::connect_with(url, options.clone()).await?;
            let nodes = deleter.library_states().await?;
            Ok::<_, DeleteError>((deleter, nodes))
        };
        let (deleter, nodes) = match found.await {
            Ok((deleter, nodes)) => (Some(deleter), Ok(nodes)),
            Err(e) if e.is_transient() => (None, Err(crate::telemetry::chain(&e))),
            Err(e) => return Err(e),
        };
        targets.push(Target {
            target,
            nodes,
            deleter,
        });
    }
    Ok(targets)
}

impl Target {
    /// Whether `setup` loads the library here: some primary lacks it or has an older text,
    /// and none has a newer one (a newer build's library is never downgraded).
    pub fn needs_load(&self) -> bool {
        let nodes = self.nodes.iter().flatten();
        nodes.clone().any(|n| n.state.needs_load())
            && !nodes.clone().any(|n| matches!(n.state, State::Newer(_)))
    }

    /// Refuses a server without Redis Functions, where the guarded fill cannot work.
    pub fn loadable(&self) -> Result<(), DeleteError> {
        match self
            .nodes
            .iter()
            .flatten()
            .find(|n| n.state == State::Unsupported)
        {
            Some(old) => Err(DeleteError::InvalidSettings {
                target: old.node.clone(),
                reason: format!(
                    "cannot load the Redis Functions library {NAME}: {}",
                    old.state.describe()
                ),
            }),
            None => Ok(()),
        }
    }

    /// The connection, when the target could be reached (for `check`'s other questions).
    pub fn deleter(&mut self) -> Option<&mut Deleter> {
        self.deleter.as_mut()
    }

    /// Loads the library if [`Target::needs_load`].
    pub async fn apply(&mut self) -> Result<(), DeleteError> {
        if !self.needs_load() {
            return Ok(());
        }
        match self.deleter.as_mut() {
            Some(deleter) => deleter.load_library().await,
            None => Ok(()),
        }
    }

    /// What `setup` prints about this target: the command (a dry run) or what was done, what
    /// it kept, and a Redis it could not reach; nothing when the library is current.
    pub fn lines(&self, dry_run: bool) -> Vec<String> {
        let nodes = match &self.nodes {
            Ok(nodes) => nodes,
            Err(reason) => {
                return vec![format!(
                    "not loaded: the Redis Functions library {NAME} on {}: {reason}; run \
                     setup again once it answers",
                    self.target
                )];
            }
        };
        let mut lines = Vec::new();
        if self.needs_load() {
            // A single server is the target itself: no need to name it twice.
            let was = nodes
                .iter()
                .map(|n| {
                    if n.node == self.target {
                        n.state.describe()
                    } else {
                        format!("{}: {}", n.node, n.state.describe())
                    }
                })
                .collect::<Vec<_>>()
                .join("; ");
            let why = format!(
                "load the Redis Functions library {NAME} version {} on {} (was {was})",
                version(),
                self.target
            );
            lines.push(if dry_run {
                format!(
                    "-- redis: {why}\nFUNCTION LOAD REPLACE <the library text, {} bytes>",
                    CODE.len()
                )
            } else {
                format!("done: {why}")
            });
        }
        for node in nodes {
            if let State::Newer(_) = node.state {
                lines.push(format!(
                    "kept: the Redis Functions library {NAME} on {}: {}",
                    node.node,
                    node.state.describe()
                ));
            }
        }
        lines
    }
}

/// The text field `name` of one entry of a `FUNCTION LIST` reply (RESP2 flat pairs or a RESP3
/// map).
fn field<'v>(library: &'v Value, name: &str) -> Option<&'v str> {
    fn text(v: &Value) -> Option<&str> {
        match v {
            Value::BulkString(bytes) => std::str::from_utf8(bytes).ok(),
            Value::SimpleString(s) => Some(s.as_str()),
            Value::VerbatimString { text, .. } => Some(text.as_str()),
            _ => None,
        }
    }
    match library {
        Value::Array(fields) => fields
            .chunks(2)
            .find(|pair| text(&pair[0]) == Some(name))
            .and_then(|pair| pair.get(1).and_then(text)),
        Value::Map(fields) => fields
            .iter()
            .find(|(k, _)| text(k) == Some(name))
            .and_then(|(_, v)| text(v)),
        _ => None,
    }
}

/// Whether Redis refused a command it does not know (`FUNCTION` before Redis 7).
fn unknown_command(err: &::redis::RedisError) -> bool {
    err.to_string().to_lowercase().contains("unknown command")
}

#[cfg(test)]
mod tests {
    use super::{CODE, State, field, version, version_of};
    use ::redis::Value;

    #[test]
    fn a_function_list_entry_gives_its_fields_in_resp2_and_resp3() {
        let name = |s: &str| Value::BulkString(s.as_bytes().to_vec());
        let resp2 = Value::Array(vec![
            name("library_name"),
            name("invalidator"),
            name("engine"),
            name("LUA"),
        ]);
        assert_eq!(field(&resp2, "library_name"), Some("invalidator"));
        let resp3 = Value::Map(vec![(name("library_code"), name("code"))]);
        assert_eq!(field(&resp3, "library_code"), Some("code"));
        assert_eq!(field(&Value::Nil, "library_name"), None);
    }

    #[test]
    fn the_loaded_text_says_whether_it_is_this_version_an_older_or_a_newer_one() {
        assert!(version() >= 1);
        assert!(CODE.starts_with("#!lua name=invalidator\n"));
        assert_eq!(State::of(Some(CODE)), State::Current);
        assert_eq!(State::of(None), State::Missing);
        let with = |v: u32| {
            CODE.replace(
                &format!("local VERSION = {}", version()),
                &format!("local VERSION = {v}"),
            )
        };
        assert_eq!(
            State::of(Some(&with(version() + 1))),
            State::Newer(version() + 1)
        );
        assert_eq!(State::of(Some(&with(0))), State::Older(Some(0)));
        assert_eq!(
            State::of(Some("#!lua name=invalidator\n")),
            State::Older(None)
        );
        assert_eq!(
            State::of(Some(&format!("{CODE}\n-- edited"))),
            State::Changed
        );
        assert_eq!(version_of("  local VERSION = 7\n"), Some(7));
        assert!(State::Older(None).needs_load() && !State::Newer(2).needs_load());
    }
}
