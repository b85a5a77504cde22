//! sd_notify, both ways.
//!
//! Up: trimrun tells its own service manager (`NOTIFY_SOCKET`, set by systemd for
//! `Type=notify` units) `READY=1` once the initial workers are ready, `STATUS=` lines,
//! `RELOADING=1` with `MONOTONIC_USEC` during a rolling restart, and `STOPPING=1`; under
//! `WatchdogSec=` (`WATCHDOG_USEC`), `WATCHDOG=1` every half interval from the pool's loop,
//! so a stuck supervisor is caught by systemd as a stuck worker is by trimrun.
//!
//! Down: with `--ready notify` each worker gets its own datagram socket as `NOTIFY_SOCKET`,
//! so a `READY=1` can only come from that worker (or its children), never from a neighbour.
//! The same socket carries the watchdog (`--timeout`): `WATCHDOG=1` keep-alives and
//! `WATCHDOG=trigger`, as under systemd's `WatchdogSec=`.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::{Path, PathBuf};

/// A connection to the service manager's notify socket, if trimrun was given one.
pub struct Notifier {
    sock: Option<(UnixDatagram, SocketAddr)>,
    /// Half of the manager's `WATCHDOG_USEC` for trimrun, if it set one.
    keepalive_every: Option<std::time::Duration>,
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
        let keepalive_every = own_watchdog(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        Notifier {
            keepalive_every: keepalive_every.filter(|_| sock.is_some()),
            sock,
        }
    }

