//! Memory cgroups for the workers: three backends behind one interface.
//!
//! - **v2** (`v2.rs`): `<own cgroup>/trimrun-<pid>/` with the leaf `supervisor/` holding
//!   trimrun itself and one `worker-<slot>-<gen>/` per worker (`memory.max`,
//!   `memory.oom.group=1`, `memory.swap.max=0`).
//! - **v1** (`v1.rs`): `<own memory cgroup>/trimrun-<pid>/worker-<slot>-<gen>/` with
//!   `memory.limit_in_bytes` (and the memory+swap limit at the same value).
//! - **none** (`none.rs`): no writable cgroupfs; a worker is its process tree, measured from
//!   `/proc/<pid>/smaps_rollup`, and limits are enforced by the supervisor.
//!
//! [`Manager::setup`] picks the backend (or honours `--cgroup`), says why, cleans groups
//! left by a killed earlier run, and builds `trimrun-<pid>/`. The supervisor then asks it
//! for one [`WorkerGroup`] per worker generation. A worker enters its group before exec:
//! the supervisor opens `cgroup.procs` with [`WorkerGroup::open_procs`] before forking, and
//! the child writes `"0"` (meaning "me") to that fd, an async-signal-safe `write(2)`.
//!
//! Functions that touch cgroupfs take the directory they work on ([`Roots`] for detection),
//! so the unit tests run on fixture trees; the real kernel is tested in `tests/cgroup_*.rs`
//! (v1 on the host, v2 in a VM).

mod common;
mod detect;
mod error;
mod none;
mod parse;
mod v1;
mod v2;

use std::fmt;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::{info, warn};

pub use crate::procfs::parse_smaps_rollup;
pub use detect::Roots;
pub use error::CgroupError;
pub use none::tree_pids;

/// The children of `pid` (from `/proc/<pid>/task/*/children`; empty when unreadable).
pub fn children_of(proc: &Path, pid: i32) -> Vec<i32> {
    none::children_of(proc, pid).unwrap_or_default()
}
pub use parse::{
    CgroupLine, MemoryEvents, Mount, OomControl, SmapsRollup, parse_flat_keyed, parse_limit,
    parse_meminfo_total, parse_memory_events, parse_memory_stat, parse_mountinfo,
    parse_oom_control, parse_proc_self_cgroup,
};

/// The smallest per-worker limit we accept: a Python interpreter with a web framework
/// imported is already 20-30 MiB, so less than this only produces OOM-kill loops.
pub const MIN_WORKER_LIMIT: u64 = 32 << 20;

/// How long `remove` keeps retrying while the kernel finishes tearing a group down.
const REMOVE_PATIENCE: Duration = Duration::from_secs(10);

/// `--cgroup auto|v2|v1|none`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Choice {
    #[default]
    Auto,
    V2,
    V1,
    None,
}

impl FromStr for Choice {
    type Err = CgroupError;
    fn from_str(s: &str) -> Result<Choice, CgroupError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Choice::Auto),
            "v2" | "2" => Ok(Choice::V2),
            "v1" | "1" => Ok(Choice::V1),
            "none" => Ok(Choice::None),
            _ => Err(CgroupError::BadChoice(s.to_string())),
        }
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Choice::Auto => "auto",
            Choice::V2 => "v2",
            Choice::V1 => "v1",
            Choice::None => "none",
        })
    }
}

/// The backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    V2,
    V1,
    None,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::V2 => "v2",
            Kind::V1 => "v1",
            Kind::None => "none",
        })
    }
}

