//! What operators depend on, through the real executable: the pool survives its log
//! reader going away; the control socket and `/metrics` cannot be locked out or drained of
//! fds by idle clients; `ctl stop` answers; the client trusts only sockets the pool's user
//! could have made and never prints control characters it received; fatal errors are
//! said once, without colour codes in a file.
//!
//! Workers are `sleep` under `--cgroup none`: nothing here needs root except where said.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::wait_for;
use trimrun::status::Snapshot;

const BIN: &str = env!("CARGO_BIN_EXE_trimrun");
const SETTLE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A pool of `sleep` workers with its control socket in a temp dir.
struct Pool {
    child: Child,
    _dir: tempfile::TempDir,
    ctl: PathBuf,
}

impl Pool {
    fn command(workers: usize, extra: &[&str]) -> (Command, tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("ctl.sock");
        let mut c = Command::new(BIN);
        c.args([
            "-n",
            &workers.to_string(),
            "--cgroup",
            "none",
            "--trim",
            "off",
        ])
        .args(["--ready", "delay:200ms", "--graceful-timeout", "5s"])
        .arg("--control")
        .arg(&ctl)
        .args(extra)
        .args(["--", "sleep", "1000"])
        .env_remove("TRIMRUN_CONTROL")
        .env_remove("TRIMRUN_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap());
        (c, dir, ctl)
    }

    fn spawn(mut c: Command, dir: tempfile::TempDir, ctl: PathBuf, workers: usize) -> Pool {
        let child = c.spawn().expect("run trimrun");
        let pool = Pool {
            child,
            _dir: dir,
            ctl,
        };
        pool.wait_ready(workers, 0);
        pool
    }

    /// `n` ready workers of at least generation `gen`, nothing in progress.
    fn wait_ready(&self, n: usize, generation: u64) -> Snapshot {
        wait_for(SETTLE, || {
            self.try_status().filter(|s| {
                s.state == "running"
                    && s.workers.len() == n
                    && s.recycles_in_progress == 0
                    && s.workers
                        .iter()
                        .all(|w| w.state == "ready" && w.generation >= generation)
            })
        })
        .unwrap_or_else(|| panic!("pool not settled: {:?}", self.try_status()))
    }

    fn cli(&self, args: &[&str]) -> Output {
        Command::new(BIN)
            .arg(args[0])
            .arg("--control")
            .arg(&self.ctl)
            .args(&args[1..])
            .env_remove("TRIMRUN_CONTROL")
            .output()
            .unwrap()
    }

    fn try_status(&self) -> Option<Snapshot> {
        let out = self.cli(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn wait_exit(&mut self) -> Option<i32> {
        wait_for(SETTLE, || {
            self.child
                .try_wait()
                .unwrap()
                .map(|s| s.code().unwrap_or(-1))
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.pid()),
                nix::sys::signal::Signal::SIGQUIT,
            );
            if self.wait_exit().is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

#[test]
fn pool_survives_its_log_reader_going_away() {
    // `trimrun ... 2>&1 | head -c 10`: the reader of stderr and stdout reads a little
    // and exits. Every later log line fails with EPIPE; none may take the pool down.
    let (mut c, dir, ctl) = Pool::command(2, &[]);
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut first = [0u8; 10];
    child
        .stderr
        .as_mut()
        .unwrap()
        .read_exact(&mut first)
        .unwrap();
    drop(child.stderr.take());
    drop(child.stdout.take());
    let mut pool = Pool {
        child,
        _dir: dir,
        ctl,
    };
    pool.wait_ready(2, 0);
    // A rolling restart logs a dozen lines into the closed pipe.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pool.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let s = pool.wait_ready(2, 1);
    assert_eq!(s.recycles, 2);
    assert!(
        pool.alive(),
        "trimrun died writing its log to a closed pipe"
    );
    let out = pool.cli(&["ctl", "stop"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(pool.wait_exit(), Some(0));
}

#[test]
fn silent_control_clients_do_not_lock_out_status() {
    let (c, dir, ctl) = Pool::command(1, &[]);
    let pool = Pool::spawn(c, dir, ctl, 1);
    // More silent clients than the server keeps: connected, never a byte sent.
    let silent: Vec<UnixStream> = (0..80)
        .map(|_| UnixStream::connect(&pool.ctl).unwrap())
        .collect();
    let out = pool.cli(&["status", "--json"]);
    assert!(
        out.status.success(),
        "status locked out by 80 silent clients: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pool.cli(&["ctl", "scale", "2"]);
    assert!(
        out.status.success(),
        "ctl locked out: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The server dropped silent clients to make room: at most its cap stay open.
    let still_open = silent
        .iter()
        .filter(|s| {
            s.set_nonblocking(true).unwrap();
            let mut b = [0u8; 1];
            // EOF (0) means the server closed it; WouldBlock means still open.
            matches!((&**s).read(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        })
        .count();
    assert!(still_open <= 64, "{still_open} silent connections kept");
}

#[test]
fn ctl_stop_answers_and_exits_0() {
    for now in [false, true] {
        let (c, dir, ctl) = Pool::command(2, &[]);
        let mut pool = Pool::spawn(c, dir, ctl, 2);
        let args: &[&str] = if now {
            &["ctl", "stop", "--now"]
        } else {
            &["ctl", "stop"]
        };
        let out = pool.cli(args);
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(pool.wait_exit(), Some(0), "{args:?}");
    }
}

/// The sleep worker's pid in slot 0.
fn worker_pid(pool: &Pool) -> i32 {
    pool.try_status().unwrap().workers[0].pid
}

fn soft_nofile(pid: i32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn idle_metrics_clients_cannot_exhaust_the_supervisors_fds() {
    let port = free_port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let (mut c, dir, ctl) = Pool::command(1, &["--metrics", &addr.to_string()]);
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        c.pre_exec(|| {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, 256, 4096)
                .map_err(std::io::Error::from)
        });
    }
    let pool = Pool::spawn(c, dir, ctl, 1);
    // trimrun raised its own soft limit; the worker got the original back.
    assert_eq!(soft_nofile(pool.pid()), 4096);
    assert_eq!(soft_nofile(worker_pid(&pool)), 256);
    let baseline = open_fds(pool.pid());
    let idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    // The metrics endpoint still answers, and holds at most its cap of connections.
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let fds = open_fds(pool.pid());
    assert!(
        fds <= baseline + 64 + 4,
        "{fds} fds open with 300 idle metrics clients (baseline {baseline})"
    );
    // And a worker can still be started (the failure that fd exhaustion caused).
    let out = pool.cli(&["ctl", "recycle", "0"]);
    assert!(out.status.success(), "{out:?}");
    pool.wait_ready(1, 1);
    drop(idle);
}

#[test]
fn a_fatal_error_is_printed_once_and_without_colour_codes_in_a_file() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    for json in [false, true] {
        let mut c = Command::new(BIN);
        c.args(["-n", "1", "--cgroup", "none", "--bind", &addr])
            .arg("--control")
            .arg(dir.path().join("ctl.sock"))
            .env_remove("NO_COLOR")
            .env_remove("TRIMRUN_LOG");
        if json {
            c.args(["--log-format", "json"]);
        }
        let out = c.args(["--", "sleep", "1"]).output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains('\x1b'), "colour codes on a pipe: {err:?}");
        let mentions = err.lines().filter(|l| l.contains(&addr)).count();
        assert_eq!(mentions, 1, "the fatal error is said once: {err}");
        if json {
            for line in err.lines() {
                let v: serde_json::Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
                assert!(v["level"].is_string(), "{line}");
            }
        }
    }
}

/// A fake "trimrun" on `path` that answers every request line with `reply`.
fn fake_server(path: &Path, reply: String) -> std::thread::JoinHandle<()> {
    let l = UnixListener::bind(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut line = String::new();
            let mut r = BufReader::new(conn.try_clone().unwrap());
            while r.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                let _ = conn.write_all(format!("{reply}\n").as_bytes());
                line.clear();
            }
        }
    })
}

fn forged_snapshot() -> String {
    serde_json::json!({
        "v": 1, "ok": true,
        "data": {
            "version": 1, "pid": 1, "backend": "v2\u{1b}]0;pwned\u{7}", "state": "running\u{1b}[2J",
            "target_workers": 1,
            "workers": [{"slot": 0, "pid": 2, "state": "ready", "last_reason": "\u{1b}[31mred\r"}]
        }
    })
    .to_string()
}

#[test]
fn the_client_never_prints_control_characters_from_a_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let _srv = fake_server(&path, forged_snapshot());
    let out = Command::new(BIN)
        .args(["status", "--control"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains('\x1b') && !text.contains('\r') && !text.contains('\x07'),
        "{text:?}"
    );
    assert!(text.contains("\\u{1b}"), "escaped, not dropped: {text}");
    // A forged error and a forged ctl answer: escaped as well.
    let path2 = dir.path().join("fake2.sock");
    let _srv2 = fake_server(
        &path2,
        r#"{"v":1,"ok":false,"error":"\u001b[2Jgone"}"#.to_string(),
    );
    let out = Command::new(BIN)
        .args(["ctl", "reload", "--control"])
        .arg(&path2)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(!out.stderr.contains(&0x1b), "{out:?}");
    let path3 = dir.path().join("fake3.sock");
    let _srv3 = fake_server(
        &path3,
        r#"{"v":1,"ok":true,"data":"\u001b[2Jok"}"#.to_string(),
    );
    let out = Command::new(BIN)
        .args(["ctl", "reload", "--control"])
        .arg(&path3)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(!out.stdout.contains(&0x1b), "{out:?}");
}

#[test]
fn the_client_refuses_a_control_directory_another_user_made() {
    if !common::is_root() {
        common::cannot_run("root (to act as two users)");
        return;
    }
    // uid 1000 runs `trimrun status` with no runtime dir: its default socket is
    // $TMPDIR/trimrun-1000/trimrun.sock. "Another user" (65534) made that directory first
    // and put a socket answering forged data in it.
    let (victim, attacker) = (1000u32, 65534u32);
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let fake_dir = tmp.path().join(format!("trimrun-{victim}"));
    std::fs::create_dir(&fake_dir).unwrap();
    std::fs::set_permissions(&fake_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sock = fake_dir.join("trimrun.sock");
    let _srv = fake_server(&sock, forged_snapshot());
    for p in [&fake_dir, &sock] {
        nix::unistd::chown(
            p.as_path(),
            Some(nix::unistd::Uid::from_raw(attacker)),
            Some(nix::unistd::Gid::from_raw(attacker)),
        )
        .unwrap();
    }
    for args in [&["status"][..], &["ctl", "stop"]] {
        let out = Command::new(BIN)
            .args(args)
            .env_clear()
            .env("TMPDIR", tmp.path())
            .uid(victim)
            .gid(victim)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} trusted it: {out:?}");
        assert!(err.contains("refusing to use"), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
    }
    // Root asking a socket another user put in a shared directory: refused as well.
    let shared = tmp.path().join("x.sock");
    let _srv2 = fake_server(&shared, forged_snapshot());
    nix::unistd::chown(
        shared.as_path(),
        Some(nix::unistd::Uid::from_raw(attacker)),
        None,
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["status", "--control"])
        .arg(&shared)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

/// A pool with `--log-format json` whose workers write to stdout and stderr; its log.
fn worker_output_log(extra: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let mut child = Command::new(BIN)
        .args([
            "-n",
            "2",
            "--cgroup",
            "none",
            "--trim",
            "off",
            "--log-format",
            "json",
        ])
        .args(["--ready", "delay:200ms"])
        .arg("--control")
        .arg(dir.path().join("ctl.sock"))
        .args(extra)
        .args([
            "--",
            "sh",
            "-c",
            "echo \"hello from $TRIMRUN_WORKER_ID\"; echo 'oops \"quoted\"' >&2; exec sleep 1000",
        ])
        .env_remove("TRIMRUN_CONTROL")
        .env_remove("TRIMRUN_WORKER_OUTPUT")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::fs::OpenOptions::new().append(true).open(&log).unwrap())
        .spawn()
        .unwrap();
    let text = wait_for(SETTLE, || {
        let t = std::fs::read_to_string(&log).unwrap();
        // Two lines from each of two workers (the command line in the log says them too).
        let lines = |w: &str| {
            t.lines()
                .filter(|l| l.contains(w) && !l.contains("\"cmd\""))
                .count()
        };
        (lines("oops") >= 2 && lines("hello from") >= 2).then_some(t)
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    text.unwrap_or_else(|| std::fs::read_to_string(&log).unwrap())
}

#[test]
fn worker_output_is_wrapped_as_json_events_in_json_mode() {
    let text = worker_output_log(&[]);
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let from_workers: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["source"] == "worker").collect();
    for slot in [0u64, 1] {
        let hello = from_workers
            .iter()
            .find(|e| e["message"] == format!("hello from {slot}"))
            .unwrap_or_else(|| panic!("no hello from {slot}:\n{text}"));
        assert_eq!(hello["slot"], slot);
        assert_eq!(hello["stream"], "stdout");
        assert!(hello["pid"].as_u64().unwrap() > 1);
        assert!(
            from_workers.iter().any(|e| e["slot"] == slot
                && e["stream"] == "stderr"
                && e["message"] == "oops \"quoted\""),
            "{text}"
        );
    }
    // Passed through untouched on request: raw lines beside the JSON events.
    let raw = worker_output_log(&["--worker-output", "inherit"]);
    assert!(raw.lines().any(|l| l == "hello from 0"), "{raw}");
    assert!(raw.lines().any(|l| l == "oops \"quoted\""), "{raw}");
}
