//! The CPU backend: the readable fp32 reference every other backend is checked against.
//!
//! Everything is f32 (base weights are converted to f32 at upload; bf16/f16 files are exact in
//! f32). Parallel with rayon, and **bit-identical across thread counts**: every parallel split
//! depends only on the shapes (fixed block sizes), reductions are summed per fixed chunk and then
//! in chunk order, and no reduction dimension of a matrix product is split (see `gemm`).
//! `tests/determinism.rs` checks this by running a training step on 1 and 2 threads.

mod attention;
mod attention_flash;
mod gemm;

use rayon::prelude::*;

pub use attention_flash::{FLASH_BM, FLASH_BN, FLASH_HEAD_DIMS};
pub use gemm::{View, sgemm, sgemm_strided};

use crate::backend::{
    AdamW, Attn, Backend, Buf, CrossEntropy, DType, Device, Gemm, HostData, IGNORE_TARGET, check_len,
    dropout_keep,
};
use crate::error::{EngineError, Result};

/// Storage of a CPU buffer.
enum Store {
    F32(Vec<f32>),
    U32(Vec<u32>),
}

/// Elements per fixed reduction chunk.
const RED_CHUNK: usize = 1 << 14;
/// Largest logits chunk of the fused cross-entropy, in elements (32 MiB of f32).
const CE_CHUNK_ELEMS: usize = 1 << 23;

/// The CPU backend (stateless; threads come from rayon's global pool).
///
/// [`CpuBackend::cuda_numerics`] is the same backend rounding to bf16 exactly where the CUDA
/// backend stores bf16, the oracle a GPU (or the emulated CUDA backend) is held to within about
/// 1e-3: base weights are bf16 buffers (their values are bf16 already); the f32 operand of a
/// matrix product with a bf16 one is rounded to bf16 first (`gemm`'s mixed case); the fused
/// cross-entropy rounds its hidden rows, an f32 `w`, and the logit gradients to bf16 before the
/// products that use them; a copy or fill into a bf16 buffer rounds; dequantized bf16 compute
/// goes to bf16 buffers; attention at the flash kernels' head dims rounds as they do
/// (`attention_flash.rs`). Everything else stays f32, as on the GPU.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuBackend {
    cuda_numerics: bool,
}

