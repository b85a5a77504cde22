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


def paths(count, seed=7):
    return ["/work?size=%d&seed=%d" % (s, r) for s, r in sizes(count, seed)]
