//! `python -m trimrun_worker` (python/) under the real trimrun: a Flask (WSGI, waitress) and
//! a Starlette (ASGI, uvicorn) app keep answering every request through a rolling restart
//! (HUP), a recycle and `ctl scale` down and up, under load from one-shot clients,
//! keep-alive clients and slow requests that are in flight when their worker is stopped.
//! Keep-alive clients resend a request only as HTTP/1.1 allows (tests/common/load.rs).

mod common;

use std::time::Duration;

use common::load::{Client, Load};
use common::pool::*;
use common::python::*;
use common::wait_for;

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

/// How many connections wait in the accept queue of the listener on `port` (the
/// `rx_queue` of its LISTEN line in /proc/net/tcp).
fn accept_queue(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    table.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
        let listening = *f.get(3)? == "0A";
        let rx = f.get(4)?.split(':').nth(1)?;
        (local_port == port && listening).then(|| u64::from_str_radix(rx, 16).ok())?
    })
}

/// `--connection-limit`: a worker holds no more connections than that, and the others
/// wait in the shared socket (for whichever worker is free, as with gunicorn's sync
/// workers), instead of queueing behind its busy thread, where a recycle must drain them
/// and a kill loses them. Here one worker with one thread and a limit of 1, and four slow
/// requests: three stay in the kernel's accept queue, and all four are answered.
#[test]
fn connection_limit_leaves_waiting_connections_in_the_shared_socket() {
    if !have_python_deps("flask, waitress, trimrun_worker") {
        return;
    }
    let mut cmd = trimrun_worker("flask_app:app");
    let at = cmd.len() - 1;
    cmd.splice(
        at..at,
        ["--threads", "1", "--connection-limit", "1"].map(String::from),
    );
    let pool = worker_pool(1, &cmd);
    let port = pool.port;
    let clients: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || get(port, "/slow?ms=1500")))
        .collect();
    let queued = wait_for(Duration::from_secs(10), || {
        accept_queue(port).filter(|&q| q >= 3)
    });
    assert!(
        queued.is_some(),
        "the worker took the waiting connections itself: accept queue {:?}",
        accept_queue(port)
    );
    for c in clients {
        c.join().unwrap().expect("every request is answered");
    }
    assert!(
        !pool.log().contains("connection limit"),
        "waitress's overflow lines are filtered:\n{}",
        pool.log()
    );
}
