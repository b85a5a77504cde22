//! The ptrace mechanics of one injected call: seize and interrupt one thread, check from
//! its registers that it is parked in a safe syscall, save its state, run
//! `malloc_trim(0)` on it so that it comes back by itself, detach.
//!
//! A call nothing can turn into a crash: the thread's saved state (registers, signal
//! mask, XSAVE area) is written as a signal frame on its own stack, below the red zone,
//! and `malloc_trim` returns into libc's `__restore_rt`, whose `rt_sigreturn` puts it all
//! back. If trimrun dies at any instant (SIGKILL, a crash, a supervisor that exits), the
//! kernel detaches the thread and the frame brings it back to where it was; nothing of the
//! call depends on us being there. The frame re-runs the interrupted syscall itself
//! (`rip -= 2`, `rax` = its number, since `rt_sigreturn` applies no restart), and leaves
//! `-EINTR` (epoll_wait) to the program, as a detach would have.
//!
//! While we are alive we still see the end: before resuming the call we queue a marker
//! signal to the thread, blocked during the call and unblocked by the mask the frame
//! restores, so the thread stops in signal delivery right after `rt_sigreturn`. There we
//! set the registers the kernel's own restart logic expects (syscall number in `orig_rax`,
//! `-ERESTART*` in `rax`, see [`arch::resume_regs`]), drop the marker and detach, so a
//! signal that arrived during the call is handled with the usual semantics (`EINTR` when
//! its handler has no `SA_RESTART`). The marker is a signal the process ignores (its
//! default, like SIGURG, or `SIG_IGN`), so should we die first it is discarded.
//!
//! Why not stop at the return itself: a hardware breakpoint outlives a dead tracer and
//! would then kill the thread with SIGTRAP, and `PTRACE_SYSCALL` would stop on each of the
//! thousands of `madvise` calls of a large trim. Without that stop `malloc_trim`'s return
//! value is not seen; the report carries whether memory was released instead.
//!
//! Signals: all but the synchronous faults are blocked for the call, so the ones that
//! arrive stay pending and are delivered once the saved mask is back. Faults stay
//! unblocked because the kernel resets the handler of a *blocked* synchronous fault signal
//! to SIG_DFL, which would remove the application's own handler (Python's faulthandler).
//!
//! Timeouts: every wait is bounded. A thread that does not stop (a frozen cgroup, a long
//! uninterruptible sleep) is released untouched by ending the tracer thread, which is
//! what detaches a running tracee. A call still running after the bound is looked at: if
//! it waits in `futex` for an arena lock another thread holds (`malloc_trim` holds none
//! while it waits for the next), the call is abandoned and the saved state put back;
//! anywhere else the thread is released and finishes the call on its own, through the
//! frame.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

use super::TrimError;
use super::arch::{self, Regs};
use super::classify::{self, Context};
use super::procfs;
use super::symbols::{CODE_CHECK, Libc};

const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;

/// How one attempt on one thread ended.
pub enum Attempt {
    /// `malloc_trim` ran and returned; the thread was stopped for `pause`.
    Done {
        syscall: &'static str,
        pause: Duration,
        /// From resuming the thread into the call until we saw it return.
        call: Duration,
    },
    /// The thread was not parked in a safe syscall after all; it was released untouched.
    NotParked(String),
}

/// A ptrace stop or exit as `waitpid` reports it.
#[derive(Debug, Clone, Copy)]
enum Stop {
    /// Exited or killed; raw wait status.
    Exit(i32),
    /// Signal-delivery-stop for this signal.
    Signal(i32),
    /// PTRACE_EVENT_STOP: SIGTRAP for our interrupt, a stop signal for a group-stop.
    Event(i32),
}

fn decode(status: i32) -> Stop {
    if libc::WIFSTOPPED(status) {
        let sig = libc::WSTOPSIG(status);
        if (status >> 16) == PTRACE_EVENT_STOP {
            Stop::Event(sig)
        } else {
            Stop::Signal(sig)
        }
    } else {
        Stop::Exit(status)
    }
}

