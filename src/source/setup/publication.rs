//! The publication: whether it exists, what it lacks and hides of the rules' tables, and whether
//! its owner can be trusted with them.

use std::collections::BTreeSet;

use super::*;

/// Refuses a publication whose owner is neither a superuser, nor this role, nor a member of the
/// owner of every rule table: that owner (any role with `CREATE` on the database can make the
/// publication first) could drop tables from it at will, and each repair deletes every key of
/// their rules, or mark it to hide a lost slot.
async fn refuse_untrusted_publication(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
    publication: &str,
) -> Result<(), SetupError> {
    let names: Vec<String> = tables
        .iter()
        .map(|t| quote_literal(&qualified(t)))
        .collect();
    let rows = db
        .query(&format!(
            "SELECT r.rolname FROM pg_publication p JOIN pg_roles r ON r.oid = p.pubowner \
             WHERE p.pubname = {} AND NOT r.rolsuper AND r.rolname <> current_user \
             AND EXISTS (SELECT 1 FROM unnest(ARRAY[{}]::text[]) AS t(name) \
                         JOIN pg_class c ON c.oid = to_regclass(t.name) \
                         WHERE NOT pg_has_role(p.pubowner, c.relowner, 'USAGE'))",
            quote_literal(publication),
            if names.is_empty() {
                "NULL".to_owned()
            } else {
                names.join(", ")
            }
        ))
        .await?;
    match rows
        .into_iter()
        .next()
        .and_then(|r| r.into_iter().next().flatten())
    {
        Some(owner) => Err(SetupError::UntrustedPublication {
            publication: publication.to_owned(),
            owner,
        }),
        None => Ok(()),
    }
}

/// Whether `publication` exists.
pub async fn publication_exists(db: &mut impl Sql, publication: &str) -> Result<bool, SetupError> {
    Ok(!db
        .query(&format!(
            "SELECT 1 FROM pg_publication WHERE pubname = {}",
            quote_literal(publication)
        ))
        .await?
        .is_empty())
}

/// What the publication needs so that it holds every one of `tables`: created when it does not
/// exist, else the tables it does not publish added (see [`unpublished`]; tables it has beyond
/// them stay). Returns whether it existed, and the statement, if one is needed. A partitioned
/// table is added itself, with `publish_via_partition_root` left false: every partition,
/// present and future, is then published under its own name, and a TRUNCATE of one partition
/// too (which Postgres does not publish when it publishes partitions as their root).
pub async fn publication_action(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
    publication: &str,
) -> Result<(bool, Option<Action>), SetupError> {
    if !publication_exists(db, publication).await? {
        let names: Vec<String> = tables.iter().map(qualified).collect();
        return Ok((
            false,
            Some(Action {
                why: format!(
                    "create publication {publication} for {} tables",
                    names.len()
                ),
                sql: format!(
                    "CREATE PUBLICATION {} FOR TABLE {}",
                    quote_ident(publication),
                    names.join(", ")
                ),
            }),
        ));
    }
    refuse_untrusted_publication(db, tables, publication).await?;
    let unpublished = unpublished(db, tables, publication).await?;
    let gained: Vec<String> = unpublished.iter().map(qualified).collect();
    if gained.is_empty() {
        return Ok((true, None));
    }
    Ok((
        true,
        Some(Action {
            why: format!(
                "add {} tables the rules gained to publication {publication}",
                gained.len()
            ),
            sql: format!(
                "ALTER PUBLICATION {} ADD TABLE {}",
                quote_ident(publication),
                gained.join(", ")
            ),
        }),
    ))
}

/// The ones of `tables` (which must exist) that the existing `publication` does not publish, by
/// their current oid: a table is published when the publication is `FOR ALL TABLES`, or names
/// it or one of its partition ancestors, or (PostgreSQL 15) the schema of one of those.
/// `pg_publication_tables` cannot say this: it lists the partitions of a partitioned table
/// instead of the table.
pub async fn unpublished(
    db: &mut impl Sql,
    tables: &BTreeSet<TableName>,
    publication: &str,
) -> Result<Vec<TableName>, SetupError> {
    let schemas = if crate::source::invalidate::server_version(db).await? >= 150_000 {
        " OR EXISTS (SELECT 1 FROM pg_publication_namespace s JOIN pg_class a \
         ON a.relnamespace = s.pnnspid WHERE s.pnpubid = p.oid AND a.oid IN (SELECT t.oid \
         UNION SELECT relid FROM pg_partition_ancestors(t.oid)))"
    } else {
        ""
    };
    let mut out = Vec::new();
    for table in tables {
        let rows = db
            .query(&format!(
                "SELECT (p.puballtables OR EXISTS (SELECT 1 FROM pg_publication_rel r \
                 WHERE r.prpubid = p.oid AND r.prrelid IN (SELECT t.oid UNION SELECT relid \
                 FROM pg_partition_ancestors(t.oid))){schemas})::text \
                 FROM pg_publication p, (SELECT to_regclass({})::oid AS oid) t \
                 WHERE p.pubname = {}",
                quote_literal(&qualified(table)),
                quote_literal(publication)
            ))
            .await?;
        if rows
            .first()
            .and_then(|r| r.first().cloned().flatten())
            .as_deref()
            != Some("true")
        {
            out.push(table.clone());
        }
    }
    Ok(out)
}

/// Something about the publication that makes rules miss changes and that `run` does not
/// repair itself: it refuses to start (and stops) while it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hidden {
    /// The rule table concerned, when it is one table.
    pub table: Option<TableName>,
    /// What is wrong, in a sentence.
    pub problem: String,
    /// The SQL that repairs it, to run as the publication's owner.
    pub fix: String,
}

