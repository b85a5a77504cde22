//! The loop: one `select!` over signals, child exits, worker events, control requests and
//! the next deadline; then reaping, the memory tick and the timers. And the end of the pool.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{info, warn};

use super::{Outcome, Phase, Supervisor, TICK};

/// The signals trimrun acts on, as messages to the pool task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolSignal {
    /// TERM: graceful shutdown (a second one: kill now).
    Term,
    /// INT: as TERM.
    Int,
    /// QUIT: fast shutdown.
    Quit,
    /// HUP: rolling restart.
    Hup,
    /// TTIN: one worker more.
    Ttin,
    /// TTOU: one worker fewer.
    Ttou,
    /// USR1: forwarded to every worker.
    Usr1,
}

/// Install the handlers (now, before any worker starts) and forward each signal to the
/// returned channel. Must be called inside the tokio runtime.
pub fn forward_signals() -> std::io::Result<mpsc::UnboundedReceiver<PoolSignal>> {
    let kinds = [
        (SignalKind::terminate(), PoolSignal::Term),
        (SignalKind::interrupt(), PoolSignal::Int),
        (SignalKind::quit(), PoolSignal::Quit),
        (SignalKind::hangup(), PoolSignal::Hup),
        (SignalKind::from_raw(libc::SIGTTIN), PoolSignal::Ttin),
        (SignalKind::from_raw(libc::SIGTTOU), PoolSignal::Ttou),
        (SignalKind::user_defined1(), PoolSignal::Usr1),
    ];
    let (tx, rx) = mpsc::unbounded_channel();
    for (kind, what) in kinds {
        let mut s = signal(kind)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while s.recv().await.is_some() {
                if tx.send(what).is_err() {
                    break;
                }
            }
        });
    }
    Ok(rx)
}

impl Supervisor {
    /// Run the pool until it is told to stop. With the fork+exec launcher it must run on
    /// the main thread (see `spawn`).
    pub async fn run(mut self) -> Outcome {
        info!(
            workers = self.target,
            cmd = ?crate::logging::AsJson(&self.cfg.cmd),
            listeners = ?crate::logging::AsJson(&self.listeners),
            cgroup = %self.groups.kind(),
            limit = self.limit,
            "starting pool"
        );
        if let Some(hint) = crate::startup::readiness_hint(&self.cfg) {
            warn!("{hint}");
        }
        if let Some(hint) = crate::startup::preload_hint(&self.cfg) {
            warn!("{hint}");
        }
        if self.cfg.ready_auto {
            match self.cfg.ready {
                crate::config::Ready::Notify => info!(
                    "--ready auto: notify (the worker counts as ready when it sends READY=1: {} does)",
                    crate::config::speaks_notify(&self.cfg.cmd)
                        .unwrap_or("the --preload zygote's worker")
                ),
                crate::config::Ready::Delay(d) => info!(
                    delay_ms = d.as_millis() as u64,
                    "--ready auto: a delay (the command is not one known to send READY=1; pass --ready notify if it does)"
                ),
            }
        }
        // Every slot is due now; the timers start them a batch at a time (see START_BATCH).
        let now = Instant::now();
        for slot in 0..self.target {
            self.slots[slot].respawn_at = Some(now);
        }
        self.on_timers(now);
        // Under systemd's WatchdogSec=: keep-alives from this loop, so a stuck pool is
        // restarted by systemd as a stuck worker is by --timeout.
        let keepalive_every = self.notifier.keepalive_every();
        if let Some(every) = keepalive_every {
            info!(
                every_ms = every.as_millis() as u64,
                "sending WATCHDOG=1 to the service manager (WatchdogSec=)"
            );
        }
        let mut next_keepalive = Instant::now();
        let mut next_tick = Instant::now() + TICK;
        loop {
            let mut deadline = self.next_deadline().map_or(next_tick, |d| d.min(next_tick));
            if keepalive_every.is_some() {
                deadline = deadline.min(next_keepalive);
            }
            let control = async {
                match self.control_rx.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                Some(sig) = self.signals.recv() => if let Some(o) = self.on_signal(sig) { return self.finish(o).await },
                _ = self.launcher.exited() => {},
                Some(ev) = self.rx.recv() => self.on_event(ev),
                Some(msg) = control => if let Some(o) = self.on_control(msg) { return self.finish(o).await },
                _ = tokio::time::sleep_until(deadline) => {},
            }
            self.reap();
            let now = Instant::now();
            if let Some(every) = keepalive_every
                && now >= next_keepalive
            {
                self.notifier.send("WATCHDOG=1");
                next_keepalive = now + every;
            }
            if now >= next_tick {
                next_tick = now + self.tick;
                self.memory_tick();
            }
            self.on_timers(now);
            // The policy may have asked for a shorter tick (a worker near its limit).
            next_tick = next_tick.min(now + self.tick);
            if self.fatal.is_none()
                && !self.phase.stopping()
                && let Some(why) = self.launcher.fatal()
            {
                // The reason is said once, by trimrun's exit (code 2), whatever ends the stop.
                warn!("the pool cannot go on: stopping it (trimrun exits 2 and says why)");
                self.fatal = Some(why);
                self.begin_shutdown();
            }
            if self.phase.stopping() && self.workers.is_empty() {
                return self.finish(Outcome::Stopped).await;
            }
            if self.next_deadline().is_some_and(|d| d <= now) {
                // More is due at once (a batch of starts): let the control server and the
                // signal task run first, so their messages are in the queues we select on.
                tokio::task::yield_now().await;
            }
        }
    }