fn pt(req: libc::c_uint, tid: i32, addr: usize, data: usize) -> io::Result<libc::c_long> {
    // SAFETY: every caller passes, for requests that write through `data`, a pointer to a
    // live buffer of the size the request writes (user_regs_struct, iovec, siginfo_t,
    // a u64 sigset); other requests take plain integers.
    let r = unsafe {
        libc::ptrace(
            req,
            tid,
            addr as *mut libc::c_void,
            data as *mut libc::c_void,
        )
    };
    if r == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn peek(tid: i32, addr: u64) -> io::Result<u64> {
    // SAFETY: errno is thread-local; PEEKDATA returns the word, so -1 is an error only
    // when errno is set.
    unsafe { *libc::__errno_location() = 0 };
    // SAFETY: PEEKDATA takes an address in the tracee and returns the word read.
    let r = unsafe { libc::ptrace(libc::PTRACE_PEEKDATA, tid, addr as *mut libc::c_void, 0) };
    let e = io::Error::last_os_error();
    if r == -1 && e.raw_os_error() != Some(0) {
        Err(e)
    } else {
        Ok(r as u64)
    }
}

fn get_regs(tid: i32) -> io::Result<Regs> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    pt(
        libc::PTRACE_GETREGS,
        tid,
        0,
        &mut regs as *mut Regs as usize,
    )?;
    Ok(regs)
}

fn set_regs(tid: i32, regs: &Regs) -> io::Result<()> {
    pt(libc::PTRACE_SETREGS, tid, 0, regs as *const Regs as usize).map(drop)
}

/// Size of the thread's XSAVE area as the kernel reports it, learnt from the first read.
static XSTATE_LEN: AtomicUsize = AtomicUsize::new(0);

fn get_xstate(tid: i32) -> io::Result<Vec<u8>> {
    // Ask for one word more than we expect: the kernel truncates to its own size, so a
    // shorter answer is the whole area, read in one call. (Asking for exactly the expected
    // size cannot tell "all of it" from "cut short", and cost a second read every time.)
    let known = XSTATE_LEN.load(Ordering::Relaxed);
    let mut size = if known > 0 {
        known
    } else {
        arch::xstate_size()
    } + 8;
    loop {
        let mut buf = vec![0u8; size];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        pt(
            libc::PTRACE_GETREGSET,
            tid,
            arch::NT_XSTATE as usize,
            &mut iov as *mut libc::iovec as usize,
        )?;
        if iov.iov_len < buf.len() || size >= 256 * 1024 {
            buf.truncate(iov.iov_len);
            XSTATE_LEN.store(buf.len(), Ordering::Relaxed);
            return Ok(buf);
        }
        size *= 2;
    }
}

fn set_xstate(tid: i32, xstate: &[u8]) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: xstate.as_ptr() as *mut libc::c_void,
        iov_len: xstate.len(),
    };
    pt(
        libc::PTRACE_SETREGSET,
        tid,
        arch::NT_XSTATE as usize,
        &mut iov as *mut libc::iovec as usize,
    )
    .map(drop)
}

fn get_sigmask(tid: i32) -> io::Result<u64> {
    let mut mask = 0u64;
    pt(PTRACE_GETSIGMASK, tid, 8, &mut mask as *mut u64 as usize)?;
    Ok(mask)
}

fn set_sigmask(tid: i32, mask: u64) -> io::Result<()> {
    pt(PTRACE_SETSIGMASK, tid, 8, &mask as *const u64 as usize).map(drop)
}

fn get_siginfo(tid: i32) -> io::Result<libc::siginfo_t> {
    // SAFETY: siginfo_t is plain old data; all-zero is a valid value.
    let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
    pt(
        libc::PTRACE_GETSIGINFO,
        tid,
        0,
        &mut si as *mut libc::siginfo_t as usize,
    )?;
    Ok(si)
}

