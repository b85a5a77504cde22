//! The `none` backend: forced, and chosen by `auto` on a read-only cgroupfs. The read-only
//! case runs this test binary again inside a private mount namespace (`unshare --mount`)
//! where the cgroup mounts are remounted read-only; the host's mounts are never touched.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use trimrun::cgroup::{Choice, Kind, Manager, Roots};

const MIB: u64 = 1 << 20;

fn gone_or_zombie(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z')),
    }
}

#[test]
fn forced_none_measures_and_kills_the_whole_process_tree() {
    let m = Manager::setup_at(Choice::None, &Roots::system_instance("none")).unwrap();
    assert_eq!(m.kind(), Kind::None);
    assert_eq!(m.reason(), "forced by --cgroup none");
    assert!(m.base().is_none());
    assert!(m.available_memory().unwrap() > 64 * MIB);
    let g = m.create_worker(3, 9, Some(256 * MIB)).unwrap();
    assert_eq!(g.name(), "worker-3-9");
    assert!(g.path().is_none() && g.open_procs().unwrap().is_none());
    // A pre-forking worker: parent and child each hold 20 MiB of their own.
    let code = "import os, sys\n\
                pid = os.fork()\n\
                b = b'x' * (20 << 20)\n\
                if pid == 0:\n    os.write(1, b'child %d\\n' % os.getpid())\n    sys.stdin.read()\n    os._exit(0)\n\
                os.write(1, b'ready\\n')\n\
                sys.stdin.read()\n";
    let mut worker = Command::new("python3")
        .args(["-c", code])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let root = worker.id() as i32;
    let mut out = BufReader::new(worker.stdout.take().unwrap());
    let (mut a, mut b) = (String::new(), String::new());
    out.read_line(&mut a).unwrap();
    out.read_line(&mut b).unwrap();
    let child: i32 = [a.trim(), b.trim()]
        .iter()
        .find_map(|l| l.strip_prefix("child ")?.parse().ok())
        .unwrap_or_else(|| panic!("no child pid in {a:?} {b:?}"));
    let mut pids = g.pids(Some(root)).unwrap();
    pids.sort();
    assert_eq!(pids, {
        let mut v = vec![root, child];
        v.sort();
        v
    });
    let u = g.usage(Some(root)).unwrap();
    assert!(u.anon >= 38 * MIB, "{u:?}");
    assert!(u.current >= u.anon && u.working_set == u.current, "{u:?}");
    assert_eq!((u.limit, u.peak, u.oom_kills), (Some(256 * MIB), None, 0));
    assert_eq!(g.oom_kills().unwrap(), 0);
    g.set_high(Some(64 * MIB)).unwrap(); // a no-op without v2
    g.kill_all(Some(root)).unwrap();
    assert_eq!(worker.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(
        common::wait_for(Duration::from_secs(10), || gone_or_zombie(child)
            .then_some(()))
        .is_some(),
        "the worker's child survived kill_all"
    );
    assert!(g.usage(Some(root)).unwrap().pids.is_empty());
    g.remove().unwrap();
}

fn cgroup_mounts_rw_on_host() -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            l.split(' ')
                .nth(4)
                .is_some_and(|mp| mp.starts_with("/sys/fs/cgroup"))
        })
        .map(|l| l.split(' ').take(6).collect::<Vec<_>>().join(" "))
        .collect()
}

#[test]
fn auto_chooses_none_when_cgroupfs_is_read_only() {
    if !common::is_root() {
        common::cannot_run("root (for unshare --mount)");
        return;
    }
    if !Path::new("/sys/fs/cgroup").is_dir()
        || Command::new("unshare").arg("--help").output().is_err()
    {
        common::cannot_run("/sys/fs/cgroup and unshare(1)");
        return;
    }
    let before = cgroup_mounts_rw_on_host();
    // Inside a private mount namespace only: remount every cgroup mount read-only (a bind
    // remount changes the per-mount flag of this namespace's copy, not the filesystem).
    let script = r#"set -e
for mp in $(awk '$5 ~ /^\/sys\/fs\/cgroup/ {print $5}' /proc/self/mountinfo); do
    mount -o remount,bind,ro "$mp"
done
exec "$0" --exact --ignored inner_read_only_cgroupfs --nocapture --test-threads=1"#;
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", script])
        .arg(std::env::current_exe().unwrap())
        .env("TRIMRUN_INNER", "read_only")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(cgroup_mounts_rw_on_host(), before, "host mounts changed");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("INNER-OK kind=none"), "{text}");
}

#[test]
#[ignore = "inner test: its outer test (unshare or setpriv) re-runs it"]
fn inner_read_only_cgroupfs() {
    if common::not_inside(
        std::env::var("TRIMRUN_INNER").as_deref() == Ok("read_only"),
        "its outer test (unshare or setpriv) re-runs it",
    ) {
        return;
    }
    let m = Manager::setup_at(Choice::Auto, &Roots::system_instance("ro")).unwrap();
    assert_eq!(m.kind(), Kind::None, "{}", m.reason());
    assert!(m.reason().contains("read-only"), "{}", m.reason());
    // Limits stay readable on a read-only cgroupfs (what --limit auto needs in a pod).
    assert!(m.available_memory().unwrap() > 0);
    let e = Manager::setup_at(Choice::V1, &Roots::system_instance("ro1"))
        .unwrap_err()
        .to_string();
    assert!(e.contains("mounted read-only (pass --cgroup none"), "{e}");
    println!("\nINNER-OK kind={} reason={}", m.kind(), m.reason());
}

/// Not root and no delegation: `auto` falls back to none and says so; a forced backend is
/// an error that names the remedy. Runs this binary again as `nobody` (setpriv(1)).
#[test]
fn without_permission_auto_chooses_none_and_forced_v1_names_the_remedy() {
    if !common::is_root() {
        common::cannot_run("root (to drop to nobody with setpriv)");
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&exe)
        .args([
            "--exact",
            "--ignored",
            "inner_unprivileged",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("TRIMRUN_INNER", "unprivileged")
        .output();
    let out = match out {
        Ok(o) if o.status.code() != Some(126) && o.status.code() != Some(127) => o,
        _ => {
            common::cannot_run("setpriv(1) and a test binary that nobody may run");
            return;
        }
    };
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("UNPRIV-OK"), "{text}");
}

#[test]
#[ignore = "inner test: its outer test (unshare or setpriv) re-runs it"]
fn inner_unprivileged() {
    if common::not_inside(
        std::env::var("TRIMRUN_INNER").as_deref() == Ok("unprivileged"),
        "its outer test (unshare or setpriv) re-runs it",
    ) {
        return;
    }
    assert!(!common::is_root());
    let m = Manager::setup_at(Choice::Auto, &Roots::system_instance("unpriv")).unwrap();
    assert_eq!(m.kind(), Kind::None, "{}", m.reason());
    assert!(
        m.reason().contains("is not delegated to this process"),
        "{}",
        m.reason()
    );
    let e = Manager::setup_at(Choice::V1, &Roots::system_instance("unpriv1"))
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("(run as root, or under systemd with Delegate=yes, or pass --cgroup none)"),
        "{e}"
    );
    println!("\nUNPRIV-OK {e}\nreason: {}", m.reason());
}
