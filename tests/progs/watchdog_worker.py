"""A trimrun worker that speaks sd_notify's watchdog protocol, for tests/watchdog.rs.

    trimrun --timeout 1s --ready notify -- python3 tests/progs/watchdog_worker.py

It serves HTTP/1.0 on the inherited fd 3, one request at a time on its main thread, and
sends WATCHDOG=1 on NOTIFY_SOCKET from that serving loop every WATCHDOG_USEC/4: while a
request is stuck, the keep-alives stop. faulthandler is enabled, so the SIGABRT trimrun sends
a hung worker writes every thread's stack to stderr (trimrun's log).

Environment (all optional):
  WD_HANG_AFTER=N   after serving N requests, deadlock inside the next one ...
  WD_HANG_SLOT=S    ... only in slot S (TRIMRUN_WORKER_ID; default 0) ...
  WD_HANG_GEN=G     ... and only in generation G (default 0): its replacement is healthy
  WD_HANG_AT_START=1  say READY=1, then deadlock at once (a broken deploy)
  WD_NO_KEEPALIVE=1   serve, but never send WATCHDOG=1 (a worker unaware of the protocol)

Routes: /pid (pid, slot, generation as JSON), /env (the watchdog environment as JSON),
anything else "hello from PID".
"""

import faulthandler
import json
import os
import select
import signal
import socket
import sys
import threading
import time

faulthandler.enable()

SLOT = os.environ.get("TRIMRUN_WORKER_ID", "?")
GEN = os.environ.get("TRIMRUN_WORKER_GENERATION", "?")
USEC = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
KEEPALIVE_EVERY = USEC / 4e6 if USEC and not os.environ.get("WD_NO_KEEPALIVE") else None
HANG_AFTER = os.environ.get("WD_HANG_AFTER")
HANG_HERE = (
    HANG_AFTER is not None
    and SLOT == os.environ.get("WD_HANG_SLOT", "0")
    and GEN == os.environ.get("WD_HANG_GEN", "0")
)


def notify(message):
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(path)
        s.sendall(message.encode())


def hang_forever():
    """A real deadlock: this thread waits for a lock it already holds."""
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


def answer(conn, served):
    conn.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    if HANG_HERE and served >= int(HANG_AFTER):
        print(f"worker {SLOT}/{GEN} pid {os.getpid()}: hanging in request {served + 1}",
              file=sys.stderr, flush=True)
        hang_forever()
    path = data.split(b" ", 2)[1].decode()
    if path == "/pid":
        body = json.dumps({"pid": os.getpid(), "slot": SLOT, "generation": GEN})
    elif path == "/env":
        keys = ["WATCHDOG_USEC", "WATCHDOG_PID", "NOTIFY_SOCKET", "LISTEN_PID"]
        env = {k: os.environ.get(k) for k in keys}
        env["pid"] = os.getpid()
        body = json.dumps(env)
    else:
        body = f"hello from {os.getpid()}\n"
    b = body.encode()
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(b) + b)


def main():
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        sys.exit("watchdog_worker.py: no socket passed: run me under trimrun")
    sock = socket.socket(fileno=3)
    sock.setblocking(False)
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    notify("READY=1")
    if os.environ.get("WD_HANG_AT_START"):
        hang_forever()
    served = 0
    last = 0.0
    while not stopping:
        now = time.monotonic()
        if KEEPALIVE_EVERY and now - last >= KEEPALIVE_EVERY:
            notify("WATCHDOG=1")
            last = now
        ready, _, _ = select.select([sock], [], [], KEEPALIVE_EVERY or 0.5)
        if not ready:
            continue
        try:
            conn, _ = sock.accept()
        except BlockingIOError:
            continue  # another worker took it
        with conn:
            try:
                answer(conn, served)
            except OSError:
                pass
        served += 1


if __name__ == "__main__":
    main()
