//! The control socket server: bind safely, then relay request lines to the supervisor.
//!
//! Binding is where the care goes:
//! - an existing socket file is probed by connecting to it: an answer means a live trimrun
//!   owns it (we refuse, naming its pid from `SO_PEERCRED`); "connection refused" means a
//!   stale file from a killed run, which we remove; a file that is not a socket is never
//!   removed;
//! - the socket is created with mode 0600 from the start: `bind` runs on a short-lived
//!   thread that has unshared its filesystem attributes (`unshare(CLONE_FS)`) and set its
//!   own umask to 0177, so there is no window in which the socket is open to others and the
//!   process-wide umask of the (multi-threaded) supervisor is never touched; where
//!   `unshare` is forbidden (container seccomp profiles) it is bound inside a fresh 0700
//!   directory, chmod-ed, and hard-linked into place;
//! - the returned [`ControlServer`] removes the socket on drop, but only if the file at the
//!   path is still the one it bound (a later trimrun may have replaced it).

use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, info, warn};

use super::limit::{ConnLimiter, ConnSlot};
use super::{ControlMsg, MAX_REQUEST_LINE, Reply, StatusError, WireReply, parse_request_line};

/// At most this many client connections are open at once. A new one beyond that evicts
/// the connection idle the longest; only when all are busy does it get an error reply.
const MAX_CONNECTIONS: usize = 64;

/// A connection that sends no complete request for this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// A client that does not take its reply within this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// At exit, connections get this long to deliver the replies they owe.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the liveness probe of an existing socket waits for the other side.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// `sun_path` is 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

/// The running control server. Dropping it stops accepting, ends open connections and
/// removes the socket file.
#[derive(Debug)]
pub struct ControlServer {
    path: PathBuf,
    /// (st_dev, st_ino) of the socket we bound, to remove only our own file.
    id: (u64, u64),
    task: JoinHandle<()>,
    closing: watch::Sender<bool>,
    /// Directories created for the socket (outermost first), removed again if empty.
    created: Vec<PathBuf>,
}

impl ControlServer {
    /// The path of the socket.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Stop accepting, let open connections deliver the replies they owe (`ctl stop` is
    /// answered before trimrun exits), close the rest, remove the socket.
    pub async fn close(mut self) {
        let _ = self.closing.send(true);
        let task = &mut self.task;
        if tokio::time::timeout(CLOSE_TIMEOUT + Duration::from_millis(500), task)
            .await
            .is_err()
        {
            debug!("control server did not close in time");
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.task.abort();
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.id => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), error = %e, "cannot remove control socket");
                } else {
                    debug!(path = %self.path.display(), "removed control socket");
                }
            }
            Ok(_) => debug!(path = %self.path.display(), "control socket was replaced; leaving it"),
            Err(_) => {}
        }
        for dir in self.created.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Bind the control socket at `path` (with the liveness check and mode 0600) and spawn the
/// accept loop on the current tokio runtime. Each request is sent to the supervisor through
/// `tx`; the returned guard removes the socket file on drop.
pub async fn serve(
    path: &Path,
    tx: mpsc::Sender<ControlMsg>,
) -> Result<ControlServer, StatusError> {
    let path = absolute(path)?;
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        return Err(StatusError::PathTooLong {
            path,
            len,
            max: MAX_SOCKET_PATH,
        });
    }
    let created = prepare_dir(&path)?;
    // Directories made for a socket that then fails to come up are removed again.
    struct Made(Vec<PathBuf>);
    impl Drop for Made {
        fn drop(&mut self) {
            for dir in self.0.iter().rev() {
                let _ = std::fs::remove_dir(dir);
            }
        }
    }
    let mut made = Made(created);
    clear_stale(&path).await?;

    let listener = match bind_private(&path) {
        Ok(l) => l,
        Err(e) if e.kind() == ErrorKind::AddrInUse => {
            // Another trimrun bound it between our probe and our bind.
            return Err(StatusError::InUse {
                pid: probe(&path).await.ok().flatten(),
                path,
            });
        }
        Err(e) => {
            return Err(StatusError::Io {
                op: "bind control socket",
                path,
                source: e,
            });
        }
    };
    let meta = std::fs::symlink_metadata(&path).map_err(|e| StatusError::Io {
        op: "stat control socket",
        path: path.clone(),
        source: e,
    })?;
    // bind_private already created it 0600; say so explicitly in case a filesystem ignored
    // the umask (the mode must never be wider).
    if meta.mode() & 0o777 != 0o600 {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
            StatusError::Io {
                op: "chmod 0600 control socket",
                path: path.clone(),
                source: e,
            }
        })?;
    }
    let listener = UnixListener::from_std(listener).map_err(|e| StatusError::Io {
        op: "register control socket with the runtime",
        path: path.clone(),
        source: e,
    })?;
    info!(path = %path.display(), "control socket listening (trimrun status, trimrun ctl)");
    let (closing, closing_rx) = watch::channel(false);
    let task = tokio::spawn(accept_loop(listener, tx, closing_rx));
    Ok(ControlServer {
        id: (meta.dev(), meta.ino()),
        path,
        task,
        closing,
        created: std::mem::take(&mut made.0),
    })
}

