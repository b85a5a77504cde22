use super::*;
use rand::SeedableRng;
use rand::rngs::StdRng;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn worker(settings: &Settings) -> WorkerPolicy {
    let mut rng = StdRng::seed_from_u64(7);
    WorkerPolicy::new(settings, Some(GIB), Duration::ZERO, &mut rng)
}

fn no_jitter() -> Settings {
    Settings {
        recycle_jitter: 0.0,
        ..Settings::default()
    }
}

#[test]
fn recycle_thresholds_are_drawn_within_the_jitter_band_and_spread() {
    let settings = Settings::default();
    let mut rng = StdRng::seed_from_u64(1);
    let fractions: Vec<f64> = (0..1000)
        .map(|_| {
            let w = WorkerPolicy::new(&settings, Some(GIB), Duration::ZERO, &mut rng);
            w.recycle_threshold().unwrap() as f64 / GIB as f64
        })
        .collect();
    let (min, max) = fractions
        .iter()
        .fold((1.0f64, 0.0f64), |(lo, hi), &f| (lo.min(f), hi.max(f)));
    assert!(min >= 0.85 - 1e-9 && max <= 0.95 + 1e-9, "{min} {max}");
    // Uniform: both ends of the band are used.
    assert!(min < 0.86 && max > 0.94, "{min} {max}");
    let mean = fractions.iter().sum::<f64>() / fractions.len() as f64;
    assert!((mean - 0.90).abs() < 0.005, "{mean}");
}

#[test]
fn recycle_threshold_stays_below_the_limit_whatever_the_jitter() {
    let settings = Settings {
        recycle_at: 0.97,
        recycle_jitter: 0.1,
        ..Settings::default()
    };
    let mut rng = StdRng::seed_from_u64(2);
    for _ in 0..200 {
        let w = WorkerPolicy::new(&settings, Some(GIB), Duration::ZERO, &mut rng);
        assert!(w.recycle_threshold().unwrap() <= (GIB as f64 * 0.98) as u64);
    }
}

#[test]
fn lifetimes_are_drawn_within_the_jitter_band() {
    let settings = Settings {
        max_lifetime: Some(s(3600)),
        lifetime_jitter: s(600),
        ..Settings::default()
    };
    let mut rng = StdRng::seed_from_u64(3);
    let lifetimes: Vec<Duration> = (0..500)
        .map(|_| {
            WorkerPolicy::new(&settings, None, Duration::ZERO, &mut rng)
                .lifetime()
                .unwrap()
        })
        .collect();
    assert!(lifetimes.iter().all(|l| *l >= s(3000) && *l <= s(4200)));
    assert!(lifetimes.iter().any(|l| *l < s(3100)) && lifetimes.iter().any(|l| *l > s(4100)));
    // Jitter larger than the lifetime is capped at half of it.
    let settings = Settings {
        max_lifetime: Some(s(60)),
        lifetime_jitter: s(600),
        ..Settings::default()
    };
    for _ in 0..100 {
        let l = WorkerPolicy::new(&settings, None, Duration::ZERO, &mut rng)
            .lifetime()
            .unwrap();
        assert!(l >= s(30) && l <= s(90), "{l:?}");
    }
    assert_eq!(
        WorkerPolicy::new(&Settings::default(), None, Duration::ZERO, &mut rng).lifetime(),
        None
    );
}

#[test]
fn first_generation_thresholds_spread_between_base_and_threshold() {
    let settings = Settings::default();
    let mut rng = StdRng::seed_from_u64(8);
    let base = 250 * MIB;
    let mut thresholds: Vec<u64> = (0..500)
        .map(|_| {
            let mut w = WorkerPolicy::new_initial(&settings, Some(GIB), s(0), &mut rng);
            let drawn = w.recycle_threshold().unwrap();
            w.observe(s(1), 20 * MIB); // still importing: ignored
            assert_eq!(w.recycle_threshold(), Some(drawn));
            w.observe(s(5), base); // ready_time (5 s) passed: staggered from here
            w.observe(s(6), base + MIB); // once only
            let t = w.recycle_threshold().unwrap();
            assert!(t >= base && t <= drawn, "{t} not in [{base}, {drawn}]");
            t
        })
        .collect();
    thresholds.sort();
    let quartile = |q: usize| thresholds[thresholds.len() * q / 4] as f64 / MIB as f64;
    // Roughly uniform over [250, ~920] MiB.
    assert!((350.0..500.0).contains(&quartile(1)), "{}", quartile(1));
    assert!((500.0..700.0).contains(&quartile(2)), "{}", quartile(2));
    assert!((650.0..850.0).contains(&quartile(3)), "{}", quartile(3));
}

