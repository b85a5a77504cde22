//! Validated settings: [`Config::from_args`] turns raw flags into plain data, or one clear
//! message (exit code 2). Nothing here touches the kernel.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::cli::{LogFormat, OnOff, RunArgs};
use crate::size::{parse_duration, parse_size};
use crate::sockets::{BindAddr, parse_bind};

/// The commands known to send `READY=1` once they serve, by the base name of one of
/// their arguments (`python -m trimrun_worker`, or its script `/venv/bin/trimrun-worker`),
/// and the name to say. Not gunicorn: its master sends `READY=1` once it has booted,
/// before its worker has imported the app, so for it notify is no better than a delay.
const SPEAKS_NOTIFY: [(&str, &str); 2] = [
    ("trimrun_worker", "trimrun_worker"),
    ("trimrun-worker", "trimrun_worker"),
];

/// The name of the known `READY=1` speaker in `cmd`, if there is one.
/// An argument names it when its base name is the program (`/venv/bin/trimrun-worker`,
/// also behind `env` or `uv run`), or it follows `-m` (`-m trimrun_worker`, or a module in
/// it); not a mere mention (`--log-file /var/log/trimrun_worker.log`).
pub fn speaks_notify(cmd: &[String]) -> Option<&'static str> {
    cmd.iter().enumerate().find_map(|(i, a)| {
        let base = a.rsplit('/').next().unwrap_or(a);
        let after_m = i > 0 && cmd[i - 1] == "-m";
        SPEAKS_NOTIFY
            .into_iter()
            .find(|(s, _)| base == *s || (after_m && a.starts_with(&format!("{s}."))))
            .map(|(_, name)| name)
    })
}

/// The command is `trimrun_worker`, the one known to speak the zygote protocol of
/// `--preload` (docs/preload.md).
pub fn is_known_zygote(cmd: &[String]) -> bool {
    speaks_notify(cmd) == Some("trimrun_worker")
}

/// `--ready auto`: `notify` for a command known to send `READY=1` once it serves
/// (trimrun_worker) and under `--preload`
/// (whose zygote is `trimrun_worker`), else a delay of 1 s. With a delay, a recycle
/// stops the old worker once the delay has passed, serving or not, and the policy plans
/// with the delay as the ready time; a worker that needs longer to import its app then
/// leaves its slot empty, and its recycles start too late.
pub fn auto_ready(cmd: &[String], preload: bool) -> Ready {
    if preload || speaks_notify(cmd).is_some() {
        Ready::Notify
    } else {
        Ready::Delay(Duration::from_secs(1))
    }
}

/// When a starting worker counts as ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ready {
    /// `READY=1` on the worker's own `NOTIFY_SOCKET`.
    Notify,
    /// After this long, if it is still alive.
    Delay(Duration),
}

impl FromStr for Ready {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let expected = "expected `auto`, `notify` or `delay:DURATION` (e.g. delay:2s)";
        match s.trim() {
            "notify" => Ok(Ready::Notify),
            other => match other.strip_prefix("delay:") {
                Some(d) => parse_duration(d)
                    .map(Ready::Delay)
                    .map_err(|e| format!("invalid --ready '{s}': {e}")),
                None => Err(format!("invalid --ready '{s}': {expected}")),
            },
        }
    }
}

/// `--limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    None,
    Bytes(u64),
    /// trimrun's own allowance divided among the workers.
    Auto,
}

impl FromStr for Limit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "auto" => Ok(Limit::Auto),
            "none" | "off" | "max" => Ok(Limit::None),
            other => parse_size(other)
                .map(Limit::Bytes)
                .map_err(|e| format!("invalid --limit: {e}, or `auto`")),
        }
    }
}

