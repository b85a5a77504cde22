//! Restart delays: exponential backoff with jitter for crashing workers, and a jittered
//! delay for the replacement of an OOM-killed worker.

use std::time::Duration;

use rand::Rng;

/// Default first delay of [`Backoff`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// Default longest delay of [`Backoff`].
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// A worker that stayed up this long counts as healthy: the supervisor calls
/// [`Backoff::success`] and the next crash starts again from the base delay. Twice the
/// cap, so a worker that crashes right after each capped wait never looks healthy.
pub const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(60);

/// Shortest and longest delay of [`oom_restart_delay`].
pub const OOM_RESTART_MIN: Duration = Duration::from_millis(250);
pub const OOM_RESTART_MAX: Duration = Duration::from_millis(2500);

/// Exponential backoff with "equal jitter": the n-th consecutive failure waits
/// `e/2 + uniform(0, e/2)` with `e = min(cap, base × 2^(n-1))`.
///
/// Why equal rather than full jitter (`uniform(0, e)`): full jitter spreads best but may
/// draw ~0 even after many failures, so a crash loop could spin; equal jitter still
/// de-correlates workers that crash together (the random half) while the fixed half
/// guarantees the delay grows.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(BACKOFF_BASE, BACKOFF_CAP)
    }
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// Consecutive failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// The ceiling `e` of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let doublings = self.failures.min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.cap)
    }

    /// A worker failed: how long to wait before restarting it.
    pub fn failure(&mut self, rng: &mut impl Rng) -> Duration {
        let e = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = e / 2;
        let nanos = half.as_nanos() as u64;
        half + Duration::from_nanos(rng.random_range(0..=nanos))
    }

    /// The worker stayed up long enough (see [`BACKOFF_RESET_AFTER`]): start over.
    pub fn success(&mut self) {
        self.failures = 0;
    }

    /// A worker that had been up for `uptime` failed: [`success`](Self::success) first if
    /// that was at least [`BACKOFF_RESET_AFTER`], then [`failure`](Self::failure).
    pub fn failure_after(&mut self, uptime: Duration, rng: &mut impl Rng) -> Duration {
        if uptime >= BACKOFF_RESET_AFTER {
            self.success();
        }
        self.failure(rng)
    }
}

/// Delay before starting the replacement of an OOM-killed worker: uniform in
/// [`OOM_RESTART_MIN`]..=[`OOM_RESTART_MAX`]. Workers that hit their limits together
/// (one traffic spike) are thus not all replaced in the same instant, so their
/// replacements' start-ups do not compete for CPU and they do not grow in lockstep
/// toward the next OOM. The supervisor uses the larger of this and the worker's
/// [`Backoff`] delay when OOM kills repeat.
pub fn oom_restart_delay(rng: &mut impl Rng) -> Duration {
    let lo = OOM_RESTART_MIN.as_millis() as u64;
    let hi = OOM_RESTART_MAX.as_millis() as u64;
    Duration::from_micros(rng.random_range(lo * 1000..=hi * 1000))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn backoff_grows_within_equal_jitter_bounds_and_caps() {
        let mut rng = StdRng::seed_from_u64(11);
        let mut b = Backoff::default();
        for n in 0..20u32 {
            let e = (BACKOFF_BASE * 2u32.pow(n.min(20))).min(BACKOFF_CAP);
            let d = b.failure(&mut rng);
            assert!(
                d >= e / 2 && d <= e,
                "failure {n}: {d:?} not in [{:?}, {e:?}]",
                e / 2
            );
        }
        assert_eq!(b.failures(), 20);
        assert_eq!(b.ceiling(), BACKOFF_CAP);
    }

    #[test]
    fn backoff_is_jittered() {
        let mut rng = StdRng::seed_from_u64(12);
        let delays: Vec<Duration> = (0..50)
            .map(|_| {
                let mut b = Backoff::default();
                (0..5).map(|_| b.failure(&mut rng)).last().unwrap()
            })
            .collect();
        let distinct: std::collections::HashSet<_> = delays.iter().collect();
        assert!(distinct.len() > 45);
    }

    #[test]
    fn backoff_resets_after_success() {
        let mut rng = StdRng::seed_from_u64(13);
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
        for _ in 0..10 {
            b.failure(&mut rng);
        }
        b.success();
        assert_eq!(b.failures(), 0);
        assert!(b.failure(&mut rng) <= Duration::from_millis(100));
    }

    #[test]
    fn backoff_resets_when_the_worker_stayed_up() {
        let mut rng = StdRng::seed_from_u64(15);
        let mut b = Backoff::default();
        for _ in 0..6 {
            b.failure_after(Duration::from_secs(1), &mut rng);
        }
        assert_eq!(b.failures(), 6);
        let d = b.failure_after(BACKOFF_RESET_AFTER, &mut rng);
        assert!(d <= BACKOFF_BASE);
        assert_eq!(b.failures(), 1);
    }

    #[test]
    fn oom_restart_delays_are_bounded_and_spread() {
        let mut rng = StdRng::seed_from_u64(14);
        let mut delays: Vec<Duration> = (0..64).map(|_| oom_restart_delay(&mut rng)).collect();
        assert!(
            delays
                .iter()
                .all(|d| *d >= OOM_RESTART_MIN && *d <= OOM_RESTART_MAX)
        );
        delays.sort();
        // 64 simultaneous OOM kills: no two replacements start within the same millisecond.
        let min_gap = delays.windows(2).map(|w| w[1] - w[0]).min().unwrap();
        assert!(min_gap > Duration::ZERO, "{min_gap:?}");
        assert!(delays[63] - delays[0] > Duration::from_millis(1800));
    }
}
