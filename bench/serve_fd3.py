"""The benchmark's trimrun worker: bench/app.py served by trimrun_worker (python/).

    trimrun -n 4 --limit 128M --bind 127.0.0.1:8000 -- python bench/serve_fd3.py

This is `python -m trimrun_worker --app-dir bench --threads 1 app:app` with the repo's
python/ on sys.path, so the harness needs no install step. It keeps the flags it had:
`--threads N` (default 1, or $BENCH_WAITRESS_THREADS: one request at a time, as a gunicorn
sync worker or a uWSGI process), `--drain-timeout S` (trimrun_worker's
--graceful-timeout) and `--connection-limit N` (default threads + 1, or
$BENCH_CONNECTION_LIMIT). For your own app, use trimrun_worker directly (README, "Your app as a
worker").
"""

import argparse
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(BENCH), "python"))

from trimrun_worker import cli  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=int(os.environ.get("BENCH_WAITRESS_THREADS", "1")))
    ap.add_argument("--drain-timeout", type=float, default=25.0)
    # Like a gunicorn sync worker, which accepts one connection at a time: a worker holds
    # what it serves plus one, and the rest wait in the shared socket for whichever worker
    # is free (waitress alone would accept up to 1000 and queue them behind its thread).
    ap.add_argument("--connection-limit", type=int,
                    default=int(os.environ.get("BENCH_CONNECTION_LIMIT", "0")) or None)
    args = ap.parse_args()
    limit = args.connection_limit or args.threads + 1
    return cli.main(["--app-dir", BENCH, "--threads", str(args.threads),
                     "--connection-limit", str(limit),
                     "--graceful-timeout", str(args.drain_timeout), "app:app"])


if __name__ == "__main__":
    sys.exit(main())
