//! Trimming inside the pool (issue 4, "where it is used"): a worker whose working set
//! crosses --trim-at is trimmed from the outside, its memory comes back, and the counters
//! say so; with --trim off nothing is trimmed.

mod common;

use std::time::Duration;

use common::example;
use common::pool::*;

const MIB: u64 = 1 << 20;

fn fragmenting_pool(trim: &str) -> Option<Pool> {
    if !common::is_root() {
        common::cannot_run("root (ptrace of the workers, memory cgroups)");
        return None;
    }
    let app = example("app.py");
    let pool = Pool::start_env(
        &[
            "-n",
            "1",
            "--limit",
            "256M",
            "--trim",
            trim,
            "--trim-at",
            "20%",
            "--trim-interval",
            "1s",
            "--ready",
            "delay:300ms",
        ],
        &["python3", &app],
        &[("TRIMRUN_CGROUP", "auto")],
    );
    pool.wait_log("all workers ready", Duration::from_secs(20));
    // ~64 MiB of 1 KiB glibc allocations, 1 in 64 kept: the rest is free but held.
    get(pool.port, "/fragment?mb=64").unwrap();
    Some(pool)
}

#[test]
fn the_pool_trims_a_fragmented_worker_from_outside_and_the_memory_comes_back() {
    let Some(pool) = fragmenting_pool("on") else {
        return;
    };
    pool.wait_log("trimmed slot=0", Duration::from_secs(20));
    let status = common::wait_for(Duration::from_secs(10), || {
        let s = pool.status();
        (s["workers"][0]["released_bytes"].as_u64()? >= 32 * MIB).then_some(s)
    })
    .unwrap_or_else(|| panic!("less than 32 MiB released:\n{}", pool.log()));
    let w = &status["workers"][0];
    println!("worker after trim: {w}");
    assert!(w["trims"].as_u64().unwrap() >= 1);
    assert!(w["last_trim_pause_us"].as_u64().is_some());
    assert!(
        w["working_set"].as_u64().unwrap() < 48 * MIB,
        "the working set came back down: {w}"
    );
    assert_eq!(status["trims"].as_u64(), w["trims"].as_u64());
    // Trimming kept it far below its recycle threshold: no recycle.
    assert!(!pool.log().contains("recycling worker"), "{}", pool.log());
}

#[test]
fn trim_off_never_trims() {
    let Some(pool) = fragmenting_pool("off") else {
        return;
    };
    // A memory tick has seen the worker above --trim-at (with --trim on it would be
    // trimmed at the next one)...
    let grown = common::wait_for(Duration::from_secs(30), || {
        let s = pool.status();
        (s["workers"][0]["working_set"].as_u64()? > 48 * MIB).then_some(s)
    })
    .unwrap_or_else(|| panic!("the worker never grew past 48 MiB:\n{}", pool.log()));
    // ...and three more seconds of the pool's own clock pass (ticks, however busy the
    // machine), with the worker still above it.
    let t0 = grown["uptime_secs"].as_f64().unwrap();
    let s = common::wait_for(Duration::from_secs(60), || {
        let s = pool.status();
        (s["uptime_secs"].as_f64()? > t0 + 3.0).then_some(s)
    })
    .unwrap();
    assert_eq!(s["workers"][0]["trims"], 0, "{}", pool.log());
    assert!(s["workers"][0]["working_set"].as_u64().unwrap() > 48 * MIB);
    assert!(!pool.log().contains("trimmed"));
}
