//! The pool-level cgroup scenarios shared by `tests/pool_cgroup.rs` (v1 and none, on the
//! host) and `tests/pool_cgroup_v2.rs` (v2, inside a VM): a harness that runs the real
//! `trimrun` binary with Python workers, and one function per scenario, parameterised by
//! the cgroup hierarchy (`Hier`), so both backends are held to the same checks.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::{example, wait_for};

/// What `--limit auto` should give: (available − reserve) / workers, whole pages, where
/// the reserve is 5% of what is available, at least 32 MiB and at most 256 MiB. Written
/// out here rather than taken from the crate, so a change of the rule shows.
pub fn expected_auto_limit(available: u64, workers: u64) -> u64 {
    let reserve = (available / 20).clamp(32 * MIB, 256 * MIB);
    ((available - reserve) / workers) & !4095
}

pub const BIN: &str = env!("CARGO_BIN_EXE_trimrun");
pub const MIB: u64 = 1 << 20;

pub use super::common::vm::in_vm;

/// A bound stretched for the guest: code under TCG runs 10-40x slower than on the host.
pub fn secs(host: u64) -> Duration {
    Duration::from_secs(if in_vm() { host * 20 } else { host })
}

/// Which cgroup hierarchy the memory controller lives on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hier {
    V1,
    V2,
}

impl Hier {
    pub fn flag(self) -> &'static str {
        match self {
            Hier::V1 => "v1",
            Hier::V2 => "v2",
        }
    }

    pub fn limit_file(self) -> &'static str {
        match self {
            Hier::V1 => "memory.limit_in_bytes",
            Hier::V2 => "memory.max",
        }
    }

    /// The memory cgroup directory of `pid` (None once the process is gone).
    pub fn dir_of(self, pid: i32) -> Option<PathBuf> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        let rel = text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            let hit = match self {
                Hier::V1 => ctl.split(',').any(|c| c == "memory"),
                Hier::V2 => ctl.is_empty(),
            };
            hit.then(|| path.to_string())
        })?;
        let mount = match self {
            Hier::V1 => "/sys/fs/cgroup/memory",
            Hier::V2 => "/sys/fs/cgroup",
        };
        Some(PathBuf::from(format!(
            "{mount}{}",
            rel.trim_end_matches('/').trim_end_matches("/supervisor")
        )))
    }

    /// The memory cgroup this test process (and so trimrun, before it moves) starts in.
    pub fn own_dir(self) -> PathBuf {
        self.dir_of(std::process::id() as i32).unwrap()
    }

    /// The exact memory cgroup of `pid`, without stripping a `supervisor` leaf.
    pub fn raw_dir_of(self, pid: i32) -> Option<String> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
        text.lines().find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            let hit = match self {
                Hier::V1 => ctl.split(',').any(|c| c == "memory"),
                Hier::V2 => ctl.is_empty(),
            };
            hit.then(|| path.to_string())
        })
    }

    /// Anonymous memory charged to the group (`total_rss` on v1, `anon` on v2).
    pub fn anon_key(self) -> &'static str {
        match self {
            Hier::V1 => "total_rss",
            Hier::V2 => "anon",
        }
    }
}

/// The memory cgroup a test starts trimrun in: the test's own, or a private child group
/// (created here, removed on drop) so that parallel tests and other runs on the machine
/// cannot clean up, or be counted as, this test's `trimrun-*` groups.
pub struct Place {
    pub hier: Hier,
    pub dir: PathBuf,
    pub private: bool,
}

impl Place {
    pub fn own(hier: Hier) -> Place {
        Place {
            hier,
            dir: hier.own_dir(),
            private: false,
        }
    }

    /// `<own>/pool-cgroup-<name>-<pid>`, with `memory.limit_in_bytes`/`memory.max` = `limit`.
    pub fn private(hier: Hier, name: &str, limit: Option<u64>) -> Place {
        let dir = hier
            .own_dir()
            .join(format!("pool-cgroup-{name}-{}", std::process::id()));
        if hier == Hier::V2 {
            // The parent must hand the memory controller down for memory.max to exist (the
            // root may do so with processes in it; an earlier run may have taken it back).
            let sc = hier.own_dir().join("cgroup.subtree_control");
            if !read(&sc).split_whitespace().any(|c| c == "memory") {
                std::fs::write(&sc, "+memory").unwrap();
            }
        }
        std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        if let Some(l) = limit {
            std::fs::write(dir.join(hier.limit_file()), l.to_string()).unwrap();
        }
        Place {
            hier,
            dir,
            private: true,
        }
    }

