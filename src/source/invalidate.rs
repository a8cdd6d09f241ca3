//! `invalidator.invalidate(key_or_pattern text)` and `invalidator.invalidate_key(key text)`:
//! SQL functions that applications call inside their own transaction to invalidate a key or a
//! pattern by hand, atomically with their writes.
//!
//! ```text
//!  replication mode: INSERT + DELETE of a row of invalidator.requests ─WAL─▶ Event::Change
//!  notify mode:      outbox row (op 'invalidate' | 'invalidate_key') ───────▶ read_round
//!                       both ─▶ Allowed::check ─▶ Invalidation::insert_given ─▶ the deletes
//! ```
//!
//! `invalidate()` reads its text exactly as a key in a rule file without placeholders
//! ([`crate::rules::Invalidation::insert_given`]); `invalidate_key()` takes it as one literal
//! key, whatever it holds, so a key built from user input cannot widen into a pattern. A
//! rolled-back transaction leaves neither the request row nor the outbox row, so it invalidates
//! nothing.
//!
//! Who may call them: only the roles `[invalidate] roles` names (`setup` revokes `EXECUTE` from
//! `PUBLIC` and grants it to them), and superusers. The functions are `SECURITY DEFINER` and are
//! the only writers of `invalidator.requests` and of `invalidate` rows in the outbox, which no
//! other role may write: that write is the proof the sidecar trusts. A logical decoding message
//! (`pg_logical_emit_message`), which any role can emit, deletes nothing.
//!
//! What they may delete: keys under an allow-list of prefixes, the literal prefixes of the
//! rules' keys plus `[invalidate] prefixes`. `setup` writes the list into the functions, which
//! raise an error in the caller's transaction for a key outside it or a pattern without a
//! literal prefix; the sidecar checks every request again against its own list, so a list in
//! the database older or wider than the sidecar's deletes nothing more.
//!
//! The table's owner writes one more kind of row: a publication repair's, naming in
//! [`REPAIR_COLUMN`] a rule table added back to the publication in the same transaction, whose
//! every key is then deleted ([`crate::source::drift`]). Those patterns are the rules' own, so
//! the allow-list does not apply to them.

use std::collections::BTreeSet;

use crate::change::{Change, Op, TableName, Value};
use crate::config::{InvalidateConfig, Mode};
use crate::glob;
use crate::rules::{Invalidation, RuleSet};
use crate::source::setup::{Action, SetupError, Sql, flag, quote_ident, quote_literal};
use crate::telemetry;

/// The schema that holds invalidator's objects in the database, in both modes.
pub const SCHEMA: &str = "invalidator";
/// The prefix of logical decoding messages the old `invalidate()` emitted in replication mode:
/// such a message is now ignored, and counted.
pub const MESSAGE_PREFIX: &str = "invalidator";
/// The table the functions write in replication mode (a row inserted and deleted in the same
/// call: nothing stays, the change is in the WAL).
pub const REQUESTS: &str = "requests";
/// The column of `invalidator.requests` that names a rule table whose every key is to be
/// deleted: written by `run` in the transaction that adds the table back to the publication
/// ([`crate::source::drift`]); NULL in the functions' rows.
pub const REPAIR_COLUMN: &str = "repair";
/// The outbox operation of a row `invalidate()` writes in notify mode.
pub const OUTBOX_OP: &str = "invalidate";
/// The outbox operation of a row `invalidate_key()` writes in notify mode.
pub const OUTBOX_KEY_OP: &str = "invalidate_key";

/// The settings the functions run with, whatever the caller's: names resolve in `pg_catalog`
/// only, and the allow-list's literals compile the same under any `standard_conforming_strings`
/// (a `SET` clause applies before the body is compiled).
const FUNCTION_SETTINGS: &str =
    "SET search_path = pg_catalog, pg_temp SET standard_conforming_strings = on";
/// [`FUNCTION_SETTINGS`] as `pg_proc.proconfig` lists them.
const FUNCTION_SETTINGS_CONFIG: &str =
    "search_path=pg_catalog, pg_temp, standard_conforming_strings=on";

/// `invalidator.requests` as a table name.
pub fn requests_table() -> TableName {
    TableName::new(SCHEMA, REQUESTS)
}

