//! `memory.high` for a worker that waits for its recycle slot (cgroup v2 only).
//!
//! The trade-off: above `memory.high` the kernel reclaims the worker's memory on every
//! allocation and, when that cannot keep up, sleeps the allocating task (up to ~2 s per
//! charge attempt). Requests of a throttled worker get slower (reclaim pressure,
//! latency spikes, possibly swap or page cache thrashing), but it keeps serving and
//! finishes its in-flight requests. At `memory.max` the OOM killer ends the worker and
//! every request it is serving. So throttling is used only when the projection says the
//! worker would otherwise reach its limit before its turn comes, and removed (`None`)
//! otherwise.

use std::time::Duration;

/// Extra margin on the expected wait: throttle when the projected time to the limit is
/// under `expected_wait × WAIT_MARGIN` (projections and waits are both rough).
pub const WAIT_MARGIN: f64 = 1.5;

/// The `memory.high` to set for a worker, `None` to leave (or reset it to) `max`.
///
/// - `limit`, `threshold`: its hard limit and drawn recycle threshold (bytes);
/// - `working_set`: latest reading; `time_to_limit`: [`super::WorkerPolicy::time_to_limit`];
/// - `expected_wait`: `None` if it is not waiting for a recycle slot, else how long until
///   its turn (e.g. [`super::RecycleGate::expected_wait`]).
///
/// When it waits and `time_to_limit < expected_wait × 1.5`, returns the midpoint between
/// threshold and limit, raised to the current working set (setting `memory.high` far below
/// usage would stall the worker in reclaim at once; at the working set it stops further
/// growth instead), but at most `limit - 1/8 of the gap between threshold and limit`, so
/// that the kernel starts throttling before the OOM killer is reached. Rounded down to a
/// 4 KiB page.
pub fn memory_high_for(
    limit: Option<u64>,
    threshold: Option<u64>,
    working_set: u64,
    time_to_limit: Option<Duration>,
    expected_wait: Option<Duration>,
) -> Option<u64> {
    let (limit, wait, ttl) = (limit?, expected_wait?, time_to_limit?);
    let threshold = threshold.unwrap_or(limit).min(limit);
    if ttl.as_secs_f64() >= wait.as_secs_f64() * WAIT_MARGIN {
        return None;
    }
    let gap = limit - threshold;
    let ceiling = limit - (gap / 8).max(1 << 20).min(limit / 16);
    let high = (threshold + gap / 2).max(working_set).min(ceiling);
    Some(high & !4095)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn no_memory_high_unless_waiting_and_short_of_time() {
        let (l, t) = (Some(GIB), Some(900 * MIB));
        assert_eq!(
            memory_high_for(l, t, 950 * MIB, Some(s(10)), None),
            None,
            "not waiting"
        );
        assert_eq!(
            memory_high_for(l, t, 950 * MIB, None, Some(s(60))),
            None,
            "not growing"
        );
        assert_eq!(
            memory_high_for(l, t, 950 * MIB, Some(s(600)), Some(s(60))),
            None
        );
        assert_eq!(
            memory_high_for(None, t, 950 * MIB, Some(s(1)), Some(s(60))),
            None
        );
    }

    #[test]
    fn memory_high_sits_between_threshold_and_limit() {
        let (l, t) = (Some(GIB), Some(900 * MIB));
        // Below the midpoint (962 MiB): the midpoint.
        assert_eq!(
            memory_high_for(l, t, 910 * MIB, Some(s(30)), Some(s(60))),
            Some(962 * MIB)
        );
        // Above it: the working set, so it stops growing rather than stalls.
        assert_eq!(
            memory_high_for(l, t, 990 * MIB, Some(s(30)), Some(s(60))),
            Some(990 * MIB)
        );
        // Never at the limit itself: the kernel must throttle before the OOM killer.
        let high = memory_high_for(l, t, GIB, Some(s(0)), Some(s(60))).unwrap();
        assert!((GIB - 16 * MIB..GIB).contains(&high), "{high}");
        assert_eq!(high % 4096, 0);
    }
}
