//! The control socket and the metrics endpoint over real sockets, with a small responder
//! task standing in for the supervisor (the protocol does not care who answers).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use trimrun::status::metrics::{Metrics, bind_metrics, serve_metrics, serve_metrics_on};
use trimrun::status::{
    Client, ControlMsg, CtlCommand, Request, ScaleTo, Snapshot, StatusError, TrimTarget,
    WorkerSnapshot, run_ctl_cli, run_status_cli, serve, status_output,
};

const MIB: u64 = 1024 * 1024;

fn snapshot() -> Snapshot {
    Snapshot {
        version: 1,
        pid: std::process::id() as i32,
        uptime_secs: 75.0,
        backend: "none".into(),
        target_workers: 2,
        state: "running".into(),
        workers: (0..2)
            .map(|slot| WorkerSnapshot {
                slot,
                pid: 1000 + slot as i32,
                generation: 1,
                state: "ready".into(),
                age_secs: 70.0,
                working_set: 100 * MIB * (slot as u64 + 1),
                limit: Some(400 * MIB),
                trims: slot as u64,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

/// A stand-in supervisor: answers status with [`snapshot`], refuses unknown slots, and
/// records every request it saw.
fn responder() -> (
    mpsc::Sender<ControlMsg>,
    std::sync::Arc<std::sync::Mutex<Vec<Request>>>,
) {
    let (tx, mut rx) = mpsc::channel::<ControlMsg>(8);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some(ControlMsg { req, reply }) = rx.recv().await {
            log.lock().unwrap().push(req.clone());
            let answer = match req {
                Request::Status => Ok(serde_json::to_value(snapshot()).unwrap()),
                Request::Recycle { slot } | Request::Trim { slot: Some(slot) } if slot >= 2 => {
                    Err(format!("no worker in slot {slot} (the pool has slots 0-1)"))
                }
                Request::Scale { to } => Ok(json!({ "target_workers": to.resolve(2) })),
                Request::Reload => Ok(Value::String("reloading 2 workers".into())),
                _ => Ok(Value::Null),
            };
            let _ = reply.send(answer);
        }
    });
    (tx, seen)
}

fn sock(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("ctl.sock")
}

/// Send raw lines on one connection and read one reply line per request line.
fn raw_exchange(path: &Path, lines: &[&str]) -> Vec<Value> {
    let mut s = UnixStream::connect(path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    lines
        .iter()
        .map(|l| {
            s.write_all(format!("{l}\n").as_bytes()).unwrap();
            let mut reply = String::new();
            r.read_line(&mut reply).unwrap();
            serde_json::from_str(&reply).unwrap_or_else(|e| panic!("{reply:?}: {e}"))
        })
        .collect()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn control_socket_is_created_mode_0600() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _) = responder();
    let server = serve(&sock(&dir), tx).await.unwrap();
    let meta = std::fs::symlink_metadata(sock(&dir)).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert_eq!(server.path(), sock(&dir));
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_socket_directory_is_created_private() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("run/trimrun/ctl.sock");
    let (tx, _) = responder();
    let _server = serve(&path, tx).await.unwrap();
    let mode = std::fs::metadata(path.parent().unwrap())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "{mode:o}");
}

#[tokio::test(flavor = "multi_thread")]
async fn second_server_on_a_live_socket_is_refused_naming_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _) = responder();
    let _first = serve(&sock(&dir), tx.clone()).await.unwrap();
    let err = serve(&sock(&dir), tx).await.unwrap_err();
    match &err {
        StatusError::InUse { pid, .. } => assert_eq!(*pid, Some(std::process::id() as i32)),
        other => panic!("expected InUse, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        format!(
            "control socket {} is in use by a running trimrun (pid {}); pass --control to pick another path",
            sock(&dir).display(),
            std::process::id()
        )
    );
    // The probe did not disturb the first server.
    let path = sock(&dir);
    let snap = blocking(move || Client::connect(&path).unwrap().status().unwrap()).await;
    assert_eq!(snap, snapshot());
}

