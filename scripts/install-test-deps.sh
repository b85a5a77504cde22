#!/bin/sh
# Install what the test suite needs beyond Rust and Python 3 (Debian 12, as root):
#   promtool (prometheus)          checks the /metrics output (tests/status_*.rs)
#   systemd-socket-activate        socket activation of trimrun itself (tests/pool.rs)
#   unshare (util-linux)           PID 1 and read-only cgroupfs namespaces
#   unshare, nsenter, setpriv (util-linux), ip (iproute2)
#                                  the Kubernetes pod of tests/k8s_pod.rs
#   systemd                        systemd as PID 1 in the VM (tests/systemd_vm.rs)
#   qemu + a stock kernel          the cgroup v2 VM (scripts/install-vm-deps.sh)
#   Flask, Starlette, waitress, uvicorn, gunicorn (pip, pinned in tests/apps/requirements.txt)
#                                  the Python worker tests (tests/python_worker.rs)
# Idempotent: installs only what is missing.
set -eu
here=$(dirname "$0")
PKGS="prometheus systemd util-linux iproute2"
missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "install-test-deps: need root to install:$missing" >&2
        exit 1
    fi
    echo "install-test-deps: installing$missing"
    apt-get update
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
else
    echo "install-test-deps: all present ($PKGS)"
fi
# Python packages for python3 (the interpreter the tests run). pip skips what is already
# installed at the pinned version. PIP_BREAK_SYSTEM_PACKAGES: Debian's own python3 refuses
# pip installs otherwise (PEP 668); a test machine is what these packages are for.
reqs="$here/../tests/apps/requirements.txt"
if python3 - "$reqs" <<'PY'
import sys
from importlib import metadata
for line in open(sys.argv[1]):
    line = line.split("#")[0].strip()
    if not line:
        continue
    name, _, version = line.partition("==")
    try:
        if metadata.version(name) != version:
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
PY
then
    echo "install-test-deps: python packages present ($(grep -c '==' "$reqs") pinned)"
else
    if ! python3 -m pip --version >/dev/null 2>&1; then
        [ "$(id -u)" -eq 0 ] || { echo "install-test-deps: need root to install python3-pip" >&2; exit 1; }
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-pip
    fi
    echo "install-test-deps: pip installing $reqs"
    PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --disable-pip-version-check -r "$reqs"
fi
exec "$here/install-vm-deps.sh"
