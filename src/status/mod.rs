//! TEMPORARY STUB (replaced by the wt-status merge).
#![allow(dead_code, unused_variables)]
use serde::{Deserialize, Serialize};
pub const PROTOCOL_VERSION: u32 = 1;
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct Snapshot {
    pub version: u32,
    pub pid: i32,
    pub uptime_secs: f64,
    pub backend: String,
    pub target_workers: usize,
    pub workers: Vec<WorkerSnapshot>,
    pub oom_kills: u64,
    pub restarts: u64,
    pub recycles: u64,
    pub recycles_in_progress: usize,
    pub trims: u64,
    pub released_bytes: u64,
    pub state: String,
}
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct WorkerSnapshot {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
    pub state: String,
    pub age_secs: f64,
    pub working_set: u64,
    pub limit: Option<u64>,
    pub peak: Option<u64>,
    pub rss: Option<u64>,
    pub trims: u64,
    pub released_bytes: u64,
    pub last_trim_pause_us: Option<u64>,
    pub recycles: u64,
    pub last_reason: Option<String>,
    pub recycle_threshold: Option<u64>,
}
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Reload,
    Scale { to: ScaleTo },
    Recycle { slot: usize },
    Trim { slot: Option<usize> },
    Stop { graceful: bool },
}
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ScaleTo {
    Up(usize),
    Down(usize),
    Exactly(usize),
}
pub type Reply = Result<serde_json::Value, String>;
pub struct ControlMsg {
    pub req: Request,
    pub reply: tokio::sync::oneshot::Sender<Reply>,
}
pub mod metrics {
    use std::time::Duration;
    pub struct Metrics;
    impl Metrics {
        pub fn trimmed(&self, slot: usize, released: i64, pause: Duration) {}
        pub fn recycled(&self, slot: usize, reason: &str) {}
        pub fn restarted(&self, slot: usize, cause: &str) {}
        pub fn update(&self, s: &super::Snapshot) {}
    }
}
