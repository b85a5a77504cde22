//! Shared helpers for the integration tests: conditions that skip locally but fail under
//! CI, and one timeout helper for waiting on conditions (never bare sleeps).
#![allow(dead_code)]

pub mod load;
pub mod pool;
pub mod python;
pub mod vm;

use std::time::{Duration, Instant};

/// True when the suite runs under CI (`CI=true`): missing capabilities are failures there.
pub fn under_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Call when a test cannot run here (no root, no cgroup, no ptrace, no VM). Returns true
/// when the caller should return early; panics under CI, so a broken environment is never
/// green.
///
/// A skip must be seen: the harness captures `eprintln!`, so the line goes straight to the
/// process's stderr (`SKIPPED <test>: needs ...`, between the harness's own lines), and the
/// binary ends with a count of its skips.
pub fn cannot_run(reason: &str) -> bool {
    if under_ci() {
        panic!("test needs {reason}, and CI=true makes that a failure, not a skip");
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("a test")
        .to_string();
    say(&format!("SKIPPED {test}: needs {reason}"));
    let mut skips = SKIPS.lock().unwrap_or_else(|e| e.into_inner());
    if skips.is_empty() {
        // SAFETY: atexit with a function that takes no arguments and never unwinds (it
        // only writes to stderr); registered once per process.
        unsafe { libc::atexit(report_skips) };
    }
    skips.push(test);
    true
}

/// The tests of this binary that skipped, for the summary at exit.
static SKIPS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Write a line to the real stderr, past the test harness's capture.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

extern "C" fn report_skips() {
    let skips = SKIPS.lock().unwrap_or_else(|e| e.into_inner());
    if skips.is_empty() {
        return;
    }
    say(&format!(
        "\n{} test(s) of this binary SKIPPED (they passed without running; CI=true makes them fail): {}\n",
        skips.len(),
        skips.join(", ")
    ));
}

/// The guard of an inner test: a test that only means something when its outer test runs
/// it (in the v2 VM, or re-executed with `TRIMRUN_INNER` under unshare/setpriv/a cgroup).
/// Inner tests are `#[ignore]`d, so a plain run lists them as ignored; run by hand with
/// `--ignored` elsewhere, they say so visibly and return.
pub fn not_inside(here: bool, outer: &str) -> bool {
    if !here {
        let test = std::thread::current()
            .name()
            .unwrap_or("an inner test")
            .to_string();
        say(&format!(
            "NOT RUN {test}: only meaningful when {outer} runs it"
        ));
    }
    !here
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