/// One reading of a worker's memory, in bytes.
///
/// | field | v2 | v1 | none (sum over the process tree) |
/// | --- | --- | --- | --- |
/// | `current` | `memory.current` | `memory.usage_in_bytes` | PSS |
/// | `anon` | `anon` | `total_rss` (includes THP) | `Pss_Anon` |
/// | `file` | `file` | `total_cache` | `Pss_File + Pss_Shmem` |
/// | `working_set` | current − `inactive_file` | current − `total_inactive_file` | PSS |
/// | `peak` | `memory.peak` (5.19+) | `memory.max_usage_in_bytes` | none |
/// | `oom_kills` | `memory.events` `oom_kill` | `memory.oom_control` `oom_kill` | 0 |
///
/// cgroup figures include page cache and kernel memory charged to the group; file pages
/// are charged to whichever group touched them first, so `file` is not comparable across
/// backends, `anon` is.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Usage {
    pub current: u64,
    pub anon: u64,
    pub file: u64,
    pub working_set: u64,
    pub peak: Option<u64>,
    pub oom_kills: u64,
    pub limit: Option<u64>,
    pub pids: Vec<i32>,
}

/// `--limit auto`: share what trimrun may use (`available`, see
/// [`Manager::available_memory`]) minus `reserve` (trimrun itself, the surge worker's
/// start-up, the kernel) equally among `workers`, rounded down to whole pages.
pub fn auto_limit(available: u64, workers: usize, reserve: u64) -> Result<u64, CgroupError> {
    if workers == 0 {
        return Err(CgroupError::NoWorkers);
    }
    let per_worker = (available.saturating_sub(reserve) / workers as u64) & !4095;
    if per_worker < MIN_WORKER_LIMIT {
        return Err(CgroupError::AutoLimitTooSmall {
            available,
            reserve,
            workers,
            per_worker,
            min: MIN_WORKER_LIMIT,
        });
    }
    Ok(per_worker)
}

/// A reserve for [`auto_limit`] when the user gives none: 5% of `available`, at least
/// 32 MiB, at most 256 MiB.
pub fn default_reserve(available: u64) -> u64 {
    (available / 20).clamp(32 << 20, 256 << 20)
}

/// Reject a per-worker limit below [`MIN_WORKER_LIMIT`].
pub fn check_limit(limit: u64) -> Result<(), CgroupError> {
    if limit < MIN_WORKER_LIMIT {
        return Err(CgroupError::LimitTooSmall {
            limit,
            min: MIN_WORKER_LIMIT,
        });
    }
    Ok(())
}

/// What the chosen backend set up.
#[derive(Debug)]
enum State {
    V2 {
        parent: PathBuf,
        setup: v2::Setup,
    },
    V1 {
        base: PathBuf,
        /// Held while the pool lives (see `common::mkdir_locked`).
        _lock: common::GroupLock,
    },
    None,
}

/// The pool's cgroups: detection, the `trimrun-<pid>/` tree, worker groups, teardown.
#[derive(Debug)]
pub struct Manager {
    kind: Kind,
    reason: String,
    roots: Roots,
    found: detect::Found,
    state: State,
    torn_down: AtomicBool,
}

impl Manager {
    /// Detect on the real machine (or honour a forced choice) and build the tree.
    pub fn setup(choice: Choice) -> Result<Manager, CgroupError> {
        Manager::setup_at(choice, &Roots::system())
    }

