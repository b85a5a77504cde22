//! The watchdog (`--timeout`): a ready worker that sent no `WATCHDOG=1` for a whole
//! timeout (or sent `WATCHDOG=trigger`) is reported, sent `--timeout-signal`, SIGKILLed
//! after [`policy::kill_grace`], and replaced: at once after a healthy run (before the hung
//! worker is gone, unless it would not fit beside it under `--pool-limit`:
//! [`policy::replacement_first`]), after the slot's jittered backoff when it keeps hanging
//! ([`policy::replacement_delay`]).
//!
//! The replacement is a recycle (reason `timeout`): it counts against `--max-recycling`
//! until it is ready, so other recycles wait for it, but it does not wait for the gate
//! itself: the hung worker is out of service already, and waiting would only keep its
//! slot empty longer.

use tokio::time::Instant;
use tracing::{error, info, warn};

use super::{Replacing, State, Supervisor, Why, Worker};
use crate::config::Config;
use crate::policy::{self, RecycleReason};

/// When `w` (ready) misses its watchdog, if `--timeout` is set.
pub(super) fn overdue_at(w: &Worker, cfg: &Config) -> Option<Instant> {
    let timeout = cfg.timeout?;
    let ready_at = w.ready_at?;
    let last = w.keepalive.last();
    Some(last.map_or(ready_at, |k| k.max(ready_at)) + timeout)
}

impl Supervisor {
    /// Handle every ready worker whose watchdog ran out by `now`.
    pub(super) fn check_watchdogs(&mut self, now: Instant) {
        let Some(timeout) = self.cfg.timeout else {
            return;
        };
        let start = self.start;
        let since = |t: Instant| t.saturating_duration_since(start);
        let hung: Vec<i32> = self
            .workers
            .iter()
            .filter(|w| w.state == State::Ready)
            .filter(|w| {
                w.ready_at.is_some_and(|r| {
                    policy::is_overdue(timeout, since(r), w.keepalive.last().map(since), since(now))
                })
            })
            .map(|w| w.pid)
            .collect();
        for pid in hung {
            self.on_hung(pid, false);
        }
    }

    /// Worker `pid` missed its watchdog (`trigger`: it said `WATCHDOG=trigger`).
    pub(super) fn on_hung(&mut self, pid: i32, trigger: bool) {
        let Some(timeout) = self.cfg.timeout else {
            return;
        };
        if self.phase.stopping() {
            return;
        }
        let now = Instant::now();
        let sig = self.cfg.timeout_signal;
        let grace = policy::kill_grace(timeout);
        let start = self.start;
        let Some(w) = self
            .workers
            .iter_mut()
            .find(|w| w.pid == pid && w.state == State::Ready)
        else {
            return;
        };
        let (slot, generation) = (w.slot, w.generation);
        let ready_at = w.ready_at.unwrap_or(w.started);
        let last = w.keepalive.last();
        let silent = now.saturating_duration_since(last.map_or(ready_at, |k| k.max(ready_at)));
        error!(
            slot,
            pid,
            generation,
            silent_ms = silent.as_millis() as u64,
            timeout_ms = timeout.as_millis() as u64,
            trigger,
            signal = %sig,
            grace_ms = grace.as_millis() as u64,
            "worker missed its watchdog (--timeout): sending the timeout signal, SIGKILL after the grace"
        );
        if last.is_none() && !trigger {
            warn!(
                slot,
                pid,
                "the worker never sent WATCHDOG=1: with --timeout, a worker must send it on its \
                 NOTIFY_SOCKET at least every WATCHDOG_USEC (sd_notify(3); every half of it is \
                 the rule), or run without --timeout"
            );
        }
        w.state = State::Draining {
            until: now + grace,
            why: Why::Hung,
        };
        let kept = policy::kept_alive_for(
            ready_at.saturating_duration_since(start),
            last.map(|k| k.saturating_duration_since(start)),
        );
        self.totals.timeouts += 1;
        self.slots[slot].timeouts += 1;
        if let Some(m) = &self.metrics {
            // The recycle itself is counted when the hung worker is gone (on_exit).
            m.timed_out(slot);
        }
        let delay = policy::replacement_delay(&mut self.slots[slot].backoff, kept, &mut self.rng);
        // Replacement first where memory allows (under --pool-limit, if it fits beside the
        // hung worker), then the signal: the new worker is on its way before the hung one
        // is gone. Otherwise it starts once the hung one is gone (stop-first); a worker
        // that keeps hanging waits for its backoff instead.
        let fits = policy::replacement_first(
            self.pool.budget().map(policy::pool_memory_high),
            self.pool_usage,
            self.pool.start_cost(),
        );
        if slot < self.target {
            info!(
                slot,
                pid,
                delay_ms = delay.as_millis() as u64,
                stop_first = delay.is_zero() && !fits,
                "replacing the hung worker"
            );
            if delay.is_zero() && !fits {
                self.slots[slot].stop_first = Some((pid, RecycleReason::Timeout));
            } else if delay.is_zero() {
                self.start_worker(
                    slot,
                    Some(Replacing {
                        pid,
                        reason: RecycleReason::Timeout,
                    }),
                );
            } else {
                self.slots[slot].hung = Some(pid);
                self.slots[slot].respawn_at = Some(now + delay);
            }
        }
        self.launcher.signal(pid, sig);
    }
}
