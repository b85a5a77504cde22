"""sd_notify(3) for a worker: one datagram per message to ``$NOTIFY_SOCKET``.

trimrun gives each worker its own notify socket (``--ready notify``), so a message can
only come from that worker. Messages are ``KEY=VALUE`` lines (``READY=1``, ``STOPPING=1``,
``STATUS=...``). Failures are reported on stderr, never raised: a supervisor that went
away must not take a serving worker down.
"""

import os
import socket
import sys


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
