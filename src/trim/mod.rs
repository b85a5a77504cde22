//! Trimming a worker from the outside: make one of its threads call glibc's
//! `malloc_trim(0)` through ptrace, with no change to the application.
//!
//! How (see `DESIGN.md`, "Trimming from outside"):
//! 1. [`symbols`] finds `malloc_trim` in the libc the target maps (refusing musl, static
//!    binaries and preloaded jemalloc/tcmalloc/mimalloc: [`TrimError::Unavailable`]).
//! 2. The thread picker reads `/proc/PID/task/*/syscall` and keeps threads parked in a
//!    safe blocking syscall ([`classify`]), the main thread first.
//! 3. [`inject`] seizes one of them, confirms from its registers after the stop, saves
//!    registers, XSAVE state and signal mask, runs the call with all signals but SIGSEGV
//!    blocked, catches its return as a fault at a fixed address, restores, detaches.
//! 4. RSS and anonymous memory are read from `smaps_rollup` before and after.
//!
//! The only thread stopped is the one running the call, and only for about as long as
//! `malloc_trim` runs; the others keep serving. Everything here is blocking and must run on
//! one OS thread from seize to detach (ptrace tracers are threads), hence
//! [`ptrace_lock`] and `spawn_blocking` in the supervisor.
//!
//! Caveat: if trimrun itself dies while a call is running, the kernel detaches the thread
//! with the call frame in place and it faults at the return address. `trimrun trim` holds
//! back the signals that would end it while a thread is attached; only SIGKILL (or a
//! crash of trimrun) can still do this.

#[cfg(target_arch = "x86_64")]
mod arch_x86_64;
#[cfg(target_arch = "x86_64")]
use arch_x86_64 as arch;

#[cfg(target_arch = "x86_64")]
mod classify;
#[cfg(target_arch = "x86_64")]
mod inject;
mod procfs;
#[cfg(target_arch = "x86_64")]
mod symbols;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::Serialize;

/// What to tell users who cannot trace.
pub(crate) const TRACE_REMEDY: &str = "(run as root, or as the same user with \
     kernel.yama.ptrace_scope 0 and a dumpable target, or with CAP_SYS_PTRACE)";

/// Options for one trim.
#[derive(Debug, Clone)]
pub struct TrimOptions {
    /// How long the injected call may run before it is abandoned (when abandoning is
    /// safe, see [`TrimError::TimedOut`]); also bounds the wait for the thread to stop.
    pub timeout: Duration,
}

impl Default for TrimOptions {
    fn default() -> Self {
        TrimOptions {
            timeout: Duration::from_secs(2),
        }
    }
}

/// The outcome of one successful trim.
#[derive(Debug, Clone, Serialize)]
pub struct TrimReport {
    pub pid: i32,
    /// The thread that ran `malloc_trim`.
    pub tid: i32,
    /// The syscall that thread was parked in.
    pub syscall: String,
    /// `malloc_trim`'s return value: 1 if memory was released to the system.
    pub ret: i32,
    /// How long the thread was stopped, from interrupt to detach.
    pub pause_us: u64,
    /// Of the pause, how long the thread ran the call (from resuming it into
    /// `malloc_trim` until its return was seen); the rest is ptrace overhead.
    pub call_us: u64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub anon_before: u64,
    pub anon_after: u64,
}

impl TrimReport {
    /// Resident bytes released (negative if the process grew meanwhile).
    pub fn released(&self) -> i64 {
        self.rss_before as i64 - self.rss_after as i64
    }
}

