//! External `malloc_trim` through ptrace, on real processes: Python workers with fragmented
//! heaps, a busy Python server under a thousand trims, a C program with threads parked in
//! every kind of blocking call, and the failure cases of `trimrun trim`.
//! Needs root (or ptrace rights on own children), python3 and cc.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{cannot_run, is_root, wait_for};
use trimrun::trim::{TrimError, TrimOptions, TrimReport, trim_pid, trim_thread};

fn progs() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/progs")
}

/// Skip (or fail under CI) when this machine cannot run the tests.
fn unsupported() -> bool {
    if !cfg!(target_arch = "x86_64") {
        return cannot_run("x86_64");
    }
    if !is_root() {
        return cannot_run("root (ptrace of other processes)");
    }
    for tool in ["python3", "cc"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return cannot_run(tool);
        }
    }
    false
}

/// Compile tests/progs/NAME.c into `dir`.
fn build_c(dir: &Path, name: &str, extra: &[&str]) -> Option<PathBuf> {
    let out = dir.join(name);
    let st = Command::new("cc")
        .args(["-O1", "-pthread", "-o"])
        .arg(&out)
        .arg(progs().join(format!("{name}.c")))
        .args(extra)
        .status()
        .ok()?;
    st.success().then_some(out)
}

/// A child process we talk to over stdin/stdout, killed on drop.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn test program");
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().unwrap());
        Proc { child, stdin, out }
    }
    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
    fn line(&mut self) -> String {
        let mut s = String::new();
        self.out.read_line(&mut s).expect("read from test program");
        assert!(!s.is_empty(), "test program closed its output");
        s.trim_end().to_string()
    }
    /// Read lines until one starts with `prefix`; return the lines before it and it.
    fn until(&mut self, prefix: &str) -> (Vec<String>, String) {
        let mut before = Vec::new();
        loop {
            let l = self.line();
            if l.starts_with(prefix) {
                return (before, l);
            }
            before.push(l);
        }
    }
    fn send(&mut self, cmd: &str) {
        let w = self.stdin.as_mut().unwrap();
        writeln!(w, "{cmd}").unwrap();
        w.flush().unwrap();
    }
    fn alive(&self) -> bool {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).unwrap_or_default();
        // State is the field after the ")" of the command name.
        let state = stat.rsplit_once(") ").map(|(_, r)| &r[..1]).unwrap_or("?");
        matches!(state, "S" | "R" | "D")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn field(line: &str, i: usize) -> u64 {
    line.split_whitespace().nth(i).unwrap().parse().unwrap()
}

fn opts() -> TrimOptions {
    TrimOptions::default()
}

/// Trim, retrying for up to 10 s while the answer is "deferred" (the thread we want was
/// not parked at that moment: e.g. still runnable after the previous injection on a busy
/// machine). Returns the last result.
fn trim_when_parked(
    f: impl Fn() -> Result<TrimReport, TrimError>,
) -> Result<TrimReport, TrimError> {
    let mut last = None;
    let got = wait_for(Duration::from_secs(10), || match f() {
        Err(TrimError::Deferred { pid, reason }) => {
            last = Some(TrimError::Deferred { pid, reason });
            None
        }
        other => Some(other),
    });
    got.unwrap_or_else(|| Err(last.unwrap()))
}

/// Abort the whole test binary if a test hangs (a deadlock must fail, not stall CI).
fn watchdog(limit: Duration, what: &'static str) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    std::thread::spawn(move || {
        if wait_for(limit, || d.load(Ordering::SeqCst).then_some(())).is_none() {
            eprintln!("watchdog: {what} did not finish in {limit:?}: deadlock?");
            std::process::abort();
        }
    });
    done
}

#[test]
fn external_trim_releases_fragmented_python_heap_like_in_process_trim() {
    if unsupported() {
        return;
    }
    let frag = progs().join("frag.py");
    let start = || {
        let mut p = Proc::spawn(Command::new("python3").arg(&frag).args(["7", "120", "4"]));
        let ready = p.line();
        assert!(ready.starts_with("ready"), "{ready}");
        p
    };
    // Outside: trimrun injects malloc_trim(0).
    let ext = start();
    let r = trim_when_parked(|| trim_pid(ext.pid(), &opts())).expect("external trim");
    let ext_released = r.anon_before as i64 - r.anon_after as i64;
    // Inside: the same heap (same seed) trims itself through ctypes.
    let mut inp = start();
    inp.send("self");
    let l = inp.line();
    let in_released = field(&l, 1) as i64 - field(&l, 2) as i64;
    eprintln!(
        "external: {ext_released} of {} anon bytes released (pause {} us, thread {} in {}); in-process: {in_released}",
        r.anon_before, r.pause_us, r.tid, r.syscall
    );
    assert_eq!(r.ret, 1, "malloc_trim reports memory released");
    assert!(
        ext_released as f64 >= 0.30 * r.anon_before as f64,
        "external trim released {ext_released} of {} anonymous bytes, want >= 30%",
        r.anon_before
    );
    assert!(
        ext_released as f64 >= 0.90 * in_released as f64,
        "external trim released {ext_released}, in-process {in_released}: want >= 90%"
    );
    assert!(ext.alive());
}

