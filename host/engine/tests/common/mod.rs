//! Shared helpers of the engine's integration tests: golden-file reading and tolerant compare.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn golden_dir() -> PathBuf {
    repo_root().join("tests/engine/golden")
}

/// A golden tensor as f64 values (ints converted) with its shape.
pub struct GTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

pub fn read_safetensors(path: &Path) -> HashMap<String, GTensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        let b = view.data();
        let data: Vec<f64> = match view.dtype() {
            Dtype::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::I64 => b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
            Dtype::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
            d => panic!("{name}: unexpected dtype {d:?}"),
        };
        out.insert(name, GTensor { shape: view.shape().to_vec(), data });
    }
    out
}

/// Compares element-wise with `|got - want| <= atol + |want| * rtol`; on failure returns a
/// message with the max error and the first mismatches.
pub fn compare(what: &str, got: &[f32], want: &[f64], atol: f64, rtol: f64) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("{what}: {} values, expected {}", got.len(), want.len()));
    }
    let mut max_err = 0f64;
    let mut bad = Vec::new();
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let e = (g as f64 - w).abs();
        if e.is_nan() || e > atol + w.abs() * rtol {
            if bad.len() < 5 {
                bad.push(format!("[{i}] got {g} want {w} (err {e:.3e})"));
            }
            max_err = max_err.max(if e.is_nan() { f64::INFINITY } else { e });
        } else {
            max_err = max_err.max(e);
        }
    }
    if bad.is_empty() {
        Ok(max_err)
    } else {
        Err(format!("{what}: max error {max_err:.3e} (atol {atol:e}, rtol {rtol:e}); first mismatches: {}", bad.join(", ")))
    }
}
