//! `invalidator teardown`: removes what `setup` and `run` created, in either mode, and nothing
//! else. Idempotent: once everything is gone the plan is empty.
//!
//! ```text
//!  refuse while held: the slot (pg_replication_slots.active) or the outbox reader lock
//!  DROP TRIGGER ... (every trigger calling invalidator.capture())
//!  pg_drop_replication_slot(slot)          only a pgoutput slot of this database
//!  DROP PUBLICATION publication            only one marked as created by invalidator
//!  DROP EXTENSION hstore                   only in schema invalidator and used by nothing else
//!  DROP SCHEMA invalidator CASCADE         the outbox, capture(), invalidate()
//!  FUNCTION DELETE invalidator             on each Redis where that library is loaded
//! ```
//!
//! What looks like ours but may not be is kept and said so ([`Plan::kept`]): a publication
//! without invalidator's mark (created by someone else, or by a version that did not mark it)
//! may publish tables for other subscribers, and which of its tables `setup` added cannot be
//! told, so it is left whole.

use crate::config::{Config, PostgresConfig};
use crate::error::Classify;
use crate::redis::{DeleteError, Deleter, DeleterOptions};
use crate::source::invalidate::{SCHEMA, server_version};
use crate::source::notify::{self, TRUNCATE_TRIGGER};
use crate::source::setup::{
    self, Action, SetupError, Sql, created_by_invalidator, quote_ident, quote_literal,
};

/// The name of the Redis Functions library `setup` loads; teardown removes it from every
/// primary of every target where it finds it.
pub const REDIS_LIBRARY: &str = crate::redis::library::NAME;

/// Teardown cannot go ahead.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// An instance streams from the slot.
    #[error(
        "replication slot {slot} is in use by pid {pid} (an `invalidator run`?): stop it first; \
         nothing was removed"
    )]
    SlotInUse {
        /// The slot name.
        slot: String,
        /// The walsender's process id.
        pid: String,
    },
    /// An instance reads the outbox.
    #[error(
        "the outbox reader lock is held by pid {pid} (an `invalidator run` in notify mode): \
         stop it first; nothing was removed"
    )]
    ReaderRunning {
        /// The holding session's process id.
        pid: String,
    },
    /// Objects teardown did not create depend on invalidator's and would go with them.
    #[error(
        "these objects depend on invalidator's and would be dropped with them: {}; drop or \
         change them first (teardown removes only what setup and run created); nothing was \
         removed",
        .0.join("; ")
    )]
    Dependents(Vec<String>),
    /// Reading the catalog or removing an object failed.
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A Redis server failed.
    #[error(transparent)]
    Redis(#[from] DeleteError),
    /// The database cannot be reached.
    #[error(transparent)]
    Connect(#[from] crate::source::connect::ConnectError),
}

/// How long a holder of the slot or the reader lock may take to go before teardown refuses.
const HOLDER_GRACE: std::time::Duration = std::time::Duration::from_secs(5);
/// How often it is asked meanwhile.
const HOLDER_POLL: std::time::Duration = std::time::Duration::from_millis(100);

/// What teardown found in Postgres and will do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The statements to run, in order.
    pub actions: Vec<Action>,
    /// What was found and is left in place, each with why.
    pub kept: Vec<String>,
}