    /// How often to send `WATCHDOG=1` to the manager: None without a manager's watchdog.
    pub fn keepalive_every(&self) -> Option<std::time::Duration> {
        self.keepalive_every
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

/// Half of the watchdog interval the service manager set for trimrun (`WATCHDOG_USEC`), as
/// `sd_watchdog_enabled(3)` reads it: none when `WATCHDOG_PID` names another process.
pub fn own_watchdog(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<std::time::Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(p) = pid
        && p.trim().parse::<u32>().ok() != Some(me)
    {
        return None;
    }
    Some(std::time::Duration::from_micros(usec) / 2)
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

/// What one datagram from a worker says: the sd_notify(3) assignments trimrun acts on.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Notification {
    /// `READY=1`.
    pub ready: bool,
    /// `WATCHDOG=1`: the worker's keep-alive.
    pub watchdog: bool,
    /// `WATCHDOG=trigger`: the worker asks to be handled as if it had missed its watchdog.
    pub watchdog_trigger: bool,
    /// The last `STATUS=` line.
    pub status: Option<String>,
}

impl Notification {
    /// Read a datagram. Unknown keys and values are ignored, as systemd does.
    pub fn read(msg: &[u8]) -> Notification {
        let mut n = Notification::default();
        for (k, v) in parse(msg) {
            match (k.as_str(), v.as_str()) {
                ("READY", "1") => n.ready = true,
                ("WATCHDOG", "1") => n.watchdog = true,
                ("WATCHDOG", "trigger") => n.watchdog_trigger = true,
                ("STATUS", _) => n.status = Some(v),
                _ => {}
            }
        }
        n
    }
}

/// True when a datagram says `READY=1`.
pub fn says_ready(msg: &[u8]) -> bool {
    parse(msg).iter().any(|(k, v)| k == "READY" && v == "1")
}

/// Name prefix of trimrun's run directories: `trimrun-notify.<pid>.<random>`, apart from
/// the per-user control directory (`trimrun-<uid>`) and the cgroups (`trimrun-<pid>`).
pub const RUN_DIR_PREFIX: &str = "trimrun-notify.";

/// The directory of trimrun's per-run files (worker notify sockets): removed on drop.
///
/// It lives in `$XDG_RUNTIME_DIR`, else the temp dir, and is created the way `mkdtemp`
/// does it: a fresh random name, mode 0700, never a directory that already exists (one
/// made first by someone else is never used), and checked to be ours once open. While the
/// pool runs it holds an `flock` on the directory; a later start removes the directories
/// of this user whose lock is free (left by a trimrun that was SIGKILLed).
pub struct RunDir {
    pub path: PathBuf,
    _lock: Option<nix::fcntl::Flock<std::fs::File>>,
}

impl RunDir {
    /// `workers_connect`: workers run as another user (`--user`), so the directory is made
    /// searchable (0711, still not listable) and each notify socket is given to them.
    pub fn create(workers_connect: bool) -> std::io::Result<RunDir> {
        let base = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|p| p.is_absolute() && p.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        RunDir::create_in(&base, workers_connect)
    }

    pub fn create_in(base: &Path, workers_connect: bool) -> std::io::Result<RunDir> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
        for name in clean_stale_run_dirs(base) {
            tracing::info!(dir = %base.join(name).display(), "removed the run directory of an earlier trimrun");
        }
        let uid = nix::unistd::geteuid().as_raw();
        for _ in 0..32 {
            let path = base.join(format!(
                "{RUN_DIR_PREFIX}{}.{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("cannot create {}: {e}", path.display()),
                    ));
                }
            }
            let dir = std::fs::File::open(&path)?;
            let m = dir.metadata()?;
            if !m.is_dir() || m.uid() != uid || m.mode() & 0o077 != 0 {
                return Err(std::io::Error::other(format!(
                    "{} is not a private directory of uid {uid} right after creating it (someone is tampering with {})",
                    path.display(),
                    base.display()
                )));
            }
            let lock = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
                .map_err(|(_, e)| {
                    std::io::Error::other(format!("cannot lock {}: {e}", path.display()))
                })?;
            if workers_connect {
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o711))?;
            }
            return Ok(RunDir {
                path,
                _lock: Some(lock),
            });
        }
        Err(std::io::Error::other(format!(
            "no free name for a run directory in {}",
            base.display()
        )))
    }

    /// An existing directory, used as is (the supervisor's tests, on a temp dir).
    #[cfg(test)]
    pub(crate) fn existing(path: PathBuf) -> RunDir {
        RunDir { path, _lock: None }
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

/// Remove this user's run directories in `base` that no live trimrun holds (their lock is
/// free). Returns the names removed.
pub fn clean_stale_run_dirs(base: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let uid = nix::unistd::geteuid().as_raw();
    let mut removed = vec![];
    let Ok(rd) = std::fs::read_dir(base) else {
        return removed;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(RUN_DIR_PREFIX) else {
            continue;
        };
        // A live trimrun creates its directory a moment before it locks it: never take
        // one whose creator still runs (a reused pid only delays the clean-up).
        let owner = rest.split('.').next().and_then(|p| p.parse::<i32>().ok());
        if owner.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists()) {
            continue;
        }
        let path = e.path();
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() && m.uid() == uid => {}
            _ => continue,
        }
        let Ok(dir) = std::fs::File::open(&path) else {
            continue;
        };
        if let Ok(lock) = nix::fcntl::Flock::lock(dir, nix::fcntl::FlockArg::LockExclusiveNonblock)
        {
            if std::fs::remove_dir_all(&path).is_ok() {
                removed.push(name);
            }
            drop(lock);
        }
    }
    removed
}

