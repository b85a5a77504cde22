//! File helpers shared by the backends: every function takes the path it works on, and every
//! error carries that path and the operation.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{debug, warn};

use super::error::CgroupError;
use super::parse;

pub fn read(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path).map_err(|e| CgroupError::io("read", path, e))
}

/// Write `value` to an existing kernel file (never creates it) in one `write(2)`, which is
/// what cgroupfs requires.
pub fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| CgroupError::io("open for writing", path, e))?;
    f.write_all(value.as_bytes())
        .map_err(|e| CgroupError::io("write", path, e))
}

/// Write only if the file exists (optional interface files such as `memory.swap.max`).
pub fn write_if_exists(path: &Path, value: &str) -> Result<bool, CgroupError> {
    if path.exists() {
        write(path, value).map(|()| true)
    } else {
        Ok(false)
    }
}

pub fn read_u64(path: &Path) -> Result<u64, CgroupError> {
    let text = read(path)?;
    text.trim().parse().map_err(|e| CgroupError::Parse {
        what: "a number",
        path: path.to_path_buf(),
        detail: format!("{:?}: {e}", text.trim()),
    })
}

/// A limit file (`memory.max`, `memory.limit_in_bytes`): `None` = unlimited.
pub fn read_limit(path: &Path) -> Result<Option<u64>, CgroupError> {
    let text = read(path)?;
    parse::parse_limit(&text).map_err(|detail| CgroupError::Parse {
        what: "a memory limit",
        path: path.to_path_buf(),
        detail,
    })
}

pub fn read_pids(procs: &Path) -> Result<Vec<i32>, CgroupError> {
    Ok(parse::parse_pids(&read(procs)?))
}

pub fn mkdir(path: &Path) -> Result<(), CgroupError> {
    fs::create_dir(path).map_err(|e| CgroupError::io("create cgroup", path, e))
}

/// SIGKILL each pid; a pid that is already gone is fine.
pub fn kill_pids(pids: &[i32]) {
    for &pid in pids {
        if pid > 0 {
            match kill(Pid::from_raw(pid), Signal::SIGKILL) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => warn!(pid, error = %e, "cannot kill process"),
            }
        }
    }
}

/// Kill every process in the cgroup at `dir`: through `cgroup.kill` (v2, Linux 5.14+) when
/// it exists, else by SIGKILLing the listed pids once (no waiting: this runs on the
/// supervisor's thread; [`destroy_tree`] repeats it before each rmdir attempt, which
/// catches what forked meanwhile). A group already removed (by a concurrent teardown) has
/// nothing left to kill: success.
pub fn kill_cgroup(dir: &Path) -> Result<(), CgroupError> {
    let gone = |e: &CgroupError| removed_meanwhile(e.raw_os_error());
    let kill_file = dir.join("cgroup.kill");
    if kill_file.exists() {
        return match write(&kill_file, "1") {
            Err(e) if gone(&e) => Ok(()),
            r => r,
        };
    }
    match read_pids(&dir.join("cgroup.procs")) {
        Ok(pids) => {
            kill_pids(&pids);
            Ok(())
        }
        Err(e) if gone(&e) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether an error of a file in a cgroup means the group was removed meanwhile:
/// `ENOENT` once it is gone, `ENODEV` from a file opened or read while its group is being
/// removed (by the pool's teardown and a worker's own removal at once, at exit).
pub fn removed_meanwhile(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::ENOENT) | Some(libc::ENODEV))
}

/// rmdir a cgroup, retrying on EBUSY for up to `patience` while the kernel finishes
/// tearing down processes that were just killed. A missing directory is success.
/// Create the group `dir` and configure it; a group that cannot be configured is removed
/// again, so a failed worker start leaves no half-made group behind.
pub fn create_configured(
    dir: PathBuf,
    configure: impl FnOnce(&Path) -> Result<(), CgroupError>,
) -> Result<PathBuf, CgroupError> {
    mkdir(&dir)?;
    if let Err(e) = configure(&dir) {
        // Nothing ever ran in it: it goes at once, no retry needed.
        let _ = rmdir_retry(&dir, Duration::ZERO);
        return Err(e);
    }
    Ok(dir)
}

pub fn rmdir_retry(dir: &Path, patience: Duration) -> Result<(), CgroupError> {
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if removed_meanwhile(e.raw_os_error()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(CgroupError::io("remove cgroup", dir, e)),
        }
    }
}

