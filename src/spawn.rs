//! fork+exec of one worker, safe in a multi-threaded parent.
//!
//! Everything that allocates is prepared before `fork`: the resolved program path, argv,
//! envp (with a fixed-width `LISTEN_PID=` slot), and the worker's open `cgroup.procs`. The
//! child then makes only async-signal-safe calls before `execve`:
//!
//! 1. write `0` to `cgroup.procs` (moves itself: the worker is in its cgroup before it runs
//!    one instruction of the app),
//! 2. move the listening sockets to fds 3.. (through temporary fds above them, so no
//!    `dup2` can clobber a source),
//!    and mark every other fd above them close-on-exec (`close_range`), so a worker gets
//!    0, 1, 2 and its listeners and nothing else trimrun or its parent had open,
//! 3. unblock every signal and reset every disposition (Rust ignores SIGPIPE; apps expect
//!    the default),
//! 4. `setpgid(0, 0)`: its own process group, so stopping a worker stops its whole tree,
//! 5. with `--user`/`--group`: supplementary groups, gid, then uid (resolved from names
//!    before fork; raw syscalls, which change only this one-threaded child), after the
//!    cgroup move (which needs root) and before the parent-death signal (which a change of
//!    credentials clears),
//! 6. `PR_SET_PDEATHSIG(SIGKILL)`, then check that trimrun did not die meanwhile,
//! 7. write its own pid into `LISTEN_PID` (systemd's rule: the pid of the process that is
//!    meant to use the fds) and, with `--timeout`, into `WATCHDOG_PID`, in buffers the
//!    child owns, and `execve`.
//!
//! A failure at any step is reported through a close-on-exec pipe, so the parent learns
//! "exec failed: not found" rather than seeing a mysterious exit 127.
//!
//! PDEATHSIG fires when the *thread* that forked exits, so workers must be spawned from a
//! thread that lives as long as trimrun: the supervisor runs on the main thread
//! (a current-thread tokio runtime) for this reason.

use std::ffi::{CString, OsStr, OsString};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Width of the `LISTEN_PID` value slot; pids are at most 7 digits on Linux (4194304).
const PID_SLOT: usize = 10;

/// Environment variables trimrun sets for each worker; copies inherited from trimrun's own
/// environment are dropped.
const OWN_VARS: &[&str] = &[
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "TRIMRUN_WORKER_ID",
    "TRIMRUN_WORKER_GENERATION",
    "TRIMRUN_ZYGOTE_FD",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
];

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command not found: '{0}' (check the spelling, or give its full path)")]
    NotFound(String),
    #[error("command '{0}' is not executable (check its permissions: chmod +x)")]
    NotExecutable(String),
    #[error("invalid command: {0}")]
    Invalid(String),
    #[error("cannot start worker {slot}: {op}: {source}")]
    Sys {
        slot: usize,
        op: &'static str,
        source: std::io::Error,
    },
}

/// The worker command, resolved and checked once at start-up.
#[derive(Debug, Clone)]
pub struct Program {
    pub path: PathBuf,
    pub argv: Vec<String>,
}

impl Program {
    /// Resolve `argv[0]` on `PATH` (no shell) and check that it is an executable file, so a
    /// typo is reported before any worker starts.
    pub fn resolve(argv: &[String]) -> Result<Program, SpawnError> {
        let first = argv
            .first()
            .ok_or_else(|| SpawnError::Invalid("no command given after --".into()))?;
        if first.is_empty() {
            return Err(SpawnError::Invalid("the command is an empty string".into()));
        }
        if argv.iter().any(|a| a.contains('\0')) {
            return Err(SpawnError::Invalid(
                "an argument contains a NUL byte".into(),
            ));
        }
        let path_var = std::env::var_os("PATH").unwrap_or_else(|| "/usr/bin:/bin".into());
        let path = find_executable(first, &path_var)?;
        Ok(Program {
            path,
            argv: argv.to_vec(),
        })
    }
}

