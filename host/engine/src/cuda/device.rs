//! The device calls of the CUDA backend, behind one small trait: memory (alloc/free), copies
//! (host to device, device to host, device to device, memset), kernel launches by name, the
//! cuBLASLt product described by a [`MatmulPlan`], and synchronisation. `driver.rs` implements it
//! with cudarc on a GPU; `emulated.rs` with the CPU device emulator, which runs the same `.cu`
//! text. `ops.rs` (the whole op set) only talks to this trait, so the same backend code runs on
//! both.
//!
//! Device memory is named by its address (`u64`, a `CUdeviceptr`). Work is ordered as on one
//! CUDA stream: every call runs after the calls before it; the copies that touch host memory
//! return when the host side is done with.

use cudarc::driver::LaunchConfig;

use super::plan::MatmulPlan;
use crate::error::Result;

/// One kernel argument, by its C type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arg {
    /// A device address (any pointer parameter).
    Ptr(u64),
    I32(i32),
    F32(f32),
    U64(u64),
    /// `size_t`.
    Size(usize),
    U32(u32),
}

/// What a device is, for messages and `lora selftest --stage env`.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// "NVIDIA H200", or "CPU device emulator".
    pub name: String,
    pub compute_capability: (i32, i32),
    /// Lines of `key: value` worth printing (driver, NVRTC and cuBLASLt versions, SM count,
    /// shared memory limit, L2 size; the emulator's schedule).
    pub details: Vec<(String, String)>,
}

/// The five device calls (see the module doc).
pub trait GpuDevice: Send + Sync {
    fn info(&self) -> &DeviceInfo;

    /// `bytes` (at least 1) of device memory, zeroed when `zero`; the address.
    fn alloc(&self, bytes: usize, zero: bool) -> Result<u64>;

    /// Frees an allocation after the work already enqueued that uses it.
    ///
    /// # Safety
    /// `ptr` came from [`GpuDevice::alloc`] of this device and is freed once.
    unsafe fn free(&self, ptr: u64) -> Result<()>;

    /// Copies `src` to `dst`; returns once `src` may be dropped.
    ///
    /// # Safety
    /// `[dst, dst + src.len())` lies in one live allocation.
    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()>;

    /// Copies `dst.len()` bytes from `src` after the work enqueued before; returns with `dst`
    /// filled.
    ///
    /// # Safety
    /// `[src, src + dst.len())` lies in one live allocation.
    unsafe fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()>;

    /// # Safety
    /// Both ranges lie in live allocations and do not overlap.
    unsafe fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()>;

    /// # Safety
    /// `[dst, dst + bytes)` lies in one live allocation.
    unsafe fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()>;

    /// Enqueues kernel `kernel` (one of `kernels::FAMILIES`).
    ///
    /// # Safety
    /// `args` match the kernel's C signature, and every address among them, with the sizes the
    /// other arguments give, stays inside live allocations.
    unsafe fn launch(&self, kernel: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()>;

    /// Enqueues the product `plan` describes, `D = C` at `c`.
    ///
    /// # Safety
    /// Each of `a`, `b`, `c` holds its layout's span ([`super::plan::Layout::span_bytes`]) in a
    /// live allocation.
    unsafe fn matmul(&self, plan: &MatmulPlan, a: u64, b: u64, c: u64) -> Result<()>;

    /// Waits for every enqueued call; reports an asynchronous fault.
    fn synchronize(&self) -> Result<()>;

    /// (free, total) device bytes, where the device knows them.
    fn memory(&self) -> Option<(u64, u64)>;

    /// Seconds the device spent on the work `call` enqueues (for `lora bench --per-op`). This
    /// default times it on the host, synchronised before and after; a GPU uses events.
    fn time(&self, call: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
        self.synchronize()?;
        let t = std::time::Instant::now();
        call()?;
        self.synchronize()?;
        Ok(t.elapsed().as_secs_f64())
    }
}