/// Works out what to remove from the database, after refusing while an instance holds the slot
/// or the reader lock (in either mode: a configuration switched between modes can leave both).
pub async fn plan(db: &mut impl Sql, postgres: &PostgresConfig) -> Result<Plan, TeardownError> {
    let slot = &postgres.slot;
    // An instance stopped a moment ago can still hold the slot or the lock: its server session
    // ends a little after the process. "Stop it, then tear down" should work at once, so a
    // holder gets a few seconds to go before it counts.
    let mut waited = std::time::Duration::ZERO;
    loop {
        let slot_holder = setup::slot_holder(db, slot).await?;
        let reader = notify::reader_lock_holder(db).await?;
        let out_of_time = waited >= HOLDER_GRACE;
        match (slot_holder, reader) {
            (None, None) => break,
            (Some(pid), _) if out_of_time => {
                return Err(TeardownError::SlotInUse {
                    slot: slot.clone(),
                    pid,
                });
            }
            (None, Some(pid)) if out_of_time => return Err(TeardownError::ReaderRunning { pid }),
            _ => {}
        }
        tokio::time::sleep(HOLDER_POLL).await;
        waited += HOLDER_POLL;
    }
    let dependents = dependents(db).await?;
    if !dependents.is_empty() {
        return Err(TeardownError::Dependents(dependents));
    }
    let mut plan = Plan::default();
    plan.actions.extend(triggers(db).await?);
    if let Some(info) = setup::slot_info(db, slot).await? {
        if info.plugin.as_deref() == Some("pgoutput") && info.same_database {
            plan.actions.push(Action {
                why: format!("drop replication slot {slot}"),
                sql: format!("SELECT pg_drop_replication_slot({})", quote_literal(slot)),
            });
        } else {
            plan.kept.push(format!(
                "replication slot {slot}: not a pgoutput slot of this database, so not \
                 invalidator's"
            ));
        }
    }
    let publication = &postgres.publication;
    let comment = db
        .query(&format!(
            "SELECT obj_description(oid, 'pg_publication') FROM pg_publication \
             WHERE pubname = {}",
            quote_literal(publication)
        ))
        .await?;
    if let Some(row) = comment.first() {
        let comment = row.first().cloned().flatten();
        if created_by_invalidator(comment.as_deref(), slot) {
            plan.actions.push(Action {
                why: format!("drop publication {publication}"),
                sql: format!("DROP PUBLICATION {}", quote_ident(publication)),
            });
        } else {
            plan.kept.push(format!(
                "publication {publication}: not marked as created by invalidator (its comment \
                 says so when it is), so it may serve others; if nothing else uses it: DROP \
                 PUBLICATION {};",
                quote_ident(publication)
            ));
        }
    }
    plan.actions.extend(schema(db, &mut plan.kept).await?);
    Ok(plan)
}

/// Drops every trigger that calls `invalidator.capture()`: those on the rules' tables and on
/// their partitions, and those left on tables the rules no longer name. A row trigger cloned
/// onto a partition goes with its parent's and cannot be dropped by itself.
async fn triggers(db: &mut impl Sql) -> Result<Vec<Action>, SetupError> {
    let clones = if server_version(db).await? >= 130_000 {
        " AND t.tgparentid = 0"
    } else {
        ""
    };
    let rows = db
        .query(&format!(
            "SELECT t.tgname, n.nspname, c.relname FROM pg_trigger t \
             JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE t.tgfoid = coalesce(to_regprocedure({})::oid, 0) AND NOT t.tgisinternal{clones} \
             ORDER BY n.nspname, c.relname, t.tgname",
            quote_literal(&format!("{}.capture()", quote_ident(SCHEMA)))
        ))
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| match row.as_slice() {
            [Some(trigger), Some(schema), Some(table)] => Some(Action {
                why: format!(
                    "drop trigger {} on {}.{} (captures {})",
                    quote_ident(trigger),
                    quote_ident(schema),
                    quote_ident(table),
                    if trigger == TRUNCATE_TRIGGER {
                        "truncates"
                    } else {
                        "row changes"
                    }
                ),
                sql: format!(
                    "DROP TRIGGER IF EXISTS {} ON {}.{}",
                    quote_ident(trigger),
                    quote_ident(schema),
                    quote_ident(table)
                ),
            }),
            _ => None,
        })
        .collect())
}

/// Drops schema `invalidator` with what is in it. hstore, which `setup` installs there when the
/// database lacks it, goes first, unless objects outside it use it (a column of type hstore):
/// then it and the schema stay, and only invalidator's own objects in it go. "Use" is a
/// column, view, function, type, default or constraint that depends on one of its members; the
/// operator classes inside the extension do not count.
async fn schema(db: &mut impl Sql, kept: &mut Vec<String>) -> Result<Vec<Action>, SetupError> {
    if !crate::source::invalidate::has_schema(db).await? {
        return Ok(Vec::new());
    }
    let schema = quote_ident(SCHEMA);
    let hstore = db
        .query(&format!(
            "SELECT (SELECT count(*) FROM pg_depend d WHERE d.deptype = 'n' \
             AND d.classid IN ('pg_class'::regclass, 'pg_rewrite'::regclass, \
             'pg_proc'::regclass, 'pg_type'::regclass, 'pg_attrdef'::regclass, \
             'pg_constraint'::regclass) \
             AND (d.refclassid, d.refobjid) IN (SELECT m.classid, m.objid FROM pg_depend m \
             WHERE m.refclassid = 'pg_extension'::regclass AND m.refobjid = e.oid \
             AND m.deptype = 'e') \
             AND NOT EXISTS (SELECT 1 FROM pg_depend x WHERE x.classid = d.classid \
             AND x.objid = d.objid AND x.deptype = 'e'))::text \
             FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace \
             WHERE e.extname = 'hstore' AND n.nspname = {}",
            quote_literal(SCHEMA)
        ))
        .await?;
    let mut actions = Vec::new();
    match hstore.first().and_then(|r| r.first().cloned().flatten()) {
        Some(users) if users != "0" => {
            kept.push(format!(
                "extension hstore and schema {SCHEMA}: {users} objects outside the extension \
                 use hstore (a column of type hstore?); dropping invalidator's objects only"
            ));
            actions.extend(own_objects(db).await?);
            return Ok(actions);
        }
        Some(_) => actions.push(Action {
            why: format!("drop extension hstore, which setup installed in schema {SCHEMA}"),
            sql: "DROP EXTENSION hstore".to_owned(),
        }),
        None => {}
    }
    actions.push(Action {
        why: format!(
            "drop schema {SCHEMA} and what is in it (the outbox, capture(), invalidate())"
        ),
        sql: format!("DROP SCHEMA {schema} CASCADE"),
    });
    Ok(actions)
}

