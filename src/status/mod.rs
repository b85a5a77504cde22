//! Seeing and steering a running pool: the control socket, `trimrun status`, `trimrun ctl`
//! and the Prometheus endpoint.
//!
//! The supervisor owns the pool; this module never touches it. The control socket server
//! ([`serve`]) turns each request line into a [`ControlMsg`] on the supervisor's queue and
//! writes back whatever the supervisor answers, so every command goes through the same
//! single owner as signals and child exits do. The supervisor describes the pool with a
//! [`Snapshot`] (plain data, serialisable), which the client renders ([`render_table`]) and
//! [`metrics::Metrics::update`] turns into gauges.
//!
//! # Protocol (version 1)
//!
//! A unix stream socket carrying line-delimited JSON, one request per line, one reply line
//! per request, in order; a connection may carry any number of requests.
//!
//! ```text
//! → {"v":1,"cmd":"status"}
//! ← {"v":1,"ok":true,"data":{...snapshot...}}
//! → {"v":1,"cmd":"scale","to":"+1"}          to: "+N" | "-N" | "N" (or a bare number N)
//! → {"v":1,"cmd":"recycle","slot":0}
//! → {"v":1,"cmd":"trim","slot":null}          null or absent: every worker
//! → {"v":1,"cmd":"reload"}
//! → {"v":1,"cmd":"stop"}                     graceful, as SIGTERM
//! → {"v":1,"cmd":"stop","now":true}          fast, as SIGQUIT
//! ← {"v":1,"ok":false,"error":"..."}
//! ```
//!
//! `v` may be left out (it then means 1) so that `socat` users can type requests by hand;
//! any other version is refused with an error reply. A malformed line gets an error reply
//! and the connection carries on.
//!
//! # Where the socket lives
//!
//! See [`default_control_path`]: one predictable path per user, so `trimrun status` finds
//! the pool without arguments. A second trimrun on the same path is refused (the first is
//! asked, and answers); a stale socket left by a killed trimrun is replaced.

mod client;
pub mod limit;
pub mod metrics;
mod render;
mod server;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use crate::commands::status::{
    CtlArgs, CtlCommand, StatusArgs, TrimTarget, run_ctl_cli, run_status_cli, status_output,
};
pub use client::{Client, sanitize};
pub use render::{
    human_age, human_bytes, human_pause, render_compact, render_for, render_table, short_bytes,
};
pub use server::{ControlServer, serve};

/// Version of the control protocol spoken by this build (the `v` field of every message).
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request line the server reads (bytes, newline included); longer lines close
/// the connection with an error reply.
pub const MAX_REQUEST_LINE: usize = 64 * 1024;

/// The pool as the supervisor sees it at one instant.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct Snapshot {
    /// trimrun's version of this struct; [`PROTOCOL_VERSION`] when built by the supervisor.
    pub version: u32,
    /// Pid of the trimrun supervisor.
    pub pid: i32,
    pub uptime_secs: f64,
    /// cgroup backend in use: `v2`, `v1` or `none`.
    pub backend: String,
    pub target_workers: usize,
    pub workers: Vec<WorkerSnapshot>,
    pub oom_kills: u64,
    pub restarts: u64,
    pub recycles: u64,
    pub recycles_in_progress: usize,
    /// Workers that missed their watchdog (`--timeout`) since the pool started.
    pub timeouts: u64,
    pub trims: u64,
    pub released_bytes: u64,
    /// `starting`, `running`, `reloading` or `stopping`.
    pub state: String,
    /// Every slot's history: restarts, OOM kills, last exit, backoff.
    pub slots: Vec<SlotSnapshot>,
    /// Lines of trimrun's own log lost so far (stderr closed or not keeping up).
    pub log_lines_dropped: u64,
    /// How long a new worker takes to become ready, as the policy plans recycles with it
    /// (spacing, deadlines): with `--ready notify`, measured from the workers' `READY=1`
    /// (the slowest recent start-up); with `--ready delay:D`, at least `D`.
    pub ready_time_secs: f64,
    /// The zygote workers are forked from (`--preload`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zygote: Option<ZygoteSnapshot>,
    /// The pool budget (`--pool-limit`), and the pool group's memory against it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolSnapshot>,
}

