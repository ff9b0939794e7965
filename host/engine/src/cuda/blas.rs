//! Matrix products through cuBLASLt: row-major `c[m,n] = alpha * op(a) @ op(b) + beta * c`,
//! with a and b both bf16 or both f32, c f32, f32 accumulation (`CUBLAS_COMPUTE_32F`, no TF32).
//!
//! cuBLASLt is column-major, so the row-major product is computed as its transpose:
//! `c^T[n,m] = op(b)^T @ op(a)^T`, i.e. cuBLAS "A" is our `b` and cuBLAS "B" is our `a`.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{EngineError, Result};

fn err(msg: String) -> EngineError {
    EngineError::Backend { backend: "cuda", op: "gemm", msg }
}

/// Element type of the a/b operands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operand {
    Bf16,
    F32,
}

/// A cuBLASLt handle, its workspace, and the stream it runs on.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
}

// SAFETY: a cuBLASLt handle is thread safe (NVIDIA documents cublasLtHandle_t as usable from
// several host threads); the workspace is only used by work enqueued on our one stream, which
// runs it in order.
unsafe impl Send for Lt {}
// SAFETY: as above.
unsafe impl Sync for Lt {}

/// Owned cuBLASLt descriptors, destroyed on drop (errors on destroy are ignored: nothing to do).
struct Desc(sys::cublasLtMatmulDesc_t);
struct Layout(sys::cublasLtMatrixLayout_t);
struct Pref(sys::cublasLtMatmulPreference_t);
impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_desc and destroyed exactly once.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}
impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by create_matrix_layout and destroyed exactly once.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}
impl Drop for Pref {
    fn drop(&mut self) {
        // SAFETY: created by create_matmul_pref and destroyed exactly once.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// Sizes of one row-major product; `ta`: a is stored `[k,m]`; `tb`: b is stored `[n,k]`.
#[derive(Debug, Clone, Copy)]
pub struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ta: bool,
    pub tb: bool,
    pub alpha: f32,
    pub beta: f32,
}

impl Lt {
    pub fn new(stream: Arc<CudaStream>) -> Result<Self> {
        // SAFETY: only dlopens libcublasLt by name.
        if !unsafe { sys::is_culib_present() } {
            return Err(err(
                "no cuBLASLt library found (libcublasLt.so.13): install CUDA's cuBLAS (or the \
                 `nvidia-cublas` wheel) and put its lib folder on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let handle = lt::create_handle().map_err(|e| err(format!("cublasLtCreate: {e}")))?;
        // 32 MiB, as cuBLAS recommends for Hopper.
        let workspace = stream
            .alloc_zeros::<u8>(32 << 20)
            .map_err(|e| err(format!("allocating the cuBLASLt workspace: {e}")))?;
        Ok(Lt { handle, workspace, stream })
    }

    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len()
    }

    /// Enqueues the product. `a`, `b`, `c` are device addresses of row-major matrices of the
    /// sizes in `p` (checked by the caller).
    ///
    /// # Safety
    /// `a`, `b` must hold at least `m*k`, `k*n` elements of `ty`, `c` at least `m*n` f32, all
    /// alive until the stream has run the product.
    pub unsafe fn matmul(&self, p: Product, ty: Operand, a: u64, b: u64, c: u64) -> Result<()> {
        let shape = format!("m={} n={} k={} ta={} tb={} {:?}", p.m, p.n, p.k, p.ta, p.tb, ty);
        let e = |what: &str, x: lt::CublasError| err(format!("{what} ({shape}): {x}"));
        // cuBLASLt runs in the calling thread's current context: make it ours.
        self.stream.context().bind_to_thread().map_err(|x| err(format!("binding the context ({shape}): {x}")))?;
        let ab_type = match ty {
            Operand::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
            Operand::F32 => sys::cudaDataType_t::CUDA_R_32F,
        };
        let (m, n, k) = (p.m as u64, p.n as u64, p.k as u64);
        // Column-major view: C'[n,m] = B'[n,k] @ A'[k,m], B' = op(b)^T, A' = op(a)^T.
        // Our row-major b [k,n] (or [n,k] when tb) is column-major [n,k] (or [k,n]).
        let (ca_rows, ca_cols, ca_ld, ca_t) = if p.tb { (k, n, k, true) } else { (n, k, n, false) };
        let (cb_rows, cb_cols, cb_ld, cb_t) = if p.ta { (m, k, m, true) } else { (k, m, k, false) };
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|x| e("matmul desc", x))?,
        );
        for (attr, t) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, ca_t),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, cb_t),
        ] {
            let op: i32 = if t { 1 } else { 0 };
            // SAFETY: the descriptor is live; the buffer is an i32 (cublasOperation_t) of that size.
            unsafe {
                lt::set_matmul_desc_attribute(desc.0, attr, (&op) as *const i32 as *const c_void, 4)
            }
            .map_err(|x| e("transpose attribute", x))?;
        }
        let la = Layout(
            lt::create_matrix_layout(ab_type, ca_rows, ca_cols, ca_ld as i64).map_err(|x| e("layout of b", x))?,
        );
        let lb = Layout(
            lt::create_matrix_layout(ab_type, cb_rows, cb_cols, cb_ld as i64).map_err(|x| e("layout of a", x))?,
        );
        let lc = Layout(
            lt::create_matrix_layout(sys::cudaDataType_t::CUDA_R_32F, n, m, n as i64)
                .map_err(|x| e("layout of c", x))?,
        );
        let pref = Pref(lt::create_matmul_pref().map_err(|x| e("preference", x))?);
        let ws = self.workspace.len();
        // SAFETY: live preference; the buffer is a usize (u64 on our targets) of that size.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws) as *const usize as *const c_void,
                std::mem::size_of::<usize>(),
            )
        }
        .map_err(|x| e("workspace preference", x))?;
        // Bit-reproducible runs: no split-K reduction "in place" in the output buffer (whose
        // order is not fixed); reductions through a workspace in the compute or output type are
        // allowed. Mask bits: INPLACE 1, COMPUTE_TYPE 2, OUTPUT_TYPE 4.
        let mask: u32 = 0x6;
        // SAFETY: live preference; the attribute is a u32 of that size.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK,
                (&mask) as *const u32 as *const c_void,
                4,
            )
        }
        .map_err(|x| e("reduction scheme preference", x))?;
        // The heuristic assumes 256-byte aligned operands unless told otherwise; offsets into
        // buffers (chunked products) can be less aligned. cuBLAS "A" is our b, "B" our a.
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        for (attr, addr) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, b),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, a),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, c),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, c),
        ] {
            let align: u32 = 1 << addr.trailing_zeros().min(8);
            // SAFETY: live preference; the attribute is a u32 of that size.
            unsafe { lt::set_matmul_pref_attribute(pref.0, attr, (&align) as *const u32 as *const c_void, 4) }
                .map_err(|x| e("alignment preference", x))?;
        }
        // SAFETY: all descriptors are live and describe the operands above.
        let heuristic = unsafe { lt::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0) }
            .map_err(|x| e("no cuBLASLt algorithm for this product", x))?;
        let (w, _guard) = self.workspace.device_ptr(&self.stream);
        // SAFETY: the caller guarantees the operand sizes and lifetimes; alpha/beta are f32 host
        // scalars (the default pointer mode), the workspace is ours and `ws` bytes long.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&p.alpha) as *const f32 as *const c_void,
                (&p.beta) as *const f32 as *const c_void,
                b as *const c_void,
                la.0,
                a as *const c_void,
                lb.0,
                c as *const c_void,
                lc.0,
                c as *mut c_void,
                lc.0,
                &heuristic.algo,
                w as *mut c_void,
                ws,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|x| e("cublasLtMatmul", x))
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once; work on the stream that
        // uses it is finished or will be by the time the driver frees it.
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
