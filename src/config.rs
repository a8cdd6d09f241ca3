//! Configuration: the TOML file, then `INVALIDATOR_<SECTION>_<KEY>` environment overrides, then
//! validation into a [`Config`]. Opens no connections.
//!
//! Precedence is environment over file over default. `DATABASE_URL` and `REDIS_URL` are honoured
//! as the conventional names, but the specific `INVALIDATOR_POSTGRES_URL` / `INVALIDATOR_REDIS_URL`
//! win over them when both are set.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::redact::redact;

/// How changes are read from Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Logical replication with the built-in `pgoutput` plugin.
    Replication,
    /// Triggers writing to an outbox table, announced with NOTIFY.
    Notify,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
    /// Text when stderr is a terminal, JSON otherwise (a container, a service): the default.
    Auto,
}

impl std::str::FromStr for LogFormat {
    type Err = String;

    fn from_str(text: &str) -> Result<LogFormat, String> {
        match text {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            "auto" => Ok(LogFormat::Auto),
            other => Err(format!(
                "unknown format {other:?}: expected \"text\", \"json\" or \"auto\""
            )),
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Postgres connection and replication objects.
    pub postgres: PostgresConfig,
    /// Redis connection URL (may hold a password: print it only through [`redact`]).
    pub redis_url: String,
    /// Further Redis targets that receive the same deletes (`[[redis.targets]]`); a change is
    /// acknowledged only once every target, `redis_url` included, confirmed it. Empty: one target.
    pub redis_targets: Vec<RedisTarget>,
    /// A rules directory or a single rules file.
    pub rules_path: PathBuf,
    /// Address of the HTTP server for `/metrics`, `/healthz` and `/readyz`.
    pub http_listen: SocketAddr,
    /// Batching and acknowledgement tuning.
    pub pipeline: PipelineConfig,
    /// Logging.
    pub log: LogConfig,
    /// How to talk to Redis: cluster or not, TLS files (`[redis]` besides `url`).
    pub redis: RedisConnectConfig,
    /// Who may call `invalidator.invalidate()` and what it may delete (`[invalidate]`).
    pub invalidate: InvalidateConfig,
    /// The configuration file that was read; `None` when there was none and only defaults and
    /// the environment apply.
    pub file: Option<PathBuf>,
}

/// The `[invalidate]` settings: manual invalidation with `invalidator.invalidate()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvalidateConfig {
    /// The roles `setup` grants `EXECUTE` on the functions to; nobody else may call them
    /// (superusers aside). Empty by default.
    pub roles: Vec<String>,
    /// Key prefixes the functions may delete under, besides the literal prefixes of the rules'
    /// keys.
    pub prefixes: Vec<String>,
}

/// The `[redis]` settings besides the URL.
#[derive(Debug, Clone, Default)]
pub struct RedisConnectConfig {
    /// `Some(true)`: a Redis Cluster; `Some(false)`: one server; `None`: ask the server at
    /// connect (`INFO cluster`).
    pub cluster: Option<bool>,
    /// A PEM file of CA certificates trusted for `rediss://` instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// A PEM client certificate chain, for servers started with `tls-auth-clients yes`.
    pub tls_cert_file: Option<PathBuf>,
    /// The PEM private key of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
    /// Replicas that must confirm a batch's deletes (`WAIT`) before it is acknowledged; 0 (the
    /// default) acknowledges on the primary's reply.
    pub wait_replicas: u32,
}

/// The `[postgres]` section.
#[derive(Debug, Clone)]
pub struct PostgresConfig {
    /// Connection URL (may hold a password: print it only through [`redact`]).
    pub url: String,
    /// Replication or notify mode.
    pub mode: Mode,
    /// Replication slot name.
    pub slot: String,
    /// Publication name.
    pub publication: String,
    /// After a lost or dropped slot, delete every key the rules can produce (the safety action).
    pub flush_on_slot_loss: bool,
    /// A PEM file of CA certificates trusted for the server's TLS certificate, besides the
    /// system roots; checked at load to hold at least one certificate.
    pub ca_file: Option<PathBuf>,
}

/// One further Redis target, `[[redis.targets]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// A short unique name (`[a-z0-9_]`), used in metric labels, logs and `/readyz`.
    pub name: String,
    /// Connection URL (may hold a password: print it only through [`redact`]).
    pub url: String,
}

/// The name of the `[redis] url` target in metric labels and `/readyz` when there are several.
pub const PRIMARY_TARGET: &str = "default";

/// The prefix of the variable that overrides a named target's URL:
/// `INVALIDATOR_REDIS_TARGETS_<NAME>_URL`, the name in upper case.
const TARGET_ENV_PREFIX: &str = "INVALIDATOR_REDIS_TARGETS_";

/// The `[pipeline]` section; the defaults need no tuning.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// A batch stops taking more transactions once it holds this many keys and patterns.
    pub max_batch_keys: usize,
    /// How often a standby status update is sent even when nothing changed.
    pub status_interval: Duration,
    /// Past this many distinct keys and patterns, one transaction's invalidations are replaced by
    /// every pattern of the rules of the tables it changed, so memory stays bounded.
    pub max_transaction_keys: usize,
    /// Replication mode: before a batch is deleted, wait until its transactions are visible to
    /// new snapshots (see `source::visibility`), so no reader can read the old row after the
    /// delete. On by default; off only to measure what it buys.
    pub wait_visible: bool,
}

/// The `[log]` section.
#[derive(Debug, Clone)]
pub struct LogConfig {
    /// Text or JSON lines, or `auto` (text on a terminal, else JSON).
    pub format: LogFormat,
    /// A `tracing` filter directive such as `info` or `invalidator=debug`; `RUST_LOG` overrides.
    pub level: String,
}

