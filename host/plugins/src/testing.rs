//! Test support shared by every crate whose tests run real guest plugins: build packages of the
//! `plugins/` workspace from source for wasm32-wasip2. Not used by the runtime itself.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The guest target directory: `LORA_PLUGINS_WASM_TARGET` if set (the stage script shares one),
/// else `<cargo target tmp>/plugins-wasm` (callers pass their `CARGO_TARGET_TMPDIR`).
pub fn guest_target_dir(target_tmpdir: &Path) -> PathBuf {
    std::env::var_os("LORA_PLUGINS_WASM_TARGET")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_tmpdir.join("plugins-wasm"))
}

/// Builds `packages` of the guest workspace at `repo/plugins` for wasm32-wasip2 into `target`
/// (one `cargo build -p` each, so the SDK's per-kind features do not unify) and returns the
/// folder holding the `.wasm` files. Calls are serialised within a process; cargo's own lock
/// serialises separate test binaries.
pub fn build_guest_plugins(repo: &Path, target: &Path, packages: &[&str], release: bool) -> Result<PathBuf, String> {
    static LOCK: Mutex<()> = Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    for package in packages {
        let mut cmd = Command::new(&cargo);
        cmd.current_dir(repo.join("plugins"))
            .args(["build", "--quiet", "--target", "wasm32-wasip2", "-p", package])
            .env("CARGO_TARGET_DIR", target)
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS");
        if release {
            cmd.arg("--release");
        }
        let status = cmd.status().map_err(|e| format!("cannot run {cargo} to build guest plugin {package}: {e}"))?;
        if !status.success() {
            return Err(format!("building guest plugin {package} for wasm32-wasip2 failed ({status})"));
        }
    }
    Ok(target.join("wasm32-wasip2").join(if release { "release" } else { "debug" }))
}
