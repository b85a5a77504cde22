//! The watchdog (`--timeout`): when a worker counts as hung, how long it gets between the
//! timeout signal and SIGKILL, and how long to wait before replacing it.
//!
//! The protocol is systemd's `WatchdogSec=`: a worker gets `WATCHDOG_USEC` and must send
//! `WATCHDOG=1` on its notify socket at least that often. The clock starts when the worker
//! becomes ready (before that, `--ready-timeout` watches it), and every keep-alive restarts
//! it. The first hang of a healthy slot is replaced at once (the hung worker serves nothing:
//! waiting gains nothing); a worker that hangs again right after each start is replaced
//! after a growing, jittered delay (the slot's [`Backoff`]), so a broken deploy never turns
//! into a restart loop; the
//! delay starts over only once a worker kept its watchdog for
//! [`BACKOFF_RESET_AFTER`](super::BACKOFF_RESET_AFTER).

use std::time::Duration;

use rand::Rng;

use super::Backoff;

/// Shortest time between the timeout signal and SIGKILL.
pub const KILL_GRACE_MIN: Duration = Duration::from_millis(500);
/// Longest time between the timeout signal and SIGKILL.
pub const KILL_GRACE_MAX: Duration = Duration::from_secs(5);

/// When a worker that became ready at `ready_at` and last sent `WATCHDOG=1` at
/// `last_keepalive` (None: never) is overdue. Times are since any fixed origin.
///
/// A keep-alive sent while the worker was still starting does not shorten the first
/// interval: it starts at readiness.
pub fn overdue_at(
    timeout: Duration,
    ready_at: Duration,
    last_keepalive: Option<Duration>,
) -> Duration {
    last_keepalive.map_or(ready_at, |k| k.max(ready_at)) + timeout
}

/// True when the worker missed its watchdog at `now`.
pub fn is_overdue(
    timeout: Duration,
    ready_at: Duration,
    last_keepalive: Option<Duration>,
    now: Duration,
) -> bool {
    now >= overdue_at(timeout, ready_at, last_keepalive)
}

/// Time between the timeout signal and SIGKILL: half the timeout, within
/// [`KILL_GRACE_MIN`]..=[`KILL_GRACE_MAX`].
///
/// Why bounded this way: the signal's job is a last word (Python's faulthandler writes every
/// thread's stack in milliseconds, then the default action ends the process), so a few
/// seconds suffice even for a worker with hundreds of threads; a hung worker serves nothing,
/// so a long grace only keeps its memory and its held connections longer. gunicorn gives
/// about one turn of its main loop (~1 s); systemd gives `TimeoutAbortSec=` (90 s by default),
/// which is for services that write a core dump.
pub fn kill_grace(timeout: Duration) -> Duration {
    (timeout / 2).clamp(KILL_GRACE_MIN, KILL_GRACE_MAX)
}

/// Whether the replacement of a hung worker may start before the hung worker is gone
/// ("replacement first, where memory allows"): always without a pool budget; under one,
/// only when the pool's working set plus a start-up's cost stays within `room` (the
/// budget's reclaim line). Otherwise it starts once the hung worker is gone, which the
/// grace bounds to a few seconds.
pub fn replacement_first(room: Option<u64>, pool_usage: Option<u64>, start_cost: u64) -> bool {
    match (room, pool_usage) {
        (Some(room), Some(usage)) => usage.saturating_add(start_cost) <= room,
        _ => true,
    }
}

/// How long the worker kept its watchdog before it hung: from readiness to its last
/// keep-alive (zero if it never sent one).
pub fn kept_alive_for(ready_at: Duration, last_keepalive: Option<Duration>) -> Duration {
    last_keepalive.map_or(Duration::ZERO, |k| k.saturating_sub(ready_at))
}

