//! Growth estimation: how fast a worker's working set grows, and when its peaks will reach
//! the hard limit.
//!
//! Trims cut the working set into a saw-tooth, and what reaches the limit is its peaks. So
//! the estimate is fitted to the readings' upper envelope (each reading replaced by the
//! highest one of the `trim_interval` before it), not to the readings themselves:
//!
//! - A fragmented heap (CPython's usual one) touches the pages a trim released again
//!   within seconds: its envelope does not drop, and its growth is what it still leaks, not
//!   what trims keep releasing. Counting every released byte as growth would project a
//!   plateauing worker to its limit within seconds of each trim.
//! - A trim whose release stays released (garbage that is not reused soon) lowers the
//!   envelope one `trim_interval` later, when the reading before the trim leaves it; that
//!   drop, up to what the trim released, is added back, so the fit follows the growth
//!   underneath (lagging by that one interval: right after such a trim the rate reads low,
//!   for at most one [`GROWTH_WINDOW`]).
//! - Other drops are the envelope of noisy readings moving on (a large response's
//!   transient allocations come and go), and are not growth: adding back every drop would
//!   ratchet upwards on noise.
//!
//! Workers trimmed every interval grow at their net rate, which is what the peaks do.

use std::collections::VecDeque;
use std::time::Duration;

/// Samples older than this are not used for the growth estimate.
pub const GROWTH_WINDOW: Duration = Duration::from_secs(120);
/// At most this many samples are kept (one per memory tick of ~1 s).
const GROWTH_SAMPLES: usize = 128;
/// A growth estimate needs samples spanning at least this long.
const GROWTH_MIN_SPAN: Duration = Duration::from_secs(5);
/// Transient peaks are remembered this long: requests that allocate and free tens of MiB
/// may come minutes apart, and the next one is as large as the last.
pub const TRANSIENT_WINDOW: Duration = Duration::from_secs(3600);
/// Growth below this many bytes per second is treated as no growth (allocator noise).
const GROWTH_NOISE: f64 = 1024.0;
/// The projection to the limit (`WorkerPolicy::time_to_limit`) needs readings since the
/// worker was ready spanning at least this long.
///
/// It fits them twice, over the whole [`GROWTH_WINDOW`] and over its recent half, and
/// takes the recent rate when it is under half the whole one. Why: a worker's memory
/// climbs fastest in its first seconds (imports, then caches filling with its first
/// requests), and a straight line through all of a young worker's readings projects that
/// surge on and on, so every young worker would look seconds from its limit and be
/// replaced by a replacement that surges in turn. Growth that slows down reads slower in
/// the recent half; a steady leak reads the same in both (and keeps the whole window's
/// estimate, which noise moves less).
pub const PROJECTION_MIN_SPAN: Duration = Duration::from_secs(10);
/// Near its limit (from `trim_at`), a projection needs readings
/// spanning only this long: a worker leaking 10 MiB/s under a 96 MiB limit lives about 8 s,
/// and waiting for [`PROJECTION_MIN_SPAN`] of readings would leave it to the OOM killer.
pub const NEAR_MIN_SPAN: Duration = Duration::from_secs(2);
/// The imminent projection (`WorkerPolicy::imminent_time_to_limit`) fits the readings of the
/// last this long: what the worker does now, not what it did over minutes.
pub const IMMINENT_WINDOW: Duration = Duration::from_secs(4);
/// ... once they span at least this long, however young the worker.
pub const IMMINENT_MIN_SPAN: Duration = Duration::from_secs(1);

