"""Serve an ASGI app with uvicorn on given listening sockets.

uvicorn's own shutdown is graceful: on SIGTERM/SIGINT it closes the listeners, closes idle
keep-alive connections, lets responses in flight finish (``Connection: close``) within
``timeout_graceful_shutdown``, runs the lifespan shutdown, and returns. The sockets are
handed over as socket objects of their real family, so asyncio sets TCP_NODELAY on each
accepted TCP connection (``uvicorn --fd`` takes any fd for a unix socket and does not).
"""

import signal

import uvicorn

from . import sdnotify


class _Server(uvicorn.Server):
    def __init__(self, config, on_ready):
        super().__init__(config)
        self._on_ready = on_ready

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        # The lifespan startup has run and the listeners are in the loop.
        if self.started and not self.should_exit and self._on_ready is not None:
            self._on_ready()

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