/// Rounds to the nearest bf16 (ties to even), as `__float2bfloat16` does.
fn rb(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// How a value is stored into a buffer of `dtype`: rounded for bf16 (only the CUDA-numerics
/// oracle has bf16 activation buffers), unchanged otherwise.
fn rounding(dtype: DType) -> fn(f32) -> f32 {
    if dtype == DType::BF16 { rb } else { |x| x }
}

fn f32s<'a>(op: &'static str, b: &'a Buf) -> Result<&'a [f32]> {
    match b.store::<Store>() {
        Some(Store::F32(v)) => Ok(v),
        Some(Store::U32(_)) => Err(EngineError::Backend { backend: "cpu", op, msg: "expected a float buffer, got U32".into() }),
        None => Err(EngineError::Backend { backend: "cpu", op, msg: "buffer belongs to another backend".into() }),
    }
}

fn f32s_mut<'a>(op: &'static str, b: &'a mut Buf) -> Result<&'a mut [f32]> {
    match b.store_mut::<Store>() {
        Some(Store::F32(v)) => Ok(v),
        Some(Store::U32(_)) => Err(EngineError::Backend { backend: "cpu", op, msg: "expected a float buffer, got U32".into() }),
        None => Err(EngineError::Backend { backend: "cpu", op, msg: "buffer belongs to another backend".into() }),
    }
}

fn u32s<'a>(op: &'static str, b: &'a Buf) -> Result<&'a [u32]> {
    match b.store::<Store>() {
        Some(Store::U32(v)) => Ok(v),
        Some(Store::F32(_)) => Err(EngineError::Backend { backend: "cpu", op, msg: "expected a U32 buffer, got float".into() }),
        None => Err(EngineError::Backend { backend: "cpu", op, msg: "buffer belongs to another backend".into() }),
    }
}

fn shape_err(op: &'static str, msg: String) -> EngineError {
    EngineError::Shape { op, msg }
}

/// Sum of `f(i)` over `0..n` in fixed chunks (f64), independent of the thread count.
fn fixed_sum(n: usize, f: impl Fn(usize) -> f64 + Sync) -> f64 {
    let parts: Vec<f64> = (0..n.div_ceil(RED_CHUNK))
        .into_par_iter()
        .map(|c| (c * RED_CHUNK..((c + 1) * RED_CHUNK).min(n)).map(&f).sum::<f64>())
        .collect();
    parts.iter().sum()
}

impl CpuBackend {
    pub fn new() -> Self {
        CpuBackend { cuda_numerics: false }
    }

    /// The bf16-faithful oracle of the CUDA backend (see the type's doc).
    pub fn cuda_numerics() -> Self {
        CpuBackend { cuda_numerics: true }
    }

    /// Whether this is the [`CpuBackend::cuda_numerics`] oracle.
    pub fn is_cuda_numerics(&self) -> bool {
        self.cuda_numerics
    }

    /// Whether attention of this shape rounds as the CUDA flash kernels do (the oracle, at the
    /// head dims they serve).
    fn flash_numerics(&self, a: &Attn) -> bool {
        self.cuda_numerics && FLASH_HEAD_DIMS.contains(&a.head_dim)
    }

    /// The dtype a buffer asked for as `dtype` carries: bf16 stays bf16 (values rounded) in the
    /// CUDA-numerics mode; otherwise every float buffer is f32.
    fn float_dtype(&self, dtype: DType) -> DType {
        if self.cuda_numerics && dtype == DType::BF16 { DType::BF16 } else { DType::F32 }
    }
}

/// What a CPU run can still allocate: `MemAvailable` from `/proc/meminfo`, capped by the cgroup's
/// limit minus its usage (v2 `memory.max`/`memory.current` or v1 `limit_in_bytes`/
/// `usage_in_bytes`), since a container sees the host's meminfo but is killed at its own limit.
pub(crate) fn available_memory(meminfo: Option<&str>, cgroup: Option<(String, String)>) -> Option<u64> {
    let host = meminfo.and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    let limited = cgroup.and_then(|(max, current)| {
        let max = max.trim().parse::<u64>().ok()?; // "max" (no limit) does not parse
        let current = current.trim().parse::<u64>().ok()?;
        // v1 reports "no limit" as a huge number.
        (max < 1 << 60).then(|| max.saturating_sub(current))
    });
    match (host, limited) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> &'static str {
        "cpu"
    }
    fn device(&self) -> Device {
        Device::Cpu
    }
    fn activation_dtype(&self) -> DType {
        DType::F32
    }
    fn base_weight_dtype(&self, _file_dtype: DType) -> DType {
        if self.cuda_numerics { DType::BF16 } else { DType::F32 }
    }
    fn dequant_dtype(&self, compute: DType) -> DType {
        if self.cuda_numerics && compute == DType::BF16 { DType::BF16 } else { DType::F32 }
    }
    fn available_memory_bytes(&self) -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").ok();
        let cgroup = |path: &str| std::fs::read_to_string(path).ok();
        available_memory(
            meminfo.as_deref(),
            cgroup("/sys/fs/cgroup/memory.max")
                .zip(cgroup("/sys/fs/cgroup/memory.current"))
                .or_else(|| {
                    cgroup("/sys/fs/cgroup/memory/memory.limit_in_bytes")
                        .zip(cgroup("/sys/fs/cgroup/memory/memory.usage_in_bytes"))
                }),
        )
    }

    fn zeros(&self, len: usize, dtype: DType) -> Result<Buf> {
        Ok(match dtype {
            DType::U32 => Buf::from_store(len, DType::U32, Store::U32(vec![0; len])),
            d => Buf::from_store(len, self.float_dtype(d), Store::F32(vec![0.0; len])),
        })
    }

    fn upload(&self, data: HostData<'_>, dtype: DType) -> Result<Buf> {
        match (data, dtype) {
            (HostData::U32(x), DType::U32) => Ok(Buf::from_store(x.len(), DType::U32, Store::U32(x.to_vec()))),
            (HostData::U32(_), _) | (_, DType::U32) => Err(EngineError::Backend {
                backend: "cpu",
                op: "upload",
                msg: "U32 data must be uploaded as U32 and only U32".into(),
            }),
            (d, dtype) => {
                let mut v = d.to_f32();
                let dt = self.float_dtype(dtype);
                if dt == DType::BF16 {
                    v.iter_mut().for_each(|x| *x = rb(*x));
                }
                Ok(Buf::from_store(v.len(), dt, Store::F32(v)))
            }
        }
    }

    fn download_f32(&self, buf: &Buf) -> Result<Vec<f32>> {
        match buf.store::<Store>() {
            Some(Store::F32(v)) => Ok(v.clone()),
            Some(Store::U32(v)) => Ok(v.iter().map(|&x| x as f32).collect()),
            None => Err(EngineError::Backend { backend: "cpu", op: "download", msg: "buffer belongs to another backend".into() }),
        }
    }

    fn copy(&self, src: &Buf, dst: &mut Buf) -> Result<()> {
        check_len("copy", "dst", dst, src.len())?;
        let round = dst.dtype() == DType::BF16 && src.dtype() != DType::BF16;
        match (src.store::<Store>(), dst.store_mut::<Store>()) {
            (Some(Store::F32(s)), Some(Store::F32(d))) if round => d.iter_mut().zip(s).for_each(|(d, &s)| *d = rb(s)),
            (Some(Store::F32(s)), Some(Store::F32(d))) => d.copy_from_slice(s),
            (Some(Store::U32(s)), Some(Store::U32(d))) => d.copy_from_slice(s),
            _ => return Err(EngineError::Backend { backend: "cpu", op: "copy", msg: "dtype or backend mismatch".into() }),
        }
        Ok(())
    }

    fn fill(&self, buf: &mut Buf, value: f32) -> Result<()> {
        let value = if buf.dtype() == DType::BF16 { rb(value) } else { value };
        f32s_mut("fill", buf)?.fill(value);
        Ok(())
    }

    fn gemm(&self, g: Gemm, a: &Buf, b: &Buf, c: &mut Buf) -> Result<()> {
        check_len("gemm", "a", a, g.m * g.k)?;
        check_len("gemm", "b", b, g.k * g.n)?;
        check_len("gemm", "c", c, g.m * g.n)?;
        // CUDA: an f32 operand next to a bf16 one is rounded to bf16 (bf16 in, f32 accumulate).
        let (round_a, round_b) = (
            a.dtype() == DType::F32 && b.dtype() == DType::BF16,
            b.dtype() == DType::F32 && a.dtype() == DType::BF16,
        );
        let (a, b) = (f32s("gemm", a)?, f32s("gemm", b)?);
        let c = f32s_mut("gemm", c)?;
        let rounded = |x: &[f32]| -> Vec<f32> { x.iter().map(|&v| rb(v)).collect() };
        let (ar, br) = (round_a.then(|| rounded(a)), round_b.then(|| rounded(b)));
        let (a, b) = (ar.as_deref().unwrap_or(a), br.as_deref().unwrap_or(b));
        sgemm(g.m, g.n, g.k, g.ta, g.tb, g.alpha, a, b, if g.accumulate { 1.0 } else { 0.0 }, c);
        Ok(())
    }

    fn axpy(&self, alpha: f32, x: &Buf, y: &mut Buf) -> Result<()> {
        check_len("axpy", "y", y, x.len())?;
        let x = f32s("axpy", x)?;
        let y = f32s_mut("axpy", y)?;
        y.par_chunks_mut(RED_CHUNK).zip(x.par_chunks(RED_CHUNK)).for_each(|(y, x)| {
            for (y, x) in y.iter_mut().zip(x) {
                *y += alpha * x;
            }
        });
        Ok(())
    }

    fn scale(&self, alpha: f32, y: &mut Buf) -> Result<()> {
        f32s_mut("scale", y)?.par_chunks_mut(RED_CHUNK).for_each(|y| y.iter_mut().for_each(|y| *y *= alpha));
        Ok(())
    }

    fn add_bias(&self, bias: &Buf, y: &mut Buf, rows: usize, cols: usize) -> Result<()> {
        check_len("add_bias", "bias", bias, cols)?;
        check_len("add_bias", "y", y, rows * cols)?;
        let b = f32s("add_bias", bias)?;
        f32s_mut("add_bias", y)?.par_chunks_mut(cols.max(1)).for_each(|row| {
            for (y, b) in row.iter_mut().zip(b) {
                *y += b;
            }
        });
        Ok(())
    }

    fn scale_cols(&self, x: &Buf, s: &Buf, out: &mut Buf, rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        check_len("scale_cols", "x", x, rows * cols)?;
        check_len("scale_cols", "s", s, cols)?;
        check_len("scale_cols", "out", out, rows * cols)?;
        let (x, s) = (f32s("scale_cols", x)?, f32s("scale_cols", s)?);
        f32s_mut("scale_cols", out)?.par_chunks_mut(cols.max(1)).zip(x.par_chunks(cols.max(1))).for_each(|(o, x)| {
            for ((o, x), s) in o.iter_mut().zip(x).zip(s) {
                *o = if accumulate { *o + x * s } else { x * s };
            }
        });
        Ok(())
    }

    fn div(&self, a: &Buf, b: &Buf, out: &mut Buf) -> Result<()> {
        check_len("div", "b", b, a.len())?;
        check_len("div", "out", out, a.len())?;
        let (a, b) = (f32s("div", a)?, f32s("div", b)?);
        for (o, (x, y)) in f32s_mut("div", out)?.iter_mut().zip(a.iter().zip(b)) {
            *o = x / y;
        }
        Ok(())
    }

    fn gather_rows(&self, src: &Buf, idx: &Buf, scale: Option<&Buf>, dst: &mut Buf, rows: usize, dim: usize) -> Result<()> {
        let op = "gather_rows";
        let (_, ids, k) = rows_checked(op, src, idx, scale, rows, dim, false)?;
        check_len(op, "dst", dst, rows * dim)?;
        let src = f32s(op, src)?;
        f32s_mut(op, dst)?.par_chunks_mut(dim.max(1)).enumerate().for_each(|(r, o)| {
            let s = k.map_or(1.0, |k| k[r]);
            for (o, x) in o.iter_mut().zip(&src[ids[r] as usize * dim..(ids[r] as usize + 1) * dim]) {
                *o = x * s;
            }
        });
        Ok(())
    }

    fn scatter_add_rows(&self, src: &Buf, idx: &Buf, scale: Option<&Buf>, dst: &mut Buf, rows: usize, dim: usize) -> Result<()> {
        let op = "scatter_add_rows";
        check_len(op, "src", src, rows * dim)?;
        let (_, ids, k) = rows_checked(op, dst, idx, scale, rows, dim, true)?;
        let (ids, k) = (ids.to_vec(), k.map(<[f32]>::to_vec));
        let src = f32s(op, src)?.to_vec();
        let dst = f32s_mut(op, dst)?;
        for (r, &id) in ids.iter().enumerate() {
            let s = k.as_ref().map_or(1.0, |k| k[r]);
            for (o, x) in dst[id as usize * dim..(id as usize + 1) * dim].iter_mut().zip(&src[r * dim..(r + 1) * dim]) {
                *o += x * s;
            }
        }
        Ok(())
    }

    fn row_dot(&self, a: &Buf, b: &Buf, out: &mut Buf, rows: usize, dim: usize) -> Result<()> {
        check_len("row_dot", "a", a, rows * dim)?;
        check_len("row_dot", "b", b, rows * dim)?;
        check_len("row_dot", "out", out, rows)?;
        let (a, b) = (f32s("row_dot", a)?, f32s("row_dot", b)?);
        f32s_mut("row_dot", out)?.par_iter_mut().enumerate().for_each(|(r, o)| {
            *o = a[r * dim..(r + 1) * dim].iter().zip(&b[r * dim..(r + 1) * dim]).map(|(x, y)| (x * y) as f64).sum::<f64>() as f32;
        });
        Ok(())
    }

    fn col_dot(&self, a: &Buf, b: &Buf, out: &mut Buf, rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        check_len("col_dot", "a", a, rows * cols)?;
        check_len("col_dot", "b", b, rows * cols)?;
        check_len("col_dot", "out", out, cols)?;
        let (a, b) = (f32s("col_dot", a)?, f32s("col_dot", b)?);
        let out = f32s_mut("col_dot", out)?;
        out.par_iter_mut().enumerate().for_each(|(j, o)| {
            let mut acc = 0f64;
            for i in 0..rows {
                acc += (a[i * cols + j] * b[i * cols + j]) as f64;
            }
            *o = if accumulate { *o + acc as f32 } else { acc as f32 };
        });
        Ok(())
    }

    fn sum_squares(&self, bufs: &[&Buf]) -> Result<f64> {
        let mut total = 0f64;
        for b in bufs {
            let x = f32s("sum_squares", b)?;
            total += fixed_sum(x.len(), |i| (x[i] as f64) * (x[i] as f64));
        }
        Ok(total)
    }

    fn embedding(&self, ids: &Buf, table: &Buf, out: &mut Buf, tokens: usize, dim: usize, scale: f32) -> Result<()> {
        check_len("embedding", "ids", ids, tokens)?;
        check_len("embedding", "out", out, tokens * dim)?;
        if dim == 0 || !table.len().is_multiple_of(dim) {
            return Err(shape_err("embedding", format!("table of {} elements is not [vocab, {dim}]", table.len())));
        }
        let vocab = table.len() / dim;
        let (ids, table) = (u32s("embedding", ids)?, f32s("embedding", table)?);
        if let Some(pos) = ids.iter().position(|&i| i as usize >= vocab) {
            return Err(shape_err("embedding", format!("token id {} at position {pos} is outside the vocabulary of {vocab}", ids[pos])));
        }
        f32s_mut("embedding", out)?.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(o, &id)| {
            for (o, w) in o.iter_mut().zip(&table[id as usize * dim..(id as usize + 1) * dim]) {
                *o = w * scale;
            }
        });
        Ok(())
    }

    fn rmsnorm_fwd(&self, x: &Buf, w: &Buf, y: &mut Buf, rstd: &mut Buf, rows: usize, dim: usize, eps: f32) -> Result<()> {
        check_len("rmsnorm_fwd", "x", x, rows * dim)?;
        check_len("rmsnorm_fwd", "w", w, dim)?;
        check_len("rmsnorm_fwd", "y", y, rows * dim)?;
        check_len("rmsnorm_fwd", "rstd", rstd, rows)?;
        let (x, w) = (f32s("rmsnorm_fwd", x)?, f32s("rmsnorm_fwd", w)?);
        let y = f32s_mut("rmsnorm_fwd", y)?;
        let rstd = f32s_mut("rmsnorm_fwd", rstd)?;
        y.par_chunks_mut(dim).zip(x.par_chunks(dim)).zip(rstd.par_iter_mut()).for_each(|((y, x), r)| {
            let ms = x.iter().map(|v| v * v).sum::<f32>() / dim as f32;
            *r = 1.0 / (ms + eps).sqrt();
            for ((y, x), w) in y.iter_mut().zip(x).zip(w) {
                *y = w * (x * *r);
            }
        });
        Ok(())
    }

    fn rmsnorm_bwd(&self, dy: &Buf, x: &Buf, w: &Buf, rstd: &Buf, dx: &mut Buf, rows: usize, dim: usize, accumulate: bool) -> Result<()> {
        check_len("rmsnorm_bwd", "dy", dy, rows * dim)?;
        check_len("rmsnorm_bwd", "x", x, rows * dim)?;
        check_len("rmsnorm_bwd", "w", w, dim)?;
        check_len("rmsnorm_bwd", "rstd", rstd, rows)?;
        check_len("rmsnorm_bwd", "dx", dx, rows * dim)?;
        let (dy, x, w, rstd) = (f32s("rmsnorm_bwd", dy)?, f32s("rmsnorm_bwd", x)?, f32s("rmsnorm_bwd", w)?, f32s("rmsnorm_bwd", rstd)?);
        let dx = f32s_mut("rmsnorm_bwd", dx)?;
        dx.par_chunks_mut(dim).enumerate().for_each(|(i, dx)| {
            let (x, dy, r) = (&x[i * dim..(i + 1) * dim], &dy[i * dim..(i + 1) * dim], rstd[i]);
            let mut dot = 0f32;
            for j in 0..dim {
                dot += w[j] * dy[j] * x[j] * r;
            }
            let mean = dot / dim as f32;
            for j in 0..dim {
                let g = r * (w[j] * dy[j] - x[j] * r * mean);
                dx[j] = if accumulate { dx[j] + g } else { g };
            }
        });
        Ok(())
    }

    fn rope(&self, x: &mut Buf, pos: &Buf, inv_freq: &Buf, tokens: usize, heads: usize, head_dim: usize, inverse: bool) -> Result<()> {
        self.rope_partial(x, pos, inv_freq, tokens, heads, head_dim, head_dim, 1.0, inverse)
    }

    fn rope_partial(&self, x: &mut Buf, pos: &Buf, inv_freq: &Buf, tokens: usize, heads: usize, head_dim: usize, rotary_dim: usize, scale: f32, inverse: bool) -> Result<()> {
        check_len("rope", "x", x, tokens * heads * head_dim)?;
        check_len("rope", "pos", pos, tokens)?;
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(EngineError::Shape { op: "rope", msg: format!("rotary_dim {rotary_dim} must be even, positive and at most head_dim {head_dim}") });
        }
        let half = rotary_dim / 2;
        check_len("rope", "inv_freq", inv_freq, half)?;
        let (pos, inv) = (u32s("rope", pos)?, f32s("rope", inv_freq)?);
        let sign = if inverse { -1.0 } else { 1.0 };
        f32s_mut("rope", x)?.par_chunks_mut(heads * head_dim).zip(pos.par_iter()).for_each(|(row, &p)| {
            for i in 0..half {
                let ang = p as f32 * inv[i];
                let (c, s) = (ang.cos() * scale, sign * (ang.sin() * scale));
                for hh in 0..heads {
                    let base = hh * head_dim;
                    let (x1, x2) = (row[base + i], row[base + i + half]);
                    row[base + i] = x1 * c - x2 * s;
                    row[base + i + half] = x2 * c + x1 * s;
                }
            }
        });
        Ok(())
    }

    fn copy_cols(&self, src: &Buf, src_cols: usize, src_col: usize, dst: &mut Buf, dst_cols: usize, dst_col: usize, rows: usize, width: usize) -> Result<()> {
        check_len("copy_cols", "src", src, rows * src_cols)?;
        check_len("copy_cols", "dst", dst, rows * dst_cols)?;
        if src_col + width > src_cols || dst_col + width > dst_cols {
            return Err(EngineError::Shape { op: "copy_cols", msg: format!("columns {src_col}+{width} of {src_cols} into {dst_col}+{width} of {dst_cols}") });
        }
        let from = f32s("copy_cols", src)?;
        f32s_mut("copy_cols", dst)?.par_chunks_mut(dst_cols).zip(from.par_chunks(src_cols)).for_each(|(d, s)| {
            d[dst_col..dst_col + width].copy_from_slice(&s[src_col..src_col + width]);
        });
        Ok(())
    }

    fn attention_fwd(&self, a: Attn, q: &Buf, k: &Buf, v: &Buf, cu: &Buf, out: &mut Buf, lse: &mut Buf) -> Result<()> {
        check_attn("attention_fwd", &a, q, k, v, cu)?;
        check_len("attention_fwd", "out", out, a.tokens * a.n_heads * a.head_dim)?;
        check_len("attention_fwd", "lse", lse, a.n_heads * a.tokens)?;
        let cu = u32s("attention_fwd", cu)?;
        check_cu("attention_fwd", &a, cu)?;
        let (q, k, v) = (f32s("attention_fwd", q)?, f32s("attention_fwd", k)?, f32s("attention_fwd", v)?);
        let lse = f32s_mut("attention_fwd", lse)?;
        if self.flash_numerics(&a) {
            attention_flash::forward(a, q, k, v, cu, f32s_mut("attention_fwd", out)?, lse);
        } else {
            attention::forward(a, q, k, v, cu, f32s_mut("attention_fwd", out)?, lse);
        }
        Ok(())
    }

    fn attention_bwd(&self, a: Attn, q: &Buf, k: &Buf, v: &Buf, cu: &Buf, out: &Buf, lse: &Buf, dout: &Buf, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf) -> Result<()> {
        const OP: &str = "attention_bwd";
        check_attn(OP, &a, q, k, v, cu)?;
        let (nq, nkv) = (a.tokens * a.n_heads * a.head_dim, a.tokens * a.n_kv_heads * a.head_dim);
        check_len(OP, "out", out, nq)?;
        check_len(OP, "dout", dout, nq)?;
        check_len(OP, "lse", lse, a.n_heads * a.tokens)?;
        check_len(OP, "dq", dq, nq)?;
        check_len(OP, "dk", dk, nkv)?;
        check_len(OP, "dv", dv, nkv)?;
        let cu = u32s(OP, cu)?;
        check_cu(OP, &a, cu)?;
        let pass = if self.flash_numerics(&a) { attention_flash::backward } else { attention::backward };
        pass(
            a,
            f32s(OP, q)?,
            f32s(OP, k)?,
            f32s(OP, v)?,
            cu,
            f32s(OP, out)?,
            f32s(OP, lse)?,
            f32s(OP, dout)?,
            f32s_mut(OP, dq)?,
            f32s_mut(OP, dk)?,
            f32s_mut(OP, dv)?,
        );
        Ok(())
    }

    fn swiglu_fwd(&self, gate: &Buf, up: &Buf, h: &mut Buf) -> Result<()> {
        glu_fwd("swiglu_fwd", gate, up, h, |x| silu_and_grad(x).0)
    }

    fn swiglu_bwd(&self, gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf) -> Result<()> {
        glu_bwd("swiglu_bwd", gate, up, dh, dgate, dup, silu_and_grad)
    }

    fn geglu_fwd(&self, gate: &Buf, up: &Buf, h: &mut Buf) -> Result<()> {
        glu_fwd("geglu_fwd", gate, up, h, |x| gelu_tanh_and_grad(x).0)
    }

    fn geglu_bwd(&self, gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf) -> Result<()> {
        glu_bwd("geglu_bwd", gate, up, dh, dgate, dup, gelu_tanh_and_grad)
    }

    fn linear_cross_entropy(&self, c: CrossEntropy, hidden: &Buf, w: &Buf, targets: &Buf, dhidden: Option<&mut Buf>) -> Result<f64> {
        const OP: &str = "linear_cross_entropy";
        check_len(OP, "hidden", hidden, c.tokens * c.dim)?;
        check_len(OP, "w", w, c.vocab * c.dim)?;
        check_len(OP, "targets", targets, c.tokens)?;
        let bf16 = self.cuda_numerics;
        // CUDA: an f32 w is cast to bf16 before the products.
        let w_rounded = (bf16 && w.dtype() != DType::BF16).then(|| f32s(OP, w).map(|w| w.iter().map(|&x| rb(x)).collect::<Vec<f32>>())).transpose()?;
        let (h, tg) = (f32s(OP, hidden)?, u32s(OP, targets)?);
        let w = match &w_rounded {
            Some(v) => &v[..],
            None => f32s(OP, w)?,
        };
        let mut dh = match dhidden {
            Some(b) => {
                check_len(OP, "dhidden", b, c.tokens * c.dim)?;
                let d = f32s_mut(OP, b)?;
                d.fill(0.0);
                Some(d)
            }
            None => None,
        };
        // Only rows with a target need logits at all.
        let rows: Vec<usize> = (0..c.tokens).filter(|&i| tg[i] != IGNORE_TARGET).collect();
        if let Some(&bad) = rows.iter().find(|&&i| tg[i] as usize >= c.vocab) {
            return Err(shape_err(OP, format!("target id {} at row {bad} is outside the vocabulary of {}", tg[bad], c.vocab)));
        }
        let chunk = (CE_CHUNK_ELEMS / c.vocab.max(1)).clamp(1, 1024);
        let mut xs = vec![0f32; chunk * c.dim];
        let mut logits = vec![0f32; chunk * c.vocab];
        let mut total = 0f64;
        for rs in rows.chunks(chunk) {
            let n = rs.len();
            for (k, &i) in rs.iter().enumerate() {
                xs[k * c.dim..(k + 1) * c.dim].copy_from_slice(&h[i * c.dim..(i + 1) * c.dim]);
            }
            if bf16 {
                // CUDA: the hidden rows are cast to bf16 for the logits product.
                xs[..n * c.dim].iter_mut().for_each(|x| *x = rb(*x));
            }
            let lg = &mut logits[..n * c.vocab];
            sgemm(n, c.vocab, c.dim, false, true, c.logit_scale, &xs[..n * c.dim], w, 0.0, lg);
            let want_grad = dh.is_some();
            let losses: Vec<f64> = lg
                .par_chunks_mut(c.vocab)
                .zip(rs.par_iter())
                .map(|(row, &i)| {
                    let t = tg[i] as usize;
                    let mx = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let sum: f64 = row.iter().map(|&x| ((x - mx) as f64).exp()).sum();
                    let lse = mx as f64 + sum.ln();
                    let loss = lse - row[t] as f64;
                    if want_grad {
                        let g = c.grad_scale * c.logit_scale;
                        for x in row.iter_mut() {
                            *x = (((*x as f64) - lse).exp() as f32) * g;
                        }
                        row[t] -= g;
                        if bf16 {
                            // CUDA: dlogits are stored as bf16.
                            row.iter_mut().for_each(|x| *x = rb(*x));
                        }
                    }
                    loss
                })
                .collect();
            total += losses.iter().sum::<f64>();
            if let Some(dh) = dh.as_deref_mut() {
                sgemm(n, c.dim, c.vocab, false, false, 1.0, lg, w, 0.0, &mut xs[..n * c.dim]);
                for (k, &i) in rs.iter().enumerate() {
                    dh[i * c.dim..(i + 1) * c.dim].copy_from_slice(&xs[k * c.dim..(k + 1) * c.dim]);
                }
            }
        }
        Ok(total)
    }

    fn dropout(&self, x: &Buf, out: &mut Buf, p: f32, seed: u64) -> Result<()> {
        check_len("dropout", "out", out, x.len())?;
        if !(0.0..1.0).contains(&p) {
            return Err(shape_err("dropout", format!("probability {p} is outside [0, 1)")));
        }
        let x = f32s("dropout", x)?;
        let keep = 1.0 / (1.0 - p);
        f32s_mut("dropout", out)?.par_chunks_mut(RED_CHUNK).enumerate().for_each(|(c, o)| {
            let base = c * RED_CHUNK;
            for (i, o) in o.iter_mut().enumerate() {
                let idx = base + i;
                *o = if dropout_keep(seed, idx as u64, p) { x[idx] * keep } else { 0.0 };
            }
        });
        Ok(())
    }

    fn dora_weight_norm(&self, w: &Buf, a: &Buf, b: &Buf, scale: f32, norm: &mut Buf, out_f: usize, in_f: usize, r: usize) -> Result<()> {
        const OP: &str = "dora_weight_norm";
        check_len(OP, "w", w, out_f * in_f)?;
        check_len(OP, "a", a, r * in_f)?;
        check_len(OP, "b", b, out_f * r)?;
        check_len(OP, "norm", norm, out_f)?;
        let (w, a, b) = (f32s(OP, w)?, f32s(OP, a)?, f32s(OP, b)?);
        f32s_mut(OP, norm)?.par_iter_mut().enumerate().for_each(|(o, n)| {
            let mut row = w[o * in_f..(o + 1) * in_f].to_vec();
            let mut ba = vec![0f32; in_f];
            for k in 0..r {
                let bk = b[o * r + k];
                for (x, av) in ba.iter_mut().zip(&a[k * in_f..(k + 1) * in_f]) {
                    *x += bk * av;
                }
            }
            for (x, l) in row.iter_mut().zip(&ba) {
                *x += scale * l;
            }
            *n = row.iter().map(|x| x * x).sum::<f32>().sqrt();
        });
        Ok(())
    }

    fn adamw(&self, o: AdamW, param: &mut Buf, grad: &Buf, m: &mut Buf, v: &mut Buf) -> Result<()> {
        let n = param.len();
        check_len("adamw", "grad", grad, n)?;
        check_len("adamw", "m", m, n)?;
        check_len("adamw", "v", v, n)?;
        if o.step == 0 {
            return Err(EngineError::Optim("AdamW step count must start at 1".into()));
        }
        let g = f32s("adamw", grad)?;
        let m = f32s_mut("adamw", m)?;
        let v = f32s_mut("adamw", v)?;
        let p = f32s_mut("adamw", param)?;
        let bc1 = 1.0 - (o.beta1 as f64).powi(o.step as i32);
        let bc2 = 1.0 - (o.beta2 as f64).powi(o.step as i32);
        let step_size = (o.lr as f64 / bc1) as f32;
        let bc2_sqrt = bc2.sqrt() as f32;
        let decay = (1.0 - o.lr as f64 * o.weight_decay as f64) as f32;
        for i in 0..n {
            let gi = g[i] * o.grad_scale;
            p[i] *= decay;
            m[i] += (1.0 - o.beta1) * (gi - m[i]); // torch: exp_avg.lerp_(grad, 1 - beta1)
            v[i] = o.beta2 * v[i] + (1.0 - o.beta2) * gi * gi;
            let denom = v[i].sqrt() / bc2_sqrt + o.eps;
            p[i] -= step_size * m[i] / denom;
        }
        Ok(())
    }

    fn dequantize(&self, q: &crate::quant::DeviceQuant, round_to: DType, out: &mut Buf) -> Result<()> {
        const OP: &str = "dequantize";
        let nested = match &q.nested {
            Some(nd) => Some((u32s(OP, &nd.codes)?, f32s(OP, &nd.map)?)),
            None => None,
        };
        crate::quant::dequantize_host(q, u32s(OP, &q.data)?, f32s(OP, &q.scales)?, nested, round_to, f32s_mut(OP, out)?)
    }
}