/// The pool budget of `--pool-limit`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct PoolSnapshot {
    /// `--pool-limit` in bytes: the pool group's hard cap.
    pub budget: u64,
    /// The pool group's working set at the last memory tick, as the budget is measured
    /// (all workers; on v2 trimrun's own leaf too). None without a pool group (backend
    /// `none`: then the workers' sum, as `trimrun status` shows).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub working_set: Option<u64>,
    /// The pool group's high-water mark since it was created.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak: Option<u64>,
    /// The pool group's directory.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<String>,
}

/// One slot of the pool across its generations.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct SlotSnapshot {
    pub slot: usize,
    /// Unexpected exits of this slot's workers (crashes, OOM kills, not ready in time).
    pub restarts: u64,
    pub oom_kills: u64,
    /// Failures in a row, reset by a worker that lives long enough.
    pub failures: u32,
    /// How the last worker of this slot ended unexpectedly: `exit code 1`,
    /// `killed by SIGSEGV`, `oom_kill`, `not ready in time`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Seconds until the slot's next start, while it is backing off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_in_secs: Option<f64>,
}

/// Failures in a row from which a slot counts as crash-looping.
pub const CRASH_LOOP_FAILURES: u32 = 3;

impl SlotSnapshot {
    /// `crash-looping`, `backing off`, or None when the slot is fine.
    pub fn trouble(&self) -> Option<&'static str> {
        if self.failures >= CRASH_LOOP_FAILURES {
            Some("crash-looping")
        } else if self.retry_in_secs.is_some() {
            Some("backing off")
        } else {
            None
        }
    }
}

/// The zygote of `--preload`.
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct ZygoteSnapshot {
    pub pid: i32,
    /// Counts the zygotes of this pool (a HUP or a restart makes a new one).
    pub generation: u64,
    /// `starting` (importing the app) or `ready`.
    pub state: String,
    pub age_secs: f64,
    /// Workers forked by all zygotes of this pool.
    pub forks: u64,
}

/// One worker (one slot of the pool, one generation of that slot).
#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(default)]
pub struct WorkerSnapshot {
    pub slot: usize,
    pub pid: i32,
    pub generation: u64,
    /// `starting`, `ready`, `draining`, or `hung` (missed its watchdog, being killed).
    pub state: String,
    pub age_secs: f64,
    /// Bytes: cgroup working set (current − inactive_file), or the smaps sum without cgroups.
    pub working_set: u64,
    /// The worker's memory limit in bytes, if it has one.
    pub limit: Option<u64>,
    /// Highest working set seen for this worker.
    pub peak: Option<u64>,
    pub rss: Option<u64>,
    pub trims: u64,
    pub released_bytes: u64,
    pub last_trim_pause_us: Option<u64>,
    /// Recycles of this slot so far (all generations).
    pub recycles: u64,
    /// Reason of the last recycle or restart of this slot (`memory`, `lifetime`, `manual`, ...).
    pub last_reason: Option<String>,
    /// Working set above which this worker asks to be recycled (its own jittered draw).
    pub recycle_threshold: Option<u64>,
    /// Watchdog timeouts of this slot so far (all generations).
    pub timeouts: u64,
}

impl Snapshot {
    /// The pool's memory: the pool group's reading under a budget, else the workers' sum.
    pub fn pool_memory(&self) -> u64 {
        self.pool
            .as_ref()
            .and_then(|p| p.working_set)
            .unwrap_or_else(|| self.total_working_set())
    }

    /// Sum of the workers' working sets.
    pub fn total_working_set(&self) -> u64 {
        self.workers.iter().map(|w| w.working_set).sum()
    }

    /// What the pool's memory is held to: the budget, else the sum of the workers' limits
    /// (None when any worker has none).
    pub fn total_limit(&self) -> Option<u64> {
        if let Some(p) = &self.pool {
            return Some(p.budget);
        }
        if self.workers.is_empty() {
            return None;
        }
        self.workers.iter().map(|w| w.limit).sum()
    }
}

