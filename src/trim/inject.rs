//! The ptrace mechanics of one injected call: seize and interrupt one thread, check from
//! its registers that it is parked in a safe syscall, save its state, run
//! `malloc_trim(0)` on it, catch the return, put everything back, detach.
//!
//! Why the state comes back exactly: the thread stops (PTRACE_INTERRUPT) inside the
//! kernel's signal handling on its way out of the syscall, with `orig_rax` = the syscall
//! and `rax` = -ERESTART* (or -EINTR). We run the call with `orig_rax = -1`, so the kernel
//! does not apply the restart to our call. The call ends in a fault at [`RETURN_ADDR`],
//! which stops the thread at the same place in the kernel (signal delivery); we put the
//! saved registers back, suppress that SIGSEGV and detach, and the kernel now performs the
//! restart it skipped: `rip -= 2` and `rax = orig_rax` (or `restart_syscall`, whose
//! per-thread restart block — e.g. nanosleep's absolute expiry — our call did not touch).
//! Sleeps are therefore not shortened, and only syscalls that return -EINTR to any ptrace
//! interrupt (epoll_wait) see one.
//!
//! Signals: all but SIGSEGV are blocked for the call, so the ones that arrive stay pending
//! and are delivered once the saved mask is back. SIGSEGV stays unblocked because the
//! kernel resets the handler of a *blocked* synchronous fault signal to SIG_DFL, which
//! would silently remove the application's own handler (Python's faulthandler).
//!
//! Timeouts: when the call has not returned within the bound, the thread is interrupted
//! and its registers looked at. If it is waiting in `futex` (for an arena lock another
//! thread holds — `malloc_trim` holds no lock while it waits for the next one), the call
//! is abandoned, the saved state restored and [`TrimError::TimedOut`] returned. Anywhere
//! else it may be holding an arena lock, and abandoning it would deadlock the process for
//! good, so it is resumed and allowed to finish (with one warning): a slow trim is better
//! than a hung worker.
//!
//! [`RETURN_ADDR`]: super::arch::RETURN_ADDR

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::warn;

use super::TrimError;
use super::arch::{self, Regs};
use super::classify::{self, Context};
use super::procfs;
use super::symbols::Libc;

const PTRACE_EVENT_STOP: i32 = 128;
const PTRACE_GETSIGMASK: libc::c_uint = 0x420a;
const PTRACE_SETSIGMASK: libc::c_uint = 0x420b;

/// How one attempt on one thread ended.
pub enum Attempt {
    /// `malloc_trim` returned `ret`; the thread was stopped for `pause`.
    Done {
        ret: i32,
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

fn poke(tid: i32, addr: u64, word: u64) -> io::Result<()> {
    pt(libc::PTRACE_POKEDATA, tid, addr as usize, word as usize).map(drop)
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

/// Classification context for a stopped tracee.
struct Stopped<'a> {
    pid: i32,
    tid: i32,
    libc: &'a Libc,
}

impl Context for Stopped<'_> {
    fn fd_target(&self, fd: u64) -> Option<String> {
        procfs::fd_target(self.pid, fd)
    }
    fn read_word(&self, addr: u64) -> Option<u64> {
        peek(self.tid, addr).ok()
    }
    fn restartable_function_at(&self, ip: u64) -> Option<&'static str> {
        self.libc.restartable_function_at(ip)
    }
}