    /// How to start trimrun here: a shell that moves itself into the group and execs it
    /// (so trimrun is in the group from its first instruction, with the shell's pid).
    pub fn wrap(&self) -> Option<Vec<String>> {
        self.private.then(|| {
            vec![
                "sh".into(),
                "-c".into(),
                r#"echo $$ > "$0/cgroup.procs" && exec "$@""#.into(),
                self.dir.display().to_string(),
            ]
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        if !self.private {
            return;
        }
        // Whatever a run left inside (a trimrun killed before its teardown leaves its
        // tree): killed and removed bottom-up, waiting for each group to empty.
        fn remove_tree(dir: &Path) -> bool {
            let subdirs: Vec<_> = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            if !subdirs.iter().all(|d| remove_tree(d)) {
                return false;
            }
            wait_for(Duration::from_secs(30), || {
                for p in std::fs::read_to_string(dir.join("cgroup.procs"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok())
                {
                    // SAFETY: kill(2) of a process left in this test's own cgroup.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                match std::fs::remove_dir(dir) {
                    Ok(()) => Some(()),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some(()),
                    Err(_) => None,
                }
            })
            .is_some()
        }
        let gone = remove_tree(&self.dir).then_some(());
        if gone.is_none() && !std::thread::panicking() {
            panic!("cannot remove {}", self.dir.display());
        }
    }
}

pub fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
}

pub fn memory_stat(dir: &Path) -> HashMap<String, u64> {
    read(dir.join("memory.stat"))
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ')?;
            Some((k.to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// `smaps_rollup` of one process, kB fields as bytes.
pub fn smaps(pid: i32) -> HashMap<String, u64> {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, rest) = l.split_once(':')?;
            let kb: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            Some((k.to_string(), kb * 1024))
        })
        .collect()
}

pub use super::common::pool::{alive, children, free_port};

/// One HTTP/1.0 GET; the body on a 200.
pub fn get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(secs(20))).unwrap();
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

pub fn get_json(port: u16, path: &str) -> Result<Value, String> {
    let body = get(port, path)?;
    serde_json::from_str(&body).map_err(|e| format!("{e}: {body:?}"))
}

/// `worker started` from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub slot: usize,
    pub generation: u64,
    pub pid: i32,
    pub cgroup: String,
}

/// The value of `key=` in a tracing text line (quoted values unquoted).
pub fn field(line: &str, key: &str) -> Option<String> {
    let pat = format!(" {key}=");
    let at = line.find(&pat)? + pat.len();
    let rest = &line[at..];
    if let Some(q) = rest.strip_prefix('"') {
        return Some(q[..q.find('"')?].to_string());
    }
    Some(rest.split_whitespace().next()?.to_string())
}

pub fn started(log: &str) -> Vec<Started> {
    log.lines()
        .filter(|l| l.contains("worker started"))
        .filter_map(|l| {
            Some(Started {
                slot: field(l, "slot")?.parse().ok()?,
                generation: field(l, "generation")?.parse().ok()?,
                pid: field(l, "pid")?.parse().ok()?,
                cgroup: field(l, "cgroup").unwrap_or_default(),
            })
        })
        .collect()
}

/// A running trimrun, its log and control socket in a temp dir.
pub struct Pool {
    pub child: Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

impl Pool {
    /// `trimrun --bind 127.0.0.1:PORT --control DIR/ctl.sock ARGS -- python3 examples/app.py`,
    /// started through `wrap` (e.g. `sh -c '...; exec "$@"'`) when given.
    pub fn start(args: &[&str], wrap: Option<Vec<String>>) -> Pool {
        Self::start_cmd(args, &["python3", &example("app.py")], wrap)
    }

