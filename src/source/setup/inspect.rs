//! Catalog facts that `run`, `check`, `status` and `explain` read: the server's output-plugin
//! allow-list, the slot, a table's columns and replica identity.

use super::*;

/// The server's `output_plugin_libraries`: newer minor releases of PostgreSQL let a replication
/// connection load only the output plugins it lists (older ones have no such setting and load
/// any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginAllowlist {
    /// The setting as `pg_settings` shows it, e.g. `pgoutput, test_decoding`.
    pub setting: String,
    /// Its `pg_settings.context`: `postmaster` takes effect at a restart, the others at a
    /// reload.
    pub context: String,
    /// Where the value comes from (`pg_settings.source`): `database` and `user` values
    /// (`ALTER DATABASE/ROLE ... SET`) override the server's, so the fix goes there.
    pub source: String,
    /// The connected database, for an `ALTER DATABASE` fix.
    pub database: String,
    /// The connected role, for an `ALTER ROLE` fix.
    pub role: String,
}

/// Why the server will not load pgoutput, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginRefusal {
    /// What is wrong, naming the setting and its value.
    pub problem: String,
    /// The SQL that allows pgoutput, and how to make it take effect.
    pub fix: String,
}

impl PluginAllowlist {
    /// Why pgoutput cannot load, or `None` when the list holds it (by name, or as a path or
    /// file name ending in `pgoutput`).
    pub fn refusal(&self) -> Option<PluginRefusal> {
        let libraries = list_elements(&self.setting);
        let allowed = libraries.iter().any(|entry| {
            let file = entry.rsplit('/').next().unwrap_or(entry);
            file.strip_suffix(".so").unwrap_or(file) == "pgoutput"
        });
        if allowed {
            return None;
        }
        // One literal per element: a single 'a, b' would be one element named "a, b".
        let value = libraries
            .iter()
            .map(String::as_str)
            .chain(["pgoutput"])
            .map(quote_literal)
            .collect::<Vec<_>>()
            .join(", ");
        let fix = match self.source.as_str() {
            "database" => format!(
                "ALTER DATABASE {} SET output_plugin_libraries = {value}; (new sessions use it)",
                quote_ident(&self.database)
            ),
            "user" => format!(
                "ALTER ROLE {} SET output_plugin_libraries = {value}; (new sessions use it)",
                quote_ident(&self.role)
            ),
            _ if self.context == "postmaster" => format!(
                "ALTER SYSTEM SET output_plugin_libraries = {value}; then restart PostgreSQL"
            ),
            _ => format!(
                "ALTER SYSTEM SET output_plugin_libraries = {value}; then SELECT pg_reload_conf();"
            ),
        };
        Some(PluginRefusal {
            problem: format!(
                "output_plugin_libraries = {} does not list pgoutput, so this server refuses to \
                 load it for logical replication (error 42501): `run` cannot create its slot or \
                 stream",
                quote_literal(&self.setting)
            ),
            fix: format!("as a superuser: {fix}"),
        })
    }
}

/// The elements of a list setting as the server splits it: at commas, each element trimmed,
/// or in double quotes (keeping commas and spaces, `""` for a quote).
fn list_elements(setting: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = setting.trim_start();
    while !rest.is_empty() {
        let element = match crate::change::unquote(rest) {
            Some((name, after)) => {
                rest = after;
                name
            }
            None => {
                let end = rest.find(',').unwrap_or(rest.len());
                let name = rest[..end].trim().to_owned();
                rest = &rest[end..];
                name
            }
        };
        if !element.is_empty() {
            out.push(element);
        }
        rest = rest.trim_start();
        rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
    }
    out
}

/// Reads `output_plugin_libraries`; `None` where the server has no such setting.
pub async fn plugin_allowlist(db: &mut impl Sql) -> Result<Option<PluginAllowlist>, SetupError> {
    let rows = db
        .query(
            "SELECT setting, context, source, current_database()::text, current_user::text \
             FROM pg_settings WHERE name = 'output_plugin_libraries'",
        )
        .await?;
    Ok(match rows.first().map(Vec::as_slice) {
        Some(
            [
                setting,
                Some(context),
                Some(source),
                Some(database),
                Some(role),
            ],
        ) => Some(PluginAllowlist {
            setting: setting.clone().unwrap_or_default(),
            context: context.clone(),
            source: source.clone(),
            database: database.clone(),
            role: role.clone(),
        }),
        _ => None,
    })
}