/// The objects outside schema [`SCHEMA`] that depend on what setup put there (a view over the
/// outbox, a function calling `invalidate_key()`): dropping them with `CASCADE` would take
/// those too. The triggers calling `capture()` are not among them (teardown drops those itself,
/// first), nor are users of hstore (teardown then keeps hstore and the schema).
async fn dependents(db: &mut impl Sql) -> Result<Vec<String>, SetupError> {
    let rows = db
        .query(&format!(
            "WITH n AS (SELECT oid FROM pg_namespace WHERE nspname = {schema}), \
             ours AS (SELECT 'pg_class'::regclass AS classid, c.oid FROM pg_class c, n \
                      WHERE c.relnamespace = n.oid AND c.relname IN ('outbox', 'requests') \
                      UNION ALL SELECT 'pg_proc'::regclass, p.oid FROM pg_proc p, n \
                      WHERE p.pronamespace = n.oid \
                      AND p.proname IN ('capture', 'invalidate', 'invalidate_key')) \
             SELECT DISTINCT pg_describe_object(d.classid, d.objid, d.objsubid) \
             FROM pg_depend d JOIN ours o ON d.refclassid = o.classid AND d.refobjid = o.oid \
             CROSS JOIN LATERAL pg_identify_object(d.classid, d.objid, d.objsubid) i \
             WHERE d.deptype = 'n' AND d.classid <> 'pg_trigger'::regclass \
             AND i.schema IS DISTINCT FROM {schema} ORDER BY 1",
            schema = quote_literal(SCHEMA)
        ))
        .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| row.into_iter().next().flatten())
        .collect())
}

/// What setup puts in schema [`SCHEMA`], as (`TABLE` or `FUNCTION`, the name, what it is).
const OWN_OBJECTS: [(&str, &str, &str); 5] = [
    ("TABLE", "outbox", "the outbox table"),
    ("TABLE", "requests", "the table of manual invalidations"),
    ("FUNCTION", "capture()", "the trigger function"),
    ("FUNCTION", "invalidate(text)", "the function"),
    ("FUNCTION", "invalidate_key(text)", "the function"),
];

/// A `DROP` for each of [`OWN_OBJECTS`] that exists, for a teardown that keeps the schema (a
/// second one then has nothing to do).
async fn own_objects(db: &mut impl Sql) -> Result<Vec<Action>, SetupError> {
    let schema = quote_ident(SCHEMA);
    let mut out = Vec::new();
    for (kind, name, what) in OWN_OBJECTS {
        let object = format!("{schema}.{name}");
        let lookup = if kind == "TABLE" {
            "to_regclass"
        } else {
            "to_regprocedure"
        };
        let exists = setup::flag(
            db,
            &format!("SELECT {lookup}({}) IS NOT NULL", quote_literal(&object)),
        )
        .await?;
        if exists {
            out.push(Action {
                why: format!("drop {what} {SCHEMA}.{name}"),
                sql: format!("DROP {kind} IF EXISTS {object}"),
            });
        }
    }
    Ok(out)
}

/// What teardown found in one Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisFinding {
    /// The library [`REDIS_LIBRARY`] is loaded there.
    Library,
    /// Nothing of invalidator's.
    Nothing,
    /// It could not be reached, so nothing was checked there: a retired cache may already be
    /// gone, which is no reason to keep the database's objects.
    Unreachable(String),
}

