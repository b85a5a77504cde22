#!/usr/bin/env python3
"""trimrun benchmark harness: one command for every measured run.

    bench/setup.sh                      # once: venv with pinned contenders, wrk, jemalloc
    bench/.venv/bin/python bench/run.py [--quick] [--contenders gunicorn,trimrun,...]
                                        [--phases contenders,density,master]

Phases
  contenders  the same app (bench/app.py), worker count and per-worker memory allowance under
              gunicorn (--max-requests + jitter), uWSGI (--reload-on-rss/--evil-reload-on-rss),
              Granian (--workers-max-rss), trimrun (defaults), trimrun --trim off, and gunicorn
              with jemalloc preloaded (context); a fixed-rate open-loop load (loadgen.py) of a
              fixed request count; memory/restarts/OOM/out-of-service/latency/master cost.
  density     largest worker count that completes the load inside a 1 GiB v1 memory cgroup with
              0 OOM kills (gunicorn and trimrun).
  saturation  closed-loop wrk against gunicorn with the same request mix (how far below
              saturation the fixed rate is).
  trimprobe   one-shot external trim (`trimrun trim --json PID...`) of loaded gunicorn workers:
              released bytes and stop time, then more load to check nothing broke.
  master      issue 2: master RSS and CPU with 8 and 64 idle workers (trimrun beside gunicorn),
              and time to spawn 64 workers of `sleep 1000`.

Everything is written to --out (default bench/results for full runs, bench/out/quick for
--quick): results.json, results.md (tables), PNG plots, and each contender's log.
trimrun is found at $TRIMRUN, else <repo>/target/release/trimrun (the checkout this script
is in); if missing or not working its columns say "not run (reason)".
The trimprobe phase (one-shot `trimrun trim --json PID...` of loaded gunicorn workers) uses
$TRIMRUN_TRIM if set (a build that has the `trim` subcommand), else the same binary.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
sys.path.insert(0, BENCH)
import procs  # noqa: E402

VENV_BIN = os.path.join(BENCH, ".venv", "bin")
PY = os.path.join(VENV_BIN, "python")
MiB = 1024 * 1024
GiB = 1024 * MiB
ALL = ["gunicorn", "uwsgi", "granian", "trimrun", "trimrun-notrim", "gunicorn-jemalloc",
       "gunicorn-trim", "trimrun-budget", "gunicorn-preload", "trimrun-budget-preload"]
JEMALLOC_CANDIDATES = ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"]

# Log lines that tell why a worker was restarted, per contender.
CAUSES = {
    "gunicorn": {"max-requests": "Autorestarting worker after current request",
                 "killed (oom?)": "Perhaps out of memory", "timeout": "WORKER TIMEOUT"},
    "uwsgi": {"reload-on-rss": r"The work of process \d+ is done", "evil-reload-on-rss": "EVIL RELOAD ON WORKER",
              "died": "DAMN ! worker"},
    "granian": {"max-rss": "RSS over threshold", "died": r"(?i)unexpected|died"},
    "trimrun": {"recycle (log)": r"recycling worker", "oom (log)": r"(?i)oom.?kill|out of memory",
                "trim (log)": r"trimmed slot=", "worker exited (log)": r"worker exited"},
}
CAUSES["gunicorn-jemalloc"] = CAUSES["gunicorn"]
CAUSES["gunicorn-trim"] = CAUSES["gunicorn"]
CAUSES["gunicorn-preload"] = CAUSES["gunicorn"]
for _k in ("trimrun-notrim", "trimrun-budget", "trimrun-budget-preload"):
    CAUSES[_k] = CAUSES["trimrun"]


def log(msg):
    print(time.strftime("%H:%M:%S ") + msg, flush=True)


def parse_size(s):
    s = str(s).strip().upper()
    mult = {"K": 1024, "M": MiB, "G": GiB}.get(s[-1:], 1)
    return int(float(s.rstrip("KMGB")) * mult)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_trimrun():
    for cand in [os.environ.get("TRIMRUN"), os.path.join(REPO, "target", "release", "trimrun")]:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand, None
    return None, "no trimrun binary (set TRIMRUN=..., or cargo build --release)"


def trimrun_version(path):
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=5)
        return (out.stdout or out.stderr).strip()
    except Exception as e:  # noqa: BLE001
        return f"unknown ({e})"


# ---- contenders ---------------------------------------------------------------------------

def command(name, cfg, port, n, limit, control):
    """argv and extra env for one contender, `n` workers, `limit` bytes per worker."""
    limit_mb = limit // MiB
    env = {}
    if name in ("gunicorn", "gunicorn-jemalloc", "gunicorn-trim", "gunicorn-preload"):
        argv = [os.path.join(VENV_BIN, "gunicorn"), "--chdir", BENCH, "-w", str(n),
                "-b", f"127.0.0.1:{port}", "--backlog", "2048",
                "--max-requests", str(cfg.gunicorn_max_requests),
                "--max-requests-jitter", str(cfg.gunicorn_jitter),
                "--graceful-timeout", "30", "--timeout", "60", "--log-level", "info"]
        if name == "gunicorn-jemalloc":
            env["LD_PRELOAD"] = next((p for p in JEMALLOC_CANDIDATES if os.path.exists(p)), "")
        if name == "gunicorn-trim":
            # The in-process recipe trimrun replaces: a daemon thread in every worker calls
            # malloc_trim(0) every 30-60 s (jittered) once RSS passes 75% of the allowance.
            argv += ["-c", os.path.join(BENCH, "gunicorn_trim.py")]
            env["BENCH_TRIM_RSS"] = str(int(limit * 0.75))
        if name == "gunicorn-preload":
            argv += ["--preload"]   # the app imported once in the master, workers forked
        argv += ["app:app"]
    elif name == "uwsgi":
        argv = [os.path.join(VENV_BIN, "uwsgi"), "--master", "--processes", str(n),
                "--http-socket", f"127.0.0.1:{port}", "--chdir", BENCH, "--wsgi-file", "app.py",
                "--callable", "app", "--lazy-apps", "--enable-threads", "--listen", "1024",
                "--reload-on-rss", str(int(limit_mb * cfg.soft_fraction)),
                "--evil-reload-on-rss", str(limit_mb), "--die-on-term", "--need-app",
                "--disable-logging", "--worker-reload-mercy", "30"]
    elif name == "granian":
        argv = [os.path.join(VENV_BIN, "granian"), "--interface", "wsgi", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(n), "--blocking-threads", "1",
                "--backlog", "1024", "--workers-max-rss", str(limit_mb),
                "--rss-sample-interval", str(cfg.granian_rss_interval),
                "--respawn-failed-workers", "--working-dir", BENCH, "app:app"]
    elif name in ("trimrun", "trimrun-notrim", "trimrun-budget", "trimrun-budget-preload"):
        # trimrun-budget: the same allowance as one pool budget (--pool-limit n x limit), each
        # worker's ceiling twice its share, instead of n hard per-worker limits;
        # trimrun-budget-preload: the same, workers forked from a zygote (--preload).
        memory = (["--pool-limit", f"{limit_mb * n}M"] if name.startswith("trimrun-budget")
                  else ["--limit", f"{limit_mb}M"])
        if name == "trimrun-budget-preload":
            memory += ["--preload"]
        argv = [cfg.trimrun, "-n", str(n), *memory, "--bind", f"127.0.0.1:{port}",
                "--control", control]
        if name == "trimrun-notrim":
            argv += ["--trim", "off"]
        argv += ["--", PY, os.path.join(BENCH, "serve_fd3.py")]
    else:
        raise SystemExit(f"unknown contender {name}")
    return argv, env


# ---- sampling -----------------------------------------------------------------------------

class Sampler(threading.Thread):
    """Tracks the contender's process tree every `tick` s and its memory every `mem_every` ticks."""

    def __init__(self, root, cg, tick=0.125, mem_every=2, status_argv=None, status_every=2.0):
        super().__init__(daemon=True)
        self.root, self.cg, self.tick, self.mem_every = root, cg, tick, mem_every
        self.status_argv, self.status_every = status_argv, status_every
        self.halt = threading.Event()
        self.lifetimes = {}          # pid -> [first_seen, last_seen]
        self.samples = []
        self.statuses = []
        self.helpers = set()
        self.cmd = {}

    def workers_now(self, pmap):
        out = []
        for c in procs.children_of(pmap, self.root):
            if c not in self.cmd:
                self.cmd[c] = procs.cmdline(c)
                if "resource_tracker" in self.cmd[c] or "semaphore_tracker" in self.cmd[c]:
                    self.helpers.add(c)
            if c not in self.helpers:
                out.append(c)
        return out

    def run(self):
        i = 0
        last_status = 0.0
        while not self.halt.is_set():
            t = time.time()
            pmap = procs.ppid_map()
            alive_root = self.root in pmap
            workers = self.workers_now(pmap) if alive_root else []
            for w in workers:
                lt = self.lifetimes.setdefault(w, [t, t])
                lt[1] = t
            if i % self.mem_every == 0:
                s = {"t": t, "workers": {}}
                cpu = procs.cpu_seconds(self.root)
                m = procs.smaps_rollup(self.root)
                if cpu is not None and m:
                    s["master"] = dict(m, cpu=cpu)
                for w in workers:
                    tot = {"rss": 0, "pss": 0, "uss": 0}
                    for p in procs.subtree(pmap, w):
                        mm = procs.smaps_rollup(p)
                        if mm:
                            for k in tot:
                                tot[k] += mm[k]
                    s["workers"][w] = tot
                if self.cg is not None:
                    s["cg"] = self.cg.reading()
                self.samples.append(s)
            if self.status_argv and t - last_status >= self.status_every:
                last_status = t
                try:
                    out = subprocess.run(self.status_argv, capture_output=True, text=True, timeout=2)
                    if out.returncode == 0 and out.stdout.strip():
                        self.statuses.append({"t": t, "status": json.loads(out.stdout)})
                except Exception:  # noqa: BLE001 - status is best effort
                    pass
            i += 1
            self.halt.wait(max(0.0, self.tick - (time.time() - t)))

    def stop(self):
        self.halt.set()
        self.join(10)