    pub fn start_cmd(args: &[&str], cmd: &[&str], wrap: Option<Vec<String>>) -> Pool {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let ctl = dir.path().join("ctl.sock");
        let mut argv: Vec<String> = vec![
            BIN.into(),
            "--bind".into(),
            format!("127.0.0.1:{port}"),
            "--control".into(),
            ctl.display().to_string(),
        ];
        argv.extend(args.iter().map(|s| s.to_string()));
        argv.push("--".into());
        argv.extend(cmd.iter().map(|s| s.to_string()));
        let mut c = match wrap {
            Some(w) => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]).args(&argv);
                c
            }
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        c.env("NO_COLOR", "1")
            .env_remove("TRIMRUN_CGROUP")
            .env_remove("TRIMRUN_LIMIT")
            .env_remove("TRIMRUN_LOG")
            .env_remove("TRIMRUN_CONTROL")
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        let child = c.stdout(Stdio::null()).stderr(log).spawn().unwrap();
        Pool { child, port, dir }
    }

    /// `trimrun -n N --limit L --cgroup C --ready delay:300ms --graceful-timeout 3s`, ready.
    pub fn app(n: usize, limit: &str, cgroup: &str, wrap: Option<Vec<String>>) -> Pool {
        let n = n.to_string();
        let p = Pool::start(
            &[
                "-n",
                &n,
                "--limit",
                limit,
                "--cgroup",
                cgroup,
                "--ready",
                "delay:300ms",
                "--graceful-timeout",
                "3s",
                // These tests watch particular workers: none is recycled early by the
                // first generation's spread (unit-tested in the supervisor and the policy).
                "--spread-first",
                "off",
            ],
            wrap,
        );
        p.wait_log("all workers ready", secs(20));
        p
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn ctl(&self) -> PathBuf {
        self.dir.path().join("ctl.sock")
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

    /// The first log line containing every needle, waiting up to `timeout`.
    pub fn wait_line(&self, needles: &[&str], timeout: Duration) -> String {
        wait_for(timeout, || {
            self.log()
                .lines()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .map(str::to_string)
        })
        .unwrap_or_else(|| {
            panic!(
                "no line with {needles:?} after {timeout:?}:\n{}",
                self.log()
            )
        })
    }

    /// `trimrun status --json --control DIR/ctl.sock`.
    pub fn status(&self) -> Value {
        let out = Command::new(BIN)
            .args(["status", "--json", "--control"])
            .arg(self.ctl())
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "trimrun status: {:?}\n{}\n--- log\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The status once every worker has a memory reading (a tick has run since it started).
    pub fn status_measured(&self) -> Value {
        wait_for(secs(10), || {
            let s = self.status();
            let ws = s["workers"].as_array()?;
            (!ws.is_empty() && ws.iter().all(|w| w["working_set"].as_u64() > Some(0))).then_some(s)
        })
        .unwrap_or_else(|| panic!("no memory readings in status:\n{}", self.log()))
    }

    /// slot → pid of the workers in `status`.
    pub fn slots(status: &Value) -> HashMap<usize, i32> {
        status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["slot"].as_u64().unwrap() as usize,
                    w["pid"].as_i64().unwrap() as i32,
                )
            })
            .collect()
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid(), sig) };
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(timeout, || self.child.try_wait().unwrap())
    }

    /// Workers answer on the port: every pid in `want` is seen serving `/pid`.
    pub fn all_serve(&self, want: &HashSet<i32>) {
        let mut seen = HashSet::new();
        let deadline = Instant::now() + secs(20);
        while !want.is_subset(&seen) && Instant::now() < deadline {
            match get_json(self.port, "/pid") {
                Ok(v) => {
                    seen.insert(v["pid"].as_i64().unwrap() as i32);
                }
                Err(e) => panic!("a request failed: {e}\n{}", self.log()),
            }
        }
        assert!(
            want.is_subset(&seen),
            "not serving: {:?} (seen {seen:?})\n{}",
            want.difference(&seen).collect::<Vec<_>>(),
            self.log()
        );
    }
}

impl Drop for Pool {
    /// QUIT (fast shutdown: workers killed, cgroups removed), SIGKILL if that hangs.
    fn drop(&mut self) {
        let workers = children(self.pid());
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal(libc::SIGQUIT);
            if self.wait_exit(secs(30)).is_none() {
                let _ = self.child.kill();
            }
        }
        let _ = self.child.wait();
        for w in workers {
            // SAFETY: kill(2) of a leftover process group from this test.
            unsafe { libc::kill(-w, libc::SIGKILL) };
        }
    }
}

// ------------------------------------------------------------------------ scenarios