/// Subdirectories of a cgroup (its child cgroups).
pub fn child_dirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Kill everything in a cgroup tree and remove it bottom-up, killing again between rmdir
/// attempts (a process may have forked while the first kill ran). Blocks up to `patience`
/// per group: call it off the supervisor's thread, or with a zero patience.
pub fn destroy_tree(dir: &Path, patience: Duration) -> Result<(), CgroupError> {
    for child in child_dirs(dir) {
        destroy_tree(&child, patience)?;
    }
    let deadline = Instant::now() + patience;
    let mut pause = Duration::from_millis(2);
    loop {
        kill_cgroup(dir)?;
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if removed_meanwhile(e.raw_os_error()) => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(100));
            }
            Err(e) => return Err(CgroupError::io("remove cgroup", dir, e)),
        }
    }
}

/// When a process started, as wall-clock time (from `/proc/<pid>/stat` and `btime`).
/// `None` when the process does not exist.
pub fn process_start_time(proc: &Path, pid: i32) -> Option<SystemTime> {
    let stat = fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    let (_, start_ticks) = parse::parse_proc_stat(&stat)?;
    let btime: u64 = fs::read_to_string(proc.join("stat"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime ")?.trim().parse().ok())?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let since_boot = Duration::from_millis(start_ticks * 1000 / hz.max(1));
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(btime) + since_boot)
}

/// Create the directory of trimrun's own group and take its lock: a running pool holds
/// an `flock` on `trimrun-<pid>/` for its whole life, and the kernel drops it however the
/// pool ends (SIGKILL included). A lock we cannot take means another start is removing a
/// group it judged stale (it was created a moment ago): an error, never a shared tree.
pub fn mkdir_locked(path: &Path) -> Result<GroupLock, CgroupError> {
    mkdir(path)?;
    try_lock(path)?.ok_or_else(|| {
        CgroupError::io(
            "lock",
            path,
            io::Error::other("another trimrun holds the lock of this new group"),
        )
    })
}

/// The lock of a pool's group (see [`mkdir_locked`]).
pub type GroupLock = nix::fcntl::Flock<fs::File>;

/// Take the lock of `dir` without waiting: None when someone holds it.
pub fn try_lock(dir: &Path) -> Result<Option<GroupLock>, CgroupError> {
    let f = fs::File::open(dir).map_err(|e| CgroupError::io("open", dir, e))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(CgroupError::io("lock", dir, e.into())),
    }
}

/// A `trimrun-<pid>[-instance]` group is stale when no live pool holds its lock (see
/// [`mkdir_locked`]): a clock step cannot fake that. Groups without a lock holder are also
/// judged the way trimruns before the lock made them, so that a pool of such a version is
/// not taken for dead: kept while their pid is alive and started before the group was
/// created (kernfs keeps a directory's mtime at its creation time).
pub fn group_is_stale(proc: &Path, dir: &Path, pid: i32) -> bool {
    match try_lock(dir) {
        Ok(Some(_free)) => {}
        Ok(None) | Err(_) => return false,
    }
    let Some(started) = process_start_time(proc, pid) else {
        return true;
    };
    let created = fs::metadata(dir).and_then(|m| m.modified()).ok();
    match created {
        // btime has a one-second resolution: allow two.
        Some(created) => started > created + Duration::from_secs(2),
        None => false,
    }
}

/// Parse the pid out of a `trimrun-<pid>` or `trimrun-<pid>-<instance>` directory name.
pub fn group_pid(name: &str) -> Option<i32> {
    let rest = name.strip_prefix("trimrun-")?;
    let digits = rest.split('-').next()?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Remove stale `trimrun-*` groups under `parent` left by runs that were killed.
/// Returns the names removed.
pub fn clean_stale(proc: &Path, parent: &Path, own_pid: i32) -> Vec<String> {
    let mut removed = Vec::new();
    for dir in child_dirs(parent) {
        let Some(name) = dir.file_name().and_then(|n| n.to_str()).map(str::to_string) else {
            continue;
        };
        let Some(pid) = group_pid(&name) else {
            continue;
        };
        if pid == own_pid || !group_is_stale(proc, &dir, pid) {
            continue;
        }
        match destroy_tree(&dir, Duration::from_secs(5)) {
            Ok(()) => {
                debug!(group = %dir.display(), "removed stale cgroup");
                removed.push(name);
            }
            Err(e) => warn!(group = %dir.display(), error = %e, "cannot remove stale cgroup"),
        }
    }
    removed
}

/// Can this process write into `path` (mode bits, ownership, read-only mounts)?
pub fn writable(path: &Path) -> Result<(), io::Error> {
    nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).map_err(io::Error::from)
}
