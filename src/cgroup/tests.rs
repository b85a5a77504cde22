//! Unit tests: parsers on text captured from real kernels, detection and stale-group
//! cleanup on temp trees shaped like cgroupfs.

use std::fs;
use std::path::Path;

use super::*;

const V1_STAT: &str = include_str!("../../tests/fixtures/cgroup/v1/memory.stat");
const V1_OOM: &str = include_str!("../../tests/fixtures/cgroup/v1/memory.oom_control");
const V1_CGROUP: &str = include_str!("../../tests/fixtures/cgroup/v1/proc_self_cgroup");
const V1_MOUNTINFO: &str = include_str!("../../tests/fixtures/cgroup/v1/mountinfo");
const V1_SMAPS: &str = include_str!("../../tests/fixtures/cgroup/v1/smaps_rollup");
const V1_MEMINFO: &str = include_str!("../../tests/fixtures/cgroup/v1/meminfo");
const V2_STAT: &str = include_str!("../../tests/fixtures/cgroup/v2/memory.stat");
const V2_EVENTS: &str = include_str!("../../tests/fixtures/cgroup/v2/memory.events");
const V2_CGROUP: &str = include_str!("../../tests/fixtures/cgroup/v2/proc_self_cgroup");
const V2_MOUNTINFO: &str = include_str!("../../tests/fixtures/cgroup/v2/mountinfo");

#[test]
fn parses_v1_memory_stat_from_this_kernel() {
    let m = parse_memory_stat(V1_STAT);
    assert_eq!(m["total_rss"], 28016640);
    assert_eq!(m["rss_huge"], 0);
    assert_eq!(m["hierarchical_memory_limit"], 48 << 20);
    assert!(m.contains_key("total_inactive_file"));
}

#[test]
fn parses_v2_memory_stat_and_events_from_the_vm() {
    let m = parse_memory_stat(V2_STAT);
    assert_eq!(m["anon"], 15872000);
    assert_eq!(m["file"], 10260480);
    assert_eq!(m["inactive_file"], 10260480);
    let e = parse_memory_events(V2_EVENTS);
    assert_eq!(
        e,
        MemoryEvents {
            low: 0,
            high: 0,
            max: 92,
            oom: 1,
            oom_kill: 2,
            oom_group_kill: 1
        }
    );
}

#[test]
fn parses_oom_control_with_and_without_oom_kill_line() {
    let o = parse_oom_control(V1_OOM);
    assert_eq!(o.oom_kill, 1);
    assert!(!o.oom_kill_disable && !o.under_oom);
    // Before Linux 4.13 there was no oom_kill line.
    assert_eq!(
        parse_oom_control("oom_kill_disable 1\nunder_oom 0\n").oom_kill,
        0
    );
}

#[test]
fn parses_proc_self_cgroup_hybrid_and_unified() {
    let v1 = parse_proc_self_cgroup(V1_CGROUP);
    let mem = v1
        .iter()
        .find(|l| l.controllers.iter().any(|c| c == "memory"))
        .unwrap();
    assert!(mem.path.starts_with("/process_api/"));
    let unified = v1.iter().find(|l| l.hierarchy_id == 0).unwrap();
    assert!(unified.controllers.is_empty());
    assert_eq!(unified.path, "/");
    let named = v1.iter().find(|l| l.controllers == ["name=systemd"]);
    assert!(named.is_some());
    let v2 = parse_proc_self_cgroup(V2_CGROUP);
    assert_eq!(v2.len(), 1);
    assert_eq!(v2[0].path, "/");
    // A path with a colon survives (splitn 3).
    assert_eq!(parse_proc_self_cgroup("0::/a:b\n")[0].path, "/a:b");
}

