//! The knobs of the policy, as plain validated data.
//!
//! The CLI layer turns `--trim-at 75%`, `--recycle-spacing 20s`, ... into a [`Settings`];
//! everything here is already a fraction or a [`Duration`].

use std::time::Duration;

/// Lower bound of the derived recycle spacing, see [`Settings::spacing`].
pub const MIN_DERIVED_SPACING: Duration = Duration::from_secs(5);

/// Policy settings shared by the whole pool.
///
/// Fractions are of the worker's hard memory limit (`memory.max`): `0.75` is 75%.
/// A worker keeps the byte thresholds derived from these at its spawn (so its drawn
/// recycle threshold and its trim band stay consistent for its whole life); switches and
/// intervals (`trim`, `trim_interval`, `max_recycling`, ...) are read live on every call.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Settings {
    /// `--trim on|off`: trim workers from outside at all.
    pub trim: bool,
    /// `--trim-at`: a worker whose working set reaches this fraction of its limit is trimmed.
    pub trim_at: f64,
    /// Hysteresis band below `trim_at` (fraction points). A trim that released (almost)
    /// nothing disarms trimming until the working set grew by this much again, crossed the
    /// recycle threshold, or fell below `trim_at - trim_hysteresis`.
    pub trim_hysteresis: f64,
    /// `--trim-interval`: minimum time between two trims of one worker.
    ///
    /// Default 10 s: the memory tick is 1 s, and a trim stops one thread of each process for
    /// as long as `malloc_trim` runs (a few ms, up to ~100 ms on a fragmented multi-GB heap),
    /// so 10 s keeps the worst case under 1% of a worker's time; a web worker leaking even
    /// 1 MB/s only grows by 10 MB (1% of a 1 GB limit) between two trims, well inside the
    /// default 15-point gap between `trim_at` and the recycle threshold.
    pub trim_interval: Duration,
    /// `--recycle-at`: mean recycle threshold (fraction of the limit).
    pub recycle_at: f64,
    /// `--recycle-jitter`: each worker draws its threshold uniformly in
    /// `recycle_at ± recycle_jitter` (fraction points), so identical workers do not all
    /// reach it at the same moment.
    pub recycle_jitter: f64,
    /// `--max-lifetime`: recycle a worker after about this long, whatever its memory.
    pub max_lifetime: Option<Duration>,
    /// `--lifetime-jitter`: each worker draws its lifetime uniformly in
    /// `max_lifetime ± lifetime_jitter` (the jitter is capped at half the lifetime).
    pub lifetime_jitter: Duration,
    /// `--max-recycling`: at most this many recycles in progress at any moment.
    pub max_recycling: usize,
    /// `--recycle-spacing`: minimum time between two recycle starts; `None` derives it
    /// from `ready_time` (see [`Settings::spacing`]).
    pub recycle_spacing: Option<Duration>,
    /// How long a new worker takes to become ready (configured, or observed by the
    /// supervisor: it may update this from measured `READY=1` times).
    pub ready_time: Duration,
    /// `--ready notify`: `ready_time` is only a first guess; the first measured start
    /// replaces it and measured starts decide from then on, faster or slower. Otherwise
    /// (`--ready delay:D`) no start can be ready sooner than the delay, which is a floor.
    pub ready_measured: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            trim: true,
            trim_at: 0.75,
            trim_hysteresis: 0.05,
            trim_interval: Duration::from_secs(10),
            recycle_at: 0.90,
            recycle_jitter: 0.05,
            max_lifetime: None,
            lifetime_jitter: Duration::from_secs(600),
            max_recycling: 1,
            recycle_spacing: None,
            ready_time: Duration::from_secs(5),
            ready_measured: false,
        }
    }
}

/// Settings that cannot work together, named by their flags.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum SettingsError {
    #[error("--trim-at must be above 0% and at most 100% of the limit, got {0:.1}%")]
    TrimAt(f64),
    #[error(
        "--trim-hysteresis must be at least 0 and below --trim-at ({trim_at:.1}%), got {hysteresis:.1} points"
    )]
    Hysteresis { hysteresis: f64, trim_at: f64 },
    #[error(
        "--recycle-at ± --recycle-jitter must stay within 0%..100% of the limit, got {low:.1}%..{high:.1}% (lower the jitter)"
    )]
    RecycleBand { low: f64, high: f64 },
    #[error(
        "--trim-at ({trim_at:.1}%) must be below the lowest recycle threshold ({low:.1}% = --recycle-at − --recycle-jitter), or trimming can never keep a worker from recycling (or pass --trim off)"
    )]
    TrimAboveRecycle { trim_at: f64, low: f64 },
    #[error("--trim-interval must be longer than 0s")]
    TrimInterval,
    #[error("--max-recycling must be at least 1")]
    MaxRecycling,
}

