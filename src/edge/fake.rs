//! In-memory stand-ins for the kernel edge: no process is started, no signal sent, no
//! cgroupfs touched. Tests hold a clone of each fake (they share their state) to look at
//! what the supervisor did and to play the kernel's part: set a worker's memory, count an
//! OOM kill, end a process.
//!
//! Fake pids start at [`FIRST_PID`], far above any real pid, so nothing can mistake them
//! for real processes.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::sys::signal::Signal;
use tokio::sync::Notify;

use super::{Group, Groups, Injector, Launch, Launcher};
use crate::cgroup::{CgroupError, Kind, Usage};
use crate::spawn::SpawnError;
use crate::supervisor::Exit;
use crate::trim::{TrimError, TrimReport};

/// The first pid the fake launcher hands out (above Linux's maximum, 4194304).
pub const FIRST_PID: i32 = 10_000_000;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type SharedGroup = Arc<Mutex<GroupState>>;

/// What a fake group holds; the test sets `working_set` and `oom_kills`.
#[derive(Debug, Clone, Default)]
pub struct GroupState {
    pub limit: Option<u64>,
    pub working_set: u64,
    pub oom_kills: u64,
    pub high: Option<u64>,
    pub killed: bool,
    pub removed: bool,
}

/// Fake [`Groups`]: groups named `worker-<slot>-<gen>`, kept after removal (marked).
#[derive(Clone, Default)]
pub struct FakeGroups {
    groups: Arc<Mutex<BTreeMap<(usize, u64), SharedGroup>>>,
    /// Make the next `create` calls fail (counts down).
    fail_next: Arc<Mutex<u32>>,
    torn_down: Arc<Mutex<bool>>,
}

impl FakeGroups {
    pub fn new() -> FakeGroups {
        FakeGroups::default()
    }

    /// The state of worker `slot`'s group of generation `generation`.
    pub fn get(&self, slot: usize, generation: u64) -> Option<GroupState> {
        lock(&self.groups)
            .get(&(slot, generation))
            .map(|g| lock(g).clone())
    }

    /// Change the group of (`slot`, `generation`).
    pub fn set(&self, slot: usize, generation: u64, f: impl FnOnce(&mut GroupState)) {
        let g = lock(&self.groups)
            .get(&(slot, generation))
            .cloned()
            .expect("no such fake group");
        f(&mut lock(&g));
    }

    /// Fail the next `n` creations (as a cgroupfs error would).
    pub fn fail_next(&self, n: u32) {
        *lock(&self.fail_next) = n;
    }

    pub fn torn_down(&self) -> bool {
        *lock(&self.torn_down)
    }
}

impl Groups for FakeGroups {
    fn kind(&self) -> Kind {
        Kind::V2
    }

    fn create(
        &self,
        slot: usize,
        generation: u64,
        limit: Option<u64>,
    ) -> Result<Box<dyn Group>, CgroupError> {
        {
            let mut f = lock(&self.fail_next);
            if *f > 0 {
                *f -= 1;
                return Err(CgroupError::io(
                    "mkdir",
                    Path::new("/fake/worker"),
                    std::io::Error::from_raw_os_error(libc::EACCES),
                ));
            }
        }
        let state = Arc::new(Mutex::new(GroupState {
            limit,
            ..GroupState::default()
        }));
        lock(&self.groups).insert((slot, generation), state.clone());
        Ok(Box::new(FakeGroup { state }))
    }

    fn teardown(&self) {
        *lock(&self.torn_down) = true;
    }
}

struct FakeGroup {
    state: Arc<Mutex<GroupState>>,
}

impl Group for FakeGroup {
    fn path(&self) -> Option<&Path> {
        None
    }
    fn open_procs(&self) -> Result<Option<OwnedFd>, CgroupError> {
        Ok(None)
    }
    fn usage(&self, root_pid: i32) -> Result<Usage, CgroupError> {
        let s = lock(&self.state);
        Ok(Usage {
            current: s.working_set,
            anon: s.working_set,
            working_set: s.working_set,
            oom_kills: s.oom_kills,
            limit: s.limit,
            pids: vec![root_pid],
            ..Usage::default()
        })
    }
    fn oom_kills(&self) -> Result<u64, CgroupError> {
        Ok(lock(&self.state).oom_kills)
    }
    fn pids(&self, root_pid: i32) -> Result<Vec<i32>, CgroupError> {
        Ok(vec![root_pid])
    }
    fn has_memory_high(&self) -> bool {
        true
    }
    fn set_high(&self, bytes: Option<u64>) -> Result<(), CgroupError> {
        lock(&self.state).high = bytes;
        Ok(())
    }
    fn kill_all(&self, _root_pid: i32) -> Result<(), CgroupError> {
        lock(&self.state).killed = true;
        Ok(())
    }
    fn remove(&self) -> Result<(), CgroupError> {
        lock(&self.state).removed = true;
        Ok(())
    }
}

/// One launch the fake launcher saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launched {
    pub slot: usize,
    pub generation: u64,
    pub pid: i32,
}