/// The readings of one worker and the growth fitted to them.
#[derive(Clone, Debug)]
pub(super) struct Growth {
    /// Readings (and trim results), oldest first: (when, bytes, the series the growth is
    /// fitted to there: the upper envelope plus the trim-caused drops so far).
    samples: VecDeque<(Duration, u64, u64)>,
    /// The upper envelope at the latest sample.
    envelope: u64,
    /// The sum of the drops of the envelope that trims caused.
    envelope_drops: u64,
    /// Trims whose drop of the envelope is still to come: when, and how much each
    /// released.
    pending_drops: VecDeque<(Duration, u64)>,
    /// The span of the upper envelope (`Settings::trim_interval` at spawn).
    hold: Duration,
    /// `born + Settings::ready_time`: readings before it are the app starting up, which
    /// the projection to the limit leaves out.
    warm_from: Duration,
    /// Transient peaks (how far a reading fell below the recent top, see `note_spike`) of
    /// the last [`TRANSIENT_WINDOW`]: when, and how high. A request that allocates tens of MiB and
    /// frees them shows as such a peak, and the next one may come at any time.
    spikes: VecDeque<(Duration, u64)>,
    /// The plain readings of the last `hold` since the latest trim (a trim's drop is no
    /// transient).
    readings: VecDeque<(Duration, u64)>,
    /// The group's high-water mark at the previous reading (see `observe_peak`), and
    /// whether a trim ran since.
    last_peak: Option<u64>,
    trimmed_since_peak: bool,
}

impl Growth {
    pub(super) fn new(hold: Duration, warm_from: Duration) -> Self {
        Self {
            samples: VecDeque::with_capacity(GROWTH_SAMPLES),
            envelope: 0,
            envelope_drops: 0,
            pending_drops: VecDeque::new(),
            hold,
            warm_from,
            spikes: VecDeque::new(),
            readings: VecDeque::new(),
            last_peak: None,
            trimmed_since_peak: false,
        }
    }

    /// A trim at `now` released `released` bytes (its drop of the envelope comes later).
    pub(super) fn trimmed(&mut self, now: Duration, released: u64) {
        self.pending_drops.push_back((now, released));
        self.readings.clear();
        self.trimmed_since_peak = true;
    }

    /// The group's high-water mark (`peak`: v1 `memory.max_usage_in_bytes`, v2
    /// `memory.peak`) beside its current usage (the same counter) at `now`. A request that
    /// allocates tens of MiB and frees them within a second falls between two readings;
    /// the high-water mark keeps it. When the mark rose since the previous reading and the
    /// usage is back below it, that much came and went: a transient peak, remembered as
    /// one seen by the readings is. Not across a trim (its release is no transient), and
    /// only the rises of an all-time mark: a transient below the worker's old top is not
    /// seen this way (the largest one seen is what counts, and it is kept an hour).
    pub(super) fn observe_peak(&mut self, now: Duration, current: u64, peak: u64) {
        let rose = self.last_peak.is_some_and(|p| peak > p);
        let trimmed = std::mem::replace(&mut self.trimmed_since_peak, false);
        self.last_peak = Some(peak);
        if !rose || trimmed || now < self.warm_from {
            return;
        }
        let height = peak.saturating_sub(current);
        if height > 0 {
            self.push_spike(now, height);
        }
    }

    fn push_spike(&mut self, now: Duration, height: u64) {
        // Keep only peaks that a later, higher one does not dominate.
        while self.spikes.back().is_some_and(|s| s.1 <= height) {
            self.spikes.pop_back();
        }
        self.spikes.push_back((now, height));
    }

    /// A plain reading of `ws` bytes at `now`.
    pub(super) fn observe(&mut self, now: Duration, ws: u64) {
        self.record(now, ws);
        self.note_spike(now, ws);
    }

    /// A reading (or a trim's result) of `ws` bytes at `now`.
    pub(super) fn record(&mut self, now: Duration, ws: u64) {
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
    }

    /// A reading below the highest plain reading of the last `hold` since the latest
    /// trim: by how much, a transient allocation that came and went (a peak above the
    /// reading that follows it, however many readings it spanned).
    fn note_spike(&mut self, now: Duration, ws: u64) {
        while self
            .spikes
            .front()
            .is_some_and(|s| s.0 + TRANSIENT_WINDOW < now)
        {
            self.spikes.pop_front();
        }
        while self.readings.front().is_some_and(|r| r.0 + self.hold < now) {
            self.readings.pop_front();
        }
        let top = self.readings.iter().map(|r| r.1).max().unwrap_or(0);
        self.readings.push_back((now, ws));
        let height = top.saturating_sub(ws);
        if height > 0 {
            self.push_spike(now, height);
        }
    }