/// Delay before the replacement of a worker that hung after keeping its watchdog for
/// `kept_alive` starts. The slot's backoff starts over if the worker had been healthy for
/// [`BACKOFF_RESET_AFTER`](super::BACKOFF_RESET_AFTER); then the first hang is replaced at
/// once (zero), and each further one after the slot's next backoff delay (equal jitter,
/// doubling from twice the base, capped).
///
/// Measured from keep-alives rather than from the worker's age, so that with a timeout
/// longer than [`BACKOFF_RESET_AFTER`](super::BACKOFF_RESET_AFTER) a worker that hangs at
/// every start still backs off.
pub fn replacement_delay(
    backoff: &mut Backoff,
    kept_alive: Duration,
    rng: &mut impl Rng,
) -> Duration {
    if kept_alive >= super::BACKOFF_RESET_AFTER {
        backoff.success();
    }
    let first = backoff.failures() == 0;
    let delay = backoff.failure(rng);
    if first { Duration::ZERO } else { delay }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BACKOFF_BASE, BACKOFF_CAP, BACKOFF_RESET_AFTER};
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn the_clock_starts_at_readiness_and_each_keepalive_restarts_it() {
        let t = 10 * S;
        let ready = 3 * S;
        // Never sent a keep-alive: overdue one timeout after readiness, not before.
        assert_eq!(overdue_at(t, ready, None), 13 * S);
        assert!(!is_overdue(
            t,
            ready,
            None,
            13 * S - Duration::from_nanos(1)
        ));
        assert!(is_overdue(t, ready, None, 13 * S));
        // A keep-alive while starting does not shorten the first interval.
        assert_eq!(overdue_at(t, ready, Some(S)), 13 * S);
        // Keep-alives push the deadline.
        assert_eq!(overdue_at(t, ready, Some(20 * S)), 30 * S);
        assert!(!is_overdue(t, ready, Some(20 * S), 29 * S));
        assert!(is_overdue(t, ready, Some(20 * S), 30 * S));
    }

    #[test]
    fn a_worker_pinging_at_half_the_timeout_is_never_overdue() {
        let t = 2 * S;
        let ready = S;
        let mut last = None;
        let mut now = ready;
        while now < 3600 * S {
            assert!(!is_overdue(t, ready, last, now), "at {now:?}");
            last = Some(now);
            now += t / 2;
        }
    }

    #[test]
    fn kill_grace_is_half_the_timeout_within_bounds() {
        assert_eq!(kill_grace(Duration::from_millis(100)), KILL_GRACE_MIN);
        assert_eq!(kill_grace(2 * S), S);
        assert_eq!(kill_grace(30 * S), KILL_GRACE_MAX);
        assert_eq!(kill_grace(24 * 3600 * S), KILL_GRACE_MAX);
    }

    #[test]
    fn the_replacement_goes_first_unless_it_would_not_fit_under_the_budget() {
        const M: u64 = 1 << 20;
        assert!(replacement_first(None, None, 50 * M));
        assert!(replacement_first(None, Some(900 * M), 50 * M));
        assert!(replacement_first(Some(1000 * M), None, 50 * M));
        assert!(replacement_first(Some(1000 * M), Some(950 * M), 50 * M));
        assert!(!replacement_first(Some(1000 * M), Some(951 * M), 50 * M));
        assert!(!replacement_first(Some(1000 * M), Some(u64::MAX), 1));
    }

    #[test]
    fn a_worker_that_hangs_at_every_start_is_backed_off_with_jitter() {
        let mut rng = StdRng::seed_from_u64(17);
        let mut a = Backoff::default();
        let mut b = Backoff::default();
        // Two slots whose workers never send a keep-alive.
        let da: Vec<Duration> = (0..12)
            .map(|_| replacement_delay(&mut a, kept_alive_for(S, None), &mut rng))
            .collect();
        let db: Vec<Duration> = (0..12)
            .map(|_| replacement_delay(&mut b, kept_alive_for(S, None), &mut rng))
            .collect();
        for d in [&da, &db] {
            // The first at once; then every delay within [e/2, e] for the doubling ceiling
            // e: never a tight loop.
            assert_eq!(d[0], Duration::ZERO);
            for (n, x) in d.iter().enumerate().skip(1) {
                let e = (BACKOFF_BASE * 2u32.pow(n as u32)).min(BACKOFF_CAP);
                assert!(
                    *x >= e / 2 && *x <= e,
                    "hang {n}: {x:?} not in [{:?}, {e:?}]",
                    e / 2
                );
            }
            assert!(d[11] >= BACKOFF_CAP / 2);
        }
        // Two slots hanging together are not replaced in lockstep.
        assert_eq!(da.iter().zip(&db).filter(|(x, y)| x != y).count(), 11);
    }

    #[test]
    fn backoff_starts_over_only_after_a_long_healthy_run() {
        let mut rng = StdRng::seed_from_u64(18);
        let mut b = Backoff::default();
        for _ in 0..6 {
            replacement_delay(&mut b, Duration::ZERO, &mut rng);
        }
        // A worker that lived long but never kept its watchdog (a timeout above
        // BACKOFF_RESET_AFTER) keeps backing off.
        let never = kept_alive_for(S, None);
        assert!(replacement_delay(&mut b, never, &mut rng) >= BACKOFF_BASE * 32);
        // One that kept it for long enough starts over: replaced at once, and the next
        // hang right after waits the first step again.
        let long = kept_alive_for(S, Some(S + BACKOFF_RESET_AFTER));
        assert_eq!(replacement_delay(&mut b, long, &mut rng), Duration::ZERO);
        let next = replacement_delay(&mut b, Duration::ZERO, &mut rng);
        assert!(next >= BACKOFF_BASE && next <= 2 * BACKOFF_BASE, "{next:?}");
    }
}
