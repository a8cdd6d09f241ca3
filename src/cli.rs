//! The subcommands (see the README's Commands). Each arm loads what it needs and calls one library function;
//! `main.rs` turns the outcome into an exit code.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use invalidator::change::{Op, TableName};
use invalidator::check;
use invalidator::config::{Config, LogFormat, Mode};
use invalidator::explain::OldRow;
use invalidator::rules::RuleSet;
use invalidator::source::{invalidate, notify, setup};
use invalidator::teardown;
use invalidator::{explain, run};
use tokio_util::sync::CancellationToken;

/// Keeps a Redis cache correct by deleting the keys that Postgres changes make stale.
#[derive(Debug, Parser)]
#[command(name = "invalidator", version, about)]
pub struct Cli {
    /// Log format: text, json, or auto (text when stderr is a terminal, else JSON); overrides
    /// `[log] format` and INVALIDATOR_LOG_FORMAT.
    #[arg(long, global = true, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
    /// The subcommand.
    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the sidecar until SIGTERM or SIGINT.
    Run {
        /// Configuration file [default: ./invalidator.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Log every key and pattern each transaction would delete, and delete nothing: no
        /// Redis needed; a temporary slot from the current WAL position (replication mode), or
        /// new outbox rows left in place (notify mode).
        #[arg(long)]
        dry_run: bool,
    },
    /// Load and compile the rules, then check them against the live database.
    Check {
        /// Configuration file [default: ./invalidator.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only the rules-only checks (no-prefix patterns, duplicates, shadowing); do not
        /// connect.
        #[arg(long)]
        offline: bool,
        /// Output: human (default) or json (`{"ok", "errors", "warnings"}`, for CI).
        #[arg(long, value_enum, default_value_t = Format::Human)]
        format: Format,
    },
    /// Print the keys and patterns one change would invalidate.
    Explain {
        /// Configuration file [default: ./invalidator.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// The table, `schema.table` or a bare name in `public`; quote a part as in the rules
        /// (`"my.schema"."Order Items"`).
        #[arg(long)]
        table: String,
        /// insert, update, delete or truncate.
        #[arg(long)]
        op: Op,
        /// The old row as a JSON object (update, delete).
        #[arg(long)]
        old: Option<String>,
        /// The new row as a JSON object (insert, update); with --where, the columns an
        /// update (or insert) sets on the row read.
        #[arg(long)]
        new: Option<String>,
        /// Read the rows from the live database: `SELECT ... FROM <table> WHERE <this>` (in a
        /// READ ONLY transaction); each is the old row of an update or delete, the new row of
        /// an insert. At most 1000 rows, planned together.
        #[arg(long = "where", value_name = "CONDITION")]
        filter: Option<String>,
        /// Do not read the table's REPLICA IDENTITY from the database: take --old as given
        /// (the output says so). Without it, an update or delete of JSON rows in replication
        /// mode asks the database which old values Postgres sends.
        #[arg(long)]
        offline: bool,
        /// Output: json (default; `keys`, `patterns` and each rule's share) or human.
        #[arg(long, value_enum, default_value_t = Format::Json)]
        format: Format,
    },
    /// Create or repair the publication and the replication slot (notify mode: the outbox and
    /// its triggers).
    Setup {
        /// Configuration file [default: ./invalidator.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the SQL instead of running it.
        #[arg(long)]
        dry_run: bool,
    },
    /// Remove what `setup` and `run` created: the slot, the publication (when invalidator
    /// created it), schema invalidator (outbox, functions), the capture triggers and any
    /// invalidator library in Redis; refuses while an instance runs.
    Teardown {
        /// Configuration file [default: ./invalidator.toml].
        #[arg(long)]
        config: Option<PathBuf>,
        /// Print the SQL and Redis commands instead of running them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write a starter invalidator.toml and rules/tables.toml (one commented example rule per
    /// table) for an existing database; never overwrites a file.
    Init {
        /// The database [default: DATABASE_URL]; its password is not written to the file.
        #[arg(long, value_name = "URL")]
        database_url: Option<String>,
        /// The directory to write into.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Show the slot: active or not, confirmed LSN, lag in bytes (notify mode: the outbox backlog).
    Status {
        /// Configuration file [default: ./invalidator.toml].
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

impl Command {
    /// The `--config` of any subcommand.
    pub fn config_path(&self) -> Option<&std::path::Path> {
        match self {
            Command::Run { config, .. }
            | Command::Check { config, .. }
            | Command::Explain { config, .. }
            | Command::Setup { config, .. }
            | Command::Teardown { config, .. }
            | Command::Status { config } => config.as_deref(),
            Command::Init { .. } => None,
        }
    }
}

/// `init`, which runs before there is a configuration: the files it wrote, or why it wrote
/// nothing (exit 1; 2 without a database URL).
pub async fn init(database_url: Option<String>, dir: &std::path::Path) -> ExitCode {
    let Some(url) = database_url.or_else(|| std::env::var("DATABASE_URL").ok()) else {
        eprintln!("error: init needs the database: --database-url URL or DATABASE_URL");
        return ExitCode::from(2);
    };
    // Defaults for everything else; only the URL comes from the command line.
    let mut config = match Config::load(Some(std::path::Path::new("/dev/null"))) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    config.postgres.url = url;
    match invalidator::init::init(dir, &config.postgres).await {
        Ok(files) => {
            for file in files {
                println!("wrote {}", file.display());
            }
            println!(
                "next: edit rules/tables.toml, then `invalidator check`, `invalidator setup`, \
                 `invalidator run` (with DATABASE_URL holding the password, if there is one)"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "error: {}",
                invalidator::telemetry::chain(&e as &dyn std::error::Error)
            );
            ExitCode::FAILURE
        }
    }
}

/// How `check` and `explain` print their results.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// For people.
    Human,
    /// A stable JSON document.
    Json,
}

/// Configuration and rules, loaded before anything connects: failures here exit 2.
pub struct Loaded {
    /// The validated configuration.
    pub config: Config,
    /// The compiled rules; `None` for `teardown`, the one command that needs none.
    pub rules: Option<Arc<RuleSet>>,
}

/// Loads the configuration and compiles the rules.
pub fn load(command: &Command) -> anyhow::Result<Loaded> {
    // `check --format json` prints its JSON document for rules that do not load, too.
    let json = matches!(
        command,
        Command::Check {
            format: Format::Json,
            ..
        }
    );
    let config = Config::load(command.config_path()).inspect_err(|e| {
        if json {
            println!(
                "{}",
                check::Report::unusable_config(&e.to_string()).to_json()
            );
        }
    })?;
    // `teardown` finds what to remove in the catalog, not in the rules, which may be gone.
    if matches!(command, Command::Teardown { .. }) {
        return Ok(Loaded {
            config,
            rules: None,
        });
    }
    let rules = RuleSet::load(&config.rules_path)
        .inspect_err(|e| {
            if json {
                println!("{}", check::Report::unusable(e).to_json());
            }
        })
        .map_err(|e| match &config.file {
            Some(_) => anyhow::anyhow!("{e}"),
            // The usual first mistake: a command run where there is no configuration.
            None => anyhow::anyhow!(
                "{e}\n(no configuration file: ./{} does not exist, so defaults and the environment \
                 are used; pass --config, or write one with `invalidator init`)",
                invalidator::config::DEFAULT_PATH
            ),
        })?;
    Ok(Loaded {
        config,
        rules: Some(Arc::new(rules)),
    })
}

/// Runs a subcommand whose configuration and rules loaded.
pub async fn execute(command: Command, loaded: Loaded) -> anyhow::Result<ExitCode> {
    let Loaded { config, rules } = loaded;
    if let Command::Teardown { dry_run, .. } = command {
        let report = teardown::teardown(&config, dry_run).await?;
        println!("{}", report.human());
        return Ok(ExitCode::SUCCESS);
    }
    let Some(rules) = rules else {
        anyhow::bail!("the rules were not loaded");
    };
    match command {
        Command::Init { .. } => unreachable!("init runs before any configuration is loaded"),
        Command::Run { dry_run, .. } => {
            let cancel = CancellationToken::new();
            tokio::spawn(cancel_on_signal(cancel.clone()));
            run::run(config, rules, dry_run, cancel).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check {
            offline, format, ..
        } => {
            let (report, what) = if offline {
                (check::offline(&rules), "checked offline")
            } else {
                let mut db = connect(&config).await?;
                let report = check::check(&mut db, &rules, &config.postgres).await?;
                (report, "checked against the database")
            };
            match format {
                Format::Human => println!("{}", report.human(&rules, what)),
                Format::Json => println!("{}", report.to_json()),
            }
            Ok(if report.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Explain {
            table,
            op,
            old,
            new,
            filter,
            offline,
            format,
            ..
        } => {
            let rows = Rows {
                old,
                new,
                filter,
                offline,
            };
            explain_command(&config, &rules, &table, op, rows, format).await
        }
        Command::Setup { dry_run, .. } => {
            let mut db = connect(&config).await?;
            setup::refuse_untrusted_schemas(&mut db, config.postgres.mode == Mode::Notify).await?;
            // Setting up for rules that `run` refuses would only defer the error.
            let unknown = check::unknown_names(&mut db, &rules).await?;
            if !unknown.is_empty() {
                return Err(check::UnknownNames(unknown).into());
            }
            let mut tables: BTreeSet<TableName> = rules.tables().cloned().collect();
            if invalidate::has_requests(&mut db).await? {
                tables.insert(invalidate::requests_table());
            }
            let (actions, in_place) = match config.postgres.mode {
                Mode::Replication => {
                    let hidden =
                        setup::hidden(&mut db, &rules, &config.postgres.publication).await?;
                    let mut actions: Vec<setup::Action> = hidden
                        .into_iter()
                        .map(|h| setup::Action {
                            why: format!("repair: {}", h.problem),
                            sql: h.fix.trim_end_matches(';').to_owned(),
                        })
                        .collect();
                    actions.extend(
                        setup::plan(
                            &mut db,
                            &tables,
                            &config.postgres.publication,
                            &config.postgres.slot,
                            setup::SlotLoss::Refuse,
                            None,
                        )
                        .await?
                        .actions,
                    );
                    // Only here, not in `run`: its role may lack CREATE on the database.
                    actions.extend(
                        invalidate::plan(
                            &mut db,
                            Mode::Replication,
                            false,
                            &rules,
                            &config.invalidate,
                            Some(&config.postgres.publication),
                        )
                        .await?,
                    );
                    (
                        actions,
                        "publication, slot and invalidator.invalidate() are in place; nothing to do",
                    )
                }
                Mode::Notify => (
                    {
                        let mut actions = setup::notify::plan(&mut db, &rules).await?;
                        actions.extend(
                            invalidate::plan(
                                &mut db,
                                Mode::Notify,
                                true,
                                &rules,
                                &config.invalidate,
                                None,
                            )
                            .await?,
                        );
                        actions
                    },
                    "outbox, triggers and invalidator.invalidate() are in place; nothing to do",
                ),
            };
            if actions.is_empty() {
                println!("{in_place}");
            } else if dry_run {
                for action in &actions {
                    println!("-- {}\n{};", action.why, action.sql);
                }
            } else {
                setup::apply(&mut db, &actions).await?;
                for action in &actions {
                    println!("done: {}", action.why);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown { .. } => unreachable!("teardown runs above, without rules"),
        Command::Status { .. } if config.postgres.mode == Mode::Notify => {
            let db = connect(&config).await?;
            let (waiting, oldest) = notify::depth(&db)
                .await
                .context("reading invalidator.outbox (run `invalidator setup`)")?;
            let age = oldest.map_or_else(|| "none".to_owned(), |s| format!("{s:.1} s"));
            println!("outbox: {waiting} rows waiting, oldest {age}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Status { .. } => {
            let mut db = connect(&config).await?;
            let slot = &config.postgres.slot;
            let Some(info) = setup::slot_info(&mut db, slot).await? else {
                println!("slot {slot}: does not exist (run `invalidator setup`)");
                return Ok(ExitCode::FAILURE);
            };
            let state = match &info.active_pid {
                Some(pid) if info.active => format!("active (pid {pid})"),
                _ => "inactive".to_owned(),
            };
            let confirmed = info
                .confirmed_flush
                .map_or_else(|| "none".to_owned(), |l| l.to_string());
            let lag = info
                .lag_bytes
                .map_or_else(|| "unknown".to_owned(), |b| b.to_string());
            let wal_status = info.wal_status.unwrap_or_else(|| "unknown".to_owned());
            let failover = match info.failover {
                Some(true) => ", failover on",
                Some(false) => ", failover off",
                None => "",
            };
            println!(
                "slot {slot}: {state}, confirmed {confirmed}, lag {lag} bytes, wal_status \
                 {wal_status}{failover}"
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `explain`: usage problems (bad JSON, a table no rule watches, flags that do not go
/// together) exit 2 like unusable rules; a database that cannot answer exits 1.
async fn explain_command(
    config: &Config,
    rules: &RuleSet,
    table: &str,
    op: Op,
    rows: Rows,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let Rows {
        old,
        new,
        filter,
        offline,
    } = rows;
    let usage = |message: String| {
        eprintln!("error: {message}");
        Ok(ExitCode::from(2))
    };
    let name = match TableName::parse(table) {
        Ok(name) => name,
        Err(e) => return usage(format!("--table {table:?}: {e}")),
    };
    if !rules.has_table(&name) {
        let watched: Vec<String> = rules.tables().map(ToString::to_string).collect();
        return usage(format!(
            "no rule watches table {name} (tables with rules: {})",
            watched.join(", ")
        ));
    }
    let explained = match filter {
        // Neither has an old row, so what the server sends of one does not matter.
        None if matches!(op, Op::Insert | Op::Truncate) => {
            match explain::change(
                &name,
                op,
                None,
                new.as_deref(),
                &OldRow::Whole { notify: false },
            ) {
                Ok(change) => explain::explain_changes(rules, &name, op, &[change]),
                Err(e) => return usage(e.to_string()),
            }
        }
        None => {
            let sent = old_row_sent(config, &name, offline).await;
            match explain::change(&name, op, old.as_deref(), new.as_deref(), &sent) {
                Ok(change) => {
                    let mut explained = explain::explain_changes(rules, &name, op, &[change]);
                    explained.old_row = Some(sent.describe(&name));
                    explained
                }
                Err(e) => return usage(e.to_string()),
            }
        }
        Some(_) if op == Op::Truncate => {
            return usage("--where has no meaning for a truncate".to_owned());
        }
        Some(_) if offline => {
            return usage(
                "--offline and --where do not go together: --where reads the database".to_owned(),
            );
        }
        Some(_) if old.is_some() => {
            return usage(
                "--old and --where do not go together: the row read is the old row".to_owned(),
            );
        }
        Some(_) if new.is_some() && op == Op::Delete => {
            return usage("--new has no meaning for a delete".to_owned());
        }
        Some(filter) => {
            let overlay = match new.as_deref().map(|t| explain::row_from_json("new", t)) {
                Some(Err(e)) => return usage(e.to_string()),
                Some(Ok(row)) => Some(row),
                None => None,
            };
            let mut db = connect(config).await?;
            let fetched =
                explain::rows_from_database(&mut db, &name, &filter, config.postgres.mode).await?;
            let changes = explain::changes_from_rows(&name, op, &fetched, overlay.as_ref());
            let mut explained = explain::explain_changes(rules, &name, op, &changes);
            if op != Op::Insert {
                explained.old_row = Some(fetched.old_row.describe(&name));
            }
            explained
        }
    };
    match format {
        Format::Human => println!("{}", explained.human()),
        Format::Json => println!("{}", explained.to_json()),
    }
    Ok(ExitCode::SUCCESS)
}

/// Where `explain` takes its rows from, as the flags give it.
struct Rows {
    /// `--old`.
    old: Option<String>,
    /// `--new`.
    new: Option<String>,
    /// `--where`.
    filter: Option<String>,
    /// `--offline`.
    offline: bool,
}

/// What the server sends of `table`'s old rows, for `explain` of JSON rows: notify mode's
/// triggers send them whole; in replication mode the table's REPLICA IDENTITY decides, read
/// from the database unless `offline`. A database that cannot answer makes it an assumption,
/// which the output states, rather than an error: the rules can still be explained.
async fn old_row_sent(config: &Config, table: &TableName, offline: bool) -> OldRow {
    if config.postgres.mode == Mode::Notify {
        return OldRow::Whole { notify: true };
    }
    if offline {
        return OldRow::Assumed("--offline".to_owned());
    }
    let mut db = match connect(config).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("warning: explaining without the database: {e}");
            return OldRow::Assumed(format!("the database could not be reached: {e}"));
        }
    };
    match setup::table_info(&mut db, table).await {
        Ok(Some(info)) => OldRow::of(config.postgres.mode, &info),
        Ok(None) => OldRow::Assumed(format!("{table} does not exist in the database")),
        Err(e) => OldRow::Assumed(format!("its catalog could not be read: {e}")),
    }
}

/// An ordinary (non-replication) connection for setup, check and status.
async fn connect(config: &Config) -> anyhow::Result<tokio_postgres::Client> {
    Ok(invalidator::source::connect::connect(&config.postgres).await?)
}

/// Fires `cancel` on the first SIGTERM or SIGINT.
async fn cancel_on_signal(cancel: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: finishing the batch in flight"),
        _ = int.recv() => tracing::info!("SIGINT: finishing the batch in flight"),
    }
    cancel.cancel();
}
