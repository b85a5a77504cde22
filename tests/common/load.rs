//! Load for the worker tests: one-shot HTTP/1.0 clients, HTTP/1.1 keep-alive clients and
//! slow requests, counting every request that fails.
//!
//! Keep-alive clients behave as HTTP/1.1 asks (RFC 9112 §9.3.1, as browsers and Go's
//! net/http do): a request sent on a *reused* connection that the server closed before any
//! byte of a response came back is sent again on a new connection. That is the one race no
//! server can close (its close and the client's next request cross on the wire); everything
//! else (a refused connection, a reset mid-response, a missing or wrong response) fails.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::pool::get;
use super::wait_for;

/// One HTTP/1.1 keep-alive connection.
pub struct KeepAlive {
    port: u16,
    conn: Option<BufReader<TcpStream>>,
    /// Responses received on the current connection.
    used: usize,
}

enum Attempt {
    Ok(String),
    /// The server closed a reused connection before any byte of the response.
    ClosedBeforeResponse(String),
    Failed(String),
}

impl KeepAlive {
    pub fn new(port: u16) -> KeepAlive {
        KeepAlive {
            port,
            conn: None,
            used: 0,
        }
    }

    fn attempt(&mut self, path: &str) -> Attempt {
        if self.conn.is_none() {
            match TcpStream::connect(("127.0.0.1", self.port)) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    self.conn = Some(BufReader::new(s));
                    self.used = 0;
                }
                Err(e) => return Attempt::Failed(format!("connect: {e}")),
            }
        }
        let reused = self.used > 0;
        let conn = self.conn.as_mut().unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        if let Err(e) = conn.get_mut().write_all(req.as_bytes()) {
            self.conn = None;
            return if reused {
                Attempt::ClosedBeforeResponse(format!("write: {e}"))
            } else {
                Attempt::Failed(format!("write: {e}"))
            };
        }
        let mut status = String::new();
        match conn.read_line(&mut status) {
            Ok(0) | Err(_) if reused => {
                self.conn = None;
                return Attempt::ClosedBeforeResponse("closed before the status line".into());
            }
            Ok(0) => {
                self.conn = None;
                return Attempt::Failed("closed before the status line (fresh connection)".into());
            }
            Err(e) => {
                self.conn = None;
                return Attempt::Failed(format!("read status: {e}"));
            }
            Ok(_) => {}
        }
        let mut length = None;
        let mut close = false;
        loop {
            let mut line = String::new();
            if conn.read_line(&mut line).unwrap_or(0) == 0 {
                self.conn = None;
                return Attempt::Failed(format!("closed mid-headers after {status:?}"));
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let lower = line.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            }
            if lower.starts_with("connection:") && lower.contains("close") {
                close = true;
            }
        }
        let Some(length) = length else {
            self.conn = None;
            return Attempt::Failed(format!("no content-length in {status:?}"));
        };
        let mut body = vec![0u8; length];
        if let Err(e) = conn.read_exact(&mut body) {
            self.conn = None;
            return Attempt::Failed(format!("read body: {e}"));
        }
        self.used += 1;
        if close {
            self.conn = None;
        }
        if !status.starts_with("HTTP/1.1 200") {
            return Attempt::Failed(format!("bad status {status:?}"));
        }
        Attempt::Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// One request, sent again on a new connection if a reused one was closed first.
    pub fn get(&mut self, path: &str, retried: &AtomicUsize) -> Result<String, String> {
        match self.attempt(path) {
            Attempt::Ok(b) => Ok(b),
            Attempt::Failed(e) => Err(e),
            Attempt::ClosedBeforeResponse(_) => {
                retried.fetch_add(1, Ordering::Relaxed);
                match self.attempt(path) {
                    Attempt::Ok(b) => Ok(b),
                    Attempt::Failed(e) | Attempt::ClosedBeforeResponse(e) => {
                        Err(format!("retry: {e}"))
                    }
                }
            }
        }
    }
}

#[derive(Clone, Copy)]
pub enum Client {
    /// HTTP/1.0, a new connection per request.
    OneShot,
    /// HTTP/1.1 on one connection for as long as the server keeps it.
    KeepAlive,
    /// A keep-alive client whose requests take 300 ms: some are in flight at every stop.
    Slow,
}

/// Load from client threads until `finish`: counts, failures, pids seen.
pub struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    retried: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    pids: Arc<Mutex<std::collections::BTreeSet<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(port: u16, clients: &[Client]) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let retried = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(vec![]));
        let pids = Arc::new(Mutex::new(std::collections::BTreeSet::new()));
        let threads = clients
            .iter()
            .map(|&kind| {
                let (stop, ok, retried, failures, pids) = (
                    stop.clone(),
                    ok.clone(),
                    retried.clone(),
                    failures.clone(),
                    pids.clone(),
                );
                std::thread::spawn(move || {
                    let mut ka = KeepAlive::new(port);
                    while !stop.load(Ordering::Relaxed) {
                        let r = match kind {
                            Client::OneShot => get(port, "/"),
                            Client::KeepAlive => ka.get("/", &retried),
                            Client::Slow => ka.get("/slow?ms=300", &retried),
                        };
                        match r {
                            Ok(body) => {
                                ok.fetch_add(1, Ordering::Relaxed);
                                if let Some(pid) = body.split_whitespace().nth(1) {
                                    pids.lock().unwrap().insert(pid.to_string());
                                }
                            }
                            Err(e) => failures.lock().unwrap().push(e),
                        }
                        std::thread::sleep(Duration::from_millis(5));
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            retried,
            failures,
            pids,
            threads,
        }
    }

    pub fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Wait until `more` further requests succeeded (the pool serves between steps).
    pub fn wait_more(&self, more: usize) {
        let target = self.ok() + more;
        assert!(
            wait_for(Duration::from_secs(30), || (self.ok() >= target)
                .then_some(()))
            .is_some(),
            "load stalled at {} requests; failures: {:?}",
            self.ok(),
            self.failures.lock().unwrap()
        );
    }

    /// Stop: (requests ok, requests sent again after a keep-alive close, failures, distinct
    /// worker pids that answered).
    pub fn finish(self) -> (usize, usize, Vec<String>, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let pids = self.pids.lock().unwrap().len();
        (
            self.ok.load(Ordering::Relaxed),
            self.retried.load(Ordering::Relaxed),
            self.failures.lock().unwrap().clone(),
            pids,
        )
    }
}
