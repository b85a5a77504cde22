//! Recycling: who is replaced now, replacement first, within `--max-recycling` and the
//! gate's spacing; workers waiting for their turn are slowed with `memory.high` (v2).

use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::lifecycle::drain;
use super::{Replacing, State, Supervisor, Trim, Why, Worker};
use crate::policy::{
    Emergency, EmergencyAction, PoolView, RecycleOrder, RecycleReason, Role, StartMode, WorkerView,
};

impl Supervisor {
    pub(super) fn after_recycle_progress(&mut self) {
        let now_d = self.now_d();
        let pending = self.workers.iter().any(|w| {
            self.recycling(w).is_some()
                || (!w.state.is_stopping()
                    && w.policy.recycle_reason(&self.settings, now_d)
                        == Some(RecycleReason::Reload))
        });
        if self.reloading && !pending {
            info!("rolling restart complete");
            self.notifier
                .send(&format!("READY=1\nSTATUS={}", self.status_line()));
            self.reloading = false;
        }
    }

    /// Ask the pool's policy what to do now ([`PoolPolicy::decide`](crate::policy::PoolPolicy::decide))
    /// and do it: trims, recycles (replacement first, or stop-first under a budget),
    /// `memory.high` changes, the next memory tick.
    ///
    /// A rolling restart (HUP, `ctl reload`) goes one worker at a time within
    /// `--max-recycling` as fast as readiness allows; memory, lifetime and manual recycles go
    /// through the gate, which also spaces their starts and orders them by deadline. A
    /// recycle whose replacement never became ready keeps its reason and is retried after
    /// the slot's backoff.
    pub(super) fn run_recycles(&mut self) {
        let now = Instant::now();
        let now_d = self.now_d();
        let eligible = |s: &Self, w: &Worker| {
            w.state == State::Ready
                && s.recycling(w).is_none()
                && w.slot < s.target
                && s.slots[w.slot].retry_recycle_at.is_none_or(|t| now >= t)
                && !s
                    .workers
                    .iter()
                    .any(|o| o.slot == w.slot && o.pid != w.pid && o.state.is_starting())
        };
        let views: Vec<WorkerView> = self
            .workers
            .iter()
            .map(|w| WorkerView {
                slot: w.slot,
                role: match w.state {
                    State::Starting { .. } => Role::Starting,
                    State::Ready if self.recycling(w).is_some() => Role::Replaced,
                    State::Ready => Role::Serving,
                    State::Draining { .. } | State::Killed { .. } => Role::Draining,
                },
                policy: &w.policy,
                usage: w.usage.as_ref().map(|u| u.working_set),
                may_trim: self.cfg.trim && w.trim == Trim::Idle,
                may_recycle: eligible(self, w),
                memory_high: w.memory_high,
                has_memory_high: w.group.has_memory_high(),
            })
            .collect();
        let view = PoolView {
            now: now_d,
            workers: &views,
            in_progress: self.in_progress(),
            pool_usage: self.pool_usage,
        };
        let d = self.pool.decide(&view);
        let pids: Vec<i32> = self.workers.iter().map(|w| w.pid).collect();
        drop(views);
        self.tick = d.next_tick;
        if d.eager_projection {
            info!(
                "workers reach their limits sooner than a projection from 10 s of readings can tell: projecting young workers from 2 s of readings from now on"
            );
        }
        for &(i, ttl) in &d.too_fast {
            let w = &self.workers[i];
            if self.too_fast_logged.insert(w.pid) {
                warn!(
                    slot = w.slot,
                    pid = w.pid,
                    projected_limit_in_s = ttl.as_secs_f64(),
                    ready_time_s = self.pool.ready_time().as_secs_f64(),
                    "worker grows to its limit faster than a replacement can get ready: no recycle schedule keeps its slot serving; it is stopped before its limit if a reading shows it coming, else the kernel OOM-kills it (raise --limit, or slow its growth)"
                );
            }
        }
        // Trims: the policy's (the worker's own, or the budget's).
        let mut to_trim = vec![];
        for t in &d.trims {
            let w = &mut self.workers[t.worker];
            w.trim = Trim::InFlight;
            if t.for_budget {
                debug!(slot = w.slot, pid = w.pid, "trimming for the pool budget");
            }
            to_trim.push((w.pid, w.group.pids(w.pid).unwrap_or_else(|_| vec![w.pid])));
        }
        for (pid, pids) in to_trim {
            self.trim_worker(pid, pids);
        }
        for &(i, high) in &d.memory_high {
            let w = &mut self.workers[i];
            match w.group.set_high(high) {
                Err(e) => debug!(slot = w.slot, error = %e, "cannot set memory.high"),
                Ok(()) => {
                    if let Some(h) = high {
                        info!(
                            slot = w.slot,
                            pid = w.pid,
                            memory_high = h,
                            "slowing a waiting worker with memory.high"
                        );
                    }
                    w.memory_high = high;
                }
            }
        }
        if let Some(spacing) = d.spacing_shortened {
            info!(
                spacing_s = spacing.as_secs_f64(),
                configured_s = self.pool.gate().configured_spacing().as_secs_f64(),
                "recycle spacing shortened: with the configured spacing, waiting workers would reach their limits first"
            );
        }
        for e in &d.emergencies {
            self.emergency(pids[e.worker], e);
        }
        for r in &d.recycles {
            let pid = pids[r.worker];
            let Some(slot) = self.worker_mut(pid).map(|w| w.slot) else {
                continue;
            };
            self.start_recycle(pid, slot, r);
        }
    }

