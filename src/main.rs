//! `trimrun`: arguments → logging → the pool or a subcommand → an exit code from the
//! table in `--help` (see `trimrun::cli::EXIT_CODES`).

use clap::Parser;
use tracing_subscriber::EnvFilter;

use trimrun::cli::{Cli, Command, LogFormat};
use trimrun::exit;

fn init_logging(verbose: u8, quiet: u8, format: LogFormat) {
    let level = match (verbose as i8) - (quiet as i8) {
        i8::MIN..=-2 => "error",
        -1 => "warn",
        0 => "info",
        1 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("TRIMRUN_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
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
                eprintln!("trimrun: {}", f.message);
                f.code
            }
        },
    };
    std::process::exit(if code < 0 { exit::FAILURE } else { code });
}
