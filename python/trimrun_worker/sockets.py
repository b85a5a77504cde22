"""The listening sockets a worker serves on: inherited at fd 3.. (systemd's socket-passing
convention, which trimrun follows), or bound here for running a worker on its own."""

import os
import socket

SD_LISTEN_FDS_START = 3


class NoSockets(Exception):
    pass


def inherited(environ=None):
    """Wrap the fds named by ``LISTEN_FDS`` (3, 4, ...) in socket objects.

    ``LISTEN_PID``, when set, must be this process (the variables were meant for it and not
    for a parent). The socket objects learn their real family from the fd, so a TCP
    listener is treated as TCP (``socket.fromfd(fd, AF_UNIX, ...)``, as ``uvicorn --fd``
    does, makes servers skip TCP_NODELAY).
    """
    env = os.environ if environ is None else environ
    try:
        count = int(env.get("LISTEN_FDS", "0"))
    except ValueError:
        raise NoSockets(f"LISTEN_FDS={env.get('LISTEN_FDS')!r} is not a number")
    pid = env.get("LISTEN_PID")
    if pid and pid != str(os.getpid()):
        raise NoSockets(f"LISTEN_PID={pid} is another process (this is {os.getpid()})")
    if count < 1:
        raise NoSockets("no sockets passed (LISTEN_FDS is unset or 0)")
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise NoSockets(f"fd {fd} of LISTEN_FDS={count} is not a socket: {e}")
        sock.setblocking(False)
        socks.append(sock)
    return socks


def bind(address, backlog=2048):
    """Listen on ``HOST:PORT`` or ``unix:PATH`` (for running a worker outside trimrun)."""
    if address.startswith("unix:"):
        path = address[5:]
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]") or "0.0.0.0"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, int(port)))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def is_tcp(sock):
    return sock.family in (socket.AF_INET, socket.AF_INET6)
