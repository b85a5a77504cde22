//! trimrun's own log output: text or JSON lines on stderr, written so that logging can
//! never take the pool down.
//!
//! - Every line goes through a bounded queue to one writer thread. The supervisor never
//!   blocks on a slow reader (a full pipe to journald, a paused terminal), and a write that
//!   fails (`EPIPE` after `| head`, `EIO` on a closed terminal) is dropped and counted,
//!   never a panic (tracing-subscriber's own writer `eprintln!`s its write errors, which
//!   panics on a closed stderr). Rust's runtime already ignores SIGPIPE, so a closed reader
//!   shows up as `EPIPE` rather than a signal; [`init`] re-checks that.
//! - Lines that were dropped because the queue was full are reported, with their count,
//!   as soon as writing works again; [`dropped_lines`] counts every lost line
//!   (`trimrun_log_lines_dropped_total`).
//! - `--log-format json` writes one JSON object per line with fields of their real type
//!   (numbers, strings, booleans, arrays); an absent `Option` is an absent field.
//! - Text is coloured only when stderr is a terminal and `NO_COLOR` is unset.
//!
//! Worker output does not pass through here unless `--worker-output json` asks for it
//! (see [`worker_line`]).

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

/// Lines queued for the writer thread before new ones are dropped.
const QUEUE_LINES: usize = 4096;

/// The output format of trimrun's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Text,
    Json,
}

enum Msg {
    Line(Vec<u8>),
    /// Reply when everything queued before has been written (or dropped).
    Flush(SyncSender<()>),
}

struct Sink {
    tx: SyncSender<Msg>,
    format: Format,
}

static SINK: OnceLock<Sink> = OnceLock::new();
/// Lines that never reached stderr: queue full, or the write failed.
static DROPPED: AtomicU64 = AtomicU64::new(0);
/// Lines dropped because the queue was full, not yet reported in the log.
static UNREPORTED: AtomicU64 = AtomicU64::new(0);
/// stderr is gone for good (EPIPE): stop trying.
static BROKEN: AtomicBool = AtomicBool::new(false);

