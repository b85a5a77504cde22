//! The pool's state machine on a paused clock, with the in-memory kernel edge of
//! [`crate::edge::fake`]: no process, no cgroup, no ptrace. Time only moves when every task
//! waits, so seconds of pool life take microseconds.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep};

use super::{Exit, Outcome, PoolSignal, Setup, Supervisor};
use crate::cli::Cli;
use crate::config::Config;
use crate::edge::fake::{FakeGroups, FakeLauncher, Launched, RecordingInjector};
use crate::notify::RunDir;
use crate::startup::policy_settings;
use crate::status::{ControlMsg, Request, Snapshot};

const MIB: u64 = 1 << 20;

struct Pool {
    launcher: FakeLauncher,
    groups: FakeGroups,
    injector: RecordingInjector,
    signals: mpsc::UnboundedSender<PoolSignal>,
    control: mpsc::Sender<ControlMsg>,
    task: JoinHandle<Outcome>,
    _dir: tempfile::TempDir,
}

fn config(args: &[&str]) -> Config {
    let mut argv = vec!["trimrun"];
    argv.extend_from_slice(args);
    argv.extend_from_slice(&["--", "fake-worker"]);
    let cli = Cli::try_parse_from(argv).expect("test flags parse");
    Config::from_args(&cli.run).expect("test config is valid")
}

/// A pool started with these flags (after `--workers` etc.), limit `limit`.
fn pool(args: &[&str], limit: Option<u64>) -> Pool {
    pool_with_budget(args, limit, None)
}

/// The same under a pool budget (`limit` is then each worker's ceiling).
fn pool_with_budget(args: &[&str], limit: Option<u64>, budget: Option<u64>) -> Pool {
    let cfg = config(args);
    let dir = tempfile::tempdir().unwrap();
    let launcher = FakeLauncher::new(cfg.stop_signal);
    let groups = FakeGroups::new();
    let injector = RecordingInjector::new(4 * MIB);
    let (sig_tx, sig_rx) = mpsc::unbounded_channel();
    let (ctl_tx, ctl_rx) = mpsc::channel(4);
    let setup = Setup {
        settings: policy_settings(&cfg),
        config: cfg,
        limit,
        budget,
        groups: Box::new(groups.clone()),
        launcher: Box::new(launcher.clone()),
        injector: Arc::new(injector.clone()),
        rundir: RunDir::existing(dir.path().to_path_buf()),
        signals: sig_rx,
        control_rx: Some(ctl_rx),
        metrics: None,
        listeners: vec![],
        seed: Some(7),
    };
    let task = tokio::spawn(Supervisor::new(setup).run());
    Pool {
        launcher,
        groups,
        injector,
        signals: sig_tx,
        control: ctl_tx,
        task,
        _dir: dir,
    }
}

impl Pool {
    async fn ask(&self, req: Request) -> Result<serde_json::Value, String> {
        let (tx, rx) = oneshot::channel();
        self.control
            .send(ControlMsg { req, reply: tx })
            .await
            .expect("supervisor is running");
        rx.await.expect("supervisor answers")
    }

    async fn status(&self) -> Snapshot {
        serde_json::from_value(self.ask(Request::Status).await.unwrap()).unwrap()
    }

    /// Let the pool run for `d` of (paused) time.
    async fn run_for(&self, d: Duration) {
        sleep(d).await;
    }

    /// Wait (in paused time, at most `limit`) until `cond` holds on the pool's status.
    async fn until(
        &self,
        limit: Duration,
        what: &str,
        cond: impl Fn(&Snapshot) -> bool,
    ) -> Snapshot {
        let end = Instant::now() + limit;
        loop {
            let s = self.status().await;
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < end,
                "{what}: not within {limit:?}; last status {s:#?}"
            );
            sleep(Duration::from_millis(10)).await;
        }
    }

    fn launched(&self, slot: usize) -> Vec<Launched> {
        self.launcher
            .launched()
            .into_iter()
            .filter(|l| l.slot == slot)
            .collect()
    }

    fn signals_to(&self, pid: i32) -> Vec<Signal> {
        self.launcher
            .signals()
            .into_iter()
            .filter(|(p, _)| *p == pid)
            .map(|(_, s)| s)
            .collect()
    }

    async fn stop(self) -> Outcome {
        self.signals.send(PoolSignal::Term).unwrap();
        self.task.await.unwrap()
    }
}

fn all_ready(n: usize) -> impl Fn(&Snapshot) -> bool {
    move |s| s.state == "running" && s.workers.iter().filter(|w| w.state == "ready").count() == n
}

