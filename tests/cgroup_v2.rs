//! The v2 backend on a real cgroup v2 kernel. This host binds memory to v1, so the host-side
//! test boots ONE throw-away QEMU VM (`../shared/vm/in-v2-vm.sh`) and runs this same test
//! binary in it with `TRIMRUN_IN_VM=1`, selecting the `inner_*` tests; those return at once
//! anywhere else. Under TCG emulation the guest is 10-40x slower, so waits are stretched.
//!
//!     cargo test --test cgroup_v2            # boots the VM (~15-30 s here)
//!
//! Skips (fails under CI=true) without root, the VM script, qemu or a kernel image.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::vm::in_vm;

use trimrun::cgroup::{Choice, Kind, Manager, Roots, WorkerGroup, auto_limit};

const MIB: u64 = 1 << 20;
const INNER: &[&str] = &[
    "inner_layout_limits_and_teardown",
    "inner_oom_kill_counted_neighbour_untouched",
    "inner_stale_group_cleaned",
    "inner_limit_auto_in_a_limited_cgroup",
    "inner_cgroup_shared_with_other_processes_is_refused_and_rolled_back",
];

#[test]
fn v2_backend_in_a_vm() {
    if in_vm() {
        return;
    }
    common::vm::run_inner_tests(INNER, 900);
}

// ---------------------------------------------------------------- inside the VM

fn manager(test: &str) -> Manager {
    let m = Manager::setup_at(Choice::Auto, &Roots::system_instance(test)).unwrap();
    assert_eq!(m.kind(), Kind::V2, "{}", m.reason());
    m
}

fn read(path: impl AsRef<Path>) -> String {
    std::fs::read_to_string(path.as_ref())
        .unwrap_or_else(|e| panic!("read {}: {e}", path.as_ref().display()))
}

fn own_cgroup() -> String {
    read("/proc/self/cgroup")
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap()
}

