//! `examples/kubernetes/deployment.yaml` as a pod would run it, without Kubernetes: the
//! container's exact command and environment, as uid 10001 with no capabilities and no new
//! privileges, on a read-only root (an overlay of the host's, remounted read-only), a
//! read-only cgroupfs, the `emptyDir` as a tmpfs at `/run/trimrun`, its own network
//! namespace (so the manifest's ports are free), and a 1 GiB memory limit on its parent
//! cgroup (the container's limit). Everything is in a private mount namespace made by
//! `unshare`: nothing outside changes. Checks that `--limit auto` divides the parent's
//! limit, that `--cgroup auto` falls back to `none` and says why, and that
//! `kubectl exec ... trimrun status` (the same environment, entered with `nsenter`) finds
//! the pool.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::wait_for;
use trimrun::status::Snapshot;

const BIN: &str = env!("CARGO_BIN_EXE_trimrun");
const POD_UID: &str = "10001";
const POD_LIMIT: u64 = 1 << 30;

/// The `command:` list and the `env:` of the container in the manifest.
fn manifest() -> (Vec<String>, Vec<(String, String)>) {
    let text = std::fs::read_to_string(format!(
        "{}/examples/kubernetes/deployment.yaml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let unquote = |s: &str| s.trim().trim_matches('"').to_string();
    let mut cmd = vec![];
    let mut env = vec![];
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let t = l.trim();
        if t == "command:" {
            while let Some(n) = lines.peek() {
                let Some(item) = n.trim().strip_prefix("- ") else {
                    break;
                };
                cmd.push(unquote(item.split(" #").next().unwrap()));
                lines.next();
            }
        } else if t == "env:" {
            while let Some(n) = lines.peek() {
                let n = n.trim();
                if let Some(name) = n.strip_prefix("- name: ") {
                    let name = unquote(name);
                    lines.next();
                    let v = lines.next().unwrap().trim();
                    let v = v.strip_prefix("value: ").expect("value after name");
                    env.push((name, unquote(v)));
                } else if n.starts_with('#') {
                    lines.next();
                } else {
                    break;
                }
            }
        }
    }
    assert!(cmd.len() > 5, "no command in the manifest: {cmd:?}");
    (cmd, env)
}

/// Our own v1 memory cgroup directory (where the machine put this test).
fn own_memory_cgroup() -> Option<PathBuf> {
    let cg = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in cg.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctrl, path) = (parts.next()?, parts.next()?, parts.next()?);
        if ctrl.split(',').any(|c| c == "memory") {
            let dir = Path::new("/sys/fs/cgroup/memory").join(path.trim_start_matches('/'));
            return dir.join("memory.limit_in_bytes").exists().then_some(dir);
        }
    }
    None
}

/// Enter the pod (mount and network namespaces, its root, its user) and run `args`.
fn in_pod(pid: i32, env: &[(String, String)], args: &[&str]) -> std::process::Output {
    let mut c = Command::new("nsenter");
    c.args(["-t", &pid.to_string(), "-m", "-n", "-r", "-w", "--"])
        .args(["setpriv", "--reuid", POD_UID, "--regid", POD_UID])
        .args(["--clear-groups", "--no-new-privs", "env", "-i"])
        .arg("PATH=/usr/local/bin:/usr/bin:/bin");
    for (k, v) in env {
        c.arg(format!("{k}={v}"));
    }
    c.args(args).output().unwrap()
}

/// Bring the pod's loopback up and set its world up; `exec`s the container's command.
const POD_SCRIPT: &str = r#"set -eu
echo $$ > "$POD_CGROUP/cgroup.procs"
ip link set lo up
R="$POD_WORK/root"; U="$POD_WORK/upper"
mkdir -p "$R" "$U"
mount -t tmpfs tmpfs "$U"
mkdir "$U/up" "$U/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$U/up,workdir=$U/work" "$R"
mkdir -p "$R/app" "$R/run/trimrun" "$R/usr/local/bin"
cp "$POD_APP" "$R/app/app.py"
cp "$POD_BIN" "$R/usr/local/bin/trimrun"
for d in proc dev sys; do mount --rbind "/$d" "$R/$d"; done
# The pod's cgroupfs is read-only: this namespace's bind copies only.
for m in $(awk -v r="$R/sys/fs/cgroup" 'index($5, r) == 1 {print $5}' /proc/self/mountinfo); do
    mount -o remount,bind,ro "$m"
done
# The emptyDir (kubelet makes it 0777).
mount -t tmpfs -o mode=0777 tmpfs "$R/run/trimrun"
# readOnlyRootFilesystem
mount -o remount,ro "$R"
cd "$R"
exec chroot "$R" setpriv --reuid "$POD_UID" --regid "$POD_UID" --clear-groups --no-new-privs \
    --inh-caps=-all --bounding-set=-all env -i "$@"
