//! The `none` backend: no cgroup we may write (an unprivileged container, a read-only
//! cgroupfs). A worker is its process tree; memory is summed from `/proc/<pid>/smaps_rollup`
//! and the limit is enforced by the supervisor (recycle, then SIGKILL), not the kernel.
//!
//! We sum PSS, not RSS: the processes of one pre-forked worker share copy-on-write pages,
//! which RSS would count once per process while a cgroup charges them once. PSS splits
//! each shared page among its sharers, so the sum is close to what a cgroup would charge
//! (and to what the machine would get back if the worker went away).

use std::collections::HashMap;
use std::fs;
use std::path::Path;

use super::Usage;
use super::parse;

/// The children of `pid` from `/proc/<pid>/task/*/children` (every thread can have forked);
/// None when the kernel offers no such file (built without `CONFIG_PROC_CHILDREN`).
pub(super) fn children_of(proc: &Path, pid: i32) -> Option<Vec<i32>> {
    let tasks = fs::read_dir(proc.join(pid.to_string()).join("task")).ok()?;
    let mut out = vec![];
    let mut any = false;
    for t in tasks.flatten() {
        if let Ok(text) = fs::read_to_string(t.path().join("children")) {
            any = true;
            out.extend(
                text.split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    any.then_some(out)
}

/// `root` and all its descendants. Walks the `children` files down from `root`, so it
/// reads only the worker's own processes (never the whole of `/proc` on the supervisor's
/// thread); without those files, falls back to the ppid fields of `/proc/*/stat`.
/// Empty when `root` is gone.
pub fn tree_pids(proc: &Path, root: i32) -> Vec<i32> {
    if !proc.join(root.to_string()).exists() {
        return Vec::new();
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let Some(children) = children_of(proc, out[i]) else {
            if i == 0 {
                return tree_pids_by_scan(proc, root);
            }
            i += 1;
            continue;
        };
        for c in children {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        i += 1;
    }
    out
}

fn tree_pids_by_scan(proc: &Path, root: i32) -> Vec<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    if let Ok(rd) = fs::read_dir(proc) {
        for e in rd.filter_map(Result::ok) {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let Ok(stat) = fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            if let Some((ppid, _)) = parse::parse_proc_stat(&stat) {
                children.entry(ppid).or_default().push(pid);
            }
        }
    }
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        if let Some(c) = children.get(&out[i]) {
            out.extend(
                c.iter()
                    .copied()
                    .filter(|p| !out.contains(p))
                    .collect::<Vec<_>>(),
            );
        }
        i += 1;
    }
    out
}

/// The start time of `pid` (clock ticks since boot, `/proc/<pid>/stat` field 22): with the
/// pid, an identity no later process can take.
pub fn start_ticks(proc: &Path, pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    parse::parse_proc_stat(&stat).map(|(_, start)| start)
}

/// Memory of a worker's process tree. `working_set` equals `current` (no inactive-file
/// information per process); `peak` is unknown; `oom_kills` is 0 (the kernel's OOM killer
/// is not scoped to the worker). Processes that exit while we read are skipped.
///
/// A process whose `smaps_rollup` cannot be read (a non-dumpable process when trimrun is
/// not root) is counted by its RSS from `statm`, which is always readable (it counts shared
/// pages in full: an over-estimate, never the 0 B that would let it grow unchecked); the
/// pids so counted are in the second value.
pub fn usage(proc: &Path, root: Option<i32>, limit: Option<u64>) -> (Usage, Vec<i32>) {
    let pids = root.map(|r| tree_pids(proc, r)).unwrap_or_default();
    let mut u = Usage {
        limit,
        ..Usage::default()
    };
    let mut estimated = vec![];
    for &pid in &pids {
        let dir = proc.join(pid.to_string());
        let text = fs::read_to_string(dir.join("smaps_rollup")).unwrap_or_default();
        let s = crate::procfs::parse_smaps_rollup(&text).unwrap_or_default();
        if s.pss == 0 && s.rss == 0 {
            // Unreadable (or empty: a kernel thread, a zombie): RSS from statm.
            let Some((resident, shared)) = fs::read_to_string(dir.join("statm"))
                .ok()
                .and_then(|t| parse_statm(&t))
            else {
                continue;
            };
            if resident > 0 {
                estimated.push(pid);
            }
            let page = page_size();
            u.current += resident * page;
            u.anon += resident.saturating_sub(shared) * page;
            u.file += shared.min(resident) * page;
            continue;
        }
        let anon = s.pss_anon.unwrap_or(s.anon);
        let file = match (s.pss_file, s.pss_shmem) {
            (Some(f), sh) => f + sh.unwrap_or(0),
            (None, _) => s.rss.saturating_sub(s.anon),
        };
        u.current += if s.pss > 0 { s.pss } else { s.rss };
        u.anon += anon;
        u.file += file;
    }
    u.working_set = u.current;
    u.pids = pids;
    (u, estimated)
}

/// `/proc/<pid>/statm`: (resident, shared) in pages.
pub fn parse_statm(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace().skip(1);
    let resident = f.next()?.parse().ok()?;
    let shared = f.next()?.parse().ok()?;
    Some((resident, shared))
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64
}
