//! `trimrun status` and `trimrun ctl`: their arguments, output and exit codes, over the
//! blocking [`Client`].
//!
//! Exit codes of both commands: 0 done, 1 trimrun is not reachable or refused the request,
//! 2 bad arguments (clap's own usage errors).

use std::io::{ErrorKind, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::status::{
    Client, ROOT_CONTROL_PATH, Request, ScaleTo, Snapshot, StatusError, default_control_path,
    render_for, render_table, sanitize,
};

/// How long `ctl` waits for an answer (the supervisor answers when it has acted).
const CTL_TIMEOUT: Duration = Duration::from_secs(30);
/// `--watch` period.
const WATCH_PERIOD: Duration = Duration::from_secs(1);

/// Show the workers of a running trimrun: pids, memory against limits, trims, recycles.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    /// Control socket of the trimrun to ask [default: /run/trimrun/trimrun.sock for root,
    /// else $XDG_RUNTIME_DIR/trimrun.sock, else $TMPDIR/trimrun-UID/trimrun.sock]
    #[arg(long, env = "TRIMRUN_CONTROL", value_name = "PATH")]
    pub control: Option<PathBuf>,
    /// Print the pool as JSON, one object per line
    #[arg(long)]
    pub json: bool,
    /// Redraw every second until interrupted
    #[arg(long, short = 'w')]
    pub watch: bool,
    /// Every column (peak, generation, bytes released, last pause...); the default is the
    /// 80-column table, or the wide one when the terminal is wide enough for it
    #[arg(long)]
    pub wide: bool,
}

impl StatusArgs {
    /// Run `trimrun status`; returns the exit code.
    pub fn run(&self) -> i32 {
        run_status_cli_with(self.control.clone(), self.json, self.watch, self.wide)
    }
}

/// Steer a running trimrun: reload, scale, recycle or trim workers, stop.
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// Control socket of the trimrun to steer [default: as for `trimrun status`]
    #[arg(long, env = "TRIMRUN_CONTROL", value_name = "PATH", global = true)]
    pub control: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

impl CtlArgs {
    /// Run `trimrun ctl ...`; returns the exit code.
    pub fn run(&self) -> i32 {
        run_ctl_cli(self.control.clone(), &self.command)
    }
}

/// The commands of `trimrun ctl`.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CtlCommand {
    /// Replace every worker, one at a time, replacement first (as SIGHUP does)
    Reload,
    /// Change the number of workers: +N adds, -N removes, N sets
    Scale {
        /// +N adds N workers, -N removes N, N sets the count (at least 1)
        #[arg(value_name = "+N|-N|N", allow_hyphen_values = true)]
        to: ScaleTo,
    },
    /// Replace one worker: start its successor, then drain and stop it
    Recycle {
        /// Slot of the worker, as `trimrun status` shows it
        #[arg(value_name = "SLOT")]
        slot: usize,
    },
    /// Trim one worker now (malloc_trim from outside), or every worker
    Trim {
        /// Slot of the worker, or `all`
        #[arg(value_name = "SLOT|all")]
        target: TrimTarget,
    },
    /// Stop trimrun and its workers gracefully, as SIGTERM does: each worker gets the stop
    /// signal and up to --graceful-timeout to finish its requests
    Stop {
        /// Kill every worker now, as SIGQUIT does (requests in flight are lost)
        #[arg(long)]
        now: bool,
        /// The default; accepted for scripts written for older versions
        #[arg(long, hide = true, conflicts_with = "now")]
        graceful: bool,
    },
}

impl CtlCommand {
    /// The request this command sends.
    pub fn request(&self) -> Request {
        match *self {
            CtlCommand::Reload => Request::Reload,
            CtlCommand::Scale { to } => Request::Scale { to },
            CtlCommand::Recycle { slot } => Request::Recycle { slot },
            CtlCommand::Trim { target } => Request::Trim {
                slot: match target {
                    TrimTarget::Slot(s) => Some(s),
                    TrimTarget::All => None,
                },
            },
            CtlCommand::Stop { now, .. } => Request::Stop { now },
        }
    }
}

/// The argument of `ctl trim`: a slot number or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrimTarget {
    Slot(usize),
    All,
}

impl FromStr for TrimTarget {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("all") {
            return Ok(TrimTarget::All);
        }
        s.parse()
            .map(TrimTarget::Slot)
            .map_err(|_| format!("invalid worker {s:?}: expected a slot number (e.g. 0) or `all`"))
    }
}

