//! The real kernel edge: cgroupfs, fork+exec with `waitpid`, ptrace.

use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;

use nix::sys::signal::Signal;
use nix::sys::wait::{WaitPidFlag, WaitStatus};
use tokio::signal::unix::{SignalKind, signal};
use tracing::debug;

use super::{Group, Groups, Injector, Launch, Launcher};
use crate::cgroup::{self, CgroupError, Kind, Usage};
use crate::sockets::Listener;
use crate::spawn::{self, Program, SpawnError, WorkerSpec};
use crate::supervisor::Exit;
use crate::trim::{self, TrimError, TrimReport};

impl Groups for cgroup::Manager {
    fn kind(&self) -> Kind {
        cgroup::Manager::kind(self)
    }

    fn create(
        &self,
        slot: usize,
        generation: u64,
        limit: Option<u64>,
    ) -> Result<Box<dyn Group>, CgroupError> {
        Ok(Box::new(
            self.create_checked_worker(slot, generation, limit)?,
        ))
    }

    fn teardown(&self) {
        cgroup::Manager::teardown(self)
    }

    fn set_pool_limit(&self, budget: u64) -> Result<(), CgroupError> {
        cgroup::Manager::set_pool_limit(self, budget)
    }

    fn pool_reading(&self) -> Option<super::PoolReading> {
        let u = cgroup::Manager::pool_usage(self)?;
        Some(super::PoolReading {
            working_set: u.working_set,
            peak: u.peak,
            path: self.pool_dir()?.to_path_buf(),
        })
    }
}

impl Group for cgroup::WorkerGroup {
    fn path(&self) -> Option<&Path> {
        cgroup::WorkerGroup::path(self)
    }
    fn open_procs(&self) -> Result<Option<OwnedFd>, CgroupError> {
        cgroup::WorkerGroup::open_procs(self)
    }
    fn usage(&self, root_pid: i32) -> Result<Usage, CgroupError> {
        cgroup::WorkerGroup::usage(self, Some(root_pid))
    }
    fn oom_kills(&self) -> Result<u64, CgroupError> {
        cgroup::WorkerGroup::oom_kills(self)
    }
    fn pids(&self, root_pid: i32) -> Result<Vec<i32>, CgroupError> {
        cgroup::WorkerGroup::pids(self, Some(root_pid))
    }
    fn has_memory_high(&self) -> bool {
        cgroup::WorkerGroup::has_memory_high(self)
    }
    fn set_high(&self, bytes: Option<u64>) -> Result<(), CgroupError> {
        cgroup::WorkerGroup::set_high(self, bytes)
    }
    fn kill_all(&self, root_pid: i32) -> Result<(), CgroupError> {
        cgroup::WorkerGroup::kill_all(self, Some(root_pid))
    }
    fn remove(&self) -> Result<(), CgroupError> {
        cgroup::WorkerGroup::remove(self)
    }
    fn left_behind(&self) -> Vec<i32> {
        cgroup::WorkerGroup::left_behind(self)
    }
}

/// fork+exec of the worker command ([`spawn::spawn`]); exits from `waitpid` on SIGCHLD.
pub struct ForkExec {
    wrap_output: bool,
    program: Program,
    listeners: Vec<Listener>,
    fd_names: Vec<String>,
    sigchld: tokio::signal::unix::Signal,
    credentials: Option<spawn::Credentials>,
}

impl ForkExec {
    /// Must be called inside the tokio runtime. Makes trimrun a child subreaper: orphans
    /// of workers are re-parented to it and reaped by [`Launcher::reap`], as a
    /// container's PID 1 must.
    pub fn new(program: Program, listeners: Vec<Listener>) -> std::io::Result<ForkExec> {
        let sigchld = signal(SignalKind::child())?;
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            debug!(error = %e, "cannot become a child subreaper");
        }
        let fd_names = listeners.iter().map(|l| l.name.clone()).collect();
        Ok(ForkExec {
            program,
            listeners,
            fd_names,
            sigchld,
            credentials: None,
            wrap_output: false,
        })
    }

    /// Wrap each line the workers write as a JSON event of trimrun's log
    /// (`--worker-output json`).
    pub fn with_output_wrapping(mut self, wrap: bool) -> ForkExec {
        self.wrap_output = wrap;
        self
    }

    /// Run the workers as this user and group (`--user`, `--group`).
    pub fn with_credentials(mut self, c: Option<spawn::Credentials>) -> ForkExec {
        self.credentials = c;
        self
    }
}

