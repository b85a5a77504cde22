//! A worker's life: start (replacement first), ready, drain, kill, exit, respawn with
//! backoff.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use super::worker::{Keepalive, Stats};
use super::{Event, Exit, Phase, Replacing, STABLE_AFTER, State, Supervisor, Trim, Why, Worker};
use crate::config::Ready;
use crate::edge::{Launch, Launcher};
use crate::notify;
use crate::policy::{self, RecycleReason, WorkerPolicy};

/// Ask `w` to stop: the stop signal to its process group; SIGKILL at `until`. No-op for a
/// worker already on its way out.
pub(super) fn drain(
    w: &mut Worker,
    launcher: &dyn Launcher,
    sig: Signal,
    until: Instant,
    why: Why,
) {
    if w.state.is_stopping() {
        return;
    }
    w.state = State::Draining { until, why };
    launcher.signal(w.pid, sig);
}

/// SIGKILL `w`'s process group and anything else in its group. `why` for a worker not yet
/// on its way out (one that is keeps its reason).
pub(super) fn kill(w: &mut Worker, launcher: &dyn Launcher, why: Why) {
    let why = w.state.why().unwrap_or(why);
    w.state = State::Killed { why };
    launcher.signal(w.pid, Signal::SIGKILL);
    let _ = w.group.kill_all(w.pid);
}

