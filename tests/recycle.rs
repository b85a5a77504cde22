//! Recycling on the real kernel (issue 5): leaking Python workers under load are replaced
//! one at a time, replacement first, before the kernel would kill them; and the faults.

mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pool::*;
use common::{example, wait_for};

/// Numbers from a log line's `key=value` fields.
fn field(line: &str, key: &str) -> Option<i64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit() && c != '-')
        .next()?
        .parse()
        .ok()
}

/// The most recycles in progress at once, replayed from the log in order: a recycle starts
/// with "recycling worker" (pid = the old worker) and ends with "recycle complete".
fn max_concurrent_recycles(log: &str) -> usize {
    let mut in_flight = HashSet::new();
    let mut max = 0;
    for line in log.lines() {
        if line.contains("recycling worker") {
            in_flight.insert(field(line, "pid"));
        } else if line.contains("recycle complete") || line.contains("replacement failed") {
            in_flight.remove(&field(
                line,
                if line.contains("replacement failed") {
                    "old_pid"
                } else {
                    "pid"
                },
            ));
        }
        max = max.max(in_flight.len());
    }
    max
}

#[test]
fn max_concurrent_replays_the_log() {
    let log = "a recycling worker slot=0 pid=10 x\nb recycling worker slot=1 pid=11\nc recycle complete slot=0 pid=10\nrecycle complete slot=1 pid=11";
    assert_eq!(max_concurrent_recycles(log), 2);
    assert_eq!(
        max_concurrent_recycles(
            "recycling worker pid=1\nrecycle complete pid=1\nrecycling worker pid=2"
        ),
        1
    );
}

/// Steady load from client threads until `stop`; counts successes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(std::sync::Mutex::new(vec![]));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port, "/") {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                failures.lock().unwrap().push(e);
                                0
                            }
                        };
                        std::thread::sleep(pause);
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failures,
            threads,
        }
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
        )
    }
}

#[test]
fn six_leaking_workers_recycle_one_at_a_time_without_oom_or_failed_requests() {
    if !common::is_root() {
        common::cannot_run("root (per-worker memory cgroups)");
        return;
    }
    // Default thresholds (trim at 75%, recycle at 90% ± 5 of 96 MiB) and identical leaks of
    // ~1.2 MiB/s per worker: left to their thresholds, several workers would need the gate
    // within seconds of each other and the last would meet the OOM killer. The gate's
    // lookahead (policy::behind_schedule) starts them early, one spacing apart.
    let Some(mut pool) = cgroup_pool(
        &[
            "-n",
            "6",
            "--limit",
            "96M",
            "--ready",
            "delay:1s",
            "--graceful-timeout",
            "10s",
        ],
        &[("APP_LEAK_KB", "48")],
    ) else {
        return;
    };
    let t0 = Instant::now();
    let load = Load::start(pool.port, 4, Duration::from_millis(25));
    // Until six recycles have completed, or 150 s (about 2 minutes of load).
    wait_for(Duration::from_secs(150), || {
        (pool.count_log("recycle complete") >= 6).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    let (ok, failures) = load.finish();
    let elapsed = t0.elapsed();
    let status = pool.status();
    pool.signal(libc::SIGTERM);
    assert_eq!(pool.wait_exit(Duration::from_secs(30)), Some(0));
    let log = pool.log();
    let starts: Vec<f64> = log
        .lines()
        .filter(|l| l.contains("recycling worker"))
        .filter_map(|l| l.get(11..19).map(str::to_string))
        .map(|t| {
            let p: Vec<f64> = t.split(':').filter_map(|x| x.parse().ok()).collect();
            p.iter().fold(0.0, |a, x| a * 60.0 + x)
        })
        .collect();
    let gaps: Vec<String> = starts
        .windows(2)
        .map(|w| format!("{:.0}s", w[1] - w[0]))
        .collect();
    println!(
        "{ok} requests in {elapsed:?}, {} recycles completed, gaps between starts: {gaps:?}, status oom_kills={} recycles={}",
        log.matches("recycle complete").count(),
        status["oom_kills"],
        status["recycles"]
    );
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("trimmed slot"))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        notable.join("\n")
    );
    assert!(
        log.matches("recycle complete").count() >= 6,
        "fewer than 6 recycles:\n{log}"
    );
    assert_eq!(
        max_concurrent_recycles(&log),
        1,
        "two recycles overlapped:\n{log}"
    );
    assert!(!log.contains("OOM-killed"), "an OOM kill happened:\n{log}");
    assert_eq!(status["oom_kills"], 0);
    assert!(log.contains("reason=memory"), "recycled for memory:\n{log}");
}