/// A command for the supervisor. On the wire it is the `cmd` field plus its arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Reply with the [`Snapshot`] as `data`.
    Status,
    /// Replace every worker, one at a time, as SIGHUP does.
    Reload,
    /// Change the number of workers.
    Scale { to: ScaleTo },
    /// Replace one worker (surge, drain, stop).
    Recycle { slot: usize },
    /// Trim one worker now, or every worker when `slot` is None.
    Trim {
        #[serde(default)]
        slot: Option<usize>,
    },
    /// Stop trimrun: gracefully as SIGTERM does (drain every worker, exit 0), or with
    /// `now` as SIGQUIT does (kill every worker now). Older clients sent `graceful`; it is
    /// ignored: a stop is graceful unless `now` says otherwise.
    Stop {
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        now: bool,
    },
}

/// The argument of `scale`: `+N`, `-N` or `N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleTo {
    Up(usize),
    Down(usize),
    Exactly(usize),
}

impl ScaleTo {
    /// The worker count this asks for, given the current target. `Down` saturates at 0;
    /// the supervisor decides what the smallest pool is.
    pub fn resolve(self, current: usize) -> usize {
        match self {
            ScaleTo::Up(n) => current.saturating_add(n),
            ScaleTo::Down(n) => current.saturating_sub(n),
            ScaleTo::Exactly(n) => n,
        }
    }
}

impl fmt::Display for ScaleTo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScaleTo::Up(n) => write!(f, "+{n}"),
            ScaleTo::Down(n) => write!(f, "-{n}"),
            ScaleTo::Exactly(n) => write!(f, "{n}"),
        }
    }
}

impl FromStr for ScaleTo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || {
            format!(
                "invalid worker count {s:?}: expected +N to add N workers, -N to remove N, or N for exactly N (e.g. +1, -1, 4)"
            )
        };
        let (sign, digits) = match s.as_bytes().first() {
            Some(b'+' | b'-') => (Some(s.as_bytes()[0]), &s[1..]),
            _ => (None, s),
        };
        if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: usize = digits.parse().map_err(|_| bad())?;
        match (sign, n) {
            (None, 0) => Err("invalid worker count 0: a pool needs at least one worker \
                 (use `trimrun ctl stop` to stop it)"
                .to_string()),
            (Some(_), 0) => Err(format!(
                "invalid worker count {s:?}: scaling by zero changes nothing"
            )),
            (Some(b'+'), n) => Ok(ScaleTo::Up(n)),
            (Some(_), n) => Ok(ScaleTo::Down(n)),
            (None, n) => Ok(ScaleTo::Exactly(n)),
        }
    }
}

impl Serialize for ScaleTo {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        ser.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ScaleTo {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Number(u64),
        }
        let text = match Raw::deserialize(de)? {
            Raw::Text(s) => s,
            Raw::Number(n) => n.to_string(),
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What the supervisor answers: `Ok(data)` (`null` when there is nothing to say) or an
/// error message for the operator.
pub type Reply = Result<serde_json::Value, String>;

/// One control request on its way to the supervisor, with the channel for its answer.
#[derive(Debug)]
pub struct ControlMsg {
    pub req: Request,
    pub reply: tokio::sync::oneshot::Sender<Reply>,
}

/// A request line as it travels: the version plus the command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRequest {
    #[serde(default = "default_version")]
    pub v: u32,
    #[serde(flatten)]
    pub req: Request,
}

fn default_version() -> u32 {
    PROTOCOL_VERSION
}

/// A reply line as it travels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WireReply {
    pub v: u32,
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl WireReply {
    pub fn from_reply(r: Reply) -> Self {
        match r {
            Ok(data) => WireReply {
                v: PROTOCOL_VERSION,
                ok: true,
                data: Some(data),
                error: None,
            },
            Err(e) => WireReply::error(e),
        }
    }

    pub fn error(e: impl Into<String>) -> Self {
        WireReply {
            v: PROTOCOL_VERSION,
            ok: false,
            data: None,
            error: Some(e.into()),
        }
    }

    /// The JSON line (without its newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a reply always serialises")
    }
}

