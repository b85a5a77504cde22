//! The client side of the control protocol: a blocking connection over a std `UnixStream`
//! (`trimrun status` and `trimrun ctl` in [`crate::commands::status`] use it).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{PROTOCOL_VERSION, Request, Snapshot, StatusError, WireReply, request_line};

/// How long `status` waits for an answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest reply line read (a snapshot of a big pool is a few hundred KiB at most).
const MAX_REPLY_LINE: u64 = 16 * 1024 * 1024;

/// A blocking connection to a control socket.
#[derive(Debug)]
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    timeout: Duration,
}

impl Client {
    /// Connect to the control socket at `path`, with clear errors for "nobody there" and
    /// "not allowed".
    pub fn connect(path: &Path) -> Result<Client, StatusError> {
        check_trusted(path, nix::unistd::geteuid().as_raw())?;
        let stream = UnixStream::connect(path).map_err(|e| connect_error(path, e))?;
        let mut c = Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            timeout: STATUS_TIMEOUT,
        };
        c.set_timeout(STATUS_TIMEOUT)?;
        Ok(c)
    }

    /// How long to wait for each reply.
    pub fn set_timeout(&mut self, t: Duration) -> Result<(), StatusError> {
        self.timeout = t;
        let s = self.reader.get_ref();
        s.set_read_timeout(Some(t))
            .and_then(|()| s.set_write_timeout(Some(t)))
            .map_err(|e| self.io("configure", e))
    }

    /// Send one request and wait for its reply: the `data` of an ok reply, or
    /// [`StatusError::Remote`] with the supervisor's message.
    pub fn request(&mut self, req: &Request) -> Result<serde_json::Value, StatusError> {
        let line = format!("{}\n", request_line(req));
        self.reader
            .get_mut()
            .write_all(line.as_bytes())
            .map_err(|e| self.io("send a request to", e))?;
        let reply = self.read_reply()?;
        if reply.v != PROTOCOL_VERSION {
            return Err(StatusError::Protocol {
                path: self.path.clone(),
                detail: format!(
                    "protocol version {} (this client speaks {PROTOCOL_VERSION}; use the trimrun binary that runs the pool)",
                    reply.v
                ),
            });
        }
        if reply.ok {
            Ok(reply.data.unwrap_or(serde_json::Value::Null))
        } else {
            Err(StatusError::Remote(reply.error.unwrap_or_else(|| {
                "request failed (no reason given)".into()
            })))
        }
    }

    /// Ask for the pool's [`Snapshot`].
    pub fn status(&mut self) -> Result<Snapshot, StatusError> {
        let data = self.request(&Request::Status)?;
        serde_json::from_value(data)
            .map(sanitize_snapshot)
            .map_err(|e| StatusError::Protocol {
                path: self.path.clone(),
                detail: format!("status data is not a snapshot: {e}"),
            })
    }

    fn read_reply(&mut self) -> Result<WireReply, StatusError> {
        let mut line = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_REPLY_LINE)
            .read_until(b'\n', &mut line)
            .map_err(|e| match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => StatusError::Timeout {
                    path: self.path.clone(),
                    secs: self.timeout.as_secs(),
                },
                _ => self.io("read a reply from", e),
            })?;
        if n == 0 {
            return Err(StatusError::Closed {
                path: self.path.clone(),
            });
        }
        serde_json::from_slice(&line).map_err(|e| StatusError::Protocol {
            path: self.path.clone(),
            detail: format!("{e}: {}", String::from_utf8_lossy(&line).trim_end()),
        })
    }

    fn io(&self, op: &'static str, e: std::io::Error) -> StatusError {
        if e.kind() == ErrorKind::BrokenPipe || e.kind() == ErrorKind::ConnectionReset {
            return StatusError::Closed {
                path: self.path.clone(),
            };
        }
        StatusError::Io {
            op,
            path: self.path.clone(),
            source: e,
        }
    }
}

