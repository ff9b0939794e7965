//! Matrix products through cuBLASLt, described by a [`MatmulPlan`] (`plan.rs`): every descriptor,
//! layout and attribute set here comes from the plan's values, so the emulated device's reference
//! (which interprets the same values) checks this mapping on a CPU. f32 accumulation
//! (`CUBLAS_COMPUTE_32F`, no TF32), f32 scale type, D = C in place.

use std::ffi::c_void;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys;
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr};

use crate::error::{EngineError, Result};

use super::plan::{DataType, Epilogue, Layout as PlanLayout, MatmulPlan, PlanKey};

fn err(msg: String) -> EngineError {
    EngineError::Backend { backend: "cuda", op: "gemm", msg }
}

fn cuda_type(t: DataType) -> sys::cudaDataType_t {
    match t {
        DataType::Bf16 => sys::cudaDataType_t::CUDA_R_16BF,
        DataType::F32 => sys::cudaDataType_t::CUDA_R_32F,
    }
}

/// A cuBLASLt handle, its workspace, the stream it runs on, and the setups built so far.
pub struct Lt {
    handle: sys::cublasLtHandle_t,
    workspace: CudaSlice<u8>,
    stream: Arc<CudaStream>,
    /// One setup per distinct product (a few dozen per model shape), kept for the handle's life
    /// instead of rebuilding descriptors and rerunning the heuristic on every call (CUDA-REVIEW S9).
    cache: Mutex<HashMap<PlanKey, Arc<Setup>>>,
}

/// A product's descriptor, its A, B and C (= D) layouts and the heuristic's algorithm.
struct Setup {
    desc: Desc,
    la: Layout,
    lb: Layout,
    lc: Layout,
    algo: sys::cublasLtMatmulAlgo_t,
}

// SAFETY: the descriptors are only read after they are built (cublasLtMatmul takes them as
// inputs and does not modify them), so sharing them between threads is sound; they are destroyed
// once, when the last Arc drops.
unsafe impl Send for Setup {}
// SAFETY: as above.
unsafe impl Sync for Setup {}

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
        Ok(Lt { handle, workspace, stream, cache: Mutex::new(HashMap::new()) })
    }

    pub fn workspace_bytes(&self) -> usize {
        self.workspace.len()
    }

    /// The cuBLASLt library version (`cublasLtGetVersion`), e.g. 130000.
    pub fn version() -> usize {
        // SAFETY: a version query with no arguments; the library is loaded (checked in `new`).
        unsafe { sys::cublasLtGetVersion() }
    }

    /// The cached setup for `plan` on operands at `a`, `b`, `c`, built (descriptor, layouts,
    /// heuristic) on the first product with its [`PlanKey`].
    fn setup(&self, plan: &MatmulPlan, a: u64, b: u64, c: u64) -> Result<Arc<Setup>> {
        let key = plan.key(a, b, c);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = cache.get(&key) {
            return Ok(s.clone());
        }
        let s = Arc::new(self.build(plan, &key)?);
        cache.insert(key, s.clone());
        Ok(s)
    }

    fn build(&self, plan: &MatmulPlan, key: &PlanKey) -> Result<Setup> {
        let shape = plan.describe();
        let e = |what: &str, x: lt::CublasError| EngineError::Backend { backend: "cuda", op: plan.op, msg: format!("{what} ({shape}): {x}") };
        let desc = Desc(
            lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|x| e("matmul desc", x))?,
        );
        for (attr, t) in [
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA, key.transa),
            (sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB, key.transb),
        ] {
            let op: i32 = if t { 1 } else { 0 };
            // SAFETY: the descriptor is live; the buffer is an i32 (cublasOperation_t) of that size.
            unsafe {
                lt::set_matmul_desc_attribute(desc.0, attr, (&op) as *const i32 as *const c_void, 4)
            }
            .map_err(|x| e("transpose attribute", x))?;
        }
        match key.epilogue {
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
        let la = layout(&key.a, "layout of A")?;
        let lb = layout(&key.b, "layout of B")?;
        let lc = layout(&key.c, "layout of C")?;
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
        // buffers (chunked products) can be less aligned. The key holds the alignment classes.
        use sys::cublasLtMatmulPreferenceAttributes_t as P;
        for (attr, align) in [
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, key.align[0]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, key.align[1]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, key.align[2]),
            (P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, key.align[2]),
        ] {
            // SAFETY: live preference; the attribute is a u32 of that size.
            unsafe { lt::set_matmul_pref_attribute(pref.0, attr, (&align) as *const u32 as *const c_void, 4) }
                .map_err(|x| e("alignment preference", x))?;
        }
        // SAFETY: all descriptors are live and describe the operands above.
        let heuristic = unsafe { lt::get_matmul_algo_heuristic(self.handle, desc.0, la.0, lb.0, lc.0, lc.0, pref.0) }
            .map_err(|x| e("no cuBLASLt algorithm for this product", x))?;
        Ok(Setup { desc, la, lb, lc, algo: heuristic.algo })
    }

    /// Enqueues the product `plan` describes; errors name `plan.op` and every value. The
    /// descriptor, layouts and algorithm come from the cache ([`PlanKey`]), built on first use.
    ///
    /// # Safety
    /// `a`, `b`, `c` hold the spans of the plan's A, B and C layouts, alive until the stream has
    /// run the product.
    pub unsafe fn matmul(&self, plan: &MatmulPlan, a: u64, b: u64, c: u64) -> Result<()> {
        plan.validate().map_err(|m| EngineError::Backend { backend: "cuda", op: plan.op, msg: format!("{m} ({})", plan.describe()) })?;
        // cuBLASLt runs in the calling thread's current context: make it ours.
        self.stream.context().bind_to_thread().map_err(|x| err(format!("binding the context ({}): {x}", plan.describe())))?;
        let s = self.setup(plan, a, b, c)?;
        let (w, _guard) = self.workspace.device_ptr(&self.stream);
        let ws = self.workspace.len();
        // SAFETY: the caller guarantees the operand spans and lifetimes; the setup describes
        // exactly these layouts (its key holds them); alpha/beta are f32 host scalars (the
        // default pointer mode), the workspace is ours and `ws` bytes long.
        unsafe {
            lt::matmul(
                self.handle,
                s.desc.0,
                (&plan.alpha) as *const f32 as *const c_void,
                (&plan.beta) as *const f32 as *const c_void,
                a as *const c_void,
                s.la.0,
                b as *const c_void,
                s.lb.0,
                c as *const c_void,
                s.lc.0,
                c as *mut c_void,
                s.lc.0,
                &s.algo,
                w as *mut c_void,
                ws,
                self.stream.cu_stream() as sys::cudaStream_t,
            )
        }
        .map_err(|x| EngineError::Backend { backend: "cuda", op: plan.op, msg: format!("cublasLtMatmul ({}): {x}", plan.describe()) })
    }
}

impl Drop for Lt {
    fn drop(&mut self) {
        // SAFETY: the handle was created in `new` and is destroyed once; work on the stream that
        // uses it is finished or will be by the time the driver frees it. The cached
        // descriptors go first.
        self.cache.get_mut().unwrap_or_else(|e| e.into_inner()).clear();
        let _ = unsafe { lt::destroy_handle(self.handle) };
    }
}