#[test]
fn soak_thousand_trims_of_busy_python_server_never_break_requests() {
    if unsupported() {
        return;
    }
    let done = watchdog(Duration::from_secs(150), "soak");
    let mut srv = Proc::spawn(
        Command::new("python3")
            .arg(progs().join("soak.py"))
            .arg("3"),
    );
    let port = field(&srv.line(), 1);
    let pid = srv.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..2u64)
        .map(|c| {
            let (stop, served) = (stop.clone(), served.clone());
            std::thread::spawn(move || {
                let mut id = c << 32;
                while !stop.load(Ordering::SeqCst) {
                    let s = TcpStream::connect(("127.0.0.1", port as u16)).expect("connect");
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut w = s.try_clone().unwrap();
                    let mut r = BufReader::new(s);
                    for _ in 0..20 {
                        id += 1;
                        let values: Vec<u64> = (0..(id % 50)).map(|v| v * 7 + id).collect();
                        let pad = "x".repeat((id % 3000) as usize);
                        let req = serde_json::json!({"id": id, "values": values, "pad": pad});
                        writeln!(w, "{req}").expect("send request");
                        let mut line = String::new();
                        r.read_line(&mut line).expect("read response");
                        let resp: serde_json::Value =
                            serde_json::from_str(&line).expect("response is JSON");
                        assert_eq!(resp["id"], id);
                        assert_eq!(resp["sum"], values.iter().sum::<u64>());
                        assert_eq!(resp["pad"], pad.as_str());
                        served.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();

    let t0 = Instant::now();
    let (mut ok, mut deferred, mut pauses) = (0, 0, Vec::new());
    let mut threads_used = HashMap::<String, u32>::new();
    while ok < 1000 && t0.elapsed() < Duration::from_secs(55) {
        match trim_pid(pid, &opts()) {
            Ok(r) => {
                ok += 1;
                pauses.push(r.pause_us);
                *threads_used.entry(r.syscall.clone()).or_default() += 1;
                // The report survives a JSON round trip (what `trim --json` and the
                // status socket carry).
                let v: serde_json::Value =
                    serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
                assert_eq!(v["pid"], pid);
                assert_eq!(v["tid"], r.tid);
                assert_eq!(v["pause_us"], r.pause_us);
                assert_eq!(
                    v["rss_before"].as_i64().unwrap() - v["rss_after"].as_i64().unwrap(),
                    r.released()
                );
            }
            Err(TrimError::Deferred { .. }) => deferred += 1,
            Err(e) => panic!("trim {ok} failed: {e}"),
        }
    }
    // The subcommand's JSON on the same process.
    let out = Command::new(env!("CARGO_BIN_EXE_trimrun"))
        .args(["trim", "--json", &pid.to_string()])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(v["pid"], pid);
    assert!(v["ok"] == true || v["error"] == "deferred", "{v}");

    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.join().expect("every request succeeded");
    }
    pauses.sort();
    eprintln!(
        "soak: {ok} trims, {deferred} deferred, {} requests in {:?}; pause median {} us, max {} us; syscalls {threads_used:?}",
        served.load(Ordering::SeqCst),
        t0.elapsed(),
        pauses[pauses.len() / 2],
        pauses[pauses.len() - 1]
    );
    // On a loaded machine the calls run longer: 300 trims is still a soak; 1000 is the goal.
    assert!(
        ok >= 300,
        "only {ok} trims in the time budget ({deferred} deferred)"
    );
    // The busy worker's threads wait for the GIL in futex most of the time: were that wait
    // refused, most attempts would be deferred (72% before it was recognised).
    assert!(
        deferred * 100 <= 25 * (ok + deferred),
        "{deferred} of {} attempts deferred",
        ok + deferred
    );
    assert!(
        threads_used.contains_key("futex (GIL wait)"),
        "no trim ran in a thread waiting for the GIL: {threads_used:?}"
    );
    assert!(served.load(Ordering::SeqCst) > 0);
    assert!(srv.alive(), "server died");
    srv.send("");
    done.store(true, Ordering::SeqCst);
}

/// Start tests/progs/parked with a fragmented heap; return it and name -> tid.
fn start_parked(dir: &Path) -> (Proc, HashMap<String, i32>) {
    let bin = build_c(dir, "parked", &[]).expect("compile parked.c");
    let mut p = Proc::spawn(Command::new(bin).arg("60"));
    let (lines, _) = p.until("ready");
    let tids = lines
        .iter()
        .map(|l| {
            let (n, t) = l.split_once(' ').unwrap();
            (n.to_string(), t.parse().unwrap())
        })
        .collect();
    (p, tids)
}

/// Stop the parked program and return name -> (iterations, errors, eintr), signals.
fn stop_parked(mut p: Proc) -> (HashMap<String, (u64, u64, u64)>, u64) {
    p.send("stop");
    let (lines, sigs) = p.until("signals");
    let results = lines
        .iter()
        .filter_map(|l| l.strip_prefix("result "))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let n = |i: usize| f[i].parse::<u64>().unwrap();
            (f[0].to_string(), (n(1), n(2), n(3)))
        })
        .collect();
    (results, field(&sigs, 1))
}

#[test]
fn parked_calls_behave_after_many_injections_and_futex_threads_are_never_used() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, tids) = start_parked(dir.path());
    let pid = p.pid();
    let mut seen = HashMap::<&str, Vec<String>>::new();
    for name in [
        "select",
        "poll",
        "epoll_wait",
        "accept",
        "read",
        "nanosleep",
        "clock_nanosleep",
    ] {
        for _ in 0..25 {
            let r = trim_when_parked(|| trim_thread(pid, tids[name], &opts()))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.tid, tids[name]);
            seen.entry(name).or_default().push(r.syscall);
        }
    }
    for _ in 0..10 {
        match trim_thread(pid, tids["cond"], &opts()) {
            Err(TrimError::Deferred { reason, .. }) => {
                assert!(reason.contains("futex"), "{reason}")
            }
            other => panic!("condition wait must never be used: {other:?}"),
        }
    }
    for (k, v) in &seen {
        let mut v = v.clone();
        v.dedup();
        eprintln!("{k}: injected while in {v:?}");
    }
    let (results, _) = stop_parked(p);
    for (name, (iters, errors, eintr)) in &results {
        eprintln!("{name}: {iters} iterations, {errors} errors, {eintr} EINTR");
        assert_eq!(
            *errors, 0,
            "{name} misbehaved after injections (see stderr)"
        );
        if name != "epoll_wait" {
            assert_eq!(*eintr, 0, "{name}");
        }
    }
}

