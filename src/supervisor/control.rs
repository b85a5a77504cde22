//! Operator actions (signals and `trimrun ctl`) and the status snapshot.

use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::lifecycle::drain;
use super::{Outcome, Phase, Slot, State, Supervisor, Why};
use crate::policy::RecycleReason;
use crate::status::{self, ControlMsg, Request, ScaleTo, Snapshot};

/// The worker count `ctl scale` asks for, bounded like `-n` (1 to [`MAX_WORKERS`]) and
/// computed without overflow. `-N` below one worker stops at one.
///
/// [`MAX_WORKERS`]: crate::config::MAX_WORKERS
pub fn scale_target(current: usize, to: &ScaleTo) -> Result<usize, String> {
    let max = crate::config::MAX_WORKERS;
    let n = match *to {
        ScaleTo::Up(n) => current.checked_add(n),
        ScaleTo::Down(n) => Some(current.saturating_sub(n).max(1)),
        ScaleTo::Exactly(n) => Some(n),
    };
    match n {
        Some(0) => Err("cannot scale to 0 workers: at least 1".into()),
        Some(n) if n <= max => Ok(n),
        _ => Err(format!(
            "cannot scale to {to} from {current} workers: at most {max} (as with -n)"
        )),
    }
}

impl Supervisor {
    pub(super) fn begin_reload(&mut self, why: &str) {
        if self.phase.stopping() {
            return;
        }
        let now_d = self.now_d();
        let pids: Vec<i32> = self
            .workers
            .iter()
            .filter(|w| !w.state.is_stopping() && self.recycling(w).is_none())
            .map(|w| w.pid)
            .collect();
        for w in &mut self.workers {
            if pids.contains(&w.pid) {
                w.policy.request_recycle(RecycleReason::Reload, now_d);
            }
        }
        info!(workers = pids.len(), trigger = why, "rolling restart");
        self.launcher.reload();
        self.notifier.reloading();
        self.reloading = true;
    }

    pub(super) fn scale(&mut self, to: usize, why: &str) {
        if self.phase.stopping() || to == self.target || to == 0 {
            return;
        }
        let to = to.min(crate::config::MAX_WORKERS);
        info!(from = self.target, to, trigger = why, "scaling");
        if to > self.target {
            // The new slots are due now; the timers start them a batch at a time, so
            // signals and `ctl` are still answered while thousands start.
            let now = tokio::time::Instant::now();
            for slot in self.target..to {
                if self.slots.len() <= slot {
                    self.slots.push(Slot::new());
                }
                self.slots[slot].respawn_at = Some(now);
            }
            self.target = to;
        } else {
            self.target = to;
            let until = tokio::time::Instant::now() + self.cfg.graceful_timeout;
            let sig = self.cfg.stop_signal;
            // A worker being replaced keeps its reason: its exit still completes a recycle.
            let whys: Vec<(i32, Why)> = self
                .workers
                .iter()
                .filter(|w| w.slot >= to)
                .map(|w| (w.pid, self.recycling(w).map_or(Why::Stop, Why::Replaced)))
                .collect();
            for w in &mut self.workers {
                if let Some(&(_, why)) = whys.iter().find(|(p, _)| *p == w.pid) {
                    drain(w, self.launcher.as_ref(), sig, until, why);
                }
            }
        }
    }

    pub(super) fn forward(&mut self, sig: Signal) {
        for w in &self.workers {
            self.launcher.signal(w.pid, sig);
        }
    }

    pub(super) fn on_stop_signal(&mut self, name: &str) -> Option<Outcome> {
        if self.phase.stopping() {
            warn!(
                signal = name,
                "second stop signal: killing every worker now"
            );
            self.kill_all();
            return Some(Outcome::Escalated);
        }
        info!(
            signal = name,
            graceful_timeout_s = self.cfg.graceful_timeout.as_secs_f64(),
            "graceful shutdown"
        );
        self.begin_shutdown();
        None
    }