def read_events(path):
    loaded = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and parts[2] == "loaded":
                    loaded.setdefault(int(parts[0]), float(parts[1]))
    except OSError:
        pass
    return loaded


def allocator_of(pid):
    try:
        maps = open(f"/proc/{pid}/maps").read()
    except OSError:
        return None
    return "jemalloc" if "libjemalloc" in maps else ("tcmalloc" if "tcmalloc" in maps else "glibc")


def http_ok(port, path="/", timeout=1.0):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status == 200
    except Exception:  # noqa: BLE001
        return False


def stop_tree(proc, grace=20.0):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        pass


class Launched:
    """One contender process tree, in its own v1 memory cgroup, with a sampler."""

    def __init__(self, name, cfg, outdir, n, limit, cg_limit=None, tag="", tick=0.125, sample=True):
        self.name, self.n, self.limit = name, n, limit
        self.port = free_port()
        stem = f"{name}{tag}"
        self.control = f"/tmp/bench-{os.getpid()}-{stem}.sock"
        self.events = os.path.join(outdir, f"{stem}.events")
        self.logpath = os.path.join(outdir, f"{stem}.log")
        for p in (self.events, self.control):
            if os.path.exists(p):
                os.unlink(p)
        self.argv, extra = command(name, cfg, self.port, n, limit, self.control)
        env = dict(os.environ, BENCH_EVENTS=self.events, PYTHONUNBUFFERED="1", **extra)
        self.cg = procs.Cgroup(f"bench-{os.getpid()}-{stem}", cg_limit)
        self.logf = open(self.logpath, "w")
        self.t_launch = time.time()
        self.proc = subprocess.Popen(self.argv, env=env, stdout=self.logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=BENCH, preexec_fn=self.cg.enter,
                                     start_new_session=True)
        status_argv = None
        if name.startswith("trimrun"):
            status_argv = [cfg.trimrun, "status", "--json", "--control", self.control]
        self.sampler = Sampler(self.proc.pid, self.cg, tick=tick, status_argv=status_argv)
        if sample:
            self.sampler.start()
        self.t_ready = None

    def wait_ready(self, timeout=120.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode} before ready (see {os.path.basename(self.logpath)})"
            loaded = read_events(self.events)
            live = [p for p, lt in self.sampler.lifetimes.items() if time.time() - lt[1] < 1.0]
            if time.time() - self.t_launch > 25 and not loaded:
                return "no worker loaded the app within 25 s (see its log)"
            if sum(1 for p in live if p in loaded) >= self.n and http_ok(self.port):
                self.t_ready = time.time()
                self.allocator = allocator_of(live[0]) if live else None
                return None
            time.sleep(0.1)
        return f"not ready after {timeout:.0f}s"

    def finish(self):
        alive = self.proc.poll() is None
        self.sampler.stop()
        stop_tree(self.proc)
        self.cg.remove()
        self.logf.close()
        return alive