/// Why a process was not trimmed.
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    #[error("pid {pid} not trimmed now: {reason} (try later)")]
    Deferred { pid: i32, reason: String },
    #[error("cannot trim pid {pid}: {reason}")]
    Unavailable { pid: i32, reason: String },
    #[error("pid {pid} is gone (no such process)")]
    Gone { pid: i32 },
    #[error("pid {pid} exited while being trimmed (wait status {status:#x})")]
    Exited { pid: i32, status: i32 },
    #[error("cannot trace pid {pid}: {reason}")]
    NotTraceable { pid: i32, reason: String },
    #[error(
        "cannot trace pid {pid}: already traced by pid {tracer} (detach the debugger or tracer first)"
    )]
    AlreadyTraced { pid: i32, tracer: i32 },
    #[error("pid {pid} crashed during malloc_trim: {detail}")]
    Crashed { pid: i32, detail: String },
    #[error(
        "malloc_trim in pid {pid} did not return in time; the call was abandoned and the thread restored"
    )]
    TimedOut { pid: i32 },
    #[error("{0}")]
    Unsupported(String),
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: String,
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TrimError {
    /// Whether trying the same process again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            TrimError::Deferred { .. }
                | TrimError::TimedOut { .. }
                | TrimError::AlreadyTraced { .. }
                | TrimError::Io { .. }
        )
    }

    /// A short stable name for the kind of error (JSON output, metrics labels).
    pub fn kind(&self) -> &'static str {
        match self {
            TrimError::Deferred { .. } => "deferred",
            TrimError::Unavailable { .. } => "unavailable",
            TrimError::Gone { .. } => "gone",
            TrimError::Exited { .. } => "exited",
            TrimError::NotTraceable { .. } => "not_traceable",
            TrimError::AlreadyTraced { .. } => "already_traced",
            TrimError::Crashed { .. } => "crashed",
            TrimError::TimedOut { .. } => "timed_out",
            TrimError::Unsupported(_) => "unsupported",
            TrimError::Io { .. } => "io",
        }
    }
}

/// Held for the whole time any thread is ptrace-attached. The supervisor's reaper
/// (`waitid(P_ALL)`) must `try_lock` it: a wait for any child in the tracer's process also
/// reports ptrace-stops, and would steal them from us.
pub fn ptrace_lock() -> &'static Mutex<()> {
    static LOCK: Mutex<()> = Mutex::new(());
    &LOCK
}

/// Trim one process: pick a parked thread, inject `malloc_trim(0)`, measure.
///
/// Blocking: the whole seize..detach happens on the calling OS thread (ptrace requires
/// it). Run it with `spawn_blocking`.
pub fn trim_pid(pid: i32, opts: &TrimOptions) -> Result<TrimReport, TrimError> {
    trim_impl(pid, None, opts)
}

/// Like [`trim_pid`], but only ever use thread `tid` (tests, benchmarks, debugging).
pub fn trim_thread(pid: i32, tid: i32, opts: &TrimOptions) -> Result<TrimReport, TrimError> {
    trim_impl(pid, Some(tid), opts)
}

#[cfg(not(target_arch = "x86_64"))]
fn trim_impl(_pid: i32, _tid: Option<i32>, _opts: &TrimOptions) -> Result<TrimReport, TrimError> {
    Err(TrimError::Unsupported(format!(
        "trimming from outside is not implemented on {} (only x86_64)",
        std::env::consts::ARCH
    )))
}

#[cfg(target_arch = "x86_64")]
fn trim_impl(pid: i32, only: Option<i32>, opts: &TrimOptions) -> Result<TrimReport, TrimError> {
    use tracing::debug;

    if pid <= 0 {
        return Err(TrimError::Gone { pid });
    }
    let status = procfs::read_proc(pid, &procfs::proc_path(pid, "status"), "read status")?;
    if let Some(tracer) = procfs::parse_tracer_pid(&status).filter(|&t| t != 0) {
        return Err(TrimError::AlreadyTraced { pid, tracer });
    }
    let maps_path = procfs::proc_path(pid, "maps");
    let maps = procfs::parse_maps(&procfs::read_proc(pid, &maps_path, "read memory maps")?);
    if maps.is_empty() {
        return Err(TrimError::Gone { pid });
    }
    if maps
        .iter()
        .any(|m| m.start <= arch::RETURN_ADDR && arch::RETURN_ADDR < m.end)
    {
        return Err(TrimError::Unavailable {
            pid,
            reason: format!(
                "the page at {:#x} (our return address) is mapped in the process",
                arch::RETURN_ADDR
            ),
        });
    }
    let libc = symbols::resolve(pid, &maps)?;
    let (candidates, mut reasons) = candidates(pid, only, &libc)?;
    if candidates.is_empty() {
        return Err(TrimError::Deferred {
            pid,
            reason: format!(
                "no thread parked in a safe syscall ({})",
                reasons.join("; ")
            ),
        });
    }
    let before = procfs::read_rollup(pid)?;
    for tid in candidates.into_iter().take(4) {
        let attempt = {
            let _attached = ptrace_lock().lock().unwrap_or_else(|e| e.into_inner());
            inject::trim_thread(pid, tid, &libc, opts.timeout)
        };
        let attempt = match attempt {
            // A worker thread that exits (a finished request handler) is not the
            // process going away: try the next thread.
            Err(TrimError::Gone { .. }) if tid != pid && procfs::process_alive(pid) => {
                inject::Attempt::NotParked(format!("thread {tid} exited"))
            }
            other => other?,
        };
        match attempt {
            inject::Attempt::Done {
                ret,
                syscall,
                pause,
                call,
            } => {
                let after = procfs::read_rollup(pid)?;
                let report = TrimReport {
                    pid,
                    tid,
                    syscall: syscall.to_string(),
                    ret,
                    pause_us: pause.as_micros() as u64,
                    call_us: call.as_micros() as u64,
                    rss_before: before.rss,
                    rss_after: after.rss,
                    anon_before: before.anon,
                    anon_after: after.anon,
                };
                // The supervisor logs each trim at info with the worker's slot; the
                // subcommand prints its own results.
                debug!(
                    pid,
                    tid,
                    released = report.released(),
                    pause_us = report.pause_us,
                    call_us = report.call_us,
                    syscall,
                    ret,
                    "trimmed"
                );
                return Ok(report);
            }
            inject::Attempt::NotParked(reason) => {
                debug!(pid, tid, %reason, libc = %libc.path, "thread not parked after all");
                reasons.push(reason);
            }
        }
    }
    Err(TrimError::Deferred {
        pid,
        reason: format!(
            "no thread stayed parked in a safe syscall ({})",
            reasons.join("; ")
        ),
    })
}