/// Seconds since midnight of each log line that contains `needle` (the log's RFC 3339 time).
fn log_times(log: &str, needle: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains(needle))
        .filter_map(|l| l.get(11..26).map(str::to_string))
        .map(|t| {
            let p: Vec<f64> = t.split(':').filter_map(|x| x.parse().ok()).collect();
            p.iter().fold(0.0, |a, x| a * 60.0 + x)
        })
        .collect()
}

#[test]
fn spacing_yields_when_waiting_workers_would_reach_their_limits_first() {
    if !common::is_root() {
        common::cannot_run("root (per-worker memory cgroups)");
        return;
    }
    // Four workers leaking ~2 MiB/s each under 96 MiB reach their limits within a minute
    // of each other, while --recycle-spacing 60s allows one start a minute: kept strictly,
    // the spacing would leave three of them to the OOM killer. The gate shortens the
    // spacing in force as far as the projections need, still one recycle at a time.
    let Some(mut pool) = cgroup_pool(
        &[
            "-n",
            "4",
            "--limit",
            "96M",
            "--ready",
            "delay:1s",
            "--recycle-spacing",
            "60s",
            "--graceful-timeout",
            "10s",
        ],
        &[("APP_LEAK_KB", "48")],
    ) else {
        return;
    };
    let load = Load::start(pool.port, 4, Duration::from_millis(20));
    wait_for(Duration::from_secs(120), || {
        (pool.count_log("recycle complete") >= 4).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failures) = load.finish();
    let status = pool.status();
    pool.signal(libc::SIGTERM);
    assert_eq!(pool.wait_exit(Duration::from_secs(30)), Some(0));
    let log = pool.log();
    let starts = log_times(&log, "recycling worker");
    let gaps: Vec<f64> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    println!(
        "{ok} requests, {} recycles completed, gaps between starts (s): {gaps:.1?}, oom_kills={}",
        log.matches("recycle complete").count(),
        status["oom_kills"]
    );
    assert!(
        failures.is_empty(),
        "{} failed requests: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(
        log.matches("recycle complete").count() >= 4,
        "fewer than 4 recycles:\n{log}"
    );
    assert!(!log.contains("OOM-killed"), "an OOM kill happened:\n{log}");
    assert_eq!(status["oom_kills"], 0);
    assert_eq!(
        max_concurrent_recycles(&log),
        1,
        "two recycles overlapped:\n{log}"
    );
    assert!(
        gaps.iter().any(|g| *g < 60.0) && log.contains("recycle spacing shortened"),
        "no start came inside the 60 s spacing:\n{log}"
    );
}

#[test]
fn replacement_that_never_gets_ready_leaves_the_old_worker_serving_and_is_retried() {
    let app = example("app.py");
    // Only the first generation gets a NOTIFY_SOCKET, so replacements never say READY=1.
    let script = format!(
        "if [ \"$TRIMRUN_WORKER_GENERATION\" = 0 ]; then exec python3 {app}; else exec env -u NOTIFY_SOCKET python3 {app}; fi"
    );
    let pool = Pool::start(
        &["-n", "1", "--ready", "notify", "--ready-timeout", "1500ms"],
        &["sh", "-c", &script],
    );
    pool.wait_log("all workers ready", Duration::from_secs(20));
    let old = pool.workers()[0];
    let (code, out) = pool.ctl(&["recycle", "0"]);
    assert_eq!(code, 0, "{out}");
    pool.wait_log("not ready in time", Duration::from_secs(20));
    pool.wait_log(
        "replacement failed before it was ready",
        Duration::from_secs(10),
    );
    // The old worker kept serving all along, and the recycle is tried again later.
    for _ in 0..5 {
        let v: serde_json::Value = serde_json::from_str(&get(pool.port, "/pid").unwrap()).unwrap();
        assert_eq!(v["pid"], old);
    }
    wait_for(Duration::from_secs(20), || {
        (pool.count_log("recycling worker") >= 2).then_some(())
    })
    .unwrap_or_else(|| panic!("no retry:\n{}", pool.log()));
    assert!(common::pool::alive(old));
}

#[test]
fn recycled_worker_that_ignores_the_stop_signal_is_killed_after_the_graceful_timeout() {
    let script = IGNORES_TERM;
    let pool = Pool::start(
        &["-n", "1", "--ready", "notify", "--graceful-timeout", "1s"],
        &["python3", "-c", script],
    );
    pool.wait_log("all workers ready", Duration::from_secs(20));
    let old = pool.workers()[0];
    let (code, out) = pool.ctl(&["recycle", "0"]);
    assert_eq!(code, 0, "{out}");
    pool.wait_log("recycle complete", Duration::from_secs(20));
    assert!(
        pool.log()
            .contains("did not stop within the graceful timeout"),
        "{}",
        pool.log()
    );
    assert!(!common::pool::alive(old));
    let now = pool.workers();
    assert_eq!(now.len(), 1);
    assert_ne!(now[0], old);
}

#[test]
fn shutdown_in_the_middle_of_a_recycle_exits_cleanly_and_leaves_nothing() {
    let app = example("app.py");
    let mut pool = Pool::start_env(
        &["-n", "2", "--ready", "delay:3s"],
        &["python3", &app],
        &[(
            "TRIMRUN_CGROUP",
            if common::is_root() { "auto" } else { "none" },
        )],
    );
    pool.wait_log("all workers ready", Duration::from_secs(30));
    let before = pool.workers();
    let (code, out) = pool.ctl(&["recycle", "1"]);
    assert_eq!(code, 0, "{out}");
    pool.wait_log("starting its replacement", Duration::from_secs(10));
    let during = pool.workers();
    assert_eq!(
        during.len(),
        3,
        "the replacement runs beside the old worker (surge)"
    );
    pool.signal(libc::SIGTERM);
    assert_eq!(
        pool.wait_exit(Duration::from_secs(20)),
        Some(0),
        "{}",
        pool.log()
    );
    for p in before.iter().chain(during.iter()) {
        assert!(!common::pool::alive(*p), "{p} left behind");
    }
    let groups = leftover_groups(pool.pid());
    assert!(groups.is_empty(), "cgroups left behind: {groups:?}");
}

/// trimrun-<pid> directories left under our memory cgroup (v1) for this pid.
fn leftover_groups(pid: i32) -> Vec<String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let Some(rel) = own.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, c, path) = (p.next()?, p.next()?, p.next()?);
        c.split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    }) else {
        return vec![];
    };
    let dir = std::path::Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("trimrun-{pid}")))
                .collect()
        })
        .unwrap_or_default()
}

