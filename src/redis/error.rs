//! The deleter's error type, and which errors are worth retrying.

use ::redis::{ErrorKind, RedisError};

/// Why an invalidation could not be applied to Redis.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// The URL or TLS settings cannot be used; fixing them needs a person.
    #[error("invalid redis settings for {target}: {reason}")]
    InvalidSettings {
        /// The URL with its password hidden.
        target: String,
        /// What is wrong, without secrets.
        reason: String,
    },
    /// Redis failed a command, rejected it, or could not be reached.
    #[error("redis {target}: {action} failed")]
    Redis {
        /// The URL with its password hidden.
        target: String,
        /// What the deleter was doing: "connect", "PING", "UNLINK", "SCAN", ...
        action: &'static str,
        /// The driver's error.
        #[source]
        source: RedisError,
    },
    /// Fewer replicas than `redis.wait_replicas` confirmed the deletes in time: a failover now
    /// could bring the keys back, so the batch is not done and is tried again.
    #[error("redis {target}: {confirmed} of {wanted} replicas confirmed the deletes")]
    NotReplicated {
        /// The URL with its password hidden.
        target: String,
        /// Replicas that confirmed (the least over the primaries that were asked).
        confirmed: u64,
        /// Replicas wanted.
        wanted: u32,
    },
    /// The shared walk's task stopped before it answered (it panicked): the patterns are not
    /// known to be deleted and are handed to a new walk.
    #[error("redis {target}: the shared SCAN walk stopped")]
    WalkStopped {
        /// The URL with its password hidden.
        target: String,
    },
}

impl DeleteError {
    /// Whether retrying later can succeed: outages, timeouts, failovers and restarts are
    /// transient; bad settings, bad credentials, a missing ACL permission or a disabled command
    /// are permanent, because they stay broken until a person fixes them.
    pub fn is_transient(&self) -> bool {
        match self {
            DeleteError::InvalidSettings { .. } => false,
            DeleteError::Redis { source, .. } => is_transient(source),
            // Replicas catch up or come back; a replica that never does is for the alerts.
            DeleteError::NotReplicated { .. } => true,
            DeleteError::WalkStopped { .. } => true,
        }
    }
}

/// Classifies a driver error; see [`DeleteError::is_transient`].
pub(super) fn is_transient(err: &RedisError) -> bool {
    if matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) || is_certificate_error(err)
    {
        return false;
    }
    // Server errors come alone or, from a pipeline, as a list; any permanent one decides.
    let server_errors = err.clone().into_server_errors();
    !server_errors
        .iter()
        .flat_map(|errors| errors.iter())
        .any(|(_, server)| is_permanent_reply(server.code(), server.details()))
}

/// Whether TLS failed over a certificate: the server's is not trusted (wrong CA, wrong name,
/// expired), or the server rejected ours or wanted one. Retrying changes nothing until a person
/// fixes the files; other TLS failures (a reset mid-handshake) stay transient.
fn is_certificate_error(err: &RedisError) -> bool {
    use rustls::AlertDescription as Alert;
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = source {
        let tls = tls_error(current);
        if let Some(tls) = tls {
            return match tls {
                rustls::Error::InvalidCertificate(_) => true,
                rustls::Error::AlertReceived(alert) => matches!(
                    alert,
                    Alert::CertificateRequired
                        | Alert::BadCertificate
                        | Alert::UnsupportedCertificate
                        | Alert::CertificateRevoked
                        | Alert::CertificateExpired
                        | Alert::CertificateUnknown
                        | Alert::UnknownCA
                        | Alert::AccessDenied
                ),
                _ => false,
            };
        }
        source = current.source();
    }
    false
}

/// The rustls error that `err` is or wraps: directly, inside an `io::Error`, or inside the
/// `Arc` the driver keeps its causes in (whose own `source` would skip the `io::Error`).
fn tls_error<'e>(err: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    type Shared = std::sync::Arc<dyn std::error::Error + Send + Sync>;
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    if let Some(io) = err.downcast_ref::<std::io::Error>() {
        return io
            .get_ref()
            .and_then(|inner| tls_error(inner as &(dyn std::error::Error + 'static)));
    }
    err.downcast_ref::<Shared>()
        .and_then(|shared| tls_error(shared.as_ref() as &(dyn std::error::Error + 'static)))
}

/// Whether an error reply means a person must act: the server wants credentials or rejects
/// them (NOAUTH, WRONGPASS), the ACL user lacks a permission (NOPERM), or UNLINK or SCAN is
/// renamed or disabled ("ERR unknown command"). Everything else (LOADING, TRYAGAIN, CLUSTERDOWN,
/// MASTERDOWN, READONLY during a failover, ...) passes.
fn is_permanent_reply(code: &str, details: Option<&str>) -> bool {
    match code {
        "NOAUTH" | "WRONGPASS" | "NOPERM" => true,
        "ERR" => details.is_some_and(|details| details.starts_with("unknown command")),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_error(err: RedisError) -> DeleteError {
        DeleteError::Redis {
            target: "redis://127.0.0.1:6379".into(),
            action: "UNLINK",
            source: err,
        }
    }

    #[test]
    fn io_errors_and_timeouts_are_transient() {
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::ConnectionReset,
            std::io::ErrorKind::TimedOut,
            std::io::ErrorKind::UnexpectedEof,
        ] {
            let err = redis_error(std::io::Error::from(kind).into());
            assert!(err.is_transient(), "{kind:?}");
        }
    }

    #[test]
    fn certificate_errors_are_permanent_and_other_tls_failures_transient() {
        let tls = |err: rustls::Error| {
            redis_error(std::io::Error::new(std::io::ErrorKind::InvalidData, err).into())
        };
        let required = rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired);
        assert!(!tls(required).is_transient());
        let unknown = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        assert!(!tls(unknown).is_transient());
        let closed = rustls::Error::AlertReceived(rustls::AlertDescription::InternalError);
        assert!(tls(closed).is_transient());
    }

    #[test]
    fn credentials_and_settings_are_permanent() {
        let auth = RedisError::from((ErrorKind::AuthenticationFailed, "invalid password"));
        assert!(!redis_error(auth).is_transient());
        let settings = DeleteError::InvalidSettings {
            target: "redis://x".into(),
            reason: "bad".into(),
        };
        assert!(!settings.is_transient());
    }

    #[test]
    fn auth_permission_and_unknown_command_replies_are_permanent() {
        assert!(is_permanent_reply(
            "NOAUTH",
            Some("Authentication required.")
        ));
        assert!(is_permanent_reply(
            "WRONGPASS",
            Some("invalid username-password pair")
        ));
        assert!(is_permanent_reply(
            "NOPERM",
            Some("this user has no permissions")
        ));
        assert!(is_permanent_reply(
            "ERR",
            Some("unknown command 'UNLINK', with args")
        ));
        for code in [
            "LOADING",
            "TRYAGAIN",
            "CLUSTERDOWN",
            "MASTERDOWN",
            "READONLY",
            "BUSY",
        ] {
            assert!(!is_permanent_reply(code, Some("whatever")), "{code}");
        }
        assert!(!is_permanent_reply(
            "ERR",
            Some("max number of clients reached")
        ));
    }

    #[test]
    fn the_message_names_the_target_and_the_action() {
        let err = redis_error(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
        assert_eq!(
            err.to_string(),
            "redis redis://127.0.0.1:6379: UNLINK failed"
        );
    }
}