#[test]
fn first_generation_lifetimes_spread_over_one_lifetime() {
    let settings = Settings {
        max_lifetime: Some(s(3600)),
        lifetime_jitter: Duration::ZERO,
        ..Settings::default()
    };
    let mut rng = StdRng::seed_from_u64(9);
    let lifetimes: Vec<Duration> = (0..400)
        .map(|_| {
            WorkerPolicy::new_initial(&settings, None, s(0), &mut rng)
                .lifetime()
                .unwrap()
        })
        .collect();
    assert!(
        lifetimes
            .iter()
            .all(|l| *l >= settings.spacing() && *l <= s(3600))
    );
    let early = lifetimes.iter().filter(|l| **l < s(1800)).count();
    assert!((160..240).contains(&early), "{early}");
}

#[test]
fn lifetime_reason_fires_after_the_drawn_lifetime() {
    let settings = Settings {
        max_lifetime: Some(s(100)),
        lifetime_jitter: Duration::ZERO,
        ..Settings::default()
    };
    let mut rng = StdRng::seed_from_u64(4);
    let w = WorkerPolicy::new(&settings, None, s(50), &mut rng);
    assert_eq!(w.recycle_reason(&settings, s(149)), None);
    assert_eq!(
        w.recycle_reason(&settings, s(150)),
        Some(RecycleReason::Lifetime)
    );
    assert_eq!(w.waiting_since(&settings, s(170)), Some(s(150)));
}

#[test]
fn unknown_limit_never_trims_or_recycles_for_memory() {
    let settings = Settings::default();
    let mut rng = StdRng::seed_from_u64(5);
    let mut w = WorkerPolicy::new(&settings, None, Duration::ZERO, &mut rng);
    w.observe(s(1), 100 * GIB);
    assert!(!w.should_trim(&settings, s(1)));
    assert_eq!(w.recycle_reason(&settings, s(1000)), None);
    assert_eq!(w.time_to_limit(s(1)), None);
    assert_eq!(w.recycle_threshold(), None);
}

#[test]
fn trims_when_crossing_trim_at_and_not_below() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    w.observe(s(1), 700 * MIB);
    assert!(!w.should_trim(&settings, s(1)));
    w.observe(s(2), 770 * MIB);
    assert!(w.should_trim(&settings, s(2)));
    let mut off = settings.clone();
    off.trim = false;
    assert!(!w.should_trim(&off, s(2)));
}

#[test]
fn crossing_the_recycle_threshold_brings_the_deciding_trim_forward() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    w.observe(s(1), 800 * MIB);
    assert!(w.should_trim(&settings, s(1)));
    w.trimmed(s(1), 799 * MIB); // ineffective: disarmed until hysteresis growth
    w.observe(s(2), 850 * MIB);
    assert!(
        !w.should_trim(&settings, s(2)),
        "below the threshold the interval holds"
    );
    // Over the 90% threshold: the next trim comes after the urgent interval, not 10 s.
    w.observe(s(3), 930 * MIB);
    let urgent = settings.urgent_trim_interval();
    assert!(!w.should_trim(&settings, s(1) + urgent - Duration::from_millis(1)));
    w.observe(s(1) + urgent, 931 * MIB);
    assert!(w.should_trim(&settings, s(1) + urgent));
    assert!(urgent < settings.trim_interval);
}

#[test]
fn trim_interval_is_respected_after_an_effective_trim() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    w.observe(s(1), 800 * MIB);
    assert!(w.should_trim(&settings, s(1)));
    w.trimmed(s(1), 780 * MIB); // released 20 MiB: effective, stays armed
    w.observe(s(2), 790 * MIB);
    assert!(!w.should_trim(&settings, s(2)));
    w.observe(s(10), 790 * MIB);
    assert!(!w.should_trim(&settings, s(10)));
    w.observe(s(11), 790 * MIB);
    assert!(w.should_trim(&settings, s(11)));
}

#[test]
fn ineffective_trim_disarms_until_hysteresis_growth() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    w.observe(s(1), 800 * MIB);
    w.trimmed(s(1), 799 * MIB); // released 1 MiB < 1% of 1 GiB: ineffective
    w.observe(s(20), 810 * MIB);
    assert!(
        !w.should_trim(&settings, s(20)),
        "disarmed: no new garbage yet"
    );
    // Grown by the hysteresis (5% of 1 GiB ≈ 51 MiB) since the trim: re-armed.
    w.observe(s(30), 851 * MIB);
    assert!(w.should_trim(&settings, s(30)));
}