/// Seize thread `tid` of `pid`, and if it is parked in a safe syscall, run
/// `malloc_trim(0)` on it. The thread is released in every outcome except a crash of the
/// call (then it gets its SIGSEGV, as it would have without us).
pub fn trim_thread(
    pid: i32,
    tid: i32,
    libc: &Libc,
    timeout: Duration,
) -> Result<Attempt, TrimError> {
    seize(pid, tid)?;
    let t0 = Instant::now();
    if let Err(e) = pt(libc::PTRACE_INTERRUPT, tid, 0, 0) {
        return Err(attached_err(pid, tid, "interrupt thread", e));
    }
    let first = match wait_stop(tid, Some(t0 + timeout)) {
        Ok(Some(s)) => s,
        Ok(None) => {
            // Uninterruptible sleep: a running tracee cannot be detached, so wait.
            warn!(pid, tid, "thread did not stop within the timeout; waiting");
            match wait_stop(tid, None) {
                Ok(Some(s)) => s,
                _ => return Err(TrimError::Gone { pid }),
            }
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
    } else {
        let ctx = Stopped { pid, tid, libc };
        classify::classify(nr, arch::syscall_args(&regs), arch::ip(&regs), &ctx)
            .map_err(|r| format!("thread {tid}: {r}"))
    };
    let syscall = match verdict {
        Ok(name) => name,
        Err(reason) => {
            detach(tid, 0).map_err(|e| attached_err(pid, tid, "detach", e))?;
            return Ok(Attempt::NotParked(reason));
        }
    };
    let (ret, call) = call(pid, tid, &regs, libc.malloc_trim, timeout)?;
    Ok(Attempt::Done {
        ret,
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

/// Detach, handing back the signals that arrived during the call: the first one through
/// the detach itself (it replaces our SIGSEGV), the others re-sent to the thread.
fn release(pid: i32, tid: i32, pending: &[i32]) -> Result<(), TrimError> {
    let first = pending.first().copied().unwrap_or(0);
    detach(tid, first).map_err(|e| attached_err(pid, tid, "detach", e))?;
    for &sig in pending.iter().skip(1) {
        // SAFETY: tgkill has no memory preconditions.
        unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) };
    }
    Ok(())
}

/// Run `func(0)` on the stopped thread whose registers are `regs`; returns its `int` and
/// how long it ran (as seen from here).
fn call(
    pid: i32,
    tid: i32,
    regs: &Regs,
    func: u64,
    timeout: Duration,
) -> Result<(i32, Duration), TrimError> {
    let err = |op: &str, e: io::Error| attached_err(pid, tid, op, e);
    let (call_regs, slot) = arch::call_frame(regs, func, 0);
    let xstate = get_xstate(tid).map_err(|e| err("read extended registers", e))?;
    let mask = get_sigmask(tid).map_err(|e| err("read signal mask", e))?;
    let saved = Saved {
        regs: *regs,
        xstate,
        mask,
    };
    // The return address goes below the red zone, memory the ABI leaves to whoever runs
    // next (a signal handler would overwrite it too), so its old word is not kept.
    match poke(tid, slot, arch::RETURN_ADDR) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Err(lost(pid, tid)),
        Err(e) => {
            detach(tid, 0).map_err(|e| err("detach", e))?;
            return Err(TrimError::Deferred {
                pid,
                reason: format!("stack of thread {tid} below its red zone is not writable: {e}"),
            });
        }
    }
    let only_segv = !(1u64 << (libc::SIGSEGV - 1));
    let setup = set_sigmask(tid, only_segv).and_then(|_| set_regs(tid, &call_regs));
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

    let mut pending: Vec<i32> = Vec::new();
    let mut deadline = started + timeout;
    let mut interrupting = false;
    let mut warned = false;
    loop {
        let stop = match wait_stop(tid, Some(deadline)) {
            Ok(Some(s)) => s,
            Ok(None) => {
                if !interrupting {
                    pt(libc::PTRACE_INTERRUPT, tid, 0, 0).map_err(|e| err("interrupt", e))?;
                    interrupting = true;
                }
                deadline = Instant::now() + timeout;
                continue;
            }
            Err(_) => return Err(TrimError::Gone { pid }),
        };
        match stop {
            Stop::Exit(status) => return Err(exited(pid, tid, status)),
            Stop::Signal(sig) => {
                let si = get_siginfo(tid).map_err(|e| err("read signal info", e))?;
                let now = get_regs(tid).map_err(|e| err("read registers", e))?;
                let from_kernel = si.si_code > 0;
                let fault = matches!(
                    sig,
                    libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP
                );
                // SAFETY: si_addr is valid to read for the fault signals checked above.
                let addr = unsafe { si.si_addr() } as u64;
                if sig == libc::SIGSEGV
                    && from_kernel
                    && arch::ip(&now) == arch::RETURN_ADDR
                    && addr == arch::RETURN_ADDR
                {
                    let ret = arch::call_result(&now) as i32;
                    let ran = started.elapsed();
                    restore(tid, &saved).map_err(|e| err("restore thread state", e))?;
                    release(pid, tid, &pending)?;
                    return Ok((ret, ran));
                }
                if fault && from_kernel {
                    // A real fault inside the call. Restore nothing: let it die as it
                    // would have, with the signal, and say so.
                    let detail = format!(
                        "signal {sig} (code {}) at ip {:#x}, address {addr:#x}, in thread {tid}",
                        si.si_code,
                        arch::ip(&now)
                    );
                    let _ = detach(tid, sig);
                    return Err(TrimError::Crashed { pid, detail });
                }
                // A signal sent by someone during the call: keep it for later.
                pending.push(sig);
                cont(tid, 0).map_err(|e| err("resume", e))?;
            }
            Stop::Event(libc::SIGTRAP) if interrupting => {
                interrupting = false;
                let now = get_regs(tid).map_err(|e| err("read registers", e))?;
                if arch::syscall_nr(&now) == arch::nr::FUTEX
                    && classify::is_interrupted(arch::syscall_ret(&now))
                {
                    // Waiting for an arena lock: malloc_trim holds no lock between arenas,
                    // so abandoning the call here leaves the heap consistent.
                    restore(tid, &saved).map_err(|e| err("restore thread state", e))?;
                    release(pid, tid, &pending)?;
                    return Err(TrimError::TimedOut { pid });
                }
                // Anywhere else it may hold an arena lock; abandoning would deadlock the
                // process. Let it finish.
                if !warned {
                    warned = true;
                    warn!(
                        pid,
                        tid,
                        ip = arch::ip(&now),
                        "malloc_trim still running after the timeout, not in a lock wait; letting it finish"
                    );
                }
                cont(tid, 0).map_err(|e| err("resume", e))?;
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
}
