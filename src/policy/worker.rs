//! Per-worker decisions: when to trim, when to ask for a recycle, how fast it grows.

use std::collections::VecDeque;
use std::fmt;
use std::time::Duration;

use rand::Rng;

use super::Settings;

/// Samples older than this are not used for the growth estimate.
pub const GROWTH_WINDOW: Duration = Duration::from_secs(120);
/// At most this many samples are kept (one per memory tick of ~1 s).
const GROWTH_SAMPLES: usize = 128;
/// A growth estimate needs samples spanning at least this long.
const GROWTH_MIN_SPAN: Duration = Duration::from_secs(5);
/// Growth below this many bytes per second is treated as no growth (allocator noise).
const GROWTH_NOISE: f64 = 1024.0;
/// The projection to the limit ([`WorkerPolicy::time_to_limit`]) needs readings since the
/// worker was ready spanning at least this long.
///
/// It fits them twice, over the whole [`GROWTH_WINDOW`] and over its recent half, and
/// takes the recent rate when it is under half the whole one. Why: a worker's memory
/// climbs fastest in its first seconds (imports, then caches filling with its first
/// requests: bench/app.py goes from 5 to 55 MiB in 4 s, then to 85 MiB in 30 s), and a
/// straight line through all of a young worker's readings projects that surge on and on. Projected so, every young
/// worker looked seconds from its limit, the lookahead replaced it, and its replacement
/// surged in turn: 4 benchmark workers lived 7 s each where their thresholds would have
/// let them live 30. Growth that slows down reads slower in the recent half; a steady
/// leak, what the lookahead is for, reads the same in both (and keeps the whole window's
/// estimate, which noise moves less).
pub const PROJECTION_MIN_SPAN: Duration = Duration::from_secs(10);

/// First retry of a deferred trim (no thread was parked in a safe syscall); doubles on
/// each further deferral, up to [`TRIM_RETRY_MAX`].
pub const TRIM_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest wait between two attempts of a deferred trim. Short on purpose: a busy worker
/// has few parked threads, and the next poll of its threads is cheap.
pub const TRIM_RETRY_MAX: Duration = Duration::from_secs(8);

/// A trim that released less than this fraction of the limit counts as ineffective and
/// disarms trimming (see [`Settings::trim_hysteresis`]).
const TRIM_EFFECTIVE: f64 = 0.01;

/// The highest recycle threshold a draw may produce (fraction of the limit): a threshold
/// at the limit itself could only be reached by an OOM kill.
const MAX_RECYCLE_FRACTION: f64 = 0.98;
/// The lowest recycle threshold a draw may produce.
const MIN_RECYCLE_FRACTION: f64 = 0.05;

/// Why a worker is recycled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub enum RecycleReason {
    /// Its working set stays at or above its recycle threshold even after a trim (or,
    /// with trimming off or unavailable, the plain reading is at or above it).
    Memory,
    /// It lived past its drawn lifetime.
    Lifetime,
    /// An operator asked for it (control socket).
    Manual,
    /// Part of a rolling reload (SIGHUP).
    Reload,
}

impl RecycleReason {
    /// Order among waiting workers with the same urgency: lower goes first.
    pub(crate) fn rank(self) -> u8 {
        match self {
            RecycleReason::Memory => 0,
            RecycleReason::Manual => 1,
            RecycleReason::Reload => 2,
            RecycleReason::Lifetime => 3,
        }
    }
}

impl fmt::Display for RecycleReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecycleReason::Memory => "memory after trim",
            RecycleReason::Lifetime => "lifetime",
            RecycleReason::Manual => "manual",
            RecycleReason::Reload => "reload",
        })
    }
}