def run_load(cfg, port, requests, rate, out):
    argv = [PY, os.path.join(BENCH, "loadgen.py"), "--port", str(port), "--rate", str(rate),
            "--requests", str(requests), "--out", out, "--timeout", "30", "--grace", "30",
            "--shape", cfg.shape]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=requests / rate + 120)
    if p.returncode != 0:
        raise RuntimeError(f"loadgen failed: {p.stderr[-2000:]}")
    with open(out) as f:
        return json.load(f)["summary"]


# ---- analysis -----------------------------------------------------------------------------

def service_gaps(lifetimes, loaded, n, t0, t1, tick):
    """Out-of-service accounting from process lifetimes.

    A worker is in service from when it has loaded the app (or was first seen) until it was
    last seen alive. deficit(t) = n - workers in service; we report the time with deficit >= 1
    and >= 2, the number of episodes with deficit >= 2 and the largest deficit."""
    edges = []
    for pid, (first, last) in lifetimes.items():
        start = max(first, loaded.get(pid, first))
        end = last + tick / 2 if last < t1 - tick else float("inf")
        if end <= t0 or start >= t1:
            continue
        edges.append((max(start, t0), +1))
        if end < t1:
            edges.append((end, -1))
    edges.sort()
    count, t, out1, out2, episodes, worst, prev2 = 0, t0, 0.0, 0.0, 0, 0, False
    i = 0
    while i < len(edges) and edges[i][0] <= t0:
        count += edges[i][1]
        i += 1
    points = edges[i:] + [(t1, 0)]
    for when, delta in points:
        deficit = max(0, n - count)
        dt = max(0.0, when - t)
        if deficit >= 1:
            out1 += dt
        if deficit >= 2:
            out2 += dt
            if not prev2 and dt > 0:
                episodes += 1
        prev2 = deficit >= 2 and dt > 0 or (prev2 and dt == 0)
        if dt > 0:
            worst = max(worst, deficit)
        count += delta
        t = when
    return {"out_any_s": round(out1, 2), "out_2plus_s": round(out2, 2),
            "episodes_2plus": episodes, "max_out": worst}


def master_death_reason(L):
    import re
    code = L.proc.returncode
    text = re.sub(r"\x1b\[[0-9;]*m", "", open(L.logpath, errors="replace").read())
    for line in text.splitlines():
        if "panicked at" in line or "Traceback" in line or " ERROR " in line:
            return f"exit {code}: {line.strip()[:200]}"
    return f"exit {code}"


