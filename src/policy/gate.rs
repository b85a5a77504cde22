//! Who may start recycling now: the concurrency cap, the spacing between starts, and the
//! order among waiting workers.

use std::cmp::Ordering;
use std::time::Duration;

use super::{RecycleReason, Settings};

/// A projected time to the limit beyond this is not urgent: a projection from a
/// two-minute window says little about hours ahead, so such workers are ordered like
/// workers that do not grow (by reason, then by waiting time).
pub const URGENT_HORIZON: Duration = Duration::from_secs(3600);

/// A worker that wants to recycle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The supervisor's worker slot.
    pub slot: usize,
    pub reason: RecycleReason,
    /// [`super::WorkerPolicy::time_to_limit`].
    pub time_to_limit: Option<Duration>,
    /// [`super::WorkerPolicy::waiting_since`].
    pub waiting_since: Duration,
}

impl Candidate {
    fn urgency(&self) -> Option<Duration> {
        self.time_to_limit.filter(|t| *t <= URGENT_HORIZON)
    }
}

/// Queue order: projected time to the limit (soonest first, within [`URGENT_HORIZON`]);
/// then the rest by reason (memory, manual, reload, lifetime); ties by waiting time
/// (longest first), then slot.
pub fn urgency_order(a: &Candidate, b: &Candidate) -> Ordering {
    let key = |c: &Candidate| {
        (
            c.urgency().unwrap_or(Duration::MAX),
            c.reason.rank(),
            c.waiting_since,
            c.slot,
        )
    };
    key(a).cmp(&key(b))
}

/// The recycle gate of the pool. It remembers the last start it admitted.
///
/// The configured spacing is a preference, the OOM killer is not: before each decision the
/// supervisor shows the gate every worker's projected time to its limit
/// ([`yield_to`](Self::yield_to)), and when one start per spacing could not replace them
/// all in time the gate shortens the spacing in force to the longest one that can (never
/// below a `ready_time`). `max_recycling` still holds, so the pool never replaces more
/// workers at once than it allows; only the pause *between* recycles shrinks, and only as
/// far as needed, so restarts stay spread as evenly as the demand permits.
#[derive(Clone, Debug)]
pub struct RecycleGate {
    max_recycling: usize,
    /// `Settings::spacing`.
    configured: Duration,
    /// The spacing in force: `configured`, or shorter while the pool is behind.
    spacing: Duration,
    ready: Duration,
    adaptive: bool,
    last_start: Option<Duration>,
}

impl RecycleGate {
    pub fn new(settings: &Settings) -> Self {
        Self {
            max_recycling: settings.max_recycling.max(1),
            configured: settings.spacing(),
            spacing: settings.spacing(),
            ready: settings.ready_time,
            adaptive: true,
            last_start: None,
        }
    }

    /// The same gate keeping the configured spacing whatever happens (for comparisons in
    /// simulations).
    pub fn strict_spacing(mut self) -> Self {
        self.adaptive = false;
        self
    }

    /// Follow changed settings (e.g. a `ready_time` updated from observed start-ups).
    pub fn update(&mut self, settings: &Settings) {
        self.max_recycling = settings.max_recycling.max(1);
        self.configured = settings.spacing();
        self.spacing = self.configured;
        self.ready = settings.ready_time;
    }

    /// Set the spacing in force from the projected times to the limit of the workers that
    /// may need a recycle (waiting or not): the configured spacing, or
    /// [`feasible_cadence`] when that is shorter, but at least one `ready_time`.
    pub fn yield_to(&mut self, times_to_limit: &[Duration]) {
        self.spacing = match feasible_cadence(times_to_limit, self.ready) {
            Some(c) if self.adaptive => c.max(self.ready).min(self.configured),
            _ => self.configured,
        };
    }

    /// The spacing in force.
    pub fn spacing(&self) -> Duration {
        self.spacing
    }

    /// The configured spacing (`--recycle-spacing` or derived).
    pub fn configured_spacing(&self) -> Duration {
        self.configured
    }