/// Parse one request line. Errors are the message for the `error` field of the reply.
pub fn parse_request_line(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|_| "request is not UTF-8".to_string())?;
    let text = text.trim();
    refuse_duplicate_keys(text)?;
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| format!("malformed request (expected one JSON object per line, e.g. {{\"v\":1,\"cmd\":\"status\"}}): {e}"))?;
    if !value.is_object() {
        return Err(
            "malformed request: expected a JSON object such as {\"v\":1,\"cmd\":\"status\"}".into(),
        );
    }
    if let Some(v) = value.get("v") {
        match v.as_u64() {
            Some(v) if v == u64::from(PROTOCOL_VERSION) => {}
            _ => {
                return Err(format!(
                    "unsupported protocol version {v} (this trimrun speaks version {PROTOCOL_VERSION})"
                ));
            }
        }
    }
    if value.get("cmd").is_none() {
        return Err("malformed request: missing \"cmd\" (one of status, reload, scale, recycle, trim, stop)".into());
    }
    let wire: WireRequest =
        serde_json::from_value(value).map_err(|e| format!("invalid request: {e}"))?;
    Ok(wire.req)
}

/// A key given twice in one object is refused: serde_json would keep the last, so
/// `{"cmd":"status","cmd":"stop"}` would be read as whichever a filter in between did not see.
fn refuse_duplicate_keys(text: &str) -> Result<(), String> {
    use serde::de::{DeserializeSeed, Deserializer, Error, MapAccess, SeqAccess, Visitor};
    struct Unique;
    impl<'de> DeserializeSeed<'de> for Unique {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Unique {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(k) = m.next_key::<String>()? {
                if !seen.insert(k.clone()) {
                    return Err(A::Error::custom(format!("key \"{k}\" given twice")));
                }
                m.next_value_seed(Unique)?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
            while s.next_element_seed(Unique)?.is_some() {}
            Ok(())
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
    }
    let mut d = serde_json::Deserializer::from_str(text);
    match Unique.deserialize(&mut d) {
        Err(e) if e.to_string().contains("given twice") => {
            Err(format!("malformed request: {e} (give each key once)"))
        }
        // Other syntax errors are reported by the parse that follows.
        _ => Ok(()),
    }
}

/// The request line for `req` (without its newline).
pub fn request_line(req: &Request) -> String {
    serde_json::to_string(&WireRequest {
        v: PROTOCOL_VERSION,
        req: req.clone(),
    })
    .expect("a request always serialises")
}

/// Errors of the control socket, its clients and the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "control socket {} is in use by a running trimrun{}; pass --control to pick another path",
        path.display(),
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    InUse { path: PathBuf, pid: Option<i32> },
    #[error(
        "{} exists and is not a socket; refusing to replace it (remove it, or pass --control to pick another path)",
        path.display()
    )]
    NotASocket { path: PathBuf },
    #[error(
        "control socket path {} is too long ({len} bytes; a unix socket path has at most {max}): pass a shorter --control",
        path.display()
    )]
    PathTooLong {
        path: PathBuf,
        len: usize,
        max: usize,
    },
    #[error("refusing to use {} for the control socket: {reason}", path.display())]
    InsecureDir { path: PathBuf, reason: String },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no trimrun is listening on {} (is it running? pass --control PATH)", path.display())]
    NotListening { path: PathBuf },
    #[error(
        "permission denied connecting to {}{} (run as that user or root, or pass --control PATH)",
        path.display(),
        owner.map(|u| format!(": the control socket is mode 0600 and belongs to uid {u}")).unwrap_or_default()
    )]
    PermissionDenied { path: PathBuf, owner: Option<u32> },
    #[error("trimrun on {} did not answer within {secs}s", path.display())]
    Timeout { path: PathBuf, secs: u64 },
    #[error("trimrun on {} closed the connection without answering", path.display())]
    Closed { path: PathBuf },
    #[error("unexpected reply from {}: {detail}", path.display())]
    Protocol { path: PathBuf, detail: String },
    /// The supervisor answered with an error.
    #[error("{0}")]
    Remote(String),
    #[error(
        "invalid --metrics address {addr:?}: {reason} (expected PORT for 127.0.0.1:PORT, HOST:PORT, or [IPV6]:PORT)"
    )]
    MetricsAddr { addr: String, reason: String },
    #[error("cannot listen for metrics on {addr}: {source}")]
    MetricsBind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

/// The control socket of a trimrun run by root, unless `--control` says otherwise.
pub const ROOT_CONTROL_PATH: &str = "/run/trimrun/trimrun.sock";

