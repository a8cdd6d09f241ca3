//! The one place that says what a Postgres error code means for retrying: a passing condition
//! of the server (retry with backoff), another instance holding the slot (wait as a standby), or
//! something a person must fix (stop). Each error type answers `is_transient` from its own
//! variants, and for a server's answer asks here.

/// `object_in_use`: the replication slot streams to another walsender, so another instance is
/// active.
pub const OBJECT_IN_USE: &str = "55006";

/// Whether a failure with SQLSTATE `code` means another instance is active: a standby waits for
/// it to go rather than backing off.
pub fn means_standby(code: Option<&str>) -> bool {
    code == Some(OBJECT_IN_USE)
}

/// Whether a Postgres error with SQLSTATE `code` describes a passing condition of the server
/// rather than of our setup, for every Postgres connection (replication, setup, notify). An
/// unknown code is permanent, so a surprise stops the process with a clear message instead of
/// looping forever.
pub fn transient_sqlstate(code: &str) -> bool {
    match code {
        // admin_shutdown, crash_shutdown, cannot_connect_now, idle_session_timeout
        "57P01" | "57P02" | "57P03" | "57P05" => true,
        // query_canceled: someone cancelled us, e.g. with pg_cancel_backend
        "57014" => true,
        // insufficient_resources and too_many_connections, disk_full, out_of_memory
        "53000" | "53100" | "53200" | "53300" => true,
        // object_in_use (the slot is active elsewhere), lock_not_available
        OBJECT_IN_USE | "55P03" => true,
        // serialization_failure, deadlock_detected
        "40001" | "40P01" => true,
        // connection exceptions, except protocol_violation, which is our bug
        "08P01" => false,
        _ => code.starts_with("08"),
    }
}
