//! The environment's overrides of the file: one variable per setting, and where each value
//! came from, so that an error names the variable that set it.

use super::*;

/// The value of the environment variable `name`, which must be `true` or `false`.
fn boolean(name: &str, value: &str) -> Result<bool, ConfigError> {
    value.parse().map_err(|_| ConfigError::Invalid {
        origin: name.to_owned(),
        message: format!("expected true or false, got {value:?}"),
    })
}

pub(super) fn apply_env(raw: &mut RawConfig, name: &str, value: &str) -> Result<(), ConfigError> {
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
            raw.postgres.flush_on_slot_loss = Some(boolean(name, value)?)
        }
        "INVALIDATOR_POSTGRES_STREAM_LARGE_TRANSACTIONS" => {
            raw.postgres.stream_large_transactions = Some(boolean(name, value)?)
        }
        "INVALIDATOR_POSTGRES_CA_FILE" => raw.postgres.ca_file = Some(PathBuf::from(value)),
        "INVALIDATOR_REDIS_URL" => raw.redis.url = v,
        "INVALIDATOR_REDIS_CLUSTER" => raw.redis.cluster = Some(boolean(name, value)?),
        "INVALIDATOR_REDIS_CA_FILE" => raw.redis.ca_file = Some(PathBuf::from(value)),
        "INVALIDATOR_REDIS_WAIT_REPLICAS" => {
            let replicas: usize = number(value)?;
            raw.redis.wait_replicas =
                Some(replicas.try_into().map_err(|_| ConfigError::Invalid {
                    origin: name.to_owned(),
                    message: format!("too many replicas: {value}"),
                })?)
        }
        "INVALIDATOR_REDIS_KEY_INDEX" => raw.redis.key_index = Some(boolean(name, value)?),
        "INVALIDATOR_REDIS_KEY_INDEX_MAX_KEYS" => {
            raw.redis.key_index_max_keys = Some(number(value)?)
        }
        "INVALIDATOR_REDIS_TLS_CERT_FILE" => raw.redis.tls_cert_file = Some(PathBuf::from(value)),
        "INVALIDATOR_REDIS_TLS_KEY_FILE" => raw.redis.tls_key_file = Some(PathBuf::from(value)),
        "INVALIDATOR_RULES_PATH" => raw.rules.path = Some(PathBuf::from(value)),
        "INVALIDATOR_HTTP_LISTEN" => raw.http.listen = v,
        "INVALIDATOR_PIPELINE_MAX_BATCH_KEYS" => raw.pipeline.max_batch_keys = Some(number(value)?),
        "INVALIDATOR_PIPELINE_MAX_PENDING_PATTERNS" => {
            raw.pipeline.max_pending_patterns = Some(number(value)?)
        }
        "INVALIDATOR_PIPELINE_STATUS_INTERVAL_MS" => {
            raw.pipeline.status_interval_ms = Some(number(value)? as u64)
        }
        "INVALIDATOR_PIPELINE_MAX_TRANSACTION_KEYS" => {
            raw.pipeline.max_transaction_keys = Some(number(value)?)
        }
        "INVALIDATOR_PIPELINE_WAIT_VISIBLE" => {
            raw.pipeline.wait_visible = Some(boolean(name, value)?)
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
pub(super) struct Origins {
    /// The configuration file (read or not).
    pub(super) file: PathBuf,
    /// Whether it was read; if not, only defaults and the environment apply.
    pub(super) read: bool,
    /// The variable that set each key (`postgres.slot` → `INVALIDATOR_POSTGRES_SLOT`).
    pub(super) env: HashMap<String, String>,
}

impl Origins {
    /// The error that the value of `key` is bad, naming where it came from.
    pub(super) fn invalid(&self, key: &str, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.of(key),
            message,
        }
    }

    /// Where the value of `key` came from, for an error about it.
    pub(super) fn of(&self, key: &str) -> String {
        match self.env.get(key) {
            Some(name) => format!("{name} (environment, [{key}])"),
            None if self.read => format!("{} [{key}]", self.file.display()),
            None => format!("{key} (default; {} does not exist)", self.file.display()),
        }
    }
}

/// A comma-separated list from the environment, each item trimmed; empty items are dropped
/// (`""` is the empty list).
pub(super) fn comma_list(value: &str) -> Vec<String> {
    value
        .split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The configuration key a variable sets: `INVALIDATOR_POSTGRES_SLOT` → `postgres.slot` (no
/// section name has an underscore, so the first one ends it).
pub(super) fn key_of(variable: &str) -> String {
    let rest = variable
        .strip_prefix("INVALIDATOR_")
        .unwrap_or(variable)
        .to_ascii_lowercase();
    match rest.split_once('_') {
        Some((section, key)) => format!("{section}.{key}"),
        None => rest,
    }
}

/// Whether `name` is one of the variables Kubernetes injects into every pod of the namespace
/// for a Service named `invalidator` (`INVALIDATOR_SERVICE_HOST`, `INVALIDATOR_SERVICE_PORT`,
/// `INVALIDATOR_PORT`, `INVALIDATOR_PORT_9187_TCP_ADDR`, ...). None can be a misspelt setting
/// (no section is called SERVICE or PORT), and rejecting them would stop every pod beside such
/// a Service.
pub(super) fn is_service_link(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("INVALIDATOR_") else {
        return false;
    };
    rest.starts_with("SERVICE_")
        || rest == "PORT"
        || rest
            .strip_prefix("PORT_")
            .is_some_and(|port| port.starts_with(|c: char| c.is_ascii_digit()))
}
