//! Prometheus metrics of the pool, served as text on `GET /metrics` (`--metrics ADDR`).
//!
//! Events (a trim, a recycle, a restart) are counted as they happen through
//! [`Metrics::trimmed`], [`Metrics::recycled`] and [`Metrics::restarted`]; levels (memory,
//! worker counts) are copied from each [`Snapshot`] by [`Metrics::update`]. Per-worker series
//! carry a `slot` label: a slot is stable across recycles, so its counters keep growing
//! while its pid changes (the generation is a gauge, not a label, to keep cardinality
//! bounded by the pool size).
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `trimrun_workers` | gauge | |
//! | `trimrun_target_workers` | gauge | |
//! | `trimrun_recycles_in_progress` | gauge | |
//! | `trimrun_working_set_bytes` | gauge (sum over workers) | |
//! | `trimrun_start_time_seconds` | gauge (unix time) | |
//! | `trimrun_info` | gauge, always 1 | `version`, `backend` |
//! | `trimrun_oom_kills_total` | counter | |
//! | `trimrun_worker_working_set_bytes` | gauge | `slot` |
//! | `trimrun_worker_limit_bytes` | gauge (absent without a limit) | `slot` |
//! | `trimrun_worker_peak_bytes` | gauge | `slot` |
//! | `trimrun_worker_recycle_threshold_bytes` | gauge | `slot` |
//! | `trimrun_worker_generation` | gauge | `slot` |
//! | `trimrun_worker_pid` | gauge | `slot` |
//! | `trimrun_worker_start_time_seconds` | gauge (unix time) | `slot` |
//! | `trimrun_trims_total` | counter | `slot` |
//! | `trimrun_trim_released_bytes_total` | counter | `slot` |
//! | `trimrun_trim_pause_seconds` | histogram | `slot` |
//! | `trimrun_recycles_total` | counter | `slot`, `reason` |
//! | `trimrun_restarts_total` | counter | `slot`, `cause` (`exit`, `signal`, `oom_kill`) |
//! | `trimrun_worker_state` | gauge (workers of the slot in that state) | `slot`, `state` (`starting`, `ready`, `draining`) |
//! | `trimrun_slot_oom_kills_total` | counter | `slot` |
//! | `trimrun_slot_failures` | gauge (failures in a row) | `slot` |
//! | `trimrun_slot_crash_looping` | gauge, 0 or 1 | `slot` |
//! | `trimrun_slot_backoff_seconds` | gauge (until the next start; 0 when not backing off) | `slot` |
//! | `trimrun_slot_last_exit` | gauge, always 1 | `slot`, `cause` (`exit_code_1`, `killed_by_sigsegv`, `oom_kill`, ...) |
//! | `trimrun_log_lines_dropped_total` | counter | |
//! | `trimrun_ready_time_seconds` | gauge (the start-up time the policy plans with: measured with `--ready notify`) | |
//! | `trimrun_worker_timeouts_total` | counter (workers that missed their `--timeout` watchdog) | `slot` |
//! | `trimrun_pool_budget_bytes` | gauge (absent without `--pool-limit`) | |
//! | `trimrun_pool_working_set_bytes` | gauge (the pool group's, as the budget is measured; absent without a budget or a pool group) | |
//! | `trimrun_pool_peak_bytes` | gauge (the pool group's high-water mark; absent likewise) | |
//!
//! The per-worker gauges of a slot that no longer exists (after `scale -1`) are removed at
//! the next update; its counters stay, as counters must.
//!
//! The HTTP side is deliberately tiny: one request per connection, `GET` or `HEAD` of
//! `/metrics` answers 200 in the Prometheus text format 0.0.4, any other path 404, any
//! other method 405.

use std::collections::BTreeSet;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::limit::{ConnLimiter, ConnSlot};
use super::{Snapshot, StatusError};

/// Content type of the answer to `GET /metrics`.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// Trim pause buckets, seconds: 50 µs .. 2.5 s. A trim from outside should stop a thread for
/// about as long as `malloc_trim` runs (sub-millisecond to a few ms); the upper buckets
/// catch pathological heaps and gdb-like behaviour.
const PAUSE_BUCKETS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    2.5,
];

