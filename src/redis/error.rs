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
}

impl DeleteError {
    /// Whether retrying later can succeed: outages, timeouts, failovers and restarts are
    /// transient; bad settings, bad credentials, a missing ACL permission or a disabled command
    /// are permanent, because they stay broken until a person fixes them.
    pub fn is_transient(&self) -> bool {
        match self {
            DeleteError::InvalidSettings { .. } => false,
            DeleteError::Redis { source, .. } => is_transient(source),
        }
    }
}

/// Classifies a driver error; see [`DeleteError::is_transient`].
fn is_transient(err: &RedisError) -> bool {
    if matches!(
        err.kind(),
        ErrorKind::AuthenticationFailed | ErrorKind::InvalidClientConfig
    ) {
        return false;
    }
    // Server errors come alone or, from a pipeline, as a list; any permanent one decides.
    let server_errors = err.clone().into_server_errors();
    !server_errors
        .iter()
        .flat_map(|errors| errors.iter())
        .any(|(_, server)| is_permanent_reply(server.code(), server.details()))
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