/// Bind a worker's notify socket (0600; given to the worker's user with `--user`, the
/// directory being ours alone to write, so the path cannot be swapped meanwhile).
pub fn bind_worker_socket(
    path: &Path,
    owner: Option<&crate::spawn::Credentials>,
) -> std::io::Result<tokio::net::UnixDatagram> {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::remove_file(path);
    let sock = tokio::net::UnixDatagram::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    if let Some(c) = owner {
        std::os::unix::fs::chown(path, c.uid, c.gid)?;
    }
    Ok(sock)
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
    fn run_dir_is_fresh_private_locked_and_a_leftover_one_is_cleaned() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let base = tempfile::tempdir().unwrap();
        // Someone else's directory with the old predictable name is never used.
        let squat = base.path().join(format!("trimrun-{}", std::process::id()));
        std::fs::create_dir(&squat).unwrap();
        std::fs::set_permissions(&squat, std::fs::Permissions::from_mode(0o777)).unwrap();
        let a = RunDir::create_in(base.path(), false).unwrap();
        assert_ne!(a.path, squat);
        assert!(
            a.path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(RUN_DIR_PREFIX)
        );
        let m = std::fs::metadata(&a.path).unwrap();
        assert_eq!(m.mode() & 0o777, 0o700);
        assert_eq!(m.uid(), nix::unistd::geteuid().as_raw());
        // A live one (locked) survives the next start; one whose owner died is removed.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let dead = base.path().join(format!("{RUN_DIR_PREFIX}{gone}.deadbeef"));
        std::fs::create_dir(&dead).unwrap();
        std::fs::write(dead.join("notify-0-0.sock"), "").unwrap();
        // Not locked yet, but its creator runs: it is about to lock it.
        let young = base
            .path()
            .join(format!("{RUN_DIR_PREFIX}{}.0badcafe", std::process::id()));
        std::fs::create_dir(&young).unwrap();
        let b = RunDir::create_in(base.path(), true).unwrap();
        assert!(a.path.exists(), "a live run directory was removed");
        assert!(
            young.exists(),
            "a run directory of a live trimrun was removed before its lock"
        );
        assert!(!dead.exists(), "a leftover run directory was kept");
        assert_eq!(std::fs::metadata(&b.path).unwrap().mode() & 0o777, 0o711);
        let (pa, pb) = (a.path.clone(), b.path.clone());
        drop((a, b));
        assert!(!pa.exists() && !pb.exists());
    }

    #[test]
    fn watchdog_keepalives_and_triggers_are_read_with_readiness() {
        let n = Notification::read(b"READY=1\nWATCHDOG=1\nSTATUS=serving 3 requests\n");
        assert!(n.ready && n.watchdog && !n.watchdog_trigger);
        assert_eq!(n.status.as_deref(), Some("serving 3 requests"));
        assert_eq!(
            Notification::read(b"WATCHDOG=1"),
            Notification {
                watchdog: true,
                ..Default::default()
            }
        );
        let t = Notification::read(b"WATCHDOG=trigger");
        assert!(t.watchdog_trigger && !t.watchdog);
        // Not keep-alives: other values, other keys, a value inside another assignment,
        // and systemd's WATCHDOG_USEC= (a request to change the interval, not a ping).
        for msg in [
            &b"WATCHDOG=0"[..],
            b"WATCHDOG=yes",
            b"watchdog=1",
            b"STATUS=WATCHDOG=1",
            b"WATCHDOG_USEC=5000000",
            b"WATCHDOG",
            b"",
            b"\xff\xfe",
        ] {
            let n = Notification::read(msg);
            assert!(!n.watchdog && !n.watchdog_trigger && !n.ready, "{msg:?}");
        }
    }

    #[test]
    fn trimrun_keeps_its_own_watchdog_only_when_it_is_the_one_watched() {
        let half = |ms| Some(std::time::Duration::from_millis(ms));
        assert_eq!(own_watchdog(Some("30000000"), None, 42), half(15_000));
        assert_eq!(own_watchdog(Some("2000000"), Some("42"), 42), half(1000));
        assert_eq!(own_watchdog(Some("2000000"), Some("7"), 42), None);
        assert_eq!(own_watchdog(Some("2000000"), Some("x"), 42), None);
        for bad in [None, Some(""), Some("0"), Some("-1"), Some("soon")] {
            assert_eq!(own_watchdog(bad, None, 42), None, "{bad:?}");
        }
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
            keepalive_every: None,
        };
        n.send("READY=1");
        let mut buf = [0u8; 64];
        let len = rx.recv(&mut buf).unwrap();
        assert!(says_ready(&buf[..len]));
    }
}
