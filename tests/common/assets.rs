//! Test assets that `scripts/test-env` installs and caches: the Python venv
//! of scripts/test-requirements.txt and the SmolLM2 GGUF. Paths are relative
//! to the repository root, where test binaries run on every machine.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::Command;

/// What `scripts/test-env WHAT` prints: `python`, the venv's python3;
/// `smollm2`, the cached GGUF file.
pub fn test_env(what: &str) -> PathBuf {
    let out = Command::new("bash")
        .arg("scripts/test-env")
        .arg(what)
        .output()
        .expect("running scripts/test-env");
    assert!(
        out.status.success(),
        "scripts/test-env {what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs `scripts/SCRIPT` with `args` in the test venv's python3; returns its
/// stdout, failing the test with its stderr when it fails.
pub fn python_script<S: AsRef<OsStr>>(script: &str, args: impl IntoIterator<Item = S>) -> Vec<u8> {
    let args: Vec<S> = args.into_iter().collect();
    let shown: Vec<_> = args.iter().map(|a| a.as_ref().to_string_lossy()).collect();
    let out = Command::new(test_env("python"))
        .arg(format!("scripts/{script}"))
        .args(&args)
        .output()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        out.status.success(),
        "{script} {shown:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}
