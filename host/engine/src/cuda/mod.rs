//! The CUDA backend: the [`Backend`](crate::Backend) op set on one NVIDIA GPU, or on the CPU
//! device emulator (`--device emu`), through the same code.
//!
//! Layout: `ops.rs`/`xent.rs` are the ops (buffer checks, launch shapes, kernel arguments); they
//! reach the device only through [`device::GpuDevice`] (alloc/free, copies, memset, launch by
//! kernel name, matmul by [`plan::MatmulPlan`], synchronise). `driver.rs` implements it with
//! cudarc: one context and stream, stream-ordered allocations, kernels compiled at run time from
//! `host/engine/kernels/*.cu` with NVRTC for the device's compute capability (cached on disk),
//! products through cuBLASLt (`blas.rs`, descriptors built from the plan; bf16 or f32 operands,
//! f32 accumulation). `emulated.rs` implements it with [`emu`]: the same `.cu` text compiled as
//! C++, guarded memory, and [`plan::reference`] for the products. `LORA_CUDA_SYNC=1`
//! synchronises after every launch and product, so an asynchronous fault names its op.
//!
//! Owns: device memory (with a peak counter), the device calls above. Must not: decide model structure (that is the engine's), synchronise with the
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
pub mod device;
#[cfg(feature = "cuda")]
mod driver;
#[cfg(feature = "cuda")]
pub mod emu;
#[cfg(feature = "cuda")]
mod emulated;
#[cfg(feature = "cuda")]
mod flash;
#[cfg(feature = "cuda")]
pub use flash::{FLASH_HEAD_DIMS, flash_cfg, flash_smem_bytes, flash_supported};
#[cfg(feature = "cuda")]
pub mod kernels;
#[cfg(feature = "cuda")]
pub mod nvrtc;
#[cfg(feature = "cuda")]
mod ops;
#[cfg(feature = "cuda")]
pub mod plan;
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

