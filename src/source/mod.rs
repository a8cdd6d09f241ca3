//! Where changes come from: the logical replication client and the publication/slot setup,
//! whether a reconnected server still holds our history, or (notify mode) the trigger-filled
//! outbox. Each source is a [`Source`]: it gives the pipeline committed transactions as
//! [`Step`]s and is told what Redis has confirmed.

pub mod connect;
pub mod drift;
pub mod history;
pub mod invalidate;
pub mod notify;
pub mod replication;
pub mod setup;
pub mod visibility;

use std::future::Future;

use crate::change::{Lsn, Step};

/// What the pipeline reads: committed transactions, in commit order, as [`Step`]s; and what it
/// tells once Redis has confirmed them. The replication stream and the outbox are the two.
pub trait Source: Send {
    /// Why the source stopped.
    type Error: std::error::Error + Send + 'static;

    /// Waits until [`Source::step`] has something to give; `false` when the server ended the
    /// stream. Cancel-safe: the pipeline races it against confirmations and timers.
    fn ready(&mut self) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// The next step of what has arrived; `None` once that is all given. Never raced, so it
    /// may do work that must not be cut short (catalog reads, DDL).
    fn step(&mut self) -> impl Future<Output = Result<Option<Step>, Self::Error>> + Send;

    /// Everything up to `position` is confirmed: release it (a standby status update, a delete
    /// of outbox rows). Called on each confirmation and at every status interval.
    fn acknowledge(
        &mut self,
        position: Lsn,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The settings that decide how Postgres writes a value as text, pinned wherever keys are
/// rendered from values: the walsender's session (replication mode), the trigger function
/// (notify mode, whatever the writing session or its role set) and `explain --where`. The same
/// row then renders the same keys in both modes: a `timestamptz` in UTC as
/// `2024-01-02 03:04:05+00`, a `date` as `2024-01-02`, an `interval` as `1 day 02:00:00`, a
/// float in its shortest exact form, a `bytea` as `\x0102`, `money` in the C locale. The
/// names are as Postgres spells them in `pg_proc.proconfig`.
pub const TEXT_FORM: &[(&str, &str)] = &[
    ("TimeZone", "UTC"),
    ("DateStyle", "ISO, MDY"),
    ("IntervalStyle", "postgres"),
    ("extra_float_digits", "1"),
    ("bytea_output", "hex"),
    ("lc_monetary", "C"),
];

/// [`TEXT_FORM`] as `-c name=value` switches for the startup packet's `options`, where a space
/// or a backslash in a value is escaped with a backslash.
pub fn text_form_options() -> String {
    TEXT_FORM
        .iter()
        .map(|(name, value)| {
            let value = value.replace('\\', "\\\\").replace(' ', "\\ ");
            format!("-c {name}={value}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// [`TEXT_FORM`] as the `SET name = 'value'` clauses of a `CREATE FUNCTION`, each preceded by a
/// space.
pub fn text_form_clauses() -> String {
    TEXT_FORM
        .iter()
        .map(|(name, value)| format!(" SET {name} = {}", setup::quote_literal(value)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_form_escapes_spaces_in_startup_options() {
        let options = text_form_options();
        assert!(options.starts_with("-c TimeZone=UTC -c DateStyle=ISO,\\ MDY "));
        assert!(
            text_form_clauses().starts_with(" SET TimeZone = 'UTC' SET DateStyle = 'ISO, MDY'")
        );
    }
}