/// Why a request was ignored: the `reason` label of `invalidator_ignored_invalidations_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// A logical decoding message with our prefix, which any role can emit.
    EmittedMessage,
    /// A key or pattern outside the sidecar's allow-list.
    OutsidePrefixes,
    /// A pattern that starts with a glob character, which could match any key.
    NoLiteralPrefix,
    /// A publication repair's request for a table that is not a table of the rules.
    NotARuleTable,
}

impl Ignored {
    /// Every reason, so the metric has a series for each from the start.
    pub const ALL: [Ignored; 4] = [
        Ignored::EmittedMessage,
        Ignored::OutsidePrefixes,
        Ignored::NoLiteralPrefix,
        Ignored::NotARuleTable,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Ignored::EmittedMessage => "emitted_message",
            Ignored::OutsidePrefixes => "outside_prefixes",
            Ignored::NoLiteralPrefix => "no_literal_prefix",
            Ignored::NotARuleTable => "not_a_rule_table",
        }
    }

    /// Counts one ignored request, and logs the first of each reason (a caller looping on a
    /// refused key must not flood the log; the metric counts them all).
    pub fn record(self) {
        static ONCE: [std::sync::Once; 4] = [const { std::sync::Once::new() }; 4];
        metrics::counter!(telemetry::IGNORED_INVALIDATIONS_TOTAL, "reason" => self.label())
            .increment(1);
        let index = Ignored::ALL.iter().position(|r| *r == self).unwrap_or(0);
        ONCE[index].call_once(|| match self {
            Ignored::EmittedMessage => tracing::warn!(
                prefix = MESSAGE_PREFIX,
                "ignoring a logical decoding message with prefix \"invalidator\": only \
                 invalidator.invalidate() can invalidate by hand (logged once)"
            ),
            Ignored::OutsidePrefixes => tracing::warn!(
                "ignoring a manual invalidation outside the allowed key prefixes (the functions \
                 in the database may be stale: run `invalidator setup`) (logged once)"
            ),
            Ignored::NoLiteralPrefix => tracing::warn!(
                "ignoring a manual invalidation by a pattern without a literal prefix (logged \
                 once)"
            ),
            Ignored::NotARuleTable => tracing::warn!(
                "ignoring a publication repair's request for a table that is not a table of \
                 the rules (logged once)"
            ),
        });
    }
}

/// The key prefixes manual invalidation may delete under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allowed {
    /// Sorted and unique; none empty.
    prefixes: Vec<String>,
}

impl Allowed {
    /// The literal prefixes of `rules`' keys and the configured `extra` ones.
    pub fn new(rules: &RuleSet, extra: &[String]) -> Allowed {
        let prefixes: BTreeSet<String> = rules
            .key_prefixes()
            .into_iter()
            .chain(extra.iter().filter(|p| !p.is_empty()).cloned())
            .collect();
        Allowed {
            prefixes: prefixes.into_iter().collect(),
        }
    }

    /// Whether `text` may be deleted: as one literal key when `literal`, else read as
    /// [`Invalidation::insert_given`] reads it.
    pub fn check(&self, text: &str, literal: bool) -> Result<(), Ignored> {
        let prefix = if literal {
            text.to_owned()
        } else {
            glob::literal_prefix(text)
        };
        if prefix.is_empty() {
            return Err(Ignored::NoLiteralPrefix);
        }
        if self.prefixes.iter().any(|p| prefix.starts_with(p.as_str())) {
            Ok(())
        } else {
            Err(Ignored::OutsidePrefixes)
        }
    }

    /// A pattern for each allowed prefix: every key manual invalidation may delete.
    pub fn everything(&self) -> Invalidation {
        let mut inv = Invalidation::default();
        for prefix in &self.prefixes {
            inv.patterns.insert(format!("{}*", glob::escape(prefix)));
        }
        inv
    }

    /// Adds `text` to `inv` when it is allowed; counts and logs it otherwise.
    pub fn insert(&self, inv: &mut Invalidation, text: &str, literal: bool) {
        match self.check(text, literal) {
            Ok(()) if literal => {
                inv.keys.insert(text.to_owned());
            }
            Ok(()) => inv.insert_given(text),
            Err(ignored) => ignored.record(),
        }
    }
}