/// The policy state of one worker, created when it is spawned.
///
/// Feed it every memory reading ([`observe`](Self::observe)) and the outcome of every
/// trim attempt ([`trimmed`](Self::trimmed), [`trim_deferred`](Self::trim_deferred),
/// [`trim_unavailable`](Self::trim_unavailable)); ask it [`should_trim`](Self::should_trim)
/// and [`recycle_reason`](Self::recycle_reason).
///
/// Trimming is armed when the worker starts. While the working set is at or above
/// `trim_at`, an armed worker is trimmed at most once per `trim_interval`. A trim that
/// lowered the working set by at least 1% of the limit keeps it armed (trimming pays
/// off); one that released less disarms it until the working set
/// - fell below `trim_at - trim_hysteresis` (a new episode), or
/// - grew by `trim_hysteresis` since that trim (new garbage to reclaim), or
/// - reached its recycle threshold (only a fresh trim can tell whether it must recycle).
///
/// A worker that waits for a recycle slot while still growing is trimmed regardless of
/// arming, every [`Settings::urgent_trim_interval`].
#[derive(Clone, Debug)]
pub struct WorkerPolicy {
    born: Duration,
    limit: Option<u64>,
    threshold: Option<u64>,
    lifetime: Option<Duration>,
    trim_at_bytes: Option<u64>,
    hysteresis_bytes: u64,

    last_ws: Option<u64>,
    /// Sum of bytes released by trims.
    released_total: u64,
    /// Readings (and trim results), oldest first: (when, bytes, the series the growth is
    /// fitted to there: see [`growth_rate`](Self::growth_rate)).
    samples: VecDeque<(Duration, u64, u64)>,
    /// The upper envelope at the latest sample, and the sum of the drops of it that trims
    /// caused (see [`growth_rate`](Self::growth_rate)).
    envelope: u64,
    envelope_drops: u64,
    /// Trims whose drop of the envelope is still to come: when, and how much each
    /// released.
    pending_drops: VecDeque<(Duration, u64)>,
    /// `Settings::trim_interval` at spawn: the span of the upper envelope the growth
    /// estimate is fitted to, and how long a trim must keep the worker under its
    /// threshold to count as keeping it there.
    hold: Duration,
    /// `born + Settings::ready_time`: readings before it are the app starting up, which
    /// the projection to the limit leaves out.
    warm_from: Duration,

    armed: bool,
    rearm_at: u64,
    last_trim_at: Option<Duration>,
    deferrals: u32,
    retry_at: Option<Duration>,
    unavailable: bool,
    trims: u64,

    /// When the plain reading went to or above the threshold (cleared when it is below).
    plain_over_since: Option<Duration>,
    /// When a trim left the worker at or above its threshold (cleared by a trim, or a
    /// reading, below it).
    trimmed_over_since: Option<Duration>,
    /// When the latest trim brought it below its threshold.
    under_after_trim: Option<Duration>,
    /// When it was back at or above its threshold less than `hold` after a trim had
    /// brought it below: trimming no longer keeps it under (cleared once a trim's effect
    /// lasts a whole `hold`).
    rebound_since: Option<Duration>,
    requested: Option<(RecycleReason, Duration)>,
    /// First generation only: where between the first reading once ready and the drawn
    /// threshold the threshold moves, and from when (see [`WorkerPolicy::new_initial`]).
    stagger: Option<(f64, Duration)>,
}

impl WorkerPolicy {
    /// A new worker spawned at `now`. `limit` is its hard memory limit in bytes; `None`
    /// (unknown) means memory never triggers a trim or a recycle.
    pub fn new(settings: &Settings, limit: Option<u64>, now: Duration, rng: &mut impl Rng) -> Self {
        let j = settings.recycle_jitter.abs();
        let fraction = if j > 0.0 {
            settings.recycle_at + rng.random_range(-j..=j)
        } else {
            settings.recycle_at
        }
        .clamp(MIN_RECYCLE_FRACTION, MAX_RECYCLE_FRACTION);
        let lifetime = settings.max_lifetime.map(|life| {
            let jitter = settings.lifetime_jitter.min(life / 2);
            if jitter.is_zero() {
                life
            } else {
                let j = jitter.as_nanos() as i128;
                let d = rng.random_range(-j..=j);
                Duration::from_nanos((life.as_nanos() as i128 + d).max(0) as u64)
            }
        });
        let of = |f: f64| limit.map(|l| (l as f64 * f.max(0.0)) as u64);
        Self {
            born: now,
            limit,
            threshold: of(fraction),
            lifetime,
            trim_at_bytes: of(settings.trim_at),
            hysteresis_bytes: of(settings.trim_hysteresis).unwrap_or(0),
            last_ws: None,
            released_total: 0,
            samples: VecDeque::with_capacity(GROWTH_SAMPLES),
            hold: settings.trim_interval,
            warm_from: now + settings.ready_time,
            envelope: 0,
            envelope_drops: 0,
            pending_drops: VecDeque::new(),
            armed: true,
            rearm_at: 0,
            last_trim_at: None,
            deferrals: 0,
            retry_at: None,
            unavailable: false,
            trims: 0,
            plain_over_since: None,
            trimmed_over_since: None,
            under_after_trim: None,
            rebound_since: None,
            requested: None,
            stagger: None,
        }
    }

