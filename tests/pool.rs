//! The pool launcher end to end: the real binary, real Python workers, real sockets and
//! signals (issue 2).

mod common;

use std::collections::HashSet;
use std::io::{Read, Write};

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{example, wait_for};

use common::pool::*;

fn served_pid(port: u16) -> i32 {
    let body = get(port, "/pid").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["pid"].as_i64().unwrap() as i32
}

#[test]
fn every_worker_answers_on_one_port() {
    let pool = Pool::app(3, &[]);
    let workers: HashSet<i32> = pool.workers().into_iter().collect();
    assert_eq!(workers.len(), 3, "{}", pool.log());
    let mut seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.len() < 3 && Instant::now() < deadline {
        seen.insert(served_pid(pool.port));
    }
    assert_eq!(
        seen, workers,
        "every worker answers, and only workers answer"
    );
}

#[test]
fn worker_sees_its_own_pid_in_listen_pid_and_a_listening_fd3() {
    let pool = Pool::app(2, &[]);
    let v: serde_json::Value = serde_json::from_str(&get(pool.port, "/env").unwrap()).unwrap();
    assert_eq!(v["LISTEN_PID"].as_str().unwrap(), v["pid"].to_string());
    assert_eq!(v["LISTEN_FDS"], "1");
    assert_eq!(v["LISTEN_FDNAMES"], "http");
    assert_eq!(v["fd3"]["listening"], true);
    assert_eq!(v["fd3"]["family"], libc::AF_INET);
    let slot: usize = v["TRIMRUN_WORKER_ID"].as_str().unwrap().parse().unwrap();
    assert!(slot < 2);
    assert_eq!(v["TRIMRUN_WORKER_GENERATION"], "0");
}