fn cont(tid: i32, sig: i32) -> io::Result<()> {
    pt(libc::PTRACE_CONT, tid, 0, sig as usize).map(drop)
}

fn detach(tid: i32, sig: i32) -> io::Result<()> {
    pt(libc::PTRACE_DETACH, tid, 0, sig as usize).map(drop)
}

/// How long [`wait_stop`] polls, yielding the CPU between polls, before it naps instead.
/// Long enough to cover a routine trim of a large fragmented heap (~5 ms) and most first
/// trims, short enough that a call that runs for seconds does not keep a core busy.
const YIELD_SPIN: Duration = Duration::from_millis(10);

/// Wait for a stop of `tid` (only that thread: `waitpid(tid, __WALL)`), polling until
/// `deadline` (None: block). Returns None when the deadline passed first.
///
/// Why poll with `sched_yield` rather than block or spin: a blocking wait makes the
/// tracee's stop wake us, and waking an idle CPU costs tens to hundreds of microseconds
/// in a VM (an idle vCPU halts); a bare spin is worse when the scheduler queued the tracee
/// on *our* CPU (common: wakers and wakees are packed together), because the tracee then
/// waits for our spin to end (seen in a scheduler trace: 175 µs of a 250 µs pause).
/// Yielding between polls lets a tracee queued here run at once, and notices a tracee on
/// another CPU without a wakeup. With the XSAVE change in [`restore`], the ptrace overhead
/// per trim went from 108–152 µs to 39–73 µs median on a 2-vCPU VM
/// (`bench/trim/RESULTS.md`).
fn wait_stop(tid: i32, deadline: Option<Instant>) -> io::Result<Option<Stop>> {
    let started = Instant::now();
    let mut nap = Duration::from_micros(5);
    loop {
        let mut status = 0;
        let flags = libc::__WALL | if deadline.is_some() { libc::WNOHANG } else { 0 };
        // SAFETY: waitpid writes the status into a live local.
        let r = unsafe { libc::waitpid(tid, &mut status, flags) };
        if r == tid {
            return Ok(Some(decode(status)));
        }
        if r == -1 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(e);
        }
        let Some(deadline) = deadline else { continue };
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        if now - started < YIELD_SPIN {
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        } else {
            std::thread::sleep(nap.min(deadline - now));
            nap = (nap * 2).min(Duration::from_micros(50));
        }
    }
}

/// The error for a tracee whose exit we observed (raw wait status).
fn exited(pid: i32, tid: i32, status: i32) -> TrimError {
    if tid == pid {
        TrimError::Exited { pid, status }
    } else {
        TrimError::Gone { pid }
    }
}

/// A ptrace request failed with ESRCH while attached: the tracee was killed. Collect its
/// exit (bounded) so the status is reported, not silently consumed.
fn lost(pid: i32, tid: i32) -> TrimError {
    match wait_stop(tid, Some(Instant::now() + Duration::from_secs(2))) {
        Ok(Some(Stop::Exit(status))) => exited(pid, tid, status),
        _ => TrimError::Gone { pid },
    }
}

/// Map an error of a ptrace request made while attached and stopped.
fn attached_err(pid: i32, tid: i32, op: &str, e: io::Error) -> TrimError {
    if e.raw_os_error() == Some(libc::ESRCH) {
        lost(pid, tid)
    } else {
        TrimError::Io {
            op: op.to_string(),
            path: format!("/proc/{pid}/task/{tid}").into(),
            source: e,
        }
    }
}