impl Settings {
    /// Check that the settings can work together (the CLI layer calls this once).
    pub fn validate(&self) -> Result<(), SettingsError> {
        let pct = |f: f64| f * 100.0;
        if !(self.trim_at > 0.0 && self.trim_at <= 1.0) {
            return Err(SettingsError::TrimAt(pct(self.trim_at)));
        }
        if !(self.trim_hysteresis >= 0.0 && self.trim_hysteresis < self.trim_at) {
            return Err(SettingsError::Hysteresis {
                hysteresis: pct(self.trim_hysteresis),
                trim_at: pct(self.trim_at),
            });
        }
        let (low, high) = (
            self.recycle_at - self.recycle_jitter.abs(),
            self.recycle_at + self.recycle_jitter.abs(),
        );
        if !(low > 0.0 && high < 1.0) {
            return Err(SettingsError::RecycleBand {
                low: pct(low),
                high: pct(high),
            });
        }
        if self.trim && self.trim_at >= low {
            return Err(SettingsError::TrimAboveRecycle {
                trim_at: pct(self.trim_at),
                low: pct(low),
            });
        }
        if self.trim_interval.is_zero() {
            return Err(SettingsError::TrimInterval);
        }
        if self.max_recycling == 0 {
            return Err(SettingsError::MaxRecycling);
        }
        Ok(())
    }

    /// The minimum time between two recycle starts.
    ///
    /// Explicit `recycle_spacing` wins. Otherwise `max(2 × ready_time, 5 s)`:
    /// - one `ready_time` lets the previous replacement become ready, so with the default
    ///   `max_recycling = 1` the pool never has two cold workers at once, and the second
    ///   `ready_time` lets it warm up (first requests, lazy imports, caches) and lets the
    ///   drained worker exit before the next replacement competes with it for CPU — Python
    ///   app start-up is CPU heavy, and several imports at once slow every serving worker;
    /// - the 5 s floor keeps apps that are "ready" instantly (or a `ready_time` of zero in a
    ///   config) from turning a queue of waiting workers into a burst of restarts.
    ///
    /// With 64 workers and the default 5 s ready time this is 10 s, i.e. up to 360
    /// recycles an hour, far above the demand of workers that live for hours.
    pub fn spacing(&self) -> Duration {
        self.recycle_spacing
            .unwrap_or_else(|| (self.ready_time * 2).max(MIN_DERIVED_SPACING))
    }

    /// The shorter trim interval of a worker that waits for a recycle slot while still
    /// growing: a quarter of `trim_interval`, at least 1 s (the memory tick).
    pub fn urgent_trim_interval(&self) -> Duration {
        (self.trim_interval / 4).max(Duration::from_secs(1))
    }
}

/// How many start-ups [`ready_time`] looks back on.
pub const READY_SAMPLES: usize = 8;

/// The ready time the policy plans with, from measured start-ups (`--ready notify`): the
/// slowest of the recent ones, so a recycle is never planned as faster than the last slow
/// start-up; zero without samples.
pub fn ready_time(samples: impl Iterator<Item = Duration>) -> Duration {
    samples.max().unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_time_is_the_slowest_recent_start_up() {
        let ms = Duration::from_millis;
        assert_eq!(
            ready_time([ms(800), ms(3100), ms(1200)].into_iter()),
            ms(3100)
        );
        assert_eq!(ready_time(std::iter::empty()), Duration::ZERO);
    }

    #[test]
    fn spacing_is_derived_from_ready_time_with_a_floor() {
        let mut s = Settings::default();
        assert_eq!(s.spacing(), Duration::from_secs(10));
        s.ready_time = Duration::from_millis(500);
        assert_eq!(s.spacing(), MIN_DERIVED_SPACING);
        s.ready_time = Duration::from_secs(30);
        assert_eq!(s.spacing(), Duration::from_secs(60));
        s.recycle_spacing = Some(Duration::from_secs(3));
        assert_eq!(s.spacing(), Duration::from_secs(3));
    }

    #[test]
    fn defaults_are_valid_and_bad_combinations_are_named() {
        assert_eq!(Settings::default().validate(), Ok(()));
        let bad = |f: fn(&mut Settings)| {
            let mut s = Settings::default();
            f(&mut s);
            s.validate().unwrap_err().to_string()
        };
        assert!(bad(|s| s.trim_at = 0.0).starts_with("--trim-at"));
        assert!(bad(|s| s.trim_hysteresis = 0.8).starts_with("--trim-hysteresis"));
        assert!(bad(|s| s.recycle_jitter = 0.2).contains("lower the jitter"));
        assert!(bad(|s| s.trim_at = 0.86).contains("--trim off"));
        assert!(bad(|s| s.max_recycling = 0).starts_with("--max-recycling"));
        assert!(bad(|s| s.trim_interval = Duration::ZERO).starts_with("--trim-interval"));
        let mut off = Settings {
            trim: false,
            trim_at: 0.95,
            ..Settings::default()
        };
        assert_eq!(off.validate(), Ok(()));
        off.recycle_at = f64::NAN;
        assert!(off.validate().is_err());
    }

    #[test]
    fn urgent_trim_interval_is_shorter_but_not_below_the_tick() {
        let mut s = Settings::default();
        assert_eq!(s.urgent_trim_interval(), Duration::from_millis(2500));
        s.trim_interval = Duration::from_secs(2);
        assert_eq!(s.urgent_trim_interval(), Duration::from_secs(1));
    }
}
