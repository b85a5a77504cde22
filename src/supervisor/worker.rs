//! One worker process as the supervisor sees it: its state, with the data each state needs.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::cgroup::Usage;
use crate::edge::Group;
use crate::policy::{RecycleReason, WorkerPolicy};
use crate::status::WorkerSnapshot;

/// The worker a replacement is started for, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replacing {
    pub pid: i32,
    pub reason: RecycleReason,
}

/// Why a worker is being stopped. Decides what its exit means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// Shutdown or scale-down: an expected exit.
    Stop,
    /// Its replacement is ready: its exit completes a recycle.
    Replaced(RecycleReason),
    /// Not ready within `--ready-timeout`: a failure (the slot backs off). A replacement
    /// that fails leaves the worker it was to replace serving.
    NotReady { replaces: Option<Replacing> },
    /// Over its limit with no cgroup to enforce it (`--cgroup none`): a failure.
    OverLimit { replaces: Option<Replacing> },
    /// Missed its watchdog (`--timeout`): sent the timeout signal, SIGKILL at the end of
    /// the grace. Its replacement is the supervisor's doing (not a restart): its exit
    /// completes a timeout recycle.
    Hung,
}

impl Why {
    /// An exit we asked for (not counted as a restart, no backoff).
    pub fn expected(self) -> bool {
        matches!(self, Why::Stop | Why::Replaced(_) | Why::Hung)
    }
}

/// `Starting → Ready → Draining → Killed → gone` (any state can end by an exit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Started, not yet ready (no READY=1 yet, or its delay has not passed); once ready it
    /// takes over from the worker it `replaces`.
    Starting { replaces: Option<Replacing> },
    /// Serving.
    Ready,
    /// Sent the stop signal; SIGKILL at `until`.
    Draining { until: Instant, why: Why },
    /// Sent SIGKILL; waiting to be reaped.
    Killed { why: Why },
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting { .. } => "starting",
            State::Ready => "ready",
            State::Draining { why: Why::Hung, .. } | State::Killed { why: Why::Hung } => "hung",
            State::Draining { .. } | State::Killed { .. } => "draining",
        }
    }

    pub fn is_starting(self) -> bool {
        matches!(self, State::Starting { .. })
    }

    /// Draining or killed: on its way out.
    pub fn is_stopping(self) -> bool {
        matches!(self, State::Draining { .. } | State::Killed { .. })
    }

    /// Why it is on its way out.
    pub fn why(self) -> Option<Why> {
        match self {
            State::Draining { why, .. } | State::Killed { why } => Some(why),
            _ => None,
        }
    }

    /// The worker this one was started to replace, while that is still pending (a failed
    /// replacement keeps it until its exit).
    pub fn replaces(self) -> Option<Replacing> {
        match self {
            State::Starting { replaces }
            | State::Draining {
                why: Why::NotReady { replaces } | Why::OverLimit { replaces },
                ..
            }
            | State::Killed {
                why: Why::NotReady { replaces } | Why::OverLimit { replaces },
            } => replaces,
            _ => None,
        }
    }
}

/// Trimming of one worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trim {
    Idle,
    /// A trim runs on the blocking pool; its result comes back as an event.
    InFlight,
    /// `malloc_trim` cannot be injected (musl, static allocator): the policy relies on
    /// recycling. `trimrun ctl trim` may still try.
    Unavailable,
}

/// How a worker ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(Signal),
}

impl Exit {
    /// From a raw wait status (as `waitpid(2)` gives it).
    pub fn from_raw(status: i32) -> Exit {
        if libc::WIFSIGNALED(status) {
            Exit::Signal(Signal::try_from(libc::WTERMSIG(status)).unwrap_or(Signal::SIGKILL))
        } else {
            Exit::Code(libc::WEXITSTATUS(status))
        }
    }

    /// For the restarts counter: `exit` or `signal` (OOM kills are told apart by the caller
    /// from the kernel's counter).
    pub fn cause(self) -> &'static str {
        match self {
            Exit::Code(_) => "exit",
            Exit::Signal(_) => "signal",
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by {s}"),
        }
    }
}

/// When a worker last sent `WATCHDOG=1`: written by its notify task, read by the
/// supervisor's timers. Shared rather than sent as an event, so that a worker sending
/// keep-alives often costs the pool nothing.
#[derive(Debug, Clone, Default)]
pub struct Keepalive(std::sync::Arc<std::sync::Mutex<Option<Instant>>>);

impl Keepalive {
    pub fn touch(&self) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    }

    pub fn last(&self) -> Option<Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub trims: u64,
    pub released: u64,
    pub last_pause_us: Option<u64>,
    pub recycles: u64,
    pub last_reason: Option<String>,
    pub recycle_wait: Option<Duration>,
}

pub struct Worker {
    pub slot: usize,
    pub generation: u64,
    pub pid: i32,
    pub started: Instant,
    pub state: State,
    /// When it became ready: the watchdog's clock starts there.
    pub ready_at: Option<Instant>,
    /// Its last `WATCHDOG=1`.
    pub keepalive: Keepalive,
    pub trim: Trim,
    pub notify_task: Option<JoinHandle<()>>,
    pub notify_path: Option<PathBuf>,
    pub group: Box<dyn Group>,
    pub policy: WorkerPolicy,
    /// memory.high currently set on the worker's group (v2, while waiting for a slot).
    pub memory_high: Option<u64>,
    pub stats: Stats,
    pub usage: Option<Usage>,
    /// Whether its peak after its first seconds of serving was given to the pool policy
    /// as a start's cost ([`crate::policy::PoolPolicy::overlap_seen`]).
    pub cost_seen: bool,
}

impl Worker {
    /// `recycling`: the reason it is being replaced, if it is.
    pub fn snapshot(&self, limit: Option<u64>, recycling: Option<RecycleReason>) -> WorkerSnapshot {
        WorkerSnapshot {
            slot: self.slot,
            pid: self.pid,
            generation: self.generation,
            state: self.state.as_str().into(),
            age_secs: self.started.elapsed().as_secs_f64(),
            working_set: self.usage.as_ref().map_or(0, |u| u.working_set),
            limit,
            peak: self.usage.as_ref().and_then(|u| u.peak),
            rss: self.usage.as_ref().map(|u| u.anon + u.file),
            trims: self.stats.trims,
            released_bytes: self.stats.released,
            last_trim_pause_us: self.stats.last_pause_us,
            recycles: self.stats.recycles,
            last_reason: recycling
                .map(|r| r.to_string())
                .or_else(|| self.stats.last_reason.clone()),
            recycle_threshold: self.policy.recycle_threshold(),
            timeouts: 0,
        }
    }
}