/// Parse `TERM`, `SIGTERM` or `15`.
pub fn parse_signal(s: &str) -> Result<Signal, String> {
    let t = s.trim().to_ascii_uppercase();
    if let Ok(n) = t.parse::<i32>() {
        return Signal::try_from(n).map_err(|_| format!("invalid signal number '{s}'"));
    }
    let name = if t.starts_with("SIG") {
        t
    } else {
        format!("SIG{t}")
    };
    Signal::from_str(&name).map_err(|_| {
        format!("invalid signal '{s}': expected a name such as TERM, INT, QUIT or a number")
    })
}

/// Shortest `--timeout`: a worker pings every half of it, and trimrun's own reaction time
/// (a loop turn, a trim pause) must stay well below it.
pub const MIN_TIMEOUT: Duration = Duration::from_millis(100);
/// Longest `--timeout`: beyond a day a hang is not what is being watched for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// `--timeout`: a duration, or `0`/`off` for no watchdog (gunicorn's `--timeout 0`).
pub fn parse_timeout(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let d = parse_duration(t).map_err(|e| format!("invalid --timeout: {e}, or `off`"))?;
    if d.is_zero() {
        return Ok(None);
    }
    if d < MIN_TIMEOUT || d > MAX_TIMEOUT {
        return Err(format!(
            "invalid --timeout '{s}': between {}ms and 24h, or `off` (workers ping every half of it)",
            MIN_TIMEOUT.as_millis()
        ));
    }
    Ok(Some(d))
}

#[derive(Debug, Clone)]
pub struct Config {
    pub cmd: Vec<String>,
    pub workers: usize,
    pub binds: Vec<BindAddr>,
    pub bind_mode: Option<u32>,
    pub graceful_timeout: Duration,
    pub stop_signal: Signal,
    pub ready: Ready,
    /// `ready` was chosen by `--ready auto` (the default).
    pub ready_auto: bool,
    pub ready_timeout: Duration,
    /// `--preload`: workers are forked from a zygote (crate::zygote).
    pub preload: bool,
    /// `--timeout`: the watchdog interval, None when off.
    pub timeout: Option<Duration>,
    pub timeout_signal: Signal,
    pub limit: Limit,
    /// `--pool-limit`: the pool's budget (`Limit::None`: no budget).
    pub pool_limit: Limit,
    pub cgroup: String,
    pub trim: bool,
    pub trim_at: f64,
    pub trim_interval: Duration,
    pub recycle_at: f64,
    pub recycle_jitter: f64,
    /// `--spread-first`: the first generation's thresholds are spread over a life.
    pub spread_first: bool,
    pub max_lifetime: Option<Duration>,
    pub lifetime_jitter: Duration,
    pub max_recycling: usize,
    pub recycle_spacing: Option<Duration>,
    pub control: Option<PathBuf>,
    pub metrics: Option<String>,
    pub log_format: LogFormat,
    /// Wrap each line the workers write as a JSON event of trimrun's log.
    pub wrap_worker_output: bool,
    /// `--user` / `--group`, resolved.
    pub credentials: Option<crate::spawn::Credentials>,
}

/// Upper bound on `--workers`: far beyond any host, low enough to catch a typo.
pub const MAX_WORKERS: usize = 4096;

