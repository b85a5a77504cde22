//! The pool harness: run the real `trimrun` binary with its log in a temp dir, talk HTTP to
//! its workers, find its worker processes.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{example, wait_for};

/// A worker that ignores SIGTERM and says READY=1 (with `--ready notify`) only once the
/// handler is in place, so no test races Python's start-up.
pub const IGNORES_TERM: &str = "import os,signal,socket,time\n\
signal.signal(signal.SIGTERM, signal.SIG_IGN)\n\
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n\
s.connect(os.environ['NOTIFY_SOCKET'])\n\
s.send(b'READY=1')\n\
time.sleep(1000)";

pub const BIN: &str = env!("CARGO_BIN_EXE_trimrun");

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running trimrun with its log in a temp dir.
pub struct Pool {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Pool {
    pub fn start(extra: &[&str], cmd: &[&str]) -> Pool {
        Self::start_env(extra, cmd, &[])
    }

    pub fn start_env(extra: &[&str], cmd: &[&str], env: &[(&str, &str)]) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let mut c = Command::new(BIN);
        c.arg("--bind")
            .arg(format!("127.0.0.1:{port}"))
            .args(extra)
            .arg("--")
            .args(cmd);
        c.env("TRIMRUN_CGROUP", "none").env("NO_COLOR", "1");
        c.env("TRIMRUN_CONTROL", dir.path().join("ctl.sock"));
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Pool { child, port, dir }
    }

    pub fn app(n: usize, extra: &[&str]) -> Pool {
        let n = n.to_string();
        let mut args = vec!["-n", &n];
        args.extend_from_slice(extra);
        let app = example("app.py");
        let p = Pool::start(&args, &["python3", &app]);
        p.wait_log("all workers ready", Duration::from_secs(20));
        p
    }

    /// N workers that ignore SIGTERM, ready by sd_notify once their handler is in place.
    pub fn ignoring_term(n: usize, graceful_timeout: &str) -> Pool {
        let n = n.to_string();
        let pool = Pool::start(
            &[
                "-n",
                &n,
                "--graceful-timeout",
                graceful_timeout,
                "--ready",
                "notify",
            ],
            &["python3", "-c", IGNORES_TERM],
        );
        pool.wait_log("all workers ready", Duration::from_secs(10));
        pool
    }

    /// `trimrun ctl ARGS...` against this pool's control socket: (exit code, output).
    pub fn ctl(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(BIN)
            .arg("ctl")
            .arg("--control")
            .arg(self.dir.path().join("ctl.sock"))
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// `trimrun status --json` of this pool.
    pub fn status(&self) -> serde_json::Value {
        let out = Command::new(BIN)
            .args(["status", "--json", "--control"])
            .arg(self.dir.path().join("ctl.sock"))
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json: {e}: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        if wait_for(timeout, || self.log().contains(needle).then_some(())).is_none() {
            panic!(
                "'{needle}' not in the log after {timeout:?}:\n{}",
                self.log()
            );
        }
    }

    pub fn count_log(&self, needle: &str) -> usize {
        self.log().matches(needle).count()
    }

    /// The worker processes: trimrun's direct children.
    pub fn workers(&self) -> Vec<i32> {
        children(self.pid())
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Wait for trimrun to exit; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let code = wait_for(timeout, || self.child.try_wait().unwrap());
        code.map(|s| s.code().unwrap_or(-1))
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        let workers = self.workers();
        let _ = self.child.kill();
        let _ = self.child.wait();
        for w in workers {
            // SAFETY: kill(2) of a leftover process group from this test.
            unsafe { libc::kill(-w, libc::SIGKILL) };
        }
    }
}

/// SIGKILL a process (and its workers' groups) when a test ends early.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for w in children(self.0) {
            // SAFETY: kill(2) of a process group this test started.
            unsafe { libc::kill(-w, libc::SIGKILL) };
        }
        // SAFETY: kill(2) of a process this test started (a no-op once reaped).
        unsafe { libc::kill(self.0, libc::SIGKILL) };
    }
}

pub fn children(pid: i32) -> Vec<i32> {
    let mut out = vec![];
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
            }
        }
    }
    out.sort();
    out
}

pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// One HTTP/1.0 GET; the body on a 200.
pub fn get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)
        .map_err(|e| format!("read: {e}"))?;
    if !buf.starts_with("HTTP/1.0 200") && !buf.starts_with("HTTP/1.1 200") {
        return Err(format!("bad response: {buf:?}"));
    }
    Ok(buf.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}
