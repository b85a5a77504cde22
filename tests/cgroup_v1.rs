//! The v1 backend on this machine's real kernel (hybrid cgroups: memory on v1). Needs root
//! and a writable v1 memory cgroup; skips otherwise (fails under CI=true).
//!
//! Each test builds its own `trimrun-<pid>-<test>` tree, so they run in parallel threads.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use trimrun::cgroup::{Choice, Kind, Manager, Roots, WorkerGroup, auto_limit, parse_smaps_rollup};

const MIB: u64 = 1 << 20;

fn manager(test: &str) -> Option<Manager> {
    if !common::is_root() {
        common::cannot_run("root");
        return None;
    }
    match Manager::setup_at(Choice::V1, &Roots::system_instance(test)) {
        Ok(m) => {
            assert_eq!(m.kind(), Kind::V1);
            Some(m)
        }
        Err(e) => {
            common::cannot_run(&format!("a writable cgroup v1 memory hierarchy ({e})"));
            None
        }
    }
}

/// Start `cmd` inside `group` the way the supervisor does: `cgroup.procs` opened before
/// fork, `"0"` written to it by the child before exec.
fn spawn_in(group: &WorkerGroup, cmd: &mut Command) -> Child {
    let fd: OwnedFd = group.open_procs().unwrap().expect("a cgroup backend");
    let raw = fd.as_raw_fd();
    // SAFETY: between fork and exec the closure only calls write(2), which is
    // async-signal-safe; `fd` outlives the spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(raw, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(fd);
    child
}

/// A python process that holds `mib` MiB of touched anonymous memory, says "ready" and
/// waits for stdin to close.
fn python_holding(group: &WorkerGroup, mib: u64) -> (Child, BufReader<std::process::ChildStdout>) {
    let code = format!(
        "import sys\nb = b'x' * ({mib} << 20)\nprint('ready', flush=True)\nsys.stdin.read()\n"
    );
    let mut child = spawn_in(
        group,
        Command::new("python3")
            .args(["-c", &code])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    (child, out)
}

fn memory_cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap()
        .lines()
        .find_map(|l| {
            let mut f = l.splitn(3, ':');
            let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
            ctl.split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        })
        .unwrap()
}

fn read(path: impl AsRef<std::path::Path>) -> String {
    std::fs::read_to_string(path).unwrap()
}

#[test]
fn worker_enters_its_group_before_exec_with_limit_and_no_swap() {
    let Some(m) = manager("enter") else { return };
    let g = m.create_worker(0, 1, Some(64 * MIB)).unwrap();
    assert_eq!(g.name(), "worker-0-1");
    let dir = g.path().unwrap().to_path_buf();
    assert!(dir.ends_with(format!("trimrun-{}-enter/worker-0-1", std::process::id())));
    assert_eq!(
        read(dir.join("memory.limit_in_bytes")).trim(),
        (64 * MIB).to_string()
    );
    if dir.join("memory.memsw.limit_in_bytes").exists() {
        assert_eq!(
            read(dir.join("memory.memsw.limit_in_bytes")).trim(),
            (64 * MIB).to_string()
        );
    }
    // The exec'd program itself reports the group: it was there before its first instruction.
    let out = spawn_in(
        &g,
        Command::new("cat")
            .arg("/proc/self/cgroup")
            .stdout(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains(":memory:") && l.ends_with("/worker-0-1")),
        "{text}"
    );
    let (mut child, _out) = python_holding(&g, 1);
    assert!(memory_cgroup_of(child.id()).ends_with("/worker-0-1"));
    assert_eq!(g.pids(None).unwrap(), vec![child.id() as i32]);
    let u = g.usage(None).unwrap();
    assert_eq!(u.limit, Some(64 * MIB));
    assert_eq!(u.pids, vec![child.id() as i32]);
    g.kill_all(None).unwrap();
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    g.remove().unwrap();
    assert!(!dir.exists());
    let base = m.base().unwrap().to_path_buf();
    m.teardown();
    assert!(!base.exists(), "teardown leaves nothing");
}