fn check_attn(op: &'static str, a: &Attn, q: &Buf, k: &Buf, v: &Buf, cu: &Buf) -> Result<()> {
    if a.n_kv_heads == 0 || !a.n_heads.is_multiple_of(a.n_kv_heads) {
        return Err(shape_err(op, format!("{} query heads are not a multiple of {} key/value heads", a.n_heads, a.n_kv_heads)));
    }
    check_len(op, "q", q, a.tokens * a.n_heads * a.head_dim)?;
    check_len(op, "k", k, a.tokens * a.n_kv_heads * a.head_dim)?;
    check_len(op, "v", v, a.tokens * a.n_kv_heads * a.head_dim)?;
    check_len(op, "cu_seqlens", cu, a.n_docs + 1)
}

fn check_cu(op: &'static str, a: &Attn, cu: &[u32]) -> Result<()> {
    if cu.first() != Some(&0) || cu.last().map(|&x| x as usize) != Some(a.tokens) || cu.windows(2).any(|w| w[1] < w[0]) {
        return Err(shape_err(op, format!("cu_seqlens must rise from 0 to {} tokens", a.tokens)));
    }
    Ok(())
}

#[cfg(test)]
mod memory_tests {
    use super::available_memory;

    #[test]
    fn available_memory_is_the_smaller_of_meminfo_and_the_cgroup_room() {
        let meminfo = "MemTotal:       24000000 kB\nMemFree:  100 kB\nMemAvailable:   20000000 kB\n";
        assert_eq!(available_memory(Some(meminfo), None), Some(20_000_000 * 1024));
        let pod = Some(("8589934592\n".to_string(), "1073741824\n".to_string()));
        assert_eq!(available_memory(Some(meminfo), pod), Some(7 << 30));
        let unlimited = Some(("max\n".to_string(), "1073741824\n".to_string()));
        assert_eq!(available_memory(Some(meminfo), unlimited), Some(20_000_000 * 1024));
        let v1_unlimited = Some(("9223372036854771712".to_string(), "5".to_string()));
        assert_eq!(available_memory(Some(meminfo), v1_unlimited), Some(20_000_000 * 1024));
        assert_eq!(available_memory(None, None), None);
    }
}

