//! Listening sockets: `--bind` parsing, creation, and sockets inherited from systemd.
//!
//! trimrun creates every listening socket once and hands the same sockets to every worker at
//! fds 3.., so the kernel's accept queue outlives any one worker: connections that arrive
//! while a worker is replaced wait in the queue instead of being refused.

use std::fmt;
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::{FcntlArg, FdFlag, fcntl};
use nix::sys::socket::{
    AddressFamily, Backlog, SockaddrLike, SockaddrStorage, getsockname, listen, setsockopt, sockopt,
};

/// The kernel's accept queue length we ask for; the kernel caps it at `net.core.somaxconn`.
const BACKLOG: i32 = 4096;

/// One `--bind` address, parsed but not yet opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddr {
    /// `HOST:PORT`, `[::]:PORT`, `:PORT` (all IPv4 addresses) or a bare `PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `fd://N`: an already-listening socket trimrun inherited at fd N.
    Fd(RawFd),
}

impl fmt::Display for BindAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BindAddr::Tcp(a) => write!(f, "{a}"),
            BindAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            BindAddr::Fd(n) => write!(f, "fd://{n}"),
        }
    }
}

const BIND_FORMS: &str = "expected HOST:PORT, [::]:PORT, :PORT, unix:PATH or fd://N";

/// Parse one `--bind` value.
pub fn parse_bind(text: &str) -> Result<BindAddr, String> {
    let t = text.trim();
    if let Some(path) = t.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(format!(
                "invalid address '{text}': empty unix socket path ({BIND_FORMS})"
            ));
        }
        return Ok(BindAddr::Unix(PathBuf::from(path)));
    }
    if let Some(n) = t.strip_prefix("fd://") {
        let fd: RawFd = n.parse().map_err(|_| {
            format!("invalid address '{text}': fd://N needs a number ({BIND_FORMS})")
        })?;
        if fd < 0 {
            return Err(format!("invalid address '{text}': negative fd"));
        }
        return Ok(BindAddr::Fd(fd));
    }
    if let Ok(port) = t.parse::<u16>() {
        return Ok(BindAddr::Tcp(format!("0.0.0.0:{port}")));
    }
    let (host, port) = t
        .rsplit_once(':')
        .ok_or_else(|| format!("invalid address '{text}': {BIND_FORMS}"))?;
    port.parse::<u16>()
        .map_err(|_| format!("invalid port in address '{text}': {BIND_FORMS}"))?;
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    if host.starts_with('[') != host.ends_with(']') {
        return Err(format!(
            "invalid address '{text}': unbalanced brackets ({BIND_FORMS})"
        ));
    }
    if host.contains(':') && !host.starts_with('[') {
        return Err(format!(
            "invalid address '{text}': IPv6 hosts go in brackets, as [::1]:8000"
        ));
    }
    Ok(BindAddr::Tcp(format!("{host}:{port}")))
}

/// A listening socket to hand to every worker.
#[derive(Debug)]
pub struct Listener {
    pub fd: OwnedFd,
    /// The name passed in `LISTEN_FDNAMES` (systemd's FileDescriptorName, or the address).
    pub name: String,
    /// What it listens on, for logs (`127.0.0.1:8000`, `unix:/run/app.sock`).
    pub describe: String,
    /// A unix socket file trimrun created, removed when trimrun exits.
    pub unix_path: Option<PathBuf>,
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot listen on {addr}: {source}{hint}")]
    Bind {
        addr: String,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("cannot listen on {addr}: {reason}")]
    Invalid { addr: String, reason: String },
}

fn io_hint(e: &std::io::Error) -> &'static str {
    match e.kind() {
        std::io::ErrorKind::AddrInUse => {
            " (another process listens there: stop it or pick another --bind)"
        }
        std::io::ErrorKind::PermissionDenied => {
            " (ports below 1024 need root or CAP_NET_BIND_SERVICE; check the directory's permissions for unix sockets)"
        }
        std::io::ErrorKind::AddrNotAvailable => " (no interface has that address)",
        _ => "",
    }
}

fn set_cloexec(fd: &OwnedFd, addr: &str) -> Result<(), SocketError> {
    // Sockets handed on to workers are dup2'ed to 3.. in the child, which clears CLOEXEC on
    // the copies; the originals must not leak into anything else trimrun runs.
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC))
        .map(|_| ())
        .map_err(|e| SocketError::Bind {
            addr: addr.to_string(),
            source: e.into(),
            hint: "",
        })
}

/// Listen again with a long queue: connections that arrive while workers are replaced wait
/// there. (std listens with a short default; a second listen() only changes the backlog.)
fn relisten(fd: &OwnedFd, addr: &str) -> Result<(), SocketError> {
    let backlog = Backlog::new(BACKLOG).unwrap_or(Backlog::MAXCONN);
    listen(fd, backlog).map_err(|e| SocketError::Bind {
        addr: addr.to_string(),
        source: e.into(),
        hint: "",
    })
}

