//! The one place that says what a failure means for the run: a passing condition of the
//! server (reconnect, or retry, after a backoff), another instance holding the slot (wait as a
//! standby), or something a person must fix (stop). A Postgres server's answer is judged by its
//! SQLSTATE here ([`sqlstate`]), a Redis driver error by its kind, its certificate and its
//! replies ([`redis_reply`]); each error type implements [`Classify`] for its own variants, and a
//! wrapping type asks the error it wraps, so one error gets one verdict however it is wrapped.

/// `object_in_use`: the replication slot streams to another walsender, so another instance is
/// active.
pub const OBJECT_IN_USE: &str = "55006";

/// What a failure means for the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A passing condition: reconnect after a backoff.
    Reconnect,
    /// Another instance is active: wait for it to go rather than back off.
    Standby,
    /// Retrying gives the same answer: a person must act, so stop.
    Stop,
}

/// An error that knows its [`Verdict`].
pub trait Classify {
    /// What this failure means for the run.
    fn verdict(&self) -> Verdict;

    /// Whether trying again later can help (a standby's wait included).
    fn is_transient(&self) -> bool {
        self.verdict() != Verdict::Stop
    }
}

/// The verdict on a Postgres error with SQLSTATE `code`, for every Postgres connection
/// (replication, setup, notify). An unknown code stops, so a surprise ends the process with a
/// clear message instead of looping forever.
pub fn sqlstate(code: &str) -> Verdict {
    match code {
        OBJECT_IN_USE => Verdict::Standby,
        // admin_shutdown, crash_shutdown, cannot_connect_now, idle_session_timeout
        "57P01" | "57P02" | "57P03" | "57P05" => Verdict::Reconnect,
        // query_canceled: someone cancelled us, e.g. with pg_cancel_backend
        "57014" => Verdict::Reconnect,
        // insufficient_resources and too_many_connections, disk_full, out_of_memory
        "53000" | "53100" | "53200" | "53300" => Verdict::Reconnect,
        // lock_not_available
        "55P03" => Verdict::Reconnect,
        // serialization_failure, deadlock_detected
        "40001" | "40P01" => Verdict::Reconnect,
        // connection exceptions, except protocol_violation, which is our bug
        "08P01" => Verdict::Stop,
        _ if code.starts_with("08") => Verdict::Reconnect,
        _ => Verdict::Stop,
    }
}

/// An error of an ordinary connection: the server's answer by its code; without one (a broken
/// socket, a closed connection) worth reconnecting.
impl Classify for tokio_postgres::Error {
    fn verdict(&self) -> Verdict {
        self.as_db_error()
            .map_or(Verdict::Reconnect, |db| sqlstate(db.code().code()))
    }
}

/// A Redis driver error: refused credentials or client settings, and certificates, stop; so
/// does any permanent server reply ([`redis_reply`]); everything else (outages, timeouts,
/// failovers, restarts) is worth trying again.
impl Classify for ::redis::RedisError {
    fn verdict(&self) -> Verdict {
        if matches!(
            self.kind(),
            ::redis::ErrorKind::AuthenticationFailed | ::redis::ErrorKind::InvalidClientConfig
        ) || is_certificate_error(self)
        {
            return Verdict::Stop;
        }
        // Server errors come alone or, from a pipeline, as a list; any permanent one decides.
        let server_errors = self.clone().into_server_errors();
        let permanent = server_errors
            .iter()
            .flat_map(|errors| errors.iter())
            .any(|(_, server)| redis_reply(server.code(), server.details()) == Verdict::Stop);
        if permanent {
            Verdict::Stop
        } else {
            Verdict::Reconnect
        }
    }
}

/// Whether TLS failed over a certificate: the server's is not trusted (wrong CA, wrong name,
/// expired), or the server rejected ours or wanted one. Retrying changes nothing until a person
/// fixes the files; other TLS failures (a reset mid-handshake) stay transient.
fn is_certificate_error(err: &::redis::RedisError) -> bool {
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

/// The verdict on a Redis error reply with `code` (its first word) and `details`: a person must
/// act when the server wants credentials or rejects them (NOAUTH, WRONGPASS), the ACL user
/// lacks a permission (NOPERM), or UNLINK or SCAN is renamed or disabled ("ERR unknown
/// command"). Everything else (LOADING, TRYAGAIN, CLUSTERDOWN, MASTERDOWN, READONLY during a
/// failover, ...) passes.
pub fn redis_reply(code: &str, details: Option<&str>) -> Verdict {
    match code {
        "NOAUTH" | "WRONGPASS" | "NOPERM" => Verdict::Stop,
        "ERR" if details.is_some_and(|details| details.starts_with("unknown command")) => {
            Verdict::Stop
        }
        _ => Verdict::Reconnect,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_in_use_waits_shutdowns_retry_and_unknown_codes_stop() {
        assert_eq!(sqlstate("55006"), Verdict::Standby);
        for code in ["57P01", "57014", "53300", "55P03", "40P01", "08006"] {
            assert_eq!(sqlstate(code), Verdict::Reconnect, "{code}");
        }
        for code in ["08P01", "28P01", "42501", "XX000"] {
            assert_eq!(sqlstate(code), Verdict::Stop, "{code}");
        }
    }

    #[test]
    fn auth_permission_and_unknown_command_replies_are_permanent() {
        assert!(redis_reply("NOAUTH", Some("Authentication required.")) == Verdict::Stop);
        assert!(redis_reply("WRONGPASS", Some("invalid username-password pair")) == Verdict::Stop);
        assert!(redis_reply("NOPERM", Some("this user has no permissions")) == Verdict::Stop);
        assert!(redis_reply("ERR", Some("unknown command 'UNLINK', with args")) == Verdict::Stop);
        for code in [
            "LOADING",
            "TRYAGAIN",
            "CLUSTERDOWN",
            "MASTERDOWN",
            "READONLY",
            "BUSY",
        ] {
            assert!(
                redis_reply(code, Some("whatever")) != Verdict::Stop,
                "{code}"
            );
        }
        assert!(redis_reply("ERR", Some("max number of clients reached")) != Verdict::Stop);
    }
}
