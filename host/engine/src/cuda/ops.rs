//! `impl Backend for CudaBackend`: each op checks its buffers, then enqueues kernels or
//! cuBLASLt products on the one stream. Kernels are in `host/engine/kernels/`.

use cudarc::driver::LaunchConfig;

use super::flash::flash_supported;
use super::plan::{DataType, MatmulPlan};
use super::{Arg, CudaBackend, err};
use crate::backend::{AdamW, Attn, Backend, Buf, CrossEntropy, DType, Device, DeviceCounts, Gemm, HostData, check_len};
use crate::error::Result;
use crate::quant::{DeviceQuant, NESTED_BLOCKSIZE, QuantFormat, QuantType};

/// `kernels/attention.cu`'s `ATT_WARPS` (queries or keys per block, one warp each), `ATT_TILE`
/// (keys or queries per shared-memory tile) and `ATT_MAXC` (values per lane: head_dim <= 32 x
/// this); a test holds them equal to the `#define`s (CUDA-REVIEW S6).
const ATT_WARPS: usize = 4;
const ATT_TILE: usize = 32;
const ATT_MAXC: usize = 8;

/// Dynamic shared memory (floats) of the three attention kernels for head_dim `hd`, from their
/// layouts: K and V tiles `[ATT_TILE][hd + 1]`, then q rows `[ATT_WARPS][hd]` (fwd); plus dout
/// rows (dq); q and dout tiles, lse and delta of the tile, k and v rows (dkv).
fn attention_smem_floats(hd: usize) -> (usize, usize, usize) {
    let tiles = 2 * ATT_TILE * (hd + 1);
    (tiles + ATT_WARPS * hd, tiles + 2 * ATT_WARPS * hd, tiles + 2 * ATT_TILE + 2 * ATT_WARPS * hd)
}

/// The attention launch: one block of ATT_WARPS warps per ATT_WARPS rows, per head.
fn attention_cfg(rows: usize, heads: usize, smem_floats: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(ATT_WARPS) as u32, heads as u32, 1),
        block_dim: ((32 * ATT_WARPS) as u32, 1, 1),
        shared_mem_bytes: (smem_floats * 4) as u32,
    }
}

