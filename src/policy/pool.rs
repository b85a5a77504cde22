//! The pool's decisions in one place: whom to trim, whom to recycle (and whether the
//! replacement starts first or the old worker stops first), whom to slow down with
//! `memory.high`, and how soon to read memory again.
//!
//! [`PoolPolicy::decide`] is a function of a view of every worker (their
//! [`WorkerPolicy`]s plus what only the supervisor knows: role, whether a trim is in
//! flight, whether the slot may recycle now), the pool budget, the clock and the policy's
//! own memory (the recycle gate, learned start-up and recycle durations). The supervisor
//! carries the decisions out; `tests/policy_sim.rs` calls the same function on simulated
//! workers, so what the simulation shows is what ships.
//!
//! Order of the recycle queue: earliest deadline first. A worker's deadline is its
//! [`WorkerPolicy::deadline`] (projected time to its ceiling, zero if its recent transient
//! peaks no longer fit under it); with a pool budget, the pool has a deadline too (time
//! until the sum of the workers reaches the budget), carried by the worker whose
//! replacement frees the most. A recycle starts when the worker asks for it (threshold,
//! lifetime, operator) and the gate admits it, or earlier when, one start per cadence in
//! deadline order, some worker's replacement would not be ready before its deadline
//! ([`super::behind_schedule`]).
//!
//! A worker whose deadline is shorter than a ready time cannot be helped by any schedule
//! (its replacement cannot be ready in time): it is reported in
//! [`Decisions::too_fast`] so the supervisor can say so.

use std::time::Duration;

use super::{Candidate, RecycleGate, RecycleReason, Settings, WorkerPolicy, behind_schedule};

/// Memory is read at least this often.
pub const SLOW_TICK: Duration = Duration::from_secs(1);
/// ... and at most this often (near a limit).
pub const FAST_TICK: Duration = Duration::from_millis(100);
/// A deadline within this many ticks' worth of time makes the tick shorter: the reading
/// that starts a recycle must come early enough to leave the replacement its ready time.
const TICKS_PER_DEADLINE: u32 = 10;
/// A worker projected to reach its ceiling within this long is stopped now
/// ([`EmergencyAction::Stop`]): the stop signal takes effect within milliseconds, but the
/// reading that shows the worker there may come a tick late on a busy host, and its
/// requests in flight still allocate while it drains.
pub const STOP_MARGIN: Duration = Duration::from_millis(600);
/// With a budget, the pool trims from `trim_at` of the budget and recycles from
/// `recycle_at` of it (the workers' own fractions applied to the budget).
const POOL_OVER_GRACE_TICKS: u32 = 3;

/// A pool this close to its budget (a 64th of it) is in an emergency whatever its growth
/// ([`EmergencyAction::StopFirst`]): on cgroup v2 the pool's `memory.high` brake sits at a
/// 32nd below the budget, so usage past this means the brake is not holding it.
pub const POOL_CAP_MARGIN: u64 = 64;

/// What the supervisor knows about a worker that the policy does not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Started, not ready yet (a first start, a respawn, or a replacement).
    Starting,
    /// Ready and serving; not being replaced.
    Serving,
    /// Ready and serving, its replacement is starting (or, stop-first, it is stopping).
    Replaced,
    /// Told to stop; finishing its requests.
    Draining,
}

/// One worker as [`PoolPolicy::decide`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct WorkerView<'a> {
    pub slot: usize,
    pub role: Role,
    pub policy: &'a WorkerPolicy,
    /// Its latest reading (also for starting and draining workers: they count against
    /// the budget).
    pub usage: Option<u64>,
    /// No trim in flight and trimming not known to be unavailable.
    pub may_trim: bool,
    /// The supervisor allows a recycle of its slot now (slot within the target, not
    /// backing off after a failed recycle, no other worker starting in the slot).
    pub may_recycle: bool,
    /// The `memory.high` set on it now (`None`: max).
    pub memory_high: Option<u64>,
    /// Its group supports `memory.high` (cgroup v2).
    pub has_memory_high: bool,
}

/// The pool as [`PoolPolicy::decide`] sees it.
#[derive(Clone, Copy, Debug)]
pub struct PoolView<'a> {
    pub now: Duration,
    pub workers: &'a [WorkerView<'a>],
    /// Recycles in progress (count against `--max-recycling`).
    pub in_progress: usize,
    /// The pool group's own reading, if there is one (else the sum of the workers').
    pub pool_usage: Option<u64>,
}

/// How a recycle proceeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum StartMode {
    /// Start the replacement, wait until it is ready, then stop the old worker.
    ReplacementFirst,
    /// Stop the old worker first, start the replacement when it is gone: the replacement
    /// would not fit beside it under the pool budget.
    StopFirst,
}

/// A trim to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrimOrder {
    /// Index into [`PoolView::workers`].
    pub worker: usize,
    /// Asked by the pool budget (the worker itself is below its own `trim_at`).
    pub for_budget: bool,
}

/// A recycle to start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RecycleOrder {
    /// Index into [`PoolView::workers`].
    pub worker: usize,
    pub reason: RecycleReason,
    /// How long it waited for its turn.
    pub waited: Duration,
    /// Started ahead of its threshold by the deadline lookahead: its deadline then.
    pub ahead: Option<Duration>,
    /// Started for the pool budget (the pool, not the worker, reached its threshold).
    pub for_budget: bool,
    pub mode: StartMode,
}

/// What to do with a worker that will reach its ceiling before a recycle through the gate
/// could replace it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum EmergencyAction {
    /// Start its replacement now, past the gate's spacing (and past `--max-recycling`,
    /// up to twice it): admitted later, the replacement would not be ready before the
    /// ceiling. The worker serves on until its replacement is ready, as in any recycle.
    StartReplacement,
    /// Stop it now, gracefully (the stop signal: it stops accepting and finishes the
    /// requests it has), and start its replacement now if none is starting: it reaches
    /// its ceiling within [`STOP_MARGIN`], before its replacement can be ready. Its slot
    /// serves nothing until the replacement is ready (a brief dip in capacity), which
    /// beats the OOM killer taking it with its requests in flight.
    Stop,
    /// The pool's own emergency, under a budget: the pool reaches its cap within
    /// [`STOP_MARGIN`] at its growth (or sits within [`POOL_CAP_MARGIN`] of it: the
    /// `memory.high` brake did not hold it). Stop this worker now, gracefully, and start
    /// its replacement only once it is gone (there is no room for both); a worker whose
    /// replacement is already starting is simply stopped. The pool's OOM killer would
    /// otherwise take a worker with its requests in flight, or trimrun itself, which
    /// lives in the pool's group on cgroup v2.
    StopFirst,
}

/// A worker that will reach its ceiling before the gate could replace it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Emergency {
    /// Index into [`PoolView::workers`].
    pub worker: usize,
    /// Its [`WorkerPolicy::imminent_time_to_limit`].
    pub time_to_limit: Duration,
    pub action: EmergencyAction,
}

