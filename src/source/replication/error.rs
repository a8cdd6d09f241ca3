//! The one error type of the replication client, and whether retrying can help.

use std::io;

use crate::error::{Classify, Verdict};
use crate::source::connect::TlsError;

/// Everything that can go wrong while talking to a walsender.
///
/// Messages never hold the password: it is only ever handed to the hashing code, and server
/// messages about failed logins name the user, not the secret.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// Connecting, reading or writing the socket failed.
    #[error("i/o error on the replication connection: {0}")]
    Io(#[from] io::Error),
    /// The server sent bytes that break the protocol, or a message this client does not expect.
    #[error("replication protocol error: {0}")]
    Protocol(String),
    /// The server answered with an ErrorResponse.
    #[error("postgres error {code}: {message}{}", detail_suffix(.detail))]
    Server {
        /// The SQLSTATE code, e.g. `55006`.
        code: String,
        /// The primary, human-readable message.
        message: String,
        /// The optional detail line, which often names the object involved.
        detail: Option<String>,
    },
    /// Authentication could not be completed on our side (no password, unsupported method,
    /// the server's SCRAM proof did not verify).
    #[error("authentication failed: {0}")]
    Auth(String),
    /// TLS could not be set up: an untrusted certificate, or no TLS where `sslmode=require`.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// A setting or argument cannot be used, e.g. `channel_binding=require` or a malformed slot
    /// name.
    #[error("invalid replication setting: {0}")]
    Invalid(String),
    /// A connection pooler answers instead of Postgres.
    #[error(transparent)]
    Pooler(#[from] crate::source::connect::PoolerError),
    /// `target_session_attrs=read-write` and the server is read-only: a standby (which a
    /// promotion may turn into the primary), or `default_transaction_read_only` is on.
    #[error(
        "the server is read-only (a standby?) and target_session_attrs=read-write asks for \
         the primary"
    )]
    ReadOnly,
    /// The server closed the connection without an error message.
    #[error("the server closed the replication connection")]
    Closed,
}

/// Renders the detail line after the message when there is one.
fn detail_suffix(detail: &Option<String>) -> String {
    detail
        .as_deref()
        .map(|d| format!(" ({d})"))
        .unwrap_or_default()
}

impl ReplicationError {
    /// The SQLSTATE code when the server reported the error.
    pub fn code(&self) -> Option<&str> {
        match self {
            ReplicationError::Server { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// A broken or closed connection is worth reconnecting; protocol, authentication and setting
/// errors stop, because retrying the same bytes or the same credentials gives the same answer;
/// the server's answer is judged by its code.
impl Classify for ReplicationError {
    fn verdict(&self) -> Verdict {
        match self {
            ReplicationError::Io(_) | ReplicationError::Closed | ReplicationError::ReadOnly => {
                Verdict::Reconnect
            }
            ReplicationError::Tls(e) => e.verdict(),
            ReplicationError::Server { code, .. } => crate::error::sqlstate(code),
            ReplicationError::Protocol(_)
            | ReplicationError::Auth(_)
            | ReplicationError::Invalid(_)
            | ReplicationError::Pooler(_) => Verdict::Stop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server {
            code: code.to_owned(),
            message: "m".to_owned(),
            detail: None,
        }
    }

    #[test]
    fn shutdowns_busy_slots_and_full_servers_are_transient() {
        for code in ["57P01", "57P02", "57P03", "53300", "55006", "08006"] {
            assert!(server(code).is_transient(), "{code}");
        }
        assert!(ReplicationError::Closed.is_transient());
        assert!(ReplicationError::Io(io::ErrorKind::ConnectionRefused.into()).is_transient());
    }

    #[test]
    fn credentials_privileges_and_missing_objects_are_permanent() {
        for code in [
            "28P01", "28000", "42501", "3D000", "42704", "08P01", "XX000",
        ] {
            assert!(!server(code).is_transient(), "{code}");
        }
        assert!(!ReplicationError::Auth("x".into()).is_transient());
        assert!(!ReplicationError::Protocol("x".into()).is_transient());
        assert!(!ReplicationError::Invalid("x".into()).is_transient());
    }

    #[test]
    fn server_errors_show_code_message_and_detail() {
        let err = ReplicationError::Server {
            code: "55006".into(),
            message: "replication slot \"s\" is active for PID 7".into(),
            detail: Some("d".into()),
        };
        assert_eq!(err.code(), Some("55006"));
        assert_eq!(
            err.to_string(),
            "postgres error 55006: replication slot \"s\" is active for PID 7 (d)"
        );
        assert_eq!(ReplicationError::Closed.code(), None);
    }
}
