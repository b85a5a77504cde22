//! x86_64 specifics of the injected call: register layout, syscall numbers, the call frame
//! and the size of the extended (XSAVE) register state. Everything that depends on the
//! instruction set lives here, so an aarch64 port is one more file like this one.

/// General registers as `PTRACE_GETREGS` returns them.
pub type Regs = libc::user_regs_struct;

/// `NT_X86_XSTATE`: the XSAVE area (x87, SSE, AVX, AVX-512, AMX...) for
/// `PTRACE_GETREGSET`/`PTRACE_SETREGSET`.
pub const NT_XSTATE: libc::c_int = 0x202;

/// The System V ABI red zone below `rsp` that leaf functions may use without moving `rsp`.
const RED_ZONE: u64 = 128;

/// Syscall numbers the thread picker needs to know about.
pub mod nr {
    pub const READ: i64 = 0;
    pub const POLL: i64 = 7;
    pub const MMAP: i64 = 9;
    pub const MPROTECT: i64 = 10;
    pub const MUNMAP: i64 = 11;
    pub const BRK: i64 = 12;
    pub const SELECT: i64 = 23;
    pub const MREMAP: i64 = 25;
    pub const MADVISE: i64 = 28;
    pub const NANOSLEEP: i64 = 35;
    pub const ACCEPT: i64 = 43;
    pub const RECVFROM: i64 = 45;
    pub const RECVMSG: i64 = 47;
    pub const FUTEX: i64 = 202;
    pub const RESTART_SYSCALL: i64 = 219;
    pub const CLOCK_NANOSLEEP: i64 = 230;
    pub const EPOLL_WAIT: i64 = 232;
    pub const PSELECT6: i64 = 270;
    pub const PPOLL: i64 = 271;
    pub const EPOLL_PWAIT: i64 = 281;
    pub const ACCEPT4: i64 = 288;
    pub const EPOLL_PWAIT2: i64 = 441;
}

/// The syscall the thread entered (`orig_rax`), or -1 when the stop is not in a syscall.
pub fn syscall_nr(r: &Regs) -> i64 {
    r.orig_rax as i64
}

/// The syscall's return value as the thread will see it (`rax`), e.g. `-ERESTARTSYS`.
pub fn syscall_ret(r: &Regs) -> i64 {
    r.rax as i64
}

/// The six syscall arguments (rdi, rsi, rdx, r10, r8, r9).
pub fn syscall_args(r: &Regs) -> [u64; 6] {
    [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9]
}

/// The user instruction pointer (for a stop in a syscall: just after the `syscall`).
pub fn ip(r: &Regs) -> u64 {
    r.rip
}

/// The body of glibc's `__restore_rt` (`mov $15,%rax; syscall`: `rt_sigreturn`), the
/// code every signal handler returns into. It is not in libc's dynamic symbol table; it
/// occurs exactly once in glibc 2.36's `libc.so.6`, and is found by scanning for it.
pub const RESTORE_RT_BODY: [u8; 9] = [0x48, 0xc7, 0xc0, 0x0f, 0x00, 0x00, 0x00, 0x0f, 0x05];

/// How glibc enters a syscall: `mov $NR,%eax; syscall` (`b8 NR32 0f 05`), the 7 bytes
/// before the user ip of a thread stopped in one.
pub fn syscall_site_nr(code: &[u8; 7]) -> Option<i64> {
    (code[0] == 0xb8 && code[5] == 0x0f && code[6] == 0x05)
        .then(|| i64::from(u32::from_le_bytes([code[1], code[2], code[3], code[4]])))
}

/// Kernel return values of a syscall interrupted by a signal or ptrace stop.
const ERESTARTSYS: i64 = -512;
const ERESTARTNOINTR: i64 = -513;
const ERESTARTNOHAND: i64 = -514;
const ERESTART_RESTARTBLOCK: i64 = -516;

