//! Launches of the tensor-core flash attention (`kernels/flash_attention.cu`) for head dims 64,
//! 128 and 256; ops.rs's `attention_fwd`/`attention_bwd` come here for those and keep
//! `attention.cu` for the rest.
//!
//! Activations are f32 in this backend, so q, k, v (and dout) are cast to bf16 first, one cast
//! kernel each; the kernels write `out`, `dq`, `dk`, `dv` as f32 directly.

use cudarc::driver::LaunchConfig;

use super::{Arg, CudaBackend, err};
use crate::backend::{Attn, Buf, DType};
use crate::error::Result;

/// The `#define`s of `flash_attention.cu` (a test holds them equal, CUDA-REVIEW S6): warps per
/// block; query rows per block (forward, dq) and keys per block (dk/dv), 16 per warp; keys per
/// forward tile; keys per dq tile and queries per dk/dv tile; bf16 padding of a shared row.
pub(crate) const FLASH_WARPS: usize = 4;
pub(crate) const FLASH_BM: usize = 64;
pub(crate) const FLASH_BN: usize = 64;
pub(crate) const FLASH_BWD_BN: usize = 32;
pub(crate) const FLASH_PAD: usize = 8;

/// Head dims with a flash kernel.
pub const FLASH_HEAD_DIMS: [usize; 3] = [64, 128, 256];

/// Whether attention with this head dim runs on the flash kernels.
pub fn flash_supported(head_dim: usize) -> bool {
    FLASH_HEAD_DIMS.contains(&head_dim)
}

/// Dynamic shared memory (bytes) of the forward, dq and dk/dv kernels, from their layouts in the
/// kernel file: bf16 tiles of `hd + FLASH_PAD` per row, and dk/dv's f32 lse and delta tiles.
pub fn flash_smem_bytes(hd: usize) -> (usize, usize, usize) {
    let row = (hd + FLASH_PAD) * 2;
    let fwd = (FLASH_BM + 4 * FLASH_BN) * row;
    let bwd = (2 * FLASH_BM + 4 * FLASH_BWD_BN) * row;
    (fwd, bwd, bwd + 4 * FLASH_BWD_BN * 4)
}

/// One block of FLASH_WARPS warps per FLASH_BM rows (queries or keys), per head.
pub fn flash_cfg(rows: usize, heads: usize, smem: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(FLASH_BM) as u32, heads as u32, 1),
        block_dim: ((32 * FLASH_WARPS) as u32, 1, 1),
        shared_mem_bytes: smem as u32,
    }
}

/// The detail line (device.rs `DeviceInfo::details`) with the per-block shared-memory opt-in.
pub(crate) const SMEM_OPTIN_DETAIL: &str = "shared memory per block (opt-in, bytes)";

impl CudaBackend {
    /// Refuses a launch whose shared memory exceeds the device's opt-in limit, naming both.
    fn flash_smem_fits(&self, op: &'static str, kernel: &str, bytes: usize) -> Result<()> {
        let limit = self.dev.info().details.iter().find(|(k, _)| k == SMEM_OPTIN_DETAIL).and_then(|(_, v)| v.parse::<usize>().ok());
        match limit {
            Some(l) if bytes > l => Err(err(op, format!("{kernel} needs {bytes} bytes of shared memory per block; this device allows {l}"))),
            _ => Ok(()),
        }
    }

    fn flash_sizes(&self, op: &'static str, a: Attn) -> Result<Vec<Arg>> {
        let i = |what: &str, v: usize| i32::try_from(v).map_err(|_| err(op, format!("{what} = {v} exceeds the kernels' i32 range")));
        Ok(vec![
            Arg::I32(i("tokens", a.tokens)?),
            Arg::I32(i("n_docs", a.n_docs)?),
            Arg::I32(i("n_heads", a.n_heads)?),
            Arg::I32(i("n_kv_heads", a.n_kv_heads)?),
            Arg::F32(a.scale),
            Arg::I32(i("window", a.window)?),
        ])
    }