    pub(super) fn on_control(&mut self, msg: ControlMsg) -> Option<Outcome> {
        let reply: status::Reply = match &msg.req {
            Request::Status => serde_json::to_value(self.snapshot()).map_err(|e| e.to_string()),
            Request::Reload => {
                self.begin_reload("ctl reload");
                Ok(serde_json::json!({"reloading": true}))
            }
            Request::Scale { to } => match scale_target(self.target, to) {
                Ok(n) => {
                    self.scale(n, "ctl scale");
                    Ok(serde_json::json!({"workers": self.target}))
                }
                Err(e) => Err(e),
            },
            Request::Recycle { slot } => {
                let now_d = self.now_d();
                let pid = self
                    .workers
                    .iter()
                    .find(|w| {
                        w.slot == *slot && w.state == State::Ready && self.recycling(w).is_none()
                    })
                    .map(|w| w.pid);
                match pid.and_then(|p| self.worker_mut(p)) {
                    Some(w) => {
                        w.policy.request_recycle(RecycleReason::Manual, now_d);
                        Ok(serde_json::json!({"slot": slot, "pid": w.pid}))
                    }
                    None => Err(format!("no ready worker in slot {slot}")),
                }
            }
            Request::Trim { slot } => {
                let mut started = vec![];
                let sel: Vec<(i32, Vec<i32>)> = self
                    .workers
                    .iter_mut()
                    .filter(|w| {
                        slot.is_none_or(|s| w.slot == s)
                            && w.state == State::Ready
                            && w.trim != super::Trim::InFlight
                    })
                    .map(|w| {
                        w.trim = super::Trim::InFlight;
                        (w.pid, w.group.pids(w.pid).unwrap_or_else(|_| vec![w.pid]))
                    })
                    .collect();
                for (pid, pids) in sel {
                    started.push(pid);
                    self.trim_worker(pid, pids);
                }
                if started.is_empty() {
                    Err("no ready worker to trim there".into())
                } else {
                    Ok(serde_json::json!({"trimming": started}))
                }
            }
            Request::Stop { now } => {
                let _ = msg.reply.send(Ok(serde_json::json!({"stopping": true})));
                if !*now {
                    if !self.phase.stopping() {
                        info!("ctl stop: graceful shutdown");
                        self.begin_shutdown();
                    }
                    return None;
                }
                info!("ctl stop --now: fast shutdown");
                self.kill_all();
                return Some(Outcome::Stopped);
            }
        };
        let _ = msg.reply.send(reply);
        None
    }

    pub(super) fn status_line(&self) -> String {
        let ready = self
            .workers
            .iter()
            .filter(|w| w.state == State::Ready)
            .count();
        format!(
            "{ready}/{} workers ready, {} recycles, {} OOM kills",
            self.target, self.totals.recycles, self.totals.oom_kills
        )
    }

    /// Every slot of the pool (0..target): its history and whether it is backing off.
    fn slot_snapshots(&self) -> Vec<status::SlotSnapshot> {
        let now = tokio::time::Instant::now();
        self.slots
            .iter()
            .enumerate()
            .take(self.target)
            .map(|(i, s)| status::SlotSnapshot {
                slot: i,
                restarts: s.restarts,
                oom_kills: s.oom_kills,
                failures: s.backoff.failures(),
                last_exit: s.last_exit.clone(),
                retry_in_secs: s
                    .respawn_at
                    .or(s.retry_recycle_at)
                    .filter(|t| *t > now)
                    .map(|t| (t - now).as_secs_f64()),
            })
            .collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut workers: Vec<_> = self
            .workers
            .iter()
            .map(|w| {
                let mut s = w.snapshot(self.limit, self.recycling(w));
                s.timeouts = self.slots.get(w.slot).map_or(0, |s| s.timeouts);
                s
            })
            .collect();
        workers.sort_by_key(|w| (w.slot, w.generation));
        Snapshot {
            version: status::PROTOCOL_VERSION,
            pid: std::process::id() as i32,
            uptime_secs: self.start.elapsed().as_secs_f64(),
            backend: self.groups.kind().to_string(),
            target_workers: self.target,
            workers,
            oom_kills: self.totals.oom_kills,
            restarts: self.totals.restarts,
            recycles: self.totals.recycles,
            recycles_in_progress: self.in_progress(),
            timeouts: self.totals.timeouts,
            trims: self.totals.trims,
            released_bytes: self.totals.released,
            slots: self.slot_snapshots(),
            log_lines_dropped: crate::logging::dropped_lines(),
            ready_time_secs: self.pool.ready_time().as_secs_f64(),
            zygote: self.launcher.zygote(),
            pool: self.pool.budget().map(|budget| status::PoolSnapshot {
                budget,
                working_set: self.pool_usage,
                peak: self.pool_reading.as_ref().and_then(|r| r.peak),
                cgroup: self
                    .pool_reading
                    .as_ref()
                    .map(|r| r.path.display().to_string()),
            }),
            state: match self.phase {
                Phase::Starting => "starting",
                Phase::Running if self.reloading => "reloading",
                Phase::Running => "running",
                Phase::Stopping { .. } | Phase::Killing => "stopping",
            }
            .into(),
        }
    }
}