/// One `trimrun status` output: the table, or the snapshot as one JSON line.
pub fn status_output(path: &Path, json: bool) -> Result<String, StatusError> {
    let snap = Client::connect(path)?.status()?;
    Ok(format_snapshot(&snap, json))
}

/// Columns of the terminal on stdout, if it is one.
fn terminal_columns() -> Option<usize> {
    let out = std::io::stdout();
    if !out.is_terminal() {
        return None;
    }
    terminal_size::terminal_size_of(&out).map(|(w, _)| usize::from(w.0))
}

fn format_snapshot(s: &Snapshot, json: bool) -> String {
    if json {
        let mut line = serde_json::to_string(s).expect("a snapshot always serialises");
        line.push('\n');
        line
    } else {
        render_table(s)
    }
}

/// `trimrun status [--control PATH] [--json] [--watch]`; returns the exit code.
///
/// `--watch` asks once a second over one connection until interrupted or until trimrun
/// goes away (exit 1). On a terminal the screen is cleared before each table; otherwise
/// the tables (or JSON lines) follow each other.
pub fn run_status_cli(path: Option<PathBuf>, json: bool, watch: bool) -> i32 {
    run_status_cli_with(path, json, watch, false)
}

/// [`run_status_cli`] with the choice of the wide table (`--wide`): without it, the table
/// fits 80 columns unless the terminal is wide enough for every column.
pub fn run_status_cli_with(path: Option<PathBuf>, json: bool, watch: bool, wide: bool) -> i32 {
    let defaulted = path.is_none();
    let path = path.unwrap_or_else(default_control_path);
    let mut client = match Client::connect(&path) {
        Ok(c) => c,
        Err(e) => return fail_connect(&e, defaulted),
    };
    let stdout = std::io::stdout();
    let clear = watch && !json && stdout.is_terminal();
    loop {
        let snap = match client.status() {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        let mut text = String::new();
        if clear {
            text.push_str("\x1b[H\x1b[2J");
        }
        if watch && !json {
            text.push_str(&format!(
                "every {}s: trimrun status {}  {}\n\n",
                WATCH_PERIOD.as_secs(),
                path.display(),
                utc_clock(SystemTime::now())
            ));
        }
        if json {
            text.push_str(&format_snapshot(&snap, true));
        } else {
            text.push_str(&render_for(&snap, wide, terminal_columns()));
        }
        if watch && !json && !clear {
            text.push('\n');
        }
        let mut out = stdout.lock();
        match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
            Ok(()) => {}
            // `trimrun status --watch | head`: the reader is done, so are we.
            Err(e) if e.kind() == ErrorKind::BrokenPipe => return 0,
            Err(e) => {
                eprintln!("trimrun: cannot write to stdout: {e}");
                return 1;
            }
        }
        drop(out);
        if !watch {
            return 0;
        }
        std::thread::sleep(WATCH_PERIOD);
    }
}

/// `trimrun ctl [--control PATH] COMMAND`; returns the exit code. Prints the supervisor's
/// answer: its text, `ok` when it has nothing to say, or its data as JSON.
pub fn run_ctl_cli(path: Option<PathBuf>, cmd: &CtlCommand) -> i32 {
    let defaulted = path.is_none();
    let path = path.unwrap_or_else(default_control_path);
    let mut client = match Client::connect(&path) {
        Ok(c) => c,
        Err(e) => return fail_connect(&e, defaulted),
    };
    let result = client
        .set_timeout(CTL_TIMEOUT)
        .and_then(|()| client.request(&cmd.request()));
    match result {
        Ok(data) => {
            let text = match data {
                serde_json::Value::Null => "ok".to_string(),
                serde_json::Value::String(s) => sanitize(&s),
                other => serde_json::to_string_pretty(&other).expect("json value serialises"),
            };
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{text}");
            0
        }
        Err(e) => fail(&e),
    }
}

fn fail(e: &StatusError) -> i32 {
    // Remote errors and protocol details carry text from the socket.
    eprintln!("trimrun: {}", sanitize(&e.to_string()));
    1
}

