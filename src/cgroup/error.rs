//! Errors of the cgroup layer. Each says what was being done, to which path, and what to do
//! about it; messages are lowercase without a final period.

use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::size::human_bytes as human;

/// Remedy for "we may not write here".
pub const REMEDY_PERMISSION: &str =
    "run as root, or under systemd with Delegate=yes, or pass --cgroup none";
/// Remedy for a read-only cgroupfs (typical in containers without a cgroup namespace).
pub const REMEDY_READ_ONLY: &str =
    "pass --cgroup none, or give the container a writable cgroup namespace";

#[derive(Debug, Error)]
pub enum CgroupError {
    /// A filesystem operation failed; `remedy` is empty when there is nothing specific to say.
    #[error("cannot {op} {}: {source}{}", path.display(), remedy_suffix(remedy))]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
        remedy: &'static str,
    },
    #[error("cannot {op} {}: permission denied ({REMEDY_PERMISSION})", path.display())]
    PermissionDenied { op: &'static str, path: PathBuf },
    #[error("cannot {op} {}: the cgroup filesystem is mounted read-only ({REMEDY_READ_ONLY})", path.display())]
    ReadOnly { op: &'static str, path: PathBuf },
    #[error(
        "cgroup {} is not delegated to this process: {detail} ({REMEDY_PERMISSION})",
        path.display()
    )]
    NotDelegated { path: PathBuf, detail: String },
    #[error(
        "the memory controller is not enabled for {} (cgroup.controllers: {}) (enable +memory in the parent's cgroup.subtree_control, run under systemd with Delegate=yes, or pass --cgroup v1 or --cgroup none)",
        path.display(),
        if controllers.is_empty() { "empty" } else { controllers.as_str() }
    )]
    NoMemoryController { path: PathBuf, controllers: String },
    #[error(
        "cannot enable the memory controller in {}: other processes live in that cgroup (the no-internal-processes rule) (start trimrun in a cgroup of its own, e.g. a systemd unit with Delegate=yes)",
        path.display()
    )]
    InternalProcesses { path: PathBuf },
    #[error("cannot use cgroup {kind}: {reason} ({remedy})")]
    Unavailable {
        kind: &'static str,
        reason: String,
        remedy: &'static str,
    },
    #[error(
        "worker limit {} is bigger than what trimrun may use in total, {} (from {}) (lower --limit, or use --limit auto)",
        human(*limit), human(*available), source_desc
    )]
    LimitAboveParent {
        limit: u64,
        available: u64,
        source_desc: String,
    },
    #[error(
        "worker limit {} is below the minimum of {} for a python worker (raise --limit)",
        human(*limit), human(*min)
    )]
    LimitTooSmall { limit: u64, min: u64 },
    #[error(
        "--limit auto: {} available minus a reserve of {} leaves {} for each of {workers} workers, below the minimum of {} (run fewer workers, or give trimrun more memory)",
        human(*available), human(*reserve), human(*per_worker), human(*min)
    )]
    AutoLimitTooSmall {
        available: u64,
        reserve: u64,
        workers: usize,
        per_worker: u64,
        min: u64,
    },
    #[error("--limit auto needs at least one worker")]
    NoWorkers,
    #[error("cannot parse {what} in {}: {detail}", path.display())]
    Parse {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
    #[error("invalid cgroup backend {0:?} (expected auto, v2, v1 or none)")]
    BadChoice(String),
}

fn remedy_suffix(remedy: &str) -> String {
    if remedy.is_empty() {
        String::new()
    } else {
        format!(" ({remedy})")
    }
}

impl CgroupError {
    /// Classify an io error on `path`: permission and read-only errors get their remedies.
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> CgroupError {
        match source.raw_os_error() {
            Some(libc::EACCES) | Some(libc::EPERM) => CgroupError::PermissionDenied {
                op,
                path: path.to_path_buf(),
            },
            Some(libc::EROFS) => CgroupError::ReadOnly {
                op,
                path: path.to_path_buf(),
            },
            _ => CgroupError::Io {
                op,
                path: path.to_path_buf(),
                source,
                remedy: "",
            },
        }
    }

    /// The underlying OS error number, if this is an io error.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            CgroupError::Io { source, .. } => source.raw_os_error(),
            CgroupError::PermissionDenied { .. } => Some(libc::EACCES),
            CgroupError::ReadOnly { .. } => Some(libc::EROFS),
            _ => None,
        }
    }
}
