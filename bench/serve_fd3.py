"""Serve bench/app.py with waitress on the listening socket inherited at fd 3 (systemd style).

This is the worker trimrun runs: ONE process, no master of its own. waitress-serve cannot
take a file descriptor, so this wraps fd 3 in a socket object and hands it to waitress.

    trimrun -n 4 --limit 128M --bind 127.0.0.1:8000 -- python bench/serve_fd3.py

- uses fd 3 when LISTEN_FDS >= 1 (and LISTEN_PID, if set, is this process);
- `--threads N` waitress worker threads (default 1: one request at a time, as a gunicorn
  sync worker or a uWSGI process);
- sends sd_notify READY=1 when NOTIFY_SOCKET is set;
- on SIGTERM/SIGINT stops accepting, finishes the requests it has, then exits 0; queued
  connections stay in the shared socket for the other workers.
"""

import argparse
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import waitress  # noqa: E402
from waitress import wasyncore  # noqa: E402
from waitress.server import BaseWSGIServer  # noqa: E402

from app import app  # noqa: E402


def inherited_socket():
    pid = os.environ.get("LISTEN_PID")
    if int(os.environ.get("LISTEN_FDS", "0")) < 1 or (pid and pid != str(os.getpid())):
        sys.exit("serve_fd3.py: no socket passed at fd 3 (LISTEN_FDS/LISTEN_PID)")
    probe = socket.socket(fileno=3)
    family, kind = probe.family, probe.type
    probe.detach()
    sock = socket.socket(family, kind, fileno=3)
    sock.setblocking(False)
    return sock


def notify(message):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            s.sendall(message.encode())
    except OSError as e:
        print(f"serve_fd3.py: sd_notify failed: {e}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_WAITRESS_THREADS", "1")))
    ap.add_argument("--drain-timeout", type=float, default=30.0)
    args = ap.parse_args()
    sock = inherited_socket()
    server = waitress.create_server(app, sockets=[sock], threads=args.threads,
                                    connection_limit=1000, backlog=2048, ident="serve_fd3")
    stopping = []

    def stop(signum, frame):
        stopping.append(time.monotonic())

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    notify("READY=1")
    # One socket: create_server returns the TcpWSGIServer itself; several: a MultiSocketServer.
    smap = server.map if hasattr(server, "map") else server._map
    listeners = [d for d in smap.values() if isinstance(d, BaseWSGIServer)]
    while not stopping:
        wasyncore.loop(timeout=0.5, map=smap, use_poll=True, count=1)
    # Graceful stop: no more accepts here; finish the connections we have.
    for lst in listeners:
        lst.accepting = False
        lst.del_channel()
        lst.socket.close()
    deadline = stopping[0] + args.drain_timeout
    while time.monotonic() < deadline:
        busy = [d for d in list(smap.values())
                if d not in listeners and type(d).__name__ == "HTTPChannel"]
        if not busy:
            break
        wasyncore.loop(timeout=0.1, map=smap, use_poll=True, count=1)
    server.task_dispatcher.shutdown(timeout=5)
    os._exit(0)


if __name__ == "__main__":
    main()