/// Pure lookup of a command on a `PATH` string, as execvp does it.
pub fn find_executable(cmd: &str, path_var: &OsStr) -> Result<PathBuf, SpawnError> {
    let check = |p: &Path| -> Option<Result<PathBuf, SpawnError>> {
        let meta = std::fs::metadata(p).ok()?;
        if !meta.is_file() {
            return None;
        }
        if nix::unistd::access(p, nix::unistd::AccessFlags::X_OK).is_err() {
            return Some(Err(SpawnError::NotExecutable(p.display().to_string())));
        }
        Some(Ok(p.to_path_buf()))
    };
    if cmd.contains('/') {
        return check(Path::new(cmd)).unwrap_or_else(|| Err(SpawnError::NotFound(cmd.into())));
    }
    let mut not_exec = None;
    for dir in std::env::split_paths(path_var) {
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        match check(&dir.join(cmd)) {
            Some(Ok(p)) => return Ok(p),
            Some(Err(e)) => not_exec = not_exec.or(Some(e)),
            None => {}
        }
    }
    Err(not_exec.unwrap_or_else(|| SpawnError::NotFound(cmd.into())))
}

/// `--user` / `--group`, resolved to numbers at start-up (name lookups allocate and read
/// files: never after fork).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Credentials {
    /// Resolve `--user` and `--group` (names or numbers). With `--user` alone the group is
    /// the user's primary group, as `su` would give it (for a uid without a passwd entry,
    /// the group of the same number: never root's group by default).
    pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Credentials>, String> {
        if user.is_none() && group.is_none() {
            return Ok(None);
        }
        let mut primary = None;
        let uid = match user.map(str::trim) {
            None => None,
            Some("") => return Err("invalid --user '': give a user name or number".into()),
            Some(u) if u.bytes().all(|b| b.is_ascii_digit()) => Some(
                u.parse::<u32>()
                    .map_err(|_| format!("invalid --user '{u}': not a valid user id"))?,
            ),
            Some(u) => {
                let pw = nix::unistd::User::from_name(u)
                    .map_err(|e| format!("cannot look up --user '{u}': {e}"))?
                    .ok_or_else(|| {
                        format!("unknown --user '{u}': no such user (give a name from /etc/passwd or a number)")
                    })?;
                primary = Some(pw.gid.as_raw());
                Some(pw.uid.as_raw())
            }
        };
        if primary.is_none()
            && let Some(uid) = uid
        {
            primary = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .ok()
                .flatten()
                .map(|pw| pw.gid.as_raw());
        }
        let gid = match group.map(str::trim) {
            None => primary.or(uid),
            Some("") => return Err("invalid --group '': give a group name or number".into()),
            Some(g) if g.bytes().all(|b| b.is_ascii_digit()) => Some(g.parse::<u32>().map_err(
                |_| format!("invalid --group '{g}': not a valid group id"),
            )?),
            Some(g) => Some(
                nix::unistd::Group::from_name(g)
                    .map_err(|e| format!("cannot look up --group '{g}': {e}"))?
                    .ok_or_else(|| {
                        format!("unknown --group '{g}': no such group (give a name from /etc/group or a number)")
                    })?
                    .gid
                    .as_raw(),
            ),
        };
        let (euid, egid) = (
            nix::unistd::geteuid().as_raw(),
            nix::unistd::getegid().as_raw(),
        );
        if euid != 0 && (uid.is_some_and(|u| u != euid) || gid.is_some_and(|g| g != egid)) {
            return Err(format!(
                "--user/--group need trimrun to run as root (it runs as uid {euid}): run it as root, or run it as that user without --user"
            ));
        }
        Ok(Some(Credentials { uid, gid }))
    }
}