#[derive(Default)]
struct LauncherState {
    next_pid: i32,
    launched: Vec<Launched>,
    signals: Vec<(i32, Signal)>,
    alive: Vec<i32>,
    exits: VecDeque<(i32, Exit)>,
    /// Workers that ignore the stop signal (exit only on SIGKILL).
    stubborn: Vec<i32>,
    fail_next: u32,
    /// What [`Launcher::fatal`] says.
    fatal: Option<String>,
}

/// Fake [`Launcher`]: hands out pids, records signals; a worker "exits" when the test says
/// so ([`FakeLauncher::exit`]) or, by default, on any stop signal or SIGKILL.
#[derive(Clone)]
pub struct FakeLauncher {
    state: Arc<Mutex<LauncherState>>,
    wake: Arc<Notify>,
    /// The stop signal the fake workers obey.
    stop_signal: Signal,
}

impl FakeLauncher {
    pub fn new(stop_signal: Signal) -> FakeLauncher {
        FakeLauncher {
            state: Arc::new(Mutex::new(LauncherState {
                next_pid: FIRST_PID,
                ..LauncherState::default()
            })),
            wake: Arc::new(Notify::new()),
            stop_signal,
        }
    }

    pub fn launched(&self) -> Vec<Launched> {
        lock(&self.state).launched.clone()
    }

    pub fn signals(&self) -> Vec<(i32, Signal)> {
        lock(&self.state).signals.clone()
    }

    /// Pids launched and not yet exited.
    pub fn alive(&self) -> Vec<i32> {
        lock(&self.state).alive.clone()
    }

    /// End worker `pid` as the kernel would report it.
    pub fn exit(&self, pid: i32, how: Exit) {
        let mut s = lock(&self.state);
        if let Some(i) = s.alive.iter().position(|&p| p == pid) {
            s.alive.remove(i);
            s.exits.push_back((pid, how));
        }
        drop(s);
        self.wake.notify_one();
    }

    /// Worker `pid` ignores its stop signal: only SIGKILL ends it.
    pub fn make_stubborn(&self, pid: i32) {
        lock(&self.state).stubborn.push(pid);
    }

    /// Fail the next `n` launches (as a failed exec would).
    pub fn fail_next(&self, n: u32) {
        lock(&self.state).fail_next = n;
    }

    /// From now on the launcher cannot go on (as a `--preload` command that is no zygote).
    pub fn fail_fatally(&self, why: &str) {
        lock(&self.state).fatal = Some(why.into());
    }
}

impl Launcher for FakeLauncher {
    fn launch(&mut self, req: &Launch<'_>) -> Result<i32, SpawnError> {
        let mut s = lock(&self.state);
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return Err(SpawnError::NotFound("fake-worker".into()));
        }
        let pid = s.next_pid;
        s.next_pid += 1;
        s.launched.push(Launched {
            slot: req.slot,
            generation: req.generation,
            pid,
        });
        s.alive.push(pid);
        Ok(pid)
    }

    fn signal(&self, pid: i32, sig: Signal) {
        let exits = {
            let mut s = lock(&self.state);
            s.signals.push((pid, sig));
            sig == Signal::SIGKILL || (sig == self.stop_signal && !s.stubborn.contains(&pid))
        };
        if exits {
            self.exit(pid, Exit::Signal(sig));
        }
    }

    fn exited(&mut self) -> Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        let wake = self.wake.clone();
        Box::pin(async move { wake.notified().await })
    }

    fn reap(&mut self) -> Vec<(i32, Exit)> {
        lock(&self.state).exits.drain(..).collect()
    }

    fn fatal(&self) -> Option<String> {
        lock(&self.state).fatal.clone()
    }
}

/// Fake [`Injector`]: records what it was asked to trim; each process "releases"
/// `released` bytes.
#[derive(Clone, Default)]
pub struct RecordingInjector {
    calls: Arc<Mutex<Vec<Vec<i32>>>>,
    released: Arc<Mutex<u64>>,
}

impl RecordingInjector {
    pub fn new(released: u64) -> RecordingInjector {
        RecordingInjector {
            calls: Arc::default(),
            released: Arc::new(Mutex::new(released)),
        }
    }

    /// Every call's pids, in order.
    pub fn calls(&self) -> Vec<Vec<i32>> {
        lock(&self.calls).clone()
    }
}

impl Injector for RecordingInjector {
    fn trim(&self, pids: &[i32]) -> Vec<Result<TrimReport, TrimError>> {
        lock(&self.calls).push(pids.to_vec());
        let released = *lock(&self.released);
        pids.iter()
            .map(|&pid| {
                Ok(TrimReport {
                    pid,
                    tid: pid,
                    syscall: "epoll_wait".into(),
                    ret: 1,
                    pause_us: 100,
                    call_us: 50,
                    rss_before: released,
                    rss_after: 0,
                    anon_before: released,
                    anon_after: 0,
                })
            })
            .collect()
    }
}
