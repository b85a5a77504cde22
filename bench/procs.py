"""Reading processes and v1/v2 memory cgroups from /proc and /sys/fs/cgroup (no psutil)."""

import os
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def stat(pid):
    """(ppid, state, utime+stime seconds, starttime ticks) or None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return None
    rest = s[s.rindex(")") + 2:].split()
    # rest[0] = state (field 3); utime = field 14, stime = field 15, starttime = field 22
    return int(rest[1]), rest[0], (int(rest[11]) + int(rest[12])) / CLK_TCK, int(rest[19])


def cpu_seconds(pid):
    """CPU time of a process (all its threads) in seconds, ns resolution from schedstat when
    the kernel has it, else utime+stime from stat (10 ms ticks)."""
    total = 0.0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    ok = False
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0]) / 1e9
                ok = True
        except (OSError, ValueError, IndexError):
            pass
    if ok:
        return total
    st = stat(pid)
    return st[2] if st else None


def ppid_map():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(int(name))
            if st is not None and st[1] != "Z":
                out[int(name)] = st[0]
    return out


def children_of(pmap, pid):
    return sorted(p for p, pp in pmap.items() if pp == pid)


def subtree(pmap, pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children_of(pmap, p))
    return out


def smaps_rollup(pid):
    """{'rss','pss','uss','swap'} in bytes, or None if gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except OSError:
        return None
    m = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == "kB":
            m[parts[0].rstrip(":")] = int(parts[1]) * 1024
    return {"rss": m.get("Rss", 0), "pss": m.get("Pss", 0),
            "uss": m.get("Private_Clean", 0) + m.get("Private_Dirty", 0),
            "swap": m.get("Swap", 0)}


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ---- cgroups -------------------------------------------------------------------------

def memory_cgroup_root():
    """(mode, directory of our own memory cgroup)."""
    if os.path.exists("/sys/fs/cgroup/memory"):
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if "memory" in ctrls.split(","):
                    return "v1", "/sys/fs/cgroup/memory" + path
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return "v2", "/sys/fs/cgroup" + line.strip()[3:]
    return None, None


def read_int(path, default=None):
    try:
        with open(path) as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default


def read_kv(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) == 2:
                    try:
                        out[parts[0]] = int(parts[1])
                    except ValueError:
                        pass
    except OSError:
        pass
    return out


class Cgroup:
    """A v1 memory cgroup we create under our own group (never moving anything out of it)."""

    def __init__(self, name, limit=None):
        self.mode, base = memory_cgroup_root()
        if self.mode != "v1":
            raise RuntimeError(f"only cgroup v1 memory is supported by this harness (found {self.mode})")
        self.path = os.path.join(base, name)
        if os.path.isdir(self.path):
            self.remove()
        os.mkdir(self.path)
        if limit is not None:
            with open(os.path.join(self.path, "memory.limit_in_bytes"), "w") as f:
                f.write(str(int(limit)))

    def enter(self):
        """For preexec_fn: move the calling (child) process into this group."""
        with open(os.path.join(self.path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))

    def groups(self):
        out = []
        for dirpath, dirnames, _ in os.walk(self.path):
            out.append(dirpath)
        return out

    def reading(self):
        """Usage, working set and OOM kills of the group and its descendant groups."""
        st = read_kv(os.path.join(self.path, "memory.stat"))
        usage = read_int(os.path.join(self.path, "memory.usage_in_bytes"), 0)
        oom = 0
        per_group = {}
        for g in self.groups():
            o = read_kv(os.path.join(g, "memory.oom_control")).get("oom_kill", 0)
            oom += o
            if g != self.path:
                gs = read_kv(os.path.join(g, "memory.stat"))
                gu = read_int(os.path.join(g, "memory.usage_in_bytes"), 0)
                per_group[os.path.relpath(g, self.path)] = {
                    "usage": gu, "ws": gu - gs.get("total_inactive_file", 0), "oom_kill": o}
        return {"usage": usage, "ws": usage - st.get("total_inactive_file", 0),
                "rss": st.get("total_rss", 0), "cache": st.get("total_cache", 0),
                "max_usage": read_int(os.path.join(self.path, "memory.max_usage_in_bytes"), 0),
                "failcnt": read_int(os.path.join(self.path, "memory.failcnt"), 0),
                "oom_kill": oom, "groups": per_group}

    def pids(self):
        out = []
        for g in self.groups():
            try:
                with open(os.path.join(g, "cgroup.procs")) as f:
                    out.extend(int(x) for x in f.read().split())
            except OSError:
                pass
        return out

    def remove(self, timeout=10.0):
        """Kill what is left inside, then rmdir bottom-up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = []
            for dirpath, _, _ in os.walk(self.path):
                try:
                    with open(os.path.join(dirpath, "cgroup.procs")) as f:
                        pids.extend(int(x) for x in f.read().split())
                except OSError:
                    pass
            for p in pids:
                try:
                    os.kill(p, 9)
                except OSError:
                    pass
            dirs = [d for d, _, _ in os.walk(self.path)]
            for d in sorted(dirs, key=len, reverse=True):
                try:
                    os.rmdir(d)
                except OSError:
                    pass
            if not os.path.isdir(self.path):
                return True
            time.sleep(0.2)
        return False
