//! Trim arming: whether a worker is trimmed now.
//!
//! Trimming is armed when the worker starts. While the working set is at or above
//! `trim_at`, an armed worker is trimmed at most once per `trim_interval`. A trim that
//! lowered the working set by at least 1% of the limit keeps it armed (trimming pays off);
//! one that released less disarms it until the working set
//! - fell below `trim_at - trim_hysteresis` (a new episode), or
//! - grew by `trim_hysteresis` since that trim (new garbage to reclaim), or
//! - reached its recycle threshold (only a fresh trim can tell whether it must recycle).
//!
//! An urgent trim (the worker crossed its recycle threshold, or waits for a recycle slot
//! while still growing) ignores arming and comes every
//! [`Settings::urgent_trim_interval`]. A deferred trim is retried with backoff.

use std::time::Duration;

use super::super::Settings;

/// First retry of a deferred trim (no thread was parked in a safe syscall); doubles on
/// each further deferral, up to [`TRIM_RETRY_MAX`].
pub const TRIM_RETRY_BASE: Duration = Duration::from_secs(1);
/// Longest wait between two attempts of a deferred trim. Short on purpose: a busy worker
/// has few parked threads, and the next poll of its threads is cheap.
pub const TRIM_RETRY_MAX: Duration = Duration::from_secs(8);

/// A trim that released less than this fraction of the limit counts as ineffective and
/// disarms trimming (see [`Settings::trim_hysteresis`]).
const TRIM_EFFECTIVE: f64 = 0.01;

/// The trim state of one worker.
#[derive(Clone, Debug)]
pub(super) struct TrimArming {
    trim_at: Option<u64>,
    hysteresis: u64,
    armed: bool,
    rearm_at: u64,
    last_trim_at: Option<Duration>,
    deferrals: u32,
    retry_at: Option<Duration>,
    unavailable: bool,
    trims: u64,
    /// Sum of bytes released by trims.
    released: u64,
    /// The working set the latest trim left.
    last_after: Option<u64>,
}

impl TrimArming {
    pub(super) fn new(trim_at: Option<u64>, hysteresis: u64) -> Self {
        Self {
            trim_at,
            hysteresis,
            armed: true,
            rearm_at: 0,
            last_trim_at: None,
            deferrals: 0,
            retry_at: None,
            unavailable: false,
            trims: 0,
            released: 0,
            last_after: None,
        }
    }

    pub(super) fn trims(&self) -> u64 {
        self.trims
    }

    pub(super) fn released(&self) -> u64 {
        self.released
    }

    pub(super) fn deferrals(&self) -> u32 {
        self.deferrals
    }

    pub(super) fn is_unavailable(&self) -> bool {
        self.unavailable
    }

    pub(super) fn trim_at(&self) -> Option<u64> {
        self.trim_at
    }

    pub(super) fn last_after(&self) -> Option<u64> {
        self.last_after
    }

    pub(super) fn last_trim_at(&self) -> Option<Duration> {
        self.last_trim_at
    }

    /// A reading: re-arm below the hysteresis band or after enough new growth.
    pub(super) fn observe(&mut self, working_set: u64) {
        if let Some(trim_at) = self.trim_at {
            if working_set < trim_at.saturating_sub(self.hysteresis) {
                self.armed = true;
                self.retry_at = None;
                self.deferrals = 0;
            } else if !self.armed && working_set >= self.rearm_at {
                self.armed = true;
            }
        }
    }

    /// Whether to trim now, at working set `ws`; `urgent` is asked only when it matters.
    /// `crossed`: it is at or over its recycle threshold with no trim since (a threshold
    /// may lie below `trim_at`: the first generation's are staggered down to the base),
    /// and only a trim can decide whether it must recycle.
    pub(super) fn due(
        &self,
        settings: &Settings,
        now: Duration,
        ws: Option<u64>,
        crossed: bool,
        urgent: impl FnOnce() -> bool,
    ) -> bool {
        if !settings.trim || self.unavailable {
            return false;
        }
        let (Some(ws), Some(trim_at)) = (ws, self.trim_at) else {
            return false;
        };
        if ws < trim_at && !crossed {
            return false;
        }
        if let Some(retry) = self.retry_at {
            return now >= retry;
        }
        let urgent = crossed || urgent();
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

    /// A trim ran at `now`, released `released` and left `after`; `limit` and `threshold`
    /// of the worker decide whether it was effective and when it re-arms.
    pub(super) fn trimmed(
        &mut self,
        now: Duration,
        released: u64,
        after: u64,
        limit: Option<u64>,
        threshold: Option<u64>,
    ) {
        self.released += released;
        self.last_after = Some(after);
        self.trims += 1;
        self.last_trim_at = Some(now);
        self.deferrals = 0;
        self.retry_at = None;
        let effective = limit.is_some_and(|l| released as f64 >= l as f64 * TRIM_EFFECTIVE);
        self.armed = effective;
        if !effective {
            let grown = after.saturating_add(self.hysteresis.max(1));
            self.rearm_at = match threshold {
                Some(t) if after < t => grown.min(t),
                _ => grown,
            };
        }
    }

    /// A trim was deferred at `now`: retry after 1 s, 2 s, 4 s, 8 s, 8 s, ...
    pub(super) fn deferred(&mut self, now: Duration) {
        self.deferrals = self.deferrals.saturating_add(1);
        let step = (TRIM_RETRY_BASE * (1u32 << (self.deferrals - 1).min(10))).min(TRIM_RETRY_MAX);
        self.retry_at = Some(now + step);
    }

    pub(super) fn set_unavailable(&mut self) {
        self.unavailable = true;
        self.retry_at = None;
    }
}