/// The pool's own v1 memory cgroup (`trimrun-<pid>`) under ours, if any.
fn pool_group(pid: i32) -> Option<std::path::PathBuf> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let rel = own.lines().find_map(|l| {
        let mut p = l.splitn(3, ':');
        let (_, c, path) = (p.next()?, p.next()?, p.next()?);
        c.split(',')
            .any(|c| c == "memory")
            .then(|| path.to_string())
    })?;
    let dir = std::path::Path::new("/sys/fs/cgroup/memory")
        .join(rel.trim_start_matches('/'))
        .join(format!("trimrun-{pid}"));
    dir.exists().then_some(dir)
}

/// A pool of `examples/app.py` with `args` and `env`, each worker in its own memory
/// cgroup, all ready; None (said visibly, a failure under CI=true) without a writable
/// memory cgroup.
fn cgroup_pool(args: &[&str], env: &[(&str, &str)]) -> Option<Pool> {
    let app = example("app.py");
    let mut env = env.to_vec();
    env.insert(0, ("TRIMRUN_CGROUP", "auto"));
    let pool = Pool::start_env(args, &["python3", &app], &env);
    pool.wait_log("all workers ready", Duration::from_secs(30));
    if pool.log().contains("cgroup=none") {
        common::cannot_run("a writable memory cgroup (v1 or v2)");
        return None;
    }
    Some(pool)
}