/// What one worker gets besides the program.
pub struct WorkerSpec<'a> {
    pub slot: usize,
    pub generation: u64,
    /// Listening sockets, placed at fds 3, 4, ... in this order.
    pub listeners: &'a [RawFd],
    /// `LISTEN_FDNAMES`, colon-joined by the caller's order.
    pub fd_names: &'a [String],
    /// The worker cgroup's `cgroup.procs`, opened for writing.
    pub cgroup_procs: Option<&'a OwnedFd>,
    /// The worker's own sd_notify socket path, if readiness is by notification.
    pub notify_socket: Option<&'a Path>,
    /// Who the worker runs as (`--user`/`--group`); None: as trimrun.
    pub credentials: Option<&'a Credentials>,
    /// `--preload`: this process is the zygote. Its end of the fork-request channel is
    /// placed just after the listeners and named by `TRIMRUN_ZYGOTE_FD` (docs/preload.md);
    /// the zygote gets no `TRIMRUN_WORKER_*` (each worker it forks gets its own).
    pub zygote_channel: Option<RawFd>,
    /// `--timeout`: `WATCHDOG_USEC` and `WATCHDOG_PID` (the worker's own pid), as systemd
    /// sets them for `WatchdogSec=`.
    pub watchdog: Option<std::time::Duration>,
    /// Write ends of pipes that become the worker's stdout and stderr (trimrun wraps what
    /// comes out as JSON events); None: the worker inherits trimrun's.
    pub stdio: Option<(RawFd, RawFd)>,
}

/// Build the worker's environment. Returns the envp strings and the indices of the
/// `LISTEN_PID` and `WATCHDOG_PID` entries, whose value slots the child fills in.
fn build_env(spec: &WorkerSpec<'_>) -> (Vec<CString>, Vec<usize>) {
    let mut env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| {
            let k = k.to_string_lossy();
            !OWN_VARS.contains(&k.as_ref()) && !k.starts_with("TRIMRUN_")
        })
        .filter_map(|(k, v)| {
            let mut kv: OsString = k;
            kv.push("=");
            kv.push(v);
            CString::new(kv.into_vec()).ok()
        })
        .collect();
    fn push(env: &mut Vec<CString>, k: &str, v: &str) {
        if let Ok(c) = CString::new(format!("{k}={v}")) {
            env.push(c);
        }
    }
    if spec.zygote_channel.is_some() {
        push(
            &mut env,
            "TRIMRUN_ZYGOTE_FD",
            &(3 + spec.listeners.len()).to_string(),
        );
    } else {
        push(&mut env, "TRIMRUN_WORKER_ID", &spec.slot.to_string());
        push(
            &mut env,
            "TRIMRUN_WORKER_GENERATION",
            &spec.generation.to_string(),
        );
    }
    if let Some(p) = spec.notify_socket {
        push(&mut env, "NOTIFY_SOCKET", &p.to_string_lossy());
    }
    let mut pid_index = vec![];
    if !spec.listeners.is_empty() {
        push(&mut env, "LISTEN_FDS", &spec.listeners.len().to_string());
        push(&mut env, "LISTEN_FDNAMES", &spec.fd_names.join(":"));
        pid_index.push(env.len());
        push(&mut env, "LISTEN_PID", &"0".repeat(PID_SLOT));
    }
    if let Some(d) = spec.watchdog {
        push(&mut env, "WATCHDOG_USEC", &d.as_micros().max(1).to_string());
        pid_index.push(env.len());
        push(&mut env, "WATCHDOG_PID", &"0".repeat(PID_SLOT));
    }
    (env, pid_index)
}

/// Stage codes the child reports through the error pipe.
const STAGES: &[&str] = &[
    "join its cgroup (write cgroup.procs)",
    "set up its listening sockets",
    "reset its signals",
    "create its process group",
    "set its parent-death signal",
    "exec",
    "change its user and group (--user/--group)",
];

/// The fd limit trimrun started with, which workers get back (see [`raise_fd_limit`]).
static WORKER_NOFILE: std::sync::OnceLock<(u64, u64)> = std::sync::OnceLock::new();

