//! The op set every device implements, and the handles that cross it.
//!
//! Design (so a GPU backend can run a whole step without host round trips):
//! - A [`Buf`] is an opaque, device-resident, contiguous 1-D buffer with a length (in elements)
//!   and a [`DType`]. Shapes are never stored in the buffer: every op takes its sizes as explicit
//!   arguments and documents them. All matrices are row-major and contiguous.
//! - Base weights are uploaded in [`Backend::base_weight_dtype`] (bf16 on CUDA, f32 on CPU);
//!   activations live in [`Backend::activation_dtype`]; adapter weights, their gradients and the
//!   AdamW moments are always [`DType::F32`] (master weights). Index buffers (token ids,
//!   positions, targets, `cu_seqlens`) are [`DType::U32`].
//! - Ops take device buffers and write device buffers; only scalars come back (the loss sum of
//!   [`Backend::linear_cross_entropy`], the sum of squares of [`Backend::sum_squares`]).
//! - Ops that can add into their output take `accumulate: bool` (`out += …` instead of `out = …`).
//! - Randomness on the device is counter based: [`dropout_keep`] is THE definition of the
//!   dropout mask; every backend must produce exactly the same mask for the same seed.
//!
//! Gradients are named `d<x>`. Sizes: `t` tokens (all documents of a batch, concatenated),
//! `d` hidden size, `f` MLP size, `h` query heads, `hkv` key/value heads, `hd` head dim,
//! `v` vocabulary, `r` adapter rank.

use std::any::Any;

use crate::error::{EngineError, Result};
use crate::quant::DeviceQuant;

/// Element type of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    BF16,
    F16,
    U32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }

    /// The safetensors / Hugging Face spelling (`"F32"`, `"BF16"`, `"F16"`, `"U32"`).
    pub fn safetensors_name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::U32 => "U32",
        }
    }

    /// The `torch_dtype` spelling of config.json (`"float32"`, `"bfloat16"`, `"float16"`).
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::U32 => "uint32",
        }
    }
}

/// Where a backend computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    Cpu,
    /// A CUDA device by ordinal (after `CUDA_VISIBLE_DEVICES`).
    Cuda(usize),
    /// The CUDA backend on the CPU device emulator: the same ops and `.cu` kernels, run on the
    /// CPU (slow; for proving kernels without a GPU).
    Emu,
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Emu => write!(f, "emu"),
        }
    }
}

/// Running totals of the device work a backend enqueued ([`Backend::device_counts`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCounts {
    pub kernels: u64,
    pub matmuls: u64,
    pub memsets: u64,
    pub memset_bytes: u64,
}

impl DeviceCounts {
    /// The work done between `earlier` and `self`.
    pub fn since(self, earlier: DeviceCounts) -> DeviceCounts {
        DeviceCounts {
            kernels: self.kernels - earlier.kernels,
            matmuls: self.matmuls - earlier.matmuls,
            memsets: self.memsets - earlier.memsets,
            memset_bytes: self.memset_bytes - earlier.memset_bytes,
        }
    }
}

/// An opaque device buffer: `len` elements of `dtype`. The backend that made it owns the
/// representation (`store`), and downcasts it in its ops; a buffer handed to another backend
/// is a typed error, never a panic.
pub struct Buf {
    len: usize,
    dtype: DType,
    store: Box<dyn Any + Send + Sync>,
}

impl Buf {
    /// Wraps a backend's own storage. Called by backends only.
    pub fn from_store<S: Any + Send + Sync>(len: usize, dtype: DType, store: S) -> Self {
        Buf {
            len,
            dtype,
            store: Box::new(store),
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The backend's storage, if it is of type `S`.
    pub fn store<S: Any>(&self) -> Option<&S> {
        self.store.downcast_ref::<S>()
    }

    /// The backend's storage, mutably, if it is of type `S`.
    pub fn store_mut<S: Any>(&mut self) -> Option<&mut S> {
        self.store.downcast_mut::<S>()
    }
}

impl std::fmt::Debug for Buf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buf({} x {:?})", self.len, self.dtype)
    }
}