/// N workers, each in its own `trimrun-<pid>/worker-<slot>-0` group with the limit, the
/// log's `cgroup=` is where the worker really is; `check(pool, base)` adds the backend's
/// own checks while the pool runs; after TERM trimrun exits 0 and its tree is gone.
/// Returns the pool's pid.
pub fn layout_limits_and_term_cleanup(
    at: &Place,
    n: usize,
    limit: u64,
    check: impl Fn(&Pool, &Path),
) -> i32 {
    let (hier, own) = (at.hier, at.dir.clone());
    let mut pool = Pool::app(n, &format!("{}M", limit / MIB), hier.flag(), at.wrap());
    let base = own.join(format!("trimrun-{}", pool.pid()));
    assert!(base.is_dir(), "{}\n{}", base.display(), pool.log());
    let st = pool.status_measured();
    assert_eq!(st["backend"], hier.flag());
    let slots = Pool::slots(&st);
    assert_eq!(slots.len(), n, "{st}");
    let log_started = started(&pool.log());
    let mut dirs = HashSet::new();
    for (slot, pid) in &slots {
        let dir = hier.dir_of(*pid).expect("worker alive");
        assert_eq!(
            dir,
            base.join(format!("worker-{slot}-0")),
            "worker {pid} of slot {slot} is in its own group"
        );
        assert_eq!(
            read(dir.join(hier.limit_file())).trim(),
            limit.to_string(),
            "{}",
            dir.display()
        );
        // Only the worker in its group, once the start-up's helpers (a pyenv shim's
        // subshells, for one) are gone.
        let alone = wait_for(secs(30), || {
            (read(dir.join("cgroup.procs")).trim() == pid.to_string()).then_some(())
        });
        assert!(
            alone.is_some(),
            "only the worker {pid} in its group: {}",
            read(dir.join("cgroup.procs"))
        );
        let s = log_started
            .iter()
            .find(|s| s.pid == *pid)
            .expect("a 'worker started' line");
        assert_eq!((s.slot, s.generation), (*slot, 0));
        assert_eq!(Path::new(&s.cgroup), dir, "log says where the worker is");
        dirs.insert(dir);
    }
    assert_eq!(dirs.len(), n, "one group per worker");
    for w in st["workers"].as_array().unwrap() {
        assert_eq!(w["limit"].as_u64(), Some(limit), "{w}");
        assert_eq!(w["state"], "ready", "{w}");
    }
    pool.all_serve(&slots.values().copied().collect());
    check(&pool, &base);
    let pid = pool.pid();
    pool.signal(libc::SIGTERM);
    let status = pool.wait_exit(secs(30)).expect("trimrun exits after TERM");
    assert_eq!(status.code(), Some(0), "{}", pool.log());
    assert!(!base.exists(), "{} left after TERM", base.display());
    // In a private group nothing else starts trimrun: no trimrun-* at all may remain.
    let left = trimrun_groups(&own, |p| at.private || p == pid);
    assert!(left.is_empty(), "{left:?}");
    for p in slots.values() {
        assert!(!alive(*p), "worker {p} outlived trimrun");
    }
    pid
}

/// The `trimrun-*` groups directly under `dir` whose pid matches.
pub fn trimrun_groups(dir: &Path, pid_matches: impl Fn(i32) -> bool) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("trimrun-"))
                .and_then(|r| r.split('-').next()?.parse::<i32>().ok())
                .is_some_and(&pid_matches)
        })
        .map(|e| e.path())
        .collect()
}

