//! The `invalidator` binary: parse the command line, set up logging and the runtime, and map
//! outcomes to exit codes (0 success, 1 runtime failure, 2 configuration or rules unusable).

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use invalidator::config::LogFormat;
use invalidator::telemetry::chain;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    // `init` writes the configuration the other commands load, so it runs without one.
    if let cli::Command::Init { database_url, dir } = cli.command {
        return match runtime() {
            Some(runtime) => runtime.block_on(cli::init(database_url, &dir)),
            None => ExitCode::FAILURE,
        };
    }
    let loaded = match cli::load(&cli.command) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("error: {}", chain(e.as_ref()));
            return ExitCode::from(2);
        }
    };
    // RUST_LOG, when set and valid, overrides `[log] level`.
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(&loaded.config.log.level));
    let terminal = std::io::stderr().is_terminal();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(std::io::stderr);
    // The flag beats the configuration (file and environment), whose default is `auto`.
    match cli.log_format.unwrap_or(loaded.config.log.format) {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
        LogFormat::Auto if terminal => logs.init(),
        LogFormat::Auto => logs.json().init(),
    }
    let Some(runtime) = runtime() else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(cli::execute(cli.command, loaded)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// The single-threaded runtime every command runs on; `None` (said on stderr) if it cannot start.
///
/// One thread: source, deleter, Redis connection and HTTP hand work to each other many times per
/// transaction, and on one thread that is a function call, not a wake-up of another thread.
/// Measured on the drain benchmark: a third of the CPU time, a fiftieth of the context switches
/// and half the wall time of the multi-threaded runtime.
fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .inspect_err(|e| eprintln!("error: cannot start the runtime: {e}"))
        .ok()
}
