//! The `--preload` launcher: workers are forks of a zygote ([`crate::zygote`]) instead of
//! fresh fork+execs. Signals, exits and reaping are fork+exec's ([`ForkExec`]): a forked
//! worker becomes trimrun's child (trimrun is a child subreaper) and is reaped the same way.
//!
//! - The zygote is started before the first worker. Nothing here waits for its `ready`:
//!   while it imports the app, [`Launcher::not_before`] says so and the supervisor starts
//!   no worker and decides no recycle, and keeps answering signals and `status`; a
//!   zygote not ready within `--ready-timeout` is killed and another started, unless its
//!   command is not `trimrun_worker` and no zygote of the pool was ever ready: then
//!   [`Launcher::fatal`] stops the pool ([`never_a_zygote`]).
//! - HUP ([`Launcher::reload`]): the zygote is stopped and a new one started (new code);
//!   the rolling restart then forks every replacement from it, once it is ready.
//! - A zygote that dies is reaped here, not reported as a worker; one that had been ready is
//!   started again at once, one that never got ready (an app that fails to import) after a
//!   backoff (0.1 s doubling to 30 s). Serving workers are not touched either way.

use std::future::Future;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tracing::{info, warn};

use super::{ForkExec, Launch, Launcher, ZygoteInfo};
use crate::spawn::SpawnError;
use crate::supervisor::Exit;
use crate::zygote::{Zygote, ZygoteError};

/// How long the zygote may take to answer one fork request.
const FORK_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon the supervisor looks again while the zygote imports the app.
const READY_POLL: Duration = Duration::from_millis(50);
/// A zygote that failed before it was ready is started again after this, doubling up to
/// [`ZYGOTE_BACKOFF_MAX`]: an app that cannot be imported is not restarted in a tight loop.
const ZYGOTE_BACKOFF_MIN: Duration = Duration::from_millis(100);
const ZYGOTE_BACKOFF_MAX: Duration = Duration::from_secs(30);

pub struct Zygotes {
    inner: ForkExec,
    current: Option<Zygote>,
    /// Zygotes asked to stop (HUP) whose exit is still to be reaped.
    retired: Vec<i32>,
    generation: u64,
    ready_timeout: Duration,
    forks: u64,
    /// After a zygote failed before it was ready: no new one before then.
    next_start: Option<Instant>,
    backoff: Duration,
    /// The command is one known to speak the zygote protocol (`trimrun_worker`).
    known_zygote: bool,
    /// Why the pool cannot go on (see [`Launcher::fatal`]).
    fatal: Option<String>,
    /// Some zygote of this pool said ready once: the command speaks the protocol.
    ever_ready: bool,
}

/// Whether a zygote that did not say ready within `--ready-timeout` means the pool cannot go
/// on: only for a command not known to speak the protocol whose zygotes never did (a plain
/// server that serves the sockets itself). A known one may just import slowly, and one that
/// was ready before (a HUP's new code importing slowly) speaks it: both are retried.
pub fn never_a_zygote(known_zygote: bool, ever_ready: bool) -> bool {
    !known_zygote && !ever_ready
}

fn spawn_error(slot: usize, op: &'static str, e: ZygoteError) -> SpawnError {
    match e {
        ZygoteError::Start(e) => e,
        e => SpawnError::Sys {
            slot,
            op,
            source: std::io::Error::other(e.to_string()),
        },
    }
}

impl Zygotes {
    /// `inner` provides the command, the sockets and the reaping. `known_zygote`: the
    /// command is known to speak the protocol (`python -m trimrun_worker`); one that is not
    /// and never says ready is taken for a command that does not speak it at all.
    pub fn new(inner: ForkExec, ready_timeout: Duration, known_zygote: bool) -> Zygotes {
        Zygotes {
            known_zygote,
            fatal: None,
            ever_ready: false,
            inner,
            current: None,
            retired: vec![],
            generation: 0,
            ready_timeout,
            forks: 0,
            next_start: None,
            backoff: ZYGOTE_BACKOFF_MIN,
        }
    }