    /// When it last admitted a start.
    pub fn last_start(&self) -> Option<Duration> {
        self.last_start
    }

    /// The candidates' slots in the order they will be admitted.
    pub fn order(&self, candidates: &[Candidate]) -> Vec<usize> {
        let mut sorted = candidates.to_vec();
        sorted.sort_by(urgency_order);
        sorted.iter().map(|c| c.slot).collect()
    }

    /// Which waiting candidates may start now, most urgent first: none while
    /// `in_progress` recycles fill `max_recycling` or the last start is less than the
    /// spacing in force ago. The caller must start every slot returned (the gate counts
    /// them as started at `now`). With a non-zero spacing that is at most one slot per call.
    pub fn admit(
        &mut self,
        now: Duration,
        in_progress: usize,
        candidates: &[Candidate],
    ) -> Vec<usize> {
        if candidates.is_empty() || !self.is_open(now, in_progress) {
            return Vec::new();
        }
        let free = self.max_recycling - in_progress;
        let take = if self.spacing.is_zero() { free } else { 1 };
        let admitted: Vec<usize> = self.order(candidates).into_iter().take(take).collect();
        if !admitted.is_empty() {
            self.last_start = Some(now);
        }
        admitted
    }

    fn is_open(&self, now: Duration, in_progress: usize) -> bool {
        in_progress < self.max_recycling && self.last_start.is_none_or(|t| now >= t + self.spacing)
    }

    /// When the gate opens next, for the supervisor's timer: `now` if it is open, the end
    /// of the spacing if only that holds it shut, `None` if all recycle slots are busy
    /// (it reopens when one finishes, an event the supervisor sees anyway).
    pub fn next_opening(&self, now: Duration, in_progress: usize) -> Option<Duration> {
        if in_progress >= self.max_recycling {
            return None;
        }
        Some(self.last_start.map_or(now, |t| (t + self.spacing).max(now)))
    }

    /// Rough expected wait of the candidate at `position` (0 = next) in the queue, given
    /// that one recycle holds a slot for `recycle_duration` (replacement ready + drain).
    /// For [`super::memory_high_for`].
    pub fn expected_wait(
        &self,
        now: Duration,
        in_progress: usize,
        position: usize,
        recycle_duration: Duration,
    ) -> Duration {
        let per_start = self
            .spacing
            .max(recycle_duration / self.max_recycling as u32);
        let first = match self.next_opening(now, in_progress) {
            Some(t) => t.saturating_sub(now),
            // All slots busy: the earliest one frees within one recycle duration.
            None => recycle_duration.max(
                self.last_start
                    .map_or(Duration::ZERO, |t| (t + self.spacing).saturating_sub(now)),
            ),
        };
        first + per_start * position as u32
    }
}

/// The longest cadence at which starting recycles soonest-to-limit first, the first one
/// cadence from now and one more per cadence, has every replacement ready (`ready` after
/// its start) before its worker's limit: `min over k of (ttl_k - ready) / (k + 1)` with the
/// times sorted (the same one-cadence margin as [`behind_schedule`]). `None` without
/// projections.
pub fn feasible_cadence(times_to_limit: &[Duration], ready: Duration) -> Option<Duration> {
    let mut t = times_to_limit.to_vec();
    t.sort();
    t.iter()
        .enumerate()
        .map(|(k, ttl)| ttl.saturating_sub(ready) / (k as u32 + 1))
        .min()
}