#[test]
fn parses_mountinfo_cgroup_mounts_and_escapes() {
    let m = parse_mountinfo(V1_MOUNTINFO);
    let mem = m
        .iter()
        .find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == "memory"))
        .unwrap();
    assert_eq!(mem.mount_point, Path::new("/sys/fs/cgroup/memory"));
    assert_eq!(mem.root, "/");
    assert!(!mem.read_only());
    let v2 = parse_mountinfo(V2_MOUNTINFO);
    let c2 = v2.iter().find(|m| m.fstype == "cgroup2").unwrap();
    assert_eq!(c2.mount_point, Path::new("/sys/fs/cgroup"));
    let esc = parse_mountinfo(
        "40 31 0:37 /a\\040b /mnt/x\\040y ro,relatime shared:1 - cgroup2 cgroup2 rw\n",
    );
    assert_eq!(esc[0].root, "/a b");
    assert_eq!(esc[0].mount_point, Path::new("/mnt/x y"));
    assert!(esc[0].read_only());
}

#[test]
fn parses_smaps_rollup_in_bytes() {
    let s = parse_smaps_rollup(V1_SMAPS).unwrap();
    assert_eq!(s.rss, 34024 * 1024);
    assert_eq!(s.pss, 32599 * 1024);
    assert_eq!(s.anon, 27360 * 1024);
    assert_eq!(s.pss_anon, Some(27360 * 1024));
    assert_eq!(s.pss_file, Some(5239 * 1024));
    assert_eq!(s.pss_shmem, Some(0));
    // The v1 group held only this process: its anon charge equals Anonymous exactly.
    assert_eq!(parse_memory_stat(V1_STAT)["total_rss"], s.anon);
}

#[test]
fn parses_limits_meminfo_and_proc_stat() {
    assert_eq!(parse_limit("max\n"), Ok(None));
    assert_eq!(parse_limit("9223372036854771712\n"), Ok(None));
    assert_eq!(parse_limit("67108864\n"), Ok(Some(64 << 20)));
    assert!(parse_limit("lots").is_err());
    assert!(parse_meminfo_total(V1_MEMINFO).unwrap() > 1 << 30);
    let stat = "42 (a (weird) name) S 7 42 42 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 12345 0 0";
    assert_eq!(parse::parse_proc_stat(stat), Some((7, 12345)));
}

#[test]
fn choice_parses_and_rejects_with_the_expected_forms() {
    assert_eq!("auto".parse::<Choice>().unwrap(), Choice::Auto);
    assert_eq!("V2".parse::<Choice>().unwrap(), Choice::V2);
    assert_eq!("v1".parse::<Choice>().unwrap(), Choice::V1);
    assert_eq!("none".parse::<Choice>().unwrap(), Choice::None);
    let e = "v3".parse::<Choice>().unwrap_err().to_string();
    assert_eq!(
        e,
        "invalid cgroup backend \"v3\" (expected auto, v2, v1 or none)"
    );
    assert_eq!(Kind::V2.to_string(), "v2");
    assert_eq!(Kind::None.to_string(), "none");
}

#[test]
fn auto_limit_divides_after_the_reserve_and_rejects_tiny_shares() {
    let gib = 1u64 << 30;
    assert_eq!(auto_limit(2 * gib, 4, 0).unwrap(), gib / 2);
    assert_eq!(
        auto_limit(2 * gib, 3, 128 << 20).unwrap(),
        ((2 * gib - (128 << 20)) / 3) & !4095
    );
    let e = auto_limit(256 << 20, 8, 64 << 20).unwrap_err().to_string();
    assert!(e.contains("below the minimum of 32 MiB"), "{e}");
    assert!(e.contains("24 MiB for each of 8 workers"), "{e}");
    assert!(matches!(auto_limit(gib, 0, 0), Err(CgroupError::NoWorkers)));
    assert_eq!(default_reserve(gib), gib / 20);
    assert_eq!(default_reserve(100 << 20), 32 << 20);
    assert_eq!(default_reserve(100 * gib), 256 << 20);
    let e = check_limit(16 << 20).unwrap_err().to_string();
    assert_eq!(
        e,
        "worker limit 16 MiB is below the minimum of 32 MiB for a python worker (raise --limit)"
    );
}

/// A temp tree shaped like a hybrid or unified cgroupfs, with its own mountinfo and
/// /proc/self/cgroup.
struct Fake {
    dir: tempfile::TempDir,
}