    /// Like [`new`](Self::new), for a worker of the first generation: the pool's initial
    /// workers (or, after a rolling reload, a whole new generation) start together and,
    /// with the same code and traffic, leak alike; a ±5-point threshold jitter then
    /// spreads their first recycles over a fraction of one life only, and the recycles
    /// come in waves for many generations (each replacement starts when its predecessor
    /// ended). So the first generation's threshold is drawn uniformly between the
    /// worker's first reading once it should be ready (`now + ready_time`: before that
    /// the app is still importing and the reading says nothing about its base) and its
    /// normal threshold: its first recycle falls anywhere in one life, and every later
    /// generation (drawn with [`new`](Self::new)) inherits that phase. The cost is one
    /// early recycle per slot, once. An app that allocates much of its base lazily after
    /// `ready_time` makes some of these early recycles earlier than needed, never later.
    ///
    /// The drawn lifetime (with `--max-lifetime`) is shortened by the same fraction (to
    /// at least the recycle spacing), for the same reason.
    ///
    /// Use it for the workers spawned at pool start; optionally also for the replacements
    /// of a rolling reload (they too start within minutes of each other), at the price of
    /// a second early recycle per slot.
    pub fn new_initial(
        settings: &Settings,
        limit: Option<u64>,
        now: Duration,
        rng: &mut impl Rng,
    ) -> Self {
        let mut policy = Self::new(settings, limit, now, rng);
        let u = rng.random_range(0.0..1.0);
        policy.stagger = Some((u, now + settings.ready_time));
        policy.lifetime = policy
            .lifetime
            .map(|l| l.mul_f64(u).max(settings.spacing()));
        policy
    }

    /// Its drawn recycle threshold in bytes (`None` if the limit is unknown).
    pub fn recycle_threshold(&self) -> Option<u64> {
        self.threshold
    }

    /// Its drawn lifetime (`None` without `--max-lifetime`).
    pub fn lifetime(&self) -> Option<Duration> {
        self.lifetime
    }

    /// Its hard limit in bytes, as given at spawn.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// When it was spawned.
    pub fn born(&self) -> Duration {
        self.born
    }

    /// The latest working set seen (reading or after a trim).
    pub fn working_set(&self) -> Option<u64> {
        self.last_ws
    }

    /// Successful trims so far.
    pub fn trims(&self) -> u64 {
        self.trims
    }

    /// Bytes released by its trims so far.
    pub fn released(&self) -> u64 {
        self.released_total
    }

    /// Whether trimming was reported unavailable for it (musl, static allocator, ...).
    pub fn is_trim_unavailable(&self) -> bool {
        self.unavailable
    }

    /// A memory reading (every memory tick, ~1 s).
    pub fn observe(&mut self, now: Duration, working_set: u64) {
        if let Some((u, from)) = self.stagger
            && now >= from
        {
            self.stagger = None;
            if let Some(t) = self.threshold.filter(|t| working_set < *t) {
                self.threshold = Some(working_set + ((t - working_set) as f64 * u) as u64);
            }
        }
        self.record(now, working_set);
        if let Some(trim_at) = self.trim_at_bytes {
            if working_set < trim_at.saturating_sub(self.hysteresis_bytes) {
                self.armed = true;
                self.retry_at = None;
                self.deferrals = 0;
            } else if !self.armed && working_set >= self.rearm_at {
                self.armed = true;
            }
        }
    }

