//! Is a thread parked where calling `malloc_trim` cannot deadlock or corrupt the heap?
//!
//! A thread blocked in one of a few syscalls that glibc's malloc never makes while it
//! holds an arena lock (waiting for input, a timer or a connection) is outside malloc, so
//! running `malloc_trim` on it is like the application calling it there. Everything else
//! is refused: user code (could be inside malloc), `futex` (a lock or condition wait — it
//! may be the arena lock itself, or a thread that holds one), `brk`/`mmap`/`madvise`
//! (malloc growing or shrinking its heap). `read`/`recv*` count only on a socket or a pipe
//! (named or not):
//! glibc reads a /proc file with an arena lock held when it shrinks a heap.
//!
//! One `futex` wait is allowed: CPython's threads waiting for the GIL sleep in `futex` on
//! the GIL's condition variable or mutex, which live in the interpreter's static
//! `_PyRuntime` (in the `python3.x` executable or `libpython3.x.so`). A thread waiting
//! for the GIL has released it from the interpreter's own code, outside any malloc call,
//! and holds no allocator lock. Any other futex (libc's, or on the heap) stays refused.
//!
//! Syscalls that swap in a temporary signal mask (`ppoll`, `pselect6`, `epoll_pwait*`
//! with a mask argument) are refused as well: `PTRACE_SETSIGMASK` clears the kernel's
//! "restore the saved mask" flag, so the thread would keep the temporary mask for good.

use super::arch::nr;

/// What the classifier may need to know about the target beyond the syscall registers.
pub trait Context {
    /// `/proc/PID/fd/N` link target, e.g. `socket:[123]`.
    fn fd_target(&self, fd: u64) -> Option<String>;
    /// One word of the target's memory.
    fn read_word(&self, addr: u64) -> Option<u64>;
    /// The libc function containing `ip`, if it is one that can be restarted through
    /// `restart_syscall` (nanosleep, clock_nanosleep, poll...).
    fn restartable_function_at(&self, ip: u64) -> Option<&'static str>;
    /// Whether `addr` is inside the interpreter's GIL state (`_PyRuntime`).
    fn is_gil(&self, addr: u64) -> bool;
}

/// `FUTEX_WAIT` and `FUTEX_WAIT_BITSET`, with or without `FUTEX_PRIVATE_FLAG` /
/// `FUTEX_CLOCK_REALTIME`: the waits glibc's condition variables and mutexes make.
fn is_futex_wait(op: u64) -> bool {
    matches!(op & 0x7f, 0 | 9)
}

/// Kernel return values of a syscall interrupted by a ptrace stop: -EINTR and the
/// -ERESTART* family (which the kernel turns into a restart on the way out).
pub const EINTR: i64 = -4;
pub const ERESTARTSYS: i64 = -512;
pub const ERESTARTNOINTR: i64 = -513;
pub const ERESTARTNOHAND: i64 = -514;
pub const ERESTART_RESTARTBLOCK: i64 = -516;

/// True when `ret` (rax at the stop) says the syscall was interrupted, not completed.
pub fn is_interrupted(ret: i64) -> bool {
    matches!(
        ret,
        EINTR | ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
    )
}

