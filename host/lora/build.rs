//! Stamps the commit the binary is built from into `LORA_BUILD_COMMIT` (the run manifest names
//! it next to the version): `LORA_BUILD_COMMIT` from the environment when set (an image build
//! without `.git`), else `git rev-parse HEAD` of the source tree (`-dirty` with uncommitted
//! changes), else `unknown`.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn main() {
    println!("cargo:rerun-if-env-changed=LORA_BUILD_COMMIT");
    let commit = std::env::var("LORA_BUILD_COMMIT").ok().filter(|c| !c.is_empty()).or_else(|| {
        let head = git(&["rev-parse", "HEAD"]).filter(|h| !h.is_empty())?;
        let dirty = git(&["status", "--porcelain", "--untracked-files=no"]).is_some_and(|s| !s.is_empty());
        Some(if dirty { format!("{head}-dirty") } else { head })
    });
    println!("cargo:rustc-env=LORA_BUILD_COMMIT={}", commit.unwrap_or_else(|| "unknown".into()));
    // A new commit (or checkout) rebuilds the stamp.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        println!("cargo:rerun-if-changed={dir}/index");
    }
    println!("cargo:rerun-if-changed=src");
}