#[cfg(test)]
mod cuda_numerics_tests {
    use super::*;

    fn rounded(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| rb(v)).collect()
    }

    fn vals(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = crate::backend::splitmix64(s);
                (s >> 40) as f32 / 8_388_608.0 - 1.0
            })
            .collect()
    }

    /// A base weight is a bf16 buffer; the f32 operand of a product with it is rounded to bf16
    /// first (CUDA's cast before cuBLASLt), and an f32 x f32 product is not.
    #[test]
    fn mixed_products_round_the_f32_operand_and_f32_products_do_not() {
        let (m, n, k) = (5, 7, 33);
        let (a, w) = (vals(m * k, 1), rounded(&vals(k * n, 2)));
        let exact = CpuBackend::new();
        let oracle = CpuBackend::cuda_numerics();
        assert_eq!(oracle.base_weight_dtype(DType::BF16), DType::BF16);
        assert_eq!(exact.base_weight_dtype(DType::BF16), DType::F32);
        let g = Gemm { m, n, k, ta: false, tb: false, alpha: 1.0, accumulate: false };
        let run = |be: &CpuBackend, a: &[f32], bdt: DType| {
            let ab = be.upload(HostData::F32(a), DType::F32).unwrap();
            let bb = be.upload(HostData::F32(&w), bdt).unwrap();
            let mut c = be.zeros(m * n, DType::F32).unwrap();
            be.gemm(g, &ab, &bb, &mut c).unwrap();
            be.download_f32(&c).unwrap()
        };
        let want = run(&exact, &rounded(&a), DType::F32);
        assert_eq!(run(&oracle, &a, DType::BF16), want, "f32 x bf16 = round(f32) x bf16");
        assert_ne!(run(&exact, &a, DType::F32), want, "the exact backend does not round");
        assert_eq!(run(&oracle, &a, DType::F32), run(&exact, &a, DType::F32), "f32 x f32 stays exact");
        // A copy or fill into a bf16 buffer rounds, as cast_f32_bf16 / fill_bf16 do.
        let src = oracle.upload(HostData::F32(&a), DType::F32).unwrap();
        let mut dst = oracle.zeros(a.len(), DType::BF16).unwrap();
        oracle.copy(&src, &mut dst).unwrap();
        assert_eq!(oracle.download_f32(&dst).unwrap(), rounded(&a));
        oracle.fill(&mut dst, 0.1).unwrap();
        assert!(oracle.download_f32(&dst).unwrap().iter().all(|&v| v == rb(0.1)));
    }

    /// The fused cross-entropy rounds the hidden rows and the logit gradients to bf16: its loss
    /// equals the exact backend's on pre-rounded hidden rows, and its dhidden differs from the
    /// exact one (rounded dlogits) by about bf16's precision.
    #[test]
    fn cross_entropy_rounds_hidden_rows_and_logit_gradients() {
        let (t, d, v) = (6, 16, 40);
        let (h, w) = (vals(t * d, 3), rounded(&vals(v * d, 4)));
        let tg: Vec<u32> = (0..t as u32).map(|i| (i * 7) % v as u32).collect();
        let c = CrossEntropy { tokens: t, dim: d, vocab: v, logit_scale: 1.0, grad_scale: 0.5 };
        let run = |be: &CpuBackend, h: &[f32]| {
            let hb = be.upload(HostData::F32(h), DType::F32).unwrap();
            let wb = be.upload(HostData::F32(&w), be.base_weight_dtype(DType::BF16)).unwrap();
            let tb = be.upload(HostData::U32(&tg), DType::U32).unwrap();
            let mut dh = be.zeros(t * d, DType::F32).unwrap();
            let loss = be.linear_cross_entropy(c, &hb, &wb, &tb, Some(&mut dh)).unwrap();
            (loss, be.download_f32(&dh).unwrap())
        };
        let (l_oracle, dh_oracle) = run(&CpuBackend::cuda_numerics(), &h);
        let (l_exact, dh_exact) = run(&CpuBackend::new(), &rounded(&h));
        assert_eq!(l_oracle, l_exact);
        let (mut e2, mut r2) = (0.0f64, 0.0f64);
        for (a, b) in dh_oracle.iter().zip(&dh_exact) {
            e2 += f64::from(a - b).powi(2);
            r2 += f64::from(*b).powi(2);
        }
        let rel = (e2 / r2).sqrt();
        assert!(rel > 0.0 && rel < 1e-2, "dhidden relative L2 {rel}");
    }
}