impl Fake {
    /// `v2_controllers`: what our v2 cgroup offers; `ro`: mount options of all cgroup mounts.
    fn new(v2_controllers: &str, with_v1: bool, ro: bool) -> Fake {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let opt = if ro { "ro" } else { "rw" };
        let unified = d.join("cg/unified");
        let memory = d.join("cg/memory");
        let own2 = unified.join("svc");
        let own1 = memory.join("pod/app");
        fs::create_dir_all(&own2).unwrap();
        fs::write(own2.join("cgroup.controllers"), v2_controllers).unwrap();
        fs::write(own2.join("cgroup.subtree_control"), "").unwrap();
        fs::write(own2.join("cgroup.procs"), "").unwrap();
        fs::write(own2.join("memory.max"), "max\n").unwrap();
        fs::write(unified.join("memory.max"), "1073741824\n").unwrap();
        let mut mountinfo = format!(
            "31 23 0:28 / {} {opt},relatime - cgroup2 cgroup2 {opt}\n",
            unified.display()
        );
        let mut cgroup = "0::/svc\n".to_string();
        if with_v1 {
            fs::create_dir_all(&own1).unwrap();
            fs::write(own1.join("memory.limit_in_bytes"), "268435456\n").unwrap();
            fs::write(memory.join("pod/memory.limit_in_bytes"), "536870912\n").unwrap();
            fs::write(
                memory.join("memory.limit_in_bytes"),
                "9223372036854771712\n",
            )
            .unwrap();
            fs::write(own1.join("cgroup.procs"), "").unwrap();
            mountinfo += &format!(
                "35 31 0:32 / {} {opt},relatime - cgroup cgroup {opt},memory\n",
                memory.display()
            );
            cgroup = format!("4:memory:/pod/app\n{cgroup}");
        }
        fs::write(d.join("mountinfo"), mountinfo).unwrap();
        fs::write(d.join("cgroup"), cgroup).unwrap();
        fs::write(d.join("meminfo"), "MemTotal:        4194304 kB\n").unwrap();
        Fake { dir }
    }
    fn roots(&self) -> Roots {
        Roots::fixture(self.dir.path())
    }
    fn path(&self, p: &str) -> std::path::PathBuf {
        self.dir.path().join(p)
    }
}

#[test]
fn detection_maps_our_cgroups_onto_mount_points() {
    let f = Fake::new("cpu memory pids", true, false);
    let found = detect::discover(&f.roots()).unwrap();
    assert_eq!(found.v2.as_ref().unwrap().dir, f.path("cg/unified/svc"));
    assert_eq!(found.v1.as_ref().unwrap().dir, f.path("cg/memory/pod/app"));
    assert!(detect::check_v2(&found).is_ok());
    assert!(detect::check_v1(&found).is_ok());
}

#[test]
fn v2_without_memory_controller_is_refused_with_a_remedy() {
    let f = Fake::new("cpu pids", true, false);
    let found = detect::discover(&f.roots()).unwrap();
    let e = detect::check_v2(&found).unwrap_err().to_string();
    assert!(
        e.starts_with("the memory controller is not enabled for "),
        "{e}"
    );
    assert!(e.contains("cgroup.controllers: cpu pids"), "{e}");
    assert!(e.contains("Delegate=yes"), "{e}");
    // Forced v2 fails with that error ...
    let e = Manager::setup_at(Choice::V2, &f.roots()).unwrap_err();
    assert!(matches!(e, CgroupError::NoMemoryController { .. }), "{e}");
}

#[test]
fn auto_falls_back_to_v1_on_a_hybrid_host_and_says_why() {
    let f = Fake::new("hugetlb", true, false);
    let roots = Roots {
        instance: Some("fx".into()),
        ..f.roots()
    };
    let m = Manager::setup_at(Choice::Auto, &roots).unwrap();
    assert_eq!(m.kind(), Kind::V1);
    assert!(
        m.reason().contains("memory controller is not enabled"),
        "{}",
        m.reason()
    );
    assert!(
        m.reason().contains("cgroup v1 memory hierarchy at"),
        "{}",
        m.reason()
    );
    let base = m.base().unwrap().to_path_buf();
    assert_eq!(
        base,
        f.path(&format!("cg/memory/pod/app/trimrun-{}-fx", roots.pid))
    );
    assert!(base.is_dir());
    // min(256M own, 512M parent, 1G on the v2 root, 4G MemTotal)
    assert_eq!(m.available_memory().unwrap(), 256 << 20);
    let e = m
        .create_worker(0, 1, Some(300 << 20))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is bigger than what trimrun may use in total, 256 MiB"),
        "{e}"
    );
    m.teardown();
    assert!(!base.exists());
}

