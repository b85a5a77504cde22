//! Pure decisions of the pool: when to trim a worker, when it should be recycled, who may
//! recycle now, how long to wait before a restart.
//!
//! Nothing here touches the kernel or a clock. Time is a [`Duration`](std::time::Duration)
//! since the pool started ("now"), randomness is a `&mut impl rand::Rng`, memory is a
//! number of bytes read by the supervisor from the worker's cgroup. That is what lets
//! `tests/policy_sim.rs` run 64 workers for a simulated day in a second.
//!
//! How the supervisor uses it, per worker and per memory tick:
//!
//! 1. At spawn, [`WorkerPolicy::new`] draws the worker's recycle threshold
//!    (`recycle_at ± recycle_jitter`) and lifetime (`max_lifetime ± lifetime_jitter`).
//! 2. Every reading goes to [`WorkerPolicy::observe`]; trim outcomes to
//!    [`WorkerPolicy::trimmed`] (with the working set after),
//!    [`WorkerPolicy::trim_deferred`] or [`WorkerPolicy::trim_unavailable`].
//! 3. [`PoolPolicy::decide`], given a view of every worker, the pool's reading and its
//!    budget, says what to do now: whom to trim (each worker's own
//!    [`WorkerPolicy::should_trim`], and near the budget those with most to give back),
//!    whom to recycle and how (the [`RecycleGate`] admits [`Candidate`]s earliest deadline
//!    first, at most `max_recycling` in progress, starts [`Settings::spacing`] apart;
//!    replacement first, or stop-first when the replacement would not fit under the
//!    budget), whom to slow with `memory.high` ([`memory_high_for`], cgroup v2), which
//!    workers will reach their ceilings before the gate could replace them
//!    ([`Emergency`]: their replacement starts past the gate, or they are stopped
//!    gracefully within [`STOP_MARGIN`] of the ceiling instead of being OOM-killed; under
//!    a budget, one worker is stopped stop-first when the pool itself would reach its cap
//!    within [`STOP_MARGIN`]), and when to read memory again. `tests/policy_sim.rs`
//!    calls the same function.
//! 5. A worker that died is restarted after [`Backoff::failure`] (crash) or
//!    [`oom_restart_delay`] (OOM kill).
//! 6. With `--timeout`, a ready worker is hung once [`is_overdue`] (no `WATCHDOG=1` for a
//!    whole timeout); it gets the timeout signal, SIGKILL after [`kill_grace`], and its
//!    replacement starts after [`replacement_delay`].
//!
//! Why jitter everywhere: 64 workers of one app, started together and leaking at the same
//! rate, would otherwise reach one threshold in the same second, every time. Per-worker
//! thresholds spread the first wave; the gate's cap and spacing serialize whatever still
//! collides; the spread then persists because every replacement draws anew.

mod backoff;
mod gate;
mod pool;
mod settings;
mod throttle;
mod watchdog;
mod worker;

pub use backoff::{
    BACKOFF_BASE, BACKOFF_CAP, BACKOFF_RESET_AFTER, Backoff, OOM_RESTART_MAX, OOM_RESTART_MIN,
    oom_restart_delay,
};
pub use gate::{
    Candidate, RecycleGate, URGENT_HORIZON, behind_schedule, feasible_cadence, urgency_order,
};
pub use pool::{
    Decisions, Emergency, EmergencyAction, FAST_TICK, OomSite, PoolPolicy, PoolView, RecycleOrder,
    Role, SLOW_TICK, STOP_MARGIN, StartMode, TrimOrder, WorkerView, default_ceiling,
    pool_memory_high,
};
pub use settings::{MIN_DERIVED_SPACING, READY_SAMPLES, Settings, SettingsError, ready_time};
pub use throttle::{WAIT_MARGIN, memory_high_for};
pub use watchdog::{
    KILL_GRACE_MAX, KILL_GRACE_MIN, is_overdue, kept_alive_for, kill_grace, overdue_at,
    replacement_delay, replacement_first,
};
pub use worker::{
    GROWTH_WINDOW, IMMINENT_MIN_SPAN, IMMINENT_WINDOW, PROJECTION_MIN_SPAN, RecycleReason,
    TRIM_RETRY_BASE, TRIM_RETRY_MAX, WorkerPolicy,
};