    /// Forward; the caller checked shapes and dtypes (ops.rs `check_attn`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn flash_fwd(&self, op: &'static str, a: Attn, q: &Buf, k: &Buf, v: &Buf, cu: &Buf, out: &mut Buf, lse: &mut Buf) -> Result<()> {
        let hd = a.head_dim;
        let kernel = flash_kernel(op, FWD, hd)?;
        let smem = flash_smem_bytes(hd).0;
        self.flash_smem_fits(op, kernel, smem)?;
        let (q16, k16, v16) = (self.to_bf16(op, q)?, self.to_bf16(op, k)?, self.to_bf16(op, v)?);
        let mut args = vec![
            Arg::Ptr(self.ptr(op, "q", &q16)?),
            Arg::Ptr(self.ptr(op, "k", &k16)?),
            Arg::Ptr(self.ptr(op, "v", &v16)?),
            Arg::Ptr(self.ptr(op, "cu_seqlens", cu)?),
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::Ptr(self.ptr(op, "lse", lse)?),
        ];
        args.extend(self.flash_sizes(op, a)?);
        self.launch(op, kernel, flash_cfg(a.tokens, a.n_heads, smem), &args)
    }

    /// Backward: the delta pre-pass, then dq, then dk/dv (each output written by one thread).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn flash_bwd(&self, op: &'static str, a: Attn, q: &Buf, k: &Buf, v: &Buf, cu: &Buf, out: &Buf, lse: &Buf, dout: &Buf, dq: &mut Buf, dk: &mut Buf, dv: &mut Buf) -> Result<()> {
        let hd = a.head_dim;
        let (_, smem_dq, smem_dkv) = flash_smem_bytes(hd);
        let (kdq, kdkv) = (flash_kernel(op, DQ, hd)?, flash_kernel(op, DKV, hd)?);
        self.flash_smem_fits(op, kdq, smem_dq)?;
        self.flash_smem_fits(op, kdkv, smem_dkv)?;
        let (q16, k16, v16, do16) = (self.to_bf16(op, q)?, self.to_bf16(op, k)?, self.to_bf16(op, v)?, self.to_bf16(op, dout)?);
        let delta = self.alloc(op, a.n_heads * a.tokens, DType::F32, false)?;
        let rows = a.tokens * a.n_heads;
        let i = |what: &str, v: usize| i32::try_from(v).map_err(|_| err(op, format!("{what} = {v} exceeds the kernels' i32 range")));
        let cfg = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        self.launch(op, "flash_bwd_delta", cfg, &[
            Arg::Ptr(self.ptr(op, "out", out)?),
            Arg::Ptr(self.ptr(op, "dout", &do16)?),
            Arg::Ptr(self.ptr(op, "delta", &delta)?),
            Arg::I32(i("tokens", a.tokens)?),
            Arg::I32(i("n_heads", a.n_heads)?),
            Arg::I32(i("head_dim", hd)?),
        ])?;
        let common = || -> Result<Vec<Arg>> {
            Ok(vec![
                Arg::Ptr(self.ptr(op, "q", &q16)?),
                Arg::Ptr(self.ptr(op, "k", &k16)?),
                Arg::Ptr(self.ptr(op, "v", &v16)?),
                Arg::Ptr(self.ptr(op, "cu_seqlens", cu)?),
                Arg::Ptr(self.ptr(op, "lse", lse)?),
                Arg::Ptr(self.ptr(op, "delta", &delta)?),
                Arg::Ptr(self.ptr(op, "dout", &do16)?),
            ])
        };
        let mut args = common()?;
        args.push(Arg::Ptr(self.ptr(op, "dq", dq)?));
        args.extend(self.flash_sizes(op, a)?);
        self.launch(op, kdq, flash_cfg(a.tokens, a.n_heads, smem_dq), &args)?;
        let mut args = common()?;
        args.push(Arg::Ptr(self.ptr(op, "dk", dk)?));
        args.push(Arg::Ptr(self.ptr(op, "dv", dv)?));
        args.extend(self.flash_sizes(op, a)?);
        self.launch(op, kdkv, flash_cfg(a.tokens, a.n_kv_heads, smem_dkv), &args)
    }
}

/// The kernels of each pass (forward, dq, dk/dv), by position of the head dim in
/// [`FLASH_HEAD_DIMS`].
const KERNELS: [[&str; 3]; 3] = [
    ["flash_fwd_hd64", "flash_fwd_hd128", "flash_fwd_hd256"],
    ["flash_bwd_dq_hd64", "flash_bwd_dq_hd128", "flash_bwd_dq_hd256"],
    ["flash_bwd_dkv_hd64", "flash_bwd_dkv_hd128", "flash_bwd_dkv_hd256"],
];
const FWD: usize = 0;
const DQ: usize = 1;
const DKV: usize = 2;

/// The kernel of `pass` for head dim `hd`.
fn flash_kernel(op: &'static str, pass: usize, hd: usize) -> Result<&'static str> {
    let i = FLASH_HEAD_DIMS.iter().position(|&d| d == hd).ok_or_else(|| err(op, format!("no flash kernel for head_dim {hd}")))?;
    Ok(KERNELS[pass][i])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host's constants are the kernel file's `#define`s, and every kernel fits the sm_90
    /// opt-in limit (227 KiB) at every supported head dim.
    #[test]
    fn flash_constants_match_the_kernel_source_and_fit_shared_memory() {
        let src = super::super::kernels::FAMILIES.iter().find(|f| f.file == "flash_attention.cu").expect("flash_attention.cu").source;
        let define = |name: &str| -> usize {
            let line = src.lines().find(|l| l.starts_with(&format!("#define {name} "))).unwrap_or_else(|| panic!("no #define {name}"));
            line.split_whitespace().nth(2).and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{line}"))
        };
        assert_eq!(
            [define("FLASH_WARPS"), define("FLASH_BM"), define("FLASH_BN"), define("FLASH_BWD_BN"), define("FLASH_PAD")],
            [FLASH_WARPS, FLASH_BM, FLASH_BN, FLASH_BWD_BN, FLASH_PAD]
        );
        assert_eq!(FLASH_BM, 16 * FLASH_WARPS, "each warp owns 16 rows");
        for hd in FLASH_HEAD_DIMS {
            let (f, q, k) = flash_smem_bytes(hd);
            assert!(f.max(q).max(k) <= 232_448, "hd {hd}: {f} / {q} / {k} bytes");
            for pass in [FWD, DQ, DKV] {
                let name = flash_kernel("test", pass, hd).unwrap();
                assert!(super::super::kernels::FAMILIES.iter().any(|f| f.kernels.contains(&name)), "{name} not in the kernel table");
            }
        }
        assert_eq!(flash_smem_bytes(128), (87_040, 69_632, 70_144));
        // The CPU oracle's twin of the forward rounds with the same tiles.
        assert_eq!((crate::cpu::FLASH_BM, crate::cpu::FLASH_BN, crate::cpu::FLASH_HEAD_DIMS), (FLASH_BM, FLASH_BN, FLASH_HEAD_DIMS));
    }
}
