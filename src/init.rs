//! `invalidator init`: a starter `invalidator.toml` and `rules/` for an existing database.
//!
//! The configuration gets the connection settings of the database it was pointed at, without the
//! password (that stays in the environment); the rules file gets one example rule per table,
//! commented out and keyed by the table's primary key, for the developer to edit. Nothing that
//! exists is ever overwritten.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use tokio_postgres::config::{Host, SslMode};

use crate::change::TableName;
use crate::config::PostgresConfig;
use crate::rules::write_column;
use crate::source::connect::{self, ConnectError};

/// Schemas that hold no application tables: Postgres's own, ours, and those Supabase manages.
const SKIPPED_SCHEMAS: &[&str] = &[
    "information_schema",
    "invalidator",
    "auth",
    "storage",
    "realtime",
    "_realtime",
    "extensions",
    "graphql",
    "graphql_public",
    "net",
    "pgbouncer",
    "pgsodium",
    "pgsodium_masks",
    "supabase_functions",
    "supabase_migrations",
    "vault",
    "cron",
];

/// Why `init` wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A file it would write is already there.
    #[error("{} already exists; init never overwrites a file (remove it, or run init in another directory)", .0.display())]
    Exists(PathBuf),
    /// The database could not be reached.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The catalog query failed.
    #[error("cannot list the database's tables")]
    Catalog(#[source] tokio_postgres::Error),
    /// A file could not be written.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// One table `init` found, with its primary key columns in key order (empty without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FoundTable {
    /// Its schema.
    pub schema: String,
    /// Its name.
    pub name: String,
    /// Its primary key's columns, in index order.
    pub key: Vec<String>,
}

/// Writes `invalidator.toml` and `rules/tables.toml` into `dir` for the database of `postgres`;
/// returns the files written.
pub async fn init(dir: &Path, postgres: &PostgresConfig) -> Result<Vec<PathBuf>, InitError> {
    let config_file = dir.join("invalidator.toml");
    let rules_file = dir.join("rules").join("tables.toml");
    for path in [&config_file, &rules_file] {
        if path.exists() {
            return Err(InitError::Exists(path.clone()));
        }
    }
    let db = connect::connect(postgres).await?;
    let skipped: Vec<&str> = SKIPPED_SCHEMAS.to_vec();
    let rows = db
        .query(
            "SELECT n.nspname::text, c.relname::text, \
             COALESCE((SELECT array_agg(a.attname::text ORDER BY k.ord) \
                       FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), \
                            pg_attribute a \
                       WHERE i.indrelid = c.oid AND i.indisprimary \
                         AND a.attrelid = c.oid AND a.attnum = k.attnum), '{}') \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind IN ('r', 'p') AND NOT c.relispartition \
               AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> ALL($1) \
             ORDER BY 1, 2",
            &[&skipped],
        )
        .await
        .map_err(InitError::Catalog)?;
    let tables: Vec<FoundTable> = rows
        .iter()
        .map(|row| FoundTable {
            schema: row.get(0),
            name: row.get(1),
            key: row.get(2),
        })
        .collect();
    let url = crate::endpoint::parse_url(&postgres.url).map_err(|source| ConnectError::Url {
        url: crate::redact::redact(&postgres.url),
        source,
    })?;
    let written = [
        (config_file, config_text(&url.0, url.1)),
        (rules_file, rules_text(&tables)),
    ];
    for (path, text) in &written {
        write_new(path, text)?;
    }
    Ok(written.into_iter().map(|(path, _)| path).collect())
}

/// Creates `path` (and its directory) with `text`, failing if it appeared meanwhile.
fn write_new(path: &Path, text: &str) -> Result<(), InitError> {
    let failed = |source| InitError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => InitError::Exists(path.to_owned()),
            _ => failed(e),
        })?;
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(failed)
}

