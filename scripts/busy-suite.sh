#!/bin/sh
# Run the whole test suite (the README's `cargo test`) several times in a row while
# stress-ng keeps every core busy, as issue 12 asks: the suite must hold on a shared,
# loaded machine. Prints each run's result and duration; exits 1 if any run failed.
#
#   scripts/busy-suite.sh [RUNS] [STRESS-NG ARGS...]     default: 3 --cpu 2
#
# Logs go to target/busy-suite/run-N.log. Installs stress-ng (Debian) if missing.
set -eu
# As in CI: a test that cannot run fails instead of skipping, so every run tests everything.
export CI="${CI:-true}"
cd "$(dirname "$0")/.."
runs=${1:-3}
[ $# -gt 0 ] && shift
[ $# -gt 0 ] || set -- --cpu 2
if ! command -v stress-ng >/dev/null 2>&1; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "busy-suite: stress-ng is missing and installing it needs root" >&2
        exit 2
    fi
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends stress-ng
fi
mkdir -p target/busy-suite
cargo test --no-run >/dev/null 2>&1 || cargo test --no-run
stress-ng "$@" --timeout 0 >/dev/null 2>&1 &
stress=$!
trap 'kill "$stress" 2>/dev/null; wait "$stress" 2>/dev/null || true' EXIT INT TERM
failed=0
i=1
while [ "$i" -le "$runs" ]; do
    log="target/busy-suite/run-$i.log"
    start=$(date +%s)
    if cargo test --no-fail-fast >"$log" 2>&1; then rc=0; else rc=$?; failed=1; fi
    end=$(date +%s)
    passed=$(grep -o '[0-9]* passed' "$log" | awk '{s+=$1} END {print s+0}')
    fails=$(grep -o '[0-9]* failed;' "$log" | awk '{s+=$1} END {print s+0}')
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    echo "run $i: exit $rc, $passed passed, $fails failed, $((end - start)) s, load $load (stress-ng $*)"
    [ "$rc" -eq 0 ] || grep -E '^test .* FAILED$|panicked at' "$log" | head -20
    i=$((i + 1))
done
exit "$failed"
