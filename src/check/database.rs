//! The half of `check` that reads the live database's catalog: do the rules' tables and columns
//! exist, which old and new values will Postgres actually send, and is the database ready for
//! the mode (`wal_level`, privilege and publication; or notify mode's outbox and triggers).

use std::collections::BTreeSet;

use crate::change::{Op, TableName};
use crate::config::{Mode, PostgresConfig};
use crate::rules::{Rule, RuleSet};
use crate::source::notify;
use crate::source::setup::{self, SetupError, Sql, qualified, quote_ident, quote_literal};

use super::analysis::{Piece, pieces, widened};
use super::{Finding, Kind, Severity};

/// A column as the catalog describes it.
struct Column {
    /// Its name.
    name: String,
    /// Its type, as `format_type` prints it.
    type_name: String,
    /// Whether its values can be stored out of line (a varlena type whose storage is not
    /// `plain`), so an update that leaves it alone may not send it.
    toastable: bool,
    /// The expression of a generated column (`GENERATED ALWAYS AS (...) STORED`).
    generated: Option<String>,
}

/// The first column of the first row, if any.
fn scalar(rows: setup::Rows) -> Option<String> {
    rows.into_iter().next()?.into_iter().next()?
}

/// `ALTER TABLE t REPLICA IDENTITY FULL;`
fn full_identity(table: &TableName) -> String {
    format!("ALTER TABLE {} REPLICA IDENTITY FULL;", qualified(table))
}

/// Everything the database says about the rules.
pub(super) async fn findings(
    db: &mut impl Sql,
    rules: &RuleSet,
    postgres: &PostgresConfig,
) -> Result<Vec<Finding>, SetupError> {
    let mut out = Vec::new();
    let mut present = BTreeSet::new();
    let mut complete = true;
    let replication = postgres.mode == Mode::Replication;
    let sends_generated = replication && sends_generated(db, &postgres.publication).await?;
    for table in rules.tables() {
        let Some(info) = setup::table_info(db, table).await? else {
            complete = false;
            out.extend(
                rules
                    .rules()
                    .iter()
                    .filter(|r| &r.table == table)
                    .map(missing_table),
            );
            continue;
        };
        present.insert(table.clone());
        let columns = columns(db, table).await?;
        if replication {
            identity(table, &info, &mut out);
        }
        for rule in rules.rules().iter().filter(|r| &r.table == table) {
            if let Some(finding) = missing_columns(rule, &info) {
                complete = false;
                out.push(finding);
                continue;
            }
            // In notify mode the trigger records whole old and new rows.
            if replication && info.replica_identity != 'f' {
                old_values(rule, &info, &mut out);
                toast(rule, &info, &columns, &mut out);
            }
            if replication && !sends_generated {
                generated(rule, &columns, &postgres.publication, &mut out);
            }
        }
    }
    match postgres.mode {
        Mode::Replication => {
            server(db, &mut out).await?;
            failover(db, &postgres.slot, &mut out).await?;
            publication(db, rules, &present, &postgres.publication, &mut out).await?;
        }
        // notify::plan refuses tables or columns that do not exist: reported above already.
        Mode::Notify if complete => notify_setup(db, rules, &mut out).await?,
        Mode::Notify => {}
    }
    Ok(out)
}

/// The rules' tables that do not exist and the rules naming columns their table lacks.
pub(super) async fn unknown_names(
    db: &mut impl Sql,
    rules: &RuleSet,
) -> Result<Vec<Finding>, SetupError> {
    let mut out = Vec::new();
    for table in rules.tables() {
        let info = setup::table_info(db, table).await?;
        for rule in rules.rules().iter().filter(|r| &r.table == table) {
            match &info {
                None => out.push(missing_table(rule)),
                Some(info) => out.extend(missing_columns(rule, info)),
            }
        }
    }
    Ok(out)
}

/// `rule`'s table does not exist.
fn missing_table(rule: &Rule) -> Finding {
    Finding::about(
        rule,
        Severity::Error,
        Kind::MissingTable,
        format!("table {} does not exist", rule.table),
        "name an existing table: `schema.table`, or a bare name for public.<name>".to_owned(),
    )
}

