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
        serde_json::from_value(data).map_err(|e| StatusError::Protocol {
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