/// Set TCP_NODELAY on a TCP listener (a unix socket is left alone). Connections accepted from
/// it inherit the option on Linux, so every worker's replies go out without Nagle's delay
/// even when its server does not set the option itself (as gunicorn does on its listeners;
/// `uvicorn --fd 3` takes the fd for a unix socket and never sets it).
fn set_nodelay_if_tcp(fd: &OwnedFd, addr: &str) -> Result<(), SocketError> {
    let is_tcp = getsockname::<SockaddrStorage>(fd.as_raw_fd())
        .ok()
        .and_then(|a| a.family())
        .is_some_and(|f| matches!(f, AddressFamily::Inet | AddressFamily::Inet6));
    if !is_tcp {
        return Ok(());
    }
    setsockopt(fd, sockopt::TcpNoDelay, &true).map_err(|e| SocketError::Bind {
        addr: addr.to_string(),
        source: e.into(),
        hint: " (setting TCP_NODELAY)",
    })
}

/// Open every `--bind` address. `unix_mode` is applied to unix socket files (`--bind-mode`).
pub fn open(binds: &[BindAddr], unix_mode: Option<u32>) -> Result<Vec<Listener>, SocketError> {
    binds.iter().map(|b| open_one(b, unix_mode)).collect()
}

fn open_one(bind: &BindAddr, unix_mode: Option<u32>) -> Result<Listener, SocketError> {
    let describe = bind.to_string();
    match bind {
        BindAddr::Tcp(addr) => {
            let addrs: Vec<SocketAddr> = addr
                .to_socket_addrs()
                .map_err(|e| SocketError::Invalid {
                    addr: addr.clone(),
                    reason: format!("cannot resolve host: {e}"),
                })?
                .collect();
            let first = *addrs.first().ok_or_else(|| SocketError::Invalid {
                addr: addr.clone(),
                reason: "host resolves to no address".into(),
            })?;
            let l = TcpListener::bind(first).map_err(|e| SocketError::Bind {
                addr: addr.clone(),
                hint: io_hint(&e),
                source: e,
            })?;
            let local = l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or(addr.clone());
            let fd = OwnedFd::from(l);
            relisten(&fd, addr)?;
            set_nodelay_if_tcp(&fd, addr)?;
            Ok(Listener {
                fd,
                name: "http".into(),
                describe: local,
                unix_path: None,
            })
        }
        BindAddr::Unix(path) => {
            remove_stale_unix_socket(path, &describe)?;
            let bound = match unix_mode {
                Some(mode) => bind_unix_with_mode(path, mode),
                None => UnixListener::bind(path),
            };
            let l = bound.map_err(|e| SocketError::Bind {
                addr: describe.clone(),
                hint: io_hint(&e),
                source: e,
            })?;
            let fd = OwnedFd::from(l);
            relisten(&fd, &describe)?;
            Ok(Listener {
                fd,
                name: "http".into(),
                describe,
                unix_path: Some(path.clone()),
            })
        }
        BindAddr::Fd(n) => {
            let fd = adopt_listening_fd(*n, &describe)?;
            Ok(Listener {
                fd,
                name: "http".into(),
                describe,
                unix_path: None,
            })
        }
    }
}