/// One worker allocates past its limit: the kernel kills it, trimrun logs an OOM kill with
/// the usage and the group's peak, counts it in `status`, and starts generation 1 in that
/// slot; the neighbours keep their pids and keep serving.
pub fn oom_kill_reported_replaced_neighbours_untouched(at: &Place, n: usize, limit: u64) {
    let hier = at.hier;
    let pool = Pool::app(n, &format!("{}M", limit / MIB), hier.flag(), at.wrap());
    let before = Pool::slots(&pool.status_measured());
    assert_eq!(before.len(), n);
    let alloc_mb = (limit / MIB) * 2 + 8;
    // The worker that takes this request dies before it answers.
    let r = get(pool.port, &format!("/alloc?mb={alloc_mb}"));
    assert!(r.is_err(), "an allocation past the limit succeeded: {r:?}");
    let (victim_slot, victim) = wait_for(secs(10), || {
        before
            .iter()
            .find(|(_, p)| !alive(**p))
            .map(|(s, p)| (*s, *p))
    })
    .unwrap_or_else(|| panic!("no worker died\n{}", pool.log()));
    let line = pool.wait_line(
        &[
            "worker was OOM-killed by the kernel at its own limit",
            &format!(" pid={victim} "),
        ],
        secs(10),
    );
    assert_eq!(
        field(&line, "slot").as_deref(),
        Some(&*victim_slot.to_string())
    );
    assert_eq!(field(&line, "limit"), Some(limit.to_string()), "{line}");
    let usage: u64 = field(&line, "usage")
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no usage in {line}"));
    assert!(usage > 0 && usage <= limit, "{line}");
    println!("{line}");
    let peak: u64 = field(&line, "peak")
        .and_then(|u| u.parse().ok())
        .unwrap_or_else(|| panic!("no peak in {line}"));
    assert!(
        peak >= limit / 10 * 9 && peak <= limit,
        "the group's peak is near the limit at the kill: {line}"
    );
    // Replaced: generation 1 in the same slot, in a fresh group with the same limit.
    let after = wait_for(secs(20), || {
        let s = pool.status();
        let ready = s["workers"]
            .as_array()?
            .iter()
            .all(|w| w["state"] == "ready");
        let slots = Pool::slots(&s);
        (ready && slots.len() == n && slots[&victim_slot] != victim).then_some(s)
    })
    .unwrap_or_else(|| panic!("slot {victim_slot} not replaced\n{}", pool.log()));
    assert_eq!(after["oom_kills"].as_u64(), Some(1), "{after}");
    let now = Pool::slots(&after);
    let new_pid = now[&victim_slot];
    let w = after["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"].as_i64() == Some(new_pid as i64))
        .unwrap();
    // Replaced once: restarted after the kill, or by the recycle the policy had already
    // begun when it saw the worker race towards its limit (the replacement then takes the
    // slot, and nothing needs restarting).
    let restarts = after["restarts"].as_u64().unwrap_or(0);
    let recycled = w["recycles"].as_u64().unwrap_or(0);
    assert_eq!(restarts + recycled, 1, "{after}");
    assert_eq!(w["generation"].as_u64(), Some(1), "{w}");
    let new_dir = hier.dir_of(new_pid).unwrap();
    assert!(
        new_dir.ends_with(format!("trimrun-{}/worker-{victim_slot}-1", pool.pid())),
        "{}",
        new_dir.display()
    );
    assert_eq!(
        read(new_dir.join(hier.limit_file())).trim(),
        limit.to_string()
    );
    let old_dir = new_dir
        .parent()
        .unwrap()
        .join(format!("worker-{victim_slot}-0"));
    wait_for(secs(10), || (!old_dir.exists()).then_some(()))
        .unwrap_or_else(|| panic!("{} not removed", old_dir.display()));
    // The neighbours: same pids, same groups, never OOM-killed, still serving.
    for (slot, pid) in &before {
        if *slot == victim_slot {
            continue;
        }
        assert_eq!(now[slot], *pid, "neighbour in slot {slot} was replaced");
        assert!(alive(*pid));
        let dir = hier.dir_of(*pid).unwrap();
        assert!(dir.ends_with(format!("worker-{slot}-0")));
        let kills = match hier {
            Hier::V1 => read(dir.join("memory.oom_control")),
            Hier::V2 => read(dir.join("memory.events")),
        };
        assert!(
            kills.lines().any(|l| l == "oom_kill 0"),
            "neighbour {slot}: {kills}"
        );
    }
    pool.all_serve(&now.values().copied().collect());
    assert_eq!(
        pool.log()
            .matches("worker was OOM-killed by the kernel")
            .count(),
        1,
        "{}",
        pool.log()
    );
}

/// What a worker's group charges and what its processes' `smaps_rollup` show, side by side.
#[derive(Debug)]
pub struct Compare {
    pub pid: i32,
    /// `status` working set (what trimrun acts on).
    pub working_set: u64,
    /// The group's anonymous memory (`total_rss` v1, `anon` v2), read with the smaps.
    pub group_anon: u64,
    /// File pages counted in the working set (`total_active_file` v1, `active_file` v2).
    pub group_active_file: u64,
    pub group_file_mapped: u64,
    /// Σ `Anonymous` over the group's processes.
    pub smaps_anon: u64,
    /// Σ (`Rss` − `Anonymous`): file and shmem pages mapped, wherever they are charged.
    pub smaps_file: u64,
}