/// Host data to upload. Raw bytes are little-endian, as in safetensors.
#[derive(Debug, Clone, Copy)]
pub enum HostData<'a> {
    F32(&'a [f32]),
    U32(&'a [u32]),
    /// Little-endian bf16 bytes (2 per element).
    Bf16Bytes(&'a [u8]),
    /// Little-endian f16 bytes (2 per element).
    F16Bytes(&'a [u8]),
    /// Little-endian f32 bytes (4 per element).
    F32Bytes(&'a [u8]),
}

impl HostData<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            HostData::F32(x) => x.len(),
            HostData::U32(x) => x.len(),
            HostData::Bf16Bytes(b) | HostData::F16Bytes(b) => b.len() / 2,
            HostData::F32Bytes(b) => b.len() / 4,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts to f32 on the host (U32 values are converted numerically).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            HostData::F32(x) => x.to_vec(),
            HostData::U32(x) => x.iter().map(|&v| v as f32).collect(),
            HostData::Bf16Bytes(b) => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            HostData::F16Bytes(b) => b
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            HostData::F32Bytes(b) => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        }
    }
}

/// Sizes and flags of one matrix product `c[m,n] = alpha * op(a)[m,k] @ op(b)[k,n] (+ c)`.
/// `a` is stored `[m,k]`, or `[k,m]` when `ta`; `b` is stored `[k,n]`, or `[n,k]` when `tb`
/// (so a linear layer `y = x W^T` with `W [out,in]` is `m=t, n=out, k=in, tb=true`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub alpha: f32,
    /// `c += …` instead of `c = …`.
    pub accumulate: bool,
}

impl Gemm {
    /// `y[m,n] = x[m,k] @ w[n,k]^T`: the forward of a linear layer.
    pub fn linear(m: usize, n: usize, k: usize) -> Self {
        Gemm { m, n, k, ta: false, tb: true, alpha: 1.0, accumulate: false }
    }
}

/// Sizes of causal grouped-query attention over packed documents.
/// `q [t, h, hd]`, `k`/`v [t, hkv, hd]`, `out [t, h, hd]`, `lse [h, t]` (f32, natural log).
/// `cu_seqlens [n_docs + 1]` (U32) holds document starts in the token stream, first 0, last `t`;
/// a token attends to the tokens of its own document at or before it, nothing else.
/// Query head `i` uses key/value head `i / (h / hkv)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attn {
    pub tokens: usize,
    pub n_docs: usize,
    /// Longest document (a hint for tiling).
    pub max_seqlen: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q·k` before the softmax (`1/sqrt(hd)`, or Granite's `attention_multiplier`).
    pub scale: f32,
    /// Sliding window (Gemma 3's local layers): a query at position i of a document sees the
    /// keys j of that document with `i - window < j <= i`; 0 means no window (plain causal).
    pub window: usize,
}

/// Sizes and scalars of the fused output projection + cross-entropy.
/// `hidden [t, d]`, `w [v, d]`, `targets [t]` (U32; [`IGNORE_TARGET`] = no loss at this row).
/// `logits = (hidden @ w^T) * logit_scale`; loss row i = `logsumexp(logits_i) - logits_i[target_i]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropy {
    pub tokens: usize,
    pub dim: usize,
    pub vocab: usize,
    /// Granite divides logits by `logits_scaling`: pass `1/logits_scaling` (1 elsewhere).
    pub logit_scale: f32,
    /// `dhidden` is the gradient of `grad_scale * loss_sum` (the step's `1 / trained tokens`).
    pub grad_scale: f32,
}

/// A target row that contributes no loss.
pub const IGNORE_TARGET: u32 = u32::MAX;

/// One AdamW update, as `torch.optim.AdamW` (non-amsgrad, non-maximize) computes it:
/// `g = grad * grad_scale; p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g²;
///  p -= lr/(1-b1^step) * m / (sqrt(v)/sqrt(1-b2^step) + eps)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step count after this update.
    pub step: u64,
    /// Gradient clipping coefficient (`min(1, max_norm / (norm + 1e-6))`), 1 for none.
    pub grad_scale: f32,
}

