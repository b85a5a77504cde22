"""A Python worker with a deterministic fragmented malloc heap, for trim tests and benches.

    python3 frag.py SEED MIB THREADS [--ticker]

Each of THREADS threads allocates about MIB/THREADS MiB of bytes objects of random sizes
(600..4000 bytes: above pymalloc's 512-byte limit, so they come from glibc malloc) with
random.Random(SEED + i), keeps every 10th and frees the rest: the heap is full of holes.
It prints "ready ANON_BYTES", then the main thread blocks reading commands on stdin:
  self    call malloc_trim(0) in-process (ctypes), print "self BEFORE AFTER US RET"
  anon    print "anon BYTES"
  gap     print "gap US" (longest ticker gap since the last "gap", needs --ticker) and reset
EOF exits.
"""

import ctypes
import random
import sys
import threading
import time

KEEP = []
LOCK = threading.Lock()


def anon():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Anonymous:"):
                return int(line.split()[1]) * 1024
    return 0


def build(seed, nbytes):
    r = random.Random(seed)
    keep, tmp, total, i = [], [], 0, 0
    while total < nbytes:
        n = r.randint(600, 4000)
        b = bytes(n)
        total += n
        (keep if i % 10 == 0 else tmp).append(b)
        i += 1
    del tmp
    with LOCK:
        KEEP.append(keep)


MAX_GAP = [0.0]


def ticker():
    last = time.perf_counter()
    while True:
        time.sleep(0.001)
        now = time.perf_counter()
        MAX_GAP[0] = max(MAX_GAP[0], now - last)
        last = now


def main():
    seed, mib, nthreads = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    per = mib * 1024 * 1024 // nthreads
    ts = [threading.Thread(target=build, args=(seed + i, per)) for i in range(nthreads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    if "--ticker" in sys.argv:
        threading.Thread(target=ticker, daemon=True).start()
    libc = ctypes.CDLL("libc.so.6")
    print("ready", anon(), flush=True)
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "self":
            before = anon()
            t0 = time.perf_counter()
            ret = libc.malloc_trim(0)
            us = (time.perf_counter() - t0) * 1e6
            print("self", before, anon(), int(us), ret, flush=True)
        elif cmd == "anon":
            print("anon", anon(), flush=True)
        elif cmd == "gap":
            print("gap", int(MAX_GAP[0] * 1e6), flush=True)
            MAX_GAP[0] = 0.0


main()