    /// [`Manager::setup`] with explicit proc files and group name (tests).
    ///
    /// `auto`: v2 if a cgroup2 mount offers the memory controller to our cgroup and we can
    /// write there; else v1 if the v1 memory hierarchy is mounted and our memory cgroup is
    /// writable; else none. A forced choice that cannot work is an error with a remedy.
    pub fn setup_at(choice: Choice, roots: &Roots) -> Result<Manager, CgroupError> {
        // Unreadable proc files leave only the none backend; a forced v2/v1 then says why.
        let found = detect::discover(roots).unwrap_or_else(|e| {
            let why = detect::brief(&e);
            detect::Found {
                v2_missing: why.clone(),
                v1_missing: why,
                ..Default::default()
            }
        });
        let (state, kind, reason) = match choice {
            Choice::None => (
                State::None,
                Kind::None,
                "forced by --cgroup none".to_string(),
            ),
            Choice::V2 => {
                let (s, why) = Manager::try_v2(roots, &found)?;
                (s, Kind::V2, format!("forced by --cgroup v2; {why}"))
            }
            Choice::V1 => {
                let (s, why) = Manager::try_v1(roots, &found)?;
                (s, Kind::V1, format!("forced by --cgroup v1; {why}"))
            }
            Choice::Auto => match Manager::try_v2(roots, &found) {
                Ok((s, why)) => (s, Kind::V2, why),
                Err(e2) => {
                    let not_v2 = format!("cgroup v2 unusable: {}", detect::brief(&e2));
                    match Manager::try_v1(roots, &found) {
                        Ok((s, why)) => (s, Kind::V1, format!("{not_v2}; {why}")),
                        Err(e1) => (
                            State::None,
                            Kind::None,
                            format!(
                                "{not_v2}; cgroup v1 unusable: {}; measuring workers from /proc and enforcing limits by recycling",
                                detect::brief(&e1)
                            ),
                        ),
                    }
                }
            },
        };
        info!(backend = %kind, reason = %reason, "cgroup backend chosen");
        Ok(Manager {
            kind,
            reason,
            roots: roots.clone(),
            found,
            state,
            torn_down: AtomicBool::new(false),
        })
    }

    fn try_v2(roots: &Roots, found: &detect::Found) -> Result<(State, String), CgroupError> {
        let place = detect::check_v2(found)?;
        Manager::clean_stale(roots, &place.dir);
        let setup = v2::setup(&place.dir, &roots.group_name(), roots.pid)?;
        let why = format!(
            "cgroup v2 at {} offers the memory controller and is writable",
            place.dir.display()
        );
        Ok((
            State::V2 {
                parent: place.dir.clone(),
                setup,
            },
            why,
        ))
    }

    fn try_v1(roots: &Roots, found: &detect::Found) -> Result<(State, String), CgroupError> {
        let place = detect::check_v1(found)?;
        Manager::clean_stale(roots, &place.dir);
        let (base, lock) = v1::setup(&place.dir, &roots.group_name())?;
        let why = format!(
            "cgroup v1 memory hierarchy at {} is writable",
            place.dir.display()
        );
        Ok((State::V1 { base, _lock: lock }, why))
    }

