//! Fused output projection + cross-entropy on CUDA, chunked over tokens so at most
//! `chunk x vocab` logits exist at once (about 256 MiB of f32; ~440 rows for a 152k vocabulary).
//! Per chunk: hidden rows -> bf16, logits = h @ w^T (cuBLASLt, f32 out), one kernel computes
//! the per-row loss and writes bf16 dlogits, then dhidden rows = dlogits @ w. The per-row losses
//! stay on the device until the end, where they are downloaded once and summed in order (f64).

use cudarc::driver::LaunchConfig;

use super::plan::{DataType, MatmulPlan};
use super::{Arg, CudaBackend, err};
use crate::backend::{Backend, Buf, CrossEntropy, DType, Gemm, check_len};
use crate::error::Result;

/// Bytes of f32 logits one chunk may hold.
const CHUNK_BYTES: usize = 256 << 20;

pub(crate) fn linear_cross_entropy(
    be: &CudaBackend,
    c: CrossEntropy,
    hidden: &Buf,
    w: &Buf,
    targets: &Buf,
    dhidden: Option<&mut Buf>,
) -> Result<f64> {
    let op = "linear_cross_entropy";
    let (t, d, v) = (c.tokens, c.dim, c.vocab);
    check_len(op, "hidden", hidden, t * d)?;
    check_len(op, "w", w, v * d)?;
    check_len(op, "targets", targets, t)?;
    if hidden.dtype() != DType::F32 {
        return Err(err(op, format!("`hidden` is {:?}, expected F32", hidden.dtype())));
    }
    if targets.dtype() != DType::U32 {
        return Err(err(op, format!("`targets` is {:?}, expected U32", targets.dtype())));
    }
    if let Some(dh) = dhidden.as_deref() {
        check_len(op, "dhidden", dh, t * d)?;
        if dh.dtype() != DType::F32 {
            return Err(err(op, format!("`dhidden` is {:?}, expected F32", dh.dtype())));
        }
    }
    if t == 0 {
        return Ok(0.0);
    }
    if v == 0 || d == 0 {
        return Err(err(op, format!("vocab {v} and dim {d} must be positive")));
    }
    // Targets are checked once on the host (they are small): an out-of-range target is an error
    // naming its row, not a silent read past the logits.
    let host_targets = be.download_u32(op, targets)?;
    if let Some((row, tgt)) = host_targets.iter().enumerate().find(|(_, x)| **x != u32::MAX && **x as usize >= v) {
        return Err(err(op, format!("target {tgt} at row {row} is outside the vocabulary (size {v})")));
    }
    let w_bf16_tmp = match w.dtype() {
        DType::BF16 => None,
        DType::F32 => {
            let mut tmp = be.alloc(op, w.len(), DType::BF16, false)?;
            be.copy(w, &mut tmp)?;
            Some(tmp)
        }
        other => return Err(err(op, format!("`w` is {other:?}, expected BF16 or F32"))),
    };
    let w16 = w_bf16_tmp.as_ref().unwrap_or(w);
    let chunk = (CHUNK_BYTES / (4 * v)).clamp(1, t);
    let logits = be.alloc(op, chunk * v, DType::F32, false)?;
    let dlogits = if dhidden.is_some() { Some(be.alloc(op, chunk * v, DType::BF16, false)?) } else { None };
    let h16 = be.alloc(op, chunk * d, DType::BF16, false)?;
    let loss = be.alloc(op, t, DType::F32, false)?;
    let (p_hidden, p_w, p_tg) = (be.ptr(op, "hidden", hidden)?, be.ptr(op, "w", w16)?, be.ptr(op, "targets", targets)?);
    let (p_logits, p_h16, p_loss) = (be.ptr(op, "logits", &logits)?, be.ptr(op, "h16", &h16)?, be.ptr(op, "loss", &loss)?);
    let p_dlogits = match &dlogits {
        Some(b) => be.ptr(op, "dlogits", b)?,
        None => 0,
    };
    let p_dhidden = match dhidden.as_deref() {
        Some(b) => Some(be.ptr(op, "dhidden", b)?),
        None => None,
    };
    let threads = 1024u32.min((v.div_ceil(32) * 32) as u32);
    for r0 in (0..t).step_by(chunk) {
        let rows = chunk.min(t - r0);
        let n = rows * d;
        be.launch(op, "cast_f32_bf16", LaunchConfig {
            grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }, &[Arg::Ptr(p_hidden + (r0 * d * 4) as u64), Arg::Ptr(p_h16), Arg::Size(n)])?;
        let fwd = MatmulPlan::row_major("linear_cross_entropy (logits)", Gemm::linear(rows, v, d), DataType::Bf16);
        // SAFETY: h16 holds chunk*d >= rows*d bf16, w holds v*d bf16, logits chunk*v f32
        // (cuBLAS "A" is w, "B" is h16).
        unsafe { be.matmul(&fwd, p_w, p_h16, p_logits) }?;
        be.launch(op, "cross_entropy_fwd_bwd_f32", LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        }, &[
            Arg::Ptr(p_logits),
            Arg::Ptr(p_tg + (r0 * 4) as u64),
            Arg::Ptr(p_loss + (r0 * 4) as u64),
            Arg::Ptr(p_dlogits),
            Arg::I32(rows as i32),
            Arg::I32(i32::try_from(v).map_err(|_| err(op, format!("vocab {v} exceeds i32")))?),
            Arg::F32(c.logit_scale),
            Arg::F32(c.grad_scale),
        ])?;
        if let Some(p_dh) = p_dhidden {
            let bwd = MatmulPlan::row_major("linear_cross_entropy (dhidden)", Gemm { m: rows, n: d, k: v, ta: false, tb: false, alpha: 1.0, accumulate: false }, DataType::Bf16);
            // SAFETY: dlogits holds rows*v bf16, w v*d bf16, dhidden rows r0.. of t*d f32
            // (cuBLAS "A" is w, "B" is dlogits).
            unsafe { be.matmul(&bwd, p_w, p_dlogits, p_dh + (r0 * d * 4) as u64) }?;
        }
    }
    let losses = be.download_f32(&loss)?;
    Ok(losses.iter().map(|&x| f64::from(x)).sum())
}
