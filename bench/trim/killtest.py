#!/usr/bin/env python3
"""SIGKILL `trimrun trim` at random moments while it trims, count the targets it harmed.

    cargo build --release
    python3 bench/trim/killtest.py [--runs 100] [--target c|python] [--trimrun PATH]

Run as root from the repository root. Each run starts a fresh target, starts
`trimrun trim --timeout 5s PID`, waits until it has attached to a thread of the target,
sleeps a random 0..--max-ms milliseconds (the injected call lasts 1-60 ms) and SIGKILLs
the trimmer. The target is then checked:
  c       tests/progs/parked.c with a 60 MiB fragmented heap (calls of ~2-40 ms): still
          alive, no thread left traced, and on "stop" every parked call behaved (no
          spurious error or EINTR except from epoll_wait, no sleep shortened, signal mask
          unchanged) and it exits 0
  python  tests/progs/frag.py with a 20 MiB fragmented heap and a ticker thread (calls of
          ~1 ms): still alive, answers commands, exits 0 at EOF
A target that fails any check is "harmed". Prints one summary line:
  harmed H of N (killed while attached K, trimmer finished first F)
"""

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROGS = os.path.join(ROOT, "tests/progs")


def tracer_of(pid):
    """Tracer thread ids of the threads of pid."""
    out = set()
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for t in tids:
        try:
            with open(f"/proc/{pid}/task/{t}/status") as f:
                for line in f:
                    if line.startswith("TracerPid:"):
                        v = int(line.split()[1])
                        if v:
                            out.add(v)
        except OSError:
            pass
    return out


def attached(pid, trimmer):
    return any(os.path.exists(f"/proc/{trimmer}/task/{t}") for t in tracer_of(pid))


def state(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0]
    except OSError:
        return "gone"


def start_target(kind, parked_bin):
    if kind == "c":
        p = subprocess.Popen([parked_bin, "60"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, bufsize=1)
        while not p.stdout.readline().startswith("ready"):
            pass
    else:
        p = subprocess.Popen([sys.executable, os.path.join(PROGS, "frag.py"), "3", "20", "2",
                              "--ticker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, bufsize=1)
        assert p.stdout.readline().startswith("ready")
    return p


def check(kind, p):
    """Return None if the target is fine, else what is wrong."""
    deadline = time.time() + 5
    while tracer_of(p.pid) and time.time() < deadline:
        time.sleep(0.005)
    if tracer_of(p.pid):
        return "still traced"
    if state(p.pid) not in ("S", "R", "D"):
        return f"state {state(p.pid)}, returncode {p.poll()}"
    try:
        if kind == "c":
            out, err = p.communicate("stop\n", timeout=20)
            bad = [l for l in out.splitlines() if l.startswith("result ")
                   and (int(l.split()[3]) != 0 or (l.split()[1] != "epoll_wait" and int(l.split()[4]) != 0))]
            if p.returncode != 0 or bad:
                return f"exit {p.returncode}, misbehaved: {bad} {err.strip()[:200]}"
        else:
            p.stdin.write("anon\n")
            p.stdin.flush()
            if not p.stdout.readline().startswith("anon"):
                return "no answer"
            out, err = p.communicate("", timeout=20)
            if p.returncode != 0:
                return f"exit {p.returncode} {err.strip()[:200]}"
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return "hung"
    return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--target", choices=["c", "python"], default="c")
    ap.add_argument("--trimrun", default=os.path.join(ROOT, "target/release/trimrun"))
    ap.add_argument("--max-ms", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    rng = random.Random(a.seed)
    tmp = tempfile.mkdtemp()
    parked = os.path.join(tmp, "parked")
    subprocess.check_call(["cc", "-O1", "-pthread", "-o", parked, os.path.join(PROGS, "parked.c")])
    harmed, during, finished = [], 0, 0
    for run in range(a.runs):
        p = start_target(a.target, parked)
        t = subprocess.Popen([a.trimrun, "trim", "--timeout", "5s", str(p.pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while t.poll() is None and not attached(p.pid, t.pid) and time.time() < deadline:
            time.sleep(0.0002)
        time.sleep(rng.uniform(0, a.max_ms) / 1000)
        if t.poll() is None:
            during += 1
            t.send_signal(signal.SIGKILL)
        else:
            finished += 1
        t.wait()
        what = check(a.target, p)
        if what:
            harmed.append((run, what))
            print(f"run {run}: harmed: {what}", file=sys.stderr)
        if p.poll() is None:
            p.kill()
            p.wait()
    print(f"{a.target}: harmed {len(harmed)} of {a.runs} (killed while attached {during}, "
          f"trimmer finished first {finished}) with {a.trimrun}")
    return 1 if harmed else 0


if __name__ == "__main__":
    sys.exit(main())