/// Bind a unix socket whose file has exactly `mode` from the moment it exists: nothing
/// is changed at the path afterwards (a chmod after bind would follow whatever the path
/// had become meanwhile, e.g. a symlink to another file).
///
/// The bind runs on a short-lived thread that unshares its filesystem attributes
/// (`CLONE_FS`) and sets its own umask to the complement of `mode` (a socket file is
/// created 0777 minus the umask), so the multi-threaded process's umask is never touched.
/// Where `unshare` is refused (container seccomp profiles), the socket is bound inside a
/// fresh 0700 directory next to the path, chmod-ed there (nobody else can reach it), and
/// hard-linked into place.
pub fn bind_unix_with_mode(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    let p = path.to_path_buf();
    let on_thread = std::thread::Builder::new()
        .name("trimrun-bind".into())
        .spawn(move || -> std::io::Result<Option<UnixListener>> {
            if nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS).is_err() {
                return Ok(None);
            }
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(!mode & 0o777));
            UnixListener::bind(&p).map(Some)
        })?
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("bind thread panicked")))?;
    if let Some(l) = on_thread {
        return Ok(l);
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let private = parent.join(format!(
        ".trimrun-bind-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("s");
    let result = (|| {
        let l = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
        std::fs::hard_link(&tmp, path)?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&private);
    result
}

/// A unix socket file left by a dead process is removed; one that a live process still
/// accepts on is an error, and so is a path that is not a socket.
fn remove_stale_unix_socket(path: &std::path::Path, describe: &str) -> Result<(), SocketError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(SocketError::Invalid {
            addr: describe.into(),
            reason: "the path exists and is not a socket (remove it or pick another path)".into(),
        });
    }
    if UnixStream::connect(path).is_ok() {
        return Err(SocketError::Invalid {
            addr: describe.into(),
            reason: "a running process accepts on this socket (stop it or pick another path)"
                .into(),
        });
    }
    std::fs::remove_file(path).map_err(|e| SocketError::Bind {
        addr: describe.into(),
        hint: " (cannot remove the stale socket file)",
        source: e,
    })
}

/// Take ownership of an inherited fd after checking that it is a listening socket.
fn adopt_listening_fd(n: RawFd, describe: &str) -> Result<OwnedFd, SocketError> {
    let invalid = |reason: String| SocketError::Invalid {
        addr: describe.into(),
        reason,
    };
    let fd = crate::spawn::adopt_inherited_fd(n)
        .ok_or_else(|| invalid(format!("fd {n} is not open (was it passed to trimrun?)")))?;
    let accepting = nix::sys::socket::getsockopt(&fd, nix::sys::socket::sockopt::AcceptConn)
        .map_err(|e| invalid(format!("fd {n} is not a socket: {e}")))?;
    if !accepting {
        return Err(invalid(format!("fd {n} is a socket but is not listening")));
    }
    set_cloexec(&fd, describe)?;
    set_nodelay_if_tcp(&fd, describe)?;
    Ok(fd)
}

/// Sockets passed to trimrun itself by systemd socket activation (`LISTEN_FDS` with
/// `LISTEN_PID` equal to our pid), in order, named from `LISTEN_FDNAMES`. Workers never see
/// these variables as trimrun got them: `spawn` writes their own.
pub fn from_systemd() -> Result<Vec<Listener>, SocketError> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(vec![]);
    };
    if pid.trim() != std::process::id().to_string() {
        return Ok(vec![]);
    }
    let n: i32 = fds.trim().parse().map_err(|_| SocketError::Invalid {
        addr: "LISTEN_FDS".into(),
        reason: format!("'{fds}' is not a number"),
    })?;
    let names: Vec<String> = names
        .map(|s| s.split(':').map(str::to_string).collect())
        .unwrap_or_default();
    (0..n)
        .map(|i| {
            let fd = 3 + i;
            let describe = format!("fd://{fd} (systemd)");
            let owned = adopt_listening_fd(fd, &describe)?;
            let name = names
                .get(i as usize)
                .cloned()
                .filter(|s| !s.is_empty())
                .unwrap_or_else(|| "http".into());
            let describe = local_name(&owned).unwrap_or(describe);
            Ok(Listener {
                fd: owned,
                name,
                describe,
                unix_path: None,
            })
        })
        .collect()
}