fn absolute(path: &Path) -> Result<PathBuf, StatusError> {
    std::path::absolute(path).map_err(|e| StatusError::Io {
        op: "resolve control socket path",
        path: path.to_path_buf(),
        source: e,
    })
}

/// Create the socket's directory (0700) if missing. The per-user fallback directory under
/// the temp dir must be ours: anyone could have created it first.
fn prepare_dir(path: &Path) -> Result<Vec<PathBuf>, StatusError> {
    let Some(dir) = path.parent() else {
        return Ok(vec![]);
    };
    let created: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.exists())
        .map(Path::to_path_buf)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    if !dir.exists() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| StatusError::Io {
                op: "create control socket directory",
                path: dir.to_path_buf(),
                source: e,
            })?;
    }
    let uid = nix::unistd::geteuid().as_raw();
    if dir == super::fallback_dir(uid) {
        let m = std::fs::symlink_metadata(dir).map_err(|e| StatusError::Io {
            op: "stat control socket directory",
            path: dir.to_path_buf(),
            source: e,
        })?;
        if !m.is_dir() || m.uid() != uid || m.mode() & 0o022 != 0 {
            return Err(StatusError::InsecureDir {
                path: dir.to_path_buf(),
                reason: format!(
                    "it must be a directory owned by uid {uid} and writable only by it (remove it, set XDG_RUNTIME_DIR, or pass --control)"
                ),
            });
        }
    }
    Ok(created)
}

/// Remove a stale socket file at `path`; refuse when a live process answers on it or when
/// the file is not a socket.
async fn clear_stale(path: &Path) -> Result<(), StatusError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(StatusError::Io {
                op: "stat control socket",
                path: path.to_path_buf(),
                source: e,
            });
        }
    };
    if !meta.file_type().is_socket() {
        return Err(StatusError::NotASocket {
            path: path.to_path_buf(),
        });
    }
    match probe(path).await {
        Ok(pid) => Err(StatusError::InUse {
            path: path.to_path_buf(),
            pid,
        }),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            info!(path = %path.display(), "removing stale control socket");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StatusError::Io {
                    op: "remove stale control socket",
                    path: path.to_path_buf(),
                    source: e,
                }),
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StatusError::Io {
            op: "check whether a trimrun is listening on",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Connect to `path`. Ok(pid of the listener, if the kernel tells) when something is
/// listening; a probe that times out counts as live (a listener with a full backlog).
async fn probe(path: &Path) -> std::io::Result<Option<i32>> {
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        Ok(Ok(stream)) => Ok(stream.peer_cred().ok().and_then(|c| c.pid())),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(None),
    }
}

/// Bind a unix listener at `path` whose file is created with mode 0600; fails with
/// `AddrInUse` if something already exists at `path`.
fn bind_private(path: &Path) -> std::io::Result<std::os::unix::net::UnixListener> {
    match bind_with_private_umask(path)? {
        Some(l) => Ok(l),
        None => bind_via_private_dir(path),
    }
}

/// The umask is a per-process attribute shared by all threads unless a thread unshares it
/// (`CLONE_FS`), so the bind runs on its own short-lived thread that does exactly that (a
/// pooled thread would keep the narrow umask). Ok(None) when unsharing is not allowed
/// (seccomp profiles of container runtimes refuse `unshare` without CAP_SYS_ADMIN).
fn bind_with_private_umask(
    path: &Path,
) -> std::io::Result<Option<std::os::unix::net::UnixListener>> {
    let path = path.to_path_buf();
    let handle = std::thread::Builder::new()
        .name("trimrun-ctl-bind".into())
        .spawn(move || {
            if let Err(e) = nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS) {
                debug!(error = %e, "unshare(CLONE_FS) refused; binding in a private directory");
                return Ok(None);
            }
            nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
            let l = std::os::unix::net::UnixListener::bind(&path)?;
            l.set_nonblocking(true)?;
            Ok(Some(l))
        })?;
    handle
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("bind thread panicked")))
}