    /// A worker that will reach its ceiling before a recycle through the gate could
    /// replace it ([`EmergencyAction`]): start its replacement past the gate, or stop it
    /// now (gracefully: it finishes the requests it has) rather than leave it to the OOM
    /// killer, starting its replacement too if none is starting.
    fn emergency(&mut self, pid: i32, e: &Emergency) {
        let Some(w) = self.workers.iter().find(|w| w.pid == pid) else {
            return;
        };
        if w.state != State::Ready {
            return;
        }
        let slot = w.slot;
        let replaced = self.recycling(w);
        let usage = w.usage.as_ref().map(|u| u.working_set);
        let limit = self.limit;
        let in_progress = self.in_progress();
        let ttl_s = e.time_to_limit.as_secs_f64();
        let ready_time_s = self.pool.ready_time().as_secs_f64();
        // The pool's emergency stop is the budget's; the others are the worker's memory.
        let reason = replaced.unwrap_or(match e.action {
            EmergencyAction::StopFirst => RecycleReason::Budget,
            _ => RecycleReason::Memory,
        });
        let starts = replaced.is_none()
            && slot < self.target
            && !self
                .workers
                .iter()
                .any(|o| o.slot == slot && o.pid != pid && o.state.is_starting());
        if replaced.is_none() {
            self.slots[slot].recycle_started = Some(Instant::now());
        }
        if let Some(w) = self.worker_mut(pid) {
            w.stats.recycle_wait = Some(std::time::Duration::ZERO);
            if w.memory_high.is_some() && w.group.set_high(None).is_ok() {
                w.memory_high = None;
            }
        }
        match e.action {
            EmergencyAction::StartReplacement => {
                warn!(
                    slot,
                    pid,
                    usage,
                    limit,
                    projected_limit_in_s = ttl_s,
                    ready_time_s,
                    in_progress,
                    "recycling worker past the gate: it reaches its limit sooner than a replacement admitted later could be ready; starting its replacement now"
                );
                self.start_worker(slot, Some(Replacing { pid, reason }));
            }
            EmergencyAction::StopFirst => {
                warn!(
                    slot,
                    pid,
                    usage,
                    budget = self.pool.budget(),
                    pool_usage = self.pool_usage,
                    projected_budget_in_s = ttl_s,
                    replacement_starting = replaced.is_some(),
                    "pool emergency stop: the pool reaches its budget before a recycle could make room; stopping its largest worker gracefully now (it finishes its requests), its replacement starts once it is gone"
                );
                self.stop_replaced(pid, reason);
                if starts {
                    self.slots[slot].stop_first = Some((pid, reason));
                }
            }
            EmergencyAction::Stop => {
                warn!(
                    slot,
                    pid,
                    usage,
                    limit,
                    projected_limit_in_s = ttl_s,
                    replacement_starting = replaced.is_some() || !starts,
                    "emergency stop: the worker reaches its limit before a replacement can take over; stopping it gracefully now (it finishes its requests; its slot serves nothing until the replacement is ready) instead of leaving it to the OOM killer"
                );
                self.stop_replaced(pid, reason);
                if starts {
                    self.start_worker(slot, Some(Replacing { pid, reason }));
                }
            }
        }
    }

    /// Give a worker that is being recycled for `reason` the stop signal now: it stops
    /// accepting and finishes its requests within `--graceful-timeout`.
    fn stop_replaced(&mut self, pid: i32, reason: RecycleReason) {
        let until = Instant::now() + self.cfg.graceful_timeout;
        let sig = self.cfg.stop_signal;
        if let Some(w) = self.workers.iter_mut().find(|w| w.pid == pid) {
            drain(w, self.launcher.as_ref(), sig, until, Why::Replaced(reason));
        }
    }

    fn start_recycle(&mut self, pid: i32, slot: usize, r: &RecycleOrder) {
        let budget = self.pool.budget();
        let pool_usage = self.pool_usage;
        let Some(w) = self.worker_mut(pid) else {
            return;
        };
        w.stats.recycle_wait = Some(r.waited);
        if w.memory_high.is_some() && w.group.set_high(None).is_ok() {
            w.memory_high = None;
        }
        let usage = w.usage.as_ref().map(|u| u.working_set);
        let threshold = w.policy.recycle_threshold();
        let limit = self.limit;
        let reason = r.reason;
        let stop_first = r.mode == StartMode::StopFirst;
        info!(
            slot, pid, reason = %reason, usage, limit, threshold, waited_s = r.waited.as_secs_f64(),
            ahead_of_threshold = r.ahead.is_some(),
            projected_limit_in_s = r.ahead.map(|t| t.as_secs_f64()),
            for_budget = r.for_budget,
            stop_first,
            budget, pool_usage,
            "{}",
            if stop_first {
                "recycling worker, stop-first: its replacement would not fit beside it under the pool budget; stopping it, then starting the replacement"
            } else {
                "recycling worker: starting its replacement"
            }
        );
        self.slots[slot].recycle_started = Some(Instant::now());
        if stop_first {
            self.slots[slot].stop_first = Some((pid, reason));
            self.stop_replaced(pid, reason);
        } else {
            self.start_worker(slot, Some(Replacing { pid, reason }));
        }
    }
}
