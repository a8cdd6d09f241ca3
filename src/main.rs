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
    // One thread: source, deleter, Redis connection and HTTP hand work to each other many times
    // per transaction, and on one thread that is a function call, not a wake-up of another
    // thread. Measured on the drain benchmark: a third of the CPU time, a fiftieth of the context
    // switches and half the wall time of the multi-threaded runtime.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli::execute(cli.command, loaded)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}
