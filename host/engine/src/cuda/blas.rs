//! Matrix products through cuBLASLt, described by a [`MatmulPlan`] (`plan.rs`): every descriptor,
//! layout and attribute set here comes from the plan's values, so the emulated device's reference
//! (which interprets the same values) checks this mapping on a CPU. f32 accumulation
//! (`CUBLAS_COMPUTE_32F`, no TF32), f32 scale type, D = C in place.

use std::ffi::c_void;
use std::sync::Arc;

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{EngineError, Result};

use super::plan::{DataType, Epilogue, Layout as PlanLayout, MatmulPlan};

fn err(msg: String) -> EngineError {
    EngineError::Backend { backend: "cuda", op: "gemm", msg }
}

fn cuda_type(t: DataType) -> sys::cudaDataType_t {
    match t {
        DataType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
        DataType::F32 => sys::cudaDataType_t::CUDA_R_32F,
    }
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

    /// The cuBLASLt library version (`cublasLtGetVersion`), e.g. 130000.
    pub fn version() -> usize {
        // SAFETY: a version query with no arguments; the library is loaded (checked in `new`).
        unsafe { sys::cublasLtGetVersion() }
    }

    /// Enqueues the product `plan` describes; errors name `plan.op` and every value.
    ///
    /// # Safety
    /// `a`, `b`, `c` hold the spans of the plan's A, B and C layouts, alive until the stream has
    /// run the product.
    pub unsafe fn matmul(&self, plan: &MatmulPlan, a: u64, b: u64, c: u64) -> Result<()> {
        let shape = plan.describe();
        let e = |what: &str, x: lt::CublasError| EngineError::Backend { backend: "cuda", op: plan.op, msg: format!("{what} ({shape}): {x}") };
        plan.validate().map_err(|m| EngineError::Backend { backend: "cuda", op: plan.op, msg: format!("{m} ({shape})") })?;
        // cuBLASLt runs in the calling thread's current context: make it ours.
        self.stream.context().bind_to_thread().map_err(|x| err(format!("binding the context ({shape}): {x}")))?;
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|x| e("matmul desc", x))?,
        );
        for (attr, t) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, plan.transa),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, plan.transb),
        ] {
            let op: i32 = if t { 1 } else { 0 };
            // SAFETY: the descriptor is live; the buffer is an i32 (cublasOperation_t) of that size.
            unsafe {
                lt::set_matmul_desc_attribute(desc.0, attr, (&op) as *const i32 as *const c_void, 4)
            }
            .map_err(|x| e("transpose attribute", x))?;
        }
        match plan.epilogue {
            // CUBLASLT_EPILOGUE_DEFAULT is the descriptor's initial value: nothing to set.
            Epilogue::Default => {}
        }
        let layout = |l: &PlanLayout, what: &str| -> Result<Layout> {
            let h = Layout(lt::create_matrix_layout(cuda_type(l.dtype), l.rows, l.cols, l.ld).map_err(|x| e(what, x))?);
            if l.batch_count != 1 {
                use sys::cublasLtMatrixLayoutAttribute_t as A;
                let (count, stride) = (l.batch_count, l.batch_stride);
                // SAFETY: live layout; BATCH_COUNT is an i32, STRIDED_BATCH_OFFSET an i64.
                unsafe {
                    lt::set_matrix_layout_attribute(h.0, A::CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, (&count) as *const i32 as *const c_void, 4)
                        .map_err(|x| e(what, x))?;
                    lt::set_matrix_layout_attribute(h.0, A::CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, (&stride) as *const i64 as *const c_void, 8)
                        .map_err(|x| e(what, x))?;
                }
            }
            Ok(h)
        };
        let la = layout(&plan.a, "layout of A")?;
        let lb = layout(&plan.b, "layout of B")?;
        let lc = layout(&plan.c, "layout of C")?;
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
        // buffers (chunked products) can be less aligned.
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        for (attr, addr) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, a),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, b),
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
        // SAFETY: the caller guarantees the operand spans and lifetimes; alpha/beta are f32 host
        // scalars (the default pointer mode), the workspace is ours and `ws` bytes long.
        unsafe {
            lt::matmul(
                self.handle,
                desc.0,
                (&plan.alpha) as *const f32 as *const c_void,
                (&plan.beta) as *const f32 as *const c_void,
                a as *const c_void,
                la.0,
                b as *const c_void,
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