/// What [`PoolPolicy::decide`] asks the supervisor to do.
#[derive(Clone, Debug, Default)]
pub struct Decisions {
    pub trims: Vec<TrimOrder>,
    pub recycles: Vec<RecycleOrder>,
    /// `memory.high` changes: (index into [`PoolView::workers`], new value; `None` = max).
    pub memory_high: Vec<(usize, Option<u64>)>,
    /// The spacing in force, when the gate shortened it below the configured one.
    pub spacing_shortened: Option<Duration>,
    /// Serving workers whose deadline is shorter than a ready time: no schedule can have
    /// a replacement ready before they reach their ceiling. (index, deadline)
    pub too_fast: Vec<(usize, Duration)>,
    /// Workers that will reach their ceilings before a recycle through the gate could
    /// replace them: replaced past the gate, or stopped now (see [`EmergencyAction`]).
    pub emergencies: Vec<Emergency>,
    /// Read memory again after this long.
    pub next_tick: Duration,
    /// From now on young workers are projected from two seconds of readings: workers were
    /// seen reaching their limits sooner than a normal projection could tell (log once).
    pub eager_projection: bool,
}

/// The pool's policy: the recycle gate, the budget, and what it learned about start-ups
/// and recycles.
#[derive(Clone, Debug)]
pub struct PoolPolicy {
    settings: Settings,
    gate: RecycleGate,
    budget: Option<u64>,
    /// A replacement's working set at its peak while starting (learned, EWMA).
    start_cost: Option<f64>,
    /// A worker's peak from its start until one [`Self::overlap_window`] after it became
    /// ready, its first requests included (learned, EWMA).
    overlap_cost: Option<f64>,
    /// How long a recycle holds a recycle slot (learned, EWMA): ready time + drain.
    recycle_time: Duration,
    /// Whether `recycle_time` was measured at least once.
    recycle_time_seen: bool,
    /// When the recycles in progress were admitted, oldest first.
    in_flight: std::collections::VecDeque<Duration>,
    /// How long a start takes until ready (learned, EWMA; see [`Self::ready_time`]).
    ready_time: Duration,
    /// Whether `ready_time` was measured at least once.
    ready_time_seen: bool,
    /// Start recycles ahead of thresholds when the queue is behind (off only for
    /// comparisons in simulations).
    lookahead: bool,
    /// Project young workers from a couple of seconds of readings (see `decide`).
    eager: bool,
    /// Emergency actions ([`Decisions::emergencies`]; off only for comparisons in
    /// simulations).
    emergencies: bool,
    /// Since when the pool has been at or above its recycle threshold.
    pool_over_since: Option<Duration>,
    /// When the pool last asked for a trim of each slot (so that budget trims of one
    /// worker are spaced like urgent trims).
    budget_trims: Vec<(usize, Duration)>,
}

impl PoolPolicy {
    /// `budget`: the pool's hard cap in bytes (`--pool-limit`), if any.
    pub fn new(settings: &Settings, budget: Option<u64>) -> Self {
        Self {
            settings: settings.clone(),
            gate: RecycleGate::new(settings),
            budget,
            start_cost: None,
            overlap_cost: None,
            recycle_time: settings.ready_time + Duration::from_secs(2),
            recycle_time_seen: false,
            in_flight: std::collections::VecDeque::new(),
            ready_time: settings.ready_time,
            ready_time_seen: false,
            lookahead: true,
            eager: false,
            emergencies: true,
            pool_over_since: None,
            budget_trims: Vec::new(),
        }
    }

    /// The same policy without the deadline lookahead (comparisons in simulations).
    pub fn without_lookahead(mut self) -> Self {
        self.lookahead = false;
        self
    }

    /// The same policy without emergency actions (comparisons in simulations).
    pub fn without_emergencies(mut self) -> Self {
        self.emergencies = false;
        self
    }

    /// Follow changed settings (e.g. a ready time measured from start-ups).
    pub fn update(&mut self, settings: &Settings) {
        self.settings = settings.clone();
        self.gate.update(settings);
    }