/// The columns `rule` reads that its table lacks, if any, with the columns it has.
fn missing_columns(rule: &Rule, info: &setup::TableInfo) -> Option<Finding> {
    let missing: Vec<&str> = rule
        .columns()
        .iter()
        .map(String::as_str)
        .filter(|c| !info.columns.iter().any(|have| have == c))
        .collect();
    (!missing.is_empty()).then(|| {
        Finding::about(
            rule,
            Severity::Error,
            Kind::MissingColumn,
            format!(
                "{} has no column {} (it has {})",
                rule.table,
                missing.join(", "),
                info.columns.join(", ")
            ),
            "correct the column names in the rule's keys and `changed`".to_owned(),
        )
    })
}

/// The columns of `table` with their types and whether they can be TOASTed.
async fn columns(db: &mut impl Sql, table: &TableName) -> Result<Vec<Column>, SetupError> {
    let rows = db
        .query(&format!(
            "SELECT attname, format_type(atttypid, atttypmod), \
             (attlen = -1 AND attstorage <> 'p')::text, \
             CASE WHEN attgenerated <> '' THEN pg_get_expr(adbin, adrelid) END \
             FROM pg_attribute LEFT JOIN pg_attrdef ON adrelid = attrelid AND adnum = attnum \
             WHERE attrelid = to_regclass({}) AND attnum > 0 \
             AND NOT attisdropped ORDER BY attnum",
            quote_literal(&qualified(table))
        ))
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Some(name), Some(type_name), Some(toastable), generated] => Some(Column {
                name: name.clone(),
                type_name: type_name.clone(),
                toastable: toastable == "true",
                generated: generated.clone(),
            }),
            _ => None,
        })
        .collect())
}

/// A table whose updates and deletes Postgres would refuse once it is in the publication.
fn identity(table: &TableName, info: &setup::TableInfo, out: &mut Vec<Finding>) {
    let problem = match info.replica_identity {
        'n' => "REPLICA IDENTITY NOTHING",
        'f' => return,
        _ if !info.identity_columns.is_empty() => return,
        'i' => "REPLICA IDENTITY USING INDEX without that index",
        _ => "REPLICA IDENTITY DEFAULT without a primary key",
    };
    out.push(Finding::general(
        Severity::Error,
        Kind::NoReplicaIdentity,
        Some(table),
        format!(
            "{problem}: once {table} is in the publication, Postgres refuses its UPDATEs and \
             DELETEs (\"cannot update table because it does not have a replica identity and \
             publishes updates\")"
        ),
        format!(
            "{} (or add a primary key: the old rows then carry only its columns)",
            full_identity(table)
        ),
    ));
}

/// A rule that reads old values its table's REPLICA IDENTITY does not send.
fn old_values(rule: &Rule, info: &setup::TableInfo, out: &mut Vec<Finding>) {
    // Without identity columns, `identity` reported an error that covers this.
    if info.identity_columns.is_empty()
        || !rule
            .ops
            .iter()
            .any(|op| matches!(op, Op::Update | Op::Delete))
    {
        return;
    }
    let table = &rule.table;
    let sent = |column: &str| info.identity_columns.iter().any(|c| c == column);
    let placeholders: BTreeSet<&str> = rule
        .templates()
        .iter()
        .flat_map(|t| t.columns())
        .filter(|c| !sent(c))
        .collect();
    let changed: Vec<&str> = rule
        .changed
        .iter()
        .map(String::as_str)
        .filter(|c| !sent(c))
        .collect();
    if placeholders.is_empty() && changed.is_empty() {
        return;
    }
    let identity = match info.replica_identity {
        'i' => "REPLICA IDENTITY USING INDEX",
        _ => "REPLICA IDENTITY DEFAULT",
    };
    let mut message = format!(
        "{identity} of {table} sends only {} in the old row of an UPDATE or DELETE",
        info.identity_columns.join(", ")
    );
    if !placeholders.is_empty() {
        let broadened: Vec<String> = rule
            .templates()
            .iter()
            .filter(|t| t.columns().any(|c| placeholders.contains(c)))
            .map(|t| {
                format!(
                    "`{t}` becomes `{}`",
                    widened(t, |c| placeholders.contains(c))
                )
            })
            .collect();
        message.push_str(&format!(
            ", so the keys rendered from the old row broaden to patterns: {}",
            broadened.join(", ")
        ));
    }
    if !changed.is_empty() && rule.ops.contains(&Op::Update) {
        message.push_str(&format!(
            "{}`changed` cannot compare {}, so every update fires the rule",
            if placeholders.is_empty() {
                "; "
            } else {
                "; and "
            },
            changed.join(", ")
        ));
    }
    out.push(Finding::about(
        rule,
        Severity::Warning,
        Kind::ReplicaIdentity,
        message,
        format!(
            "{} (every UPDATE and DELETE then carries the whole old row, and the keys are exact)",
            full_identity(table)
        ),
    ));
}

