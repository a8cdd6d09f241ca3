//! From the raw settings to a [`Config`]: every value checked, each error naming where the value
//! came from.

use super::env::Origins;
use super::*;

pub(super) fn validate(raw: RawConfig, origins: &Origins) -> Result<Config, ConfigError> {
    let invalid = |key: &str, message: String| origins.invalid(key, message);
    // Section by section, in this order: the first bad value is the one reported.
    let postgres = postgres(raw.postgres, origins)?;
    let (redis_url, redis) = redis(&raw.redis, origins)?;
    let redis_targets = validate_targets(raw.redis.targets, &origins.file)?;
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
    let pipeline = pipeline(&raw.pipeline, origins)?;
    let invalidate = invalidate(raw.invalidate, origins)?;
    Ok(Config {
        invalidate,
        postgres,
        redis_url,
        redis_targets,
        rules_path: raw.rules.path.unwrap_or_else(|| PathBuf::from("rules")),
        http_listen,
        pipeline,
        log: LogConfig {
            format,
            level: raw.log.level.unwrap_or_else(|| "info".to_owned()),
        },
        redis,
        file: origins.read.then(|| origins.file.clone()),
    })
}

/// `[postgres]`: the mode, the slot's and publication's names, the URL and the CA file.
fn postgres(raw: RawPostgres, origins: &Origins) -> Result<PostgresConfig, ConfigError> {
    let invalid = |key: &str, message: String| origins.invalid(key, message);
    let mode = match raw.mode.as_deref().unwrap_or("replication") {
        "replication" => Mode::Replication,
        "notify" => Mode::Notify,
        other => {
            return Err(invalid(
                "postgres.mode",
                format!("unknown mode {other:?}: expected \"replication\" or \"notify\""),
            ));
        }
    };
    let slot = raw.slot.unwrap_or_else(|| "invalidator".to_owned());
    let publication = raw.publication.unwrap_or_else(|| "invalidator".to_owned());
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
        .url
        .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".to_owned());
    let parsed = crate::endpoint::parse_url(&url);
    // libpq's other values: tokio-postgres parses none but `read-only`, which its SQL sessions
    // (setup's, the visibility gate's) would honour by going to a standby, while the replication
    // connection goes to the primary.
    let read_only = matches!(&parsed, Ok((pg, _))
        if pg.get_target_session_attrs() == tokio_postgres::config::TargetSessionAttrs::ReadOnly);
    if let Some(attrs) = crate::endpoint::target_session_attrs(&url)
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
    if let Some(ca) = &raw.ca_file {
        crate::endpoint::load_ca_file(ca).map_err(|e| invalid("postgres.ca_file", e))?;
    }
    Ok(PostgresConfig {
        url,
        mode,
        slot,
        publication,
        flush_on_slot_loss: raw.flush_on_slot_loss.unwrap_or(true),
        stream_large_transactions: raw.stream_large_transactions.unwrap_or(true),
        ca_file: raw.ca_file,
    })
}

/// The default of `[redis] key_index_max_keys`: it bounds the index's memory whatever the
/// keyspace holds.
const DEFAULT_KEY_INDEX_MAX_KEYS: usize = 5_000_000;

/// `[redis]` without its targets: the URL and how to connect (cluster, TLS, replicas to wait
/// for), and the key index (at least one key).
fn redis(raw: &RawRedis, origins: &Origins) -> Result<(String, RedisConnectConfig), ConfigError> {
    let invalid = |key: &str, message: String| origins.invalid(key, message);
    let redis_url = raw
        .url
        .clone()
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
        cluster: raw.cluster,
        ca_file: raw.ca_file.clone(),
        tls_cert_file: raw.tls_cert_file.clone(),
        tls_key_file: raw.tls_key_file.clone(),
        wait_replicas: raw.wait_replicas.unwrap_or(0),
        key_index: raw.key_index.unwrap_or(false),
        key_index_max_keys: raw.key_index_max_keys.unwrap_or(DEFAULT_KEY_INDEX_MAX_KEYS),
    };
    if redis.key_index_max_keys == 0 {
        return Err(invalid(
            "redis.key_index_max_keys",
            "must be at least 1".to_owned(),
        ));
    }
    validate_redis_tls(&redis, &redis_url).map_err(|(key, message)| invalid(key, message))?;
    Ok((redis_url, redis))
}

/// `[pipeline]`: batch and transaction limits of at least one key, and the status interval.
fn pipeline(raw: &RawPipeline, origins: &Origins) -> Result<PipelineConfig, ConfigError> {
    let at_least_one = |key: &str| origins.invalid(key, "must be at least 1".to_owned());
    let max_batch_keys = raw.max_batch_keys.unwrap_or(10_000);
    if max_batch_keys == 0 {
        return Err(at_least_one("pipeline.max_batch_keys"));
    }
    let max_pending_patterns = raw.max_pending_patterns.unwrap_or(100_000);
    if max_pending_patterns == 0 {
        return Err(at_least_one("pipeline.max_pending_patterns"));
    }
    let max_transaction_keys = raw.max_transaction_keys.unwrap_or(100_000);
    if max_transaction_keys == 0 {
        return Err(at_least_one("pipeline.max_transaction_keys"));
    }
    Ok(PipelineConfig {
        max_batch_keys,
        max_pending_patterns,
        status_interval: Duration::from_millis(raw.status_interval_ms.unwrap_or(10_000).max(100)),
        max_transaction_keys,
        wait_visible: raw.wait_visible.unwrap_or(true),
    })
}

/// `[invalidate]`: role names (never PUBLIC) and key prefixes (never empty).
fn invalidate(raw: RawInvalidate, origins: &Origins) -> Result<InvalidateConfig, ConfigError> {
    let invalid = |key: &str, message: String| origins.invalid(key, message);
    let invalidate = InvalidateConfig {
        roles: raw.roles.unwrap_or_default(),
        prefixes: raw.prefixes.unwrap_or_default(),
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
    Ok(invalidate)
}

/// Checks the `[redis]` TLS files (each readable and holding what it should, the certificate
/// and key together, a `rediss://` URL to use them on); the error names the key.
pub(super) fn validate_redis_tls(
    raw: &RedisConnectConfig,
    url: &str,
) -> Result<(), (&'static str, String)> {
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
pub(super) fn is_redis_url(url: &str) -> bool {
    url.starts_with("redis://") || url.starts_with("rediss://") || url.starts_with("unix://")
}

/// Checks the further targets: names valid, unique and not the primary's, a Redis URL each.
pub(super) fn validate_targets(
    raw: Vec<RawTarget>,
    file: &Path,
) -> Result<Vec<RedisTarget>, ConfigError> {
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

/// Whether `name` is safe to use unquoted as a slot or publication name.
pub(super) fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}