/// `silu(x)` and its derivative.
fn silu_and_grad(x: f32) -> (f32, f32) {
    let sig = 1.0 / (1.0 + (-x).exp());
    (x * sig, sig * (1.0 + x * (1.0 - sig)))
}

/// `gelu_pytorch_tanh(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))` and its derivative.
fn gelu_tanh_and_grad(x: f32) -> (f32, f32) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    let th = (C * (x + 0.044715 * x * x * x)).tanh();
    (0.5 * x * (1.0 + th), 0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * C * (1.0 + 3.0 * 0.044715 * x * x))
}

/// A gated MLP's `h = act(gate) * up`.
fn glu_fwd(op: &'static str, gate: &Buf, up: &Buf, h: &mut Buf, act: impl Fn(f32) -> f32 + Sync) -> Result<()> {
    check_len(op, "up", up, gate.len())?;
    check_len(op, "h", h, gate.len())?;
    let (g, u) = (f32s(op, gate)?, f32s(op, up)?);
    // A bf16 output (the CUDA-numerics oracle) is rounded once, as the bf16 kernels store it.
    let out = rounding(h.dtype());
    f32s_mut(op, h)?.par_chunks_mut(RED_CHUNK).enumerate().for_each(|(c, h)| {
        let o = c * RED_CHUNK;
        for (i, h) in h.iter_mut().enumerate() {
            *h = out(act(g[o + i]) * u[o + i]);
        }
    });
    Ok(())
}