/// Earliest-deadline lookahead. The gate starts at most one recycle per `spacing`, and a
/// worker must be replaced — its replacement ready — before it reaches its hard limit.
/// With the workers' projected times to their limits sorted soonest first, the k-th
/// (0-based) can start at the earliest `k × spacing` from now and is ready `ready` later;
/// one spacing is kept in hand. True when some worker would be late unless the most urgent
/// starts now, even below its threshold: workers that leak alike reach their thresholds
/// together, and only starting ahead of them keeps every one of them from the OOM killer.
pub fn behind_schedule(times_to_limit: &[Duration], spacing: Duration, ready: Duration) -> bool {
    let mut t = times_to_limit.to_vec();
    t.sort();
    t.iter()
        .enumerate()
        .any(|(k, ttl)| *ttl < spacing.saturating_mul(k as u32 + 1) + ready)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn c(slot: usize, reason: RecycleReason, ttl: Option<u64>, since: u64) -> Candidate {
        Candidate {
            slot,
            reason,
            time_to_limit: ttl.map(s),
            waiting_since: s(since),
        }
    }

    fn settings(max_recycling: usize, spacing: u64) -> Settings {
        Settings {
            max_recycling,
            recycle_spacing: Some(s(spacing)),
            ..Settings::default()
        }
    }

    #[test]
    fn admits_nothing_without_candidates_and_keeps_the_gate_open() {
        let mut gate = RecycleGate::new(&settings(1, 10));
        assert!(gate.admit(s(0), 0, &[]).is_empty());
        assert_eq!(gate.last_start(), None);
        assert_eq!(gate.next_opening(s(3), 0), Some(s(3)));
    }

    #[test]
    fn admits_at_most_max_recycling_in_progress() {
        let mut gate = RecycleGate::new(&settings(1, 10));
        let cands = [
            c(1, RecycleReason::Memory, None, 0),
            c(2, RecycleReason::Memory, None, 0),
        ];
        assert_eq!(gate.admit(s(0), 0, &cands), vec![1]);
        // Spacing over, but the one slot is still busy.
        assert!(gate.admit(s(60), 1, &cands[1..]).is_empty());
        assert_eq!(gate.next_opening(s(60), 1), None);
        assert_eq!(gate.admit(s(61), 0, &cands[1..]), vec![2]);
    }

    #[test]
    fn spaces_consecutive_starts() {
        let mut gate = RecycleGate::new(&settings(3, 10));
        let cands = [
            c(1, RecycleReason::Memory, None, 0),
            c(2, RecycleReason::Memory, None, 0),
        ];
        assert_eq!(gate.admit(s(100), 0, &cands), vec![1]);
        assert_eq!(gate.next_opening(s(101), 1), Some(s(110)));
        assert!(gate.admit(s(109), 1, &cands[1..]).is_empty());
        assert_eq!(gate.admit(s(110), 1, &cands[1..]), vec![2]);
    }

    #[test]
    fn spacing_in_force_shrinks_only_as_far_as_the_projections_need() {
        let secs = |v: &[u64]| v.iter().map(|x| s(*x)).collect::<Vec<_>>();
        assert_eq!(feasible_cadence(&[], s(1)), None);
        // Four workers 40-43 s from their limits, 1 s to get a replacement ready: one start
        // per 10.5 s serves them all (the 4th: 4 × 10.5 + 1 = 43).
        assert_eq!(
            feasible_cadence(&secs(&[43, 40, 42, 41]), s(1)),
            Some(Duration::from_millis(10_500))
        );
        let mut gate = RecycleGate::new(&settings(1, 60));
        gate.ready = s(1);
        gate.yield_to(&secs(&[40, 41, 42, 43]));
        assert_eq!(gate.spacing(), Duration::from_millis(10_500));
        assert_eq!(gate.configured_spacing(), s(60));
        gate.admit(s(100), 0, &[c(1, RecycleReason::Memory, Some(40), 0)]);
        assert_eq!(
            gate.next_opening(s(101), 0),
            Some(Duration::from_millis(110_500))
        );
        // Far from their limits: the configured spacing again.
        gate.yield_to(&secs(&[900, 1000]));
        assert_eq!(gate.spacing(), s(60));
        // Never below a ready time, never above the configured spacing.
        gate.yield_to(&secs(&[1, 1, 1]));
        assert_eq!(gate.spacing(), s(1));
        // max_recycling still holds.
        assert!(
            gate.admit(s(200), 1, &[c(2, RecycleReason::Memory, Some(1), 0)])
                .is_empty()
        );
        // Strict: the configured spacing whatever the projections.
        let mut strict = RecycleGate::new(&settings(1, 60)).strict_spacing();
        strict.yield_to(&secs(&[40, 41, 42, 43]));
        assert_eq!(strict.spacing(), s(60));
    }

    #[test]
    fn zero_spacing_admits_up_to_the_free_slots_at_once() {
        let mut gate = RecycleGate::new(&settings(2, 0));
        let cands = [
            c(1, RecycleReason::Memory, None, 0),
            c(2, RecycleReason::Memory, None, 0),
            c(3, RecycleReason::Memory, None, 0),
        ];
        assert_eq!(gate.admit(s(0), 0, &cands), vec![1, 2]);
        assert_eq!(gate.admit(s(0), 1, &cands[2..]), vec![3]);
    }

    #[test]
    fn most_urgent_goes_first_not_the_first_to_ask() {
        let mut gate = RecycleGate::new(&settings(1, 10));
        let cands = [
            c(1, RecycleReason::Memory, Some(900), 0),
            c(2, RecycleReason::Lifetime, Some(60), 50),
            c(3, RecycleReason::Memory, Some(120), 40),
        ];
        assert_eq!(gate.admit(s(100), 0, &cands), vec![2]);
        assert_eq!(gate.order(&cands), vec![2, 3, 1]);
    }

    #[test]
    fn non_urgent_candidates_go_by_reason_then_waiting_time() {
        let gate = RecycleGate::new(&settings(1, 10));
        let cands = [
            c(1, RecycleReason::Lifetime, None, 0),
            c(2, RecycleReason::Reload, None, 5),
            c(3, RecycleReason::Memory, None, 30),
            c(4, RecycleReason::Memory, Some(7200), 20), // beyond the horizon: not urgent
            c(5, RecycleReason::Reload, None, 1),
            c(6, RecycleReason::Manual, None, 9),
            c(7, RecycleReason::Memory, Some(3000), 99),
        ];
        assert_eq!(gate.order(&cands), vec![7, 4, 3, 6, 5, 2, 1]);
    }

    #[test]
    fn expected_wait_grows_with_the_queue_position() {
        let mut gate = RecycleGate::new(&settings(1, 10));
        gate.admit(s(0), 0, &[c(1, RecycleReason::Memory, None, 0)]);
        // Slot busy: first opening within one recycle duration (30 s), then one per 30 s.
        assert_eq!(gate.expected_wait(s(5), 1, 0, s(30)), s(30));
        assert_eq!(gate.expected_wait(s(5), 1, 2, s(30)), s(90));
        // Slot free, spacing ends at 10 s.
        assert_eq!(gate.expected_wait(s(5), 0, 1, s(8)), s(15));
    }

    #[test]
    fn lookahead_starts_early_only_when_the_queue_would_be_late() {
        let sp = Duration::from_secs(5);
        let ready = Duration::from_secs(1);
        let secs = |v: &[u64]| {
            v.iter()
                .map(|s| Duration::from_secs(*s))
                .collect::<Vec<_>>()
        };
        // Nobody close to the limit: wait for the thresholds.
        assert!(!behind_schedule(&secs(&[300, 400, 500]), sp, ready));
        assert!(!behind_schedule(&[], sp, ready));
        // One worker about to hit its limit: start it now.
        assert!(behind_schedule(&secs(&[4]), sp, ready));
        // Six workers leaking alike, 25 s from their limits: the sixth would start at 25 s.
        assert!(behind_schedule(&secs(&[25, 25, 26, 26, 27, 27]), sp, ready));
        // The same six spread over two minutes: each has its turn in time.
        assert!(!behind_schedule(
            &secs(&[10, 30, 50, 70, 90, 110]),
            sp,
            ready
        ));
    }
}
