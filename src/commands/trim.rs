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

/// Every blockable signal but the synchronous faults, held back (blocked) while one pid
/// is trimmed and its result printed: a Ctrl-C, `timeout(1)` or a TERM takes effect the
/// moment the guard drops, once the thread is released and the result printed. Dying
/// mid-call would not harm the target (the call returns through a signal frame that
/// restores the thread, see `trim::inject`), but the trim would go unreported. Every wait
/// of a trim is bounded by `--timeout`, so a held signal is never held for long, even
/// against a frozen target. The attempt thread inherits this mask.
struct HeldSignals(Option<nix::sys::signal::SigSet>);

impl HeldSignals {
    fn hold() -> HeldSignals {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
        let mut set = SigSet::all();
        for sig in [
            Signal::SIGSEGV,
            Signal::SIGBUS,
            Signal::SIGILL,
            Signal::SIGFPE,
            Signal::SIGTRAP,
        ] {
            set.remove(sig);
        }
        let mut old = SigSet::empty();
        match pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old)) {
            Ok(()) => HeldSignals(Some(old)),
            Err(_) => HeldSignals(None),
        }
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        use nix::sys::signal::{SigmaskHow, pthread_sigmask};
        if let Some(old) = self.0.take() {
            let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
        }
    }
}