/// Start `cmd` in `group` as the supervisor does: procs fd opened before fork, "0" written
/// by the child before exec.
fn spawn_in(group: &WorkerGroup, cmd: &mut Command) -> Child {
    let fd: OwnedFd = group.open_procs().unwrap().unwrap();
    let raw = fd.as_raw_fd();
    // SAFETY: only write(2), async-signal-safe, between fork and exec; fd outlives spawn.
    unsafe {
        cmd.pre_exec(move || {
            if libc::write(raw, b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().unwrap()
}

fn python_holding(group: &WorkerGroup, mib: u64) -> Child {
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
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    child
}

#[test]
#[ignore = "inner test: v2_backend_in_a_vm runs it in the v2 VM"]
fn inner_layout_limits_and_teardown() {
    if common::not_inside(in_vm(), "v2_backend_in_a_vm runs it in the v2 VM") {
        return;
    }
    let before = own_cgroup();
    let m = manager("layout");
    let base = m.base().unwrap().to_path_buf();
    let name = format!("trimrun-{}-layout", std::process::id());
    assert!(base.ends_with(&name), "{}", base.display());
    // trimrun itself lives in the leaf supervisor/ (no internal processes).
    assert_eq!(
        own_cgroup(),
        format!("{}/{name}/supervisor", before.trim_end_matches('/'))
    );
    assert!(
        read(base.join("cgroup.subtree_control"))
            .split_whitespace()
            .any(|c| c == "memory")
    );
    let g = m.create_worker(0, 1, Some(64 * MIB)).unwrap();
    let dir = g.path().unwrap().to_path_buf();
    assert_eq!(read(dir.join("memory.max")).trim(), (64 * MIB).to_string());
    assert_eq!(read(dir.join("memory.oom.group")).trim(), "1");
    assert_eq!(read(dir.join("memory.swap.max")).trim(), "0");
    let out = spawn_in(
        &g,
        Command::new("cat")
            .arg("/proc/self/cgroup")
            .stdout(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("0::/{name}/worker-0-1")
    );
    g.set_high(Some(48 * MIB)).unwrap();
    assert_eq!(read(dir.join("memory.high")).trim(), (48 * MIB).to_string());
    g.set_high(None).unwrap();
    assert_eq!(read(dir.join("memory.high")).trim(), "max");
    let mut child = python_holding(&g, 16);
    let u = g.usage(None).unwrap();
    assert_eq!(u.pids, vec![child.id() as i32]);
    assert_eq!(u.limit, Some(64 * MIB));
    assert!(
        u.anon >= 16 * MIB && u.current >= u.anon && u.working_set <= u.current,
        "{u:?}"
    );
    assert!(u.peak.unwrap() >= u.current);
    g.kill_all(None).unwrap(); // cgroup.kill
    assert_eq!(child.wait().unwrap().signal(), Some(libc::SIGKILL));
    g.remove().unwrap();
    assert!(!dir.exists());
    m.teardown();
    assert_eq!(own_cgroup(), before, "teardown moves trimrun back");
    assert!(!base.exists(), "teardown leaves nothing");
    println!("layout ok: {}", m.reason());
}

#[test]
#[ignore = "inner test: v2_backend_in_a_vm runs it in the v2 VM"]
fn inner_oom_kill_counted_neighbour_untouched() {
    if common::not_inside(in_vm(), "v2_backend_in_a_vm runs it in the v2 VM") {
        return;
    }
    let m = manager("oom");
    let hog_group = m.create_worker(0, 0, Some(48 * MIB)).unwrap();
    let calm_group = m.create_worker(1, 0, Some(48 * MIB)).unwrap();
    let mut calm = python_holding(&calm_group, 8);
    let mut hog = spawn_in(
        &hog_group,
        Command::new("python3").args(["-c", "b = []\nwhile True: b.append(b'x' * (1 << 20))\n"]),
    );
    let status = common::wait_for(Duration::from_secs(300), || hog.try_wait().unwrap())
        .expect("the hog was not killed within 300 s");
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let kills = hog_group.oom_kills().unwrap();
    let events = read(hog_group.path().unwrap().join("memory.events"));
    assert!(events.contains("oom_group_kill 1"), "{events}");
    assert!(
        kills >= 1,
        "memory.events: {}",
        read(hog_group.path().unwrap().join("memory.events"))
    );
    assert!(
        calm.try_wait().unwrap().is_none(),
        "the neighbour was killed"
    );
    assert_eq!(calm_group.oom_kills().unwrap(), 0);
    calm_group.kill_all(None).unwrap();
    assert_eq!(calm.wait().unwrap().signal(), Some(libc::SIGKILL));
    hog_group.remove().unwrap();
    calm_group.remove().unwrap();
    println!("oom ok: oom_kill={kills}");
}

#[test]
#[ignore = "inner test: v2_backend_in_a_vm runs it in the v2 VM"]
fn inner_stale_group_cleaned() {
    if common::not_inside(in_vm(), "v2_backend_in_a_vm runs it in the v2 VM") {
        return;
    }
    let root = PathBuf::from("/sys/fs/cgroup");
    let mut t = Command::new("true").spawn().unwrap();
    let dead = t.id();
    t.wait().unwrap();
    let stale = root.join(format!("trimrun-{dead}"));
    std::fs::create_dir_all(stale.join("worker-1-2")).unwrap();
    std::fs::create_dir_all(stale.join("supervisor")).unwrap();
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(stale.join("worker-1-2/cgroup.procs"))
        .unwrap();
    let raw = procs.as_raw_fd();
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    // SAFETY: only write(2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::write(raw, b"0".as_ptr().cast(), 1);
            Ok(())
        });
    }
    let mut orphan = cmd.spawn().unwrap();
    drop(procs);
    let reaper = std::thread::spawn(move || orphan.wait().unwrap());
    let m = manager("stale");
    assert!(!stale.exists(), "setup removed the stale tree");
    assert_eq!(reaper.join().unwrap().signal(), Some(libc::SIGKILL));
    drop(m);
    println!("stale ok");
}

/// A re-exec of this binary inside a 256 MiB worker group: its own cgroup is then a
/// non-root cgroup with a limit, so it also exercises enabling +memory in the cgroup we
/// started in (after moving out to supervisor/) and moving back at teardown.
#[test]
#[ignore = "inner test: v2_backend_in_a_vm runs it in the v2 VM"]
fn inner_limit_auto_in_a_limited_cgroup() {
    if common::not_inside(in_vm(), "v2_backend_in_a_vm runs it in the v2 VM") {
        return;
    }
    let m = manager("auto");
    let g = m.create_worker(0, 0, Some(256 * MIB)).unwrap();
    let out = spawn_in(
        &g,
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "--ignored",
                "nested_limit_auto",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TRIMRUN_INNER", "limit_auto")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    let want = format!(
        "AUTO available={} per_worker={}",
        256 * MIB,
        (256 - 32) * MIB / 2
    );
    assert!(text.contains(&want), "want {want}\n{text}");
    // The nested run cleaned up after itself: nothing left below the worker group.
    let leftovers: Vec<_> = std::fs::read_dir(g.path().unwrap())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    g.remove().unwrap();
    println!("auto ok");
}

#[test]
#[ignore = "inner test: v2_backend_in_a_vm runs it in the v2 VM"]
fn nested_limit_auto() {
    if common::not_inside(
        in_vm() && std::env::var("TRIMRUN_INNER").as_deref() == Ok("limit_auto"),
        "v2_backend_in_a_vm runs it in the v2 VM",
    ) {
        return;
    }
    let before = own_cgroup();
    let m = manager("nested");
    assert!(own_cgroup().ends_with("/supervisor"));
    let available = m.available_memory().unwrap();
    let per_worker = auto_limit(available, 2, 32 * MIB).unwrap();
    let w = m.create_worker(0, 0, Some(per_worker)).unwrap();
    let e = m
        .create_worker(1, 0, Some(300 * MIB))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("bigger than what trimrun may use in total, 256 MiB"),
        "{e}"
    );
    w.remove().unwrap();
    m.teardown();
    assert_eq!(own_cgroup(), before);
    println!("\nAUTO available={available} per_worker={per_worker}");
}

/// trimrun started in a cgroup that also holds another process: it cannot enable the memory
/// controller there (no internal processes). Forced v2 is an error with the remedy, setup
/// is undone (trimrun back where it was, nothing left), and auto falls back to none.
#[test]
#[ignore = "inner test: v2_backend_in_a_vm runs it in the v2 VM"]
fn inner_cgroup_shared_with_other_processes_is_refused_and_rolled_back() {
    if common::not_inside(in_vm(), "v2_backend_in_a_vm runs it in the v2 VM") {
        return;
    }
    let busy = PathBuf::from("/sys/fs/cgroup/busy");
    std::fs::create_dir(&busy).unwrap();
    let procs = |cmd: &mut Command| {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(busy.join("cgroup.procs"))
            .unwrap();
        let raw = f.as_raw_fd();
        // SAFETY: only write(2) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::write(raw, b"0".as_ptr().cast(), 1);
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        drop(f);
        child
    };
    let mut sleeper = procs(Command::new("sleep").arg("600"));
    let out = procs(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "--ignored",
                "nested_busy",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TRIMRUN_INNER", "busy")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    )
    .wait_with_output()
    .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    sleeper.kill().unwrap();
    sleeper.wait().unwrap();
    assert!(out.status.success(), "{text}");
    assert!(text.contains("BUSY-OK"), "{text}");
    let left: Vec<_> = std::fs::read_dir(&busy)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_type().unwrap().is_dir())
        .collect();
    assert!(left.is_empty(), "{left:?}");
    std::fs::remove_dir(&busy).unwrap();
    println!("busy ok");
}

#[test]
#[ignore = "inner test: v2_backend_in_a_vm runs it in the v2 VM"]
fn nested_busy() {
    if common::not_inside(
        in_vm() && std::env::var("TRIMRUN_INNER").as_deref() == Ok("busy"),
        "v2_backend_in_a_vm runs it in the v2 VM",
    ) {
        return;
    }
    assert_eq!(own_cgroup(), "/busy");
    let offered = read("/sys/fs/cgroup/busy/cgroup.controllers");
    if !offered.split_whitespace().any(|c| c == "memory") {
        // The root does not hand memory down yet: that is its own, clear error.
        let e = Manager::setup_at(Choice::V2, &Roots::system_instance("busy0")).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("the memory controller is not enabled for /sys/fs/cgroup/busy"),
            "{e}"
        );
        std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory").unwrap();
    }
    let e = Manager::setup_at(Choice::V2, &Roots::system_instance("busy")).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("other processes live in that cgroup"), "{msg}");
    assert!(msg.contains("Delegate=yes"), "{msg}");
    assert_eq!(own_cgroup(), "/busy", "setup was rolled back");
    let m = Manager::setup_at(Choice::Auto, &Roots::system_instance("busy2")).unwrap();
    assert_eq!(m.kind(), Kind::None, "{}", m.reason());
    assert!(
        m.reason().contains("other processes live in that cgroup"),
        "{}",
        m.reason()
    );
    assert_eq!(own_cgroup(), "/busy");
    println!("\nBUSY-OK {msg}\nreason: {}", m.reason());
}