/// Refuse a control socket that someone other than the pool's user could have put there,
/// as the server refuses such a directory: what it answers would be printed as the pool's
/// state, and `ctl` would act on it.
///
/// - the socket must be owned by us or root; a root client also accepts the owner of the
///   directory the socket is in (a pool run with systemd's `User=` in its
///   `RuntimeDirectory=`);
/// - the directory holding it must be owned by root, us (or that owner), and not writable
///   by others, unless sticky (`/tmp`): in a sticky shared directory only a socket of our
///   own or root's counts;
/// - the per-user fallback directory (`$TMPDIR/trimrun-UID`) must be ours and 0700-ish.
///
/// A path that does not exist is left to `connect` (which says nobody is listening).
pub(super) fn check_trusted(path: &Path, uid: u32) -> Result<(), StatusError> {
    let insecure = |p: &Path, reason: String| StatusError::InsecureDir {
        path: p.to_path_buf(),
        reason,
    };
    let Ok(sock) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let Some(parent) = std::path::absolute(path)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
    else {
        return Ok(());
    };
    let dir = std::fs::canonicalize(&parent).unwrap_or(parent);
    let Ok(dmeta) = std::fs::metadata(&dir) else {
        return Ok(());
    };
    let owner = sock.uid();
    let ours = |u: u32| u == uid || u == 0;
    let sock_ok = ours(owner) || (uid == 0 && owner == dmeta.uid());
    if !sock_ok {
        return Err(insecure(
            path,
            format!(
                "the socket belongs to uid {owner}, not to you (uid {uid}) or root, in a directory it does not own; a pool of another user is reached as root or that user"
            ),
        ));
    }
    if sock.file_type().is_symlink() {
        return Err(insecure(path, "it is a symbolic link, not a socket".into()));
    }
    if dir == super::fallback_dir(uid) && (dmeta.uid() != uid || dmeta.mode() & 0o022 != 0) {
        return Err(insecure(
            &dir,
            format!(
                "it must be a directory owned by uid {uid} and writable only by it (someone else may have created it: remove it, or pass --control)"
            ),
        ));
    }
    // The directory that holds the socket decides who could have put it there. (Writable
    // directories further up only allow swapping this one, which these checks would see:
    // a pod's emptyDir is 0777, and the socket lives in a 0700 directory trimrun made in it.)
    let shared = dmeta.mode() & 0o022 != 0;
    let sticky = dmeta.mode() & 0o1000 != 0;
    if shared && !sticky {
        return Err(insecure(
            &dir,
            "others may write to it, so they could have put the socket there (pass a --control path in a directory only the pool's user can write, e.g. DIR/ctl/trimrun.sock: trimrun creates ctl/ 0700)".into(),
        ));
    }
    if shared && !ours(owner) {
        return Err(insecure(
            path,
            format!("the socket belongs to uid {owner} in a directory anyone can write to"),
        ));
    }
    if !ours(dmeta.uid()) && dmeta.uid() != owner {
        return Err(insecure(
            &dir,
            format!(
                "it belongs to uid {}, neither you, root nor the socket's owner",
                dmeta.uid()
            ),
        ));
    }
    Ok(())
}

/// `s` with every control character (escape sequences, carriage returns, newlines...)
/// shown as `\u{..}`: what a socket sends is never written raw to a terminal.
pub fn sanitize(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The snapshot with every string field sanitised (see [`sanitize`]).
fn sanitize_snapshot(mut s: Snapshot) -> Snapshot {
    s.backend = sanitize(&s.backend);
    s.state = sanitize(&s.state);
    for w in &mut s.workers {
        w.state = sanitize(&w.state);
        w.last_reason = w.last_reason.as_deref().map(sanitize);
    }
    s
}

fn connect_error(path: &Path, e: std::io::Error) -> StatusError {
    match e.kind() {
        ErrorKind::NotFound | ErrorKind::ConnectionRefused | ErrorKind::NotADirectory => {
            StatusError::NotListening {
                path: path.to_path_buf(),
            }
        }
        ErrorKind::PermissionDenied => StatusError::PermissionDenied {
            path: path.to_path_buf(),
            owner: std::fs::metadata(path).ok().map(|m| m.uid()),
        },
        _ => StatusError::Io {
            op: "connect to control socket",
            path: path.to_path_buf(),
            source: e,
        },
    }
}
