//! The subcommands (see the README's Commands). Each arm loads what it needs and calls one library function;
//! `main.rs` turns the outcome into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use invalidator::change::Op;
use invalidator::check;
use invalidator::config::{Config, LogFormat};
use invalidator::rules::RuleSet;
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
            let (report, what) = check::run(&config, &rules, offline).await?;
            match format {
                Format::Human => println!("{}", report.human(&rules, what)),
                Format::Json => println!("{}", report.to_json()),
            }
            Ok(success(report.ok()))
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
            let request = explain::command::Request {
                table,
                op,
                old,
                new,
                filter,
                offline,
            };
            print_explained(
                explain::command::run(&config, &rules, request).await,
                format,
            )
        }
        Command::Setup { dry_run, .. } => {
            print!(
                "{}",
                invalidator::setup::setup(&config, &rules, dry_run).await?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Teardown { .. } => unreachable!("teardown runs above, without rules"),
        Command::Status { .. } => {
            let status = invalidator::status::status(&config).await?;
            println!("{status}");
            Ok(success(status.ok()))
        }
    }
}

/// Exit 0 for `ok`, else 1.
fn success(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Prints what `explain` answered: usage problems (bad JSON, a table no rule watches, flags that
/// do not go together) exit 2 like unusable rules; a database that cannot answer exits 1.
fn print_explained(
    answer: Result<explain::command::Answer, explain::command::CommandError>,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let answer = match answer {
        Ok(answer) => answer,
        Err(explain::command::CommandError::Usage(message)) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(2));
        }
        Err(e) => return Err(e.into()),
    };
    if let Some(warning) = answer.warning {
        eprintln!("warning: {warning}");
    }
    match format {
        Format::Human => println!("{}", answer.explanation.human()),
        Format::Json => println!("{}", answer.explanation.to_json()),
    }
    Ok(ExitCode::SUCCESS)
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
