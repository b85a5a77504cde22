"""The zygote side of ``trimrun --preload`` (protocol: docs/preload.md).

trimrun starts the command once with ``TRIMRUN_ZYGOTE_FD=N``: fd N is a SOCK_SEQPACKET
socket to trimrun. The zygote imports the app (done by the caller), collects and freezes
the garbage collector's view of every object (``gc.freeze()``: the collector never writes
to them again, so their pages stay shared copy-on-write), says ``ready``, then serves fork
requests one at a time:

    trimrun -> zygote  {"type": "fork", "slot": 3, "generation": 7, "env": {...}}
                       + SCM_RIGHTS: [the worker's cgroup.procs, opened for writing] (or none)
    zygote             fork() -> A (reaped later, before the next request)
    A                  joins the worker's cgroup (writes "0" to cgroup.procs), drops to the
                       request's "credentials" (uid/gid) if any, fork() -> B, replies, exits
    A -> trimrun       {"type": "forked", "slot": 3, "generation": 7, "pid": B}
    B                  own process group; waits until it is trimrun's child (A exited:
                       trimrun is a child subreaper); PR_SET_PDEATHSIG(SIGKILL); applies
                       "env", LISTEN_PID=its pid (and WATCHDOG_PID with WATCHDOG_USEC);
                       serves the app.

B is born inside its cgroup, so every page it copies or allocates is charged there.
"""

import ctypes
import gc
import json
import logging
import os
import signal
import socket
import sys
import time

from . import sdnotify

MAX_MESSAGE = 65536
PR_SET_PDEATHSIG = 1
log = logging.getLogger("trimrun_worker.zygote")


def _send(chan, message):
    chan.send(json.dumps(message).encode())


def _set_pdeathsig():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")


def _preimport(interface):
    """Import the server here too, so that workers share it instead of importing it each.

    Also what serving imports lazily (the idna codec of getaddrinfo): under trimrun
    ``--user``, a worker may not be able to read the interpreter's own files (a Python
    installed under /root), so what it needs should be imported before the fork."""
    import encodings.idna  # noqa: F401
    if interface == "asgi":
        from . import asgi  # noqa: F401
        import uvicorn.lifespan.on  # noqa: F401
        import uvicorn.loops.asyncio  # noqa: F401
        import uvicorn.protocols.http.h11_impl  # noqa: F401
    else:
        from . import wsgi  # noqa: F401


def run(app, interface, args):
    """Serve fork requests until trimrun closes the channel or stops the zygote."""
    fd = int(os.environ.pop("TRIMRUN_ZYGOTE_FD"))
    chan = socket.socket(fileno=fd)
    chan.set_inheritable(False)
    supervisor = os.getppid()
    started = time.monotonic()
    _preimport(interface)
    gc.collect()
    gc.freeze()
    _send(chan, {"type": "ready", "pid": os.getpid(), "interface": interface,
                 "frozen": gc.get_freeze_count()})
    log.info("zygote ready: %s app %s imported, %d objects frozen (%.0f ms after import)",
             interface.upper(), args.app, gc.get_freeze_count(),
             (time.monotonic() - started) * 1000)
    while True:
        _reap_children()
        try:
            data, fds, _flags, _addr = socket.recv_fds(chan, MAX_MESSAGE, 4)
        except InterruptedError:
            continue
        if not data:
            return 0  # trimrun closed the channel: it is gone or replacing us
        try:
            req = json.loads(data)
        except ValueError:
            for f in fds:
                os.close(f)
            log.error("zygote: malformed request %r", data[:200])
            continue
        if req.get("type") != "fork":
            for f in fds:
                os.close(f)
            _send(chan, {"type": "error", "error": f"unknown request type {req.get('type')!r}"})
            continue
        procs = fds[0] if fds else None
        for f in fds[1:]:
            os.close(f)
        _fork(chan, req, procs, supervisor, app, interface, args)
        if procs is not None:
            os.close(procs)


def _reap_children():
    """Collect the intermediate children (A) that have exited."""
    while True:
        try:
            pid, _status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fork(chan, req, procs, supervisor, app, interface, args):
    slot, generation = req.get("slot"), req.get("generation")
    try:
        a = os.fork()
    except OSError as e:
        _send(chan, {"type": "error", "slot": slot, "generation": generation,
                     "error": f"fork: {e}"})
        return
    if a:
        # A replies, then exits at once: it is reaped before the next request, without
        # waiting here for its exit (unmapping a large heap takes a while).
        return
    # A: join the worker's cgroup, drop to the worker's user (--user/--group), then fork
    # the worker: it is born in its cgroup, as that user.
    a = os.getpid()
    try:
        if procs is not None:
            os.write(procs, b"0")
        _drop_privileges(req.get("credentials"))
        b = os.fork()
    except OSError as e:
        try:
            _send(chan, {"type": "error", "slot": slot, "generation": generation,
                         "error": f"join cgroup / drop privileges / fork: {e}"})
        finally:
            os._exit(1)
    if b:
        try:
            _send(chan, {"type": "forked", "slot": slot, "generation": generation, "pid": b})
        finally:
            os._exit(0)
    _become_worker(chan, req, procs, supervisor, a, app, interface, args)


def _drop_privileges(credentials):
    """Become the worker's user (trimrun ``--user``/``--group``), as gunicorn's workers do
    under ``preload_app``: supplementary groups reset to the one group, then the gid, then
    the uid (after which none of it can be undone)."""
    if not credentials:
        return
    gid, uid = credentials.get("gid"), credentials.get("uid")
    if gid is not None:
        os.setgroups([gid])
        os.setresgid(gid, gid, gid)
    if uid is not None:
        os.setresuid(uid, uid, uid)


def _become_worker(chan, req, procs, supervisor, a, app, interface, args):
    """B: never returns."""
    code = 1
    try:
        os.setpgid(0, 0)
        chan.close()
        if procs is not None:
            os.close(procs)
        # Until A has exited we are its child; then the kernel hands us to trimrun.
        while os.getppid() == a:
            time.sleep(0.0005)
        _set_pdeathsig()
        if os.getppid() != supervisor:
            os._exit(1)  # trimrun died meanwhile
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        env = req.get("env") or {}
        os.environ.update({str(k): str(v) for k, v in env.items()})
        if "LISTEN_FDS" in os.environ:
            os.environ["LISTEN_PID"] = str(os.getpid())
        if "WATCHDOG_USEC" in os.environ:
            os.environ["WATCHDOG_PID"] = str(os.getpid())
        sdnotify.reset()
        from .cli import configure_logging, serve

        configure_logging(args.log_level)
        code = serve(app, interface, args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        logging.getLogger("trimrun_worker").exception("worker forked from the zygote failed")
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
