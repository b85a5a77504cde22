//! Running a test binary's `inner_*` tests on a real cgroup v2 kernel: boot one throw-away
//! QEMU VM (`../shared/vm/in-v2-vm.sh`) and run this same test binary in it with
//! `TRIMRUN_IN_VM=1`. The `inner_*` tests are `#[ignore]`d (a plain run lists them as
//! ignored, not as passed); the VM run selects them with `--ignored`. Skips without root, the script, qemu or a kernel image; under
//! CI=true those are failures.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// True inside the VM, where the `inner_*` tests run.
pub fn in_vm() -> bool {
    std::env::var("TRIMRUN_IN_VM").is_ok_and(|v| v == "1")
}

/// Boot the VM, run `inner` (exact test names) of the current test binary in it, and
/// assert they all passed.
pub fn run_inner_tests(inner: &[&str], timeout_secs: u64) {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/vm/in-v2-vm.sh");
    if !script.exists() {
        super::cannot_run(&format!("the VM script {}", script.display()));
        return;
    }
    if !super::is_root() {
        super::cannot_run("root (the VM script reads /boot and /lib/modules)");
        return;
    }
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok();
    let have_kernel = std::fs::read_dir("/boot")
        .map(|d| {
            d.filter_map(Result::ok)
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false);
    if !have_qemu || !have_kernel {
        super::cannot_run("qemu-system-x86 and linux-image-amd64 (scripts/install-vm-deps.sh)");
        return;
    }
    let started = Instant::now();
    let out = Command::new(&script)
        .arg(std::env::current_exe().unwrap())
        .args(["--test-threads=1", "--nocapture", "--exact", "--ignored"])
        .args(inner)
        .env("TRIMRUN_IN_VM", "1")
        .env("VM_RW", "")
        .env("VM_TIMEOUT", timeout_secs.to_string())
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let text = format!(
        "--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("VM run took {:.1} s", started.elapsed().as_secs_f64());
    if out.status.code() == Some(125) {
        super::cannot_run(&format!("a VM that boots (in-v2-vm.sh exited 125)\n{text}"));
        return;
    }
    assert!(
        out.status.success(),
        "inner tests failed in the VM: {:?}\n{text}",
        out.status
    );
    let want = format!("test result: ok. {} passed", inner.len());
    assert!(text.contains(&want), "expected {want:?}\n{text}");
    println!("{text}");
}