/// A rule whose placeholders read a column that an update can leave out of the new row: an
/// unchanged value stored out of line (TOAST) is not sent unless the old row holds it.
fn toast(rule: &Rule, info: &setup::TableInfo, columns: &[Column], out: &mut Vec<Finding>) {
    if !rule.ops.contains(&Op::Update) {
        return;
    }
    let toastable = |name: &str| columns.iter().find(|c| c.name == name && c.toastable);
    let mut named: Vec<String> = Vec::new();
    let mut broadened: Vec<String> = Vec::new();
    let mut risky = BTreeSet::new();
    for template in rule.templates() {
        for piece in pieces(template.source()) {
            if let Piece::Value { column, .. } = piece
                && let Some(c) = toastable(&column)
                && risky.insert(column.clone())
            {
                named.push(format!("{} ({})", c.name, c.type_name));
            }
        }
    }
    if risky.is_empty() {
        return;
    }
    for template in rule.templates() {
        if template.columns().any(|c| risky.contains(c)) {
            broadened.push(format!(
                "`{template}` becomes `{}`",
                widened(template, |c| risky.contains(c))
            ));
        }
    }
    let table = &rule.table;
    let identity = if info.replica_identity == 'i' {
        "USING INDEX"
    } else {
        "DEFAULT"
    };
    out.push(Finding::about(
        rule,
        Severity::Warning,
        Kind::Toast,
        format!(
            "{} can be stored out of line (TOAST); an UPDATE that leaves such a value unchanged \
             does not send it under REPLICA IDENTITY {identity}, so the new row's keys broaden \
             to patterns: {}",
            named.join(", "),
            broadened.join(", ")
        ),
        format!(
            "{} (the old row then holds every value, and an unchanged one is taken from it)",
            full_identity(table)
        ),
    ));
}

/// Whether the publication sends generated columns: only from PostgreSQL 18, and only when it
/// was made or altered with `publish_generated_columns = stored` (read through `to_jsonb`, so
/// one query serves servers whose catalog has no such column).
async fn sends_generated(db: &mut impl Sql, publication: &str) -> Result<bool, SetupError> {
    let rows = db
        .query(&format!(
            "SELECT to_jsonb(p) ->> 'pubgencols' FROM pg_publication p WHERE pubname = {}",
            quote_literal(publication)
        ))
        .await?;
    Ok(scalar(rows).is_some_and(|stored| stored == "s"))
}

/// Placeholders on generated columns, which pgoutput leaves out of every row it sends unless
/// the publication asks for them (18+): without a value, their keys broaden to patterns on
/// every change of the table. Notify mode's triggers see them, so only replication mode asks.
fn generated(rule: &Rule, columns: &[Column], publication: &str, out: &mut Vec<Finding>) {
    let expression = |name: &str| {
        columns
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.generated.as_deref())
    };
    let mut named = Vec::new();
    let mut broadened = Vec::new();
    for template in rule.templates() {
        let mut unsent = template
            .columns()
            .filter(|c| expression(c).is_some())
            .peekable();
        if unsent.peek().is_none() {
            continue;
        }
        for column in unsent {
            let described = format!(
                "{column} (generated as {})",
                expression(column).unwrap_or("")
            );
            if !named.contains(&described) {
                named.push(described);
            }
        }
        broadened.push(format!(
            "`{template}` becomes `{}`",
            widened(template, |c| expression(c).is_some())
        ));
    }
    if named.is_empty() {
        return;
    }
    out.push(Finding::about(
        rule,
        Severity::Warning,
        Kind::Generated,
        format!(
            "{} not sent by the publication: pgoutput leaves generated columns out of every row, \
             so the keys broaden to patterns on every change: {}",
            named.join(", "),
            broadened.join(", ")
        ),
        format!(
            "on PostgreSQL 18: ALTER PUBLICATION {} SET (publish_generated_columns = stored); \
             before 18: key on the columns the value is generated from (a filter such as \
             `{{make|lower}}`), or use notify mode, whose triggers see generated values",
            quote_ident(publication)
        ),
    ));
}