    fn on_signal(&mut self, sig: PoolSignal) -> Option<Outcome> {
        match sig {
            PoolSignal::Term => self.on_stop_signal("TERM"),
            PoolSignal::Int => self.on_stop_signal("INT"),
            PoolSignal::Quit => {
                info!("QUIT: fast shutdown");
                self.kill_all();
                Some(Outcome::Stopped)
            }
            PoolSignal::Hup => {
                self.begin_reload("HUP");
                None
            }
            PoolSignal::Ttin => {
                self.scale(self.target + 1, "TTIN");
                None
            }
            PoolSignal::Ttou => {
                self.scale(self.target.saturating_sub(1).max(1), "TTOU");
                None
            }
            PoolSignal::Usr1 => {
                self.forward(Signal::SIGUSR1);
                None
            }
        }
    }

    /// SIGKILL processes re-parented to trimrun that belong to no live worker.
    pub(super) fn kill_orphans(&self) {
        let keep: Vec<i32> = self
            .workers
            .iter()
            .flat_map(|w| std::iter::once(w.pid).chain(w.group.left_behind()))
            .collect();
        for pid in self.launcher.kill_orphans(&keep) {
            info!(pid, "killed a process a worker left behind");
        }
    }

    /// Collect exited children (the launcher's).
    fn reap(&mut self) {
        for (pid, exit) in self.launcher.reap() {
            self.on_exit(pid, exit);
        }
    }

    /// Wait (briefly) for every killed worker to be reaped, remove groups, report.
    async fn finish(mut self, outcome: Outcome) -> Outcome {
        // A pool that could not go on says why, even if a signal ended its stop.
        let outcome = self.fatal.take().map_or(outcome, Outcome::Failed);
        if !self.phase.stopping() {
            self.phase = Phase::Killing;
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
        // What workers left behind outside any cgroup (re-parented daemons) goes with us.
        self.kill_orphans();
        // Removing the groups may wait on the kernel (rmdir of a group whose last process is
        // still exiting): on a blocking thread, not this one.
        let groups = self.groups;
        if let Err(e) = tokio::task::spawn_blocking(move || groups.teardown()).await {
            warn!(error = %e, "cgroup teardown did not finish");
        }
        info!("trimrun stopped");
        outcome
    }
}
