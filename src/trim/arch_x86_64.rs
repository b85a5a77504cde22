//! x86_64 specifics of the injected call: register layout, syscall numbers, the call frame
//! and the size of the extended (XSAVE) register state. Everything that depends on the
//! instruction set lives here, so an aarch64 port is one more file like this one.

/// General registers as `PTRACE_GETREGS` returns them.
pub type Regs = libc::user_regs_struct;

/// `NT_X86_XSTATE`: the XSAVE area (x87, SSE, AVX, AVX-512, AMX...) for
/// `PTRACE_GETREGSET`/`PTRACE_SETREGSET`.
pub const NT_XSTATE: libc::c_int = 0x202;

/// Where the injected call "returns" to. The address is below `vm.mmap_min_addr` (4096 on
/// every distribution, 65536 on most), so nothing can be mapped there without
/// `CAP_SYS_RAWIO`, and the `ret` at the end of `malloc_trim` faults on the instruction
/// fetch with `rip == si_addr == RETURN_ADDR`. It is not 0 so that a genuine null function
/// pointer call inside the callee (rip == 0) cannot be mistaken for our return, and it is
/// canonical because a `ret` to a non-canonical address raises #GP *on the `ret`* (rip
/// still inside the callee, si_addr 0), which could not be told apart from a real crash.
pub const RETURN_ADDR: u64 = 0x7f;

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

/// Registers for calling `func(arg0)` from the thread's current state, and the stack slot
/// that must hold the return address ([`RETURN_ADDR`]).
///
/// The new frame starts below the red zone, 16-byte aligned, then the fake return address
/// is "pushed", so at the callee's first instruction `(rsp + 8) % 16 == 0` as the ABI
/// requires. `orig_rax = -1` tells the kernel the thread is not in a syscall, so the
/// pending syscall restart is not applied to our call (it is applied after the saved
/// registers are put back). `rax = 0`: no vector registers used for arguments.
pub fn call_frame(saved: &Regs, func: u64, arg0: u64) -> (Regs, u64) {
    let mut r = *saved;
    let aligned = (saved.rsp - RED_ZONE) & !0xf;
    let slot = aligned - 8;
    r.rsp = slot;
    r.rip = func;
    r.rdi = arg0;
    r.rax = 0;
    r.orig_rax = u64::MAX;
    (r, slot)
}

/// The callee's integer return value.
pub fn call_result(r: &Regs) -> u64 {
    r.rax
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

    #[test]
    fn call_frame_is_abi_aligned_below_the_red_zone_and_not_restarted() {
        for rsp in [0x7ffd_1000u64, 0x7ffd_1008, 0x7ffd_100c, 0x7ffd_1001] {
            // SAFETY: user_regs_struct is plain old data; all-zero is valid.
            let mut saved: Regs = unsafe { std::mem::zeroed() };
            saved.rsp = rsp;
            saved.orig_rax = 232;
            saved.rax = (-4i64) as u64;
            let (r, slot) = call_frame(&saved, 0x7f00_0000_1234, 0);
            assert_eq!(r.rsp, slot);
            assert_eq!((r.rsp + 8) % 16, 0, "rsp {rsp:#x}");
            assert!(slot + 8 <= rsp - RED_ZONE, "return slot in the red zone");
            assert_eq!(r.rip, 0x7f00_0000_1234);
            assert_eq!(r.rdi, 0);
            assert_eq!(syscall_nr(&r), -1);
        }
    }
}
