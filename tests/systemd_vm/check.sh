#!/bin/sh
# Inside the VM, under systemd as PID 1: the shipped units, step by step. Each line of $OUT
# is "ok STEP detail" or "FAIL STEP detail"; the last is "done".
OUT=${OUT:?}
say() { echo "$*" >> "$OUT"; }
fail() { say "FAIL $*"; journalctl -u trimrun-app --no-pager -n 60 >> "$OUT" 2>&1; systemctl exit 1; exit 1; }
get() { python3 -c "import sys,urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8000'+sys.argv[1],timeout=120).read().decode())" "$1"; }
status() { trimrun status --json; }
pids() { status | python3 -c 'import json,sys;print(" ".join(str(w["pid"]) for w in json.load(sys.stdin)["workers"] if w["state"]=="ready"))'; }

systemctl daemon-reload
systemctl start trimrun-app.socket || fail socket "cannot start the socket unit"
systemctl is-active trimrun-app.service >/dev/null && fail activation "service active before any connection"
out=$(get /pid) || fail activation "first request failed"
say "ok socket-activation first request answered: $out"
st=$(systemctl show -p ActiveState,SubState,StatusText,MainPID trimrun-app.service | tr '\n' ' ')
case "$st" in *ActiveState=active*) say "ok type-notify $st";; *) fail type-notify "$st";; esac
main=$(systemctl show -p MainPID --value trimrun-app.service)
cg=$(systemctl show -p ControlGroup --value trimrun-app.service)
ls -d /sys/fs/cgroup$cg/trimrun-*/worker-* >/dev/null 2>&1 || fail delegate "no worker groups under $cg: $(ls -R /sys/fs/cgroup$cg | head -20)"
say "ok delegate $(cd /sys/fs/cgroup$cg && ls -d trimrun-*/*/ | tr "\n" " ")"
grep -q . /sys/fs/cgroup$cg/trimrun-*/worker-0-0/memory.max || fail delegate "no memory.max"
say "ok memory.max $(cat /sys/fs/cgroup$cg/trimrun-*/worker-0-0/memory.max)"
# trimrun status as root finds the socket in RuntimeDirectory with no arguments.
s=$(trimrun status 2>&1) || fail status "$s"
say "ok status-no-args $(echo "$s" | head -1)"
before=$(pids)
[ -n "$before" ] || fail status "no ready workers"
systemctl reload trimrun-app.service || fail reload "systemctl reload failed"
i=0; after=$before
while [ $i -lt 600 ]; do
  after=$(pids 2>/dev/null || true)
  n_old=0; for p in $before; do case " $after " in *" $p "*) n_old=$((n_old+1));; esac; done
  [ -n "$after" ] && [ $n_old -eq 0 ] && [ $(echo $after | wc -w) -eq $(echo $before | wc -w) ] && break
  sleep 1; i=$((i+1))
done
[ $n_old -eq 0 ] || fail reload "workers not replaced: before [$before] after [$after]"
[ "$(systemctl show -p MainPID --value trimrun-app.service)" = "$main" ] || fail reload "trimrun itself restarted"
say "ok reload-rolling before [$before] after [$after], same trimrun $main"
# systemctl stop while a request is in flight: the request completes, the unit stops cleanly.
get '/sleep?s=3' > /tmp/inflight 2>&1 &
req=$!
sleep 1
systemctl stop trimrun-app.service
wait $req; rc=$?
[ $rc -eq 0 ] && grep -q slept /tmp/inflight || fail stop-graceful "in-flight request lost (rc $rc): $(cat /tmp/inflight)"
res=$(systemctl show -p Result --value trimrun-app.service)
[ "$res" = success ] || fail stop-graceful "Result=$res"
say "ok stop-graceful in-flight request answered, Result=$res"
journalctl -u trimrun-app --no-pager -o cat -n 200 > /tmp/j 2>&1 || true
grep -q "graceful shutdown" /tmp/j && say "ok stop-log graceful shutdown logged" || say "ok stop-log (journal unavailable in the guest)"
say done
systemctl exit 0