fn seize(pid: i32, tid: i32) -> Result<(), TrimError> {
    let Err(e) = pt(libc::PTRACE_SEIZE, tid, 0, 0) else {
        return Ok(());
    };
    match e.raw_os_error() {
        Some(libc::ESRCH) => Err(TrimError::Gone { pid }),
        Some(libc::EPERM) => {
            let status = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status"))
                .unwrap_or_default();
            // A thread that is exiting (a zombie: killed, not yet reaped) cannot be seized
            // either: that is a process going away, not a permission problem.
            if status.is_empty() || exiting(&status) {
                return Err(TrimError::Gone { pid });
            }
            match procfs::parse_tracer_pid(&status) {
                Some(tracer) if tracer != 0 => Err(TrimError::AlreadyTraced { pid, tracer }),
                _ => Err(TrimError::NotTraceable {
                    pid,
                    reason: format!("{} {}", "operation not permitted", super::TRACE_REMEDY),
                }),
            }
        }
        _ => Err(TrimError::NotTraceable {
            pid,
            reason: format!("ptrace seize of thread {tid} failed: {e}"),
        }),
    }
}

/// `State:` of a /proc status file says zombie or dead.
fn exiting(status: &str) -> bool {
    status
        .lines()
        .find_map(|l| l.strip_prefix("State:"))
        .is_some_and(|v| matches!(v.trim_start().chars().next(), Some('Z' | 'X')))
}

/// What the injector knows about the process, read from `/proc` before attaching.
pub struct Target<'a> {
    pub pid: i32,
    /// The thread whose `/proc` files show the process's memory (see `view_thread`).
    pub view: i32,
    pub libc: &'a Libc,
    /// `SigIgn` and `SigCgt` of `/proc/PID/status`: process-wide dispositions.
    pub ignored: u64,
    pub caught: u64,
    /// The interpreter's GIL state, if the process is CPython: `futex` waits there are
    /// allowed (see [`classify`]).
    pub gil: Option<std::ops::Range<u64>>,
}

/// Classification context for a stopped tracee.
struct Stopped<'a> {
    t: &'a Target<'a>,
    tid: i32,
}

impl Context for Stopped<'_> {
    fn fd_target(&self, fd: u64) -> Option<String> {
        procfs::fd_target(self.t.pid, self.t.view, fd)
    }
    fn read_word(&self, addr: u64) -> Option<u64> {
        peek(self.tid, addr).ok()
    }
    fn restartable_function_at(&self, ip: u64) -> Option<&'static str> {
        self.t.libc.restartable_function_at(ip)
    }
    fn is_gil(&self, addr: u64) -> bool {
        self.t.gil.as_ref().is_some_and(|g| g.contains(&addr))
    }
}

fn read_remote(pid: i32, addr: u64, buf: &mut [u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: one local iovec over `buf`, which outlives the call; the remote address is
    // only read by the kernel in the other process.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    match n {
        -1 => Err(io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
    }
}

fn write_remote(pid: i32, addr: u64, buf: &[u8]) -> io::Result<()> {
    let local = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the kernel only reads `buf` (live for the call) and writes the other
    // process's memory.
    let n = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    match n {
        -1 => Err(io::Error::last_os_error()),
        n if n as usize == buf.len() => Ok(()),
        _ => Err(io::Error::from(io::ErrorKind::WriteZero)),
    }
}

/// Did the process exec since we resolved its libc? Compare the code at `malloc_trim`
/// and `__restore_rt` with the file's (one `process_vm_readv`): a new image has other
/// code (or nothing) there.
fn same_image(t: &Target, tid: i32) -> io::Result<bool> {
    let (mt, rt) = t.libc.expected_code();
    let mut a = [0u8; CODE_CHECK];
    let mut b = [0u8; 9];
    let local = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    let remote = [
        libc::iovec {
            iov_base: t.libc.malloc_trim as *mut libc::c_void,
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: t.libc.restore_rt as *mut libc::c_void,
            iov_len: b.len(),
        },
    ];
    // SAFETY: two local iovecs over `a` and `b`, which outlive the call; the remote
    // addresses are only read by the kernel in the other process.
    let n = unsafe { libc::process_vm_readv(tid, local.as_ptr(), 2, remote.as_ptr(), 2, 0) };
    if n == -1 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EFAULT) | Some(libc::EIO) => Ok(false),
            _ => Err(e),
        };
    }
    Ok(n as usize == a.len() + b.len() && a == mt && b == rt)
}