impl ForkExec {
    /// The worker command (the zygote launcher starts it as its zygote).
    pub fn program(&self) -> &Program {
        &self.program
    }
    /// The listening sockets every worker gets at fds 3.. .
    pub fn listeners(&self) -> &[Listener] {
        &self.listeners
    }
    /// Their `LISTEN_FDNAMES`, in order.
    pub fn fd_names(&self) -> &[String] {
        &self.fd_names
    }
    /// Who the workers run as (`--user`/`--group`).
    pub fn credentials(&self) -> Option<&spawn::Credentials> {
        self.credentials.as_ref()
    }
}

impl Launcher for ForkExec {
    fn launch(&mut self, req: &Launch<'_>) -> Result<i32, SpawnError> {
        let procs = req.group.open_procs().map_err(|e| SpawnError::Sys {
            slot: req.slot,
            op: "open the worker's cgroup.procs",
            source: std::io::Error::other(e.to_string()),
        })?;
        let fds: Vec<i32> = self.listeners.iter().map(|l| l.fd.as_raw_fd()).collect();
        let spec = WorkerSpec {
            slot: req.slot,
            generation: req.generation,
            listeners: &fds,
            fd_names: &self.fd_names,
            cgroup_procs: procs.as_ref(),
            notify_socket: req.notify_socket,
            zygote_channel: None,
            watchdog: req.watchdog,
            credentials: self.credentials.as_ref(),
            stdio: None,
        };
        if !self.wrap_output {
            return spawn::spawn(&self.program, &spec);
        }
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| SpawnError::Sys {
                slot: req.slot,
                op: "create the pipes for the worker's output",
                source: e.into(),
            })
        };
        let (out_r, out_w) = pipe()?;
        let (err_r, err_w) = pipe()?;
        let spec = WorkerSpec {
            stdio: Some((out_w.as_raw_fd(), err_w.as_raw_fd())),
            ..spec
        };
        let pid = spawn::spawn(&self.program, &spec)?;
        drop((out_w, err_w));
        forward_output(req.slot, pid, "stdout", out_r);
        forward_output(req.slot, pid, "stderr", err_r);
        Ok(pid)
    }

    fn kill_orphans(&self, keep: &[i32]) -> Vec<i32> {
        let mine = std::process::id() as i32;
        let orphans: Vec<i32> = cgroup::children_of(std::path::Path::new("/proc"), mine)
            .into_iter()
            .filter(|p| !keep.contains(p))
            .collect();
        for &p in &orphans {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Signal::SIGKILL);
        }
        orphans
    }

    fn signal(&self, pid: i32, sig: Signal) {
        if let Err(e) = spawn::signal_group(pid, sig) {
            debug!(pid, error = %e, "cannot signal the worker's process group");
        }
        if sig == Signal::SIGKILL {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
        }
    }

    fn exited(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        Box::pin(async move {
            self.sigchld.recv().await;
        })
    }

    /// Holds the ptrace lock while waiting on any child: a `waitpid(-1)` in the tracer's
    /// process would also consume a tracee's ptrace stops.
    fn reap(&mut self) -> Vec<(i32, Exit)> {
        let mut out = vec![];
        let Ok(_guard) = trim::ptrace_lock().try_lock() else {
            return out; // a trim is attached; the next tick reaps
        };
        loop {
            match nix::sys::wait::waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => out.push((pid.as_raw(), Exit::Code(code))),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    out.push((pid.as_raw(), Exit::Signal(sig)))
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
        out
    }
}

/// `malloc_trim(0)` injected with ptrace ([`trim::trim_pid`]), one process after the other.
#[derive(Default)]
pub struct Ptrace {
    pub opts: trim::TrimOptions,
}

impl Injector for Ptrace {
    fn trim(&self, pids: &[i32]) -> Vec<Result<TrimReport, TrimError>> {
        pids.iter()
            .map(|&p| trim::trim_pid(p, &self.opts))
            .collect()
    }
}

/// Longest worker line wrapped as one event; longer lines are split.
const MAX_WORKER_LINE: usize = 16 * 1024;

/// Read what a worker writes on one stream and log each line as a JSON event (slot, pid,
/// stream) until the worker and its children close the pipe.
fn forward_output(slot: usize, pid: i32, stream: &'static str, fd: std::os::fd::OwnedFd) {
    use tokio::io::AsyncBufReadExt;
    let rx = match tokio::net::unix::pipe::Receiver::from_owned_fd(fd) {
        Ok(rx) => rx,
        Err(e) => {
            debug!(slot, pid, error = %e, "cannot read the worker's output");
            return;
        }
    };
    tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(rx);
        let mut line = Vec::new();
        loop {
            line.clear();
            let mut limited = tokio::io::AsyncReadExt::take(&mut reader, MAX_WORKER_LINE as u64);
            match limited.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => return,
                Ok(_) => crate::logging::write_worker_line(crate::logging::worker_line(
                    slot, pid, stream, &line,
                )),
            }
        }
    });
}
