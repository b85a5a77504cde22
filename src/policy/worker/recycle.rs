//! Recycle timing: the worker's drawn threshold and lifetime, and since when (and why) it
//! wants to be recycled.
//!
//! Memory: the working set after its latest trim is at or above its threshold; or it was
//! back at or above it within one `trim_interval` of a trim that had brought it below (the
//! released pages were touched again at once: trimming buys seconds, not room); or, with
//! trimming off or unavailable, the plain reading is at or above it; or the plain reading
//! has stayed at or above it for `2 × trim_interval` without a trim bringing it below
//! (trims keep being deferred: do not wait for one forever). Several reasons: memory
//! first, then manual, reload, lifetime.

use std::time::Duration;

use super::super::Settings;
use super::RecycleReason;

#[derive(Clone, Debug)]
pub(super) struct RecycleTiming {
    born: Duration,
    threshold: Option<u64>,
    lifetime: Option<Duration>,
    /// How long a trim must keep the worker under its threshold to count as keeping it
    /// there (`Settings::trim_interval` at spawn).
    hold: Duration,
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
    /// threshold the threshold moves, and from when (see
    /// [`super::WorkerPolicy::new_initial`]).
    stagger: Option<(f64, Duration)>,
}

impl RecycleTiming {
    pub(super) fn new(
        born: Duration,
        threshold: Option<u64>,
        lifetime: Option<Duration>,
        hold: Duration,
    ) -> Self {
        Self {
            born,
            threshold,
            lifetime,
            hold,
            plain_over_since: None,
            trimmed_over_since: None,
            under_after_trim: None,
            rebound_since: None,
            requested: None,
            stagger: None,
        }
    }

    pub(super) fn born(&self) -> Duration {
        self.born
    }

    pub(super) fn threshold(&self) -> Option<u64> {
        self.threshold
    }

    pub(super) fn lifetime(&self) -> Option<Duration> {
        self.lifetime
    }

    pub(super) fn stagger(&mut self, u: f64, from: Duration, min_lifetime: Duration) {
        self.stagger = Some((u, from));
        self.lifetime = self.lifetime.map(|l| l.mul_f64(u).max(min_lifetime));
    }

    /// Over the threshold with no trim since crossing it: only a fresh trim can decide.
    pub(super) fn crossed_untrimmed(&self, ws: u64) -> bool {
        self.threshold.is_some_and(|t| ws >= t) && self.trimmed_over_since.is_none()
    }

    /// A plain reading.
    pub(super) fn observe(&mut self, now: Duration, working_set: u64) {
        if let Some((u, from)) = self.stagger
            && now >= from
        {
            self.stagger = None;
            if let Some(t) = self.threshold.filter(|t| working_set < *t) {
                self.threshold = Some(working_set + ((t - working_set) as f64 * u) as u64);
            }
        }
        self.record(now, working_set);
    }

    /// A trim at `now` left `after`.
    pub(super) fn trimmed(&mut self, now: Duration, after: u64) {
        // Marked before `record`, which measures rebounds from this trim; `record` clears
        // both "over" marks when the result is below the threshold.
        let over = self.threshold.is_some_and(|t| after >= t);
        self.under_after_trim = (!over).then_some(now);
        self.record(now, after);
        if over {
            self.trimmed_over_since.get_or_insert(now);
        }
    }

    pub(super) fn request(&mut self, reason: RecycleReason, now: Duration) {
        if self.requested.is_none() {
            self.requested = Some((reason, now));
        }
    }

    /// Why and since when it wants to recycle; `plain_decides`: trimming is off or
    /// unavailable, so the plain reading decides memory recycles.
    pub(super) fn reason_since(
        &self,
        settings: &Settings,
        now: Duration,
        plain_decides: bool,
    ) -> Option<(RecycleReason, Duration)> {
        if let Some(since) = self.memory_since(settings, now, plain_decides) {
            return Some((RecycleReason::Memory, since));
        }
        if let Some(req) = self.requested {
            return Some(req);
        }
        let end = self.born + self.lifetime?;
        (now >= end).then_some((RecycleReason::Lifetime, end))
    }

    fn memory_since(
        &self,
        settings: &Settings,
        now: Duration,
        plain_decides: bool,
    ) -> Option<Duration> {
        if let Some(t) = self.trimmed_over_since.or(self.rebound_since) {
            return Some(t);
        }
        let since = self.plain_over_since?;
        if plain_decides {
            return Some(since);
        }
        let grace = settings.trim_interval * 2;
        (now >= since + grace).then_some(since + grace)
    }

    fn record(&mut self, now: Duration, ws: u64) {
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