/// No labels: a family of one series, for a gauge that may be absent.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NoLabels {}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    slot: u64,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RecycleLabels {
    slot: u64,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RestartLabels {
    slot: u64,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    slot: u64,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExitLabels {
    slot: u64,
    cause: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    version: String,
    backend: String,
}

type GaugeU64 = Gauge<u64, std::sync::atomic::AtomicU64>;
type GaugeF64 = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The pool's metrics: a registry plus handles to its families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    workers: GaugeU64,
    target_workers: GaugeU64,
    recycles_in_progress: GaugeU64,
    working_set: GaugeU64,
    start_time: GaugeF64,
    info: Family<InfoLabels, GaugeU64>,
    oom_kills: Counter,
    worker_working_set: Family<SlotLabels, GaugeU64>,
    worker_limit: Family<SlotLabels, GaugeU64>,
    worker_peak: Family<SlotLabels, GaugeU64>,
    worker_threshold: Family<SlotLabels, GaugeU64>,
    worker_generation: Family<SlotLabels, GaugeU64>,
    worker_pid: Family<SlotLabels, GaugeU64>,
    worker_start_time: Family<SlotLabels, GaugeF64>,
    trims: Family<SlotLabels, Counter>,
    released: Family<SlotLabels, Counter>,
    pause: Family<SlotLabels, Histogram>,
    recycles: Family<RecycleLabels, Counter>,
    restarts: Family<RestartLabels, Counter>,
    worker_state: Family<StateLabels, GaugeU64>,
    slot_oom_kills: Family<SlotLabels, Counter>,
    slot_failures: Family<SlotLabels, GaugeU64>,
    slot_crash_looping: Family<SlotLabels, GaugeU64>,
    slot_backoff: Family<SlotLabels, GaugeF64>,
    slot_last_exit: Family<ExitLabels, GaugeU64>,
    log_dropped: Counter,
    ready_time: GaugeF64,
    /// The pool budget's gauges: families without labels, so that they are absent (no
    /// sample) without a budget rather than a misleading 0.
    pool_budget: Family<NoLabels, GaugeU64>,
    pool_working_set: Family<NoLabels, GaugeU64>,
    pool_peak: Family<NoLabels, GaugeU64>,
    timeouts: Family<SlotLabels, Counter>,
    /// Slots with per-worker gauges, to drop those of slots that are gone.
    slots: Mutex<BTreeSet<usize>>,
}

