"""``python -m trimrun_worker [OPTIONS] MODULE:APP``: the command line."""

import argparse
import faulthandler
import logging
import os
import sys

from . import app as appmod
from . import sdnotify, sockets

EXIT_USAGE = 2


def parser():
    env = os.environ.get
    p = argparse.ArgumentParser(
        prog="python -m trimrun_worker",
        description="Serve a WSGI app (waitress) or an ASGI app (uvicorn) on the sockets "
        "trimrun passes at fd 3.., with sd_notify readiness and a graceful drain on "
        "SIGTERM. Under trimrun --preload, the same command is the zygote.",
        epilog="example: trimrun -n 8 --limit 512M --bind :8000 --ready notify -- "
        "python -m trimrun_worker myapp:app",
    )
    p.add_argument("app", help="MODULE:ATTRIBUTE, as myapp:app (MODULE alone: app or application)")
    p.add_argument("--interface", choices=["auto", "wsgi", "asgi"],
                   default=env("TRIMRUN_WORKER_INTERFACE", "auto"),
                   help="auto: ASGI when the app is an async callable, else WSGI (default auto)")
    p.add_argument("--factory", action="store_true",
                   help="the attribute is a factory: call it with no arguments to get the app")
    p.add_argument("--app-dir", default=".", help="put this directory first on sys.path (default .)")
    p.add_argument("--threads", type=int, default=int(env("TRIMRUN_WORKER_THREADS", "4")),
                   help="WSGI: waitress threads per worker (default 4)")
    p.add_argument("--graceful-timeout", type=float,
                   default=float(env("TRIMRUN_WORKER_GRACEFUL_TIMEOUT", "25")),
                   help="seconds to finish requests in flight after the stop signal; keep it "
                   "below trimrun's --graceful-timeout (default 25, trimrun's is 30)")
    p.add_argument("--connection-limit", type=int,
                   default=int(env("TRIMRUN_WORKER_CONNECTION_LIMIT", "1000")),
                   help="WSGI: connections one worker holds at once (default 1000). Set it "
                   "near --threads to leave waiting connections in the shared socket for the "
                   "other workers, as a gunicorn sync worker does: a recycled worker then "
                   "drains only what it is serving, and a killed one loses only that; idle "
                   "keep-alive connections hold a place until they close")
    p.add_argument("--backlog", type=int, default=4096,
                   help="listen backlog the server sets on the shared sockets (default 4096)")
    p.add_argument("--access-log", action="store_true", help="ASGI: log every request")
    p.add_argument("--log-level", default=env("TRIMRUN_WORKER_LOG_LEVEL", "info"),
                   choices=["debug", "info", "warning", "error"])
    p.add_argument("--bind", metavar="HOST:PORT|unix:PATH",
                   help="listen here instead of on inherited sockets (to run without trimrun)")
    return p


def configure_logging(level):
    """Log lines name the worker (its slot, or "zygote") and pid."""
    who = "zygote" if os.environ.get("TRIMRUN_ZYGOTE_FD") else "worker " + os.environ.get(
        "TRIMRUN_WORKER_ID", "-")
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s [{who} pid %(process)d] %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    # "Task queue depth is N" on every busy moment: noise, not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)


def main(argv=None):
    args = parser().parse_args(argv)
    # A stack dump of every thread on SIGABRT (trimrun's --timeout-signal), SIGSEGV, ...
    if not faulthandler.is_enabled():
        faulthandler.enable()
    configure_logging(args.log_level)
    try:
        app = appmod.load(args.app, factory=args.factory, app_dir=args.app_dir)
    except appmod.AppError as e:
        print(f"trimrun_worker: {e}", file=sys.stderr)
        return EXIT_USAGE
    interface = appmod.detect_interface(app) if args.interface == "auto" else args.interface
    if os.environ.get("TRIMRUN_ZYGOTE_FD"):
        from . import zygote

        return zygote.run(app, interface, args)
    return serve(app, interface, args)


def serve(app, interface, args):
    """Serve ``app`` on this process's sockets until the stop signal; the exit code."""
    try:
        socks = [sockets.bind(args.bind, args.backlog)] if args.bind else sockets.inherited()
    except (sockets.NoSockets, OSError, ValueError) as e:
        print(f"trimrun_worker: {e} (run under trimrun --bind ..., or pass --bind HOST:PORT)",
              file=sys.stderr)
        return EXIT_USAGE
    logging.getLogger("trimrun_worker").info(
        "serving %s app %s on %d socket(s)", interface.upper(), args.app, len(socks))

    def on_ready():
        sdnotify.ready(f"serving {args.app}")

    if interface == "asgi":
        from . import asgi

        return asgi.serve(app, socks, graceful_timeout=args.graceful_timeout,
                          backlog=args.backlog, access_log=args.access_log,
                          log_level=args.log_level, on_ready=on_ready)
    from . import wsgi

    if args.connection_limit < 1:
        raise SystemExit("trimrun_worker: --connection-limit must be at least 1")
    return wsgi.serve(app, socks, threads=args.threads, graceful_timeout=args.graceful_timeout,
                      backlog=args.backlog, connection_limit=args.connection_limit,
                      on_ready=on_ready)