/// As [`fail`], plus a hint for the usual surprise: a pool started with sudo listens on
/// root's default path, which a normal user's default does not point at.
fn fail_connect(e: &StatusError, defaulted: bool) -> i32 {
    let code = fail(e);
    let root_default = Path::new(ROOT_CONTROL_PATH);
    if defaulted
        && matches!(e, StatusError::NotListening { .. })
        && !nix::unistd::geteuid().is_root()
        && root_default.exists()
    {
        eprintln!(
            "trimrun: hint: a trimrun started by root listens on {}: run this as root (sudo), or pass --control",
            root_default.display()
        );
    }
    code
}

/// `HH:MM:SS UTC` of `t`, for the `--watch` header.
fn utc_clock(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()) % 86400;
    format!(
        "{:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Ctl {
        #[command(flatten)]
        args: CtlArgs,
    }

    #[derive(Debug, Parser)]
    struct Status {
        #[command(flatten)]
        args: StatusArgs,
    }

    fn ctl(args: &[&str]) -> Result<CtlArgs, clap::Error> {
        Ctl::try_parse_from(std::iter::once("ctl").chain(args.iter().copied())).map(|c| c.args)
    }

    #[test]
    fn ctl_commands_parse_into_requests() {
        let cases: [(&[&str], Request); 10] = [
            (&["reload"], Request::Reload),
            (&["scale", "+1"], Request::Scale { to: ScaleTo::Up(1) }),
            (
                &["scale", "-1"],
                Request::Scale {
                    to: ScaleTo::Down(1),
                },
            ),
            (
                &["scale", "3"],
                Request::Scale {
                    to: ScaleTo::Exactly(3),
                },
            ),
            (&["recycle", "2"], Request::Recycle { slot: 2 }),
            (&["trim", "0"], Request::Trim { slot: Some(0) }),
            (&["trim", "all"], Request::Trim { slot: None }),
            (&["stop"], Request::Stop { now: false }),
            (&["stop", "--graceful"], Request::Stop { now: false }),
            (&["stop", "--now"], Request::Stop { now: true }),
        ];
        for (argv, want) in cases {
            let a = ctl(argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
            assert_eq!(a.command.request(), want, "{argv:?}");
        }
    }

    #[test]
    fn ctl_control_path_is_accepted_before_or_after_the_command() {
        let a = ctl(&["--control", "/tmp/a.sock", "reload"]).unwrap();
        assert_eq!(a.control, Some(PathBuf::from("/tmp/a.sock")));
        let a = ctl(&["scale", "-1", "--control", "/tmp/b.sock"]).unwrap();
        assert_eq!(a.control, Some(PathBuf::from("/tmp/b.sock")));
        assert_eq!(
            a.command,
            CtlCommand::Scale {
                to: ScaleTo::Down(1)
            }
        );
    }

    #[test]
    fn bad_ctl_arguments_are_usage_errors_with_exit_code_2() {
        for argv in [
            &[][..],
            &["explode"],
            &["scale"],
            &["scale", "+x"],
            &["scale", "0"],
            &["recycle", "one"],
            &["recycle", "-1"],
            &["trim"],
            &["trim", "some"],
            &["stop", "--now", "--graceful"],
        ] {
            let e = ctl(argv).expect_err(&format!("{argv:?} should not parse"));
            assert_eq!(e.exit_code(), 2, "{argv:?}: {e}");
        }
        let e = ctl(&["scale", "+x"]).unwrap_err().to_string();
        assert!(e.contains("expected +N"), "{e}");
    }

    #[test]
    fn status_flags_parse() {
        let s = Status::try_parse_from(["status", "--json", "-w", "--control", "/x"])
            .unwrap()
            .args;
        assert!(s.json && s.watch && !s.wide);
        assert_eq!(s.control, Some(PathBuf::from("/x")));
        let s = Status::try_parse_from(["status", "--wide"]).unwrap().args;
        assert!(s.wide);
    }

    #[test]
    fn trim_target_parses_slots_and_all() {
        assert_eq!("all".parse::<TrimTarget>().unwrap(), TrimTarget::All);
        assert_eq!("ALL".parse::<TrimTarget>().unwrap(), TrimTarget::All);
        assert_eq!("3".parse::<TrimTarget>().unwrap(), TrimTarget::Slot(3));
        assert!("-1".parse::<TrimTarget>().is_err());
    }

    #[test]
    fn watch_header_clock_is_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(86400 * 3 + 3600 * 6 + 60 * 30 + 5);
        assert_eq!(utc_clock(t), "06:30:05 UTC");
    }
}
