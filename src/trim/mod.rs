//! Trimming a worker from the outside: make one of its threads call glibc's
//! `malloc_trim(0)` through ptrace, with no change to the application.
//!
//! How (see `DESIGN.md`, "Trimming from outside"):
//! 1. [`symbols`] finds `malloc_trim` in the libc the target maps (refusing musl, static
//!    binaries and preloaded jemalloc/tcmalloc/mimalloc: [`TrimError::Unavailable`]).
//! 2. The thread picker reads `/proc/PID/task/*/syscall` and keeps threads parked in a
//!    safe blocking syscall ([`classify`]), the main thread first.
//! 3. [`inject`] seizes one of them on a tracer thread of its own, confirms from its
//!    registers after the stop (and that the process did not exec meanwhile), writes the
//!    thread's registers, XSAVE state and signal mask as a signal frame on its stack, and
//!    runs the call with all signals but the synchronous faults blocked; `malloc_trim`
//!    returns into libc's `__restore_rt`, whose `rt_sigreturn` restores the thread by
//!    itself. We stop it right after that to hand the kernel the exact restart state, and
//!    detach.
//! 4. RSS and anonymous memory are read from `smaps_rollup` before and after.
//!
//! The only thread stopped is the one running the call, and only for about as long as
//! `malloc_trim` runs; the others keep serving. Everything here is blocking and must run on
//! one OS thread from seize to detach (ptrace tracers are threads), hence
//! [`ptrace_lock`] and `spawn_blocking` in the supervisor.
//!
//! Refused before attaching: kernel threads, processes under seccomp (the call's syscalls
//! could kill or trap them), threads running a signal handler (a signal frame above their
//! stack pointer: the handler may have interrupted malloc), and a dynamically linked
//! program that has not mapped libc yet (starting up, deferred). If trimrun dies at any
//! instant, the target is unharmed: see [`inject`].

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
    /// 1 if the process's anonymous memory fell during the trim, else 0. (`malloc_trim`'s
    /// own return value is not seen: the call returns straight into the frame that
    /// restores the thread, see `inject`.)
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
    #[error("malloc_trim in pid {pid} did not return in time; {}", if *finishing {
        "the thread was released and finishes the call on its own"
    } else {
        "the call was abandoned and the thread restored"
    })]
    TimedOut {
        pid: i32,
        /// The thread was released mid-call and comes back by itself when `malloc_trim`
        /// returns (the call frame restores it), rather than being restored by us.
        finishing: bool,
    },
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
    let _in_flight = gate().enter(pid)?;
    trim_impl(pid, None, opts)
}

/// Like [`trim_pid`], but only ever use thread `tid` (tests, benchmarks, debugging).
pub fn trim_thread(pid: i32, tid: i32, opts: &TrimOptions) -> Result<TrimReport, TrimError> {
    let _in_flight = gate().enter(pid)?;
    trim_impl(pid, Some(tid), opts)
}

/// Stop starting trims and wait (up to `limit`) for those in flight to finish, so that a
/// process about to exit does not end a trim halfway (the target would be unharmed, see
/// [`inject`], but the trim would be lost and its thread left mid-call). Returns whether
/// none is left. Called once by the pool before its runtime shuts down.
pub fn finish_trims(limit: Duration) -> bool {
    gate().close(limit)
}

/// Counts trims in flight; once closed, refuses new ones.
struct Gate {
    state: Mutex<(usize, bool)>,
    idle: std::sync::Condvar,
}

struct InFlight<'a>(&'a Gate);

impl Gate {
    const fn new() -> Gate {
        Gate {
            state: Mutex::new((0, false)),
            idle: std::sync::Condvar::new(),
        }
    }

    fn enter(&self, pid: i32) -> Result<InFlight<'_>, TrimError> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.1 {
            return Err(TrimError::Deferred {
                pid,
                reason: "trimrun is shutting down".into(),
            });
        }
        s.0 += 1;
        Ok(InFlight(self))
    }

    fn close(&self, limit: Duration) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.1 = true;
        let deadline = std::time::Instant::now() + limit;
        while s.0 > 0 {
            let now = std::time::Instant::now();
            if now >= deadline {
                return false;
            }
            s = self
                .idle
                .wait_timeout(s, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        s.0 -= 1;
        if s.0 == 0 {
            self.0.idle.notify_all();
        }
    }
}