    /// The same policy with a gate that never shortens its spacing (comparisons).
    pub fn strict_spacing(mut self) -> Self {
        self.gate = self.gate.strict_spacing();
        self
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn gate(&self) -> &RecycleGate {
        &self.gate
    }

    pub fn budget(&self) -> Option<u64> {
        self.budget
    }

    /// A recycle finished (its old worker is gone) `took` after it started.
    pub fn recycle_finished(&mut self, took: Duration) {
        self.in_flight.pop_front();
        self.recycle_time = if self.recycle_time_seen {
            self.recycle_time.mul_f64(0.7) + took.mul_f64(0.3)
        } else {
            took
        };
        self.recycle_time_seen = true;
    }

    /// A recycle ended without completing (its replacement failed).
    pub fn recycle_abandoned(&mut self) {
        self.in_flight.pop_front();
    }

    /// A worker became ready `took` after it was started; `peak` is the most it used
    /// while starting.
    pub fn started(&mut self, peak: u64, took: Duration) {
        let p = peak as f64;
        self.start_cost = Some(self.start_cost.map_or(p, |c| 0.7 * c + 0.3 * p));
        self.ready_time = if self.ready_time_seen || !self.settings.ready_measured {
            self.ready_time.mul_f64(0.7) + took.mul_f64(0.3)
        } else {
            took
        };
        self.ready_time_seen = true;
    }

    /// How long a replacement runs beside its old worker once ready: the old worker's
    /// drain (what recycles take beyond the ready time, learned), at least 1 s.
    pub fn overlap_window(&self) -> Duration {
        self.recycle_time
            .saturating_sub(self.ready_time())
            .max(Duration::from_secs(1))
    }

    /// A worker has served for [`Self::overlap_window`]: `peak` is the most it used
    /// since its start. A worker keeps growing through its first requests, so this, not
    /// the peak at ready time, is what a replacement costs beside the worker it replaces.
    pub fn overlap_seen(&mut self, peak: u64) {
        let p = peak as f64;
        self.overlap_cost = Some(self.overlap_cost.map_or(p, |c| 0.7 * c + 0.3 * p));
    }

    /// Whether an OOM kill of a worker that had served for `served` was beyond any
    /// schedule: it reached its ceiling in less than a ready time, so even a replacement
    /// started the moment it became ready could not have been ready in time.
    pub fn oom_unavoidable(&self, served: Duration) -> bool {
        served < self.ready_time()
    }

    /// How long a start takes until ready: the configured ready time or, if starts were
    /// seen to take longer, what they took (EWMA). With `--ready notify` the supervisor
    /// keeps the configured one at the slowest recent start-up, and the EWMA starts from
    /// the first one measured (not from the 2 s guess, which kept it above fast start-ups
    /// for several starts).
    pub fn ready_time(&self) -> Duration {
        self.ready_time.max(self.settings.ready_time)
    }

    /// What a replacement is expected to use beside its old worker: the larger of its
    /// peak until ready and its peak one drain's length later (both learned).
    pub fn start_cost(&self) -> u64 {
        let (a, b) = (
            self.start_cost.unwrap_or(0.0),
            self.overlap_cost.unwrap_or(0.0),
        );
        a.max(b) as u64
    }

    /// How long a recycle is expected to hold its slot: what recycles took (EWMA), or
    /// longer if the oldest one in progress has already taken longer.
    pub fn recycle_time(&self, now: Duration) -> Duration {
        let oldest = self
            .in_flight
            .front()
            .map_or(Duration::ZERO, |t| now.saturating_sub(*t));
        self.recycle_time.max(oldest)
    }

    /// Everything the pool should do now. Starts it returns are counted by the gate as
    /// started at `view.now`: the caller must start every recycle returned.
    pub fn decide(&mut self, view: &PoolView) -> Decisions {
        let now = view.now;
        let s = &self.settings;
        let mut out = Decisions {
            next_tick: SLOW_TICK,
            ..Decisions::default()
        };
        let ws = |w: &WorkerView| w.usage.or(w.policy.working_set()).unwrap_or(0);
        let pool_usage = view
            .pool_usage
            .unwrap_or_else(|| view.workers.iter().map(ws).sum());

        // Own trims.
        for (i, w) in view.workers.iter().enumerate() {
            if w.role == Role::Serving && w.may_trim && w.policy.should_trim(s, now) {
                out.trims.push(TrimOrder {
                    worker: i,
                    for_budget: false,
                });
            }
        }

        // Emergencies: workers that reach their ceilings, at their growth of the last few
        // seconds, before the gate could have them replaced. Known from a second of
        // readings on, so also for the first generation, whose normal projections need
        // more (they start together and have no growth history yet). What reads memory
        // must come often enough for the stop to come in time: a tick of a quarter of the
        // time left.
        let ready_time = self.ready_time();
        let mut urgent_starts = 0;
        for (i, w) in view.workers.iter().enumerate() {
            if !matches!(w.role, Role::Serving | Role::Replaced) {
                continue;
            }
            let Some(ttl) = w
                .policy
                .imminent_time_to_limit(now)
                .filter(|_| self.emergencies)
            else {
                continue;
            };
            out.next_tick = out.next_tick.min((ttl / 4).clamp(FAST_TICK, SLOW_TICK));
            let action = if ttl < STOP_MARGIN {
                EmergencyAction::Stop
            } else if w.role == Role::Serving
                && w.may_recycle
                && ttl < ready_time + STOP_MARGIN
                && view.in_progress + urgent_starts < 2 * s.max_recycling.max(1)
            {
                urgent_starts += 1;
                EmergencyAction::StartReplacement
            } else {
                continue;
            };
            out.emergencies.push(Emergency {
                worker: i,
                time_to_limit: ttl,
                action,
            });
        }

        // The pool's emergency: under a budget, the pool reaches its cap within STOP_MARGIN
        // at its growth, or sits within POOL_CAP_MARGIN of it. One worker is stopped at a
        // time (none while one is already stopping: its exit frees its memory): one whose
        // replacement is already starting if there is one (stopping it costs no extra
        // start), else the largest that may be recycled, stop-first.
        let pool_rate: f64 = view
            .workers
            .iter()
            .filter(|w| w.role != Role::Draining)
            .filter_map(|w| w.policy.growth_rate(now))
            .sum();
        if let Some((e, tick)) = self.pool_emergency(view, pool_usage, pool_rate, &out.emergencies)
        {
            out.next_tick = out.next_tick.min(tick);
            out.emergencies.extend(e);
        }

        // Deadlines of the workers that may still need a recycle. Workers of one pool run
        // one app: the largest transient any of them showed may come to each.
        let transient = view
            .workers
            .iter()
            .map(|w| w.policy.transient(now))
            .max()
            .unwrap_or(0);
        let emergency: Vec<usize> = out.emergencies.iter().map(|e| e.worker).collect();
        let serving_at = |i: usize, w: &WorkerView| {
            w.role == Role::Serving && w.may_recycle && !emergency.contains(&i)
        };
        let mut deadlines: Vec<(Duration, usize)> = view
            .workers
            .iter()
            .enumerate()
            .filter(|(i, w)| serving_at(*i, w))
            .filter_map(|(i, w)| {
                w.policy
                    .deadline(now, transient, self.eager)
                    .map(|d| (d, i))
            })
            .collect();
        // A young worker whose projection, once it has one, leaves less than a start-up
        // and a recycle: this app's workers reach their limits sooner than a projection
        // from [`super::PROJECTION_MIN_SPAN`] of readings can see them coming. From now on
        // young workers are projected from two seconds of readings. (Not from the start:
        // most apps surge in their first seconds and then plateau, and a projection from
        // two seconds of a surge would replace every young worker.)
        if !self.eager
            && deadlines.iter().any(|&(d, i)| {
                let w = &view.workers[i];
                w.policy.is_young(now)
                    && w.policy.time_to_limit(now).is_some()
                    && d < self.ready_time() + self.recycle_time(now)
            })
        {
            self.eager = true;
            out.eager_projection = true;
        }

        // The pool budget: trim those with most to give back, then recycle the one whose
        // replacement frees the most.
        let mut pool_candidate = None;
        // The worker whose deadline is the pool's (the budget's, not its own).
        let mut pool_carrier = None;
        if let Some(budget) = self.budget {
            let trim_from = (budget as f64 * s.trim_at) as u64;
            let recycle_from = (budget as f64 * s.recycle_at) as u64;
            self.budget_trims
                .retain(|(_, t)| now < *t + s.urgent_trim_interval());
            if s.trim && pool_usage >= trim_from {
                let mut givers: Vec<(u64, usize)> = view
                    .workers
                    .iter()
                    .enumerate()
                    .filter(|(i, w)| {
                        w.role == Role::Serving
                            && w.may_trim
                            && !out.trims.iter().any(|t| t.worker == *i)
                            && !self.budget_trims.iter().any(|b| b.0 == w.slot)
                            && w.policy
                                .last_trim_at()
                                .is_none_or(|t| now >= t + s.urgent_trim_interval())
                    })
                    .map(|(i, w)| (w.policy.give_back(), i))
                    .filter(|(g, _)| *g >= budget / 100)
                    .collect();
                givers.sort_by(|a, b| b.cmp(a));
                // Enough of them to bring the pool back under trim_at, if trims give
                // back what they promise.
                let mut need = pool_usage.saturating_sub(trim_from);
                for (give, i) in givers {
                    if need == 0 {
                        break;
                    }
                    need = need.saturating_sub(give / 2);
                    out.trims.push(TrimOrder {
                        worker: i,
                        for_budget: true,
                    });
                    self.budget_trims.push((view.workers[i].slot, now));
                }
            }
            if pool_usage >= recycle_from {
                self.pool_over_since.get_or_insert(now);
            } else {
                self.pool_over_since = None;
            }
            // The pool's own deadline, carried by the largest serving worker.
            let rate = pool_rate;
            // A pool whose headroom no longer holds the largest transient any worker
            // showed is due now, as a worker is (see `WorkerPolicy::deadline`).
            let pool_deadline = if pool_usage.saturating_add(transient) >= budget {
                Some(Duration::ZERO)
            } else if rate > 0.0 {
                Some(
                    Duration::try_from_secs_f64((budget - pool_usage) as f64 / rate)
                        .unwrap_or(Duration::MAX),
                )
            } else {
                None
            };
            let largest = view
                .workers
                .iter()
                .enumerate()
                .filter(|(i, w)| serving_at(*i, w))
                .max_by_key(|(_, w)| w.policy.peak().max(ws(w)));
            if let Some((i, _)) = largest {
                let over_long_enough = self
                    .pool_over_since
                    .is_some_and(|t| now >= t + SLOW_TICK * POOL_OVER_GRACE_TICKS);
                if let Some(d) = pool_deadline {
                    match deadlines.iter_mut().find(|x| x.1 == i) {
                        Some(x) if x.0 <= d => {}
                        Some(x) => {
                            x.0 = d;
                            pool_carrier = Some(i);
                        }
                        None => {
                            deadlines.push((d, i));
                            pool_carrier = Some(i);
                        }
                    }
                }
                if over_long_enough || (!s.trim && self.pool_over_since.is_some()) {
                    pool_candidate = Some((i, pool_deadline));
                }
            }
        }

        // Candidates: workers that ask to recycle (reloads go past the gate).
        let mut candidates = Vec::new();
        let mut reloads = Vec::new();
        for (i, w) in view.workers.iter().enumerate() {
            if !serving_at(i, w) {
                continue;
            }
            let Some(reason) = w.policy.recycle_reason(s, now) else {
                continue;
            };
            let since = w.policy.waiting_since(s, now).unwrap_or(now);
            if reason == RecycleReason::Reload {
                reloads.push((w.slot, i, since));
            } else {
                candidates.push(Candidate {
                    slot: i,
                    reason,
                    time_to_limit: deadlines.iter().find(|d| d.1 == i).map(|d| d.0),
                    waiting_since: since,
                });
            }
        }
        let mut for_budget = None;
        if let Some((i, d)) = pool_candidate
            && !candidates.iter().any(|c| c.slot == i)
        {
            candidates.push(Candidate {
                slot: i,
                reason: RecycleReason::Budget,
                time_to_limit: d,
                waiting_since: self.pool_over_since.unwrap_or(now),
            });
            for_budget = Some(i);
        }

        // The spacing in force, then the lookahead: if one start per cadence in deadline
        // order would reach some worker only after its deadline, the most urgent one not
        // yet asking starts now.
        let times: Vec<Duration> = deadlines.iter().map(|d| d.0).collect();
        self.gate.yield_to(&times);
        let recycle_time = self.recycle_time(now);
        let cadence = self
            .gate
            .spacing()
            .max(recycle_time / s.max_recycling.max(1) as u32);
        let mut ahead = None;
        // A reading can come up to a tick late.
        let ready = self.ready_time() + SLOW_TICK;
        if self.lookahead
            && behind_schedule(&times, cadence, ready)
            && let Some(&(d, i)) = deadlines
                .iter()
                .filter(|(_, i)| !candidates.iter().any(|c| c.slot == *i))
                .min()
        {
            candidates.push(Candidate {
                slot: i,
                reason: RecycleReason::Memory,
                time_to_limit: Some(d),
                waiting_since: now,
            });
            ahead = Some((i, d));
        }
        // Too fast for any schedule: its whole life from ready to its ceiling is shorter
        // than a ready time, so even a replacement started the moment it was ready could
        // not be ready before it reaches its ceiling.
        for (i, w) in view.workers.iter().enumerate() {
            if matches!(w.role, Role::Serving | Role::Replaced)
                && let Some(d) = w
                    .policy
                    .imminent_time_to_limit(now)
                    .or_else(|| w.policy.time_to_limit(now))
                && now.saturating_sub(w.policy.born() + ready_time) + d < ready_time
            {
                out.too_fast.push((i, d));
            }
        }

        // Rolling reloads: one after the other within --max-recycling, no spacing.
        reloads.sort();
        // Recycles the emergencies begin count against --max-recycling from now on.
        let mut in_progress = view.in_progress
            + out
                .emergencies
                .iter()
                .filter(|e| view.workers[e.worker].role == Role::Serving)
                .count();
        for (_, i, since) in reloads {
            if in_progress >= s.max_recycling {
                break;
            }
            in_progress += 1;
            out.recycles.push(RecycleOrder {
                worker: i,
                reason: RecycleReason::Reload,
                waited: now.saturating_sub(since),
                ahead: None,
                for_budget: false,
                mode: self.mode(pool_usage, pool_rate, recycle_time, transient),
            });
        }

        // Workers no longer waiting run unthrottled again.
        for (i, w) in view.workers.iter().enumerate() {
            if w.memory_high.is_some()
                && w.role == Role::Serving
                && !candidates.iter().any(|c| c.slot == i)
            {
                out.memory_high.push((i, None));
            }
        }

        if !candidates.is_empty() {
            let admitted = self.gate.admit(now, in_progress, &candidates);
            if !admitted.is_empty() && self.gate.spacing() < self.gate.configured_spacing() {
                out.spacing_shortened = Some(self.gate.spacing());
            }
            for &i in &admitted {
                let Some(c) = candidates.iter().find(|c| c.slot == i) else {
                    continue;
                };
                in_progress += 1;
                let budget = for_budget == Some(i) || pool_carrier == Some(i);
                let ahead = ahead.filter(|a| a.0 == i).map(|a| a.1);
                out.recycles.push(RecycleOrder {
                    worker: i,
                    // Started ahead of its own threshold for the pool's deadline: the
                    // budget's. (One past its own threshold is a memory recycle, whatever
                    // the pool's deadline.)
                    reason: match c.reason {
                        RecycleReason::Memory if pool_carrier == Some(i) && ahead.is_some() => {
                            RecycleReason::Budget
                        }
                        r => r,
                    },
                    waited: now.saturating_sub(c.waiting_since),
                    ahead,
                    for_budget: budget,
                    mode: self.mode(pool_usage, pool_rate, recycle_time, transient),
                });
            }
            // Those still waiting: slow them down (v2) rather than let them be killed.
            let order = self.gate.order(&candidates);
            for (position, &i) in order.iter().enumerate() {
                if admitted.contains(&i) {
                    continue;
                }
                let w = &view.workers[i];
                if !w.has_memory_high {
                    continue;
                }
                let wait = self
                    .gate
                    .expected_wait(now, in_progress, position, recycle_time);
                let high = w.policy.memory_high(now, Some(wait));
                if high != w.memory_high {
                    out.memory_high.push((i, high));
                }
            }
        }

        // Recycles started now: the gate's, and the emergencies' that start one (a stop of
        // a worker not yet being replaced starts its replacement too).
        let emergency_starts = out
            .emergencies
            .iter()
            .filter(|e| view.workers[e.worker].role == Role::Serving)
            .count();
        for _ in 0..out.recycles.len() + emergency_starts {
            self.in_flight.push_back(now);
        }
        // Read sooner when a deadline is near (and not yet being acted on).
        for &(d, i) in &deadlines {
            if out.recycles.iter().any(|r| r.worker == i) {
                continue;
            }
            let tick = (d / TICKS_PER_DEADLINE).clamp(FAST_TICK, SLOW_TICK);
            out.next_tick = out.next_tick.min(tick);
        }
        out
    }

    /// The pool's emergency ([`EmergencyAction::StopFirst`]), given the pool's reading and
    /// growth and the workers' own emergencies: the tick to read again at, and the worker
    /// to stop now if any. `None` without a budget (or with emergencies off), or when the
    /// pool's growth says nothing.
    fn pool_emergency(
        &self,
        view: &PoolView,
        pool_usage: u64,
        pool_rate: f64,
        emergencies: &[Emergency],
    ) -> Option<(Option<Emergency>, Duration)> {
        let budget = self.budget.filter(|_| self.emergencies)?;
        let room = budget.saturating_sub(pool_usage);
        let ttl = if room <= budget / POOL_CAP_MARGIN {
            Duration::ZERO
        } else if pool_rate > 0.0 {
            Duration::try_from_secs_f64(room as f64 / pool_rate).unwrap_or(Duration::MAX)
        } else {
            return None;
        };
        let tick = (ttl / 4).clamp(FAST_TICK, SLOW_TICK);
        let stopping = view.workers.iter().any(|w| w.role == Role::Draining)
            || emergencies
                .iter()
                .any(|e| e.action == EmergencyAction::Stop);
        if ttl >= STOP_MARGIN || stopping {
            return Some((None, tick));
        }
        let ws = |w: &WorkerView| w.usage.or(w.policy.working_set()).unwrap_or(0);
        let pick = view
            .workers
            .iter()
            .enumerate()
            .filter(|(i, _)| !emergencies.iter().any(|e| e.worker == *i))
            .filter(|(_, w)| w.role == Role::Replaced || (w.role == Role::Serving && w.may_recycle))
            .max_by_key(|(_, w)| (w.role == Role::Replaced, ws(w)));
        let stop = pick.map(|(i, _)| Emergency {
            worker: i,
            time_to_limit: ttl,
            action: EmergencyAction::StopFirst,
        });
        Some((stop, tick))
    }

    /// Replacement first, unless the replacement would not fit beside the old worker
    /// under the budget (below its `memory.high` brake), counting what the pool grows
    /// (`pool_rate`, bytes/s) while both run: the replacement's ready time and then the
    /// old worker's drain. (`recycle_time` alone is not that: after stop-first recycles,
    /// which end in a fraction of a second, its average is far shorter than a ready
    /// time, and a replacement admitted on it was seen to push the pool into the OOM
    /// killer on a loaded machine.)
    ///
    /// And room for `transient`, the largest transient peak any worker showed (a request that
    /// allocates and frees tens of MiB may land on any worker while both run: on the
    /// real kernel, a 40 MiB report during a replacement's start-up pushed a pool that
    /// left room for the start-up alone into the OOM killer).
    fn mode(
        &self,
        pool_usage: u64,
        pool_rate: f64,
        recycle_time: Duration,
        transient: u64,
    ) -> StartMode {
        let Some(budget) = self.budget else {
            return StartMode::ReplacementFirst;
        };
        let both_run = self.ready_time() + recycle_time;
        let growth = (pool_rate.max(0.0) * both_run.as_secs_f64()) as u64;
        let need = pool_usage
            .saturating_add(self.start_cost())
            .saturating_add(growth)
            .saturating_add(transient);
        if need <= pool_memory_high(budget) {
            StartMode::ReplacementFirst
        } else {
            StartMode::StopFirst
        }
    }
}

/// The pool group's `memory.high` under a budget (cgroup v2): 1/32 of the budget (at least
/// 1 MiB) below it, so that the kernel reclaims and slows allocations before the OOM
/// killer acts at the budget itself. Page-aligned.
pub fn pool_memory_high(budget: u64) -> u64 {
    budget.saturating_sub((budget / 32).max(1 << 20)) & !4095
}

/// The default ceiling of each worker under a budget: twice the fair share (`budget /
/// workers`), at most the budget, so that one worker's burst can use room the others
/// leave.
pub fn default_ceiling(budget: u64, workers: usize) -> u64 {
    (budget / workers.max(1) as u64)
        .saturating_mul(2)
        .min(budget)
}

/// Which limit an OOM kill of a worker was at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OomSite {
    /// Its own group's `memory.max`/`memory.limit_in_bytes` (or no reading says otherwise).
    OwnLimit,
    /// The pool's `--pool-limit`: the worker's group never came near its own limit.
    PoolBudget,
    /// A limit above trimrun (its own cgroup's, the container's, or the host's memory).
    Above,
    /// Its own limit or the pool's budget: no high-water mark tells which (v2 before
    /// Linux 5.19 has no `memory.peak`).
    OwnOrBudget,
}