#[test]
fn signals_sent_during_injections_are_delivered_afterwards() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut p, tids) = start_parked(dir.path());
    let pid = p.pid();
    let tid = tids["sig"];
    const N: u64 = 200;
    let trimming = Arc::new(AtomicBool::new(false));
    let sent_during = Arc::new(AtomicU64::new(0));
    let sender = {
        let (trimming, sent_during) = (trimming.clone(), sent_during.clone());
        std::thread::spawn(move || {
            for _ in 0..N {
                // Real-time signals queue: each one sent must be handled once.
                // SAFETY: kill has no memory preconditions.
                assert_eq!(unsafe { libc::kill(pid, 40) }, 0);
                if trimming.load(Ordering::SeqCst) {
                    sent_during.fetch_add(1, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_micros(1500));
            }
        })
    };
    let mut trims = 0;
    while !sender.is_finished() {
        trimming.store(true, Ordering::SeqCst);
        let r = trim_thread(pid, tid, &opts());
        trimming.store(false, Ordering::SeqCst);
        match r {
            Ok(_) => trims += 1,
            Err(TrimError::Deferred { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    sender.join().unwrap();
    p.send("sigs");
    let _ = p.until("signals");
    let (results, sigs) = stop_parked(p);
    eprintln!(
        "{trims} injections, {} of {N} signals sent while one was running, {sigs} handled",
        sent_during.load(Ordering::SeqCst)
    );
    assert!(trims > 0 && sent_during.load(Ordering::SeqCst) > 0);
    assert_eq!(sigs, N, "signals lost or duplicated");
    assert_eq!(
        results["sig"].1, 0,
        "sleep of the signalled thread misbehaved"
    );
}

#[test]
fn process_with_only_futex_and_busy_threads_is_deferred_and_untouched() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = build_c(dir.path(), "busy", &[]).expect("compile busy.c");
    let mut p = Proc::spawn(&mut Command::new(bin));
    assert_eq!(p.line(), "ready");
    // "ready" comes before the joiner and the waiter reach their futex waits.
    let pid = p.pid();
    let in_futex = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(Result::ok)
            .filter(|t| {
                std::fs::read_to_string(t.path().join("syscall"))
                    .is_ok_and(|s| s.starts_with("202 "))
            })
            .count()
            .eq(&2)
            .then_some(())
    };
    wait_for(Duration::from_secs(10), in_futex).expect("threads in futex");
    for _ in 0..20 {
        match trim_pid(p.pid(), &opts()) {
            Err(TrimError::Deferred { reason, .. }) => {
                assert!(reason.contains("futex"), "{reason}")
            }
            other => panic!("expected deferred, got {other:?}"),
        }
    }
    assert!(p.alive());
    let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid())).unwrap();
    assert!(status.contains("TracerPid:\t0"), "left attached");
}

/// tests/progs/lockheld.c with its malloc_stats thread blocked writing to the full stderr
/// pipe, holding the main arena lock: the process, that pipe (see [`release_the_arena`])
/// and the tid of its sleeper thread.
fn lockheld_with_the_arena_locked(dir: &Path) -> (Proc, ChildStderr, i32) {
    let bin = build_c(dir, "lockheld", &[]).expect("compile lockheld.c");
    let mut cmd = Command::new(bin);
    cmd.stderr(Stdio::piped());
    let mut p = Proc::spawn(&mut cmd);
    let stderr = p.child.stderr.take().unwrap();
    // The threads print their tids as they start: on a loaded machine after "ready".
    let mut lines = Vec::new();
    while !(["sleeper", "stats", "ready"]
        .iter()
        .all(|n| lines.iter().any(|l: &String| l.starts_with(n))))
    {
        lines.push(p.line());
    }
    let tid = |name: &str| -> i32 {
        let l = lines.iter().find(|l| l.starts_with(name)).unwrap();
        field(l, 1) as i32
    };
    let (sleeper, stats, pid) = (tid("sleeper"), tid("stats"), p.pid());
    let blocked = wait_for(Duration::from_secs(5), || {
        let s = std::fs::read_to_string(format!("/proc/{pid}/task/{stats}/syscall")).ok()?;
        s.starts_with("1 ").then_some(())
    });
    assert!(
        blocked.is_some(),
        "malloc_stats thread not blocked in write"
    );
    (p, stderr, sleeper)
}