/// Raise trimrun's soft `RLIMIT_NOFILE` to its hard limit (sockets of clients, pidfds,
/// cgroup files add up), remembering the original, which every worker gets back before
/// exec: an app that uses `select()` must not see fds above 1023 because of us.
/// Returns (old soft, new soft).
pub fn raise_fd_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let _ = WORKER_NOFILE.set((soft, hard));
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// Fork and exec one worker. Returns its pid (also its process group id).
pub fn spawn(program: &Program, spec: &WorkerSpec<'_>) -> Result<i32, SpawnError> {
    let sys = |op: &'static str, e: std::io::Error| SpawnError::Sys {
        slot: spec.slot,
        op,
        source: e,
    };
    let path = CString::new(program.path.as_os_str().as_bytes())
        .map_err(|_| SpawnError::Invalid("NUL in path".into()))?;
    let argv: Vec<CString> = program
        .argv
        .iter()
        .map(|a| {
            CString::new(a.as_bytes()).map_err(|_| SpawnError::Invalid("NUL in argument".into()))
        })
        .collect::<Result<_, _>>()?;
    let (env, pid_index) = build_env(spec);
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    // The environment in buffers this function owns (NUL-terminated), so the child may
    // write its pid into one of them: every pointer below comes from `as_mut_ptr` of an
    // owned Vec, never from a shared `&CString`.
    let mut env_bufs: Vec<Vec<u8>> = env.into_iter().map(CString::into_bytes_with_nul).collect();
    let mut env_ptrs: Vec<*const libc::c_char> = env_bufs
        .iter_mut()
        .map(|e| e.as_mut_ptr().cast_const().cast())
        .collect();
    env_ptrs.push(std::ptr::null());
    // Where the child writes its pid: just after "LISTEN_PID=" and "WATCHDOG_PID=", inside
    // owned buffers with room for PID_SLOT digits and the NUL.
    let mut pid_slots: [*mut u8; 2] = [std::ptr::null_mut(); 2];
    for (slot, &i) in pid_slots.iter_mut().zip(&pid_index) {
        let buf = &mut env_bufs[i];
        let key_len = buf.iter().position(|&b| b == b'=').unwrap_or(0) + 1;
        debug_assert!(buf.len() > key_len + PID_SLOT);
        *slot = buf.as_mut_ptr().wrapping_add(key_len);
    }
    let (uid, gid) = spec.credentials.map_or((None, None), |c| (c.uid, c.gid));
    let (err_r, err_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| sys("create pipe", e.into()))?;
    // The zygote's channel travels like one more listener (to fd 3+n), but is not counted
    // in LISTEN_FDS.
    let mut listeners: Vec<RawFd> = spec.listeners.to_vec();
    listeners.extend(spec.zygote_channel);
    let procs_fd: RawFd = spec.cgroup_procs.map(|f| f.as_raw_fd()).unwrap_or(-1);
    let err_w_fd = err_w.as_raw_fd();
    let parent = std::process::id() as libc::pid_t;
    let sig_max = libc::SIGRTMAX() + 1;
    let (stdout_fd, stderr_fd) = spec.stdio.unwrap_or((-1, -1));
    let nofile = WORKER_NOFILE.get().map(|&(soft, hard)| libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    });

    // SAFETY: fork() in a multi-threaded process: the child only calls async-signal-safe
    // functions and raw syscalls (write, fcntl, dup2, close_range, sigprocmask, signal,
    // setpgid, setgroups, setresgid, setresuid, prctl, getppid, getpid, setrlimit, execve, _exit) on
    // memory prepared above, and never returns into Rust code.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(sys("fork", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: we are the child of fork(); see child_after_fork's contract.
        unsafe {
            child_after_fork(ChildArgs {
                path: path.as_ptr(),
                argv: argv_ptrs.as_ptr(),
                envp: env_ptrs.as_ptr(),
                pid_slots,
                listeners: &listeners,
                procs_fd,
                err_fd: err_w_fd,
                parent,
                sig_max,
                nofile,
                stdout_fd,
                stderr_fd,
                uid,
                gid,
            })
        }
    }
    drop(err_w);
    // Block until the child execs (EOF) or reports a failure (8 bytes).
    let mut buf = [0u8; 8];
    let mut got = 0;
    while got < buf.len() {
        match nix::unistd::read(&err_r, &mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(sys("read exec status", e.into())),
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    let stage = u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize;
    let errno = i32::from_ne_bytes(buf[4..].try_into().unwrap());
    // The child has _exit()ed; collect it here so it never shows up as a worker exit.
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    let op = STAGES.get(stage).copied().unwrap_or("start");
    Err(sys(op, std::io::Error::from_raw_os_error(errno)))
}

struct ChildArgs<'a> {
    path: *const libc::c_char,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    pid_slots: [*mut u8; 2],
    listeners: &'a [RawFd],
    procs_fd: RawFd,
    err_fd: RawFd,
    parent: libc::pid_t,
    sig_max: libc::c_int,
    /// The fd limit trimrun started with, restored for the worker.
    nofile: Option<libc::rlimit>,
    /// Pipes for the worker's stdout and stderr (-1: keep trimrun's).
    stdout_fd: RawFd,
    stderr_fd: RawFd,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// The child side of fork: async-signal-safe calls only, never returns.
///
/// # Safety
/// Must only be called in the child of `fork()`, with pointers to memory prepared before
/// the fork (NUL-terminated strings and NULL-terminated pointer arrays).
unsafe fn child_after_fork(a: ChildArgs<'_>) -> ! {
    // SAFETY (whole body): each call below is async-signal-safe and operates on fds and
    // memory that the parent prepared before fork; on any failure we report and _exit.
    unsafe {
        let fail = |stage: u32, err_fd: RawFd| -> ! {
            let errno = *libc::__errno_location();
            let mut msg = [0u8; 8];
            msg[..4].copy_from_slice(&stage.to_ne_bytes());
            msg[4..].copy_from_slice(&errno.to_ne_bytes());
            libc::write(err_fd, msg.as_ptr().cast(), msg.len());
            libc::_exit(127)
        };
        let n = a.listeners.len() as RawFd;
        let low = 3 + n;
        // 1. Join the cgroup first, before anything else runs.
        if a.procs_fd >= 0 && libc::write(a.procs_fd, b"0".as_ptr().cast(), 1) != 1 {
            fail(0, a.err_fd);
        }
        // 1b. stdout and stderr into trimrun's pipes (dup2 leaves them open across exec;
        // the originals are close-on-exec).
        if a.stdout_fd >= 0 && libc::dup2(a.stdout_fd, 1) < 0 {
            fail(1, a.err_fd);
        }
        if a.stderr_fd >= 0 && libc::dup2(a.stderr_fd, 2) < 0 {
            fail(1, a.err_fd);
        }
        // 2. Keep the error pipe above the fds we are about to fill.
        let err_fd = libc::fcntl(a.err_fd, libc::F_DUPFD_CLOEXEC, low);
        if err_fd < 0 {
            fail(1, a.err_fd);
        }
        let mut tmp = [-1 as RawFd; 64];
        if a.listeners.len() > tmp.len() {
            *libc::__errno_location() = libc::EMFILE;
            fail(1, err_fd);
        }
        for (i, &fd) in a.listeners.iter().enumerate() {
            tmp[i] = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, low);
            if tmp[i] < 0 {
                fail(1, err_fd);
            }
        }
        for (i, &t) in tmp.iter().enumerate().take(a.listeners.len()) {
            // dup2 leaves the new fd without FD_CLOEXEC: it survives exec.
            if libc::dup2(t, 3 + i as RawFd) < 0 {
                fail(1, err_fd);
            }
        }
        // Everything above the listeners closes at exec: fds trimrun's parent left open
        // without close-on-exec, and any of ours. (CLOEXEC rather than close: the error
        // pipe must stay open until exec.)
        if libc::syscall(
            libc::SYS_close_range,
            low as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) != 0
        {
            // Before Linux 5.11: one fcntl per possible fd.
            let mut lim: libc::rlimit = std::mem::zeroed();
            let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
                lim.rlim_cur.min(1 << 20) as RawFd
            } else {
                1024
            };
            for fd in low..max {
                libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
            }
        }
        // 3. Signals as a freshly started program expects them.
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        if libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut()) != 0 {
            fail(2, err_fd);
        }
        for sig in 1..a.sig_max {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        // 4. Own process group.
        if libc::setpgid(0, 0) != 0 {
            fail(3, err_fd);
        }
        // 5. --user/--group: groups first (setting them needs root), the uid last.
        if let Some(gid) = a.gid {
            let groups = [gid as libc::gid_t];
            if libc::syscall(libc::SYS_setgroups, 1 as libc::size_t, groups.as_ptr()) != 0
                || libc::syscall(libc::SYS_setresgid, gid, gid, gid) != 0
            {
                fail(6, err_fd);
            }
        }
        if let Some(uid) = a.uid
            && libc::syscall(libc::SYS_setresuid, uid, uid, uid) != 0
        {
            fail(6, err_fd);
        }
        // 6. Die with trimrun; and if trimrun already died, do not start at all. (After the
        //    credentials: changing them clears the parent-death signal.)
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            fail(4, err_fd);
        }
        if libc::getppid() != a.parent {
            libc::_exit(1);
        }
        // 7. LISTEN_PID (and WATCHDOG_PID) = our own pid, written into the fixed-width
        //    slots.
        let mut pid = libc::getpid() as u32;
        let mut digits = [0u8; PID_SLOT];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (pid % 10) as u8;
            len += 1;
            pid /= 10;
            if pid == 0 || len == PID_SLOT {
                break;
            }
        }
        for slot in a.pid_slots.iter().filter(|p| !p.is_null()) {
            for i in 0..len {
                *slot.add(i) = digits[len - 1 - i];
            }
            *slot.add(len) = 0;
        }
        // 7. The fd limit trimrun started with (it raised its own soft limit).
        if let Some(r) = &a.nofile {
            libc::setrlimit(libc::RLIMIT_NOFILE, r);
        }
        libc::execve(a.path, a.argv, a.envp);
        fail(5, err_fd)
    }
}