/// The syscall a thread stopped in `nr` will run again: `nr` itself, or for
/// `restart_syscall` the one glibc's call site enters (`mov $NR,%eax; syscall`).
fn restart_nr(tid: i32, regs: &Regs) -> Option<i64> {
    let nr = arch::syscall_nr(regs);
    if nr != arch::nr::RESTART_SYSCALL {
        return Some(nr);
    }
    let mut code = [0u8; 7];
    read_remote(tid, arch::ip(regs).checked_sub(7)?, &mut code).ok()?;
    arch::syscall_site_nr(&code).filter(|n| {
        matches!(
            *n,
            arch::nr::NANOSLEEP | arch::nr::CLOCK_NANOSLEEP | arch::nr::POLL | arch::nr::PPOLL
        )
    })
}

/// Seize thread `tid` of `t.pid`, and if it is parked in a safe syscall, run
/// `malloc_trim(0)` on it. `expect_sp` is the stack pointer the thread had when it was
/// checked from `/proc` (for a signal handler frame): a thread found elsewhere is not used.
/// The thread is released in every outcome except a crash of the call (then it gets its
/// signal, as it would have without us) and except when it does not stop or finish in
/// time: then `*release_by_exit` is set and the caller must end this OS thread, which
/// detaches it.
pub fn trim_thread(
    t: &Target,
    tid: i32,
    expect_sp: Option<u64>,
    timeout: Duration,
    release_by_exit: &mut bool,
) -> Result<Attempt, TrimError> {
    let pid = t.pid;
    seize(pid, tid)?;
    let t0 = Instant::now();
    if let Err(e) = pt(libc::PTRACE_INTERRUPT, tid, 0, 0) {
        return Err(attached_err(pid, tid, "interrupt thread", e));
    }
    let first = match wait_stop(tid, Some(t0 + timeout)) {
        Ok(Some(s)) => s,
        Ok(None) => {
            // Frozen (cgroup freezer) or in an uninterruptible sleep. A running tracee
            // cannot be detached; ending the tracer thread releases it untouched.
            *release_by_exit = true;
            return Err(TrimError::Deferred {
                pid,
                reason: format!(
                    "thread {tid} did not stop within {timeout:?} (frozen cgroup or \
                     uninterruptible sleep?); released untouched"
                ),
            });
        }
        Err(_) => return Err(TrimError::Gone { pid }),
    };
    match first {
        Stop::Exit(status) => return Err(exited(pid, tid, status)),
        Stop::Signal(sig) => {
            // A signal got there first: let it be delivered, try later.
            detach(tid, sig).map_err(|e| attached_err(pid, tid, "detach", e))?;
            return Ok(Attempt::NotParked(format!(
                "thread {tid} was receiving signal {sig}"
            )));
        }
        Stop::Event(sig) if sig != libc::SIGTRAP => {
            detach(tid, 0).map_err(|e| attached_err(pid, tid, "detach", e))?;
            return Err(TrimError::Deferred {
                pid,
                reason: format!("the process is stopped (signal {sig})"),
            });
        }
        Stop::Event(_) => {}
    }
    let regs = get_regs(tid).map_err(|e| attached_err(pid, tid, "read registers", e))?;
    let (nr, ret) = (arch::syscall_nr(&regs), arch::syscall_ret(&regs));
    let verdict = if nr >= 0 && !classify::is_interrupted(ret) {
        Err(format!("thread {tid} had just finished syscall {nr}"))
    } else if expect_sp.is_some_and(|sp| sp != regs.rsp) {
        Err(format!("thread {tid} moved since it was checked"))
    } else {
        let ctx = Stopped { t, tid };
        classify::classify(nr, arch::syscall_args(&regs), arch::ip(&regs), &ctx)
            .map_err(|r| format!("thread {tid}: {r}"))
            .and_then(|name| match restart_nr(tid, &regs) {
                Some(n) => Ok((name, n)),
                None => Err(format!(
                    "thread {tid}: restart_syscall of an unrecognised call site"
                )),
            })
    };
    let (syscall, restart) = match verdict {
        Ok(v) => v,
        Err(reason) => {
            detach(tid, 0).map_err(|e| attached_err(pid, tid, "detach", e))?;
            return Ok(Attempt::NotParked(reason));
        }
    };
    match same_image(t, tid) {
        Ok(true) => {}
        other => {
            detach(tid, 0).map_err(|e| attached_err(pid, tid, "detach", e))?;
            let why = match other {
                Err(e) => format!("cannot read its code to check it: {e}"),
                _ => "it executed a new program (execve) since it was inspected".into(),
            };
            return Err(TrimError::Deferred {
                pid,
                reason: format!("nothing injected: {why}"),
            });
        }
    }
    let call = call(t, tid, &regs, restart, timeout, release_by_exit)?;
    Ok(Attempt::Done {
        syscall,
        pause: t0.elapsed(),
        call,
    })
}

