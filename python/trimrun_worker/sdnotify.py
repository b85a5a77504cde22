"""sd_notify(3) for a worker: one datagram per message to ``$NOTIFY_SOCKET``.

trimrun gives each worker its own notify socket (``--ready notify``, ``--timeout``), so a
message can only come from that worker. Messages are ``KEY=VALUE`` lines (``READY=1``,
``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``). Failures are reported on stderr, never
raised: a supervisor that went away must not take a serving worker down.

The watchdog (trimrun's ``--timeout``, systemd's ``WatchdogSec=``): the worker gets
``WATCHDOG_USEC`` and ``WATCHDOG_PID`` and must send ``WATCHDOG=1`` at least that often;
:class:`Watchdog` sends it from a serving loop, every quarter of the interval: twice as
often as sd_notify's half-interval rule, so that a slow turn of the loop on a loaded host
is never mistaken for a hang.
"""

import os
import socket
import sys
import time


class Notifier:
    """A connection to the notify socket named by ``NOTIFY_SOCKET`` (none: a no-op)."""

    def __init__(self, path=None):
        if path is None:
            path = os.environ.get("NOTIFY_SOCKET")
        self.path = path or None
        self._sock = None

    @property
    def active(self):
        return self.path is not None

    def _address(self):
        # "@name" is an abstract socket, as systemd writes it.
        return "\0" + self.path[1:] if self.path.startswith("@") else self.path

    def send(self, message):
        """Send one datagram (``"READY=1"``, ``"STATUS=draining"``); True when sent."""
        if not self.active:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.setblocking(False)
            self._sock.sendto(message.encode(), self._address())
            return True
        except OSError as e:
            print(f"trimrun_worker: sd_notify {message!r} to {self.path}: {e}", file=sys.stderr)
            return False

    def ready(self, status=None):
        return self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self):
        return self.send("STOPPING=1")

    def status(self, text):
        return self.send(f"STATUS={text}")

    def close(self):
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ=None, pid=None):
    """Seconds between two keep-alives (a quarter of ``WATCHDOG_USEC``), or None when no
    watchdog is set for this process. As ``sd_watchdog_enabled(3)``: a ``WATCHDOG_PID``
    naming another process (a parent's, inherited) means none."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID")
    if owner and owner != str(os.getpid() if pid is None else pid):
        return None
    return usec / 4e6


class Watchdog:
    """``WATCHDOG=1`` keep-alives, sent from a serving loop by calling :meth:`tick` often
    (at least once per interval; every turn of the loop is fine).

    A keep-alive says "this loop turns" — and with ``busy``/``progress``, "and the request
    threads are not all stuck": while every request thread is busy (``busy``), one is sent
    only once ``progress`` (a count of finished requests) has moved since the last one.
    """

    def __init__(self, interval=None, notifier=None, clock=time.monotonic):
        self.interval = watchdog_interval() if interval is None else interval
        self._notifier = notifier
        self._clock = clock
        self._last = None
        self._mark = None

    @property
    def enabled(self):
        return bool(self.interval)

    def tick(self, busy=False, progress=None):
        """Send ``WATCHDOG=1`` if one is due; True when sent."""
        if not self.interval:
            return False
        now = self._clock()
        if self._last is not None and now - self._last < self.interval:
            return False
        if busy and self._last is not None and progress == self._mark:
            return False  # every request thread busy, and none finished since: stuck
        self._last, self._mark = now, progress
        return (self._notifier or notifier()).send("WATCHDOG=1")


_default = None


def notifier():
    """The process's notifier, created on first use from ``NOTIFY_SOCKET``."""
    global _default
    if _default is None:
        _default = Notifier()
    return _default


def reset():
    """Forget the process's notifier (a forked worker gets its own ``NOTIFY_SOCKET``)."""
    global _default
    if _default is not None:
        _default.close()
    _default = None


def ready(status=None):
    return notifier().ready(status)


def stopping():
    return notifier().stopping()


def status(text):
    return notifier().status(text)
