"""Open-loop, fixed-rate HTTP/1.1 load generator (loopback only).

Request i is *scheduled* at t0 + i/rate whether or not earlier ones have answered, and its
latency is measured from that scheduled moment (no coordinated omission: a stalled server
shows up as latency, not as a slower client). Each request is a fresh connection with
`Connection: close`, as a sync worker would serve it. Paths come from workload.py (fixed
seed), so every contender gets the same sequence.

    python loadgen.py --port 8000 --rate 100 --requests 6000 --out load.json

Bounded: --requests in all, each with --timeout, and the whole run ends by
requests/rate + --grace seconds.
"""

import argparse
import asyncio
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workload  # noqa: E402


def percentile(sorted_vals, p):
    if not sorted_vals:
        return None
    k = min(len(sorted_vals) - 1, max(0, int(round(p / 100.0 * (len(sorted_vals) - 1)))))
    return sorted_vals[k]


async def one(host, port, path, timeout):
    """Returns (status or error string, body bytes)."""
    async def go():
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(("GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n"
                          % (path, host, port)).encode())
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            length = None
            for line in lines[1:]:
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":", 1)[1])
            if length is not None:
                body = await reader.readexactly(length)
                n = len(body)
            else:
                n = 0
                while True:
                    chunk = await reader.read(262144)
                    if not chunk:
                        break
                    n += len(chunk)
            return status, n
        finally:
            writer.close()
    try:
        return await asyncio.wait_for(go(), timeout)
    except asyncio.TimeoutError:
        return "timeout", 0
    except asyncio.IncompleteReadError:
        return "short-body", 0
    except (ConnectionError, OSError) as e:
        return type(e).__name__, 0
    except Exception as e:  # noqa: BLE001 - any failure is a failed request
        return "error:" + type(e).__name__, 0


async def run(args):
    paths = workload.paths(args.requests, seed=args.seed, shape=args.shape)
    results = [None] * len(paths)
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    wall0 = time.time() + 0.05
    tasks = []

    async def fire(i, sched):
        status, n = await one(args.host, args.port, paths[i], args.timeout)
        results[i] = (round(sched - t0, 4), round(loop.time() - sched, 5), status, n)

    for i in range(len(paths)):
        sched = t0 + i / args.rate
        delay = sched - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(fire(i, sched)))
    deadline = t0 + len(paths) / args.rate + args.grace
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=max(0.1, deadline - loop.time()))
    for t in tasks:
        if not t.done():
            t.cancel()
    for i, r in enumerate(results):
        if r is None:
            results[i] = (round(i / args.rate, 4), None, "unfinished", 0)
    return wall0, results


def summarize(results, rate, wall0):
    ok = sorted(r[1] for r in results if r[2] == 200)
    failed = [r for r in results if r[2] != 200]
    errors = {}
    for r in failed:
        errors[str(r[2])] = errors.get(str(r[2]), 0) + 1
    return {
        "requests": len(results), "rate": rate, "start_wall": wall0,
        "ok": len(ok), "failed": len(failed), "errors": errors,
        "p50_ms": round(1000 * percentile(ok, 50), 2) if ok else None,
        "p90_ms": round(1000 * percentile(ok, 90), 2) if ok else None,
        "p99_ms": round(1000 * percentile(ok, 99), 2) if ok else None,
        "max_ms": round(1000 * ok[-1], 2) if ok else None,
        "bytes": sum(r[3] for r in results),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=100.0, help="requests per second")
    ap.add_argument("--requests", type=int, default=6000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--shape", default="steady", choices=workload.SHAPES,
                    help="workload shape (see workload.py)")
    ap.add_argument("--timeout", type=float, default=30.0, help="per request, seconds")
    ap.add_argument("--grace", type=float, default=30.0, help="after the last scheduled request")
    ap.add_argument("--out", help="write summary and per-request results as JSON")
    args = ap.parse_args()
    if not (args.host.startswith("127.") or args.host in ("localhost", "::1")):
        sys.exit("loadgen.py: loopback targets only")
    wall0, results = asyncio.run(run(args))
    summary = summarize(results, args.rate, wall0)
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "results": results}, f)


if __name__ == "__main__":
    main()
