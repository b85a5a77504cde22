//! cgroup v1 backend: `<own memory cgroup>/trimrun-<pid>/worker-<slot>-<gen>`.
//!
//! v1 has no no-internal-processes rule, so trimrun stays where it is. Limits are
//! `memory.limit_in_bytes` plus, where swap accounting exists, `memory.memsw.limit_in_bytes`
//! at the same value (memory + swap = memory: no swap).

use std::path::{Path, PathBuf};

use tracing::debug;

use super::Usage;
use super::common::{self, read, read_limit, read_pids, read_u64, write, write_if_exists};
use super::error::CgroupError;
use super::parse;

/// Create `parent/name`. Hierarchical accounting (`memory.use_hierarchy=1`) is what makes
/// the limits of ancestors apply to the workers; it is forced on since Linux 5.x, and on
/// older kernels it can only be set on an empty group, i.e. now.
pub fn setup(parent: &Path, name: &str) -> Result<(PathBuf, common::GroupLock), CgroupError> {
    let base = parent.join(name);
    let lock = common::mkdir_locked(&base)?;
    let uh = base.join("memory.use_hierarchy");
    if read(&uh).map(|t| t.trim() == "0").unwrap_or(false)
        && let Err(e) = write(&uh, "1")
    {
        debug!(error = %e, "cannot enable memory.use_hierarchy");
    }
    Ok((base, lock))
}

pub fn create_worker(base: &Path, name: &str, limit: Option<u64>) -> Result<PathBuf, CgroupError> {
    common::create_configured(base.join(name), |dir| {
        if let Some(limit) = limit {
            // memsw must stay >= limit: on a new group both are unlimited, so set the
            // memory limit first, then memory+swap to the same value.
            write(&dir.join("memory.limit_in_bytes"), &limit.to_string())?;
            write_if_exists(&dir.join("memory.memsw.limit_in_bytes"), &limit.to_string())?;
        }
        Ok(())
    })
}

/// The pool budget: `base`'s own `memory.limit_in_bytes` (and memsw, as for workers).
/// With hierarchical accounting the workers below it are charged to it, so when their sum
/// reaches the budget the kernel reclaims, then OOM-kills inside the pool. trimrun itself
/// is not in `base` on v1.
pub fn set_pool_limit(base: &Path, budget: u64) -> Result<(), CgroupError> {
    write(&base.join("memory.limit_in_bytes"), &budget.to_string())?;
    write_if_exists(
        &base.join("memory.memsw.limit_in_bytes"),
        &budget.to_string(),
    )?;
    Ok(())
}

/// `total_*` keys are hierarchical (this group and its children). `total_rss` is anonymous
/// memory and already includes transparent huge pages (`total_rss_huge` is a subset of it,
/// not an addition); shmem is counted in `total_cache`, as v2 counts it in `file`.
pub fn usage(dir: &Path) -> Result<Usage, CgroupError> {
    let current = read_u64(&dir.join("memory.usage_in_bytes"))?;
    let stat = parse::parse_memory_stat(&read(&dir.join("memory.stat"))?);
    let get = |k: &str| stat.get(k).copied().unwrap_or(0);
    Ok(Usage {
        current,
        anon: get("total_rss"),
        file: get("total_cache"),
        working_set: current.saturating_sub(get("total_inactive_file")),
        peak: Some(read_u64(&dir.join("memory.max_usage_in_bytes"))?),
        oom_kills: oom_kills(dir)?,
        limit: read_limit(&dir.join("memory.limit_in_bytes"))?,
        pids: read_pids(&dir.join("cgroup.procs"))?,
    })
}

pub fn oom_kills(dir: &Path) -> Result<u64, CgroupError> {
    Ok(parse::parse_oom_control(&read(&dir.join("memory.oom_control"))?).oom_kill)
}

/// `memory.limit_in_bytes` of `dir` and its ancestors up to `top`, plus the kernel's own
/// `hierarchical_memory_limit` of `dir` (which also covers ancestors above the mount).
pub fn ancestor_limits(dir: &Path, top: &Path) -> Vec<(PathBuf, u64)> {
    let mut out = Vec::new();
    let mut d = Some(dir);
    while let Some(cur) = d {
        if let Ok(Some(l)) = read_limit(&cur.join("memory.limit_in_bytes")) {
            out.push((cur.join("memory.limit_in_bytes"), l));
        }
        if cur == top {
            break;
        }
        d = cur.parent();
    }
    if let Ok(text) = read(&dir.join("memory.stat")) {
        let stat = parse::parse_memory_stat(&text);
        if let Some(&h) = stat.get("hierarchical_memory_limit")
            && h < parse::V1_UNLIMITED_FLOOR
        {
            out.push((dir.join("memory.stat"), h));
        }
    }
    out
}