/// A pool of leaking workers with the default settings, under load for `run_for` or
/// until `done` says so; returns (requests, failures, log, status).
fn leaking_pool(
    extra: &[&str],
    leak_kb: &str,
    clients: usize,
    pause: Duration,
    run_for: Duration,
    done: impl Fn(&Pool) -> bool,
) -> Option<(usize, Vec<String>, String, serde_json::Value)> {
    let mut pool = cgroup_pool(extra, &[("APP_LEAK_KB", leak_kb)])?;
    let load = Load::start(pool.port, clients, pause);
    let t0 = Instant::now();
    while t0.elapsed() < run_for && !done(&pool) {
        std::thread::sleep(Duration::from_millis(200));
    }
    let (ok, failures) = load.finish();
    let status = pool.status();
    pool.signal(libc::SIGTERM);
    assert_eq!(pool.wait_exit(Duration::from_secs(30)), Some(0));
    Some((ok, failures, pool.log(), status))
}

/// No failed request, no OOM kill, at least one recycle, at most `max_at_once` recycles
/// in progress at once.
fn assert_recycled_without_oom(
    what: &str,
    r: &(usize, Vec<String>, String, serde_json::Value),
    max_at_once: usize,
) {
    let (ok, failures, log, status) = r;
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("recycling worker"))
        .collect();
    println!(
        "{what}: {ok} requests, {} failed, {} recycles completed, oom_kills={}",
        failures.len(),
        log.matches("recycle complete").count(),
        status["oom_kills"]
    );
    assert!(
        failures.is_empty(),
        "{what}: {} failed requests: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(5)],
        notable.join("\n")
    );
    assert!(
        log.contains("recycle complete"),
        "{what}: no recycle:\n{log}"
    );
    assert!(
        !log.contains("OOM-killed"),
        "{what}: an OOM kill happened:\n{}",
        notable.join("\n")
    );
    assert_eq!(status["oom_kills"], 0);
    assert!(
        max_concurrent_recycles(log) <= max_at_once,
        "more than {max_at_once} recycles overlapped:\n{log}"
    );
}

#[test]
fn a_worker_growing_5_mib_s_under_160m_with_defaults_is_recycled_never_oom_killed() {
    if !common::is_root() {
        common::cannot_run("root (per-worker memory cgroups)");
        return;
    }
    // Issue 11's Flask case: 4 workers, --limit 160M, everything else default; 40
    // requests/s leaking 512 KiB each: ~5 MiB/s per worker, a life of ~30 s. 30 s of
    // load: the whole first generation (its recycles spread over one life) and the first
    // of the next.
    let Some(r) = leaking_pool(
        &["-n", "4", "--limit", "160M"],
        "512",
        4,
        Duration::from_millis(100),
        Duration::from_secs(30),
        |_| false,
    ) else {
        return;
    };
    assert_recycled_without_oom("4 x 160M at ~5 MiB/s", &r, 1);
}

