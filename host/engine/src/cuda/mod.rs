//! The CUDA backend: the [`Backend`](crate::Backend) op set on one NVIDIA GPU.
//!
//! Owns: the device context and its one stream, device memory (with a peak counter), kernels
//! compiled at run time from `host/engine/kernels/*.cu` with NVRTC for the device's compute
//! capability (cached on disk), and matrix products through cuBLASLt (bf16 or f32 operands, f32
//! accumulation). Must not: decide model structure (that is the engine's), synchronise with the
//! host inside an op except where the op returns a scalar or must name a bad input, or use
//! atomics whose order changes a result (runs are bit-reproducible).
//!
//! cudarc loads libcuda, libnvrtc and libcublasLt at run time: this crate builds and runs on
//! machines without CUDA, and asking for a GPU there is a clear error, never a panic.
//! Device choice: `CUDA_VISIBLE_DEVICES` (applied by the driver), then the local rank
//! (`LOCAL_RANK`, as torchrun and Kubeflow Trainer set it) picks among the visible devices.

#[cfg(feature = "cuda")]
mod blas;
#[cfg(feature = "cuda")]
pub mod emu;
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
mod ops;
#[cfg(feature = "cuda")]
mod xent;

#[cfg(feature = "cuda")]
pub use imp::*;

#[cfg(not(feature = "cuda"))]
pub use stub::*;

/// The device a process should use when it is only told "cuda": its local rank (`LOCAL_RANK`,
/// set by torchrun and Kubeflow Trainer's torch runtime), else 0. `CUDA_VISIBLE_DEVICES` has
/// already narrowed the devices this ordinal counts.
pub fn local_rank_ordinal() -> crate::error::Result<usize> {
    match std::env::var("LOCAL_RANK") {
        Ok(v) => v.trim().parse::<usize>().map_err(|_| crate::error::EngineError::Backend {
            backend: "cuda",
            op: "init",
            msg: format!("LOCAL_RANK={v:?} is not a non-negative integer"),
        }),
        Err(_) => Ok(0),
    }
}

/// Dense bf16 tensor-core peak (TFLOP/s, fp32 accumulate) of a GPU by its marketing name, for
/// model FLOP utilisation; `None` for a GPU not in this table (then MFU is not printed).
pub fn peak_bf16_tflops(device_name: &str) -> Option<f64> {
    // (name fragment, TFLOP/s), most specific first; from NVIDIA's data sheets.
    const TABLE: &[(&str, f64)] = &[
        ("H200", 989.4),
        ("H100 PCIe", 756.0),
        ("H100", 989.4),
        ("H20", 148.0),
        ("B200", 2250.0),
        ("A100", 312.0),
        ("L40S", 362.0),
        ("L4", 121.0),
        ("A10", 125.0),
    ];
    TABLE.iter().find(|(k, _)| device_name.contains(k)).map(|&(_, v)| v)
}