#[test]
fn ineffective_trim_rearms_below_the_hysteresis_band() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    w.observe(s(1), 800 * MIB);
    w.trimmed(s(1), 799 * MIB);
    // Falls below trim_at - hysteresis (70% ≈ 717 MiB), then comes back over trim_at.
    w.observe(s(20), 700 * MIB);
    w.observe(s(30), 780 * MIB);
    assert!(w.should_trim(&settings, s(30)));
    // Dipping only below trim_at (75%) is not enough.
    w.trimmed(s(30), 779 * MIB);
    w.observe(s(40), 750 * MIB);
    w.observe(s(50), 780 * MIB);
    assert!(!w.should_trim(&settings, s(50)));
}

#[test]
fn ineffective_trim_rearms_at_the_recycle_threshold() {
    let settings = no_jitter(); // threshold = 90% ≈ 921.6 MiB
    let mut w = worker(&settings);
    w.observe(s(1), 900 * MIB);
    w.trimmed(s(1), 899 * MIB);
    w.observe(s(20), 910 * MIB);
    assert!(!w.should_trim(&settings, s(20)));
    w.observe(s(21), 925 * MIB);
    assert!(
        w.should_trim(&settings, s(21)),
        "a fresh trim decides the recycle"
    );
}

#[test]
fn deferred_trim_retries_with_backoff() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    w.observe(s(1), 800 * MIB);
    assert!(w.should_trim(&settings, s(1)));
    let mut at = s(1);
    for step in [1, 2, 4, 8, 8] {
        w.trim_deferred(at);
        assert!(!w.should_trim(&settings, at + s(step) - Duration::from_millis(1)));
        assert!(
            w.should_trim(&settings, at + s(step)),
            "retry after {step}s"
        );
        at += s(step);
    }
    assert_eq!(w.deferrals(), 5);
    w.trimmed(at, 700 * MIB);
    assert_eq!(w.deferrals(), 0);
}

#[test]
fn memory_reason_needs_the_reading_after_a_trim_over_threshold() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    w.observe(s(1), 930 * MIB); // over the 921.6 MiB threshold, not trimmed yet
    assert_eq!(w.recycle_reason(&settings, s(1)), None);
    w.trimmed(s(1), 900 * MIB); // trimming helped
    assert_eq!(w.recycle_reason(&settings, s(1)), None);
    w.observe(s(15), 930 * MIB);
    w.trimmed(s(15), 925 * MIB); // no longer enough
    assert_eq!(
        w.recycle_reason(&settings, s(15)),
        Some(RecycleReason::Memory)
    );
    assert_eq!(w.waiting_since(&settings, s(20)), Some(s(15)));
    assert_eq!(RecycleReason::Memory.to_string(), "memory after trim");
}

#[test]
fn memory_reason_uses_the_plain_reading_when_trim_is_off_or_unavailable() {
    let settings = no_jitter();
    let off = Settings {
        trim: false,
        ..settings.clone()
    };
    let mut w = worker(&settings);
    w.observe(s(1), 930 * MIB);
    assert_eq!(w.recycle_reason(&off, s(1)), Some(RecycleReason::Memory));
    assert_eq!(w.recycle_reason(&settings, s(1)), None);
    w.trim_unavailable();
    assert!(!w.should_trim(&settings, s(1)));
    assert_eq!(
        w.recycle_reason(&settings, s(1)),
        Some(RecycleReason::Memory)
    );
}

#[test]
fn memory_reason_does_not_wait_forever_for_deferred_trims() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    w.observe(s(1), 930 * MIB);
    w.trim_deferred(s(1));
    assert_eq!(w.recycle_reason(&settings, s(20)), None);
    assert_eq!(
        w.recycle_reason(&settings, s(21)),
        Some(RecycleReason::Memory)
    );
    assert_eq!(w.waiting_since(&settings, s(30)), Some(s(21)));
}

#[test]
fn waiting_and_growing_worker_is_trimmed_harder() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    let mut ws = 910 * MIB;
    for t in 1..=10 {
        ws += 2 * MIB;
        w.observe(s(t), ws);
    }
    w.trimmed(s(10), ws - 100 * 1024); // ineffective, still over threshold
    assert_eq!(
        w.recycle_reason(&settings, s(10)),
        Some(RecycleReason::Memory)
    );
    for t in 11..=13 {
        ws += 2 * MIB;
        w.observe(s(t), ws);
    }
    // Urgent interval = 2.5 s, despite the disarming and the 10 s interval.
    assert!(w.should_trim(&settings, s(13)));
    // A waiting worker that does not grow is left alone.
    let mut flat = worker(&settings);
    for t in 1..=10 {
        flat.observe(s(t), 930 * MIB);
    }
    flat.trimmed(s(10), 930 * MIB);
    for t in 11..=20 {
        flat.observe(s(t), 930 * MIB);
    }
    assert_eq!(
        flat.recycle_reason(&settings, s(20)),
        Some(RecycleReason::Memory)
    );
    assert!(!flat.should_trim(&settings, s(20)));
}

