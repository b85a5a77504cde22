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
                        "{pid}: released {} (rss {} -> {}, anon {} -> {}), paused {} us in {} (thread {}), malloc_trim returned {}",
                        human_bytes_signed(r.released()),
                        human_bytes_signed(r.rss_before as i64),
                        human_bytes_signed(r.rss_after as i64),
                        human_bytes_signed(r.anon_before as i64),
                        human_bytes_signed(r.anon_after as i64),
                        r.pause_us,
                        r.syscall,
                        r.tid,
                        r.ret
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

/// Signals whose default action would end `trimrun trim`, held back (blocked) while one
/// pid is trimmed and its result printed. Were trimrun to die while a thread runs the
/// injected call, the kernel would release that thread with our frame on its stack and it
/// would crash when `malloc_trim` returns: Ctrl-C, `timeout(1)` or a TERM would kill the
/// process being trimmed. Held, they take effect the moment the guard drops, after the
/// thread has been restored. (SIGKILL cannot be held: see the module caveat.)
struct HeldSignals(Option<nix::sys::signal::SigSet>);

impl HeldSignals {
    fn hold() -> HeldSignals {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal, pthread_sigmask};
        let mut set = SigSet::empty();
        for sig in [
            Signal::SIGINT,
            Signal::SIGTERM,
            Signal::SIGHUP,
            Signal::SIGQUIT,
            Signal::SIGTSTP,
            Signal::SIGTTIN,
            Signal::SIGTTOU,
            Signal::SIGALRM,
            Signal::SIGUSR1,
            Signal::SIGUSR2,
        ] {
            set.add(sig);
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