/// A TOML string literal of `text`.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// The connection URL of `pg` without its password: user, hosts, ports, database, the TLS mode
/// (`verify_host` false only for `verify-ca`), and every other setting the URL gave that is not
/// the default (see [`settings`]).
pub fn url_without_password(pg: &tokio_postgres::Config, verify_host: bool) -> String {
    let user = pg.get_user().unwrap_or("postgres");
    let ports = pg.get_ports();
    let hosts: Vec<String> = pg
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                // A socket directory goes in the query, which libpq and tokio-postgres accept.
                Host::Unix(_) => String::new(),
            }
        })
        .collect();
    let sockets: Vec<String> = pg
        .get_hosts()
        .iter()
        .filter_map(|host| match host {
            Host::Unix(dir) => Some(format!("host={}", dir.display())),
            Host::Tcp(_) => None,
        })
        .collect();
    let mut query: Vec<String> = sockets;
    match pg.get_ssl_mode() {
        SslMode::Disable => query.push("sslmode=disable".to_owned()),
        SslMode::Require if !verify_host => query.push("sslmode=verify-ca".to_owned()),
        SslMode::Require => query.push("sslmode=require".to_owned()),
        _ => {}
    }
    query.extend(settings(pg));
    let db = pg.get_dbname().unwrap_or(user);
    let hosts = hosts
        .into_iter()
        .filter(|h| !h.is_empty())
        .collect::<Vec<_>>()
        .join(",");
    let mut url = format!("postgres://{user}@{hosts}/{db}");
    if !query.is_empty() {
        let _ = write!(url, "?{}", query.join("&"));
    }
    url
}

/// The settings of `pg` besides hosts, user, database, password and TLS mode, as URL query
/// parameters, each only when it differs from its default: a starter file that dropped a
/// `target_session_attrs=read-write` or an `options` the application relies on would connect
/// differently from the URL it was made from.
fn settings(pg: &tokio_postgres::Config) -> Vec<String> {
    use tokio_postgres::config::{
        ChannelBinding, LoadBalanceHosts, SslNegotiation, TargetSessionAttrs,
    };
    // Percent-encoded byte by byte: tokio-postgres decodes `%XX` in a URL's query, not `+`.
    let encoded = |value: &str| {
        value.bytes().fold(String::new(), |mut out, byte| {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                out.push(char::from(byte));
            } else {
                let _ = write!(out, "%{byte:02X}");
            }
            out
        })
    };
    let mut query = Vec::new();
    if let Some(name) = pg.get_application_name() {
        query.push(format!("application_name={}", encoded(name)));
    }
    if let Some(options) = pg.get_options() {
        query.push(format!("options={}", encoded(options)));
    }
    if let Some(timeout) = pg.get_connect_timeout() {
        query.push(format!("connect_timeout={}", timeout.as_secs()));
    }
    if pg.get_target_session_attrs() == TargetSessionAttrs::ReadWrite {
        query.push("target_session_attrs=read-write".to_owned());
    }
    if pg.get_load_balance_hosts() == LoadBalanceHosts::Random {
        query.push("load_balance_hosts=random".to_owned());
    }
    match pg.get_channel_binding() {
        ChannelBinding::Disable => query.push("channel_binding=disable".to_owned()),
        ChannelBinding::Require => query.push("channel_binding=require".to_owned()),
        _ => {}
    }
    if pg.get_ssl_negotiation() == SslNegotiation::Direct {
        query.push("sslnegotiation=direct".to_owned());
    }
    if !pg.get_keepalives() {
        query.push("keepalives=0".to_owned());
    }
    if pg.get_keepalives_idle() != std::time::Duration::from_secs(2 * 60 * 60) {
        query.push(format!(
            "keepalives_idle={}",
            pg.get_keepalives_idle().as_secs()
        ));
    }
    if let Some(interval) = pg.get_keepalives_interval() {
        query.push(format!("keepalives_interval={}", interval.as_secs()));
    }
    if let Some(retries) = pg.get_keepalives_retries() {
        query.push(format!("keepalives_retries={retries}"));
    }
    if let Some(timeout) = pg.get_tcp_user_timeout() {
        query.push(format!("tcp_user_timeout={}", timeout.as_secs()));
    }
    let addresses: Vec<String> = pg.get_hostaddrs().iter().map(|a| a.to_string()).collect();
    if !addresses.is_empty() {
        query.push(format!("hostaddr={}", encoded(&addresses.join(","))));
    }
    query
}

