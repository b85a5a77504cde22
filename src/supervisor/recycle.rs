//! Recycling: who is replaced now, replacement first, within `--max-recycling` and the
//! gate's spacing; workers waiting for their turn are slowed with `memory.high` (v2).

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info};

use super::{Replacing, State, Supervisor, Worker};
use crate::policy::{self, Candidate, RecycleReason};

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

    /// Pick who may be recycled now and start their replacements.
    ///
    /// A rolling restart (HUP, `ctl reload`) goes one worker at a time within
    /// `--max-recycling` as fast as readiness allows; memory, lifetime and manual recycles go
    /// through the gate, which also spaces their starts and orders them by urgency. A
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
        let mut candidates = vec![];
        let mut reloads = vec![];
        for w in &self.workers {
            if !eligible(self, w) {
                continue;
            }
            let Some(reason) = w.policy.recycle_reason(&self.settings, now_d) else {
                continue;
            };
            let since = w
                .policy
                .waiting_since(&self.settings, now_d)
                .unwrap_or(now_d);
            if reason == RecycleReason::Reload {
                reloads.push((w.slot, w.pid));
            } else {
                candidates.push(Candidate {
                    slot: w.slot,
                    reason,
                    time_to_limit: w.policy.time_to_limit(now_d),
                    waiting_since: since,
                });
            }
        }
        // Lookahead: if the gate, one start per spacing, would reach some worker only after
        // its hard limit, the most urgent one not yet waiting starts now.
        let ttls: Vec<(Duration, usize)> = self
            .workers
            .iter()
            .filter(|w| eligible(self, w))
            .filter_map(|w| w.policy.time_to_limit(now_d).map(|t| (t, w.slot)))
            .collect();
        let times: Vec<Duration> = ttls.iter().map(|t| t.0).collect();
        // The spacing in force: shorter than configured only if the projections need it.
        self.gate.yield_to(&times);
        // One start per spacing, and with --max-recycling 1 no faster than a recycle takes
        // (ready time plus a short drain).
        let cadence = self.gate.spacing().max(
            (self.settings.ready_time + Duration::from_secs(2))
                / self.cfg.max_recycling.max(1) as u32,
        );
        let mut ahead = None;
        if policy::behind_schedule(&times, cadence, self.settings.ready_time)
            && let Some(&(ttl, slot)) = ttls
                .iter()
                .filter(|(_, s)| !candidates.iter().any(|c| c.slot == *s))
                .min()
        {
            debug!(
                slot,
                ttl_s = ttl.as_secs_f64(),
                "recycle queue is behind schedule: starting early"
            );
            candidates.push(Candidate {
                slot,
                reason: RecycleReason::Memory,
                time_to_limit: Some(ttl),
                waiting_since: now_d,
            });
            ahead = Some((slot, ttl));
        }
        reloads.sort();
        for (slot, pid) in reloads {
            if self.in_progress() >= self.cfg.max_recycling {
                break;
            }
            self.start_recycle(pid, slot, RecycleReason::Reload, Duration::ZERO, None);
        }
        // A worker no longer waiting (a trim brought it back under its threshold) runs
        // unthrottled again.
        for w in &mut self.workers {
            if w.memory_high.is_some() && !candidates.iter().any(|c| c.slot == w.slot) {
                if let Err(e) = w.group.set_high(None) {
                    debug!(slot = w.slot, error = %e, "cannot reset memory.high");
                }
                w.memory_high = None;
            }
        }
        if candidates.is_empty() {
            return;
        }
        let admitted = self.gate.admit(now_d, self.in_progress(), &candidates);
        if !admitted.is_empty() && self.gate.spacing() < self.gate.configured_spacing() {
            info!(
                slot = admitted[0],
                spacing_s = self.gate.spacing().as_secs_f64(),
                configured_s = self.gate.configured_spacing().as_secs_f64(),
                "recycle spacing shortened: with the configured spacing, waiting workers would reach their limits first"
            );
        }
        for slot in &admitted {
            let Some(c) = candidates.iter().find(|c| c.slot == *slot) else {
                continue;
            };
            let Some(pid) = self
                .workers
                .iter()
                .find(|w| w.slot == *slot && w.state == State::Ready && self.recycling(w).is_none())
                .map(|w| w.pid)
            else {
                continue;
            };
            let early = ahead.filter(|a| a.0 == *slot).map(|a| a.1);
            self.start_recycle(
                pid,
                *slot,
                c.reason,
                now_d.saturating_sub(c.waiting_since),
                early,
            );
        }
        // Those still waiting: slow them down on v2 rather than let them be OOM-killed.
        let order = self.gate.order(&candidates);
        let in_progress = self.in_progress();
        let recycle_time = self.settings.ready_time + Duration::from_secs(2);
        for (position, &slot) in order.iter().enumerate() {
            if admitted.contains(&slot) {
                continue;
            }
            let wait = self
                .gate
                .expected_wait(now_d, in_progress, position, recycle_time);
            let pid = self
                .workers
                .iter()
                .find(|w| {
                    w.slot == slot && self.recycling(w).is_none() && w.group.has_memory_high()
                })
                .map(|w| w.pid);
            if let Some(w) = pid.and_then(|p| self.worker_mut(p)) {
                let high = w.policy.memory_high(now_d, Some(wait));
                if high != w.memory_high {
                    if let Err(e) = w.group.set_high(high) {
                        debug!(slot, error = %e, "cannot set memory.high");
                    } else if let Some(h) = high {
                        info!(
                            slot,
                            pid = w.pid,
                            memory_high = h,
                            expected_wait_s = wait.as_secs_f64(),
                            "slowing a waiting worker with memory.high"
                        );
                    }
                    w.memory_high = high;
                }
            }
        }
    }

    /// `ahead`: started by the lookahead before its threshold, projected this far from
    /// its limit.
    fn start_recycle(
        &mut self,
        pid: i32,
        slot: usize,
        reason: RecycleReason,
        waited: Duration,
        ahead: Option<Duration>,
    ) {
        let Some(w) = self.worker_mut(pid) else {
            return;
        };
        w.stats.recycle_wait = Some(waited);
        let usage = w.usage.as_ref().map(|u| u.working_set);
        let threshold = w.policy.recycle_threshold();
        let limit = self.limit;
        info!(
            slot, pid, reason = %reason, usage, limit, threshold, waited_s = waited.as_secs_f64(),
            ahead_of_threshold = ahead.is_some(),
            projected_limit_in_s = ahead.map(|t| t.as_secs_f64()),
            "recycling worker: starting its replacement"
        );
        self.start_worker(slot, Some(Replacing { pid, reason }));
    }
}