#[tokio::test(start_paused = true)]
async fn starts_every_slot_and_reports_ready_after_the_delay() {
    let p = pool(&["-n", "3", "--ready", "delay:2s"], None);
    let s = p.status().await;
    assert_eq!(s.state, "starting");
    assert_eq!(s.workers.len(), 3);
    assert!(s.workers.iter().all(|w| w.state == "starting"));
    let t0 = Instant::now();
    p.until(Duration::from_secs(5), "all ready", all_ready(3))
        .await;
    assert!(
        t0.elapsed() >= Duration::from_millis(1990),
        "ready before its delay"
    );
    let slots: Vec<_> = p
        .launcher
        .launched()
        .iter()
        .map(|l| (l.slot, l.generation))
        .collect();
    assert_eq!(slots, vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(p.stop().await, Outcome::Stopped);
}

#[tokio::test(start_paused = true)]
async fn only_workers_started_together_spread_their_first_thresholds() {
    // Seeded draws: with 8 workers some first thresholds are spread well below the normal
    // draw (90% of the limit, jittered); a lone worker's never is, in any of 20 pools.
    let limit = 256 * MIB;
    let low = |ts: Vec<Option<u64>>| ts.into_iter().flatten().filter(|t| *t < limit / 2).count();
    let p = pool(&["-n", "8"], Some(limit));
    // The spread applies at the first reading after the ready time.
    p.run_for(Duration::from_secs(10)).await;
    let spread = low(p
        .status()
        .await
        .workers
        .iter()
        .map(|w| w.recycle_threshold)
        .collect());
    assert!(spread > 0, "no first threshold was spread");
    p.stop().await;
    let p = pool(&["-n", "8", "--spread-first", "off"], Some(limit));
    p.run_for(Duration::from_secs(10)).await;
    let off = low(p
        .status()
        .await
        .workers
        .iter()
        .map(|w| w.recycle_threshold)
        .collect());
    assert_eq!(off, 0, "--spread-first off spread a threshold");
    p.stop().await;
    for _ in 0..20 {
        let p = pool(&["-n", "1"], Some(limit));
        p.run_for(Duration::from_secs(10)).await;
        let t = p.status().await.workers[0].recycle_threshold;
        assert_eq!(
            low(vec![t]),
            0,
            "a lone worker's threshold was spread: {t:?}"
        );
        p.stop().await;
    }
}

#[tokio::test(start_paused = true)]
async fn notify_readiness_comes_from_the_workers_own_socket() {
    let p = pool(&["-n", "1", "--ready", "notify"], None);
    p.run_for(Duration::from_millis(50)).await;
    assert_eq!(p.status().await.workers[0].state, "starting");
    let sock = p._dir.path().join("notify-0-0.sock");
    std::os::unix::net::UnixDatagram::unbound()
        .unwrap()
        .send_to(b"STATUS=up\nREADY=1\n", &sock)
        .unwrap();
    p.until(Duration::from_secs(1), "ready by READY=1", all_ready(1))
        .await;
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_crashed_worker_restarts_with_growing_backoff() {
    let p = pool(&["-n", "1", "--ready", "delay:100ms"], None);
    p.until(Duration::from_secs(2), "ready", all_ready(1)).await;
    let mut delays = vec![];
    for generation in 0..4u64 {
        let pid = p.launched(0).last().unwrap().pid;
        p.launcher.exit(pid, Exit::Code(1));
        let t0 = Instant::now();
        loop {
            if p.launched(0).len() as u64 == generation + 2 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "no restart");
            sleep(Duration::from_millis(1)).await;
        }
        delays.push(t0.elapsed());
    }
    let s = p.status().await;
    assert_eq!(s.restarts, 4);
    assert_eq!(s.workers[0].generation, 4);
    // Base 100 ms, doubling, half of it jitter: 50-100, 100-200, 200-400, 400-800 ms.
    for (i, d) in delays.iter().enumerate() {
        let ceiling = Duration::from_millis(100 << i);
        assert!(
            *d >= ceiling / 2 && *d <= ceiling + Duration::from_millis(5),
            "restart {i} after {d:?}"
        );
    }
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_recycle_starts_the_replacement_before_stopping_the_old_worker() {
    let p = pool(
        &["-n", "2", "--ready", "delay:1s", "--graceful-timeout", "5s"],
        None,
    );
    p.until(Duration::from_secs(3), "ready", all_ready(2)).await;
    let old = p.launched(0)[0].pid;
    p.ask(Request::Recycle { slot: 0 }).await.unwrap();
    // The replacement starts; the old worker serves on, untouched.
    let t0 = Instant::now();
    while p.launched(0).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no replacement started"
        );
        sleep(Duration::from_millis(1)).await;
    }
    let s = p.status().await;
    assert_eq!(s.recycles_in_progress, 1);
    assert!(
        p.signals_to(old).is_empty(),
        "old worker signalled before its replacement was ready"
    );
    assert!(s.workers.iter().any(|w| w.pid == old && w.state == "ready"));
    // Ready a second later: then, and only then, the old one gets the stop signal.
    let s = p
        .until(Duration::from_secs(3), "recycle complete", |s| {
            s.recycles == 1
        })
        .await;
    assert_eq!(p.signals_to(old), vec![Signal::SIGTERM]);
    assert_eq!(s.restarts, 0);
    assert_eq!(s.recycles_in_progress, 0);
    assert_eq!(s.workers.len(), 2);
    let new = p.launched(0)[1].pid;
    assert!(
        s.workers
            .iter()
            .any(|w| w.pid == new && w.state == "ready" && w.recycles == 1)
    );
    // The group is removed on the blocking pool, after the exit.
    let t0 = Instant::now();
    while !p.groups.get(0, 0).unwrap().removed {
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "the old group is not removed"
        );
        sleep(Duration::from_millis(1)).await;
    }
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replacement_never_ready_leaves_the_old_worker_serving() {
    let p = pool(
        &["-n", "1", "--ready", "notify", "--ready-timeout", "3s"],
        None,
    );
    let sock = p._dir.path().join("notify-0-0.sock");
    p.run_for(Duration::from_millis(10)).await;
    std::os::unix::net::UnixDatagram::unbound()
        .unwrap()
        .send_to(b"READY=1", &sock)
        .unwrap();
    p.until(Duration::from_secs(1), "ready", all_ready(1)).await;
    let old = p.launched(0)[0].pid;
    p.ask(Request::Recycle { slot: 0 }).await.unwrap();
    let s = p
        .until(Duration::from_secs(10), "failed replacement reaped", |s| {
            s.restarts == 1
        })
        .await;
    let replacement = p.launched(0)[1].pid;
    assert_eq!(p.signals_to(replacement), vec![Signal::SIGKILL]);
    assert!(
        p.signals_to(old).is_empty(),
        "the old worker must keep serving"
    );
    assert_eq!(s.workers.len(), 1);
    assert_eq!(s.workers[0].pid, old);
    assert_eq!(s.workers[0].state, "ready");
    assert_eq!(s.recycles_in_progress, 0);
    assert_eq!(s.recycles, 0);
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_oom_kill_is_counted_and_restarted_after_a_jittered_delay() {
    let p = pool(&["-n", "2", "--ready", "delay:100ms"], Some(256 * MIB));
    p.until(Duration::from_secs(2), "ready", all_ready(2)).await;
    let pid = p.launched(1)[0].pid;
    p.groups.set(1, 0, |g| g.oom_kills = 1);
    p.launcher.exit(pid, Exit::Signal(Signal::SIGKILL));
    let t0 = Instant::now();
    while p.launched(1).len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no restart after the OOM kill"
        );
        sleep(Duration::from_millis(1)).await;
    }
    let waited = t0.elapsed();
    assert!(
        waited >= crate::policy::OOM_RESTART_MIN
            && waited <= crate::policy::OOM_RESTART_MAX + Duration::from_millis(5),
        "restarted after {waited:?}"
    );
    let s = p.status().await;
    assert_eq!((s.oom_kills, s.restarts), (1, 1));
    assert_eq!(p.groups.get(1, 1).unwrap().limit, Some(256 * MIB));
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_oom_killed_while_its_replacement_starts_is_a_restart_not_a_recycle() {
    let p = pool(
        &["-n", "2", "--ready", "delay:1s", "--graceful-timeout", "5s"],
        Some(256 * MIB),
    );
    p.until(Duration::from_secs(3), "ready", all_ready(2)).await;
    let old = p.launched(0)[0].pid;
    p.ask(Request::Recycle { slot: 0 }).await.unwrap();
    when(Duration::from_secs(1), "replacement started", || {
        p.launched(0).len() == 2
    })
    .await;
    p.groups.set(0, 0, |g| g.oom_kills = 1);
    p.launcher.exit(old, Exit::Signal(Signal::SIGKILL));
    let new = p.launched(0)[1].pid;
    let s = p
        .until(Duration::from_secs(3), "the replacement serves", |s| {
            s.oom_kills == 1
                && s.workers.len() == 2
                && s.workers.iter().any(|w| w.pid == new && w.state == "ready")
        })
        .await;
    assert_eq!((s.oom_kills, s.restarts, s.recycles), (1, 1, 0));
    assert_eq!(s.recycles_in_progress, 0);
    let w = s.workers.iter().find(|w| w.pid == new).unwrap();
    assert_eq!(w.recycles, 0, "the slot's count agrees with the pool's");
    // The replacement took the slot: nothing else was started for it.
    assert_eq!(p.launched(0).len(), 2);
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_group_creation_is_retried_with_backoff() {
    let p = pool(&["-n", "1", "--ready", "delay:100ms"], None);
    p.until(Duration::from_secs(2), "ready", all_ready(1)).await;
    p.groups.fail_next(2);
    p.launcher.exit(p.launched(0)[0].pid, Exit::Code(3));
    p.run_for(Duration::from_millis(1)).await;
    let s = p
        .until(Duration::from_secs(10), "ready again", all_ready(1))
        .await;
    // Generation 1 and 2 failed at their group; generation 3 runs.
    assert_eq!(s.workers[0].generation, 3);
    assert_eq!(p.launched(0).len(), 2);
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_and_kills_what_outlives_the_graceful_timeout() {
    let mut p = pool(
        &[
            "-n",
            "2",
            "--ready",
            "delay:100ms",
            "--graceful-timeout",
            "4s",
        ],
        None,
    );
    p.until(Duration::from_secs(2), "ready", all_ready(2)).await;
    let (a, b) = (p.launched(0)[0].pid, p.launched(1)[0].pid);
    p.launcher.make_stubborn(b);
    p.signals.send(PoolSignal::Term).unwrap();
    let t0 = Instant::now();
    let outcome = (&mut p.task).await.unwrap();
    assert_eq!(outcome, Outcome::Stopped);
    assert_eq!(p.signals_to(a), vec![Signal::SIGTERM]);
    let to_b = p.signals_to(b);
    assert_eq!(to_b[0], Signal::SIGTERM);
    assert!(to_b[1..].iter().all(|s| *s == Signal::SIGKILL) && to_b.len() > 1);
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(5),
        "took {took:?}"
    );
    assert!(p.groups.torn_down());
    assert!(p.launcher.alive().is_empty());
}

/// One ready worker that ignores its stop signal (only SIGKILL ends it), with a graceful
/// timeout of 30 s; and its pid.
async fn one_stubborn_worker() -> (Pool, i32) {
    let p = pool(
        &[
            "-n",
            "1",
            "--ready",
            "delay:100ms",
            "--graceful-timeout",
            "30s",
        ],
        None,
    );
    p.until(Duration::from_secs(2), "ready", all_ready(1)).await;
    let pid = p.launched(0)[0].pid;
    p.launcher.make_stubborn(pid);
    (p, pid)
}

#[tokio::test(start_paused = true)]
async fn a_second_stop_signal_kills_at_once() {
    let (mut p, pid) = one_stubborn_worker().await;
    p.signals.send(PoolSignal::Term).unwrap();
    p.run_for(Duration::from_millis(100)).await;
    assert_eq!(p.status().await.state, "stopping");
    p.signals.send(PoolSignal::Int).unwrap();
    let t0 = Instant::now();
    assert_eq!((&mut p.task).await.unwrap(), Outcome::Escalated);
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(p.signals_to(pid), vec![Signal::SIGTERM, Signal::SIGKILL]);
}

#[tokio::test(start_paused = true)]
async fn a_launcher_that_cannot_go_on_stops_the_pool_gracefully_with_its_reason() {
    let mut p = pool(&["-n", "2", "--ready", "delay:100ms"], None);
    p.until(Duration::from_secs(2), "ready", all_ready(2)).await;
    let pids: Vec<i32> = p.launcher.alive();
    p.launcher.fail_fatally("no zygote");
    let outcome = tokio::time::timeout(Duration::from_secs(60), &mut p.task)
        .await
        .expect("the pool went on")
        .unwrap();
    assert_eq!(outcome, Outcome::Failed("no zygote".into()));
    // Each worker got the stop signal (graceful), none was killed.
    for pid in pids {
        assert_eq!(p.signals_to(pid), vec![Signal::SIGTERM], "{pid}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_stop_signal_during_a_fatal_stop_keeps_its_reason() {
    let (mut p, _) = one_stubborn_worker().await;
    p.launcher.fail_fatally("no zygote");
    p.run_for(Duration::from_millis(1500)).await;
    assert_eq!(p.status().await.state, "stopping");
    // The operator's TERM (systemctl stop) now escalates; the exit still says why.
    p.signals.send(PoolSignal::Term).unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(60), &mut p.task)
        .await
        .expect("the pool went on")
        .unwrap();
    assert_eq!(outcome, Outcome::Failed("no zygote".into()));
}

#[tokio::test(start_paused = true)]
async fn scaling_down_drains_the_highest_slots_and_up_starts_new_ones() {
    let p = pool(&["-n", "3", "--ready", "delay:100ms"], None);
    p.until(Duration::from_secs(2), "ready", all_ready(3)).await;
    p.signals.send(PoolSignal::Ttou).unwrap();
    let s = p
        .until(Duration::from_secs(2), "scaled down", |s| {
            s.workers.len() == 2
        })
        .await;
    assert_eq!(s.target_workers, 2);
    assert_eq!(p.signals_to(p.launched(2)[0].pid), vec![Signal::SIGTERM]);
    assert_eq!(s.restarts, 0);
    p.ask(Request::Scale {
        to: crate::status::ScaleTo::Exactly(4),
    })
    .await
    .unwrap();
    p.until(Duration::from_secs(2), "scaled up", all_ready(4))
        .await;
    assert_eq!(p.launched(3).len(), 1);
    assert_eq!(
        p.launched(2).len(),
        2,
        "slot 2 starts again, as a new generation"
    );
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_above_its_trim_threshold_is_trimmed_through_the_injector() {
    let p = pool(
        &["-n", "2", "--ready", "delay:100ms", "--trim-at", "50%"],
        Some(100 * MIB),
    );
    p.until(Duration::from_secs(2), "ready", all_ready(2)).await;
    let pid = p.launched(1)[0].pid;
    p.groups.set(1, 0, |g| g.working_set = 60 * MIB);
    p.groups.set(0, 0, |g| g.working_set = 10 * MIB);
    let s = p
        .until(Duration::from_secs(30), "trimmed", |s| s.trims > 0)
        .await;
    assert_eq!(p.injector.calls()[0], vec![pid]);
    assert!(
        p.injector.calls().iter().all(|c| c == &vec![pid]),
        "only the worker above its threshold"
    );
    let w = s.workers.iter().find(|w| w.pid == pid).unwrap();
    assert_eq!(w.released_bytes, 4 * MIB * w.trims);
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_past_its_recycle_threshold_is_replaced_first() {
    let p = pool(
        &["-n", "2", "--ready", "delay:100ms", "--trim", "off"],
        Some(100 * MIB),
    );
    p.until(Duration::from_secs(2), "ready", all_ready(2)).await;
    let old = p.launched(0)[0].pid;
    p.groups.set(0, 0, |g| g.working_set = 99 * MIB);
    let s = p
        .until(Duration::from_secs(60), "recycled for memory", |s| {
            s.recycles == 1
        })
        .await;
    assert_eq!(p.signals_to(old), vec![Signal::SIGTERM]);
    assert_eq!(p.launched(0).len(), 2);
    let w = s.workers.iter().find(|w| w.slot == 0).unwrap();
    assert!(
        w.last_reason.as_deref().unwrap().starts_with("memory"),
        "{w:?}"
    );
    assert_eq!((s.restarts, s.oom_kills), (0, 0));
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_stop_first_recycle_under_a_budget_keeps_the_slots_recycle_count() {
    // 120 MiB for the pool, ceilings of 100 MiB: a worker at 99 MiB beside one at 20 MiB
    // leaves no room for its replacement, so each recycle of slot 0 is stop-first, and the
    // replacement starts after its predecessor is gone.
    let p = pool_with_budget(
        &["-n", "2", "--ready", "delay:100ms", "--trim", "off"],
        Some(100 * MIB),
        Some(120 * MIB),
    );
    p.until(Duration::from_secs(2), "ready", all_ready(2)).await;
    p.groups.set(1, 0, |g| g.working_set = 20 * MIB);
    for generation in 0..2u64 {
        let old = p.launched(0)[generation as usize].pid;
        p.groups.set(0, generation, |g| g.working_set = 99 * MIB);
        let t0 = Instant::now();
        while p.launched(0).len() < generation as usize + 2 {
            assert!(t0.elapsed() < Duration::from_secs(120), "no recycle");
            sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            p.signals_to(old),
            vec![Signal::SIGTERM],
            "stop-first: the old worker is stopped before its replacement starts"
        );
        let s = p
            .until(Duration::from_secs(120), "recycled stop-first", |s| {
                s.recycles == generation + 1
                    && s.workers.iter().any(|w| w.state == "ready" && w.slot == 0)
            })
            .await;
        assert_eq!(p.signals_to(old), vec![Signal::SIGTERM]);
        let w = s.workers.iter().find(|w| w.slot == 0).unwrap();
        assert_eq!(w.recycles, generation + 1, "{w:?}");
        assert!(w.last_reason.is_some(), "{w:?}");
        assert_eq!((s.restarts, s.oom_kills), (0, 0));
    }
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_reaching_its_limit_before_its_replacement_is_ready_is_stopped_gracefully() {
    // A young worker growing 20 MiB/s under 100 MiB: its replacement starts past the gate
    // and never gets ready (no READY=1); the old worker gets the stop signal before its
    // limit, not an OOM kill at it.
    let p = pool(
        &[
            "-n",
            "2",
            "--ready",
            "notify",
            "--ready-timeout",
            "60s",
            "--trim",
            "off",
            "--spread-first",
            "off",
        ],
        Some(100 * MIB),
    );
    when(Duration::from_secs(1), "launched", || {
        p.launched(0).len() == 1 && p.launched(1).len() == 1
    })
    .await;
    p.groups.set(0, 0, |g| g.working_set = 20 * MIB);
    p.groups.set(1, 0, |g| g.working_set = 20 * MIB);
    // Starts take 1.5 s (the pool plans with the measured ready time under notify).
    sleep(Duration::from_millis(1500)).await;
    notify(&p, 0, 0, b"READY=1");
    notify(&p, 1, 0, b"READY=1");
    p.until(Duration::from_secs(2), "ready", all_ready(2)).await;
    let old = p.launched(0)[0].pid;
    let mut ws = 20 * MIB;
    let mut replaced_at = None;
    while p.signals_to(old).is_empty() {
        assert!(ws < 100 * MIB, "reached its limit unstopped");
        sleep(Duration::from_millis(50)).await;
        ws += MIB;
        p.groups.set(0, 0, |g| g.working_set = ws);
        if replaced_at.is_none() && p.launched(0).len() == 2 {
            replaced_at = Some(ws);
        }
    }
    assert_eq!(p.signals_to(old), vec![Signal::SIGTERM]);
    let replaced_at = replaced_at.expect("its replacement started first");
    assert!(replaced_at < ws, "{replaced_at} {ws}");
    // Stopped with room left: a reading or more of growth (1 MiB per 50 ms).
    assert!(ws <= 97 * MIB, "stopped at {} MiB", ws >> 20);
    let s = p.status().await;
    assert!(
        s.workers
            .iter()
            .any(|w| w.slot == 0 && w.state == "starting"),
        "{s:#?}"
    );
    assert_eq!((s.restarts, s.oom_kills), (0, 0));
    p.stop().await;
}

// ----- the watchdog (--timeout) -------------------------------------------------------------

/// Send one sd_notify datagram as worker (`slot`, `generation`) would.
fn notify(p: &Pool, slot: usize, generation: u64, msg: &[u8]) {
    let sock = p
        ._dir
        .path()
        .join(format!("notify-{slot}-{generation}.sock"));
    std::os::unix::net::UnixDatagram::unbound()
        .unwrap()
        .send_to(msg, &sock)
        .unwrap();
}

/// Step the paused clock 5 ms at a time until `cond`, at most `limit`: the instant it held.
async fn when(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) -> Instant {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return Instant::now();
        }
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        sleep(Duration::from_millis(5)).await;
    }
}

const SLACK: Duration = Duration::from_millis(30);

#[tokio::test(start_paused = true)]
async fn a_worker_that_stops_its_keepalives_is_signalled_then_killed_and_replaced_first() {
    let p = pool(&["-n", "2", "--ready", "notify", "--timeout", "2s"], None);
    p.run_for(Duration::from_millis(10)).await;
    notify(&p, 0, 0, b"READY=1");
    notify(&p, 1, 0, b"READY=1\nWATCHDOG=1");
    p.until(Duration::from_secs(1), "ready", all_ready(2)).await;
    let (a, b) = (p.launched(0)[0].pid, p.launched(1)[0].pid);
    // Both keep their watchdog for 5 s (every 0.5 s); then only slot 0 does.
    let mut last_b = Instant::now();
    for i in 0..30 {
        notify(&p, 0, 0, b"WATCHDOG=1");
        if i < 10 {
            notify(&p, 1, 0, b"WATCHDOG=1");
            p.run_for(Duration::from_millis(1)).await;
            last_b = Instant::now();
        }
        p.run_for(Duration::from_millis(500)).await;
        if !p.signals_to(b).is_empty() {
            break;
        }
    }
    let abrt = when(Duration::from_secs(5), "timeout signal", || {
        p.signals_to(b) == vec![Signal::SIGABRT]
    })
    .await;
    // Not before a whole timeout of silence, and promptly after it.
    let silent = abrt - last_b;
    assert!(
        silent >= Duration::from_secs(2) && silent <= Duration::from_secs(2) + SLACK,
        "signalled after {silent:?} of silence"
    );
    // Replacement first: it was started by the time the hung worker got its signal.
    assert_eq!(p.launched(1).len(), 2);
    let s = p.status().await;
    assert_eq!(s.timeouts, 1);
    assert_eq!(s.recycles_in_progress, 1);
    let hung = s.workers.iter().find(|w| w.pid == b).unwrap();
    assert_eq!((hung.state.as_str(), hung.timeouts), ("hung", 1));
    // The fake ignores SIGABRT: SIGKILL after the grace (half the timeout).
    let killed = when(Duration::from_secs(5), "SIGKILL", || {
        p.signals_to(b).contains(&Signal::SIGKILL)
    })
    .await;
    let grace = killed - abrt;
    assert!(
        grace >= Duration::from_secs(1) && grace <= Duration::from_secs(1) + SLACK,
        "SIGKILL {grace:?} after the timeout signal"
    );
    // Replaced within timeout + grace of the last keep-alive.
    assert!(killed - last_b <= Duration::from_secs(3) + 2 * SLACK);
    // The timeout recycle lasts until the replacement is ready, and is not a restart.
    p.run_for(Duration::from_millis(50)).await;
    assert_eq!(p.status().await.recycles_in_progress, 1);
    notify(&p, 1, 1, b"READY=1\nWATCHDOG=1");
    let s = p
        .until(Duration::from_secs(1), "replacement ready", all_ready(2))
        .await;
    assert_eq!(s.recycles_in_progress, 0);
    assert_eq!((s.recycles, s.restarts, s.timeouts), (1, 0, 1));
    let new = s.workers.iter().find(|w| w.slot == 1).unwrap();
    assert_eq!(
        (new.generation, new.last_reason.as_deref()),
        (1, Some("timeout"))
    );
    assert!(
        p.signals_to(a).is_empty(),
        "the healthy worker is left alone"
    );
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_hanging_at_every_start_is_replaced_after_a_growing_jittered_delay() {
    let p = pool(&["-n", "1", "--ready", "notify", "--timeout", "1s"], None);
    let mut delays = vec![];
    for generation in 0..6u64 {
        when(Duration::from_secs(60), "launched", || {
            p.launched(0).len() as u64 > generation
        })
        .await;
        p.run_for(Duration::from_millis(1)).await;
        notify(&p, 0, generation, b"READY=1");
        let pid = p.launched(0)[generation as usize].pid;
        let abrt = when(Duration::from_secs(5), "timeout signal", || {
            !p.signals_to(pid).is_empty()
        })
        .await;
        let next = when(Duration::from_secs(60), "next start", || {
            p.launched(0).len() as u64 > generation + 1
        })
        .await;
        delays.push(next - abrt);
    }
    // At once, then 100-200 ms, 200-400 ms, ... : never a tight loop.
    assert!(delays[0] <= Duration::from_millis(5), "{delays:?}");
    for (i, d) in delays.iter().enumerate().skip(1) {
        let ceiling = Duration::from_millis(100 << i);
        assert!(
            *d >= ceiling / 2 && *d <= ceiling + Duration::from_millis(10),
            "replacement {i} after {d:?}: {delays:?}"
        );
    }
    let s = p.status().await;
    assert_eq!((s.timeouts, s.restarts), (6, 0));
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn watchdog_trigger_is_a_hang_now_and_without_timeout_silence_is_fine() {
    let p = pool(&["-n", "1", "--ready", "notify", "--timeout", "1h"], None);
    p.run_for(Duration::from_millis(10)).await;
    notify(&p, 0, 0, b"READY=1");
    p.until(Duration::from_secs(1), "ready", all_ready(1)).await;
    let pid = p.launched(0)[0].pid;
    notify(&p, 0, 0, b"WATCHDOG=trigger");
    when(Duration::from_secs(1), "triggered", || {
        p.signals_to(pid) == vec![Signal::SIGABRT]
    })
    .await;
    p.stop().await;

    // No --timeout: a worker that never sends a keep-alive serves on, and
    // WATCHDOG=trigger means nothing.
    let p = pool(&["-n", "1", "--ready", "notify"], None);
    p.run_for(Duration::from_millis(10)).await;
    notify(&p, 0, 0, b"READY=1");
    p.until(Duration::from_secs(1), "ready", all_ready(1)).await;
    let pid = p.launched(0)[0].pid;
    notify(&p, 0, 0, b"WATCHDOG=trigger");
    p.run_for(Duration::from_secs(3600)).await;
    assert!(p.signals_to(pid).is_empty());
    assert_eq!(p.launched(0).len(), 1);
    assert_eq!(p.status().await.timeouts, 0);
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn with_ready_by_delay_the_watchdog_uses_the_same_socket_and_ready_1_changes_nothing() {
    let p = pool(&["-n", "1", "--ready", "delay:2s", "--timeout", "1s"], None);
    p.run_for(Duration::from_millis(10)).await;
    // The notify socket exists for the watchdog; READY=1 does not shorten the delay.
    notify(&p, 0, 0, b"READY=1");
    p.run_for(Duration::from_millis(500)).await;
    assert_eq!(p.status().await.workers[0].state, "starting");
    p.until(Duration::from_secs(3), "ready by delay", all_ready(1))
        .await;
    let pid = p.launched(0)[0].pid;
    for _ in 0..10 {
        notify(&p, 0, 0, b"WATCHDOG=1");
        p.run_for(Duration::from_millis(400)).await;
    }
    assert!(p.signals_to(pid).is_empty(), "kept its watchdog");
    when(Duration::from_secs(2), "timeout signal", || {
        p.signals_to(pid) == vec![Signal::SIGABRT]
    })
    .await;
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn with_ready_by_delay_a_silent_worker_gets_the_ready_timeout_for_its_first_keepalive() {
    // Ready by delay while it may still be importing its app: a worker that has not spoken
    // yet is not hung one timeout after the delay, only once --ready-timeout has passed.
    let p = pool(
        &[
            "-n",
            "1",
            "--ready",
            "delay:1s",
            "--timeout",
            "1s",
            "--ready-timeout",
            "10s",
        ],
        None,
    );
    p.until(Duration::from_secs(2), "ready by delay", all_ready(1))
        .await;
    let pid = p.launched(0)[0].pid;
    p.run_for(Duration::from_secs(7)).await;
    assert!(
        p.signals_to(pid).is_empty(),
        "signalled while still starting"
    );
    when(Duration::from_secs(3), "timeout signal", || {
        p.signals_to(pid) == vec![Signal::SIGABRT]
    })
    .await;
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_worker_keeping_its_watchdog_runs_indefinitely() {
    let p = pool(&["-n", "1", "--ready", "notify", "--timeout", "1s"], None);
    p.run_for(Duration::from_millis(10)).await;
    notify(&p, 0, 0, b"READY=1");
    p.until(Duration::from_secs(1), "ready", all_ready(1)).await;
    // Half an hour of keep-alives every 0.9 s, each just inside the timeout.
    for _ in 0..2000 {
        notify(&p, 0, 0, b"WATCHDOG=1");
        p.run_for(Duration::from_millis(900)).await;
    }
    let s = p.status().await;
    assert!(p.launcher.signals().is_empty());
    assert_eq!((s.timeouts, p.launched(0).len()), (0, 1));
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn ctl_scale_is_bounded_like_n_and_never_overflows() {
    use crate::status::ScaleTo;
    let p = pool(&["-n", "2", "--ready", "delay:100ms"], None);
    p.until(Duration::from_secs(2), "ready", all_ready(2)).await;
    for to in [
        ScaleTo::Up(usize::MAX),
        ScaleTo::Up(4095),
        ScaleTo::Exactly(100_000),
        ScaleTo::Exactly(0),
    ] {
        let e = p.ask(Request::Scale { to }).await.unwrap_err();
        assert!(
            e.contains("at most 4096") || e.contains("at least 1"),
            "{to}: {e}"
        );
    }
    let s = p.status().await;
    assert_eq!((s.target_workers, s.workers.len()), (2, 2));
    p.ask(Request::Scale {
        to: ScaleTo::Down(usize::MAX),
    })
    .await
    .unwrap();
    p.until(Duration::from_secs(2), "down to one", |s| {
        s.workers.len() == 1
    })
    .await;
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_supervisor_answers_while_it_starts_many_workers() {
    let p = pool(&["-n", "1", "--ready", "delay:100ms"], None);
    p.until(Duration::from_secs(2), "ready", all_ready(1)).await;
    p.ask(Request::Scale {
        to: crate::status::ScaleTo::Exactly(1000),
    })
    .await
    .unwrap();
    let s = p.status().await;
    assert!(
        s.workers.len() < 1000,
        "status was answered only after all {} starts",
        s.workers.len()
    );
    p.until(Duration::from_secs(30), "all started", |s| {
        s.workers.len() == 1000
    })
    .await;
    p.stop().await;
}

#[tokio::test(start_paused = true)]
async fn backoff_starts_over_only_after_a_minute_of_life_as_documented() {
    let p = pool(&["-n", "1", "--ready", "delay:100ms"], None);
    p.until(Duration::from_secs(2), "ready", all_ready(1)).await;
    let mut delays = vec![];
    for (generation, life) in [(0u64, 30), (1, 30), (2, 30), (3, 61)] {
        p.run_for(Duration::from_secs(life)).await;
        let pid = p.launched(0).last().unwrap().pid;
        p.launcher.exit(pid, Exit::Code(1));
        let t0 = Instant::now();
        while p.launched(0).len() as u64 != generation + 2 {
            assert!(t0.elapsed() < Duration::from_secs(60), "no restart");
            sleep(Duration::from_millis(1)).await;
        }
        delays.push(t0.elapsed());
    }
    // 30 s is not a healthy life: the third crash in a row waits 200-400 ms...
    assert!(delays[2] >= Duration::from_millis(200), "{delays:?}");
    // ...and after a minute up, the slot starts over (no delay).
    assert!(delays[3] < Duration::from_millis(10), "{delays:?}");
    p.stop().await;
}
