//! `--preload` on the real kernel, with `python -m trimrun_worker` as the zygote: workers
//! are forks of one zygote that imported the app, trimrun's own children, in their own
//! process groups (and cgroups), sharing the zygote's pages; HUP, a recycle and a zygote
//! that dies cost no request.

mod common;

use std::time::Duration;

use common::load::{Client, Load};
use common::pool::*;
use common::python::*;
use common::wait_for;

fn stat_field(pid: i32, n: usize) -> i32 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after "(comm)": state is field 3, ppid 4, pgrp 5.
    s.rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .nth(n - 3)
        .unwrap()
        .parse()
        .unwrap()
}

/// The environment a process was exec'ed with (a fork's is its zygote's).
fn environ(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/environ"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect()
}

fn smaps(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(&format!("{key}:")))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn zygote_pid(pool: &Pool) -> Option<(i64, String)> {
    let s = pool.status();
    let z = s.get("zygote")?;
    Some((z["pid"].as_i64()?, z["state"].as_str()?.to_string()))
}

fn worker_pids(pool: &Pool) -> Vec<i32> {
    let s = pool.status();
    let mut v: Vec<i32> = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_i64().unwrap() as i32)
        .collect();
    v.sort();
    v
}

#[test]
fn preloaded_workers_are_forks_of_the_zygote_owned_by_trimrun_and_share_its_pages() {
    if !have_python_deps("waitress, trimrun_worker") {
        return;
    }
    // A 40 MiB import: enough to see sharing, quick to build.
    let cgroup = if common::is_root() {
        vec!["--cgroup", "auto"]
    } else {
        vec![]
    };
    let pool = preload_pool(2, "big_app:app", &cgroup, &[("BIG_APP_MB", "40")]);
    let (zpid, state) = zygote_pid(&pool).expect("trimrun status shows the zygote");
    assert_eq!(state, "ready");
    let zpid = zpid as i32;
    assert_eq!(
        stat_field(zpid, 4),
        pool.pid(),
        "the zygote is trimrun's child"
    );
    assert!(
        environ(zpid)
            .iter()
            .any(|e| e.starts_with("TRIMRUN_ZYGOTE_FD="))
    );
    let workers = worker_pids(&pool);
    assert_eq!(workers.len(), 2);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..40 {
        let body = get(pool.port, "/").unwrap();
        seen.insert(
            body.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<i32>()
                .unwrap(),
        );
    }
    assert!(
        seen.iter().all(|p| workers.contains(p)),
        "answers came from {seen:?}, workers are {workers:?}"
    );
    // What the app sees in os.environ (/proc/PID/environ of a fork is the zygote's).
    for _ in 0..20 {
        let env = get(pool.port, "/env").unwrap();
        let pid = env.split_whitespace().next().unwrap();
        assert!(env.contains(&format!("LISTEN_PID={pid} ")), "{env}");
        assert!(!env.contains("TRIMRUN_WORKER_ID=None"), "{env}");
        assert!(env.contains("TRIMRUN_ZYGOTE_FD=None"), "{env}");
    }
    for (slot, &w) in workers.iter().enumerate() {
        assert_eq!(
            stat_field(w, 4),
            pool.pid(),
            "worker {w} is trimrun's child"
        );
        assert_eq!(
            stat_field(w, 5),
            w,
            "worker {w} leads its own process group"
        );
        let (rss, pss) = (smaps(w, "Rss"), smaps(w, "Pss"));
        assert!(
            pss * 10 < rss * 7,
            "worker {w} shares the zygote's pages: Pss {pss} should be well below Rss {rss}"
        );
        if common::is_root() && pool.log().contains("backend=v1") {
            let cg = std::fs::read_to_string(format!("/proc/{w}/cgroup")).unwrap();
            let line = cg.lines().find(|l| l.contains(":memory:")).unwrap_or("");
            assert!(
                line.contains("/worker-"),
                "worker {w} (slot {slot}) is in its own memory cgroup: {line}"
            );
        }
    }
}

#[test]
fn preload_loses_no_request_to_hup_recycle_or_a_dying_zygote() {
    if !have_python_deps("flask, waitress, trimrun_worker") {
        return;
    }
    let pool = preload_pool(2, "flask_app:app", &["--graceful-timeout", "20s"], &[]);
    let load = Load::start(
        pool.port,
        &[
            Client::OneShot,
            Client::KeepAlive,
            Client::KeepAlive,
            Client::Slow,
        ],
    );
    load.wait_more(50);
    let (z1, _) = zygote_pid(&pool).unwrap();

    // HUP: a new zygote, then every worker replaced by a fork of it.
    pool.signal(libc::SIGHUP);
    pool.wait_log("rolling restart complete", Duration::from_secs(60));
    let (z2, state) = zygote_pid(&pool).unwrap();
    assert_ne!(z1, z2, "HUP starts a new zygote");
    assert_eq!(state, "ready");
    load.wait_more(50);

    // A dying zygote is restarted; no worker is touched.
    let before = worker_pids(&pool);
    // SAFETY: kill(2) of the zygote this test's trimrun started.
    unsafe { libc::kill(z2 as i32, libc::SIGKILL) };
    let z3 = wait_for(Duration::from_secs(30), || {
        zygote_pid(&pool).filter(|(p, s)| *p != z2 && s == "ready")
    })
    .unwrap_or_else(|| panic!("no new zygote after the old one died:\n{}", pool.log()));
    assert_eq!(worker_pids(&pool), before, "no worker restarted");
    load.wait_more(50);

    // A recycle forks the replacement from the new zygote.
    let recycles = pool.count_log("recycle complete");
    let (code, out) = pool.ctl(&["recycle", "0"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        wait_for(Duration::from_secs(60), || (pool
            .count_log("recycle complete")
            > recycles)
            .then_some(()))
        .is_some(),
        "{}",
        pool.log()
    );
    load.wait_more(50);
    let newest = *worker_pids(&pool).iter().max().unwrap();
    assert_eq!(stat_field(newest, 4), pool.pid());
    assert_eq!(zygote_pid(&pool).unwrap().0, z3.0);

    let (ok, retried, failures, pids) = load.finish();
    eprintln!(
        "preload: {ok} requests ok, {retried} resent after a keep-alive close, {} failed, {pids} worker pids",
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} requests failed: {:?}\n{}",
        failures.len(),
        &failures[..failures.len().min(10)],
        pool.log()
    );
}

/// `--preload` with a command that does not speak the zygote protocol (a plain server
/// that serves the shared socket itself): warned about at start, and once it has not said
/// ready within `--ready-timeout`, the pool stops and trimrun exits 2 saying why, instead
/// of starting such "zygotes" for ever, each serving outside every worker's cgroup.
#[test]
fn a_preload_command_that_is_not_a_zygote_stops_the_pool_with_exit_2() {
    let app = common::example("app.py");
    let mut pool = Pool::start(
        &["-n", "2", "--preload", "--ready-timeout", "2s"],
        &["python3", &app],
    );
    let code = pool.wait_exit(Duration::from_secs(60));
    let log = pool.log();
    assert_eq!(code, Some(2), "{log}");
    assert!(
        log.contains("--preload runs the command as a zygote"),
        "no warning at start:\n{log}"
    );
    assert!(
        log.contains("does not speak the zygote protocol of docs/preload.md"),
        "{log}"
    );
    assert_eq!(
        log.matches("its command is not python -m trimrun_worker")
            .count(),
        1,
        "said once:\n{log}"
    );
    assert_eq!(log.matches("zygote started").count(), 1, "{log}");
}
