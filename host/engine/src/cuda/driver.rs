//! [`GpuDevice`] on a real GPU, through cudarc (libcuda, NVRTC and cuBLASLt loaded at run time):
//! one context, one non-blocking stream, stream-ordered allocations from the device's memory
//! pool, kernels compiled by NVRTC for the device's compute capability (cached on disk), and
//! cuBLASLt products built from [`MatmulPlan`]s.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::result as dr;
use cudarc::driver::sys::{self, CUdevice_attribute, CUfunction_attribute};
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

use super::blas::Lt;
use super::device::{Arg, DeviceInfo, GpuDevice};
use super::kernels::FAMILIES;
use super::nvrtc;
use super::plan::MatmulPlan;
use super::err;
use crate::error::Result;

/// Clear errors for a machine without the CUDA driver (cudarc would panic).
pub fn ensure_driver() -> Result<()> {
    // SAFETY: only tries to dlopen libcuda by its candidate names; no symbol is called.
    if unsafe { sys::is_culib_present() } {
        Ok(())
    } else {
        Err(err(
            "init",
            "no CUDA driver found (libcuda.so could not be loaded): this machine has no NVIDIA \
             driver, or it is not on the library path; use --device cpu (or --device emu for the \
             CUDA backend on the CPU device emulator)",
        ))
    }
}

/// Whether a CUDA device can be used here (driver present and at least one device visible).
pub fn available() -> bool {
    ensure_driver().is_ok() && CudaContext::device_count().map(|n| n > 0).unwrap_or(false)
}

/// A GPU: its context, stream, kernels and cuBLASLt handle.
pub struct DriverDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: HashMap<&'static str, CudaFunction>,
    lt: Lt,
    info: DeviceInfo,
}

impl DriverDevice {
    /// Opens device `ordinal` (after `CUDA_VISIBLE_DEVICES`), makes its stream, compiles or
    /// loads the kernels and creates the cuBLASLt handle.
    pub fn open(ordinal: usize) -> Result<Self> {
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
        // SAFETY: the backend uses exactly one stream (this struct owns it and makes no other),
        // so work is ordered without events; cudarc's per-slice events would only add overhead.
        // The only cudarc slice left is the cuBLASLt workspace, used on this stream alone.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(|e| err("init", format!("creating a stream: {e}")))?;
        if !ctx.has_async_alloc() {
            return Err(err("init", "this device has no stream-ordered allocator (cuMemAllocAsync)"));
        }
        keep_pool_memory(&ctx)?;
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let cc = ctx.compute_capability().map_err(|e| err("init", format!("compute capability: {e}")))?;
        let mut details = Vec::new();
        let mut driver = 0i32;
        // SAFETY: writes one i32.
        if unsafe { sys::cuDriverGetVersion(&mut driver) } == sys::CUresult::CUDA_SUCCESS {
            details.push(("driver (CUDA version)".into(), format!("{}.{}", driver / 1000, (driver % 1000) / 10)));
        }
        if let Ok((a, b)) = nvrtc::nvrtc_version() {
            details.push(("nvrtc".into(), format!("{a}.{b}")));
        }
        for (what, attr) in [
            ("SMs", CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT),
            ("shared memory per block (opt-in, bytes)", CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            ("shared memory per SM (bytes)", CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR),
            ("L2 cache (bytes)", CUdevice_attribute::CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE),
        ] {
            if let Ok(v) = ctx.attribute(attr) {
                details.push((what.into(), v.to_string()));
            }
        }
        let kernels = load_kernels(&ctx, cc)?;
        let lt = Lt::new(stream.clone())?;
        details.push(("cublasLt".into(), Lt::version().to_string()));
        details.push(("cublasLt workspace (bytes)".into(), lt.workspace_bytes().to_string()));
        Ok(DriverDevice { ctx, stream, kernels, lt, info: DeviceInfo { name, compute_capability: cc, details } })
    }

    /// Bytes the device holds outside the backend's buffers (the cuBLASLt workspace).
    pub fn fixed_bytes(&self) -> usize {
        self.lt.workspace_bytes()
    }

    fn bind(&self, op: &'static str) -> Result<()> {
        self.ctx.bind_to_thread().map_err(|e| err(op, format!("binding the context: {e}")))
    }
}

impl GpuDevice for DriverDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc(&self, bytes: usize, zero: bool) -> Result<u64> {
        self.bind("alloc")?;
        let bytes = bytes.max(1);
        let s = self.stream.cu_stream();
        // SAFETY: a stream-ordered allocation on our stream; the memset stays inside it.
        unsafe {
            let p = dr::malloc_async(s, bytes).map_err(|e| err("alloc", format!("{bytes} bytes: {e}")))?;
            if zero {
                dr::memset_d8_async(p, 0, bytes, s).map_err(|e| err("alloc", format!("zeroing {bytes} bytes: {e}")))?;
            }
            Ok(p)
        }
    }

