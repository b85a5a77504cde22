//! The `trimrun status` table: pure functions from a [`Snapshot`] to text.
//!
//! Two layouts: [`render_compact`] fits 80 columns (the default, and what `--watch` shows
//! in an 80-column terminal); [`render_table`] is the wide one with every column
//! (`--wide`, or any terminal wide enough for it, see [`render_for`]).

use super::Snapshot;
pub use crate::size::human_bytes;

/// Width of the memory bar, in cells.
const BAR_CELLS: usize = 10;

/// The layout for a terminal `cols` wide (None: not a terminal): wide when asked, or when
/// the wide table fits; else the 80-column one.
pub fn render_for(s: &Snapshot, wide: bool, cols: Option<usize>) -> String {
    let w = render_table(s);
    if wide || cols.is_some_and(|c| w.lines().all(|l| l.chars().count() <= c)) {
        w
    } else {
        render_compact(s)
    }
}

/// The 80-column layout: two pool lines, a line per slot in trouble, one short row per
/// worker (memory as `used/limit pct`, the recycle threshold, trims, recycles and the
/// last reason). Pure; ends with a newline.
///
/// ```text
/// trimrun pid 4242 (running, up 1h02m)  v2  workers 2/2  memory 912M of 1.00G
/// OOM kills 1  restarts 2  recycles 3 (1 in progress)  trims 9 (80.0M released)
/// SLOT   PID  STATE      AGE  MEMORY           RECYCLE@  TRIMS  RECYCLED
///    0  4250  ready   12m03s  312M/512M  61%       460M      4  2 memory
/// ```
pub fn render_compact(s: &Snapshot) -> String {
    let mut out = String::new();
    let (state, backend, memory) = pool_summary(s, short_bytes);
    let fields = [
        format!(
            "trimrun pid {} ({state}, up {})",
            s.pid,
            human_age(s.uptime_secs)
        ),
        backend.to_string(),
        format!("workers {}/{}", s.workers.len(), s.target_workers),
        format!("memory {memory}"),
        format!("OOM kills {}", s.oom_kills),
        format!("restarts {}", s.restarts),
        format!(
            "recycles {} ({} in progress)",
            s.recycles, s.recycles_in_progress
        ),
        format!(
            "trims {} ({} released)",
            s.trims,
            short_bytes(s.released_bytes)
        ),
    ];
    let mut fields = fields.to_vec();
    if s.timeouts > 0 {
        fields.push(format!("watchdog timeouts {}", s.timeouts));
    }
    out.push_str(&wrap_fields(&fields, COMPACT_COLUMNS));
    out.push_str(&trouble_lines(s));
    out.push_str(&zygote_line(s));
    if s.workers.is_empty() {
        out.push_str("(no workers)\n");
        return out;
    }
    let header = [
        "SLOT", "PID", "STATE", "AGE", "MEMORY", "RECYCLE@", "TRIMS", "RECYCLED",
    ];
    let mut workers: Vec<_> = s.workers.iter().collect();
    workers.sort_by_key(|w| (w.slot, w.generation));
    let rows: Vec<[String; 8]> = workers
        .iter()
        .map(|w| {
            let memory = match w.limit {
                Some(l) if l > 0 => format!(
                    "{}/{} {:>3.0}%",
                    short_bytes(w.working_set),
                    short_bytes(l),
                    w.working_set as f64 * 100.0 / l as f64
                ),
                _ => short_bytes(w.working_set),
            };
            let recycled = match &w.last_reason {
                Some(r) => format!("{} {}", w.recycles, r),
                None => w.recycles.to_string(),
            };
            [
                w.slot.to_string(),
                w.pid.to_string(),
                w.state.clone(),
                human_age(w.age_secs),
                memory,
                w.recycle_threshold
                    .map(short_bytes)
                    .unwrap_or_else(|| "-".into()),
                w.trims.to_string(),
                recycled,
            ]
        })
        .collect();
    let right = [true, true, false, true, false, true, true, false];
    push_rows(&mut out, &header, &rows, &right);
    out
}

/// Width of the compact layout.
const COMPACT_COLUMNS: usize = 80;

