//! The Python side of the tests: the `trimrun_worker` package (python/) and the test apps
//! (tests/apps/), and whether python3 can import what they need.

/// The `trimrun_worker` package's directory (for `PYTHONPATH`).
pub fn python_dir() -> String {
    format!("{}/python", env!("CARGO_MANIFEST_DIR"))
}

/// The test apps' directory (Flask, Starlette, the ~100 MiB import, the stuck app).
pub fn apps_dir() -> String {
    format!("{}/tests/apps", env!("CARGO_MANIFEST_DIR"))
}

/// True when python3 can import `modules` (with python/ on its path); else says why (a
/// skip, or a failure under CI).
pub fn have_python_deps(modules: &str) -> bool {
    let ok = std::process::Command::new("python3")
        .args(["-c", &format!("import {modules}")])
        .env("PYTHONPATH", python_dir())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        super::cannot_run(&format!(
            "python3 with {modules} (scripts/install-test-deps.sh installs them)"
        ));
    }
    ok
}

/// A `--ready notify --preload` pool of `n` `trimrun_worker`s serving `app` (module:attr
/// in tests/apps), plus `extra` flags and `env`; returned once all workers are ready.
pub fn preload_pool(
    n: usize,
    app: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> super::pool::Pool {
    let n = n.to_string();
    let mut args = vec!["-n", &n, "--ready", "notify", "--preload"];
    args.extend_from_slice(extra);
    let apps = apps_dir();
    let py = python_dir();
    let mut env = env.to_vec();
    env.push(("PYTHONPATH", &py));
    let pool = super::pool::Pool::start_env(
        &args,
        &["python3", "-m", "trimrun_worker", "--app-dir", &apps, app],
        &env,
    );
    pool.wait_log("all workers ready", std::time::Duration::from_secs(60));
    pool
}