impl Supervisor {
    /// Start a worker for `slot`; once ready it replaces the worker in `replaces` (a
    /// recycle or rolling restart).
    pub(super) fn start_worker(&mut self, slot: usize, replaces: Option<Replacing>) -> bool {
        let generation = self.slots[slot].generation;
        self.slots[slot].generation += 1;
        self.slots[slot].respawn_at = None;
        let group = match self.groups.create(slot, generation, self.limit) {
            Ok(g) => g,
            Err(e) => {
                error!(slot, error = %e, "cannot create the worker's cgroup");
                self.schedule_respawn(slot, false);
                return false;
            }
        };
        // One notify socket per worker carries readiness (`--ready notify`) and the
        // watchdog's keep-alives (`--timeout`).
        let ready_by_notify = self.cfg.ready == Ready::Notify;
        let notify_path = (ready_by_notify || self.cfg.timeout.is_some())
            .then(|| self.rundir.notify_path(slot, generation));
        let notify_sock = match &notify_path {
            Some(p) => match notify::bind_worker_socket(p, self.cfg.credentials.as_ref()) {
                Ok(s) => Some(s),
                Err(e) => {
                    error!(slot, path = %p.display(), error = %e, "cannot bind the worker's notify socket");
                    let _ = group.remove();
                    self.schedule_respawn(slot, false);
                    return false;
                }
            },
            None => None,
        };
        let launch = Launch {
            slot,
            generation,
            group: group.as_ref(),
            notify_socket: notify_path.as_deref(),
            watchdog: self.cfg.timeout,
        };
        let pid = match self.launcher.launch(&launch) {
            Ok(pid) => pid,
            Err(e) => {
                error!(slot, error = %e, "cannot start worker");
                let _ = group.remove();
                self.schedule_respawn(slot, false);
                return false;
            }
        };
        let now = Instant::now();
        let keepalive = Keepalive::default();
        let watchdog = self.cfg.timeout.is_some();
        let notify_task = notify_sock.map(|sock| {
            let tx = self.tx.clone();
            let keepalive = keepalive.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = sock.recv(&mut buf).await {
                    let msg = notify::Notification::read(&buf[..n]);
                    if msg.watchdog {
                        keepalive.touch();
                    }
                    if msg.ready && ready_by_notify {
                        let _ = tx.send(Event::Ready { pid });
                    }
                    if msg.watchdog_trigger && watchdog {
                        let _ = tx.send(Event::WatchdogTrigger { pid });
                    }
                    if let Some(text) = msg.status {
                        let _ = tx.send(Event::NotifyStatus { pid, text });
                    }
                }
            })
        });
        // The first generation draws thresholds spread over a whole life, so that workers
        // started together do not reach their thresholds together (policy::new_initial).
        // A lone worker has nobody to collide with: its early recycle would be pure cost.
        // `--spread-first off` leaves every worker at its own threshold.
        let spread = self.cfg.spread_first && self.target > 1;
        let wpolicy = if self.phase == Phase::Starting && generation == 0 && spread {
            WorkerPolicy::new_initial(&self.settings, self.limit, self.now_d(), &mut self.rng)
        } else {
            WorkerPolicy::new(&self.settings, self.limit, self.now_d(), &mut self.rng)
        };
        info!(
            slot,
            generation,
            pid,
            cgroup = group
                .path()
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            recycle_at = wpolicy.recycle_threshold(),
            replaces = replaces.map(|r| r.pid),
            "worker started"
        );
        // The slot's recycle count and the reason its predecessor went carry over; trims
        // and bytes released are this worker's own (the pool's totals keep every trim).
        // The count lives in the slot: a stop-first replacement starts after its predecessor
        // is gone, and a crash's restart keeps the slot's count too.
        let mut inherited = Stats::default();
        if let Some(r) = replaces {
            self.slots[slot].recycles += 1;
            inherited.last_reason = Some(r.reason.to_string());
        }
        inherited.recycles = self.slots[slot].recycles;
        self.workers.push(Worker {
            slot,
            generation,
            pid,
            started: now,
            state: State::Starting { replaces },
            ready_at: None,
            keepalive,
            trim: Trim::Idle,
            notify_task,
            notify_path,
            group,
            policy: wpolicy,
            memory_high: None,
            stats: inherited,
            usage: None,
            cost_seen: false,
        });
        true
    }

    pub(super) fn schedule_respawn(&mut self, slot: usize, clean_exit_after_long_run: bool) {
        if slot >= self.target || self.phase.stopping() {
            return;
        }
        let delay = if clean_exit_after_long_run {
            self.slots[slot].backoff.success();
            Duration::ZERO
        } else {
            self.slots[slot].backoff.failure(&mut self.rng)
        };
        if !delay.is_zero() {
            info!(
                slot,
                delay_ms = delay.as_millis() as u64,
                "backing off before restarting the worker"
            );
        }
        self.slots[slot].respawn_at = Some(Instant::now() + delay);
    }

    pub(super) fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Ready { pid } => self.mark_ready(pid),
            Event::NotifyStatus { pid, text } => debug!(pid, status = %text, "worker status"),
            Event::WatchdogTrigger { pid } => self.on_hung(pid, true),
            Event::Trimmed { pid, results } => self.on_trimmed(pid, results),
        }
    }

    pub(super) fn mark_ready(&mut self, pid: i32) {
        let Some(w) = self.worker_mut(pid) else {
            return;
        };
        let State::Starting { replaces } = w.state else {
            return;
        };
        w.state = State::Ready;
        w.ready_at = Some(Instant::now());
        let (slot, took) = (w.slot, w.started.elapsed());
        // What a replacement costs while starting, and how long starting takes: the
        // policy's start-first/stop-first and deadline decisions use both.
        let cost = w
            .group
            .usage(pid)
            .ok()
            .map_or(0, |u| u.peak.unwrap_or(u.working_set));
        self.pool.started(cost, took);
        info!(
            slot,
            pid,
            ready_ms = took.as_millis() as u64,
            "worker ready"
        );
        if self.cfg.ready == crate::config::Ready::Notify {
            // The policy's ready time (recycle spacing and cadence) follows what start-ups
            // really take, instead of a fixed guess.
            if self.ready_times.len() == policy::READY_SAMPLES {
                self.ready_times.pop_front();
            }
            self.ready_times.push_back(took);
            let measured = policy::ready_time(self.ready_times.iter().copied());
            if measured != self.settings.ready_time {
                debug!(
                    ready_ms = measured.as_millis() as u64,
                    "ready time from start-ups"
                );
                self.settings.ready_time = measured;
                self.pool.update(&self.settings);
            }
        }
        if let Some(r) = replaces {
            let until = Instant::now() + self.cfg.graceful_timeout;
            let sig = self.cfg.stop_signal;
            if let Some(o) = self.workers.iter_mut().find(|o| o.pid == r.pid) {
                drain(
                    o,
                    self.launcher.as_ref(),
                    sig,
                    until,
                    Why::Replaced(r.reason),
                );
            }
        }
        if self.phase == Phase::Starting
            && self
                .workers
                .iter()
                .filter(|w| w.state == State::Ready)
                .count()
                >= self.target
        {
            self.phase = Phase::Running;
            info!(workers = self.target, "all workers ready");
            self.notifier
                .send(&format!("READY=1\nSTATUS={}", self.status_line()));
        }
    }

    pub(super) fn begin_shutdown(&mut self) {
        self.notifier.send("STOPPING=1");
        self.phase = Phase::Stopping {
            kill_at: Instant::now() + self.cfg.graceful_timeout,
        };
        let until = Instant::now() + self.cfg.graceful_timeout;
        let sig = self.cfg.stop_signal;
        for w in &mut self.workers {
            drain(w, self.launcher.as_ref(), sig, until, Why::Stop);
        }
    }

    pub(super) fn kill_all(&mut self) {
        for w in &mut self.workers {
            kill(w, self.launcher.as_ref(), Why::Stop);
        }
    }

    pub(super) fn on_exit(&mut self, pid: i32, exit: Exit) {
        let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
            debug!(pid, ?exit, "reaped an orphaned process");
            return;
        };
        let recycling = self.recycling(&self.workers[idx]);
        let mut w = self.workers.remove(idx);
        if let Some(t) = w.notify_task.take() {
            t.abort();
        }
        if let Some(p) = &w.notify_path {
            let _ = std::fs::remove_file(p);
        }
        let oom = w.group.oom_kills().unwrap_or(0) > 0;
        let usage = w.usage.as_ref().map(|u| u.working_set);
        // The last tick's reading may predate the growth that got the worker killed: the
        // group's own high-water mark says what it reached.
        let peak = oom
            .then(|| w.group.usage(pid).ok().and_then(|u| u.peak))
            .flatten();
        let lived = w.started.elapsed();
        let slot = w.slot;
        // Anything the worker left behind in its group (children in other process groups).
        let _ = w.group.kill_all(pid);
        // Without a cgroup, its daemons were re-parented to us: kill those that no live
        // worker's tree ever held.
        if self.groups.kind() == crate::cgroup::Kind::None {
            self.kill_orphans();
        }
        let group = w.group;
        // The pool's reading from the last tick still counts this worker: a decision made
        // on it before the next tick (an emergency stop after an OOM kill) would act on
        // memory that is already free.
        if self.pool.budget().is_some() {
            self.read_pool();
        }
        // rmdir may have to wait for the kernel to finish tearing the group down: not on
        // the supervisor's thread.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = group.remove() {
                debug!(slot, error = %e, "cannot remove the worker's cgroup");
            }
        });
        let stopping = self.phase.stopping();
        let expected = w.state.why().is_some_and(Why::expected);
        let cause = if oom { "oom_kill" } else { exit.cause() };
        if oom {
            self.totals.oom_kills += 1;
            if let Some(s) = self.slots.get_mut(slot) {
                s.oom_kills += 1;
            }
            let site = crate::policy::OomSite::of(peak, self.limit, self.pool.budget());
            let served = w.ready_at.map_or(Duration::ZERO, |t| t.elapsed());
            if site == crate::policy::OomSite::OwnLimit
                && w.ready_at.is_some()
                && self.pool.oom_unavoidable(served)
            {
                warn!(
                    slot,
                    pid,
                    served_s = served.as_secs_f64(),
                    ready_time_s = self.pool.ready_time().as_secs_f64(),
                    "the worker reached its limit sooner after becoming ready than a replacement takes to get ready: no recycle schedule could have prevented this OOM kill (raise --limit, or slow its growth)"
                );
            }
            error!(
                slot,
                pid,
                generation = w.generation,
                usage,
                peak,
                limit = self.limit,
                budget = self.pool.budget(),
                "worker was OOM-killed by the kernel {} (memory.events/oom_control counted it)",
                site.describe()
            );
        } else if w.state.why() == Some(Why::Hung) {
            warn!(slot, pid, generation = w.generation, exit = %exit, lived_s = lived.as_secs_f64(), "hung worker ended");
        } else if expected || stopping {
            info!(slot, pid, generation = w.generation, exit = %exit, lived_s = lived.as_secs_f64(), "worker stopped");
        } else {
            warn!(slot, pid, generation = w.generation, exit = %exit, lived_s = lived.as_secs_f64(), "worker exited");
        }
        if let Some(m) = &self.metrics
            && !expected
            && !stopping
        {
            m.restarted(slot, cause);
        }
        if stopping {
            return;
        }
        if let Some((old, reason)) = self.slots[slot].stop_first
            && old == pid
        {
            // Stop-first: the old worker is gone, now its replacement starts.
            self.slots[slot].stop_first = None;
            info!(slot, pid, reason = %reason, "stop-first recycle: the old worker is gone; starting its replacement");
            self.start_worker(slot, Some(Replacing { pid, reason }));
        }
        if let Some(reason) = recycling
            && !expected
        {
            // The old worker died on its own (an OOM kill, a crash) before its replacement
            // took over: that is a restart (counted below), not a completed recycle, and
            // its short duration says nothing about how long recycles take.
            if self.slots[slot].recycle_started.take().is_some() {
                self.pool.recycle_abandoned();
            }
            // Its replacement counted the recycle at its start: it did not happen.
            if let Some(r) = self
                .workers
                .iter_mut()
                .find(|o| o.state.replaces().is_some_and(|r| r.pid == pid))
            {
                r.stats.recycles = r.stats.recycles.saturating_sub(1);
                self.slots[slot].recycles = r.stats.recycles;
            }
            warn!(slot, pid, reason = %reason, "recycle cut short: the old worker ended before its replacement was ready");
            self.after_recycle_progress();
        } else if let Some(reason) = recycling {
            // The old half of a recycle is gone: the recycle is complete.
            if let Some(t) = self.slots[slot].recycle_started.take() {
                self.pool.recycle_finished(t.elapsed());
            }
            self.totals.recycles += 1;
            if let Some(m) = &self.metrics {
                m.recycled(slot, &reason.to_string());
            }
            info!(slot, pid, reason = %reason, waited_s = w.stats.recycle_wait.map(|d| d.as_secs_f64()), "recycle complete");
            self.after_recycle_progress();
        }
        if expected {
            return;
        }
        self.totals.restarts += 1;
        if let Some(s) = self.slots.get_mut(slot) {
            s.restarts += 1;
            s.last_exit = Some(match w.state.why() {
                _ if oom => "oom_kill".to_string(),
                Some(Why::NotReady { .. }) => "not ready in time".to_string(),
                Some(Why::OverLimit { .. }) => "over its limit".to_string(),
                _ => exit.to_string(),
            });
        }
        // A replacement that died before it was ready: the old worker keeps serving (unless
        // it is a hung one on its way out: then the slot restarts with backoff, below).
        if let Some(old) = w.state.replaces()
            && old.reason != RecycleReason::Timeout
            && self.workers.iter().any(|o| o.pid == old.pid)
        {
            let delay = self.slots[slot].backoff.failure(&mut self.rng);
            warn!(
                slot,
                old_pid = old.pid,
                retry_in_ms = delay.as_millis() as u64,
                "replacement failed before it was ready; the old worker keeps serving, retrying later"
            );
            self.slots[slot].retry_recycle_at = Some(Instant::now() + delay);
            if self.slots[slot].recycle_started.take().is_some() {
                self.pool.recycle_abandoned();
            }
            return;
        }
        // Someone else still serves this slot (e.g. a replacement already started).
        if self
            .workers
            .iter()
            .any(|o| o.slot == slot && !o.state.is_stopping())
        {
            return;
        }
        if oom {
            // Jittered, and never shorter than the slot's crash backoff: OOM kills of
            // several workers never line up their restarts.
            let backoff = self.slots[slot].backoff.failure_after(lived, &mut self.rng);
            let delay = policy::oom_restart_delay(&mut self.rng).max(backoff);
            self.slots[slot].respawn_at = Some(Instant::now() + delay);
            info!(
                slot,
                delay_ms = delay.as_millis() as u64,
                "restarting the OOM-killed worker after a jittered delay"
            );
        } else {
            let long_clean = lived >= STABLE_AFTER;
            self.schedule_respawn(slot, long_clean);
        }
    }
}