"#;

#[test]
fn the_kubernetes_example_runs_as_shipped_in_a_read_only_unprivileged_pod() {
    if !common::is_root() {
        common::cannot_run("root (to build the pod's namespaces)");
        return;
    }
    for tool in ["unshare", "nsenter", "setpriv", "chroot", "ip", "python3"] {
        if !Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
        {
            common::cannot_run(&format!("{tool} (util-linux, iproute2, python3)"));
            return;
        }
    }
    let Some(own) = own_memory_cgroup() else {
        common::cannot_run("a v1 memory cgroup of our own (for the pod's memory limit)");
        return;
    };
    let parent = own.join(format!("k8s-pod-{}", std::process::id()));
    std::fs::create_dir(&parent).unwrap();
    struct Rm(PathBuf);
    impl Drop for Rm {
        fn drop(&mut self) {
            // Groups trimrun made inside (none expected: its backend is `none`) go first.
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _rm = Rm(parent.clone());
    std::fs::write(parent.join("memory.limit_in_bytes"), POD_LIMIT.to_string()).unwrap();

    let (cmd, env) = manifest();
    let work = tempfile::tempdir().unwrap();
    let log_path = work.path().join("pod.log");
    let mut c = Command::new("unshare");
    c.args(["--mount", "--net", "--propagation", "private", "--"])
        .args(["sh", "-c", POD_SCRIPT, "pod"])
        .env("POD_CGROUP", &parent)
        .env("POD_WORK", work.path())
        .env("POD_APP", common::example("app.py"))
        .env("POD_BIN", BIN)
        .env("POD_UID", POD_UID)
        .arg("PATH=/usr/local/bin:/usr/bin:/bin");
    for (k, v) in &env {
        c.arg(format!("{k}={v}"));
    }
    c.args(&cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap());
    let mut pod = c.spawn().unwrap();
    let pid = pod.id() as i32; // unshare execs sh, which execs chroot, setpriv, env, trimrun
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();

    let ready = wait_for(Duration::from_secs(60), || {
        if let Ok(Some(st)) = pod.try_wait() {
            panic!("the pod's trimrun exited ({st}):\n{}", log());
        }
        let out = in_pod(pid, &env, &["trimrun", "status", "--json"]);
        let s: Snapshot = serde_json::from_slice(&out.stdout).ok()?;
        (s.state == "running" && s.workers.iter().filter(|w| w.state == "ready").count() == 4)
            .then_some(s)
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let s = ready.unwrap_or_else(|| panic!("the pod never got 4 ready workers:\n{}", log()));
        let text = log();
        // The none fallback, with its reason.
        assert_eq!(s.backend, "none", "{text}");
        assert!(text.contains("cgroup backend chosen"), "{text}");
        // --limit auto divided the parent's 1 GiB limit, not the host's memory.
        let per = s.workers[0]
            .limit
            .expect("--limit auto gives each worker a limit");
        let expect =
            trimrun::cgroup::auto_limit(POD_LIMIT, 4, trimrun::cgroup::default_reserve(POD_LIMIT))
                .unwrap();
        assert_eq!(per, expect, "{text}");
        assert!(text.contains("1 GiB allowed by "), "{text}");
        // It runs as the pod's user and serves on the manifest's port.
        let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid)).unwrap();
        assert!(
            status
                .lines()
                .any(|l| l.starts_with("Uid:") && l.contains(POD_UID)),
            "{status}"
        );
        let get = in_pod(
            pid,
            &env,
            &[
                "python3",
                "-c",
                "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:8000/pid').read().decode())",
            ],
        );
        assert!(get.status.success(), "{get:?}");
        // The table too, as `kubectl exec deploy/webapp -- trimrun status` shows it.
        let table = in_pod(pid, &env, &["trimrun", "status"]);
        let t = String::from_utf8_lossy(&table.stdout);
        assert!(table.status.success() && t.contains("none"), "{table:?}");
        // kubectl's SIGTERM: a graceful stop, exit 0.
        let stop = in_pod(pid, &env, &["trimrun", "ctl", "stop"]);
        assert!(stop.status.success(), "{stop:?}");
        let code = wait_for(Duration::from_secs(30), || pod.try_wait().unwrap());
        assert_eq!(code.and_then(|c| c.code()), Some(0), "{}", log());
    }));
    if pod.try_wait().unwrap().is_none() {
        let _ = pod.kill();
        let _ = pod.wait();
    }
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
