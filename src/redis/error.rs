//! The deleter's error type, and its verdict.

use ::redis::RedisError;

use crate::error::{Classify, Verdict};

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

/// Bad settings stay broken until a person fixes them; the driver's errors are judged by
/// [`crate::error`]'s table of Redis failures.
impl Classify for DeleteError {
    fn verdict(&self) -> Verdict {
        match self {
            DeleteError::InvalidSettings { .. } => Verdict::Stop,
            DeleteError::Redis { source, .. } => source.verdict(),
            // Replicas catch up or come back; a replica that never does is for the alerts.
            DeleteError::NotReplicated { .. } => Verdict::Reconnect,
            DeleteError::WalkStopped { .. } => Verdict::Reconnect,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ::redis::ErrorKind;

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
    fn the_message_names_the_target_and_the_action() {
        let err = redis_error(std::io::Error::from(std::io::ErrorKind::TimedOut).into());
        assert_eq!(
            err.to_string(),
            "redis redis://127.0.0.1:6379: UNLINK failed"
        );
    }
}
