"""Check that app.py fragments the heap: drive its handler in-process (no server), print RSS
as requests go by, then call malloc_trim(0) through ctypes and report what it released.

    bench/.venv/bin/python bench/verify_app.py [--requests 10000] [--json out.json]
"""

import argparse
import ctypes
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import app  # noqa: E402
import workload  # noqa: E402

MiB = 1024 * 1024


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]


def mallinfo():
    """glibc's view of all arenas: heap bytes, bytes in use, free bytes held, mmapped bytes."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        mi = libc.mallinfo2()
        return {"heap": mi.arena, "in_use": mi.uordblks, "free_held": mi.fordblks, "mmapped": mi.hblkhd}
    except (OSError, AttributeError):
        return None


def cache_bytes():
    return sum(sys.getsizeof(v) if isinstance(v, str) else
               sum(sys.getsizeof(x) for x in v.values()) + sys.getsizeof(v)
               for v in app._cache.values())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--every", type=int, default=1000)
    ap.add_argument("--json")
    args = ap.parse_args()
    start = app.memory()
    curve = [(0, start["rss"], start["uss"])]
    t0 = time.monotonic()
    for i, (size, seed) in enumerate(workload.sizes(args.requests), 1):
        app._work(size, seed)
        if i % args.every == 0:
            m = app.memory()
            curve.append((i, m["rss"], m["uss"]))
            print(f"{i:6d} requests  RSS {m['rss']/MiB:7.1f} MiB  USS {m['uss']/MiB:7.1f} MiB"
                  f"  ({time.monotonic()-t0:.0f}s)", flush=True)
    mi_before = mallinfo()
    rc, before, after = app.malloc_trim()
    mi_after = mallinfo()
    released = before["rss"] - after["rss"]
    print(f"malloc_trim(0) rc={rc}: RSS {before['rss']/MiB:.1f} -> {after['rss']/MiB:.1f} MiB,"
          f" released {released/MiB:.1f} MiB ({100*released/max(before['rss'],1):.0f}%)")
    live = cache_bytes()
    print(f"start RSS {start['rss']/MiB:.1f} MiB, cache entries {len(app._cache)}"
          f" (~{live/MiB:.1f} MiB of objects)")
    if mi_before:
        print("glibc mallinfo2 before trim: " + ", ".join(f"{k} {v/MiB:.1f} MiB" for k, v in mi_before.items()))
        print("glibc mallinfo2 after trim:  " + ", ".join(f"{k} {v/MiB:.1f} MiB" for k, v in mi_after.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "curve": curve, "start": start,
                       "before_trim": before, "after_trim": after, "rc": rc,
                       "mallinfo_before": mi_before, "mallinfo_after": mi_after,
                       "cache_entries": len(app._cache), "cache_bytes": live,
                       "app_threads": app.APP_THREADS,
                       "seconds": time.monotonic() - t0}, f, indent=1)


if __name__ == "__main__":
    main()