#[test]
fn hup_rolls_every_worker_without_a_failed_request() {
    let pool = Pool::app(3, &["--ready", "delay:500ms", "--graceful-timeout", "10s"]);
    let before: HashSet<i32> = pool.workers().into_iter().collect();
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (stop, ok, failures, port) =
                (stop.clone(), ok.clone(), failures.clone(), pool.port);
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
    wait_for(Duration::from_secs(30), || {
        (ok.load(Ordering::Relaxed) > 300).then_some(())
    });
    pool.signal(libc::SIGHUP);
    pool.wait_log("rolling restart complete", Duration::from_secs(60));
    // Keep the load on until at least 2,000 requests went through in all.
    wait_for(Duration::from_secs(60), || {
        (ok.load(Ordering::Relaxed) >= 2000).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failures = failures.lock().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed requests, e.g. {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(ok.load(Ordering::Relaxed) >= 2000);
    let after: HashSet<i32> = pool.workers().into_iter().collect();
    assert_eq!(after.len(), 3, "{}", pool.log());
    assert!(
        before.is_disjoint(&after),
        "every worker pid is new: before {before:?} after {after:?}"
    );
}

#[test]
fn killed_worker_is_replaced_within_a_second() {
    let pool = Pool::app(2, &["--ready", "delay:200ms"]);
    let before = pool.workers();
    let victim = before[0];
    // SAFETY: SIGKILL to a worker of this test's pool.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let t0 = Instant::now();
    let replaced = wait_for(Duration::from_secs(5), || {
        let now = pool.workers();
        (now.len() == 2 && !now.contains(&victim)).then_some(t0.elapsed())
    })
    .expect("worker replaced");
    assert!(
        replaced < Duration::from_secs(1),
        "replaced after {replaced:?}"
    );
    pool.wait_log("killed by SIGKILL", Duration::from_secs(2));
}

#[test]
fn crash_loop_backs_off_and_term_stays_prompt() {
    let mut pool = Pool::start(&["-n", "2"], &["sh", "-c", "exit 3"]);
    // The delays grow (base 100 ms, doubling): wait until one of at least 800 ms is set,
    // whatever the machine's speed, rather than counting starts in a wall-clock window.
    let delays = |log: &str| -> Vec<u64> {
        log.lines()
            .filter(|l| l.contains("backing off"))
            .filter_map(|l| {
                l.split("delay_ms=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .collect()
    };
    wait_for(Duration::from_secs(60), || {
        delays(&pool.log()).iter().any(|d| *d >= 800).then_some(())
    })
    .unwrap_or_else(|| panic!("no growing backoff:\n{}", pool.log()));
    let starts = pool.count_log("worker started");
    // Without backoff two workers would have restarted thousands of times by now.
    assert!(starts <= 30, "{starts} starts:\n{}", pool.log());
    assert!(
        pool.log().contains("exit code 3"),
        "the log says why a worker ended"
    );
    // TERM during a backoff: trimrun exits without waiting for it or starting anyone.
    pool.signal(libc::SIGTERM);
    assert_eq!(
        pool.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        pool.log()
    );
    let log = pool.log();
    let after_term = log.split("graceful shutdown").nth(1).unwrap_or("");
    assert!(
        !after_term.contains("worker started"),
        "a worker was started after TERM:\n{log}"
    );
}

#[test]
fn term_exits_zero_and_leaves_no_process() {
    let mut pool = Pool::app(3, &[]);
    let workers = pool.workers();
    assert_eq!(workers.len(), 3);
    pool.signal(libc::SIGTERM);
    assert_eq!(
        pool.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        pool.log()
    );
    for w in workers {
        assert!(!alive(w), "worker {w} still alive after trimrun exited");
    }
}

#[test]
fn worker_ignoring_term_is_killed_after_the_graceful_timeout() {
    let mut pool = Pool::ignoring_term(2, "1s");
    let workers = pool.workers();
    pool.signal(libc::SIGTERM);
    let t0 = Instant::now();
    assert_eq!(
        pool.wait_exit(Duration::from_secs(10)),
        Some(0),
        "{}",
        pool.log()
    );
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "killed before the graceful timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(pool.log().contains("SIGKILL"));
    for w in workers {
        assert!(!alive(w));
    }
}

#[test]
fn second_term_kills_at_once() {
    let mut pool = Pool::ignoring_term(1, "60s");
    let workers = pool.workers();
    pool.signal(libc::SIGTERM);
    pool.wait_log("graceful shutdown", Duration::from_secs(5));
    pool.signal(libc::SIGINT);
    assert_eq!(
        pool.wait_exit(Duration::from_secs(5)),
        Some(130),
        "{}",
        pool.log()
    );
    for w in workers {
        assert!(!alive(w));
    }
}

#[test]
fn quit_is_a_fast_shutdown() {
    let mut pool = Pool::ignoring_term(2, "60s");
    pool.signal(libc::SIGQUIT);
    assert_eq!(
        pool.wait_exit(Duration::from_secs(5)),
        Some(0),
        "{}",
        pool.log()
    );
}

#[test]
fn ttin_and_ttou_scale_by_one_never_below_one() {
    let pool = Pool::app(1, &["--ready", "delay:200ms"]);
    pool.signal(libc::SIGTTIN);
    wait_for(Duration::from_secs(5), || {
        (pool.workers().len() == 2).then_some(())
    })
    .expect("scaled up to 2");
    pool.signal(libc::SIGTTOU);
    wait_for(Duration::from_secs(10), || {
        (pool.workers().len() == 1).then_some(())
    })
    .expect("scaled down to 1");
    pool.signal(libc::SIGTTOU);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(pool.workers().len(), 1, "never below one worker");
    get(pool.port, "/").unwrap();
}

#[test]
fn usr1_is_forwarded_to_every_worker() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("usr1");
    // Ready (by sd_notify) only once the handler is in place: no race with start-up.
    let script = format!(
        "import os,signal,socket,time\n\
         def h(s,f): open('{}-%d' % os.getpid(), 'w').close()\n\
         signal.signal(signal.SIGUSR1, h)\n\
         s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
         s.connect(os.environ['NOTIFY_SOCKET'])\n\
         s.send(b'READY=1')\n\
         time.sleep(1000)",
        marker.display()
    );
    let pool = Pool::start(
        &["-n", "2", "--ready", "notify"],
        &["python3", "-c", &script],
    );
    pool.wait_log("all workers ready", Duration::from_secs(30));
    let workers = pool.workers();
    pool.signal(libc::SIGUSR1);
    for w in workers {
        let p = PathBuf::from(format!("{}-{w}", marker.display()));
        wait_for(Duration::from_secs(5), || p.exists().then_some(()))
            .unwrap_or_else(|| panic!("worker {w} got no USR1"));
    }
}

#[test]
fn ready_notify_waits_for_ready_1_from_the_worker() {
    // The example app sends READY=1; a worker that never does is not ready, and is
    // stopped after --ready-timeout.
    let pool = Pool::app(2, &["--ready", "notify"]);
    assert!(pool.log().contains("worker ready"));
    let silent = Pool::start(
        &["-n", "1", "--ready", "notify", "--ready-timeout", "1s"],
        &["sleep", "100"],
    );
    silent.wait_log("not ready in time", Duration::from_secs(10));
    assert!(!silent.log().contains("all workers ready"));
}

#[test]
fn trimrun_speaks_sd_notify_to_its_own_manager() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let app = example("app.py");
    let mut pool = Pool::start_env(
        &["-n", "2", "--ready", "delay:200ms"],
        &["python3", &app],
        &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())],
    );
    let recv = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let first = recv();
    assert!(
        first.contains("READY=1") && first.contains("STATUS=2/2 workers ready"),
        "{first}"
    );
    pool.signal(libc::SIGHUP);
    let reloading = recv();
    assert!(
        reloading.contains("RELOADING=1") && reloading.contains("MONOTONIC_USEC="),
        "{reloading}"
    );
    let again = recv();
    assert!(
        again.contains("READY=1"),
        "READY=1 again once the roll is done: {again}"
    );
    pool.signal(libc::SIGTERM);
    assert!(recv().contains("STOPPING=1"));
    assert_eq!(pool.wait_exit(Duration::from_secs(10)), Some(0));
}

/// One clear line, exit code 2, and no worker started.
fn assert_bad_input(args: &[&str], want: &str) {
    let out = Command::new(BIN)
        .args(args)
        .env("TRIMRUN_CGROUP", "none")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert!(
        stderr.to_lowercase().contains(&want.to_lowercase()),
        "{args:?}: {stderr}"
    );
    assert!(
        !stderr.contains("worker started"),
        "{args:?} started a worker: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_input_is_one_clear_line_and_exit_2() {
    let app = example("app.py");
    assert_bad_input(&["-n", "0", "--", "python3", &app], "at least 1 worker");
    assert_bad_input(
        &["--no-such-flag", "--", "python3", &app],
        "unexpected argument",
    );
    assert_bad_input(&["-n", "2"], "CMD");
    assert_bad_input(&["--", "no-such-command-xyz"], "command not found");
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("not-a-program");
    std::fs::write(&plain, "data").unwrap();
    assert_bad_input(&["--", plain.to_str().unwrap()], "not executable");
    assert_bad_input(
        &["--bind", "localhost:http", "--", "python3", &app],
        "HOST:PORT",
    );
    assert_bad_input(&["--limit", "12Q", "--", "python3", &app], "512M");
    assert_bad_input(
        &["--graceful-timeout", "soon", "--", "python3", &app],
        "30s",
    );
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    assert_bad_input(
        &["--bind", &addr, "--", "python3", &app],
        "another process listens there",
    );
}

#[test]
fn unix_socket_bind_serves_and_is_removed_on_exit() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.sock");
    let app = example("app.py");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(BIN)
        .args(["-n", "1", "--ready", "delay:200ms", "--bind-mode", "600"])
        .arg("--bind")
        .arg(format!("unix:{}", path.display()))
        .args(["--", "python3", &app])
        .env("TRIMRUN_CGROUP", "none")
        .env("TRIMRUN_CONTROL", dir.path().join("ctl.sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child.id() as i32);
    let body = wait_for(Duration::from_secs(20), || {
        let mut s = std::os::unix::net::UnixStream::connect(&path).ok()?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
        let mut b = String::new();
        s.read_to_string(&mut b).ok()?;
        b.contains("hello from").then_some(b)
    });
    assert!(
        body.is_some(),
        "{}",
        std::fs::read_to_string(dir.path().join("log")).unwrap()
    );
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // SAFETY: SIGTERM to our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert!(!path.exists(), "the socket file is removed on exit");
}

#[test]
fn systemd_socket_activation_passes_the_inherited_socket_on() {
    if Command::new("systemd-socket-activate")
        .arg("--help")
        .output()
        .is_err()
    {
        common::cannot_run("systemd-socket-activate (apt-get install systemd)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let app = example("app.py");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    // systemd-socket-activate passes on only the environment it is told to: the control
    // socket and the backend go as flags, so this pool never takes the default socket.
    let ctl = dir.path().join("ctl.sock");
    let mut child = Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--fdname=web")
        .args([
            BIN,
            "-n",
            "2",
            "--ready",
            "delay:200ms",
            "--cgroup",
            "none",
            "--control",
            ctl.to_str().unwrap(),
            "--",
            "python3",
            &app,
        ])
        .env("TRIMRUN_CGROUP", "none")
        .env("TRIMRUN_CONTROL", dir.path().join("ctl.sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child.id() as i32);
    // systemd-socket-activate execs trimrun on the first connection.
    let body = wait_for(Duration::from_secs(20), || get(port, "/env").ok());
    let log = || std::fs::read_to_string(dir.path().join("log")).unwrap();
    let body = body.unwrap_or_else(|| panic!("no answer:\n{}", log()));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        v["LISTEN_PID"].as_str().unwrap(),
        v["pid"].to_string(),
        "LISTEN_PID is the worker's own"
    );
    assert_eq!(v["LISTEN_FDNAMES"], "web", "the fd name is passed on");
    assert_eq!(v["fd3"]["listening"], true);
    assert!(log().contains("(systemd)"), "{}", log());
    // SAFETY: SIGTERM to our child (trimrun, exec'ed by systemd-socket-activate).
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

#[test]
fn as_pid_1_in_its_own_namespace_it_serves_reaps_orphans_and_exits_cleanly() {
    if !common::is_root() {
        common::cannot_run("root (unshare --pid)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let app = example("app.py");
    // Each worker leaves an orphan that exits quickly: PID 1 must reap it.
    let cmd = format!("(sleep 0.3 &) ; exec python3 {app}");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new("unshare")
        .args([
            "--pid",
            "--fork",
            "--mount-proc",
            BIN,
            "-n",
            "2",
            "--ready",
            "notify",
        ])
        .arg("--bind")
        .arg(format!("127.0.0.1:{port}"))
        .args(["--", "sh", "-c", &cmd])
        .env("TRIMRUN_CGROUP", "none")
        .env("TRIMRUN_CONTROL", dir.path().join("ctl.sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child.id() as i32);
    let log = || std::fs::read_to_string(dir.path().join("log")).unwrap();
    wait_for(Duration::from_secs(20), || get(port, "/").ok())
        .unwrap_or_else(|| panic!("{}", log()));
    // trimrun is unshare's child (PID 1 inside).
    let trimrun = wait_for(Duration::from_secs(5), || {
        children(child.id() as i32).first().copied()
    })
    .unwrap();
    // The orphans (`sleep 0.3`) end soon after the start; PID 1 must reap them.
    let zombies = || -> Vec<i32> {
        children(trimrun)
            .into_iter()
            .filter(|p| !alive(*p) && std::path::Path::new(&format!("/proc/{p}")).exists())
            .collect()
    };
    let reaped = wait_for(Duration::from_secs(20), || {
        // Only the two workers left: the orphans exited and were reaped.
        let orphan_gone = children(trimrun).len() <= 2;
        (orphan_gone && zombies().is_empty()).then_some(())
    });
    assert!(
        reaped.is_some(),
        "unreaped zombies under PID 1: {:?}",
        zombies()
    );
    // SAFETY: SIGTERM to trimrun (PID 1 of its namespace) from the parent namespace.
    unsafe { libc::kill(trimrun, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", log());
    assert!(log().contains("trimrun stopped"));
}

#[test]
fn without_a_cgroup_a_worker_over_its_limit_is_killed_and_replaced() {
    let pool = Pool::app(
        2,
        &["--limit", "48M", "--trim", "off", "--ready", "delay:300ms"],
    );
    let before = pool.workers();
    // One worker grows past 48 MiB and stays there (held for 30 s, also through a
    // recycle the policy may start while it grows: a draining worker over its limit is
    // killed too); with --cgroup none only trimrun can stop it. An answer, if any, names
    // the worker; else the victim is the worker that went.
    let answered = get(pool.port, "/burst?mb=60&s=30")
        .ok()
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|v| v["pid"].as_i64())
        .map(|p| p as i32);
    pool.wait_log("no cgroup enforces it", Duration::from_secs(20));
    let now = wait_for(Duration::from_secs(10), || {
        let w = pool.workers();
        let gone = before.iter().filter(|p| !w.contains(p)).count();
        (w.len() == 2 && gone == 1).then_some(w)
    })
    .unwrap_or_else(|| panic!("not replaced, or not only the victim:\n{}", pool.log()));
    let victim = *before.iter().find(|p| !now.contains(p)).unwrap();
    if let Some(pid) = answered {
        assert_eq!(
            pid, victim,
            "a worker other than the one over its limit went"
        );
    }
}
