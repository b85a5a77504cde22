//! Hardening (issue 12): each way found to break the pool, kept fixed by a test named after
//! what it guards. The real binary, run as the tests' user (root where a test says so).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::pool::*;
use common::{example, wait_for};

/// Run trimrun with `args` until it exits (killed after `timeout`: a pool that should
/// have refused to start runs forever). (exit code, stderr).
fn run_bounded(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("err")).unwrap();
    let mut child = Command::new(BIN)
        .args(args)
        .env("TRIMRUN_CGROUP", "none")
        .env("NO_COLOR", "1")
        .env("TRIMRUN_CONTROL", dir.path().join("ctl.sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(child.id() as i32);
    let code = wait_for(timeout, || child.try_wait().unwrap()).map(|s| s.code().unwrap_or(-1));
    (
        code,
        std::fs::read_to_string(dir.path().join("err")).unwrap(),
    )
}

/// One clear line, exit code 2, and no worker started.
fn assert_bad_input(args: &[&str], want: &str) {
    let (code, stderr) = run_bounded(args, Duration::from_secs(20));
    assert_eq!(code, Some(2), "{args:?}: {stderr}");
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
fn values_that_cannot_work_are_refused_at_start_with_exit_2() {
    let app = example("app.py");
    assert_bad_input(
        &["--ready-timeout", "0s", "--", "python3", &app],
        "--ready-timeout",
    );
    assert_bad_input(
        &[
            "--ready",
            "delay:5s",
            "--ready-timeout",
            "2s",
            "--",
            "python3",
            &app,
        ],
        "--ready-timeout",
    );
    assert_bad_input(
        &[
            "--bind", "fd://3", "--bind", "fd://3", "--", "python3", &app,
        ],
        "more than once",
    );
    assert_bad_input(
        &[
            "--bind",
            "unix:/tmp/x.sock,unix:/tmp/x.sock",
            "--",
            "python3",
            &app,
        ],
        "more than once",
    );
    assert_bad_input(
        &["--limit", "1T", "--", "python3", &app],
        "bigger than what trimrun may use",
    );
    assert_bad_input(
        &["--max-lifetime", "0s", "--", "python3", &app],
        "--max-lifetime",
    );
}

/// Start trimrun with `args` (none backend, control socket and log in `dir`).
fn spawn_pool(dir: &std::path::Path, args: &[&str]) -> std::process::Child {
    let log = std::fs::File::create(dir.join("log")).unwrap();
    Command::new(BIN)
        .args(args)
        .env("TRIMRUN_CGROUP", "none")
        .env("NO_COLOR", "1")
        .env("TRIMRUN_CONTROL", dir.join("ctl.sock"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn read_log(dir: &std::path::Path) -> String {
    std::fs::read_to_string(dir.join("log")).unwrap_or_default()
}

/// The first worker of `pid` once it runs `exe_suffix` (it has exec'd).
fn worker_running(pid: i32, exe_suffix: &str) -> Option<i32> {
    children(pid).into_iter().find(|w| {
        std::fs::read_link(format!("/proc/{w}/exe"))
            .map(|p| p.to_string_lossy().ends_with(exe_suffix))
            .unwrap_or(false)
    })
}

/// A file the shell had open without close-on-exec (here at fd 7, 0600) never reaches a
/// worker: workers get 0, 1, 2 and their listeners, nothing else.
#[test]
fn workers_get_stdio_and_listeners_only_never_an_inherited_fd() {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "secret").unwrap();
    let f = std::fs::File::open(&secret).unwrap();
    let raw = f.as_raw_fd();
    let port = free_port().to_string();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "-n",
        "1",
        "--bind",
        &format!("127.0.0.1:{port}"),
        "--",
        "sleep",
        "300",
    ])
    .env("TRIMRUN_CGROUP", "none")
    .env("NO_COLOR", "1")
    .env("TRIMRUN_CONTROL", dir.path().join("ctl.sock"))
    .stdout(Stdio::null())
    .stderr(log);
    // SAFETY: only dup2(2), async-signal-safe, between fork and exec; `f` outlives spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(raw, 7) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    let worker = wait_for(Duration::from_secs(20), || worker_running(pid, "sleep"))
        .unwrap_or_else(|| panic!("no worker: {}", read_log(dir.path())));
    let fds = || {
        let mut fds: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{worker}/fd"))
            .unwrap()
            .flatten()
            .map(|e| {
                let n = e.file_name().to_string_lossy().parse().unwrap();
                let target = std::fs::read_link(e.path()).unwrap_or_default();
                (n, target.to_string_lossy().into_owned())
            })
            .collect();
        fds.sort();
        fds
    };
    // Right after exec the dynamic loader briefly holds a library open: wait for the
    // worker's own set.
    let settled = wait_for(Duration::from_secs(10), || {
        let now = fds();
        assert!(
            !now.iter().any(|(_, t)| t.contains("secret")),
            "the worker can read the shell's file: {now:?}"
        );
        (now.iter().map(|f| f.0).collect::<Vec<_>>() == [0, 1, 2, 3]).then_some(())
    });
    assert!(settled.is_some(), "fds of the worker: {:?}", fds());
    drop(f);
    let _ = child.kill();
    let _ = child.wait();
}

/// A python3 that an unprivileged user can run (the test's own may live under /root).
fn python_for_everyone() -> Option<&'static str> {
    ["/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3"]
        .into_iter()
        .find(|p| {
            Command::new("setpriv")
                .args([
                    "--reuid",
                    "65534",
                    "--regid",
                    "65534",
                    "--clear-groups",
                    p,
                    "-c",
                    "pass",
                ])
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// `--user nobody --group nogroup`: the worker runs as that user with no supplementary
/// group, still gets its listening socket and its notify socket, and is still trimmed by
/// trimrun (which keeps root).
#[test]
fn user_and_group_drop_the_workers_privileges_and_keep_notify_listen_and_trim() {
    if !common::is_root() {
        common::cannot_run("root (to drop a worker's privileges)");
        return;
    }
    let Some(python) = python_for_everyone() else {
        common::cannot_run("a python3 that uid 65534 can run (and setpriv)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let app = example("app.py");
    let mut child = spawn_pool(
        dir.path(),
        &[
            "-v",
            "-n",
            "1",
            "--bind",
            &format!("127.0.0.1:{port}"),
            "--user",
            "nobody",
            "--group",
            "65534",
            "--ready",
            "notify",
            "--ready-timeout",
            "30s",
            "--",
            python,
            &app,
        ],
    );
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    if wait_for(Duration::from_secs(30), || {
        read_log(dir.path())
            .contains("all workers ready")
            .then_some(())
    })
    .is_none()
    {
        panic!("not ready by sd_notify: {}", read_log(dir.path()));
    }
    let body = get(port, "/env").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let worker = v["pid"].as_i64().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{worker}/status")).unwrap();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), vec!["65534"; 4], "{status}");
    assert_eq!(field("Gid:"), vec!["65534"; 4], "{status}");
    assert!(
        field("Groups:").iter().all(|g| *g == "65534"),
        "supplementary groups reset: {status}"
    );
    // A trim can be deferred (no thread parked in a safe syscall at that instant, more
    // likely on a busy machine): ask again until one is done.
    let trimmed = wait_for(Duration::from_secs(60), || {
        let _ = Command::new(BIN)
            .args(["ctl", "--control"])
            .arg(dir.path().join("ctl.sock"))
            .args(["trim", "all"])
            .output();
        wait_for(Duration::from_secs(3), || {
            read_log(dir.path())
                .contains("trimmed slot=0")
                .then_some(())
        })
    });
    assert!(
        trimmed.is_some(),
        "the unprivileged worker was not trimmed: {}",
        read_log(dir.path())
    );
    // SAFETY: kill(2) of the trimrun this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let code = wait_for(Duration::from_secs(30), || child.try_wait().unwrap());
    assert_eq!(
        code.and_then(|s| s.code()),
        Some(0),
        "{}",
        read_log(dir.path())
    );
}

/// Without XDG_RUNTIME_DIR the notify sockets go in a fresh private directory of the temp
/// dir, never in `trimrun-<pid>` that someone else may have made first; one left by a
/// SIGKILLed trimrun is removed by the next start.
#[test]
fn notify_sockets_live_in_a_fresh_private_dir_and_a_killed_runs_dir_is_cleaned() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let app = example("app.py");
    let start = |tag: &str| {
        let port = free_port();
        let log = std::fs::File::create(dir.path().join(format!("log-{tag}"))).unwrap();
        // The shell's pid is trimrun's after exec: squat on the old predictable name.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"mkdir -m 777 "$TMPDIR/trimrun-$$" && exec "$@""#)
            .arg("sh")
            .arg(BIN)
            .args([
                "-n",
                "1",
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--ready",
                "notify",
            ])
            .arg("--")
            .args(["python3", &app])
            .env_remove("XDG_RUNTIME_DIR")
            .env("TMPDIR", &tmp)
            .env("TRIMRUN_CGROUP", "none")
            .env("NO_COLOR", "1")
            .env(
                "TRIMRUN_CONTROL",
                dir.path().join(format!("ctl-{tag}.sock")),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let log_path = dir.path().join(format!("log-{tag}"));
        let read = move || std::fs::read_to_string(&log_path).unwrap_or_default();
        if wait_for(Duration::from_secs(30), || {
            read().contains("all workers ready").then_some(())
        })
        .is_none()
        {
            panic!("not ready: {}", read());
        }
        (child, port)
    };
    let (mut first, port) = start("a");
    let guard = KillOnDrop(first.id() as i32);
    let v: serde_json::Value = serde_json::from_str(&get(port, "/env").unwrap()).unwrap();
    let sock = std::path::PathBuf::from(v["NOTIFY_SOCKET"].as_str().unwrap());
    let run_dir = sock.parent().unwrap().to_path_buf();
    assert_ne!(run_dir, tmp.join(format!("trimrun-{}", first.id())));
    assert_eq!(run_dir.parent().unwrap(), tmp);
    let m = std::fs::symlink_metadata(&run_dir).unwrap();
    assert!(m.is_dir());
    assert_eq!(m.mode() & 0o777, 0o700, "{}", run_dir.display());
    assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
    // SIGKILL: no code of ours runs, the directory stays; the next start removes it.
    first.kill().unwrap();
    first.wait().unwrap();
    drop(guard);
    assert!(run_dir.exists());
    let (second, _) = start("b");
    let _guard = KillOnDrop(second.id() as i32);
    assert!(
        !run_dir.exists(),
        "the killed run's directory {} is still there",
        run_dir.display()
    );
    let _ = std::fs::Permissions::from_mode(0o700);
}

/// Processes whose command line is exactly `sleep <arg>`.
fn sleeps_with(arg: &str) -> Vec<i32> {
    let want = format!("sleep\0{arg}\0");
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == want.as_bytes())
                && alive(*p)
        })
        .collect()
}

/// `--cgroup none`: a daemon a worker started in its own session (`setsid ... &`) dies when
/// its worker is recycled, and the next one's when trimrun stops.
#[test]
fn a_workers_daemonized_child_dies_with_it_without_a_cgroup() {
    let dir = tempfile::tempdir().unwrap();
    let tag = format!("{}", 60000 + std::process::id() % 5000);
    let script = format!("setsid sleep {tag} & exec sleep 300");
    let mut child = spawn_pool(
        dir.path(),
        &[
            "-n",
            "1",
            "--ready",
            "delay:200ms",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    let first = wait_for(Duration::from_secs(20), || {
        read_log(dir.path())
            .contains("all workers ready")
            .then_some(())?;
        sleeps_with(&tag).first().copied()
    })
    .unwrap_or_else(|| panic!("no daemon: {}", read_log(dir.path())));
    let out = Command::new(BIN)
        .args(["ctl", "--control"])
        .arg(dir.path().join("ctl.sock"))
        .args(["recycle", "0"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dead = wait_for(Duration::from_secs(20), || (!alive(first)).then_some(()));
    let second = wait_for(Duration::from_secs(20), || {
        sleeps_with(&tag).into_iter().find(|p| *p != first)
    });
    // SAFETY: kill(2) of the trimrun this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let code = wait_for(Duration::from_secs(30), || child.try_wait().unwrap());
    let left = wait_for(Duration::from_secs(10), || {
        sleeps_with(&tag).is_empty().then_some(())
    });
    for p in sleeps_with(&tag) {
        // SAFETY: kill(2) of a process this test's pool started.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let log = read_log(dir.path());
    assert!(
        dead.is_some(),
        "the recycled worker's daemon {first} survived: {log}"
    );
    assert!(second.is_some(), "the new worker started no daemon: {log}");
    assert_eq!(code.and_then(|s| s.code()), Some(0), "{log}");
    assert!(left.is_some(), "a daemon survived trimrun's exit: {log}");
}

/// `--control new/dir/x.sock` creates `new/dir/`; a clean exit removes what it created.
#[test]
fn a_control_directory_trimrun_created_is_removed_at_exit() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("new/dir/x.sock");
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = Command::new(BIN)
        .args(["-n", "1", "--ready", "delay:100ms", "--control"])
        .arg(&sock)
        .args(["--", "sleep", "300"])
        .env("TRIMRUN_CGROUP", "none")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    if wait_for(Duration::from_secs(20), || {
        read_log(dir.path())
            .contains("all workers ready")
            .then_some(())
    })
    .is_none()
    {
        panic!("not ready: {}", read_log(dir.path()));
    }
    assert!(sock.exists());
    // SAFETY: kill(2) of the trimrun this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let code = wait_for(Duration::from_secs(30), || child.try_wait().unwrap());
    assert_eq!(
        code.and_then(|s| s.code()),
        Some(0),
        "{}",
        read_log(dir.path())
    );
    assert!(
        !dir.path().join("new").exists(),
        "left behind: {}",
        dir.path().join("new").display()
    );
}

/// `--user` with a program the worker's user cannot reach (here: under a 0700 directory,
/// like a Python under /root/.pyenv): the error names the program, the uid and what to
/// check, not a bare "exec: Permission denied".
#[test]
fn user_who_cannot_reach_the_program_is_told_which_path_and_uid() {
    if !common::is_root() {
        common::cannot_run("root (to drop a worker's privileges)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let private = tempfile::tempdir().unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(private.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
    let prog = private.path().join("sleep");
    std::fs::copy("/bin/sleep", &prog).unwrap();
    let prog = prog.to_str().unwrap();
    let mut child = spawn_pool(
        dir.path(),
        &["-n", "1", "--user", "65534", "--", prog, "60"],
    );
    let _guard = KillOnDrop(child.id() as i32);
    let want = format!("exec {prog} as uid 65534: permission denied");
    let seen = wait_for(Duration::from_secs(30), || {
        read_log(dir.path()).contains(&want).then_some(())
    });
    let _ = child.kill();
    let _ = child.wait();
    assert!(seen.is_some(), "no clear error:\n{}", read_log(dir.path()));
}

/// A worker that says READY=1 on its notify socket 2.5 s after it starts (longer than the
/// 2 s the policy assumes before it has measured anything), then sleeps.
const READY_AFTER_2500MS: &str = "import os,socket,time\n\
time.sleep(2.5)\n\
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
s.connect(os.environ['NOTIFY_SOCKET'])\n\
s.send(b'READY=1')\n\
time.sleep(1000)";

/// `--ready notify`: the ready time the policy plans recycles with (`status --json`
/// `ready_time_secs`, also `trimrun_ready_time_seconds`) is the slowest start-up measured
/// from the workers' READY=1, not the fixed 2 s it assumes before the first one.
#[test]
fn with_ready_notify_the_policy_plans_with_the_measured_ready_time() {
    let pool = Pool::start(
        &["-n", "2", "--ready", "notify", "--ready-timeout", "60s"],
        &["python3", "-c", READY_AFTER_2500MS],
    );
    pool.wait_log("all workers ready", Duration::from_secs(60));
    let log = pool.log();
    let measured: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("worker ready"))
        .filter_map(|l| {
            let v = l.split("ready_ms=").nth(1)?.split_whitespace().next()?;
            v.parse().ok()
        })
        .collect();
    assert_eq!(measured.len(), 2, "{log}");
    let slowest = *measured.iter().max().unwrap() as f64 / 1000.0;
    assert!(slowest >= 2.5, "{log}");
    let planned = pool.status()["ready_time_secs"]
        .as_f64()
        .unwrap_or_else(|| panic!("no ready_time_secs in status --json: {log}"));
    // `ready_ms` is rounded down to the millisecond.
    assert!(
        planned >= slowest && planned < slowest + 0.002,
        "the policy plans with a ready time of {planned} s, the slowest start-up took {slowest} s: {log}"
    );
}

/// The process `pid` if it is still the one that started at `start` (clock ticks since
/// boot, `/proc/<pid>/stat` field 22), alive.
fn same_process_alive(pid: i32, start: u64) -> bool {
    start_ticks(pid) == Some(start) && alive(pid)
}

fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// `--preload --cgroup none`: a daemon a forked worker started in its own session (here
/// `sleep` from `daemon_app`'s `/daemon`) dies when its worker is recycled, and the next
/// one's when trimrun stops, as with fork+exec workers; the zygote is no orphan.
#[test]
fn a_preloaded_workers_daemonized_child_dies_with_it_without_a_cgroup() {
    use common::python::{have_python_deps, preload_pool};
    if !have_python_deps("waitress, trimrun_worker") {
        return;
    }
    let mut pool = preload_pool(1, "daemon_app:app", &[], &[]);
    // (pid, start time) of a new daemon of the pool's worker.
    let daemon = |pool: &Pool| -> (i32, u64) {
        let pid: i32 = get(pool.port, "/daemon?1000")
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let start = start_ticks(pid).unwrap_or_else(|| panic!("daemon {pid} is gone"));
        (pid, start)
    };
    let first = daemon(&pool);
    let zygote = pool.status()["zygote"]["pid"].as_i64().unwrap() as i32;
    let (code, out) = pool.ctl(&["recycle", "0"]);
    assert_eq!(code, 0, "{out}");
    pool.wait_log("recycle complete", Duration::from_secs(60));
    let dead = wait_for(Duration::from_secs(20), || {
        (!same_process_alive(first.0, first.1)).then_some(())
    });
    let second = daemon(&pool);
    let zygote_kept = alive(zygote);
    pool.signal(libc::SIGTERM);
    let code = pool.wait_exit(Duration::from_secs(30));
    let left = wait_for(Duration::from_secs(10), || {
        (!same_process_alive(second.0, second.1)).then_some(())
    });
    for (pid, start) in [first, second] {
        if same_process_alive(pid, start) {
            // SAFETY: kill(2) of a process this test's pool started (same start time).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let log = pool.log();
    assert!(
        dead.is_some(),
        "the recycled worker's daemon {first:?} survived: {log}"
    );
    assert!(
        zygote_kept,
        "the zygote {zygote} was killed as an orphan: {log}"
    );
    assert_eq!(code, Some(0), "{log}");
    assert!(left.is_some(), "a daemon survived trimrun's exit: {log}");
}

/// Start and stop a pool of two `sleep` workers 20 times, by SIGTERM, `ctl stop`, SIGINT, `ctl stop --now` and
/// SIGQUIT in turn, some with `--control new/dir/x.sock`: after each exit no
/// `trimrun-<pid>/` cgroup, notify socket, run directory, control socket or control
/// directory it created is left (issue 12: 2 of 20 stops left the cgroup behind).
#[test]
fn twenty_starts_and_stops_leave_no_cgroup_socket_or_directory_behind() {
    if !common::is_root() {
        common::cannot_run("root (for the pool's trimrun-<pid>/ cgroup)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tmp = dir.path().join("tmp");
    std::fs::create_dir(&tmp).unwrap();
    let stops = ["TERM", "ctl stop", "INT", "ctl stop --now", "QUIT"];
    for i in 0..20 {
        let how = stops[i % stops.len()];
        let (ctl, created) = if i % 3 == 0 {
            let new = dir.path().join(format!("new{i}"));
            (new.join("dir/x.sock"), Some(new))
        } else {
            (dir.path().join(format!("ctl{i}.sock")), None)
        };
        let log_path = dir.path().join(format!("log{i}"));
        let mut child = Command::new(BIN)
            .args(["-v", "-n", "2", "--cgroup", "auto", "--trim", "off"])
            // --timeout gives each worker a notify socket; a silent worker has
            // --ready-timeout for its first keep-alive, longer than a run.
            .args([
                "--ready",
                "delay:50ms",
                "--timeout",
                "60s",
                "--ready-timeout",
                "60s",
            ])
            .args(["--graceful-timeout", "10s", "--control"])
            .arg(&ctl)
            .args(["--", "sleep", "1000"])
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("TRIMRUN_CONTROL")
            .env("TMPDIR", &tmp)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let guard = KillOnDrop(pid);
        let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
        if wait_for(Duration::from_secs(30), || {
            read().contains("all workers ready").then_some(())
        })
        .is_none()
        {
            panic!("run {i}: not ready: {}", read());
        }
        // The pool's group: the parent of a worker's group, from the log.
        let log = read();
        let group = log
            .lines()
            .find(|l| l.contains("worker started"))
            .and_then(|l| l.split("cgroup=").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .map(|w| {
                std::path::PathBuf::from(w.trim_matches('"'))
                    .parent()
                    .unwrap()
                    .to_path_buf()
            })
            .unwrap_or_else(|| panic!("run {i}: no worker cgroup in the log: {log}"));
        assert!(
            group.ends_with(format!("trimrun-{pid}")) && group.is_dir(),
            "run {i}: {}",
            group.display()
        );
        assert!(ctl.exists());
        let run_dirs: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().collect();
        assert_eq!(run_dirs.len(), 1, "run {i}: one run directory in {tmp:?}");
        let sockets = std::fs::read_dir(run_dirs[0].path()).unwrap().count();
        assert!(sockets >= 2, "run {i}: the workers' notify sockets");
        match how {
            "TERM" => unsafe { libc::kill(pid, libc::SIGTERM) },
            "INT" => unsafe { libc::kill(pid, libc::SIGINT) },
            "QUIT" => unsafe { libc::kill(pid, libc::SIGQUIT) },
            ctl_stop => {
                let out = Command::new(BIN)
                    .args(["ctl", "--control"])
                    .arg(&ctl)
                    .args(ctl_stop.split_whitespace().skip(1))
                    .output()
                    .unwrap();
                assert!(out.status.success(), "run {i}: {how}: {out:?}");
                0
            }
        };
        let code = wait_for(Duration::from_secs(30), || child.try_wait().unwrap());
        if code.is_some() {
            // Reaped: its pid may be reused at once, so it is no longer ours to kill.
            std::mem::forget(guard);
        }
        let log = read();
        assert_eq!(
            code.and_then(|s| s.code()),
            Some(0),
            "run {i} ({how}): {log}"
        );
        assert!(
            !group.exists(),
            "run {i} ({how}) left its cgroup {}: {log}",
            group.display()
        );
        let left: Vec<_> = std::fs::read_dir(&tmp)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "run {i} ({how}) left {left:?}: {log}");
        assert!(
            !ctl.exists(),
            "run {i} ({how}) left {}: {log}",
            ctl.display()
        );
        if let Some(new) = created {
            assert!(
                !new.exists(),
                "run {i} ({how}) left {}: {log}",
                new.display()
            );
        }
        assert!(!log.contains("cannot remove"), "run {i} ({how}): {log}");
    }
}

/// A process the test froze with the cgroup v1 freezer: SIGKILL cannot end it until it is
/// thawed. Thawed, killed and its freezer group removed on drop.
struct Frozen {
    child: std::process::Child,
    freezer: std::path::PathBuf,
}

impl Frozen {
    /// A `sleep` in the memory cgroup `memory_group`, frozen. None when there is no v1
    /// freezer hierarchy to nest in.
    fn start_in(memory_group: &std::path::Path) -> Option<Frozen> {
        let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
        let rel = own
            .lines()
            .find_map(|l| l.split_once(":freezer:").map(|(_, p)| p.to_string()))?;
        let base = std::path::Path::new("/sys/fs/cgroup/freezer").join(rel.trim_start_matches('/'));
        let freezer = base.join(format!("trimrun-test-{}", std::process::id()));
        std::fs::create_dir(&freezer).ok()?;
        let child = Command::new("sleep").arg("1000").spawn().unwrap();
        let f = Frozen { child, freezer };
        let pid = f.child.id().to_string();
        std::fs::write(memory_group.join("cgroup.procs"), &pid).unwrap();
        std::fs::write(f.freezer.join("cgroup.procs"), &pid).unwrap();
        std::fs::write(f.freezer.join("freezer.state"), "FROZEN").unwrap();
        wait_for(Duration::from_secs(10), || {
            std::fs::read_to_string(f.freezer.join("freezer.state"))
                .is_ok_and(|s| s.trim() == "FROZEN")
                .then_some(())
        })
        .expect("the freezer group freezes");
        Some(f)
    }

    fn thaw(&mut self) {
        let _ = std::fs::write(self.freezer.join("freezer.state"), "THAWED");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
        let _ = wait_for(Duration::from_secs(10), || {
            std::fs::remove_dir(&self.freezer).ok()
        });
    }
}

/// While a worker's cgroup cannot be removed (a process lingers in it: one the test froze,
/// which SIGKILL cannot end), trimrun retries the removal off its runtime thread: `status`
/// answers, and the slot's next worker is started and gets ready, while that removal is
/// still being retried (it gives up after 10 s, with a line in the log). Once the
/// process can die, the group goes.
#[test]
fn status_answers_and_workers_start_while_a_workers_cgroup_removal_is_retried() {
    if !common::is_root() {
        common::cannot_run("root (cgroup v1 memory and freezer groups)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl.sock");
    let log_path = dir.path().join("log");
    let mut child = Command::new(BIN)
        .args(["-v", "-n", "2", "--cgroup", "v1", "--trim", "off"])
        .args(["--ready", "delay:100ms", "--control"])
        .arg(&ctl)
        .args(["--", "sleep", "1000"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    let _guard = KillOnDrop(pid);
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ready = wait_for(Duration::from_secs(30), || {
        if child.try_wait().unwrap().is_some() {
            return Some(false); // refused at start: no usable cgroup v1 here
        }
        read().contains("all workers ready").then_some(true)
    });
    match ready {
        Some(true) => {}
        Some(false) => {
            common::say(&read());
            common::cannot_run("a writable cgroup v1 memory hierarchy");
            return;
        }
        None => panic!("not ready: {}", read()),
    }
    // Slot 0's worker and its group, from the log.
    let log = read();
    let line = log
        .lines()
        .find(|l| l.contains("worker started") && l.contains("slot=0 "))
        .unwrap_or_else(|| panic!("{log}"));
    let field = |k: &str| {
        line.split(&format!(" {k}="))
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .map(|v| v.trim_matches('"').to_string())
            .unwrap_or_else(|| panic!("no {k} in {line}"))
    };
    let worker: i32 = field("pid").parse().unwrap();
    let group = std::path::PathBuf::from(field("cgroup"));
    assert!(group.is_dir(), "{line}");
    let Some(mut frozen) = Frozen::start_in(&group) else {
        common::cannot_run("a cgroup v1 freezer hierarchy");
        return;
    };
    // The worker dies; its group keeps the frozen process, so its removal is retried.
    // SAFETY: kill(2) of a worker of the trimrun this test started.
    unsafe { libc::kill(worker, libc::SIGKILL) };
    let status = || -> Option<serde_json::Value> {
        let out = Command::new(BIN)
            .args(["status", "--json", "--control"])
            .arg(&ctl)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let next = wait_for(Duration::from_secs(30), || {
        let s = status()?;
        s["workers"].as_array()?.iter().find_map(|w| {
            (w["slot"] == 0 && w["pid"] != worker && w["state"] == "ready").then(|| w.clone())
        })
    });
    // Before anything else: is the removal still being retried?
    let retrying = group.exists() && !read().contains("cannot remove the worker's cgroup");
    let lingering = alive(frozen.child.id() as i32);
    frozen.thaw();
    let log = read();
    let next = next.unwrap_or_else(|| panic!("slot 0 was not restarted: {log}"));
    assert!(lingering, "the frozen process died early: {log}");
    assert!(
        retrying,
        "status answered (slot 0 back as {}) only once the removal of {} had given up: the supervisor waited for it: {log}",
        next["pid"],
        group.display()
    );
    // Thawed, the process dies and the retrying removal succeeds.
    let removed = wait_for(Duration::from_secs(15), || (!group.exists()).then_some(()));
    assert!(removed.is_some(), "{} stayed: {}", group.display(), read());
    // SAFETY: kill(2) of the trimrun this test started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let code = wait_for(Duration::from_secs(30), || child.try_wait().unwrap());
    assert_eq!(code.and_then(|s| s.code()), Some(0), "{}", read());
}

/// The uid, gid and supplementary groups lines of `/proc/<pid>/status`.
fn ids_of(pid: i32) -> (Vec<String>, Vec<String>, Vec<String>) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or("")
            .split_whitespace()
            .map(String::from)
            .collect::<Vec<_>>()
    };
    (field("Uid:"), field("Gid:"), field("Groups:"))
}

/// `--preload --user nobody --group 65534`, as gunicorn's `preload_app` with `user`: the
/// zygote imports the app as trimrun, and each forked worker runs as that user (every uid
/// and gid, no other group) from its first instruction; the pool still serves it, trims it
/// and recycles it (the replacement too runs as that user).
#[test]
fn preloaded_workers_run_as_the_user_and_are_still_trimmed_and_recycled() {
    use common::python::{have_python_deps, preload_pool};
    if !common::is_root() {
        common::cannot_run("root (to drop a worker's privileges)");
        return;
    }
    if !have_python_deps("waitress, trimrun_worker") {
        return;
    }
    let mut pool = preload_pool(
        1,
        "daemon_app:app",
        &[
            "-v", "--cgroup", "auto", "--user", "nobody", "--group", "65534",
        ],
        &[],
    );
    let nobody = vec!["65534".to_string(); 4];
    let worker: i32 = get(pool.port, "/").unwrap().trim().parse().unwrap();
    let (uids, gids, groups) = ids_of(worker);
    assert_eq!(uids, nobody, "{}", pool.log());
    assert_eq!(gids, nobody);
    assert_eq!(
        groups,
        vec!["65534".to_string()],
        "supplementary groups reset"
    );
    let zygote = pool.status()["zygote"]["pid"].as_i64().unwrap() as i32;
    assert_eq!(
        ids_of(zygote).0,
        vec!["0".to_string(); 4],
        "the zygote keeps root"
    );
    // A trim can be deferred (no thread parked in a safe syscall at that instant): ask
    // again until one is done.
    let trimmed = wait_for(Duration::from_secs(60), || {
        let _ = pool.ctl(&["trim", "all"]);
        wait_for(Duration::from_secs(3), || {
            pool.log().contains("trimmed slot=0").then_some(())
        })
    });
    assert!(trimmed.is_some(), "not trimmed: {}", pool.log());
    let (code, out) = pool.ctl(&["recycle", "0"]);
    assert_eq!(code, 0, "{out}");
    pool.wait_log("recycle complete", Duration::from_secs(60));
    let next: i32 = get(pool.port, "/").unwrap().trim().parse().unwrap();
    assert_ne!(next, worker);
    assert_eq!(ids_of(next).0, nobody, "{}", pool.log());
    pool.signal(libc::SIGTERM);
    assert_eq!(
        pool.wait_exit(Duration::from_secs(30)),
        Some(0),
        "{}",
        pool.log()
    );
}

/// `--preload` with an app whose import takes 2 s: while the zygote imports it (at start,
/// and again after a HUP), trimrun does not wait for it on its runtime thread: `status`
/// answers with the zygote still `starting`, the serving workers keep serving, and once
/// it is ready the workers start (and the rolling restart completes) with no failure.
#[test]
fn status_answers_while_the_zygote_imports_the_app() {
    use common::python::{apps_dir, have_python_deps, python_dir};
    if !have_python_deps("waitress, trimrun_worker") {
        return;
    }
    let (apps, py) = (apps_dir(), python_dir());
    let dir = tempfile::tempdir().unwrap();
    let flag = dir.path().join("slow");
    std::fs::write(&flag, "").unwrap();
    let flag_s = flag.to_str().unwrap().to_string();
    let pool = Pool::start_env(
        &["-n", "2", "--ready", "notify", "--preload"],
        &[
            "python3",
            "-m",
            "trimrun_worker",
            "--app-dir",
            &apps,
            "slow_import_app:app",
        ],
        &[
            ("PYTHONPATH", &py),
            ("SLOW_IMPORT_FLAG", &flag_s),
            ("SLOW_IMPORT_SECONDS", "2"),
        ],
    );
    // The status of a zygote of generation `generation` still importing the app.
    let importing = |generation: i64| {
        wait_for(Duration::from_secs(30), || {
            let out = Command::new(BIN)
                .args(["status", "--json", "--control"])
                .arg(pool.dir.path().join("ctl.sock"))
                .output()
                .ok()?;
            let s: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            let z = &s["zygote"];
            (z["generation"] == generation && z["state"] == "starting").then_some(s)
        })
    };
    let first = importing(1);
    pool.wait_log("all workers ready", Duration::from_secs(60));
    let first = first.unwrap_or_else(|| {
        panic!(
            "status never answered while the zygote imported the app: {}",
            pool.log()
        )
    });
    assert_eq!(first["workers"].as_array().map(Vec::len), Some(0));
    // HUP: a new zygote imports the app again; the old workers serve meanwhile.
    pool.signal(libc::SIGHUP);
    let second = importing(2);
    let served = get(pool.port, "/");
    pool.wait_log("rolling restart complete", Duration::from_secs(60));
    let log = pool.log();
    assert!(
        second.is_some(),
        "status never answered while the new zygote imported the app: {log}"
    );
    assert!(served.is_ok(), "{served:?}: {log}");
    assert_eq!(pool.status()["restarts"], 0, "{log}");
    assert!(!log.contains("cannot start worker"), "{log}");
}