/// Drain the pipe malloc_stats is blocked on and wait until it returned: the arena lock
/// is free again. Join the handle once the process is gone.
fn release_the_arena(p: &mut Proc, stderr: ChildStderr) -> std::thread::JoinHandle<()> {
    let drain = std::thread::spawn(move || {
        let _ = std::io::copy(&mut BufReader::new(stderr), &mut std::io::sink());
    });
    assert_eq!(p.until("done").1, "done");
    drain
}

#[test]
fn call_blocked_on_a_held_arena_lock_times_out_and_leaves_the_thread_working() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut p, stderr, sleeper) = lockheld_with_the_arena_locked(dir.path());
    let pid = p.pid();
    let short = TrimOptions {
        timeout: Duration::from_millis(300),
    };
    let r = trim_when_parked(|| trim_thread(pid, sleeper, &short));
    assert!(matches!(r, Err(TrimError::TimedOut { .. })), "{r:?}");
    // Unblock malloc_stats: the lock is released and the process carries on.
    let drain = release_the_arena(&mut p, stderr);
    let r = trim_when_parked(|| trim_thread(pid, sleeper, &opts())).expect("trim after unlock");
    assert_eq!(r.ret, r.ret.clamp(0, 1));
    p.send("stop");
    let (_, res) = p.until("result");
    assert!(field(&res, 1) > 0);
    assert_eq!(field(&res, 2), 0, "the restored sleeper misbehaved");
    drop(p);
    drain.join().unwrap();
}

/// Whether a thread of `pid` is traced by a thread of process `tracer` (the tracer a
/// thread's `TracerPid:` names is the tracing *thread*).
fn traced_by(pid: i32, tracer: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|t| {
        let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        s.lines()
            .filter_map(|l| l.strip_prefix("TracerPid:"))
            .any(|v| {
                let v = v.trim();
                v != "0" && Path::new(&format!("/proc/{tracer}/task/{v}")).exists()
            })
    })
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trimrun"))
        .arg("trim")
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sleeper() -> Proc {
    let mut p = Proc::spawn(Command::new("python3").args([
        "-c",
        "import sys; print('ready', flush=True); sys.stdin.read()",
    ]));
    assert_eq!(p.line(), "ready");
    p
}

/// Signal dispositions caught (`SigCgt`) and the main thread's mask (`SigBlk`).
fn sig_status(pid: i32) -> (String, String) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let get = |k: &str| {
        s.lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap()
            .trim()
            .to_string()
    };
    (get("SigCgt:"), get("SigBlk:"))
}

#[test]
fn cli_trims_a_python_process_and_keeps_its_signal_handlers_and_mask() {
    if unsupported() {
        return;
    }
    // faulthandler installs a SIGSEGV handler: the injected call must not reset it (the
    // kernel would, had SIGSEGV been blocked when the call faults at its return address).
    let mut p = Proc::spawn(Command::new("python3").args([
        "-X",
        "faulthandler",
        "-c",
        "import sys; print('ready', flush=True); sys.stdin.read()",
    ]));
    assert_eq!(p.line(), "ready");
    let before = sig_status(p.pid());
    let segv = 1u64 << (libc::SIGSEGV - 1);
    assert_ne!(u64::from_str_radix(&before.0, 16).unwrap() & segv, 0);
    let mut out = String::new();
    let ok = wait_for(Duration::from_secs(10), || {
        let (code, o, _) = cli(&[&p.pid().to_string()]);
        out = o;
        (code == 0).then_some(())
    });
    assert!(ok.is_some(), "never trimmed");
    assert!(out.starts_with(&format!("{}: released", p.pid())), "{out}");
    assert!(out.contains("in read"), "{out}");
    assert_eq!(
        sig_status(p.pid()),
        before,
        "signal handlers or mask changed"
    );
    assert!(p.alive());
}

#[test]
fn process_reading_a_named_fifo_is_trimmed() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("control");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::S_IRWXU).unwrap();
    let mut p = Proc::spawn(
        Command::new("python3")
            .arg("-c")
            .arg(
                "import sys; print('ready', flush=True); f = open(sys.argv[1], 'rb'); \
         print('opened', flush=True); f.read()",
            )
            .arg(&fifo),
    );
    assert_eq!(p.line(), "ready");
    // Opening the read end waits for a writer.
    let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    assert_eq!(p.line(), "opened");
    let r = trim_when_parked(|| trim_pid(p.pid(), &opts())).expect("trim of a fifo reader");
    assert_eq!(r.syscall, "read");
    assert!(p.alive());
    drop(writer);
}

