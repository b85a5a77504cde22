//! The pool: one task owns every worker and reacts to signals, child exits, readiness
//! notifications, memory ticks, trim results and control requests.
//!
//! A worker's life is `Starting → Ready → Draining → gone`. Replacing one (a recycle, a
//! rolling restart) always starts the replacement first: the old worker keeps serving until
//! the new one is ready, then gets the stop signal, `--graceful-timeout`, then SIGKILL. Both
//! share the listening sockets, so connections queue in the kernel while workers change.
//!
//! Decisions (when to trim, when to recycle, who goes first, how long to back off) are the
//! pure functions of [`crate::policy`]; this module carries them out.

mod memory;
mod worker;

use std::os::fd::AsRawFd;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info, warn};

use crate::cgroup;
use crate::config::{Config, Limit, Ready};
use crate::notify::{self, Notifier, RunDir};
use crate::policy::{self, Backoff, RecycleGate, RecycleReason, WorkerPolicy};
use crate::sockets::Listener;
use crate::spawn::{self, Program, WorkerSpec};
use crate::status::{self, ControlMsg, Request, ScaleTo, Snapshot};
use crate::trim;
pub use worker::{Exit, State, Worker};

/// How often memory is read and trim/recycle decisions are made.
const TICK: Duration = Duration::from_secs(1);
/// A worker that lived at least this long and then exited resets its slot's backoff.
const STABLE_AFTER: Duration = Duration::from_secs(10);

/// What the pool needs from start-up: the resolved command, the open sockets, the cgroup
/// manager, the per-worker limit.
pub struct Setup {
    pub config: Config,
    pub program: Program,
    pub listeners: Vec<Listener>,
    pub cgroups: cgroup::Manager,
    pub limit: Option<u64>,
    pub metrics: Option<std::sync::Arc<status::metrics::Metrics>>,
    pub control_rx: Option<mpsc::Receiver<ControlMsg>>,
}

/// Why the pool ended: maps to the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Graceful or fast shutdown as asked.
    Stopped,
    /// A second TERM/INT cut the graceful shutdown short.
    Escalated,
}

enum Event {
    Ready {
        pid: i32,
    },
    NotifyStatus {
        pid: i32,
        text: String,
    },
    Trimmed {
        pid: i32,
        results: Vec<Result<trim::TrimReport, trim::TrimError>>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Starting,
    Running,
    Stopping { kill_at: Instant },
}

struct Slot {
    generation: u64,
    backoff: Backoff,
    /// When to start a worker for this slot again after an exit.
    respawn_at: Option<Instant>,
    /// A recycle of this slot failed (replacement never ready): not before this.
    retry_recycle_at: Option<Instant>,
}

pub struct Supervisor {
    cfg: Config,
    program: Program,
    listeners: Vec<Listener>,
    fd_names: Vec<String>,
    cgroups: cgroup::Manager,
    limit: Option<u64>,
    rundir: RunDir,
    notifier: Notifier,
    settings: policy::Settings,
    gate: RecycleGate,
    target: usize,
    slots: Vec<Slot>,
    workers: Vec<Worker>,
    phase: Phase,
    start: Instant,
    rng: StdRng,
    tx: mpsc::UnboundedSender<Event>,
    rx: mpsc::UnboundedReceiver<Event>,
    control_rx: Option<mpsc::Receiver<ControlMsg>>,
    metrics: Option<std::sync::Arc<status::metrics::Metrics>>,
    trim_unavailable_logged: bool,
    reloading: bool,
    totals: Totals,
}

#[derive(Default)]
struct Totals {
    restarts: u64,
    oom_kills: u64,
    recycles: u64,
}

impl Supervisor {
    pub fn new(setup: Setup) -> Result<Supervisor, String> {
        let cfg = setup.config;
        let rundir = RunDir::create().map_err(|e| {
            format!(
                "cannot create trimrun's run directory: {e} (check $XDG_RUNTIME_DIR or $TMPDIR)"
            )
        })?;
        let settings = policy_settings(&cfg);
        let gate = RecycleGate::new(&settings);
        let (tx, rx) = mpsc::unbounded_channel();
        let fd_names = setup.listeners.iter().map(|l| l.name.clone()).collect();
        let target = cfg.workers;
        let rng = StdRng::from_os_rng();
        let slots = (0..target).map(|_| new_slot()).collect();
        Ok(Supervisor {
            program: setup.program,
            listeners: setup.listeners,
            fd_names,
            cgroups: setup.cgroups,
            limit: setup.limit,
            rundir,
            notifier: Notifier::from_env(),
            settings,
            gate,
            target,
            slots,
            workers: Vec::new(),
            phase: Phase::Starting,
            start: Instant::now(),
            rng,
            tx,
            rx,
            control_rx: setup.control_rx,
            metrics: setup.metrics,
            trim_unavailable_logged: false,
            reloading: false,
            totals: Totals::default(),
            cfg,
        })
    }