/// Lines of log output lost so far (queue full or stderr not writable).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// Set up logging on stderr: `level` unless `TRIMRUN_LOG` says otherwise. Call once.
pub fn init(level: &str, format: Format) {
    let (tx, rx) = sync_channel(QUEUE_LINES);
    let started = std::thread::Builder::new()
        .name("trimrun-log".into())
        .spawn(move || writer_thread(rx, format, std::io::stderr()));
    if started.is_err() {
        // Without the thread lines would queue up and then be dropped; nothing else to do.
        BROKEN.store(true, Ordering::Relaxed);
    }
    let _ = SINK.set(Sink { tx, format });
    let filter = EnvFilter::try_from_env("TRIMRUN_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(QueueWriter)
        .with_target(false)
        .with_ansi(ansi)
        .log_internal_errors(false);
    match format {
        Format::Json => builder.event_format(JsonFormat).init(),
        Format::Text => builder.init(),
    }
}

/// Print a line that is not an event (a fatal start-up error): queued in order with the
/// log, so it appears once and after everything logged before it. Falls back to stderr
/// when logging was never set up.
pub fn print_line(text: &str) {
    let mut line = text.trim_end_matches('\n').as_bytes().to_vec();
    line.push(b'\n');
    match SINK.get() {
        Some(_) => enqueue(line),
        None => {
            let _ = std::io::stderr().write_all(&line);
        }
    }
}

/// Whether the log is JSON (for callers that print something that must fit in it).
pub fn format() -> Format {
    SINK.get().map_or(Format::Text, |s| s.format)
}

/// Write out what is queued, waiting at most `timeout` (a stuck stderr must not keep
/// trimrun from exiting).
pub fn flush(timeout: Duration) {
    let Some(sink) = SINK.get() else { return };
    let (tx, rx) = sync_channel(1);
    if sink.tx.try_send(Msg::Flush(tx)).is_ok() {
        let _ = rx.recv_timeout(timeout);
    }
}

fn enqueue(line: Vec<u8>) {
    let Some(sink) = SINK.get() else { return };
    if BROKEN.load(Ordering::Relaxed) {
        DROPPED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    match sink.tx.try_send(Msg::Line(line)) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
            DROPPED.fetch_add(1, Ordering::Relaxed);
            UNREPORTED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn writer_thread(rx: Receiver<Msg>, format: Format, mut out: impl Write) {
    for msg in rx {
        match msg {
            Msg::Flush(done) => {
                let _ = out.flush();
                let _ = done.send(());
            }
            Msg::Line(line) => {
                if BROKEN.load(Ordering::Relaxed) {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                let lost = UNREPORTED.swap(0, Ordering::Relaxed);
                if lost > 0 {
                    let _ = write_line(&mut out, &dropped_notice(format, lost));
                }
                if let Err(e) = write_line(&mut out, &line) {
                    DROPPED.fetch_add(1, Ordering::Relaxed);
                    if e.kind() == std::io::ErrorKind::BrokenPipe {
                        BROKEN.store(true, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

fn write_line(out: &mut impl Write, line: &[u8]) -> std::io::Result<()> {
    // EINTR is retried by write_all; anything else loses this line only.
    out.write_all(line)
}

/// The line that says `n` lines were lost, in the log's format.
fn dropped_notice(format: Format, n: u64) -> Vec<u8> {
    let msg = "log lines dropped: stderr was not keeping up";
    let line = match format {
        Format::Json => serde_json::json!({
            "timestamp": rfc3339_now(),
            "level": "WARN",
            "message": msg,
            "dropped": n,
        })
        .to_string(),
        Format::Text => format!("{}  WARN {msg} dropped={n}", rfc3339_now()),
    };
    let mut v = line.into_bytes();
    v.push(b'\n');
    v
}

/// The `MakeWriter` of the subscriber: each event is collected whole, then queued.
struct QueueWriter;

/// One event's bytes, queued on drop.
struct EventBuf(Vec<u8>);

impl Write for EventBuf {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for EventBuf {
    fn drop(&mut self) {
        if !self.0.is_empty() {
            enqueue(std::mem::take(&mut self.0));
        }
    }
}

impl<'a> MakeWriter<'a> for QueueWriter {
    type Writer = EventBuf;
    fn make_writer(&'a self) -> EventBuf {
        EventBuf(Vec::with_capacity(256))
    }
}

/// A value logged as a JSON array (or any JSON) in `--log-format json`, and as the same
/// JSON text in text logs: `info!(cmd = ?AsJson(&cmd), ...)`.
pub struct AsJson<'a, T: serde::Serialize>(pub &'a T);

impl<T: serde::Serialize> fmt::Debug for AsJson<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match serde_json::to_string(self.0) {
            Ok(s) => f.write_str(&s),
            Err(_) => f.write_str("null"),
        }
    }
}

/// The JSON event format: `timestamp`, `level`, `message`, then the event's fields with
/// their own types. Debug-formatted values that are JSON arrays or objects (see
/// [`AsJson`]) are embedded as such; other Debug values are strings.
struct JsonFormat;

impl<S, N> FormatEvent<S, N> for JsonFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut obj = serde_json::Map::new();
        obj.insert("timestamp".into(), rfc3339_now().into());
        obj.insert(
            "level".into(),
            event.metadata().level().as_str().to_string().into(),
        );
        let mut v = JsonVisitor(&mut obj);
        event.record(&mut v);
        let line = serde_json::Value::Object(obj).to_string();
        writeln!(writer, "{line}")
    }
}

struct JsonVisitor<'a>(&'a mut serde_json::Map<String, serde_json::Value>);

impl JsonVisitor<'_> {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        self.0.insert(field.name().to_string(), value);
    }
}

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value)
            .map(serde_json::Value::Number)
            .unwrap_or_else(|| value.to_string().into());
        self.put(field, v);
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_i128(&mut self, field: &Field, value: i128) {
        let v = i64::try_from(value)
            .map(Into::into)
            .unwrap_or_else(|_| value.to_string().into());
        self.put(field, v);
    }
    fn record_u128(&mut self, field: &Field, value: u128) {
        let v = u64::try_from(value)
            .map(Into::into)
            .unwrap_or_else(|_| value.to_string().into());
        self.put(field, v);
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, value.to_string().into());
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        if field.name() != "message"
            && (text.starts_with('[') || text.starts_with('{'))
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
        {
            self.put(field, v);
            return;
        }
        self.put(field, text.into());
    }
}

/// Now as `2026-12-02T12:55:01.123456Z`.
fn rfc3339_now() -> String {
    rfc3339(SystemTime::now())
}

fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, day) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_micros()
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Worker output in JSON mode: one line a worker wrote, as a JSON event with its slot,
/// pid and stream (`stdout`/`stderr`). Invalid UTF-8 is replaced, never dropped.
pub fn worker_line(slot: usize, pid: i32, stream: &str, line: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end_matches(['\n', '\r']);
    let mut v = serde_json::json!({
        "timestamp": rfc3339_now(),
        "level": "INFO",
        "message": text,
        "source": "worker",
        "stream": stream,
        "slot": slot,
        "pid": pid,
    })
    .to_string()
    .into_bytes();
    v.push(b'\n');
    v
}

