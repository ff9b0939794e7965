//! NVRTC: compiles the kernel families to PTX for one compute capability, with a disk cache
//! keyed by a hash of (source, architecture, options, NVRTC version).
//!
//! Include path for `cuda_bf16.h`: `LORA_CUDA_INCLUDE`, else `$CUDA_HOME/include`, else
//! `/usr/local/cuda/include`. Cache: `LORA_KERNEL_CACHE`, else `$XDG_CACHE_HOME/lora/kernels`,
//! else `~/.cache/lora/kernels`. A cache that cannot be written is skipped (compiling is only
//! slower); a cache entry that cannot be read is recompiled.

use std::path::{Path, PathBuf};

use cudarc::nvrtc::{CompileOptions, Ptx, compile_ptx_with_opts};

use super::kernels::{FAMILIES, Family, full_source};
use crate::error::{EngineError, Result};

fn err(op: &'static str, msg: impl Into<String>) -> EngineError {
    EngineError::Backend { backend: "cuda", op, msg: msg.into() }
}

/// Fails with a clear error (instead of cudarc's panic) when libnvrtc cannot be loaded.
pub fn ensure_nvrtc() -> Result<()> {
    // SAFETY: only tries to dlopen the library by its candidate names; no symbol is called.
    if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(err(
            "nvrtc",
            "no NVRTC library found (libnvrtc.so / libnvrtc.so.13): install the CUDA toolkit's NVRTC \
             (or the `nvidia-cuda-nvrtc` wheel) and put its lib folder on LD_LIBRARY_PATH",
        ))
    }
}

/// The NVRTC version as (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    status.result().map_err(|e| err("nvrtc", format!("nvrtcVersion failed: {e:?}")))?;
    Ok((major, minor))
}

/// The folder holding `cuda_bf16.h`, or an error naming the places tried.
pub fn include_dir() -> Result<PathBuf> {
    let mut tried = Vec::new();
    let mut candidates = Vec::new();
    if let Some(p) = std::env::var_os("LORA_CUDA_INCLUDE") {
        candidates.push(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("CUDA_HOME") {
        candidates.push(PathBuf::from(p).join("include"));
    }
    candidates.push(PathBuf::from("/usr/local/cuda/include"));
    for c in candidates {
        if c.join("cuda_bf16.h").is_file() {
            return Ok(c);
        }
        tried.push(c.display().to_string());
    }
    Err(err(
        "nvrtc",
        format!(
            "CUDA headers not found (no cuda_bf16.h in {}): set LORA_CUDA_INCLUDE or CUDA_HOME",
            tried.join(", ")
        ),
    ))
}

fn cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("LORA_KERNEL_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(p).join("lora/kernels"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/lora/kernels"))
}

/// FNV-1a, 64 bits, from a given offset basis (two bases give a 128-bit key).
fn fnv1a(basis: u64, bytes: &[u8]) -> u64 {
    let mut h = basis;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01B3);
    }
    h
}

fn cache_key(source: &str, options: &[String], version: (i32, i32)) -> String {
    let mut text = String::with_capacity(source.len() + 128);
    text.push_str(source);
    for o in options {
        text.push('\0');
        text.push_str(o);
    }
    text.push_str(&format!("\0nvrtc {}.{}", version.0, version.1));
    let a = fnv1a(0xCBF2_9CE4_8422_2325, text.as_bytes());
    let b = fnv1a(0x6C62_272E_07BB_0142, text.as_bytes());
    format!("{a:016x}{b:016x}")
}