#[test]
fn auto_chooses_none_on_a_read_only_cgroupfs() {
    let f = Fake::new("cpu memory", true, true);
    let m = Manager::setup_at(Choice::Auto, &f.roots()).unwrap();
    assert_eq!(m.kind(), Kind::None);
    assert!(m.reason().contains("mounted read-only"), "{}", m.reason());
    // Limits are still read from the read-only tree.
    assert_eq!(m.available_memory().unwrap(), 256 << 20);
    let w = m.create_worker(0, 0, Some(64 << 20)).unwrap();
    assert_eq!(w.kind(), Kind::None);
    assert!(w.path().is_none());
    assert!(w.open_procs().unwrap().is_none());
    // A forced v1 on a read-only tree is an error with the remedy.
    let e = Manager::setup_at(Choice::V1, &f.roots())
        .unwrap_err()
        .to_string();
    assert!(e.contains("read-only (pass --cgroup none"), "{e}");
}

#[test]
fn forced_backends_without_their_hierarchy_are_errors() {
    let f = Fake::new("cpu memory", false, false);
    let e = Manager::setup_at(Choice::V1, &f.roots())
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "cannot use cgroup v1: the cgroup v1 memory hierarchy is not mounted (pass --cgroup auto, --cgroup v2 or --cgroup none)"
    );
    let m = Manager::setup_at(Choice::None, &f.roots()).unwrap();
    assert_eq!(m.reason(), "forced by --cgroup none");
    // Only the v2 root has a limit here.
    assert_eq!(m.available_memory().unwrap(), 1 << 30);
}

fn dead_pid() -> i32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id() as i32;
    c.wait().unwrap();
    pid
}

#[test]
fn stale_groups_of_dead_or_reused_pids_are_removed_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dead = dead_pid();
    fs::create_dir_all(d.join(format!("trimrun-{dead}/worker-0-3"))).unwrap();
    fs::create_dir_all(d.join(format!("trimrun-{dead}/supervisor"))).unwrap();
    // pid 1 is alive and older than the group: kept.
    fs::create_dir_all(d.join("trimrun-1")).unwrap();
    // A live pid that started after its "group" was created: the pid was reused.
    let mut young = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let reused = d.join(format!("trimrun-{}-x", young.id()));
    fs::create_dir(&reused).unwrap();
    let old = nix::sys::time::TimeSpec::new(1_000_000_000, 0);
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &reused,
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    // A live pool's group: locked, and made to look older than its pid by a clock step.
    let live = d.join(format!("trimrun-{}-live", young.id()));
    let _lock = common::mkdir_locked(&live).unwrap();
    nix::sys::stat::utimensat(
        nix::fcntl::AT_FDCWD,
        &live,
        &old,
        &old,
        nix::sys::stat::UtimensatFlags::NoFollowSymlink,
    )
    .unwrap();
    fs::create_dir_all(d.join("unrelated")).unwrap();
    let mut removed = common::clean_stale(Path::new("/proc"), d, std::process::id() as i32);
    removed.sort();
    let mut want = vec![
        format!("trimrun-{dead}"),
        format!("trimrun-{}-x", young.id()),
    ];
    want.sort();
    assert_eq!(removed, want);
    assert!(d.join("trimrun-1").exists());
    assert!(live.exists(), "a locked (live) group was judged stale");
    assert!(d.join("unrelated").exists());
    young.kill().unwrap();
    young.wait().unwrap();
}

#[test]
fn group_names_parse_back_to_pids() {
    assert_eq!(common::group_pid("trimrun-123"), Some(123));
    assert_eq!(common::group_pid("trimrun-123-test_a"), Some(123));
    assert_eq!(common::group_pid("trimrun-"), None);
    assert_eq!(common::group_pid("trimrun-x1"), None);
    assert_eq!(common::group_pid("worker-1-2"), None);
}