    /// How long until the next zygote may start (after a failure).
    fn retry_in(&self) -> Duration {
        self.next_start.map_or(Duration::ZERO, |t| {
            t.saturating_duration_since(Instant::now())
        })
    }

    /// A zygote failed before it was ready: the next one waits.
    fn failed(&mut self) {
        self.next_start = Some(Instant::now() + self.backoff);
        self.backoff = (self.backoff * 2).min(ZYGOTE_BACKOFF_MAX);
    }

    fn start(&mut self) -> Result<(), ZygoteError> {
        self.generation += 1;
        let fds: Vec<i32> = self
            .inner
            .listeners()
            .iter()
            .map(|l| l.fd.as_raw_fd())
            .collect();
        let z = Zygote::start(
            self.inner.program(),
            &fds,
            self.inner.fd_names(),
            self.generation,
        )?;
        info!(pid = z.pid, generation = self.generation, "zygote started");
        self.current = Some(z);
        Ok(())
    }

    /// Forget the current zygote and make sure it is gone.
    fn discard(&mut self) {
        if let Some(z) = self.current.take() {
            let _ = crate::spawn::signal_group(z.pid, Signal::SIGKILL);
            self.retired.push(z.pid);
        }
    }

    /// Where the zygote stands, without waiting: Ok(None) when it takes fork requests,
    /// Ok(Some(d)) while it imports the app (or, after a failure, until the next one may
    /// start), Err when it failed (it is discarded and the next one backs off). Starts a
    /// zygote when there is none.
    fn poll(&mut self) -> Result<Option<Duration>, ZygoteError> {
        if self.current.is_none() {
            let now = Instant::now();
            if let Some(t) = self.next_start
                && now < t
            {
                return Ok(Some(t - now));
            }
            self.next_start = None;
            if let Err(e) = self.start() {
                self.failed();
                return Err(e);
            }
        }
        let timeout = self.ready_timeout;
        let z = self.current.as_mut().expect("started above");
        if z.is_ready() {
            return Ok(None);
        }
        match z.wait_ready(Duration::ZERO) {
            Ok(true) => {
                info!(
                    pid = z.pid,
                    generation = z.generation,
                    ready_ms = z.started.elapsed().as_millis() as u64,
                    "zygote ready"
                );
                self.backoff = ZYGOTE_BACKOFF_MIN;
                self.ever_ready = true;
                Ok(None)
            }
            Ok(false) if z.started.elapsed() < timeout => Ok(Some(READY_POLL)),
            Ok(false) => {
                let pid = z.pid;
                self.discard();
                self.failed();
                // A command not known to speak the protocol that stayed alive and silent
                // for a whole --ready-timeout: most likely a server that serves the
                // sockets itself, outside every worker's cgroup. Another would do the same.
                let never = never_a_zygote(self.known_zygote, self.ever_ready);
                if never {
                    self.fatal = Some(format!(
                        "--preload: the zygote (pid {pid}) did not say ready within \
                         --ready-timeout ({timeout:?}) and its command is not python -m \
                         trimrun_worker: it does not speak the zygote protocol of \
                         docs/preload.md, so no worker could start, and it would serve the \
                         sockets itself, outside every worker's cgroup. Run the app with \
                         `python -m trimrun_worker APP` under --preload, or drop --preload \
                         (if it is a wrapper that does exec trimrun_worker and only imports \
                         slowly, raise --ready-timeout)"
                    ));
                }
                Err(ZygoteError::Timeout {
                    pid,
                    what: if never {
                        "say ready (a command that does not speak the zygote protocol of docs/preload.md, such as a server started on its own, never does, and serves meanwhile outside the workers' cgroups: --preload needs `python -m trimrun_worker APP`)"
                    } else {
                        "say ready (its app imports slowly, or hangs in its import: raise --ready-timeout if it is only slow)"
                    },
                    after: timeout,
                })
            }
            Err(e) => {
                self.discard();
                self.failed();
                Err(e)
            }
        }
    }