/// The starter `invalidator.toml`.
fn config_text(pg: &tokio_postgres::Config, verify_host: bool) -> String {
    let url = url_without_password(pg, verify_host);
    format!(
        "# invalidator configuration, written by `invalidator init`. Every key can be overridden by\n\
         # INVALIDATOR_<SECTION>_<KEY> (e.g. INVALIDATOR_HTTP_LISTEN); environment beats this file.\n\
         \n\
         [postgres]\n\
         # No password here: keep it in the environment, as the whole URL in DATABASE_URL\n\
         # (which overrides this one), e.g. DATABASE_URL=postgres://user:secret@host/db.\n\
         # The role needs REPLICATION, and the server wal_level = logical (or use mode = \"notify\").\n\
         url = {url}\n\
         mode = \"replication\"\n\
         slot = \"invalidator\"\n\
         publication = \"invalidator\"\n\
         \n\
         [redis]\n\
         # The cache whose keys are deleted; REDIS_URL overrides it, rediss:// for TLS.\n\
         url = \"redis://127.0.0.1:6379/0\"\n\
         \n\
         [rules]\n\
         # Edit rules/tables.toml: every rule in it is commented out until you do.\n\
         path = \"rules\"\n\
         \n\
         [http]\n\
         listen = \"127.0.0.1:9187\"\n",
        url = toml_string(&url),
    )
}

/// `text` as the literal text of a key template: braces doubled, and glob characters (which
/// would make the example key a pattern) replaced, since the example is to be edited anyway.
fn key_text(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '{' => "{{".to_owned(),
            '}' => "}}".to_owned(),
            '*' | '?' | '[' | '\\' => "_".to_owned(),
            c => c.to_string(),
        })
        .collect()
}

