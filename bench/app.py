"""The benchmark's WSGI app: a handler that fragments the heap the way real JSON services do.

Every contender serves this same file (`app:app`). One request to `/work?size=N&seed=S`:

  1. builds a list of dicts ("records") whose JSON is about N bytes: keys, small strings
     (pymalloc), medium strings of 0.5-24 KB (glibc malloc), nested lists;
  2. serialises it (`json.dumps`: one N-byte string, then its UTF-8 bytes), parses it back
     (`json.loads`: a second, independent object graph) and checks it;
  3. keeps a few survivors in a bounded in-process cache (random replacement): a record or
     two and a slice of the body, allocated at wherever the heap was at that moment;
  4. drops everything else and answers with the N-byte JSON body.

N is drawn by the load generator log-uniformly between 1 KB and 1 MB, with a fixed seed, so
every contender gets the same sequence. Because the survivors sit between the freed blocks,
glibc can give back neither the middle of the heap (it only shrinks the top on free) nor the
arenas of other threads: RSS climbs far above the live set, and `malloc_trim(0)`, which
madvises free pages away anywhere in every arena, releases most of the difference.
After the first large mmapped block is freed, glibc's dynamic mmap threshold rises (up to
32 MiB) so the 1 MB bodies are carved from the heap as well, as in real services.

Other routes: `/stats` (pid, RSS, USS, cache size, requests), `/trim` (in-process
malloc_trim(0), reports RSS before/after), `/` (tiny answer, for readiness probes).

Knobs (environment): BENCH_CACHE_ENTRIES (default 3000), BENCH_APP_THREADS (default 0: if >0,
part of every request's work runs in a pool of that many threads, so glibc uses more arenas).
"""

import ctypes
import ctypes.util
import json
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs

CACHE_ENTRIES = int(os.environ.get("BENCH_CACHE_ENTRIES", "3000"))
SURVIVOR_EVERY = int(os.environ.get("BENCH_SURVIVOR_EVERY", "24"))
APP_THREADS = int(os.environ.get("BENCH_APP_THREADS", "16"))
MAX_SIZE = 4 * 1024 * 1024

# The harness learns when each worker process has loaded the app (≈ ready to serve).
def _loaded():
    if os.environ.get("BENCH_EVENTS"):
        with open(os.environ["BENCH_EVENTS"], "a") as f:
            f.write("%d %.4f loaded\n" % (os.getpid(), time.time()))


_loaded()
# Preloaded (gunicorn --preload, trimrun --preload): the app was imported once, in the
# master or zygote, and each worker forked from it has it loaded from its first instant.
os.register_at_fork(after_in_child=_loaded)

_cache = {}
_cache_keys = []
_lock = threading.Lock()
_served = 0
# One single-thread executor per app thread: each request runs on one of them, picked from
# its seed, like a handler offloaded to a thread pool. glibc gives each thread its own arena,
# and each arena keeps its own high-water mark.
_pools = [ThreadPoolExecutor(1, thread_name_prefix="app%d" % k) for k in range(APP_THREADS)]

_WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
          "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]


def _record(rng, i):
    """One record, like a row of an API answer: ~20 small fields (pymalloc) and, one time in
    five, a medium text field of 0.5-32 KB (glibc malloc). About 0.4-33 KB of JSON."""
    word = _WORDS[i % len(_WORDS)]
    rec = {
        "id": i,
        "uuid": "%032x" % rng.getrandbits(128),
        "name": "%s-%d" % (word, i),
        "email": "%s.%d@example.com" % (word, rng.getrandbits(20)),
        "tags": [_WORDS[(i + k) % len(_WORDS)] for k in range(1 + i % 6)],
        "score": rng.random(),
        "count": rng.getrandbits(16),
        "active": i % 3 != 0,
        "created": "2026-11-%02dT%02d:%02d:00Z" % (1 + i % 28, i % 24, i % 60),
        "address": {"street": "%d %s street" % (rng.getrandbits(10), word),
                    "city": _WORDS[(i * 7) % len(_WORDS)], "zip": "%05d" % (i % 99999)},
        "history": [{"t": k, "v": rng.random()} for k in range(i % 4)],
    }
    if rng.random() < 0.4:
        rec["text"] = word[0] * rng.randint(512, 32768)
    return rec


def _build(size, rng):
    """Records worth about `size` bytes of JSON."""
    records = []
    approx = 2
    i = 0
    while approx < size:
        rec = _record(rng, i)
        approx += len(rec.get("text", "")) + 420
        records.append(rec)
        i += 1
    return records


