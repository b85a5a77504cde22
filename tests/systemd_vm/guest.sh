#!/bin/sh
# Runs inside the cgroup v2 VM (tests/systemd_vm.rs, ../shared/vm/in-v2-vm.sh): installs
# examples/systemd/ as shipped, then boots systemd as PID 1 of a new PID, mount and cgroup
# namespace (a container, as systemd-nspawn makes one) with check.sh as its only job.
# check.sh reports to $OUT and ends systemd with `systemctl exit CODE`.
set -eu
SRC="$1"; BIN="$2"; OUT="$3"
install -D -m 0755 "$BIN" /usr/local/bin/trimrun
install -D -m 0644 "$SRC/examples/app.py" /srv/app/app.py
install -m 0644 "$SRC/examples/systemd/trimrun-app.service" "$SRC/examples/systemd/trimrun-app.socket" /etc/systemd/system/
install -m 0755 "$SRC/tests/systemd_vm/check.sh" /usr/local/bin/trimrun-check
cat > /etc/systemd/system/trimrun-check.service <<UNIT
[Unit]
Description=Exercise the shipped trimrun units
After=basic.target
[Service]
Type=oneshot
Environment=OUT=$OUT
ExecStart=/usr/local/bin/trimrun-check
UNIT
id www-data >/dev/null
# The guest root is the host's, read-only, with a writable layer: machine-id for systemd.
[ -s /etc/machine-id ] || systemd-machine-id-setup >/dev/null 2>&1 || true
exec unshare --pid --fork --mount --cgroup --mount-proc \
    env container=trimrun-test /lib/systemd/systemd --system \
    --unit=trimrun-check.service --log-target=console --log-level=warning --show-status=false
