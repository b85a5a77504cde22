//! The watchdog (`--timeout`, issue 17) on the real kernel: Python workers that speak
//! sd_notify's watchdog protocol (tests/progs/watchdog_worker.py), one that deadlocks under
//! load, one that hangs at every start, and pools where nothing must change.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pool::*;
use common::python::*;
use common::wait_for;

fn prog() -> String {
    format!(
        "{}/tests/progs/watchdog_worker.py",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// Numbers from a log line's `key=value` fields.
fn field(line: &str, key: &str) -> Option<i64> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    line[at..]
        .split(|c: char| !c.is_ascii_digit() && c != '-')
        .next()?
        .parse()
        .ok()
}

fn env_of(port: u16) -> serde_json::Value {
    serde_json::from_str(&get(port, "/env").unwrap()).unwrap()
}

/// Clients hammering the pool until stopped: (ok count, failures).
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failures) = (stop.clone(), ok.clone(), failures.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match get(port, "/") {
                            Ok(_) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
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

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    fn wait_ok(&self, at_least: usize, timeout: Duration) {
        assert!(
            wait_for(timeout, || (self.ok() >= at_least).then_some(())).is_some(),
            "only {} requests served in {timeout:?}",
            self.ok()
        );
    }

    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let failures = self.failures.lock().unwrap().clone();
        (self.ok.load(Ordering::Relaxed), failures)
    }
}