#[test]
fn cli_interrupted_during_a_call_releases_the_thread_before_it_exits() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (mut p, stderr, _) = lockheld_with_the_arena_locked(dir.path());
    let pid = p.pid();
    // The CLI picks the sleeper (in nanosleep; the main thread waits for stderr's lock in
    // futex); the malloc_trim it injects waits for the arena lock malloc_stats holds, for
    // the whole --timeout. A Ctrl-C then arrives while the thread is running our call.
    // The CLI defers (exits 1 at once) when it finds no parked thread, as when the sleeper
    // is between two nanosleeps on a loaded machine: start it again, as an operator would.
    // An attempt counts only if the Ctrl-C was sent well within the CLI's --timeout (on a
    // loaded machine, seeing the attach and the blocked call can take seconds).
    const TIMEOUT: Duration = Duration::from_secs(6);
    let mut last = String::new();
    let mut outcome = None;
    for _ in 0..20 {
        let spawned = Instant::now();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_trimrun"));
        cmd.args(["trim", "--timeout", "6s", &pid.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // Ctrl-C as a terminal delivers it: a suite started in the background of a
        // non-interactive shell (`cmd &`) inherits SIGINT ignored, and an ignored signal is
        // rightly left ignored by the CLI.
        // SAFETY: signal() is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut t = cmd.spawn().unwrap();
        let attached = wait_for(Duration::from_secs(10), || {
            if traced_by(pid, t.id()) {
                return Some(true);
            }
            matches!(t.try_wait(), Ok(Some(_))).then_some(false)
        });
        // In our call: the sleeper too now waits in futex (for the arena lock), beside the
        // main thread. Waiting for that, not for a fixed time, keeps a loaded machine from
        // abandoning the call before the Ctrl-C arrives.
        let in_call = attached == Some(true)
            && wait_for(Duration::from_secs(10), || {
                (threads_in_syscall(pid, libc::SYS_futex) >= 2).then_some(())
            })
            .is_some();
        let interrupted = Instant::now();
        if in_call && interrupted - spawned < TIMEOUT - Duration::from_secs(1) {
            // SAFETY: kill has no memory preconditions; the pid is our own child.
            unsafe { libc::kill(t.id() as i32, libc::SIGINT) };
            outcome = Some((t.wait_with_output().unwrap(), interrupted.elapsed()));
            break;
        }
        if !in_call {
            let _ = t.kill();
        }
        let out = t.wait_with_output().unwrap();
        last = format!(
            "attached {attached:?}, in call {in_call}, {:?} after the start: {:?}: {}{}",
            interrupted - spawned,
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let (out, held) =
        outcome.unwrap_or_else(|| panic!("never interrupted trimrun trim in a call; last: {last}"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.signal(), Some(libc::SIGINT), "{err}");
    assert!(err.contains("did not return in time"), "{err}");
    assert!(
        held >= Duration::from_millis(500),
        "the CLI exited before the call was abandoned"
    );
    // Release the lock: the restored sleeper must still be sleeping correctly.
    let drain = release_the_arena(&mut p, stderr);
    p.send("stop");
    let (_, res) = p.until("result");
    assert!(field(&res, 1) > 0, "{res}");
    assert_eq!(field(&res, 2), 0, "the restored sleeper misbehaved: {res}");
    assert!(p.child.wait().unwrap().success());
    drop(p);
    drain.join().unwrap();
}

/// How many threads of `pid` are in syscall `nr` now (`/proc/PID/task/*/syscall`).
fn threads_in_syscall(pid: i32, nr: libc::c_long) -> usize {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter(|t| {
            std::fs::read_to_string(t.path().join("syscall"))
                .is_ok_and(|s| s.split_whitespace().next() == Some(&nr.to_string()))
        })
        .count()
}

#[test]
fn cli_rejects_bad_input_with_exit_2() {
    for args in [
        &[][..],
        &["abc"],
        &["0"],
        &["--timeout", "2h", "1"],
        &["--timeout"],
    ] {
        let (code, _, err) = cli(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        // Argument errors come from clap ("error: ..."), value errors from the subcommand.
        assert!(
            err.starts_with("trimrun trim: ") || err.starts_with("error:"),
            "{err}"
        );
    }
}

#[test]
fn cli_reports_a_nonexistent_pid() {
    // A pid that just exited and was reaped.
    let mut c = Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    let (code, _, err) = cli(&[&pid.to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("pid {pid} is gone")), "{err}");
    let (code, out, _) = cli(&["--json", &pid.to_string()]);
    assert_eq!(code, 1);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"], "gone");
    assert_eq!(v["retryable"], false);
}

#[test]
fn process_killed_mid_trim_is_reported_gone_or_exited() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = start_parked(dir.path());
    let pid = p.pid();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: kill has no memory preconditions; the pid is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    });
    let mut outcomes = HashMap::<&str, u32>::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match trim_pid(pid, &opts()) {
            Ok(_) => *outcomes.entry("ok").or_default() += 1,
            Err(TrimError::Deferred { .. }) => *outcomes.entry("deferred").or_default() += 1,
            Err(TrimError::Gone { .. }) => {
                *outcomes.entry("gone").or_default() += 1;
                break;
            }
            Err(TrimError::Exited { status, .. }) => {
                assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
                *outcomes.entry("exited").or_default() += 1;
                break;
            }
            Err(e) => panic!("unexpected error for a killed process: {e}"),
        }
        assert!(Instant::now() < deadline);
    }
    killer.join().unwrap();
    eprintln!("outcomes: {outcomes:?}");
    drop(p);
}

#[test]
fn cli_refuses_untraceable_target_with_a_remedy() {
    if unsupported() {
        return;
    }
    let p = sleeper();
    // trimrun as nobody against a root process.
    use std::os::unix::process::CommandExt;
    let out = Command::new(env!("CARGO_BIN_EXE_trimrun"))
        .args(["trim", &p.pid().to_string()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!("cannot trace pid {}", p.pid())),
        "{err}"
    );
    assert!(
        err.contains("permission denied") && err.contains("run as root"),
        "{err}"
    );
    assert!(p.alive());
}

#[test]
fn cli_reports_static_binary_has_no_malloc_trim() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let Some(bin) = build_c(dir.path(), "static_sleeper", &["-static"]) else {
        cannot_run("a static libc (libc.a) for cc -static");
        return;
    };
    let mut p = Proc::spawn(&mut Command::new(bin));
    assert_eq!(p.line(), "ready");
    let (code, _, err) = cli(&[&p.pid().to_string()]);
    assert_eq!(code, 1);
    assert!(err.contains("no malloc_trim"), "{err}");
    let (_, out, _) = cli(&["--json", &p.pid().to_string()]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["error"], "unavailable");
    assert!(p.alive());
}

