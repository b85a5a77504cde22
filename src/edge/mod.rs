//! The kernel edge the supervisor drives, behind three small traits.
//!
//! - [`Groups`] / [`Group`]: where a worker's memory lives and is measured (cgroup v2, v1,
//!   or its process tree with the none backend). Real: [`crate::cgroup::Manager`] and
//!   [`crate::cgroup::WorkerGroup`].
//! - [`Launcher`]: starts a worker process in its group, signals it, reports exits.
//!   Real: [`ForkExec`] (fork+exec, `waitpid` on SIGCHLD). A zygote (`--preload`) is a second
//!   implementation of the same trait.
//! - [`Injector`]: trims a worker's processes from outside. Real: [`Ptrace`].
//!
//! The fakes in [`fake`] keep everything in memory (no process, no cgroupfs, no ptrace), so
//! the supervisor's state machine runs in unit tests on a paused tokio clock.

pub mod fake;
mod real;
mod zygote;

use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::pin::Pin;

use nix::sys::signal::Signal;

use crate::cgroup::{CgroupError, Kind, Usage};
use crate::spawn::SpawnError;
use crate::supervisor::Exit;
use crate::trim::{TrimError, TrimReport};

pub use real::{ForkExec, Ptrace};
pub use zygote::Zygotes;

/// The zygote of `--preload`, for `trimrun status`.
pub use crate::status::ZygoteSnapshot as ZygoteInfo;

/// Creates one [`Group`] per worker generation; removes the pool's tree at the end.
pub trait Groups: Send {
    /// The backend in use (for logs, status and whether the supervisor enforces limits).
    fn kind(&self) -> Kind;
    /// The group of worker `slot`, generation `generation`, limited to `limit` bytes. The
    /// limit was validated once at start-up.
    fn create(
        &self,
        slot: usize,
        generation: u64,
        limit: Option<u64>,
    ) -> Result<Box<dyn Group>, CgroupError>;
    /// Remove the pool's groups (idempotent).
    fn teardown(&self);
    /// Cap the whole pool at `budget` bytes (`--pool-limit`); an error when the backend
    /// cannot enforce it.
    fn set_pool_limit(&self, budget: u64) -> Result<(), CgroupError> {
        let _ = budget;
        Ok(())
    }
    /// The pool group's reading, if the backend has a pool group.
    fn pool_reading(&self) -> Option<PoolReading> {
        None
    }
}

/// The pool group's memory, as the budget is measured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolReading {
    pub working_set: u64,
    /// The group's high-water mark (v2 `memory.peak`, v1 `memory.max_usage_in_bytes`).
    pub peak: Option<u64>,
    /// The group's directory.
    pub path: std::path::PathBuf,
}

/// The memory group of one worker generation. `root_pid` is the worker's pid: the none
/// backend measures that process and its descendants; the cgroup backends ignore it.
pub trait Group: Send + Sync + 'static {
    /// The cgroup directory, if any (logs, and the launcher's placement).
    fn path(&self) -> Option<&Path>;
    /// `cgroup.procs` opened for writing, for the child to join before exec; None without
    /// a cgroup.
    fn open_procs(&self) -> Result<Option<OwnedFd>, CgroupError>;
    fn usage(&self, root_pid: i32) -> Result<Usage, CgroupError>;
    /// The kernel's OOM-kill counter of this group (0 without a cgroup).
    fn oom_kills(&self) -> Result<u64, CgroupError>;
    fn pids(&self, root_pid: i32) -> Result<Vec<i32>, CgroupError>;
    /// Whether [`Group::set_high`] does anything (cgroup v2).
    fn has_memory_high(&self) -> bool;
    fn set_high(&self, bytes: Option<u64>) -> Result<(), CgroupError>;
    /// SIGKILL everything in the group.
    fn kill_all(&self, root_pid: i32) -> Result<(), CgroupError>;
    /// Remove the group (may block while the kernel tears it down).
    fn remove(&self) -> Result<(), CgroupError>;
    /// Processes once seen in the worker's tree that still run, wherever they were
    /// re-parented since (none backend; a cgroup keeps them itself).
    fn left_behind(&self) -> Vec<i32> {
        Vec::new()
    }
}

/// What one launch needs besides what the launcher was built with (command, sockets).
pub struct Launch<'a> {
    pub slot: usize,
    pub generation: u64,
    pub group: &'a dyn Group,
    /// The worker's own sd_notify socket, with `--ready notify` or `--timeout`.
    pub notify_socket: Option<&'a Path>,
    /// `--timeout`: the worker gets `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub watchdog: Option<std::time::Duration>,
}

/// Starts workers and tells the supervisor when they end.
pub trait Launcher: Send {
    /// Start one worker in its group. Returns its pid (also its process group).
    fn launch(&mut self, req: &Launch<'_>) -> Result<i32, SpawnError>;
    /// Send `sig` to the worker's process group (SIGKILL: also to the worker itself).
    fn signal(&self, pid: i32, sig: Signal);
    /// Resolves when [`Launcher::reap`] may have something (SIGCHLD for fork+exec).
    fn exited(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>>;
    /// Collect ended children without blocking, orphans included (the caller ignores pids
    /// it does not know).
    fn reap(&mut self) -> Vec<(i32, Exit)>;
    /// SIGKILL the processes re-parented to trimrun (it is a child subreaper: daemons a
    /// worker left behind end up as its children) except those in `keep`. Returns them.
    fn kill_orphans(&self, _keep: &[i32]) -> Vec<i32> {
        Vec::new()
    }
    /// Some(d) when a launch now would have to wait (the zygote of `--preload` is still
    /// importing the app): the supervisor starts no worker and decides no recycle, and asks
    /// again after `d`. Never blocks.
    fn not_before(&mut self) -> Option<std::time::Duration> {
        None
    }
    /// Why the pool cannot go on with this launcher, if it cannot (a `--preload` command
    /// that does not speak the zygote protocol): the supervisor stops the pool and trimrun
    /// exits 2 with this message.
    fn fatal(&self) -> Option<String> {
        None
    }
    /// A rolling restart begins (HUP, `ctl reload`): workers launched from now on must run
    /// the new code. (The zygote launcher starts a new zygote.)
    fn reload(&mut self) {}
    /// The zygote workers are forked from, with `--preload`.
    fn zygote(&self) -> Option<ZygoteInfo> {
        None
    }
}

/// Trims the processes of a worker. Blocking (ptrace wants one OS thread from attach to
/// detach): the supervisor calls it on the blocking pool.
pub trait Injector: Send + Sync + 'static {
    fn trim(&self, pids: &[i32]) -> Vec<Result<TrimReport, TrimError>>;
}
