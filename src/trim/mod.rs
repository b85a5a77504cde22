//! TEMPORARY STUB (replaced by the wt-trim merge).
#![allow(dead_code, unused_variables)]
use std::time::Duration;
#[derive(Default)]
pub struct TrimOptions {
    pub timeout: Duration,
}
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrimReport {
    pub pid: i32,
    pub tid: i32,
    pub syscall: String,
    pub ret: i32,
    pub pause_us: u64,
    pub rss_before: u64,
    pub rss_after: u64,
    pub anon_before: u64,
    pub anon_after: u64,
}
impl TrimReport {
    pub fn released(&self) -> i64 {
        self.rss_before as i64 - self.rss_after as i64
    }
}
#[derive(Debug, thiserror::Error)]
pub enum TrimError {
    #[error("deferred")]
    Deferred { pid: i32, reason: String },
    #[error("unavailable")]
    Unavailable { pid: i32, reason: String },
    #[error("gone")]
    Gone { pid: i32 },
    #[error("exited")]
    Exited { pid: i32, status: i32 },
}
pub fn trim_pid(pid: i32, opts: &TrimOptions) -> Result<TrimReport, TrimError> {
    Err(TrimError::Unavailable {
        pid,
        reason: "stub".into(),
    })
}
pub fn ptrace_lock() -> &'static std::sync::Mutex<()> {
    static L: std::sync::Mutex<()> = std::sync::Mutex::new(());
    &L
}
pub fn run_cli(pids: &[i32], json: bool, timeout: Duration) -> i32 {
    1
}