#[test]
fn cli_reports_already_traced_target() {
    if unsupported() {
        return;
    }
    // The child asks its parent to trace it (PTRACE_TRACEME) and keeps running.
    let script = "import os, ctypes, sys, time\n\
                  pid = os.fork()\n\
                  if pid == 0:\n    ctypes.CDLL(None).ptrace(0, 0, 0, 0)\n    print(os.getpid(), flush=True)\n    time.sleep(600)\n\
                  else:\n    sys.stdin.read(); os.kill(pid, 9); os.waitpid(pid, 0)\n";
    let mut p = Proc::spawn(Command::new("python3").args(["-c", script]));
    let traced: i32 = p.line().parse().unwrap();
    // Killing the parent (Proc's drop) would orphan the traced child, asleep for 10
    // minutes with our stdout; it is killed here whatever the asserts say.
    struct KillOnDrop(i32);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            // SAFETY: kill has no memory preconditions.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _child = KillOnDrop(traced);
    let (code, _, err) = cli(&[&traced.to_string()]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("already traced by pid {}", p.pid())) && err.contains("detach"),
        "{err}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{traced}/stat")).unwrap();
    assert!(stat.contains(") S "), "traced child disturbed: {stat}");
    drop(p.stdin.take());
    assert!(
        p.child.wait().unwrap().success(),
        "the tracer did not end cleanly"
    );
}