    /// Whether to trim it now.
    pub fn should_trim(&self, settings: &Settings, now: Duration) -> bool {
        if !settings.trim || self.unavailable {
            return false;
        }
        let (Some(ws), Some(trim_at)) = (self.last_ws, self.trim_at_bytes) else {
            return false;
        };
        if ws < trim_at {
            return false;
        }
        if let Some(retry) = self.retry_at {
            return now >= retry;
        }
        // Over the recycle threshold with no trim since crossing it: only a fresh trim can
        // decide the recycle, and the headroom to the hard limit may be seconds, so it
        // cannot wait a whole --trim-interval.
        let crossed = self.threshold.is_some_and(|t| ws >= t) && self.trimmed_over_since.is_none();
        let urgent = crossed
            || (self.is_waiting(settings, now) && self.growth_rate(now).is_some_and(|r| r > 0.0));
        if !self.armed && !urgent {
            return false;
        }
        let interval = if urgent {
            settings.urgent_trim_interval()
        } else {
            settings.trim_interval
        };
        self.last_trim_at.is_none_or(|t| now >= t + interval)
    }

    /// A trim ran at `now` and left `working_set_after`.
    pub fn trimmed(&mut self, now: Duration, working_set_after: u64) {
        let before = self.last_ws.unwrap_or(working_set_after);
        let released = before.saturating_sub(working_set_after);
        self.released_total += released;
        self.pending_drops.push_back((now, released));
        self.trims += 1;
        self.last_trim_at = Some(now);
        self.deferrals = 0;
        self.retry_at = None;
        let effective = self
            .limit
            .is_some_and(|l| released as f64 >= l as f64 * TRIM_EFFECTIVE);
        self.armed = effective;
        if !effective {
            let grown = working_set_after.saturating_add(self.hysteresis_bytes.max(1));
            self.rearm_at = match self.threshold {
                Some(t) if working_set_after < t => grown.min(t),
                _ => grown,
            };
        }
        // Marked before `record`, which measures rebounds from this trim; `record` clears
        // both "over" marks when the result is below the threshold.
        let over = self.threshold.is_some_and(|t| working_set_after >= t);
        self.under_after_trim = (!over).then_some(now);
        self.record(now, working_set_after);
        if over {
            self.trimmed_over_since.get_or_insert(now);
        }
    }

    /// A trim was attempted at `now` but deferred (no thread parked in a safe syscall).
    /// [`should_trim`](Self::should_trim) says yes again after 1 s, then 2 s, 4 s, 8 s,
    /// 8 s, ... (the interval does not apply to a retry), until a trim runs or the working
    /// set falls below `trim_at - trim_hysteresis`.
    pub fn trim_deferred(&mut self, now: Duration) {
        self.deferrals = self.deferrals.saturating_add(1);
        let step = (TRIM_RETRY_BASE * (1u32 << (self.deferrals - 1).min(10))).min(TRIM_RETRY_MAX);
        self.retry_at = Some(now + step);
    }

    /// Consecutive deferred trims (reset by a trim).
    pub fn deferrals(&self) -> u32 {
        self.deferrals
    }

    /// Trimming cannot work for this worker (no `malloc_trim` in its processes): from now
    /// on the plain reading decides recycling.
    pub fn trim_unavailable(&mut self) {
        self.unavailable = true;
        self.retry_at = None;
    }

    /// An operator (`Manual`) or a rolling reload (`Reload`) asks to recycle it. It goes
    /// through the same gate as memory and lifetime recycles.
    pub fn request_recycle(&mut self, reason: RecycleReason, now: Duration) {
        if self.requested.is_none() {
            self.requested = Some((reason, now));
        }
    }

