//! `invalidator.invalidate(key_or_pattern text)`: a SQL function that applications call inside
//! their own transaction to invalidate a key or a pattern by hand, atomically with their writes.
//!
//! ```text
//!  replication mode: pg_logical_emit_message(true, 'invalidator', text) ─WAL─▶ Event::Message
//!  notify mode:      outbox row (op 'invalidate', new = the text as JSON) ─────▶ read_round
//!                                    both ─▶ Invalidation::insert_given ─▶ the transaction's deletes
//! ```
//!
//! The text is read exactly as a key in a rule file without placeholders
//! ([`crate::rules::Invalidation::insert_given`]). A rolled-back transaction leaves neither the
//! message (transactional) nor the outbox row, so it invalidates nothing.
//!
//! Who may call it: every role (`EXECUTE` and `USAGE` on schema `invalidator` are granted to
//! `PUBLIC` when `setup` creates it). It only ever deletes cache entries, never reads or
//! changes data, and a role that can write a watched table can invalidate its keys anyway;
//! `REVOKE EXECUTE ON FUNCTION invalidator.invalidate(text) FROM PUBLIC` and a grant to the
//! application's roles restrict it, and `setup` never grants again once the function exists.

use crate::config::Mode;
use crate::source::setup::{Action, SetupError, Sql, quote_ident, quote_literal};

/// The schema that holds invalidator's objects in the database, in both modes.
pub const SCHEMA: &str = "invalidator";
/// The prefix of the logical decoding messages `invalidate()` emits in replication mode.
pub const MESSAGE_PREFIX: &str = "invalidator";
/// The outbox operation of a row `invalidate()` writes in notify mode.
pub const OUTBOX_OP: &str = "invalidate";
/// The first server version (`server_version_num`) whose pgoutput sends logical decoding
/// messages (the `messages` option), which replication mode's `invalidate()` needs.
pub const MESSAGES_SINCE: u32 = 140_000;

/// The function's signature, schema-qualified and quoted.
fn signature() -> String {
    format!("{}.invalidate(text)", quote_ident(SCHEMA))
}

/// The function's body in `mode`.
fn body(mode: Mode) -> String {
    let deliver = match mode {
        Mode::Replication => format!(
            "  PERFORM pg_logical_emit_message(true, '{MESSAGE_PREFIX}', key_or_pattern);\n"
        ),
        Mode::Notify => format!(
            "  INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op, new)\n\
             \x20 VALUES ('', '', '{OUTBOX_OP}', to_jsonb(key_or_pattern));\n\
             \x20 PERFORM pg_notify('{}', '');\n",
            crate::source::notify::CHANNEL
        ),
    };
    format!(
        "\nBEGIN\n\
         \x20 IF key_or_pattern IS NULL OR key_or_pattern = '' THEN\n\
         \x20   RAISE EXCEPTION 'invalidator.invalidate() needs a key or a pattern';\n\
         \x20 END IF;\n\
         {deliver}\
         END\n"
    )
}

/// The server's `server_version_num`.
pub(crate) async fn server_version(db: &mut impl Sql) -> Result<u32, SetupError> {
    db.query("SHOW server_version_num")
        .await?
        .first()
        .and_then(|row| row.first().cloned().flatten())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| SetupError::Unexpected("SHOW server_version_num".to_owned()))
}

/// Whether schema [`SCHEMA`] exists.
pub(crate) async fn has_schema(db: &mut impl Sql) -> Result<bool, SetupError> {
    Ok(!db
        .query(&format!(
            "SELECT 1 FROM pg_namespace WHERE nspname = {}",
            quote_literal(SCHEMA)
        ))
        .await?
        .is_empty())
}

/// The action that creates schema [`SCHEMA`].
pub(crate) fn create_schema() -> Action {
    Action {
        why: format!("create schema {SCHEMA}"),
        sql: format!("CREATE SCHEMA IF NOT EXISTS {}", quote_ident(SCHEMA)),
    }
}

/// Works out what `invalidate()` needs in `mode`: the function (replaced when its body differs,
/// as after a change of mode), and on creation the grants that let every role call it.
/// `schema_planned` says whether the schema exists or an earlier action creates it. In
/// replication mode on a server older than PostgreSQL 14, whose pgoutput cannot send messages,
/// nothing is planned and a warning is logged: a function that silently did nothing would be
/// worse than none.
pub async fn plan(
    db: &mut impl Sql,
    mode: Mode,
    schema_planned: bool,
) -> Result<Vec<Action>, SetupError> {
    if mode == Mode::Replication && server_version(db).await? < MESSAGES_SINCE {
        tracing::warn!(
            "invalidator.invalidate() is not available in replication mode before PostgreSQL \
             14 (pgoutput cannot send messages); not creating it"
        );
        return Ok(Vec::new());
    }
    let mut actions = Vec::new();
    if !schema_planned && !has_schema(db).await? {
        actions.push(create_schema());
    }
    let body = body(mode);
    let current = db
        .query(&format!(
            "SELECT prosrc FROM pg_proc WHERE oid = to_regprocedure({})",
            quote_literal(&signature())
        ))
        .await?;
    let existing = current.first().map(|r| r.first().cloned().flatten());
    if existing.as_ref() == Some(&Some(body.clone())) {
        return Ok(actions);
    }
    // Notify mode writes the outbox, which callers have no privileges on: SECURITY DEFINER.
    // pg_logical_emit_message is open to every role, so replication mode needs no elevation.
    let security = match mode {
        Mode::Replication => "SECURITY INVOKER",
        Mode::Notify => "SECURITY DEFINER",
    };
    actions.push(Action {
        why: format!(
            "create the function {SCHEMA}.invalidate(key_or_pattern text) ({} mode)",
            match mode {
                Mode::Replication => "replication",
                Mode::Notify => "notify",
            }
        ),
        sql: format!(
            "CREATE OR REPLACE FUNCTION {}(key_or_pattern text) RETURNS void LANGUAGE plpgsql \
             {security} SET search_path = pg_catalog, pg_temp AS {}",
            format_args!("{}.invalidate", quote_ident(SCHEMA)),
            quote_literal(&body)
        ),
    });
    if existing.is_none() {
        actions.push(Action {
            why: format!("let every role call {SCHEMA}.invalidate()"),
            sql: format!(
                "GRANT USAGE ON SCHEMA {schema} TO PUBLIC; \
                 GRANT EXECUTE ON FUNCTION {} TO PUBLIC",
                signature(),
                schema = quote_ident(SCHEMA)
            ),
        });
    }
    Ok(actions)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bodies_refuse_an_empty_argument_and_deliver_per_mode() {
        let replication = body(Mode::Replication);
        assert!(
            replication.contains("pg_logical_emit_message(true, 'invalidator', key_or_pattern)")
        );
        let notify = body(Mode::Notify);
        assert!(notify.contains("'invalidate', to_jsonb(key_or_pattern)"));
        assert!(notify.contains("pg_notify('invalidator', '')"));
        for body in [replication, notify] {
            assert!(body.contains("key_or_pattern IS NULL OR key_or_pattern = ''"));
        }
    }
}
