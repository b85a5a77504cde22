"""Apps that get stuck, for the watchdog tests (tests/watchdog.rs) under trimrun_worker.

`app` (WSGI): `/stuck` blocks its request thread forever; anything else answers the pid.
`asgi` (ASGI): `/block` blocks the event loop itself forever (a blocking call in an
`async def`); anything else answers the pid.
"""

import os
import threading
import time

NEVER = threading.Event()


def stuck_forever():
    NEVER.wait()


def block_forever():
    while True:
        time.sleep(3600)


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/stuck":
        stuck_forever()
    body = f"{os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    if scope["path"] == "/block":
        block_forever()
    body = f"{os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