/// Its backward: `dgate = dh * up * act'(gate)`, `dup = dh * act(gate)`; `act_grad` gives both.
fn glu_bwd(op: &'static str, gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf, act_grad: impl Fn(f32) -> (f32, f32) + Sync) -> Result<()> {
    let n = gate.len();
    for (name, b) in [("up", up), ("dh", dh)] {
        check_len(op, name, b, n)?;
    }
    check_len(op, "dgate", dgate, n)?;
    check_len(op, "dup", dup, n)?;
    let (g, u, dh) = (f32s(op, gate)?, f32s(op, up)?, f32s(op, dh)?);
    let (rg, ru) = (rounding(dgate.dtype()), rounding(dup.dtype()));
    let dup = f32s_mut(op, dup)?;
    f32s_mut(op, dgate)?
        .par_chunks_mut(RED_CHUNK)
        .zip(dup.par_chunks_mut(RED_CHUNK))
        .enumerate()
        .for_each(|(c, (dg, du))| {
            let o = c * RED_CHUNK;
            for i in 0..dg.len() {
                let (a, da) = act_grad(g[o + i]);
                du[i] = ru(dh[o + i] * a);
                dg[i] = rg(dh[o + i] * u[o + i] * da);
            }
        });
    Ok(())
}

type RowsArgs<'a> = (usize, &'a [u32], Option<&'a [f32]>);

