"""Serve a WSGI app with waitress on given listening sockets, with a graceful stop.

waitress has no graceful shutdown of its own, so this module runs waitress's event loop
itself. On the stop signal it:

1. stops accepting: the listeners leave the loop and this process closes its copies (the
   sockets stay open in trimrun and the other workers, so queued connections go to them);
2. closes keep-alive connections that are idle: they served a request, have none in
   progress, nothing left to send and no bytes of a next request waiting to be read;
3. lets requests in flight finish, answering each with ``Connection: close`` so the client
   does not send another request on that connection; a connection accepted but with no
   request yet gets ``FRESH_GRACE`` seconds to send its first one (the client is almost
   always sending it right now: closing it would fail a request that was never late);
4. exits once no connection is left, or when ``graceful_timeout`` has passed.

With a watchdog (trimrun ``--timeout``: ``WATCHDOG_USEC``), the event loop sends
``WATCHDOG=1`` every quarter interval while it turns, except while every request thread is
busy and none has finished a request since the last keep-alive: a worker whose threads are
all stuck (a deadlock, an endless loop) goes silent and trimrun replaces it. One stuck
thread among healthy ones is not noticed (the others keep finishing requests); nor is a
slow request while threads are free.
"""

import logging
import signal
import socket
import time

from waitress import wasyncore
from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer, UnixWSGIServer
from waitress.task import ThreadedTaskDispatcher, WSGITask

from . import sdnotify
from .sockets import is_tcp

log = logging.getLogger("trimrun_worker")

# The event loop's poll timeout: how soon a stop signal is acted on.
POLL_SECONDS = 0.2
# How long a connection that has sent nothing yet may take to send its first request once
# the worker is stopping.
FRESH_GRACE = 5.0


class _Drain:
    """Shared by the server and its tasks: set once the stop signal arrives."""

    active = False


class _Progress:
    """Requests finished (any outcome), for the watchdog."""

    done = 0


class _DrainingTask(WSGITask):
    def service(self):
        try:
            super().service()
        finally:
            _Progress.done += 1

    def build_response_header(self):
        if _Drain.active:
            # Adds "Connection: close" (headers are not sent yet) and closes the
            # connection once this response is flushed.
            self.set_close_on_finish()
        return super().build_response_header()


class _DrainingChannel(HTTPChannel):
    task_class = _DrainingTask
    served = False

    def service(self):
        super().service()
        self.served = True

    def _bytes_waiting(self):
        """True when the client sent something not read yet (or closed its side)."""
        try:
            return self.socket.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) is not None
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    def idle(self):
        """Safe to close now: between requests of a keep-alive connection."""
        return (
            self.served
            and not self.requests
            and self.request is None
            and not self.total_outbufs_len
            and not self.will_close
            and not self.close_when_flushed
            and not self._bytes_waiting()
        )


class _Tcp(TcpWSGIServer):
    channel_class = _DrainingChannel


class _Unix(UnixWSGIServer):
    channel_class = _DrainingChannel


class _QuietOverflow(logging.Filter):
    """With a connection limit near --threads, reaching it is the normal state of a busy
    worker (the waiting connections stay in the shared socket for the others): waitress's
    line at every crossing would flood the log."""

    def filter(self, record):
        msg = record.getMessage()
        return "the connection limit" not in msg


def serve(app, socks, threads=4, graceful_timeout=25.0, backlog=4096, connection_limit=1000,
          ident="trimrun_worker", on_ready=None):
    """Serve until SIGTERM/SIGINT, then drain. Returns the exit code (0).

    `connection_limit`: client connections held at once. (waitress counts every entry of
    its socket map against its own limit: each listener and its trigger too.)"""
    adj = Adjustments(threads=threads, backlog=backlog,
                      connection_limit=connection_limit + 2 * len(socks),
                      ident=ident, sockets=socks)
    logging.getLogger("waitress").addFilter(_QuietOverflow())
    smap = {}
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    listeners = []
    for sock in socks:
        cls = _Tcp if is_tcp(sock) else _Unix
        listeners.append(cls(app, smap, True, sock, dispatcher=dispatcher, adj=adj,
                             bind_socket=False,
                             sockinfo=(sock.family, sock.type, sock.proto, sock.getsockname())))
    stop_at = []

    def on_stop(signum, frame):
        if not stop_at:
            stop_at.append(time.monotonic())

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if on_ready is not None:
        on_ready()
    watchdog = sdnotify.Watchdog()
    while not stop_at:
        wasyncore.loop(timeout=POLL_SECONDS, map=smap, use_poll=True, count=1)
        watchdog.tick(busy=dispatcher.active_count >= threads, progress=_Progress.done)

    _Drain.active = True
    sdnotify.stopping()
    for lst in listeners:
        lst.accepting = False
        lst.del_channel()
        lst.socket.close()
    deadline = stop_at[0] + graceful_timeout
    fresh_until = stop_at[0] + FRESH_GRACE
    while True:
        # Read what has arrived first, so no request that is already here is cut off.
        wasyncore.loop(timeout=0, map=smap, use_poll=True, count=1)
        channels = [d for d in list(smap.values()) if isinstance(d, _DrainingChannel)]
        now = time.monotonic()
        for ch in channels:
            if ch.idle() or (not ch.served and not ch.requests and ch.request is None
                             and now >= fresh_until):
                ch.will_close = True  # closed by the loop's next handle_write
        if not channels:
            break
        if time.monotonic() >= deadline:
            log.warning("graceful timeout (%.0fs) passed with %d connection(s) open: exiting",
                        graceful_timeout, len(channels))
            break
        wasyncore.loop(timeout=0.05, map=smap, use_poll=True, count=1)
    dispatcher.shutdown(cancel_pending=True, timeout=max(0.0, min(5.0, deadline - time.monotonic())))
    for lst in listeners:
        lst.trigger.close()
    return 0