/// The registers a thread stopped in syscall `nr` (`rax` = its -ERESTART*/-EINTR) must
/// be given back so that the kernel, when we detach without a signal, re-executes the
/// syscall exactly as it would have, or returns `EINTR` if a handler runs, as before.
///
/// One change: `-ERESTART_RESTARTBLOCK` (a relative sleep or a poll timeout, normally
/// resumed by `restart_syscall` with the time left) becomes `-ERESTARTNOHAND`, which
/// re-executes the syscall with its original arguments. The `rt_sigreturn` that ends our
/// call resets the thread's restart block ("a pending restart returns EINTR"), so the
/// remaining-time restart is gone; starting the sleep over never shortens it. A thread
/// already in `restart_syscall` has `nr` = the syscall found at its call site.
pub fn resume_regs(saved: &Regs, nr: i64) -> Regs {
    let mut r = *saved;
    r.orig_rax = nr as u64;
    if r.rax as i64 == ERESTART_RESTARTBLOCK {
        r.rax = ERESTARTNOHAND as u64;
    }
    r
}

/// The registers the signal frame puts back when nobody is there to restore the thread:
/// `rt_sigreturn` sets `orig_rax = -1` (no restart), so the restart the kernel would have
/// made is made here: back over the 2-byte `syscall` instruction with `rax` = the syscall
/// number, so it runs again once the frame is popped. `-EINTR` (epoll_wait) stays.
pub fn frame_regs(saved: &Regs, nr: i64) -> Regs {
    let mut r = *saved;
    if matches!(
        r.rax as i64,
        ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
    ) {
        r.rip -= 2;
        r.rax = nr as u64;
    }
    r.orig_rax = u64::MAX;
    r
}

/// `uc_flags`: the frame holds extended state; restore `ss` strictly as saved.
const UC_FP_XSTATE: u64 = 0x1;
const UC_SIGCONTEXT_SS: u64 = 0x2;
const UC_STRICT_RESTORE_SS: u64 = 0x4;
/// `struct _fpx_sw_bytes` magics: in the XSAVE area's software-reserved bytes (offset
/// 464), and right after the area.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// `sizeof(struct rt_sigframe)` on x86_64: pretcode 8 + ucontext 304 + siginfo 128.
const RT_SIGFRAME_SIZE: u64 = 440;
/// Offsets in `struct rt_sigframe`.
const UC: usize = 8;
const UC_STACK: usize = UC + 16;
const MCONTEXT: usize = UC + 40;
const UC_SIGMASK: usize = MCONTEXT + 256;

/// A call of `func(arg0)` on a stopped thread that, however it ends, comes back to
/// exactly where the thread was: the thread's saved state is a signal frame on its own
/// stack and the call returns into `__restore_rt`, so `rt_sigreturn` puts the registers,
/// the signal mask and the XSAVE state back, with or without a tracer still attached.
pub struct CallFrame {
    /// Registers to start the call with.
    pub regs: Regs,
    /// Where [`CallFrame::bytes`] go in the thread's memory (below its red zone).
    pub addr: u64,
    pub bytes: Vec<u8>,
}