/// Pseudo-random numbers for kill timings (no dependency; seeded from the clock and
/// printed, so a failing run can be told apart).
struct Lcg(u64);
impl Lcg {
    fn new() -> Lcg {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        eprintln!("seed {seed}");
        Lcg(seed | 1)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

/// Start `trimrun trim --timeout 5s PID`, wait until it has attached, wait a random
/// 0..max_ms, SIGKILL it. Returns whether it was still running (attached) when killed.
fn kill_trimmer_mid_trim(pid: i32, rng: &mut Lcg, max_ms: u64) -> bool {
    let mut t = Command::new(env!("CARGO_BIN_EXE_trimrun"))
        .args(["trim", "--timeout", "5s", &pid.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let trimmer = t.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !traced_by(pid, trimmer) && Instant::now() < deadline && t.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_micros(200));
    }
    std::thread::sleep(Duration::from_micros(rng.below(max_ms * 1000)));
    let running = t.try_wait().unwrap().is_none();
    let _ = t.kill();
    let _ = t.wait();
    running
}

/// Wait until no thread of `pid` is traced any more (the kernel detached them).
fn untraced(pid: i32) -> bool {
    wait_for(Duration::from_secs(5), || {
        let traced = std::fs::read_dir(format!("/proc/{pid}/task"))
            .ok()?
            .filter_map(Result::ok)
            .any(|t| {
                let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
                s.lines().any(|l| {
                    l.starts_with("TracerPid:") && l.split_whitespace().nth(1) != Some("0")
                })
            });
        (!traced).then_some(())
    })
    .is_some()
}

#[test]
fn trimmer_killed_at_random_moments_never_harms_c_or_python_targets() {
    if unsupported() {
        return;
    }
    let mut rng = Lcg::new();
    let dir = tempfile::tempdir().unwrap();
    // C: threads parked in every kind of call, a 60 MiB fragmented heap (calls of a few
    // to ~40 ms). Every kill leaves a frame mid-call; the parked program checks after
    // each call that it behaved.
    let (p, _) = start_parked(dir.path());
    let pid = p.pid();
    let mut during = 0;
    for _ in 0..6 {
        during += kill_trimmer_mid_trim(pid, &mut rng, 10) as u32;
        assert!(untraced(pid), "left traced");
        assert!(p.alive(), "the C target died after its trimmer was killed");
    }
    let (results, _) = stop_parked(p);
    for (name, (_, errors, eintr)) in &results {
        assert_eq!(*errors, 0, "{name} misbehaved after its trimmer was killed");
        if name != "epoll_wait" {
            assert_eq!(*eintr, 0, "{name}");
        }
    }
    // Python: a fragmented heap with a ticker thread (calls of ~1 ms).
    let mut py = Proc::spawn(
        Command::new("python3")
            .arg(progs().join("frag.py"))
            .args(["3", "20", "2", "--ticker"]),
    );
    assert!(py.line().starts_with("ready"));
    for _ in 0..4 {
        during += kill_trimmer_mid_trim(py.pid(), &mut rng, 3) as u32;
        assert!(untraced(py.pid()), "left traced");
        py.send("anon");
        assert!(
            py.line().starts_with("anon"),
            "python target stopped answering"
        );
    }
    eprintln!("{during} of 10 trimmers killed while attached");
    assert!(during >= 3, "too few kills landed during a trim");
    drop(py.stdin.take());
    assert!(py.child.wait().unwrap().success());
}

#[test]
fn exec_by_another_thread_during_trims_never_runs_the_call_in_the_new_image() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = build_c(dir.path(), "execer", &[]).expect("compile execer.c");
    // The chain runs under a shell that reports its exit status: were it our own child,
    // the tracer's waitpid could collect its exit before we do.
    let mut sh = Proc::spawn(
        Command::new("sh")
            .arg("-c")
            .arg("\"$0\" 400 </dev/null & echo \"pid $!\"; wait $!; echo \"status $?\"")
            .arg(&bin),
    );
    let pid = field(&sh.line(), 1) as i32;
    let mut outcomes = HashMap::<String, u32>::new();
    while procfs_alive(pid) {
        let kind = match trim_pid(pid, &opts()) {
            Ok(_) => "ok".to_string(),
            Err(TrimError::Deferred { reason, .. }) if reason.contains("new program") => {
                "deferred: exec".into()
            }
            Err(TrimError::Deferred { .. }) => "deferred".into(),
            Err(TrimError::Gone { .. }) | Err(TrimError::Exited { .. }) if !procfs_alive(pid) => {
                "gone at the end".into()
            }
            Err(e) => panic!("an exec race surfaced as: {e}"),
        };
        *outcomes.entry(kind).or_default() += 1;
    }
    eprintln!("outcomes: {outcomes:?}");
    let (before, status) = sh.until("status");
    assert_eq!(status, "status 0", "an image of the chain died: {before:?}");
    assert_eq!(before, ["done"]);
    assert!(
        outcomes.values().sum::<u32>() >= 10,
        "too few trims: {outcomes:?}"
    );
}

/// The process has not been reaped yet (an exec in progress can show its main thread as
/// a zombie for a moment; its parent reaps it only at the very end).
fn procfs_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn seccomp_target(dir: &Path, mode: &str) -> Proc {
    let bin = build_c(dir, "seccomp_target", &[]).expect("compile seccomp_target.c");
    let mut cmd = Command::new(bin);
    cmd.arg(mode).stderr(Stdio::piped());
    let mut p = Proc::spawn(&mut cmd);
    assert_eq!(p.line(), "ready");
    p
}

#[test]
fn processes_under_seccomp_are_refused_and_left_untouched() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for mode in ["strict", "kill", "trap"] {
        let mut p = seccomp_target(dir.path(), mode);
        // Parked in read(stdin) from a pipe: a safe place, were it not for seccomp.
        wait_for(Duration::from_secs(5), || {
            let s = std::fs::read_to_string(format!("/proc/{}/syscall", p.pid())).ok()?;
            s.starts_with("0 ").then_some(())
        })
        .expect("parked in read");
        match trim_pid(p.pid(), &opts()) {
            Err(TrimError::Unavailable { reason, .. }) => {
                assert!(reason.contains("seccomp"), "{mode}: {reason}")
            }
            other => panic!("{mode}: expected a refusal, got {other:?}"),
        }
        assert!(p.alive(), "{mode}: target died");
        drop(p.stdin.take());
        let status = p.child.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(p.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        assert!(status.success(), "{mode}: {status:?} {err}");
        assert!(!err.contains("SIGSYS"), "{mode}: its SIGSYS handler ran");
    }
}

#[test]
fn sigsegv_set_to_ignore_stays_ignored_after_trims() {
    if unsupported() {
        return;
    }
    let mut p = Proc::spawn(Command::new("python3").args([
        "-c",
        "import signal, sys; signal.signal(signal.SIGSEGV, signal.SIG_IGN); \
         print('ready', flush=True); sys.stdin.read()",
    ]));
    assert_eq!(p.line(), "ready");
    let ignored = |pid: i32| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let v = s.lines().find_map(|l| l.strip_prefix("SigIgn:")).unwrap();
        u64::from_str_radix(v.trim(), 16).unwrap()
    };
    let segv = 1u64 << (libc::SIGSEGV - 1);
    assert_ne!(ignored(p.pid()) & segv, 0);
    for _ in 0..3 {
        trim_when_parked(|| trim_pid(p.pid(), &opts())).expect("trim");
    }
    assert_ne!(ignored(p.pid()) & segv, 0, "SIGSEGV no longer ignored");
    assert!(p.alive());
}

