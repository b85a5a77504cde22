//! `trimrun`: arguments → logging → the pool or a subcommand → an exit code from the
//! table in `--help` (see `trimrun::cli::EXIT_CODES`).

use std::time::Duration;

use clap::Parser;

use trimrun::cli::{Cli, Command, LogFormat};
use trimrun::{exit, logging};

fn init_logging(verbose: u8, quiet: u8, format: LogFormat) {
    let level = match (verbose as i8) - (quiet as i8) {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let format = match format {
        LogFormat::Json => logging::Format::Json,
        LogFormat::Text => logging::Format::Text,
    };
    logging::init(level, format);
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.run.verbose, cli.run.quiet, cli.run.log_format);
    let code = match &cli.command {
        Some(Command::Trim(a)) => trimrun::commands::trim::run(&a.pids, a.json, a.timeout),
        Some(Command::Status(a)) => a.run(),
        Some(Command::Ctl(a)) => a.run(),
        None => match trimrun::run_pool(&cli.run) {
            Ok(code) => code,
            Err(f) => {
                // Said once: as a JSON event when the log is JSON, else as a plain line.
                match logging::format() {
                    logging::Format::Json => tracing::error!(code = f.code, "{}", f.message),
                    logging::Format::Text => {
                        logging::print_line(&format!("trimrun: {}", f.message))
                    }
                }
                f.code
            }
        },
    };
    logging::flush(Duration::from_secs(2));
    std::process::exit(if code < 0 { exit::FAILURE } else { code });
}