    /// The current zygote, if it is ready; never waits for it (the supervisor asks
    /// [`Launcher::not_before`] first).
    fn ready(&mut self, slot: usize) -> Result<&Zygote, SpawnError> {
        match self.poll() {
            Ok(None) => Ok(self.current.as_ref().expect("ready")),
            Ok(Some(_)) => Err(SpawnError::Sys {
                slot,
                op: "fork from the zygote",
                source: std::io::Error::other(if self.current.is_some() {
                    "the zygote is not ready yet (importing the app)".to_string()
                } else {
                    format!(
                        "the last zygote failed before it was ready (the error logged then, or its output, says why); the next starts in {} ms",
                        self.retry_in().as_millis()
                    )
                }),
            }),
            Err(e) => Err(spawn_error(slot, "wait for the zygote", e)),
        }
    }
}

impl Launcher for Zygotes {
    fn launch(&mut self, req: &Launch<'_>) -> Result<i32, SpawnError> {
        let procs = req.group.open_procs().map_err(|e| SpawnError::Sys {
            slot: req.slot,
            op: "open the worker's cgroup.procs",
            source: std::io::Error::other(e.to_string()),
        })?;
        let (slot, generation) = (req.slot, req.generation);
        let id = slot.to_string();
        let gen_s = generation.to_string();
        let n = self.inner.listeners().len().to_string();
        let names = self.inner.fd_names().join(":");
        let notify = req.notify_socket.map(|p| p.to_string_lossy().into_owned());
        let mut env: Vec<(&str, &str)> = vec![
            ("TRIMRUN_WORKER_ID", &id),
            ("TRIMRUN_WORKER_GENERATION", &gen_s),
            ("LISTEN_FDS", &n),
            ("LISTEN_FDNAMES", &names),
        ];
        if let Some(p) = &notify {
            env.push(("NOTIFY_SOCKET", p));
        }
        let watchdog = req.watchdog.map(|d| d.as_micros().max(1).to_string());
        if let Some(usec) = &watchdog {
            env.push(("WATCHDOG_USEC", usec));
        }
        let credentials = self.inner.credentials().cloned();
        let z = self.ready(slot)?;
        let zpid = z.pid;
        let started = Instant::now();
        match z.fork(
            slot,
            generation,
            &env,
            credentials.as_ref(),
            procs.as_ref(),
            FORK_TIMEOUT,
        ) {
            Ok(pid) => {
                // The worker was forked after its parent dropped to the credentials: its ids
                // are final, and it cannot have been reaped yet (trimrun reaps it).
                if let Some(want) = &credentials {
                    let status =
                        std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                    if let Err(detail) = crate::zygote::check_ids(&status, want) {
                        self.inner.signal(pid, Signal::SIGKILL);
                        return Err(spawn_error(
                            slot,
                            "fork",
                            ZygoteError::Credentials {
                                pid: zpid,
                                slot,
                                worker: pid,
                                detail,
                            },
                        ));
                    }
                }
                self.forks += 1;
                tracing::debug!(
                    slot,
                    pid,
                    fork_us = started.elapsed().as_micros() as u64,
                    "forked from the zygote"
                );
                Ok(pid)
            }
            Err(e @ ZygoteError::Refused { .. }) => Err(spawn_error(slot, "fork", e)),
            Err(e) => {
                // The channel is broken or the zygote hangs: the next launch starts a new one.
                warn!(error = %e, "zygote unusable: starting a new one at the next launch");
                self.discard();
                Err(spawn_error(slot, "fork from the zygote", e))
            }
        }
    }

    fn signal(&self, pid: i32, sig: Signal) {
        self.inner.signal(pid, sig)
    }

    /// Set when a command not known to speak the protocol never said ready.
    fn fatal(&self) -> Option<String> {
        self.fatal.clone()
    }