#[test]
fn manual_and_reload_requests_wait_at_the_gate_like_the_rest() {
    let settings = Settings::default();
    let mut w = worker(&settings);
    w.request_recycle(RecycleReason::Reload, s(5));
    w.request_recycle(RecycleReason::Manual, s(6)); // the first request stands
    assert_eq!(
        w.recycle_reason(&settings, s(7)),
        Some(RecycleReason::Reload)
    );
    assert_eq!(w.waiting_since(&settings, s(7)), Some(s(5)));
}

#[test]
fn time_to_limit_projects_the_growth_underneath_a_trim_that_stays_released() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    assert_eq!(w.time_to_limit(s(0)), None);
    // 1 MiB/s from 500 MiB, with a trim of 50 MiB at t = 30 that is not reused.
    for t in 0..=170u64 {
        w.observe(
            s(t),
            500 * MIB + t * MIB - if t > 30 { 50 * MIB } else { 0 },
        );
        if t == 30 {
            w.trimmed(s(30), 480 * MIB);
        }
        if t == 60 {
            // One trim interval of lag behind the drop: the rate reads low at first.
            let rate = w.growth_rate(s(60)).unwrap() / MIB as f64;
            assert!((0.6..1.01).contains(&rate), "{rate}");
        }
    }
    // Once the trim's interval has left the window, the growth underneath again.
    let rate = w.growth_rate(s(170)).unwrap();
    assert!((rate / MIB as f64 - 1.0).abs() < 0.01, "{rate}");
    let ttl = w.time_to_limit(s(170)).unwrap().as_secs_f64();
    let expected = (GIB - (620 * MIB)) as f64 / MIB as f64;
    assert!((ttl - expected).abs() < 5.0, "{ttl} vs {expected}");
    // Flat: no projection.
    let mut flat = worker(&settings);
    for t in 0..=60 {
        flat.observe(s(t), 500 * MIB);
    }
    assert_eq!(flat.time_to_limit(s(60)), None);
    flat.observe(s(61), GIB);
    assert_eq!(flat.time_to_limit(s(61)), Some(Duration::ZERO));
}

#[test]
fn a_young_workers_start_up_surge_is_not_projected_on() {
    // bench/app.py's shape: 15 MiB, surging to a plateau near 85 MiB within ~30 s,
    // under a 96 MiB limit. A straight line through its young readings put the limit
    // seconds away (the lookahead then replaced it, again and again).
    let settings = no_jitter();
    let mut rng = StdRng::seed_from_u64(7);
    let mut w = WorkerPolicy::new(&settings, Some(96 * MIB), Duration::ZERO, &mut rng);
    let ws = |t: u64| ((15.0 + 70.0 * (1.0 - (-(t as f64) / 8.0).exp())) * MIB as f64) as u64;
    let mut ttls = vec![];
    for t in 0..=40u64 {
        w.observe(s(t), ws(t));
        ttls.push(w.time_to_limit(s(t)));
    }
    // Not yet ready (5 s) plus the minimum span: no projection at all.
    assert_eq!(ttls[12], None);
    let young = ttls[20].unwrap();
    assert!(young > Duration::from_secs(7), "{young:?}");
    // At the plateau: the recent half says it has all but stopped growing.
    assert!(
        ttls[40].is_none_or(|t| t > Duration::from_secs(30)),
        "{:?}",
        ttls[40]
    );
    // A steady leak keeps its projection: 1 MiB/s from 20 MiB.
    let mut leak = WorkerPolicy::new(&settings, Some(96 * MIB), Duration::ZERO, &mut rng);
    for t in 0..=40u64 {
        leak.observe(s(t), 20 * MIB + t * MIB);
    }
    let ttl = leak.time_to_limit(s(40)).unwrap().as_secs_f64();
    assert!((ttl - 36.0).abs() < 2.0, "{ttl}");
}