    fn now_d(&self) -> Duration {
        Instant::now() - self.start
    }

    /// Run the pool until it is told to stop. Must run on the main thread (see `spawn`).
    pub async fn run(mut self) -> Outcome {
        let sig = |k: SignalKind| signal(k).expect("install signal handler");
        let mut s_term = sig(SignalKind::terminate());
        let mut s_int = sig(SignalKind::interrupt());
        let mut s_quit = sig(SignalKind::quit());
        let mut s_hup = sig(SignalKind::hangup());
        let mut s_ttin = sig(SignalKind::from_raw(libc::SIGTTIN));
        let mut s_ttou = sig(SignalKind::from_raw(libc::SIGTTOU));
        let mut s_usr1 = sig(SignalKind::user_defined1());
        let mut s_chld = sig(SignalKind::child());
        // Orphans of workers (a worker's children whose parent died) are re-parented to us
        // and reaped here, as a container's PID 1 must.
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            debug!(error = %e, "cannot become a child subreaper");
        }
        info!(
            workers = self.target,
            cmd = ?self.cfg.cmd,
            listeners = ?self.listeners.iter().map(|l| l.describe.as_str()).collect::<Vec<_>>(),
            cgroup = %self.cgroups.kind(),
            limit = ?self.limit,
            "starting pool"
        );
        for slot in 0..self.target {
            self.start_worker(slot, None);
        }
        let mut next_tick = Instant::now() + TICK;
        loop {
            let deadline = self.next_deadline().map_or(next_tick, |d| d.min(next_tick));
            let control = async {
                match self.control_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = s_term.recv() => if let Some(o) = self.on_stop_signal("TERM") { return self.finish(o).await },
                _ = s_int.recv() => if let Some(o) = self.on_stop_signal("INT") { return self.finish(o).await },
                _ = s_quit.recv() => { info!("QUIT: fast shutdown"); self.kill_all(); return self.finish(Outcome::Stopped).await }
                _ = s_hup.recv() => self.begin_reload("HUP"),
                _ = s_ttin.recv() => self.scale(self.target + 1, "TTIN"),
                _ = s_ttou.recv() => self.scale(self.target.saturating_sub(1).max(1), "TTOU"),
                _ = s_usr1.recv() => self.forward(Signal::SIGUSR1),
                _ = s_chld.recv() => {},
                Some(ev) = self.rx.recv() => self.on_event(ev),
                Some(msg) = control => if let Some(o) = self.on_control(msg) { return self.finish(o).await },
                _ = tokio::time::sleep_until(deadline) => {},
            }
            self.reap();
            let now = Instant::now();
            if now >= next_tick {
                next_tick = now + TICK;
                self.memory_tick();
            }
            self.on_timers(now);
            if let Phase::Stopping { .. } = self.phase
                && self.workers.is_empty()
            {
                return self.finish(Outcome::Stopped).await;
            }
        }
    }

    // ----- spawning --------------------------------------------------------------------

