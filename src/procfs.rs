//! `/proc` text, parsed in one place: a process's memory (`smaps_rollup`), its parent and
//! start time (`stat`), the machine's memory (`meminfo`). Pure functions of the file's
//! text, unit-tested on text copied from a real kernel; the readers are the cgroup `none`
//! backend, start-up's `--limit auto`, stale-group detection, and the trimmer's
//! before/after accounting. (The trimmer's own `/proc` files, `maps`, `status` and
//! `task/*/syscall`, are parsed in `trim::procfs`.)

/// The fields of `/proc/<pid>/smaps_rollup` trimrun uses, in bytes. The `pss_*` split
/// appeared in Linux 5.9; before that they are `None`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmapsRollup {
    pub rss: u64,
    pub pss: u64,
    /// `Anonymous:`.
    pub anon: u64,
    pub swap: u64,
    pub pss_anon: Option<u64>,
    pub pss_file: Option<u64>,
    pub pss_shmem: Option<u64>,
}

/// Parse `smaps_rollup`. None without an `Rss:` line: a zombie or a kernel thread has no
/// memory map and an empty file.
pub fn parse_smaps_rollup(text: &str) -> Option<SmapsRollup> {
    let mut s = SmapsRollup::default();
    let mut has_rss = false;
    for line in text.lines() {
        let Some((key, rest)) = line.split_once(':') else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let Some(Ok(n)) = it.next().map(str::parse::<u64>) else {
            continue;
        };
        let bytes = match it.next() {
            Some("kB") => n * 1024,
            _ => n,
        };
        match key {
            "Rss" => {
                s.rss = bytes;
                has_rss = true;
            }
            "Pss" => s.pss = bytes,
            "Anonymous" => s.anon = bytes,
            "Swap" => s.swap = bytes,
            "Pss_Anon" => s.pss_anon = Some(bytes),
            "Pss_File" => s.pss_file = Some(bytes),
            "Pss_Shmem" => s.pss_shmem = Some(bytes),
            _ => {}
        }
    }
    has_rss.then_some(s)
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
pub fn parse_meminfo_total(text: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix("MemTotal:")?;
        let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kb * 1024)
    })
}

/// `(ppid, starttime in clock ticks since boot)` from `/proc/<pid>/stat`. The command name
/// (field 2) may contain spaces and parentheses, so fields are counted after the last `)`.
pub fn parse_proc_stat(text: &str) -> Option<(i32, u64)> {
    let after = &text[text.rfind(')')? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    // after ')' : state(3) ppid(4) ... starttime(22) -> indexes 0, 1, ..., 19
    let ppid = f.get(1)?.parse().ok()?;
    let start = f.get(19)?.parse().ok()?;
    Some((ppid, start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_smaps_rollup_from_a_real_kernel() {
        let text = "\
55d0c8a00000-7ffc1b602000 ---p 00000000 00:00 0                          [rollup]
Rss:              147268 kB
Pss:              145110 kB
Pss_Dirty:        139004 kB
Pss_Anon:         138996 kB
Pss_File:           6106 kB
Pss_Shmem:             8 kB
Shared_Clean:       2380 kB
Shared_Dirty:          0 kB
Private_Clean:      5880 kB
Private_Dirty:    139008 kB
Referenced:       147268 kB
Anonymous:        138996 kB
LazyFree:              0 kB
AnonHugePages:         0 kB
Swap:                  0 kB
Locked:                0 kB
";
        let r = parse_smaps_rollup(text).unwrap();
        assert_eq!(r.rss, 147268 * 1024);
        assert_eq!(r.anon, 138996 * 1024);
        assert_eq!(r.pss_shmem, Some(8 * 1024));
        assert_eq!(parse_smaps_rollup(""), None);
    }
}
