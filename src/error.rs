//! The one place that says what a Postgres failure means for the run: a passing condition of the
//! server (reconnect after a backoff), another instance holding the slot (wait as a standby), or
//! something a person must fix (stop). A server's answer is judged by its SQLSTATE here
//! ([`sqlstate`]); each error type of the Postgres side implements [`Classify`] for its own
//! variants, and a wrapping type asks the error it wraps, so one error gets one verdict however
//! it is wrapped.

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
}