/// `ADDRESS (systemd)` for a socket systemd passed: `0.0.0.0:8000`, `[::]:8000`, a unix
/// path, `@name` for an abstract one. (nix's `SockaddrStorage` Display says "Address family
/// unspecified" for inet sockets got from `getsockname`; std parses those.)
fn local_name(fd: &OwnedFd) -> Option<String> {
    let addr: SockaddrStorage = getsockname(fd.as_raw_fd()).ok()?;
    let name = if let Some(u) = addr.as_unix_addr() {
        match (u.path(), u.as_abstract()) {
            (Some(p), _) => p.display().to_string(),
            (None, Some(a)) => format!("@{}", String::from_utf8_lossy(a)),
            _ => "unnamed unix socket".to_string(),
        }
    } else {
        // std reads inet addresses right; on a duplicate, so the socket itself is untouched.
        let dup = fd.try_clone().ok()?;
        std::net::TcpListener::from(dup)
            .local_addr()
            .ok()?
            .to_string()
    };
    Some(format!("{name} (systemd)"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_forms_parse() {
        assert_eq!(
            parse_bind("127.0.0.1:8000").unwrap(),
            BindAddr::Tcp("127.0.0.1:8000".into())
        );
        assert_eq!(
            parse_bind("[::]:8000").unwrap(),
            BindAddr::Tcp("[::]:8000".into())
        );
        assert_eq!(
            parse_bind(":8000").unwrap(),
            BindAddr::Tcp("0.0.0.0:8000".into())
        );
        assert_eq!(
            parse_bind("8000").unwrap(),
            BindAddr::Tcp("0.0.0.0:8000".into())
        );
        assert_eq!(
            parse_bind("localhost:80").unwrap(),
            BindAddr::Tcp("localhost:80".into())
        );
        assert_eq!(
            parse_bind("unix:/run/app.sock").unwrap(),
            BindAddr::Unix("/run/app.sock".into())
        );
        assert_eq!(parse_bind("fd://3").unwrap(), BindAddr::Fd(3));
    }

    #[test]
    fn malformed_binds_say_what_is_expected() {
        for bad in [
            "",
            "host",
            "host:port",
            "1.2.3.4:99999",
            "unix:",
            "fd://x",
            "::1:80",
            "[::1:80",
        ] {
            let err = parse_bind(bad).unwrap_err();
            assert!(err.contains("invalid"), "{bad}: {err}");
        }
    }

    #[test]
    fn stale_unix_socket_is_replaced_and_live_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        {
            let _l = UnixListener::bind(&path).unwrap();
            let err = open(&[BindAddr::Unix(path.clone())], None).unwrap_err();
            assert!(err.to_string().contains("running process"), "{err}");
        }
        // The listener is closed; its file remains: stale.
        assert!(path.exists());
        let ls = open(&[BindAddr::Unix(path.clone())], Some(0o660)).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o660);
        drop(ls);
        assert!(
            !path.exists(),
            "socket file removed when the listener is dropped"
        );
    }

    /// `--bind-mode`: the socket file appears with its mode, and nothing touches its
    /// permissions at the path afterwards (no chmod that could follow a swapped path).
    #[test]
    fn bind_mode_is_the_files_mode_from_creation_never_a_chmod_after_bind() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.sock");
        let ino = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
        ino.add_watch(
            dir.path(),
            AddWatchFlags::IN_CREATE | AddWatchFlags::IN_ATTRIB,
        )
        .unwrap();
        let ls = open(&[BindAddr::Unix(path.clone())], Some(0o660)).unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o660);
        let events = ino.read_events().unwrap_or_default();
        let on_socket: Vec<_> = events
            .iter()
            .filter(|e| e.name.as_deref() == Some(std::ffi::OsStr::new("app.sock")))
            .map(|e| e.mask)
            .collect();
        assert!(
            on_socket
                .iter()
                .any(|m| m.contains(AddWatchFlags::IN_CREATE)),
            "{on_socket:?}"
        );
        assert!(
            !on_socket
                .iter()
                .any(|m| m.contains(AddWatchFlags::IN_ATTRIB)),
            "the socket's permissions were changed after it appeared: {on_socket:?}"
        );
        // Works for a mode wider than the process umask allows, too.
        drop(ls);
        let _ls = open(&[BindAddr::Unix(path.clone())], Some(0o666)).unwrap();
        let mode = std::fs::symlink_metadata(&path)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o666);
    }

    #[test]
    fn tcp_listeners_and_their_connections_have_nodelay() {
        let ls = open(&[BindAddr::Tcp("127.0.0.1:0".into())], None).unwrap();
        let fd = &ls[0].fd;
        assert!(nix::sys::socket::getsockopt(fd, sockopt::TcpNoDelay).unwrap());
        let port = ls[0].describe.rsplit_once(':').unwrap().1.to_string();
        let _client = std::net::TcpStream::connect(format!("127.0.0.1:{port}")).unwrap();
        let accepted = nix::sys::socket::accept(fd).unwrap();
        assert!(
            nix::sys::socket::getsockopt(&accepted, sockopt::TcpNoDelay).unwrap(),
            "an accepted connection inherits TCP_NODELAY from the listener"
        );
        let dir = tempfile::tempdir().unwrap();
        let unix = open(&[BindAddr::Unix(dir.path().join("s.sock"))], None).unwrap();
        assert!(nix::sys::socket::getsockopt(&unix[0].fd, sockopt::TcpNoDelay).is_err());
    }

    #[test]
    fn port_in_use_is_a_clear_error() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let err = open(&[BindAddr::Tcp(addr)], None).unwrap_err().to_string();
        assert!(err.contains("another process listens there"), "{err}");
    }
}

#[cfg(test)]
mod local_name_tests {
    #[test]
    fn systemd_sockets_are_named_by_their_real_address() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let fd: std::os::fd::OwnedFd = l.into();
        assert_eq!(
            super::local_name(&fd).unwrap(),
            format!("127.0.0.1:{port} (systemd)")
        );
        let l6 = std::net::TcpListener::bind("[::1]:0");
        if let Ok(l6) = l6 {
            let port = l6.local_addr().unwrap().port();
            let fd: std::os::fd::OwnedFd = l6.into();
            assert_eq!(
                super::local_name(&fd).unwrap(),
                format!("[::1]:{port} (systemd)")
            );
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let u = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let fd: std::os::fd::OwnedFd = u.into();
        assert_eq!(
            super::local_name(&fd).unwrap(),
            format!("{} (systemd)", path.display())
        );
    }
}