#[test]
fn oom_in_one_worker_is_counted_and_spares_its_neighbour() {
    let Some(m) = manager("oom") else { return };
    let hog_group = m.create_worker(0, 0, Some(48 * MIB)).unwrap();
    let calm_group = m.create_worker(1, 0, Some(48 * MIB)).unwrap();
    let (mut calm, _calm_out) = python_holding(&calm_group, 8);
    assert_eq!(hog_group.oom_kills().unwrap(), 0);
    let mut hog = spawn_in(
        &hog_group,
        Command::new("python3").args(["-c", "b = []\nwhile True: b.append(b'x' * (1 << 20))\n"]),
    );
    let status = common::wait_for(Duration::from_secs(30), || hog.try_wait().unwrap())
        .expect("the hog was not killed within 30 s");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    assert!(hog_group.oom_kills().unwrap() >= 1);
    assert!(hog_group.usage(None).unwrap().oom_kills >= 1);
    let peak = hog_group.usage(None).unwrap().peak.unwrap();
    assert!(peak > 40 * MIB && peak <= 48 * MIB, "peak {peak}");
    // The neighbour is untouched.
    assert!(calm.try_wait().unwrap().is_none());
    assert_eq!(calm_group.oom_kills().unwrap(), 0);
    assert_eq!(calm_group.pids(None).unwrap(), vec![calm.id() as i32]);
    drop(calm.stdin.take());
    assert!(calm.wait().unwrap().success());
    hog_group.remove().unwrap();
    calm_group.remove().unwrap();
    assert!(!hog_group.path().unwrap().exists());
}

/// What is comparable between the cgroup and /proc: anonymous memory. A cgroup also counts
/// page cache (charged to whichever group first read the file, so python's shared libraries
/// are mostly charged elsewhere) and kernel memory (page tables, slab), which smaps does not
/// show; smaps shows file-backed pages mapped by the process wherever they are charged.
/// For one process (nothing shared by fork), the group's `total_rss` and the process's
/// `Anonymous` count the same pages.
#[test]
fn usage_anon_matches_smaps_rollup_within_5_percent() {
    let Some(m) = manager("usage") else { return };
    let g = m.create_worker(0, 0, Some(128 * MIB)).unwrap();
    let (mut child, _out) = python_holding(&g, 40);
    let u = g.usage(None).unwrap();
    let smaps: u64 = u
        .pids
        .iter()
        .map(|p| parse_smaps_rollup(&read(format!("/proc/{p}/smaps_rollup"))).map_or(0, |s| s.anon))
        .sum();
    let diff = u.anon.abs_diff(smaps) as f64 / smaps as f64;
    assert!(
        diff < 0.05,
        "cgroup anon {} vs smaps Anonymous {smaps}",
        u.anon
    );
    assert!(u.anon >= 40 * MIB);
    assert!(u.current >= u.anon && u.working_set <= u.current, "{u:?}");
    assert!(u.peak.unwrap() >= u.current);
    assert_eq!(u.limit, Some(128 * MIB));
    child.stdin.take().unwrap().write_all(b"").unwrap();
    assert!(child.wait().unwrap().success());
    g.remove().unwrap();
}

#[test]
fn stale_group_of_a_killed_run_is_cleaned_at_setup() {
    let Some(probe) = manager("probe") else {
        return;
    };
    let own = probe.base().unwrap().parent().unwrap().to_path_buf();
    drop(probe);
    // A "previous run" whose pid is gone, with a worker still alive in its group.
    let mut t = Command::new("true").spawn().unwrap();
    let dead = t.id();
    t.wait().unwrap();
    let stale = own.join(format!("trimrun-{dead}"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::create_dir(stale.join("worker-2-7")).unwrap();
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(stale.join("worker-2-7/cgroup.procs"))
        .unwrap();
    let raw = procs.as_raw_fd();
    let mut cmd = Command::new("sleep");
    cmd.arg("300");
    // SAFETY: only write(2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::write(raw, b"0".as_ptr().cast(), 1);
            Ok(())
        });
    }
    let mut orphan = cmd.spawn().unwrap();
    drop(procs);
    assert!(memory_cgroup_of(orphan.id()).ends_with(&format!("trimrun-{dead}/worker-2-7")));
    // Reap the orphan as soon as it dies, so the group can be removed.
    let reaper = std::thread::spawn(move || orphan.wait().unwrap());
    let m = manager("stale").unwrap();
    assert!(!stale.exists(), "setup removed the stale tree");
    assert_eq!(reaper.join().unwrap().signal(), Some(libc::SIGKILL));
    drop(m);
}