#[test]
fn four_workers_at_10_mib_s_under_96m_with_defaults_have_no_oom_kill_and_no_failed_request() {
    if !common::is_root() {
        common::cannot_run("root (per-worker memory cgroups)");
        return;
    }
    // Issue 11's plain case: 4 workers, --limit 96M, defaults; 40 requests/s leaking 1 MiB
    // each: ~10 MiB/s per worker, each worker's life about 8 s. The issue measured 19 OOM
    // kills and 15 failed requests in 40 s. The first generation, started together, has
    // no growth history: what saves it is the policy's emergencies (a replacement started
    // past the gate, or a graceful stop before the ceiling, from a second of readings),
    // then the deadline schedule. 25 s of load: the first generation and two more.
    let Some((ok, failures, log, status)) = leaking_pool(
        &["-n", "4", "--limit", "96M"],
        "1024",
        4,
        Duration::from_millis(100),
        Duration::from_secs(25),
        |_| false,
    ) else {
        return;
    };
    let ooms: Vec<&str> = log.lines().filter(|l| l.contains("OOM-killed")).collect();
    println!(
        "4 x 96M at ~10 MiB/s: {ok} requests, {} failed, {} recycles completed, oom_kills={}, {} emergency stops, {} replacements past the gate",
        failures.len(),
        log.matches("recycle complete").count(),
        status["oom_kills"],
        log.matches("emergency stop").count(),
        log.matches("recycling worker past the gate").count(),
    );
    // A replacement started past the gate may overlap one admitted by it (never more:
    // twice --max-recycling).
    assert_recycled_without_oom(
        "4 x 96M at ~10 MiB/s",
        &(ok, failures, log.clone(), status),
        2,
    );
    assert!(ooms.is_empty(), "{}", ooms.join("\n"));
    // Each worker lives ~85 requests: ~12 recycles on a quiet machine, 7 seen with both
    // cores busy (fewer requests got through); at least the first generation's four.
    assert!(log.matches("recycle complete").count() >= 4, "{log}");
}