impl OomSite {
    /// From the worker group's high-water mark (`peak`) and its own limit: a group whose
    /// peak stayed a margin below its limit was not where the kernel ran out (the margin:
    /// 1/32 of the limit, at least 2 MiB, for the charge the kernel tried and failed).
    pub fn of(peak: Option<u64>, limit: Option<u64>, budget: Option<u64>) -> OomSite {
        let Some(limit) = limit else {
            // No limit of its own: the pool's, or one above trimrun.
            return if budget.is_some() {
                OomSite::PoolBudget
            } else {
                OomSite::Above
            };
        };
        let Some(peak) = peak else {
            return if budget.is_some() {
                OomSite::OwnOrBudget
            } else {
                OomSite::OwnLimit
            };
        };
        let margin = (limit / 32).max(2 << 20);
        if peak.saturating_add(margin) >= limit {
            OomSite::OwnLimit
        } else if budget.is_some() {
            OomSite::PoolBudget
        } else {
            OomSite::Above
        }
    }

    /// What the log says of it.
    pub fn describe(self) -> &'static str {
        match self {
            OomSite::OwnLimit => "at its own limit",
            OomSite::PoolBudget => {
                "at the pool's budget (--pool-limit), below its own limit: the pool as a whole ran out"
            }
            OomSite::Above => {
                "below its own limit (or with none): a limit above trimrun ran out (trimrun's cgroup, the container's, or the host's memory)"
            }
            OomSite::OwnOrBudget => {
                "at its own limit or the pool's budget (no high-water mark to tell which)"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const MIB: u64 = 1 << 20;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn settings() -> Settings {
        Settings {
            recycle_jitter: 0.0,
            ready_time: s(1),
            ..Settings::default()
        }
    }

    fn views(ws: &[WorkerPolicy]) -> Vec<WorkerView<'_>> {
        ws.iter()
            .enumerate()
            .map(|(slot, p)| WorkerView {
                slot,
                role: Role::Serving,
                policy: p,
                usage: p.working_set(),
                may_trim: true,
                may_recycle: true,
                memory_high: None,
                has_memory_high: false,
            })
            .collect()
    }

    /// Workers under `ceiling`, observed once a second until `until` at `ws(slot, t)`.
    fn workers(
        n: usize,
        ceiling: u64,
        until: u64,
        ws: impl Fn(usize, u64) -> u64,
    ) -> Vec<WorkerPolicy> {
        let st = settings();
        let mut rng = StdRng::seed_from_u64(1);
        (0..n)
            .map(|slot| {
                let mut p = WorkerPolicy::new(&st, Some(ceiling), Duration::ZERO, &mut rng);
                for t in 0..=until {
                    p.observe(s(t), ws(slot, t));
                }
                p
            })
            .collect()
    }

    #[test]
    fn a_pool_about_to_reach_its_budget_stops_one_worker_first() {
        // 3 workers under a 120 MiB budget, growing 2 MiB/s together, the pool at 119 MiB: it
        // reaches its cap within STOP_MARGIN. One worker is stopped, stop-first: the one
        // whose replacement is already starting if any, else the largest; none while one
        // is already stopping; none far from the cap.
        let budget = 120 * MIB;
        let ws = workers(3, default_ceiling(budget, 3), 30, |slot, t| {
            (10 + slot as u64) * MIB + 2 * MIB * t / 3 + slot as u64 * MIB
        });
        let usage: Vec<u64> = ws.iter().map(|p| p.working_set().unwrap()).collect();
        let total: u64 = usage.iter().sum();
        let decide = |v: &[WorkerView], pool_usage: u64| {
            let mut pool = PoolPolicy::new(&settings(), Some(budget));
            pool.decide(&PoolView {
                now: s(30),
                workers: v,
                in_progress: 0,
                pool_usage: Some(pool_usage),
            })
        };
        let stops = |d: &Decisions| -> Vec<usize> {
            d.emergencies
                .iter()
                .filter(|e| e.action == EmergencyAction::StopFirst)
                .map(|e| e.worker)
                .collect()
        };
        let mut v = views(&ws);
        let near = budget - MIB;
        assert!(total < near, "the pool's reading, not the sum, decides");
        let d = decide(&v, near);
        assert_eq!(stops(&d), vec![2], "the largest: {:?}", d.emergencies);
        assert!(d.next_tick <= FAST_TICK.max(STOP_MARGIN / 4));
        // Far from the cap, at the same growth: nothing.
        assert!(stops(&decide(&v, budget / 2)).is_empty());
        // A worker whose replacement is starting goes first, even if smaller.
        v[0].role = Role::Replaced;
        assert_eq!(stops(&decide(&v, near)), vec![0]);
        // One already stopping: its exit frees its memory, nobody else is stopped.
        v[0].role = Role::Draining;
        assert!(stops(&decide(&v, near)).is_empty());
        // Without a budget, no pool emergency.
        v[0].role = Role::Serving;
        let mut unbounded = PoolPolicy::new(&settings(), None);
        let d = unbounded.decide(&PoolView {
            now: s(30),
            workers: &v,
            in_progress: 0,
            pool_usage: Some(near),
        });
        assert!(stops(&d).is_empty());
    }

    #[test]
    fn a_replacement_that_would_not_fit_under_the_budget_is_stop_first() {
        // 4 workers at 92-95 MiB under a 400 MiB budget (ceilings 200 MiB, so none is near
        // its own threshold): the pool is over 90% of its budget, and a 70 MiB start-up
        // beside them would pass the budget's memory.high.
        let st = Settings {
            trim: false,
            ..settings()
        };
        let budget = 400 * MIB;
        let ws = workers(4, default_ceiling(budget, 4), 30, |slot, _| {
            (92 + slot as u64) * MIB
        });
        let mut pool = PoolPolicy::new(&st, Some(budget));
        pool.started(70 * MIB, s(1));
        let v = views(&ws);
        let mut recycles = vec![];
        for t in 30..40 {
            let d = pool.decide(&PoolView {
                now: s(t),
                workers: &v,
                in_progress: 0,
                pool_usage: None,
            });
            recycles.extend(d.recycles);
            if !recycles.is_empty() {
                break;
            }
        }
        assert_eq!(recycles.len(), 1, "{recycles:?}");
        let r = recycles[0];
        assert_eq!(r.worker, 3, "the largest goes first");
        assert!(r.for_budget);
        assert_eq!(r.reason, RecycleReason::Budget, "named for the budget");
        assert_eq!(r.mode, StartMode::StopFirst);
        // With room beside them, the same recycle starts its replacement first.
        let mut roomy = PoolPolicy::new(&st, Some(2 * budget));
        roomy.started(70 * MIB, s(1));
        assert_eq!(
            roomy.mode(380 * MIB, 0.0, s(3), 0),
            StartMode::ReplacementFirst
        );
        assert_eq!(
            pool.mode(300 * MIB, 0.0, s(3), 0),
            StartMode::ReplacementFirst
        );
        assert_eq!(pool.mode(320 * MIB, 0.0, s(3), 0), StartMode::StopFirst);
    }

    #[test]
    fn a_replacement_that_grew_beside_its_worker_costs_what_it_grew_to() {
        // Start-ups peak at 25 MiB when ready, but replacements reached 40 MiB serving
        // their first requests before their old workers were gone: admission plans for 40.
        let budget = 384 * MIB;
        let mut pool = PoolPolicy::new(&settings(), Some(budget));
        pool.started(25 * MIB, s(1));
        assert_eq!(pool.start_cost(), 25 * MIB);
        let usage = 340 * MIB; // 372 MiB under the brake
        assert_eq!(pool.mode(usage, 0.0, s(2), 0), StartMode::ReplacementFirst);
        pool.overlap_seen(40 * MIB);
        assert_eq!(pool.start_cost(), 40 * MIB);
        assert_eq!(pool.mode(usage, 0.0, s(2), 0), StartMode::StopFirst);
        // A later ready peak below it does not lower the cost.
        pool.started(20 * MIB, s(1));
        assert_eq!(pool.start_cost(), 40 * MIB);
    }

    #[test]
    fn a_replacement_leaves_room_for_the_largest_transient_or_the_recycle_is_stop_first() {
        // The rare-large benchmark: 4 workers under a 384 MiB budget at ~310 MiB, 25 MiB
        // start-ups, and 40 MiB reports. A replacement beside them fits under the brake
        // (372 MiB); a report landing on any worker during its start-up does not.
        let budget = 384 * MIB;
        let mut pool = PoolPolicy::new(&settings(), Some(budget));
        pool.started(25 * MIB, s(1));
        let usage = 310 * MIB;
        assert_eq!(pool.mode(usage, 0.0, s(2), 0), StartMode::ReplacementFirst);
        assert_eq!(pool.mode(usage, 0.0, s(2), 40 * MIB), StartMode::StopFirst);
        // The pool whose headroom no longer holds that transient is due now: its
        // largest worker is recycled.
        let ws = workers(4, default_ceiling(budget, 4), 60, |slot, t| {
            let base = [82, 86, 84, 95][slot];
            // Worker 0 once held a 40 MiB report for a second.
            (base + if slot == 0 && t == 30 { 40 } else { 0 }) * MIB
        });
        let v = views(&ws);
        let d = pool.decide(&PoolView {
            now: s(60),
            workers: &v,
            in_progress: 0,
            pool_usage: None,
        });
        assert_eq!(d.recycles.len(), 1, "{d:?}");
        assert_eq!(d.recycles[0].worker, 3, "the largest");
        assert_eq!(d.recycles[0].mode, StartMode::StopFirst);
        // With a 20 MiB transient it has room: nothing yet.
        let ws = workers(4, default_ceiling(budget, 4), 60, |slot, t| {
            let base = [82, 86, 84, 95][slot];
            (base + if slot == 0 && t == 30 { 20 } else { 0 }) * MIB
        });
        let v = views(&ws);
        let mut pool = PoolPolicy::new(&settings(), Some(budget));
        pool.started(25 * MIB, s(1));
        let d = pool.decide(&PoolView {
            now: s(60),
            workers: &v,
            in_progress: 0,
            pool_usage: None,
        });
        assert!(d.recycles.is_empty(), "{d:?}");
    }

    #[test]
    fn with_ready_notify_the_measured_ready_time_replaces_the_guess_faster_or_slower() {
        // As the supervisor does under notify: the configured time follows the slowest
        // recent start-up (`update`), and the policy's EWMA starts from the first one.
        let guess = Settings {
            ready_time: s(2),
            ready_measured: true,
            ..settings()
        };
        let mut pool = PoolPolicy::new(&guess, None);
        assert_eq!(pool.ready_time(), s(2), "the guess until a start is seen");
        let fast = Duration::from_millis(300);
        pool.started(10 * MIB, fast);
        pool.update(&Settings {
            ready_time: fast,
            ..guess.clone()
        });
        assert_eq!(pool.ready_time(), fast);
        pool.started(10 * MIB, s(1));
        pool.update(&Settings {
            ready_time: s(1),
            ..guess.clone()
        });
        assert_eq!(pool.ready_time(), s(1));
        // A delay is a floor: no start is ready before it.
        let delay = Settings {
            ready_time: s(1),
            ..settings()
        };
        let mut pool = PoolPolicy::new(&delay, None);
        pool.started(10 * MIB, fast);
        assert_eq!(pool.ready_time(), s(1));
        pool.started(10 * MIB, s(4));
        assert!(pool.ready_time() > s(1));
    }

    #[test]
    fn after_quick_stop_first_recycles_a_replacement_still_counts_its_ready_time() {
        // 2 workers under 64 MiB growing 4 MiB/s together, 10 MiB start-ups: stop-first
        // recycles took 0.1 s each, so the recycle time alone would admit a replacement
        // that the pool's growth over one ready time pushes past the brake.
        let st = settings();
        let budget = 64 * MIB;
        let mut pool = PoolPolicy::new(&st, Some(budget));
        pool.started(10 * MIB, s(1));
        let rate = 4.0 * MIB as f64;
        let room = pool_memory_high(budget) - 10 * MIB;
        let usage = room - (rate * 0.5) as u64;
        assert!(pool.ready_time() >= s(1));
        assert_eq!(
            pool.mode(usage, rate, Duration::from_millis(100), 0),
            StartMode::StopFirst
        );
        // Without growth, it fits.
        assert_eq!(
            pool.mode(usage, 0.0, Duration::from_millis(100), 0),
            StartMode::ReplacementFirst
        );
    }

    #[test]
    fn near_the_budget_those_with_most_to_give_back_are_trimmed_first() {
        let budget = 1024 * MIB;
        // The pool at ~80% of its budget (trim_at 75%), no worker near its own trim_at
        // (75% of a 512 MiB ceiling = 384 MiB).
        let sizes = [150u64, 260, 200, 210];
        let ws = workers(4, default_ceiling(budget, 4), 20, |slot, _| {
            sizes[slot] * MIB
        });
        let mut pool = PoolPolicy::new(&settings(), Some(budget));
        let v = views(&ws);
        let d = pool.decide(&PoolView {
            now: s(20),
            workers: &v,
            in_progress: 0,
            pool_usage: None,
        });
        assert!(d.trims.iter().all(|t| t.for_budget), "{:?}", d.trims);
        assert_eq!(d.trims.first().map(|t| t.worker), Some(1), "{:?}", d.trims);
        assert!(!d.trims.iter().any(|t| t.worker == 0), "{:?}", d.trims);
        // The same pool without a budget: nobody is trimmed.
        let mut free = PoolPolicy::new(&settings(), None);
        let d = free.decide(&PoolView {
            now: s(20),
            workers: &v,
            in_progress: 0,
            pool_usage: None,
        });
        assert!(d.trims.is_empty());
    }

    #[test]
    fn memory_is_read_faster_near_a_limit_and_once_a_second_otherwise() {
        let mut pool = PoolPolicy::new(&settings(), None);
        let flat = workers(2, 96 * MIB, 20, |_, _| 40 * MIB);
        let v = views(&flat);
        let view = |now| PoolView {
            now,
            workers: &v,
            in_progress: 0,
            pool_usage: None,
        };
        assert_eq!(pool.decide(&view(s(20))).next_tick, SLOW_TICK);
        // 1 MiB/s, 8 s from its limit: read every 0.8 s; the recycle it asks for starts.
        let growing = workers(1, 96 * MIB, 20, |_, t| (68 + t) * MIB);
        let v = views(&growing);
        let d = pool.decide(&PoolView {
            now: s(20),
            workers: &v,
            in_progress: 1,
            pool_usage: None,
        });
        assert!(d.next_tick < SLOW_TICK && d.next_tick >= FAST_TICK, "{d:?}");
    }

    #[test]
    fn a_worker_that_reaches_its_limit_within_a_ready_time_is_beyond_any_schedule() {
        let mut pool = PoolPolicy::new(&settings(), None);
        pool.started(20 * MIB, s(2));
        assert!(pool.ready_time() > s(1), "learned from the start-up");
        assert!(pool.oom_unavoidable(Duration::from_millis(900)));
        assert!(!pool.oom_unavoidable(s(5)));
    }

    #[test]
    fn a_worker_whose_headroom_no_longer_holds_the_pools_transients_goes_first() {
        // Worker 0 grows slowly towards its limit; worker 1 sits flat at 80 of 96 MiB, but
        // worker 2 once held 30 MiB for a second: the same request on worker 1 would pass
        // its limit, so its deadline is now.
        let ws = workers(3, 96 * MIB, 60, |slot, t| match slot {
            0 => (40 + t / 2) * MIB,
            1 => 80 * MIB,
            _ => (20 + if t == 30 { 30 } else { 0 }) * MIB,
        });
        let d1 = ws[1].deadline(s(60), ws[2].transient(s(60)), false);
        assert_eq!(d1, Some(Duration::ZERO));
        assert_eq!(ws[1].deadline(s(60), 0, false), None, "flat: no projection");
        assert_eq!(ws[2].transient(s(60)), 30 * MIB);
    }

    /// One worker of a first generation: ready at 1 s with 20 MiB, then growing `rate`
    /// MiB/s, read every `step_ms` until `until_ms`.
    fn young(rate: f64, step_ms: u64, until_ms: u64) -> WorkerPolicy {
        let mut rng = StdRng::seed_from_u64(3);
        let mut p =
            WorkerPolicy::new_initial(&settings(), Some(96 * MIB), Duration::ZERO, &mut rng);
        let mut t = 0;
        while t <= until_ms {
            let secs = t as f64 / 1000.0;
            let ws = if secs < 1.0 {
                20.0 * secs
            } else {
                20.0 + rate * (secs - 1.0)
            };
            p.observe(Duration::from_millis(t), (ws * MIB as f64) as u64);
            t += step_ms;
        }
        p
    }

    fn decide_one(pool: &mut PoolPolicy, p: &WorkerPolicy, role: Role, now_ms: u64) -> Decisions {
        let v = vec![WorkerView {
            slot: 0,
            role,
            policy: p,
            usage: p.working_set(),
            may_trim: false,
            may_recycle: true,
            memory_high: None,
            has_memory_high: false,
        }];
        pool.decide(&PoolView {
            now: Duration::from_millis(now_ms),
            workers: &v,
            in_progress: usize::from(role == Role::Replaced),
            pool_usage: None,
        })
    }

    #[test]
    fn a_young_worker_about_to_reach_its_ceiling_is_replaced_past_the_gate_then_stopped() {
        // 10 MiB/s from 20 MiB: the ceiling (96 MiB) at ~8.6 s. The normal projection of
        // a young worker needs 10 s of readings (2 s from trim_at, 72 MiB, at 6.2 s),
        // the gate's spacing is 5 s: without the emergencies nothing would act in time.
        let mut pool = PoolPolicy::new(&settings(), None);
        // 5 s: ~36 s from its ceiling at this rate: nothing yet, but it is read faster.
        let p = young(10.0, 250, 5000);
        assert_eq!(
            p.time_to_limit(s(5)),
            None,
            "too young for a normal projection"
        );
        let ttl = p
            .imminent_time_to_limit(s(5))
            .expect("a second of readings suffices");
        assert!(ttl > s(3) && ttl < s(4), "{ttl:?}");
        let d = decide_one(&mut pool, &p, Role::Serving, 5000);
        assert!(d.emergencies.is_empty(), "{:?}", d.emergencies);
        assert!(d.next_tick < SLOW_TICK, "{:?}", d.next_tick);
        // 7.2 s: 1.4 s left, less than a ready time and the margin: replace it now.
        let p = young(10.0, 100, 7200);
        let d = decide_one(&mut pool, &p, Role::Serving, 7200);
        assert_eq!(d.emergencies.len(), 1, "{d:?}");
        assert_eq!(d.emergencies[0].action, EmergencyAction::StartReplacement);
        assert!(d.recycles.is_empty(), "not also through the gate");
        // 8.1 s, its replacement still starting: 0.5 s left, stop it now.
        let p = young(10.0, 100, 8100);
        let d = decide_one(&mut pool, &p, Role::Replaced, 8100);
        assert_eq!(d.emergencies.len(), 1, "{d:?}");
        assert_eq!(d.emergencies[0].action, EmergencyAction::Stop);
        assert!(d.emergencies[0].time_to_limit < STOP_MARGIN);
        assert!(
            d.next_tick <= Duration::from_millis(150),
            "{:?}",
            d.next_tick
        );
        // A worker that does not grow, however near its ceiling, is left alone.
        let flat = workers(1, 96 * MIB, 30, |_, _| 93 * MIB);
        let d = decide_one(&mut pool, &flat[0], Role::Serving, 30_000);
        assert!(d.emergencies.is_empty(), "{:?}", d.emergencies);
        // Without emergencies (comparisons), the same worker is left to the gate.
        let mut off = PoolPolicy::new(&settings(), None).without_emergencies();
        let p = young(10.0, 100, 8100);
        assert!(
            decide_one(&mut off, &p, Role::Replaced, 8100)
                .emergencies
                .is_empty()
        );
    }

    #[test]
    fn urgent_starts_past_the_gate_stop_at_twice_max_recycling() {
        // Two workers both 1.2 s from their ceilings, one recycle already in progress:
        // one more start past the gate (two in progress), not two.
        let a = young(10.0, 100, 7400);
        let b = young(10.0, 100, 7400);
        let c = young(10.0, 100, 7400);
        let v: Vec<WorkerView> = [&a, &b, &c]
            .iter()
            .enumerate()
            .map(|(slot, p)| WorkerView {
                slot,
                role: if slot == 2 {
                    Role::Replaced
                } else {
                    Role::Serving
                },
                policy: p,
                usage: p.working_set(),
                may_trim: false,
                may_recycle: slot != 2,
                memory_high: None,
                has_memory_high: false,
            })
            .collect();
        let mut pool = PoolPolicy::new(&settings(), None);
        let d = pool.decide(&PoolView {
            now: Duration::from_millis(7400),
            workers: &v,
            in_progress: 1,
            pool_usage: None,
        });
        let starts = d
            .emergencies
            .iter()
            .filter(|e| e.action == EmergencyAction::StartReplacement)
            .count();
        assert_eq!(starts, 1, "{:?}", d.emergencies);
        assert!(d.recycles.is_empty(), "{:?}", d.recycles);
    }

    #[test]
    fn an_oom_kill_far_below_the_workers_own_limit_was_the_pools_or_above() {
        let (limit, budget) = (Some(200 * MIB), Some(400 * MIB));
        assert_eq!(
            OomSite::of(Some(200 * MIB), limit, budget),
            OomSite::OwnLimit
        );
        assert_eq!(
            OomSite::of(Some(196 * MIB), limit, budget),
            OomSite::OwnLimit
        );
        assert_eq!(
            OomSite::of(Some(97 * MIB), limit, budget),
            OomSite::PoolBudget
        );
        assert_eq!(OomSite::of(Some(97 * MIB), limit, None), OomSite::Above);
        // No high-water mark: its own limit, or, under a budget, either.
        assert_eq!(OomSite::of(None, limit, None), OomSite::OwnLimit);
        assert_eq!(OomSite::of(None, limit, budget), OomSite::OwnOrBudget);
        // No limit of its own: the pool's, or one above trimrun (a host or container OOM).
        assert_eq!(OomSite::of(Some(MIB), None, budget), OomSite::PoolBudget);
        assert_eq!(OomSite::of(None, None, None), OomSite::Above);
    }
}