/// Classify syscall `nr` with `args` at user `ip`: `Ok(name)` when safe to inject into,
/// `Err(reason)` otherwise.
pub fn classify(
    nr: i64,
    args: [u64; 6],
    ip: u64,
    ctx: &dyn Context,
) -> Result<&'static str, String> {
    let no_mask = |name: &'static str, mask_ptr: u64| {
        if mask_ptr == 0 {
            Ok(name)
        } else {
            Err(format!("{name} with a temporary signal mask"))
        }
    };
    match nr {
        nr::SELECT => Ok("select"),
        nr::POLL => Ok("poll"),
        nr::EPOLL_WAIT => Ok("epoll_wait"),
        nr::NANOSLEEP => Ok("nanosleep"),
        nr::CLOCK_NANOSLEEP => Ok("clock_nanosleep"),
        nr::ACCEPT => Ok("accept"),
        nr::ACCEPT4 => Ok("accept4"),
        nr::PPOLL => no_mask("ppoll", args[3]),
        nr::EPOLL_PWAIT => no_mask("epoll_pwait", args[4]),
        nr::EPOLL_PWAIT2 => no_mask("epoll_pwait2", args[4]),
        nr::PSELECT6 => {
            // The 6th argument points to { const sigset_t *ss; size_t ss_len }.
            if args[5] == 0 {
                return Ok("pselect6");
            }
            match ctx.read_word(args[5]) {
                Some(ss) => no_mask("pselect6", ss),
                None => Err("pselect6 with an unreadable signal mask argument".into()),
            }
        }
        nr::READ | nr::RECVFROM | nr::RECVMSG => {
            let name = match nr {
                nr::READ => "read",
                nr::RECVFROM => "recvfrom",
                _ => "recvmsg",
            };
            match ctx.fd_target(args[0]) {
                Some(t)
                    if t.starts_with("socket:")
                        || t.starts_with("pipe:")
                        || t.starts_with("fifo:") =>
                {
                    Ok(name)
                }
                Some(t) => Err(format!(
                    "{name} on fd {} ({t}), not a socket or pipe",
                    args[0]
                )),
                None => Err(format!("{name} on fd {} that cannot be inspected", args[0])),
            }
        }
        nr::RESTART_SYSCALL => match ctx.restartable_function_at(ip) {
            Some(_) => Ok("restart_syscall"),
            None => Err("restart_syscall of an unknown call (may be a futex wait)".into()),
        },
        nr::FUTEX if is_futex_wait(args[1]) && ctx.is_gil(args[0]) => Ok("futex (GIL wait)"),
        nr::FUTEX => Err("futex (lock or condition wait, may be inside malloc)".into()),
        nr::BRK | nr::MMAP | nr::MUNMAP | nr::MREMAP | nr::MADVISE | nr::MPROTECT => {
            Err(format!("memory syscall {nr} (may be inside malloc)"))
        }
        n if n < 0 => Err("not in a syscall (user code, may be inside malloc)".into()),
        n => Err(format!("syscall {n} is not on the safe list")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;
    impl Context for Fake {
        fn fd_target(&self, fd: u64) -> Option<String> {
            match fd {
                3 => Some("socket:[991]".into()),
                4 => Some("pipe:[12]".into()),
                5 => Some("/proc/sys/vm/overcommit_memory".into()),
                6 => Some("fifo:/run/app/control".into()),
                _ => None,
            }
        }
        fn read_word(&self, addr: u64) -> Option<u64> {
            match addr {
                0x1000 => Some(0),
                0x2000 => Some(0x7fff_0000),
                _ => None,
            }
        }
        fn restartable_function_at(&self, ip: u64) -> Option<&'static str> {
            (ip == 0xaaaa).then_some("clock_nanosleep")
        }
        fn is_gil(&self, addr: u64) -> bool {
            (0x5000_0000..0x5002_8b20).contains(&addr)
        }
    }

    fn c(nr: i64, args: [u64; 6]) -> Result<&'static str, String> {
        classify(nr, args, 0, &Fake)
    }

    #[test]
    fn blocking_waits_are_safe() {
        for (n, name) in [
            (nr::SELECT, "select"),
            (nr::POLL, "poll"),
            (nr::EPOLL_WAIT, "epoll_wait"),
            (nr::NANOSLEEP, "nanosleep"),
            (nr::CLOCK_NANOSLEEP, "clock_nanosleep"),
            (nr::ACCEPT, "accept"),
            (nr::ACCEPT4, "accept4"),
        ] {
            assert_eq!(c(n, [0; 6]), Ok(name));
        }
    }

    #[test]
    fn reads_are_safe_only_on_sockets_and_pipes_named_or_not() {
        assert_eq!(c(nr::READ, [3, 0, 0, 0, 0, 0]), Ok("read"));
        assert_eq!(c(nr::RECVFROM, [3, 0, 0, 0, 0, 0]), Ok("recvfrom"));
        assert_eq!(c(nr::READ, [4, 0, 0, 0, 0, 0]), Ok("read"));
        assert_eq!(c(nr::READ, [6, 0, 0, 0, 0, 0]), Ok("read"), "a named pipe");
        assert!(
            c(nr::READ, [5, 0, 0, 0, 0, 0])
                .unwrap_err()
                .contains("not a socket")
        );
        assert!(c(nr::RECVMSG, [9, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn waits_with_a_temporary_signal_mask_are_refused() {
        assert_eq!(c(nr::PPOLL, [0; 6]), Ok("ppoll"));
        assert!(c(nr::PPOLL, [0, 0, 0, 0x5000, 0, 8]).is_err());
        assert_eq!(c(nr::EPOLL_PWAIT, [0; 6]), Ok("epoll_pwait"));
        assert!(c(nr::EPOLL_PWAIT2, [0, 0, 0, 0, 0x5000, 8]).is_err());
        assert_eq!(c(nr::PSELECT6, [0; 6]), Ok("pselect6"));
        assert_eq!(c(nr::PSELECT6, [0, 0, 0, 0, 0, 0x1000]), Ok("pselect6"));
        assert!(c(nr::PSELECT6, [0, 0, 0, 0, 0, 0x2000]).is_err());
        assert!(c(nr::PSELECT6, [0, 0, 0, 0, 0, 0x3000]).is_err());
    }

    #[test]
    fn locks_memory_syscalls_and_user_code_are_refused() {
        assert!(c(nr::FUTEX, [0; 6]).unwrap_err().contains("futex"));
        for n in [
            nr::BRK,
            nr::MMAP,
            nr::MUNMAP,
            nr::MADVISE,
            nr::MPROTECT,
            nr::MREMAP,
        ] {
            assert!(c(n, [0; 6]).unwrap_err().contains("malloc"), "{n}");
        }
        assert!(c(-1, [0; 6]).unwrap_err().contains("user code"));
        assert!(c(61, [0; 6]).unwrap_err().contains("not on the safe list"));
    }

    #[test]
    fn only_futex_waits_on_the_gil_are_safe() {
        // pthread_cond_timedwait: FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG.
        assert_eq!(
            c(nr::FUTEX, [0x5000_0040, 0x89, 0, 0, 0, 0]),
            Ok("futex (GIL wait)")
        );
        assert_eq!(
            c(nr::FUTEX, [0x5000_0080, 0x80, 2, 0, 0, 0]),
            Ok("futex (GIL wait)")
        );
        // Elsewhere (libc, heap), or not a wait (wake, requeue, PI lock): refused.
        assert!(c(nr::FUTEX, [0x7f00_0000_0040, 0x89, 0, 0, 0, 0]).is_err());
        assert!(c(nr::FUTEX, [0x5002_8b20, 0x80, 0, 0, 0, 0]).is_err());
        assert!(c(nr::FUTEX, [0x5000_0040, 0x81, 0, 0, 0, 0]).is_err());
        assert!(c(nr::FUTEX, [0x5000_0040, 0x86, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn restart_syscall_is_safe_only_for_known_sleeps() {
        assert_eq!(
            classify(nr::RESTART_SYSCALL, [0; 6], 0xaaaa, &Fake),
            Ok("restart_syscall")
        );
        assert!(classify(nr::RESTART_SYSCALL, [0; 6], 0xbbbb, &Fake).is_err());
    }

    #[test]
    fn interrupted_return_values() {
        for r in [-4, -512, -513, -514, -516] {
            assert!(is_interrupted(r));
        }
        for r in [0, 5, -11, -515] {
            assert!(!is_interrupted(r));
        }
    }
}

/// UC flags the kernel writes in every x86_64 signal frame (`UC_SIGCONTEXT_SS |
/// UC_STRICT_RESTORE_SS`, with `UC_FP_XSTATE` when it saved XSAVE state).
const KERNEL_UC_FLAGS: [u64; 2] = [0x6, 0x7];

/// Look for a signal frame in `stack` (the thread's stack from its `rsp` upward, `base`
/// being the address of `stack[0]`): a word equal to `restore_rt` (glibc's handler
/// return address, the frame's `pretcode`) followed by a ucontext whose flags are the
/// kernel's and whose saved `rsp` lies above the frame. A thread with such a frame above
/// it is running a signal handler: it may have interrupted malloc with an arena lock held.
/// Returns the frame's address. (A stale word that merely looks like a frame makes us
/// pass over a thread: the safe direction.)
pub fn find_signal_frame(stack: &[u8], base: u64, restore_rt: u64) -> Option<u64> {
    let word = |off: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            stack.get(off..off + 8)?.try_into().ok()?,
        ))
    };
    (0..stack.len().saturating_sub(8))
        .step_by(8)
        .find(|&off| {
            word(off) == Some(restore_rt)
                && word(off + 8).is_some_and(|f| KERNEL_UC_FLAGS.contains(&f))
                && word(off + 8 + 40 + 120).is_some_and(|sp| sp > base + off as u64)
        })
        .map(|off| base + off as u64)
}

#[cfg(test)]
mod frame_tests {
    use super::*;

    #[test]
    fn finds_a_kernel_signal_frame_above_the_stack_pointer() {
        let base = 0x7ffd_0000u64;
        let mut st = vec![0u8; 4096];
        let put = |st: &mut Vec<u8>, off: usize, v: u64| {
            st[off..off + 8].copy_from_slice(&v.to_le_bytes())
        };
        assert_eq!(find_signal_frame(&st, base, 0x7f00_3c050), None);
        // A lone return address (e.g. a stale local) is not a frame.
        put(&mut st, 64, 0x7f00_3c050);
        assert_eq!(find_signal_frame(&st, base, 0x7f00_3c050), None);
        put(&mut st, 1024, 0x7f00_3c050);
        put(&mut st, 1032, 7);
        put(&mut st, 1024 + 8 + 40 + 120, base + 3000);
        assert_eq!(
            find_signal_frame(&st, base, 0x7f00_3c050),
            Some(base + 1024)
        );
    }
}
