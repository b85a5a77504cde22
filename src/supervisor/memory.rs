//! The memory side of the pool: every tick, read each worker's memory, trim the ones
//! the policy says to (ptrace work on a blocking thread), and start the recycles the gate
//! admits, replacement first. Decisions are [`crate::policy`]'s; this carries them out.

use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::{Event, Exit, State, Supervisor, Worker};
use crate::cgroup;
use crate::policy::{self, Candidate, RecycleReason};
use crate::trim;

impl Supervisor {
    pub(super) fn memory_tick(&mut self) {
        let now_d = self.now_d();
        // Without a memory cgroup nothing else enforces the limit: past it, SIGKILL is the
        // last resort (recycling should have replaced the worker long before).
        let enforce = matches!(self.cgroups.kind(), cgroup::Kind::None)
            .then_some(self.limit)
            .flatten();
        for w in &mut self.workers {
            match w.group.usage(Some(w.pid)) {
                Ok(u) => {
                    w.policy.observe(now_d, u.working_set);
                    if let Some(limit) = enforce
                        && u.working_set > limit
                        && !w.killed
                    {
                        error!(
                            slot = w.slot,
                            pid = w.pid,
                            usage = u.working_set,
                            limit,
                            "worker is over its limit and no cgroup enforces it (--cgroup none): SIGKILL"
                        );
                        w.counts_as_failure = true;
                        w.kill();
                    }
                    w.usage = Some(u);
                }
                Err(e) => {
                    debug!(slot = w.slot, pid = w.pid, error = %e, "cannot read worker memory")
                }
            }
        }
        if let Some(m) = &self.metrics {
            m.update(&self.snapshot());
        }
        if !self.cfg.trim {
            return;
        }
        let mut to_trim = vec![];
        for w in &mut self.workers {
            if w.state == State::Ready
                && !w.trim_in_flight
                && !w.trim_unavailable
                && w.policy.should_trim(&self.settings, now_d)
            {
                w.trim_in_flight = true;
                to_trim.push((
                    w.pid,
                    w.group.pids(Some(w.pid)).unwrap_or_else(|_| vec![w.pid]),
                ));
            }
        }
        for (pid, pids) in to_trim {
            self.trim_worker(pid, pids);
        }
    }

    pub(super) fn trim_worker(&mut self, pid: i32, pids: Vec<i32>) {
        let tx = self.tx.clone();
        // ptrace requests must come from the thread that attached: the whole trim of one
        // process runs on one blocking-pool thread.
        tokio::task::spawn_blocking(move || {
            let opts = trim::TrimOptions::default();
            let results: Vec<_> = pids.iter().map(|&p| trim::trim_pid(p, &opts)).collect();
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
        {
            let Some(w) = self.worker_mut(pid) else {
                return;
            };
            w.trim_in_flight = false;
            let mut any_ok = false;
            let mut deferred = false;
            for r in results {
                match r {
                    Ok(rep) => {
                        any_ok = true;
                        let released = rep.released().max(0) as u64;
                        w.stats.trims += 1;
                        w.stats.released += released;
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
                            w.trim_unavailable = true;
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
                if let Ok(u) = w.group.usage(Some(w.pid)) {
                    w.usage = Some(u);
                }
                let ws = w.usage.as_ref().map_or(0, |u| u.working_set);
                w.policy.trimmed(now_d, ws);
            } else if deferred {
                w.policy.trim_deferred(now_d);
            }
        }
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

    pub(super) fn in_progress(&self) -> usize {
        self.workers
            .iter()
            .filter(|w| w.recycling.is_some())
            .count()
    }

    pub(super) fn after_recycle_progress(&mut self) {
        let now_d = self.now_d();
        let pending = self.workers.iter().any(|w| {
            w.recycling.is_some()
                || (w.state != State::Draining
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
                && w.recycling.is_none()
                && w.slot < s.target
                && s.slots[w.slot].retry_recycle_at.is_none_or(|t| now >= t)
                && !s
                    .workers
                    .iter()
                    .any(|o| o.slot == w.slot && o.pid != w.pid && o.state == State::Starting)
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
                .find(|w| w.slot == *slot && w.state == State::Ready && w.recycling.is_none())
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
            if let Some(w) = self
                .workers
                .iter_mut()
                .find(|w| w.slot == slot && w.recycling.is_none() && w.group.has_memory_high())
            {
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
        if let Some(m) = &self.metrics {
            m.recycled(slot, &reason.to_string());
        }
        self.start_worker(slot, Some((pid, reason)));
    }
}