/// Everything we change in the thread, to put back.
struct Saved {
    regs: Regs,
    xstate: Vec<u8>,
    mask: u64,
}

fn restore(tid: i32, s: &Saved) -> io::Result<()> {
    set_regs(tid, &s.regs)?;
    // Writing the XSAVE area back costs ~15 µs (the kernel validates it and lays it out
    // again), reading it ~4 µs, and malloc_trim seldom leaves vector or x87 state changed.
    // Byte-identical output of GETREGSET is identical architectural state, so the write is
    // only needed when the read differs.
    if get_xstate(tid)? != s.xstate {
        set_xstate(tid, &s.xstate)?;
    }
    set_sigmask(tid, s.mask)
}

/// The signal that marks the end of the call: one the thread does not block and the
/// process ignores (by default or with `SIG_IGN`), so that, delivered without us, it does
/// nothing. SIGCONT is never used: sending it resumes a stopped process.
pub fn marker_signal(thread_mask: u64, ignored: u64, caught: u64) -> Option<i32> {
    let bit = |s: i32| 1u64 << (s - 1);
    let free = |s: i32| thread_mask & bit(s) == 0 && caught & bit(s) == 0;
    [libc::SIGURG, libc::SIGWINCH, libc::SIGCHLD]
        .into_iter()
        .find(|&s| free(s))
        .or_else(|| {
            (1..=64).find(|&s| {
                ignored & bit(s) != 0
                    && free(s)
                    && !matches!(s, libc::SIGCONT | libc::SIGKILL | libc::SIGSTOP)
                    && !is_fault(s)
            })
        })
}

fn is_fault(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP
    )
}

/// The mask the thread runs the call with: everything but the synchronous faults.
fn call_mask() -> u64 {
    let mut m = !0u64;
    for s in [libc::SIGSEGV, libc::SIGBUS, libc::SIGILL, libc::SIGFPE] {
        m &= !(1u64 << (s - 1));
    }
    m
}