#[test]
fn noisy_readings_without_trims_are_not_growth() {
    // A plateau at 700 MiB with a large response's transient allocations on random
    // ticks (up to 150 MiB for a second): the envelope keeps dropping as spikes leave
    // it, and none of that is growth.
    let settings = no_jitter();
    let mut w = worker(&settings);
    let mut rng = StdRng::seed_from_u64(3);
    for t in 0..=300u64 {
        let spike = if rng.random_bool(0.3) {
            rng.random_range(0..150 * MIB)
        } else {
            0
        };
        w.observe(s(t), 700 * MIB + spike);
    }
    let rate = w.growth_rate(s(300)).unwrap() / MIB as f64;
    assert!(rate.abs() < 0.3, "{rate} MiB/s");
}

/// A worker at a plateau whose every trim releases 200 MiB that the next seconds of
/// requests touch again (a fragmented heap), every `trim_interval`.
fn refaulting(settings: &Settings, leak_per_s: u64, until: u64) -> WorkerPolicy {
    let mut w = worker(settings);
    let plateau = 800 * MIB;
    let mut refault = 0u64;
    for t in 0..=until {
        let ws = plateau + t * leak_per_s - refault;
        w.observe(s(t), ws);
        refault = refault.saturating_sub(50 * MIB);
        if t % 10 == 5 {
            refault = 200 * MIB;
            w.trimmed(s(t), ws - refault);
        }
    }
    w
}

#[test]
fn trims_whose_pages_are_touched_again_are_not_growth() {
    let settings = no_jitter();
    // Released 200 MiB per trim, 20 times: counted as growth, that would be 20 MiB/s
    // and a limit seconds away. It is a plateau.
    let w = refaulting(&settings, 0, 200);
    assert_eq!(w.growth_rate(s(200)), Some(0.0));
    assert_eq!(w.time_to_limit(s(200)), None);
    assert_eq!(w.released(), 20 * 200 * MIB);
    // The same heap leaking 1 MiB/s underneath: its peaks rise, and that is the growth.
    let w = refaulting(&settings, MIB, 200);
    let rate = w.growth_rate(s(200)).unwrap() / MIB as f64;
    assert!((0.8..1.2).contains(&rate), "{rate}");
}

#[test]
fn a_worker_back_over_its_threshold_within_a_trim_interval_recycles() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    let threshold = w.recycle_threshold().unwrap();
    // Over the threshold, trimmed below it, and back over it 3 s later.
    w.observe(s(100), threshold + 10 * MIB);
    w.trimmed(s(100), threshold - 100 * MIB);
    w.observe(s(101), threshold - 50 * MIB);
    assert_eq!(w.recycle_reason(&settings, s(101)), None);
    w.observe(s(103), threshold + MIB);
    assert_eq!(
        w.recycle_reason(&settings, s(103)),
        Some(RecycleReason::Memory)
    );
    assert_eq!(w.waiting_since(&settings, s(104)), Some(s(103)));
    // A later trim that keeps it under for a whole interval: no longer a candidate.
    w.trimmed(s(110), threshold - 100 * MIB);
    w.observe(s(115), threshold - 90 * MIB);
    assert!(
        w.recycle_reason(&settings, s(115)).is_some(),
        "not yet a whole interval"
    );
    w.observe(s(121), threshold - 80 * MIB);
    assert_eq!(w.recycle_reason(&settings, s(121)), None);
    // Back over it more than an interval after a trim: the ordinary path (wait for a
    // fresh trim to decide), not an immediate recycle.
    w.observe(s(125), threshold + MIB);
    assert_eq!(w.recycle_reason(&settings, s(125)), None);
}

#[test]
fn a_transient_between_two_readings_is_learned_from_the_groups_high_water_mark() {
    let settings = no_jitter();
    let mut w = worker(&settings);
    // A steady 1 MiB/s leak: the mark rises with the readings, nothing came and went.
    for t in 0..30u64 {
        let ws = (200 + t) * MIB;
        w.observe(s(t), ws);
        w.observe_peak(s(t), ws, ws);
    }
    assert_eq!(w.transient(s(30)), 0);
    // A 40 MiB report between the readings at 30 s and 31 s: no reading saw it, the
    // mark did.
    w.observe(s(31), 231 * MIB);
    w.observe_peak(s(31), 231 * MIB, 270 * MIB);
    assert_eq!(w.transient(s(31)), 39 * MIB);
    // A trim's release is no transient, even when the mark rose before it.
    let mut t = worker(&settings);
    for i in 0..30u64 {
        let ws = (200 + i) * MIB;
        t.observe(s(i), ws);
        t.observe_peak(s(i), ws, ws);
    }
    t.trimmed(s(30), 180 * MIB);
    t.observe(s(31), 181 * MIB);
    t.observe_peak(s(31), 181 * MIB, 232 * MIB);
    assert_eq!(t.transient(s(31)), 0);
}