/// Where the control socket lives when `--control` (or `TRIMRUN_CONTROL`) is not given:
///
/// - root: `/run/trimrun/trimrun.sock`;
/// - other users with `XDG_RUNTIME_DIR` set (a login session): `$XDG_RUNTIME_DIR/trimrun.sock`;
/// - other users without it (e.g. a system service with `User=`):
///   `$TMPDIR/trimrun-<uid>/trimrun.sock` (`/tmp` when TMPDIR is unset); the directory is
///   created 0700 and refused if someone else owns it.
///
/// The server and the client compute the same path, so `trimrun status` run by the same
/// user finds the pool without arguments. Two pools of one user need `--control` for the
/// second (the second start says so).
pub fn default_control_path() -> PathBuf {
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from(ROOT_CONTROL_PATH);
    }
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR") {
        let dir = PathBuf::from(dir);
        if dir.is_absolute() {
            return dir.join("trimrun.sock");
        }
    }
    fallback_dir(uid.as_raw()).join("trimrun.sock")
}

/// The per-user directory under the temp dir used when there is no runtime dir.
pub(crate) fn fallback_dir(uid: u32) -> PathBuf {
    std::env::temp_dir().join(format!("trimrun-{uid}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_given_twice_is_refused_never_last_wins() {
        for line in [
            &br#"{"v":1,"cmd":"status","cmd":"stop"}"#[..],
            br#"{"cmd":"stop","graceful":true,"graceful":false}"#,
            br#"{"cmd":"trim","slot":1,"slot":2}"#,
        ] {
            let e = parse_request_line(line).unwrap_err();
            assert!(e.contains("given twice"), "{e}");
        }
        assert_eq!(
            parse_request_line(br#"{"v":1,"cmd":"status"}"#).unwrap(),
            Request::Status
        );
    }

    #[test]
    fn scale_to_parses_relative_and_absolute_counts() {
        assert_eq!("+1".parse::<ScaleTo>().unwrap(), ScaleTo::Up(1));
        assert_eq!("-2".parse::<ScaleTo>().unwrap(), ScaleTo::Down(2));
        assert_eq!("3".parse::<ScaleTo>().unwrap(), ScaleTo::Exactly(3));
        assert_eq!(" 12 ".parse::<ScaleTo>().unwrap(), ScaleTo::Exactly(12));
        for bad in [
            "", "+", "-", "x", "+-1", "1.5", "+1x", "0", "+0", "-0", "++1",
        ] {
            let err = bad.parse::<ScaleTo>().unwrap_err();
            assert!(err.contains("worker count"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn scale_to_resolves_against_the_current_target() {
        assert_eq!(ScaleTo::Up(2).resolve(3), 5);
        assert_eq!(ScaleTo::Down(5).resolve(3), 0);
        assert_eq!(ScaleTo::Exactly(7).resolve(3), 7);
    }

    #[test]
    fn requests_round_trip_through_the_wire_format() {
        let reqs = [
            Request::Status,
            Request::Reload,
            Request::Scale { to: ScaleTo::Up(1) },
            Request::Scale {
                to: ScaleTo::Down(1),
            },
            Request::Scale {
                to: ScaleTo::Exactly(4),
            },
            Request::Recycle { slot: 3 },
            Request::Trim { slot: Some(0) },
            Request::Trim { slot: None },
            Request::Stop { now: true },
            Request::Stop { now: false },
        ];
        for req in reqs {
            let line = request_line(&req);
            assert!(line.starts_with("{\"v\":1,"), "{line}");
            assert_eq!(parse_request_line(line.as_bytes()).unwrap(), req, "{line}");
        }
        assert_eq!(
            request_line(&Request::Scale { to: ScaleTo::Up(1) }),
            r#"{"v":1,"cmd":"scale","to":"+1"}"#
        );
    }

    #[test]
    fn hand_typed_requests_are_accepted() {
        let ok = [
            (r#"{"cmd":"status"}"#, Request::Status),
            (r#" {"v":1,"cmd":"status"} "#, Request::Status),
            (
                r#"{"v":1,"cmd":"scale","to":3}"#,
                Request::Scale {
                    to: ScaleTo::Exactly(3),
                },
            ),
            (r#"{"v":1,"cmd":"trim"}"#, Request::Trim { slot: None }),
            (
                r#"{"v":1,"cmd":"trim","slot":null}"#,
                Request::Trim { slot: None },
            ),
            (r#"{"v":1,"cmd":"stop"}"#, Request::Stop { now: false }),
            (
                r#"{"v":1,"cmd":"stop","graceful":false}"#,
                Request::Stop { now: false },
            ),
            (r#"{"cmd":"stop","now":true}"#, Request::Stop { now: true }),
        ];
        for (line, want) in ok {
            assert_eq!(parse_request_line(line.as_bytes()).unwrap(), want, "{line}");
        }
    }

    #[test]
    fn malformed_requests_get_a_message_naming_the_problem() {
        let cases = [
            ("not json", "malformed request"),
            ("[1,2]", "expected a JSON object"),
            (r#"{"v":1}"#, "missing \"cmd\""),
            (
                r#"{"v":2,"cmd":"status"}"#,
                "unsupported protocol version 2",
            ),
            (
                r#"{"v":"1","cmd":"status"}"#,
                "unsupported protocol version",
            ),
            (r#"{"v":1,"cmd":"explode"}"#, "unknown variant"),
            (r#"{"v":1,"cmd":"recycle"}"#, "missing field `slot`"),
            (r#"{"v":1,"cmd":"scale","to":"0"}"#, "at least one worker"),
            (r#"{"v":1,"cmd":"scale","to":"+x"}"#, "invalid worker count"),
        ];
        for (line, want) in cases {
            let err = parse_request_line(line.as_bytes()).unwrap_err();
            assert!(err.contains(want), "{line}: {err}");
        }
        assert!(
            parse_request_line(b"\xff\xfe")
                .unwrap_err()
                .contains("UTF-8")
        );
    }

    #[test]
    fn replies_have_version_ok_and_data_or_error() {
        let ok = WireReply::from_reply(Ok(serde_json::json!({"a": 1}))).to_line();
        assert_eq!(ok, r#"{"v":1,"ok":true,"data":{"a":1}}"#);
        let null = WireReply::from_reply(Ok(serde_json::Value::Null)).to_line();
        assert_eq!(null, r#"{"v":1,"ok":true,"data":null}"#);
        let err = WireReply::from_reply(Err("no such slot 9".into())).to_line();
        assert_eq!(err, r#"{"v":1,"ok":false,"error":"no such slot 9"}"#);
    }

    #[test]
    fn snapshot_round_trips_and_tolerates_missing_fields() {
        let s = Snapshot {
            version: PROTOCOL_VERSION,
            pid: 42,
            backend: "v2".into(),
            workers: vec![WorkerSnapshot {
                slot: 1,
                pid: 43,
                limit: Some(1 << 30),
                last_reason: Some("memory".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let text = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<Snapshot>(&text).unwrap(), s);
        // An older or newer peer may omit fields: they default rather than fail.
        let partial: Snapshot =
            serde_json::from_str(r#"{"pid":7,"workers":[{"slot":0,"pid":8}],"extra":true}"#)
                .unwrap();
        assert_eq!(partial.pid, 7);
        assert_eq!(partial.workers[0].pid, 8);
    }

    #[test]
    fn errors_say_what_to_do() {
        let e = StatusError::InUse {
            path: "/run/trimrun/trimrun.sock".into(),
            pid: Some(123),
        };
        assert_eq!(
            e.to_string(),
            "control socket /run/trimrun/trimrun.sock is in use by a running trimrun (pid 123); pass --control to pick another path"
        );
        let e = StatusError::NotListening {
            path: "/x.sock".into(),
        };
        assert_eq!(
            e.to_string(),
            "no trimrun is listening on /x.sock (is it running? pass --control PATH)"
        );
    }

    #[test]
    fn default_control_path_is_predictable() {
        let p = default_control_path();
        assert!(p.is_absolute());
        assert_eq!(p.file_name().unwrap(), "trimrun.sock");
        assert_eq!(p, default_control_path());
        if nix::unistd::geteuid().is_root() {
            assert_eq!(p, PathBuf::from("/run/trimrun/trimrun.sock"));
        }
    }
}