fn rel(a: u64, b: u64) -> f64 {
    a.abs_diff(b) as f64 / b.max(1) as f64
}

/// Make every worker hold at least `mib` MiB (leaked through `/alloc`, touched) so that
/// anonymous memory dominates, wait for a memory tick after the last allocation, and
/// compare each worker's readings with the sum over its processes' `smaps_rollup`.
///
/// What is comparable: **anonymous memory**. A cgroup charges a file page to the group
/// that first faulted it in, so the interpreter's and libc's mapped pages (several MiB
/// in `smaps` `Rss`) are charged to whatever group loaded them first (usually not the
/// worker), while page cache the worker read but does not map, and kernel memory (page
/// tables, slab), are charged to the worker and invisible in `smaps`. So:
/// 1. the group's anon (`total_rss` / `anon`) must equal Σ `Anonymous` within 5%;
/// 2. the status `working_set` (what trimrun recycles on), minus the file pages it counts
///    (`active_file`, charged by first touch), must equal Σ `Anonymous` within 5%; the
///    remainder is kernel memory, small next to the tens of MiB a worker holds;
/// 3. the file side, reported, not equated: the group's mapped file pages can not exceed
///    what `smaps` shows mapped.
pub fn working_set_matches_smaps(at: &Place, n: usize, mib: u64) -> Vec<Compare> {
    let hier = at.hier;
    // Requests go to whichever worker accepts first, often unevenly (1 in 5 under TCG):
    // small steps and a limit with room for one worker taking nearly all of them.
    let (step, tries) = (2, 150);
    let pool = Pool::app(n, "384M", hier.flag(), at.wrap());
    // The first generation's thresholds are spread over a life (policy::new_initial), so a
    // worker may be recycled early once, its memory gone with it: then fill the new set of
    // workers again (a replacement's threshold is not spread, so a second round holds).
    let mut st = None;
    for _ in 0..3 {
        let pids: HashSet<i32> = Pool::slots(&pool.status_measured())
            .values()
            .copied()
            .collect();
        let mut held: HashMap<i32, u64> = HashMap::new();
        for _ in 0..tries {
            if pids
                .iter()
                .all(|p| held.get(p).copied().unwrap_or(0) >= mib)
            {
                break;
            }
            let v = get_json(pool.port, &format!("/alloc?mb={step}")).unwrap();
            held.insert(
                v["pid"].as_i64().unwrap() as i32,
                v["leaked_mb"].as_u64().unwrap(),
            );
        }
        assert!(
            pids.iter()
                .all(|p| held.get(p).copied().unwrap_or(0) >= mib),
            "could not get {mib} MiB into every worker: {held:?}"
        );
        // A memory tick (1 s) after the last allocation.
        let t0 = pool.status()["uptime_secs"].as_f64().unwrap();
        let s = wait_for(secs(10), || {
            let s = pool.status();
            (s["uptime_secs"].as_f64()? > t0 + 2.2).then_some(s)
        })
        .unwrap();
        let now: HashSet<i32> = Pool::slots(&s).values().copied().collect();
        if now == pids {
            st = Some(s);
            break;
        }
    }
    let mut st = st.unwrap_or_else(|| panic!("workers kept being replaced:\n{}", pool.log()));
    // `working_set` comes from trimrun's last memory tick, the smaps and the group's stat
    // are read now: compare them only when the working set did not move between this tick
    // and the next (the worker's allocator or the kernel can move a few MiB at any time).
    let mut attempt = 0;
    loop {
        attempt += 1;
        let out = read_together(hier, &st, mib);
        let t0 = st["uptime_secs"].as_f64().unwrap();
        let next = wait_for(secs(10), || {
            let s = pool.status();
            (s["uptime_secs"].as_f64()? > t0 + 1.2).then_some(s)
        })
        .unwrap();
        let later: HashMap<i32, u64> = next["workers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["pid"].as_i64().unwrap() as i32,
                    w["working_set"].as_u64().unwrap(),
                )
            })
            .collect();
        let steady = out.iter().all(|c| {
            later
                .get(&c.pid)
                .is_some_and(|&w| rel(w, c.working_set) < 0.01)
        });
        if steady || attempt == 5 {
            if !steady {
                println!("the working set kept moving between ticks; comparing the last reading");
            }
            for c in &out {
                check_together(c, mib);
            }
            return out;
        }
        st = next;
    }
}

