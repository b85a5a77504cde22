#!/bin/sh
# Install what the test suite needs beyond Rust and Python 3 (Debian 12, as root):
#   promtool (prometheus)          checks the /metrics output (tests/status_*.rs)
#   systemd-socket-activate        socket activation of trimrun itself (tests/pool.rs)
#   unshare (util-linux)           PID 1 and read-only cgroupfs namespaces
#   qemu + a stock kernel          the cgroup v2 VM (scripts/install-vm-deps.sh)
# Idempotent: installs only what is missing.
set -eu
here=$(dirname "$0")
PKGS="prometheus systemd util-linux"
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
exec "$here/install-vm-deps.sh"
