//! Start-up decisions [`crate::run_pool`] makes once, before the pool task starts: the
//! policy's settings from the config, and the per-worker limit (resolved and checked here,
//! so a limit that cannot work is an error at start, not a failure at each spawn).

use std::time::Duration;

use tracing::info;

use crate::cgroup;
use crate::config::{Config, Limit, Ready};
use crate::policy;
use crate::size::human_bytes;

/// The pure policy's settings from the validated config.
pub fn policy_settings(cfg: &Config) -> policy::Settings {
    policy::Settings {
        trim: cfg.trim,
        trim_at: cfg.trim_at,
        trim_interval: cfg.trim_interval,
        recycle_at: cfg.recycle_at,
        recycle_jitter: cfg.recycle_jitter,
        max_lifetime: cfg.max_lifetime,
        lifetime_jitter: cfg.lifetime_jitter,
        max_recycling: cfg.max_recycling,
        recycle_spacing: cfg.recycle_spacing,
        ready_time: match cfg.ready {
            Ready::Delay(d) => d,
            Ready::Notify => Duration::from_secs(2),
        },
        ready_measured: matches!(cfg.ready, Ready::Notify),
        ..policy::Settings::default()
    }
}

/// Resolve `--limit` against the cgroup backend (`auto` divides trimrun's allowance) and
/// check it once: at least [`cgroup::MIN_WORKER_LIMIT`], at most what trimrun may use.
pub fn resolve_limit(
    limit: Limit,
    workers: usize,
    cgroups: &cgroup::Manager,
) -> Result<Option<u64>, String> {
    match limit {
        Limit::None => Ok(None),
        Limit::Bytes(b) => {
            if b < cgroup::MIN_WORKER_LIMIT {
                return Err(format!(
                    "--limit {} is too small to start a worker: at least {} (a Python interpreter alone needs ~10 MiB)",
                    human_bytes(b),
                    human_bytes(cgroup::MIN_WORKER_LIMIT)
                ));
            }
            cgroups.check_worker_limit(b).map_err(|e| e.to_string())?;
            Ok(Some(b))
        }
        Limit::Auto => {
            let (available, source) = cgroups.available_memory_from().map_err(|e| e.to_string())?;
            let reserve = cgroup::default_reserve(available);
            let per = cgroup::auto_limit(available, workers, reserve).map_err(|e| e.to_string())?;
            info!(
                available = available,
                workers,
                per_worker = per,
                "--limit auto: {} per worker ({} allowed by {source}, {} kept for trimrun)",
                human_bytes(per),
                human_bytes(available),
                human_bytes(reserve)
            );
            Ok(Some(per))
        }
    }
}

/// Resolve `--pool-limit`: a size (at most what trimrun may use), or `auto`: what trimrun
/// may use ([`cgroup::Manager::available_memory`]: its cgroup's limit, else `MemTotal`)
/// less the same reserve `--limit auto` keeps. `None`: no budget.
pub fn resolve_pool_limit(
    pool_limit: Limit,
    workers: usize,
    cgroups: &cgroup::Manager,
) -> Result<Option<u64>, String> {
    let min = cgroup::MIN_WORKER_LIMIT.saturating_mul(workers.max(1) as u64);
    let budget = match pool_limit {
        Limit::None => return Ok(None),
        Limit::Bytes(b) => {
            let available = cgroups.available_memory().map_err(|e| e.to_string())?;
            if b > available {
                return Err(format!(
                    "--pool-limit {} is more than trimrun may use, {} (lower it, or use --pool-limit auto)",
                    human_bytes(b),
                    human_bytes(available)
                ));
            }
            b
        }
        Limit::Auto => {
            let (available, source) = cgroups.available_memory_from().map_err(|e| e.to_string())?;
            let reserve = cgroup::default_reserve(available);
            let b = available.saturating_sub(reserve);
            info!(
                available,
                reserve,
                budget = b,
                "--pool-limit auto: {} for the pool ({} allowed by {source}, {} kept for trimrun)",
                human_bytes(b),
                human_bytes(available),
                human_bytes(reserve)
            );
            b
        }
    };
    if budget < min {
        return Err(format!(
            "--pool-limit {} is too small for {workers} workers: at least {} ({} each)",
            human_bytes(budget),
            human_bytes(min),
            human_bytes(cgroup::MIN_WORKER_LIMIT)
        ));
    }
    Ok(Some(budget))
}

/// Warnings for `--limit` beside `--pool-limit` (`limit`: `--limit` as resolved, None if
/// not given): one above the budget (each ceiling is then the budget), or ceilings that add
/// up to no more than the budget (it never binds: a hard split, as `--limit` alone).
pub fn budget_hints(limit: Option<u64>, budget: Option<u64>, workers: usize) -> Vec<String> {
    let (Some(l), Some(b)) = (limit, budget) else {
        return vec![];
    };
    if l > b {
        return vec![format!(
            "--limit {} is more than the pool budget {}: each worker's ceiling is the budget",
            human_bytes(l),
            human_bytes(b)
        )];
    }
    let sum = l.saturating_mul(workers as u64);
    if l < b && sum <= b {
        return vec![format!(
            "the workers' ceilings add up to {} ({workers} x --limit {}), no more than the pool \
             budget {}: the budget never binds, and each worker is held to its own ceiling as \
             with --limit alone; raise --limit, or leave it out (ceilings of twice the fair \
             share), to let one worker's burst use room the others leave",
            human_bytes(sum),
            human_bytes(l),
            human_bytes(b)
        )];
    }
    vec![]
}

