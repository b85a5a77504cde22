"""A dependency-free WSGI app that serves on the listening socket trimrun hands it (fd 3).

    trimrun -n 4 --bind 127.0.0.1:8000 -- python3 examples/app.py

It follows systemd's socket-passing rules: it uses fd 3 only when LISTEN_FDS is set and
LISTEN_PID is its own pid. It tells trimrun it is ready with sd_notify READY=1 when
NOTIFY_SOCKET is set (`--ready notify`), and on SIGTERM it stops accepting, finishes the
requests in flight and exits 0: the queued connections stay in the shared socket for the
other workers. With `trimrun --timeout` (WATCHDOG_USEC) its serve loop sends WATCHDOG=1
every quarter of the interval: that proves the loop accepting connections turns, not that
request threads finish (see python/trimrun_worker for a keep-alive that checks those too).

Routes:
  /            "hello from PID"
  /pid         this worker's pid, slot and generation as JSON
  /env         the socket-passing environment as JSON (LISTEN_PID, LISTEN_FDS, ...)
  /alloc?mb=N  keep N MiB more (a leak, for cgroup and recycling tests)
  /sleep?s=X   answer after X seconds (for graceful-stop tests)
  /burst?mb=N&s=X  hold N MiB (touched) for X seconds, then free them: a report that
               allocates tens of MiB for one request (for pool budget tests)
  /fragment?mb=N  allocate ~N MiB in glibc-malloc'd pieces, keep 1 in 64: the freed rest
               stays in the heap between the survivors until malloc_trim (see trimrun trim)

APP_LEAK_KB=N makes every request keep N KiB more, for good: a worker that leaks steadily
under load, to watch trimrun trim and recycle it (`trimrun status --watch`).
"""

import json
import os
import signal
import socket
import socketserver
import sys
import threading
import time
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

LEAK = []
LEAK_KB = int(os.environ.get("APP_LEAK_KB", "0"))


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    status = "200 OK"
    if LEAK_KB:
        LEAK.append(bytearray(os.urandom(16)) * (LEAK_KB * 64))
    if path == "/pid":
        body = json.dumps(
            {
                "pid": os.getpid(),
                "slot": os.environ.get("TRIMRUN_WORKER_ID"),
                "generation": os.environ.get("TRIMRUN_WORKER_GENERATION"),
            }
        )
    elif path == "/env":
        keys = ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "TRIMRUN_WORKER_ID",
                "TRIMRUN_WORKER_GENERATION", "NOTIFY_SOCKET"]
        env = {k: os.environ.get(k) for k in keys}
        env["pid"] = os.getpid()
        try:
            s = socket.socket(fileno=os.dup(3))
            env["fd3"] = {"family": int(s.family), "type": int(s.type),
                          "listening": bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))}
            s.close()
        except OSError as e:
            env["fd3"] = str(e)
        body = json.dumps(env)
    elif path == "/alloc":
        mb = int(query.get("mb", ["1"])[0])
        for _ in range(mb):
            LEAK.append(bytearray(os.urandom(16)) * (65536))  # 1 MiB, touched
        body = json.dumps({"pid": os.getpid(), "leaked_mb": len(LEAK)})
    elif path == "/fragment":
        mb = int(query.get("mb", ["32"])[0])
        # 1 KiB objects are above pymalloc's 512-byte limit, so they come from glibc.
        pieces = [os.urandom(1) * 1024 for _ in range(mb * 1024)]
        LEAK.extend(pieces[::64])
        del pieces
        body = json.dumps({"pid": os.getpid(), "kept": len(LEAK)})
    elif path == "/burst":
        mb = int(query.get("mb", ["32"])[0])
        held = [bytearray(os.urandom(16)) * 65536 for _ in range(mb)]
        time.sleep(float(query.get("s", ["1"])[0]))
        body = json.dumps({"pid": os.getpid(), "held_mb": len(held)})
        del held
    elif path == "/sleep":
        time.sleep(float(query.get("s", ["1"])[0]))
        body = "slept"
    else:
        body = "hello from %d\n" % os.getpid()
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


class Quiet(WSGIRequestHandler):
    def setup(self):
        # Peers on a unix socket have no (host, port) address; wsgiref expects one.
        if not isinstance(self.client_address, tuple):
            self.client_address = ("unix", 0)
        super().setup()

    def log_message(self, *args):
        pass


WATCHDOG_EVERY = int(os.environ.get("WATCHDOG_USEC", "0") or 0) / 4e6


class Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = False
    block_on_close = True
    last_keepalive = 0.0

    def service_actions(self):
        # Called by serve_forever at every turn of its loop (at least every poll_interval).
        super().service_actions()
        now = time.monotonic()
        if WATCHDOG_EVERY and now - self.last_keepalive >= WATCHDOG_EVERY:
            notify("WATCHDOG=1")
            self.last_keepalive = now


def inherited_socket():
    if os.environ.get("LISTEN_PID") != str(os.getpid()) or int(os.environ.get("LISTEN_FDS", "0")) < 1:
        sys.exit("app.py: no socket passed (LISTEN_PID/LISTEN_FDS): run me under trimrun")
    probe = socket.socket(fileno=3)
    family, kind = probe.family, probe.type
    probe.detach()
    sock = socket.socket(family, kind, fileno=3)
    # Every worker polls the shared socket and all wake on a new connection; only one gets
    # it. Non-blocking, the others go back to polling instead of blocking in accept(),
    # where a stop signal would not reach the serve loop until the next connection.
    sock.setblocking(False)
    return sock


def notify(message):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())


def main():
    sock = inherited_socket()
    server = Server(("localhost", 0), Quiet, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.server_address = sock.getsockname()
    if isinstance(server.server_address, tuple):
        server.server_name, server.server_port = "localhost", server.server_address[1]
    else:
        server.server_name, server.server_port = "localhost", 0
    server.setup_environ()
    server.set_app(app)

    def stop(signum, frame):
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    notify("READY=1")
    server.serve_forever(poll_interval=min(0.5, WATCHDOG_EVERY or 0.5))
    server.server_close()


if __name__ == "__main__":
    main()
