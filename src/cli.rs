//! Command-line definitions. Raw values only: [`crate::config`] validates them.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::size::{parse_duration, parse_fraction};

pub const EXIT_CODES: &str = "\
Exit codes:
  0    the pool shut down as asked (TERM, INT, QUIT, `trimrun ctl stop`); a subcommand succeeded
  1    a runtime failure: the pool could not keep running, or a subcommand failed (e.g. a trim)
  2    bad input or an environment that cannot do what was asked: unknown flag, malformed
       size or address, no command, command not found, port in use, --cgroup v2 without v2
  130  a second INT/TERM cut a graceful shutdown short (workers were killed)

Signals:
  TERM, INT  graceful shutdown: stop signal to every worker, SIGKILL after --graceful-timeout
             (a second TERM/INT kills at once)
  QUIT       fast shutdown: SIGKILL every worker now
  HUP        rolling restart, one worker at a time, the replacement ready before the old stops
  TTIN/TTOU  one worker more / less (never fewer than 1)
  USR1       forwarded to every worker (e.g. to reopen log files)";

#[derive(Debug, Parser)]
#[command(
    name = "trimrun",
    version,
    about = "Run N workers on shared sockets, each in its own memory cgroup, trimmed from the outside and recycled one at a time.",
    long_about = None,
    after_help = EXIT_CODES,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    override_usage = "trimrun [OPTIONS] -- CMD [ARGS]...\n       trimrun trim [--json] PID...\n       trimrun status [--json] [--watch]\n       trimrun ctl COMMAND"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Trim running processes now: make each call malloc_trim(0) through ptrace (the safe
    /// replacement for `gdb -p PID -ex 'call malloc_trim(0)'`)
    Trim(TrimArgs),
    /// Show the running pool: one row per worker (memory against its limit, trims,
    /// recycles) and a pool line
    Status(crate::commands::status::StatusArgs),
    /// Act on the running pool: reload, scale, recycle a slot, trim, stop
    Ctl(crate::commands::status::CtlArgs),
}

#[derive(Debug, Args)]
pub struct TrimArgs {
    /// Processes to trim
    #[arg(required = true, value_name = "PID")]
    pub pids: Vec<i32>,
    /// One JSON object per process instead of text
    #[arg(long)]
    pub json: bool,
    /// Abandon a malloc_trim call that has not returned after this long
    #[arg(long, default_value = "2s", value_parser = parse_trim_timeout)]
    pub timeout: Duration,
}