/// What a row of `invalidator.requests` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request<'a> {
    /// A key or pattern given by hand, and whether it is one literal key.
    Given(&'a str, bool),
    /// Every key the rules of this table can produce, or `None` for text that names no table.
    Repair(Option<TableName>),
}

/// The request a change of `invalidator.requests` carries. Only inserts carry one (the delete
/// of the same row in the same transaction does not).
pub fn request(change: &Change) -> Option<Request<'_>> {
    if change.op != Op::Insert {
        return None;
    }
    let new = change.new.as_ref()?;
    // A table of an older setup has no such column: every row is then given by hand.
    if let Value::Text(table) = new.get(REPAIR_COLUMN) {
        return Some(Request::Repair(TableName::parse(table).ok()));
    }
    let Value::Text(text) = new.get("key_or_pattern") else {
        return None;
    };
    let literal = matches!(new.get("literal"), Value::Text(v) if v == "t");
    Some(Request::Given(text.as_str(), literal))
}

/// The statements that ask, in the transaction they join, for every key of the rules of each
/// of `tables` to be deleted: one row each, inserted and deleted again, so nothing stays but
/// the change in the WAL (`lastval()` is this session's, the row just inserted).
pub fn repair_requests<'t>(tables: impl IntoIterator<Item = &'t TableName>) -> String {
    let requests = format!("{}.{}", quote_ident(SCHEMA), quote_ident(REQUESTS));
    tables
        .into_iter()
        .map(|table| {
            // key_or_pattern '' is what an older sidecar, blind to the column, refuses.
            format!(
                "; INSERT INTO {requests} (key_or_pattern, literal, {REPAIR_COLUMN}) \
                 VALUES ('', false, {}); DELETE FROM {requests} WHERE id = lastval()",
                quote_literal(&table.to_string())
            )
        })
        .collect()
}

/// Whether this session's role can write [`repair_requests`]: `invalidator.requests` exists
/// with the [`REPAIR_COLUMN`], and the role may insert, read and delete its rows and draw its
/// ids (its owner, or a role granted that by hand). From the catalog alone (see
/// [`has_requests`]), so asking raises no error in the server's log.
pub async fn can_request_repairs(db: &mut impl Sql) -> Result<bool, SetupError> {
    flag(
        db,
        &format!(
            "SELECT (has_schema_privilege(n.oid, 'USAGE') \
             AND has_table_privilege(c.oid, 'INSERT') AND has_table_privilege(c.oid, 'SELECT') \
             AND has_table_privilege(c.oid, 'DELETE') \
             AND EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = c.oid \
             AND a.attname = {} AND NOT a.attisdropped) \
             AND coalesce((SELECT bool_and(has_sequence_privilege(s.oid, 'USAGE')) \
             FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' \
             WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass \
             AND d.refobjid = c.oid), true))::text \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = {} AND c.relname = {}",
            quote_literal(REPAIR_COLUMN),
            quote_literal(SCHEMA),
            quote_literal(REQUESTS)
        ),
    )
    .await
}

/// Whether `invalidator.requests` has the [`REPAIR_COLUMN`] (a table made by an older
/// `setup` has not).
async fn has_repair_column(db: &mut impl Sql) -> Result<bool, SetupError> {
    let rows = db
        .query(&format!(
            "SELECT 1 FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = {} AND c.relname = {} AND a.attname = {} AND NOT a.attisdropped",
            quote_literal(SCHEMA),
            quote_literal(REQUESTS),
            quote_literal(REPAIR_COLUMN)
        ))
        .await?;
    Ok(!rows.is_empty())
}

/// The two functions: name, argument, whether the argument is one literal key.
const FUNCTIONS: [(&str, &str, bool); 2] = [
    ("invalidate", "key_or_pattern", false),
    ("invalidate_key", "key", true),
];

/// A function's signature, schema-qualified and quoted.
fn signature(name: &str) -> String {
    signature_of(name, "text")
}

/// The signature of function `name` of schema [`SCHEMA`] with arguments `args`.
fn signature_of(name: &str, args: &str) -> String {
    format!("{}.{name}({args})", quote_ident(SCHEMA))
}