/// Compiles one family to PTX for `compute_<cc>` (e.g. `"90"`), through the disk cache when
/// `use_cache`. Returns the PTX text.
pub fn compile_family(f: &Family, cc: &str, include: &Path, use_cache: bool) -> Result<String> {
    let version = nvrtc_version()?;
    let options = vec![
        format!("--gpu-architecture=compute_{cc}"),
        "--std=c++17".to_string(),
        "--fmad=true".to_string(),
    ];
    let source = full_source(f);
    let key = cache_key(&source, &options, version);
    let cached = if use_cache { cache_dir().map(|d| d.join(format!("{key}.ptx"))) } else { None };
    if let Some(Ok(ptx)) = cached.as_ref().map(std::fs::read_to_string) {
        return Ok(ptx);
    }
    let opts = CompileOptions {
        options: options.clone(),
        include_paths: vec![include.display().to_string()],
        name: Some(f.file.to_string()),
        ..Default::default()
    };
    let ptx = compile_ptx_with_opts(&source, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => err(
            "nvrtc",
            format!("{} does not compile for compute_{cc}:\n{}", f.file, log.to_string_lossy()),
        ),
        other => err("nvrtc", format!("{}: {other:?}", f.file)),
    })?;
    let text = ptx.to_src();
    if let Some(path) = cached {
        store(&path, &text);
    }
    Ok(text)
}

/// Best effort: write to a temp file, then rename, so a reader never sees half a PTX.
fn store(path: &Path, text: &str) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, text).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// PTX loaded into a module.
pub fn to_ptx(text: String) -> Ptx {
    Ptx::from_src(text)
}

/// One family's result in [`compile_all`].
#[derive(Debug, Clone)]
pub struct Compiled {
    pub file: &'static str,
    pub kernels: usize,
    pub ptx_bytes: usize,
}

/// Compiles every family for `compute_<cc>` without touching a GPU or the cache: the CI check
/// that every `.cu` source is valid. Fails on the first family that does not compile, and
/// checks that every kernel a family declares appears in its PTX.
pub fn compile_all(cc: &str) -> Result<Vec<Compiled>> {
    let include = include_dir()?;
    let mut out = Vec::new();
    for f in FAMILIES {
        let ptx = compile_family(f, cc, &include, false)?;
        for k in f.kernels {
            if !ptx.contains(&format!(".entry {k}(")) {
                return Err(err("nvrtc", format!("{}: kernel `{k}` is missing from the PTX", f.file)));
            }
        }
        out.push(Compiled { file: f.file, kernels: f.kernels.len(), ptx_bytes: ptx.len() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    // These need libnvrtc and the CUDA headers (tests/ci.d/50-nvrtc.sh sets both up from PyPI
    // wheels), so they are ignored by a plain `cargo test`; that stage runs them with --ignored.

    /// Every kernel family compiles for Hopper (sm_90) and exports every kernel it declares.
    #[test]
    #[ignore = "needs NVRTC and CUDA headers: run by tests/ci.d/50-nvrtc.sh"]
    fn every_kernel_family_compiles_for_sm90() {
        let compiled = compile_all("90").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(compiled.len(), FAMILIES.len());
        let kernels: usize = compiled.iter().map(|c| c.kernels).sum();
        for c in &compiled {
            println!("{:<18} {:>2} kernels {:>7} bytes of PTX", c.file, c.kernels, c.ptx_bytes);
        }
        println!("{} families, {kernels} kernels compiled for compute_90", compiled.len());
        assert!(compiled.iter().all(|c| c.ptx_bytes > 0));
    }

    /// A syntax error is reported as an error naming the file and carrying NVRTC's log.
    #[test]
    #[ignore = "needs NVRTC and CUDA headers: run by tests/ci.d/50-nvrtc.sh"]
    fn a_syntax_error_names_the_file() {
        let broken = Family {
            file: "broken.cu",
            source: "extern \"C\" __global__ void broken_f32(float* x) { x[0] = undefined_name; }",
            kernels: &["broken_f32"],
        };
        let e = compile_family(&broken, "90", &include_dir().unwrap(), false).unwrap_err().to_string();
        assert!(e.contains("broken.cu does not compile for compute_90"), "{e}");
        assert!(e.contains("undefined_name"), "{e}");
    }

    #[test]
    fn cache_key_depends_on_source_options_and_version() {
        let o = vec!["--gpu-architecture=compute_90".to_string()];
        let k = cache_key("a", &o, (13, 0));
        assert_eq!(k.len(), 32);
        assert_eq!(k, cache_key("a", &o, (13, 0)));
        assert_ne!(k, cache_key("b", &o, (13, 0)));
        assert_ne!(k, cache_key("a", &["--gpu-architecture=compute_80".to_string()], (13, 0)));
        assert_ne!(k, cache_key("a", &o, (13, 1)));
    }
}
