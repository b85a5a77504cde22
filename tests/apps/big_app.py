"""A WSGI app that builds a large heap of Python objects at import (BIG_APP_MB, default 100
MiB: a dict of tuples of str and float), as apps with big imports or in-memory tables do.
Requests do not walk the table: `/` answers with the pid, `/lookup?k=N` reads one entry.
For measuring --preload (copy-on-write sharing with the zygote) against separate imports."""

import os
import time

_t0 = time.monotonic()
_MB = int(os.environ.get("BIG_APP_MB", "100"))
# About 240 bytes of objects per entry (dict slot, tuple, str, float).
TABLE = {i: ("entry-%09d" % i, float(i)) for i in range(_MB * 1024 * 1024 // 240)}
IMPORT_SECONDS = time.monotonic() - _t0


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/env":
        env = os.environ
        body = (f"{os.getpid()} LISTEN_PID={env.get('LISTEN_PID')} "
                f"TRIMRUN_WORKER_ID={env.get('TRIMRUN_WORKER_ID')} "
                f"TRIMRUN_ZYGOTE_FD={env.get('TRIMRUN_ZYGOTE_FD')}\n")
    elif path == "/lookup":
        k = int(environ.get("QUERY_STRING", "k=0").partition("=")[2] or 0)
        body = f"{TABLE.get(k, ('missing', 0.0))[0]} {os.getpid()}\n"
    else:
        body = f"big {os.getpid()} {len(TABLE)}\n"
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