/// Detach, handing back `first` through the detach itself and re-sending `more`.
fn release(pid: i32, tid: i32, first: i32, more: &[i32]) -> Result<(), TrimError> {
    detach(tid, first).map_err(|e| attached_err(pid, tid, "detach", e))?;
    for &sig in more {
        // SAFETY: tgkill has no memory preconditions.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    }
    Ok(())
}

/// Run `malloc_trim(0)` on the stopped thread whose registers are `regs` (parked in a
/// syscall that restarts as `restart`); returns how long the call ran.
fn call(
    t: &Target,
    tid: i32,
    regs: &Regs,
    restart: i64,
    timeout: Duration,
    release_by_exit: &mut bool,
) -> Result<Duration, TrimError> {
    let pid = t.pid;
    let err = |op: &str, e: io::Error| attached_err(pid, tid, op, e);
    let xstate = get_xstate(tid).map_err(|e| err("read extended registers", e))?;
    let mask = get_sigmask(tid).map_err(|e| err("read signal mask", e))?;
    let Some(marker) = marker_signal(mask, t.ignored, t.caught) else {
        detach(tid, 0).map_err(|e| err("detach", e))?;
        return Err(TrimError::Deferred {
            pid,
            reason: format!(
                "thread {tid} blocks or handles every signal that could mark the end of the call"
            ),
        });
    };
    let saved = Saved {
        regs: *regs,
        xstate,
        mask,
    };
    let frame = arch::call_frame(
        regs,
        restart,
        mask,
        &saved.xstate,
        t.libc.restore_rt,
        t.libc.malloc_trim,
        0,
    );
    // The frame goes below the red zone, memory the ABI leaves to whoever runs next (a
    // signal handler would overwrite it too), so its old contents are not kept.
    match write_remote(tid, frame.addr, &frame.bytes) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(lost(pid, tid)),
        Err(e) => {
            detach(tid, 0).map_err(|e| err("detach", e))?;
            return Err(TrimError::Deferred {
                pid,
                reason: format!(
                    "stack of thread {tid} below its red zone is not writable ({} bytes at {:#x}): {e}",
                    frame.bytes.len(),
                    frame.addr
                ),
            });
        }
    }
    // Order matters should we die in between: registers first (from then on the frame
    // restores everything, mask included), then the mask, then the marker.
    let setup = set_regs(tid, &frame.regs)
        .and_then(|_| set_sigmask(tid, call_mask()))
        .and_then(|_| {
            // SAFETY: tgkill has no memory preconditions.
            match unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, marker) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        });
    // The call is timed from the resume: the scheduler often runs the tracee on this CPU
    // as soon as it is woken, so the call may be over by the time PTRACE_CONT returns.
    let started = Instant::now();
    let setup = setup.and_then(|_| cont(tid, 0));
    if let Err(e) = setup {
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Err(lost(pid, tid));
        }
        restore(tid, &saved).map_err(|e| err("restore thread state", e))?;
        detach(tid, 0).map_err(|e| err("detach", e))?;
        return Err(err("set up the call", e));
    }

    let me = std::process::id() as i32;
    let mut pending: Vec<i32> = Vec::new();
    let mut deadline = started + timeout;
    let mut interrupting = false;
    loop {
        let stop = match wait_stop(tid, Some(deadline)) {
            Ok(Some(s)) => s,
            Ok(None) if !interrupting => {
                pt(libc::PTRACE_INTERRUPT, tid, 0, 0).map_err(|e| err("interrupt", e))?;
                interrupting = true;
                deadline = Instant::now() + timeout;
                continue;
            }
            Ok(None) => {
                // It does not even stop (frozen mid-call): let it go, the frame brings it
                // back whenever it runs again.
                *release_by_exit = true;
                return Err(TrimError::TimedOut {
                    pid,
                    finishing: true,
                });
            }
            Err(_) => return Err(TrimError::Gone { pid }),
        };
        match stop {
            Stop::Exit(status) => return Err(exited(pid, tid, status)),
            Stop::Signal(sig) => {
                let si = get_siginfo(tid).map_err(|e| err("read signal info", e))?;
                let ours = sig == marker
                    && si.si_code == libc::SI_TKILL
                    // SAFETY: si_pid is valid for SI_TKILL signals.
                    && unsafe { si.si_pid() } == me;
                let from_kernel = si.si_code > 0;
                // Our marker is blocked until rt_sigreturn restores the saved mask: seeing
                // it means the call is over, without reading the registers.
                let now = if ours {
                    None
                } else {
                    Some(get_regs(tid).map_err(|e| err("read registers", e))?)
                };
                let back = now.as_ref().is_none_or(|r| arch::returned(r, frame.addr));
                if is_fault(sig) && from_kernel && !back {
                    // A real fault inside the call. Restore nothing: let it die as it
                    // would have, with the signal, and say so.
                    // SAFETY: si_addr is valid to read for the fault signals checked above.
                    let addr = unsafe { si.si_addr() } as u64;
                    let detail = format!(
                        "signal {sig} (code {}) at ip {:#x}, address {addr:#x}, in thread {tid}",
                        si.si_code,
                        now.as_ref().map_or(0, arch::ip)
                    );
                    let _ = detach(tid, sig);
                    return Err(TrimError::Crashed { pid, detail });
                }
                if !back {
                    // A signal sent by someone during the call: keep it for later.
                    pending.push(sig);
                    cont(tid, 0).map_err(|e| err("resume", e))?;
                    continue;
                }
                // rt_sigreturn has run: registers, mask and XSAVE state are the saved
                // ones, but with the restart already applied. Hand the kernel the state it
                // expects instead, so this signal (or none) is handled as it would have
                // been without us.
                let ran = started.elapsed();
                set_regs(tid, &arch::resume_regs(&saved.regs, restart))
                    .map_err(|e| err("restore registers", e))?;
                let first = if ours { 0 } else { sig };
                release(pid, tid, first, &pending)?;
                return Ok(ran);
            }
            Stop::Event(libc::SIGTRAP) if interrupting => {
                let now = get_regs(tid).map_err(|e| err("read registers", e))?;
                if arch::returned(&now, frame.addr) {
                    // Back in its own syscall: the marker was taken by someone else.
                    release(pid, tid, 0, &pending)?;
                    return Ok(started.elapsed());
                }
                if arch::syscall_nr(&now) == arch::nr::FUTEX
                    && classify::is_interrupted(arch::syscall_ret(&now))
                {
                    // Waiting for an arena lock: malloc_trim holds no lock between arenas,
                    // so abandoning the call here leaves the heap consistent. The marker
                    // stays pending and is discarded once the saved mask is back.
                    restore(tid, &saved).map_err(|e| err("restore thread state", e))?;
                    release(pid, tid, 0, &pending)?;
                    return Err(TrimError::TimedOut {
                        pid,
                        finishing: false,
                    });
                }
                // Anywhere else it may hold an arena lock: release it to finish the call
                // on its own; the frame restores it when malloc_trim returns.
                warn!(
                    pid,
                    tid,
                    ip = arch::ip(&now),
                    "malloc_trim still running after the timeout; the thread finishes it on its own"
                );
                release(pid, tid, 0, &pending)?;
                return Err(TrimError::TimedOut {
                    pid,
                    finishing: true,
                });
            }
            Stop::Event(_) => {
                // A group-stop (SIGSTOP...) or a stale interrupt: keep running the call;
                // the group-stop takes effect again once we detach.
                cont(tid, 0).map_err(|e| err("resume", e))?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn zombies_and_dead_threads_are_exiting() {
        assert!(super::exiting("Name:\tpython3\nState:\tZ (zombie)\n"));
        assert!(super::exiting("State:\tX (dead)\n"));
        assert!(!super::exiting("State:\tS (sleeping)\nTracerPid:\t0\n"));
    }

    #[test]
    fn marker_is_an_ignored_signal_the_thread_does_not_block() {
        let bit = |s: i32| 1u64 << (s - 1);
        assert_eq!(super::marker_signal(0, 0, 0), Some(libc::SIGURG));
        assert_eq!(
            super::marker_signal(bit(libc::SIGURG), 0, 0),
            Some(libc::SIGWINCH)
        );
        let busy = bit(libc::SIGURG) | bit(libc::SIGWINCH) | bit(libc::SIGCHLD);
        assert_eq!(super::marker_signal(0, 0, busy), None);
        assert_eq!(
            super::marker_signal(0, bit(libc::SIGPIPE), busy),
            Some(libc::SIGPIPE)
        );
        assert_eq!(super::marker_signal(0, bit(libc::SIGCONT), busy), None);
        assert_eq!(
            super::marker_signal(bit(libc::SIGPIPE), bit(libc::SIGPIPE), busy),
            None
        );
    }
}
