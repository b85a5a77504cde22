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
    /// Blocked in syscall `nr` with these arguments and user instruction pointer.
    In { nr: i64, args: [u64; 6], ip: u64 },
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

pub fn proc_path(pid: i32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

pub fn read_rollup(pid: i32) -> Result<Rollup, TrimError> {
    let path = proc_path(pid, "smaps_rollup");
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

/// True while the process exists and is not a zombie.
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(proc_path(pid, "stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, r)| r.starts_with(['Z', 'X'])))
        .is_some_and(|dead| !dead)
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
pub fn fd_target(pid: i32, fd: u64) -> Option<String> {
    use std::os::unix::fs::FileTypeExt;
    let link = proc_path(pid, &format!("fd/{fd}"));
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
                ip: 0x7f3a31f2d0da
            }
        );
    }
}