    /// Why it should be recycled now, if it should.
    ///
    /// Memory: the working set after its latest trim is at or above its threshold; or it
    /// was back at or above it within one `trim_interval` of a trim that had brought it
    /// below (the released pages were touched again at once: trimming buys seconds, not
    /// room); or, with trimming off or unavailable, the plain reading is at or above it;
    /// or the plain reading has stayed at or above it for `2 × trim_interval` without a
    /// trim bringing it below (trims keep being deferred: do not wait for one forever).
    /// Several reasons: memory first, then manual, reload, lifetime.
    pub fn recycle_reason(&self, settings: &Settings, now: Duration) -> Option<RecycleReason> {
        self.reason_since(settings, now).map(|(r, _)| r)
    }

    /// Since when it has wanted to recycle (for [`super::Candidate::waiting_since`]).
    pub fn waiting_since(&self, settings: &Settings, now: Duration) -> Option<Duration> {
        self.reason_since(settings, now).map(|(_, t)| t)
    }

    fn is_waiting(&self, settings: &Settings, now: Duration) -> bool {
        self.reason_since(settings, now).is_some()
    }

    fn reason_since(
        &self,
        settings: &Settings,
        now: Duration,
    ) -> Option<(RecycleReason, Duration)> {
        if let Some(since) = self.memory_since(settings, now) {
            return Some((RecycleReason::Memory, since));
        }
        if let Some(req) = self.requested {
            return Some(req);
        }
        let end = self.born + self.lifetime?;
        (now >= end).then_some((RecycleReason::Lifetime, end))
    }

    fn memory_since(&self, settings: &Settings, now: Duration) -> Option<Duration> {
        if let Some(t) = self.trimmed_over_since.or(self.rebound_since) {
            return Some(t);
        }
        let since = self.plain_over_since?;
        if !settings.trim || self.unavailable {
            return Some(since);
        }
        let grace = settings.trim_interval * 2;
        (now >= since + grace).then_some(since + grace)
    }

    /// Projected time until the working set's peaks reach the hard limit: from the top
    /// of the last `trim_interval` of readings, at the growth rate of their upper
    /// envelope (as in [`growth_rate`](Self::growth_rate)) since it was ready, or of its
    /// recent half if growth clearly slowed down (see [`PROJECTION_MIN_SPAN`]).
    /// `None`: limit unknown, too young, or not growing. Zero: at or past the limit.
    pub fn time_to_limit(&self, now: Duration) -> Option<Duration> {
        let limit = self.limit?;
        let last = self.samples.back()?.0;
        let ws = self.envelope;
        if ws >= limit {
            return Some(Duration::ZERO);
        }
        let from = now.saturating_sub(GROWTH_WINDOW).max(self.warm_from);
        let whole = self.fit(from, PROJECTION_MIN_SPAN)?;
        let first = self.samples[self.samples.partition_point(|s| s.0 < from)].0;
        let recent = self.fit(first + (last - first) / 2, PROJECTION_MIN_SPAN / 2)?;
        // Only growth that clearly slowed down reads from the recent half: the lower of
        // two noisy estimates would err late for a steady leak.
        let rate = if recent < whole / 2.0 { recent } else { whole };
        if rate <= 0.0 {
            return None;
        }
        let elapsed = now.saturating_sub(last).as_secs_f64();
        let secs = ((limit - ws) as f64 / rate - elapsed).max(0.0);
        Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
    }

    /// The `memory.high` to set for it now (see [`super::memory_high_for`]);
    /// `expected_wait` is `None` when it is not waiting for a recycle slot.
    pub fn memory_high(&self, now: Duration, expected_wait: Option<Duration>) -> Option<u64> {
        super::memory_high_for(
            self.limit,
            self.threshold,
            self.last_ws?,
            self.time_to_limit(now),
            expected_wait,
        )
    }