/// A v1 freezer cgroup of our own; thawed and removed on drop.
struct Freezer(PathBuf);
impl Freezer {
    fn new() -> Option<Freezer> {
        let root = Path::new("/sys/fs/cgroup/freezer");
        if !root.join("cgroup.procs").exists() {
            return None;
        }
        let dir = root.join(format!("trimrun-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok()?;
        Some(Freezer(dir))
    }
    fn add(&self, pid: i32) {
        std::fs::write(self.0.join("cgroup.procs"), pid.to_string()).unwrap();
    }
    fn set(&self, state: &str) {
        std::fs::write(self.0.join("freezer.state"), state).unwrap();
        wait_for(Duration::from_secs(10), || {
            let now = std::fs::read_to_string(self.0.join("freezer.state")).ok()?;
            (now.trim() == state).then_some(())
        })
        .unwrap_or_else(|| panic!("freezer never reached {state}"));
    }
    fn state(&self) -> String {
        std::fs::read_to_string(self.0.join("freezer.state"))
            .unwrap()
            .trim()
            .to_string()
    }
}
impl Drop for Freezer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
        let _ = wait_for(Duration::from_secs(5), || std::fs::remove_dir(&self.0).ok());
    }
}

#[test]
fn frozen_target_is_released_untouched_within_the_timeout_and_signals_end_the_cli() {
    use std::os::unix::process::ExitStatusExt;
    if unsupported() {
        return;
    }
    let Some(freezer) = Freezer::new() else {
        cannot_run("a cgroup v1 freezer at /sys/fs/cgroup/freezer");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (p, _) = start_parked(dir.path());
    let pid = p.pid();
    freezer.add(pid);
    freezer.set("FROZEN");
    let short = TrimOptions {
        timeout: Duration::from_millis(300),
    };
    match trim_pid(pid, &short) {
        Err(TrimError::Deferred { reason, .. }) => {
            assert!(reason.contains("did not stop"), "{reason}")
        }
        other => panic!("expected deferred, got {other:?}"),
    }
    assert_eq!(freezer.state(), "FROZEN", "returned only after a thaw");
    assert!(untraced(pid), "left traced while frozen");
    // The CLI: a TERM while it waits on the frozen thread ends it, still frozen.
    let t = Command::new(env!("CARGO_BIN_EXE_trimrun"))
        .args(["trim", "--timeout", "2s", &pid.to_string()])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let attached = wait_for(Duration::from_secs(10), || {
        traced_by(pid, t.id()).then_some(())
    });
    assert!(attached.is_some(), "the CLI never attached");
    // SAFETY: kill has no memory preconditions; the pid is our own child.
    unsafe { libc::kill(t.id() as i32, libc::SIGTERM) };
    let out = t.wait_with_output().unwrap();
    assert_eq!(out.status.signal(), Some(libc::SIGTERM));
    assert_eq!(freezer.state(), "FROZEN", "the CLI waited for a thaw");
    assert!(untraced(pid));
    freezer.set("THAWED");
    let (results, _) = stop_parked(p);
    for (name, (_, errors, _)) in &results {
        assert_eq!(*errors, 0, "{name} misbehaved after the freeze");
    }
}

#[test]
fn thread_sleeping_in_a_signal_handler_is_never_used() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = build_c(dir.path(), "handler", &[]).expect("compile handler.c");
    for mode in ["stack", "alt"] {
        let mut p = Proc::spawn(Command::new(&bin).arg(mode));
        let tid = field(&p.line(), 1) as i32;
        // Before the signal the thread sleeps in nanosleep: a fine place.
        trim_when_parked(|| trim_thread(p.pid(), tid, &opts())).expect("trim before");
        p.send("go");
        assert_eq!(p.line(), "in-handler");
        // The handler wakes every 20 ms, and on a loaded machine it may wait for a CPU:
        // caught between two sleeps the thread is deferred as running, which is fine but
        // proves nothing. Count only deferrals caught while it sleeps in the handler; any
        // trim that goes through fails the test.
        let mut in_handler = 0;
        let got = wait_for(Duration::from_secs(30), || {
            match trim_thread(p.pid(), tid, &opts()) {
                Err(TrimError::Deferred { reason, .. }) if reason.contains("signal handler") => {
                    in_handler += 1
                }
                Err(TrimError::Deferred { reason, .. }) => {
                    assert!(reason.contains("running"), "{mode}: {reason}")
                }
                other => panic!("{mode}: a thread in a signal handler was used: {other:?}"),
            }
            (in_handler >= 5).then_some(())
        });
        assert!(
            got.is_some(),
            "{mode}: only {in_handler} of 5 deferrals saw the handler"
        );
        p.send("stop");
        assert!(p.child.wait().unwrap().success());
    }
}

#[test]
fn process_whose_main_thread_exited_is_trimmed_through_another_thread() {
    if unsupported() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let bin = build_c(dir.path(), "mainexit", &[]).expect("compile mainexit.c");
    let mut p = Proc::spawn(&mut Command::new(bin));
    assert_eq!(p.line(), "ready");
    let r = trim_when_parked(|| trim_pid(p.pid(), &opts())).expect("trim");
    assert_ne!(r.tid, p.pid());
    assert_eq!(r.syscall, "read");
    drop(p.stdin.take());
    assert!(p.child.wait().unwrap().success());
}

#[test]
fn kernel_threads_are_reported_as_such() {
    if unsupported() {
        return;
    }
    let (code, _, err) = cli(&["2"]);
    assert_eq!(code, 1);
    assert!(err.contains("kernel thread"), "{err}");
}

// Keep the helper types used even when some tests are skipped.
#[allow(dead_code)]
fn _types(_: TrimReport, _: Mutex<()>) {}