/// A forward clock step (here: the group's mtime set an hour back) never makes a live
/// pool's group look stale to the next start: liveness is the lock the pool holds.
#[test]
fn a_live_pools_group_survives_the_next_start_whatever_the_clock_says() {
    let Some(live) = manager("live") else {
        return;
    };
    let base = live.base().unwrap().to_path_buf();
    let g = live.create_worker(0, 0, None).unwrap();
    let mut worker = spawn_in(&g, Command::new("sleep").arg("300"));
    let hour_ago = nix::sys::time::TimeSpec::new(
        nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME)
            .unwrap()
            .tv_sec()
            - 3600,
        0,
    );
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &base,
        &hour_ago,
        &hour_ago,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    // The next start, as another pid would make it.
    let mut t = Command::new("true").spawn().unwrap();
    let other_pid = t.id() as i32;
    t.wait().unwrap();
    let roots = Roots {
        pid: other_pid,
        ..Roots::system_instance("next")
    };
    let next = Manager::setup_at(Choice::V1, &roots).unwrap();
    let alive = worker.try_wait().unwrap().is_none();
    let kept = base.exists();
    let _ = worker.kill();
    let _ = worker.wait();
    drop(next);
    assert!(alive, "the next start killed a live pool's worker");
    assert!(kept, "the next start removed a live pool's group");
    g.remove().unwrap();
}

/// `--limit auto` inside a cgroup with a limit: a re-exec of this test binary runs inside a
/// 512 MiB group and computes its figures there.
#[test]
fn limit_auto_divides_the_enclosing_cgroup_limit() {
    let Some(m) = manager("auto") else { return };
    let g = m.create_worker(0, 0, Some(512 * MIB)).unwrap();
    let out = spawn_in(
        &g,
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "--ignored",
                "inner_limit_auto",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TRIMRUN_INNER", "limit_auto")
            .stdout(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let line = text
        .lines()
        .find_map(|l| l.find("AUTO ").map(|i| &l[i..]))
        .unwrap_or_else(|| panic!("no AUTO line in {text}"));
    assert_eq!(
        line,
        format!(
            "AUTO available={} per_worker={}",
            512 * MIB,
            (512 - 64) * MIB / 4
        )
    );
    g.remove().unwrap();
}

#[test]
#[ignore = "inner test: its outer test re-runs it in a limited cgroup"]
fn inner_limit_auto() {
    if common::not_inside(
        std::env::var("TRIMRUN_INNER").as_deref() == Ok("limit_auto"),
        "its outer test re-runs it in a limited cgroup",
    ) {
        return;
    }
    let m = Manager::setup_at(Choice::Auto, &Roots::system_instance("inner")).unwrap();
    let available = m.available_memory().unwrap();
    let per_worker = auto_limit(available, 4, 64 * MIB).unwrap();
    println!("\nAUTO available={available} per_worker={per_worker}");
}

#[test]
fn a_limit_above_the_enclosing_limit_is_refused() {
    let Some(m) = manager("above") else { return };
    let g = m.create_worker(0, 0, Some(256 * MIB)).unwrap();
    let out = spawn_in(
        &g,
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "--ignored",
                "inner_limit_above",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TRIMRUN_INNER", "limit_above")
            .stdout(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(
            "ERR worker limit 300 MiB is bigger than what trimrun may use in total, 256 MiB"
        ),
        "{text}"
    );
    g.remove().unwrap();
}

#[test]
#[ignore = "inner test: its outer test re-runs it in a limited cgroup"]
fn inner_limit_above() {
    if common::not_inside(
        std::env::var("TRIMRUN_INNER").as_deref() == Ok("limit_above"),
        "its outer test re-runs it in a limited cgroup",
    ) {
        return;
    }
    let m = Manager::setup_at(Choice::V1, &Roots::system_instance("inner")).unwrap();
    let e = m.create_worker(0, 0, Some(300 * MIB)).unwrap_err();
    println!("ERR {e}");
}

#[test]
fn auto_on_this_hybrid_host_picks_v1_and_forced_v2_says_what_to_do() {
    if !common::is_root() {
        common::cannot_run("root");
        return;
    }
    let v2_has_memory = std::fs::read_to_string("/sys/fs/cgroup/unified/cgroup.controllers")
        .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory"));
    if v2_has_memory || !std::path::Path::new("/sys/fs/cgroup/memory").is_dir() {
        common::cannot_run("a hybrid host with memory on cgroup v1");
        return;
    }
    let m = Manager::setup_at(Choice::Auto, &Roots::system_instance("hybrid")).unwrap();
    assert_eq!(m.kind(), Kind::V1, "{}", m.reason());
    assert!(
        m.reason()
            .starts_with("cgroup v2 unusable: the memory controller is not enabled for"),
        "{}",
        m.reason()
    );
    drop(m);
    let e = Manager::setup_at(Choice::V2, &Roots::system_instance("forced"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("or pass --cgroup v1 or --cgroup none)"), "{e}");
}