/// One worker's status working set beside its group's stat and its processes' smaps.
fn read_together(hier: Hier, st: &serde_json::Value, mib: u64) -> Vec<Compare> {
    let mut out = vec![];
    for w in st["workers"].as_array().unwrap() {
        let pid = w["pid"].as_i64().unwrap() as i32;
        let dir = hier.dir_of(pid).unwrap();
        let stat = memory_stat(&dir);
        let g = |k: &str| stat.get(k).copied().unwrap_or(0);
        let procs: Vec<i32> = read(dir.join("cgroup.procs"))
            .split_whitespace()
            .map(|p| p.parse().unwrap())
            .collect();
        let (mut sa, mut sf) = (0, 0);
        for p in &procs {
            let s = smaps(*p);
            let anon = s.get("Anonymous").copied().unwrap_or(0);
            sa += anon;
            sf += s.get("Rss").copied().unwrap_or(0).saturating_sub(anon);
        }
        let c = match hier {
            Hier::V1 => Compare {
                pid,
                working_set: w["working_set"].as_u64().unwrap(),
                group_anon: g("total_rss"),
                group_active_file: g("total_active_file"),
                group_file_mapped: g("total_mapped_file"),
                smaps_anon: sa,
                smaps_file: sf,
            },
            Hier::V2 => Compare {
                pid,
                working_set: w["working_set"].as_u64().unwrap(),
                group_anon: g("anon"),
                group_active_file: g("active_file"),
                group_file_mapped: g("file_mapped"),
                smaps_anon: sa,
                smaps_file: sf,
            },
        };
        println!("{c:?}");
        assert!(c.smaps_anon >= mib * MIB, "{c:?}");
        out.push(c);
    }
    out
}

fn check_together(c: &Compare, mib: u64) {
    assert!(c.smaps_anon >= mib * MIB, "{c:?}");
    assert!(
        rel(c.group_anon, c.smaps_anon) < 0.05,
        "group anon vs smaps Anonymous: {c:?}"
    );
    let ws_anon = c.working_set.saturating_sub(c.group_active_file);
    assert!(
        rel(ws_anon, c.smaps_anon) < 0.05,
        "status working_set - active file vs smaps Anonymous: {c:?}"
    );
    assert!(
        c.group_file_mapped <= c.smaps_file + MIB,
        "the group's mapped file pages are mapped by its processes: {c:?}"
    );
}

/// trimrun is SIGKILLed (it cannot clean up): its workers die by PDEATHSIG, but a child a
/// worker forked (here `sleep`, which no parent-death signal covers) lives on in the
/// worker's group, so the group stays. The next trimrun started in the same cgroup removes
/// the stale tree and kills what is still in it.
pub fn stale_group_removed_at_next_start(at: &Place) {
    let (hier, own) = (at.hier, at.dir.clone());
    let app = example("app.py");
    let script = format!("sleep 600 & exec python3 {app}");
    let mut first = Pool::start_cmd(
        &[
            "-n",
            "2",
            "--limit",
            "64M",
            "--cgroup",
            hier.flag(),
            "--ready",
            "delay:300ms",
        ],
        &["sh", "-c", &script],
        at.wrap(),
    );
    first.wait_log("all workers ready", secs(20));
    let stale = own.join(format!("trimrun-{}", first.pid()));
    let workers: Vec<i32> = Pool::slots(&first.status()).values().copied().collect();
    let mut orphans = vec![];
    for w in &workers {
        let dir = hier.dir_of(*w).unwrap();
        let procs: Vec<i32> = wait_for(secs(10), || {
            let p: Vec<i32> = read(dir.join("cgroup.procs"))
                .split_whitespace()
                .map(|p| p.parse().unwrap())
                .collect();
            (p.len() == 2).then_some(p)
        })
        .unwrap_or_else(|| panic!("no sleep next to worker {w}"));
        orphans.extend(procs.into_iter().filter(|p| p != w));
    }
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    wait_for(secs(10), || {
        workers.iter().all(|w| !alive(*w)).then_some(())
    })
    .expect("workers die with trimrun (PDEATHSIG)");
    assert!(stale.is_dir(), "the killed run's tree is still there");
    for o in &orphans {
        assert!(alive(*o), "the orphan {o} survives trimrun");
        assert!(hier.dir_of(*o).unwrap().starts_with(&stale));
    }
    let second = Pool::app(1, "64M", hier.flag(), at.wrap());
    let line = second.wait_line(&["removed stale cgroup of an earlier run"], secs(10));
    assert!(
        line.contains(&stale.display().to_string()),
        "{line}\n{}",
        second.log()
    );
    assert!(!stale.exists(), "stale tree removed at start");
    wait_for(secs(10), || {
        orphans.iter().all(|o| !alive(*o)).then_some(())
    })
    .unwrap_or_else(|| panic!("orphans {orphans:?} still alive"));
    assert!(
        own.join(format!("trimrun-{}", second.pid())).is_dir(),
        "the new run has its own tree"
    );
}