fn gate() -> &'static Gate {
    static GATE: Gate = Gate::new();
    &GATE
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
    let changed = || TrimError::Deferred {
        pid,
        reason: "it changed while being inspected (a thread exited, or it was executing a \
                 new program); nothing was injected"
            .into(),
    };
    match trim_once(pid, only, opts) {
        // Something we read vanished, yet the process lives: a thread exited or the
        // process executed a new program while we looked. Say so; it is worth retrying.
        // (The main thread "exits" too when another thread executes a new program: the
        // exec'ing thread takes its pid.)
        Err(TrimError::Gone { .. } | TrimError::Exited { .. }) if pid > 0 && lives_on(pid) => {
            Err(changed())
        }
        // root is refused only by an exec in progress, an exit in progress (a zombie
        // cannot be traced) or an LSM, which refuses for good.
        Err(TrimError::NotTraceable { .. }) if pid > 0 && is_root() && !yama_forbids_all() => {
            if lives_on(pid) {
                Err(changed())
            } else {
                Err(TrimError::Gone { pid })
            }
        }
        other => other,
    }
}

/// The process is alive, or becomes so again soon (during an execve by another thread,
/// the others are killed and the old main thread shows as a zombie until the exec'ing
/// thread takes its place; on a loaded machine that window lasted over 20 ms). Bounded at
/// 1 s, and only paid on this error path.
#[cfg(target_arch = "x86_64")]
fn lives_on(pid: i32) -> bool {
    let until = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        if procfs::process_alive(pid) {
            return true;
        }
        if !procfs::proc_path(pid, "").exists() || std::time::Instant::now() >= until {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[cfg(target_arch = "x86_64")]
fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// `kernel.yama.ptrace_scope = 3`: no process may attach, root included.
#[cfg(target_arch = "x86_64")]
fn yama_forbids_all() -> bool {
    std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope").is_ok_and(|v| v.trim() == "3")
}

#[cfg(target_arch = "x86_64")]
fn trim_once(pid: i32, only: Option<i32>, opts: &TrimOptions) -> Result<TrimReport, TrimError> {
    use tracing::debug;

    if pid <= 0 {
        return Err(TrimError::Gone { pid });
    }
    let status = procfs::read_proc(pid, &procfs::proc_path(pid, "status"), "read status")?;
    if procfs::parse_status_number(&status, "Kthread") == Some(1) || is_kernel_thread(pid) {
        return Err(TrimError::Unavailable {
            pid,
            reason: "it is a kernel thread, which has no user memory to trim".into(),
        });
    }
    if let Some(tracer) = procfs::parse_tracer_pid(&status).filter(|&t| t != 0) {
        return Err(TrimError::AlreadyTraced { pid, tracer });
    }
    if let Some(reason) = seccomp_problem(&status) {
        return Err(TrimError::Unavailable { pid, reason });
    }
    let view = view_thread(pid)?;
    let maps_path = procfs::task_path(pid, view, "maps");
    let maps = procfs::parse_maps(&procfs::read_proc(pid, &maps_path, "read memory maps")?);
    if maps.is_empty() {
        return Err(TrimError::Gone { pid });
    }
    let libc = match symbols::resolve(pid, view, &maps) {
        Err(TrimError::Unavailable { .. })
            if symbols::find_libc(&maps).is_none() && starting_up(pid, view, &maps) =>
        {
            return Err(TrimError::Deferred {
                pid,
                reason: "the program is starting (its dynamic loader has not mapped libc yet)"
                    .into(),
            });
        }
        other => other?,
    };
    let target = inject::Target {
        pid,
        view,
        libc: &libc,
        ignored: procfs::parse_status_mask(&status, "SigIgn").unwrap_or(0),
        caught: procfs::parse_status_mask(&status, "SigCgt").unwrap_or(!0),
        gil: symbols::python_runtime(pid, view, &maps),
    };
    let (candidates, mut reasons) = candidates(&target, only)?;
    if candidates.is_empty() {
        return Err(TrimError::Deferred {
            pid,
            reason: format!(
                "no thread parked in a safe syscall ({})",
                reasons.join("; ")
            ),
        });
    }
    let before = procfs::read_rollup(pid, view)?;
    let mut tried = 0;
    for (tid, sp) in candidates {
        if tried == 4 {
            break;
        }
        if let Some(frame) = signal_frame_above(pid, view, &maps, sp, libc.restore_rt) {
            reasons.push(format!(
                "thread {tid}: running a signal handler (signal frame at {frame:#x})"
            ));
            continue;
        }
        tried += 1;
        let attempt = {
            let _attached = ptrace_lock().lock().unwrap_or_else(|e| e.into_inner());
            attempt_on_own_thread(&target, tid, sp, opts.timeout)
        };
        let attempt = match attempt {
            // A worker thread that exits (a finished request handler) is not the
            // process going away: try the next thread.
            Err(TrimError::Gone { .. }) if tid != pid && procfs::process_alive(pid) => {
                inject::Attempt::NotParked(format!("thread {tid} exited"))
            }
            Err(
                e @ (TrimError::Gone { .. }
                | TrimError::Exited { .. }
                | TrimError::NotTraceable { .. }),
            ) if procfs::process_alive(pid) && exec_happened(pid, &libc) => {
                debug!(pid, tid, error = %e, "exec during the trim");
                return Err(exec_race(pid));
            }
            other => other?,
        };
        match attempt {
            inject::Attempt::Done {
                syscall,
                pause,
                call,
            } => {
                let after = procfs::read_rollup(pid, view)?;
                let report = TrimReport {
                    pid,
                    tid,
                    syscall: syscall.to_string(),
                    ret: i32::from(after.anon < before.anon),
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

/// Run one attempt on a thread of its own. A tracee that does not stop (frozen) cannot
/// be detached with ptrace; the kernel detaches it when its tracer thread exits, so an
/// attempt that has to give up on one simply ends, and we wait until the kernel let go.
#[cfg(target_arch = "x86_64")]
fn attempt_on_own_thread(
    target: &inject::Target,
    tid: i32,
    sp: u64,
    timeout: Duration,
) -> Result<inject::Attempt, TrimError> {
    let (result, abandoned) = std::thread::scope(|s| {
        s.spawn(|| {
            let mut abandoned = false;
            let r = inject::trim_thread(target, tid, Some(sp), timeout, &mut abandoned);
            (r, abandoned)
        })
        .join()
        .unwrap_or_else(|_| {
            (
                Err(TrimError::Unsupported("the trim thread panicked".into())),
                true,
            )
        })
    });
    if abandoned {
        // The thread's exit detaches it; that may lag its join by a moment.
        let status = procfs::task_path(target.pid, tid, "status");
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_secs(2) {
            let traced = std::fs::read_to_string(&status)
                .ok()
                .and_then(|s| procfs::parse_tracer_pid(&s))
                .is_some_and(|t| t != 0);
            if !traced {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    result
}

/// The thread to read the process's memory files through: the main thread, or when it
/// has exited (`pthread_exit` in main) the first thread still alive.
#[cfg(target_arch = "x86_64")]
fn view_thread(pid: i32) -> Result<i32, TrimError> {
    let maps = |tid: i32| std::fs::read_to_string(procfs::task_path(pid, tid, "maps"));
    match maps(pid) {
        Ok(m) if !m.is_empty() => return Ok(pid),
        Ok(_) => {}
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) => {}
        Err(e) => {
            let path = procfs::proc_path(pid, "maps");
            return Err(procfs::io_error(pid, "read memory maps", &path, e));
        }
    }
    procfs::list_tasks(pid)?
        .into_iter()
        .find(|&t| t != pid && maps(t).is_ok_and(|m| !m.is_empty()))
        .ok_or(TrimError::Gone { pid })
}

/// `PF_KTHREAD` in the flags of `/proc/PID/stat` (kernels without `Kthread:`).
#[cfg(target_arch = "x86_64")]
fn is_kernel_thread(pid: i32) -> bool {
    std::fs::read_to_string(procfs::proc_path(pid, "stat"))
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(") ")?.1;
            rest.split_whitespace().nth(6)?.parse::<u64>().ok()
        })
        .is_some_and(|flags| flags & 0x0020_0000 != 0)
}

/// Why seccomp forbids the injected call, from `Seccomp:` in `/proc/PID/status`.
/// Strict mode kills on anything but read/write/exit/sigreturn; a filter may kill, trap
/// (resetting the process's own SIGSYS handler) or fail `madvise`, `brk` or
/// `rt_sigreturn`, and proving from outside that it allows them would mean evaluating it,
/// so a filtered process is not trimmed.
#[cfg(target_arch = "x86_64")]
fn seccomp_problem(status: &str) -> Option<String> {
    match procfs::parse_status_number(status, "Seccomp") {
        None | Some(0) => None,
        Some(1) => Some(
            "it runs in seccomp strict mode, where malloc_trim's system calls would kill it \
             (trimrun cannot trim it; recycle it instead)"
                .into(),
        ),
        Some(_) => Some(
            "it runs under a seccomp filter, which may kill or trap malloc_trim's system calls \
             (madvise, brk, munmap, rt_sigreturn); trimrun does not inject into filtered processes"
                .into(),
        ),
    }
}

/// No libc mapped, yet the program is dynamically linked (its executable names an ELF
/// interpreter): it is between execve and its loader mapping libc, not a static binary.
#[cfg(target_arch = "x86_64")]
fn starting_up(pid: i32, view: i32, maps: &[procfs::MapEntry]) -> bool {
    let loader = maps.iter().any(|m| {
        m.path
            .as_deref()
            .and_then(|p| p.rsplit('/').next())
            .is_some_and(|n| n.starts_with("ld-linux"))
    });
    if loader {
        return true;
    }
    use std::io::Read;
    let mut head = Vec::new();
    let read = std::fs::File::open(procfs::task_path(pid, view, "exe"))
        .and_then(|f| f.take(64 * 1024).read_to_end(&mut head));
    read.is_ok() && has_interpreter(&head)
}

/// Whether an ELF64 little-endian file (its first bytes) has a `PT_INTERP` program header.
#[cfg(target_arch = "x86_64")]
fn has_interpreter(elf: &[u8]) -> bool {
    let get = |off: usize, n: usize| -> Option<u64> {
        let b = elf.get(off..off + n)?;
        Some(
            b.iter()
                .rev()
                .fold(0u64, |acc, &x| (acc << 8) | u64::from(x)),
        )
    };
    if elf.get(..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (get(0x20, 8), get(0x36, 2), get(0x38, 2))
    else {
        return false;
    };
    (0..phnum).any(|i| get((phoff + i * phentsize) as usize, 4) == Some(3))
}

/// Whether the process now maps another libc (or none) than the one we resolved.
#[cfg(target_arch = "x86_64")]
fn exec_happened(pid: i32, libc: &symbols::Libc) -> bool {
    let Ok(view) = view_thread(pid) else {
        return false;
    };
    let Ok(text) = std::fs::read_to_string(procfs::task_path(pid, view, "maps")) else {
        return false;
    };
    let maps = procfs::parse_maps(&text);
    match symbols::resolve(pid, view, &maps) {
        Ok(now) => now.malloc_trim != libc.malloc_trim,
        Err(_) => true,
    }
}

#[cfg(target_arch = "x86_64")]
fn exec_race(pid: i32) -> TrimError {
    TrimError::Deferred {
        pid,
        reason: "it executed a new program (execve) while being trimmed; nothing was injected \
                 into the new program"
            .into(),
    }
}

/// The signal frame above `sp` on the stack it lies in, if the thread is running a
/// signal handler (see [`classify::find_signal_frame`]). Reads at most 64 KiB.
#[cfg(target_arch = "x86_64")]
fn signal_frame_above(
    pid: i32,
    view: i32,
    maps: &[procfs::MapEntry],
    sp: u64,
    restore_rt: u64,
) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let m = maps.iter().find(|m| m.start <= sp && sp < m.end)?;
    let len = (m.end - sp).min(64 * 1024) as usize;
    let mem = std::fs::File::open(procfs::task_path(pid, view, "mem")).ok()?;
    let mut buf = vec![0u8; len];
    mem.read_exact_at(&mut buf, sp).ok()?;
    classify::find_signal_frame(&buf, sp, restore_rt)
}

/// Classification context from `/proc` alone (before attaching).
#[cfg(target_arch = "x86_64")]
struct FromProc<'a> {
    t: &'a inject::Target<'a>,
}

#[cfg(target_arch = "x86_64")]
impl classify::Context for FromProc<'_> {
    fn fd_target(&self, fd: u64) -> Option<String> {
        procfs::fd_target(self.t.pid, self.t.view, fd)
    }
    fn read_word(&self, addr: u64) -> Option<u64> {
        use std::os::unix::fs::FileExt;
        let mem = std::fs::File::open(procfs::task_path(self.t.pid, self.t.view, "mem")).ok()?;
        let mut buf = [0u8; 8];
        mem.read_exact_at(&mut buf, addr).ok()?;
        Some(u64::from_ne_bytes(buf))
    }
    fn restartable_function_at(&self, ip: u64) -> Option<&'static str> {
        self.t.libc.restartable_function_at(ip)
    }
    fn is_gil(&self, addr: u64) -> bool {
        self.t.gil.as_ref().is_some_and(|g| g.contains(&addr))
    }
}

/// A thread id and the stack pointer it had when found parked.
#[cfg(target_arch = "x86_64")]
type Candidate = (i32, u64);

/// Threads that look parked in a safe syscall (with their stack pointers), main thread
/// first, and why the others were passed over.
#[cfg(target_arch = "x86_64")]
fn candidates(
    t: &inject::Target,
    only: Option<i32>,
) -> Result<(Vec<Candidate>, Vec<String>), TrimError> {
    let pid = t.pid;
    let tids = match only {
        Some(t) => vec![t],
        None => procfs::list_tasks(pid)?,
    };
    let ctx = FromProc { t };
    let mut ok = Vec::new();
    let mut reasons = Vec::new();
    for tid in tids {
        let path = procfs::proc_path(pid, &format!("task/{tid}/syscall"));
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            // A thread that exited since the directory was listed (or the main thread,
            // exited while the others live on).
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ESRCH)) => {
                continue;
            }
            Err(e) => return Err(procfs::io_error(pid, "read the syscall of", &path, e)),
        };
        match procfs::parse_task_syscall(&text) {
            Some(procfs::TaskSyscall::In { nr, args, sp, ip }) => {
                match classify::classify(nr, args, ip, &ctx) {
                    Ok(_) => ok.push((tid, sp)),
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
    fn closing_the_gate_waits_for_trims_in_flight_and_refuses_new_ones() {
        let gate = std::sync::Arc::new(Gate::new());
        let held = gate.enter(1).unwrap();
        assert!(
            !gate.close(Duration::from_millis(20)),
            "returned with a trim in flight"
        );
        assert!(matches!(gate.enter(2), Err(TrimError::Deferred { .. })));
        let g = gate.clone();
        let waiter = std::thread::spawn(move || g.close(Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        drop(held);
        assert!(waiter.join().unwrap(), "did not see the trim finish");
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tells_dynamic_executables_from_static_ones() {
        let own = std::fs::read("/proc/self/exe").unwrap();
        // The test binary is linked dynamically against glibc.
        assert!(has_interpreter(&own));
        let mut stripped = own.clone();
        // Turn every PT_INTERP into PT_NULL: what a static binary looks like.
        let phoff = u64::from_le_bytes(own[0x20..0x28].try_into().unwrap()) as usize;
        let n = u16::from_le_bytes(own[0x38..0x3a].try_into().unwrap()) as usize;
        let sz = u16::from_le_bytes(own[0x36..0x38].try_into().unwrap()) as usize;
        for i in 0..n {
            if stripped[phoff + i * sz] == 3 {
                stripped[phoff + i * sz] = 0;
            }
        }
        assert!(!has_interpreter(&stripped));
        assert!(!has_interpreter(b"#!/bin/sh\n"));
    }

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
        assert!(
            TrimError::TimedOut {
                pid: 1,
                finishing: true
            }
            .is_retryable()
        );
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