/// What the server says about a replication slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotInfo {
    /// The output plugin.
    pub plugin: Option<String>,
    /// Whether it belongs to the connected database.
    pub same_database: bool,
    /// Whether a walsender streams from it now.
    pub active: bool,
    /// Process id of that walsender.
    pub active_pid: Option<String>,
    /// The last position a consumer acknowledged.
    pub confirmed_flush: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL between the confirmed position and the server's current one.
    pub lag_bytes: Option<i64>,
    /// Whether it is a failover slot, which standbys synchronize; `None` before PostgreSQL 17,
    /// which has none.
    pub failover: Option<bool>,
}

/// Reads the slot, or `None` when it does not exist.
pub async fn slot_info(db: &mut impl Sql, slot: &str) -> Result<Option<SlotInfo>, SetupError> {
    let rows = db
        .query(&format!(
            "SELECT plugin, database = current_database(), active, active_pid::text, \
             confirmed_flush_lsn::text, wal_status, \
             (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn() \
              ELSE pg_current_wal_lsn() END - confirmed_flush_lsn)::bigint::text, \
             to_jsonb(s) ->> 'failover' \
             FROM pg_replication_slots s WHERE slot_name = {}",
            quote_literal(slot)
        ))
        .await?;
    let Some(row) = rows.into_iter().next() else {
        return Ok(None);
    };
    // `failover` is read through jsonb: a column that is missing before 17 is then NULL.
    let [
        plugin,
        same_db,
        active,
        pid,
        flush,
        wal_status,
        lag,
        failover,
    ] = <[Option<String>; 8]>::try_from(row)
        .map_err(|_| SetupError::Unexpected("the slot query".to_owned()))?;
    Ok(Some(SlotInfo {
        plugin,
        same_database: same_db.as_deref() == Some("t"),
        active: active.as_deref() == Some("t"),
        active_pid: pid,
        confirmed_flush: flush.and_then(|s| s.parse().ok()),
        wal_status,
        lag_bytes: lag.and_then(|s| s.parse().ok()),
        failover: failover.map(|f| f == "true"),
    }))
}

/// The process id of the walsender streaming from `slot`, or `None` when the slot is free or
/// does not exist: how a standby waits, and how `teardown` refuses, without asking for the slot
/// itself (each refused `START_REPLICATION` is an ERROR in the server's log).
pub async fn slot_holder(db: &mut impl Sql, slot: &str) -> Result<Option<String>, SetupError> {
    let rows = db
        .query(&format!(
            "SELECT coalesce(active_pid::text, '') FROM pg_replication_slots \
             WHERE slot_name = {} AND active",
            quote_literal(slot)
        ))
        .await?;
    Ok(rows.into_iter().next().map(|row| {
        row.into_iter()
            .next()
            .flatten()
            .filter(|pid| !pid.is_empty())
            .unwrap_or_else(|| "unknown".to_owned())
    }))
}

/// Facts about one table that decide what a rule can rely on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableInfo {
    /// Column names in table order.
    pub columns: Vec<String>,
    /// `d` default, `f` full, `i` index, `n` nothing.
    pub replica_identity: char,
    /// Columns Postgres sends in the old row of an update or delete under that identity.
    pub identity_columns: Vec<String>,
}