    /// Growth in bytes per second, `None` if unknown; rates within allocator noise are
    /// reported as zero.
    ///
    /// A least-squares fit over the last [`GROWTH_WINDOW`] of the readings' upper envelope
    /// (each reading replaced by the highest one of the `trim_interval` before it), with
    /// the drops of that envelope that trims caused added back.
    ///
    /// Why: trims cut the working set into a saw-tooth, and what reaches the limit is its
    /// peaks. A fragmented heap (CPython's usual one) touches the pages a trim released
    /// again within seconds: its envelope does not drop, and its growth is what it still
    /// leaks, not what trims keep releasing. A trim whose release stays released (garbage
    /// that is not reused soon) lowers the envelope a `trim_interval` later, when the
    /// reading before the trim leaves it; that drop, up to what the trim released, is
    /// added back, so the fit follows the growth underneath (lagging by that one interval:
    /// right after such a trim the rate reads low, for at most one [`GROWTH_WINDOW`]).
    /// Other drops are the envelope of noisy readings moving on (a large response's
    /// transient allocations come and go), and are not growth. Workers trimmed every
    /// interval grow at their net rate, which is what the peaks do. (Adding back *every* released byte, as this estimate once did, counted each
    /// trim of a refaulting heap as new growth, projected the workers of a plateauing app
    /// to their limits in seconds, and had them replaced long before their thresholds:
    /// 77 recycles in 3 minutes of 4 benchmark workers, where gunicorn made 32.)
    pub fn growth_rate(&self, now: Duration) -> Option<f64> {
        self.fit(now.saturating_sub(GROWTH_WINDOW), GROWTH_MIN_SPAN)
    }

    /// The least-squares slope of the fitted series over the samples from `from` on, if
    /// they span at least `min_span`.
    fn fit(&self, from: Duration, min_span: Duration) -> Option<f64> {
        let start = self.samples.partition_point(|s| s.0 < from);
        let window = self.samples.range(start..);
        let n = window.len();
        if n < 2 {
            return None;
        }
        let t0 = self.samples[start].0;
        let span = self.samples.back()?.0.saturating_sub(t0);
        if span < min_span {
            return None;
        }
        let (w0, nf) = (self.samples[start].2 as f64, n as f64);
        let (mut st, mut sw, mut stt, mut stw) = (0.0, 0.0, 0.0, 0.0);
        for &(t, _, envelope) in window {
            let x = (t - t0).as_secs_f64();
            let y = envelope as f64 - w0;
            st += x;
            sw += y;
            stt += x * x;
            stw += x * y;
        }
        let den = nf * stt - st * st;
        if den <= 0.0 {
            return None;
        }
        let rate = (nf * stw - st * sw) / den;
        Some(if rate.abs() < GROWTH_NOISE { 0.0 } else { rate })
    }

    fn record(&mut self, now: Duration, ws: u64) {
        self.last_ws = Some(ws);
        if self.samples.len() == GROWTH_SAMPLES {
            self.samples.pop_front();
        }
        // A trim result right after a reading keeps that reading: it is the peak the
        // envelope needs. Only a clock that went back loses samples.
        while self.samples.back().is_some_and(|s| s.0 > now) {
            self.samples.pop_back();
        }
        let envelope = self
            .samples
            .iter()
            .rev()
            .take_while(|s| s.0 + self.hold >= now)
            .fold(ws, |top, s| top.max(s.1));
        // The readings before these trims have just left the envelope.
        let mut released = 0u64;
        while let Some(&(at, r)) = self.pending_drops.front()
            && now > at + self.hold
        {
            released = released.saturating_add(r);
            self.pending_drops.pop_front();
        }
        self.envelope_drops += self.envelope.saturating_sub(envelope).min(released);
        self.envelope = envelope;
        self.samples
            .push_back((now, ws, envelope.saturating_add(self.envelope_drops)));
        match self.threshold {
            Some(t) if ws >= t => {
                self.plain_over_since.get_or_insert(now);
                if self.under_after_trim.is_some_and(|at| now < at + self.hold) {
                    self.rebound_since.get_or_insert(now);
                }
            }
            _ => {
                self.plain_over_since = None;
                self.trimmed_over_since = None;
                if self
                    .under_after_trim
                    .is_some_and(|at| now >= at + self.hold)
                {
                    self.rebound_since = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
}
