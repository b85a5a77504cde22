//! Per-worker decisions, in three state machines:
//!
//! - [`growth`]: how fast the worker grows and when its peaks reach the limit;
//! - [`trim`]: whether it is trimmed now (arming, hysteresis, intervals, retries);
//! - [`recycle`]: its drawn threshold and lifetime, and since when and why it wants to be
//!   recycled.
//!
//! [`WorkerPolicy`] feeds each reading and trim outcome to all three and answers the
//! supervisor's questions from them.

mod growth;
mod recycle;
mod trim;

use std::fmt;
use std::time::Duration;

use rand::Rng;

use super::Settings;
use growth::Growth;
use recycle::RecycleTiming;
use trim::TrimArming;

pub use growth::{GROWTH_WINDOW, IMMINENT_MIN_SPAN, IMMINENT_WINDOW, PROJECTION_MIN_SPAN};
pub use trim::{TRIM_RETRY_BASE, TRIM_RETRY_MAX};

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
    /// The pool nears its budget (`--pool-limit`) and this worker's replacement frees the
    /// most, whatever its own threshold.
    Budget,
    /// It lived past its drawn lifetime.
    Lifetime,
    /// An operator asked for it (control socket).
    Manual,
    /// Part of a rolling reload (SIGHUP).
    Reload,
    /// It missed its watchdog (`--timeout`): replaced at once, not through the gate.
    Timeout,
}

impl RecycleReason {
    /// Order among waiting workers with the same urgency: lower goes first.
    pub(crate) fn rank(self) -> u8 {
        match self {
            RecycleReason::Memory | RecycleReason::Budget | RecycleReason::Timeout => 0,
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
            RecycleReason::Budget => "pool budget",
            RecycleReason::Lifetime => "lifetime",
            RecycleReason::Manual => "manual",
            RecycleReason::Reload => "reload",
            RecycleReason::Timeout => "timeout",
        })
    }
}