/// The configuration could not be loaded; always names where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped keys.
    #[error("{path}:{line}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A value is present but not acceptable.
    #[error("{origin}: {message}")]
    Invalid {
        /// The file and key, or the environment variable, that supplied the value.
        origin: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    postgres: RawPostgres,
    #[serde(default)]
    redis: RawRedis,
    #[serde(default)]
    rules: RawRules,
    #[serde(default)]
    http: RawHttp,
    #[serde(default)]
    pipeline: RawPipeline,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    invalidate: RawInvalidate,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInvalidate {
    roles: Option<Vec<String>>,
    prefixes: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgres {
    url: Option<String>,
    mode: Option<String>,
    slot: Option<String>,
    publication: Option<String>,
    flush_on_slot_loss: Option<bool>,
    ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedis {
    cluster: Option<bool>,
    ca_file: Option<PathBuf>,
    tls_cert_file: Option<PathBuf>,
    tls_key_file: Option<PathBuf>,
    wait_replicas: Option<u32>,
    url: Option<String>,
    #[serde(default)]
    targets: Vec<RawTarget>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    name: String,
    url: Option<String>,
    /// Set by `INVALIDATOR_REDIS_TARGETS_<NAME>_URL`, which beats `url`.
    #[serde(skip)]
    env_url: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRules {
    path: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPipeline {
    max_batch_keys: Option<usize>,
    status_interval_ms: Option<u64>,
    max_transaction_keys: Option<usize>,
    wait_visible: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

/// The default config file, used when `--config` is not given.
pub const DEFAULT_PATH: &str = "invalidator.toml";

impl Config {
    /// Every Redis URL deletes go to: `[redis] url` first, then each `[[redis.targets]]`.
    pub fn redis_urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.redis_url.as_str())
            .chain(self.redis_targets.iter().map(|t| t.url.as_str()))
    }

    /// Loads the configuration from the process environment and, when it exists, `path`.
    ///
    /// An explicit path that does not exist is an error; the default path may be absent, in
    /// which case defaults and the environment alone apply.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load_with_env(path, &env)
    }

    /// Like [`Config::load`], with the environment given explicitly (for tests).
    pub fn load_with_env(
        path: Option<&Path>,
        env: &[(String, String)],
    ) -> Result<Config, ConfigError> {
        let (file, explicit) = match path {
            Some(p) => (p.to_path_buf(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&file) {
            Ok(text) => Some(text),
            Err(e) if !explicit && e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(ConfigError::Read { path: file, source }),
        };
        let mut raw = match &text {
            Some(text) => toml::from_str::<RawConfig>(text).map_err(|e| ConfigError::Parse {
                path: file.clone(),
                line: e.span().map_or(1, |s| line_of(text, s.start)),
                message: e.message().to_owned(),
            })?,
            None => RawConfig::default(),
        };
        // Relative rule paths (and the default, `rules`) are relative to the config file, so a
        // config and its rules can move together (e.g. mounted at /etc/invalidator).
        let base = file.parent().map(Path::to_path_buf).unwrap_or_default();
        let p = raw
            .rules
            .path
            .take()
            .unwrap_or_else(|| PathBuf::from("rules"));
        raw.rules.path = Some(if p.is_relative() { base.join(p) } else { p });
        if let Some(ca) = raw.postgres.ca_file.take() {
            raw.postgres.ca_file = Some(if ca.is_relative() { base.join(ca) } else { ca });
        }
        for file in [
            &mut raw.redis.ca_file,
            &mut raw.redis.tls_cert_file,
            &mut raw.redis.tls_key_file,
        ] {
            if let Some(path) = file.take() {
                *file = Some(if path.is_relative() {
                    base.join(path)
                } else {
                    path
                });
            }
        }
        let mut database_url = None;
        let mut redis_url = None;
        let mut origins = Origins {
            file: file.clone(),
            read: text.is_some(),
            env: HashMap::new(),
        };
        for (name, value) in env {
            match name.as_str() {
                "DATABASE_URL" => database_url = Some(value.clone()),
                "REDIS_URL" => redis_url = Some(value.clone()),
                _ if is_service_link(name) => {}
                _ if name.starts_with("INVALIDATOR_") => {
                    apply_env(&mut raw, name, value)?;
                    origins.env.insert(key_of(name), name.clone());
                }
                _ => {}
            }
        }
        let env_wins = |name: &str| env.iter().any(|(n, _)| n == name);
        if !env_wins("INVALIDATOR_POSTGRES_URL") && database_url.is_some() {
            raw.postgres.url = database_url;
            origins
                .env
                .insert("postgres.url".to_owned(), "DATABASE_URL".to_owned());
        }
        if !env_wins("INVALIDATOR_REDIS_URL") && redis_url.is_some() {
            raw.redis.url = redis_url;
            origins
                .env
                .insert("redis.url".to_owned(), "REDIS_URL".to_owned());
        }
        validate(raw, &origins)
    }
}

fn apply_env(raw: &mut RawConfig, name: &str, value: &str) -> Result<(), ConfigError> {
    let v = Some(value.to_owned());
    let number = |v: &str| {
        v.parse().map_err(|_| ConfigError::Invalid {
            origin: name.to_owned(),
            message: format!("expected a non-negative integer, got {v:?}"),
        })
    };
    match name {
        "INVALIDATOR_POSTGRES_URL" => raw.postgres.url = v,
        "INVALIDATOR_POSTGRES_MODE" => raw.postgres.mode = v,
        "INVALIDATOR_POSTGRES_SLOT" => raw.postgres.slot = v,
        "INVALIDATOR_POSTGRES_PUBLICATION" => raw.postgres.publication = v,
        "INVALIDATOR_POSTGRES_FLUSH_ON_SLOT_LOSS" => {
            raw.postgres.flush_on_slot_loss =
                Some(value.parse().map_err(|_| ConfigError::Invalid {
                    origin: name.to_owned(),
                    message: format!("expected true or false, got {value:?}"),
                })?)
        }
        "INVALIDATOR_POSTGRES_CA_FILE" => raw.postgres.ca_file = Some(PathBuf::from(value)),
        "INVALIDATOR_REDIS_URL" => raw.redis.url = v,
        "INVALIDATOR_REDIS_CLUSTER" => {
            raw.redis.cluster = Some(value.parse().map_err(|_| ConfigError::Invalid {
                origin: name.to_owned(),
                message: format!("expected true or false, got {value:?}"),
            })?)
        }
        "INVALIDATOR_REDIS_CA_FILE" => raw.redis.ca_file = Some(PathBuf::from(value)),
        "INVALIDATOR_REDIS_WAIT_REPLICAS" => {
            let replicas: usize = number(value)?;
            raw.redis.wait_replicas =
                Some(replicas.try_into().map_err(|_| ConfigError::Invalid {
                    origin: name.to_owned(),
                    message: format!("too many replicas: {value}"),
                })?)
        }
        "INVALIDATOR_REDIS_TLS_CERT_FILE" => raw.redis.tls_cert_file = Some(PathBuf::from(value)),
        "INVALIDATOR_REDIS_TLS_KEY_FILE" => raw.redis.tls_key_file = Some(PathBuf::from(value)),
        "INVALIDATOR_RULES_PATH" => raw.rules.path = Some(PathBuf::from(value)),
        "INVALIDATOR_HTTP_LISTEN" => raw.http.listen = v,
        "INVALIDATOR_PIPELINE_MAX_BATCH_KEYS" => raw.pipeline.max_batch_keys = Some(number(value)?),
        "INVALIDATOR_PIPELINE_STATUS_INTERVAL_MS" => {
            raw.pipeline.status_interval_ms = Some(number(value)? as u64)
        }
        "INVALIDATOR_PIPELINE_MAX_TRANSACTION_KEYS" => {
            raw.pipeline.max_transaction_keys = Some(number(value)?)
        }
        "INVALIDATOR_PIPELINE_WAIT_VISIBLE" => {
            raw.pipeline.wait_visible = Some(value.parse().map_err(|_| ConfigError::Invalid {
                origin: name.to_owned(),
                message: format!("expected true or false, got {value:?}"),
            })?)
        }
        "INVALIDATOR_LOG_FORMAT" => raw.log.format = v,
        "INVALIDATOR_LOG_LEVEL" => raw.log.level = v,
        "INVALIDATOR_INVALIDATE_ROLES" => raw.invalidate.roles = Some(comma_list(value)),
        "INVALIDATOR_INVALIDATE_PREFIXES" => raw.invalidate.prefixes = Some(comma_list(value)),
        _ if name.starts_with(TARGET_ENV_PREFIX) && name.ends_with("_URL") => {
            let upper = &name[TARGET_ENV_PREFIX.len()..name.len() - "_URL".len()];
            let target = raw
                .redis
                .targets
                .iter_mut()
                .find(|t| t.name.to_ascii_uppercase() == upper);
            match target {
                Some(target) => target.env_url = v,
                None => {
                    return Err(ConfigError::Invalid {
                        origin: name.to_owned(),
                        message: format!(
                            "no [[redis.targets]] is named {:?}: declare the target in the \
                             configuration file, the variable only sets its url",
                            upper.to_ascii_lowercase()
                        ),
                    });
                }
            }
        }
        _ => {
            return Err(ConfigError::Invalid {
                origin: name.to_owned(),
                message: "unknown setting (expected INVALIDATOR_<SECTION>_<KEY> for a key of \
                          the configuration file)"
                    .to_owned(),
            });
        }
    }
    Ok(())
}

/// Where each setting came from, so that an error names the variable that set a bad value, or
/// the file and key.
struct Origins {
    /// The configuration file (read or not).
    file: PathBuf,
    /// Whether it was read; if not, only defaults and the environment apply.
    read: bool,
    /// The variable that set each key (`postgres.slot` → `INVALIDATOR_POSTGRES_SLOT`).
    env: HashMap<String, String>,
}

impl Origins {
    /// Where the value of `key` came from, for an error about it.
    fn of(&self, key: &str) -> String {
        match self.env.get(key) {
            Some(name) => format!("{name} (environment, [{key}])"),
            None if self.read => format!("{} [{key}]", self.file.display()),
            None => format!("{key} (default; {} does not exist)", self.file.display()),
        }
    }
}

/// A comma-separated list from the environment, each item trimmed; empty items are dropped
/// (`""` is the empty list).
fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The configuration key a variable sets: `INVALIDATOR_POSTGRES_SLOT` → `postgres.slot` (no
/// section name has an underscore, so the first one ends it).
fn key_of(variable: &str) -> String {
    let rest = variable
        .strip_prefix("INVALIDATOR_")
        .unwrap_or(variable)
        .to_ascii_lowercase();
    match rest.split_once('_') {
        Some((section, key)) => format!("{section}.{key}"),
        None => rest,
    }
}

fn validate(raw: RawConfig, origins: &Origins) -> Result<Config, ConfigError> {
    let file = &origins.file;
    let invalid = |key: &str, message: String| ConfigError::Invalid {
        origin: origins.of(key),
        message,
    };
    let mode = match raw.postgres.mode.as_deref().unwrap_or("replication") {
        "replication" => Mode::Replication,
        "notify" => Mode::Notify,
        other => {
            return Err(invalid(
                "postgres.mode",
                format!("unknown mode {other:?}: expected \"replication\" or \"notify\""),
            ));
        }
    };
    let slot = raw
        .postgres
        .slot
        .unwrap_or_else(|| "invalidator".to_owned());
    let publication = raw
        .postgres
        .publication
        .unwrap_or_else(|| "invalidator".to_owned());
    for (key, name) in [
        ("postgres.slot", &slot),
        ("postgres.publication", &publication),
    ] {
        if !is_identifier(name) {
            return Err(invalid(
                key,
                format!("{name:?} is not a valid name: use 1-63 of a-z, 0-9 and _"),
            ));
        }
    }
    let url = raw
        .postgres
        .url
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let parsed = crate::endpoint::parse_url(&url);
    // libpq's other values: tokio-postgres parses none but `read-only`, which its SQL sessions
    // (setup's, the visibility gate's) would honour by going to a standby, while the replication
    // connection goes to the primary.
    let read_only = matches!(&parsed, Ok((pg, _))
        if pg.get_target_session_attrs() == tokio_postgres::config::TargetSessionAttrs::ReadOnly);
    if let Some(attrs) = target_session_attrs(&url)
        && (read_only || parsed.is_err() && attrs != "any" && attrs != "read-write")
    {
        return Err(invalid(
            "postgres.url",
            format!(
                "{}: target_session_attrs={attrs} is not supported: use read-write (the first \
                 host that is not a standby) or any",
                redact(&url)
            ),
        ));
    }
    if let Err(e) = parsed {
        return Err(invalid(
            "postgres.url",
            format!("{} is not a valid Postgres URL: {e}", redact(&url)),
        ));
    }
    if let Some(ca) = &raw.postgres.ca_file {
        crate::endpoint::load_ca_file(ca).map_err(|e| invalid("postgres.ca_file", e))?;
    }
    let redis_url = raw
        .redis
        .url
        .unwrap_or_else(|| "redis://127.0.0.1:6379/0".to_owned());
    if !is_redis_url(&redis_url) {
        return Err(invalid(
            "redis.url",
            format!(
                "{} is not a Redis URL: expected redis://, rediss:// or unix://",
                redact(&redis_url)
            ),
        ));
    }
    let redis = RedisConnectConfig {
        cluster: raw.redis.cluster,
        ca_file: raw.redis.ca_file,
        tls_cert_file: raw.redis.tls_cert_file,
        tls_key_file: raw.redis.tls_key_file,
        wait_replicas: raw.redis.wait_replicas.unwrap_or(0),
    };
    validate_redis_tls(&redis, &redis_url).map_err(|(key, message)| invalid(key, message))?;
    let redis_targets = validate_targets(raw.redis.targets, file)?;
    let listen = raw
        .http
        .listen
        .unwrap_or_else(|| "127.0.0.1:9187".to_owned());
    let http_listen = listen.parse().map_err(|_| {
        invalid(
            "http.listen",
            format!("{listen:?} is not an address like 127.0.0.1:9187"),
        )
    })?;
    let format = raw
        .log
        .format
        .as_deref()
        .unwrap_or("auto")
        .parse()
        .map_err(|message| invalid("log.format", message))?;
    let max_batch_keys = raw.pipeline.max_batch_keys.unwrap_or(10_000);
    if max_batch_keys == 0 {
        return Err(invalid(
            "pipeline.max_batch_keys",
            "must be at least 1".to_owned(),
        ));
    }
    let max_transaction_keys = raw.pipeline.max_transaction_keys.unwrap_or(100_000);
    if max_transaction_keys == 0 {
        return Err(invalid(
            "pipeline.max_transaction_keys",
            "must be at least 1".to_owned(),
        ));
    }
    let invalidate = InvalidateConfig {
        roles: raw.invalidate.roles.unwrap_or_default(),
        prefixes: raw.invalidate.prefixes.unwrap_or_default(),
    };
    if let Some(role) = invalidate
        .roles
        .iter()
        .find(|r| r.is_empty() || r.len() > 63 || r.eq_ignore_ascii_case("public"))
    {
        return Err(invalid(
            "invalidate.roles",
            format!("{role:?} is not a role name: use the name of an existing role (not PUBLIC)"),
        ));
    }
    if invalidate.prefixes.iter().any(String::is_empty) {
        return Err(invalid(
            "invalidate.prefixes",
            "an empty prefix would allow every key: name the start of the keys".to_owned(),
        ));
    }
    Ok(Config {
        invalidate,
        postgres: PostgresConfig {
            url,
            mode,
            slot,
            publication,
            flush_on_slot_loss: raw.postgres.flush_on_slot_loss.unwrap_or(true),
            ca_file: raw.postgres.ca_file,
        },
        redis_url,
        redis_targets,
        rules_path: raw.rules.path.unwrap_or_else(|| PathBuf::from("rules")),
        http_listen,
        pipeline: PipelineConfig {
            max_batch_keys,
            status_interval: Duration::from_millis(
                raw.pipeline.status_interval_ms.unwrap_or(10_000).max(100),
            ),
            max_transaction_keys,
            wait_visible: raw.pipeline.wait_visible.unwrap_or(true),
        },
        log: LogConfig {
            format,
            level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
        },
        redis,
        file: origins.read.then(|| file.clone()),
    })
}

/// Checks the `[redis]` TLS files (each readable and holding what it should, the certificate
/// and key together, a `rediss://` URL to use them on); the error names the key.
fn validate_redis_tls(raw: &RedisConnectConfig, url: &str) -> Result<(), (&'static str, String)> {
    use rustls::pki_types::{PrivateKeyDer, pem::PemObject};
    if let Some(ca) = &raw.ca_file {
        crate::endpoint::load_ca_file(ca).map_err(|e| ("redis.ca_file", e))?;
    }
    match (&raw.tls_cert_file, &raw.tls_key_file) {
        (Some(cert), Some(key)) => {
            crate::endpoint::load_ca_file(cert).map_err(|e| ("redis.tls_cert_file", e))?;
            PrivateKeyDer::from_pem_file(key).map_err(|e| {
                (
                    "redis.tls_key_file",
                    format!("cannot read a PEM private key from {}: {e}", key.display()),
                )
            })?;
        }
        (None, None) => {}
        (Some(_), None) => {
            return Err((
                "redis.tls_key_file",
                "tls_cert_file needs tls_key_file".into(),
            ));
        }
        (None, Some(_)) => {
            return Err((
                "redis.tls_cert_file",
                "tls_key_file needs tls_cert_file".into(),
            ));
        }
    }
    let tls_files = raw.ca_file.is_some() || raw.tls_cert_file.is_some();
    if tls_files && !url.starts_with("rediss://") {
        return Err((
            "redis.url",
            format!(
                "{} is not a rediss:// URL, so ca_file and tls_cert_file cannot be used",
                redact(url)
            ),
        ));
    }
    Ok(())
}

/// Whether `url` is a Redis URL the deleter can use.
fn is_redis_url(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")
}

/// Checks the further targets: names valid, unique and not the primary's, a Redis URL each.
fn validate_targets(raw: Vec<RawTarget>, file: &Path) -> Result<Vec<RedisTarget>, ConfigError> {
    let mut targets: Vec<RedisTarget> = Vec::with_capacity(raw.len());
    for (index, target) in raw.into_iter().enumerate() {
        let key = format!("redis.targets[{index}]");
        let invalid = |message: String| ConfigError::Invalid {
            origin: format!("{} [{key}]", file.display()),
            message,
        };
        let name = target.name;
        if !is_identifier(&name) || name.len() > 32 {
            return Err(invalid(format!(
                "name {name:?} is not valid: use 1-32 of a-z, 0-9 and _"
            )));
        }
        if name == PRIMARY_TARGET || targets.iter().any(|t| t.name == name) {
            return Err(invalid(format!(
                "name {name:?} is used twice (\"{PRIMARY_TARGET}\" is [redis] url's)"
            )));
        }
        let env = format!("{TARGET_ENV_PREFIX}{}_URL", name.to_ascii_uppercase());
        let Some(url) = target.env_url.or(target.url) else {
            return Err(invalid(format!(
                "target {name:?} has no url (set url or {env})"
            )));
        };
        if !is_redis_url(&url) {
            return Err(invalid(format!(
                "{} is not a Redis URL: expected redis://, rediss:// or unix://",
                redact(&url)
            )));
        }
        targets.push(RedisTarget { name, url });
    }
    Ok(targets)
}

/// Whether `name` is one of the variables Kubernetes injects into every pod of the namespace
/// for a Service named `invalidator` (`INVALIDATOR_SERVICE_HOST`, `INVALIDATOR_SERVICE_PORT`,
/// `INVALIDATOR_PORT`, `INVALIDATOR_PORT_9187_TCP_ADDR`, ...). None can be a misspelt setting
/// (no section is called SERVICE or PORT), and rejecting them would stop every pod beside such
/// a Service.
fn is_service_link(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("INVALIDATOR_") else {
        return false;
    };
    rest.starts_with("SERVICE_")
        || rest == "PORT"
        || rest
            .strip_prefix("PORT_")
            .is_some_and(|port| port.starts_with(|c: char| c.is_ascii_digit()))
}

/// Whether `name` is safe to use unquoted as a slot or publication name.
fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The value of `target_session_attrs` in a Postgres URL's query or a `key=value` string.
fn target_session_attrs(url: &str) -> Option<&str> {
    let pairs: Vec<&str> = match url.split_once('?') {
        Some((_, query)) if url.contains("://") => query.split('&').collect(),
        _ => url.split_whitespace().collect(),
    };
    pairs
        .into_iter()
        .find_map(|pair| pair.strip_prefix("target_session_attrs="))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::Builder::new()
            .suffix(".toml")
            .tempfile()
            .expect("temp config");
        f.write_all(text.as_bytes()).expect("write temp config");
        f
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn kubernetes_service_links_are_ignored_but_other_unknown_names_are_not() {
        let links = env(&[
            ("INVALIDATOR_SERVICE_HOST", "10.0.0.1"),
            ("INVALIDATOR_SERVICE_PORT", "9187"),
            ("INVALIDATOR_SERVICE_PORT_METRICS", "9187"),
            ("INVALIDATOR_PORT", "tcp://10.0.0.1:9187"),
            ("INVALIDATOR_PORT_9187_TCP", "tcp://10.0.0.1:9187"),
            ("INVALIDATOR_PORT_9187_TCP_ADDR", "10.0.0.1"),
        ]);
        assert!(Config::load_with_env(None, &links).is_ok());
        for typo in [
            "INVALIDATOR_PORTS",
            "INVALIDATOR_PORT_X",
            "INVALIDATOR_SERVICE",
        ] {
            let err = Config::load_with_env(None, &env(&[(typo, "1")])).unwrap_err();
            assert!(err.to_string().contains(typo), "{err}");
        }
    }

    #[test]
    fn invalidate_roles_and_prefixes_come_from_file_or_comma_separated_environment() {
        let cfg = Config::load_with_env(None, &env(&[])).unwrap();
        assert_eq!(cfg.invalidate, InvalidateConfig::default());
        let file = write("[invalidate]\nroles = [\"app\"]\nprefixes = [\"report:\"]\n");
        let cfg = Config::load_with_env(Some(file.path()), &env(&[])).unwrap();
        assert_eq!(cfg.invalidate.roles, ["app"]);
        assert_eq!(cfg.invalidate.prefixes, ["report:"]);
        let cfg = Config::load_with_env(
            Some(file.path()),
            &env(&[
                ("INVALIDATOR_INVALIDATE_ROLES", "app, reports"),
                ("INVALIDATOR_INVALIDATE_PREFIXES", "a:,b:"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.invalidate.roles, ["app", "reports"]);
        assert_eq!(cfg.invalidate.prefixes, ["a:", "b:"]);
        let file = write("[invalidate]\nprefixes = [\"\"]\n");
        let err = Config::load_with_env(Some(file.path()), &env(&[])).unwrap_err();
        assert!(err.to_string().contains("[invalidate.prefixes]"), "{err}");
        let err = Config::load_with_env(None, &env(&[("INVALIDATOR_INVALIDATE_ROLES", "public")]))
            .unwrap_err();
        assert!(
            err.to_string().contains("INVALIDATOR_INVALIDATE_ROLES"),
            "{err}"
        );
    }

    #[test]
    fn redis_wait_replicas_defaults_to_zero_and_comes_from_file_or_environment() {
        let cfg = Config::load_with_env(None, &env(&[])).unwrap();
        assert_eq!(cfg.redis.wait_replicas, 0);
        let file = write("[redis]\nwait_replicas = 1\n");
        let cfg = Config::load_with_env(Some(file.path()), &env(&[])).unwrap();
        assert_eq!(cfg.redis.wait_replicas, 1);
        let cfg = Config::load_with_env(
            Some(file.path()),
            &env(&[("INVALIDATOR_REDIS_WAIT_REPLICAS", "2")]),
        )
        .unwrap();
        assert_eq!(cfg.redis.wait_replicas, 2);
        let err = Config::load_with_env(None, &env(&[("INVALIDATOR_REDIS_WAIT_REPLICAS", "x")]))
            .unwrap_err();
        assert!(
            err.to_string().contains("INVALIDATOR_REDIS_WAIT_REPLICAS"),
            "{err}"
        );
    }

    #[test]
    fn an_error_names_the_variable_or_the_file_key_that_set_the_bad_value() {
        let file = write("[postgres]\nslot = \"Bad-File\"\n");
        let err = Config::load_with_env(Some(file.path()), &env(&[])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with(&format!("{} [postgres.slot]", file.path().display())),
            "{err}"
        );
        let err = Config::load_with_env(
            Some(file.path()),
            &env(&[("INVALIDATOR_POSTGRES_SLOT", "Bad-Env")]),
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with(
                "INVALIDATOR_POSTGRES_SLOT (environment, [postgres.slot]): \"Bad-Env\""
            ),
            "{err}"
        );
        let err = Config::load_with_env(None, &env(&[("DATABASE_URL", "postgres://h:x/db")]))
            .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("DATABASE_URL (environment, [postgres.url])"),
            "{err}"
        );
    }

    #[test]
    fn defaults_apply_when_the_default_file_is_absent() {
        let cfg = Config::load_with_env(None, &[]);
        // The test's working directory has no invalidator.toml, or has the example one; both load.
        let cfg = cfg.expect("defaults load");
        assert_eq!(cfg.postgres.slot, "invalidator");
        assert_eq!(cfg.http_listen.to_string(), "127.0.0.1:9187");
    }

    #[test]
    fn an_explicit_missing_file_is_an_error() {
        let err = Config::load_with_env(Some(Path::new("/nonexistent/x.toml")), &[]).unwrap_err();
        assert!(err.to_string().starts_with("/nonexistent/x.toml:"), "{err}");
    }

    #[test]
    fn environment_beats_file_beats_default() {
        let f = write("[postgres]\nslot = \"from_file\"\npublication = \"pub_file\"\n");
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[("INVALIDATOR_POSTGRES_SLOT", "from_env")]),
        )
        .unwrap();
        assert_eq!(cfg.postgres.slot, "from_env");
        assert_eq!(cfg.postgres.publication, "pub_file");
        assert_eq!(cfg.postgres.mode, Mode::Replication);
    }

    #[test]
    fn database_url_overrides_the_file_but_not_the_specific_variable() {
        let f = write("[postgres]\nurl = \"postgres://a@h/file\"\n");
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[("DATABASE_URL", "postgres://a@h/generic")]),
        )
        .unwrap();
        assert_eq!(cfg.postgres.url, "postgres://a@h/generic");
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[
                ("DATABASE_URL", "postgres://a@h/generic"),
                ("INVALIDATOR_POSTGRES_URL", "postgres://a@h/specific"),
                ("REDIS_URL", "redis://r:1/2"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.postgres.url, "postgres://a@h/specific");
        assert_eq!(cfg.redis_url, "redis://r:1/2");
    }

    #[test]
    fn unknown_keys_are_errors_with_file_and_line() {
        let f = write("[postgres]\nslot = \"s\"\n\n[redis]\nurll = \"redis://x\"\n");
        let err = Config::load_with_env(Some(f.path()), &[]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with(&format!("{}:5:", f.path().display())),
            "{text}"
        );
        assert!(text.contains("urll"), "{text}");
    }

    #[test]
    fn unknown_environment_settings_are_errors() {
        let err = Config::load_with_env(None, &env(&[("INVALIDATOR_HTTP_PORT", "1")])).unwrap_err();
        assert!(err.to_string().contains("INVALIDATOR_HTTP_PORT"), "{err}");
    }

    #[test]
    fn passwords_never_appear_in_errors() {
        let err = Config::load_with_env(
            None,
            &env(&[("INVALIDATOR_REDIS_URL", "http://user:hunter2@host:6379")]),
        )
        .unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn relative_rule_paths_follow_the_config_file() {
        let f = write("[rules]\npath = \"my-rules\"\n");
        let cfg = Config::load_with_env(Some(f.path()), &[]).unwrap();
        assert_eq!(cfg.rules_path, f.path().parent().unwrap().join("my-rules"));
    }

    #[test]
    fn ca_file_must_hold_a_certificate_and_the_environment_overrides_it() {
        let f = write("[postgres]\nca_file = \"missing-ca.pem\"\n");
        let err = Config::load_with_env(Some(f.path()), &[]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("postgres.ca_file") && text.contains("missing-ca.pem"),
            "{text}"
        );
        let mut ca = tempfile::NamedTempFile::new().unwrap();
        ca.write_all(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n")
            .unwrap();
        let ca_path = ca.path().to_string_lossy().into_owned();
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[("INVALIDATOR_POSTGRES_CA_FILE", &ca_path)]),
        )
        .unwrap();
        assert_eq!(cfg.postgres.ca_file.as_deref(), Some(ca.path()));
        let empty = write("");
        let cfg = Config::load_with_env(Some(empty.path()), &[]).unwrap();
        assert_eq!(cfg.postgres.ca_file, None);
    }

    #[test]
    fn max_transaction_keys_defaults_and_is_overridable() {
        let empty = write("");
        let cfg = Config::load_with_env(Some(empty.path()), &[]).unwrap();
        assert_eq!(cfg.pipeline.max_transaction_keys, 100_000);
        let f = write("[pipeline]\nmax_transaction_keys = 500\n");
        let cfg = Config::load_with_env(Some(f.path()), &[]).unwrap();
        assert_eq!(cfg.pipeline.max_transaction_keys, 500);
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[("INVALIDATOR_PIPELINE_MAX_TRANSACTION_KEYS", "7")]),
        )
        .unwrap();
        assert_eq!(cfg.pipeline.max_transaction_keys, 7);
        let zero = write("[pipeline]\nmax_transaction_keys = 0\n");
        let err = Config::load_with_env(Some(zero.path()), &[]).unwrap_err();
        assert!(
            err.to_string().contains("pipeline.max_transaction_keys"),
            "{err}"
        );
    }

    #[test]
    fn further_redis_targets_load_and_their_url_comes_from_the_environment() {
        let empty = write("");
        let cfg = Config::load_with_env(Some(empty.path()), &[]).unwrap();
        assert!(cfg.redis_targets.is_empty());
        let f = write(
            "[redis]\nurl = \"redis://main:6379/0\"\n\n[[redis.targets]]\nname = \"eu\"\n\
             url = \"redis://eu:6379/0\"\n\n[[redis.targets]]\nname = \"us_east\"\n",
        );
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[
                (
                    "INVALIDATOR_REDIS_TARGETS_US_EAST_URL",
                    "rediss://:pw@us:6380/0",
                ),
                ("REDIS_URL", "redis://generic:6379/0"),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.redis_url, "redis://generic:6379/0");
        assert_eq!(
            cfg.redis_targets,
            vec![
                RedisTarget {
                    name: "eu".to_owned(),
                    url: "redis://eu:6379/0".to_owned()
                },
                RedisTarget {
                    name: "us_east".to_owned(),
                    url: "rediss://:pw@us:6380/0".to_owned()
                },
            ]
        );
        // Without the variable, us_east has no url.
        let err = Config::load_with_env(Some(f.path()), &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains("INVALIDATOR_REDIS_TARGETS_US_EAST_URL"),
            "{err}"
        );
        // A variable for a target the file does not declare is a typo.
        let err = Config::load_with_env(
            Some(f.path()),
            &env(&[("INVALIDATOR_REDIS_TARGETS_EUU_URL", "redis://x:1/0")]),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("INVALIDATOR_REDIS_TARGETS_EUU_URL"),
            "{err}"
        );
    }

    #[test]
    fn redis_target_names_are_unique_valid_and_keys_are_known() {
        for (text, needle) in [
            (
                "[[redis.targets]]\nname = \"eu\"\nurl = \"redis://a/0\"\n\
                 [[redis.targets]]\nname = \"eu\"\nurl = \"redis://b/0\"\n",
                "used twice",
            ),
            (
                "[[redis.targets]]\nname = \"default\"\nurl = \"redis://a/0\"\n",
                "used twice",
            ),
            (
                "[[redis.targets]]\nname = \"EU-1\"\nurl = \"redis://a/0\"\n",
                "not valid",
            ),
            (
                "[[redis.targets]]\nname = \"eu\"\nurl = \"http://u:hunter2@a/0\"\n",
                "not a Redis URL",
            ),
            (
                "[[redis.targets]]\nname = \"eu\"\nurll = \"redis://a/0\"\n",
                "urll",
            ),
        ] {
            let f = write(text);
            let err = Config::load_with_env(Some(f.path()), &[]).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(needle), "{text}");
            assert!(!text.contains("hunter2"), "{text}");
        }
    }

    /// A PEM file holding one (syntactically) certificate, and one holding a private key: the
    /// loader checks the PEM sections, not the DER inside.
    fn tls_files() -> (tempfile::NamedTempFile, tempfile::NamedTempFile) {
        let mut cert = tempfile::NamedTempFile::new().unwrap();
        cert.write_all(b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n")
            .unwrap();
        let mut key = tempfile::NamedTempFile::new().unwrap();
        key.write_all(b"-----BEGIN PRIVATE KEY-----\nMAA=\n-----END PRIVATE KEY-----\n")
            .unwrap();
        (cert, key)
    }

    #[test]
    fn redis_cluster_is_detected_unless_the_file_or_the_environment_says() {
        let empty = write("");
        let cfg = Config::load_with_env(Some(empty.path()), &[]).unwrap();
        assert_eq!(cfg.redis.cluster, None);
        let f = write("[redis]\ncluster = true\n");
        let cfg = Config::load_with_env(Some(f.path()), &[]).unwrap();
        assert_eq!(cfg.redis.cluster, Some(true));
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[("INVALIDATOR_REDIS_CLUSTER", "false")]),
        )
        .unwrap();
        assert_eq!(cfg.redis.cluster, Some(false));
        let cfg =
            Config::load_with_env(None, &env(&[("INVALIDATOR_REDIS_CLUSTER", "true")])).unwrap();
        assert_eq!(cfg.redis.cluster, Some(true));
        let err = Config::load_with_env(None, &env(&[("INVALIDATOR_REDIS_CLUSTER", "yes")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("INVALIDATOR_REDIS_CLUSTER") && err.contains("true or false"),
            "{err}"
        );
        let err = Config::load_with_env(Some(write("[redis]\ncluster = \"yes\"\n").path()), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(":2:"), "{err}");
    }

    #[test]
    fn redis_tls_files_load_relative_to_the_file_and_the_environment_overrides_them() {
        let (cert, key) = tls_files();
        let dir = cert.path().parent().unwrap();
        let name = |f: &tempfile::NamedTempFile| {
            f.path().file_name().unwrap().to_string_lossy().into_owned()
        };
        // Relative paths are relative to the configuration file (the temp dir for both).
        let f = write(&format!(
            "[redis]\nurl = \"rediss://cache:6380/0\"\nca_file = \"{}\"\n\
             tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            name(&cert),
            name(&cert),
            name(&key)
        ));
        assert_eq!(f.path().parent(), Some(dir));
        let cfg = Config::load_with_env(Some(f.path()), &[]).unwrap();
        assert_eq!(cfg.redis.ca_file.as_deref(), Some(cert.path()));
        assert_eq!(cfg.redis.tls_cert_file.as_deref(), Some(cert.path()));
        assert_eq!(cfg.redis.tls_key_file.as_deref(), Some(key.path()));

        let (cert2, key2) = tls_files();
        let path = |f: &tempfile::NamedTempFile| f.path().to_string_lossy().into_owned();
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[
                ("INVALIDATOR_REDIS_CA_FILE", &path(&cert2)),
                ("INVALIDATOR_REDIS_TLS_CERT_FILE", &path(&cert2)),
                ("INVALIDATOR_REDIS_TLS_KEY_FILE", &path(&key2)),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.redis.ca_file.as_deref(), Some(cert2.path()));
        assert_eq!(cfg.redis.tls_cert_file.as_deref(), Some(cert2.path()));
        assert_eq!(cfg.redis.tls_key_file.as_deref(), Some(key2.path()));

        // The environment alone is enough, with a rediss:// URL.
        let cfg = Config::load_with_env(
            None,
            &env(&[
                ("INVALIDATOR_REDIS_URL", "rediss://cache:6380/0"),
                ("INVALIDATOR_REDIS_CA_FILE", &path(&cert2)),
            ]),
        )
        .unwrap();
        assert_eq!(cfg.redis.ca_file.as_deref(), Some(cert2.path()));
        assert_eq!(cfg.redis.tls_cert_file, None);
    }

    #[test]
    fn redis_tls_files_must_hold_what_they_say() {
        let (cert, key) = tls_files();
        let path = |f: &tempfile::NamedTempFile| f.path().to_string_lossy().into_owned();
        let url = ("INVALIDATOR_REDIS_URL", "rediss://cache:6380/0");
        for (vars, needle) in [
            (
                vec![(
                    "INVALIDATOR_REDIS_CA_FILE",
                    "/nonexistent/ca.pem".to_owned(),
                )],
                "redis.ca_file",
            ),
            // A key is no certificate.
            (
                vec![("INVALIDATOR_REDIS_CA_FILE", path(&key))],
                "redis.ca_file",
            ),
            (
                vec![
                    ("INVALIDATOR_REDIS_TLS_CERT_FILE", path(&key)),
                    ("INVALIDATOR_REDIS_TLS_KEY_FILE", path(&key)),
                ],
                "redis.tls_cert_file",
            ),
            // A certificate is no private key.
            (
                vec![
                    ("INVALIDATOR_REDIS_TLS_CERT_FILE", path(&cert)),
                    ("INVALIDATOR_REDIS_TLS_KEY_FILE", path(&cert)),
                ],
                "redis.tls_key_file",
            ),
        ] {
            let mut pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            pairs.push(url);
            let err = Config::load_with_env(None, &env(&pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{vars:?}: {err}");
        }
    }

    #[test]
    fn a_certificate_needs_its_key_and_tls_files_need_a_rediss_url() {
        let (cert, key) = tls_files();
        let path = |f: &tempfile::NamedTempFile| f.path().to_string_lossy().into_owned();
        let tls = ("INVALIDATOR_REDIS_URL", "rediss://cache:6380/0");
        let err = Config::load_with_env(
            None,
            &env(&[tls, ("INVALIDATOR_REDIS_TLS_CERT_FILE", &path(&cert))]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("redis.tls_key_file") && err.contains("tls_cert_file needs tls_key_file"),
            "{err}"
        );
        let err = Config::load_with_env(
            None,
            &env(&[tls, ("INVALIDATOR_REDIS_TLS_KEY_FILE", &path(&key))]),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("redis.tls_cert_file") && err.contains("tls_key_file needs tls_cert_file"),
            "{err}"
        );

        // A CA file or a client certificate on a plain redis:// URL would be silently unused.
        let plain = ("INVALIDATOR_REDIS_URL", "redis://:hunter2@cache:6379/0");
        for vars in [
            vec![("INVALIDATOR_REDIS_CA_FILE", path(&cert))],
            vec![
                ("INVALIDATOR_REDIS_TLS_CERT_FILE", path(&cert)),
                ("INVALIDATOR_REDIS_TLS_KEY_FILE", path(&key)),
            ],
        ] {
            let mut pairs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
            pairs.push(plain);
            let err = Config::load_with_env(None, &env(&pairs))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("redis.url") && err.contains("is not a rediss:// URL"),
                "{vars:?}: {err}"
            );
            assert!(!err.contains("hunter2"), "{err}");
        }
        // Also when the URL comes from the file and the file from the environment.
        let f = write("[redis]\nurl = \"redis://cache:6379/0\"\n");
        let err = Config::load_with_env(
            Some(f.path()),
            &env(&[("INVALIDATOR_REDIS_CA_FILE", &path(&cert))]),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("redis.url"), "{err}");
        // `cluster` needs no TLS and works with redis://.
        let cfg = Config::load_with_env(
            Some(f.path()),
            &env(&[("INVALIDATOR_REDIS_CLUSTER", "true")]),
        )
        .unwrap();
        assert_eq!(cfg.redis.cluster, Some(true));
    }

    #[test]
    fn bad_names_and_modes_are_rejected() {
        for (var, value) in [
            ("INVALIDATOR_POSTGRES_SLOT", "Bad-Slot"),
            ("INVALIDATOR_POSTGRES_MODE", "logical"),
            ("INVALIDATOR_HTTP_LISTEN", "9187"),
            ("INVALIDATOR_PIPELINE_MAX_BATCH_KEYS", "lots"),
            ("INVALIDATOR_PIPELINE_MAX_TRANSACTION_KEYS", "0"),
            ("INVALIDATOR_PIPELINE_MAX_TRANSACTION_KEYS", "-1"),
        ] {
            let err = Config::load_with_env(None, &env(&[(var, value)]));
            assert!(err.is_err(), "{var}={value} accepted");
        }
    }
}
