//! `--preload`: the app is imported once, by a *zygote*, and every worker is a fork of it.
//!
//! trimrun starts the worker command once more, as the zygote: same argv, environment and
//! listening sockets (fds 3..), plus its end of a `SOCK_SEQPACKET` socket pair at the next
//! fd, named by `TRIMRUN_ZYGOTE_FD`. Over it, one JSON object per datagram
//! (docs/preload.md has the whole protocol, for other runtimes to implement):
//!
//! ```text
//! zygote  -> trimrun  {"type":"ready","pid":P}                       app imported, gc frozen
//! trimrun -> zygote   {"type":"fork","slot":S,"generation":G,"env":{...}}
//!                     (+ "credentials":{"uid":U,"gid":G} with --user/--group)
//!                     + SCM_RIGHTS [the worker's cgroup.procs, open for writing] (or none)
//! zygote  -> trimrun  {"type":"forked","slot":S,"generation":G,"pid":W}
//!                  or {"type":"error","slot":S,"generation":G,"error":"..."}
//! ```
//!
//! The zygote forks a child that joins the worker's cgroup, drops to the worker's user
//! (`--user`/`--group`: the zygote itself runs as trimrun, like gunicorn's master under
//! `preload_app`) and forks the worker there (so the worker is in its cgroup, as its user,
//! before it runs one instruction), then exits; trimrun is a child subreaper, so the worker
//! becomes trimrun's child and is reaped like any other. trimrun checks the worker's ids
//! in `/proc` ([`check_ids`]): a zygote that ignored the credentials is caught, and its
//! worker killed, before the worker counts as started.
//!
//! This module is the trimrun side of one zygote: start it, wait for `ready`, ask for a
//! fork. Requests are answered in order, one at a time.

use std::collections::BTreeMap;
use std::io::IoSlice;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::socket::{
    AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType, recv, sendmsg, socketpair,
};
use serde::{Deserialize, Serialize};

use crate::spawn::{self, Credentials, Program, SpawnError, WorkerSpec};

/// Largest message either side sends.
const MAX_MESSAGE: usize = 64 * 1024;

/// A fork request, as sent.
#[derive(Serialize)]
struct ForkRequest<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    slot: usize,
    generation: u64,
    env: BTreeMap<&'a str, &'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    credentials: Option<CredentialsMsg>,
}

/// Who the worker runs as (`--user`/`--group`), in a fork request.
#[derive(Serialize)]
struct CredentialsMsg {
    uid: Option<u32>,
    gid: Option<u32>,
}

/// What the zygote says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    /// The app is imported and the zygote takes fork requests.
    Ready { pid: i32 },
    /// Worker `slot`/`generation` is process `pid`.
    Forked {
        slot: usize,
        generation: u64,
        pid: i32,
    },
    /// A request failed (`slot`/`generation` absent when the request was unreadable).
    Error {
        #[serde(default)]
        slot: Option<usize>,
        #[serde(default)]
        generation: Option<u64>,
        error: String,
    },
}

/// The bytes of one fork request.
pub fn encode_fork(
    slot: usize,
    generation: u64,
    env: &[(&str, &str)],
    credentials: Option<&Credentials>,
) -> Vec<u8> {
    serde_json::to_vec(&ForkRequest {
        kind: "fork",
        slot,
        generation,
        env: env.iter().copied().collect(),
        credentials: credentials.map(|c| CredentialsMsg {
            uid: c.uid,
            gid: c.gid,
        }),
    })
    .expect("a map of strings serializes")
}

pub fn parse_message(bytes: &[u8]) -> Result<Message, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "{e} in {:?}",
            String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
        )
    })
}

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("cannot start the zygote: {0}")]
    Start(#[from] SpawnError),
    #[error("zygote (pid {pid}): {op}: {source}")]
    Io {
        pid: i32,
        op: &'static str,
        source: std::io::Error,
    },
    #[error(
        "zygote (pid {pid}) closed its channel: it exited (its output says why: usually the app failed to import)"
    )]
    Closed { pid: i32 },
    #[error("zygote (pid {pid}) did not {what} within {after:?}")]
    Timeout {
        pid: i32,
        what: &'static str,
        after: Duration,
    },
    #[error("zygote (pid {pid}) could not fork worker {slot}: {error}")]
    Refused {
        pid: i32,
        slot: usize,
        error: String,
    },
    #[error("zygote (pid {pid}) broke the protocol: {detail} (see docs/preload.md)")]
    Protocol { pid: i32, detail: String },
    #[error(
        "zygote (pid {pid}) started worker {slot} (pid {worker}) {detail}: the zygote does not apply the fork request's credentials (docs/preload.md); the worker was killed"
    )]
    Credentials {
        pid: i32,
        slot: usize,
        worker: i32,
        detail: String,
    },
}

