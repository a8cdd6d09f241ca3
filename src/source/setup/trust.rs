//! Whether the schemas setup creates in, or calls code from, let other roles plant objects there.

use super::*;

/// The roles, other than the current one and superusers, that may create objects in `schema`:
/// its owner and every grantee of CREATE, `PUBLIC` included (the database's owner standing in
/// for `pg_database_owner`). Empty when the schema does not exist.
async fn creators(db: &mut impl Sql, schema: &str) -> Result<Vec<String>, SetupError> {
    let rows = db
        .query(&format!(
            "WITH s AS (SELECT oid, nspowner, nspacl FROM pg_namespace WHERE nspname = {}), \
             c AS (SELECT nspowner AS role FROM s UNION \
                   SELECT a.grantee FROM s, aclexplode(s.nspacl) a \
                   WHERE a.privilege_type = 'CREATE'), \
             r AS (SELECT c.role, CASE WHEN c.role = (SELECT oid FROM pg_roles \
                   WHERE rolname = 'pg_database_owner') THEN (SELECT datdba FROM pg_database \
                   WHERE datname = current_database()) ELSE c.role END AS effective FROM c) \
             SELECT coalesce(p.rolname, 'PUBLIC') FROM r LEFT JOIN pg_roles p \
             ON p.oid = r.effective \
             WHERE r.role = 0 OR NOT (p.rolsuper OR p.rolname = current_user) ORDER BY 1",
            quote_literal(schema)
        ))
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect())
}

/// Refuses, before `setup` creates anything, the schemas where other roles could plant what
/// runs with `setup`'s privileges: schema `invalidator` made by another role (it could then
/// write `invalidator.requests`, or add triggers and functions there), and, in notify mode, the
/// schema hstore lives in, where a function named `hstore` for a table's row type would be
/// called by the `SECURITY DEFINER` `capture()` instead of the extension's.
pub async fn refuse_untrusted_schemas(db: &mut impl Sql, notify: bool) -> Result<(), SetupError> {
    let ours = crate::source::invalidate::SCHEMA;
    let roles = creators(db, ours).await?;
    if !roles.is_empty() {
        return Err(SetupError::UntrustedSchema {
            schema: ours.to_owned(),
            what: "invalidator's own",
            roles,
            danger: "they could write invalidator.requests or plant functions and triggers that \
                     run as its owner",
            fix: format!(
                "drop it if you did not create it (DROP SCHEMA {} CASCADE), or run setup as \
                 its owner",
                quote_ident(ours)
            ),
        });
    }
    if !notify {
        return Ok(());
    }
    let hstore = db
        .query(
            "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'hstore'",
        )
        .await?;
    let Some(Some(schema)) = hstore.into_iter().next().and_then(|r| r.into_iter().next()) else {
        return Ok(());
    };
    let roles = creators(db, &schema).await?;
    if roles.is_empty() {
        return Ok(());
    }
    Err(SetupError::UntrustedSchema {
        fix: format!(
            "REVOKE CREATE ON SCHEMA {} FROM {} (or move hstore: ALTER EXTENSION hstore SET \
             SCHEMA <a schema only you may create in>)",
            quote_ident(&schema),
            roles.join(", ")
        ),
        schema,
        what: "where extension hstore is installed",
        roles,
        danger: "a function named hstore for a table's row type would be called by the \
                 trigger function invalidator.capture(), which runs as its owner",
    })
}