    /// Start a worker for `slot`. `replaces` is the pid of a worker this one will replace
    /// once ready (a recycle or rolling restart).
    fn start_worker(&mut self, slot: usize, replaces: Option<(i32, RecycleReason)>) -> bool {
        let generation = self.slots[slot].generation;
        self.slots[slot].generation += 1;
        self.slots[slot].respawn_at = None;
        let group = match self.cgroups.create_worker(slot, generation, self.limit) {
            Ok(g) => g,
            Err(e) => {
                error!(slot, error = %e, "cannot create the worker's cgroup");
                self.schedule_respawn(slot, false);
                return false;
            }
        };
        let procs = match group.open_procs() {
            Ok(p) => p,
            Err(e) => {
                error!(slot, error = %e, "cannot open the worker's cgroup.procs");
                let _ = group.remove();
                self.schedule_respawn(slot, false);
                return false;
            }
        };
        let notify_path =
            (self.cfg.ready == Ready::Notify).then(|| self.rundir.notify_path(slot, generation));
        let notify_sock = match &notify_path {
            Some(p) => match notify::bind_worker_socket(p) {
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
        let fds: Vec<i32> = self.listeners.iter().map(|l| l.fd.as_raw_fd()).collect();
        let spec = WorkerSpec {
            slot,
            generation,
            listeners: &fds,
            fd_names: &self.fd_names,
            cgroup_procs: procs.as_ref(),
            notify_socket: notify_path.as_deref(),
        };
        let pid = match spawn::spawn(&self.program, &spec) {
            Ok(pid) => pid,
            Err(e) => {
                error!(slot, error = %e, "cannot start worker");
                let _ = group.remove();
                self.schedule_respawn(slot, false);
                return false;
            }
        };
        drop(procs);
        let now = Instant::now();
        let notify_task = notify_sock.map(|sock| {
            let tx = self.tx.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                while let Ok(n) = sock.recv(&mut buf).await {
                    let msg = &buf[..n];
                    if notify::says_ready(msg) {
                        let _ = tx.send(Event::Ready { pid });
                    }
                    for (k, v) in notify::parse(msg) {
                        if k == "STATUS" {
                            let _ = tx.send(Event::NotifyStatus { pid, text: v });
                        }
                    }
                }
            })
        });
        // The first generation draws thresholds spread over a whole life, so that workers
        // started together do not reach their thresholds together (policy::new_initial).
        let wpolicy = if self.phase == Phase::Starting && generation == 0 {
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
            replaces = replaces.map(|r| r.0),
            "worker started"
        );
        // The slot's history carries over to the replacement.
        let mut inherited = worker::Stats::default();
        if let Some((old, reason)) = replaces
            && let Some(w) = self.worker_mut(old)
        {
            w.recycling = Some(reason);
            inherited.recycles = w.stats.recycles + 1;
            inherited.last_reason = Some(reason.to_string());
            inherited.trims = w.stats.trims;
            inherited.released = w.stats.released;
        }
        self.workers.push(Worker {
            slot,
            generation,
            pid,
            started: now,
            state: State::Starting,
            notify_task,
            notify_path,
            group,
            policy: wpolicy,
            replaces: replaces.map(|r| r.0),
            recycling: None,
            memory_high: None,
            trim_in_flight: false,
            trim_unavailable: false,
            kill_at: None,
            killed: false,
            counts_as_failure: false,
            stats: inherited,
            usage: None,
        });
        true
    }