fn pause_histogram() -> Histogram {
    Histogram::new(PAUSE_BUCKETS)
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        // Metric handles are cheap clones that share one value: the registry keeps one
        // clone of each (for encoding), the struct the other (for updating).
        let mut r = Registry::with_prefix("trimrun");
        let m = Metrics {
            workers: Default::default(),
            target_workers: Default::default(),
            recycles_in_progress: Default::default(),
            working_set: Default::default(),
            start_time: Default::default(),
            info: Default::default(),
            oom_kills: Default::default(),
            worker_working_set: Default::default(),
            worker_limit: Default::default(),
            worker_peak: Default::default(),
            worker_threshold: Default::default(),
            worker_generation: Default::default(),
            worker_pid: Default::default(),
            worker_start_time: Default::default(),
            trims: Default::default(),
            released: Default::default(),
            pause: Family::new_with_constructor(pause_histogram),
            recycles: Default::default(),
            restarts: Default::default(),
            worker_state: Default::default(),
            slot_oom_kills: Default::default(),
            slot_failures: Default::default(),
            slot_crash_looping: Default::default(),
            slot_backoff: Default::default(),
            slot_last_exit: Default::default(),
            log_dropped: Default::default(),
            ready_time: Default::default(),
            pool_budget: Default::default(),
            pool_working_set: Default::default(),
            pool_peak: Default::default(),
            timeouts: Default::default(),
            slots: Mutex::new(BTreeSet::new()),
            registry: Registry::default(),
        };
        r.register("workers", "Workers in the pool now", m.workers.clone());
        r.register(
            "target_workers",
            "Workers the pool is meant to have",
            m.target_workers.clone(),
        );
        r.register(
            "recycles_in_progress",
            "Workers being replaced now",
            m.recycles_in_progress.clone(),
        );
        r.register_with_unit(
            "working_set",
            "Working set of all workers together",
            Unit::Bytes,
            m.working_set.clone(),
        );
        r.register_with_unit(
            "start_time",
            "Start time of trimrun since the unix epoch",
            Unit::Seconds,
            m.start_time.clone(),
        );
        r.register(
            "info",
            "trimrun version and cgroup backend (always 1)",
            m.info.clone(),
        );
        r.register(
            "oom_kills",
            "Workers killed by the kernel's OOM killer",
            m.oom_kills.clone(),
        );
        r.register_with_unit(
            "worker_working_set",
            "Working set of a worker (cgroup current minus inactive file, or smaps sum)",
            Unit::Bytes,
            m.worker_working_set.clone(),
        );
        r.register_with_unit(
            "worker_limit",
            "Memory limit of a worker",
            Unit::Bytes,
            m.worker_limit.clone(),
        );
        r.register_with_unit(
            "worker_peak",
            "Highest working set seen for a worker",
            Unit::Bytes,
            m.worker_peak.clone(),
        );
        r.register_with_unit(
            "worker_recycle_threshold",
            "Working set above which a worker asks to be recycled",
            Unit::Bytes,
            m.worker_threshold.clone(),
        );
        r.register(
            "worker_generation",
            "Generation of the worker in a slot (grows with each replacement)",
            m.worker_generation.clone(),
        );
        r.register(
            "worker_pid",
            "Process id of the worker in a slot",
            m.worker_pid.clone(),
        );
        r.register_with_unit(
            "worker_start_time",
            "Start time of the worker in a slot since the unix epoch",
            Unit::Seconds,
            m.worker_start_time.clone(),
        );
        r.register(
            "trims",
            "Trims (malloc_trim injected from outside) of a worker",
            m.trims.clone(),
        );
        r.register_with_unit(
            "trim_released",
            "Memory given back to the system by trims",
            Unit::Bytes,
            m.released.clone(),
        );
        r.register_with_unit(
            "trim_pause",
            "How long a trim stopped the worker's thread",
            Unit::Seconds,
            m.pause.clone(),
        );
        r.register(
            "recycles",
            "Workers replaced, by reason",
            m.recycles.clone(),
        );
        r.register(
            "restarts",
            "Workers that died and were restarted, by cause (exit, signal, oom_kill)",
            m.restarts.clone(),
        );
        r.register(
            "worker_state",
            "Workers of a slot in each state (starting, ready, draining)",
            m.worker_state.clone(),
        );
        r.register(
            "slot_oom_kills",
            "Workers of a slot killed by the kernel's OOM killer",
            m.slot_oom_kills.clone(),
        );
        r.register(
            "slot_failures",
            "Unexpected exits of a slot's workers in a row (reset by a worker that lives)",
            m.slot_failures.clone(),
        );
        r.register(
            "slot_crash_looping",
            "1 while a slot's workers keep failing (3 or more failures in a row)",
            m.slot_crash_looping.clone(),
        );
        r.register_with_unit(
            "slot_backoff",
            "Time until a backing-off slot starts its next worker (0 when not backing off)",
            Unit::Seconds,
            m.slot_backoff.clone(),
        );
        r.register(
            "slot_last_exit",
            "How the last worker of a slot ended unexpectedly (always 1)",
            m.slot_last_exit.clone(),
        );
        r.register(
            "log_lines_dropped",
            "Lines of trimrun's log lost (stderr closed or not keeping up)",
            m.log_dropped.clone(),
        );
        r.register_with_unit(
            "ready_time",
            "How long a new worker takes to become ready, as the policy plans with it (measured from READY=1 with --ready notify)",
            Unit::Seconds,
            m.ready_time.clone(),
        );
        r.register(
            "worker_timeouts",
            "Workers that missed their watchdog (--timeout) and were replaced",
            m.timeouts.clone(),
        );
        for (name, help, g) in [
            (
                "pool_budget",
                "The pool's memory budget (--pool-limit)",
                &m.pool_budget,
            ),
            (
                "pool_working_set",
                "Working set of the pool's cgroup, as the budget is measured",
                &m.pool_working_set,
            ),
            (
                "pool_peak",
                "High-water mark of the pool's cgroup",
                &m.pool_peak,
            ),
        ] {
            r.register_with_unit(name, help, Unit::Bytes, g.clone());
        }
        Arc::new(Metrics { registry: r, ..m })
    }

    /// A trim of the worker in `slot` released `released` bytes (a negative number, memory
    /// that grew meanwhile, counts as 0) and stopped it for `pause`.
    pub fn trimmed(&self, slot: usize, released: i64, pause: Duration) {
        let l = slot_labels(slot);
        self.trims.get_or_create(&l).inc();
        self.released
            .get_or_create(&l)
            .inc_by(released.max(0) as u64);
        self.pause.get_or_create(&l).observe(pause.as_secs_f64());
    }

    /// The worker in `slot` was replaced for `reason` (`memory`, `lifetime`, `manual`,
    /// `reload`, ...).
    pub fn recycled(&self, slot: usize, reason: &str) {
        self.recycles
            .get_or_create(&RecycleLabels {
                slot: slot as u64,
                reason: label_value(reason),
            })
            .inc();
    }

    /// The worker in `slot` died and was restarted; `cause` is `exit`, `signal` or
    /// `oom_kill` (which also counts an OOM kill).
    pub fn restarted(&self, slot: usize, cause: &str) {
        self.restarts
            .get_or_create(&RestartLabels {
                slot: slot as u64,
                cause: label_value(cause),
            })
            .inc();
        if cause == "oom_kill" {
            self.oom_kills.inc();
            self.slot_oom_kills.get_or_create(&slot_labels(slot)).inc();
        }
    }

    /// The worker in `slot` missed its watchdog (`--timeout`).
    pub fn timed_out(&self, slot: usize) {
        self.timeouts.get_or_create(&slot_labels(slot)).inc();
    }

    /// Copy the levels of a snapshot into the gauges. The OOM kill counter catches up
    /// with the snapshot's count (kills the supervisor saw without a restart).
    pub fn update(&self, s: &Snapshot) {
        let now = unix_now();
        self.workers.set(s.workers.len() as u64);
        self.target_workers.set(s.target_workers as u64);
        self.recycles_in_progress.set(s.recycles_in_progress as u64);
        self.working_set.set(s.total_working_set());
        self.start_time.set(now - s.uptime_secs.max(0.0));
        let info = InfoLabels {
            version: env!("CARGO_PKG_VERSION").to_string(),
            backend: label_value(&s.backend),
        };
        if self.info.get(&info).is_none() {
            self.info.clear();
            self.info.get_or_create(&info).set(1);
        }
        catch_up(&self.oom_kills, s.oom_kills);
        catch_up(&self.log_dropped, s.log_lines_dropped);
        self.ready_time.set(s.ready_time_secs);
        let pool = s.pool.as_ref();
        for (g, v) in [
            (&self.pool_budget, pool.map(|p| p.budget)),
            (&self.pool_working_set, pool.and_then(|p| p.working_set)),
            (&self.pool_peak, pool.and_then(|p| p.peak)),
        ] {
            match v {
                Some(v) => {
                    g.get_or_create(&NoLabels::default()).set(v);
                }
                None => g.clear(),
            }
        }
        self.worker_state.clear();
        for w in &s.workers {
            self.worker_state
                .get_or_create(&StateLabels {
                    slot: w.slot as u64,
                    state: label_value(&w.state),
                })
                .inc();
        }
        self.slot_last_exit.clear();
        for f in [&self.slot_failures, &self.slot_crash_looping] {
            f.clear();
        }
        self.slot_backoff.clear();
        for x in &s.slots {
            let l = slot_labels(x.slot);
            catch_up(&self.slot_oom_kills.get_or_create(&l), x.oom_kills);
            self.slot_failures
                .get_or_create(&l)
                .set(u64::from(x.failures));
            self.slot_crash_looping
                .get_or_create(&l)
                .set(u64::from(x.failures >= super::CRASH_LOOP_FAILURES));
            self.slot_backoff
                .get_or_create(&l)
                .set(x.retry_in_secs.unwrap_or(0.0));
            if let Some(e) = &x.last_exit {
                self.slot_last_exit
                    .get_or_create(&ExitLabels {
                        slot: x.slot as u64,
                        cause: label_value(e),
                    })
                    .set(1);
            }
        }

        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let now_slots: BTreeSet<usize> = s.workers.iter().map(|w| w.slot).collect();
        for gone in slots.difference(&now_slots) {
            let l = slot_labels(*gone);
            for f in [
                &self.worker_working_set,
                &self.worker_limit,
                &self.worker_peak,
                &self.worker_threshold,
                &self.worker_generation,
                &self.worker_pid,
            ] {
                f.remove(&l);
            }
            self.worker_start_time.remove(&l);
        }
        *slots = now_slots;
        drop(slots);

        // During a recycle a slot briefly has two workers (the old one draining); the
        // gauges show the newest generation.
        let mut workers: Vec<_> = s.workers.iter().collect();
        workers.sort_by_key(|w| (w.slot, w.generation));
        for w in workers {
            let l = slot_labels(w.slot);
            self.worker_working_set.get_or_create(&l).set(w.working_set);
            set_or_remove(&self.worker_limit, &l, w.limit);
            set_or_remove(&self.worker_peak, &l, w.peak);
            set_or_remove(&self.worker_threshold, &l, w.recycle_threshold);
            self.worker_generation.get_or_create(&l).set(w.generation);
            self.worker_pid
                .get_or_create(&l)
                .set(u64::try_from(w.pid).unwrap_or(0));
            self.worker_start_time
                .get_or_create(&l)
                .set(now - w.age_secs.max(0.0));
        }
    }

    /// The Prometheus text exposition (format 0.0.4) of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