/// Reads a table's columns and replica identity, or `None` when it does not exist.
pub async fn table_info(
    db: &mut impl Sql,
    table: &TableName,
) -> Result<Option<TableInfo>, SetupError> {
    let oid = format!(
        "(SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = {} AND c.relname = {})",
        quote_literal(&table.schema),
        quote_literal(&table.name)
    );
    let ident = db
        .query(&format!(
            "SELECT relreplident::text FROM pg_class WHERE oid = {oid}"
        ))
        .await?;
    let Some(replica_identity) = ident
        .first()
        .and_then(|r| r.first().cloned().flatten())
        .and_then(|s| s.chars().next())
    else {
        return Ok(None);
    };
    let columns = first_column(
        db.query(&format!(
            "SELECT attname FROM pg_attribute WHERE attrelid = {oid} AND attnum > 0 \
             AND NOT attisdropped ORDER BY attnum"
        ))
        .await?,
    );
    let identity_columns = match replica_identity {
        'f' => columns.clone(),
        'n' => Vec::new(),
        _ => {
            // DEFAULT uses the primary key; INDEX uses the chosen index.
            let which = if replica_identity == 'i' {
                "indisreplident"
            } else {
                "indisprimary"
            };
            first_column(
                db.query(&format!(
                    "SELECT a.attname FROM pg_index i JOIN pg_attribute a \
                     ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) \
                     WHERE i.indrelid = {oid} AND i.{which} ORDER BY a.attnum"
                ))
                .await?,
            )
        }
    };
    Ok(Some(TableInfo {
        columns,
        replica_identity,
        identity_columns,
    }))
}

fn first_column(rows: Rows) -> Vec<String> {
    rows.into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allowlist(setting: &str, context: &str) -> PluginAllowlist {
        PluginAllowlist {
            setting: setting.to_owned(),
            context: context.to_owned(),
            source: "configuration file".to_owned(),
            database: "shop".to_owned(),
            role: "app".to_owned(),
        }
    }

    #[test]
    fn an_allowlist_without_pgoutput_is_refused_with_the_fix() {
        for allowed in [
            "pgoutput, test_decoding",
            "test_decoding,pgoutput",
            "\"pgoutput\"",
            "$libdir/pgoutput",
            "/usr/lib/postgresql/18/lib/pgoutput.so",
        ] {
            assert_eq!(allowlist(allowed, "sighup").refusal(), None, "{allowed}");
        }
        let refusal = allowlist("test_decoding, wal2json", "sighup")
            .refusal()
            .unwrap();
        assert_eq!(
            refusal.problem,
            "output_plugin_libraries = 'test_decoding, wal2json' does not list pgoutput, so \
             this server refuses to load it for logical replication (error 42501): `run` \
             cannot create its slot or stream"
        );
        assert_eq!(
            refusal.fix,
            "as a superuser: ALTER SYSTEM SET output_plugin_libraries = \
             'test_decoding', 'wal2json', 'pgoutput'; then SELECT pg_reload_conf();"
        );
        let empty = allowlist("", "postmaster").refusal().unwrap();
        assert_eq!(
            empty.fix,
            "as a superuser: ALTER SYSTEM SET output_plugin_libraries = 'pgoutput'; then \
             restart PostgreSQL"
        );
        // A value set for the database or the role is fixed there: it overrides the server's.
        let database = PluginAllowlist {
            source: "database".to_owned(),
            ..allowlist("test_decoding", "superuser")
        };
        assert_eq!(
            database.refusal().unwrap().fix,
            "as a superuser: ALTER DATABASE \"shop\" SET output_plugin_libraries = \
             'test_decoding', 'pgoutput'; (new sessions use it)"
        );
        let role = PluginAllowlist {
            source: "user".to_owned(),
            ..allowlist("test_decoding", "superuser")
        };
        assert!(
            role.refusal()
                .unwrap()
                .fix
                .starts_with("as a superuser: ALTER ROLE \"app\" SET"),
        );
        // A quoted element keeps its comma: "pgoutput, x" is one library, not pgoutput.
        assert!(
            allowlist("\"pgoutput, x\"", "superuser")
                .refusal()
                .is_some()
        );
        assert_eq!(
            list_elements(" a ,\"b, c\", \"d\"\"e\" ,, f"),
            ["a", "b, c", "d\"e", "f"]
        );
        // A name that merely contains pgoutput is another library.
        assert!(allowlist("pgoutput_ext", "sighup").refusal().is_some());
    }
}