def machine_cpu():
    """(busy jiffies, total jiffies) from /proc/stat."""
    with open("/proc/stat") as f:
        vals = [int(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return sum(vals) - idle, sum(vals)


def dmesg_oom_kills(cg_path):
    """OOM kills the kernel logged for tasks in this cgroup or below it (None if no dmesg)."""
    rel = "/" + os.path.relpath(cg_path, "/sys/fs/cgroup/memory")
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    import re
    rx = re.compile("oom-kill:.*task_memcg=" + re.escape(rel) + "[/,]")
    return sum(1 for line in out.stdout.splitlines() if rx.search(line))


def count_causes(name, logpath):
    import re
    try:
        text = re.sub(r"\x1b\[[0-9;]*m", "", open(logpath, errors="replace").read())
    except OSError:
        return {}
    key = name if name in CAUSES else None
    if key is None:
        return {}
    return {cause: len(re.findall(rx, text)) for cause, rx in CAUSES[key].items()}


def summarize_status(statuses):
    """Best effort over an unknown-but-documented shape: sum trims/recycles over workers."""
    if not statuses:
        return None
    st = statuses[-1]["status"]
    if isinstance(st, dict) and isinstance(st.get("data"), dict):
        st = st["data"]
    workers = st.get("workers") if isinstance(st, dict) else st
    out = {"raw_last": st}
    if isinstance(workers, list):
        for key in ("trims", "recycles", "released_bytes"):
            vals = [w.get(key) for w in workers if isinstance(w, dict) and isinstance(w.get(key), (int, float))]
            if vals:
                out["workers_" + key] = sum(vals)
    for key in ("trims", "recycles", "oom_kills", "restarts", "released_bytes", "backend"):
        if isinstance(st, dict) and isinstance(st.get(key), (int, float, str)):
            out[key] = st[key]
    return out


def analyze(L, load, t_load0, t_load1):
    s = L.sampler
    loaded = read_events(L.events)
    in_load = [x for x in s.samples if t_load0 <= x["t"] <= t_load1]
    totals_uss = [sum(w["uss"] for w in x["workers"].values()) for x in in_load]
    totals_pss = [sum(w["pss"] for w in x["workers"].values()) for x in in_load]
    per_worker_uss = [w["uss"] for x in in_load for w in x["workers"].values()]
    cg_usage = [x["cg"]["usage"] for x in in_load if "cg" in x]
    cg_ws = [x["cg"]["ws"] for x in in_load if "cg" in x]
    cg_anon = [x["cg"]["rss"] for x in in_load if "cg" in x]
    initial = {p for p, lt in s.lifetimes.items() if lt[0] <= L.t_ready}
    restarts = sorted(p for p, lt in s.lifetimes.items() if lt[0] > L.t_ready and lt[0] <= t_load1 + 1)
    master = [x["master"] for x in s.samples if "master" in x]
    m_load = [x["master"] for x in in_load if "master" in x]
    cpu = None
    if len(m_load) >= 2:
        cpu = m_load[-1]["cpu"] - m_load[0]["cpu"]
    dur = max(1e-9, t_load1 - t_load0)
    last_cg = next((x["cg"] for x in reversed(s.samples) if "cg" in x), {})

    def avg(v):
        return sum(v) / len(v) if v else None

    res = {
        "contender": L.name, "workers": L.n, "limit_mb": L.limit // MiB, "argv": L.argv,
        "load": load,
        "mem": {
            "total_uss_peak_mb": max(totals_uss) / MiB if totals_uss else None,
            "total_uss_mean_mb": avg(totals_uss) / MiB if totals_uss else None,
            "total_pss_peak_mb": max(totals_pss) / MiB if totals_pss else None,
            "total_pss_mean_mb": avg(totals_pss) / MiB if totals_pss else None,
            "worker_uss_peak_mb": max(per_worker_uss) / MiB if per_worker_uss else None,
            "worker_uss_mean_mb": avg(per_worker_uss) / MiB if per_worker_uss else None,
            "cgroup_usage_peak_mb": max(cg_usage) / MiB if cg_usage else None,
            "cgroup_ws_mean_mb": avg(cg_ws) / MiB if cg_ws else None,
            "cgroup_anon_peak_mb": max(cg_anon) / MiB if cg_anon else None,
            "cgroup_anon_mean_mb": avg(cg_anon) / MiB if cg_anon else None,
        },
        "restarts": len(restarts),
        "restart_causes": count_causes(L.name, L.logpath),
        "oom_kills": last_cg.get("oom_kill", 0),
        "service": service_gaps(s.lifetimes, loaded, L.n, t_load0, t_load1, s.tick),
        "master": {
            "rss_mb": max(m["rss"] for m in master) / MiB if master else None,
            "uss_mb": max(m["uss"] for m in master) / MiB if master else None,
            "cpu_s": cpu, "cpu_pct": 100 * cpu / dur if cpu is not None else None,
        },
        "initial_workers": len(initial),
        "startup_s": round(L.t_ready - L.t_launch, 2) if L.t_ready else None,
        "worker_allocator": getattr(L, "allocator", None),
        "load_window": [t_load0, t_load1],
        "trimrun_status": summarize_status(s.statuses),
    }
    return res


def series(L):
    """Compact memory time series for plots: t (s from launch), per-worker USS MiB, total, cg."""
    out = {"t0": L.t_launch, "t": [], "workers": {}, "cg_usage": [], "master_rss": []}
    for k, x in enumerate(L.sampler.samples):
        out["t"].append(round(x["t"] - L.t_launch, 3))
        for pid, w in x["workers"].items():
            out["workers"].setdefault(str(pid), []).append((k, round(w["uss"] / MiB, 2)))
        out["cg_usage"].append(round(x.get("cg", {}).get("usage", 0) / MiB, 2))
        out["master_rss"].append(round(x.get("master", {}).get("rss", 0) / MiB, 2))
    return out


# ---- phases -------------------------------------------------------------------------------

def one_contender(name, cfg, outdir, n, limit, requests, rate, cg_limit=None, tag=""):
    """Launch, wait ready, load, analyse, stop. Returns (result, series)."""
    if name.startswith("trimrun") and not cfg.trimrun:
        return {"contender": name, "not_run": cfg.trimrun_missing}, None
    L = Launched(name, cfg, outdir, n, limit, cg_limit=cg_limit, tag=tag)
    try:
        err = L.wait_ready(timeout=60 + 2 * n)
        if err:
            L.finish()
            tail = open(L.logpath, errors="replace").read()[-1500:]
            return {"contender": name, "workers": n, "not_run": err, "log_tail": tail, "argv": L.argv}, None
        log(f"{name}{tag}: {n} workers ready in {L.t_ready - L.t_launch:.1f}s; load {requests} req @ {rate}/s")
        t0 = time.time()
        cpu0 = machine_cpu()
        load = run_load(cfg, L.port, requests, rate, os.path.join(cfg.rawdir, f"load-{name}{tag}.json"))
        cpu1 = machine_cpu()
        t_load0 = load["start_wall"]
        t_load1 = time.time()
        time.sleep(0.5)
        master_alive = L.proc.poll() is None
        res = analyze(L, load, t_load0, t_load1)
        res["master_alive_at_end"] = master_alive
        res["oom_kills_dmesg"] = dmesg_oom_kills(L.cg.path)
        if not master_alive:
            res["master_death"] = master_death_reason(L)
        res["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        # Machine CPU busy during the load (all processes, ours included), in cores.
        res["machine_busy_cores"] = round((cpu1[0] - cpu0[0]) / max(1e-9, cpu1[1] - cpu0[1]) * (os.cpu_count() or 1), 2)
        res["wall_s"] = round(time.time() - t0, 1)
        ser = series(L)
    finally:
        L.finish()
    # The cgroup's OOM counter is gone with the group: the reading in the last sample stands.
    log(f"{name}{tag}: p50 {load['p50_ms']} ms p99 {load['p99_ms']} ms failed {load['failed']} "
        f"restarts {res['restarts']} oom {res['oom_kills']} total USS mean "
        f"{res['mem']['total_uss_mean_mb'] or 0:.0f} MiB peak worker {res['mem']['worker_uss_peak_mb'] or 0:.0f} MiB "
        f"out>=2 {res['service']['out_2plus_s']}s")
    return res, ser


def phase_contenders(cfg, outdir):
    results, all_series = {}, {}
    for name in cfg.contenders:
        res, ser = one_contender(name, cfg, outdir, cfg.workers, cfg.limit, cfg.requests, cfg.rate)
        results[name] = res
        if ser:
            all_series[name] = ser
        with open(os.path.join(cfg.rawdir, f"series-{name}.json"), "w") as f:
            json.dump(ser, f)
    return results, all_series


def phase_density(cfg, outdir):
    out = {}
    # Any contender can climb a ladder: gunicorn* ones climb --density-gunicorn, trimrun* ones
    # --density-trimrun (each trimrun rung gets the share (budget - reserve) / n).
    for name in cfg.density_contenders:
        ladder = cfg.density_trimrun if name.startswith("trimrun") else cfg.density_gunicorn
        if name.startswith("trimrun") and not cfg.trimrun:
            out[name] = {"not_run": cfg.trimrun_missing}
            continue
        trials, best = [], None
        ladder = list(ladder)
        k = 0
        while k < len(ladder):
            n = ladder[k]
            k += 1
            limit = cfg.limit
            if name.startswith("trimrun"):
                limit = (cfg.budget - cfg.density_reserve) // n // MiB * MiB
            requests = int(cfg.density_seconds * cfg.density_rate)
            res, _ = one_contender(name, cfg, outdir, n, limit, requests, cfg.density_rate,
                                   cg_limit=cfg.budget, tag=f"-density-{n}")
            if "not_run" in res:
                trials.append({"workers": n, "ok": False, "why": res["not_run"]})
                break
            ooms = max(res["oom_kills"], res.get("oom_kills_dmesg") or 0)
            ok = (ooms == 0 and res["load"]["failed"] == 0 and res["master_alive_at_end"])
            trials.append({"workers": n, "ok": ok, "limit_mb": limit // MiB, "oom_kills": ooms,
                           "failed": res["load"]["failed"], "master_alive": res["master_alive_at_end"],
                           "cgroup_usage_peak_mb": res["mem"]["cgroup_usage_peak_mb"],
                           "restarts": res["restarts"], "p99_ms": res["load"]["p99_ms"]})
            log(f"density {name} n={n}: {'PASS' if ok else 'FAIL'} {trials[-1]}")
            if ok:
                best = n
            elif best is None and n == ladder[0] and n > 2:
                ladder = ladder[:k] + [max(1, n - 2)]   # first rung failed: try one step down
            else:
                break
        out[name] = {"best": best, "trials": trials, "seconds": cfg.density_seconds,
                     "rate": cfg.density_rate, "budget_mb": cfg.budget // MiB,
                     "ladder_exhausted": bool(trials) and all(t["ok"] for t in trials)}
    return out


def phase_saturation(cfg, outdir):
    """Closed-loop wrk run against gunicorn with the same worker count and request mix, to
    show the fixed load rate is well below what the machine can serve."""
    wrk = shutil.which("wrk")
    if not wrk:
        return {"not_run": "wrk not installed (bench/setup.sh)"}
    import workload
    script = os.path.join(outdir, "wrk-paths.lua")
    with open(script, "w") as f:
        f.write("local paths = {" + ",".join('"%s"' % p for p in workload.paths(2000)) + "}\n")
        f.write("local i = 0\nrequest = function()\n  i = i + 1\n"
                "  return wrk.format(\"GET\", paths[(i % #paths) + 1], {[\"Connection\"] = \"close\"})\nend\n")
    out = {}
    for name in cfg.saturation_contenders:
        if name.startswith("trimrun") and not cfg.trimrun:
            out[name] = {"not_run": cfg.trimrun_missing}
            continue
        L = Launched(name, cfg, outdir, cfg.workers, cfg.limit, tag="-saturation", tick=0.5)
        try:
            err = L.wait_ready(timeout=60)
            if err:
                out[name] = {"not_run": err}
                continue
            p = subprocess.run([wrk, "-t2", "-c8", f"-d{cfg.saturation_seconds}s", "-s", script,
                                f"http://127.0.0.1:{L.port}/"], capture_output=True, text=True,
                               timeout=cfg.saturation_seconds + 30)
            rps = None
            for line in p.stdout.splitlines():
                if line.startswith("Requests/sec:"):
                    rps = float(line.split()[1])
            out[name] = {"requests_per_s": rps, "seconds": cfg.saturation_seconds,
                         "connections": 8, "wrk_stdout": p.stdout[-1500:]}
            log(f"saturation {name}: {rps} req/s closed-loop (wrk -t2 -c8)")
        finally:
            L.finish()
    return out


def phase_trimprobe(cfg, outdir):
    """One-shot external trim: load gunicorn's workers (no max-requests), then
    `trimrun trim --json PID...` each of them, then load again and check nothing failed."""
    if not cfg.trimrun and not os.environ.get("TRIMRUN_TRIM"):
        return {"not_run": cfg.trimrun_missing}
    saved = cfg.gunicorn_max_requests
    cfg.gunicorn_max_requests = 10 ** 9
    L = Launched("gunicorn", cfg, outdir, cfg.workers, cfg.limit, tag="-trimprobe", tick=0.5)
    try:
        err = L.wait_ready(timeout=60)
        if err:
            return {"not_run": err}
        n_req = cfg.trimprobe_requests
        before_load = run_load(cfg, L.port, n_req, cfg.rate, os.path.join(outdir, "load-trimprobe-1.json"))
        pids = procs.children_of(procs.ppid_map(), L.proc.pid)
        trim_bin = os.environ.get("TRIMRUN_TRIM") or cfg.trimrun
        out_bin = {"binary": trim_bin, "version": trimrun_version(trim_bin)}
        p = subprocess.run([trim_bin, "trim", "--json"] + [str(x) for x in pids],
                           capture_output=True, text=True, timeout=60)
        trims = []
        for line in p.stdout.splitlines():
            try:
                trims.append(json.loads(line))
            except ValueError:
                pass
        if not trims:
            return {"not_run": f"`trimrun trim` gave no JSON (exit {p.returncode}): {(p.stderr or p.stdout)[-500:]}"}
        after_load = run_load(cfg, L.port, max(100, n_req // 10), cfg.rate, os.path.join(outdir, "load-trimprobe-2.json"))
        out = {"workers": len(pids), "requests_before": n_req, "trims": trims, **out_bin,
               "released_mb_total": sum(t.get("released", 0) for t in trims) / MiB,
               "rss_before_mb_total": sum(t.get("rss_before", 0) for t in trims) / MiB,
               "rss_after_mb_total": sum(t.get("rss_after", 0) for t in trims) / MiB,
               "pause_us_max": max((t.get("pause_us", 0) for t in trims), default=None),
               "failed_before": before_load["failed"], "failed_after": after_load["failed"],
               "p99_after_ms": after_load["p99_ms"]}
        log(f"trimprobe: released {out['released_mb_total']:.0f} MiB of {out['rss_before_mb_total']:.0f} MiB RSS "
            f"over {len(pids)} gunicorn workers, max pause {out['pause_us_max']} us, failed after {out['failed_after']}")
        return out
    finally:
        cfg.gunicorn_max_requests = saved
        L.finish()


def phase_master(cfg, outdir):
    out = {"idle": {}, "spawn64": {}}
    for n in cfg.master_workers:
        group = []
        if cfg.trimrun:
            group.append(("trimrun", Launched("trimrun", cfg, outdir, n, parse_size("256M"),
                                              tag=f"-idle-{n}", tick=0.5)))
        else:
            out["idle"][f"trimrun-{n}"] = {"not_run": cfg.trimrun_missing}
        group.append(("gunicorn", Launched("gunicorn", cfg, outdir, n, parse_size("256M"),
                                           tag=f"-idle-{n}", tick=0.5)))
        try:
            errs = {nm: L.wait_ready(timeout=60 + 2 * n) for nm, L in group}
            t0 = time.time()
            time.sleep(2)
            first = {nm: procs.cpu_seconds(L.proc.pid) for nm, L in group}
            rss = {nm: [] for nm, _ in group}
            end = time.time() + cfg.master_seconds
            while time.time() < end:
                for nm, L in group:
                    m = procs.smaps_rollup(L.proc.pid)
                    if m:
                        rss[nm].append(m)
                time.sleep(1)
            for nm, L in group:
                key = f"{nm}-{n}"
                if errs[nm]:
                    out["idle"][key] = {"not_run": errs[nm]}
                    continue
                last = procs.cpu_seconds(L.proc.pid)
                cpu = (last - first[nm]) if last is not None and first[nm] is not None else None
                secs = cfg.master_seconds
                out["idle"][key] = {
                    "workers": n, "seconds": secs,
                    "master_rss_mb": max(m["rss"] for m in rss[nm]) / MiB if rss[nm] else None,
                    "master_uss_mb": max(m["uss"] for m in rss[nm]) / MiB if rss[nm] else None,
                    "master_cpu_s": cpu, "master_cpu_pct": 100 * cpu / secs if cpu is not None else None,
                    "workers_seen": len(L.sampler.lifetimes),
                }
                log(f"master {key}: {out['idle'][key]}")
            del t0
        finally:
            for _, L in group:
                L.finish()
    # spawn time, 64 workers of a trivial program
    if cfg.trimrun:
        out["spawn64"]["trimrun"] = spawn_time([cfg.trimrun, "-n", "64", "--", "sleep", "1000"], 64, outdir,
                                               "spawn-trimrun", fallback=[cfg.trimrun, "-n", "64", "--limit", "64M",
                                                                          "--bind", f"127.0.0.1:{free_port()}",
                                                                          "--", "sleep", "1000"])
    else:
        out["spawn64"]["trimrun"] = {"not_run": cfg.trimrun_missing}
    out["spawn64"]["gunicorn"] = spawn_time(
        [os.path.join(VENV_BIN, "gunicorn"), "--chdir", BENCH, "-w", "64", "-b", f"127.0.0.1:{free_port()}",
         "trivial_app:app"], 64, outdir, "spawn-gunicorn")
    return out


def spawn_time(argv, n, outdir, stem, fallback=None, timeout=60.0):
    cg = procs.Cgroup(f"bench-{os.getpid()}-{stem}")
    logpath = os.path.join(outdir, f"{stem}.log")
    try:
        with open(logpath, "w") as lf:
            t0 = time.time()
            p = subprocess.Popen(argv, stdout=lf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=BENCH, preexec_fn=cg.enter, start_new_session=True)
            try:
                while time.time() - t0 < timeout:
                    if p.poll() is not None:
                        break
                    pm = procs.ppid_map()
                    kids = procs.children_of(pm, p.pid)
                    if len(kids) >= n:
                        return {"seconds": round(time.time() - t0, 3), "argv": argv}
                    time.sleep(0.005)
            finally:
                stop_tree(p, grace=10)
        if fallback:
            return spawn_time(fallback, n, outdir, stem + "-fallback")
        return {"not_run": f"{n} children not seen (exit {p.returncode}); see {os.path.basename(logpath)}",
                "argv": argv}
    finally:
        cg.remove()


# ---- reporting ----------------------------------------------------------------------------

def plots(all_series, results, outdir, limit_mb):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing: no plots")
        return []
    made = []

    def draw(ax, name):
        ser = all_series[name]
        r = results.get(name, {})
        lw = r.get("load_window")
        for pid, pts in ser["workers"].items():
            xs = [ser["t"][k] for k, _ in pts]
            ys = [v for _, v in pts]
            ax.plot(xs, ys, lw=1)
        ax.axhline(limit_mb, color="red", ls="--", lw=1, label=f"allowance {limit_mb} MiB")
        if lw:
            ax.axvspan(lw[0] - ser["t0"], lw[1] - ser["t0"], color="grey", alpha=0.08, label="load")
        ax.set_title(f"{name}: USS per worker (a colour per pid)")
        ax.set_xlabel("seconds since launch")
        ax.set_ylabel("MiB")
        ax.legend(loc="upper left", fontsize=8)

    pair = [n for n in ("gunicorn", "trimrun") if n in all_series]
    if pair:
        fig, axes = plt.subplots(1, len(pair), figsize=(7 * len(pair), 4.5), sharey=True, squeeze=False)
        for ax, name in zip(axes[0], pair):
            draw(ax, name)
        fig.tight_layout()
        p = os.path.join(outdir, "memory_gunicorn_vs_trimrun.png")
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)
    names = [n for n in ALL if n in all_series]
    if names:
        cols = 2
        rows = (len(names) + 1) // 2
        fig, axes = plt.subplots(rows, cols, figsize=(14, 4 * rows), sharey=True, squeeze=False)
        for k, name in enumerate(names):
            draw(axes[k // cols][k % cols], name)
        for k in range(len(names), rows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.tight_layout()
        p = os.path.join(outdir, "memory_per_worker_all.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
        fig, ax = plt.subplots(figsize=(10, 4.5))
        for name in names:
            ser = all_series[name]
            tot = {}
            for pts in ser["workers"].values():
                for k, v in pts:
                    tot[k] = tot.get(k, 0) + v
            ks = sorted(tot)
            ax.plot([ser["t"][k] for k in ks], [tot[k] for k in ks], label=name)
        ax.set_title("total worker USS")
        ax.set_xlabel("seconds since launch")
        ax.set_ylabel("MiB")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = os.path.join(outdir, "memory_total_all.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        made.append(p)
    return made


def fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1:
            return f"{v:.3f}"
        return f"{v:.{nd}f}"
    return str(v)


MEASURES = [
    ("total worker USS, mean (MiB)", lambda r: r["mem"]["total_uss_mean_mb"]),
    ("total worker USS, peak (MiB)", lambda r: r["mem"]["total_uss_peak_mb"]),
    ("total worker PSS, mean (MiB)", lambda r: r["mem"]["total_pss_mean_mb"]),
    ("per-worker USS, peak (MiB)", lambda r: r["mem"]["worker_uss_peak_mb"]),
    ("per-worker USS, mean (MiB)", lambda r: r["mem"]["worker_uss_mean_mb"]),
    ("cgroup anon memory of whole tree incl. master, mean (MiB)", lambda r: r["mem"]["cgroup_anon_mean_mb"]),
    ("cgroup anon memory of whole tree incl. master, peak (MiB)", lambda r: r["mem"]["cgroup_anon_peak_mb"]),
    ("cgroup usage (anon + page cache charged), peak (MiB)", lambda r: r["mem"]["cgroup_usage_peak_mb"]),
    ("worker restarts", lambda r: r["restarts"]),
    ("OOM kills (cgroup oom_control)", lambda r: r["oom_kills"]),
    ("OOM kills (dmesg)", lambda r: r["oom_kills_dmesg"]),
    ("time with >=1 worker out of service (s)", lambda r: r["service"]["out_any_s"]),
    ("time with >=2 workers out of service (s)", lambda r: r["service"]["out_2plus_s"]),
    ("episodes with >=2 out of service", lambda r: r["service"]["episodes_2plus"]),
    ("failed requests", lambda r: r["load"]["failed"]),
    ("master alive at the end of the load", lambda r: "yes" if r["master_alive_at_end"] else "NO"),
    ("p50 latency (ms)", lambda r: r["load"]["p50_ms"]),
    ("p99 latency (ms)", lambda r: r["load"]["p99_ms"]),
    ("max latency (ms)", lambda r: r["load"]["max_ms"]),
    ("master RSS, peak (MiB)", lambda r: r["master"]["rss_mb"]),
    ("master USS, peak (MiB)", lambda r: r["master"]["uss_mb"]),
    ("master CPU during load (s)", lambda r: r["master"]["cpu_s"]),
    ("machine CPU busy during load, all processes (cores of 2)", lambda r: r["machine_busy_cores"]),
    ("master CPU during load (% of a core)", lambda r: r["master"]["cpu_pct"]),
]


def markdown(report):
    lines = []
    cfg = report["config"]
    res = report.get("contenders", {})
    if res:
        names = [n for n in ALL if n in res]
        lines.append(f"### Contenders: {cfg['workers']} workers, {cfg['limit_mb']} MiB per worker, "
                     f"{cfg['requests']} requests at {cfg['rate']}/s\n")
        lines.append("| measure | " + " | ".join(names) + " |")
        lines.append("|---|" + "---|" * len(names))
        for label, get in MEASURES:
            row = []
            for n in names:
                r = res[n]
                if "not_run" in r:
                    row.append("not run")
                    continue
                try:
                    row.append(fmt(get(r)))
                except (KeyError, TypeError):
                    row.append("–")
            lines.append(f"| {label} | " + " | ".join(row) + " |")
        causes = []
        for n in names:
            r = res[n]
            if "not_run" in r:
                causes.append(f"- **{n}: not run** ({r['not_run']})")
            else:
                if r.get("master_death"):
                    causes.append(f"- **{n}: the master died during the run**: {r['master_death']}")
                causes.append(f"- {n}: restart causes from its log: {r.get('restart_causes')}; "
                              f"startup {r.get('startup_s')} s; worker allocator {r.get('worker_allocator')}" +
                              (f"; trimrun status: { {k: v for k, v in (r.get('trimrun_status') or {}).items() if k != 'raw_last'} }"
                               if n.startswith("trimrun") else ""))
        lines.append("")
        lines.extend(causes)
        for tr in ("trimrun", "trimrun-notrim"):
            if tr in res and "not_run" not in res[tr]:
                others = [n for n in names if n != tr and "not_run" not in res[n]]
                lines.append(f"\n#### Ratio {tr} / contender (lower is better for memory, latency, restarts)\n")
                lines.append("| measure | " + " | ".join(others) + " |")
                lines.append("|---|" + "---|" * len(others))
                for label, get in MEASURES:
                    row = []
                    for n in others:
                        try:
                            a, b = get(res[tr]), get(res[n])
                            row.append(f"{a / b:.2f}" if a is not None and b not in (None, 0) else
                                       ("0/0" if a == 0 and b == 0 else "–"))
                        except (KeyError, TypeError):
                            row.append("–")
                    lines.append(f"| {label} | " + " | ".join(row) + " |")
            elif tr in cfg["contenders"]:
                why = res.get(tr, {}).get("not_run", "not run")
                lines.append(f"\n#### Ratio {tr} / contender: not run ({why})")
    sat = report.get("saturation")
    if sat:
        lines.append("\n### Saturation (closed loop, wrk -t2 -c8, same request mix)\n")
        for n, v in sat.items():
            lines.append(f"- {n}: " + (f"not run ({v['not_run']})" if "not_run" in v else
                                       f"{v['requests_per_s']} requests/s over {v['seconds']} s "
                                       f"(the fixed rate above is {cfg['rate']}/s)"))
    d = report.get("density")
    if d:
        lines.append(f"\n### Density: 1 GiB v1 memory cgroup around the whole tree\n")
        lines.append("| contender | largest passing worker count | trials (workers: pass/fail, OOM kills, failed requests, peak usage MiB, restarts, p99 ms) |")
        lines.append("|---|---|---|")
        for n, v in d.items():
            if "not_run" in v:
                lines.append(f"| {n} | not run ({v['not_run']}) | |")
                continue
            tr = "; ".join(f"{t['workers']}: {'pass' if t['ok'] else 'FAIL'}, oom {t.get('oom_kills')}, "
                           f"failed {t.get('failed')}, peak {fmt(t.get('cgroup_usage_peak_mb'), 0)}, "
                           f"restarts {t.get('restarts')}, p99 {fmt(t.get('p99_ms'), 0)}"
                           + (f", --limit {t['limit_mb']}M" if n.startswith('trimrun') and 'limit_mb' in t else "")
                           for t in v["trials"])
            best = v["best"]
            more = " (ladder exhausted: at least this)" if v.get("ladder_exhausted") else ""
            lines.append(f"| {n} | {best}{more} | {tr} |")
    tp = report.get("trimprobe")
    if tp:
        lines.append("\n### One-shot external trim of loaded gunicorn workers (`trimrun trim --json PID...`)\n")
        if "not_run" in tp:
            lines.append(f"not run ({tp['not_run']})")
        else:
            lines.append(f"{tp['workers']} gunicorn sync workers (no max-requests) after {tp['requests_before']} requests: "
                         f"RSS {tp['rss_before_mb_total']:.0f} MiB → {tp['rss_after_mb_total']:.0f} MiB "
                         f"(released {tp['released_mb_total']:.0f} MiB), longest stop {tp['pause_us_max']} µs; "
                         f"failed requests after the trim: {tp['failed_after']} (p99 {tp['p99_after_ms']} ms).\n")
            lines.append("| pid | thread parked in | RSS before (MiB) | RSS after (MiB) | released (MiB) | pause (µs) |")
            lines.append("|---|---|---|---|---|---|")
            for t in tp["trims"]:
                lines.append(f"| {t.get('pid')} | {t.get('syscall')} | {t.get('rss_before', 0) / MiB:.1f} | "
                             f"{t.get('rss_after', 0) / MiB:.1f} | {t.get('released', 0) / MiB:.1f} | {t.get('pause_us')} |")
    m = report.get("master")
    if m:
        lines.append("\n### Master overhead with idle workers (issue 2)\n")
        lines.append("| master | workers | RSS peak (MiB) | USS peak (MiB) | CPU (s) over window | CPU (% of a core) | window (s) |")
        lines.append("|---|---|---|---|---|---|---|")
        for k, v in m.get("idle", {}).items():
            if "not_run" in v:
                lines.append(f"| {k} | | not run ({v['not_run']}) | | | | |")
            else:
                lines.append(f"| {k.rsplit('-', 1)[0]} | {v['workers']} | {fmt(v['master_rss_mb'])} | "
                             f"{fmt(v['master_uss_mb'])} | {fmt(v['master_cpu_s'], 2)} | "
                             f"{fmt(v['master_cpu_pct'], 3)} | {v['seconds']} |")
        lines.append("\n| spawn 64 workers | seconds until 64 children exist |")
        lines.append("|---|---|")
        for k, v in m.get("spawn64", {}).items():
            lines.append(f"| {k} (`{' '.join(os.path.basename(a) if i == 0 else a for i, a in enumerate(v.get('argv', [])))}`) | "
                         f"{v.get('seconds', 'not run (' + str(v.get('not_run')) + ')')} |")
    return "\n".join(lines) + "\n"


def environment(cfg):
    env = {"date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "nproc": os.cpu_count()}
    try:
        env["loadavg_start"] = open("/proc/loadavg").read().split()[:3]
        env["kernel"] = os.uname().release
        env["cpu"] = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        env["mem_total_gib"] = round(int(open("/proc/meminfo").readline().split()[1]) / 1024 / 1024, 1)
        env["glibc"] = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        env["python"] = sys.version.split()[0]
        import importlib.metadata as md
        env["packages"] = {p: md.version(p) for p in ["gunicorn", "pyuwsgi", "granian", "waitress", "matplotlib"]}
    except Exception as e:  # noqa: BLE001
        env["error"] = str(e)
    env["trimrun"] = {"path": cfg.trimrun, "version": trimrun_version(cfg.trimrun)} if cfg.trimrun else cfg.trimrun_missing
    src = os.environ.get("TRIMRUN_SRC", REPO)
    try:
        env["trimrun_source"] = src + " at " + subprocess.run(
            ["git", "-C", src, "log", "-1", "--format=%h %s"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return env


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short runs (minutes in all)")
    ap.add_argument("--shape", default="steady", choices=["steady", "rare-large"],
                    help="workload shape (bench/workload.py): rare-large adds a rare 40 MiB report")
    ap.add_argument("--contenders", default=",".join(ALL))
    ap.add_argument("--phases", default="saturation,contenders,density,trimprobe,master")
    ap.add_argument("--trimprobe-requests", type=int, default=None)
    ap.add_argument("--saturation-contenders", default="gunicorn")
    ap.add_argument("--saturation-seconds", type=int, default=None)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--limit", default="96M", help="per-worker memory allowance")
    ap.add_argument("--soft-fraction", type=float, default=0.9,
                    help="uWSGI --reload-on-rss as a fraction of the allowance (evil = allowance)")
    ap.add_argument("--rate", type=float, help="requests/s (default 150)")
    ap.add_argument("--requests", type=int, help="requests per contender (default 9000; quick 1500)")
    ap.add_argument("--gunicorn-max-requests", type=int, default=700,
                    help="calibrated: a worker of this app reaches ~86 MiB USS after ~800 requests")
    ap.add_argument("--gunicorn-jitter", type=int, default=200)
    ap.add_argument("--granian-rss-interval", type=int, default=5)
    ap.add_argument("--budget", default="1G")
    ap.add_argument("--density-contenders", default="gunicorn,trimrun")
    ap.add_argument("--density-gunicorn", default=None, help="worker counts to try, ascending")
    ap.add_argument("--density-trimrun", default=None)
    ap.add_argument("--density-seconds", type=float, default=None)
    ap.add_argument("--density-rate", type=float, default=None)
    ap.add_argument("--density-reserve", default="64M", help="budget share kept for trimrun itself")
    ap.add_argument("--master-workers", default="8,64")
    ap.add_argument("--master-seconds", type=float, default=None)
    ap.add_argument("--out", default=None)
    cfg = ap.parse_args()

    q = cfg.quick
    cfg.rate = cfg.rate or 150.0
    cfg.requests = cfg.requests or (1500 if q else 9000)
    cfg.limit = parse_size(cfg.limit)
    cfg.budget = parse_size(cfg.budget)
    cfg.density_reserve = parse_size(cfg.density_reserve)
    # The density measure is 10 minutes of load per trial; --quick is a smoke of it.
    cfg.density_seconds = cfg.density_seconds or (15 if q else 600)
    cfg.density_rate = cfg.density_rate or 200.0
    cfg.density_gunicorn = [int(x) for x in (cfg.density_gunicorn or ("8,12" if q else "10,12,14,16")).split(",")]
    cfg.density_trimrun = [int(x) for x in (cfg.density_trimrun or ("8,12" if q else "12,14,16,18")).split(",")]
    cfg.density_contenders = cfg.density_contenders.split(",")
    cfg.master_workers = [int(x) for x in cfg.master_workers.split(",")]
    cfg.master_seconds = cfg.master_seconds or (10 if q else 60)
    cfg.contenders = [c for c in cfg.contenders.split(",") if c]
    cfg.saturation_contenders = [c for c in cfg.saturation_contenders.split(",") if c]
    cfg.saturation_seconds = cfg.saturation_seconds or (3 if q else 10)
    cfg.trimprobe_requests = cfg.trimprobe_requests or (1000 if q else 3000)
    cfg.out = os.path.abspath(cfg.out or os.path.join(BENCH, "out", "quick") if q else cfg.out or os.path.join(BENCH, "results"))
    cfg.rawdir = os.path.join(cfg.out, "raw")
    os.makedirs(cfg.rawdir, exist_ok=True)
    cfg.trimrun, cfg.trimrun_missing = find_trimrun()
    if not os.path.exists(PY):
        sys.exit("run.py: bench/.venv missing: run bench/setup.sh first")
    phases = cfg.phases.split(",")

    report = {"config": {k: v for k, v in vars(cfg).items() if k not in ("out", "rawdir")},
              "environment": environment(cfg), "argv": sys.argv[1:]}
    report["config"]["limit_mb"] = cfg.limit // MiB
    log(f"out {cfg.out}; trimrun: {cfg.trimrun or cfg.trimrun_missing}; load {open('/proc/loadavg').read().strip()}")

    def save():
        report["environment"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        with open(os.path.join(cfg.out, "results.md"), "w") as f:
            f.write(markdown(report))

    if "saturation" in phases:
        report["saturation"] = phase_saturation(cfg, cfg.rawdir)
        save()
    if "contenders" in phases:
        res, ser = phase_contenders(cfg, cfg.rawdir)
        report["contenders"] = res
        report["plots"] = [os.path.relpath(p, cfg.out) for p in plots(ser, res, cfg.out, cfg.limit // MiB)]
        save()
    if "density" in phases:
        report["density"] = phase_density(cfg, cfg.rawdir)
        save()
    if "trimprobe" in phases:
        report["trimprobe"] = phase_trimprobe(cfg, cfg.rawdir)
        save()
    if "master" in phases:
        report["master"] = phase_master(cfg, cfg.rawdir)
        save()
    save()
    print(markdown(report))
    log(f"wrote {os.path.join(cfg.out, 'results.json')} and results.md")


if __name__ == "__main__":
    main()