    fn clean_stale(roots: &Roots, parent: &Path) {
        for name in common::clean_stale(&roots.proc, parent, roots.pid) {
            info!(group = %parent.join(&name).display(), "removed stale cgroup of an earlier run");
        }
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Why this backend was chosen (logged at setup; for `trimrun status`).
    pub fn reason(&self) -> &str {
        &self.reason
    }

    /// `trimrun-<pid>/`, if a cgroup backend is in use.
    pub fn base(&self) -> Option<&Path> {
        match &self.state {
            State::V2 { setup, .. } => Some(&setup.base),
            State::V1 { base, .. } => Some(base),
            State::None => None,
        }
    }

    /// What trimrun may use in total: the smallest memory limit on our own cgroup and its
    /// ancestors (v2 `memory.max`, v1 `memory.limit_in_bytes` and
    /// `hierarchical_memory_limit`; read even with the none backend, as a read-only
    /// cgroupfs is still readable), else `MemTotal`.
    pub fn available_memory(&self) -> Result<u64, CgroupError> {
        self.available_memory_from().map(|(v, _)| v)
    }

    /// [`Manager::available_memory`] and the file it came from.
    pub fn available_memory_from(&self) -> Result<(u64, String), CgroupError> {
        let meminfo = common::read(&self.roots.meminfo)?;
        let total = parse::parse_meminfo_total(&meminfo).ok_or_else(|| CgroupError::Parse {
            what: "MemTotal",
            path: self.roots.meminfo.clone(),
            detail: "no MemTotal line".into(),
        })?;
        let mut best = (
            total,
            format!("MemTotal in {}", self.roots.meminfo.display()),
        );
        let mut limits = Vec::new();
        if let Some(p) = &self.found.v2 {
            limits.extend(v2::ancestor_limits(&p.dir, &p.mount.mount_point));
        }
        if let Some(p) = &self.found.v1 {
            limits.extend(v1::ancestor_limits(&p.dir, &p.mount.mount_point));
        }
        for (path, l) in limits {
            if l < best.0 {
                best = (l, path.display().to_string());
            }
        }
        Ok(best)
    }

    /// Cap the whole pool at `budget` bytes (`--pool-limit`): v2 `trimrun-<pid>/memory.max`
    /// (and `memory.high` 1/32 below it), v1 the hierarchical `trimrun-<pid>/`'s
    /// `memory.limit_in_bytes`. Without a cgroup backend nothing enforces it (the policy
    /// still recycles by it): the error says so.
    pub fn set_pool_limit(&self, budget: u64) -> Result<(), CgroupError> {
        match &self.state {
            State::V2 { setup, .. } => {
                v2::set_pool_limit(&setup.base, budget, crate::policy::pool_memory_high(budget))
            }
            State::V1 { base, .. } => v1::set_pool_limit(base, budget),
            State::None => Err(CgroupError::Unavailable {
                kind: "none",
                reason: "no cgroup holds the pool, so the kernel does not enforce --pool-limit"
                    .into(),
                remedy: "run trimrun as root or under systemd with Delegate=yes; without a cgroup trimrun still trims and recycles by the budget",
            }),
        }
    }

    /// The pool's group (`trimrun-<pid>`), if the backend has one.
    pub fn pool_dir(&self) -> Option<&Path> {
        match &self.state {
            State::V2 { setup, .. } => Some(&setup.base),
            State::V1 { base, .. } => Some(base),
            State::None => None,
        }
    }

    /// The pool group's own reading (all workers, and on v2 trimrun's own leaf).
    pub fn pool_usage(&self) -> Option<Usage> {
        match &self.state {
            State::V2 { setup, .. } => v2::usage(&setup.base).ok(),
            State::V1 { base, .. } => v1::usage(base).ok(),
            State::None => None,
        }
    }

    /// Create the group for worker `slot`, generation `generation`, limited to `limit`
    /// bytes (None: no limit of its own). A group of the same name left over is replaced.
    pub fn create_worker(
        &self,
        slot: usize,
        generation: u64,
        limit: Option<u64>,
    ) -> Result<WorkerGroup, CgroupError> {
        if let Some(l) = limit {
            self.check_worker_limit(l)?;
        }
        self.create_checked_worker(slot, generation, limit)
    }

    /// Reject a per-worker limit below [`MIN_WORKER_LIMIT`] or above what trimrun may use
    /// ([`Manager::available_memory`]). Start-up calls it once for the pool's limit.
    pub fn check_worker_limit(&self, limit: u64) -> Result<(), CgroupError> {
        check_limit(limit)?;
        let (available, source_desc) = self.available_memory_from()?;
        if limit > available {
            return Err(CgroupError::LimitAboveParent {
                limit,
                available,
                source_desc,
            });
        }
        Ok(())
    }

    /// [`Manager::create_worker`] for a limit already checked with
    /// [`Manager::check_worker_limit`] (the supervisor's path: checked once at start-up).
    pub fn create_checked_worker(
        &self,
        slot: usize,
        generation: u64,
        limit: Option<u64>,
    ) -> Result<WorkerGroup, CgroupError> {
        let name = format!("worker-{slot}-{generation}");
        let backend = match &self.state {
            State::V2 { setup, .. } => Backend::V2(Self::fresh(&setup.base, &name, |b, n| {
                v2::create_worker(b, n, limit)
            })?),
            State::V1 { base, .. } => Backend::V1(Self::fresh(base, &name, |b, n| {
                v1::create_worker(b, n, limit)
            })?),
            State::None => Backend::None,
        };
        Ok(WorkerGroup {
            name,
            backend,
            limit,
            proc: self.roots.proc.clone(),
            seen: Default::default(),
            warned_estimate: AtomicBool::new(false),
        })
    }

    /// Create `base/name`, first removing a leftover of the same name.
    fn fresh(
        base: &Path,
        name: &str,
        create: impl Fn(&Path, &str) -> Result<PathBuf, CgroupError>,
    ) -> Result<PathBuf, CgroupError> {
        let dir = base.join(name);
        if dir.exists() {
            // One attempt, no waiting (this runs on the supervisor's thread): a leftover that
            // is still busy fails this start, and the slot retries after its backoff.
            warn!(group = %dir.display(), "replacing a leftover worker cgroup");
            common::destroy_tree(&dir, Duration::ZERO)?;
        }
        create(base, name)
    }

    /// Remove `trimrun-<pid>/` (workers should be gone; leftovers are killed). On v2,
    /// trimrun first moves back into its original cgroup. Idempotent; also run on drop.
    pub fn teardown(&self) {
        if self.torn_down.swap(true, Ordering::SeqCst) {
            return;
        }
        match &self.state {
            State::V2 { parent, setup } => v2::teardown(parent, setup, self.roots.pid),
            State::V1 { base, .. } => {
                if let Err(e) = common::destroy_tree(base, REMOVE_PATIENCE) {
                    warn!(error = %e, "cannot remove trimrun's cgroup tree");
                }
            }
            State::None => {}
        }
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[derive(Debug)]
enum Backend {
    V2(PathBuf),
    V1(PathBuf),
    None,
}

/// The cgroup of one worker generation (or, with the none backend, its process tree).
#[derive(Debug)]
pub struct WorkerGroup {
    name: String,
    backend: Backend,
    limit: Option<u64>,
    proc: PathBuf,
    /// none: every process seen in the worker's tree, with its start time, so that what
    /// the worker leaves behind (a daemon re-parented away from it) is still its own to
    /// kill, and a recycled pid never is.
    seen: std::sync::Mutex<std::collections::BTreeMap<i32, u64>>,
    /// none: a process of this worker was measured by RSS (smaps_rollup unreadable); said once.
    warned_estimate: AtomicBool,
}

impl WorkerGroup {
    /// `worker-<slot>-<gen>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cgroup directory; None for the none backend.
    pub fn path(&self) -> Option<&Path> {
        match &self.backend {
            Backend::V2(d) | Backend::V1(d) => Some(d),
            Backend::None => None,
        }
    }

    pub fn kind(&self) -> Kind {
        match self.backend {
            Backend::V2(_) => Kind::V2,
            Backend::V1(_) => Kind::V1,
            Backend::None => Kind::None,
        }
    }

    /// The limit the group was created with.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// `cgroup.procs` opened for writing (close-on-exec), to be opened BEFORE fork: the
    /// child writes `"0"` to it before exec, which moves the calling process. None for the
    /// none backend.
    pub fn open_procs(&self) -> Result<Option<OwnedFd>, CgroupError> {
        let Some(dir) = self.path() else {
            return Ok(None);
        };
        let path = dir.join("cgroup.procs");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .map_err(|e| CgroupError::io("open for writing", &path, e))?;
        Ok(Some(OwnedFd::from(f)))
    }

    /// Memory of the worker; `root_pid` (the worker's pid) is only used by the none
    /// backend, which measures that process and its descendants.
    pub fn usage(&self, root_pid: Option<i32>) -> Result<Usage, CgroupError> {
        match &self.backend {
            Backend::V2(d) => v2::usage(d),
            Backend::V1(d) => v1::usage(d),
            Backend::None => {
                let (u, estimated) = none::usage(&self.proc, root_pid, self.limit);
                self.remember(&u.pids);
                if let Some(&pid) = estimated.first()
                    && !self.warned_estimate.swap(true, Ordering::Relaxed)
                {
                    warn!(
                        worker = %self.name,
                        pid,
                        "cannot read /proc/{pid}/smaps_rollup (a non-dumpable process, and trimrun lacks CAP_SYS_PTRACE): counting its RSS from statm instead, which includes shared pages"
                    );
                }
                Ok(u)
            }
        }
    }

    /// none: note the processes of the worker's tree (and when each started).
    fn remember(&self, pids: &[i32]) {
        let Ok(mut seen) = self.seen.lock() else {
            return;
        };
        seen.retain(|p, _| pids.contains(p) || self.proc.join(p.to_string()).exists());
        for &p in pids {
            if let std::collections::btree_map::Entry::Vacant(e) = seen.entry(p)
                && let Some(t) = none::start_ticks(&self.proc, p)
            {
                e.insert(t);
            }
        }
    }

    /// none: processes once seen in the worker's tree that are still the same processes
    /// (same pid, same start time), wherever they were re-parented since.
    pub fn left_behind(&self) -> Vec<i32> {
        let Ok(seen) = self.seen.lock() else {
            return vec![];
        };
        seen.iter()
            .filter(|(p, t)| none::start_ticks(&self.proc, **p) == Some(**t))
            .map(|(p, _)| *p)
            .collect()
    }

    /// The kernel's OOM-kill counter of this group; 0 for none. Compare readings, don't
    /// count events with it: with `memory.oom.group=1` Linux 6.1 counts the victim twice
    /// (once as the victim, once in the group kill).
    pub fn oom_kills(&self) -> Result<u64, CgroupError> {
        match &self.backend {
            Backend::V2(d) => v2::oom_kills(d),
            Backend::V1(d) => v1::oom_kills(d),
            Backend::None => Ok(0),
        }
    }

    /// The processes of the worker.
    pub fn pids(&self, root_pid: Option<i32>) -> Result<Vec<i32>, CgroupError> {
        match &self.backend {
            Backend::V2(d) | Backend::V1(d) => common::read_pids(&d.join("cgroup.procs")),
            Backend::None => {
                let pids = root_pid
                    .map(|r| none::tree_pids(&self.proc, r))
                    .unwrap_or_default();
                self.remember(&pids);
                Ok(pids)
            }
        }
    }

    /// Whether [`set_high`](Self::set_high) does anything (cgroup v2 only).
    pub fn has_memory_high(&self) -> bool {
        matches!(self.backend, Backend::V2(_))
    }

    /// v2 `memory.high` (None = `max`): throttle and reclaim above it instead of killing.
    /// No-op on v1 and none.
    pub fn set_high(&self, bytes: Option<u64>) -> Result<(), CgroupError> {
        match &self.backend {
            Backend::V2(d) => v2::set_high(d, bytes),
            _ => Ok(()),
        }
    }

    /// SIGKILL everything in the worker: `cgroup.kill` on v2 (5.14+), else each pid.
    pub fn kill_all(&self, root_pid: Option<i32>) -> Result<(), CgroupError> {
        match &self.backend {
            Backend::V2(d) | Backend::V1(d) => common::kill_cgroup(d),
            Backend::None => {
                // A few rounds, to catch children forked while we were killing; then what
                // the worker left behind that is no longer in its tree (daemons).
                for _ in 0..3 {
                    let pids = self.pids(root_pid)?;
                    if pids.is_empty() {
                        break;
                    }
                    common::kill_pids(&pids);
                }
                common::kill_pids(&self.left_behind());
                Ok(())
            }
        }
    }

    /// Kill what is left and rmdir the group, retrying while the kernel finishes its
    /// teardown (a group is busy until its last process has exited): blocks, so call it on
    /// a blocking thread. No-op for none.
    pub fn remove(&self) -> Result<(), CgroupError> {
        match self.path() {
            Some(d) => common::destroy_tree(d, REMOVE_PATIENCE),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