#[tokio::test(flavor = "multi_thread")]
async fn stale_socket_file_from_a_killed_run_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    // A listener that is gone leaves its file behind: connecting to it is refused.
    drop(std::os::unix::net::UnixListener::bind(sock(&dir)).unwrap());
    assert!(sock(&dir).exists());
    assert_eq!(
        UnixStream::connect(sock(&dir)).unwrap_err().kind(),
        std::io::ErrorKind::ConnectionRefused
    );
    let (tx, _) = responder();
    let _server = serve(&sock(&dir), tx).await.unwrap();
    let meta = std::fs::symlink_metadata(sock(&dir)).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let replies = blocking({
        let p = sock(&dir);
        move || raw_exchange(&p, &[r#"{"v":1,"cmd":"status"}"#])
    })
    .await;
    assert_eq!(replies[0]["ok"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_file_that_is_not_a_socket_is_never_removed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(sock(&dir), "precious").unwrap();
    let (tx, _) = responder();
    let err = serve(&sock(&dir), tx).await.unwrap_err();
    assert!(matches!(err, StatusError::NotASocket { .. }), "{err:?}");
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(sock(&dir)).unwrap(), "precious");
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_file_is_removed_when_the_server_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _) = responder();
    let server = serve(&sock(&dir), tx.clone()).await.unwrap();
    // A client connected at drop time is disconnected, not left hanging.
    let mut client = {
        let p = sock(&dir);
        blocking(move || Client::connect(&p).unwrap()).await
    };
    drop(server);
    assert!(!sock(&dir).exists());
    // Aborting the connection tasks is asynchronous: a request racing the drop may still
    // be answered, but the connection ends promptly.
    let err = blocking(move || common::wait_for(Duration::from_secs(5), || client.status().err()))
        .await
        .expect("connection still served after the server was dropped");
    assert!(matches!(err, StatusError::Closed { .. }), "{err:?}");
    // And a new server can take the path at once.
    let _again = serve(&sock(&dir), tx).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_a_server_leaves_a_socket_that_replaced_it_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _) = responder();
    let server = serve(&sock(&dir), tx).await.unwrap();
    std::fs::remove_file(sock(&dir)).unwrap();
    let other = std::os::unix::net::UnixListener::bind(sock(&dir)).unwrap();
    drop(server);
    assert!(sock(&dir).exists(), "someone else's socket was removed");
    drop(other);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_line_gets_an_error_reply_and_the_connection_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, seen) = responder();
    let _server = serve(&sock(&dir), tx).await.unwrap();
    let p = sock(&dir);
    let replies = blocking(move || {
        raw_exchange(
            &p,
            &[
                "this is not json",
                r#"{"v":2,"cmd":"status"}"#,
                r#"{"v":1,"cmd":"explode"}"#,
                r#"{"v":1,"cmd":"scale","to":"+x"}"#,
                r#"{"v":1,"cmd":"status"}"#,
                r#"{"cmd":"scale","to":"+1"}"#,
            ],
        )
    })
    .await;
    for r in &replies[..4] {
        assert_eq!(r["v"], 1, "{r}");
        assert_eq!(r["ok"], false, "{r}");
        assert!(r["error"].as_str().unwrap().len() > 10, "{r}");
        assert!(r.get("data").is_none(), "{r}");
    }
    assert!(
        replies[1]["error"]
            .as_str()
            .unwrap()
            .contains("unsupported protocol version 2")
    );
    assert!(
        replies[3]["error"]
            .as_str()
            .unwrap()
            .contains("invalid worker count")
    );
    assert_eq!(replies[4]["ok"], true);
    assert_eq!(replies[4]["data"]["workers"].as_array().unwrap().len(), 2);
    assert_eq!(replies[5]["data"]["target_workers"], 3);
    // Only the well-formed requests reached the supervisor.
    assert_eq!(
        *seen.lock().unwrap(),
        vec![Request::Status, Request::Scale { to: ScaleTo::Up(1) }]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_requests_are_answered_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _) = responder();
    let _server = serve(&sock(&dir), tx).await.unwrap();
    let p = sock(&dir);
    let replies = blocking(move || {
        let mut s = UnixStream::connect(&p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // All at once, with a blank line in between and no newline after the last.
        s.write_all(
            b"{\"v\":1,\"cmd\":\"reload\"}\n\n{\"v\":1,\"cmd\":\"recycle\",\"slot\":7}\n{\"v\":1,\"cmd\":\"trim\"}",
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .collect::<Vec<_>>()
    })
    .await;
    assert_eq!(replies.len(), 3, "{replies:?}");
    assert_eq!(replies[0]["data"], "reloading 2 workers");
    assert_eq!(replies[1]["ok"], false);
    assert_eq!(replies[2], json!({"v": 1, "ok": true, "data": null}));
}

#[tokio::test(flavor = "multi_thread")]
async fn overlong_request_is_refused_and_the_connection_closed() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _) = responder();
    let _server = serve(&sock(&dir), tx).await.unwrap();
    let p = sock(&dir);
    let reply = blocking(move || {
        let mut s = UnixStream::connect(&p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let junk = vec![b'x'; trimrun::status::MAX_REQUEST_LINE + 10];
        let _ = s.write_all(&junk);
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await;
    let v: Value = serde_json::from_str(reply.lines().next().unwrap()).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("too long"), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_after_the_supervisor_is_gone_get_an_error_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, rx) = mpsc::channel::<ControlMsg>(1);
    drop(rx);
    let _server = serve(&sock(&dir), tx).await.unwrap();
    let p = sock(&dir);
    let err = blocking(move || Client::connect(&p).unwrap().status().unwrap_err()).await;
    assert!(err.to_string().contains("shutting down"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn status_client_prints_the_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _) = responder();
    let _server = serve(&sock(&dir), tx).await.unwrap();
    let p = sock(&dir);
    let (table, json_line, code) = blocking(move || {
        (
            status_output(&p, false).unwrap(),
            status_output(&p, true).unwrap(),
            run_status_cli(Some(p.clone()), false, false),
        )
    })
    .await;
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with(&format!(
        "trimrun pid {} (running, up 1m15s)",
        std::process::id()
    )));
    assert!(
        lines[0].contains("workers 2/2  memory 300 MiB of 800 MiB"),
        "{table}"
    );
    assert!(lines[1].starts_with("SLOT"), "{table}");
    assert!(
        lines[2].contains("1000") && lines[2].contains("[###.......]  25%"),
        "{table}"
    );
    assert!(
        lines[3].contains("1001") && lines[3].contains("[#####.....]  50%"),
        "{table}"
    );
    assert_eq!(json_line.lines().count(), 1);
    let parsed: Snapshot = serde_json::from_str(&json_line).unwrap();
    assert_eq!(parsed, snapshot());
    assert_eq!(code, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn ctl_sends_each_command_and_exits_by_the_reply() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, seen) = responder();
    let _server = serve(&sock(&dir), tx).await.unwrap();
    let p = sock(&dir);
    let codes = blocking(move || {
        [
            CtlCommand::Reload,
            CtlCommand::Scale {
                to: ScaleTo::Down(1),
            },
            CtlCommand::Recycle { slot: 1 },
            CtlCommand::Recycle { slot: 5 },
            CtlCommand::Trim {
                target: TrimTarget::All,
            },
            CtlCommand::Stop {
                now: false,
                graceful: true,
            },
        ]
        .iter()
        .map(|c| run_ctl_cli(Some(p.clone()), c))
        .collect::<Vec<_>>()
    })
    .await;
    assert_eq!(codes, [0, 0, 0, 1, 0, 0]);
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            Request::Reload,
            Request::Scale {
                to: ScaleTo::Down(1)
            },
            Request::Recycle { slot: 1 },
            Request::Recycle { slot: 5 },
            Request::Trim { slot: None },
            Request::Stop { now: false },
        ]
    );
    let p = sock(&dir);
    let err = blocking(move || {
        Client::connect(&p)
            .unwrap()
            .request(&Request::Recycle { slot: 5 })
            .unwrap_err()
    })
    .await;
    assert_eq!(
        err.to_string(),
        "no worker in slot 5 (the pool has slots 0-1)"
    );
}