#[test]
fn error_messages_name_path_operation_and_remedy() {
    let e = CgroupError::io(
        "create cgroup",
        Path::new("/sys/fs/cgroup/x/worker-3"),
        std::io::Error::from_raw_os_error(libc::EACCES),
    );
    assert_eq!(
        e.to_string(),
        "cannot create cgroup /sys/fs/cgroup/x/worker-3: permission denied (run as root, or under systemd with Delegate=yes, or pass --cgroup none)"
    );
    let e = CgroupError::io(
        "write",
        Path::new("/sys/fs/cgroup/memory.max"),
        std::io::Error::from_raw_os_error(libc::EROFS),
    );
    assert!(
        e.to_string()
            .contains("mounted read-only (pass --cgroup none")
    );
}

#[test]
fn manager_and_worker_groups_can_be_shared_across_threads() {
    fn shareable<T: Send + Sync>() {}
    shareable::<Manager>();
    shareable::<WorkerGroup>();
    shareable::<CgroupError>();
}

/// A fake `/proc` with a worker (pid 100, readable) and its child (pid 101, whose
/// smaps_rollup cannot be read, as for a non-dumpable process).
fn fake_proc(d: &Path) {
    let smaps = V1_SMAPS.to_string();
    for (pid, ppid, children) in [(100, 1, "101 "), (101, 100, "")] {
        let p = d.join(pid.to_string());
        fs::create_dir_all(p.join(format!("task/{pid}"))).unwrap();
        fs::write(p.join(format!("task/{pid}/children")), children).unwrap();
        fs::write(
            p.join("stat"),
            format!(
                "{pid} (python3) S {ppid} {pid} {pid} 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 1 0 {} 0 0",
                1000 + pid
            ),
        )
        .unwrap();
    }
    fs::write(d.join("100/smaps_rollup"), smaps).unwrap();
    fs::write(d.join("101/statm"), "5000 1000 200 1 0 800 0\n").unwrap();
}

#[test]
fn none_counts_a_process_with_unreadable_smaps_by_its_statm_rss() {
    let dir = tempfile::tempdir().unwrap();
    fake_proc(dir.path());
    let roots = Roots {
        proc: dir.path().to_path_buf(),
        ..Roots::fixture(dir.path())
    };
    let m = Manager::setup_at(Choice::None, &roots).unwrap();
    let g = m.create_worker(0, 0, None).unwrap();
    let u = g.usage(Some(100)).unwrap();
    let readable = parse_smaps_rollup(V1_SMAPS).unwrap();
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .unwrap()
        .unwrap() as u64;
    assert_eq!(u.pids, vec![100, 101]);
    assert_eq!(u.current, readable.pss + 1000 * page, "{u:?}");
    assert_eq!(u.working_set, u.current);
    // What was seen stays the worker's, by pid and start time.
    let mut left = g.left_behind();
    left.sort();
    assert_eq!(left, vec![100, 101]);
}

/// Teardown and a worker's own removal can race: the loser finds the group gone, which is
/// success, not "cgroup.procs: No such file or directory".
#[test]
fn killing_or_destroying_a_group_removed_meanwhile_is_success() {
    let dir = tempfile::tempdir().unwrap();
    let gone = dir.path().join("worker-0-0");
    common::kill_cgroup(&gone).unwrap();
    common::destroy_tree(&gone, std::time::Duration::ZERO).unwrap();
    // A group whose cgroup.procs vanishes between the check and the read.
    fs::create_dir(&gone).unwrap();
    common::kill_cgroup(&gone).unwrap();
}

#[test]
fn a_group_removed_meanwhile_is_no_error_whichever_way_the_kernel_says_it() {
    use super::common::{kill_cgroup, removed_meanwhile};
    assert!(removed_meanwhile(Some(libc::ENOENT)));
    // What reading cgroup.procs gives while another thread removes the group.
    assert!(removed_meanwhile(Some(libc::ENODEV)));
    assert!(!removed_meanwhile(Some(libc::EBUSY)));
    assert!(!removed_meanwhile(Some(libc::EACCES)));
    assert!(!removed_meanwhile(None));
    let dir = tempfile::tempdir().unwrap();
    assert!(kill_cgroup(&dir.path().join("worker-0-0")).is_ok());
}