/// The indexed side's row count, the row indices (checked against it; with `distinct`, no row
/// twice) and the per-row scale of [`Backend::gather_rows`] / [`Backend::scatter_add_rows`].
fn rows_checked<'a>(op: &'static str, indexed: &Buf, idx: &'a Buf, scale: Option<&'a Buf>, rows: usize, dim: usize, distinct: bool) -> Result<RowsArgs<'a>> {
    check_len(op, "idx", idx, rows)?;
    if dim == 0 || !indexed.len().is_multiple_of(dim) {
        return Err(shape_err(op, format!("a buffer of {} elements is not [n, {dim}]", indexed.len())));
    }
    let n = indexed.len() / dim;
    let ids = u32s(op, idx)?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
        return Err(shape_err(op, format!("row index {bad} outside {n} rows")));
    }
    if distinct {
        let mut seen = vec![false; n];
        if let Some(dup) = ids.iter().find(|&&i| std::mem::replace(&mut seen[i as usize], true)) {
            return Err(shape_err(op, format!("row {dup} appears twice (the rows must be distinct)")));
        }
    }
    let k = match scale {
        Some(s) => {
            check_len(op, "scale", s, rows)?;
            Some(f32s(op, s)?)
        }
        None => None,
    };
    Ok((n, ids, k))
}
