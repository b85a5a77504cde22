//! One worker process as the supervisor sees it.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::debug;

use crate::cgroup::{Usage, WorkerGroup};
use crate::config::{Config, Ready};
use crate::policy::{RecycleReason, WorkerPolicy};
use crate::spawn;
use crate::status::WorkerSnapshot;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Forked, not yet ready (no READY=1 yet, or its delay has not passed).
    Starting,
    /// Serving.
    Ready,
    /// Told to stop; SIGKILL at `kill_at`.
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Ready => "ready",
            State::Draining => "draining",
        }
    }
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
    pub notify_task: Option<JoinHandle<()>>,
    pub notify_path: Option<PathBuf>,
    pub group: WorkerGroup,
    pub policy: WorkerPolicy,
    /// This worker is the replacement of that pid (until it is ready).
    pub replaces: Option<i32>,
    /// This worker is being replaced, for this reason (from the replacement's start until
    /// this one is gone): what counts against --max-recycling.
    pub recycling: Option<RecycleReason>,
    /// memory.high currently set on the worker's group (v2, while waiting for a slot).
    pub memory_high: Option<u64>,
    pub trim_in_flight: bool,
    pub trim_unavailable: bool,
    pub kill_at: Option<Instant>,
    pub killed: bool,
    pub counts_as_failure: bool,
    pub stats: Stats,
    pub usage: Option<Usage>,
}

impl Worker {
    /// Ask the worker to stop: the stop signal to its process group; SIGKILL after `graceful`.
    pub fn begin_drain(&mut self, sig: Signal, graceful: Duration) {
        if self.state == State::Draining {
            return;
        }
        self.state = State::Draining;
        self.kill_at = Some(Instant::now() + graceful);
        if let Err(e) = spawn::signal_group(self.pid, sig) {
            debug!(pid = self.pid, error = %e, "cannot signal the worker's process group");
        }
    }

    /// SIGKILL the worker's process group and anything else in its cgroup.
    pub fn kill(&mut self) {
        self.killed = true;
        self.state = State::Draining;
        let _ = spawn::signal_group(self.pid, Signal::SIGKILL);
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid), Signal::SIGKILL);
        let _ = self.group.kill_all(Some(self.pid));
    }

    /// The next moment something must happen to this worker.
    pub fn deadline(&self, cfg: &Config) -> Option<Instant> {
        match self.state {
            State::Starting => {
                let timeout = self.started + cfg.ready_timeout;
                Some(match cfg.ready {
                    Ready::Delay(d) => (self.started + d).min(timeout),
                    Ready::Notify => timeout,
                })
            }
            State::Draining if !self.killed => self.kill_at,
            _ => None,
        }
    }

    pub fn snapshot(&self, limit: Option<u64>) -> WorkerSnapshot {
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
            last_reason: self
                .recycling
                .map(|r| r.to_string())
                .or_else(|| self.stats.last_reason.clone()),
            recycle_threshold: self.policy.recycle_threshold(),
            timeouts: 0,
        }
    }
}
