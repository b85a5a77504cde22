//! A long-lived trimmer for `bench/trim/bench.py`: one process that trims PID each time a
//! line arrives on stdin and prints the result as one JSON line, as the pool's supervisor
//! trims its workers (warm, one process for many trims). `trimrun trim` starts a new
//! process per trim, so its pause also carries that process's first ptrace calls and
//! first-touch page faults.
//!
//!     cargo build --release --example trim_loop
//!     target/release/examples/trim_loop PID    # then one line per trim on stdin
//!
//! Each answer is `trimrun trim --json`'s object: `{"ok": true, "pause_us": ..,
//! "call_us": .., ...}` or `{"ok": false, "error": "deferred", ...}`.

use std::io::{BufRead, Write};

use trimrun::trim::{TrimOptions, trim_pid};

fn main() {
    let pid: i32 = match std::env::args().nth(1).map(|a| a.parse()) {
        Some(Ok(p)) if p > 0 => p,
        _ => {
            eprintln!("usage: trim_loop PID (then one line on stdin per trim)");
            std::process::exit(2);
        }
    };
    let opts = TrimOptions::default();
    let stdout = std::io::stdout();
    for line in std::io::stdin().lock().lines() {
        if line.is_err() {
            break;
        }
        let v = match trim_pid(pid, &opts) {
            Ok(r) => {
                let mut v = serde_json::to_value(&r).expect("report serializes");
                v["ok"] = true.into();
                v
            }
            Err(e) => serde_json::json!({"ok": false, "error": e.kind(), "message": e.to_string()}),
        };
        let mut out = stdout.lock();
        if writeln!(out, "{v}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
}
