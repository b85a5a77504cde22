"""--preload against separate imports, beside gunicorn and gunicorn --preload, on one app
whose import builds ~100 MiB of Python objects (tests/apps/big_app.py).

    python3 bench/preload.py [--duration 120] [--workers 4] [--mb 100] [--out DIR]

For each contender: start it with N workers, wait until it serves, load it with wrk
(keep-alive, closed loop) for --duration seconds, then read every worker's PSS
(/proc/PID/smaps_rollup: shared pages divided among the processes that map them) and the
master's or zygote's. For trimrun, then recycle worker 0 and report how long the
replacement took from start to READY=1 (trimrun's `ready_ms`). "restarts" counts worker
processes that were replaced during the load.

Needs: root (trimrun's cgroups), wrk, python3 with waitress and gunicorn
(scripts/install-test-deps.sh), a built trimrun (target/release or target/debug, or
--trimrun). Prints a markdown table and writes DIR/preload.json.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
APPS = os.path.join(ROOT, "tests", "apps")
sys.path.insert(0, BENCH)
import procs  # noqa: E402

MiB = 1024 * 1024


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_trimrun(given):
    for p in [given, os.path.join(ROOT, "target/release/trimrun"),
              os.path.join(ROOT, "target/debug/trimrun")]:
        if p and os.access(p, os.X_OK):
            return p
    sys.exit("preload.py: no trimrun binary: cargo build --release, or pass --trimrun")


def command(name, args, port, control):
    worker = [sys.executable, "-m", "trimrun_worker", "--app-dir", APPS, "--threads", "1",
              "big_app:app"]
    if name.startswith("trimrun_worker"):
        argv = [args.trimrun, "-n", str(args.workers), "--bind", f"127.0.0.1:{port}",
                "--ready", "notify", "--control", control, "--ready-timeout", "120s"]
        if name.endswith("--preload"):
            argv.append("--preload")
        return argv + ["--"] + worker
    argv = [shutil.which("gunicorn") or "gunicorn", "-w", str(args.workers), "-b",
            f"127.0.0.1:{port}", "--chdir", APPS, "--no-control-socket", "--timeout", "120",
            "--log-level", "warning"]
    if name.endswith("--preload"):
        argv.append("--preload")
    return argv + ["big_app:app"]


def workers_and_helper(name, root, trimrun=None, control=None):
    """(worker pids, the master's or zygote's pid)."""
    kids = procs.children_of(procs.ppid_map(), root)
    if name.startswith("gunicorn"):
        return kids, root
    out = subprocess.run([trimrun, "status", "--json", "--control", control],
                         capture_output=True, text=True, timeout=10)
    try:
        s = json.loads(out.stdout)
    except ValueError:
        return [], None
    workers = [w["pid"] for w in s.get("workers", []) if w["pid"] in kids]
    return workers, (s.get("zygote") or {}).get("pid")


def serves(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def wrk(port, seconds, connections):
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=seconds + 60).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock_err = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}
    return {
        "rps": float(rps.group(1)) if rps else None,
        "p99_ms": float(p99.group(1)) * scale[p99.group(2)] if p99 else None,
        "non_2xx": int(errors.group(1)) if errors else 0,
        "socket_errors": [int(x) for x in sock_err.groups()] if sock_err else [0, 0, 0, 0],
        "raw": out,
    }


def one(name, args, outdir):
    port = free_port()
    tmp = tempfile.mkdtemp(prefix="preload-")
    control = os.path.join(tmp, "ctl.sock")
    logpath = os.path.join(outdir, f"{name.replace(' ', '')}.log")
    env = dict(os.environ, BIG_APP_MB=str(args.mb),
               PYTHONPATH=os.path.join(ROOT, "python"))
    argv = command(name, args, port, control)
    log = open(logpath, "w")
    t0 = time.monotonic()
    p = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                         start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            w, _ = workers_and_helper(name, p.pid, args.trimrun, control)
            if len(w) == args.workers and serves(port):
                if not name.startswith("trimrun") or "all workers ready" in open(logpath).read():
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{name} never served: see {logpath}")
        startup_s = time.monotonic() - t0
        before = set(workers_and_helper(name, p.pid, args.trimrun, control)[0])
        seen = set(before)
        result = wrk(port, args.duration, args.connections)
        workers, helper = workers_and_helper(name, p.pid, args.trimrun, control)
        seen |= set(workers)
        pss = {w: (procs.smaps_rollup(w) or {}).get("pss", 0) for w in workers}
        rss = {w: (procs.smaps_rollup(w) or {}).get("rss", 0) for w in workers}
        helper_pss = (procs.smaps_rollup(helper) or {}).get("pss", 0) if helper else 0
        row = {
            "contender": name, "workers": len(workers), "startup_s": round(startup_s, 2),
            "rps": result["rps"], "p99_ms": result["p99_ms"],
            "failed": result["non_2xx"] + sum(result["socket_errors"]),
            "workers_pss_mib": round(sum(pss.values()) / MiB, 1),
            "worker_pss_mib": [round(v / MiB, 1) for v in pss.values()],
            "worker_rss_mib": [round(v / MiB, 1) for v in rss.values()],
            "master_or_zygote_pss_mib": round(helper_pss / MiB, 1),
            "total_pss_mib": round((sum(pss.values()) + helper_pss) / MiB, 1),
            "restarts": len(seen - before),
        }
        if name.startswith("trimrun"):
            row["recycle_ready_ms"] = recycle_ready_ms(args.trimrun, control, logpath)
        return row
    finally:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)


def stamp(line):
    """Seconds since midnight of a trimrun log line's UTC timestamp."""
    h, m, sec = line[11:26].split(":")
    return int(h) * 3600 + int(m) * 60 + float(sec)