/// Build the frame for `func(arg0)` on a thread stopped with registers `saved` in syscall
/// `nr`, signal mask `mask` and XSAVE area `xstate` (as `PTRACE_GETREGSET` returned it),
/// returning through `restore_rt`.
///
/// Layout from `saved.rsp` down, as the kernel lays out a signal frame: the 128-byte red
/// zone left alone; the XSAVE area, 64-byte aligned, with the software bytes that tell
/// `rt_sigreturn` its size and features and `FP_XSTATE_MAGIC2` after it; the
/// `rt_sigframe` whose first word (`pretcode`) is the call's return address, placed so
/// that at `func`'s first instruction `(rsp + 8) % 16 == 0` as the ABI requires. When
/// `func` returns, `rsp` = frame + 8 and `__restore_rt` issues `rt_sigreturn`, which reads
/// the frame at `rsp - 8`.
///
/// `uc_stack` carries an invalid `ss_flags` so that `rt_sigreturn` leaves the thread's
/// alternate signal stack as it is (we cannot read it; the kernel ignores the error).
pub fn call_frame(
    saved: &Regs,
    nr: i64,
    mask: u64,
    xstate: &[u8],
    restore_rt: u64,
    func: u64,
    arg0: u64,
) -> CallFrame {
    let xlen = xstate.len();
    let fp_total = xlen as u64 + 4;
    let fp_addr = (saved.rsp - RED_ZONE - fp_total) & !63;
    let frame = ((fp_addr - RT_SIGFRAME_SIZE) & !15) - 8;
    let mut b = vec![0u8; (saved.rsp - RED_ZONE - frame) as usize];
    let put = |b: &mut [u8], off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put(&mut b, 0, restore_rt);
    put(
        &mut b,
        UC,
        UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS,
    );
    // uc_link 0; uc_stack { ss_sp 0, ss_flags 3 (invalid), ss_size 0 }.
    put(&mut b, UC_STACK + 8, 3);
    let r = frame_regs(saved, nr);
    let sc = [
        r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15, r.rdi, r.rsi, r.rbp, r.rbx, r.rdx,
        r.rax, r.rcx, r.rsp, r.rip, r.eflags,
    ];
    for (i, v) in sc.iter().enumerate() {
        put(&mut b, MCONTEXT + 8 * i, *v);
    }
    // cs, gs, fs, ss (u16 each); err, trapno, oldmask, cr2 stay 0.
    let segs = (r.cs & 0xffff) | ((r.ss & 0xffff) << 48);
    put(&mut b, MCONTEXT + 144, segs);
    put(&mut b, MCONTEXT + 184, fp_addr);
    put(&mut b, UC_SIGMASK, mask);
    let fp = (fp_addr - frame) as usize;
    b[fp..fp + xlen].copy_from_slice(xstate);
    let sw = fp + 464;
    let xfeatures = if xlen >= 520 {
        u64::from_le_bytes(xstate[512..520].try_into().unwrap()) | xcr0()
    } else {
        3
    };
    b[sw..sw + 4].copy_from_slice(&FP_XSTATE_MAGIC1.to_le_bytes());
    b[sw + 4..sw + 8].copy_from_slice(&(fp_total as u32).to_le_bytes());
    b[sw + 8..sw + 16].copy_from_slice(&xfeatures.to_le_bytes());
    b[sw + 16..sw + 20].copy_from_slice(&(xlen as u32).to_le_bytes());
    b[fp + xlen..fp + xlen + 4].copy_from_slice(&FP_XSTATE_MAGIC2.to_le_bytes());

    let mut regs = *saved;
    regs.rsp = frame;
    regs.rip = func;
    regs.rdi = arg0;
    regs.rax = 0;
    // Not in a syscall: the pending restart is not applied to the call.
    regs.orig_rax = u64::MAX;
    CallFrame {
        regs,
        addr: frame,
        bytes: b,
    }
}

/// The features enabled in XCR0: every component the frame's XSAVE area may describe.
fn xcr0() -> u64 {
    // SAFETY: xgetbv(0) is valid whenever the OS enabled XSAVE (OSXSAVE), which it has
    // when it exports an XSAVE regset; callers only reach here with such an area.
    #[allow(unused_unsafe)]
    unsafe {
        core::arch::x86_64::_xgetbv(0)
    }
}

/// Whether `r` (a thread stopped during or after our call) is back in its own frames:
/// its stack pointer is above the call frame at `frame_addr`, so the call has returned
/// and `rt_sigreturn` has run. While `func` runs, `rsp` is at or below `frame_addr`.
pub fn returned(r: &Regs, frame_addr: u64) -> bool {
    r.rsp > frame_addr
}