    unsafe fn free(&self, ptr: u64) -> Result<()> {
        self.bind("free")?;
        // SAFETY: the caller's contract; the free is ordered after the work using it.
        unsafe { dr::free_async(ptr, self.stream.cu_stream()) }.map_err(|e| err("free", e.to_string()))
    }

    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.bind("copy")?;
        // SAFETY: the caller's contract for dst; src lives until the synchronise below.
        unsafe { dr::memcpy_htod_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| err("copy", format!("{} bytes to the device: {e}", src.len())))?;
        self.synchronize()
    }

    unsafe fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.bind("copy")?;
        let n = dst.len();
        // SAFETY: the caller's contract for src; dst lives until the synchronise below.
        unsafe { dr::memcpy_dtoh_async(dst, src, self.stream.cu_stream()) }
            .map_err(|e| err("copy", format!("{n} bytes to the host: {e}")))?;
        self.synchronize()
    }

    unsafe fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.bind("copy")?;
        // SAFETY: the caller's contract.
        unsafe { dr::memcpy_dtod_async(dst, src, bytes, self.stream.cu_stream()) }
            .map_err(|e| err("copy", format!("device copy of {bytes} bytes: {e}")))
    }

    unsafe fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        self.bind("memset")?;
        // SAFETY: the caller's contract.
        unsafe { dr::memset_d8_async(dst, byte, bytes, self.stream.cu_stream()) }
            .map_err(|e| err("memset", format!("{bytes} bytes: {e}")))
    }

    unsafe fn launch(&self, kernel: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let f = self.kernels.get(kernel).ok_or_else(|| err("launch", format!("kernel `{kernel}` is not loaded")))?;
        if cfg.shared_mem_bytes > 48 * 1024 {
            f.set_attribute(CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, cfg.shared_mem_bytes as i32)
                .map_err(|e| err("launch", format!("{kernel}: {} bytes of shared memory: {e}", cfg.shared_mem_bytes)))?;
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
        // SAFETY: the caller's contract: `args` match the kernel's C signature and stay inside
        // live allocations; each value lives in `args` until the launch has read it.
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| err("launch", e.to_string()))
    }

    unsafe fn matmul(&self, plan: &MatmulPlan, a: u64, b: u64, c: u64) -> Result<()> {
        // SAFETY: the caller's contract (the spans of the plan's layouts).
        unsafe { self.lt.matmul(plan, a, b, c) }
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| err("synchronize", e.to_string()))
    }

    fn memory(&self) -> Option<(u64, u64)> {
        self.ctx.bind_to_thread().ok()?;
        self.ctx.mem_get_info().ok().map(|(f, t)| (f as u64, t as u64))
    }

    /// CUDA events around the call's work (device time; the end event is waited for).
    fn time(&self, call: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        let timing = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let ev = |what: &str, e: cudarc::driver::DriverError| err("profile", format!("{what} event: {e}"));
        let start = self.stream.record_event(timing).map_err(|e| ev("start", e))?;
        call()?;
        let end = self.stream.record_event(timing).map_err(|e| ev("end", e))?;
        let ms = start.elapsed_ms(&end).map_err(|e| ev("elapsed", e))?;
        Ok(f64::from(ms) / 1e3)
    }
}

/// Stream-ordered allocations come from the device's default memory pool; by default the pool
/// returns freed memory to the driver at every synchronisation, which makes the per-op
/// temporaries slow. Keep it instead (the peak counter still counts live buffers only).
fn keep_pool_memory(ctx: &Arc<CudaContext>) -> Result<()> {
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
            let func = module.load_function(k).map_err(|e| err("init", format!("kernel `{k}` of {}: {e}", f.file)))?;
            out.insert(*k, func);
        }
    }
    Ok(out)
}