/// Whether a process whose `/proc/<pid>/status` is `status` runs as `want`: every uid
/// (real, effective, saved, filesystem) is `want.uid`, every gid `want.gid`, and its only
/// supplementary group is `want.gid` (what `--user`/`--group` mean for a worker). Err says
/// what it runs as instead.
pub fn check_ids(status: &str, want: &Credentials) -> Result<(), String> {
    let ids = |key: &str| -> Vec<u32> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| {
                v.split_whitespace()
                    .filter_map(|n| n.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let (uids, gids, groups) = (ids("Uid:"), ids("Gid:"), ids("Groups:"));
    let uid_ok = want
        .uid
        .is_none_or(|u| uids.len() == 4 && uids.iter().all(|&x| x == u));
    let gid_ok = want.gid.is_none_or(|g| {
        gids.len() == 4 && gids.iter().all(|&x| x == g) && groups.iter().all(|&x| x == g)
    });
    if uid_ok && gid_ok {
        Ok(())
    } else {
        Err(format!(
            "as uids {uids:?}, gids {gids:?}, groups {groups:?} instead of uid {} and gid {}",
            want.uid.map_or("unchanged".into(), |u| u.to_string()),
            want.gid.map_or("unchanged".into(), |g| g.to_string()),
        ))
    }
}

/// One running zygote, seen from trimrun.
pub struct Zygote {
    pub pid: i32,
    /// Counts zygotes of this pool (a HUP or a restart makes a new one).
    pub generation: u64,
    pub started: Instant,
    /// When it said `ready`.
    pub ready_at: Option<Instant>,
    chan: OwnedFd,
}

impl Zygote {
    /// Start `program` as a zygote with the pool's listening sockets. Does not wait for it.
    pub fn start(
        program: &Program,
        listeners: &[RawFd],
        fd_names: &[String],
        generation: u64,
    ) -> Result<Zygote, ZygoteError> {
        let io = |op, e: nix::Error| ZygoteError::Io {
            pid: 0,
            op,
            source: e.into(),
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .map_err(|e| io("create its channel (socketpair)", e))?;
        let spec = WorkerSpec {
            slot: 0,
            generation,
            listeners,
            fd_names,
            cgroup_procs: None,
            notify_socket: None,
            zygote_channel: Some(theirs.as_raw_fd()),
            stdio: None,
            watchdog: None,
            // The zygote runs as trimrun: each worker drops to --user/--group after its
            // fork (see the fork request's credentials).
            credentials: None,
        };
        let pid = spawn::spawn(program, &spec)?;
        drop(theirs);
        Ok(Zygote {
            pid,
            generation,
            started: Instant::now(),
            ready_at: None,
            chan: ours,
        })
    }

    pub fn is_ready(&self) -> bool {
        self.ready_at.is_some()
    }

    /// Wait up to `timeout` for `ready`. Ok(false): not yet.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<bool, ZygoteError> {
        if self.is_ready() {
            return Ok(true);
        }
        match self.recv(timeout)? {
            None => Ok(false),
            Some(Message::Ready { .. }) => {
                self.ready_at = Some(Instant::now());
                Ok(true)
            }
            Some(other) => Err(ZygoteError::Protocol {
                pid: self.pid,
                detail: format!("expected ready, got {other:?}"),
            }),
        }
    }

    /// Ask for worker `slot`/`generation` with `env` on top of the zygote's environment,
    /// placed in the cgroup whose `cgroup.procs` is `procs`, running as `credentials`.
    /// Returns the worker's pid (the caller checks its ids with [`check_ids`]).
    ///
    /// A `forked` answer to an earlier request that timed out is a worker nobody
    /// supervises: it is killed here.
    pub fn fork(
        &self,
        slot: usize,
        generation: u64,
        env: &[(&str, &str)],
        credentials: Option<&Credentials>,
        procs: Option<&OwnedFd>,
        timeout: Duration,
    ) -> Result<i32, ZygoteError> {
        let msg = encode_fork(slot, generation, env, credentials);
        let fds: Vec<RawFd> = procs.iter().map(|f| f.as_raw_fd()).collect();
        let cmsgs: Vec<ControlMessage<'_>> = if fds.is_empty() {
            vec![]
        } else {
            vec![ControlMessage::ScmRights(&fds)]
        };
        sendmsg::<()>(
            self.chan.as_raw_fd(),
            &[IoSlice::new(&msg)],
            &cmsgs,
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| match e {
            nix::Error::EPIPE | nix::Error::ECONNRESET => ZygoteError::Closed { pid: self.pid },
            e => ZygoteError::Io {
                pid: self.pid,
                op: "send a fork request",
                source: e.into(),
            },
        })?;
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(reply) = self.recv(left)? else {
                return Err(ZygoteError::Timeout {
                    pid: self.pid,
                    what: "answer a fork request",
                    after: timeout,
                });
            };
            match reply {
                Message::Forked {
                    slot: s,
                    generation: g,
                    pid,
                } if s == slot && g == generation => return Ok(pid),
                Message::Forked { pid, .. } => {
                    tracing::warn!(pid, "killing a worker forked for a request that timed out");
                    let _ = spawn::signal_group(pid, nix::sys::signal::Signal::SIGKILL);
                }
                Message::Error {
                    slot: s,
                    generation: g,
                    error,
                } if s.is_none_or(|s| s == slot) && g.is_none_or(|g| g == generation) => {
                    return Err(ZygoteError::Refused {
                        pid: self.pid,
                        slot,
                        error,
                    });
                }
                other => {
                    tracing::debug!(?other, "ignoring a stale zygote message");
                }
            }
        }
    }

    /// One message, or None after `timeout`.
    fn recv(&self, timeout: Duration) -> Result<Option<Message>, ZygoteError> {
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        let mut fds = [PollFd::new(self.chan.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(
                &mut fds,
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
            ) {
                Ok(0) => return Ok(None),
                Ok(_) => break,
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    return Err(ZygoteError::Io {
                        pid: self.pid,
                        op: "wait for its message",
                        source: e.into(),
                    });
                }
            }
        }
        let mut buf = vec![0u8; MAX_MESSAGE];
        let n = loop {
            match recv(self.chan.as_raw_fd(), &mut buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => break n,
                Err(nix::Error::EINTR) => continue,
                Err(nix::Error::EAGAIN) => return Ok(None),
                Err(nix::Error::ECONNRESET) => return Err(ZygoteError::Closed { pid: self.pid }),
                Err(e) => {
                    return Err(ZygoteError::Io {
                        pid: self.pid,
                        op: "read its message",
                        source: e.into(),
                    });
                }
            }
        };
        if n == 0 {
            return Err(ZygoteError::Closed { pid: self.pid });
        }
        parse_message(&buf[..n])
            .map(Some)
            .map_err(|detail| ZygoteError::Protocol {
                pid: self.pid,
                detail,
            })
    }

    /// Ask it to exit (SIGTERM to its process group; the workers it forked have their own).
    pub fn stop(&self) {
        let _ = spawn::signal_group(self.pid, nix::sys::signal::Signal::SIGTERM);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A zygote end driven by the test: (trimrun's Zygote, the zygote's end).
    fn pair() -> (Zygote, std::os::unix::net::UnixDatagram) {
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let z = Zygote {
            pid: 0,
            generation: 1,
            started: Instant::now(),
            ready_at: None,
            chan: ours,
        };
        // A SOCK_SEQPACKET fd works with UnixDatagram's send/recv (message boundaries kept).
        (z, std::os::unix::net::UnixDatagram::from(theirs))
    }

    #[test]
    fn ready_then_fork_round_trip_with_the_cgroup_fd() {
        let (mut z, peer) = pair();
        assert!(!z.wait_ready(Duration::ZERO).unwrap(), "nothing said yet");
        peer.send(br#"{"type":"ready","pid":7}"#).unwrap();
        assert!(z.wait_ready(Duration::from_secs(5)).unwrap());
        let procs: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let answer = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let n = peer.recv(&mut buf).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&buf[..n]).unwrap();
            peer.send(
                format!(
                    r#"{{"type":"forked","slot":{},"generation":{},"pid":4242}}"#,
                    v["slot"], v["generation"]
                )
                .as_bytes(),
            )
            .unwrap();
            (v, peer)
        });
        let pid = z
            .fork(
                2,
                5,
                &[("TRIMRUN_WORKER_ID", "2")],
                None,
                Some(&procs),
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(pid, 4242);
        let (v, _peer) = answer.join().unwrap();
        assert_eq!(v["env"]["TRIMRUN_WORKER_ID"], "2");
    }

    #[test]
    fn a_refusal_an_eof_and_a_silence_are_errors_that_say_which() {
        let (z, peer) = pair();
        peer.send(br#"{"type":"error","slot":1,"generation":3,"error":"fork: EAGAIN"}"#)
            .unwrap();
        let e = z
            .fork(1, 3, &[], None, None, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(e, ZygoteError::Refused { .. }), "{e}");
        assert!(e.to_string().contains("fork: EAGAIN"), "{e}");
        let e = z
            .fork(1, 4, &[], None, None, Duration::from_millis(50))
            .unwrap_err();
        assert!(matches!(e, ZygoteError::Timeout { .. }), "{e}");
        drop(peer);
        let e = z
            .fork(1, 5, &[], None, None, Duration::from_secs(5))
            .unwrap_err();
        assert!(matches!(e, ZygoteError::Closed { .. }), "{e}");
    }

    #[test]
    fn fork_requests_carry_slot_generation_and_env() {
        let bytes = encode_fork(
            3,
            7,
            &[("TRIMRUN_WORKER_ID", "3"), ("NOTIFY_SOCKET", "/run/n.sock")],
            None,
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert!(v.get("credentials").is_none(), "{v}");
        let nobody = Credentials {
            uid: Some(65534),
            gid: Some(65533),
        };
        let with: serde_json::Value =
            serde_json::from_slice(&encode_fork(3, 7, &[], Some(&nobody))).unwrap();
        assert_eq!(with["credentials"]["uid"], 65534);
        assert_eq!(with["credentials"]["gid"], 65533);
        assert_eq!(v["type"], "fork");
        assert_eq!(v["slot"], 3);
        assert_eq!(v["generation"], 7);
        assert_eq!(v["env"]["TRIMRUN_WORKER_ID"], "3");
        assert_eq!(v["env"]["NOTIFY_SOCKET"], "/run/n.sock");
    }

    #[test]
    fn a_worker_runs_as_asked_only_with_every_id_and_no_other_group() {
        let status = |uid: &str, gid: &str, groups: &str| {
            format!(
                "Name:\tpython3\nUid:\t{uid}\nGid:\t{gid}\nFDSize:\t64\nGroups:\t{groups}\nNStgid:\t7\n"
            )
        };
        let nobody = Credentials {
            uid: Some(65534),
            gid: Some(65534),
        };
        let ok = status(
            "65534\t65534\t65534\t65534",
            "65534\t65534\t65534\t65534",
            "65534 ",
        );
        assert_eq!(check_ids(&ok, &nobody), Ok(()));
        let root = status("0\t0\t0\t0", "0\t0\t0\t0", "0 ");
        let e = check_ids(&root, &nobody).unwrap_err();
        assert!(
            e.contains("uids [0, 0, 0, 0]") && e.contains("uid 65534"),
            "{e}"
        );
        let saved_root = status(
            "65534\t65534\t0\t65534",
            "65534\t65534\t65534\t65534",
            "65534",
        );
        assert!(check_ids(&saved_root, &nobody).is_err());
        let extra_group = status(
            "65534\t65534\t65534\t65534",
            "65534\t65534\t65534\t65534",
            "0 65534",
        );
        assert!(check_ids(&extra_group, &nobody).is_err());
        let group_only = Credentials {
            uid: None,
            gid: Some(65534),
        };
        let root_in_group = status("0\t0\t0\t0", "65534\t65534\t65534\t65534", "65534");
        assert_eq!(check_ids(&root_in_group, &group_only), Ok(()));
        assert!(
            check_ids("", &nobody).is_err(),
            "an unreadable status is no proof"
        );
    }

    #[test]
    fn zygote_messages_parse_and_extra_fields_are_ignored() {
        assert_eq!(
            parse_message(br#"{"type":"ready","pid":12,"interface":"wsgi","frozen":5}"#),
            Ok(Message::Ready { pid: 12 })
        );
        assert_eq!(
            parse_message(br#"{"type":"forked","slot":1,"generation":4,"pid":99}"#),
            Ok(Message::Forked {
                slot: 1,
                generation: 4,
                pid: 99
            })
        );
        assert_eq!(
            parse_message(br#"{"type":"error","error":"bad request"}"#),
            Ok(Message::Error {
                slot: None,
                generation: None,
                error: "bad request".into()
            })
        );
        assert!(parse_message(b"{\"type\":\"hello\"}").is_err());
        assert!(parse_message(b"not json").is_err());
    }
}
