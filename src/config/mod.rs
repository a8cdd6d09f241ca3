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

mod env;
mod validate;

use env::{Origins, apply_env, is_service_link, key_of};
use validate::validate;

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
    /// Keep the live key index of the keys under the rules' pattern prefixes (off by default).
    pub key_index: bool,
    /// The most keys the key index may hold before it is dropped until restart.
    pub key_index_max_keys: usize,
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
    /// Ask PostgreSQL 14+ to stream large transactions before they commit (protocol version
    /// 2), instead of decoding each only at its commit after spilling it to disk.
    pub stream_large_transactions: bool,
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
    /// No new batch starts while the batches in flight hold this many patterns that wait for
    /// the SCAN walk, so memory stays bounded (an estimated half a KiB each at most).
    pub max_pending_patterns: usize,
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
    stream_large_transactions: Option<bool>,
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
    key_index: Option<bool>,
    key_index_max_keys: Option<usize>,
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
    max_pending_patterns: Option<usize>,
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

/// 1-based line number of a byte offset.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
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
    fn the_key_index_is_off_by_default_and_its_limit_at_least_one() {
        let cfg = Config::load_with_env(None, &env(&[])).unwrap();
        assert!(!cfg.redis.key_index);
        assert_eq!(cfg.redis.key_index_max_keys, 5_000_000);
        let file = write("[redis]\nkey_index = true\nkey_index_max_keys = 10\n");
        let cfg = Config::load_with_env(Some(file.path()), &env(&[])).unwrap();
        assert!(cfg.redis.key_index);
        assert_eq!(cfg.redis.key_index_max_keys, 10);
        let cfg = Config::load_with_env(
            Some(file.path()),
            &env(&[
                ("INVALIDATOR_REDIS_KEY_INDEX", "false"),
                ("INVALIDATOR_REDIS_KEY_INDEX_MAX_KEYS", "7"),
            ]),
        )
        .unwrap();
        assert!(!cfg.redis.key_index);
        assert_eq!(cfg.redis.key_index_max_keys, 7);
        let err = Config::load_with_env(None, &env(&[("INVALIDATOR_REDIS_KEY_INDEX", "yes")]))
            .unwrap_err();
        assert!(
            err.to_string().contains("INVALIDATOR_REDIS_KEY_INDEX"),
            "{err}"
        );
        let zero = write("[redis]\nkey_index_max_keys = 0\n");
        let err = Config::load_with_env(Some(zero.path()), &env(&[])).unwrap_err();
        assert!(
            err.to_string().contains("[redis.key_index_max_keys]"),
            "{err}"
        );
        assert!(err.to_string().contains("at least 1"), "{err}");
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
    fn pipeline_max_pending_patterns_defaults_to_100000_and_comes_from_file_or_environment() {
        let cfg = Config::load_with_env(None, &env(&[])).unwrap();
        assert_eq!(cfg.pipeline.max_pending_patterns, 100_000);
        let file = write("[pipeline]\nmax_pending_patterns = 500\n");
        let cfg = Config::load_with_env(Some(file.path()), &env(&[])).unwrap();
        assert_eq!(cfg.pipeline.max_pending_patterns, 500);
        let var = "INVALIDATOR_PIPELINE_MAX_PENDING_PATTERNS";
        let cfg = Config::load_with_env(Some(file.path()), &env(&[(var, "7")])).unwrap();
        assert_eq!(cfg.pipeline.max_pending_patterns, 7);
        let err = Config::load_with_env(None, &env(&[(var, "0")])).unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
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
