//! The `trimrun status` table: pure functions from a [`Snapshot`] to text.

use super::Snapshot;
pub use crate::size::human_bytes;

/// Width of the memory bar, in cells.
const BAR_CELLS: usize = 10;

/// Render the pool line and one row per worker. Pure; ends with a newline.
///
/// ```text
/// trimrun pid 4242 (running, up 1h02m)  backend v2  workers 2/2  memory 808 MiB of 1 GiB ...
/// SLOT  PID    GEN  STATE  AGE    MEMORY                                   PEAK ...
/// 0     4250   3    ready  12m03s [######....]  61%  312 MiB / 512 MiB  401.2 MiB ...
/// ```
pub fn render_table(s: &Snapshot) -> String {
    let mut out = String::new();
    out.push_str(&pool_line(s));
    out.push('\n');
    if let Some(z) = &s.zygote {
        out.push_str(&format!(
            "zygote pid {} ({}, up {}, generation {})  {} workers forked\n",
            z.pid,
            z.state,
            human_age(z.age_secs),
            z.generation,
            z.forks
        ));
    }
    if s.workers.is_empty() {
        out.push_str("(no workers)\n");
        return out;
    }
    let header = [
        "SLOT",
        "PID",
        "GEN",
        "STATE",
        "AGE",
        "MEMORY",
        "PEAK",
        "TRIMS",
        "RELEASED",
        "LAST PAUSE",
        "RECYCLES",
        "LAST REASON",
    ];
    let mut workers: Vec<_> = s.workers.iter().collect();
    workers.sort_by_key(|w| (w.slot, w.generation));
    let rows: Vec<[String; 12]> = workers
        .iter()
        .map(|w| {
            [
                w.slot.to_string(),
                w.pid.to_string(),
                w.generation.to_string(),
                w.state.clone(),
                human_age(w.age_secs),
                memory_cell(w.working_set, w.limit),
                w.peak.map(human_bytes).unwrap_or_else(|| "-".into()),
                w.trims.to_string(),
                human_bytes(w.released_bytes),
                w.last_trim_pause_us
                    .map(human_pause)
                    .unwrap_or_else(|| "-".into()),
                w.recycles.to_string(),
                w.last_reason.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    // Numbers read best right-aligned; words and the bar left-aligned.
    let right = [
        true, true, true, false, true, false, true, true, true, true, true, false,
    ];
    let mut push_row = |cells: &[&str]| {
        let mut line = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = widths[i].saturating_sub(cell.chars().count());
            if right[i] {
                line.extend(std::iter::repeat_n(' ', pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < cells.len() {
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    };
    push_row(&header);
    for row in &rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        push_row(&cells);
    }
    out
}

fn pool_line(s: &Snapshot) -> String {
    let state = if s.state.is_empty() {
        "running"
    } else {
        &s.state
    };
    let backend = if s.backend.is_empty() {
        "?"
    } else {
        &s.backend
    };
    let total = human_bytes(s.total_working_set());
    let memory = match s.total_limit() {
        Some(limit) => format!("{total} of {}", human_bytes(limit)),
        None => total,
    };
    let timeouts = if s.timeouts > 0 {
        format!("  watchdog timeouts {}", s.timeouts)
    } else {
        String::new()
    };
    format!(
        "trimrun pid {} ({state}, up {})  backend {backend}  workers {}/{}  memory {memory}  \
         OOM kills {}  restarts {}  recycles {} ({} in progress)  trims {} ({} released){timeouts}",
        s.pid,
        human_age(s.uptime_secs),
        s.workers.len(),
        s.target_workers,
        s.oom_kills,
        s.restarts,
        s.recycles,
        s.recycles_in_progress,
        s.trims,
        human_bytes(s.released_bytes),
    )
}

/// `[######....]  61%  312 MiB / 512 MiB`, or the bare size without a limit.
fn memory_cell(used: u64, limit: Option<u64>) -> String {
    match limit {
        Some(limit) if limit > 0 => {
            let pct = used as f64 * 100.0 / limit as f64;
            format!(
                "{} {:>3.0}%  {} / {}",
                bar(used, limit),
                pct,
                human_bytes(used),
                human_bytes(limit)
            )
        }
        _ => format!("{} {:>4}  {} / no limit", bar(0, 0), "-", human_bytes(used)),
    }
}

/// Ten cells, each 10% of the limit (rounded to the nearest cell); a blank bar without a
/// limit; over the limit, the bar is full and ends in `!`.
fn bar(used: u64, limit: u64) -> String {
    if limit == 0 {
        return format!("[{}]", " ".repeat(BAR_CELLS));
    }
    if used > limit {
        return format!("[{}!]", "#".repeat(BAR_CELLS - 1));
    }
    let filled = ((used as f64 / limit as f64) * BAR_CELLS as f64).round() as usize;
    format!("[{}{}]", "#".repeat(filled), ".".repeat(BAR_CELLS - filled))
}

/// Ages for people: `45s`, `12m03s`, `1h02m`, `3d04h`.
pub fn human_age(secs: f64) -> String {
    let s = if secs.is_finite() && secs > 0.0 {
        secs as u64
    } else {
        0
    };
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

/// Pauses for people: `850us`, `1.2ms`, `0.35s`.
pub fn human_pause(us: u64) -> String {
    if us < 1000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.1}ms", us as f64 / 1000.0)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::WorkerSnapshot;

    const MIB: u64 = 1024 * 1024;

    fn pool() -> Snapshot {
        Snapshot {
            version: 1,
            pid: 4242,
            uptime_secs: 3725.0,
            backend: "v2".into(),
            target_workers: 2,
            oom_kills: 1,
            restarts: 2,
            recycles: 3,
            recycles_in_progress: 1,
            trims: 9,
            released_bytes: 80 * MIB,
            timeouts: 0,
            state: "running".into(),
            zygote: None,
            workers: vec![
                WorkerSnapshot {
                    slot: 1,
                    pid: 4251,
                    generation: 1,
                    state: "draining".into(),
                    age_secs: 59.9,
                    working_set: 600 * MIB,
                    limit: Some(512 * MIB),
                    peak: Some(600 * MIB),
                    trims: 0,
                    recycles: 0,
                    ..Default::default()
                },
                WorkerSnapshot {
                    slot: 0,
                    pid: 4250,
                    generation: 3,
                    state: "ready".into(),
                    age_secs: 723.0,
                    working_set: 312 * MIB,
                    limit: Some(512 * MIB),
                    peak: Some(401 * MIB + MIB / 5),
                    trims: 4,
                    released_bytes: 12 * MIB + 300 * 1024,
                    last_trim_pause_us: Some(850),
                    recycles: 2,
                    last_reason: Some("memory".into()),
                    recycle_threshold: Some(460 * MIB),
                    rss: None,
                    timeouts: 0,
                },
            ],
        }
    }

    #[test]
    fn table_shows_pool_line_then_one_row_per_worker_sorted_by_slot() {
        let t = render_table(&pool());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert_eq!(
            lines[0],
            "trimrun pid 4242 (running, up 1h02m)  backend v2  workers 2/2  \
             memory 912 MiB of 1 GiB  OOM kills 1  restarts 2  recycles 3 (1 in progress)  \
             trims 9 (80 MiB released)"
        );
        assert!(lines[1].starts_with("SLOT  "), "{t}");
        assert!(lines[1].ends_with("LAST REASON"), "{t}");
        let row0 = lines[2];
        for want in [
            "4250",
            "ready",
            "12m03s",
            "[######....]  61%  312 MiB / 512 MiB",
            "401.2 MiB",
            "12.3 MiB",
            "850us",
            "memory",
        ] {
            assert!(row0.contains(want), "{want:?} missing in {row0:?}");
        }
        let row1 = lines[3];
        assert!(row1.contains("[#########!] 117%"), "{row1}");
        assert!(row1.contains("draining"), "{row1}");
        assert!(row1.contains("59s"), "{row1}");
        assert!(row1.trim_end().ends_with('-'), "no reason yet: {row1}");
    }

    #[test]
    fn table_shows_the_zygote_under_the_pool_line() {
        let mut s = pool();
        s.zygote = Some(crate::status::ZygoteSnapshot {
            pid: 4243,
            generation: 2,
            state: "ready".into(),
            age_secs: 75.0,
            forks: 9,
        });
        let t = render_table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[1],
            "zygote pid 4243 (ready, up 1m15s, generation 2)  9 workers forked"
        );
        assert!(lines[2].starts_with("SLOT  "), "{t}");
        assert!(!render_table(&pool()).contains("zygote"));
    }

    #[test]
    fn table_columns_line_up() {
        let t = render_table(&pool());
        let lines: Vec<&str> = t.lines().skip(1).collect();
        // (header, right-aligned): a left-aligned cell starts under its header's first
        // letter, a right-aligned one ends under its last.
        let cols = [
            ("SLOT", true),
            ("PID", true),
            ("STATE", false),
            ("AGE", true),
            ("MEMORY", false),
            ("PEAK", true),
            ("RELEASED", true),
            ("LAST PAUSE", true),
            ("LAST REASON", false),
        ];
        for (col, right) in cols {
            let start = lines[0].find(col).unwrap();
            let end = start + col.len();
            for row in &lines[1..] {
                let b = row.as_bytes();
                let ok = if right {
                    b[end - 1] != b' ' && b.get(end).is_none_or(|c| *c == b' ')
                } else {
                    b[start] != b' ' && (start == 0 || b[start - 1] == b' ')
                };
                assert!(ok, "{col} not aligned in\n{}", lines.join("\n"));
            }
        }
    }

    #[test]
    fn worker_without_limit_shows_size_only_and_pool_has_no_total_limit() {
        let mut s = pool();
        s.workers[0].limit = None;
        let t = render_table(&s);
        assert!(t.contains("[          ]    -  600 MiB / no limit"), "{t}");
        assert!(
            t.lines().next().unwrap().contains("memory 912 MiB  "),
            "{t}"
        );
    }

    #[test]
    fn watchdog_timeouts_show_in_the_pool_line_only_once_there_are_some() {
        let mut s = pool();
        assert!(!render_table(&s).contains("timeouts"));
        s.timeouts = 2;
        s.workers[0].state = "hung".into();
        let t = render_table(&s);
        assert!(
            t.lines().next().unwrap().ends_with("  watchdog timeouts 2"),
            "{t}"
        );
        assert!(t.contains(" hung "), "{t}");
    }

    #[test]
    fn empty_pool_says_so() {
        let s = Snapshot {
            pid: 1,
            state: "starting".into(),
            ..Default::default()
        };
        let t = render_table(&s);
        assert!(t.starts_with("trimrun pid 1 (starting, up 0s)"), "{t}");
        assert!(t.ends_with("(no workers)\n"), "{t}");
    }

    #[test]
    fn bars_round_to_the_nearest_cell_and_mark_overflow() {
        assert_eq!(bar(0, 100), "[..........]");
        assert_eq!(bar(61, 100), "[######....]");
        assert_eq!(bar(100, 100), "[##########]");
        assert_eq!(bar(101, 100), "[#########!]");
        assert_eq!(bar(120, 100), "[#########!]");
        assert_eq!(bar(5, 0), "[          ]");
    }

    #[test]
    fn sizes_ages_and_pauses_read_like_a_person_wrote_them() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(312 * MIB), "312 MiB");
        assert_eq!(human_bytes(3 * 512 * MIB), "1.50 GiB");
        assert_eq!(human_age(0.4), "0s");
        assert_eq!(human_age(-3.0), "0s");
        assert_eq!(human_age(f64::NAN), "0s");
        assert_eq!(human_age(59.9), "59s");
        assert_eq!(human_age(60.0), "1m00s");
        assert_eq!(human_age(723.0), "12m03s");
        assert_eq!(human_age(3720.0), "1h02m");
        assert_eq!(human_age(3.0 * 86400.0 + 4.0 * 3600.0 + 59.0), "3d04h");
        assert_eq!(human_pause(850), "850us");
        assert_eq!(human_pause(1200), "1.2ms");
        assert_eq!(human_pause(350_000), "350.0ms");
        assert_eq!(human_pause(2_500_000), "2.50s");
    }
}