/// The policy state of one worker, created when it is spawned.
///
/// Feed it every memory reading ([`observe`](Self::observe)) and the outcome of every
/// trim attempt ([`trimmed`](Self::trimmed), [`trim_deferred`](Self::trim_deferred),
/// [`trim_unavailable`](Self::trim_unavailable)); ask it [`should_trim`](Self::should_trim)
/// and [`recycle_reason`](Self::recycle_reason). How trimming is armed: see
/// `worker/trim.rs`; when memory asks for a recycle: `worker/recycle.rs`; how growth is
/// estimated: `worker/growth.rs`.
#[derive(Clone, Debug)]
pub struct WorkerPolicy {
    limit: Option<u64>,
    last_ws: Option<u64>,
    growth: Growth,
    trim: TrimArming,
    recycle: RecycleTiming,
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
            limit,
            last_ws: None,
            growth: Growth::new(settings.trim_interval, now + settings.ready_time),
            trim: TrimArming::new(
                of(settings.trim_at),
                of(settings.trim_hysteresis).unwrap_or(0),
            ),
            recycle: RecycleTiming::new(now, of(fraction), lifetime, settings.trim_interval),
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
        policy
            .recycle
            .stagger(u, now + settings.ready_time, settings.spacing());
        policy
    }

    /// Its drawn recycle threshold in bytes (`None` if the limit is unknown).
    pub fn recycle_threshold(&self) -> Option<u64> {
        self.recycle.threshold()
    }

    /// Its drawn lifetime (`None` without `--max-lifetime`).
    pub fn lifetime(&self) -> Option<Duration> {
        self.recycle.lifetime()
    }

    /// Its hard limit in bytes, as given at spawn.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// When it was spawned.
    pub fn born(&self) -> Duration {
        self.recycle.born()
    }

    /// The latest working set seen (reading or after a trim).
    pub fn working_set(&self) -> Option<u64> {
        self.last_ws
    }

    /// Successful trims so far.
    pub fn trims(&self) -> u64 {
        self.trim.trims()
    }

    /// Bytes released by its trims so far.
    pub fn released(&self) -> u64 {
        self.trim.released()
    }

    /// When it was last trimmed.
    pub fn last_trim_at(&self) -> Option<Duration> {
        self.trim.last_trim_at()
    }

    /// Whether trimming was reported unavailable for it (musl, static allocator, ...).
    pub fn is_trim_unavailable(&self) -> bool {
        self.trim.is_unavailable()
    }

    /// A memory reading (every memory tick, ~1 s).
    pub fn observe(&mut self, now: Duration, working_set: u64) {
        self.last_ws = Some(working_set);
        self.recycle.observe(now, working_set);
        self.growth.observe(now, working_set);
        self.trim.observe(working_set);
    }

    /// Its group's high-water mark `peak` beside its usage `current` (the same counter,
    /// page cache included), read with the reading at `now`: a transient that came and went
    /// between two readings shows as a rise of the mark (see `worker/growth.rs`).
    pub fn observe_peak(&mut self, now: Duration, current: u64, peak: u64) {
        self.growth.observe_peak(now, current, peak);
    }

    /// Whether to trim it now.
    pub fn should_trim(&self, settings: &Settings, now: Duration) -> bool {
        // Over the recycle threshold with no trim since crossing it: only a fresh trim can
        // decide the recycle, and the headroom to the hard limit may be seconds, so it
        // cannot wait a whole --trim-interval.
        let crossed = self
            .last_ws
            .is_some_and(|ws| self.recycle.crossed_untrimmed(ws));
        self.trim.due(settings, now, self.last_ws, crossed, || {
            self.is_waiting(settings, now) && self.growth_rate(now).is_some_and(|r| r > 0.0)
        })
    }

    /// A trim ran at `now` and left `working_set_after`.
    pub fn trimmed(&mut self, now: Duration, working_set_after: u64) {
        let before = self.last_ws.unwrap_or(working_set_after);
        let released = before.saturating_sub(working_set_after);
        self.growth.trimmed(now, released);
        self.trim.trimmed(
            now,
            released,
            working_set_after,
            self.limit,
            self.recycle.threshold(),
        );
        self.last_ws = Some(working_set_after);
        self.recycle.trimmed(now, working_set_after);
        self.growth.record(now, working_set_after);
    }

    /// A trim was attempted at `now` but deferred (no thread parked in a safe syscall).
    /// [`should_trim`](Self::should_trim) says yes again after 1 s, then 2 s, 4 s, 8 s,
    /// 8 s, ... (the interval does not apply to a retry), until a trim runs or the working
    /// set falls below `trim_at - trim_hysteresis`.
    pub fn trim_deferred(&mut self, now: Duration) {
        self.trim.deferred(now);
    }

    /// Consecutive deferred trims (reset by a trim).
    pub fn deferrals(&self) -> u32 {
        self.trim.deferrals()
    }

    /// Trimming cannot work for this worker (no `malloc_trim` in its processes): from now
    /// on the plain reading decides recycling.
    pub fn trim_unavailable(&mut self) {
        self.trim.set_unavailable();
    }

    /// An operator (`Manual`) or a rolling reload (`Reload`) asks to recycle it. It goes
    /// through the same gate as memory and lifetime recycles.
    pub fn request_recycle(&mut self, reason: RecycleReason, now: Duration) {
        self.recycle.request(reason, now);
    }

    /// Why it should be recycled now, if it should (see `worker/recycle.rs`).
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
        let plain_decides = !settings.trim || self.trim.is_unavailable();
        self.recycle.reason_since(settings, now, plain_decides)
    }

    /// Projected time until the working set's peaks reach the hard limit: from the top
    /// of the last `trim_interval` of readings, at the growth rate of their upper
    /// envelope (as in [`growth_rate`](Self::growth_rate)) since it was ready, or of its
    /// recent half if growth clearly slowed down (see [`PROJECTION_MIN_SPAN`]).
    /// `None`: limit unknown, too young, or not growing. Zero: at or past the limit.
    pub fn time_to_limit(&self, now: Duration) -> Option<Duration> {
        self.growth
            .time_to_limit(self.limit?, self.trim.trim_at(), now)
    }

    /// Projected time until its latest reading reaches the hard limit: at the growth rate
    /// of [`time_to_limit`](Self::time_to_limit) once that has one, before that at its
    /// growth of the last few seconds ([`IMMINENT_WINDOW`], from [`IMMINENT_MIN_SPAN`] of
    /// readings since it was ready on). Whether it must be stopped, or its replacement
    /// started past the gate, now (see [`super::PoolPolicy::decide`]). `None`: limit
    /// unknown, no reading yet, too young, or not growing.
    pub fn imminent_time_to_limit(&self, now: Duration) -> Option<Duration> {
        self.growth
            .imminent_time_to_limit(self.limit?, self.trim.trim_at(), self.last_ws?, now)
    }

    /// Its deadline for the recycle queue: [`time_to_limit`](Self::time_to_limit), or zero
    /// when a transient peak as large as `transient` (a request that allocates and frees
    /// tens of MiB: pass the largest seen, by this worker or by any worker of the same
    /// app) would no longer fit under its limit: the next such request may come at any
    /// moment. A worker plateaued just under its limit does not grow, so without this it
    /// would wait behind every worker that does.
    ///
    /// `eager`: project from two seconds of readings even far
    /// from the limit (for apps whose workers reach their limits sooner than a normal
    /// projection needs, see [`super::PoolPolicy`]).
    pub fn deadline(&self, now: Duration, transient: u64, eager: bool) -> Option<Duration> {
        let limit = self.limit?;
        let ws = self.last_ws?;
        let transient = transient.max(self.growth.transient(now));
        if transient > 0 && ws.saturating_add(transient) >= limit {
            return Some(Duration::ZERO);
        }
        let near = if eager { Some(0) } else { self.trim.trim_at() };
        self.growth.time_to_limit(limit, near, now)
    }

    /// Whether it is still young enough that [`time_to_limit`](Self::time_to_limit) may
    /// not project it yet for want of readings.
    pub fn is_young(&self, now: Duration) -> bool {
        self.growth.is_young(now)
    }

    /// The highest transient peak of the last hour, bytes.
    pub fn transient(&self, now: Duration) -> u64 {
        self.growth.transient(now)
    }

    /// The upper envelope of its readings (highest of the last `trim_interval`).
    pub fn peak(&self) -> u64 {
        self.growth.envelope()
    }

    /// What a trim could give back now, roughly: what it grew since its last trim's
    /// result (all of it if never trimmed).
    pub fn give_back(&self) -> u64 {
        let ws = self.last_ws.unwrap_or(0);
        ws.saturating_sub(self.trim.last_after().unwrap_or(0))
    }

    /// The `memory.high` to set for it now (see [`super::memory_high_for`]);
    /// `expected_wait` is `None` when it is not waiting for a recycle slot.
    pub fn memory_high(&self, now: Duration, expected_wait: Option<Duration>) -> Option<u64> {
        super::memory_high_for(
            self.limit,
            self.recycle.threshold(),
            self.last_ws?,
            self.time_to_limit(now),
            expected_wait,
        )
    }

    /// Growth in bytes per second, `None` if unknown; rates within allocator noise are
    /// reported as zero. A least-squares fit over the last [`GROWTH_WINDOW`] of the
    /// readings' upper envelope, with the drops of it that trims caused added back (see
    /// `worker/growth.rs`).
    pub fn growth_rate(&self, now: Duration) -> Option<f64> {
        self.growth.rate(now)
    }
}

#[cfg(test)]
mod tests;
