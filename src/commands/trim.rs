//! `trimrun trim [--json] [--timeout DUR] PID...`: trim running processes now, from the
//! command line. The injection itself is [`crate::trim`]'s.

use std::time::Duration;

use crate::size::human_bytes_signed;
use crate::trim::{self, TrimOptions};

/// `trimrun trim [--json] [--timeout DUR] PID...`: trim each pid, print one line per pid
/// (or one JSON object per line), return the exit code: 0 all trimmed, 1 any failed,
/// 2 bad input.
pub fn run(pids: &[i32], json: bool, timeout: Duration) -> i32 {
    if pids.is_empty() || pids.iter().any(|&p| p <= 0) {
        eprintln!("trimrun trim: expected one or more positive pids, e.g. `trimrun trim 1234`");
        return 2;
    }
    let opts = TrimOptions { timeout };
    let mut code = 0;
    for &pid in pids {
        let _held = HeldSignals::hold();
        match trim::trim_pid(pid, &opts) {
            Ok(r) => {
                if json {
                    let mut v = serde_json::to_value(&r).expect("report serializes");
                    v["ok"] = true.into();
                    v["released"] = r.released().into();
                    println!("{v}");
                } else {
                    println!(
                        "{pid}: released {} (rss {} -> {}, anon {} -> {}), paused {} us in {} (thread {})",
                        human_bytes_signed(r.released()),
                        human_bytes_signed(r.rss_before as i64),
                        human_bytes_signed(r.rss_after as i64),
                        human_bytes_signed(r.anon_before as i64),
                        human_bytes_signed(r.anon_after as i64),
                        r.pause_us,
                        r.syscall,
                        r.tid
                    );
                }
            }
            Err(e) => {
                code = 1;
                if json {
                    let v = serde_json::json!({
                        "pid": pid, "ok": false, "error": e.kind(),
                        "retryable": e.is_retryable(), "message": e.to_string(),
                    });
                    println!("{v}");
                } else {
                    eprintln!("trimrun trim: {e}");
                }
            }
        }
    }
    code
}

/// Every signal that would end or stop `trimrun trim`, held back while one pid is trimmed
/// and its result printed: a Ctrl-C, `timeout(1)`, TERM, SIGPWR or real-time signal takes
/// effect the moment the guard drops, once the thread is released and the result printed.
/// (Dying mid-call would not harm the target: the call returns through a signal frame
/// that restores the thread, see `trim::inject`; but the trim would go unreported.) Every
/// wait of a trim is bounded by `--timeout`, so a signal is never held for long, even
/// against a frozen target.
///
/// Held with a handler that only records the signal, not with the signal mask: the mask
/// is per thread, and a process-directed signal goes to any thread that does not block
/// it (the logging thread, started before this guard). On drop the old dispositions come
/// back and the first recorded signal is raised again.
struct HeldSignals(Vec<(libc::c_int, libc::sigaction)>);

static HELD: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

extern "C" fn record(sig: libc::c_int) {
    // Async-signal-safe: one atomic store.
    let _ = HELD.compare_exchange(
        0,
        sig,
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
}

impl HeldSignals {
    fn hold() -> HeldSignals {
        let mut old = Vec::new();
        for sig in 1..=libc::SIGRTMAX() {
            let default_ends_us = !matches!(
                sig,
                libc::SIGKILL
                    | libc::SIGSTOP
                    | libc::SIGCHLD
                    | libc::SIGCONT
                    | libc::SIGURG
                    | libc::SIGWINCH
                    | libc::SIGSEGV
                    | libc::SIGBUS
                    | libc::SIGILL
                    | libc::SIGFPE
                    | libc::SIGTRAP
                    | libc::SIGABRT
                    | libc::SIGSYS
            );
            if !default_ends_us {
                continue;
            }
            // SAFETY: sigaction with zeroed (valid) structs; `record` only stores to an
            // atomic, which is async-signal-safe. glibc refuses its two internal signals
            // (32, 33) with EINVAL, which is fine.
            unsafe {
                let mut prev: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut prev) != 0
                    || prev.sa_sigaction == libc::SIG_IGN
                {
                    continue;
                }
                let mut act: libc::sigaction = std::mem::zeroed();
                act.sa_sigaction = record as extern "C" fn(libc::c_int) as usize;
                act.sa_flags = libc::SA_RESTART;
                libc::sigfillset(&mut act.sa_mask);
                if libc::sigaction(sig, &act, std::ptr::null_mut()) == 0 {
                    old.push((sig, prev));
                }
            }
        }
        HeldSignals(old)
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        for (sig, prev) in self.0.drain(..) {
            // SAFETY: puts back the action read in `hold`.
            unsafe { libc::sigaction(sig, &prev, std::ptr::null_mut()) };
        }
        let sig = HELD.swap(0, std::sync::atomic::Ordering::SeqCst);
        if sig != 0 {
            // SAFETY: raise has no memory preconditions; the old action applies now.
            unsafe { libc::raise(sig) };
        }
    }
}