    /// While the zygote imports the app (at start, after a HUP or a restart), no worker
    /// can be forked: say so instead of waiting, so the pool keeps answering signals,
    /// `status` and readiness meanwhile. Not while the next zygote backs off after one
    /// failed (an app that does not import): then launches fail as they did, and the
    /// serving workers' trims and recycles go on.
    fn not_before(&mut self) -> Option<Duration> {
        match self.poll() {
            Ok(Some(wait)) if self.current.is_some() => Some(wait),
            Ok(_) => None,
            Err(e) => {
                warn!(
                    error = %e,
                    retry_in_ms = self.retry_in().as_millis() as u64,
                    "zygote failed before it was ready; starting another later"
                );
                None
            }
        }
    }

    /// Forked workers are trimrun's children, so what they leave behind is re-parented to
    /// trimrun as with fork+exec; the zygotes (current and retired) are its children too,
    /// and are not orphans.
    fn kill_orphans(&self, keep: &[i32]) -> Vec<i32> {
        let mut keep = keep.to_vec();
        keep.extend(self.current.as_ref().map(|z| z.pid));
        keep.extend(&self.retired);
        self.inner.kill_orphans(&keep)
    }

    fn exited(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.inner.exited()
    }

    fn reap(&mut self) -> Vec<(i32, Exit)> {
        let mut out = self.inner.reap();
        let current = self.current.as_ref().map(|z| (z.pid, z.is_ready()));
        let retired = &mut self.retired;
        let mut zygote_died = None;
        out.retain(|(pid, exit)| {
            if let Some(i) = retired.iter().position(|p| p == pid) {
                retired.swap_remove(i);
                return false;
            }
            if let Some((zpid, was_ready)) = current
                && zpid == *pid
            {
                if was_ready {
                    warn!(pid, exit = %exit, "zygote exited; the workers keep serving");
                } else {
                    warn!(
                        pid,
                        exit = %exit,
                        "zygote exited before it was ready (its output says why: usually the app failed to import); another starts after a backoff"
                    );
                }
                zygote_died = Some(was_ready);
                return false;
            }
            true
        });
        if let Some(was_ready) = zygote_died {
            self.current = None;
            if !was_ready {
                self.failed();
            } else if let Err(e) = self.start() {
                warn!(error = %e, "cannot restart the zygote; the next launch tries again");
                self.failed();
            }
        }
        // Called after every event of the pool: notice a restarted zygote's `ready` even
        // while no worker is launched.
        if self.current.as_ref().is_some_and(|z| !z.is_ready())
            && let Err(e) = self.poll()
        {
            warn!(error = %e, "zygote failed before it was ready");
        }
        out
    }

    fn reload(&mut self) {
        if let Some(z) = self.current.take() {
            info!(
                pid = z.pid,
                "stopping the zygote: a new one imports the new code"
            );
            z.stop();
            self.retired.push(z.pid);
        }
        if let Err(e) = self.start() {
            warn!(error = %e, "cannot start the new zygote; the next launch tries again");
        }
    }

    fn zygote(&self) -> Option<ZygoteInfo> {
        self.current.as_ref().map(|z| ZygoteInfo {
            pid: z.pid,
            generation: z.generation,
            state: if z.is_ready() { "ready" } else { "starting" }.into(),
            age_secs: z.started.elapsed().as_secs_f64(),
            forks: self.forks,
        })
    }
}

impl Drop for Zygotes {
    fn drop(&mut self) {
        if let Some(z) = &self.current {
            z.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::never_a_zygote;

    #[test]
    fn only_an_unknown_command_that_was_never_ready_stops_the_pool() {
        assert!(never_a_zygote(false, false));
        // A wrapper that was ready once speaks the protocol: a slow HUP import is retried.
        assert!(!never_a_zygote(false, true));
        // trimrun_worker may just import slowly.
        assert!(!never_a_zygote(true, false));
        assert!(!never_a_zygote(true, true));
    }
}
