//! `trimrun status`, `trimrun ctl` and `/metrics` against a real pool of `examples/app.py`
//! workers, through the real executable.
//!
//! All ignored until the supervisor is wired into main.rs ("needs supervisor wiring"); the
//! lead un-ignores them after merging. They assume this command line:
//!
//! ```text
//! trimrun -n 2 --bind 127.0.0.1:PORT --control DIR/ctl.sock --metrics 127.0.0.1:PORT2 \
//!     --log-format json -- python3 examples/app.py
//! trimrun status --control DIR/ctl.sock [--json] [--watch]
//! trimrun ctl --control DIR/ctl.sock reload | scale +1|-1|N | recycle SLOT | trim SLOT|all | stop [--graceful]
//! ```

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::wait_for;
use trimrun::status::Snapshot;

const TRIMRUN: &str = env!("CARGO_BIN_EXE_trimrun");
/// Workers of app.py start in well under a second; recycles wait for READY=1 or a delay.
const SETTLE: Duration = Duration::from_secs(30);

fn free_port() -> u16 {
    // Bind, read the port, let it go: the pool binds it a moment later.
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `trimrun` with its control socket, HTTP port, metrics port and log lines.
struct Pool {
    child: Child,
    _dir: tempfile::TempDir,
    ctl: PathBuf,
    http: SocketAddr,
    metrics: SocketAddr,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Pool {
    fn start(workers: usize) -> Pool {
        Self::start_with(workers, &[])
    }

    fn start_with(workers: usize, extra: &[&str]) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let ctl = dir.path().join("ctl.sock");
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(TRIMRUN);
        cmd.arg("-n")
            .arg(workers.to_string())
            .arg("--bind")
            .arg(http.to_string())
            .arg("--control")
            .arg(&ctl)
            .arg("--metrics")
            .arg(metrics.to_string())
            .args(["--log-format", "json"])
            .args(extra)
            .arg("--")
            .arg("python3")
            .arg(common::example("app.py"))
            .env_remove("TRIMRUN_CONTROL")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("run trimrun");
        let stderr = Arc::new(Mutex::new(Vec::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = stderr.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        let pool = Pool {
            child,
            _dir: dir,
            ctl,
            http,
            metrics,
            stderr,
        };
        pool.wait_settled(workers);
        pool
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `trimrun status --json`, parsed.
    fn status(&self) -> Snapshot {
        let out = self.cli(&["status", "--json"]);
        assert!(
            out.status.success(),
            "status failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "status --json is not a snapshot ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn try_status(&self) -> Option<Snapshot> {
        let out = self.cli(&["status", "--json"]);
        out.status
            .success()
            .then(|| serde_json::from_slice(&out.stdout).ok())
            .flatten()
    }

    /// Run `trimrun SUBCOMMAND --control CTL ARGS...`.
    fn cli(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(TRIMRUN);
        cmd.arg(args[0]).arg("--control").arg(&self.ctl);
        cmd.args(&args[1..]).env_remove("TRIMRUN_CONTROL");
        cmd.output().unwrap()
    }

    /// `trimrun ctl ARGS...`; returns the exit code and what it printed.
    fn ctl(&self, args: &[&str]) -> (i32, String) {
        let mut all = vec!["ctl"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// Wait until the pool has `n` ready workers and nothing in flight.
    fn wait_settled(&self, n: usize) -> Snapshot {
        wait_for(SETTLE, || {
            self.try_status().filter(|s| {
                s.state == "running"
                    && s.workers.len() == n
                    && s.recycles_in_progress == 0
                    && s.workers.iter().all(|w| w.state == "ready")
            })
        })
        .unwrap_or_else(|| {
            panic!(
                "pool did not settle at {n} ready workers; last status: {:?}\nlogs:\n{}",
                self.try_status(),
                self.logs().join("\n")
            )
        })
    }

    fn http_get(&self, target: &str) -> String {
        http_get(self.http, target)
    }

    fn metrics_text(&self) -> String {
        let resp = http_get(self.metrics, "/metrics");
        let (head, body) = resp.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    fn logs(&self) -> Vec<String> {
        self.stderr.lock().unwrap().clone()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Wait for trimrun to exit; its exit code.
    fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        wait_for(timeout, || {
            self.child
                .try_wait()
                .unwrap()
                .map(|s| s.code().unwrap_or(-1))
        })
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        self.signal(nix::sys::signal::Signal::SIGTERM);
        if self.wait_exit(Duration::from_secs(15)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn http_get(addr: SocketAddr, target: &str) -> String {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn pids(s: &Snapshot) -> BTreeSet<i32> {
    s.workers.iter().map(|w| w.pid).collect()
}

fn pid_by_slot(s: &Snapshot) -> BTreeMap<usize, i32> {
    s.workers.iter().map(|w| (w.slot, w.pid)).collect()
}

/// `name{labels}` → value from Prometheus text.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

/// Sum of the samples of a metric (all label sets).
fn sum_of(text: &str, metric: &str) -> f64 {
    samples(text)
        .iter()
        .filter(|(k, _)| *k == metric || k.starts_with(&format!("{metric}{{")))
        .map(|(_, v)| v)
        .sum()
}

fn ppid(pid: i32) -> Option<i32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("PPid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// The memory reading trimrun's backend is meant to report for one worker: the cgroup
/// working set (current − inactive_file) for v2/v1, the smaps_rollup sum for none.
/// Returns the candidates: the none backend may sum Rss or Pss.
fn kernel_reading(backend: &str, pid: i32) -> Vec<u64> {
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let stat_field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let read_u64 = |p: &Path| -> u64 {
        std::fs::read_to_string(p)
            .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            .trim()
            .parse()
            .unwrap()
    };
    match backend {
        "v2" => {
            let rel = cgroup.lines().find_map(|l| l.strip_prefix("0::")).unwrap();
            let dir = Path::new("/sys/fs/cgroup").join(rel.trim_start_matches('/'));
            let current = read_u64(&dir.join("memory.current"));
            let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap();
            vec![current.saturating_sub(stat_field(&stat, "inactive_file"))]
        }
        "v1" => {
            let rel = cgroup
                .lines()
                .find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, ctrls, path) = (parts.next()?, parts.next()?, parts.next()?);
                    ctrls.split(',').any(|c| c == "memory").then_some(path)
                })
                .unwrap();
            let dir = Path::new("/sys/fs/cgroup/memory").join(rel.trim_start_matches('/'));
            let usage = read_u64(&dir.join("memory.usage_in_bytes"));
            let stat = std::fs::read_to_string(dir.join("memory.stat")).unwrap();
            vec![usage.saturating_sub(stat_field(&stat, "total_inactive_file"))]
        }
        _ => {
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
            let kib = |key: &str| {
                rollup
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0)
                    * 1024
            };
            vec![kib("Rss:"), kib("Pss:")]
        }
    }
}

fn within(a: u64, b: u64, pct: f64) -> bool {
    (a as f64 - b as f64).abs() <= b as f64 * pct / 100.0
}

#[test]
fn status_json_reports_the_pools_real_pids_and_memory() {
    let pool = Pool::start(2);
    // Give each worker some memory of its own so the comparison is not about noise.
    for _ in 0..4 {
        pool.http_get("/alloc?mb=8");
    }
    let s = pool.status();
    assert_eq!(s.pid, pool.pid());
    assert_eq!(s.target_workers, 2);
    assert_eq!(s.workers.len(), 2);
    assert_eq!(
        s.workers.iter().map(|w| w.slot).collect::<BTreeSet<_>>(),
        BTreeSet::from([0, 1])
    );
    for w in &s.workers {
        assert_eq!(
            ppid(w.pid),
            Some(pool.pid()),
            "worker {} is not our child",
            w.pid
        );
        assert!(cmdline(w.pid).contains("app.py"), "{}", cmdline(w.pid));
        assert!(w.generation < 5, "first generations: {w:?}");
        assert!(w.age_secs > 0.0, "{w:?}");
    }
    // The pids the app itself reports are the ones status shows.
    let served: BTreeSet<i32> = (0..20)
        .map(|_| {
            let body = pool.http_get("/pid");
            let json = body.split_once("\r\n\r\n").unwrap().1;
            serde_json::from_str::<serde_json::Value>(json).unwrap()["pid"]
                .as_i64()
                .unwrap() as i32
        })
        .collect();
    assert!(served.is_subset(&pids(&s)), "{served:?} vs {:?}", pids(&s));

    // Memory within 5% of what the kernel says. The supervisor samples memory on its own
    // tick, so the allocations above show up within a tick or two: wait for agreement,
    // and report the last disagreement if it never comes.
    let mut last = String::new();
    let s = wait_for(Duration::from_secs(10), || {
        let s = pool.status();
        let off: Vec<String> = s
            .workers
            .iter()
            .filter_map(|w| {
                let readings = kernel_reading(&s.backend, w.pid);
                (!readings.iter().any(|r| within(w.working_set, *r, 5.0))).then(|| {
                    format!(
                        "slot {} ({} backend): status says {} bytes, kernel says {readings:?}",
                        w.slot, s.backend, w.working_set
                    )
                })
            })
            .collect();
        last = off.join("; ");
        off.is_empty().then_some(s)
    })
    .unwrap_or_else(|| panic!("memory never agreed: {last}"));
    for w in &s.workers {
        if let Some(limit) = w.limit {
            assert!(limit > 0, "{w:?}");
        }
    }
    assert_eq!(
        s.workers.iter().map(|w| w.working_set).sum::<u64>(),
        s.total_working_set()
    );

    // The table shows the same pool.
    let out = pool.cli(&["status"]);
    assert!(out.status.success());
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.starts_with(&format!("trimrun pid {} (running", pool.pid())),
        "{table}"
    );
    for w in &s.workers {
        assert!(table.contains(&format!(" {} ", w.pid)), "{table}");
    }
}

#[test]
fn ctl_scale_changes_the_pool_as_ttin_and_ttou_do() {
    use nix::sys::signal::Signal;
    let pool = Pool::start(2);
    let before = pids(&pool.status());

    let (code, out) = pool.ctl(&["scale", "+1"]);
    assert_eq!(code, 0, "{out}");
    let s = pool.wait_settled(3);
    assert_eq!(s.target_workers, 3);
    assert!(before.is_subset(&pids(&s)), "scaling up replaced workers");

    pool.signal(Signal::SIGTTOU);
    let s = pool.wait_settled(2);
    assert_eq!(s.target_workers, 2);

    pool.signal(Signal::SIGTTIN);
    let s = pool.wait_settled(3);
    assert_eq!(s.target_workers, 3);

    let (code, out) = pool.ctl(&["scale", "-1"]);
    assert_eq!(code, 0, "{out}");
    pool.wait_settled(2);

    let (code, out) = pool.ctl(&["scale", "4"]);
    assert_eq!(code, 0, "{out}");
    let s = pool.wait_settled(4);
    assert_eq!(
        s.workers.iter().map(|w| w.slot).collect::<BTreeSet<_>>(),
        BTreeSet::from([0, 1, 2, 3])
    );
    let m = pool.metrics_text();
    assert_eq!(samples(&m)["trimrun_workers"], 4.0, "{m}");
    assert_eq!(samples(&m)["trimrun_target_workers"], 4.0, "{m}");

    // Bad arguments are usage errors (exit 2) and change nothing.
    for bad in [&["scale", "0"][..], &["scale", "+x"], &["scale"]] {
        let (code, out) = pool.ctl(bad);
        assert_eq!(code, 2, "{bad:?}: {out}");
    }
    assert_eq!(pool.status().target_workers, 4);
}

#[test]
fn ctl_recycle_replaces_one_worker_and_counts_it() {
    let pool = Pool::start(2);
    let before = pool.status();
    let old = pid_by_slot(&before);
    let old_gen = before
        .workers
        .iter()
        .find(|w| w.slot == 0)
        .unwrap()
        .generation;

    let (code, out) = pool.ctl(&["recycle", "0"]);
    assert_eq!(code, 0, "{out}");
    let after = wait_for(SETTLE, || {
        pool.try_status().filter(|s| {
            s.recycles_in_progress == 0
                && s.workers.len() == 2
                && s.workers.iter().all(|w| w.state == "ready")
                && pid_by_slot(s).get(&0) != old.get(&0)
        })
    })
    .expect("slot 0 was not replaced");
    let w0 = after.workers.iter().find(|w| w.slot == 0).unwrap();
    assert!(w0.generation > old_gen, "{w0:?}");
    assert!(w0.recycles >= 1, "{w0:?}");
    assert!(w0.last_reason.is_some(), "{w0:?}");
    assert_eq!(
        pid_by_slot(&after)[&1],
        old[&1],
        "slot 1 must not be touched"
    );
    assert!(after.recycles >= 1);
    // The old worker is gone for good.
    assert!(
        wait_for(SETTLE, || ppid(old[&0])
            .is_none_or(|p| p != pool.pid())
            .then_some(()))
        .is_some(),
        "old worker {} still running",
        old[&0]
    );
    let m = pool.metrics_text();
    assert!(
        sum_of(&m, "trimrun_recycles_total") >= 1.0,
        "recycle not counted:\n{m}"
    );
    assert!(
        m.lines()
            .any(|l| l.starts_with("trimrun_recycles_total{slot=\"0\",")),
        "{m}"
    );

    let (code, out) = pool.ctl(&["recycle", "99"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("99"), "the error names the slot: {out}");
}

#[test]
fn ctl_reload_replaces_every_worker_as_sighup_does() {
    let pool = Pool::start(2);
    let first = pids(&pool.status());

    let (code, out) = pool.ctl(&["reload"]);
    assert_eq!(code, 0, "{out}");
    let second = wait_for(SETTLE, || {
        pool.try_status()
            .filter(|s| {
                s.state == "running"
                    && s.workers.len() == 2
                    && s.workers.iter().all(|w| w.state == "ready")
                    && pids(s).is_disjoint(&first)
            })
            .map(|s| pids(&s))
    })
    .expect("ctl reload did not replace every worker");

    pool.signal(nix::sys::signal::Signal::SIGHUP);
    wait_for(SETTLE, || {
        pool.try_status().filter(|s| {
            s.state == "running"
                && s.workers.len() == 2
                && s.workers.iter().all(|w| w.state == "ready")
                && pids(s).is_disjoint(&second)
        })
    })
    .expect("SIGHUP did not replace every worker");
}

#[test]
fn ctl_trim_moves_the_trim_counters() {
    if !common::is_root()
        && std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .is_ok_and(|v| v.trim() != "0")
        && common::cannot_run("ptrace of our own children (root or yama ptrace_scope 0)")
    {
        return;
    }
    let pool = Pool::start(2);
    for _ in 0..4 {
        pool.http_get("/alloc?mb=4");
    }
    let before = pool.status();
    let m0 = pool.metrics_text();

    let (code, out) = pool.ctl(&["trim", "all"]);
    assert_eq!(code, 0, "{out}");
    // A trim is deferred when no thread of the worker is parked in a safe syscall at that
    // instant (likelier on a busy machine): ask again for the workers not trimmed yet.
    let after = wait_for(SETTLE, || {
        let s = pool.try_status()?;
        if s.workers.iter().all(|w| w.trims > 0) && s.trims > before.trims {
            return Some(s);
        }
        for w in s.workers.iter().filter(|w| w.trims == 0) {
            pool.ctl(&["trim", &w.slot.to_string()]);
        }
        std::thread::sleep(Duration::from_millis(300));
        None
    })
    .expect("trim all did not trim every worker");
    assert!(
        after.workers.iter().all(|w| w.last_trim_pause_us.is_some()),
        "{after:?}"
    );
    let m1 = pool.metrics_text();
    assert!(
        sum_of(&m1, "trimrun_trims_total") >= sum_of(&m0, "trimrun_trims_total") + 2.0,
        "{m1}"
    );
    assert!(
        sum_of(&m1, "trimrun_trim_pause_seconds_count") >= 2.0,
        "{m1}"
    );
    assert!(
        m1.contains("trimrun_trim_released_bytes_total{slot=\"0\"}"),
        "{m1}"
    );

    let (code, out) = pool.ctl(&["trim", "1"]);
    assert_eq!(code, 0, "{out}");
    let w1 = |s: &Snapshot| s.workers.iter().find(|w| w.slot == 1).unwrap().trims;
    wait_for(SETTLE, || pool.try_status().filter(|s| w1(s) > w1(&after)))
        .expect("trim 1 did not trim slot 1");
}

#[test]
fn metrics_of_a_real_pool_match_status_and_pass_promtool() {
    let pool = Pool::start(2);
    // Status and metrics are both fed by the supervisor's memory tick: they agree once
    // a tick has passed between the two reads.
    let mut last = String::new();
    let m = wait_for(Duration::from_secs(10), || {
        let s = pool.status();
        let m = pool.metrics_text();
        let v = samples(&m);
        let off: Vec<String> = s
            .workers
            .iter()
            .filter_map(|w| {
                let key = format!("trimrun_worker_working_set_bytes{{slot=\"{}\"}}", w.slot);
                let got = v.get(&key).copied().unwrap_or(-1.0);
                (!within(got as u64, w.working_set, 5.0))
                    .then(|| format!("{key} = {got}, status says {}", w.working_set))
            })
            .collect();
        last = off.join("; ");
        off.is_empty().then_some(m)
    })
    .unwrap_or_else(|| panic!("metrics never agreed with status: {last}"));
    let v = samples(&m);
    assert_eq!(v["trimrun_workers"], 2.0, "{m}");
    assert_eq!(v["trimrun_target_workers"], 2.0, "{m}");
    assert_eq!(v["trimrun_recycles_in_progress"], 0.0, "{m}");
    if which("promtool").is_none() && common::cannot_run("promtool") {
        return;
    }
    {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(m.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}

#[test]
fn every_log_line_is_json_with_log_format_json() {
    let mut pool = Pool::start(2);
    let (code, out) = pool.ctl(&["recycle", "1"]);
    assert_eq!(code, 0, "{out}");
    pool.wait_settled(2);
    let (code, out) = pool.ctl(&["stop", "--graceful"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        pool.wait_exit(SETTLE),
        Some(0),
        "graceful stop did not exit 0"
    );
    // Let the reader threads drain the pipes.
    std::thread::sleep(Duration::from_millis(200));
    let logs = pool.logs();
    assert!(!logs.is_empty(), "no log lines at all");
    for line in &logs {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(v.is_object(), "{line}");
        assert!(v.get("level").is_some(), "no level: {line}");
    }
    // After a stop the socket is gone and status says nobody is there.
    assert!(!pool.ctl.exists(), "control socket left behind");
    let out = pool.cli(&["status"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "no trimrun is listening on {} (is it running? pass --control PATH)",
            pool.ctl.display()
        )),
        "{err}"
    );
}

#[test]
fn status_watch_on_a_pipe_prints_a_table_every_second() {
    let pool = Pool::start(2);
    let mut watch = Command::new(TRIMRUN)
        .args(["status", "--watch", "--control"])
        .arg(&pool.ctl)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let tables = Arc::new(Mutex::new(0usize));
    let count = tables.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            assert!(
                !line.contains('\x1b'),
                "no ANSI escapes on a pipe: {line:?}"
            );
            if line.starts_with("SLOT") {
                *count.lock().unwrap() += 1;
            }
        }
    });
    let got = wait_for(Duration::from_secs(10), || {
        (*tables.lock().unwrap() >= 3).then_some(())
    });
    let _ = watch.kill();
    let _ = watch.wait();
    assert!(got.is_some(), "fewer than 3 tables in 10s");
}

#[test]
fn status_and_ctl_without_a_listener_exit_1_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nobody.sock");
    for args in [&["status"][..], &["status", "--json"], &["ctl", "reload"]] {
        let out = Command::new(TRIMRUN)
            .args(args)
            .arg("--control")
            .arg(&path)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(&format!(
                "no trimrun is listening on {} (is it running? pass --control PATH)",
                path.display()
            )),
            "{args:?}: {err}"
        );
    }
    let out = Command::new(TRIMRUN)
        .args(["ctl", "scale", "sideways", "--control"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn second_trimrun_on_the_same_control_socket_is_refused() {
    let pool = Pool::start(1);
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let out = Command::new(TRIMRUN)
        .args(["-n", "1", "--bind"])
        .arg(http.to_string())
        .arg("--control")
        .arg(&pool.ctl)
        .args(["--", "python3"])
        .arg(common::example("app.py"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "is in use by a running trimrun (pid {})",
            pool.pid()
        )),
        "{err}"
    );
    // The first one is unharmed.
    assert_eq!(pool.status().workers.len(), 1);
}

#[test]
fn trim_counters_only_go_up_and_status_metrics_and_the_log_agree() {
    if !common::is_root()
        && std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
            .is_ok_and(|v| v.trim() != "0")
        && common::cannot_run("ptrace of our own children (root or yama ptrace_scope 0)")
    {
        return;
    }
    let pool = Pool::start(2);
    for _ in 0..4 {
        pool.http_get("/alloc?mb=4");
    }
    // A trim is deferred while no thread of the worker is parked in a safe syscall: ask
    // again until each worker has been trimmed once.
    let trimmed = wait_for(SETTLE, || {
        let s = pool.try_status()?;
        if s.workers.iter().all(|w| w.trims > 0) {
            return Some(s);
        }
        for w in s.workers.iter().filter(|w| w.trims == 0) {
            pool.ctl(&["trim", &w.slot.to_string()]);
        }
        std::thread::sleep(Duration::from_millis(300));
        None
    })
    .expect("trims did not reach every worker");
    // Replace the worker of slot 0: its trims stay in the pool's total, its successor
    // starts from zero.
    let (code, out) = pool.ctl(&["recycle", "0"]);
    assert_eq!(code, 0, "{out}");
    let mut seen = trimmed.trims;
    let settled = wait_for(SETTLE, || {
        let s = pool.try_status()?;
        assert!(
            s.trims >= seen,
            "pool trims went back: {seen} -> {}",
            s.trims
        );
        seen = s.trims;
        (s.recycles == 1
            && s.recycles_in_progress == 0
            && s.workers.len() == 2
            && s.workers.iter().all(|w| w.state == "ready"))
        .then_some(s)
    })
    .expect("recycle did not complete");
    let slot0 = settled.workers.iter().find(|w| w.slot == 0).unwrap();
    assert_eq!(slot0.generation, 1);
    assert_eq!(slot0.trims, 0, "a replacement starts its own trim count");
    assert_eq!(slot0.recycles, 1);
    assert_eq!(settled.trims, trimmed.trims, "{settled:?}");
    assert_eq!(settled.released_bytes, trimmed.released_bytes);
    // /metrics says the same.
    let m = pool.metrics_text();
    assert_eq!(
        sum_of(&m, "trimrun_trims_total") as u64,
        settled.trims,
        "{m}"
    );
    assert_eq!(
        sum_of(&m, "trimrun_trim_released_bytes_total") as u64,
        settled.released_bytes,
        "{m}"
    );
    assert_eq!(
        sum_of(&m, "trimrun_recycles_total") as u64,
        settled.recycles,
        "{m}"
    );
    // ... and so does the log: one "trimmed" event per trim, with its bytes.
    let events: Vec<serde_json::Value> = pool
        .logs()
        .iter()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let trims: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["message"] == "trimmed")
        .collect();
    assert_eq!(trims.len() as u64, settled.trims);
    let released: u64 = trims.iter().map(|e| e["released"].as_u64().unwrap()).sum();
    assert_eq!(released, settled.released_bytes);
    // Fields have their real types: no Rust debug text, arrays as arrays.
    let start = events
        .iter()
        .find(|e| e["message"] == "starting pool")
        .expect("a starting pool event");
    assert!(start["cmd"].is_array(), "{start}");
    assert!(start["listeners"].is_array(), "{start}");
    assert!(start.get("limit").is_none(), "no limit, no field: {start}");
    for l in pool.logs() {
        assert!(!l.contains("Some("), "{l}");
    }
}
