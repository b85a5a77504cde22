//! sd_notify, both ways.
//!
//! Up: trimrun tells its own service manager (`NOTIFY_SOCKET`, set by systemd for
//! `Type=notify` units) `READY=1` once the initial workers are ready, `STATUS=` lines,
//! `RELOADING=1` with `MONOTONIC_USEC` during a rolling restart, and `STOPPING=1`.
//!
//! Down: with `--ready notify` each worker gets its own datagram socket as `NOTIFY_SOCKET`,
//! so a `READY=1` can only come from that worker (or its children), never from a neighbour.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

/// A connection to the service manager's notify socket, if trimrun was given one.
pub struct Notifier {
    sock: Option<(UnixDatagram, SocketAddr)>,
}

impl Notifier {
    /// Read (and forget) `NOTIFY_SOCKET`; workers get their own value from `spawn`.
    pub fn from_env() -> Notifier {
        let sock = std::env::var("NOTIFY_SOCKET").ok().and_then(|p| {
            let addr = if let Some(name) = p.strip_prefix('@') {
                SocketAddr::from_abstract_name(name.as_bytes()).ok()?
            } else {
                SocketAddr::from_pathname(&p).ok()?
            };
            Some((UnixDatagram::unbound().ok()?, addr))
        });
        Notifier { sock }
    }

    /// Send one notification (`READY=1\nSTATUS=...`). Failures are logged, never fatal:
    /// a service manager that went away must not take the pool down.
    pub fn send(&self, msg: &str) {
        if let Some((s, addr)) = &self.sock
            && let Err(e) = s.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::debug!(error = %e, "sd_notify failed");
        }
    }

    pub fn reloading(&self) {
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
            .map(|t| t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1000)
            .unwrap_or(0);
        self.send(&format!("RELOADING=1\nMONOTONIC_USEC={now}"));
    }
}

/// Parse a notification datagram into its `KEY=VALUE` lines.
pub fn parse(msg: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(msg)
        .lines()
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// True when a datagram says `READY=1`.
pub fn says_ready(msg: &[u8]) -> bool {
    parse(msg).iter().any(|(k, v)| k == "READY" && v == "1")
}

/// The directory of trimrun's per-run files (worker notify sockets): removed on drop.
pub struct RunDir {
    pub path: PathBuf,
}

impl RunDir {
    pub fn create() -> std::io::Result<RunDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let path = base.join(format!("trimrun-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path)?;
        Ok(RunDir { path })
    }

    pub fn notify_path(&self, slot: usize, generation: u64) -> PathBuf {
        self.path.join(format!("notify-{slot}-{generation}.sock"))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Bind a worker's notify socket.
pub fn bind_worker_socket(path: &Path) -> std::io::Result<tokio::net::UnixDatagram> {
    let _ = std::fs::remove_file(path);
    tokio::net::UnixDatagram::bind(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_is_found_among_other_lines() {
        assert!(says_ready(b"STATUS=warming up\nREADY=1\n"));
        assert!(!says_ready(b"READY=0"));
        assert!(!says_ready(b"STATUS=READY=1"));
        assert_eq!(
            parse(b"A=1\nB=x=y"),
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
    }

    #[test]
    fn notifier_reaches_a_listening_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.sock");
        let rx = UnixDatagram::bind(&path).unwrap();
        let n = Notifier {
            sock: Some((
                UnixDatagram::unbound().unwrap(),
                SocketAddr::from_pathname(&path).unwrap(),
            )),
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert!(says_ready(&buf[..len]));
    }
}
