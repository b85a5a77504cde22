#!/usr/bin/env python3
"""Pause of `trimrun trim` (ptrace-injected malloc_trim) vs in-process malloc_trim vs gdb.

    cargo build --release && python3 bench/trim/bench.py [--runs N] [--mib M]

Run as root from the repository root (it also builds the `trim_loop` example). Prints a
Markdown report on stdout.
  1. first trim of a ~M MiB fragmented Python heap (tests/progs/frag.py, 4 threads), by
     `trimrun trim`: external pause vs in-process malloc_trim time on an identically built
     heap (same seed)
  2. routine trims (the same heaps, trimmed again N times), idle fragmented worker
  3. routine trims of a small idle Python process
  4. routine trims of a busy server (tests/progs/soak.py, 3 allocating threads, 2 clients)
  5. how long the *other* threads are stopped (longest gap of a 1 ms ticker thread in the
     target) during external trims and during `gdb -p PID --batch -ex 'call malloc_trim(0)'`
Routine trims (2-4) are made by one long-lived trimmer (bench/trim/trim_loop.rs), as the
pool's supervisor makes them; row 3 also shows `trimrun trim`, a new process per trim.
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRIMRUN = os.path.join(ROOT, "target/release/trimrun")
TRIM_LOOP = os.path.join(ROOT, "target/release/examples/trim_loop")
PROGS = os.path.join(ROOT, "tests/progs")


CHILDREN = []


def spawn(args):
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
    CHILDREN.append(p)
    return p


def frag(seed, mib, ticker=False):
    args = [sys.executable, os.path.join(PROGS, "frag.py"), str(seed), str(mib), "4"]
    if ticker:
        args.append("--ticker")
    p = spawn(args)
    line = p.stdout.readline().split()
    assert line[0] == "ready", line
    return p


def cmd(p, c):
    p.stdin.write(c + "\n")
    p.stdin.flush()
    return p.stdout.readline().split()


def until_parked(attempt):
    """Call `attempt()` (one trim, its JSON answer) again while deferred (thread not parked)."""
    for _ in range(500):
        r = attempt()
        if r["ok"]:
            return r
        assert r["error"] == "deferred", r
        time.sleep(0.01)
    raise RuntimeError("never parked")


def ext_trim(pid):
    """One `trimrun trim --json PID` (a new process per trim), retried while deferred."""
    run = lambda: subprocess.run([TRIMRUN, "trim", "--json", str(pid)], capture_output=True, text=True)
    return until_parked(lambda: json.loads(run().stdout))


class Loop:
    """The long-lived trimmer (trim_loop) attached to one pid: a trim per call."""

    def __init__(self, pid):
        self.p = spawn([TRIM_LOOP, str(pid)])

    def trim(self):
        return until_parked(self.once)

    def once(self):
        self.p.stdin.write("\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def close(self):
        kill(self.p)


def stats(xs):
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(round(0.99 * (len(xs) - 1))))]
    return f"{statistics.median(xs):.0f} | {p99:.0f} | {xs[-1]:.0f}"


def kill(p):
    p.kill()
    p.wait()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--mib", type=int, default=135)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--trimrun", help="use this trimrun binary (with --trim-loop: no build)")
    ap.add_argument("--trim-loop", help="use this trim_loop binary, e.g. of an older build")
    a = ap.parse_args()
    global TRIMRUN, TRIM_LOOP
    if a.trimrun and a.trim_loop:
        TRIMRUN, TRIM_LOOP = a.trimrun, a.trim_loop
    else:
        subprocess.run(["cargo", "build", "--release", "--quiet", "--example", "trim_loop"], cwd=ROOT, check=True)
    print(f"## trim pause benchmark ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n")

    # 1. first trims, external vs in-process, identical heaps.
    rows, ext_first, self_first, first_over = [], [], [], []
    for seed in range(a.pairs):
        pe = frag(seed, a.mib)
        r = ext_trim(pe.pid)
        ps = frag(seed, a.mib)
        s = cmd(ps, "self")
        self_us, self_rel = int(s[3]), int(s[1]) - int(s[2])
        ext_first.append(r["pause_us"])
        first_over.append(r["pause_us"] - r["call_us"])
        self_first.append(self_us)
        rows.append((seed, r["anon_before"], r["anon_before"] - r["anon_after"], self_rel, r["pause_us"], r["call_us"], self_us, r["syscall"]))
        if seed < a.pairs - 1:
            kill(pe)
            kill(ps)
    print(f"### 1. first trim of a fragmented heap ({a.mib} MiB allocated, 4 threads, 90% freed)\n")
    print("| seed | anon before | released (external) | released (in-process) | external pause µs | of which the call ran µs | ptrace overhead µs | in-process malloc_trim µs (other process, same heap) | parked in |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seed, before, rel, srel, pe_us, call_us, ps_us, sc in rows:
        print(f"| {seed} | {before >> 20} MiB | {rel >> 20} MiB | {srel >> 20} MiB | {pe_us} | {call_us} | {pe_us - call_us} | {ps_us} | {sc} |")
    print()

    # 2. routine trims of the same (already trimmed) heaps.
    loop = Loop(pe.pid)
    ext_rs = [loop.trim() for _ in range(a.runs)]
    loop.close()
    ext_r = [r["pause_us"] for r in ext_rs]
    ext_over = [r["pause_us"] - r["call_us"] for r in ext_rs]
    self_r = [int(cmd(ps, "self")[3]) for _ in range(a.runs)]
    kill(pe)
    kill(ps)

    # 3. small idle Python (2 MiB fragmented heap): external and in-process on the same
    # process, alternating, so the difference is our overhead.
    small = frag(0, 2)
    loop = Loop(small.pid)
    small_r, small_self, small_over, small_cli = [], [], [], []
    for _ in range(a.runs):
        r = loop.trim()
        small_r.append(r["pause_us"])
        small_over.append(r["pause_us"] - r["call_us"])
        small_self.append(int(cmd(small, "self")[3]))
        small_cli.append(ext_trim(small.pid)["pause_us"])
    loop.close()
    kill(small)

    # 4. busy server under load.
    srv = spawn([sys.executable, os.path.join(PROGS, "soak.py"), "3"])
    port = int(srv.stdout.readline().split()[1])
    stop = threading.Event()
    served = [0]

    def client():
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", port)) as s:
                f = s.makefile("rw")
                for i in range(20):
                    f.write(json.dumps({"id": i, "values": [i, 2], "pad": "x" * 2000}) + "\n")
                    f.flush()
                    assert json.loads(f.readline())["sum"] == i + 2
                    served[0] += 1

    cl = [threading.Thread(target=client, daemon=True) for _ in range(2)]
    for t in cl:
        t.start()
    time.sleep(1)
    loop = Loop(srv.pid)
    busy = [loop.trim() for _ in range(a.runs)]
    loop.close()
    busy_call = [r["pause_us"] - r["call_us"] for r in busy]
    stop.set()
    for t in cl:
        t.join()
    kill(srv)
    busy_r = [r["pause_us"] for r in busy]
    busy_sc = sorted({r["syscall"] for r in busy})

    print(f"### 2-4. routine trims ({a.runs} each): pause of the injected thread, µs\n")
    print("| target | median | p99 | max |")
    print("|---|---|---|---|")
    print(f"| idle fragmented worker, external (trimrun) | {stats(ext_r)} |")
    print(f"| idle fragmented worker, external: ptrace overhead (pause − call) | {stats(ext_over)} |")
    print(f"| idle fragmented worker, in-process malloc_trim (same heap) | {stats(self_r)} |")
    print(f"| small idle Python (2 MiB fragmented), external | {stats(small_r)} |")
    print(f"| small idle Python, external: ptrace overhead (pause − call) | {stats(small_over)} |")
    print(f"| small idle Python (2 MiB fragmented), in-process malloc_trim (same process) | {stats(small_self)} |")
    print(f"| small idle Python, `trimrun trim` (a new process per trim) | {stats(small_cli)} |")
    print(f"| busy server (3 allocating threads, {served[0]} requests served meanwhile), external; parked in {busy_sc} | {stats(busy_r)} |")
    print(f"| busy server, external: ptrace overhead (pause − call) | {stats(busy_call)} |")
    print()

    # 5. other threads: ticker gaps, ours vs gdb.
    pt = frag(100, a.mib, ticker=True)
    cmd(pt, "gap")
    first = ext_trim(pt.pid)
    ours_first_gap = int(cmd(pt, "gap")[1])
    loop = Loop(pt.pid)
    for _ in range(50):
        loop.trim()
    loop.close()
    ours_gap = int(cmd(pt, "gap")[1])
    time.sleep(0.5)
    base_gap = int(cmd(pt, "gap")[1])
    gdb_gap, gdb_wall = [], []
    for _ in range(5):
        cmd(pt, "gap")
        t0 = time.perf_counter()
        out = subprocess.run(["gdb", "-p", str(pt.pid), "--batch", "-ex", "call (int)malloc_trim(0)"], capture_output=True, text=True)
        gdb_wall.append((time.perf_counter() - t0) * 1e6)
        assert "$1 = " in out.stdout, out.stdout + out.stderr
        gdb_gap.append(int(cmd(pt, "gap")[1]))
    kill(pt)
    print("### 5. how long the target is stopped: ticker thread's longest gap (1 ms sleeps), µs\n")
    print("| situation | longest ticker gap µs | injected thread pause µs |")
    print("|---|---|---|")
    print(f"| idle, no trim (0.5 s) | {base_gap} | - |")
    print(f"| first external trim | {ours_first_gap} | {first['pause_us']} |")
    print(f"| 50 routine external trims | {ours_gap} | - |")
    print(f"| gdb call malloc_trim(0), median of 5 (wall {statistics.median(gdb_wall):.0f}) | {statistics.median(gdb_gap):.0f} (max {max(gdb_gap)}) | whole process |")
    print()
    med = statistics.median
    print("### verdicts\n")
    worst = max(first_over)
    print(f"- first trim: what trimrun adds (pause − call) median {med(first_over):.0f} µs, worst {worst} µs (target: pause ≤ in-process + 500 µs): {'met' if worst <= 500 else 'NOT met'}; pause − in-process time measured on a twin process: median {med([e - s for e, s in zip(ext_first, self_first)]):.0f} µs (noisy: two processes)")
    print(f"- routine trims, small idle Python: median pause {med(small_r):.0f} µs (target ≤ 100 µs): {'met' if med(small_r) <= 100 else 'NOT met'}; in-process malloc_trim {med(small_self):.0f} µs, ptrace overhead (pause − call) {med(small_over):.0f} µs; `trimrun trim` as a new process {med(small_cli):.0f} µs")
    print(f"- routine trims, idle fragmented worker: median pause {med(ext_r):.0f} µs (target ≤ 100 µs): {'met' if med(ext_r) <= 100 else 'NOT met'}; malloc_trim itself takes {med(self_r):.0f} µs in-process on that heap, and the ptrace overhead (pause − call) is {med(ext_over):.0f} µs ({'≤' if med(ext_over) <= 100 else '>'} 100 µs)")
    print(f"- busy server: median pause {med(busy_r):.0f} µs, ptrace overhead {med(busy_call):.0f} µs")
    g = med(gdb_gap)
    for what, ours in [("small idle Python", med(small_r)), ("idle fragmented worker", med(ext_r))]:
        print(f"- gdb stops every thread of the process {g:.0f} µs; trimrun pauses one thread {ours:.0f} µs on the {what}: {g / max(1, ours):.0f}x (target ≥ 100x): {'met' if g / max(1, ours) >= 100 else 'NOT met'}")
    print(f"- gdb's stop against what trimrun adds to malloc_trim on the fragmented heap (pause − call, {med(ext_over):.0f} µs): {g / max(1, med(ext_over)):.0f}x; other threads: longest ticker gap {ours_gap} µs over 50 trims against {g:.0f} µs under gdb")


if __name__ == "__main__":
    try:
        main()
    finally:
        for c in CHILDREN:
            if c.poll() is None:
                c.kill()
                c.wait()
