"""Check that app.py fragments the heap: drive its handler in-process (no server), print RSS
as requests go by, then call malloc_trim(0) through ctypes and report what it released.

    bench/.venv/bin/python bench/verify_app.py [--requests 10000] [--json out.json]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import app  # noqa: E402
import workload  # noqa: E402

MiB = 1024 * 1024


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
    rc, before, after = app.malloc_trim()
    released = before["rss"] - after["rss"]
    print(f"malloc_trim(0) rc={rc}: RSS {before['rss']/MiB:.1f} -> {after['rss']/MiB:.1f} MiB,"
          f" released {released/MiB:.1f} MiB ({100*released/max(before['rss'],1):.0f}%)")
    print(f"start RSS {start['rss']/MiB:.1f} MiB, cache entries {len(app._cache)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"requests": args.requests, "curve": curve, "start": start,
                       "before_trim": before, "after_trim": after, "rc": rc,
                       "seconds": time.monotonic() - t0}, f, indent=1)


if __name__ == "__main__":
    main()