/// Size of the XSAVE area for every feature this CPU supports (CPUID leaf 0xD, ECX),
/// at least the legacy 512-byte area plus the 64-byte header.
pub fn xstate_size() -> usize {
    // SAFETY: cpuid is available on every x86_64 CPU; leaf 0xD exists whenever XSAVE does,
    // and on CPUs without it the answer is 0 and the minimum below applies.
    #[allow(unused_unsafe)]
    let leaf = unsafe { core::arch::x86_64::__cpuid_count(0xd, 0) };
    (leaf.ecx as usize).clamp(576, 64 * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regs(rsp: u64, nr: i64, rax: i64) -> Regs {
        // SAFETY: user_regs_struct is plain old data; all-zero is valid.
        let mut r: Regs = unsafe { std::mem::zeroed() };
        r.rsp = rsp;
        r.rip = 0x7f00_0000_2002;
        r.orig_rax = nr as u64;
        r.rax = rax as u64;
        r.cs = 0x33;
        r.ss = 0x2b;
        r.rbx = 0x1111;
        r
    }

    fn word(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn call_frame_is_abi_aligned_below_the_red_zone_and_returns_into_restore_rt() {
        let xstate = vec![0xabu8; 2696];
        for rsp in [0x7ffd_1000u64, 0x7ffd_1008, 0x7ffd_100c, 0x7ffd_1001] {
            let saved = regs(rsp, 232, -4);
            let f = call_frame(&saved, 232, 0x5, &xstate, 0x7f00_0003_c050, 0x7f00_1234, 0);
            assert_eq!(f.regs.rsp, f.addr);
            assert_eq!((f.regs.rsp + 8) % 16, 0, "rsp {rsp:#x}");
            assert_eq!(f.addr + f.bytes.len() as u64, rsp - RED_ZONE, "red zone");
            assert_eq!(f.regs.rip, 0x7f00_1234);
            assert_eq!(f.regs.rdi, 0);
            assert_eq!(syscall_nr(&f.regs), -1);
            assert_eq!(word(&f.bytes, 0), 0x7f00_0003_c050, "return address");
            assert_eq!(word(&f.bytes, UC_SIGMASK), 0x5);
            let fp = word(&f.bytes, MCONTEXT + 184);
            assert_eq!(fp % 64, 0);
            let fp_off = (fp - f.addr) as usize;
            assert_eq!(f.bytes[fp_off], 0xab);
            assert_eq!(
                &f.bytes[fp_off + 464..fp_off + 468],
                &0x4650_5853u32.to_le_bytes()
            );
            assert_eq!(
                &f.bytes[fp_off + 2696..fp_off + 2700],
                &0x4650_5845u32.to_le_bytes()
            );
            assert!(
                fp_off >= RT_SIGFRAME_SIZE as usize,
                "xstate overlaps the frame"
            );
            assert_eq!(word(&f.bytes, MCONTEXT + 88), 0x1111, "rbx");
            assert_eq!(word(&f.bytes, MCONTEXT + 120), rsp, "rsp");
        }
    }

    #[test]
    fn frame_restarts_the_syscall_the_kernel_would_have_restarted() {
        for rax in [-512, -513, -514, -516] {
            let r = frame_regs(&regs(0x7ffd_1000, 7, rax), 7);
            assert_eq!((r.rip, r.rax, r.orig_rax as i64), (0x7f00_0000_2000, 7, -1));
        }
        // epoll_wait's -EINTR goes back to the program.
        let r = frame_regs(&regs(0x7ffd_1000, 232, -4), 232);
        assert_eq!((r.rip, r.rax as i64), (0x7f00_0000_2002, -4));
        // restart_syscall re-runs the sleep found at the call site.
        let r = frame_regs(&regs(0x7ffd_1000, 219, -516), 230);
        assert_eq!((r.rip, r.rax), (0x7f00_0000_2000, 230));
    }

    #[test]
    fn resume_regs_keep_restart_semantics_without_the_restart_block() {
        let r = resume_regs(&regs(0, 230, -516), 230);
        assert_eq!((r.orig_rax, r.rax as i64), (230, -514));
        let r = resume_regs(&regs(0, 219, -516), 230);
        assert_eq!((r.orig_rax, r.rax as i64), (230, -514));
        let r = resume_regs(&regs(0, 0, -512), 0);
        assert_eq!((r.orig_rax, r.rax as i64), (0, -512));
    }

    #[test]
    fn decodes_glibc_syscall_sites() {
        assert_eq!(
            syscall_site_nr(&[0xb8, 0xe6, 0, 0, 0, 0x0f, 0x05]),
            Some(230)
        );
        assert_eq!(syscall_site_nr(&[0x90, 0xe6, 0, 0, 0, 0x0f, 0x05]), None);
    }
}