/// Take ownership of an fd inherited from our parent (`fd://N`, systemd's `LISTEN_FDS`).
/// Returns None when the fd is not open.
pub fn adopt_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table; it fails with EBADF for a closed fd.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the fd is open and was handed to trimrun by its parent; nothing else in this
    // process owns it (callers adopt each inherited fd once, at start-up).
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Send `sig` to a worker's whole process group.
pub fn signal_group(pgid: i32, sig: nix::sys::signal::Signal) -> nix::Result<()> {
    nix::sys::signal::killpg(nix::unistd::Pid::from_raw(pgid), sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_group_resolve_from_names_or_numbers() {
        assert_eq!(Credentials::resolve(None, None).unwrap(), None);
        if !nix::unistd::geteuid().is_root() {
            return;
        }
        let c = Credentials::resolve(Some("root"), None).unwrap().unwrap();
        assert_eq!((c.uid, c.gid), (Some(0), Some(0)));
        let c = Credentials::resolve(Some("65534"), Some("0"))
            .unwrap()
            .unwrap();
        assert_eq!((c.uid, c.gid), (Some(65534), Some(0)));
        let c = Credentials::resolve(None, Some("12345")).unwrap().unwrap();
        assert_eq!((c.uid, c.gid), (None, Some(12345)));
        for (u, g, want) in [
            (Some("no-such-user-xyz"), None, "unknown --user"),
            (None, Some("no-such-group-xyz"), "unknown --group"),
            (Some(""), None, "invalid --user"),
            (Some("99999999999"), None, "not a valid user id"),
        ] {
            let e = Credentials::resolve(u, g).unwrap_err();
            assert!(e.contains(want), "{u:?} {g:?}: {e}");
        }
    }

    #[test]
    fn finds_commands_on_path_like_execvp() {
        let path = OsStr::new("/nonexistent:/usr/bin:/bin");
        assert!(find_executable("sh", path).unwrap().ends_with("sh"));
        assert!(matches!(
            find_executable("no-such-command-xyz", path),
            Err(SpawnError::NotFound(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let plain = dir.path().join("data");
        std::fs::write(&plain, "x").unwrap();
        assert!(matches!(
            find_executable(plain.to_str().unwrap(), path),
            Err(SpawnError::NotExecutable(_))
        ));
        assert!(matches!(
            find_executable("/no/such", path),
            Err(SpawnError::NotFound(_))
        ));
    }

    #[test]
    fn worker_env_replaces_inherited_socket_variables() {
        let spec = WorkerSpec {
            slot: 3,
            generation: 7,
            listeners: &[10, 11],
            fd_names: &["http".into(), "admin".into()],
            cgroup_procs: None,
            notify_socket: Some(Path::new("/run/n.sock")),
            credentials: None,
            zygote_channel: None,
            stdio: None,
            watchdog: None,
        };
        let (env, idx) = build_env(&spec);
        let env: Vec<String> = env
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        assert!(env.contains(&"LISTEN_FDS=2".to_string()));
        assert!(env.contains(&"LISTEN_FDNAMES=http:admin".to_string()));
        assert!(env.contains(&"TRIMRUN_WORKER_ID=3".to_string()));
        assert!(env.contains(&"TRIMRUN_WORKER_GENERATION=7".to_string()));
        assert!(env.contains(&"NOTIFY_SOCKET=/run/n.sock".to_string()));
        assert_eq!(idx.len(), 1);
        assert_eq!(env[idx[0]], format!("LISTEN_PID={}", "0".repeat(PID_SLOT)));
        assert!(!env.iter().any(|e| e.starts_with("WATCHDOG_")));
        assert_eq!(
            env.iter().filter(|e| e.starts_with("LISTEN_PID=")).count(),
            1
        );
        assert!(!env.iter().any(|e| e.starts_with("TRIMRUN_ZYGOTE_FD=")));
    }

    #[test]
    fn zygote_env_names_its_channel_after_the_listeners_and_no_worker() {
        let spec = WorkerSpec {
            slot: 0,
            generation: 2,
            listeners: &[10, 11],
            fd_names: &["http".into(), "admin".into()],
            cgroup_procs: None,
            notify_socket: None,
            zygote_channel: Some(12),
            stdio: None,
            watchdog: None,
            credentials: None,
        };
        let (env, _) = build_env(&spec);
        let env: Vec<String> = env
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        assert!(env.contains(&"TRIMRUN_ZYGOTE_FD=5".to_string()));
        assert!(env.contains(&"LISTEN_FDS=2".to_string()));
        assert!(!env.iter().any(|e| e.starts_with("TRIMRUN_WORKER_ID=")));
    }

    #[test]
    fn watchdog_env_is_set_like_systemd_and_replaces_inherited_values() {
        let spec = WorkerSpec {
            slot: 0,
            generation: 0,
            listeners: &[10],
            fd_names: &["http".into()],
            cgroup_procs: None,
            notify_socket: Some(Path::new("/run/n.sock")),
            zygote_channel: None,
            stdio: None,
            watchdog: Some(std::time::Duration::from_millis(2500)),
            credentials: None,
        };
        let (env, idx) = build_env(&spec);
        let env: Vec<String> = env
            .iter()
            .map(|c| c.to_string_lossy().into_owned())
            .collect();
        assert!(env.contains(&"WATCHDOG_USEC=2500000".to_string()));
        let pid_entries: Vec<&str> = idx.iter().map(|&i| env[i].as_str()).collect();
        assert_eq!(
            pid_entries,
            [
                format!("LISTEN_PID={}", "0".repeat(PID_SLOT)),
                format!("WATCHDOG_PID={}", "0".repeat(PID_SLOT))
            ]
        );
        assert_eq!(env.iter().filter(|e| e.starts_with("WATCHDOG_")).count(), 2);
    }
}