def _render(rec):
    """An HTML-ish fragment of one record (0.6-17 KB: a glibc-malloc'd string)."""
    return ("<div id='%s'><h2>%s</h2><p>%s</p><ul>%s</ul><p>%s</p><pre>%s</pre></div>" % (
        rec["uuid"], rec["name"], rec["email"],
        "".join("<li>%s</li>" % t for t in rec["tags"]),
        rec["address"], rec.get("text", "-" * (300 + rec["count"] % 400))))


def _keep(rng, survivors):
    """Put survivors in the bounded cache, evicting random old ones."""
    with _lock:
        for item in survivors:
            if len(_cache_keys) < CACHE_ENTRIES:
                key = len(_cache_keys)
                _cache_keys.append(key)
            else:
                key = _cache_keys[rng.randrange(CACHE_ENTRIES)]
            _cache[key] = item


def _work(size, seed):
    if _pools:
        return _pools[seed % len(_pools)].submit(_handle, size, seed).result()
    return _handle(size, seed)


def _handle(size, seed):
    rng = random.Random(seed)
    records = _build(size, rng)
    # Render every record, as a template would; the fragments are allocated one after the
    # other, between the records' own objects.
    fragments = [_render(r) for r in records]
    page = "".join(fragments)
    body = json.dumps({"records": records, "page_len": len(page)}, separators=(",", ":"))
    parsed = json.loads(body)["records"]
    if len(parsed) != len(records):
        raise RuntimeError("round trip lost records")
    # "Business logic": an index and a per-city grouping, alive with everything else.
    index = {r["uuid"]: r for r in parsed}
    by_city = {}
    for r in parsed:
        by_city.setdefault(r["address"]["city"], []).append((r["id"], r["score"]))
    if len(index) != len(parsed):
        raise RuntimeError("duplicate uuids")
    # Survivors: some of this request's own fragments (no copy: they stay exactly where they
    # were allocated, between the temporaries that are about to be freed) and a slice of
    # the body.
    survivors = fragments[rng.randrange(SURVIVOR_EVERY)::SURVIVOR_EVERY]
    a = rng.randrange(max(1, len(body) - 6000))
    survivors.append(body[a:a + rng.randint(600, 6000)])
    _keep(rng, survivors)
    data = body.encode()
    del records, fragments, page, parsed, body, index, by_city, survivors
    return data


def _smaps_rollup():
    out = {}
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[-1] == "kB":
                    out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    except OSError:
        pass
    return out


def memory():
    m = _smaps_rollup()
    uss = m.get("Private_Clean", 0) + m.get("Private_Dirty", 0)
    return {"rss": m.get("Rss", 0), "pss": m.get("Pss", 0), "uss": uss}


def malloc_trim():
    """In-process glibc malloc_trim(0); returns (released_any, before, after)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if not hasattr(libc, "malloc_trim"):
        return None, memory(), memory()
    before = memory()
    rc = libc.malloc_trim(0)
    after = memory()
    return rc, before, after


def stats():
    with _lock:
        n = len(_cache)
    return {"pid": os.getpid(), "served": _served, "cache_entries": n, **memory()}


def app(environ, start_response):
    global _served
    path = environ.get("PATH_INFO", "/")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    ctype = "application/json"
    if path == "/work":
        size = min(int(query.get("size", ["16384"])[0]), MAX_SIZE)
        seed = int(query.get("seed", ["0"])[0])
        data = _work(size, seed)
        with _lock:
            _served += 1
    elif path == "/report":
        # A rare large request (workload shape rare-large): tens of MiB of small objects,
        # rendered once and freed; nothing is kept.
        mb = min(int(query.get("mb", ["40"])[0]), 256)
        rng = random.Random(int(query.get("seed", ["0"])[0]))
        # ~8 KiB of Python objects per record (measured: 40 MiB asked, ~40 MiB of RSS).
        rows = [_record(rng, i) for i in range(mb * 1024 * 1024 // 8400)]
        data = json.dumps({"rows": len(rows), "page_len": sum(len(_render(r)) for r in rows)}).encode()
        del rows
        with _lock:
            _served += 1
    elif path == "/stats":
        data = json.dumps(stats()).encode()
    elif path == "/trim":
        rc, before, after = malloc_trim()
        data = json.dumps({"pid": os.getpid(), "rc": rc, "before": before,
                           "after": after}).encode()
    else:
        ctype = "text/plain"
        data = b"ok %d\n" % os.getpid()
    start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(data)))])
    return [data]
