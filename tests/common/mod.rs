//! Shared helpers for the integration tests: conditions that skip locally but fail under
//! CI, and one timeout helper for waiting on conditions (never bare sleeps).
#![allow(dead_code)]

pub mod load;
pub mod pool;
pub mod vm;

use std::time::{Duration, Instant};

/// True when the suite runs under CI (`CI=true`): missing capabilities are failures there.
pub fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Call when a test cannot run here (no root, no cgroup, no ptrace, no VM). Returns true
/// when the caller should return early (a skip, said on stderr); panics under CI, so a
/// broken environment is never green.
pub fn cannot_run(reason: &str) -> bool {
    if under_ci() {
        panic!("test needs {reason}, and CI=true makes that a failure, not a skip");
    }
    eprintln!("SKIPPED: needs {reason}");
    true
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Poll `cond` every 20 ms until it returns Some or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Path of the example apps.
pub fn example(name: &str) -> String {
    format!("{}/examples/{name}", env!("CARGO_MANIFEST_DIR"))
}
