//! The memory side of the pool: every tick, read each worker's memory (and the pool's);
//! run the trims the policy asks for (the injector runs on a blocking thread).
//! Decisions are [`crate::policy`]'s; this carries them out.

use std::time::Duration;

use tracing::{debug, error, info, warn};

use super::lifecycle::kill;
use super::{Event, Exit, State, Supervisor, Trim, Why};
use crate::cgroup;
use crate::trim;

impl Supervisor {
    pub(super) fn memory_tick(&mut self) {
        let now_d = self.now_d();
        // Without a memory cgroup nothing else enforces the limit: past it, SIGKILL is the
        // last resort (recycling should have replaced the worker long before).
        let enforce = matches!(self.groups.kind(), cgroup::Kind::None)
            .then_some(self.limit)
            .flatten();
        let window = self.pool.overlap_window();
        for w in &mut self.workers {
            match w.group.usage(w.pid) {
                Ok(u) => {
                    // A start's cost includes its first requests: what a replacement grows
                    // to while its old worker drains is what must fit beside that worker.
                    if !w.cost_seen && w.ready_at.is_some_and(|t| t.elapsed() >= window) {
                        w.cost_seen = true;
                        self.pool.overlap_seen(u.peak.unwrap_or(u.working_set));
                    }
                    w.policy.observe(now_d, u.working_set);
                    if let Some(peak) = u.peak {
                        w.policy.observe_peak(now_d, u.current, peak);
                    }
                    if let Some(limit) = enforce
                        && u.working_set > limit
                        && !matches!(w.state, State::Killed { .. })
                    {
                        error!(
                            slot = w.slot,
                            pid = w.pid,
                            usage = u.working_set,
                            limit,
                            "worker is over its limit and no cgroup enforces it (--cgroup none): SIGKILL"
                        );
                        let replaces = w.state.replaces();
                        kill(w, self.launcher.as_ref(), Why::OverLimit { replaces });
                    }
                    w.usage = Some(u);
                }
                Err(e) => {
                    debug!(slot = w.slot, pid = w.pid, error = %e, "cannot read worker memory")
                }
            }
        }
        if self.pool.budget().is_some() {
            self.read_pool();
        }
        if let Some(m) = &self.metrics {
            m.update(&self.snapshot());
        }
        // Whom to trim is the pool policy's decision (supervisor/recycle.rs), right after.
    }

    /// Read the pool group (under a budget): its working set for the policy, the whole
    /// reading for status.
    pub(super) fn read_pool(&mut self) {
        self.pool_reading = self.groups.pool_reading();
        self.pool_usage = self.pool_reading.as_ref().map(|r| r.working_set);
    }

    pub(super) fn trim_worker(&mut self, pid: i32, pids: Vec<i32>) {
        let tx = self.tx.clone();
        let injector = self.injector.clone();
        // ptrace requests must come from the thread that attached: the whole trim of one
        // process runs on one blocking-pool thread.
        tokio::task::spawn_blocking(move || {
            let results = injector.trim(&pids);
            let _ = tx.send(Event::Trimmed { pid, results });
        });
    }

    pub(super) fn on_trimmed(
        &mut self,
        pid: i32,
        results: Vec<Result<trim::TrimReport, trim::TrimError>>,
    ) {
        let now_d = self.now_d();
        let mut exited = None;
        let metrics = self.metrics.clone();
        let mut log_unavailable = None;
        let (mut trims, mut total_released) = (0u64, 0u64);
        {
            let Some(w) = self.worker_mut(pid) else {
                return;
            };
            if w.trim == Trim::InFlight {
                w.trim = Trim::Idle;
            }
            let mut any_ok = false;
            let mut deferred = false;
            for r in results {
                match r {
                    Ok(rep) => {
                        any_ok = true;
                        let released = rep.released().max(0) as u64;
                        w.stats.trims += 1;
                        w.stats.released += released;
                        trims += 1;
                        total_released += released;
                        w.stats.last_pause_us = Some(rep.pause_us);
                        info!(
                            slot = w.slot, pid = rep.pid, tid = rep.tid, released, pause_us = rep.pause_us,
                            call_us = rep.call_us, rss_before = rep.rss_before, rss_after = rep.rss_after, syscall = %rep.syscall,
                            "trimmed"
                        );
                        if let Some(m) = &metrics {
                            m.trimmed(w.slot, rep.released(), Duration::from_micros(rep.pause_us));
                        }
                    }
                    Err(trim::TrimError::Deferred { pid: p, reason }) => {
                        deferred = true;
                        debug!(slot = w.slot, pid = p, %reason, "trim deferred: no thread parked in a safe syscall");
                    }
                    Err(trim::TrimError::Unavailable { pid: p, reason }) => {
                        if p == w.pid {
                            w.trim = Trim::Unavailable;
                            w.policy.trim_unavailable();
                            log_unavailable = Some((p, reason));
                        }
                    }
                    Err(trim::TrimError::Exited { pid: p, status }) if p == pid => {
                        exited = Some(status)
                    }
                    Err(trim::TrimError::Gone { .. }) => {}
                    Err(e) => warn!(slot = w.slot, error = %e, "trim failed"),
                }
            }
            if any_ok {
                // The group's reading right after the trim decides whether trimming still
                // keeps the worker under its recycle threshold.
                if let Ok(u) = w.group.usage(w.pid) {
                    w.usage = Some(u);
                }
                let ws = w.usage.as_ref().map_or(0, |u| u.working_set);
                w.policy.trimmed(now_d, ws);
            } else if deferred {
                w.policy.trim_deferred(now_d);
            }
        }
        self.totals.trims += trims;
        self.totals.released += total_released;
        if let Some((p, reason)) = log_unavailable
            && !std::mem::replace(&mut self.trim_unavailable_logged, true)
        {
            warn!(pid = p, %reason, "trim unavailable; the pool relies on recycling");
        }
        if let Some(status) = exited {
            // Our trim thread collected the worker's exit; handle it as the reaper would.
            let exit = Exit::from_raw(status);
            self.on_exit(pid, exit);
        }
    }
}