/// What the existing `publication` hides from the rules: an operation they fire on that it
/// does not publish; partitions published as their root (`publish_via_partition_root`), which
/// drops a TRUNCATE of one partition; and (PostgreSQL 15) a row filter, or a column list
/// without every column the rules read, on a rule table, an ancestor or a partition of one.
/// Empty when the publication does not exist.
pub async fn hidden(
    db: &mut impl Sql,
    rules: &RuleSet,
    publication: &str,
) -> Result<Vec<Hidden>, SetupError> {
    let version = crate::source::invalidate::server_version(db).await?;
    let via_root = if version >= 130_000 {
        "pubviaroot"
    } else {
        "false"
    };
    let rows = db
        .query(&format!(
            "SELECT pubinsert::text, pubupdate::text, pubdelete::text, pubtruncate::text, \
             {via_root}::text FROM pg_publication WHERE pubname = {}",
            quote_literal(publication)
        ))
        .await?;
    let Some([ops @ .., via_root]) = rows.first().map(Vec::as_slice) else {
        return Ok(Vec::new());
    };
    let name = quote_ident(publication);
    let mut out = Vec::new();
    let lacking: Vec<&str> = Op::ALL
        .into_iter()
        .zip(ops)
        .filter(|(op, on)| {
            on.as_deref() != Some("true") && rules.rules().iter().any(|r| r.ops.contains(op))
        })
        .map(|(op, _)| op.as_str())
        .collect();
    if !lacking.is_empty() {
        out.push(Hidden {
            table: None,
            problem: format!(
                "publication {publication} does not publish {}, on which rules fire: those \
                 changes are never seen",
                lacking.join(", ")
            ),
            fix: format!(
                "ALTER PUBLICATION {name} SET (publish = 'insert, update, delete, truncate');"
            ),
        });
    }
    let partitioned = partitioned(db, rules).await?;
    if via_root.as_deref() == Some("true") && !partitioned.is_empty() {
        out.push(Hidden {
            table: None,
            problem: format!(
                "publication {publication} has publish_via_partition_root = true, so Postgres \
                 does not publish a TRUNCATE of one partition of {}",
                partitioned
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            fix: format!("ALTER PUBLICATION {name} SET (publish_via_partition_root = false);"),
        });
    }
    if version >= 150_000 {
        out.extend(filtered(db, rules, publication).await?);
    }
    Ok(out)
}

/// The rules' tables that are partitioned or partitions.
async fn partitioned<'r>(
    db: &mut impl Sql,
    rules: &'r RuleSet,
) -> Result<Vec<&'r TableName>, SetupError> {
    let mut found = Vec::new();
    for table in rules.tables() {
        let partitioned = flag(
            db,
            &format!(
                "SELECT relkind = 'p' OR relispartition FROM pg_class \
                 WHERE oid = to_regclass({})",
                quote_literal(&qualified(table))
            ),
        )
        .await?;
        if partitioned {
            found.push(table);
        }
    }
    Ok(found)
}

/// PostgreSQL 15 and later: the row filters and column lists of `publication` on the rules'
/// tables (or their partitions or ancestors) that hide changes or columns the rules read.
async fn filtered(
    db: &mut impl Sql,
    rules: &RuleSet,
    publication: &str,
) -> Result<Vec<Hidden>, SetupError> {
    let name = quote_ident(publication);
    let mut out = Vec::new();
    for table in rules.tables() {
        let oid = format!("to_regclass({})", quote_literal(&qualified(table)));
        let rows = db
            .query(&format!(
                "SELECT r.prrelid::regclass::text, (r.prqual IS NOT NULL)::text, \
                 (SELECT json_agg(attname)::text FROM pg_attribute WHERE attrelid = r.prrelid \
                 AND attnum = ANY(r.prattrs::int2[])) \
                 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid \
                 WHERE p.pubname = {} AND (r.prqual IS NOT NULL OR r.prattrs IS NOT NULL) \
                 AND r.prrelid IN (SELECT {oid}::oid UNION SELECT relid FROM \
                 pg_partition_ancestors({oid}) UNION SELECT relid FROM pg_partition_tree({oid}))",
                quote_literal(publication)
            ))
            .await?;
        let read = rules.columns_for(table);
        for row in rows {
            let [Some(entry), Some(filtered), columns] = row.as_slice() else {
                continue;
            };
            let fix = format!(
                "BEGIN; ALTER PUBLICATION {name} DROP TABLE {entry}; \
                 ALTER PUBLICATION {name} ADD TABLE {entry}; COMMIT;"
            );
            if filtered == "true" {
                out.push(Hidden {
                    table: Some(table.clone()),
                    problem: format!(
                        "publication {publication} publishes {entry} with a row filter: \
                         changes of the rows it leaves out are never seen by the rules of \
                         {table}"
                    ),
                    fix: fix.clone(),
                });
            }
            let published: BTreeSet<String> = columns
                .as_deref()
                .and_then(|c| serde_json::from_str::<Vec<String>>(c).ok())
                .map_or_else(BTreeSet::new, |c| c.into_iter().collect());
            let unseen: Vec<&str> = read.difference(&published).map(String::as_str).collect();
            if columns.is_some() && !unseen.is_empty() {
                out.push(Hidden {
                    table: Some(table.clone()),
                    problem: format!(
                        "publication {publication} publishes {entry} with a column list \
                         without {}, which the rules of {table} read",
                        unseen.join(", ")
                    ),
                    fix,
                });
            }
        }
    }
    Ok(out)
}