/// The CUDA backend on device `ordinal` as a trait object (what `model::backend_for` returns);
/// an error when this build has no CUDA support or the machine has no usable GPU.
pub fn open(ordinal: usize) -> crate::error::Result<std::sync::Arc<dyn crate::backend::Backend>> {
    #[cfg(feature = "cuda")]
    {
        Ok(std::sync::Arc::new(CudaBackend::new(ordinal)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(stub::built_without())
    }
}

#[cfg(not(feature = "cuda"))]
mod stub {
    use crate::error::{EngineError, Result};

    /// Stand-in when the crate is built without its `cuda` feature.
    pub struct CudaBackend;

    impl CudaBackend {
        pub fn new(_ordinal: usize) -> Result<Self> {
            Err(built_without())
        }
        pub fn from_env() -> Result<Self> {
            Err(built_without())
        }
    }

    pub(crate) fn built_without() -> EngineError {
        EngineError::Backend {
            backend: "cuda",
            op: "init",
            msg: "this binary was built without CUDA support (cargo feature `cuda` of lora-engine)".into(),
        }
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use cudarc::driver::sys::CUfunction_attribute;
    use cudarc::driver::{CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

    use super::blas::Lt;
    use super::kernels::FAMILIES;
    use super::nvrtc;
    use crate::backend::{Buf, DType};
    use crate::error::{EngineError, Result};

    pub(crate) fn err(op: &'static str, msg: impl Into<String>) -> EngineError {
        EngineError::Backend { backend: "cuda", op, msg: msg.into() }
    }

    /// Bytes held now and at most, over every buffer this backend allocated.
    #[derive(Default)]
    pub(crate) struct Tracker {
        current: AtomicU64,
        peak: AtomicU64,
    }

    impl Tracker {
        fn add(&self, bytes: u64) {
            let now = self.current.fetch_add(bytes, Ordering::Relaxed) + bytes;
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
        fn sub(&self, bytes: u64) {
            self.current.fetch_sub(bytes, Ordering::Relaxed);
        }
    }

    /// The storage behind a CUDA [`Buf`]: raw device bytes on the backend's stream.
    pub(crate) struct Mem {
        slice: CudaSlice<u8>,
        stream: Arc<CudaStream>,
        tracker: Arc<Tracker>,
    }

    impl Mem {
        /// The device address of the first element.
        pub(crate) fn ptr(&self) -> u64 {
            // Event tracking is off (one stream, in-order), so the guard does nothing.
            let (p, _guard) = self.slice.device_ptr(&self.stream);
            p
        }
        pub(crate) fn slice(&self) -> &CudaSlice<u8> {
            &self.slice
        }
        pub(crate) fn slice_mut(&mut self) -> &mut CudaSlice<u8> {
            &mut self.slice
        }
    }

    impl Drop for Mem {
        fn drop(&mut self) {
            self.tracker.sub(self.slice.len() as u64);
        }
    }

    /// One kernel argument, kept alive until the launch has read it.
    pub(crate) enum Arg {
        Ptr(u64),
        I32(i32),
        F32(f32),
        U64(u64),
        Size(usize),
        U32(u32),
    }

    /// The CUDA backend for one device.
    pub struct CudaBackend {
        pub(crate) ordinal: usize,
        pub(crate) name: String,
        pub(crate) compute_capability: (i32, i32),
        pub(crate) ctx: Arc<CudaContext>,
        pub(crate) stream: Arc<CudaStream>,
        pub(crate) kernels: HashMap<&'static str, CudaFunction>,
        pub(crate) lt: Lt,
        pub(crate) tracker: Arc<Tracker>,
    }

    /// Clear errors for a machine without the CUDA driver (cudarc would panic).
    pub fn ensure_driver() -> Result<()> {
        // SAFETY: only tries to dlopen libcuda by its candidate names; no symbol is called.
        if unsafe { cudarc::driver::sys::is_culib_present() } {
            Ok(())
        } else {
            Err(err(
                "init",
                "no CUDA driver found (libcuda.so could not be loaded): this machine has no NVIDIA \
                 driver, or it is not on the library path; use --device cpu",
            ))
        }
    }

    /// Whether a CUDA device can be used here (driver present and at least one device visible).
    pub fn available() -> bool {
        ensure_driver().is_ok() && CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
    }

    impl CudaBackend {
        /// The device chosen by the environment: `LOCAL_RANK` (default 0) among the devices
        /// `CUDA_VISIBLE_DEVICES` leaves visible.
        pub fn from_env() -> Result<Self> {
            Self::new(super::local_rank_ordinal()?)
        }

        /// Opens device `ordinal` (after `CUDA_VISIBLE_DEVICES`), makes its stream, compiles or
        /// loads the kernels and creates the cuBLASLt handle.
        pub fn new(ordinal: usize) -> Result<Self> {
            ensure_driver()?;
            let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into());
            let count = CudaContext::device_count().map_err(|e| err("init", format!("cuDeviceGetCount: {e}")))?;
            if count <= 0 {
                return Err(err("init", format!("no CUDA device visible (CUDA_VISIBLE_DEVICES={visible})")));
            }
            if ordinal >= count as usize {
                return Err(err(
                    "init",
                    format!(
                        "device {ordinal} asked for (LOCAL_RANK or --device cuda:{ordinal}) but only {count} \
                         visible (CUDA_VISIBLE_DEVICES={visible})"
                    ),
                ));
            }
            let ctx = CudaContext::new(ordinal).map_err(|e| err("init", format!("creating a context on device {ordinal}: {e}")))?;
            // SAFETY: the backend uses exactly one stream, so work is ordered without events;
            // cudarc's per-slice events would only add overhead.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.new_stream().map_err(|e| err("init", format!("creating a stream: {e}")))?;
            keep_pool_memory(&ctx)?;
            let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
            let cc = ctx.compute_capability().map_err(|e| err("init", format!("compute capability: {e}")))?;
            let kernels = load_kernels(&ctx, cc)?;
            let lt = Lt::new(stream.clone())?;
            let tracker = Arc::new(Tracker::default());
            tracker.add(lt.workspace_bytes() as u64);
            Ok(CudaBackend { ordinal, name, compute_capability: cc, ctx, stream, kernels, lt, tracker })
        }

        /// The device's marketing name (e.g. "NVIDIA H200").
        pub fn device_name(&self) -> &str {
            &self.name
        }

        /// Dense bf16 peak of this device, see [`super::peak_bf16_tflops`].
        pub fn peak_bf16_tflops(&self) -> Option<f64> {
            super::peak_bf16_tflops(&self.name)
        }

        /// (major, minor) compute capability.
        pub fn compute_capability(&self) -> (i32, i32) {
            self.compute_capability
        }

        /// Total device memory in bytes.
        pub fn total_memory(&self) -> Result<u64> {
            self.ctx.total_mem().map(|b| b as u64).map_err(|e| err("init", format!("total memory: {e}")))
        }

        /// Allocates `len` elements of `dtype`, zeroed when `zero`.
        pub(crate) fn alloc(&self, op: &'static str, len: usize, dtype: DType, zero: bool) -> Result<Buf> {
            let bytes = (len * dtype.size()).max(1);
            let slice = if zero {
                self.stream.alloc_zeros::<u8>(bytes)
            } else {
                // SAFETY: uninitialised device bytes; every caller writes the whole buffer before
                // it is read.
                unsafe { self.stream.alloc::<u8>(bytes) }
            }
            .map_err(|e| err(op, format!("allocating {len} x {dtype:?} ({bytes} bytes): {e}")))?;
            self.tracker.add(bytes as u64);
            let mem = Mem { slice, stream: self.stream.clone(), tracker: self.tracker.clone() };
            Ok(Buf::from_store(len, dtype, mem))
        }

        /// The device storage of `buf`, or an error naming the op and argument.
        pub(crate) fn mem<'a>(&self, op: &'static str, arg: &str, buf: &'a Buf) -> Result<&'a Mem> {
            buf.store::<Mem>()
                .ok_or_else(|| err(op, format!("`{arg}` is not a buffer of the cuda backend")))
        }

        pub(crate) fn mem_mut<'a>(&self, op: &'static str, arg: &str, buf: &'a mut Buf) -> Result<&'a mut Mem> {
            buf.store_mut::<Mem>()
                .ok_or_else(|| err(op, format!("`{arg}` is not a buffer of the cuda backend")))
        }

        /// Device address of `buf`, after checking it is ours.
        pub(crate) fn ptr(&self, op: &'static str, arg: &str, buf: &Buf) -> Result<u64> {
            Ok(self.mem(op, arg, buf)?.ptr())
        }

        /// Enqueues `kernel` with `args`.
        pub(crate) fn launch(&self, op: &'static str, kernel: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
            let f = self
                .kernels
                .get(kernel)
                .ok_or_else(|| err(op, format!("kernel `{kernel}` is not loaded")))?;
            if cfg.shared_mem_bytes > 48 * 1024 {
                f.set_attribute(
                    CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    cfg.shared_mem_bytes as i32,
                )
                .map_err(|e| err(op, format!("{kernel}: {} bytes of shared memory: {e}", cfg.shared_mem_bytes)))?;
            }
            let mut b = self.stream.launch_builder(f);
            for a in args {
                match a {
                    Arg::Ptr(p) | Arg::U64(p) => b.arg(p),
                    Arg::I32(v) => b.arg(v),
                    Arg::F32(v) => b.arg(v),
                    Arg::Size(v) => b.arg(v),
                    Arg::U32(v) => b.arg(v),
                };
            }
            // SAFETY: each kernel's argument list is built by its op in ops.rs to match the
            // kernel's C signature in kernels/*.cu; the op checked every buffer's length against
            // the sizes passed, so the kernel stays inside the allocations.
            unsafe { b.launch(cfg) }
                .map(|_| ())
                .map_err(|e| err(op, format!("launching {kernel} (grid {:?}, block {:?}): {e}", cfg.grid_dim, cfg.block_dim)))
        }

        pub(crate) fn peak(&self) -> u64 {
            self.tracker.peak.load(Ordering::Relaxed)
        }
    }

    /// Stream-ordered allocations come from the device's default memory pool; by default the pool
    /// returns freed memory to the driver at every synchronisation, which makes the per-op
    /// temporaries slow. Keep it instead (the peak counter still counts live buffers only).
    fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<()> {
        use cudarc::driver::sys;
        if !ctx.has_async_alloc() {
            return Ok(());
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the driver is loaded and the context current; `pool` and `threshold` are valid
        // for the duration of the calls, and the attribute takes a u64.
        let status = unsafe {
            ctx.bind_to_thread().map_err(|e| err("init", e.to_string()))?;
            let s = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
            if s != sys::CUresult::CUDA_SUCCESS {
                s
            } else {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
                )
            }
        };
        if status == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(err("init", format!("setting the memory pool's release threshold: {status:?}")))
        }
    }

    fn load_kernels(ctx: &Arc<CudaContext>, cc: (i32, i32)) -> Result<HashMap<&'static str, CudaFunction>> {
        nvrtc::ensure_nvrtc()?;
        let include = nvrtc::include_dir()?;
        let arch = format!("{}{}", cc.0, cc.1);
        let mut out = HashMap::new();
        for f in FAMILIES {
            let ptx = nvrtc::compile_family(f, &arch, &include, true)?;
            let module = ctx
                .load_module(nvrtc::to_ptx(ptx))
                .map_err(|e| err("init", format!("loading the PTX of {} for sm_{arch}: {e}", f.file)))?;
            for k in f.kernels {
                let func = module
                    .load_function(k)
                    .map_err(|e| err("init", format!("kernel `{k}` of {}: {e}", f.file)))?;
                out.insert(*k, func);
            }
        }
        Ok(out)
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    /// Without a driver, asking for a GPU is a clear error (cudarc alone would panic); with one,
    /// device 0 opens and a device count beyond the visible ones is refused by name.
    #[test]
    fn peak_table_prefers_the_specific_name() {
        assert_eq!(super::peak_bf16_tflops("NVIDIA H100 PCIe"), Some(756.0));
        assert_eq!(super::peak_bf16_tflops("NVIDIA H200"), Some(989.4));
        assert_eq!(super::peak_bf16_tflops("NVIDIA H20"), Some(148.0));
        assert_eq!(super::peak_bf16_tflops("Some Future GPU"), None);
    }

    #[test]
    fn asking_for_a_gpu_is_an_error_or_a_device_never_a_panic() {
        if ensure_driver().is_err() {
            let e = CudaBackend::new(0).err().expect("no driver, yet a backend").to_string();
            assert!(e.contains("no CUDA driver found"), "{e}");
            assert!(!available());
        } else if available() {
            let e = CudaBackend::new(1 << 20).err().expect("device 2^20 opened").to_string();
            assert!(e.contains("visible"), "{e}");
        }
    }
}
