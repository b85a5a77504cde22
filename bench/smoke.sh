#!/usr/bin/env bash
# < 60 s smoke run of the benchmark harness, for CI: 2 workers, gunicorn + trimrun, 200 requests.
# Asserts that the harness wrote its result file and that gunicorn served every request; trimrun
# is run when its binary is found ($TRIMRUN or target/release/trimrun) and reported otherwise.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
[ -x "$here/.venv/bin/python" ] || "$here/setup.sh"
"$here/.venv/bin/python" "$here/test_harness.py"
out="$here/out/smoke"
rm -rf "$out"
mkdir -p "$here/out"
timeout 120 "$here/.venv/bin/python" "$here/run.py" --quick --phases contenders \
    --contenders gunicorn,trimrun --workers 2 --requests 200 --rate 50 --out "$out" >"$out.log" 2>&1 \
    || { tail -30 "$out.log"; exit 1; }
"$here/.venv/bin/python" - "$out/results.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
c = r["contenders"]
g = c["gunicorn"]
assert "not_run" not in g, g
assert g["load"]["ok"] == 200 and g["load"]["failed"] == 0, g["load"]
assert g["mem"]["total_uss_mean_mb"] > 0, g["mem"]
t = c["trimrun"]
if "not_run" in t:
    print("smoke: trimrun not run:", t["not_run"])
else:
    assert t["load"]["failed"] == 0, t["load"]
    print("smoke: trimrun p99 %s ms" % t["load"]["p99_ms"])
print("smoke: ok, gunicorn p99 %s ms; results in %s" % (g["load"]["p99_ms"], sys.argv[1]))
PY
