"""The request sequence every contender gets: log-uniform body sizes from a fixed seed."""

import math
import random

MIN_SIZE = 1024
MAX_SIZE = 1024 * 1024


def sizes(count, seed=7, lo=MIN_SIZE, hi=MAX_SIZE):
    """`count` (size, request-seed) pairs, size log-uniform in [lo, hi]."""
    rng = random.Random(seed)
    a, b = math.log(lo), math.log(hi)
    return [(int(math.exp(rng.uniform(a, b))), rng.getrandbits(31)) for _ in range(count)]


#: Workload shapes: `steady` (the default: every request a /work of log-uniform size) and
#: `rare-large` (the same, but about one request in REPORT_EVERY is a /report that builds
#: REPORT_MB MiB of Python objects and frees them: memory a trim returns is then not
#: touched again at once, unlike the steady shape's).
SHAPES = ("steady", "rare-large")
REPORT_EVERY = 250
REPORT_MB = 40


def paths(count, seed=7, shape="steady"):
    if shape not in SHAPES:
        raise ValueError(f"unknown workload shape {shape!r} (expected one of {SHAPES})")
    out = ["/work?size=%d&seed=%d" % (s, r) for s, r in sizes(count, seed)]
    if shape == "rare-large":
        rng = random.Random(seed + 1)
        for i in range(len(out)):
            if rng.randrange(REPORT_EVERY) == 0:
                out[i] = "/report?mb=%d&seed=%d" % (REPORT_MB, rng.getrandbits(31))
    return out