/// `wal_level` and the role's REPLICATION attribute, which replication mode needs.
async fn server(db: &mut impl Sql, out: &mut Vec<Finding>) -> Result<(), SetupError> {
    let level = scalar(db.query("SELECT current_setting('wal_level')").await?).unwrap_or_default();
    if level != "logical" {
        out.push(Finding::general(
            Severity::Error,
            Kind::WalLevel,
            None,
            format!(
                "wal_level is {level}: logical replication needs wal_level = logical, so `run` \
                 cannot create its slot"
            ),
            "ALTER SYSTEM SET wal_level = logical; then restart Postgres (or, where that is \
             impossible, set [postgres] mode = \"notify\")"
                .to_owned(),
        ));
    }
    if let Some(refusal) = setup::plugin_allowlist(db)
        .await?
        .and_then(|list| list.refusal())
    {
        out.push(Finding::general(
            Severity::Error,
            Kind::OutputPlugin,
            None,
            refusal.problem,
            refusal.fix,
        ));
    }
    let role = db
        .query("SELECT current_user::text, (rolreplication OR rolsuper)::text FROM pg_roles WHERE rolname = current_user")
        .await?;
    if let Some([Some(user), Some(may)]) = role.first().map(Vec::as_slice)
        && may != "true"
    {
        out.push(Finding::general(
            Severity::Error,
            Kind::Privilege,
            None,
            format!(
                "role {user} lacks the REPLICATION attribute, so `run` cannot open a \
                 replication connection"
            ),
            format!(
                "as a superuser: ALTER ROLE {} WITH REPLICATION;",
                quote_ident(user)
            ),
        ));
    }
    Ok(())
}

/// Whether the slot, where it exists on a server with failover slots (17+), is one: a slot
/// that standbys do not synchronize is lost at a failover, and the cache flushed.
async fn failover(db: &mut impl Sql, slot: &str, out: &mut Vec<Finding>) -> Result<(), SetupError> {
    if let Some(info) = setup::slot_info(db, slot).await?
        && info.failover == Some(false)
    {
        out.push(Finding::general(
            Severity::Warning,
            Kind::FailoverSlot,
            None,
            format!(
                "slot {slot} is not a failover slot: standbys do not synchronize it, so after a \
                 failover the slot is lost and `run` flushes every key the rules can produce"
            ),
            format!(
                "with `run` stopped: psql \"dbname=<database> replication=database\" -c \
                 'ALTER_REPLICATION_SLOT {} (FAILOVER true)' (and see the standby settings under \
                 Failover to a standby)",
                quote_ident(slot)
            ),
        ));
    }
    Ok(())
}

/// Whether the publication holds every table with rules and publishes every operation they
/// fire on. What `run` can add itself (its role owns the tables and the publication) is a
/// warning; what it cannot is an error, since `run` would stop at start.
async fn publication(
    db: &mut impl Sql,
    rules: &RuleSet,
    present: &BTreeSet<TableName>,
    name: &str,
    out: &mut Vec<Finding>,
) -> Result<(), SetupError> {
    let rows = db
        .query(&format!(
            "SELECT (pg_has_role(pubowner, 'USAGE') OR (SELECT rolsuper FROM pg_roles \
             WHERE rolname = current_user))::text FROM pg_publication WHERE pubname = {}",
            quote_literal(name)
        ))
        .await?;
    let (exists, owns_publication) = match rows.first().map(Vec::as_slice) {
        Some([Some(owner)]) => (true, owner == "true"),
        _ => (false, false),
    };
    let lacking: Vec<TableName> = if exists {
        setup::unpublished(db, present, name).await?
    } else {
        present.iter().cloned().collect()
    };
    if !lacking.is_empty() {
        let may = may_publish(db, exists, owns_publication, &lacking).await?;
        out.push(lacking_finding(name, exists, &lacking, may));
    }
    // Partitions are published under their own names (publish_via_partition_root = false),
    // so every partition of a rule's table, present or future, is streamed and fires its rules.
    for hidden in setup::hidden(db, rules, name).await? {
        out.push(Finding::general(
            Severity::Error,
            Kind::Publication,
            hidden.table.as_ref(),
            format!("{}: `invalidator run` refuses to start", hidden.problem),
            format!(
                "as the publication's owner: {} (or `invalidator setup` as the owner)",
                hidden.fix
            ),
        ));
    }
    Ok(())
}

