#!/bin/sh
# Install what ../shared/vm/in-v2-vm.sh needs to boot a throw-away cgroup v2 VM (used by
# tests/cgroup_v2.rs). Idempotent: installs only the packages that are missing.
# Debian 12 (bookworm), as root. NOT linux-image-cloud-amd64 (it lacks 9p).
set -eu
PKGS="qemu-system-x86 linux-image-amd64 busybox-static cpio kmod"
missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -z "$missing" ]; then
    echo "install-vm-deps: all present ($PKGS)"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-vm-deps: need root to install:$missing" >&2
    exit 1
fi
echo "install-vm-deps: installing$missing"
apt-get update
# shellcheck disable=SC2086
DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing
