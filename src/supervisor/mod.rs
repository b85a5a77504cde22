//! The pool: one task owns every worker and reacts to signals, child exits, readiness
//! notifications, memory ticks, trim results and control requests.
//!
//! A worker's life is `Starting → Ready → Draining → Killed → gone` ([`State`]). Replacing
//! one (a recycle, a rolling restart) always starts the replacement first: the old worker
//! keeps serving until the new one is ready, then gets the stop signal,
//! `--graceful-timeout`, then SIGKILL. Both share the listening sockets, so connections
//! queue in the kernel while workers change.
//!
//! Decisions (when to trim, when to recycle, who goes first, how long to back off) are the
//! pure functions of [`crate::policy`]; this module carries them out through the kernel
//! edge of [`crate::edge`] (worker groups, a launcher, an injector), which the unit tests
//! replace with in-memory fakes on a paused clock.
//!
//! | file | job |
//! | --- | --- |
//! | `run.rs` | the loop: `select!` over signals, exits, events, control, timers; shutdown |
//! | `lifecycle.rs` | start, ready, drain, kill, exit, respawn with backoff |
//! | `control.rs` | operator actions (signals, `trimrun ctl`), status snapshot |
//! | `timers.rs` | deadlines: readiness, graceful timeouts, respawns |
//! | `memory.rs` | the memory tick and trims |
//! | `recycle.rs` | who is recycled now, replacement first |

mod control;
mod lifecycle;
mod memory;
mod recycle;
mod run;
mod timers;
mod watchdog;
mod worker;

#[cfg(test)]
mod tests;

use std::sync::Arc;
use std::time::Duration;

use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::config::Config;
use crate::edge::{Groups, Injector, Launcher};
use crate::notify::{Notifier, RunDir};
use crate::policy::{self, Backoff, PoolPolicy, RecycleReason};
use crate::status::{self, ControlMsg};
use crate::trim;
pub use run::{PoolSignal, forward_signals};
pub use worker::{Exit, Replacing, State, Trim, Why, Worker};

/// How often memory is read and trim/recycle decisions are made, until the policy asks
/// for a shorter tick near a limit ([`policy::Decisions::next_tick`]).
const TICK: Duration = policy::SLOW_TICK;
/// A worker that lived at least this long and then exited resets its slot's backoff (as
/// the backoff's own documentation says: twice its cap).
const STABLE_AFTER: Duration = policy::BACKOFF_RESET_AFTER;

/// What the pool needs from start-up: the validated config and the policy settings
/// derived from it, the per-worker limit (resolved and checked once), and the kernel edge.
pub struct Setup {
    pub config: Config,
    pub settings: policy::Settings,
    pub limit: Option<u64>,
    /// The pool budget (`--pool-limit`), resolved; `limit` is then each worker's ceiling.
    pub budget: Option<u64>,
    pub groups: Box<dyn Groups>,
    pub launcher: Box<dyn Launcher>,
    pub injector: Arc<dyn Injector>,
    /// Where the workers' notify sockets go (`--ready notify`).
    pub rundir: RunDir,
    /// TERM, INT, HUP, ... ([`forward_signals`] for the real ones).
    pub signals: mpsc::UnboundedReceiver<PoolSignal>,
    pub control_rx: Option<mpsc::Receiver<ControlMsg>>,
    pub metrics: Option<Arc<status::metrics::Metrics>>,
    /// The listening sockets, for the start-up log.
    pub listeners: Vec<String>,
    /// Seed of the jitter (tests); None: from the OS.
    pub seed: Option<u64>,
}

/// Why the pool ended: maps to the exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Graceful or fast shutdown as asked.
    Stopped,
    /// A second TERM/INT cut the graceful shutdown short.
    Escalated,
    /// The pool could not go on (the launcher's [`crate::edge::Launcher::fatal`]): it was
    /// stopped, and trimrun exits 2 with this message.
    Failed(String),
}

enum Event {
    Ready {
        pid: i32,
    },
    NotifyStatus {
        pid: i32,
        text: String,
    },
    /// `WATCHDOG=trigger`: the worker asks to be handled as hung.
    WatchdogTrigger {
        pid: i32,
    },
    Trimmed {
        pid: i32,
        results: Vec<Result<trim::TrimReport, trim::TrimError>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Until every initial worker is ready.
    Starting,
    Running,
    /// Workers were told to stop; the ones left at `kill_at` are killed.
    Stopping {
        kill_at: Instant,
    },
    /// Every worker was killed; waiting for the last exits.
    Killing,
}

impl Phase {
    fn stopping(self) -> bool {
        matches!(self, Phase::Stopping { .. } | Phase::Killing)
    }
}

struct Slot {
    generation: u64,
    backoff: Backoff,
    /// When to start a worker for this slot again after an exit.
    respawn_at: Option<Instant>,
    /// A recycle of this slot failed (replacement never ready): not before this.
    retry_recycle_at: Option<Instant>,
    /// Unexpected exits of this slot's workers, OOM kills among all its exits, and how the
    /// last unexpected one ended (for `status` and `/metrics`).
    restarts: u64,
    oom_kills: u64,
    last_exit: Option<String>,
    /// The hung worker whose replacement waits for `respawn_at` (`--timeout`).
    hung: Option<i32>,
    /// Watchdog timeouts of this slot so far.
    timeouts: u64,
    /// A recycle of this slot started then (for the policy's recycle time).
    recycle_started: Option<Instant>,
    /// Stop-first recycle: the worker stopping now, whose exit starts the replacement.
    stop_first: Option<(i32, RecycleReason)>,
    /// Recycles of this slot so far (shown per worker, as its `recycles`).
    recycles: u64,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            generation: 0,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
            respawn_at: None,
            retry_recycle_at: None,
            restarts: 0,
            oom_kills: 0,
            last_exit: None,
            hung: None,
            timeouts: 0,
            recycle_started: None,
            stop_first: None,
            recycles: 0,
        }
    }
}

#[derive(Default)]
struct Totals {
    restarts: u64,
    oom_kills: u64,
    recycles: u64,
    /// Every trim of every worker so far, and what they released: counters that only go
    /// up, whatever happens to the workers (a sum over live workers would drop a gone
    /// worker's trims, and count a draining one twice if its replacement inherited them).
    trims: u64,
    released: u64,
    timeouts: u64,
}

pub struct Supervisor {
    cfg: Config,
    limit: Option<u64>,
    groups: Box<dyn Groups>,
    launcher: Box<dyn Launcher>,
    injector: Arc<dyn Injector>,
    listeners: Vec<String>,
    rundir: RunDir,
    notifier: Notifier,
    settings: policy::Settings,
    pool: PoolPolicy,
    /// Read memory this often (the policy shortens it near a limit).
    tick: Duration,
    /// The pool group's working set at the last tick (with a budget).
    pool_usage: Option<u64>,
    /// The pool group's last reading (with a budget), for status.
    pool_reading: Option<crate::edge::PoolReading>,
    /// Why the pool is stopping, if it cannot go on ([`Outcome::Failed`]).
    fatal: Option<String>,
    /// Workers already reported as growing too fast for any schedule.
    too_fast_logged: std::collections::HashSet<i32>,
    target: usize,
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    phase: Phase,
    start: Instant,
    rng: StdRng,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    signals: mpsc::UnboundedReceiver<PoolSignal>,
    control_rx: Option<mpsc::Receiver<ControlMsg>>,
    metrics: Option<Arc<status::metrics::Metrics>>,
    trim_unavailable_logged: bool,
    reloading: bool,
    totals: Totals,
    /// With `--ready notify`: the last start-up times measured (see `policy::ready_time`).
    ready_times: std::collections::VecDeque<Duration>,
}

impl Supervisor {
    pub fn new(setup: Setup) -> Supervisor {
        let cfg = setup.config;
        let pool = PoolPolicy::new(&setup.settings, setup.budget);
        let (tx, rx) = mpsc::unbounded_channel();
        let target = cfg.workers;
        let rng = match setup.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        Supervisor {
            limit: setup.limit,
            groups: setup.groups,
            launcher: setup.launcher,
            injector: setup.injector,
            listeners: setup.listeners,
            rundir: setup.rundir,
            notifier: Notifier::from_env(),
            settings: setup.settings,
            pool,
            tick: TICK,
            pool_usage: None,
            pool_reading: None,
            too_fast_logged: Default::default(),
            fatal: None,
            target,
            slots: (0..target).map(|_| Slot::new()).collect(),
            workers: Vec::new(),
            phase: Phase::Starting,
            start: Instant::now(),
            rng,
            tx,
            rx,
            signals: setup.signals,
            control_rx: setup.control_rx,
            metrics: setup.metrics,
            trim_unavailable_logged: false,
            reloading: false,
            ready_times: Default::default(),
            totals: Totals::default(),
            cfg,
        }
    }

    fn now_d(&self) -> Duration {
        Instant::now() - self.start
    }

    fn worker_mut(&mut self, pid: i32) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.pid == pid)
    }

    /// Why `w` is being replaced, if it is: its replacement is starting (or failing), or
    /// it is draining because its replacement is ready. What counts against
    /// `--max-recycling`.
    fn recycling(&self, w: &Worker) -> Option<RecycleReason> {
        match w.state.why() {
            Some(Why::Replaced(r)) => return Some(r),
            Some(Why::Hung) => return Some(RecycleReason::Timeout),
            _ => {}
        }
        self.workers
            .iter()
            .filter_map(|o| o.state.replaces())
            .find(|r| r.pid == w.pid)
            .map(|r| r.reason)
    }

    /// Recycles in progress: workers being replaced, plus replacements whose old worker is
    /// gone already (a timeout or stop-first recycle lasts until its replacement is ready).
    fn in_progress(&self) -> usize {
        let being_replaced = self
            .workers
            .iter()
            .filter(|w| self.recycling(w).is_some())
            .count();
        // (Also the replacement of a stop-first recycle, started once the old one is gone.)
        let after_hung = self
            .workers
            .iter()
            .filter(|w| {
                matches!(w.state, State::Starting { replaces: Some(r) }
                    if !self.workers.iter().any(|o| o.pid == r.pid))
            })
            .count();
        being_replaced + after_hung
    }
}