/// Move a counter up to `target` (never down).
fn catch_up(c: &Counter, target: u64) {
    let seen = c.get();
    if target > seen {
        c.inc_by(target - seen);
    }
}

fn set_or_remove(f: &Family<SlotLabels, GaugeU64>, l: &SlotLabels, v: Option<u64>) {
    match v {
        Some(v) => {
            f.get_or_create(l).set(v);
        }
        None => {
            f.remove(l);
        }
    }
}

fn slot_labels(slot: usize) -> SlotLabels {
    SlotLabels { slot: slot as u64 }
}

/// Reasons and causes come from the supervisor; keep them short label values
/// (`[a-z0-9_]`, at most 32 bytes) so a stray message cannot blow up cardinality or the
/// format.
fn label_value(s: &str) -> String {
    let v: String = s
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if v.is_empty() { "unknown".into() } else { v }
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Parse `--metrics ADDR`: a bare port means `127.0.0.1:PORT` (metrics stay on the host
/// unless asked otherwise); `HOST:PORT` and `[V6]:PORT` are taken as they are.
pub fn parse_metrics_addr(addr: &str) -> Result<SocketAddr, StatusError> {
    let bad = |reason: &str| StatusError::MetricsAddr {
        addr: addr.to_string(),
        reason: reason.to_string(),
    };
    let a = addr.trim();
    if a.is_empty() {
        return Err(bad("empty"));
    }
    if a.bytes().all(|b| b.is_ascii_digit()) {
        let port: u16 = a.parse().map_err(|_| bad("port out of range"))?;
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    if a.starts_with(':') {
        return Err(bad(
            "no host (use 0.0.0.0:PORT to listen on every interface, or PORT for localhost)",
        ));
    }
    if let Ok(sa) = a.parse::<SocketAddr>() {
        return Ok(sa);
    }
    if !a.contains(':') {
        return Err(bad("no port"));
    }
    a.to_socket_addrs()
        .map_err(|e| bad(&format!("cannot resolve: {e}")))?
        .next()
        .ok_or_else(|| bad("resolves to no address"))
}

/// Bind the metrics listener (see [`parse_metrics_addr`]).
pub async fn bind_metrics(addr: &str) -> Result<TcpListener, StatusError> {
    let sa = parse_metrics_addr(addr)?;
    TcpListener::bind(sa)
        .await
        .map_err(|e| StatusError::MetricsBind {
            addr: sa.to_string(),
            source: e,
        })
}

/// Serve `m` on `GET /metrics` at `addr` ("9100" → 127.0.0.1:9100). Binding errors are
/// returned; the accept loop runs until the handle is aborted.
pub async fn serve_metrics(addr: &str, m: Arc<Metrics>) -> Result<JoinHandle<()>, StatusError> {
    let l = bind_metrics(addr).await?;
    Ok(serve_metrics_on(l, m))
}

/// Serve `m` on an already bound listener.
pub fn serve_metrics_on(listener: TcpListener, m: Arc<Metrics>) -> JoinHandle<()> {
    if let Ok(a) = listener.local_addr() {
        info!(addr = %a, "serving metrics on /metrics");
    }
    let limiter = ConnLimiter::new(MAX_HTTP_CONNECTIONS);
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    // At the cap, the connection waiting longest for its request head
                    // makes room; when all are busy answering, this one is closed now.
                    let Some(slot) = limiter.admit() else {
                        debug!(%peer, "metrics connections all busy; closing a new one");
                        drop(stream);
                        continue;
                    };
                    let m = m.clone();
                    tokio::spawn(async move {
                        if let Err(e) = handle_http(stream, &m, &slot).await {
                            debug!(%peer, error = %e, "metrics request failed");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "metrics accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    })
}

/// Largest request head read.
const MAX_HTTP_HEAD: usize = 8192;
/// A client has this long to send its request head.
const HTTP_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// ... and this long to take the answer.
const HTTP_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once (a scraper needs one; a few dashboards a few more).
pub const MAX_HTTP_CONNECTIONS: usize = 64;

async fn handle_http(mut stream: TcpStream, m: &Metrics, slot: &ConnSlot) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        loop {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            head.extend_from_slice(&buf[..n]);
            if head.windows(4).any(|w| w == b"\r\n\r\n") || head.windows(2).any(|w| w == b"\n\n") {
                return Ok(true);
            }
            if head.len() > MAX_HTTP_HEAD {
                return Ok(true);
            }
        }
    };
    tokio::select! {
        r = tokio::time::timeout(HTTP_READ_TIMEOUT, read) => match r {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        },
        _ = slot.evicted() => return Ok(()),
    }
    slot.busy();
    let response = respond(&head, m);
    let write = async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(HTTP_WRITE_TIMEOUT, write).await {
        Ok(r) => r,
        Err(_) => Ok(()),
    }
}

/// The whole HTTP/1.1 response to a request head.
fn respond(head: &[u8], m: &Metrics) -> Vec<u8> {
    let text = String::from_utf8_lossy(head);
    let first = text.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body, extra) = if head.len() > MAX_HTTP_HEAD {
        (
            "431 Request Header Fields Too Large",
            "text/plain; charset=utf-8",
            "request head too large\n".to_string(),
            "",
        )
    } else if path != "/metrics" {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "not found: trimrun serves /metrics\n".to_string(),
            "",
        )
    } else if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain; charset=utf-8",
            "method not allowed\n".to_string(),
            "Allow: GET, HEAD\r\n",
        )
    } else {
        ("200 OK", CONTENT_TYPE, m.encode(), "")
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::WorkerSnapshot;
    use std::collections::HashMap;

    /// `name{labels}` → value, from the text format.
    fn samples(text: &str) -> HashMap<String, f64> {
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .map(|l| {
                let (k, v) = l.rsplit_once(' ').unwrap();
                (k.to_string(), v.parse::<f64>().unwrap())
            })
            .collect()
    }

    fn snapshot() -> Snapshot {
        Snapshot {
            version: 1,
            pid: 10,
            uptime_secs: 100.0,
            backend: "v2".into(),
            target_workers: 2,
            oom_kills: 0,
            recycles_in_progress: 1,
            state: "running".into(),
            workers: vec![
                WorkerSnapshot {
                    slot: 0,
                    pid: 11,
                    generation: 2,
                    working_set: 1000,
                    limit: Some(4000),
                    peak: Some(1500),
                    recycle_threshold: Some(3600),
                    age_secs: 5.0,
                    ..Default::default()
                },
                WorkerSnapshot {
                    slot: 1,
                    pid: 12,
                    generation: 1,
                    working_set: 2000,
                    limit: None,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }
    }

    #[test]
    fn gauges_follow_the_snapshot() {
        let m = Metrics::new();
        m.update(&snapshot());
        let s = samples(&m.encode());
        assert_eq!(s["trimrun_workers"], 2.0);
        assert_eq!(s["trimrun_target_workers"], 2.0);
        assert_eq!(s["trimrun_recycles_in_progress"], 1.0);
        assert_eq!(s["trimrun_working_set_bytes"], 3000.0);
        assert_eq!(s["trimrun_worker_working_set_bytes{slot=\"0\"}"], 1000.0);
        assert_eq!(s["trimrun_worker_working_set_bytes{slot=\"1\"}"], 2000.0);
        assert_eq!(s["trimrun_worker_limit_bytes{slot=\"0\"}"], 4000.0);
        assert!(!s.contains_key("trimrun_worker_limit_bytes{slot=\"1\"}"));
        assert_eq!(s["trimrun_worker_peak_bytes{slot=\"0\"}"], 1500.0);
        assert_eq!(
            s["trimrun_worker_recycle_threshold_bytes{slot=\"0\"}"],
            3600.0
        );
        assert_eq!(s["trimrun_worker_generation{slot=\"0\"}"], 2.0);
        assert_eq!(s["trimrun_worker_pid{slot=\"1\"}"], 12.0);
        let info = format!(
            "trimrun_info{{version=\"{}\",backend=\"v2\"}}",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(s[&info], 1.0);
        let start = s["trimrun_start_time_seconds"];
        assert!((unix_now() - 100.0 - start).abs() < 5.0, "{start}");
    }

    #[test]
    fn gauges_of_removed_slots_disappear_counters_stay() {
        let m = Metrics::new();
        m.update(&snapshot());
        m.trimmed(1, 10, Duration::from_micros(300));
        let mut s = snapshot();
        s.workers.pop();
        m.update(&s);
        let text = m.encode();
        assert!(
            !text.contains("trimrun_worker_working_set_bytes{slot=\"1\"}"),
            "{text}"
        );
        assert!(!text.contains("trimrun_worker_pid{slot=\"1\"}"), "{text}");
        assert!(text.contains("trimrun_trims_total{slot=\"1\"} 1"), "{text}");
        assert_eq!(samples(&text)["trimrun_workers"], 1.0);
    }

    #[test]
    fn trims_recycles_and_restarts_move_their_counters() {
        let m = Metrics::new();
        m.trimmed(0, 5 << 20, Duration::from_micros(800));
        m.trimmed(0, -4096, Duration::from_millis(3));
        m.trimmed(1, 1 << 20, Duration::from_micros(40));
        m.recycled(0, "memory");
        m.recycled(0, "memory");
        m.recycled(1, "Lifetime");
        m.restarted(1, "exit");
        m.restarted(1, "oom_kill");
        let text = m.encode();
        let s = samples(&text);
        assert_eq!(s["trimrun_trims_total{slot=\"0\"}"], 2.0);
        assert_eq!(s["trimrun_trims_total{slot=\"1\"}"], 1.0);
        assert_eq!(
            s["trimrun_trim_released_bytes_total{slot=\"0\"}"],
            (5u64 << 20) as f64
        );
        assert_eq!(s["trimrun_trim_pause_seconds_count{slot=\"0\"}"], 2.0);
        assert!((s["trimrun_trim_pause_seconds_sum{slot=\"0\"}"] - 0.0038).abs() < 1e-9);
        assert_eq!(
            s["trimrun_trim_pause_seconds_bucket{slot=\"0\",le=\"0.001\"}"], 1.0,
            "{text}"
        );
        assert_eq!(
            s["trimrun_trim_pause_seconds_bucket{slot=\"1\",le=\"5e-05\"}"], 1.0,
            "{text}"
        );
        assert_eq!(
            s["trimrun_trim_pause_seconds_bucket{slot=\"0\",le=\"+Inf\"}"],
            2.0
        );
        assert_eq!(
            s["trimrun_recycles_total{slot=\"0\",reason=\"memory\"}"],
            2.0
        );
        assert_eq!(
            s["trimrun_recycles_total{slot=\"1\",reason=\"lifetime\"}"],
            1.0
        );
        assert_eq!(s["trimrun_restarts_total{slot=\"1\",cause=\"exit\"}"], 1.0);
        assert_eq!(
            s["trimrun_restarts_total{slot=\"1\",cause=\"oom_kill\"}"],
            1.0
        );
        assert_eq!(s["trimrun_oom_kills_total"], 1.0);
    }

    #[test]
    fn watchdog_timeouts_are_counted_per_slot() {
        let m = Metrics::new();
        m.timed_out(2);
        m.timed_out(2);
        m.timed_out(0);
        let text = m.encode();
        let s = samples(&text);
        assert_eq!(
            s["trimrun_worker_timeouts_total{slot=\"2\"}"], 2.0,
            "{text}"
        );
        assert_eq!(
            s["trimrun_worker_timeouts_total{slot=\"0\"}"], 1.0,
            "{text}"
        );
        assert!(
            text.contains("# TYPE trimrun_worker_timeouts_total counter"),
            "{text}"
        );
    }

    #[test]
    fn oom_kill_counter_catches_up_with_the_snapshot_but_never_goes_back() {
        let m = Metrics::new();
        m.restarted(0, "oom_kill");
        let mut s = snapshot();
        s.oom_kills = 3;
        m.update(&s);
        assert_eq!(samples(&m.encode())["trimrun_oom_kills_total"], 3.0);
        s.oom_kills = 1;
        m.update(&s);
        assert_eq!(samples(&m.encode())["trimrun_oom_kills_total"], 3.0);
    }

    #[test]
    fn every_family_has_help_and_type_and_conventional_names() {
        let m = Metrics::new();
        m.update(&snapshot());
        m.trimmed(0, 1, Duration::from_millis(1));
        m.recycled(0, "manual");
        m.restarted(0, "signal");
        let text = m.encode();
        let types: Vec<(&str, &str)> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(|l| l.split_once(' ').unwrap())
            .collect();
        for (name, kind) in &types {
            assert!(name.starts_with("trimrun_"), "{name}");
            assert!(text.contains(&format!("# HELP {name} ")), "{name}");
            match *kind {
                "counter" => assert!(name.ends_with("_total"), "{name}"),
                _ => assert!(!name.ends_with("_total"), "{name}"),
            }
        }
        for want in [
            "trimrun_worker_working_set_bytes",
            "trimrun_trims_total",
            "trimrun_trim_released_bytes_total",
            "trimrun_trim_pause_seconds",
            "trimrun_recycles_total",
            "trimrun_restarts_total",
            "trimrun_oom_kills_total",
            "trimrun_workers",
            "trimrun_target_workers",
            "trimrun_recycles_in_progress",
            "trimrun_working_set_bytes",
        ] {
            assert!(
                types.iter().any(|(n, _)| *n == want),
                "{want} missing:\n{text}"
            );
        }
    }

    #[test]
    fn worker_states_slot_trouble_oom_kills_per_slot_and_ready_time_are_exported() {
        let m = Metrics::new();
        let mut s = snapshot();
        s.workers[0].state = "ready".into();
        s.workers[1].state = "starting".into();
        s.log_lines_dropped = 7;
        s.ready_time_secs = 2.75;
        s.slots = vec![
            crate::status::SlotSnapshot {
                slot: 0,
                oom_kills: 2,
                ..Default::default()
            },
            crate::status::SlotSnapshot {
                slot: 1,
                failures: 4,
                restarts: 4,
                last_exit: Some("exit code 1".into()),
                retry_in_secs: Some(3.5),
                ..Default::default()
            },
        ];
        m.update(&s);
        let text = m.encode();
        let v = samples(&text);
        assert_eq!(
            v["trimrun_worker_state{slot=\"0\",state=\"ready\"}"], 1.0,
            "{text}"
        );
        assert_eq!(
            v["trimrun_worker_state{slot=\"1\",state=\"starting\"}"],
            1.0
        );
        assert_eq!(v["trimrun_slot_oom_kills_total{slot=\"0\"}"], 2.0);
        assert_eq!(v["trimrun_slot_crash_looping{slot=\"1\"}"], 1.0);
        assert_eq!(v["trimrun_slot_crash_looping{slot=\"0\"}"], 0.0);
        assert_eq!(v["trimrun_slot_failures{slot=\"1\"}"], 4.0);
        assert_eq!(v["trimrun_slot_backoff_seconds{slot=\"1\"}"], 3.5);
        assert_eq!(
            v["trimrun_slot_last_exit{slot=\"1\",cause=\"exit_code_1\"}"],
            1.0
        );
        assert_eq!(v["trimrun_log_lines_dropped_total"], 7.0);
        assert_eq!(v["trimrun_ready_time_seconds"], 2.75);
        // No budget: no pool series (not a 0 that reads as an empty pool).
        assert!(!v.keys().any(|k| k.starts_with("trimrun_pool_")), "{text}");
        s.pool = Some(crate::status::PoolSnapshot {
            budget: 600 << 20,
            working_set: Some(397 << 20),
            peak: Some(550 << 20),
            cgroup: None,
        });
        m.update(&s);
        let v = samples(&m.encode());
        assert_eq!(v["trimrun_pool_budget_bytes"], (600u64 << 20) as f64);
        assert_eq!(v["trimrun_pool_working_set_bytes"], (397u64 << 20) as f64);
        assert_eq!(v["trimrun_pool_peak_bytes"], (550u64 << 20) as f64);
        s.pool = None;
        // A state that is over disappears; counters never go back.
        s.workers[1].state = "ready".into();
        s.slots[0].oom_kills = 0;
        m.update(&s);
        let v = samples(&m.encode());
        assert!(!v.contains_key("trimrun_worker_state{slot=\"1\",state=\"starting\"}"));
        assert_eq!(v["trimrun_slot_oom_kills_total{slot=\"0\"}"], 2.0);
    }

    #[test]
    fn label_values_are_tamed() {
        assert_eq!(label_value("memory"), "memory");
        assert_eq!(label_value(" OOM kill\n\"x\" "), "oom_kill__x_");
        assert_eq!(label_value(""), "unknown");
        assert_eq!(label_value(&"a".repeat(100)).len(), 32);
    }

    #[test]
    fn metrics_addr_bare_port_means_localhost() {
        assert_eq!(
            parse_metrics_addr("9100").unwrap(),
            "127.0.0.1:9100".parse().unwrap()
        );
        assert_eq!(
            parse_metrics_addr("0.0.0.0:9100").unwrap(),
            "0.0.0.0:9100".parse().unwrap()
        );
        assert_eq!(
            parse_metrics_addr("[::1]:9100").unwrap(),
            "[::1]:9100".parse().unwrap()
        );
        assert!(
            parse_metrics_addr("localhost:9100")
                .unwrap()
                .ip()
                .is_loopback()
        );
        for bad in ["", "99999", ":9100", "localhost", "1.2.3.4:x"] {
            let e = parse_metrics_addr(bad).unwrap_err().to_string();
            assert!(e.contains("invalid --metrics address"), "{bad}: {e}");
        }
    }

    #[test]
    fn http_answers_metrics_404_and_405() {
        let m = Metrics::new();
        let ok =
            String::from_utf8(respond(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", &m)).unwrap();
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("Content-Type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.contains("trimrun_workers 0"), "{ok}");
        let q = String::from_utf8(respond(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n", &m)).unwrap();
        assert!(q.starts_with("HTTP/1.1 200 OK\r\n"), "{q}");
        let head = String::from_utf8(respond(b"HEAD /metrics HTTP/1.1\r\n\r\n", &m)).unwrap();
        assert!(head.ends_with("\r\n\r\n"), "{head}");
        let nf = String::from_utf8(respond(b"GET / HTTP/1.1\r\n\r\n", &m)).unwrap();
        assert!(nf.starts_with("HTTP/1.1 404 Not Found\r\n"), "{nf}");
        let na = String::from_utf8(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &m)).unwrap();
        assert!(na.starts_with("HTTP/1.1 405 "), "{na}");
        assert!(na.contains("Allow: GET, HEAD\r\n"), "{na}");
        let junk = String::from_utf8(respond(b"\r\n\r\n", &m)).unwrap();
        assert!(junk.starts_with("HTTP/1.1 404 "), "{junk}");
    }
}