/// Grid-stride launch over `n` elements.
fn grid1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 1 << 16) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// One block per row; threads a multiple of 32, at most 1024.
fn per_row(rows: usize, cols: usize) -> LaunchConfig {
    let threads = (cols.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32;
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

fn i32_of(op: &'static str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| err(op, format!("{what} = {v} exceeds the kernels' i32 range")))
}

fn need(op: &'static str, arg: &str, buf: &Buf, dtypes: &[DType]) -> Result<()> {
    if dtypes.contains(&buf.dtype()) {
        Ok(())
    } else {
        Err(err(op, format!("`{arg}` is {:?}, expected one of {dtypes:?}", buf.dtype())))
    }
}

/// Kernel suffix for a weight-like operand (f32 or bf16).
fn suffix(op: &'static str, arg: &str, buf: &Buf) -> Result<&'static str> {
    match buf.dtype() {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => Err(err(op, format!("`{arg}` is {d:?}; this op takes f32 or bf16"))),
    }
}

/// The `[f32, bf16]` kernel of an elementwise op whose activation buffers must share one dtype:
/// f32 or bf16 (bf16 activations, f32 math inside the kernel); mixed or other dtypes are refused
/// naming the first buffer that differs.
fn by_dtype(op: &'static str, kernels: [&'static str; 2], bufs: &[(&str, &Buf)]) -> Result<&'static str> {
    let Some(&(first, b0)) = bufs.first() else { return Ok(kernels[0]) };
    let kernel = match b0.dtype() {
        DType::F32 => kernels[0],
        DType::BF16 => kernels[1],
        d => return Err(err(op, format!("`{first}` is {d:?}; this op takes f32 or bf16 activations"))),
    };
    for &(name, b) in &bufs[1..] {
        if b.dtype() != b0.dtype() {
            return Err(err(op, format!("`{name}` is {:?} but `{first}` is {:?}: the buffers must share one dtype", b.dtype(), b0.dtype())));
        }
    }
    Ok(kernel)
}

fn kname(base: &'static str, sfx: &str) -> &'static str {
    // Kernel names are static: map (base, suffix) onto the fixed set.
    match (base, sfx) {
        ("rmsnorm_fwd", "f32") => "rmsnorm_fwd_f32",
        ("rmsnorm_fwd", _) => "rmsnorm_fwd_bf16",
        ("rmsnorm_bwd", "f32") => "rmsnorm_bwd_f32",
        ("rmsnorm_bwd", _) => "rmsnorm_bwd_bf16",
        ("embedding_fwd", "f32") => "embedding_fwd_f32",
        ("embedding_fwd", _) => "embedding_fwd_bf16",
        ("add_bias", "f32") => "add_bias_f32",
        ("add_bias", _) => "add_bias_bf16",
        ("dora_weight_norm", "f32") => "dora_weight_norm_f32",
        (_, _) => "dora_weight_norm_bf16",
    }
}

fn bf16_bytes(xs: &[f32]) -> Vec<u8> {
    xs.iter().flat_map(|&x| half::bf16::from_f32(x).to_le_bytes()).collect()
}

impl CudaBackend {
    /// [`Backend::gather_rows`] (`gather`: `src` is indexed) or [`Backend::scatter_add_rows`]
    /// (`dst` is): the row indices are checked on the host against the indexed side's rows.
    #[allow(clippy::too_many_arguments)]
    fn rows_op(&self, op: &'static str, kernel: &'static str, src: &Buf, idx: &Buf, scale: Option<&Buf>, dst: &mut Buf, rows: usize, dim: usize, gather: bool) -> Result<()> {
        check_len(op, "idx", idx, rows)?;
        let (small, big) = if gather { (&*dst, src) } else { (src, &*dst) };
        check_len(op, if gather { "dst" } else { "src" }, small, rows * dim)?;
        if dim == 0 || !big.len().is_multiple_of(dim) {
            return Err(err(op, format!("a buffer of {} elements is not [n, {dim}]", big.len())));
        }
        need(op, "src", src, &[DType::F32])?;
        need(op, "dst", dst, &[DType::F32])?;
        need(op, "idx", idx, &[DType::U32])?;
        if let Some(s) = scale {
            check_len(op, "scale", s, rows)?;
            need(op, "scale", s, &[DType::F32])?;
        }
        // The index contents are checked where reading them back costs nothing that matters:
        // on the emulator and with LORA_CUDA_SYNC=1. On a GPU this would be a device-to-host
        // round trip per expert and direction; the one caller (`crate::moe`) builds the rows in
        // ascending token order on the host, in range and distinct by construction.
        if self.device == Device::Emu || self.sync_each {
            let n = big.len() / dim;
            let ids = self.download_f32(idx)?;
            if let Some(bad) = ids.iter().find(|&&i| i as usize >= n) {
                return Err(err(op, format!("row index {bad} outside {n} rows")));
            }
            if !gather {
                let mut seen = vec![false; n];
                if let Some(dup) = ids.iter().find(|&&i| std::mem::replace(&mut seen[i as usize], true)) {
                    return Err(err(op, format!("row {dup} appears twice (the rows must be distinct)")));
                }
            }
        }
        if rows == 0 {
            return Ok(());
        }
        let scale_ptr = match scale {
            Some(s) => self.ptr(op, "scale", s)?,
            None => self.ptr(op, "src", src)?,
        };
        self.launch(op, kernel, grid1d(rows * dim), &[
            Arg::Ptr(self.ptr(op, "src", src)?),
            Arg::Ptr(self.ptr(op, "idx", idx)?),
            Arg::Ptr(scale_ptr),
            Arg::I32(scale.is_some() as i32),
            Arg::Ptr(self.ptr(op, "dst", dst)?),
            Arg::Size(rows),
            Arg::Size(dim),
        ])
    }
}

impl CudaBackend {
    /// A bf16 copy of an f32 buffer (for a matrix product with a bf16 operand).
    pub(crate) fn to_bf16(&self, op: &'static str, src: &Buf) -> Result<Buf> {
        let dst = self.alloc(op, src.len(), DType::BF16, false)?;
        let n = src.len();
        self.launch(op, "cast_f32_bf16", grid1d(n), &[
            Arg::Ptr(self.ptr(op, "src", src)?),
            Arg::Ptr(self.ptr(op, "dst", &dst)?),
            Arg::Size(n),
        ])?;
        Ok(dst)
    }

    /// A U32 buffer's values, exact (download_f32 goes through f32, exact only below 2^24).
    pub(crate) fn download_u32(&self, op: &'static str, buf: &Buf) -> Result<Vec<u32>> {
        need(op, "buf", buf, &[DType::U32])?;
        let b = self.download_bytes(op, buf)?;
        Ok(b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    fn download_bytes(&self, op: &'static str, buf: &Buf) -> Result<Vec<u8>> {
        self.read_bytes(op, buf, buf.len() * buf.dtype().size())
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> &'static str {
        match self.device {
            Device::Emu => "emu",
            _ => "cuda",
        }
    }

    fn device(&self) -> Device {
        self.device
    }

    fn activation_dtype(&self) -> DType {
        DType::F32
    }

    fn base_weight_dtype(&self, _file_dtype: DType) -> DType {
        DType::BF16
    }

    fn zeros(&self, len: usize, dtype: DType) -> Result<Buf> {
        self.alloc("zeros", len, dtype, true)
    }

    fn alloc(&self, len: usize, dtype: DType) -> Result<Buf> {
        // The inherent `alloc` (op name, zero flag), not this trait method.
        CudaBackend::alloc(self, "alloc", len, dtype, false)
    }

    fn upload(&self, data: HostData<'_>, dtype: DType) -> Result<Buf> {
        let op = "upload";
        let bytes: Vec<u8> = match (dtype, data) {
            (DType::U32, HostData::U32(x)) => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
            (DType::U32, _) => return Err(err(op, "only U32 host data can go to a U32 buffer")),
            (_, HostData::U32(_)) => return Err(err(op, format!("U32 host data cannot go to a {dtype:?} buffer"))),
            (DType::BF16, HostData::Bf16Bytes(b)) | (DType::F16, HostData::F16Bytes(b)) | (DType::F32, HostData::F32Bytes(b)) => b.to_vec(),
            (DType::F32, d) => d.to_f32().iter().flat_map(|v| v.to_le_bytes()).collect(),
            (DType::BF16, d) => bf16_bytes(&d.to_f32()),
            (DType::F16, d) => d.to_f32().iter().flat_map(|&x| half::f16::from_f32(x).to_le_bytes()).collect(),
        };
        let len = data.len();
        let buf = self.alloc(op, len, dtype, false)?;
        if !bytes.is_empty() {
            // Returns once the host vector may be dropped.
            self.write_bytes(op, &buf, &bytes)?;
        }
        Ok(buf)
    }

    fn download_f32(&self, buf: &Buf) -> Result<Vec<f32>> {
        let b = self.download_bytes("download", buf)?;
        Ok(match buf.dtype() {
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            DType::U32 => b.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32).collect(),
            DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F16 => b.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        })
    }

    fn copy(&self, src: &Buf, dst: &mut Buf) -> Result<()> {
        let op = "copy";
        check_len(op, "dst", dst, src.len())?;
        let n = src.len();
        let (s, d) = (self.ptr(op, "src", src)?, self.ptr(op, "dst", dst)?);
        match (src.dtype(), dst.dtype()) {
            (a, b) if a == b => self.copy_bytes(op, src, dst, n * a.size()),
            (DType::F32, DType::BF16) => self.launch(op, "cast_f32_bf16", grid1d(n), &[Arg::Ptr(s), Arg::Ptr(d), Arg::Size(n)]),
            (DType::BF16, DType::F32) => self.launch(op, "cast_bf16_f32", grid1d(n), &[Arg::Ptr(s), Arg::Ptr(d), Arg::Size(n)]),
            (a, b) => Err(err(op, format!("no conversion from {a:?} to {b:?} on cuda"))),
        }
    }

    fn fill(&self, buf: &mut Buf, value: f32) -> Result<()> {
        let op = "fill";
        let n = buf.len();
        let p = self.ptr(op, "buf", buf)?;
        match buf.dtype() {
            DType::F32 => self.launch(op, "fill_f32", grid1d(n), &[Arg::Ptr(p), Arg::Size(n), Arg::F32(value)]),
            DType::BF16 => self.launch(op, "fill_bf16", grid1d(n), &[Arg::Ptr(p), Arg::Size(n), Arg::F32(value)]),
            DType::U32 => {
                if value < 0.0 || value.fract() != 0.0 || value > u32::MAX as f32 {
                    return Err(err(op, format!("{value} is not a u32 value")));
                }
                self.launch(op, "fill_u32", grid1d(n), &[Arg::Ptr(p), Arg::Size(n), Arg::U32(value as u32)])
            }
            DType::F16 => Err(err(op, "filling an f16 buffer is not supported on cuda")),
        }
    }

    fn synchronize(&self) -> Result<()> {
        self.synchronize_device().map_err(|e| err("synchronize", e.to_string()))
    }

    fn set_profiling(&self, on: bool) -> bool {
        self.set_profile(on);
        true
    }

    fn take_profile(&self) -> Vec<(String, u64, f64)> {
        self.take_profile_table()
    }

    fn take_launched(&self) -> Vec<String> {
        self.take_launched_names()
    }

    fn device_counts(&self) -> Option<DeviceCounts> {
        Some(self.counts())
    }

    fn device_details(&self) -> Vec<(String, String)> {
        let (a, b) = self.compute_capability;
        let mut v = vec![("name".to_string(), self.name.clone()), ("compute capability".to_string(), format!("{a}.{b}"))];
        v.extend(self.dev.info().details.clone());
        v
    }

    fn peak_memory_bytes(&self) -> Option<u64> {
        Some(self.peak())
    }

    fn available_memory_bytes(&self) -> Option<u64> {
        self.free_memory()
    }

    fn gemm(&self, g: Gemm, a: &Buf, b: &Buf, c: &mut Buf) -> Result<()> {
        let op = "gemm";
        check_len(op, "a", a, g.m * g.k)?;
        check_len(op, "b", b, g.k * g.n)?;
        check_len(op, "c", c, g.m * g.n)?;
        need(op, "c", c, &[DType::F32])?;
        need(op, "a", a, &[DType::F32, DType::BF16])?;
        need(op, "b", b, &[DType::F32, DType::BF16])?;
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        if g.k == 0 {
            return if g.accumulate { Ok(()) } else { self.fill(c, 0.0) };
        }
        // Mixed operands: the f32 one is rounded to bf16 (bf16 in, f32 accumulate).
        let a_tmp = (a.dtype() == DType::F32 && b.dtype() == DType::BF16).then(|| self.to_bf16(op, a)).transpose()?;
        let b_tmp = (b.dtype() == DType::F32 && a.dtype() == DType::BF16).then(|| self.to_bf16(op, b)).transpose()?;
        let (a_use, b_use) = (a_tmp.as_ref().unwrap_or(a), b_tmp.as_ref().unwrap_or(b));
        let ty = if a_use.dtype() == DType::BF16 { DataType::Bf16 } else { DataType::F32 };
        let plan = MatmulPlan::row_major(op, g, ty);
        let (pa, pb, pc) = (self.ptr(op, "a", a_use)?, self.ptr(op, "b", b_use)?, self.ptr(op, "c", c)?);
        // cuBLAS "A" is our b, "B" our a (plan.rs).
        // SAFETY: lengths checked above against m, n, k, which give the plan's spans; the
        // temporaries live until the end of this call and their device memory is freed in stream
        // order (after the product has run).
        unsafe { self.matmul(&plan, pb, pa, pc) }
    }

    fn axpy(&self, alpha: f32, x: &Buf, y: &mut Buf) -> Result<()> {
        let op = "axpy";
        check_len(op, "y", y, x.len())?;
        need(op, "x", x, &[DType::F32])?;
        need(op, "y", y, &[DType::F32])?;
        let n = x.len();
        self.launch(op, "axpy_f32", grid1d(n), &[Arg::F32(alpha), Arg::Ptr(self.ptr(op, "x", x)?), Arg::Ptr(self.ptr(op, "y", y)?), Arg::Size(n)])
    }

    fn scale(&self, alpha: f32, y: &mut Buf) -> Result<()> {
        let op = "scale";
        need(op, "y", y, &[DType::F32])?;
        let n = y.len();
        self.launch(op, "scale_f32", grid1d(n), &[Arg::F32(alpha), Arg::Ptr(self.ptr(op, "y", y)?), Arg::Size(n)])
    }

    fn add_bias(&self, bias: &Buf, y: &mut Buf, rows: usize, cols: usize) -> Result<()> {
        let op = "add_bias";
        check_len(op, "bias", bias, cols)?;
        check_len(op, "y", y, rows * cols)?;
        need(op, "y", y, &[DType::F32])?;
        let k = kname("add_bias", suffix(op, "bias", bias)?);
        self.launch(op, k, grid1d(rows * cols), &[
            Arg::Ptr(self.ptr(op, "bias", bias)?),
            Arg::Ptr(self.ptr(op, "y", y)?),
            Arg::I32(i32_of(op, "rows", rows)?),
            Arg::I32(i32_of(op, "cols", cols)?),
        ])
    }

    fn scale_cols(&self, x: &Buf, s: &Buf, out: &mut Buf, rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        let op = "scale_cols";
        check_len(op, "x", x, rows * cols)?;
        check_len(op, "s", s, cols)?;
        check_len(op, "out", out, rows * cols)?;
        for (name, b) in [("x", x), ("s", s), ("out", &*out)] {
            need(op, name, b, &[DType::F32])?;
        }
        self.launch(op, "scale_cols_f32", grid1d(rows * cols), &[
            Arg::Ptr(self.ptr(op, "x", x)?),
            Arg::Ptr(self.ptr(op, "s", s)?),
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::I32(i32_of(op, "rows", rows)?),
            Arg::I32(i32_of(op, "cols", cols)?),
            Arg::I32(accumulate as i32),
        ])
    }

    fn div(&self, a: &Buf, b: &Buf, out: &mut Buf) -> Result<()> {
        let op = "div";
        let n = a.len();
        check_len(op, "b", b, n)?;
        check_len(op, "out", out, n)?;
        for (name, x) in [("a", a), ("b", b), ("out", &*out)] {
            need(op, name, x, &[DType::F32])?;
        }
        self.launch(op, "div_f32", grid1d(n), &[
            Arg::Ptr(self.ptr(op, "a", a)?),
            Arg::Ptr(self.ptr(op, "b", b)?),
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::Size(n),
        ])
    }

    fn copy_cols(&self, src: &Buf, src_cols: usize, src_col: usize, dst: &mut Buf, dst_cols: usize, dst_col: usize, rows: usize, width: usize) -> Result<()> {
        let op = "copy_cols";
        check_len(op, "src", src, rows * src_cols)?;
        check_len(op, "dst", dst, rows * dst_cols)?;
        if src_col + width > src_cols || dst_col + width > dst_cols {
            return Err(err(op, format!("columns {src_col}+{width} of {src_cols} into {dst_col}+{width} of {dst_cols}")));
        }
        need(op, "src", src, &[DType::F32])?;
        need(op, "dst", dst, &[DType::F32])?;
        let n = rows * width;
        if n == 0 {
            return Ok(());
        }
        self.launch(op, "copy_cols_f32", grid1d(n), &[
            Arg::Ptr(self.ptr(op, "src", src)?),
            Arg::Size(src_cols),
            Arg::Size(src_col),
            Arg::Ptr(self.ptr(op, "dst", dst)?),
            Arg::Size(dst_cols),
            Arg::Size(dst_col),
            Arg::Size(rows),
            Arg::Size(width),
        ])
    }

    fn gather_rows(&self, src: &Buf, idx: &Buf, scale: Option<&Buf>, dst: &mut Buf, rows: usize, dim: usize) -> Result<()> {
        self.rows_op("gather_rows", "gather_rows_f32", src, idx, scale, dst, rows, dim, true)
    }

    fn scatter_add_rows(&self, src: &Buf, idx: &Buf, scale: Option<&Buf>, dst: &mut Buf, rows: usize, dim: usize) -> Result<()> {
        self.rows_op("scatter_add_rows", "scatter_add_rows_f32", src, idx, scale, dst, rows, dim, false)
    }

    fn row_dot(&self, a: &Buf, b: &Buf, out: &mut Buf, rows: usize, dim: usize) -> Result<()> {
        let op = "row_dot";
        check_len(op, "a", a, rows * dim)?;
        check_len(op, "b", b, rows * dim)?;
        check_len(op, "out", out, rows)?;
        for (name, x) in [("a", a), ("b", b), ("out", &*out)] {
            need(op, name, x, &[DType::F32])?;
        }
        if rows == 0 {
            return Ok(());
        }
        self.launch(op, "row_dot_f32", grid1d(rows), &[
            Arg::Ptr(self.ptr(op, "a", a)?),
            Arg::Ptr(self.ptr(op, "b", b)?),
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::Size(rows),
            Arg::Size(dim),
        ])
    }

    fn col_dot(&self, a: &Buf, b: &Buf, out: &mut Buf, rows: usize, cols: usize, accumulate: bool) -> Result<()> {
        let op = "col_dot";
        check_len(op, "a", a, rows * cols)?;
        check_len(op, "b", b, rows * cols)?;
        check_len(op, "out", out, cols)?;
        for (name, x) in [("a", a), ("b", b), ("out", &*out)] {
            need(op, name, x, &[DType::F32])?;
        }
        let cfg = LaunchConfig { grid_dim: (cols.div_ceil(128).max(1) as u32, 1, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        self.launch(op, "col_dot_f32", cfg, &[
            Arg::Ptr(self.ptr(op, "a", a)?),
            Arg::Ptr(self.ptr(op, "b", b)?),
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::I32(i32_of(op, "rows", rows)?),
            Arg::I32(i32_of(op, "cols", cols)?),
            Arg::I32(accumulate as i32),
        ])
    }

    fn sum_squares(&self, bufs: &[&Buf]) -> Result<f64> {
        let op = "sum_squares";
        const BLOCKS: usize = 1024;
        if bufs.is_empty() {
            return Ok(0.0);
        }
        // One partial per block per buffer, all downloaded at once and added in order.
        let partial = self.alloc(op, bufs.len() * BLOCKS * 2, DType::F32, true)?; // f64 storage
        let base = self.ptr(op, "partial", &partial)?;
        for (i, b) in bufs.iter().enumerate() {
            need(op, &format!("bufs[{i}]"), b, &[DType::F32])?;
            let n = b.len();
            if n == 0 {
                continue;
            }
            // At most one block per 256 elements (a small buffer does not start 1024 blocks of
            // idle threads); the partials of unused blocks stay 0. The block count depends on
            // `n` only, so the sum's order, and its bits, are fixed.
            let blocks = n.div_ceil(256).min(BLOCKS) as u32;
            let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
            self.launch(op, "sum_squares_f32", cfg, &[
                Arg::Ptr(self.ptr(op, "buf", b)?),
                Arg::Size(n),
                Arg::Ptr(base + (i * BLOCKS * 8) as u64),
            ])?;
        }
        let bytes = self.download_bytes(op, &partial)?;
        Ok(bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8-byte chunk"))).sum())
    }

    fn embedding(&self, ids: &Buf, table: &Buf, out: &mut Buf, tokens: usize, dim: usize, scale: f32) -> Result<()> {
        let op = "embedding";
        check_len(op, "ids", ids, tokens)?;
        check_len(op, "out", out, tokens * dim)?;
        need(op, "ids", ids, &[DType::U32])?;
        need(op, "out", out, &[DType::F32])?;
        if dim == 0 || !table.len().is_multiple_of(dim) {
            return Err(err(op, format!("`table` has {} elements, not a multiple of dim {dim}", table.len())));
        }
        let vocab = table.len() / dim;
        let k = kname("embedding_fwd", suffix(op, "table", table)?);
        // "no bad id" sentinel, written as a u32 (not through an f32 fill value).
        let bad = self.alloc(op, 1, DType::U32, false)?;
        self.write_bytes(op, &bad, &u32::MAX.to_le_bytes())?;
        let cfg = per_row(tokens, dim);
        if tokens > 0 {
            self.launch(op, k, cfg, &[
                Arg::Ptr(self.ptr(op, "ids", ids)?),
                Arg::Ptr(self.ptr(op, "table", table)?),
                Arg::Ptr(self.ptr(op, "out", out)?),
                Arg::I32(i32_of(op, "tokens", tokens)?),
                Arg::I32(i32_of(op, "dim", dim)?),
                Arg::I32(i32_of(op, "vocab", vocab)?),
                Arg::F32(scale),
                Arg::Ptr(self.ptr(op, "bad", &bad)?),
            ])?;
        }
        let b = self.download_bytes(op, &bad)?;
        let pos = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        if pos != u32::MAX {
            let all = self.download_u32(op, ids)?;
            return Err(err(op, format!("token id {} at position {pos} is outside the vocabulary (size {vocab})", all[pos as usize])));
        }
        Ok(())
    }

    fn rmsnorm_fwd(&self, x: &Buf, w: &Buf, y: &mut Buf, rstd: &mut Buf, rows: usize, dim: usize, eps: f32) -> Result<()> {
        let op = "rmsnorm_fwd";
        check_len(op, "x", x, rows * dim)?;
        check_len(op, "w", w, dim)?;
        check_len(op, "y", y, rows * dim)?;
        check_len(op, "rstd", rstd, rows)?;
        for (name, b) in [("x", x), ("y", &*y), ("rstd", &*rstd)] {
            need(op, name, b, &[DType::F32])?;
        }
        if rows == 0 {
            return Ok(());
        }
        let k = kname("rmsnorm_fwd", suffix(op, "w", w)?);
        self.launch(op, k, per_row(rows, dim), &[
            Arg::Ptr(self.ptr(op, "x", x)?),
            Arg::Ptr(self.ptr(op, "w", w)?),
            Arg::Ptr(self.ptr(op, "y", y)?),
            Arg::Ptr(self.ptr(op, "rstd", rstd)?),
            Arg::I32(i32_of(op, "rows", rows)?),
            Arg::I32(i32_of(op, "dim", dim)?),
            Arg::F32(eps),
        ])
    }

    fn rmsnorm_bwd(&self, dy: &Buf, x: &Buf, w: &Buf, rstd: &Buf, dx: &mut Buf, rows: usize, dim: usize, accumulate: bool) -> Result<()> {
        let op = "rmsnorm_bwd";
        check_len(op, "dy", dy, rows * dim)?;
        check_len(op, "x", x, rows * dim)?;
        check_len(op, "w", w, dim)?;
        check_len(op, "rstd", rstd, rows)?;
        check_len(op, "dx", dx, rows * dim)?;
        for (name, b) in [("dy", dy), ("x", x), ("rstd", rstd), ("dx", &*dx)] {
            need(op, name, b, &[DType::F32])?;
        }
        if rows == 0 {
            return Ok(());
        }
        let k = kname("rmsnorm_bwd", suffix(op, "w", w)?);
        self.launch(op, k, per_row(rows, dim), &[
            Arg::Ptr(self.ptr(op, "dy", dy)?),
            Arg::Ptr(self.ptr(op, "x", x)?),
            Arg::Ptr(self.ptr(op, "w", w)?),
            Arg::Ptr(self.ptr(op, "rstd", rstd)?),
            Arg::Ptr(self.ptr(op, "dx", dx)?),
            Arg::I32(i32_of(op, "rows", rows)?),
            Arg::I32(i32_of(op, "dim", dim)?),
            Arg::I32(accumulate as i32),
        ])
    }

    fn rope(&self, x: &mut Buf, pos: &Buf, inv_freq: &Buf, tokens: usize, heads: usize, head_dim: usize, inverse: bool) -> Result<()> {
        self.rope_partial(x, pos, inv_freq, tokens, heads, head_dim, head_dim, 1.0, inverse)
    }

    fn rope_partial(&self, x: &mut Buf, pos: &Buf, inv_freq: &Buf, tokens: usize, heads: usize, head_dim: usize, rotary_dim: usize, scale: f32, inverse: bool) -> Result<()> {
        let op = "rope";
        if rotary_dim == 0 || !rotary_dim.is_multiple_of(2) || rotary_dim > head_dim {
            return Err(err(op, format!("rotary_dim {rotary_dim} must be even, positive and at most head_dim {head_dim}")));
        }
        check_len(op, "x", x, tokens * heads * head_dim)?;
        check_len(op, "pos", pos, tokens)?;
        check_len(op, "inv_freq", inv_freq, rotary_dim / 2)?;
        need(op, "x", x, &[DType::F32])?;
        need(op, "pos", pos, &[DType::U32])?;
        need(op, "inv_freq", inv_freq, &[DType::F32])?;
        let n = tokens * heads * rotary_dim / 2;
        if n == 0 {
            return Ok(());
        }
        self.launch(op, "rope_f32", grid1d(n), &[
            Arg::Ptr(self.ptr(op, "x", x)?),
            Arg::Ptr(self.ptr(op, "pos", pos)?),
            Arg::Ptr(self.ptr(op, "inv_freq", inv_freq)?),
            Arg::I32(i32_of(op, "tokens", tokens)?),
            Arg::I32(i32_of(op, "heads", heads)?),
            Arg::I32(i32_of(op, "head_dim", head_dim)?),
            Arg::I32(i32_of(op, "rotary_dim", rotary_dim)?),
            Arg::F32(scale),
            Arg::I32(inverse as i32),
        ])
    }

    fn attention_fwd(&self, a: Attn, q: &Buf, k: &Buf, v: &Buf, cu_seqlens: &Buf, out: &mut Buf, lse: &mut Buf) -> Result<()> {
        let op = "attention_fwd";
        self.check_attn(op, a, q, k, v, cu_seqlens)?;
        check_len(op, "out", out, a.tokens * a.n_heads * a.head_dim)?;
        check_len(op, "lse", lse, a.n_heads * a.tokens)?;
        need(op, "out", out, &[DType::F32])?;
        need(op, "lse", lse, &[DType::F32])?;
        if a.tokens == 0 {
            return Ok(());
        }
        if flash_supported(a.head_dim) {
            return self.flash_fwd(op, a, q, k, v, cu_seqlens, out, lse);
        }
        let hd = a.head_dim;
        let cfg = attention_cfg(a.tokens, a.n_heads, attention_smem_floats(hd).0);
        let mut args = vec![
            Arg::Ptr(self.ptr(op, "q", q)?),
            Arg::Ptr(self.ptr(op, "k", k)?),
            Arg::Ptr(self.ptr(op, "v", v)?),
            Arg::Ptr(self.ptr(op, "cu_seqlens", cu_seqlens)?),
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::Ptr(self.ptr(op, "lse", lse)?),
        ];
        args.extend(self.attn_sizes(op, a)?);
        self.launch(op, "attention_fwd_f32", cfg, &args)
    }

    fn attention_bwd(&self, a: Attn, q: &Buf, k: &Buf, v: &Buf, cu_seqlens: &Buf, out: &Buf, lse: &Buf, dout: &Buf, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf) -> Result<()> {
        let op = "attention_bwd";
        self.check_attn(op, a, q, k, v, cu_seqlens)?;
        let (nq, nkv) = (a.tokens * a.n_heads * a.head_dim, a.tokens * a.n_kv_heads * a.head_dim);
        check_len(op, "out", out, nq)?;
        check_len(op, "dout", dout, nq)?;
        check_len(op, "dq", dq, nq)?;
        check_len(op, "lse", lse, a.n_heads * a.tokens)?;
        check_len(op, "dk", dk, nkv)?;
        check_len(op, "dv", dv, nkv)?;
        for (name, b) in [("out", out), ("lse", lse), ("dout", dout), ("dq", &*dq), ("dk", &*dk), ("dv", &*dv)] {
            need(op, name, b, &[DType::F32])?;
        }
        if a.tokens == 0 {
            return Ok(());
        }
        if flash_supported(a.head_dim) {
            return self.flash_bwd(op, a, q, k, v, cu_seqlens, out, lse, dout, dq, dk, dv);
        }
        let delta = self.alloc(op, a.n_heads * a.tokens, DType::F32, false)?;
        let rows = a.tokens * a.n_heads;
        let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.launch(op, "attention_bwd_delta_f32", cfg, &[
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::Ptr(self.ptr(op, "dout", dout)?),
            Arg::Ptr(self.ptr(op, "delta", &delta)?),
            Arg::I32(i32_of(op, "tokens", a.tokens)?),
            Arg::I32(i32_of(op, "n_heads", a.n_heads)?),
            Arg::I32(i32_of(op, "head_dim", a.head_dim)?),
        ])?;
        let hd = a.head_dim;
        let common = [
            Arg::Ptr(self.ptr(op, "q", q)?),
            Arg::Ptr(self.ptr(op, "k", k)?),
            Arg::Ptr(self.ptr(op, "v", v)?),
            Arg::Ptr(self.ptr(op, "cu_seqlens", cu_seqlens)?),
            Arg::Ptr(self.ptr(op, "lse", lse)?),
            Arg::Ptr(self.ptr(op, "delta", &delta)?),
            Arg::Ptr(self.ptr(op, "dout", dout)?),
        ];
        let cfg = attention_cfg(a.tokens, a.n_heads, attention_smem_floats(hd).1);
        let mut args: Vec<Arg> = common.iter().map(copy_arg).collect();
        args.push(Arg::Ptr(self.ptr(op, "dq", dq)?));
        args.extend(self.attn_sizes(op, a)?);
        self.launch(op, "attention_bwd_dq_f32", cfg, &args)?;
        let cfg = attention_cfg(a.tokens, a.n_kv_heads, attention_smem_floats(hd).2);
        let mut args: Vec<Arg> = common.iter().map(copy_arg).collect();
        args.push(Arg::Ptr(self.ptr(op, "dk", dk)?));
        args.push(Arg::Ptr(self.ptr(op, "dv", dv)?));
        args.extend(self.attn_sizes(op, a)?);
        self.launch(op, "attention_bwd_dkv_f32", cfg, &args)
    }

    fn swiglu_fwd(&self, gate: &Buf, up: &Buf, h: &mut Buf) -> Result<()> {
        self.glu_fwd("swiglu_fwd", ["swiglu_fwd_f32", "swiglu_fwd_bf16"], gate, up, h)
    }

    fn swiglu_bwd(&self, gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf) -> Result<()> {
        self.glu_bwd("swiglu_bwd", ["swiglu_bwd_f32", "swiglu_bwd_bf16"], gate, up, dh, dgate, dup)
    }

    fn geglu_fwd(&self, gate: &Buf, up: &Buf, h: &mut Buf) -> Result<()> {
        self.glu_fwd("geglu_fwd", ["geglu_fwd_f32", "geglu_fwd_bf16"], gate, up, h)
    }

    fn geglu_bwd(&self, gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf) -> Result<()> {
        self.glu_bwd("geglu_bwd", ["geglu_bwd_f32", "geglu_bwd_bf16"], gate, up, dh, dgate, dup)
    }

    fn linear_cross_entropy(&self, c: CrossEntropy, hidden: &Buf, w: &Buf, targets: &Buf, dhidden: Option<&mut Buf>) -> Result<f64> {
        super::xent::linear_cross_entropy(self, c, hidden, w, targets, dhidden)
    }

    fn dropout(&self, x: &Buf, out: &mut Buf, p: f32, seed: u64) -> Result<()> {
        let op = "dropout";
        if !(0.0..1.0).contains(&p) {
            return Err(err(op, format!("probability {p} is outside [0, 1)")));
        }
        let n = x.len();
        check_len(op, "out", out, n)?;
        need(op, "x", x, &[DType::F32])?;
        need(op, "out", out, &[DType::F32])?;
        self.launch(op, "dropout_f32", grid1d(n), &[
            Arg::Ptr(self.ptr(op, "x", x)?),
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::Size(n),
            Arg::F32(p),
            Arg::U64(seed),
        ])
    }

    fn dora_weight_norm(&self, w: &Buf, a: &Buf, b: &Buf, scale: f32, norm: &mut Buf, out_f: usize, in_f: usize, r: usize) -> Result<()> {
        let op = "dora_weight_norm";
        check_len(op, "w", w, out_f * in_f)?;
        check_len(op, "a", a, r * in_f)?;
        check_len(op, "b", b, out_f * r)?;
        check_len(op, "norm", norm, out_f)?;
        for (name, x) in [("a", a), ("b", b), ("norm", &*norm)] {
            need(op, name, x, &[DType::F32])?;
        }
        if r > 256 {
            return Err(err(op, format!("rank {r} > 256 is not supported by the cuda kernel")));
        }
        if out_f == 0 {
            return Ok(());
        }
        let k = kname("dora_weight_norm", suffix(op, "w", w)?);
        self.launch(op, k, per_row(out_f, in_f), &[
            Arg::Ptr(self.ptr(op, "w", w)?),
            Arg::Ptr(self.ptr(op, "a", a)?),
            Arg::Ptr(self.ptr(op, "b", b)?),
            Arg::F32(scale),
            Arg::Ptr(self.ptr(op, "norm", norm)?),
            Arg::I32(i32_of(op, "out_f", out_f)?),
            Arg::I32(i32_of(op, "in_f", in_f)?),
            Arg::I32(i32_of(op, "r", r)?),
        ])
    }

    fn adamw(&self, o: AdamW, param: &mut Buf, grad: &Buf, m: &mut Buf, v: &mut Buf) -> Result<()> {
        let op = "adamw";
        let n = param.len();
        for (name, b) in [("param", &*param), ("grad", grad), ("m", &*m), ("v", &*v)] {
            check_len(op, name, b, n)?;
            need(op, name, b, &[DType::F32])?;
        }
        if o.step == 0 {
            return Err(err(op, "step must be >= 1 (it counts this update)"));
        }
        let step = o.step.min(i32::MAX as u64) as i32;
        let step_size = f64::from(o.lr) / (1.0 - f64::from(o.beta1).powi(step));
        let bc2_sqrt = (1.0 - f64::from(o.beta2).powi(step)).sqrt();
        self.launch(op, "adamw_f32", grid1d(n), &[
            Arg::Ptr(self.ptr(op, "param", param)?),
            Arg::Ptr(self.ptr(op, "grad", grad)?),
            Arg::Ptr(self.ptr(op, "m", m)?),
            Arg::Ptr(self.ptr(op, "v", v)?),
            Arg::Size(n),
            Arg::F32(o.lr),
            Arg::F32(o.beta1),
            Arg::F32(o.beta2),
            Arg::F32(o.eps),
            Arg::F32(o.weight_decay),
            Arg::F32(step_size as f32),
            Arg::F32(bc2_sqrt as f32),
            Arg::F32(o.grad_scale),
        ])
    }

    fn dequantize(&self, q: &DeviceQuant, round_to: DType, out: &mut Buf) -> Result<()> {
        let op = "dequantize";
        let n = q.numel();
        check_len(op, "out", out, n)?;
        let bf16_out = suffix(op, "out", out)? == "bf16";
        let round = match round_to {
            DType::F32 => 0,
            DType::BF16 => 1,
            DType::F16 => 2,
            DType::U32 => return Err(err(op, "round_to must be a float dtype")),
        };
        need(op, "data", &q.data, &[DType::U32])?;
        need(op, "scales", &q.scales, &[DType::F32])?;
        if n == 0 {
            return Ok(());
        }
        match q.format {
            QuantFormat::Four { quant_type, blocksize } => {
                let blocks = n.div_ceil(blocksize);
                if q.data.len() * 4 < n.div_ceil(2) {
                    return Err(err(op, format!("{} code bytes for {n} values", q.data.len() * 4)));
                }
                let (codes, map, offset) = match &q.nested {
                    Some(nd) => {
                        need(op, "nested codes", &nd.codes, &[DType::U32])?;
                        need(op, "nested map", &nd.map, &[DType::F32])?;
                        if nd.codes.len() * 4 < blocks || q.scales.len() != blocks.div_ceil(NESTED_BLOCKSIZE) || nd.map.len() != 256 {
                            return Err(err(op, format!("double-quant buffers do not fit {blocks} blocks")));
                        }
                        (self.ptr(op, "nested codes", &nd.codes)?, self.ptr(op, "nested map", &nd.map)?, nd.offset)
                    }
                    None => {
                        if q.scales.len() != blocks {
                            return Err(err(op, format!("{} absmax values for {blocks} blocks", q.scales.len())));
                        }
                        (0, 0, 0.0)
                    }
                };
                let kernel = if bf16_out { "dequant_4bit_bf16" } else { "dequant_4bit_f32" };
                self.launch(op, kernel, grid1d(n), &[
                    Arg::Ptr(self.ptr(op, "data", &q.data)?),
                    Arg::Ptr(self.ptr(op, "scales", &q.scales)?),
                    Arg::Ptr(codes),
                    Arg::Ptr(map),
                    Arg::F32(offset),
                    Arg::I32(i32::from(quant_type == QuantType::Fp4)),
                    Arg::I32(i32_of(op, "blocksize", blocksize)?),
                    Arg::I32(round),
                    Arg::Size(n),
                    Arg::Ptr(self.ptr(op, "out", out)?),
                ])
            }
            QuantFormat::Eight => {
                if q.data.len() * 4 < n || q.scales.len() != q.rows {
                    return Err(err(op, format!("int8 buffers do not fit [{}, {}]", q.rows, q.cols)));
                }
                let kernel = if bf16_out { "dequant_8bit_bf16" } else { "dequant_8bit_f32" };
                self.launch(op, kernel, grid1d(n), &[
                    Arg::Ptr(self.ptr(op, "data", &q.data)?),
                    Arg::Ptr(self.ptr(op, "scales", &q.scales)?),
                    Arg::I32(i32_of(op, "cols", q.cols)?),
                    Arg::I32(round),
                    Arg::Size(n),
                    Arg::Ptr(self.ptr(op, "out", out)?),
                ])
            }
        }
    }

    /// bf16 compute dequantizes into bf16 (the base weights' dtype, cuBLASLt's bf16 path); f16 and
    /// f32 into f32 buffers holding the rounded values.
    fn dequant_dtype(&self, compute: DType) -> DType {
        if compute == DType::BF16 { DType::BF16 } else { DType::F32 }
    }
}

fn copy_arg(a: &Arg) -> Arg {
    match a {
        Arg::Ptr(p) => Arg::Ptr(*p),
        Arg::U64(p) => Arg::U64(*p),
        Arg::I32(v) => Arg::I32(*v),
        Arg::F32(v) => Arg::F32(*v),
        Arg::Size(v) => Arg::Size(*v),
        Arg::U32(v) => Arg::U32(*v),
    }
}

impl CudaBackend {
    /// A gated MLP's `h = act(gate) * up` (SwiGLU, GeGLU), `[len]`, all f32 or all bf16.
    fn glu_fwd(&self, op: &'static str, kernels: [&'static str; 2], gate: &Buf, up: &Buf, h: &mut Buf) -> Result<()> {
        let n = gate.len();
        check_len(op, "up", up, n)?;
        check_len(op, "h", h, n)?;
        let kernel = by_dtype(op, kernels, &[("gate", gate), ("up", up), ("h", &*h)])?;
        self.launch(op, kernel, grid1d(n), &[
            Arg::Ptr(self.ptr(op, "gate", gate)?),
            Arg::Ptr(self.ptr(op, "up", up)?),
            Arg::Ptr(self.ptr(op, "h", h)?),
            Arg::Size(n),
        ])
    }

    /// A gated MLP's backward: `dgate = dh * up * act'(gate)`, `dup = dh * act(gate)` (written).
    #[allow(clippy::too_many_arguments)]
    fn glu_bwd(&self, op: &'static str, kernels: [&'static str; 2], gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf) -> Result<()> {
        let n = gate.len();
        for (name, b) in [("up", up), ("dh", dh), ("dgate", &*dgate), ("dup", &*dup)] {
            check_len(op, name, b, n)?;
        }
        let kernel = by_dtype(op, kernels, &[("gate", gate), ("up", up), ("dh", dh), ("dgate", &*dgate), ("dup", &*dup)])?;
        self.launch(op, kernel, grid1d(n), &[
            Arg::Ptr(self.ptr(op, "gate", gate)?),
            Arg::Ptr(self.ptr(op, "up", up)?),
            Arg::Ptr(self.ptr(op, "dh", dh)?),
            Arg::Ptr(self.ptr(op, "dgate", dgate)?),
            Arg::Ptr(self.ptr(op, "dup", dup)?),
            Arg::Size(n),
        ])
    }

    fn check_attn(&self, op: &'static str, a: Attn, q: &Buf, k: &Buf, v: &Buf, cu: &Buf) -> Result<()> {
        if a.n_kv_heads == 0 || !a.n_heads.is_multiple_of(a.n_kv_heads) {
            return Err(err(op, format!("{} query heads are not a multiple of {} kv heads", a.n_heads, a.n_kv_heads)));
        }
        if a.head_dim == 0 || a.head_dim > 32 * ATT_MAXC {
            return Err(err(op, format!("head_dim {} is outside 1..={}", a.head_dim, 32 * ATT_MAXC)));
        }
        if a.n_docs == 0 && a.tokens > 0 {
            return Err(err(op, "n_docs is 0 but there are tokens"));
        }
        check_len(op, "q", q, a.tokens * a.n_heads * a.head_dim)?;
        check_len(op, "k", k, a.tokens * a.n_kv_heads * a.head_dim)?;
        check_len(op, "v", v, a.tokens * a.n_kv_heads * a.head_dim)?;
        check_len(op, "cu_seqlens", cu, a.n_docs + 1)?;
        for (name, b) in [("q", q), ("k", k), ("v", v)] {
            need(op, name, b, &[DType::F32])?;
        }
        need(op, "cu_seqlens", cu, &[DType::U32])
    }

    fn attn_sizes(&self, op: &'static str, a: Attn) -> Result<Vec<Arg>> {
        Ok(vec![
            Arg::I32(i32_of(op, "tokens", a.tokens)?),
            Arg::I32(i32_of(op, "n_docs", a.n_docs)?),
            Arg::I32(i32_of(op, "n_heads", a.n_heads)?),
            Arg::I32(i32_of(op, "n_kv_heads", a.n_kv_heads)?),
            Arg::I32(i32_of(op, "head_dim", a.head_dim)?),
            Arg::F32(a.scale),
            Arg::I32(i32_of(op, "window", a.window)?),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's attention constants are the kernel's `#define`s, and its shared-memory sizes
    /// are the review's (hd 128: 35-37 KB; hd 256: 69.9 KB fwd, 74.2 KB dkv).
    #[test]
    fn attention_launch_constants_match_the_kernel_source() {
        let src = super::super::kernels::FAMILIES.iter().find(|f| f.file == "attention.cu").expect("attention.cu").source;
        let define = |name: &str| -> usize {
            let line = src.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap_or_else(|| panic!("no #define {name}"));
            line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
        };
        assert_eq!(define("ATT_WARPS"), ATT_WARPS);
        assert_eq!(define("ATT_TILE"), ATT_TILE);
        assert_eq!(define("ATT_MAXC"), ATT_MAXC);
        let bytes = |hd| {
            let (f, q, k) = attention_smem_floats(hd);
            (4 * f, 4 * q, 4 * k)
        };
        assert_eq!(bytes(256), (69_888, 73_984, 74_240));
        assert_eq!(bytes(128), (35_072, 37_120, 37_376));
        let cfg = attention_cfg(70, 3, 10);
        assert_eq!((cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes), ((18, 3, 1), (128, 1, 1), 40));
    }
}