/// A function's body in `mode`, with the allow-list written in.
fn body(mode: Mode, name: &str, arg: &str, literal: bool, allowed: &Allowed) -> String {
    let list = allowed
        .prefixes
        .iter()
        .map(|p| quote_literal(p))
        .collect::<Vec<_>>()
        .join(", ");
    let deliver = match mode {
        Mode::Replication => format!(
            "  INSERT INTO {SCHEMA}.{REQUESTS} (key_or_pattern, literal) VALUES ({arg}, {literal}) \
             RETURNING id INTO request;\n\
             \x20 DELETE FROM {SCHEMA}.{REQUESTS} WHERE id = request;\n"
        ),
        Mode::Notify => format!(
            "  INSERT INTO {SCHEMA}.outbox (table_schema, table_name, op, new)\n\
             \x20 VALUES ('', '', '{}', to_jsonb({arg}));\n\
             \x20 PERFORM pg_notify('{}', '');\n",
            if literal { OUTBOX_KEY_OP } else { OUTBOX_OP },
            crate::source::notify::CHANNEL
        ),
    };
    // The same reading as glob::literal_prefix: text without glob syntax is itself.
    let prefix = if literal {
        format!("  prefix := {arg};\n")
    } else {
        format!(
            "  IF strpos({arg}, '*') = 0 AND strpos({arg}, '?') = 0 AND strpos({arg}, '[') = 0 THEN\n\
             \x20   prefix := {arg};\n\
             \x20 ELSE\n\
             \x20   WHILE i <= length({arg}) LOOP\n\
             \x20     c := substr({arg}, i, 1);\n\
             \x20     EXIT WHEN c IN ('*', '?', '[');\n\
             \x20     IF c = '\\' AND i < length({arg}) THEN\n\
             \x20       i := i + 1;\n\
             \x20       c := substr({arg}, i, 1);\n\
             \x20     END IF;\n\
             \x20     prefix := prefix || c;\n\
             \x20     i := i + 1;\n\
             \x20   END LOOP;\n\
             \x20 END IF;\n"
        )
    };
    let what = if literal {
        "a key"
    } else {
        "a key or a pattern"
    };
    format!(
        "\nDECLARE\n\
         \x20 allowed text[] := ARRAY[{list}]::text[];\n\
         \x20 prefix text := '';\n\
         \x20 i int := 1;\n\
         \x20 c text;\n\
         \x20 request bigint;\n\
         BEGIN\n\
         \x20 IF {arg} IS NULL OR {arg} = '' THEN\n\
         \x20   RAISE EXCEPTION '{SCHEMA}.{name}() needs {what}';\n\
         \x20 END IF;\n\
         {prefix}\
         \x20 IF prefix = '' THEN\n\
         \x20   RAISE EXCEPTION '{SCHEMA}.{name}(): the pattern % has no literal prefix', {arg};\n\
         \x20 END IF;\n\
         \x20 IF NOT EXISTS (SELECT 1 FROM unnest(allowed) a WHERE left(prefix, length(a)) = a) THEN\n\
         \x20   RAISE EXCEPTION '{SCHEMA}.{name}(): % is outside the allowed key prefixes (%)', {arg}, array_to_string(allowed, ', ');\n\
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

/// Whether `invalidator.requests` exists.
pub async fn has_requests(db: &mut impl Sql) -> Result<bool, SetupError> {
    // From the catalog, not to_regclass: that needs USAGE on the schema, which `run`'s role
    // may lack.
    let rows = db
        .query(&format!(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = {} AND c.relname = {}",
            quote_literal(SCHEMA),
            quote_literal(REQUESTS)
        ))
        .await?;
    Ok(!rows.is_empty())
}

/// A condition on `pg_proc` row `p` that it is function `name` of schema [`SCHEMA`] taking
/// one text argument (or none for `capture`), read from the catalog alone (see
/// [`has_requests`]).
fn is_function(name: &str) -> String {
    let args = if name == "capture" { "" } else { "25" };
    format!(
        "p.pronamespace = (SELECT oid FROM pg_namespace WHERE nspname = {}) \
         AND p.proname = {} AND p.proargtypes::text = '{args}'",
        quote_literal(SCHEMA),
        quote_literal(name)
    )
}

/// The roles other than the owner that hold `EXECUTE` on the function `name`, sorted, `PUBLIC`
/// as such; `None` when the function does not exist.
async fn executors(db: &mut impl Sql, name: &str) -> Result<Option<Vec<String>>, SetupError> {
    let rows = db
        .query(&format!(
            "SELECT coalesce((SELECT string_agg(CASE WHEN a.grantee = 0 THEN 'PUBLIC' \
             ELSE pg_get_userbyid(a.grantee)::text END, ',' ORDER BY 1) \
             FROM aclexplode(coalesce(p.proacl, acldefault('f', p.proowner))) a \
             WHERE a.privilege_type = 'EXECUTE' AND a.grantee <> p.proowner), '') \
             FROM pg_proc p WHERE {}",
            is_function(name)
        ))
        .await?;
    Ok(rows.first().map(|r| {
        let list = r.first().cloned().flatten().unwrap_or_default();
        let mut roles: Vec<String> = list
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        roles.sort();
        roles
    }))
}

/// Works out what the functions need in `mode`: in replication mode the table
/// `invalidator.requests` and its place in `publication`; each function (replaced when its
/// body differs, as after a change of mode or of the allow-list); and grants of `EXECUTE` to
/// exactly the configured roles, revoked from `PUBLIC` and every other role. The allow-list is
/// the literal prefixes of `rules`' keys and the configured ones. `schema_planned` says whether
/// the schema exists or an earlier action creates it.
pub async fn plan(
    db: &mut impl Sql,
    mode: Mode,
    schema_planned: bool,
    rules: &RuleSet,
    config: &InvalidateConfig,
    publication: Option<&str>,
) -> Result<Vec<Action>, SetupError> {
    let mut actions = Vec::new();
    if !schema_planned && !has_schema(db).await? {
        actions.push(create_schema());
    }
    if mode == Mode::Replication {
        actions.extend(requests_actions(db, publication).await?);
    }
    if mode == Mode::Notify
        && executors(db, "capture")
            .await?
            .is_some_and(|r| r.iter().any(|r| r == "PUBLIC"))
    {
        // A trigger calling it, on any table, could write the outbox: CREATE TRIGGER needs
        // EXECUTE on it, firing one does not.
        actions.push(Action {
            why: format!("let no role attach {SCHEMA}.capture() to a table of its own"),
            sql: format!(
                "REVOKE ALL ON FUNCTION {} FROM PUBLIC",
                signature_of("capture", "")
            ),
        });
    }
    let allowed = Allowed::new(rules, &config.prefixes);
    let mut wanted = config.roles.clone();
    wanted.sort();
    wanted.dedup();
    for function in FUNCTIONS {
        actions.extend(function_actions(db, mode, function, &allowed, &wanted).await?);
    }
    Ok(actions)
}

/// Replication mode: the requests table (created, or given its repair column) and its place in
/// `publication`.
async fn requests_actions(
    db: &mut impl Sql,
    publication: Option<&str>,
) -> Result<Vec<Action>, SetupError> {
    let mut actions = Vec::new();
    let requests = format!("{}.{}", quote_ident(SCHEMA), quote_ident(REQUESTS));
    let existed = has_requests(db).await?;
    if !existed {
        actions.push(Action {
            why: format!("create the table {SCHEMA}.{REQUESTS} (manual invalidations)"),
            sql: format!(
                "CREATE TABLE IF NOT EXISTS {requests} (id bigserial PRIMARY KEY, \
                 key_or_pattern text NOT NULL, literal boolean NOT NULL, \
                 {REPAIR_COLUMN} text); \
                 REVOKE ALL ON TABLE {requests} FROM PUBLIC"
            ),
        });
    } else if !has_repair_column(db).await? {
        actions.push(Action {
            why: format!(
                "add the column {REPAIR_COLUMN} to {SCHEMA}.{REQUESTS} (publication repairs \
                 in the WAL)"
            ),
            sql: format!("ALTER TABLE {requests} ADD COLUMN IF NOT EXISTS {REPAIR_COLUMN} text"),
        });
    }
    if let Some(publication) = publication {
        let tables: BTreeSet<TableName> = [requests_table()].into();
        let all_tables = db
            .query(&format!(
                "SELECT puballtables::text FROM pg_publication WHERE pubname = {}",
                quote_literal(publication)
            ))
            .await?;
        let all = all_tables
            .first()
            .and_then(|r| r.first().cloned().flatten());
        let unpublished = !existed
            || (all.is_some()
                && !crate::source::setup::unpublished(db, &tables, publication)
                    .await?
                    .is_empty());
        if all.as_deref() != Some("true") && unpublished {
            actions.push(Action {
                why: format!("add {SCHEMA}.{REQUESTS} to publication {publication}"),
                sql: format!(
                    "ALTER PUBLICATION {} ADD TABLE {requests}",
                    quote_ident(publication)
                ),
            });
        }
    }
    Ok(actions)
}

/// One of [`FUNCTIONS`]: created or replaced when its body or settings are out of date, and
/// executable by exactly the `wanted` roles.
async fn function_actions(
    db: &mut impl Sql,
    mode: Mode,
    (name, arg, literal): (&str, &str, bool),
    allowed: &Allowed,
    wanted: &[String],
) -> Result<Vec<Action>, SetupError> {
    let mut actions = Vec::new();
    let body = body(mode, name, arg, literal, allowed);
    let existing = installed_definition(db, name).await?;
    let installed = format!("{body} -- {FUNCTION_SETTINGS_CONFIG}");
    if existing.as_ref() != Some(&Some(installed)) {
        actions.push(create_function(mode, (name, arg), allowed, &body));
    }
    // A function about to be created has no grants yet to compare.
    let have = if existing.is_some() {
        executors(db, name).await?
    } else {
        None
    };
    if have.as_deref() != Some(wanted) {
        actions.push(grant_execute(name, have.as_deref(), wanted));
    }
    Ok(actions)
}

/// The installed function's body and settings as one text, compared whole with what it should
/// be: a function made before the settings were pinned is out of date too. `None` when it is
/// not installed.
async fn installed_definition(
    db: &mut impl Sql,
    name: &str,
) -> Result<Option<Option<String>>, SetupError> {
    let current = db
        .query(&format!(
            "SELECT p.prosrc || ' -- ' || coalesce(array_to_string(p.proconfig, ', '), '') \
             FROM pg_proc p WHERE {}",
            is_function(name)
        ))
        .await?;
    Ok(current.first().map(|r| r.first().cloned().flatten()))
}

/// Creates (or replaces) the function `name(arg text)` with `body`.
fn create_function(mode: Mode, (name, arg): (&str, &str), allowed: &Allowed, body: &str) -> Action {
    let schema = quote_ident(SCHEMA);
    // SECURITY DEFINER: callers have no privileges on the table it writes.
    Action {
        why: format!(
            "create the function {SCHEMA}.{name}({arg} text) ({} mode, {} allowed \
             prefixes)",
            match mode {
                Mode::Replication => "replication",
                Mode::Notify => "notify",
            },
            allowed.prefixes.len()
        ),
        sql: format!(
            "CREATE OR REPLACE FUNCTION {schema}.{name}({arg} text) RETURNS void \
             LANGUAGE plpgsql SECURITY DEFINER {FUNCTION_SETTINGS} AS {}",
            quote_literal(body)
        ),
    }
}

/// Makes the function `name` executable by exactly the `wanted` roles, from the roles that
/// `have` that right now (`None`: not known, as for a function about to be created).
fn grant_execute(name: &str, have: Option<&[String]>, wanted: &[String]) -> Action {
    let schema = quote_ident(SCHEMA);
    // A new function is executable by PUBLIC until revoked.
    let mut revoke = vec!["PUBLIC".to_owned()];
    revoke.extend(
        have.iter()
            .copied()
            .flatten()
            .filter(|r| *r != "PUBLIC" && !wanted.contains(r))
            .map(|r| quote_ident(r)),
    );
    // USAGE on the schema lets every role see what is in it (roles that read the outbox,
    // or look for these functions), not use it: the functions and tables grant nothing.
    let mut sql = format!(
        "GRANT USAGE ON SCHEMA {schema} TO PUBLIC; REVOKE ALL ON FUNCTION {} FROM {}",
        signature(name),
        revoke.join(", ")
    );
    if !wanted.is_empty() {
        let roles: Vec<String> = wanted.iter().map(|r| quote_ident(r)).collect();
        sql.push_str(&format!(
            "; GRANT EXECUTE ON FUNCTION {} TO {roles}",
            signature(name),
            roles = roles.join(", ")
        ));
    }
    Action {
        why: if wanted.is_empty() {
            format!("let no role but superusers call {SCHEMA}.{name}()")
        } else {
            format!("let only {} call {SCHEMA}.{name}()", wanted.join(", "))
        },
        sql,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowed(prefixes: &[&str]) -> Allowed {
        let text =
            "[[rule]]\ntable = \"items\"\nkeys = [\"item:{id}\", \"{id}:x\", \"feed:{id}:*\"]\n";
        let rules =
            RuleSet::compile(&[("r.toml".to_owned(), text.to_owned())]).expect("rules compile");
        let extra: Vec<String> = prefixes.iter().map(|p| (*p).to_owned()).collect();
        Allowed::new(&rules, &extra)
    }

    #[test]
    fn the_allow_list_is_the_rules_literal_prefixes_and_the_configured_ones() {
        assert_eq!(allowed(&["user:"]).prefixes, ["feed:", "item:", "user:"]);
    }

    #[test]
    fn the_sidecar_refuses_what_lies_outside_the_allow_list() {
        let a = allowed(&[]);
        assert_eq!(a.check("item:1", false), Ok(()));
        assert_eq!(a.check("item:*", false), Ok(()));
        assert_eq!(a.check(r"feed:\*", false), Ok(()));
        assert_eq!(a.check("ite*", false), Err(Ignored::OutsidePrefixes));
        assert_eq!(a.check("user:1", false), Err(Ignored::OutsidePrefixes));
        assert_eq!(a.check("*", false), Err(Ignored::NoLiteralPrefix));
        assert_eq!(a.check("[i]tem:1", false), Err(Ignored::NoLiteralPrefix));
        // A literal key is itself, glob characters and all.
        assert_eq!(a.check("*item:1", true), Err(Ignored::OutsidePrefixes));
        assert_eq!(a.check("item:*", true), Ok(()));
        let mut inv = Invalidation::default();
        a.insert(&mut inv, "item:*", true);
        assert!(inv.keys.contains("item:*") && inv.patterns.is_empty());
    }

    #[test]
    fn a_repair_request_names_its_table_as_the_sidecar_reads_it_back() {
        let table = TableName::new("my.schema", "Order \"Items\"");
        let sql = repair_requests([&table]);
        assert!(
            sql.starts_with("; INSERT INTO \"invalidator\".\"requests\""),
            "{sql}"
        );
        assert!(sql.ends_with("DELETE FROM \"invalidator\".\"requests\" WHERE id = lastval()"));
        let written = table.to_string();
        assert!(sql.contains(&quote_literal(&written)), "{sql}");
        assert_eq!(TableName::parse(&written), Ok(table));
    }

    #[test]
    fn the_bodies_check_the_allow_list_and_deliver_per_mode() {
        let a = allowed(&["o'k"]);
        let replication = body(Mode::Replication, "invalidate", "key_or_pattern", false, &a);
        assert!(replication.contains("INSERT INTO invalidator.requests"));
        assert!(replication.contains("DELETE FROM invalidator.requests WHERE id = request"));
        assert!(!replication.contains("pg_logical_emit_message"));
        let notify = body(Mode::Notify, "invalidate_key", "key", true, &a);
        assert!(notify.contains("'invalidate_key', to_jsonb(key)"));
        assert!(notify.contains("pg_notify('invalidator', '')"));
        for body in [&replication, &notify] {
            assert!(
                body.contains("ARRAY['feed:', 'item:', 'o''k']::text[]"),
                "{body}"
            );
            assert!(body.contains("outside the allowed key prefixes"));
        }
        assert!(replication.contains("key_or_pattern IS NULL OR key_or_pattern = ''"));
    }
}
