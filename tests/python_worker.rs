//! `python -m trimrun_worker` (python/) under the real trimrun: a Flask (WSGI, waitress) and
//! a Starlette (ASGI, uvicorn) app keep answering every request through a rolling restart
//! (HUP), a recycle and `ctl scale` down and up, under load from one-shot clients,
//! keep-alive clients and slow requests that are in flight when their worker is stopped.
//!
//! Keep-alive clients behave as HTTP/1.1 asks (RFC 9112 §9.3.1, as browsers and Go's
//! net/http do): a request sent on a *reused* connection that the server closed before any
//! byte of a response came back is sent again on a new connection. That is the one race no
//! server can close (its close and the client's next request cross on the wire); everything
//! else (a refused connection, a reset mid-response, a missing or wrong response) fails.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::pool::*;
use common::wait_for;

fn python_dir() -> String {
    format!("{}/python", env!("CARGO_MANIFEST_DIR"))
}

fn apps_dir() -> String {
    format!("{}/tests/apps", env!("CARGO_MANIFEST_DIR"))
}

/// True when python3 can import the test apps' dependencies; else says why (a skip, or a
/// failure under CI).
fn have_python_deps(modules: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .env("PYTHONPATH", python_dir())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        common::cannot_run(&format!(
            "python3 with {modules} (scripts/install-test-deps.sh installs them)"
        ));
    }
    ok
}

/// `python3 -m trimrun_worker` serving `app` (MODULE:ATTR in tests/apps).
fn trimrun_worker(app: &str) -> Vec<String> {
    let apps = apps_dir();
    [
        "python3",
        "-m",
        "trimrun_worker",
        "--app-dir",
        &apps,
        "--graceful-timeout",
        "15",
        app,
    ]
    .map(String::from)
    .to_vec()
}

/// A pool of `n` workers running `cmd`, ready by sd_notify.
fn worker_pool(n: usize, cmd: &[String]) -> Pool {
    let n = n.to_string();
    let args = ["-n", &n, "--ready", "notify", "--graceful-timeout", "20s"];
    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
    let pool = Pool::start_env(&args, &cmd, &[("PYTHONPATH", &python_dir())]);
    pool.wait_log("all workers ready", Duration::from_secs(30));
    pool
}

/// One HTTP/1.1 keep-alive connection.
struct KeepAlive {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    /// Responses received on the current connection.
    used: usize,
}

enum Attempt {
    Ok(String),
    /// The server closed a reused connection before any byte of the response.
    ClosedBeforeResponse(String),
    Failed(String),
}

impl KeepAlive {
    fn new(port: u16) -> KeepAlive {
        KeepAlive {
            port,
            conn: None,
            used: 0,
        }
    }

