//! Reading and parsing the `/proc` files the trimmer needs. Parsers take `&str` and are
//! unit-tested on fixture text; readers add the path and the operation to IO errors.

use std::path::{Path, PathBuf};

use super::TrimError;

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    /// Device as (major, minor).
    pub dev: (u32, u32),
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`), without a trailing " (deleted)".
    pub path: Option<String>,
    pub deleted: bool,
}

/// Parse `/proc/PID/maps` text; malformed lines are skipped.
pub fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<MapEntry> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.to_string();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let rest = it.next().unwrap_or("").trim_start();
    let (start, end) = range.split_once('-')?;
    let (maj, min) = dev.split_once(':')?;
    let (path, deleted) = if rest.is_empty() {
        (None, false)
    } else if let Some(p) = rest.strip_suffix(" (deleted)") {
        (Some(p.to_string()), true)
    } else {
        (Some(rest.to_string()), false)
    };
    Some(MapEntry {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms,
        offset,
        dev: (
            u32::from_str_radix(maj, 16).ok()?,
            u32::from_str_radix(min, 16).ok()?,
        ),
        inode,
        path,
        deleted,
    })
}

/// Resident and anonymous memory of a process ([`crate::procfs`] parses it).
pub use crate::procfs::SmapsRollup as Rollup;
use crate::procfs::parse_smaps_rollup;

/// A hexadecimal mask field of `/proc/PID/status` (`SigIgn:`, `SigCgt:`, `SigBlk:`).
pub fn parse_status_mask(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
}

/// A decimal field of `/proc/PID/status` (`Seccomp:`, `Kthread:`).
pub fn parse_status_number(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().parse().ok())
}

/// `TracerPid:` from `/proc/PID/status`.
pub fn parse_tracer_pid(status: &str) -> Option<i32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
}

/// What `/proc/PID/task/TID/syscall` says a thread is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskSyscall {
    /// Running on a CPU (in user code or kernel).
    Running,
    /// Blocked, but not in a syscall (e.g. a page fault).
    NotInSyscall,
    /// Blocked in syscall `nr` with these arguments, user stack pointer and instruction
    /// pointer.
    In {
        nr: i64,
        args: [u64; 6],
        sp: u64,
        ip: u64,
    },
}

pub fn parse_task_syscall(text: &str) -> Option<TaskSyscall> {
    let text = text.trim();
    if text == "running" {
        return Some(TaskSyscall::Running);
    }
    let fields: Vec<&str> = text.split_whitespace().collect();
    let nr: i64 = fields.first()?.parse().ok()?;
    if nr < 0 {
        return Some(TaskSyscall::NotInSyscall);
    }
    let hex = |s: &str| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok();
    if fields.len() < 9 {
        return None;
    }
    let mut args = [0u64; 6];
    for (i, a) in args.iter_mut().enumerate() {
        *a = hex(fields[1 + i])?;
    }
    Some(TaskSyscall::In {
        nr,
        args,
        sp: hex(fields[7])?,
        ip: hex(fields[8])?,
    })
}

/// Read a file under `/proc`, mapping "not found" and "no such process" to `Gone`.
pub fn read_proc(pid: i32, path: &Path, op: &str) -> Result<String, TrimError> {
    std::fs::read_to_string(path).map_err(|e| io_error(pid, op, path, e))
}

pub fn io_error(pid: i32, op: &str, path: &Path, e: std::io::Error) -> TrimError {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => TrimError::Gone { pid },
        Some(libc::EACCES) | Some(libc::EPERM) => TrimError::NotTraceable {
            pid,
            reason: format!(
                "cannot {op} {}: permission denied {}",
                path.display(),
                super::TRACE_REMEDY
            ),
        },
        _ => TrimError::Io {
            op: op.to_string(),
            path: path.to_path_buf(),
            source: e,
        },
    }
}

/// `/proc/PID/REST`, or `/proc/PID/task/VIEW/REST` when reading through another thread.
pub fn task_path(pid: i32, view: i32, rest: &str) -> PathBuf {
    if view == pid {
        proc_path(pid, rest)
    } else {
        proc_path(pid, &format!("task/{view}/{rest}"))
    }
}

pub fn proc_path(pid: i32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

/// Memory usage of process `pid`, read through thread `view` (the main thread unless it
/// has exited: a process whose main thread called `pthread_exit` lives on in the others).
pub fn read_rollup(pid: i32, view: i32) -> Result<Rollup, TrimError> {
    let path = task_path(pid, view, "smaps_rollup");
    let text = read_proc(pid, &path, "read memory usage")?;
    if text.is_empty() {
        // A zombie or a kernel thread has no mm: its smaps_rollup is empty.
        return Err(TrimError::Gone { pid });
    }
    parse_smaps_rollup(&text).ok_or_else(|| TrimError::Io {
        op: "parse memory usage".into(),
        path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "no Rss/Anonymous lines"),
    })
}

/// True while the process exists and one of its threads is not a zombie (a process
/// whose main thread exited lives on in its other threads).
pub fn process_alive(pid: i32) -> bool {
    let live = |path: PathBuf| {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with(['Z', 'X'])))
            .unwrap_or(false)
    };
    if live(proc_path(pid, "stat")) {
        return true;
    }
    std::fs::read_dir(proc_path(pid, "task")).is_ok_and(|d| {
        d.filter_map(Result::ok)
            .any(|t| live(t.path().join("stat")))
    })
}

/// Thread ids of a process, the main thread first.
pub fn list_tasks(pid: i32) -> Result<Vec<i32>, TrimError> {
    let path = proc_path(pid, "task");
    let dir = std::fs::read_dir(&path).map_err(|e| io_error(pid, "list threads", &path, e))?;
    let mut tids: Vec<i32> = dir
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    tids.sort_by_key(|&t| (t != pid, t));
    Ok(tids)
}

/// The target of `/proc/PID/fd/N` (`socket:[123]`, `pipe:[45]`, a path...). A named
/// pipe links to its path, so it is reported as `fifo:PATH`: it is a pipe all the same.
pub fn fd_target(pid: i32, view: i32, fd: u64) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let link = task_path(pid, view, &format!("fd/{fd}"));
    let target = std::fs::read_link(&link)
        .ok()?
        .to_string_lossy()
        .into_owned();
    if target.starts_with('/') && std::fs::metadata(&link).is_ok_and(|m| m.file_type().is_fifo()) {
        return Some(format!("fifo:{target}"));
    }
    Some(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c8a00000-55d0c8a2c000 r--p 00000000 fe:01 1835139                    /usr/bin/python3.11
7f3a2c000000-7f3a2c021000 rw-p 00000000 00:00 0 
7f3a31e00000-7f3a31e28000 r--p 00000000 fe:01 1837210                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a31e28000-7f3a31fbd000 r-xp 00028000 fe:01 1837210                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a32000000-7f3a32001000 r--p 00000000 103:02 42                         /opt/app/lib with space.so (deleted)
7ffc1b5e1000-7ffc1b602000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_maps_lines_with_paths_anonymous_and_deleted() {
        let m = parse_maps(MAPS);
        assert_eq!(m.len(), 6);
        assert_eq!(m[2].start, 0x7f3a31e00000);
        assert_eq!(m[2].offset, 0);
        assert_eq!(m[2].dev, (0xfe, 1));
        assert_eq!(m[2].inode, 1837210);
        assert_eq!(
            m[2].path.as_deref(),
            Some("/usr/lib/x86_64-linux-gnu/libc.so.6")
        );
        assert_eq!(m[3].offset, 0x28000);
        assert_eq!(m[1].path, None);
        assert_eq!(m[4].path.as_deref(), Some("/opt/app/lib with space.so"));
        assert!(m[4].deleted);
        assert_eq!(m[4].dev, (0x103, 2));
        assert_eq!(m[5].path.as_deref(), Some("[stack]"));
    }

    #[test]
    fn parses_status_masks_and_numbers() {
        let s = "Name:\tpython3\nSigBlk:\t0000000000000000\nSigIgn:\t0000000001001000\n\
                 SigCgt:\t0000000180000002\nSeccomp:\t2\nSeccomp_filters:\t1\nKthread:\t0\n";
        assert_eq!(parse_status_mask(s, "SigIgn"), Some(0x0100_1000));
        assert_eq!(parse_status_mask(s, "SigCgt"), Some(0x1_8000_0002));
        assert_eq!(parse_status_number(s, "Seccomp"), Some(2));
        assert_eq!(parse_status_number(s, "Kthread"), Some(0));
        assert_eq!(parse_status_number(s, "Missing"), None);
    }

    #[test]
    fn parses_tracer_pid() {
        let s = "Name:\tpython3\nState:\tS (sleeping)\nTracerPid:\t4242\nUid:\t0\t0\t0\t0\n";
        assert_eq!(parse_tracer_pid(s), Some(4242));
        assert_eq!(parse_tracer_pid("TracerPid:\t0\n"), Some(0));
    }

    #[test]
    fn parses_task_syscall_states() {
        assert_eq!(parse_task_syscall("running\n"), Some(TaskSyscall::Running));
        assert_eq!(
            parse_task_syscall("-1 0x7ffd2f0 0x7f3a31e9"),
            Some(TaskSyscall::NotInSyscall)
        );
        let t = parse_task_syscall(
            "232 0x3 0x7f3a2c0 0x3ff 0xffffffffffffffff 0x0 0x8 0x7ffd2f0e8c48 0x7f3a31f2d0da\n",
        )
        .unwrap();
        assert_eq!(
            t,
            TaskSyscall::In {
                nr: 232,
                args: [3, 0x7f3a2c0, 0x3ff, u64::MAX, 0, 8],
                sp: 0x7ffd2f0e8c48,
                ip: 0x7f3a31f2d0da
            }
        );
    }
}