/// The starter rules: one commented-out example per table, keyed by its primary key.
pub fn rules_text(tables: &[FoundTable]) -> String {
    let mut out = String::from(
        "# Rules written by `invalidator init`: one example per table, commented out.\n\
         # For each table whose rows your application caches, uncomment its rule and replace the\n\
         # example key with the keys your application really writes for a row ({column} is the\n\
         # row's value; a key with * is a pattern). Delete the rest. Then run\n\
         # `invalidator check`, `invalidator setup` and `invalidator run`.\n",
    );
    for table in tables {
        let name = TableName::new(table.schema.as_str(), table.name.as_str());
        // The rule's `table`, quoted where it must be; a bare name for public.
        let written = name.to_string();
        let shown = match written.strip_prefix("public.") {
            Some(bare) if TableName::parse(bare).as_ref() == Ok(&name) => bare.to_owned(),
            _ => written,
        };
        let prefix = key_text(&match table.schema.as_str() {
            "public" => table.name.clone(),
            schema => format!("{schema}.{}", table.name),
        });
        out.push('\n');
        let key = if table.key.is_empty() {
            let _ = writeln!(
                out,
                "# {shown}: no primary key; EDIT: name the columns that identify a row."
            );
            format!("{prefix}:{{id}}")
        } else {
            let _ = writeln!(
                out,
                "# {shown}: primary key ({}). EDIT: the keys your application caches for a row.",
                table.key.join(", ")
            );
            let placeholders: Vec<String> = table
                .key
                .iter()
                .map(|c| format!("{{{}}}", write_column(c)))
                .collect();
            format!("{prefix}:{}", placeholders.join(":"))
        };
        let _ = writeln!(out, "# [[rule]]");
        let _ = writeln!(out, "# name = {}", toml_string(&shown));
        let _ = writeln!(out, "# table = {}", toml_string(&shown));
        let _ = writeln!(out, "# keys = [{}]", toml_string(&key));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(schema: &str, name: &str, key: &[&str]) -> FoundTable {
        FoundTable {
            schema: schema.to_owned(),
            name: name.to_owned(),
            key: key.iter().map(|c| (*c).to_owned()).collect(),
        }
    }

    #[test]
    fn each_table_gets_a_commented_rule_keyed_by_its_primary_key() {
        let text = rules_text(&[
            table("public", "orders", &["id"]),
            table("sales", "lines", &["order_id", "line"]),
            table("public", "log", &[]),
        ]);
        assert!(
            text.contains("# table = \"orders\"\n# keys = [\"orders:{id}\"]"),
            "{text}"
        );
        assert!(
            text.contains("# keys = [\"sales.lines:{order_id}:{line}\"]"),
            "{text}"
        );
        assert!(text.contains("# log: no primary key; EDIT"), "{text}");
        // Odd names are quoted as the rules quote them, and the rules compile.
        let odd = rules_text(&[
            table("my.schema", "Order Items", &["first name", "id"]),
            table("public", "a.b", &["x{y}"]),
        ]);
        for line in [
            r#"# table = '"my.schema".Order Items'"#,
            r#"# keys = ['my.schema.Order Items:{"first name"}:{id}']"#,
            r#"# table = '"a.b"'"#,
            r#"# keys = ['a.b:{"x{y}"}']"#,
        ] {
            assert!(odd.lines().any(|l| l == line), "{line}: {odd}");
        }
        let uncommented: String = odd
            .lines()
            .filter(|l| {
                l.starts_with("# [[rule]]")
                    || l.starts_with("# name")
                    || l.starts_with("# table")
                    || l.starts_with("# keys")
            })
            .map(|l| format!("{}\n", &l[2..]))
            .collect();
        let rules = crate::rules::RuleSet::compile(&[("t.toml".to_owned(), uncommented)]).unwrap();
        assert_eq!(
            rules.rules()[0].table,
            TableName::new("my.schema", "Order Items")
        );
        assert_eq!(rules.rules()[0].columns(), ["first name", "id"]);
        assert_eq!(rules.rules()[1].table, TableName::new("public", "a.b"));
        // Nothing is active until a developer uncomments it.
        assert!(
            text.lines().all(|l| l.is_empty() || l.starts_with('#')),
            "{text}"
        );
    }

    #[test]
    fn the_written_url_has_no_password_and_keeps_the_tls_mode() {
        let (pg, verify_host) = crate::endpoint::parse_url(
            "postgres://app:s3cret@db.example.com:6543/shop?sslmode=verify-ca",
        )
        .unwrap();
        assert_eq!(
            url_without_password(&pg, verify_host),
            "postgres://app@db.example.com:6543/shop?sslmode=verify-ca"
        );
        let (pg, verify_host) =
            crate::endpoint::parse_url("host=/run/postgresql user=app password=x dbname=shop")
                .unwrap();
        assert_eq!(
            url_without_password(&pg, verify_host),
            "postgres://app@/shop?host=/run/postgresql"
        );
    }

    #[test]
    fn the_written_url_keeps_every_other_setting_it_was_given() {
        let given = "postgres://app:s3cret@db1:5432,db2:5433/shop?sslmode=verify-full\
                     &application_name=exo%20drive&options=-c%20search_path%3Dapp\
                     &connect_timeout=3&target_session_attrs=read-write\
                     &load_balance_hosts=random&channel_binding=require\
                     &sslnegotiation=direct&keepalives=0&keepalives_idle=30\
                     &keepalives_interval=5&keepalives_retries=4&tcp_user_timeout=9000\
                     &hostaddr=10.0.0.1,10.0.0.2";
        let (pg, verify_host) = crate::endpoint::parse_url(given).unwrap();
        let written = url_without_password(&pg, verify_host);
        assert!(!written.contains("s3cret"), "{written}");
        // Read back, the written URL connects as the given one does.
        let (again, again_verify) = crate::endpoint::parse_url(&written).unwrap();
        assert_eq!(again_verify, verify_host);
        assert_eq!(again.get_application_name(), Some("exo drive"));
        assert_eq!(again.get_options(), Some("-c search_path=app"));
        assert_eq!(
            again.get_connect_timeout(),
            Some(&std::time::Duration::from_secs(3))
        );
        assert_eq!(again.get_ssl_negotiation(), pg.get_ssl_negotiation());
        // Everything else the configuration holds, but the password.
        assert_eq!(
            format!("{again:?}").replace("password: None, ", ""),
            format!("{pg:?}").replace("password: Some(_), ", "")
        );
    }
}