    fn schedule_respawn(&mut self, slot: usize, clean_exit_after_long_run: bool) {
        if slot >= self.target || matches!(self.phase, Phase::Stopping { .. }) {
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

    fn worker_mut(&mut self, pid: i32) -> Option<&mut Worker> {
        self.workers.iter_mut().find(|w| w.pid == pid)
    }

    // ----- exits ------------------------------------------------------------------------

    /// Collect exited children. Holds the ptrace lock while waiting on any child: a
    /// `waitpid(-1)` in the tracer's process would also consume a tracee's ptrace stops.
    fn reap(&mut self) {
        let Ok(_guard) = trim::ptrace_lock().try_lock() else {
            return; // a trim is attached; the next tick reaps
        };
        loop {
            match nix::sys::wait::waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.on_exit(pid.as_raw(), Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.on_exit(pid.as_raw(), Exit::Signal(sig))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }

    fn on_exit(&mut self, pid: i32, exit: Exit) {
        let Some(idx) = self.workers.iter().position(|w| w.pid == pid) else {
            debug!(pid, ?exit, "reaped an orphaned process");
            return;
        };
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
            .then(|| w.group.usage(Some(pid)).ok().and_then(|u| u.peak))
            .flatten();
        let lived = w.started.elapsed();
        let slot = w.slot;
        // Anything the worker left behind in its group (children in other process groups).
        let _ = w.group.kill_all(Some(pid));
        let group = w.group;
        // rmdir may have to wait for the kernel to finish tearing the group down: not on
        // the supervisor's thread.
        tokio::task::spawn_blocking(move || {
            if let Err(e) = group.remove() {
                debug!(slot, error = %e, "cannot remove the worker's cgroup");
            }
        });
        let stopping = matches!(self.phase, Phase::Stopping { .. });
        let expected = w.state == State::Draining && !w.counts_as_failure;
        let cause = if oom { "oom_kill" } else { exit.cause() };
        if oom {
            self.totals.oom_kills += 1;
            error!(
                slot,
                pid,
                generation = w.generation,
                usage,
                peak,
                limit = self.limit,
                "worker was OOM-killed by the kernel (memory.events/oom_control counted it)"
            );
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
        if let Some(reason) = w.recycling {
            // The old half of a recycle is gone: the recycle is complete.
            self.totals.recycles += 1;
            info!(slot, pid, reason = %reason, waited_s = ?w.stats.recycle_wait.map(|d| d.as_secs_f64()), "recycle complete");
            self.after_recycle_progress();
        }
        if expected {
            return;
        }
        self.totals.restarts += 1;
        // A replacement that died before it was ready: the old worker keeps serving.
        if let Some(old) = w.replaces
            && let Some(o) = self.worker_mut(old)
        {
            o.recycling = None;
            let delay = self.slots[slot].backoff.failure(&mut self.rng);
            warn!(
                slot,
                old_pid = old,
                retry_in_ms = delay.as_millis() as u64,
                "replacement failed before it was ready; the old worker keeps serving, retrying later"
            );
            self.slots[slot].retry_recycle_at = Some(Instant::now() + delay);
            return;
        }
        // Someone else still serves this slot (e.g. a replacement already started).
        if self
            .workers
            .iter()
            .any(|o| o.slot == slot && o.state != State::Draining)
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

    // ----- readiness, timers -------------------------------------------------------------

    fn on_event(&mut self, ev: Event) {
        match ev {
            Event::Ready { pid } => self.mark_ready(pid),
            Event::NotifyStatus { pid, text } => debug!(pid, status = %text, "worker status"),
            Event::Trimmed { pid, results } => self.on_trimmed(pid, results),
        }
    }

    fn mark_ready(&mut self, pid: i32) {
        let Some(w) = self.worker_mut(pid) else {
            return;
        };
        if w.state != State::Starting {
            return;
        }
        w.state = State::Ready;
        let (slot, replaces, took) = (w.slot, w.replaces.take(), w.started.elapsed());
        info!(
            slot,
            pid,
            ready_ms = took.as_millis() as u64,
            "worker ready"
        );
        if let Some(old) = replaces {
            let graceful = self.cfg.graceful_timeout;
            let sig = self.cfg.stop_signal;
            if let Some(o) = self.worker_mut(old) {
                o.begin_drain(sig, graceful);
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

    fn next_deadline(&self) -> Option<Instant> {
        let mut d: Option<Instant> = None;
        let mut consider = |t: Option<Instant>| {
            if let Some(t) = t {
                d = Some(d.map_or(t, |x| x.min(t)));
            }
        };
        for w in &self.workers {
            consider(w.deadline(&self.cfg));
        }
        for s in &self.slots {
            consider(s.respawn_at);
            consider(s.retry_recycle_at);
        }
        if let Phase::Stopping { kill_at } = self.phase {
            consider(Some(kill_at));
        }
        d
    }

    fn on_timers(&mut self, now: Instant) {
        // Readiness by delay, and readiness timeouts.
        let mut ready = vec![];
        let mut too_slow = vec![];
        for w in &self.workers {
            if w.state != State::Starting {
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
        for pid in too_slow {
            let timeout = self.cfg.ready_timeout;
            if let Some(w) = self.worker_mut(pid) {
                warn!(
                    slot = w.slot,
                    pid,
                    timeout_s = timeout.as_secs_f64(),
                    "worker not ready in time; stopping it"
                );
                w.state = State::Draining;
                w.kill_at = Some(now);
                // Not "expected": counted as a failure, so the slot backs off.
                w.counts_as_failure = true;
            }
        }
        // Draining workers past their grace period.
        for w in &mut self.workers {
            if let Some(t) = w.kill_at
                && now >= t
                && !w.killed
            {
                if w.counts_as_failure {
                    debug!(
                        slot = w.slot,
                        pid = w.pid,
                        "killing worker that never became ready"
                    );
                } else {
                    warn!(
                        slot = w.slot,
                        pid = w.pid,
                        "worker did not stop within the graceful timeout; SIGKILL"
                    );
                }
                w.kill();
            }
        }
        // Respawns after backoff.
        for slot in 0..self.slots.len().min(self.target) {
            if let Some(t) = self.slots[slot].respawn_at
                && now >= t
                && !matches!(self.phase, Phase::Stopping { .. })
            {
                self.slots[slot].respawn_at = None;
                if !self
                    .workers
                    .iter()
                    .any(|w| w.slot == slot && w.state != State::Draining)
                {
                    self.start_worker(slot, None);
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
            self.phase = Phase::Stopping {
                kill_at: now + Duration::from_secs(3600),
            };
        }
        if !matches!(self.phase, Phase::Stopping { .. }) {
            self.run_recycles();
        }
    }

    // ----- operator actions ------------------------------------------------------------

    fn begin_reload(&mut self, why: &str) {
        if matches!(self.phase, Phase::Stopping { .. }) {
            return;
        }
        let now_d = self.now_d();
        let mut n = 0;
        for w in &mut self.workers {
            if w.state != State::Draining && w.recycling.is_none() {
                w.policy.request_recycle(RecycleReason::Reload, now_d);
                n += 1;
            }
        }
        info!(workers = n, trigger = why, "rolling restart");
        self.notifier.reloading();
        self.reloading = true;
    }

    fn scale(&mut self, to: usize, why: &str) {
        if matches!(self.phase, Phase::Stopping { .. }) || to == self.target || to == 0 {
            return;
        }
        let to = to.min(crate::config::MAX_WORKERS);
        info!(from = self.target, to, trigger = why, "scaling");
        if to > self.target {
            for slot in self.target..to {
                if self.slots.len() <= slot {
                    self.slots.push(new_slot());
                }
                self.target = slot + 1;
                self.start_worker(slot, None);
            }
        } else {
            self.target = to;
            let (sig, graceful) = (self.cfg.stop_signal, self.cfg.graceful_timeout);
            for w in &mut self.workers {
                if w.slot >= to && w.state != State::Draining {
                    w.begin_drain(sig, graceful);
                }
            }
        }
    }

    fn forward(&mut self, sig: Signal) {
        for w in &self.workers {
            let _ = spawn::signal_group(w.pid, sig);
        }
    }

    fn on_stop_signal(&mut self, name: &str) -> Option<Outcome> {
        if let Phase::Stopping { .. } = self.phase {
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

    fn begin_shutdown(&mut self) {
        self.notifier.send("STOPPING=1");
        self.phase = Phase::Stopping {
            kill_at: Instant::now() + self.cfg.graceful_timeout,
        };
        let (sig, graceful) = (self.cfg.stop_signal, self.cfg.graceful_timeout);
        for w in &mut self.workers {
            w.begin_drain(sig, graceful);
        }
    }

    fn kill_all(&mut self) {
        for w in &mut self.workers {
            w.kill();
        }
    }

    /// Wait (briefly) for every killed worker to be reaped, remove groups, report.
    async fn finish(mut self, outcome: Outcome) -> Outcome {
        if let Phase::Stopping { .. } = self.phase {
        } else {
            self.phase = Phase::Stopping {
                kill_at: Instant::now(),
            };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.workers.is_empty() && Instant::now() < deadline {
            self.reap();
            if self.workers.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        for w in &self.workers {
            warn!(slot = w.slot, pid = w.pid, "worker still present at exit");
        }
        self.cgroups.teardown();
        info!("trimrun stopped");
        outcome
    }

    fn on_control(&mut self, msg: ControlMsg) -> Option<Outcome> {
        let reply: status::Reply =
            match &msg.req {
                Request::Status => serde_json::to_value(self.snapshot()).map_err(|e| e.to_string()),
                Request::Reload => {
                    self.begin_reload("ctl reload");
                    Ok(serde_json::json!({"reloading": true}))
                }
                Request::Scale { to } => {
                    let n = match to {
                        ScaleTo::Up(n) => self.target + n,
                        ScaleTo::Down(n) => self.target.saturating_sub(*n).max(1),
                        ScaleTo::Exactly(n) => *n,
                    };
                    if n == 0 {
                        Err("cannot scale to 0 workers: at least 1".into())
                    } else {
                        self.scale(n, "ctl scale");
                        Ok(serde_json::json!({"workers": self.target}))
                    }
                }
                Request::Recycle { slot } => {
                    let now_d = self.now_d();
                    match self.workers.iter_mut().find(|w| {
                        w.slot == *slot && w.state == State::Ready && w.recycling.is_none()
                    }) {
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
                                && !w.trim_in_flight
                        })
                        .map(|w| {
                            w.trim_in_flight = true;
                            (
                                w.pid,
                                w.group.pids(Some(w.pid)).unwrap_or_else(|_| vec![w.pid]),
                            )
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
                        if !matches!(self.phase, Phase::Stopping { .. }) {
                            info!("ctl stop: graceful shutdown");
                            self.begin_shutdown();
                        }
                        return None;
                    }
                    info!("ctl stop: fast shutdown");
                    self.kill_all();
                    return Some(Outcome::Stopped);
                }
            };
        let _ = msg.reply.send(reply);
        None
    }

    fn status_line(&self) -> String {
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

    pub fn snapshot(&self) -> Snapshot {
        let mut workers: Vec<_> = self
            .workers
            .iter()
            .map(|w| w.snapshot(self.limit))
            .collect();
        workers.sort_by_key(|w| (w.slot, w.generation));
        Snapshot {
            version: status::PROTOCOL_VERSION,
            pid: std::process::id() as i32,
            uptime_secs: self.start.elapsed().as_secs_f64(),
            backend: self.cgroups.kind().to_string(),
            target_workers: self.target,
            workers,
            oom_kills: self.totals.oom_kills,
            restarts: self.totals.restarts,
            recycles: self.totals.recycles,
            recycles_in_progress: self.in_progress(),
            slots: Vec::new(),
            log_lines_dropped: crate::logging::dropped_lines(),
            trims: self.workers.iter().map(|w| w.stats.trims).sum(),
            released_bytes: self.workers.iter().map(|w| w.stats.released).sum(),
            state: match self.phase {
                Phase::Starting => "starting",
                Phase::Running if self.reloading => "reloading",
                Phase::Running => "running",
                Phase::Stopping { .. } => "stopping",
            }
            .into(),
        }
    }
}

/// The pure policy's settings from the validated config.
pub fn policy_settings(cfg: &Config) -> policy::Settings {
    policy::Settings {
        trim: cfg.trim,
        trim_at: cfg.trim_at,
        trim_interval: cfg.trim_interval,
        recycle_at: cfg.recycle_at,
        recycle_jitter: cfg.recycle_jitter,
        max_lifetime: cfg.max_lifetime,
        lifetime_jitter: cfg.lifetime_jitter,
        max_recycling: cfg.max_recycling,
        recycle_spacing: cfg.recycle_spacing,
        ready_time: match cfg.ready {
            Ready::Delay(d) => d,
            Ready::Notify => Duration::from_secs(2),
        },
        ..policy::Settings::default()
    }
}

fn new_slot() -> Slot {
    Slot {
        generation: 0,
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(30)),
        respawn_at: None,
        retry_recycle_at: None,
    }
}

/// Resolve `--limit` against the cgroup backend (`auto` divides trimrun's allowance).
pub fn resolve_limit(
    limit: Limit,
    workers: usize,
    cgroups: &cgroup::Manager,
) -> Result<Option<u64>, String> {
    match limit {
        Limit::None => Ok(None),
        Limit::Bytes(b) => {
            if b < cgroup::MIN_WORKER_LIMIT {
                return Err(format!(
                    "--limit {} is too small to start a worker: at least {} (a Python interpreter alone needs ~10 MiB)",
                    crate::size::human_bytes(b),
                    crate::size::human_bytes(cgroup::MIN_WORKER_LIMIT)
                ));
            }
            Ok(Some(b))
        }
        Limit::Auto => {
            let available = cgroups.available_memory().map_err(|e| e.to_string())?;
            let reserve = cgroup::default_reserve(available);
            let per = cgroup::auto_limit(available, workers, reserve).map_err(|e| e.to_string())?;
            info!(
                available = available,
                workers,
                per_worker = per,
                "--limit auto: {} per worker ({} available, {} kept for trimrun)",
                crate::size::human_bytes(per),
                crate::size::human_bytes(available),
                crate::size::human_bytes(reserve)
            );
            Ok(Some(per))
        }
    }
}
