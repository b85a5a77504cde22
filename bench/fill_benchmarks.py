"""Put the tables of a run (results.json/results.md) into BENCHMARKS.md between markers.

    bench/.venv/bin/python bench/fill_benchmarks.py [bench/results]
"""

import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)


def main():
    res_dir = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(BENCH, "results"))
    report = json.load(open(os.path.join(res_dir, "results.json")))
    tables = open(os.path.join(res_dir, "results.md")).read()
    env = report["environment"]
    cfg = report["config"]
    rel = os.path.relpath(res_dir, REPO)
    lines = ["## Results", "",
             f"Run {env.get('date_utc')} UTC on {env.get('nproc')} cores ({env.get('cpu')}), "
             f"{env.get('mem_total_gib')} GiB, kernel {env.get('kernel')}, {env.get('glibc')}, "
             f"Python {env.get('python')}, cgroup v1 memory controller.",
             f"Versions: " + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()) +
             f"; trimrun: {env.get('trimrun')}, built from {env.get('trimrun_source')}.",
             f"Load average (1/5/15 min) at start {env.get('loadavg_start')}, at end {env.get('loadavg_end')}.",
             "", "Command: `" + " ".join(["bench/.venv/bin/python", "bench/run.py"] +
                                         report.get("argv", ["--quick"] if cfg.get("quick") else [])) + "`"
             + (" with `TRIMRUN=" + str(env["trimrun"]["path"]) + "`" if isinstance(env.get("trimrun"), dict) else ""),
             ""]
    lines.append(tables)
    for p in report.get("plots", []):
        lines.append(f"![{os.path.basename(p)}]({rel}/{p})\n")
    text = "\n".join(lines)
    path = os.path.join(REPO, "BENCHMARKS.md")
    doc = open(path).read()
    start, end = "<!-- RESULTS -->", "<!-- /RESULTS -->"
    if start in doc:
        head = doc.split(start)[0]
        tail = doc.split(end)[1] if end in doc else ""
        doc = head + start + "\n" + text + "\n" + end + tail
    else:
        doc += "\n" + start + "\n" + text + "\n" + end + "\n"
    open(path, "w").write(doc)
    print(f"BENCHMARKS.md: results from {rel}")


if __name__ == "__main__":
    main()
