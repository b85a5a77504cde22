"""A WSGI app whose `/daemon?ARG` starts `sleep ARG` in a session of its own (a daemon: it
leaves the worker's process group, and outlives the worker unless someone kills it) and
answers with the daemon's pid. For the tests of what trimrun kills that a worker left."""

import os
import subprocess


def app(environ, start_response):
    if environ.get("PATH_INFO") == "/daemon":
        arg = environ.get("QUERY_STRING") or "1000"
        p = subprocess.Popen(["sleep", arg], start_new_session=True,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        body = f"{p.pid}\n"
    else:
        body = f"{os.getpid()}\n"
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"),
                              ("Content-Length", str(len(data)))])
    return [data]
