//! Deadlines: readiness by delay, readiness timeouts, watchdogs, graceful timeouts,
//! respawns after backoff, the shutdown's grace period.

use tokio::time::Instant;
use tracing::{debug, warn};

use super::lifecycle::kill;
use super::{Phase, Replacing, State, Supervisor, Why, Worker};
use crate::config::{Config, Ready};
use crate::policy::RecycleReason;

/// Most workers started in one pass of the loop: between passes, signals, `ctl` and exits
/// are handled (a start forks and waits for the exec, ~1 ms each, far more under load).
const START_BATCH: usize = 8;

/// The next moment something must happen to `w`.
fn deadline(w: &Worker, cfg: &Config, start: Instant) -> Option<Instant> {
    match w.state {
        State::Starting { .. } => {
            let timeout = w.started + cfg.ready_timeout;
            Some(match cfg.ready {
                Ready::Delay(d) => (w.started + d).min(timeout),
                Ready::Notify => timeout,
            })
        }
        State::Draining { until, .. } => Some(until),
        State::Ready => super::watchdog::overdue_at(w, cfg, start),
        State::Killed { .. } => None,
    }
}

impl Supervisor {
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        let workers = self
            .workers
            .iter()
            .filter_map(|w| deadline(w, &self.cfg, self.start));
        let slots = self
            .slots
            .iter()
            .flat_map(|s| [s.respawn_at, s.retry_recycle_at])
            .flatten();
        let stop = match self.phase {
            Phase::Stopping { kill_at } => Some(kill_at),
            _ => None,
        };
        workers.chain(slots).chain(stop).min()
    }

    pub(super) fn on_timers(&mut self, now: Instant) {
        // Readiness by delay, and readiness timeouts.
        let mut ready = vec![];
        let mut too_slow = vec![];
        for w in &self.workers {
            if !w.state.is_starting() {
                continue;
            }
            if let Ready::Delay(d) = self.cfg.ready
                && now >= w.started + d
            {
                ready.push(w.pid);
            } else if now >= w.started + self.cfg.ready_timeout {
                too_slow.push(w.pid);
            }
        }
        for pid in ready {
            self.mark_ready(pid);
        }
        let timeout = self.cfg.ready_timeout;
        for w in &mut self.workers {
            let State::Starting { replaces } = w.state else {
                continue;
            };
            if !too_slow.contains(&w.pid) {
                continue;
            }
            warn!(
                slot = w.slot,
                pid = w.pid,
                timeout_s = timeout.as_secs_f64(),
                "worker not ready in time; stopping it"
            );
            debug!(
                slot = w.slot,
                pid = w.pid,
                "killing worker that never became ready"
            );
            // Not "expected": counted as a failure, so the slot backs off.
            kill(w, self.launcher.as_ref(), Why::NotReady { replaces });
        }
        self.check_watchdogs(now);
        // Draining workers past their grace period.
        for w in &mut self.workers {
            if let State::Draining { until, why } = w.state
                && now >= until
            {
                if why == Why::Hung {
                    warn!(
                        slot = w.slot,
                        pid = w.pid,
                        signal = %self.cfg.timeout_signal,
                        "hung worker still there after the timeout signal and its grace; SIGKILL"
                    );
                } else {
                    warn!(
                        slot = w.slot,
                        pid = w.pid,
                        "worker did not stop within the graceful timeout; SIGKILL"
                    );
                }
                kill(w, self.launcher.as_ref(), Why::Stop);
            }
        }
        // Respawns after backoff, and slots added by scaling up: at most START_BATCH per
        // pass (each start is a fork that waits for the exec), the rest on the next pass.
        // A launcher that would have to wait (the zygote importing the app) starts
        // nothing and no recycle is decided until it can: the pool keeps answering.
        let wait = if self.phase.stopping() {
            None
        } else {
            self.launcher.not_before()
        };
        let mut started = 0;
        for slot in 0..self.slots.len().min(self.target) {
            if started >= START_BATCH {
                break;
            }
            if let Some(t) = self.slots[slot].respawn_at
                && now >= t
                && !self.phase.stopping()
            {
                if let Some(d) = wait {
                    self.slots[slot].respawn_at = Some(now + d);
                    continue;
                }
                self.slots[slot].respawn_at = None;
                // After a hang the new worker replaces the hung one: a timeout recycle.
                let replaces = self.slots[slot].hung.take().map(|pid| Replacing {
                    pid,
                    reason: RecycleReason::Timeout,
                });
                if !self
                    .workers
                    .iter()
                    .any(|w| w.slot == slot && !w.state.is_stopping())
                {
                    self.start_worker(slot, replaces);
                    started += 1;
                }
            }
        }
        if let Phase::Stopping { kill_at } = self.phase
            && now >= kill_at
            && !self.workers.is_empty()
        {
            warn!(
                left = self.workers.len(),
                "graceful timeout over; killing the workers that remain"
            );
            self.kill_all();
            self.phase = Phase::Killing;
        }
        if !self.phase.stopping() && wait.is_none() {
            self.run_recycles();
        }
    }
}