/// The CUDA backend on the CPU device emulator (`--device emu`): the same op code and the same
/// `.cu` kernels, with the emulator's guarded memory and the reference cuBLASLt product. Thread
/// order from `LORA_EMU_SCHEDULE` (forward, reverse, shuffled:<seed>).
pub fn open_emulated() -> crate::error::Result<std::sync::Arc<dyn crate::backend::Backend>> {
    #[cfg(feature = "cuda")]
    {
        let opts = emu::EmuOptions { schedule: emulated::schedule_from_env()?, ..Default::default() };
        Ok(std::sync::Arc::new(CudaBackend::emulated(opts)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
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
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use cudarc::driver::LaunchConfig;

    pub use super::device::Arg;
    use super::device::GpuDevice;
    pub use super::driver::{available, ensure_driver};
    use super::driver::DriverDevice;
    use super::emu::EmuOptions;
    use super::emulated::EmulatedDevice;
    use super::plan::MatmulPlan;
    use crate::backend::{Buf, DType, Device, DeviceCounts};
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

    /// The storage behind a CUDA [`Buf`]: device bytes, freed (in stream order) on drop.
    pub(crate) struct Mem {
        ptr: u64,
        bytes: usize,
        dev: Arc<dyn GpuDevice>,
        tracker: Arc<Tracker>,
    }

    impl Mem {
        /// The device address of the first element.
        pub(crate) fn ptr(&self) -> u64 {
            self.ptr
        }
        /// Bytes allocated (at least 1).
        pub(crate) fn bytes(&self) -> usize {
            self.bytes
        }
    }

    impl Drop for Mem {
        fn drop(&mut self) {
            self.tracker.sub(self.bytes as u64);
            // SAFETY: `ptr` came from this device's alloc and is freed only here; the free is
            // ordered after every enqueued use. Nothing can be done about an error in drop.
            let _ = unsafe { self.dev.free(self.ptr) };
        }
    }

    /// The CUDA backend over one device: a GPU (cudarc) or the CPU device emulator.
    pub struct CudaBackend {
        pub(crate) device: Device,
        pub(crate) name: String,
        pub(crate) compute_capability: (i32, i32),
        pub(crate) dev: Arc<dyn GpuDevice>,
        pub(crate) tracker: Arc<Tracker>,
        /// `LORA_CUDA_SYNC=1`: synchronise after every launch and product, so an asynchronous
        /// fault is reported by the op that caused it.
        pub(crate) sync_each: bool,
        /// Per-op (calls, seconds) while profiling (`lora bench --per-op`).
        profile: Mutex<Option<HashMap<String, (u64, f64)>>>,
        /// Kernels (and "cublasLt") launched since the last `take_launched`, each once.
        launched: Mutex<Vec<&'static str>>,
        /// `LORA_CUDA_POISON=1`: fill every uninitialised allocation with 0xFF bytes (NaN in f32
        /// and bf16), as the emulator's fresh memory is, so a read before a write shows.
        poison: bool,
        /// Running totals for [`crate::Backend::device_counts`].
        counts: Counts,
    }

    #[derive(Default)]
    struct Counts {
        kernels: AtomicU64,
        matmuls: AtomicU64,
        memsets: AtomicU64,
        memset_bytes: AtomicU64,
    }

    fn flag_from_env(name: &str) -> bool {
        std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
    }

    impl CudaBackend {
        /// The device chosen by the environment: `LOCAL_RANK` (default 0) among the devices
        /// `CUDA_VISIBLE_DEVICES` leaves visible.
        pub fn from_env() -> Result<Self> {
            Self::new(super::local_rank_ordinal()?)
        }

        /// Opens GPU `ordinal` (after `CUDA_VISIBLE_DEVICES`), makes its stream, compiles or
        /// loads the kernels and creates the cuBLASLt handle.
        pub fn new(ordinal: usize) -> Result<Self> {
            let d = DriverDevice::open(ordinal)?;
            let fixed = d.fixed_bytes() as u64;
            let be = Self::over(Arc::new(d), Device::Cuda(ordinal));
            be.tracker.add(fixed);
            Ok(be)
        }

        /// The same backend on the CPU device emulator.
        pub fn emulated(opts: EmuOptions) -> Result<Self> {
            Ok(Self::over(Arc::new(EmulatedDevice::new(opts)?), Device::Emu))
        }

        fn over(dev: Arc<dyn GpuDevice>, device: Device) -> Self {
            let info = dev.info().clone();
            CudaBackend {
                device,
                name: info.name,
                compute_capability: info.compute_capability,
                dev,
                tracker: Arc::new(Tracker::default()),
                sync_each: flag_from_env("LORA_CUDA_SYNC"),
                profile: Mutex::new(None),
                launched: Mutex::new(Vec::new()),
                // The emulator's fresh memory is 0xFF already.
                poison: flag_from_env("LORA_CUDA_POISON") && device != Device::Emu,
                counts: Counts::default(),
            }
        }

        fn note_launch(&self, kernel: &'static str) {
            if let Ok(mut l) = self.launched.lock()
                && !l.contains(&kernel)
            {
                l.push(kernel);
            }
        }

        pub(crate) fn counts(&self) -> DeviceCounts {
            let c = &self.counts;
            DeviceCounts {
                kernels: c.kernels.load(Ordering::Relaxed),
                matmuls: c.matmuls.load(Ordering::Relaxed),
                memsets: c.memsets.load(Ordering::Relaxed),
                memset_bytes: c.memset_bytes.load(Ordering::Relaxed),
            }
        }

        pub(crate) fn take_launched_names(&self) -> Vec<String> {
            self.launched.lock().map(|mut l| l.drain(..).map(str::to_string).collect()).unwrap_or_default()
        }

        pub(crate) fn set_profile(&self, on: bool) {
            let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
            *p = on.then(HashMap::new);
        }

        pub(crate) fn take_profile_table(&self) -> Vec<(String, u64, f64)> {
            let mut p = self.profile.lock().unwrap_or_else(|e| e.into_inner());
            let mut v: Vec<(String, u64, f64)> = match p.as_mut() {
                Some(t) => t.drain().map(|(k, (n, s))| (k, n, s)).collect(),
                None => Vec::new(),
            };
            v.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
            v
        }

        fn profiling(&self) -> bool {
            self.profile.lock().map(|p| p.is_some()).unwrap_or(false)
        }

        /// Runs `call` timed under `key()` when profiling (CUDA events on a GPU; on the emulator
        /// host time, synchronised before and after).
        fn timed(&self, key: impl FnOnce() -> String, call: impl FnOnce() -> Result<()>) -> Result<()> {
            if !self.profiling() {
                return call();
            }
            let mut call = Some(call);
            let s = self.dev.time(&mut || call.take().map_or(Ok(()), |c| c()))?;
            if let Ok(mut p) = self.profile.lock()
                && let Some(t) = p.as_mut()
            {
                let e = t.entry(key()).or_insert((0, 0.0));
                e.0 += 1;
                e.1 += s;
            }
            Ok(())
        }

        /// The device's marketing name (e.g. "NVIDIA H200").
        pub fn device_name(&self) -> &str {
            &self.name
        }

        /// What the device reports about itself (versions, SM count, shared memory, L2).
        pub fn device_details(&self) -> Vec<(String, String)> {
            self.dev.info().details.clone()
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
            self.dev.memory().map(|(_, t)| t).ok_or_else(|| err("init", "the device does not report its memory"))
        }

        /// Allocates `len` elements of `dtype`, zeroed when `zero`.
        pub(crate) fn alloc(&self, op: &'static str, len: usize, dtype: DType, zero: bool) -> Result<Buf> {
            let bytes = (len * dtype.size()).max(1);
            let ptr = self
                .dev
                .alloc(bytes, zero)
                .map_err(|e| err(op, format!("allocating {len} x {dtype:?} ({bytes} bytes): {e}")))?;
            self.tracker.add(bytes as u64);
            let mem = Mem { ptr, bytes, dev: self.dev.clone(), tracker: self.tracker.clone() };
            if zero {
                self.counts.memsets.fetch_add(1, Ordering::Relaxed);
                self.counts.memset_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            } else if self.poison {
                // SAFETY: the whole range is the allocation just made, owned by `mem`.
                unsafe { self.dev.memset(ptr, 0xFF, bytes) }.map_err(|e| err(op, format!("poisoning {bytes} bytes: {e}")))?;
            }
            Ok(Buf::from_store(len, dtype, mem))
        }

        /// The device storage of `buf`, or an error naming the op and argument.
        pub(crate) fn mem<'a>(&self, op: &'static str, arg: &str, buf: &'a Buf) -> Result<&'a Mem> {
            buf.store::<Mem>()
                .ok_or_else(|| err(op, format!("`{arg}` is not a buffer of the cuda backend")))
        }

        /// Device address of `buf`, after checking it is ours.
        pub(crate) fn ptr(&self, op: &'static str, arg: &str, buf: &Buf) -> Result<u64> {
            Ok(self.mem(op, arg, buf)?.ptr())
        }

        /// Copies host bytes into `buf` (from its start); returns once `bytes` may be dropped.
        pub(crate) fn write_bytes(&self, op: &'static str, buf: &Buf, bytes: &[u8]) -> Result<()> {
            let mem = self.mem(op, "buf", buf)?;
            if bytes.len() > mem.bytes() {
                return Err(err(op, format!("{} bytes into a buffer of {}", bytes.len(), mem.bytes())));
            }
            // SAFETY: the range lies in `buf`'s allocation (checked above), alive for the call.
            unsafe { self.dev.copy_htod(mem.ptr(), bytes) }.map_err(|e| err(op, format!("copy to the device: {e}")))
        }

        /// The first `bytes` bytes of `buf`, after all enqueued work.
        pub(crate) fn read_bytes(&self, op: &'static str, buf: &Buf, bytes: usize) -> Result<Vec<u8>> {
            let mem = self.mem(op, "buf", buf)?;
            if bytes > mem.bytes() {
                return Err(err(op, format!("{bytes} bytes from a buffer of {}", mem.bytes())));
            }
            let mut host = vec![0u8; bytes];
            // SAFETY: the range lies in `buf`'s allocation (checked above), alive for the call.
            unsafe { self.dev.copy_dtoh(mem.ptr(), &mut host) }.map_err(|e| err(op, format!("copy to the host: {e}")))?;
            Ok(host)
        }

        /// Device-to-device copy of the first `bytes` bytes.
        pub(crate) fn copy_bytes(&self, op: &'static str, src: &Buf, dst: &Buf, bytes: usize) -> Result<()> {
            let (s, d) = (self.mem(op, "src", src)?, self.mem(op, "dst", dst)?);
            if bytes > s.bytes() || bytes > d.bytes() {
                return Err(err(op, format!("{bytes} bytes between buffers of {} and {}", s.bytes(), d.bytes())));
            }
            // SAFETY: both ranges lie in their allocations (checked above); two distinct
            // buffers never overlap.
            unsafe { self.dev.copy_dtod(d.ptr(), s.ptr(), bytes) }.map_err(|e| err(op, format!("device copy of {bytes} bytes: {e}")))?;
            self.after(op, || format!("copy of {bytes} bytes"))
        }

        /// With `LORA_CUDA_SYNC=1`, waits for the work just enqueued and names it on a fault.
        fn after(&self, op: &'static str, what: impl FnOnce() -> String) -> Result<()> {
            if self.sync_each {
                self.dev.synchronize().map_err(|e| err(op, format!("{} faulted (LORA_CUDA_SYNC=1): {e}", what())))?;
            }
            Ok(())
        }

        /// Enqueues `kernel` with `args`.
        pub(crate) fn launch(&self, op: &'static str, kernel: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
            let what = || {
                let scalars: Vec<String> = args
                    .iter()
                    .filter_map(|a| match a {
                        Arg::Ptr(_) => None,
                        Arg::I32(v) => Some(v.to_string()),
                        Arg::U32(v) => Some(v.to_string()),
                        Arg::F32(v) => Some(v.to_string()),
                        Arg::U64(v) => Some(v.to_string()),
                        Arg::Size(v) => Some(v.to_string()),
                    })
                    .collect();
                format!(
                    "{kernel} (grid {:?}, block {:?}, {} bytes of shared memory, scalar arguments [{}])",
                    cfg.grid_dim,
                    cfg.block_dim,
                    cfg.shared_mem_bytes,
                    scalars.join(", ")
                )
            };
            // SAFETY: each kernel's argument list is built by its op in ops.rs to match the
            // kernel's C signature in kernels/*.cu; the op checked every buffer's length against
            // the sizes passed, so the kernel stays inside the allocations.
            self.note_launch(kernel);
            self.counts.kernels.fetch_add(1, Ordering::Relaxed);
            self.timed(|| format!("{op} ({kernel})"), || unsafe { self.dev.launch(kernel, cfg, args) }.map_err(|e| err(op, format!("launching {}: {e}", what()))))?;
            self.after(op, what)
        }

        /// Enqueues the product `plan` describes.
        ///
        /// # Safety
        /// `a`, `b`, `c` hold the spans of the plan's layouts, alive until the product has run.
        pub(crate) unsafe fn matmul(&self, plan: &MatmulPlan, a: u64, b: u64, c: u64) -> Result<()> {
            // SAFETY: the caller's contract.
            self.note_launch("cublasLt matmul");
            self.counts.matmuls.fetch_add(1, Ordering::Relaxed);
            let key = || {
                let (m, n, k) = plan.mnk();
                format!("{} (cublasLt {:?} m{m} n{n} k{k})", plan.op, plan.a.dtype)
            };
            self.timed(key, || unsafe { self.dev.matmul(plan, a, b, c) })?;
            self.after(plan.op, || plan.describe())
        }

        pub(crate) fn synchronize_device(&self) -> Result<()> {
            self.dev.synchronize()
        }

        pub(crate) fn free_memory(&self) -> Option<u64> {
            self.dev.memory().map(|(f, _)| f)
        }

        pub(crate) fn peak(&self) -> u64 {
            self.tracker.peak.load(Ordering::Relaxed)
        }
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