#[test]
fn a_pool_whose_ceilings_exceed_its_budget_stays_under_it() {
    if !common::is_root() {
        common::cannot_run("root (per-worker memory cgroups)");
        return;
    }
    // 4 workers under a 240 MiB budget: each worker's ceiling is 120 MiB (twice its fair
    // share), 480 MiB in all. The workers leak ~4 MiB/s each; the pool's own threshold
    // (90% of the budget) recycles the largest, one at a time, before the kernel's cap.
    let Some(mut pool) = cgroup_pool(
        &["-n", "4", "--pool-limit", "240M"],
        &[("APP_LEAK_KB", "256")],
    ) else {
        return;
    };
    let group = pool_group(pool.pid());
    if let Some(g) = &group {
        let cap: u64 = std::fs::read_to_string(g.join("memory.limit_in_bytes"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(cap, 240 << 20, "the pool group is the hard cap");
    }
    let load = Load::start(pool.port, 4, Duration::from_millis(60));
    wait_for(Duration::from_secs(120), || {
        (pool.log().contains("for_budget=true") && pool.count_log("recycle complete") >= 3)
            .then_some(())
    });
    let (ok, failures) = load.finish();
    let peak = group.as_ref().and_then(|g| {
        std::fs::read_to_string(g.join("memory.max_usage_in_bytes"))
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
    });
    let status = pool.status();
    pool.signal(libc::SIGTERM);
    assert_eq!(pool.wait_exit(Duration::from_secs(30)), Some(0));
    let log = pool.log();
    println!(
        "{ok} requests, {} failed, {} recycles, pool peak {:?} MiB of 240",
        failures.len(),
        log.matches("recycle complete").count(),
        peak.map(|p| p >> 20)
    );
    assert!(log.contains("pool budget"), "{log}");
    assert!(
        log.contains("for_budget=true"),
        "no recycle for the budget:\n{log}"
    );
    // Named for the budget in the log (and so in status and /metrics), not for a
    // threshold its worker never reached.
    assert!(
        log.lines()
            .any(|l| l.contains("recycling worker") && l.contains("reason=pool budget")),
        "{log}"
    );
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(!log.contains("OOM-killed"), "an OOM kill happened:\n{log}");
    assert_eq!(status["oom_kills"], 0);
    assert_eq!(max_concurrent_recycles(&log), 1);
}

#[test]
fn one_workers_burst_uses_room_the_others_leave_under_a_budget() {
    if !common::is_root() {
        common::cannot_run("root (per-worker memory cgroups)");
        return;
    }
    // 4 workers, 320 MiB budget: fair share 80 MiB, ceilings 160 MiB. One request holds
    // 110 MiB for 2 s: more than a hard 80 MiB split allows, well within the ceiling and
    // the room the idle others leave.
    let Some(mut pool) = cgroup_pool(&["-n", "4", "--pool-limit", "320M"], &[]) else {
        return;
    };
    let r = get(pool.port, "/burst?mb=110&s=2");
    let status = pool.status();
    pool.signal(libc::SIGTERM);
    assert_eq!(pool.wait_exit(Duration::from_secs(30)), Some(0));
    let log = pool.log();
    assert!(
        r.as_ref().is_ok_and(|b| b.contains("\"held_mb\": 110")),
        "{r:?}\n{log}"
    );
    assert!(!log.contains("OOM-killed"), "{log}");
    assert_eq!(status["oom_kills"], 0);
    // status --json shows the budget and the pool group's memory against it (the peak
    // saw the burst).
    let p = &status["pool"];
    assert_eq!(p["budget"].as_u64(), Some(320 << 20), "{status}");
    assert!(p["working_set"].as_u64().is_some_and(|w| w > 0), "{status}");
    assert!(
        p["peak"].as_u64().is_some_and(|w| w > 110 << 20),
        "{status}"
    );
    assert!(
        p["cgroup"]
            .as_str()
            .is_some_and(|c| c.ends_with(&format!("/trimrun-{}", pool.pid()))),
        "{status}"
    );
}

#[test]
fn an_oom_kill_at_the_pools_budget_is_logged_as_the_pools() {
    if !common::is_root() {
        common::cannot_run("root (per-worker memory cgroups)");
        return;
    }
    // 3 workers whose ceilings are the whole 128 MiB budget: one request asks for 130 MiB
    // at once, too fast for any reading. The kernel kills at the pool's cap while the
    // worker's own group is ~20 MiB (the two others) below its ceiling; the log must say
    // it was the pool that ran out, not the worker's limit (which reads as nonsense next
    // to its peak), and not call it a growth no schedule could have met.
    let Some(mut pool) = cgroup_pool(&["-n", "3", "--pool-limit", "128M", "--limit", "128M"], &[])
    else {
        return;
    };
    let r = get(pool.port, "/burst?mb=130&s=1");
    pool.wait_log("worker was OOM-killed", Duration::from_secs(30));
    pool.signal(libc::SIGTERM);
    assert_eq!(pool.wait_exit(Duration::from_secs(30)), Some(0));
    let log = pool.log();
    let line = log
        .lines()
        .find(|l| l.contains("worker was OOM-killed"))
        .unwrap();
    assert!(
        r.is_err(),
        "130 MiB fitted in a 128 MiB budget: {r:?}\n{log}"
    );
    assert!(
        line.contains("at the pool's budget (--pool-limit), below its own limit"),
        "{line}\n{log}"
    );
    assert!(
        !log.contains("no recycle schedule could have prevented"),
        "{log}"
    );
}

#[test]
fn a_replacement_that_does_not_fit_beside_its_worker_is_started_after_it_stops() {
    if !common::is_root() {
        common::cannot_run("root (per-worker memory cgroups)");
        return;
    }
    // 2 workers (~20 MiB each once serving) under a 64 MiB budget, leaking ~2 MiB/s each:
    // a replacement (~20 MiB at its start) never fits beside both under the pool's reclaim
    // line, however early the policy recycles, so every recycle is stop-first (the other
    // worker serves meanwhile). (At 96 MiB whether it fitted depended on how early the
    // policy acted, which a quiet machine and a busy one answer differently.) Until two
    // stop-first recycles have completed (~6 s each), at most 60 s.
    let Some(r) = leaking_pool(
        &["-n", "2", "--pool-limit", "64M"],
        "128",
        2,
        Duration::from_millis(60),
        Duration::from_secs(60),
        |pool| pool.count_log("stop-first recycle: the old worker is gone") >= 2,
    ) else {
        return;
    };
    let (_, failures, log, status) = &r;
    println!(
        "{} stop-first recycles, {} failed, oom_kills={}",
        log.matches("stop_first=true").count(),
        failures.len(),
        status["oom_kills"]
    );
    assert!(
        log.contains("stop_first=true"),
        "no stop-first recycle:\n{log}"
    );
    assert!(
        log.contains("stop-first recycle: the old worker is gone"),
        "{log}"
    );
    let notable: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR") || l.contains("recycling worker"))
        .collect();
    assert!(
        failures.is_empty(),
        "{:?}",
        &failures[..failures.len().min(5)]
    );
    assert_eq!(status["oom_kills"], 0, "{}", notable.join("\n"));
}