/// One Redis, what teardown found there, and the connection to act on it.
#[derive(Debug)]
pub struct RedisTarget {
    /// Its URL, password hidden.
    pub target: String,
    /// What is there.
    pub finding: RedisFinding,
    /// The connection, when it could be reached.
    deleter: Option<Deleter>,
}

impl RedisTarget {
    /// Connects to `url` and asks whether [`REDIS_LIBRARY`] is loaded.
    pub async fn inspect(url: &str, options: &DeleterOptions) -> Result<RedisTarget, DeleteError> {
        let target = crate::redact::redact(url);
        let unreachable = |e: DeleteError| RedisTarget {
            target: target.clone(),
            finding: RedisFinding::Unreachable(crate::telemetry::chain(&e)),
            deleter: None,
        };
        let mut deleter = match Deleter::connect_with(url, options.clone()).await {
            Ok(deleter) => deleter,
            Err(e) if e.is_transient() => return Ok(unreachable(e)),
            Err(e) => return Err(e),
        };
        let finding = match deleter.has_library().await {
            Ok(true) => RedisFinding::Library,
            Ok(false) => RedisFinding::Nothing,
            Err(e) if e.is_transient() => return Ok(unreachable(e)),
            Err(e) => return Err(e),
        };
        Ok(RedisTarget {
            target,
            finding,
            deleter: Some(deleter),
        })
    }

    /// The command that removes what was found, if anything was.
    pub fn command(&self) -> Option<String> {
        (self.finding == RedisFinding::Library).then(|| format!("FUNCTION DELETE {REDIS_LIBRARY}"))
    }

    /// Removes what was found.
    pub async fn remove(&mut self) -> Result<(), DeleteError> {
        match (&self.finding, self.deleter.as_mut()) {
            (RedisFinding::Library, Some(deleter)) => deleter.delete_library().await,
            _ => Ok(()),
        }
    }
}

/// `text` as one line of an SQL comment, control characters escaped: a quoted identifier may
/// hold a line break, which would end the comment and make the rest of the name a statement of
/// the printed script.
fn one_line(text: &str) -> String {
    let mut line = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    line
}

/// What teardown did (or, in a dry run, would do), for printing.
#[derive(Debug)]
pub struct Report {
    /// The database's part.
    pub plan: Plan,
    /// Each Redis, the default first.
    pub redis: Vec<RedisTarget>,
    /// Whether nothing was changed.
    pub dry_run: bool,
}

impl Report {
    /// For people: the SQL and Redis commands (dry run) or what was done, then what was kept;
    /// "nothing to remove" when there was nothing.
    pub fn human(&self) -> String {
        let mut lines = Vec::new();
        let commands: Vec<(&str, String)> = self
            .redis
            .iter()
            .filter_map(|r| r.command().map(|c| (r.target.as_str(), c)))
            .collect();
        if self.plan.actions.is_empty() && commands.is_empty() {
            lines.push("nothing to remove".to_owned());
        }
        for action in &self.plan.actions {
            lines.push(if self.dry_run {
                format!("-- {}\n{};", one_line(&action.why), action.sql)
            } else {
                format!("done: {}", action.why)
            });
        }
        for (target, command) in commands {
            let why = format!("delete the Redis Functions library {REDIS_LIBRARY} from {target}");
            lines.push(if self.dry_run {
                format!("-- redis: {}\n{command}", one_line(&why))
            } else {
                format!("done: {why}")
            });
        }
        for kept in &self.plan.kept {
            lines.push(format!("kept: {kept}"));
        }
        for redis in &self.redis {
            if let RedisFinding::Unreachable(reason) = &redis.finding {
                lines.push(format!("not checked: redis {}: {reason}", redis.target));
            }
        }
        lines.join("\n")
    }
}

/// `invalidator teardown`: refuses while an instance runs, then removes (with `dry_run`, only
/// reports) what [`plan`] finds in the database and the Redis library from every configured
/// Redis.
pub async fn teardown(config: &Config, dry_run: bool) -> Result<Report, TeardownError> {
    let mut db = crate::source::connect::connect(&config.postgres).await?;
    let plan = plan(&mut db, &config.postgres).await?;
    let options = DeleterOptions::from_config(&config.redis)?;
    let mut redis = Vec::new();
    for url in config.redis_urls() {
        redis.push(RedisTarget::inspect(url, &options).await?);
    }
    if !dry_run {
        setup::apply(&mut db, &plan.actions).await?;
        for target in &mut redis {
            target.remove().await?;
        }
    }
    Ok(Report {
        plan,
        redis,
        dry_run,
    })
}