/// Each worker's ceiling under a budget: `--limit` if given (at most the budget), else
/// twice its fair share ([`policy::default_ceiling`]).
pub fn worker_ceiling(limit: Option<u64>, budget: Option<u64>, workers: usize) -> Option<u64> {
    match (limit, budget) {
        (l, None) => l,
        (Some(l), Some(b)) => Some(l.min(b)),
        (None, Some(b)) => Some(policy::default_ceiling(b, workers)),
    }
}

/// A warning for a command known to send `READY=1` once it serves (`trimrun_worker`) run with
/// readiness by delay: a recycle then stops the old worker once the delay has passed,
/// whether or not its replacement has imported the app and is serving, which a slow
/// import turns into refused or reset connections (and with `--timeout`, into a worker
/// that has only `--ready-timeout` to start speaking).
pub fn readiness_hint(cfg: &Config) -> Option<String> {
    let Ready::Delay(d) = cfg.ready else {
        return None;
    };
    let name = crate::config::speaks_notify(&cfg.cmd)?;
    Some(format!(
        "{name} sends READY=1 once it serves, but --ready is delay:{d:?}, so a recycle may stop \
         the old worker before its replacement serves: pass --ready notify (or leave --ready \
         out: auto picks notify for {name})"
    ))
}

/// A warning for `--preload` with a command not known to speak the zygote protocol
/// (`docs/preload.md`): such a command (a server run on its own) never says ready, and
/// until `--ready-timeout` kills it, it serves the shared sockets itself, outside every
/// worker's cgroup. A wrapper script that execs `trimrun_worker` is fine, hence a warning.
pub fn preload_hint(cfg: &Config) -> Option<String> {
    if !cfg.preload || crate::config::is_known_zygote(&cfg.cmd) {
        return None;
    }
    Some(format!(
        "--preload runs the command as a zygote that must speak the protocol of docs/preload.md, \
         as `python -m trimrun_worker APP` does; {:?} is not that: unless it speaks the \
         protocol, no worker starts, the command serves the sockets itself (outside the \
         workers' cgroups) until --ready-timeout ({:?}), and then trimrun stops with exit 2",
        cfg.cmd.join(" "),
        cfg.ready_timeout
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Cli;
    use clap::Parser;

    fn hint(args: &[&str]) -> Option<String> {
        let cli = Cli::try_parse_from(args).expect("test flags parse");
        readiness_hint(&Config::from_args(&cli.run).expect("valid"))
    }

    #[test]
    fn a_budget_the_ceilings_never_reach_together_is_warned_about() {
        const M: u64 = 1 << 20;
        let h = budget_hints(Some(100 * M), Some(600 * M), 4);
        assert!(
            h[0].contains("400 MiB") && h[0].contains("never binds"),
            "{h:?}"
        );
        assert_eq!(budget_hints(Some(100 * M), Some(400 * M), 4).len(), 1);
        assert!(budget_hints(Some(300 * M), Some(600 * M), 4).is_empty());
        assert!(budget_hints(Some(100 * M), None, 4).is_empty());
        // Not given: the default ceilings (twice the fair share, the budget for one
        // worker) always overcommit or are the budget itself.
        assert!(budget_hints(None, Some(600 * M), 4).is_empty());
        assert!(budget_hints(Some(600 * M), Some(600 * M), 1).is_empty());
        // Above the budget: capped, and said so.
        let h = budget_hints(Some(200 * M), Some(100 * M), 2);
        assert!(
            h[0].contains("each worker's ceiling is the budget"),
            "{h:?}"
        );
    }

    #[test]
    fn preload_of_a_command_that_is_not_trimrun_worker_is_warned_about() {
        let preload = |args: &[&str]| {
            let cli = Cli::try_parse_from(args).expect("test flags parse");
            preload_hint(&Config::from_args(&cli.run).expect("valid"))
        };
        let h = preload(&["trimrun", "--preload", "--", "python3", "app.py"]).unwrap();
        assert!(h.contains("python -m trimrun_worker"), "{h}");
        let w = ["--", "/venv/bin/python3", "-m", "trimrun_worker", "app:app"];
        assert_eq!(preload(&[&["trimrun", "--preload"][..], &w].concat()), None);
        assert_eq!(preload(&["trimrun", "--", "python3", "app.py"]), None);
    }

    #[test]
    fn readiness_by_delay_for_a_worker_that_speaks_notify_is_warned_about() {
        let w = ["python3", "-m", "trimrun_worker", "app:app"];
        let delay = [&["trimrun", "--ready", "delay:1s", "--"][..], &w].concat();
        assert!(hint(&delay).unwrap().contains("--ready notify"));
        // The default (auto) picks notify for it: nothing to warn about.
        assert_eq!(hint(&[&["trimrun", "--"][..], &w].concat()), None);
        let notify = [&["trimrun", "--ready", "notify", "--"][..], &w].concat();
        assert_eq!(hint(&notify), None);
        // gunicorn's READY=1 means its master booted, not that it serves: no hint.
        let g = [
            "trimrun",
            "--ready",
            "delay:2s",
            "--",
            "/venv/bin/gunicorn",
            "app:app",
        ];
        assert_eq!(hint(&g), None);
        assert_eq!(hint(&["trimrun", "--", "python3", "app.py"]), None);
    }
}