/// Classification context from `/proc` alone (before attaching).
#[cfg(target_arch = "x86_64")]
struct FromProc<'a> {
    pid: i32,
    libc: &'a symbols::Libc,
}

#[cfg(target_arch = "x86_64")]
impl classify::Context for FromProc<'_> {
    fn fd_target(&self, fd: u64) -> Option<String> {
        procfs::fd_target(self.pid, fd)
    }
    fn read_word(&self, addr: u64) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::File::open(procfs::proc_path(self.pid, "mem")).ok()?;
        let mut buf = [0u8; 8];
        mem.read_exact_at(&mut buf, addr).ok()?;
        Some(u64::from_ne_bytes(buf))
    }
    fn restartable_function_at(&self, ip: u64) -> Option<&'static str> {
        self.libc.restartable_function_at(ip)
    }
}

/// Threads that look parked in a safe syscall, main thread first, and why the others
/// were passed over.
#[cfg(target_arch = "x86_64")]
fn candidates(
    pid: i32,
    only: Option<i32>,
    libc: &symbols::Libc,
) -> Result<(Vec<i32>, Vec<String>), TrimError> {
    let tids = match only {
        Some(t) => vec![t],
        None => procfs::list_tasks(pid)?,
    };
    let ctx = FromProc { pid, libc };
    let mut ok = Vec::new();
    let mut reasons = Vec::new();
    for tid in tids {
        let path = procfs::proc_path(pid, &format!("task/{tid}/syscall"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A thread that exited since the directory was listed.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH))
                    && tid != pid =>
            {
                continue;
            }
            Err(e) => return Err(procfs::io_error(pid, "read the syscall of", &path, e)),
        };
        match procfs::parse_task_syscall(&text) {
            Some(procfs::TaskSyscall::In { nr, args, ip }) => {
                match classify::classify(nr, args, ip, &ctx) {
                    Ok(_) => ok.push(tid),
                    Err(r) => reasons.push(format!("thread {tid}: {r}")),
                }
            }
            Some(procfs::TaskSyscall::Running) => reasons.push(format!("thread {tid}: running")),
            Some(procfs::TaskSyscall::NotInSyscall) => {
                reasons.push(format!("thread {tid}: blocked outside a syscall"))
            }
            None => reasons.push(format!("thread {tid}: unreadable syscall state")),
        }
    }
    Ok((ok, reasons))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_is_signed() {
        let r = TrimReport {
            pid: 1,
            tid: 1,
            syscall: "poll".into(),
            ret: 1,
            pause_us: 10,
            call_us: 5,
            rss_before: 100,
            rss_after: 150,
            anon_before: 0,
            anon_after: 0,
        };
        assert_eq!(r.released(), -50);
    }

    #[test]
    fn retryable_errors() {
        assert!(
            TrimError::Deferred {
                pid: 1,
                reason: String::new()
            }
            .is_retryable()
        );
        assert!(TrimError::TimedOut { pid: 1 }.is_retryable());
        assert!(!TrimError::Gone { pid: 1 }.is_retryable());
        assert!(
            !TrimError::Unavailable {
                pid: 1,
                reason: String::new()
            }
            .is_retryable()
        );
        assert!(
            !TrimError::Crashed {
                pid: 1,
                detail: String::new()
            }
            .is_retryable()
        );
    }
}