/// Whether this role may create (`exists` false) or extend the publication with `lacking`: it
/// needs to own each table, and the publication, or CREATE on the database to create it.
async fn may_publish(
    db: &mut impl Sql,
    exists: bool,
    owns_publication: bool,
    lacking: &[TableName],
) -> Result<bool, SetupError> {
    let mut may = if exists {
        owns_publication
    } else {
        setup::flag(
            db,
            "SELECT has_database_privilege(current_database(), 'CREATE') OR \
             (SELECT rolsuper FROM pg_roles WHERE rolname = current_user)",
        )
        .await?
    };
    for table in lacking {
        may &= setup::flag(
            db,
            &format!(
                "SELECT pg_has_role(relowner, 'USAGE') FROM pg_class \
                 WHERE oid = to_regclass({})",
                quote_literal(&qualified(table))
            ),
        )
        .await?;
    }
    Ok(may)
}

/// The finding that the publication `name` lacks tables (or does not exist), a warning when
/// `run` may repair it and an error when it may not.
fn lacking_finding(name: &str, exists: bool, lacking: &[TableName], may: bool) -> Finding {
    let names: Vec<String> = lacking.iter().map(qualified).collect();
    let (message, sql, verb) = if exists {
        (
            format!(
                "publication {name} lacks {}: their changes are not streamed",
                lacking
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!(
                "ALTER PUBLICATION {} ADD TABLE {};",
                quote_ident(name),
                names.join(", ")
            ),
            "adds them",
        )
    } else {
        (
            format!("publication {name} does not exist yet"),
            format!(
                "CREATE PUBLICATION {} FOR TABLE {};",
                quote_ident(name),
                names.join(", ")
            ),
            "creates it",
        )
    };
    if may {
        Finding::general(
            Severity::Warning,
            Kind::Publication,
            None,
            format!(
                "{message}: `invalidator run` {verb} at start (this role may), or run \
                 `invalidator setup` now"
            ),
            sql,
        )
    } else {
        Finding::general(
            Severity::Error,
            Kind::Publication,
            None,
            format!(
                "{message}, and this role cannot change that (it needs to own the tables{}), \
                 so `invalidator run` would stop at start",
                if exists { " and the publication" } else { "" }
            ),
            format!("as the tables' owner: {sql} (or `invalidator setup` as the owner)"),
        )
    }
}

/// What notify mode's setup lacks: `run` refuses to start until `invalidator setup` applied it.
async fn notify_setup(
    db: &mut impl Sql,
    rules: &RuleSet,
    out: &mut Vec<Finding>,
) -> Result<(), SetupError> {
    let installed = setup::flag(
        db,
        &format!(
            "SELECT to_regclass({}) IS NOT NULL",
            quote_literal(&format!("{}.outbox", quote_ident(notify::SCHEMA)))
        ),
    )
    .await?;
    let actions = setup::notify::plan(db, rules).await?;
    if actions.is_empty() {
        return Ok(());
    }
    if !installed {
        out.push(Finding::general(
            Severity::Error,
            Kind::NotifySetup,
            None,
            format!(
                "notify mode is not set up in this database (no {}.outbox): `invalidator run` \
                 refuses to start",
                notify::SCHEMA
            ),
            "invalidator setup (`invalidator setup --dry-run` prints its SQL)".to_owned(),
        ));
        return Ok(());
    }
    for action in actions {
        let table = rules
            .tables()
            .find(|t| action.sql.contains(&format!(" ON {} ", qualified(t))));
        out.push(Finding::general(
            Severity::Error,
            Kind::NotifySetup,
            table,
            format!(
                "notify mode is out of date: setup would {}; `invalidator run` refuses to start \
                 until `invalidator setup` does",
                action.why
            ),
            format!("{};", action.sql),
        ));
    }
    Ok(())
}
