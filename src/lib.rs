//! trimrun: a process-pool launcher for memory-bound Python web apps.
//!
//! It forks N workers on shared listening sockets, gives each its own memory cgroup,
//! trims them from the outside (`malloc_trim(0)` injected through ptrace) as they approach
//! their limit, and recycles them one at a time, replacement first, with jitter.
//!
//! The shape (see `DESIGN.md`): pure decisions in [`policy`], [`size`], [`config`],
//! [`startup`] and the parsers ([`procfs`], `cgroup::parse`); thin kernel layers in
//! [`spawn`], [`sockets`], [`cgroup`], [`zygote`] and [`trim`], which the supervisor reaches
//! only through the traits of [`edge`] (with in-memory fakes for its tests); one task that
//! owns the pool in [`supervisor`]; the subcommands' user interfaces in [`commands`].

pub mod cgroup;
pub mod cli;
pub mod commands;
pub mod config;
pub mod edge;
pub mod logging;
pub mod notify;
pub mod policy;
pub mod procfs;
pub mod size;
pub mod sockets;
pub mod spawn;
pub mod startup;
pub mod status;
pub mod supervisor;
pub mod trim;
pub mod zygote;

use std::str::FromStr;

use tracing::{info, warn};

/// Exit codes (the table is in `cli::EXIT_CODES` and the README).
pub mod exit {
    pub const OK: i32 = 0;
    pub const FAILURE: i32 = 1;
    pub const BAD_INPUT: i32 = 2;
    pub const ESCALATED: i32 = 130;
}

/// Start-up errors: a message for the operator and an exit code.
#[derive(Debug)]
pub struct Fatal {
    pub code: i32,
    pub message: String,
}

fn bad_input(message: impl std::fmt::Display) -> Fatal {
    Fatal {
        code: exit::BAD_INPUT,
        message: message.to_string(),
    }
}

/// Run the pool described by the command line. Blocks until it stops.
pub fn run_pool(args: &cli::RunArgs) -> Result<i32, Fatal> {
    let cfg = config::Config::from_args(args).map_err(bad_input)?;
    let settings = startup::policy_settings(&cfg);
    settings.validate().map_err(bad_input)?;
    let program = spawn::Program::resolve(&cfg.cmd).map_err(bad_input)?;
    let mut listeners = sockets::from_systemd().map_err(bad_input)?;
    listeners.extend(sockets::open(&cfg.binds, cfg.bind_mode).map_err(bad_input)?);
    if listeners.is_empty() {
        info!("no --bind and no sockets from systemd: workers get no listening socket");
    }
    match spawn::raise_fd_limit() {
        Ok((old, new)) if new > old => {
            info!(
                from = old,
                to = new,
                "raised the open-file limit (workers keep the original)"
            )
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-file limit"),
    }
    let choice = cgroup::Choice::from_str(&cfg.cgroup).map_err(bad_input)?;
    let cgroups = cgroup::Manager::setup(choice).map_err(bad_input)?;
    let limit = startup::resolve_limit(cfg.limit, cfg.workers, &cgroups).map_err(|e| {
        cgroups.teardown();
        bad_input(e)
    })?;
    let budget =
        startup::resolve_pool_limit(cfg.pool_limit, cfg.workers, &cgroups).map_err(|e| {
            cgroups.teardown();
            bad_input(e)
        })?;
    for hint in startup::budget_hints(limit, budget, cfg.workers) {
        warn!("{hint}");
    }
    let limit = startup::worker_ceiling(limit, budget, cfg.workers);
    if let Some(b) = budget {
        match cgroups.set_pool_limit(b) {
            Ok(()) => info!(
                budget = b,
                ceiling = limit,
                "pool budget {} (the pool's cgroup is the hard cap); each worker's ceiling {}",
                size::human_bytes(b),
                limit.map_or("none".into(), size::human_bytes)
            ),
            Err(e) => warn!(error = %e, "the pool budget is not enforced by the kernel"),
        }
    }
    // A current-thread runtime: the supervisor, and so every fork, stays on the main
    // thread, which lives as long as trimrun (PR_SET_PDEATHSIG follows the forking thread).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(8)
        .build()
        .map_err(|e| Fatal {
            code: exit::FAILURE,
            message: format!("cannot start the runtime: {e}"),
        })?;
    let outcome = rt.block_on(async move {
        // The control socket and the metrics endpoint come up before any worker starts,
        // so "in use" is reported with nothing to clean up but the cgroups.
        let (control_tx, control_rx) = tokio::sync::mpsc::channel(16);
        let control_path = cfg
            .control
            .clone()
            .unwrap_or_else(status::default_control_path);
        let control = status::serve(&control_path, control_tx)
            .await
            .map_err(bad_input)?;
        let metrics = match &cfg.metrics {
            Some(addr) => {
                let m = status::metrics::Metrics::new();
                status::metrics::serve_metrics(addr, m.clone())
                    .await
                    .map_err(bad_input)?;
                Some(m)
            }
            None => None,
        };
        let failure = |what: &str, e: std::io::Error| Fatal {
            code: exit::FAILURE,
            message: format!("cannot {what}: {e}"),
        };
        let rundir = notify::RunDir::create(cfg.credentials.is_some()).map_err(|e| Fatal {
            code: exit::FAILURE,
            message: format!(
                "cannot create trimrun's run directory: {e} (check $XDG_RUNTIME_DIR or $TMPDIR)"
            ),
        })?;
        let signals =
            supervisor::forward_signals().map_err(|e| failure("install signal handlers", e))?;
        let described = listeners.iter().map(|l| l.describe.clone()).collect();
        let preload = cfg.preload;
        let ready_timeout = cfg.ready_timeout;
        let fork_exec = edge::ForkExec::new(program, listeners)
            .map_err(|e| failure("install the SIGCHLD handler", e))?
            .with_credentials(cfg.credentials.clone())
            .with_output_wrapping(cfg.wrap_worker_output);
        let launcher: Box<dyn edge::Launcher> = if preload {
            let known = config::is_known_zygote(&cfg.cmd);
            Box::new(edge::Zygotes::new(fork_exec, ready_timeout, known))
        } else {
            Box::new(fork_exec)
        };
        let setup = supervisor::Setup {
            config: cfg,
            settings,
            limit,
            budget,
            groups: Box::new(cgroups),
            launcher,
            injector: std::sync::Arc::new(edge::Ptrace::default()),
            rundir,
            signals,
            control_rx: Some(control_rx),
            metrics,
            listeners: described,
            seed: None,
        };
        let sup = supervisor::Supervisor::new(setup);
        let outcome = sup.run().await;
        control.close().await;
        Ok::<_, Fatal>(outcome)
    });
    // A trim in flight (on a blocking thread) is finished, not cut off by the exit.
    if !trim::finish_trims(std::time::Duration::from_secs(10)) {
        warn!("a trim was still running at exit");
    }
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    match outcome {
        Ok(supervisor::Outcome::Stopped) => Ok(exit::OK),
        Ok(supervisor::Outcome::Escalated) => Ok(exit::ESCALATED),
        Ok(supervisor::Outcome::Failed(message)) => Err(Fatal {
            code: exit::BAD_INPUT,
            message,
        }),
        Err(f) => Err(f),
    }
}