/// The dropout mask: element `index` of a dropout call with `seed` is kept iff this is true.
/// Counter based (splitmix64 of seed and index), so every backend computes the same mask in any
/// order. Kept elements are scaled by `1/(1-p)`.
#[inline]
pub fn dropout_keep(seed: u64, index: u64, p: f32) -> bool {
    let z = splitmix64(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
    // 24 random bits -> [0, 1)
    let u = (z >> 40) as f32 * (1.0 / 16_777_216.0);
    u >= p
}

/// One splitmix64 step (the mixing function; also used to derive per-call seeds).
#[inline]
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The op set. One implementation per device (`cpu`, `cuda`). Object safe: the trainer holds
/// an `Arc<dyn Backend>` chosen at run time. Every op checks that buffer lengths match the sizes
/// it is given and returns [`EngineError::Shape`] otherwise.
pub trait Backend: Send + Sync {
    /// Short name for errors and logs (`"cpu"`, `"cuda"`).
    fn name(&self) -> &'static str;
    fn device(&self) -> Device;
    /// The dtype the model code allocates activations (and their gradients) in.
    fn activation_dtype(&self) -> DType;
    /// The dtype frozen base weights are kept in, given the dtype of the file.
    fn base_weight_dtype(&self, file_dtype: DType) -> DType;

    // ---- memory ----
    /// A zero-filled buffer.
    fn zeros(&self, len: usize, dtype: DType) -> Result<Buf>;
    /// A buffer whose contents are unspecified, for an output the next op writes in full (no
    /// memset). Reading an element before writing it is a bug: the CUDA emulator's fresh memory
    /// is 0xFF bytes (NaN in f32 and bf16), as is a GPU's with `LORA_CUDA_POISON=1`, so such a
    /// read fails the parity tests. Backends without a cheaper path return zeros.
    fn alloc(&self, len: usize, dtype: DType) -> Result<Buf> {
        self.zeros(len, dtype)
    }
    /// Uploads host data, converting it to `dtype` (U32 data must go to U32).
    fn upload(&self, data: HostData<'_>, dtype: DType) -> Result<Buf>;
    /// Downloads any float buffer as f32 (U32 as its numeric value).
    fn download_f32(&self, buf: &Buf) -> Result<Vec<f32>>;
    /// `dst = src` (same length; dtypes may differ: converts).
    fn copy(&self, src: &Buf, dst: &mut Buf) -> Result<()>;
    /// Every element of `buf` = `value`.
    fn fill(&self, buf: &mut Buf, value: f32) -> Result<()>;
    /// Waits for queued work (no-op on CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    /// Peak bytes this backend's device memory has held, if it tracks it (None on CPU: read the
    /// process's VmHWM instead).
    fn peak_memory_bytes(&self) -> Option<u64> {
        None
    }
    /// `(what, value)` lines about the device (name, compute capability, library versions, SM
    /// count, shared memory limits), for `lora selftest --stage env`; none on the CPU.
    fn device_details(&self) -> Vec<(String, String)> {
        Vec::new()
    }
    /// Starts (or stops) timing every device call by op: each launch and product is timed (CUDA
    /// events on a GPU, host time on the emulator), waited for, and added to its op's total.
    /// False when the backend cannot (the CPU).
    fn set_profiling(&self, on: bool) -> bool {
        let _ = on;
        false
    }
    /// The per-op totals since profiling started, `(op, calls, seconds)`, largest first; resets
    /// them.
    fn take_profile(&self) -> Vec<(String, u64, f64)> {
        Vec::new()
    }
    /// The kernels and products launched since the last call, each once, in first-launch order
    /// (so a failed selftest row can name the kernels behind it); none on the CPU.
    fn take_launched(&self) -> Vec<String> {
        Vec::new()
    }
    /// Device work enqueued since the backend was made (kernel launches, matrix products and
    /// memsets, the last with their bytes); None on the CPU.
    fn device_counts(&self) -> Option<DeviceCounts> {
        None
    }
    /// Bytes that can still be allocated for this backend's buffers, if known: the device's free
    /// memory on a GPU; on CPU the smaller of the kernel's `MemAvailable` and what the process's
    /// cgroup (a Kubernetes pod's memory limit) has left.
    fn available_memory_bytes(&self) -> Option<u64> {
        None
    }

    // ---- dense linear algebra ----
    /// `c[m,n] = alpha * op(a) @ op(b) (+ c)`; see [`Gemm`]. `a`, `b` may be base weights
    /// (bf16 on CUDA) or activations; accumulation is at least f32.
    fn gemm(&self, g: Gemm, a: &Buf, b: &Buf, c: &mut Buf) -> Result<()>;

    // ---- elementwise and reductions ----
    /// `y += alpha * x` (same length).
    fn axpy(&self, alpha: f32, x: &Buf, y: &mut Buf) -> Result<()>;
    /// `y *= alpha`.
    fn scale(&self, alpha: f32, y: &mut Buf) -> Result<()>;
    /// `y[rows, cols] += bias[cols]` (Qwen2 q/k/v bias).
    fn add_bias(&self, bias: &Buf, y: &mut Buf, rows: usize, cols: usize) -> Result<()>;
    /// `out[rows, cols] = x[rows, cols] * s[cols]` (`+ out` when `accumulate`).
    fn scale_cols(&self, x: &Buf, s: &Buf, out: &mut Buf, rows: usize, cols: usize, accumulate: bool) -> Result<()>;
    /// `out[i] = a[i] / b[i]` (same length; DoRA's `magnitude / weight_norm`).
    fn div(&self, a: &Buf, b: &Buf, out: &mut Buf) -> Result<()>;
    /// `out[cols] (+)= sum_i a[i, cols] * b[i, cols]` over `rows` rows, summed in a fixed order.
    fn col_dot(&self, a: &Buf, b: &Buf, out: &mut Buf, rows: usize, cols: usize, accumulate: bool) -> Result<()>;
    /// Sum of squares of all elements of all buffers (f32 in, f64 out): for the global grad norm.
    fn sum_squares(&self, bufs: &[&Buf]) -> Result<f64>;

    // ---- transformer ops ----
    /// `out[t, d] = table[ids[t], :] * scale` (Granite's `embedding_multiplier`, else 1).
    /// An id `>= vocab` is an error naming the position.
    fn embedding(&self, ids: &Buf, table: &Buf, out: &mut Buf, tokens: usize, dim: usize, scale: f32) -> Result<()>;
    /// RMSNorm over rows: `y = x * rstd * w`, `rstd = 1/sqrt(mean(x²) + eps)`.
    /// `x, y [rows, dim]`, `w [dim]`, `rstd [rows]` (f32, saved for backward).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_fwd(&self, x: &Buf, w: &Buf, y: &mut Buf, rstd: &mut Buf, rows: usize, dim: usize, eps: f32) -> Result<()>;
    /// RMSNorm input gradient (the weight is frozen): `dx (+)= rstd * (w*dy - xhat * mean(w*dy*xhat))`,
    /// `xhat = x * rstd`. Shapes as in [`Backend::rmsnorm_fwd`].
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(&self, dy: &Buf, x: &Buf, w: &Buf, rstd: &Buf, dx: &mut Buf, rows: usize, dim: usize, accumulate: bool) -> Result<()>;
    /// Rotary embedding in place on `x [t, heads, hd]`, Hugging Face's rotate-half layout
    /// (pairs `(i, i + hd/2)`), angle `pos[t] * inv_freq[i]` with `pos [t]` (U32, restarting at 0
    /// per document) and `inv_freq [hd/2]` (f32, rope scaling already applied).
    /// `inverse` rotates by the negative angle: the backward of the forward rotation.
    #[allow(clippy::too_many_arguments)]
    fn rope(&self, x: &mut Buf, pos: &Buf, inv_freq: &Buf, tokens: usize, heads: usize, head_dim: usize, inverse: bool) -> Result<()>;
    /// [`Backend::rope`] on only the first `rotary_dim` dims of each head (pairs
    /// `(i, i + rotary_dim/2)`, `inv_freq [rotary_dim/2]`; the other dims pass through), with
    /// cos and sin scaled by `scale` (LongRoPE's attention factor). The default serves only the
    /// plain case and refuses the rest by name on backends without a kernel for it.
    #[allow(clippy::too_many_arguments)]
    fn rope_partial(&self, x: &mut Buf, pos: &Buf, inv_freq: &Buf, tokens: usize, heads: usize, head_dim: usize, rotary_dim: usize, scale: f32, inverse: bool) -> Result<()> {
        if rotary_dim == head_dim && scale == 1.0 {
            return self.rope(x, pos, inv_freq, tokens, heads, head_dim, inverse);
        }
        Err(EngineError::Unsupported(format!(
            "partial rotary ({rotary_dim} of {head_dim} head dims) / RoPE attention factor {scale} has no kernel on the {} backend",
            self.name()
        )))
    }
    /// Copies a block of `width` columns of the row-major `src [rows, src_cols]` starting at
    /// column `src_col` into `dst [rows, dst_cols]` at column `dst_col` (how a fused projection's
    /// output is split into its parts and their gradients joined). The default goes through
    /// the host; backends override it.
    #[allow(clippy::too_many_arguments)]
    fn copy_cols(&self, src: &Buf, src_cols: usize, src_col: usize, dst: &mut Buf, dst_cols: usize, dst_col: usize, rows: usize, width: usize) -> Result<()> {
        check_len("copy_cols", "src", src, rows * src_cols)?;
        check_len("copy_cols", "dst", dst, rows * dst_cols)?;
        if src_col + width > src_cols || dst_col + width > dst_cols {
            return Err(EngineError::Backend { backend: self.name(), op: "copy_cols", msg: format!("columns {src_col}+{width} of {src_cols} into {dst_col}+{width} of {dst_cols}") });
        }
        let from = self.download_f32(src)?;
        let mut to = self.download_f32(dst)?;
        for r in 0..rows {
            to[r * dst_cols + dst_col..r * dst_cols + dst_col + width].copy_from_slice(&from[r * src_cols + src_col..r * src_cols + src_col + width]);
        }
        *dst = self.upload(HostData::F32(&to), dst.dtype())?;
        Ok(())
    }
    /// `dst[i] = src[idx[i]] * scale[i]` (scale 1 without one) for `rows` rows of `dim`
    /// (the expert dispatch of [`crate::moe`]); an index outside `src`'s rows is an error (on
    /// CUDA, checked on the emulator and with `LORA_CUDA_SYNC=1`; the caller guarantees it).
    fn gather_rows(&self, src: &Buf, idx: &Buf, scale: Option<&Buf>, dst: &mut Buf, rows: usize, dim: usize) -> Result<()>;
    /// `dst[idx[i]] += src[i] * scale[i]` for `rows` rows of `dim`; the rows `idx` names must
    /// be distinct (an expert's tokens: a repeated row is an error, checked as for
    /// `gather_rows`), so the result does not depend on an order.
    fn scatter_add_rows(&self, src: &Buf, idx: &Buf, scale: Option<&Buf>, dst: &mut Buf, rows: usize, dim: usize) -> Result<()>;
    /// `out[i] = sum_j a[i, j] b[i, j]` (f32 `out [rows]`).
    fn row_dot(&self, a: &Buf, b: &Buf, out: &mut Buf, rows: usize, dim: usize) -> Result<()>;
    /// Causal GQA attention over packed documents; see [`Attn`] for shapes. Writes `out` and
    /// the per-row log-sum-exp `lse [h, t]` (f32) for the backward.
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(&self, a: Attn, q: &Buf, k: &Buf, v: &Buf, cu_seqlens: &Buf, out: &mut Buf, lse: &mut Buf) -> Result<()>;
    /// Attention backward: writes (not accumulates) `dq [t,h,hd]`, `dk`, `dv [t,hkv,hd]`.
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        a: Attn,
        q: &Buf,
        k: &Buf,
        v: &Buf,
        cu_seqlens: &Buf,
        out: &Buf,
        lse: &Buf,
        dout: &Buf,
        dq: &mut Buf,
        dk: &mut Buf,
        dv: &mut Buf,
    ) -> Result<()>;
    /// `h = silu(gate) * up`, all `[len]`.
    fn swiglu_fwd(&self, gate: &Buf, up: &Buf, h: &mut Buf) -> Result<()>;
    /// SwiGLU backward: `dgate = dh * up * silu'(gate)`, `dup = dh * silu(gate)` (written).
    fn swiglu_bwd(&self, gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf) -> Result<()>;
    /// `h = gelu_pytorch_tanh(gate) * up` (Gemma 3's GeGLU), all `[len]`.
    fn geglu_fwd(&self, gate: &Buf, up: &Buf, h: &mut Buf) -> Result<()> {
        let _ = (gate, up, h);
        Err(EngineError::Backend { backend: self.name(), op: "geglu_fwd", msg: "GeGLU (Gemma 3) has no kernel on this backend yet; use --device cpu".into() })
    }
    /// GeGLU backward, as [`Backend::swiglu_bwd`] with GELU (tanh approximation) for SiLU.
    fn geglu_bwd(&self, gate: &Buf, up: &Buf, dh: &Buf, dgate: &mut Buf, dup: &mut Buf) -> Result<()> {
        let _ = (gate, up, dh, dgate, dup);
        Err(EngineError::Backend { backend: self.name(), op: "geglu_bwd", msg: "GeGLU (Gemma 3) has no kernel on this backend yet; use --device cpu".into() })
    }
    /// Fused output projection + cross-entropy, chunked over tokens so the `[t, v]` logits are
    /// never held at once (see [`CrossEntropy`]). Returns the loss summed over target rows (f64).
    /// With `dhidden [t, d]`, writes the gradient of `grad_scale * loss_sum` w.r.t. `hidden`
    /// (zero on rows without a target); `w` is frozen.
    fn linear_cross_entropy(&self, c: CrossEntropy, hidden: &Buf, w: &Buf, targets: &Buf, dhidden: Option<&mut Buf>) -> Result<f64>;

    // ---- adapters ----
    /// Inverted dropout: `out[i] = x[i] / (1-p)` if `dropout_keep(seed, i, p)` else 0.
    /// Applying it to a gradient with the same seed is its backward.
    fn dropout(&self, x: &Buf, out: &mut Buf, p: f32, seed: u64) -> Result<()>;
    /// DoRA's per-output-row weight norm `norm[o] = || w[o,:] + scale * (b @ a)[o,:] ||_2`
    /// with `w [out, in]` (base dtype), `a [r, in]`, `b [out, r]`, `norm [out]` (f32).
    #[allow(clippy::too_many_arguments)]
    fn dora_weight_norm(&self, w: &Buf, a: &Buf, b: &Buf, scale: f32, norm: &mut Buf, out_f: usize, in_f: usize, r: usize) -> Result<()>;

    // ---- optimizer ----
    /// One AdamW update of `param` from `grad` with moments `m`, `v` (all f32, same length).
    fn adamw(&self, o: AdamW, param: &mut Buf, grad: &Buf, m: &mut Buf, v: &mut Buf) -> Result<()>;

    // ---- quantized base weights ----
    /// Dequantizes a bitsandbytes 4-bit or 8-bit weight (see [`crate::quant`]) into
    /// `out [rows * cols]` (a float buffer), each value rounded to `round_to` first: 4-bit
    /// `CODE[q_i] * absmax[i / blocksize]` with double quant's `absmax_j = MAP[c_j] * nested[j /
    /// 256] + offset`; 8-bit `(CB * SCB) * (1/127)`, all in f32.
    fn dequantize(&self, q: &DeviceQuant, round_to: DType, out: &mut Buf) -> Result<()> {
        let _ = (q, round_to, out);
        Err(EngineError::Backend {
            backend: self.name(),
            op: "dequantize",
            msg: "quantized base weights (training_lora_load_in_4bit / _8bit) are not supported on this backend yet".into(),
        })
    }

    /// The dtype a dequantized weight is held in for the matrix products, given the requested
    /// compute dtype (its values are rounded to `compute` either way). The CPU keeps f32.
    fn dequant_dtype(&self, compute: DType) -> DType {
        let _ = compute;
        DType::F32
    }
}

/// Checks that `buf` has `len` elements; the error names the op and the argument.
pub fn check_len(op: &'static str, arg: &str, buf: &Buf, len: usize) -> Result<()> {
    if buf.len() != len {
        return Err(EngineError::Shape {
            op,
            msg: format!("`{arg}` has {} elements, expected {len}", buf.len()),
        });
    }
    Ok(())
}