def recycle_ready_ms(trimrun, control, logpath):
    """Recycle slot 0 three times; for each replacement, (ms from the recycle decision to
    READY=1, including the cgroup's creation and the fork or fork+exec; ms from the process
    start to READY=1, trimrun's ready_ms)."""
    out = []
    strip = re.compile(r"\x1b\[[0-9;]*m")
    for _ in range(3):
        text = strip.sub("", open(logpath).read())
        done = text.count("recycle complete")
        subprocess.run([trimrun, "ctl", "--control", control, "recycle", "0"],
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = strip.sub("", open(logpath).read())
            if text.count("recycle complete") > done:
                break
            time.sleep(0.1)
        lines = text.splitlines()
        begin = [ln for ln in lines if "recycling worker: starting its replacement slot=0" in ln]
        ready = [ln for ln in lines if re.search(r"worker ready slot=0 pid=\d+ ready_ms=", ln)]
        if begin and ready:
            own = int(re.search(r"ready_ms=(\d+)", ready[-1]).group(1))
            out.append((round((stamp(ready[-1]) - stamp(begin[-1])) * 1000), own))
        time.sleep(1)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=int, default=120, help="seconds of load (default 120)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--mb", type=int, default=100, help="MiB of objects the app builds")
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--trimrun")
    ap.add_argument("--contenders",
                    default="trimrun_worker,trimrun_worker --preload,gunicorn,gunicorn --preload")
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "preload"))
    args = ap.parse_args()
    args.trimrun = find_trimrun(args.trimrun)
    os.makedirs(args.out, exist_ok=True)
    rows = []
    for name in args.contenders.split(","):
        print(f"preload.py: {name} ...", file=sys.stderr, flush=True)
        rows.append(one(name, args, args.out))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    with open(os.path.join(args.out, "preload.json"), "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print(f"\n{args.workers} workers, {args.mb} MiB app, {args.duration} s of wrk "
          f"-c{args.connections}\n")
    print("| contender | req/s | p99 ms | failed | workers' PSS MiB | + master/zygote | "
          "total PSS MiB | restarts | recycled worker ready ms (from decision / from start) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['contender']} | {r['rps']} | {r['p99_ms']} | {r['failed']} | "
              f"{r['workers_pss_mib']} | {r['master_or_zygote_pss_mib']} | "
              f"{r['total_pss_mib']} | {r['restarts']} | "
              f"{', '.join(f'{a}/{b}' for a, b in r.get('recycle_ready_ms', [])) or '-'} |")


if __name__ == "__main__":
    main()
