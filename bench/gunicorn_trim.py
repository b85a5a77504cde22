"""gunicorn config: the in-process recipe trimrun replaces (a benchmark contender).

Every worker starts a daemon thread that, every 30-60 s (jittered), calls glibc's
malloc_trim(0) through ctypes when the worker's RSS is past BENCH_TRIM_RSS bytes. This
needs the app's cooperation (a hook in its server config); trimrun does it from outside.
"""

import ctypes
import ctypes.util
import os
import random
import threading
import time

THRESHOLD = int(os.environ.get("BENCH_TRIM_RSS", "0"))


def _rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trimmer():
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    rng = random.Random(os.getpid())
    while True:
        time.sleep(rng.uniform(30, 60))
        if _rss() > THRESHOLD:
            libc.malloc_trim(0)


def post_fork(server, worker):
    threading.Thread(target=_trimmer, name="malloc-trim", daemon=True).start()
