"""Serve an ASGI app with uvicorn on given listening sockets.

uvicorn's own shutdown is graceful: on SIGTERM/SIGINT it closes the listeners, closes idle
keep-alive connections, lets responses in flight finish (``Connection: close``) within
``timeout_graceful_shutdown``, runs the lifespan shutdown, and returns. The sockets are
handed over as socket objects of their real family, so asyncio sets TCP_NODELAY on each
accepted TCP connection (``uvicorn --fd`` takes any fd for a unix socket and does not).

With a watchdog (trimrun ``--timeout``: ``WATCHDOG_USEC``), uvicorn's main loop sends
``WATCHDOG=1`` every quarter interval from its tick (every 0.1 s): a worker whose event loop is
blocked (a blocking call in an ``async def``, a deadlock) goes silent and trimrun replaces
it. A request that awaits forever without blocking the loop, or a stuck sync endpoint in
the thread pool, is not noticed.
"""

import signal

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from . import sdnotify

# How long a connection that has sent nothing yet may take to send its first request once
# the worker is stopping.
FRESH_GRACE = 5.0


class _FreshConnectionsFinish:
    """uvicorn closes, at shutdown, every connection with no request in progress, even one
    accepted a moment ago whose first request is on its way: that request would fail. Here
    such a connection may still send its first request (answered, then closed) within
    ``FRESH_GRACE``; keep-alive connections between requests are closed at once."""

    _draining = False

    def shutdown(self):
        self._draining = True
        if self.cycle is None and not self.transport.is_closing():
            self.loop.call_later(FRESH_GRACE, self._close_if_still_fresh)
            return
        super().shutdown()

    def _close_if_still_fresh(self):
        if self.cycle is None and not self.transport.is_closing():
            self.transport.close()

    def data_received(self, data):
        super().data_received(data)
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False


class _H11(_FreshConnectionsFinish, H11Protocol):
    pass


def _protocol_class():
    """uvicorn's choice ("auto": httptools when installed, else h11), made draining."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return type("_HttpTools", (_FreshConnectionsFinish, HttpToolsProtocol), {})
    except ImportError:
        return _H11


class _Server(uvicorn.Server):
    def __init__(self, config, on_ready):
        super().__init__(config)
        self._on_ready = on_ready
        self._watchdog = sdnotify.Watchdog()

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        # The lifespan startup has run and the listeners are in the loop.
        if self.started and not self.should_exit and self._on_ready is not None:
            self._on_ready()

    async def on_tick(self, counter):
        self._watchdog.tick()
        return await super().on_tick(counter)

    def handle_exit(self, sig, frame):
        if not self.should_exit:
            sdnotify.stopping()
        super().handle_exit(sig, frame)


def serve(app, socks, graceful_timeout=25.0, backlog=4096, access_log=False,
          log_level="info", lifespan="auto", on_ready=None):
    """Serve until SIGTERM/SIGINT, then drain. Returns the exit code."""
    config = uvicorn.Config(
        app,
        interface="asgi3",
        http=_protocol_class(),
        lifespan=lifespan,
        access_log=access_log,
        log_level=log_level,
        backlog=backlog,
        timeout_graceful_shutdown=graceful_timeout,
        server_header=False,
    )
    server = _Server(config, on_ready)
    # uvicorn re-raises the signal it caught once it has shut down, under the handler
    # that was in place before it started: make that one a no-op so the worker exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run(sockets=socks)
    if not server.started:
        return 3  # the app's lifespan startup failed (uvicorn logged why)
    return 0