impl Config {
    pub fn from_args(a: &RunArgs) -> Result<Config, String> {
        let workers = match &a.workers {
            None => std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            Some(w) => {
                let n: usize = w.trim().parse().map_err(|_| {
                    format!("invalid --workers '{w}': expected a whole number such as 4")
                })?;
                if n == 0 {
                    return Err("invalid --workers 0: at least 1 worker is needed".into());
                }
                if n > MAX_WORKERS {
                    return Err(format!("invalid --workers {n}: at most {MAX_WORKERS}"));
                }
                n
            }
        };
        let binds = a
            .bind
            .iter()
            .filter(|b| !b.trim().is_empty())
            .map(|b| parse_bind(b))
            .collect::<Result<Vec<_>, _>>()?;
        let bind_mode = a
            .bind_mode
            .as_deref()
            .map(|m| {
                u32::from_str_radix(m.trim().trim_start_matches("0o"), 8)
                    .ok()
                    .filter(|v| *v <= 0o777)
                    .ok_or_else(|| {
                        format!("invalid --bind-mode '{m}': expected octal permissions such as 660")
                    })
            })
            .transpose()?;
        let limit = a
            .limit
            .as_deref()
            .map(Limit::from_str)
            .transpose()?
            .unwrap_or(Limit::None);
        let pool_limit = a
            .pool_limit
            .as_deref()
            .map(|s| Limit::from_str(s).map_err(|e| e.replacen("--limit", "--pool-limit", 1)))
            .transpose()?
            .unwrap_or(Limit::None);
        let cgroup = a.cgroup.trim().to_ascii_lowercase();
        if !["auto", "v2", "v1", "none"].contains(&cgroup.as_str()) {
            return Err(format!(
                "invalid --cgroup '{}': expected auto, v2, v1 or none",
                a.cgroup
            ));
        }
        if a.recycle_at <= a.trim_at && a.trim == OnOff::On {
            return Err(format!(
                "--recycle-at ({:.0}%) must be above --trim-at ({:.0}%): trimming comes first",
                a.recycle_at * 100.0,
                a.trim_at * 100.0
            ));
        }
        if a.max_recycling == 0 {
            return Err("invalid --max-recycling 0: at least 1".into());
        }
        if a.graceful_timeout.is_zero() {
            return Err("invalid --graceful-timeout 0: give workers some time, e.g. 5s".into());
        }
        check_binds_unique(&binds)?;
        let ready_auto = a.ready.trim() == "auto";
        let ready: Ready = if ready_auto {
            auto_ready(&a.cmd, a.preload)
        } else {
            a.ready.parse()?
        };
        check_ready_timeout(ready, a.ready_timeout)?;
        if a.max_lifetime.is_some_and(|l| l.is_zero()) {
            return Err(
                "invalid --max-lifetime 0: every worker would be recycled as soon as it starts; give a lifetime such as 1h, or leave it out".into(),
            );
        }
        let credentials =
            crate::spawn::Credentials::resolve(a.user.as_deref(), a.group.as_deref())?;
        Ok(Config {
            credentials,
            cmd: a.cmd.clone(),
            workers,
            binds,
            bind_mode,
            graceful_timeout: a.graceful_timeout,
            stop_signal: parse_signal(&a.stop_signal)?,
            ready,
            ready_auto,
            ready_timeout: a.ready_timeout,
            preload: a.preload,
            timeout: a
                .timeout
                .as_deref()
                .map(parse_timeout)
                .transpose()?
                .flatten(),
            timeout_signal: parse_signal(&a.timeout_signal)
                .map_err(|e| format!("--timeout-signal: {e}"))?,
            limit,
            pool_limit,
            cgroup,
            trim: a.trim == OnOff::On,
            trim_at: a.trim_at,
            trim_interval: a.trim_interval,
            recycle_at: a.recycle_at,
            recycle_jitter: a.recycle_jitter,
            spread_first: a.spread_first == OnOff::On,
            max_lifetime: a.max_lifetime,
            lifetime_jitter: a
                .lifetime_jitter
                .unwrap_or_else(|| a.max_lifetime.map(|l| l / 10).unwrap_or_default()),
            max_recycling: a.max_recycling,
            recycle_spacing: a.recycle_spacing,
            control: a.control.clone(),
            metrics: a.metrics.clone(),
            log_format: a.log_format,
            wrap_worker_output: match a.worker_output {
                crate::cli::WorkerOutput::Json => true,
                crate::cli::WorkerOutput::Inherit => false,
                crate::cli::WorkerOutput::Auto => a.log_format == LogFormat::Json && !a.preload,
            },
        })
    }
}

/// The same socket twice would be handed to every worker twice (and `fd://N` adopted
/// twice, closing it under the first owner): refused.
pub fn check_binds_unique(binds: &[BindAddr]) -> Result<(), String> {
    for (i, b) in binds.iter().enumerate() {
        if binds[..i].contains(b) {
            return Err(format!(
                "invalid --bind: {b} is given more than once (give each address once)"
            ));
        }
    }
    Ok(())
}

