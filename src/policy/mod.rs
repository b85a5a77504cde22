//! TEMPORARY STUB (replaced by the wt-policy merge).
#![allow(dead_code, unused_variables)]
use rand::Rng;
use std::time::Duration;
#[derive(Debug, Clone, Default)]
pub struct Settings {
    pub trim: bool,
    pub trim_at: f64,
    pub trim_hysteresis: f64,
    pub trim_interval: Duration,
    pub recycle_at: f64,
    pub recycle_jitter: f64,
    pub max_lifetime: Option<Duration>,
    pub lifetime_jitter: Duration,
    pub max_recycling: usize,
    pub recycle_spacing: Option<Duration>,
    pub ready_time: Duration,
}
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum RecycleReason {
    Memory,
    Lifetime,
    Manual,
    Reload,
}
impl std::fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}
pub struct WorkerPolicy;
impl WorkerPolicy {
    pub fn new(settings: &Settings, limit: Option<u64>, now: Duration, rng: &mut impl Rng) -> Self {
        WorkerPolicy
    }
    pub fn recycle_threshold(&self) -> Option<u64> {
        None
    }
    pub fn lifetime(&self) -> Option<Duration> {
        None
    }
    pub fn observe(&mut self, now: Duration, working_set: u64) {}
    pub fn should_trim(&self, settings: &Settings, now: Duration) -> bool {
        false
    }
    pub fn trimmed(&mut self, now: Duration, working_set_after: u64) {}
    pub fn trim_deferred(&mut self, now: Duration) {}
    pub fn trim_unavailable(&mut self) {}
    pub fn recycle_reason(&self, settings: &Settings, now: Duration) -> Option<RecycleReason> {
        None
    }
    pub fn time_to_limit(&self, now: Duration) -> Option<Duration> {
        None
    }
}
pub struct Candidate {
    pub slot: usize,
    pub reason: RecycleReason,
    pub time_to_limit: Option<Duration>,
    pub waiting_since: Duration,
}
pub struct RecycleGate;
impl RecycleGate {
    pub fn new(settings: &Settings) -> Self {
        RecycleGate
    }
    pub fn admit(
        &mut self,
        now: Duration,
        in_progress: usize,
        candidates: &[Candidate],
    ) -> Vec<usize> {
        if in_progress == 0 {
            candidates.iter().take(1).map(|c| c.slot).collect()
        } else {
            vec![]
        }
    }
    pub fn next_opening(&self, now: Duration, in_progress: usize) -> Option<Duration> {
        None
    }
}
pub struct Backoff {
    cur: Duration,
    base: Duration,
    cap: Duration,
}
impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            cur: base,
            base,
            cap,
        }
    }
    pub fn failure(&mut self, rng: &mut impl Rng) -> Duration {
        let d = self.cur;
        self.cur = (self.cur * 2).min(self.cap);
        d
    }
    pub fn success(&mut self) {
        self.cur = self.base
    }
}
pub fn oom_restart_delay(rng: &mut impl Rng) -> Duration {
    Duration::from_millis(500)
}