#[test]
fn client_without_a_listener_says_so_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let p = sock(&dir);
    let err = Client::connect(&p).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "no trimrun is listening on {} (is it running? pass --control PATH)",
            p.display()
        )
    );
    assert_eq!(run_status_cli(Some(p.clone()), false, false), 1);
    assert_eq!(run_status_cli(Some(p.clone()), true, true), 1);
    assert_eq!(run_ctl_cli(Some(p.clone()), &CtlCommand::Reload), 1);
    // A stale file: same message.
    drop(std::os::unix::net::UnixListener::bind(&p).unwrap());
    let err = Client::connect(&p).unwrap_err();
    assert!(matches!(err, StatusError::NotListening { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn socket_path_too_long_for_sun_path_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join(format!("{}.sock", "x".repeat(120)));
    let (tx, _) = responder();
    let err = serve(&p, tx).await.unwrap_err();
    assert!(err.to_string().contains("is too long"), "{err}");
}

// ---------------------------------------------------------------------------------------
// /metrics over TCP

fn http_get(addr: std::net::SocketAddr, target: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

async fn metrics_server() -> (std::net::SocketAddr, std::sync::Arc<Metrics>) {
    let m = Metrics::new();
    let l = bind_metrics("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    serve_metrics_on(l, m.clone());
    (addr, m)
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_served_over_http_and_move_with_events() {
    let (addr, m) = metrics_server().await;
    m.update(&snapshot());
    let resp = blocking(move || http_get(addr, "/metrics")).await;
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(
        head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{head}"
    );
    assert!(
        head.contains(&format!("Content-Length: {}", body.len())),
        "{head}"
    );
    assert!(body.contains("trimrun_workers 2\n"), "{body}");
    assert!(
        body.contains(&format!(
            "trimrun_worker_working_set_bytes{{slot=\"1\"}} {}\n",
            200 * MIB
        )),
        "{body}"
    );
    assert!(!body.contains("trimrun_trims_total{slot=\"0\"}"), "{body}");

    m.trimmed(0, 3 * MIB as i64, Duration::from_micros(700));
    m.recycled(1, "memory");
    m.restarted(0, "signal");
    let body = blocking(move || http_get(addr, "/metrics")).await;
    for want in [
        "trimrun_trims_total{slot=\"0\"} 1\n",
        "trimrun_trim_released_bytes_total{slot=\"0\"} 3145728\n",
        "trimrun_trim_pause_seconds_count{slot=\"0\"} 1\n",
        "trimrun_recycles_total{slot=\"1\",reason=\"memory\"} 1\n",
        "trimrun_restarts_total{slot=\"0\",cause=\"signal\"} 1\n",
        "trimrun_oom_kills_total 0\n",
    ] {
        assert!(body.contains(want), "{want:?} missing:\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_endpoint_answers_404_elsewhere() {
    let (addr, _m) = metrics_server().await;
    let resp = blocking(move || http_get(addr, "/")).await;
    assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\n"), "{resp}");
    let resp = blocking(move || http_get(addr, "/metricsx")).await;
    assert!(resp.starts_with("HTTP/1.1 404 Not Found\r\n"), "{resp}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_bare_port_listens_on_localhost_and_busy_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let err = serve_metrics(&port.to_string(), Metrics::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot listen for metrics on 127.0.0.1:{port}: ")),
        "{err}"
    );
    drop(taken);
    let h = serve_metrics(&port.to_string(), Metrics::new())
        .await
        .unwrap();
    let resp = blocking(move || http_get(([127, 0, 0, 1], port).into(), "/metrics")).await;
    assert!(resp.starts_with("HTTP/1.1 200 OK"), "{resp}");
    h.abort();
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_output_passes_promtool_check_metrics() {
    if which("promtool").is_none() && common::cannot_run("promtool (apt-get install prometheus)") {
        return;
    }
    let (addr, m) = metrics_server().await;
    // With a budget, so that the pool's gauges are checked too.
    m.update(&Snapshot {
        pool: Some(trimrun::status::PoolSnapshot {
            budget: 600 << 20,
            working_set: Some(397 << 20),
            peak: Some(550 << 20),
            cgroup: Some("/sys/fs/cgroup/trimrun-1".into()),
        }),
        ..snapshot()
    });
    for slot in 0..2 {
        m.trimmed(slot, 1 << 20, Duration::from_micros(500));
        m.recycled(slot, "memory");
        m.recycled(slot, "lifetime");
        m.restarted(slot, "oom_kill");
    }
    let resp = blocking(move || http_get(addr, "/metrics")).await;
    let body = resp.split_once("\r\n\r\n").unwrap().1.to_string();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool: {report}\n{body}");
    // promtool also lints names and help; it should have nothing to say.
    assert!(report.trim().is_empty(), "promtool lint: {report}\n{body}");
}

fn which(cmd: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(cmd))
            .find(|p| p.is_file())
    })
}