#[test]
fn bad_watchdog_flags_are_one_clear_line_and_exit_2() {
    for (args, want) in [
        (&["--timeout", "10ms"][..], "between 100ms and 24h"),
        (&["--timeout", "soon"][..], "invalid --timeout"),
        (&["--timeout-signal", "NOPE"][..], "--timeout-signal"),
    ] {
        let out = std::process::Command::new(BIN)
            .args(args)
            .args(["--", "true"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

/// The first test: slot 0's first worker deadlocks in its 30th request. It is
/// found, its stack is dumped, it is replaced, and the other workers serve everything else.
#[test]
fn worker_that_deadlocks_is_dumped_killed_and_replaced_while_the_others_serve() {
    let metrics_port = free_port();
    let metrics = format!("127.0.0.1:{metrics_port}");
    let pool = Pool::start_env(
        &[
            "-n",
            "3",
            "--timeout",
            "2s",
            "--ready",
            "notify",
            "--metrics",
            &metrics,
        ],
        &["python3", &prog()],
        &[("WD_HANG_AFTER", "30")],
    );
    pool.wait_log("all workers ready", Duration::from_secs(20));
    let load = Load::start(pool.port, 4);
    pool.wait_log("missed its watchdog", Duration::from_secs(60));
    let hung_at = load.ok();
    // The replacement of slot 0 (generation 1) becomes ready.
    let replaced = wait_for(Duration::from_secs(30), || {
        let s = pool.status();
        s["workers"]
            .as_array()?
            .iter()
            .any(|w| w["slot"] == 0 && w["generation"] == 1 && w["state"] == "ready")
            .then_some(s)
    });
    assert!(replaced.is_some(), "no ready replacement:\n{}", pool.log());
    // Load goes on through and after the replacement.
    load.wait_ok(hung_at + 300, Duration::from_secs(60));
    let (ok, failures) = load.finish();
    let log = pool.log();
    // Only the request the hung worker held may have failed.
    assert!(
        failures.len() <= 1,
        "{} failed requests of {ok}, e.g. {:?}\n{log}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // The report: once, for slot 0, not before a whole timeout of silence.
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("missed its watchdog"))
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert_eq!(field(lines[0], "slot"), Some(0), "{}", lines[0]);
    assert!(
        field(lines[0], "silent_ms").unwrap() >= 2000,
        "{}",
        lines[0]
    );
    // faulthandler's dump of the stuck thread, written by the worker on SIGABRT.
    assert!(log.contains("Fatal Python error: Aborted"), "{log}");
    assert!(log.contains("in hang_forever"), "{log}");
    assert!(log.contains("killed by SIGABRT"), "{log}");
    // Status and metrics.
    let s = pool.status();
    assert_eq!(s["timeouts"], 1, "{s}");
    let m = get(metrics_port, "/metrics").unwrap();
    assert!(
        m.contains("trimrun_worker_timeouts_total{slot=\"0\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("trimrun_recycles_total{slot=\"0\",reason=\"timeout\"} 1"),
        "{m}"
    );
}

/// Workers that keep their watchdog are left alone, and see the environment systemd gives;
/// without `--timeout` nothing of the watchdog exists.
#[test]
fn keepalives_keep_workers_running_and_no_timeout_changes_nothing() {
    let with = Pool::start(
        &["-n", "2", "--timeout", "1s", "--ready", "notify"],
        &["python3", &prog()],
    );
    let without = Pool::start(
        &["-n", "2", "--ready", "delay:300ms"],
        &["python3", &prog()],
    );
    with.wait_log("all workers ready", Duration::from_secs(20));
    without.wait_log("all workers ready", Duration::from_secs(20));
    let (w0, n0) = (with.workers(), without.workers());
    let v = env_of(with.port);
    assert_eq!(v["WATCHDOG_USEC"], "1000000", "{v}");
    assert_eq!(v["WATCHDOG_PID"].as_str().unwrap(), v["pid"].to_string());
    let v = env_of(without.port);
    assert!(v["WATCHDOG_USEC"].is_null(), "{v}");
    assert!(v["WATCHDOG_PID"].is_null(), "{v}");
    assert!(v["NOTIFY_SOCKET"].is_null(), "{v}");
    // Many timeouts long, with and without requests (the keep-alives come from the
    // serving loop, whether or not it serves).
    let load = Load::start(with.port, 2);
    load.wait_ok(200, Duration::from_secs(30));
    let (_, failures) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");
    std::thread::sleep(Duration::from_secs(3));
    for p in [&with, &without] {
        assert!(!p.log().contains("missed its watchdog"), "{}", p.log());
        assert!(!p.log().contains("worker exited"), "{}", p.log());
    }
    assert_eq!(with.workers(), w0, "{}", with.log());
    assert_eq!(without.workers(), n0, "{}", without.log());
    assert_eq!(with.status()["timeouts"], 0);
}

/// A deploy whose workers hang right after start: each is replaced after a growing,
/// jittered delay, never in a tight loop.
#[test]
fn worker_that_hangs_at_every_start_is_backed_off_with_jitter() {
    let pool = Pool::start_env(
        &["-n", "2", "--timeout", "200ms", "--ready", "notify"],
        &["python3", &prog()],
        &[("WD_HANG_AT_START", "1")],
    );
    let delays = |log: &str| -> HashMap<i64, Vec<i64>> {
        let mut by_slot: HashMap<i64, Vec<i64>> = HashMap::new();
        for l in log
            .lines()
            .filter(|l| l.contains("replacing the hung worker"))
        {
            by_slot
                .entry(field(l, "slot").unwrap())
                .or_default()
                .push(field(l, "delay_ms").unwrap());
        }
        by_slot
    };
    let got = wait_for(Duration::from_secs(60), || {
        let d = delays(&pool.log());
        (d.len() == 2 && d.values().all(|v| v.len() >= 5)).then_some(d)
    });
    let log = pool.log();
    let d = got.unwrap_or_else(|| panic!("fewer than 5 backoffs per slot:\n{log}"));
    for (slot, v) in &d {
        // The first hang is replaced at once; after that never a tight loop: each delay
        // at least the base, and the ceiling doubles, so every delay is longer than the
        // one two before it.
        assert_eq!(v[0], 0, "slot {slot}: {v:?}");
        assert!(v[1..].iter().all(|&x| x >= 100), "slot {slot}: {v:?}");
        for k in 0..v.len() - 2 {
            assert!(v[k + 2] > v[k], "slot {slot}: {v:?}");
        }
    }
    // Jitter: two slots hanging together are not replaced in lockstep.
    assert_ne!(d[&0][1..5], d[&1][1..5], "{d:?}");
    assert!(log.contains("never sent WATCHDOG=1"), "{log}");
}

// ----- trimrun_worker (python/) ------------------------------------------------------------

/// One `python -m trimrun_worker` worker serving tests/apps/stuck_app.py's `attr`.
fn stuck_app_pool(timeout: &str, interface: &str, attr: &str) -> Pool {
    stuck_app_pool_with(timeout, interface, attr, &[])
}

fn stuck_app_pool_with(timeout: &str, interface: &str, attr: &str, extra: &[&str]) -> Pool {
    let apps = format!("{}/tests/apps", env!("CARGO_MANIFEST_DIR"));
    let app = format!("stuck_app:{attr}");
    let mut args = vec!["-n", "1", "--timeout", timeout, "--ready", "notify"];
    args.extend_from_slice(extra);
    let pool = Pool::start_env(
        &args,
        &[
            "python3",
            "-m",
            "trimrun_worker",
            "--app-dir",
            &apps,
            "--interface",
            interface,
            "--threads",
            "2",
            &app,
        ],
        &[("PYTHONPATH", &python_dir())],
    );
    pool.wait_log("all workers ready", Duration::from_secs(30));
    pool
}

/// Requests that never get an answer from a stuck worker, sent from threads (each fails
/// once its worker is killed).
fn send_and_forget(port: u16, path: &'static str, n: usize) {
    for _ in 0..n {
        std::thread::spawn(move || {
            let _ = get(port, path);
        });
    }
}

#[test]
fn trimrun_worker_keepalive_logic_unit_tests_pass() {
    let out = std::process::Command::new("python3")
        .args(["-m", "unittest", "discover", "-s"])
        .arg(format!("{}/tests", python_dir()))
        .env("PYTHONPATH", python_dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// WSGI: every request thread stuck → the event loop stops sending WATCHDOG=1 → replaced,
/// with every thread's stack in the log.
#[test]
fn trimrun_worker_whose_every_request_thread_is_stuck_is_replaced() {
    if !have_python_deps("waitress") {
        return;
    }
    let pool = stuck_app_pool("1s", "wsgi", "app");
    let first = pool.workers();
    // Keep-alives flow while it serves, and while it idles: several timeouts long.
    for _ in 0..20 {
        get(pool.port, "/").unwrap();
    }
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !pool.log().contains("missed its watchdog"),
        "{}",
        pool.log()
    );
    send_and_forget(pool.port, "/stuck", 2);
    pool.wait_log("missed its watchdog", Duration::from_secs(30));
    let answered = wait_for(Duration::from_secs(30), || {
        get(pool.port, "/")
            .ok()
            .filter(|b| !b.contains(&first[0].to_string()))
    });
    assert!(answered.is_some(), "no new worker answers:\n{}", pool.log());
    let log = pool.log();
    // faulthandler (enabled by trimrun_worker) dumped both stuck threads.
    assert!(
        log.matches("in stuck_forever").count() >= 2,
        "both stuck threads in the dump:\n{log}"
    );
}

/// WSGI: one stuck thread among healthy ones is NOT a hang (documented limit): the other
/// thread keeps finishing requests, so the keep-alives go on.
#[test]
fn trimrun_worker_with_one_stuck_thread_among_healthy_ones_keeps_running() {
    if !have_python_deps("waitress") {
        return;
    }
    let pool = stuck_app_pool("1s", "wsgi", "app");
    let first = pool.workers();
    send_and_forget(pool.port, "/stuck", 1);
    // Several timeouts long, serving on the other thread.
    let load = Load::start(pool.port, 1);
    load.wait_ok(100, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let (_, failures) = load.finish();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(
        !pool.log().contains("missed its watchdog"),
        "{}",
        pool.log()
    );
    assert_eq!(pool.workers(), first);
}

/// ASGI: a blocked event loop stops uvicorn's ticks, so the keep-alives → replaced.
#[test]
fn trimrun_worker_whose_event_loop_is_blocked_is_replaced() {
    if !have_python_deps("uvicorn") {
        return;
    }
    let pool = stuck_app_pool("1s", "asgi", "asgi");
    let first = pool.workers();
    get(pool.port, "/").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !pool.log().contains("missed its watchdog"),
        "{}",
        pool.log()
    );
    send_and_forget(pool.port, "/block", 1);
    pool.wait_log("missed its watchdog", Duration::from_secs(30));
    let answered = wait_for(Duration::from_secs(30), || {
        get(pool.port, "/")
            .ok()
            .filter(|b| !b.contains(&first[0].to_string()))
    });
    assert!(answered.is_some(), "no new worker answers:\n{}", pool.log());
    assert!(pool.log().contains("in block_forever"), "{}", pool.log());
}

/// trimrun under systemd's `WatchdogSec=`: its own loop sends WATCHDOG=1 to its manager;
/// the workers do not inherit the manager's watchdog.
#[test]
fn trimrun_keeps_its_own_managers_watchdog() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let pool = Pool::start_env(
        &["-n", "1", "--ready", "delay:200ms"],
        &["python3", &prog()],
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "300000"),
        ],
    );
    let mut keepalives = 0;
    let mut ready = false;
    while keepalives < 5 || !ready {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification from trimrun");
        let msg = String::from_utf8_lossy(&buf[..n]);
        keepalives += msg.lines().filter(|l| *l == "WATCHDOG=1").count();
        ready |= msg.contains("READY=1");
    }
    let v = env_of(pool.port);
    assert!(v["WATCHDOG_USEC"].is_null(), "{v}");
    assert!(v["NOTIFY_SOCKET"].is_null(), "{v}");
}

/// With `--preload` the workers are forks of a zygote: they get the watchdog too.
#[test]
fn trimrun_worker_forked_from_the_zygote_is_watched_too() {
    if !have_python_deps("waitress") {
        return;
    }
    let pool = stuck_app_pool_with("1s", "wsgi", "app", &["--preload"]);
    let v = get(pool.port, "/").unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    assert!(
        !pool.log().contains("missed its watchdog"),
        "{}",
        pool.log()
    );
    send_and_forget(pool.port, "/stuck", 2);
    pool.wait_log("missed its watchdog", Duration::from_secs(30));
    let answered = wait_for(Duration::from_secs(30), || {
        get(pool.port, "/").ok().filter(|b| *b != v)
    });
    assert!(answered.is_some(), "no new worker answers:\n{}", pool.log());
    assert!(pool.log().contains("in stuck_forever"), "{}", pool.log());
}