/// A readiness deadline a worker can meet: not zero, and after the ready delay.
pub fn check_ready_timeout(ready: Ready, timeout: Duration) -> Result<(), String> {
    if timeout.is_zero() {
        return Err(
            "invalid --ready-timeout 0: every worker would be stopped before it could become ready; give it time, e.g. 60s".into(),
        );
    }
    if let Ready::Delay(d) = ready
        && d >= timeout
    {
        return Err(format!(
            "--ready delay:{d:?} never comes before --ready-timeout {timeout:?}: workers would be stopped as not ready, forever; make the timeout longer than the delay"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<Config, String> {
        let cli = Cli::try_parse_from(args).map_err(|e| e.to_string())?;
        Config::from_args(&cli.run)
    }

    #[test]
    fn ready_auto_is_notify_for_commands_that_send_ready_and_under_preload() {
        let ready = |args: &[&str]| {
            let c = parse(args).unwrap();
            (c.ready, c.ready_auto)
        };
        let delay = Ready::Delay(Duration::from_secs(1));
        let w = ["--", "/venv/bin/python3", "-m", "trimrun_worker", "app:app"];
        assert_eq!(
            ready(&[&["trimrun"][..], &w].concat()),
            (Ready::Notify, true)
        );
        assert_eq!(
            ready(&["trimrun", "--", "/venv/bin/trimrun-worker", "app:app"]),
            (Ready::Notify, true)
        );
        assert_eq!(
            ready(&[
                "trimrun",
                "--",
                "python3",
                "-m",
                "trimrun_worker.cli",
                "app:app"
            ]),
            (Ready::Notify, true)
        );
        // A mention is not the program.
        let mention = [
            "trimrun",
            "--",
            "app",
            "--log",
            "/var/log/trimrun_worker.log",
        ];
        assert_eq!(ready(&mention), (delay, true));
        // gunicorn's READY=1 comes before its worker has imported the app.
        assert_eq!(
            ready(&["trimrun", "--", "gunicorn", "-w", "1", "app:app"]),
            (delay, true)
        );
        assert_eq!(
            ready(&["trimrun", "--preload", "--", "./serve"]),
            (Ready::Notify, true)
        );
        assert_eq!(
            ready(&["trimrun", "--", "python3", "app.py"]),
            (delay, true)
        );
        // An explicit choice is kept, also for a command that speaks notify.
        let explicit = [&["trimrun", "--ready", "delay:1s"][..], &w].concat();
        assert_eq!(ready(&explicit), (delay, false));
        assert_eq!(
            ready(&["trimrun", "--ready", "auto", "--", "python3", "app.py"]),
            (delay, true)
        );
    }

    #[test]
    fn defaults_are_sensible() {
        let c = parse(&["trimrun", "--", "python3", "app.py"]).unwrap();
        assert!(c.workers >= 1);
        assert_eq!(c.graceful_timeout, Duration::from_secs(30));
        assert_eq!(c.stop_signal, Signal::SIGTERM);
        assert_eq!(c.ready, Ready::Delay(Duration::from_secs(1)));
        assert!(c.ready_auto);
        assert_eq!(c.cmd, vec!["python3", "app.py"]);
        assert!(c.trim);
        assert_eq!(c.trim_at, 0.75);
        assert_eq!(c.recycle_at, 0.9);
    }

    #[test]
    fn every_flag_parses() {
        let c = parse(&[
            "trimrun",
            "-n",
            "8",
            "--limit",
            "512M",
            "--bind",
            "0.0.0.0:8000",
            "--bind",
            "unix:/tmp/a.sock",
            "--bind-mode",
            "660",
            "--graceful-timeout",
            "2m",
            "--stop-signal",
            "INT",
            "--ready",
            "notify",
            "--trim",
            "off",
            "--max-lifetime",
            "1h",
            "--",
            "python3",
            "app.py",
        ])
        .unwrap();
        assert_eq!(c.workers, 8);
        assert_eq!(c.limit, Limit::Bytes(512 << 20));
        assert_eq!(c.binds.len(), 2);
        assert_eq!(c.bind_mode, Some(0o660));
        assert_eq!(c.graceful_timeout, Duration::from_secs(120));
        assert_eq!(c.stop_signal, Signal::SIGINT);
        assert_eq!(c.ready, Ready::Notify);
        assert!(!c.trim);
        assert_eq!(c.lifetime_jitter, Duration::from_secs(360));
    }

    #[test]
    fn bad_input_is_one_clear_message() {
        let cases: &[(&[&str], &str)] = &[
            (&["trimrun", "-n", "0", "--", "x"], "at least 1 worker"),
            (&["trimrun", "-n", "many", "--", "x"], "whole number"),
            (&["trimrun", "--limit", "12Q", "--", "x"], "512M"),
            (&["trimrun", "--bind", "nowhere", "--", "x"], "HOST:PORT"),
            (&["trimrun", "--ready", "soon", "--", "x"], "delay:DURATION"),
            (
                &["trimrun", "--stop-signal", "NOPE", "--", "x"],
                "invalid signal",
            ),
            (&["trimrun", "--graceful-timeout", "ten", "--", "x"], "30s"),
            (
                &["trimrun", "--cgroup", "v3", "--", "x"],
                "auto, v2, v1 or none",
            ),
            (&["trimrun", "--trim-at", "95%", "--", "x"], "must be above"),
            (
                &["trimrun", "--ready-timeout", "0s", "--", "x"],
                "--ready-timeout 0",
            ),
            (
                &[
                    "trimrun",
                    "--ready",
                    "delay:3s",
                    "--ready-timeout",
                    "3s",
                    "--",
                    "x",
                ],
                "never comes before",
            ),
            (
                &["trimrun", "--bind", "fd://3", "--bind", "fd://3", "--", "x"],
                "more than once",
            ),
            (
                &["trimrun", "--max-lifetime", "0s", "--", "x"],
                "--max-lifetime 0",
            ),
        ];
        for (args, want) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn timeout_is_off_by_default_and_parsed_when_given() {
        let c = parse(&["trimrun", "--", "x"]).unwrap();
        assert_eq!(c.timeout, None);
        assert_eq!(c.timeout_signal, Signal::SIGABRT);
        let c = parse(&[
            "trimrun",
            "--timeout",
            "30s",
            "--timeout-signal",
            "QUIT",
            "--",
            "x",
        ])
        .unwrap();
        assert_eq!(c.timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.timeout_signal, Signal::SIGQUIT);
        for off in ["0", "off", "OFF", "0s"] {
            let c = parse(&["trimrun", "--timeout", off, "--", "x"]).unwrap();
            assert_eq!(c.timeout, None, "{off}");
        }
        let cases: &[(&[&str], &str)] = &[
            (&["trimrun", "--timeout", "soon", "--", "x"], "or `off`"),
            (
                &["trimrun", "--timeout", "10ms", "--", "x"],
                "between 100ms and 24h",
            ),
            (
                &["trimrun", "--timeout", "2d", "--", "x"],
                "between 100ms and 24h",
            ),
            (
                &["trimrun", "--timeout=-5s", "--", "x"],
                "invalid --timeout",
            ),
            (
                &["trimrun", "--timeout-signal", "NOPE", "--", "x"],
                "--timeout-signal: invalid signal",
            ),
        ];
        for (args, want) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(want), "{args:?}: {err}");
        }
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(parse_signal("term").unwrap(), Signal::SIGTERM);
        assert_eq!(parse_signal("SIGQUIT").unwrap(), Signal::SIGQUIT);
        assert_eq!(parse_signal("2").unwrap(), Signal::SIGINT);
    }
}