    fn attempt(&mut self, path: &str) -> Attempt {
        if self.conn.is_none() {
            match TcpStream::connect(("127.0.0.1", self.port)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    self.conn = Some(BufReader::new(s));
                    self.used = 0;
                }
                Err(e) => return Attempt::Failed(format!("connect: {e}")),
            }
        }
        let reused = self.used > 0;
        let conn = self.conn.as_mut().unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        if let Err(e) = conn.get_mut().write_all(req.as_bytes()) {
            self.conn = None;
            return if reused {
                Attempt::ClosedBeforeResponse(format!("write: {e}"))
            } else {
                Attempt::Failed(format!("write: {e}"))
            };
        }
        let mut status = String::new();
        match conn.read_line(&mut status) {
            Ok(0) | Err(_) if reused => {
                self.conn = None;
                return Attempt::ClosedBeforeResponse("closed before the status line".into());
            }
            Ok(0) => {
                self.conn = None;
                return Attempt::Failed("closed before the status line (fresh connection)".into());
            }
            Err(e) => {
                self.conn = None;
                return Attempt::Failed(format!("read status: {e}"));
            }
            Ok(_) => {}
        }
        let mut length = None;
        let mut close = false;
        loop {
            let mut line = String::new();
            if conn.read_line(&mut line).unwrap_or(0) == 0 {
                self.conn = None;
                return Attempt::Failed(format!("closed mid-headers after {status:?}"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let Some(length) = length else {
            self.conn = None;
            return Attempt::Failed(format!("no content-length in {status:?}"));
        };
        let mut body = vec![0u8; length];
        if let Err(e) = conn.read_exact(&mut body) {
            self.conn = None;
            return Attempt::Failed(format!("read body: {e}"));
        }
        self.used += 1;
        if close {
            self.conn = None;
        }
        if !status.starts_with("HTTP/1.1 200") {
            return Attempt::Failed(format!("bad status {status:?}"));
        }
        Attempt::Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// One request, sent again on a new connection if a reused one was closed first.
    fn get(&mut self, path: &str, retried: &AtomicUsize) -> Result<String, String> {
        match self.attempt(path) {
            Attempt::Ok(b) => Ok(b),
            Attempt::Failed(e) => Err(e),
            Attempt::ClosedBeforeResponse(_) => {
                retried.fetch_add(1, Ordering::Relaxed);
                match self.attempt(path) {
                    Attempt::Ok(b) => Ok(b),
                    Attempt::Failed(e) | Attempt::ClosedBeforeResponse(e) => {
                        Err(format!("retry: {e}"))
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
enum Client {
    /// HTTP/1.0, a new connection per request.
    OneShot,
    /// HTTP/1.1 on one connection for as long as the server keeps it.
    KeepAlive,
    /// A keep-alive client whose requests take 300 ms: some are in flight at every stop.
    Slow,
}

/// Load from client threads until `finish`: counts, failures, pids seen.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    retried: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    pids: Arc<Mutex<std::collections::BTreeSet<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, clients: &[Client]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let retried = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(vec![]));
        let pids = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let threads = clients
            .iter()
            .map(|&kind| {
                let (stop, ok, retried, failures, pids) = (
                    stop.clone(),
                    ok.clone(),
                    retried.clone(),
                    failures.clone(),
                    pids.clone(),
                );
                std::thread::spawn(move || {
                    let mut ka = KeepAlive::new(port);
                    while !stop.load(Ordering::Relaxed) {
                        let r = match kind {
                            Client::OneShot => get(port, "/"),
                            Client::KeepAlive => ka.get("/", &retried),
                            Client::Slow => ka.get("/slow?ms=300", &retried),
                        };
                        match r {
                            Ok(body) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if let Some(pid) = body.split_whitespace().nth(1) {
                                    pids.lock().unwrap().insert(pid.to_string());
                                }
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            retried,
            failures,
            pids,
            threads,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Wait until `more` further requests succeeded (the pool serves between steps).
    fn wait_more(&self, more: usize) {
        let target = self.ok() + more;
        assert!(
            wait_for(Duration::from_secs(30), || (self.ok() >= target)
                .then_some(()))
            .is_some(),
            "load stalled at {} requests; failures: {:?}",
            self.ok(),
            self.failures.lock().unwrap()
        );
    }

    fn finish(self) -> (usize, usize, Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let pids = self.pids.lock().unwrap().len();
        (
            self.ok.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
            pids,
        )
    }
}

/// HUP, a recycle, scale down and back up, all under load: not one request fails.
fn restarts_under_load_lose_nothing(app: &str, cmd: &[String]) {
    let pool = worker_pool(2, cmd);
    let load = Load::start(
        pool.port,
        &[
            Client::OneShot,
            Client::OneShot,
            Client::KeepAlive,
            Client::KeepAlive,
            Client::Slow,
        ],
    );
    load.wait_more(50);

    pool.signal(libc::SIGHUP);
    pool.wait_log("rolling restart complete", Duration::from_secs(60));
    load.wait_more(50);

    let recycles = pool.count_log("recycle complete");
    let (code, out) = pool.ctl(&["recycle", "0"]);
    assert_eq!(code, 0, "ctl recycle 0: {out}");
    assert!(
        wait_for(Duration::from_secs(60), || (pool
            .count_log("recycle complete")
            > recycles)
            .then_some(()))
        .is_some(),
        "recycle of slot 0 never completed:\n{}",
        pool.log()
    );
    load.wait_more(50);

    let (code, out) = pool.ctl(&["scale", "1"]);
    assert_eq!(code, 0, "ctl scale 1: {out}");
    assert!(
        wait_for(Duration::from_secs(30), || (pool.workers().len() == 1)
            .then_some(()))
        .is_some(),
        "scale to 1 left {:?}:\n{}",
        pool.workers(),
        pool.log()
    );
    load.wait_more(50);
    let (code, out) = pool.ctl(&["scale", "2"]);
    assert_eq!(code, 0, "ctl scale 2: {out}");
    assert!(
        wait_for(Duration::from_secs(30), || {
            let s = pool.status();
            let w = s["workers"].as_array()?;
            (w.len() == 2 && w.iter().all(|w| w["state"] == "ready")).then_some(())
        })
        .is_some(),
        "scale back to 2 never ready:\n{}",
        pool.log()
    );
    load.wait_more(50);

    let (ok, retried, failures, pids) = load.finish();
    if std::env::var_os("WT14_LOG").is_some() {
        eprintln!("{}", pool.log());
    }
    eprintln!(
        "{app}: {ok} requests ok, {retried} resent after a keep-alive close, {} failed, {pids} worker pids seen",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {:?}\n{}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(10)],
        pool.log()
    );
    // The initial 2, 2 from the HUP, 1 recycle, 1 from scaling back up (gunicorn: the pids
    // of its own workers, one per master).
    assert!(
        pids >= 5,
        "only {pids} workers answered: the restarts did not happen"
    );
    assert_eq!(
        pool.count_log("exit code 0"),
        pool.count_log("worker stopped"),
        "every stopped worker drained and exited 0:\n{}",
        pool.log()
    );
}

#[test]
fn flask_under_trimrun_worker_loses_no_request_to_hup_recycle_or_scale() {
    if !have_python_deps("flask, waitress, trimrun_worker") {
        return;
    }
    restarts_under_load_lose_nothing("flask_app:app", &trimrun_worker("flask_app:app"));
}

#[test]
fn starlette_under_trimrun_worker_loses_no_request_to_hup_recycle_or_scale() {
    if !have_python_deps("starlette, uvicorn, trimrun_worker") {
        return;
    }
    restarts_under_load_lose_nothing("starlette_app:app", &trimrun_worker("starlette_app:app"));
}

/// The README's gunicorn recipe: no `--bind` (gunicorn adopts the sockets in `LISTEN_FDS`
/// itself, since `LISTEN_PID` is its pid; `--bind fd://3` on top made it use fd 3 twice).
#[test]
fn gunicorn_recipe_from_the_readme_loses_no_request() {
    if !have_python_deps("flask, gunicorn") {
        return;
    }
    let apps = apps_dir();
    let cmd = [
        "gunicorn",
        "-w",
        "1",
        "--no-control-socket",
        "--chdir",
        &apps,
        "flask_app:app",
    ]
    .map(String::from);
    restarts_under_load_lose_nothing("gunicorn flask_app:app", &cmd);
}

/// The interface is detected from the app, and an app that cannot be imported is a clear
/// error (exit 2), not a traceback loop.
#[test]
fn trimrun_worker_detects_the_interface_and_names_a_missing_app() {
    if !have_python_deps("flask, starlette, waitress, uvicorn, trimrun_worker") {
        return;
    }
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys\nfrom trimrun_worker import app\n\
             sys.path.insert(0, sys.argv[1])\n\
             print(app.detect_interface(app.load('flask_app:app')), app.detect_interface(app.load('starlette_app')))",
            &apps_dir(),
        ])
        .env("PYTHONPATH", python_dir())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "wsgi asgi",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "trimrun_worker",
            "--app-dir",
            &apps_dir(),
            "no_such_module:app",
        ])
        .env("PYTHONPATH", python_dir())
        .env("LISTEN_FDS", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("cannot import 'no_such_module'"), "{err}");
}
