//! cgroup v2 backend: `<own>/trimrun-<pid>/{supervisor, worker-<slot>-<gen>}`.
//!
//! The no-internal-processes rule shapes the layout: a cgroup that hands the memory
//! controller to its children may hold no processes itself (the root excepted). So trimrun
//! first moves itself into the leaf `supervisor/`, and only then enables `+memory` in its
//! own cgroup (if it was not already) and in `trimrun-<pid>/`. Teardown undoes that in
//! reverse, so trimrun can move back into its original cgroup.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tracing::{debug, warn};

use super::Usage;
use super::common::{self, read, read_limit, read_pids, read_u64, write, write_if_exists};
use super::error::CgroupError;
use super::parse;

pub const SUPERVISOR: &str = "supervisor";

/// Is `controller` enabled in `dir/cgroup.subtree_control`?
fn subtree_has(dir: &Path, controller: &str) -> Result<bool, CgroupError> {
    Ok(read(&dir.join("cgroup.subtree_control"))?
        .split_whitespace()
        .any(|c| c == controller))
}

fn enable_memory(dir: &Path) -> Result<(), CgroupError> {
    let path = dir.join("cgroup.subtree_control");
    write(&path, "+memory").map_err(|e| match e.raw_os_error() {
        Some(libc::EBUSY) => CgroupError::InternalProcesses {
            path: dir.to_path_buf(),
        },
        Some(libc::ENOENT) => CgroupError::NoMemoryController {
            path: dir.to_path_buf(),
            controllers: read(&dir.join("cgroup.controllers"))
                .unwrap_or_default()
                .trim()
                .to_string(),
        },
        _ => e,
    })
}

/// What setup changed, so teardown can undo exactly that.
#[derive(Debug, Clone)]
pub struct Setup {
    pub base: PathBuf,
    pub enabled_in_parent: bool,
    /// Held while the pool lives: what tells a later start that this tree is not stale.
    pub _lock: std::sync::Arc<common::GroupLock>,
}

/// Build `parent/name/supervisor`, move `pid` there, enable +memory down to `parent/name`.
/// On failure, whatever was done is undone.
pub fn setup(parent: &Path, name: &str, pid: i32) -> Result<Setup, CgroupError> {
    let base = parent.join(name);
    let lock = common::mkdir_locked(&base).inspect_err(|_| {
        let _ = std::fs::remove_dir(&base);
    })?;
    let sup = base.join(SUPERVISOR);
    let mut s = Setup {
        base: base.clone(),
        enabled_in_parent: false,
        _lock: std::sync::Arc::new(lock),
    };
    let result = (|| {
        common::mkdir(&sup)?;
        write(&sup.join("cgroup.procs"), &pid.to_string())?;
        if !subtree_has(parent, "memory")? {
            enable_memory(parent)?;
            s.enabled_in_parent = true;
        }
        enable_memory(&base)
    })();
    match result {
        Ok(()) => Ok(s),
        Err(e) => {
            teardown(parent, &s, pid);
            Err(e)
        }
    }
}

/// Undo [`setup`]: kill and remove leftover workers, give back the memory controller we
/// enabled, move `pid` back into `parent`, remove the tree. Best effort, logs failures.
pub fn teardown(parent: &Path, s: &Setup, pid: i32) {
    let sup = s.base.join(SUPERVISOR);
    for child in common::child_dirs(&s.base) {
        if child != sup {
            warn!(group = %child.display(), "removing a worker cgroup left at teardown");
            if let Err(e) = common::destroy_tree(&child, Duration::from_secs(5)) {
                warn!(error = %e, "cannot remove worker cgroup");
            }
        }
    }
    let _ = write_if_exists(&s.base.join("cgroup.subtree_control"), "-memory");
    if s.enabled_in_parent
        && let Err(e) = write(&parent.join("cgroup.subtree_control"), "-memory")
    {
        debug!(error = %e, "cannot disable the memory controller we enabled");
    }
    if sup.exists() {
        let ours = read_pids(&sup.join("cgroup.procs")).unwrap_or_default();
        if ours.contains(&pid)
            && let Err(e) = write(&parent.join("cgroup.procs"), &pid.to_string())
        {
            warn!(error = %e, "cannot move trimrun back into its original cgroup");
        }
    }
    for dir in [&sup, &s.base] {
        if let Err(e) = common::rmdir_retry(dir, Duration::from_secs(2)) {
            warn!(error = %e, "cannot remove cgroup at teardown");
        }
    }
}

/// `base/name` with `memory.max`, `memory.oom.group=1` and `memory.swap.max=0`.
pub fn create_worker(base: &Path, name: &str, limit: Option<u64>) -> Result<PathBuf, CgroupError> {
    common::create_configured(base.join(name), |dir| {
        if let Some(limit) = limit {
            write(&dir.join("memory.max"), &limit.to_string())?;
        }
        // A worker is one unit: when the kernel OOM-kills in it, kill all of it rather than
        // leave a half-dead worker (a master without its children, or the reverse).
        write_if_exists(&dir.join("memory.oom.group"), "1")?;
        // Swapping a Python heap is slower than recycling the worker.
        write_if_exists(&dir.join("memory.swap.max"), "0")?;
        Ok(())
    })
}

/// The pool budget: `trimrun-<pid>/memory.max`, with `memory.high` at `high` below it as a
/// brake (the kernel reclaims and slows allocations there before the OOM killer acts at
/// the budget). The group holds the workers and trimrun's own `supervisor/` leaf (a few
/// MiB), both charged to the budget.
pub fn set_pool_limit(base: &Path, budget: u64, high: u64) -> Result<(), CgroupError> {
    write(&base.join("memory.max"), &budget.to_string())?;
    write(&base.join("memory.high"), &high.to_string())?;
    Ok(())
}

pub fn usage(dir: &Path) -> Result<Usage, CgroupError> {
    let current = read_u64(&dir.join("memory.current"))?;
    let stat = parse::parse_memory_stat(&read(&dir.join("memory.stat"))?);
    let get = |k: &str| stat.get(k).copied().unwrap_or(0);
    let peak_path = dir.join("memory.peak");
    let peak = if peak_path.exists() {
        Some(read_u64(&peak_path)?)
    } else {
        None
    };
    Ok(Usage {
        current,
        anon: get("anon"),
        file: get("file"),
        // As the kubelet computes it: what reclaim could not easily take back.
        working_set: current.saturating_sub(get("inactive_file")),
        peak,
        oom_kills: oom_kills(dir)?,
        limit: read_limit(&dir.join("memory.max"))?,
        pids: read_pids(&dir.join("cgroup.procs"))?,
    })
}

pub fn oom_kills(dir: &Path) -> Result<u64, CgroupError> {
    Ok(parse::parse_memory_events(&read(&dir.join("memory.events"))?).oom_kill)
}

pub fn set_high(dir: &Path, bytes: Option<u64>) -> Result<(), CgroupError> {
    let v = bytes.map_or_else(|| "max".to_string(), |b| b.to_string());
    write(&dir.join("memory.high"), &v)
}

/// `memory.max` of `dir` and every ancestor up to (and including) `top`.
pub fn ancestor_limits(dir: &Path, top: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut d = Some(dir);
    while let Some(cur) = d {
        if let Ok(Some(l)) = read_limit(&cur.join("memory.max")) {
            out.push((cur.join("memory.max"), l));
        }
        if cur == top {
            break;
        }
        d = cur.parent();
    }
    out
}