/// Queue a line a worker wrote (already formatted by [`worker_line`]).
pub fn write_worker_line(line: Vec<u8>) {
    enqueue(line);
}

/// A guard for tests that share the process-wide counters.
#[cfg(test)]
static TEST_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    struct Fails(std::io::ErrorKind);
    impl Write for Fails {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(self.0.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Err(self.0.into())
        }
    }

    #[test]
    fn a_closed_stderr_is_counted_not_fatal() {
        let _g = TEST_LOCK.lock().unwrap();
        let before = dropped_lines();
        let (tx, rx) = sync_channel(8);
        for i in 0..3 {
            tx.send(Msg::Line(format!("line {i}\n").into_bytes()))
                .unwrap();
        }
        drop(tx);
        writer_thread(rx, Format::Text, Fails(std::io::ErrorKind::BrokenPipe));
        assert_eq!(dropped_lines() - before, 3);
        BROKEN.store(false, Ordering::Relaxed);
    }

    #[test]
    fn dropped_lines_are_reported_when_writing_resumes() {
        let _g = TEST_LOCK.lock().unwrap();
        UNREPORTED.store(5, Ordering::Relaxed);
        let (tx, rx) = sync_channel(8);
        tx.send(Msg::Line(b"next\n".to_vec())).unwrap();
        drop(tx);
        let mut out = Vec::new();
        writer_thread(rx, Format::Json, &mut out);
        let text = String::from_utf8(out).unwrap();
        let mut lines = text.lines();
        let notice: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
        assert_eq!(notice["dropped"], 5);
        assert_eq!(notice["level"], "WARN");
        assert_eq!(lines.next(), Some("next"));
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let t = UNIX_EPOCH + Duration::from_micros(1_764_680_101_123_456);
        assert_eq!(rfc3339(t), "2025-12-02T12:55:01.123456Z");
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }

    #[test]
    fn json_fields_keep_their_types() {
        use tracing_subscriber::layer::SubscriberExt;
        let buf = std::sync::Arc::new(Mutex::new(Vec::new()));
        let b2 = buf.clone();
        let layer = tracing_subscriber::fmt::layer()
            .event_format(JsonFormat)
            .with_writer(move || Capture(b2.clone()));
        let sub = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(sub, || {
            let limit: Option<u64> = Some(201_326_592);
            let none: Option<u64> = None;
            let waited: Option<f64> = Some(0.0);
            let cmd = vec!["python3".to_string(), "app \"x\".py".to_string()];
            tracing::info!(
                limit,
                none,
                waited_s = waited,
                ok = true,
                slot = 3usize,
                cmd = ?AsJson(&cmd),
                path = %"/x",
                "starting pool"
            );
        });
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["limit"], 201_326_592u64, "{text}");
        assert!(v.get("none").is_none(), "{text}");
        assert_eq!(v["waited_s"], 0.0, "{text}");
        assert_eq!(v["ok"], true);
        assert_eq!(v["slot"], 3);
        assert_eq!(v["cmd"], serde_json::json!(["python3", "app \"x\".py"]));
        assert_eq!(v["path"], "/x");
        assert_eq!(v["message"], "starting pool");
        assert_eq!(v["level"], "INFO");
        assert!(!text.contains("Some("), "{text}");
    }

    #[derive(Clone)]
    struct Capture(std::sync::Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn worker_lines_are_json_events() {
        let l = worker_line(2, 77, "stderr", b"Traceback \x1b[31m\xff\n");
        let v: serde_json::Value = serde_json::from_slice(&l).unwrap();
        assert_eq!(v["slot"], 2);
        assert_eq!(v["pid"], 77);
        assert_eq!(v["stream"], "stderr");
        assert_eq!(v["source"], "worker");
        assert_eq!(v["message"], "Traceback \u{1b}[31m\u{fffd}");
        assert_eq!(l.iter().filter(|&&b| b == b'\n').count(), 1);
    }
}