/// The fallback: bind inside a fresh 0700 directory next to `path` (nobody else can reach
/// the socket there), chmod it 0600, then hard-link it into place, which fails atomically
/// with `AlreadyExists` (reported as `AddrInUse`) if another process got there first.
pub(super) fn bind_via_private_dir(
    path: &Path,
) -> std::io::Result<std::os::unix::net::UnixListener> {
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0.join("s"));
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let parent = path.parent().unwrap_or(Path::new("/"));
    let dir = parent.join(format!(
        ".trimrun-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    let cleanup = Cleanup(dir);
    let tmp = cleanup.0.join("s");
    let l = std::os::unix::net::UnixListener::bind(&tmp)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    match std::fs::hard_link(&tmp, path) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            return Err(std::io::Error::new(ErrorKind::AddrInUse, e));
        }
        Err(e) => return Err(e),
    }
    drop(cleanup);
    l.set_nonblocking(true)?;
    Ok(l)
}

async fn accept_loop(
    listener: UnixListener,
    tx: mpsc::Sender<ControlMsg>,
    mut closing: watch::Receiver<bool>,
) {
    let limiter = ConnLimiter::new(MAX_CONNECTIONS);
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((mut stream, _)) => {
                    let peer = stream.peer_cred().ok();
                    debug!(uid = peer.map(|c| c.uid()), pid = peer.and_then(|c| c.pid()), "control connection");
                    let Some(slot) = limiter.admit() else {
                        let line = WireReply::error(format!("too many control connections busy (at most {MAX_CONNECTIONS}); try again")).to_line();
                        conns.spawn(async move {
                            let _ = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(format!("{line}\n").as_bytes())).await;
                        });
                        continue;
                    };
                    conns.spawn(handle_connection(stream, tx.clone(), slot, closing.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = closing.changed() => break,
        }
    }
    // Closing: accept nothing more; let connections answer what they were asked (a
    // `ctl stop` waits for its reply), for a bounded time.
    drop(listener);
    let drained = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        debug!(left = conns.len(), "control connections still busy at exit");
    }
}

/// Serve one connection: one reply line per request line, in order, until EOF, an idle
/// timeout, an eviction (see [`ConnLimiter`]) or the server closing.
async fn handle_connection(
    stream: UnixStream,
    tx: mpsc::Sender<ControlMsg>,
    slot: ConnSlot,
    mut closing: watch::Receiver<bool>,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        if *closing.borrow() {
            return;
        }
        line.clear();
        slot.idle();
        let mut limited = (&mut reader).take(MAX_REQUEST_LINE as u64);
        let read = limited.read_until(b'\n', &mut line);
        let n = tokio::select! {
            r = tokio::time::timeout(IDLE_TIMEOUT, read) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    debug!(error = %e, "control connection read failed");
                    return;
                }
                Err(_) => {
                    debug!("control connection idle too long; closing it");
                    return;
                }
            },
            _ = slot.evicted() => {
                debug!("idle control connection evicted to make room for a new one");
                return;
            }
            _ = closing.changed() => return,
        };
        if n == 0 {
            return;
        }
        slot.busy();
        let complete = line.last() == Some(&b'\n');
        if !complete && n >= MAX_REQUEST_LINE {
            let reply = WireReply::error(format!(
                "request too long (more than {MAX_REQUEST_LINE} bytes); closing the connection"
            ));
            let _ = tokio::time::timeout(
                WRITE_TIMEOUT,
                write.write_all(format!("{}\n", reply.to_line()).as_bytes()),
            )
            .await;
            return;
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            if complete {
                continue;
            }
            return;
        }
        let reply = match parse_request_line(&line) {
            Ok(req) => ask_supervisor(&tx, req).await,
            Err(e) => {
                debug!(error = %e, "malformed control request");
                Err(e)
            }
        };
        let out = format!("{}\n", WireReply::from_reply(reply).to_line());
        match tokio::time::timeout(WRITE_TIMEOUT, write.write_all(out.as_bytes())).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                debug!(error = %e, "control connection write failed");
                return;
            }
            Err(_) => {
                debug!("control client does not read its replies; closing the connection");
                return;
            }
        }
        if !complete {
            // EOF after a last request without newline: answered, done.
            return;
        }
    }
}

async fn ask_supervisor(tx: &mpsc::Sender<ControlMsg>, req: super::Request) -> Reply {
    debug!(?req, "control request");
    let (reply, answer) = oneshot::channel();
    if tx.send(ControlMsg { req, reply }).await.is_err() {
        return Err("trimrun is shutting down".into());
    }
    answer
        .await
        .unwrap_or_else(|_| Err("trimrun dropped the request (it is shutting down)".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_bind_creates_a_0600_socket_and_never_replaces_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let l = bind_via_private_dir(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.mode() & 0o777, 0o600);
        // The socket answers at its final path, and the private directory is gone.
        let _c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        l.set_nonblocking(false).unwrap();
        l.accept().unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("ctl.sock")]);
        // A second bind on the same path fails as "address in use", leaving no debris.
        let err = bind_via_private_dir(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn umask_bind_creates_a_0600_socket_whatever_the_process_umask() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ctl.sock");
        let _l = bind_private(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        let err = bind_private(&path).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AddrInUse);
    }
}
