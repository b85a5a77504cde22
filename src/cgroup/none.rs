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

/// `root` and all its descendants, found through the ppid field of `/proc/*/stat`.
/// Empty when `root` is gone.
pub fn tree_pids(proc: &Path, root: i32) -> Vec<i32> {
    if !proc.join(root.to_string()).exists() {
        return Vec::new();
    }
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

/// Memory of a worker's process tree. `working_set` equals `current` (no inactive-file
/// information per process); `peak` is unknown; `oom_kills` is 0 (the kernel's OOM killer
/// is not scoped to the worker). Processes that exit while we read are skipped.
pub fn usage(proc: &Path, root: Option<i32>, limit: Option<u64>) -> Usage {
    let pids = root.map(|r| tree_pids(proc, r)).unwrap_or_default();
    let mut u = Usage {
        limit,
        ..Usage::default()
    };
    for &pid in &pids {
        let Ok(text) = fs::read_to_string(proc.join(pid.to_string()).join("smaps_rollup")) else {
            continue;
        };
        let s = crate::procfs::parse_smaps_rollup(&text).unwrap_or_default();
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
    u
}