/// `fields` two spaces apart, on as few lines of at most `width` as they fit.
fn wrap_fields(fields: &[String], width: usize) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for f in fields {
        if !line.is_empty() && line.chars().count() + 2 + f.chars().count() > width {
            out.push_str(&line);
            out.push('\n');
            line.clear();
        }
        if !line.is_empty() {
            line.push_str("  ");
        }
        line.push_str(f);
    }
    if !line.is_empty() {
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// One line per slot that is crash-looping or backing off, with how its last worker ended.
fn trouble_lines(s: &Snapshot) -> String {
    let mut out = String::new();
    for slot in &s.slots {
        let Some(what) = slot.trouble() else { continue };
        let mut line = format!("slot {} {what}: {} failures", slot.slot, slot.failures);
        if let Some(e) = &slot.last_exit {
            line.push_str(&format!(", last {e}"));
        }
        if let Some(t) = slot.retry_in_secs {
            line.push_str(&format!(", next start in {}", human_age(t.ceil())));
        }
        out.push_str(&line);
        out.push('\n');
    }
    if s.log_lines_dropped > 0 {
        out.push_str(&format!(
            "log lines dropped: {} (stderr closed or not keeping up)\n",
            s.log_lines_dropped
        ));
    }
    out
}

/// Header and rows, columns padded to their widest cell, two spaces apart.
fn push_rows<const N: usize>(
    out: &mut String,
    header: &[&str; N],
    rows: &[[String; N]],
    right: &[bool; N],
) {
    let mut widths = header.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
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
    push_row(header);
    for row in rows {
        let cells: Vec<&str> = row.iter().map(String::as_str).collect();
        push_row(&cells);
    }
}

/// Sizes in at most five characters: `900B`, `12K`, `9.5M`, `312M`, `1.50G`, `12.3G`.
pub fn short_bytes(b: u64) -> String {
    const K: f64 = 1024.0;
    let f = b as f64;
    let unit = |v: f64, u: char| {
        if v < 10.0 {
            format!("{v:.1}{u}")
        } else {
            format!("{:.0}{u}", v.floor())
        }
    };
    if b < 1000 {
        format!("{b}B")
    } else if f < 1000.0 * K {
        unit(f / K, 'K')
    } else if f < 1000.0 * K * K {
        unit(f / K / K, 'M')
    } else {
        let g = f / K / K / K;
        if g < 10.0 {
            format!("{g:.2}G")
        } else if g < 100.0 {
            format!("{g:.1}G")
        } else if g < 1000.0 {
            format!("{:.0}G", g.floor())
        } else {
            unit(g / K, 'T')
        }
    }
}

/// Render the pool line and one row per worker, every column (the wide layout). Pure;
/// ends with a newline.
///
/// ```text
/// trimrun pid 4242 (running, up 1h02m)  backend v2  workers 2/2  memory 808.0 MiB of 1.00 GiB ...
/// SLOT  PID    GEN  STATE  AGE    MEMORY                                   PEAK ...
/// 0     4250   3    ready  12m03s [######....]  61%  312.0 MiB / 512.0 MiB  401.2 MiB ...
/// ```
pub fn render_table(s: &Snapshot) -> String {
    let mut out = String::new();
    out.push_str(&pool_line(s));
    out.push('\n');
    out.push_str(&zygote_line(s));
    out.push_str(&trouble_lines(s));
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
        "RECYCLE AT",
        "TRIMS",
        "RELEASED",
        "LAST PAUSE",
        "RECYCLES",
        "LAST REASON",
    ];
    let mut workers: Vec<_> = s.workers.iter().collect();
    workers.sort_by_key(|w| (w.slot, w.generation));
    let rows: Vec<[String; 13]> = workers
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
                w.recycle_threshold
                    .map(human_bytes)
                    .unwrap_or_else(|| "-".into()),
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
    // Numbers read best right-aligned; words and the bar left-aligned.
    let right = [
        true, true, true, false, true, false, true, true, true, true, true, true, false,
    ];
    push_rows(&mut out, &header, &rows, &right);
    out
}

/// The zygote of `--preload`, when there is one (a line, or nothing).
fn zygote_line(s: &Snapshot) -> String {
    match &s.zygote {
        Some(z) => format!(
            "zygote pid {} ({}, up {}, generation {})  {} workers forked\n",
            z.pid,
            z.state,
            human_age(z.age_secs),
            z.generation,
            z.forks
        ),
        None => String::new(),
    }
}

/// The pool line's state (empty: running), backend (empty: unknown) and total memory
/// against the total limit, sizes written by `bytes`.
fn pool_summary(s: &Snapshot, bytes: fn(u64) -> String) -> (&str, &str, String) {
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
    let total = bytes(s.pool_memory());
    let memory = match (s.total_limit(), &s.pool) {
        (Some(budget), Some(_)) => format!("{total} of {} budget", bytes(budget)),
        (Some(limit), None) => format!("{total} of {}", bytes(limit)),
        (None, _) => total,
    };
    (state, backend, memory)
}

