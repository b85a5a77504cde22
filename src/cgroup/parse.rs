//! Pure parsers for the kernel's cgroup and proc files. Every function takes the file's text
//! and nothing else, so unit tests run on fixture text captured from real kernels
//! (`tests/fixtures/cgroup/`).

use std::collections::BTreeMap;
use std::path::PathBuf;

/// Values at or above this are "no limit" in cgroup v1 (the kernel prints
/// `PAGE_COUNTER_MAX * PAGE_SIZE`, e.g. 9223372036854771712).
pub const V1_UNLIMITED_FLOOR: u64 = 1 << 62;

/// `key value` lines (memory.stat, memory.events, cgroup.stat) into a map. Lines that do
/// not parse are skipped: the kernel adds keys between versions and we only read some.
pub fn parse_flat_keyed(text: &str) -> BTreeMap<String, u64> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.split_whitespace();
            let key = it.next()?;
            let value = it.next()?.parse().ok()?;
            Some((key.to_string(), value))
        })
        .collect()
}

/// `memory.stat` (v1 or v2): byte and event counters by name.
pub fn parse_memory_stat(text: &str) -> BTreeMap<String, u64> {
    parse_flat_keyed(text)
}

/// Counters of v2 `memory.events` that trimrun reads.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryEvents {
    pub low: u64,
    pub high: u64,
    pub max: u64,
    pub oom: u64,
    pub oom_kill: u64,
    pub oom_group_kill: u64,
}

/// v2 `memory.events`.
pub fn parse_memory_events(text: &str) -> MemoryEvents {
    let m = parse_flat_keyed(text);
    let get = |k: &str| m.get(k).copied().unwrap_or(0);
    MemoryEvents {
        low: get("low"),
        high: get("high"),
        max: get("max"),
        oom: get("oom"),
        oom_kill: get("oom_kill"),
        oom_group_kill: get("oom_group_kill"),
    }
}

/// v1 `memory.oom_control`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OomControl {
    pub oom_kill_disable: bool,
    pub under_oom: bool,
    /// Absent before Linux 4.13; then 0.
    pub oom_kill: u64,
}

pub fn parse_oom_control(text: &str) -> OomControl {
    let m = parse_flat_keyed(text);
    OomControl {
        oom_kill_disable: m.get("oom_kill_disable").copied().unwrap_or(0) != 0,
        under_oom: m.get("under_oom").copied().unwrap_or(0) != 0,
        oom_kill: m.get("oom_kill").copied().unwrap_or(0),
    }
}

/// One line of `/proc/<pid>/cgroup`: `hierarchy-id:controller-list:path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupLine {
    pub hierarchy_id: u32,
    /// Empty for the v2 line (`0::/path`); `name=systemd` style names are kept as they are.
    pub controllers: Vec<String>,
    pub path: String,
}

pub fn parse_proc_self_cgroup(text: &str) -> Vec<CgroupLine> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let hierarchy_id = it.next()?.parse().ok()?;
            let controllers = it
                .next()?
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            let path = it.next()?.to_string();
            Some(CgroupLine {
                hierarchy_id,
                controllers,
                path,
            })
        })
        .collect()
}

/// One line of `/proc/<pid>/mountinfo` (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_id: u32,
    pub parent_id: u32,
    /// The path inside the filesystem that is mounted here (for cgroupfs: the cgroup).
    pub root: String,
    pub mount_point: PathBuf,
    /// Per-mount options (`rw`/`ro` live here).
    pub mount_options: Vec<String>,
    pub fstype: String,
    pub source: String,
    /// Superblock options (for cgroup v1: the controllers, e.g. `memory`).
    pub super_options: Vec<String>,
}

impl Mount {
    pub fn read_only(&self) -> bool {
        self.mount_options.iter().any(|o| o == "ro") || self.super_options.iter().any(|o| o == "ro")
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_octal(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            if f.len() < 6 {
                return None;
            }
            let r: Vec<&str> = right.split(' ').collect();
            if r.len() < 3 {
                return None;
            }
            Some(Mount {
                mount_id: f[0].parse().ok()?,
                parent_id: f[1].parse().ok()?,
                root: unescape_octal(f[3]),
                mount_point: PathBuf::from(unescape_octal(f[4])),
                mount_options: f[5].split(',').map(str::to_string).collect(),
                fstype: r[0].to_string(),
                source: unescape_octal(r[1]),
                super_options: r[2].split(',').map(str::to_string).collect(),
            })
        })
        .collect()
}

/// A limit file: v2 `memory.max`/`memory.high` (`max` = none) or v1
/// `memory.limit_in_bytes` (huge = none). `None` for unlimited, `Err` for garbage.
pub fn parse_limit(text: &str) -> Result<Option<u64>, String> {
    let t = text.trim();
    if t == "max" {
        return Ok(None);
    }
    match t.parse::<u64>() {
        Ok(v) if v >= V1_UNLIMITED_FLOOR => Ok(None),
        Ok(v) => Ok(Some(v)),
        Err(e) => Err(format!("{t:?}: {e}")),
    }
}

/// `cgroup.procs`: one pid per line.
pub fn parse_pids(text: &str) -> Vec<i32> {
    text.lines().filter_map(|l| l.trim().parse().ok()).collect()
}

pub use crate::procfs::{SmapsRollup, parse_meminfo_total, parse_proc_stat};