/// `trimrun trim --timeout`: a thread stays stopped for at most this long, so it is bounded.
fn parse_trim_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() || d > Duration::from_secs(60) {
        return Err(format!(
            "invalid timeout '{s}': between 1ms and 60s (a malloc_trim still running after that is stuck)"
        ));
    }
    Ok(d)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Where the workers' stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerOutput {
    /// `json` with `--log-format json`, else `inherit`
    Auto,
    /// Each line a JSON event in trimrun's log, with the worker's slot, pid and stream
    Json,
    /// Workers write to trimrun's own stdout and stderr, untouched
    Inherit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The worker command, run as argv (never through a shell)
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,

    /// Number of workers [default: number of CPUs]
    #[arg(short = 'n', long, env = "TRIMRUN_WORKERS", help_heading = "Pool")]
    pub workers: Option<String>,

    /// Listen on HOST:PORT, [::]:PORT, :PORT, unix:PATH or fd://N (repeatable; comma-separated in the env var)
    #[arg(
        long,
        env = "TRIMRUN_BIND",
        value_delimiter = ',',
        help_heading = "Sockets"
    )]
    pub bind: Vec<String>,
    /// Permissions of unix socket files, in octal
    #[arg(
        long,
        env = "TRIMRUN_BIND_MODE",
        value_name = "MODE",
        help_heading = "Sockets"
    )]
    pub bind_mode: Option<String>,

    /// Run the workers as this user (name or number); trimrun itself keeps root for cgroups and trimming (with --preload the zygote too: it imports the app as root)
    #[arg(long, env = "TRIMRUN_USER", help_heading = "Lifecycle")]
    pub user: Option<String>,
    /// Run the workers with this group (name or number) [default: the --user's primary group]; supplementary groups are reset
    #[arg(long, env = "TRIMRUN_GROUP", help_heading = "Lifecycle")]
    pub group: Option<String>,

    /// How long a stopping worker may take before SIGKILL
    #[arg(long, env = "TRIMRUN_GRACEFUL_TIMEOUT", default_value = "30s", value_parser = parse_duration, help_heading = "Lifecycle")]
    pub graceful_timeout: Duration,
    /// Signal that asks a worker to stop gracefully
    #[arg(
        long,
        env = "TRIMRUN_STOP_SIGNAL",
        default_value = "TERM",
        help_heading = "Lifecycle"
    )]
    pub stop_signal: String,
    /// When a new worker counts as ready: `notify` (sd_notify READY=1 on its own NOTIFY_SOCKET), `delay:DURATION`, or `auto`: notify for `python -m trimrun_worker` and --preload, else delay:1s
    #[arg(
        long,
        env = "TRIMRUN_READY",
        default_value = "auto",
        help_heading = "Lifecycle"
    )]
    pub ready: String,
    /// A starting worker not ready after this long is stopped and retried with backoff
    #[arg(long, env = "TRIMRUN_READY_TIMEOUT", default_value = "60s", value_parser = parse_duration, help_heading = "Lifecycle")]
    pub ready_timeout: Duration,
    /// Run the command once as a zygote that imports the app, and fork every worker from it
    /// (pages shared copy-on-write; the command must speak the protocol of docs/preload.md,
    /// as `python -m trimrun_worker` does)
    #[arg(long, env = "TRIMRUN_PRELOAD", help_heading = "Lifecycle")]
    pub preload: bool,

    /// Watchdog: each worker must send sd_notify `WATCHDOG=1` at least this often
    /// (it gets `WATCHDOG_USEC` and `WATCHDOG_PID` as under systemd's WatchdogSec=); a ready
    /// worker that misses it is sent --timeout-signal, SIGKILLed after a short grace and
    /// replaced [default: off]
    #[arg(
        long,
        env = "TRIMRUN_TIMEOUT",
        value_name = "DURATION",
        help_heading = "Watchdog"
    )]
    pub timeout: Option<String>,
    /// Signal sent first to a worker that missed its watchdog (ABRT: Python's faulthandler
    /// dumps every thread's stack to stderr)
    #[arg(
        long,
        env = "TRIMRUN_TIMEOUT_SIGNAL",
        default_value = "ABRT",
        help_heading = "Watchdog"
    )]
    pub timeout_signal: String,

    /// Memory limit per worker: a size (512M, 1.5G) or `auto` (trimrun's own allowance divided among the workers)
    #[arg(long, env = "TRIMRUN_LIMIT", help_heading = "Memory")]
    pub limit: Option<String>,
    /// Memory budget of the whole pool: a size (1G) or `auto` (trimrun's own allowance less
    /// a reserve). The pool's cgroup is the hard cap; each worker's own limit becomes a
    /// ceiling above its fair share (--limit, or twice budget/workers), so one worker's
    /// burst can use room the others leave [default: none]
    #[arg(
        long,
        env = "TRIMRUN_POOL_LIMIT",
        value_name = "SIZE|auto",
        help_heading = "Memory"
    )]
    pub pool_limit: Option<String>,
    /// Cgroup backend: auto, v2, v1 or none
    #[arg(
        long,
        env = "TRIMRUN_CGROUP",
        default_value = "auto",
        help_heading = "Memory"
    )]
    pub cgroup: String,

    /// Trim workers from the outside (ptrace malloc_trim)
    #[arg(
        long,
        env = "TRIMRUN_TRIM",
        value_enum,
        default_value = "on",
        help_heading = "Trimming"
    )]
    pub trim: OnOff,
    /// Trim a worker whose working set crosses this share of its limit
    #[arg(long, env = "TRIMRUN_TRIM_AT", default_value = "75%", value_parser = parse_fraction, help_heading = "Trimming")]
    pub trim_at: f64,
    /// Least time between two trims of one worker
    #[arg(long, env = "TRIMRUN_TRIM_INTERVAL", default_value = "10s", value_parser = parse_duration, help_heading = "Trimming")]
    pub trim_interval: Duration,

    /// Recycle a worker whose working set stays above this share of its limit after trimming
    #[arg(long, env = "TRIMRUN_RECYCLE_AT", default_value = "90%", value_parser = parse_fraction, help_heading = "Recycling")]
    pub recycle_at: f64,
    /// Each worker draws its own threshold within ± this many points
    #[arg(long, env = "TRIMRUN_RECYCLE_JITTER", default_value = "5%", value_parser = parse_fraction, help_heading = "Recycling")]
    pub recycle_jitter: f64,
    /// Spread the first workers' recycles over one life (`on`: each of the workers started
    /// together draws where in a life its first recycle falls, so they never recycle in a
    /// wave; the cost is one early recycle per slot, once). `off`: every worker recycles at
    /// its own threshold from the start
    #[arg(
        long,
        env = "TRIMRUN_SPREAD_FIRST",
        value_enum,
        default_value = "on",
        help_heading = "Recycling"
    )]
    pub spread_first: OnOff,
    /// Recycle a worker after this long, whatever its memory
    #[arg(long, env = "TRIMRUN_MAX_LIFETIME", value_parser = parse_duration, help_heading = "Recycling")]
    pub max_lifetime: Option<Duration>,
    /// Each worker draws its own lifetime within ± this
    #[arg(long, env = "TRIMRUN_LIFETIME_JITTER", value_parser = parse_duration, help_heading = "Recycling")]
    pub lifetime_jitter: Option<Duration>,
    /// At most this many workers being replaced at once
    #[arg(
        long,
        env = "TRIMRUN_MAX_RECYCLING",
        default_value_t = 1,
        help_heading = "Recycling"
    )]
    pub max_recycling: usize,
    /// Least time between the starts of two recycles, shortened only when workers would
    /// otherwise reach their limits first [default: derived from the ready time]
    #[arg(long, env = "TRIMRUN_RECYCLE_SPACING", value_parser = parse_duration, help_heading = "Recycling")]
    pub recycle_spacing: Option<Duration>,

    /// Control socket for `trimrun status` and `trimrun ctl`
    #[arg(long, env = "TRIMRUN_CONTROL", help_heading = "Observability")]
    pub control: Option<PathBuf>,
    /// Serve Prometheus metrics on ADDR (a bare port means 127.0.0.1:PORT)
    #[arg(long, env = "TRIMRUN_METRICS", help_heading = "Observability")]
    pub metrics: Option<String>,
    /// More logging (-v debug, -vv trace)
    #[arg(short, long, action = clap::ArgAction::Count, help_heading = "Observability")]
    pub verbose: u8,
    /// Less logging (-q warnings only, -qq errors only)
    #[arg(short, long, action = clap::ArgAction::Count, help_heading = "Observability")]
    pub quiet: u8,
    /// Log format
    #[arg(
        long,
        env = "TRIMRUN_LOG_FORMAT",
        value_enum,
        default_value = "text",
        help_heading = "Observability"
    )]
    pub log_format: LogFormat,
    /// Workers' stdout/stderr: each line wrapped as a JSON event of trimrun's log (slot,
    /// pid, stream), or passed through untouched; `auto` wraps in JSON mode (not with
    /// --preload: the zygote's workers share its output)
    #[arg(
        long,
        env = "TRIMRUN_WORKER_OUTPUT",
        value_enum,
        default_value = "auto",
        help_heading = "Observability"
    )]
    pub worker_output: WorkerOutput,
}