    /// The highest transient peak of the last [`TRANSIENT_WINDOW`] (0 if none).
    pub(super) fn transient(&self, now: Duration) -> u64 {
        self.spikes
            .iter()
            .filter(|s| s.0 + TRANSIENT_WINDOW >= now)
            .map(|s| s.1)
            .max()
            .unwrap_or(0)
    }

    /// The latest reading's upper envelope (highest reading of the last `hold`).
    pub(super) fn envelope(&self) -> u64 {
        self.envelope
    }

    /// Readings since it was ready span less than [`PROJECTION_MIN_SPAN`].
    pub(super) fn is_young(&self, now: Duration) -> bool {
        now < self.warm_from + PROJECTION_MIN_SPAN
    }

    /// Growth in bytes per second over the last [`GROWTH_WINDOW`] (see the module docs).
    pub(super) fn rate(&self, now: Duration) -> Option<f64> {
        self.fit(now.saturating_sub(GROWTH_WINDOW), GROWTH_MIN_SPAN)
    }

    /// Projected time until the envelope reaches `limit` (see
    /// [`super::WorkerPolicy::time_to_limit`]). From `near` bytes on, readings spanning
    /// [`NEAR_MIN_SPAN`] suffice.
    pub(super) fn time_to_limit(
        &self,
        limit: u64,
        near: Option<u64>,
        now: Duration,
    ) -> Option<Duration> {
        let last = self.samples.back()?.0;
        let ws = self.envelope;
        if ws >= limit {
            return Some(Duration::ZERO);
        }
        let rate = self.projection_rate(near, now)?;
        if rate <= 0.0 {
            return None;
        }
        let elapsed = now.saturating_sub(last).as_secs_f64();
        let secs = ((limit - ws) as f64 / rate - elapsed).max(0.0);
        Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
    }

    /// The growth rate the projection to the limit uses (see
    /// [`super::WorkerPolicy::time_to_limit`]); `None` until readings since it was ready
    /// span [`PROJECTION_MIN_SPAN`] ([`NEAR_MIN_SPAN`] from `near` bytes on).
    fn projection_rate(&self, near: Option<u64>, now: Duration) -> Option<f64> {
        let last = self.samples.back()?.0;
        let span = if near.is_some_and(|n| self.envelope >= n) {
            NEAR_MIN_SPAN
        } else {
            PROJECTION_MIN_SPAN
        };
        let from = now.saturating_sub(GROWTH_WINDOW).max(self.warm_from);
        let whole = self.fit(from, span)?;
        let first = self.samples[self.samples.partition_point(|s| s.0 < from)].0;
        let recent = self.fit(first + (last - first) / 2, span / 2)?;
        // Only growth that clearly slowed down reads from the recent half: the lower of
        // two noisy estimates would err late for a steady leak.
        Some(if recent < whole / 2.0 { recent } else { whole })
    }

    /// Projected time until the plain working set `ws` reaches `limit`, for the
    /// emergencies: at the projection's own rate once it has one (see
    /// [`Self::projection_rate`]: fitted over minutes, a transient request's step barely
    /// moves it), before that at the growth of the last [`IMMINENT_WINDOW`] of readings
    /// since it was ready (from [`IMMINENT_MIN_SPAN`] of them on): the first seconds of a
    /// young worker, e.g. of the first generation, which has no growth history. From the
    /// plain reading, not the envelope: right after a trim that released much, the
    /// worker is as far from its ceiling as the reading says.
    pub(super) fn imminent_time_to_limit(
        &self,
        limit: u64,
        near: Option<u64>,
        ws: u64,
        now: Duration,
    ) -> Option<Duration> {
        if ws >= limit {
            return Some(Duration::ZERO);
        }
        let last = self.samples.back()?.0;
        let from = now.saturating_sub(IMMINENT_WINDOW).max(self.warm_from);
        let rate = match self.projection_rate(near, now) {
            Some(rate) => rate,
            None => self.fit(from, IMMINENT_MIN_SPAN)?,
        };
        if rate <= 0.0 {
            return None;
        }
        let elapsed = now.saturating_sub(last).as_secs_f64();
        let secs = ((limit - ws) as f64 / rate - elapsed).max(0.0);
        Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
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
}