fn pool_line(s: &Snapshot) -> String {
    let (state, backend, memory) = pool_summary(s, human_bytes);
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
            slots: vec![],
            log_lines_dropped: 0,
            ready_time_secs: 2.0,
            zygote: None,
            pool: None,
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
    fn compact_table_fits_80_columns_even_with_big_numbers() {
        let mut s = pool();
        s.pid = 4_194_304;
        s.uptime_secs = 99.0 * 86400.0;
        s.oom_kills = 12_345;
        s.restarts = 99_999;
        s.recycles = 123_456;
        s.recycles_in_progress = 16;
        s.trims = 9_999_999;
        s.released_bytes = 999 << 30;
        s.target_workers = 1024;
        s.slots = vec![crate::status::SlotSnapshot {
            slot: 1023,
            failures: 42,
            restarts: 99,
            last_exit: Some("killed by SIGSEGV".into()),
            retry_in_secs: Some(29.5),
            ..Default::default()
        }];
        for w in &mut s.workers {
            w.pid = 4_194_303;
            w.slot = 1023;
            w.age_secs = 99.0 * 86400.0;
            w.working_set = 999 << 30;
            w.limit = Some(1000 << 30);
            w.recycle_threshold = Some(999 << 30);
            w.trims = 99_999;
            w.recycles = 9_999;
            w.last_reason = Some("lifetime".into());
        }
        let t = render_compact(&s);
        for line in t.lines() {
            assert!(
                line.chars().count() <= 80,
                "{} > 80: {line:?}\n{t}",
                line.len()
            );
        }
        assert!(
            t.contains(
                "slot 1023 crash-looping: 42 failures, last killed by SIGSEGV, next start in 30s"
            ),
            "{t}"
        );
        let t = render_compact(&pool());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "trimrun pid 4242 (running, up 1h02m)  v2  workers 2/2  memory 912M of 1.00G"
        );
        assert_eq!(
            lines[1],
            "OOM kills 1  restarts 2  recycles 3 (1 in progress)  trims 9 (80M released)"
        );
        assert!(lines[2].starts_with("SLOT"), "{t}");
        assert!(lines[3].contains("312M/512M  61%"), "{t}");
        assert!(lines[3].contains("460M"), "the recycle threshold: {t}");
        assert!(lines[3].ends_with("2 memory"), "{t}");
        assert!(lines[4].contains("600M/512M 117%"), "{t}");
    }

    #[test]
    fn the_wide_table_is_used_when_asked_or_when_it_fits() {
        let s = pool();
        let wide = render_table(&s);
        let width = wide.lines().map(|l| l.chars().count()).max().unwrap();
        assert!(width > 80, "the wide table is wide: {width}");
        assert_eq!(render_for(&s, false, Some(80)), render_compact(&s));
        assert_eq!(render_for(&s, false, None), render_compact(&s));
        assert_eq!(render_for(&s, true, Some(80)), wide);
        assert_eq!(render_for(&s, false, Some(width)), wide);
        assert!(wide.contains("RECYCLE AT"), "{wide}");
        assert!(wide.contains("460 MiB"), "{wide}");
    }

    #[test]
    fn short_sizes_stay_within_five_characters() {
        for (b, want) in [
            (0, "0B"),
            (999, "999B"),
            (1000, "1.0K"),
            (12 * 1024, "12K"),
            (9 * MIB + MIB / 2, "9.5M"),
            (312 * MIB, "312M"),
            (999 * MIB, "999M"),
            (1000 * MIB, "0.98G"),
            (3 * 512 * MIB, "1.50G"),
            (123 * 1024 * MIB, "123G"),
        ] {
            assert_eq!(short_bytes(b), want, "{b}");
        }
        for e in 0..50 {
            assert!(short_bytes(1u64 << e).len() <= 5, "{}", short_bytes(1 << e));
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
    fn under_a_budget_the_pool_line_shows_the_pool_groups_memory_against_the_budget() {
        let mut s = pool();
        s.pool = Some(crate::status::PoolSnapshot {
            budget: 600 * MIB,
            working_set: Some(397 * MIB),
            peak: Some(550 * MIB),
            cgroup: Some("/sys/fs/cgroup/x/trimrun-1".into()),
        });
        let t = render_table(&s);
        assert!(
            t.lines()
                .next()
                .unwrap()
                .contains("memory 397 MiB of 600 MiB budget"),
            "{t}"
        );
        let c = render_compact(&s);
        assert!(c.contains("memory 397M of 600M budget"), "{c}");
        assert!(c.lines().all(|l| l.len() <= 80), "{c}");
        // Without a budget: the workers' sum against the sum of their limits, as before.
        s.pool = None;
        assert!(!render_table(&s).contains("budget"));
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