/// trimrun started (through the wrapper) in `at`, a group limited to `limit`: `--limit
/// auto` logs `limit` as available and the expected per-worker figure, which is what every
/// worker group gets and `status` shows.
pub fn limit_auto_splits_the_enclosing_limit(at: &Place, limit: u64, n: u64) {
    let hier = at.hier;
    let want = expected_auto_limit(limit, n);
    let n = n.to_string();
    let pool = Pool::start(
        &[
            "-n",
            &n,
            "--limit",
            "auto",
            "--cgroup",
            hier.flag(),
            "--ready",
            "delay:300ms",
            "--graceful-timeout",
            "3s",
        ],
        at.wrap(),
    );
    pool.wait_log("all workers ready", secs(20));
    // v1: trimrun stays where it started; v2: in its leaf trimrun-<pid>/supervisor.
    let home = match hier {
        Hier::V1 => at.dir.clone(),
        Hier::V2 => at.dir.join(format!("trimrun-{}", pool.pid())),
    };
    assert_eq!(
        hier.dir_of(pool.pid()).unwrap(),
        home,
        "trimrun runs in the limited group"
    );
    let line = pool.wait_line(&["--limit auto:"], secs(5));
    println!("{line}");
    assert_eq!(field(&line, "available"), Some(limit.to_string()), "{line}");
    assert_eq!(field(&line, "per_worker"), Some(want.to_string()), "{line}");
    let st = pool.status_measured();
    for w in st["workers"].as_array().unwrap() {
        assert_eq!(w["limit"].as_u64(), Some(want), "{w}");
        let pid = w["pid"].as_i64().unwrap() as i32;
        let dir = hier.dir_of(pid).unwrap();
        assert!(dir.starts_with(&at.dir), "{}", dir.display());
        assert_eq!(
            read(dir.join(hier.limit_file())).trim(),
            want.to_string(),
            "{}",
            dir.display()
        );
    }
}

/// `--limit 1M` (started in `at` when given): exit 2 before any worker starts, the minimum
/// in the message, and no `trimrun-*` group left in `at`.
pub fn limit_too_small_exits_2_with_the_minimum(at: Option<&Place>) {
    let dir = tempfile::tempdir().unwrap();
    let mut argv: Vec<String> = at.and_then(Place::wrap).unwrap_or_default();
    argv.extend(
        [
            BIN,
            "-n",
            "2",
            "--limit",
            "1M",
            "--bind",
            "127.0.0.1:0",
            "--control",
        ]
        .map(String::from),
    );
    argv.push(dir.path().join("ctl.sock").display().to_string());
    argv.extend(["--", "python3", &example("app.py")].map(String::from));
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .env("NO_COLOR", "1")
        .env_remove("TRIMRUN_LIMIT")
        .env_remove("TRIMRUN_CGROUP")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    println!("{}", err.lines().last().unwrap_or(""));
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is too small to start a worker"), "{err}");
    let min = err
        .split("at least ")
        .nth(1)
        .unwrap_or_else(|| panic!("no minimum in {err}"));
    assert!(
        min.starts_with("32 MiB") || min.starts_with("32.0MiB") || min.starts_with("32MiB"),
        "the minimum, 32 MiB, is in the message: {err}"
    );
    assert!(!err.contains("worker started"), "{err}");
    if let Some(at) = at {
        let left = trimrun_groups(&at.dir, |_| true);
        assert!(left.is_empty(), "{left:?}");
    }
}
