//! The CPU device emulator: the CUDA backend's kernels, run on the CPU from exactly the `.cu`
//! text NVRTC compiles, so a kernel is proven before any GPU sees it.
//!
//! Owns: device memory for emulated kernels (guarded, poisoned host mappings), kernel launches
//! (every family in `host/engine/kernels/` compiled in by `build.rs`), and the checks that turn a
//! kernel bug into an error naming the kernel, block and thread. Must not: know about ops, buffers
//! or matrix products (the device trait of the CUDA backend builds on this), or let a kernel bug
//! crash or hang the process.
//!
//! # How a kernel runs (C++ in `host/engine/emu/`)
//! - Each CUDA thread is a fiber (64 KiB stack, guard page); a block's threads run on the
//!   launching thread in rounds, in the order [`Schedule`] picks (forward, reverse, or a seeded
//!   shuffle), each until its next `__syncthreads`, warp collective, atomic or exit. Blocks run one
//!   after another, in the same order. Launches are serialised process-wide.
//! - Warps are 32 lanes. `__shfl*_sync` (full and partial masks, widths), `__ballot_sync`,
//!   `__any_sync`, `__all_sync`, `__syncwarp`, the atomics, and the tensor-core and async-copy
//!   instructions of `kernels/mma.cuh` (`mma.sync.m16n8k16` bf16/f16 with f32 accumulation,
//!   `ldmatrix` x1/x2/x4 and `.trans`, `cp.async` ca/cg with zero-fill, commit and wait groups)
//!   are emulated from the PTX ISA's definitions. A `cp.async` lands no later than the wait that
//!   covers it (at that wait under forward/reverse, at a seeded earlier point when shuffled).
//! - Errors, each naming kernel, block, thread, file and line: `__syncthreads` reached at
//!   different sites or after some thread exited; a collective whose mask leaves out the caller,
//!   names a lane that has exited, waits at a barrier or at another collective; a deadlock; the
//!   launch's time limit ([`EmuOptions::time_limit`]); out-of-bounds or freed-memory reads and
//!   writes, integer division by zero, stack overflow (a signal handler turns the fault into an
//!   error and the launch returns it; the process goes on).
//! - Memory: [`Emulator::alloc`] maps the bytes so that the end touches a guard page (16-byte
//!   aligned start; the last < 16 bytes of slack, and the slack before the start, are checked for
//!   writes after every launch); fresh memory and shared memory at each block start hold 0xFF
//!   bytes, a NaN in every float type, so a read of memory nothing wrote shows in the result.
//!   Static `__shared__` arrays are not bounds-checked (they share one section). Guard pages and
//!   a fault handler rather than AddressSanitizer: they work in every build (ASan would need the
//!   test binaries built and run under it, and fiber-switch annotations), cost nothing per
//!   access, and let the launch return an error naming kernel, block, thread and allocation while
//!   the process goes on. A freed allocation stays mapped without access for a while, so a use
//!   after free is named too.
//! - Numerics: the C library's `expf`, `logf`, `sincosf` stand in for CUDA's (within 1-2 ulp); FMA
//!   contraction is the host compiler's, not NVRTC's `--fmad=true`; bf16/f16 conversions round as
//!   the device does (NaN becomes 0x7FFF); `mma` sums exactly and rounds once (the hardware may
//!   differ in the last bit of a sum with cancellation).
//!
//! A build without a C++ compiler (or with `LORA_EMU=off`) has this API, and
//! [`Emulator::new`] returns an error saying so.

pub mod probes;

use std::collections::HashMap;
use std::ffi::{CStr, c_int, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use super::kernels::Family;
use crate::error::{EngineError, Result};

mod generated {
    include!(concat!(env!("OUT_DIR"), "/emu_generated.rs"));
}

/// Whether this build has the emulator (a C++ compiler was found and compiled it).
pub const BUILT: bool = generated::BUILT;

/// Every family the emulator compiled, as `(file, text)`: the text is `kernels::full_source` of
/// the family (a test holds the two equal).
pub const COMPILED_SOURCES: &[(&str, &str)] = generated::SOURCES;

/// The emulator-only probe kernels (deliberate bugs the tests expect to be caught, and a barrier
/// loop for timing); never loaded on a GPU.
pub const FAULT_PROBES: Family = Family {
    file: "faults.cu",
    source: include_str!("../../../emu/probes/faults.cu"),
    kernels: &[
        "probe_race",
        "probe_divergent_barrier",
        "probe_barrier_after_exit",
        "probe_shfl_missing_lanes",
        "probe_shfl_mask_without_self",
        "probe_mismatched_collectives",
        "probe_oob_read",
        "probe_oob_write",
        "probe_dynamic_smem_overflow",
        "probe_spin",
        "probe_divide",
        "probe_stack_overflow",
        "probe_cp_async_early_read",
        "probe_ldmatrix_global",
        "probe_spin_lock",
        "probe_barrier_loop",
    ],
};

/// `flash_attention.cu` with a planted bug in its dk/dv kernel (`PLANTED_MUTATION`: the causal
/// bound off by one) and its kernels renamed `planted_<name>`, compiled by `build.rs` into the
/// emulator only, so a test can prove that the flash tests fail on a wrong backward.
pub const PLANTED_BUG: Family = Family { file: "planted_flash_attention.cu", source: generated::PLANTED_SOURCE, kernels: generated::PLANTED_KERNELS };

/// The planted bug's mutation: (file, text, replaced by).
pub const PLANTED_MUTATION: (&str, &str, &str) = generated::PLANTED_MUTATION;

/// The order in which runnable threads (and blocks) run between synchronisation points.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Schedule {
    /// Thread 0 first, block 0 first.
    #[default]
    Forward,
    /// The last thread first, the last block first.
    Reverse,
    /// A fresh permutation at every round, from this seed (the same seed replays the same order).
    Shuffled(u64),
}

/// How the emulator switches between CUDA threads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ContextSwitch {
    /// The hand-written x86_64 switch where available, else ucontext.
    #[default]
    Native,
    /// ucontext's swapcontext (a system call per switch; for comparison).
    Ucontext,
}

/// Options of an [`Emulator`]. Construct with `EmuOptions { schedule, ..Default::default() }`;
/// the defaults: forward order, 120 CPU seconds per launch, 4 GiB of device memory, the native
/// context switch.
#[derive(Clone, Debug)]
pub struct EmuOptions {
    pub schedule: Schedule,
    /// CPU time one launch may use before it is stopped with an error (an endless loop); CPU
    /// time, so a busy machine does not stop a launch that is merely slow.
    pub time_limit: Duration,
    /// Emulated device memory this emulator may hold at once; beyond it `alloc` fails.
    pub memory_limit: usize,
    pub context_switch: ContextSwitch,
}

impl Default for EmuOptions {
    fn default() -> Self {
        EmuOptions {
            schedule: Schedule::Forward,
            time_limit: Duration::from_secs(120),
            memory_limit: 4 << 30,
            context_switch: ContextSwitch::Native,
        }
    }
}

/// One kernel the emulator can launch.
#[derive(Debug)]
pub struct KernelInfo {
    pub name: &'static str,
    /// Its family's file (`attention.cu`).
    pub file: &'static str,
    /// Its parameters as declared (`const float* q`).
    pub params: &'static [&'static str],
    /// `sizeof` each parameter type.
    pub param_sizes: &'static [usize],
}

/// A kernel argument for [`Emulator::launch_args`], checked against the parameter's size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EmuArg {
    /// A device address (any pointer parameter).
    Ptr(u64),
    I32(i32),
    U32(u32),
    F32(f32),
    U64(u64),
    /// `size_t`.
    Size(usize),
}

impl EmuArg {
    fn size(&self) -> usize {
        match self {
            EmuArg::I32(_) | EmuArg::U32(_) | EmuArg::F32(_) => 4,
            EmuArg::Ptr(_) | EmuArg::U64(_) | EmuArg::Size(_) => 8,
        }
    }
    fn as_ptr(&mut self) -> *mut c_void {
        match self {
            EmuArg::Ptr(v) | EmuArg::U64(v) => v as *mut u64 as *mut c_void,
            EmuArg::I32(v) => v as *mut i32 as *mut c_void,
            EmuArg::U32(v) => v as *mut u32 as *mut c_void,
            EmuArg::F32(v) => v as *mut f32 as *mut c_void,
            EmuArg::Size(v) => v as *mut usize as *mut c_void,
        }
    }
}

fn err(op: &'static str, msg: impl Into<String>) -> EngineError {
    EngineError::Backend { backend: "emu", op, msg: msg.into() }
}

/// The emulated device: memory and launches. `Send + Sync`; concurrent calls are safe (launches
/// take turns). Dropping it frees every allocation it still holds.
pub struct Emulator {
    id: u64,
    opts: EmuOptions,
    in_use: AtomicUsize,
}

struct Table {
    kernels: Vec<KernelInfo>,
    by_name: HashMap<&'static str, usize>,
}

fn table() -> &'static Table {
    static TABLE: OnceLock<Table> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut kernels = Vec::new();
        // SAFETY: the emulator's table is static data in the linked library; indices stay below
        // its count, and names and files are NUL-terminated string literals.
        unsafe {
            ffi::lora_emu_init();
            for i in 0..ffi::lora_emu_kernel_count() {
                let name = CStr::from_ptr(ffi::lora_emu_kernel_name(i)).to_str().unwrap_or("?");
                let file = CStr::from_ptr(ffi::lora_emu_kernel_file(i)).to_str().unwrap_or("?");
                let n = ffi::lora_emu_kernel_nparams(i);
                let param_sizes = std::slice::from_raw_parts(ffi::lora_emu_kernel_param_sizes(i), n);
                let params = generated::SIGNATURES.iter().find(|s| s.0 == name).map(|s| s.2).unwrap_or(&[]);
                kernels.push(KernelInfo { name, file, params, param_sizes });
            }
        }
        let by_name = kernels.iter().enumerate().map(|(i, k)| (k.name, i)).collect();
        Table { kernels, by_name }
    })
}

fn message(buf: &[u8]) -> String {
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

const ERR_LEN: usize = 4096;

impl Emulator {
    /// An emulator with `opts`; an error when this build has no emulator.
    pub fn new(opts: EmuOptions) -> Result<Self> {
        if !BUILT {
            let why = generated::NOT_BUILT_BECAUSE;
            let msg = if generated::NOT_BUILT_KIND == "compile-failed" {
                format!("the CPU device emulator is not in this build: its C++ failed to compile ({why})")
            } else {
                format!(
                    "the CPU device emulator is not in this build: lora-engine was built without a C++ compiler \
                     ({why}); install a C++17 compiler (g++ or clang++) and rebuild"
                )
            };
            return Err(err("init", msg));
        }
        if opts.time_limit.is_zero() {
            return Err(err("init", "EmuOptions::time_limit is zero: every launch would fail"));
        }
        table();
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Ok(Emulator { id: NEXT_ID.fetch_add(1, Ordering::Relaxed), opts, in_use: AtomicUsize::new(0) })
    }

    pub fn options(&self) -> &EmuOptions {
        &self.opts
    }

    /// Bytes of emulated device memory this emulator holds now.
    pub fn memory_in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    /// Whether `name` is a kernel the emulator can launch.
    pub fn has_kernel(&self, name: &str) -> bool {
        table().by_name.contains_key(name)
    }

    /// Every kernel the emulator can launch, with its declared parameters.
    pub fn kernels(&self) -> &'static [KernelInfo] {
        &table().kernels
    }

    /// The kernel called `name`.
    pub fn kernel(&self, name: &str) -> Option<&'static KernelInfo> {
        table().by_name.get(name).map(|&i| &table().kernels[i])
    }

    /// `bytes` of device memory (16-byte aligned, where the device gives 256; poisoned with 0xFF;
    /// guarded); the address.
    pub fn alloc(&self, bytes: usize) -> Result<u64> {
        let before = self.in_use.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.opts.memory_limit {
            self.in_use.fetch_sub(bytes, Ordering::Relaxed);
            return Err(err(
                "alloc",
                format!(
                    "out of emulated device memory: {bytes} bytes asked with {before} of {} in use \
                     (EmuOptions::memory_limit)",
                    self.opts.memory_limit
                ),
            ));
        }
        let mut out = 0u64;
        let mut buf = [0u8; ERR_LEN];
        // SAFETY: `out` and `buf` are valid for writes of their sizes for the call.
        let rc = unsafe { ffi::lora_emu_alloc(self.id, bytes, &mut out, buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 {
            self.in_use.fetch_sub(bytes, Ordering::Relaxed);
            return Err(err("alloc", message(&buf)));
        }
        Ok(out)
    }

    /// Frees an allocation; an error for an address that is not one of this emulator's live
    /// allocations (a double free, an interior pointer, another emulator's memory).
    pub fn free(&self, ptr: u64) -> Result<()> {
        let mut freed = 0usize;
        let mut buf = [0u8; ERR_LEN];
        // SAFETY: `freed` and `buf` are valid for writes for the call.
        let rc = unsafe { ffi::lora_emu_free(self.id, ptr, &mut freed, buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 {
            return Err(err("free", message(&buf)));
        }
        self.in_use.fetch_sub(freed, Ordering::Relaxed);
        Ok(())
    }

    fn copy(&self, op: &'static str, kind: c_int, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let mut buf = [0u8; ERR_LEN];
        // SAFETY: the emulator checks the device side of the copy against its allocations; the
        // host side is a slice the caller lent for `bytes` bytes (see the callers).
        let rc = unsafe { ffi::lora_emu_copy(self.id, kind, dst, src, bytes, buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 { Err(err(op, format!("{bytes} bytes: {}", message(&buf)))) } else { Ok(()) }
    }

    /// Copies `src` to device address `dst` (checked against the allocation it lands in).
    pub fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.copy("copy_htod", 0, dst, src.as_ptr() as u64, src.len())
    }

    /// Copies `dst.len()` bytes from device address `src` to `dst`.
    pub fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.copy("copy_dtoh", 1, dst.as_mut_ptr() as u64, src, dst.len())
    }

    /// Copies `bytes` between device addresses (the ranges may overlap).
    pub fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.copy("copy_dtod", 2, dst, src, bytes)
    }

    /// Sets `bytes` bytes at `dst` to `byte`.
    pub fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        let mut buf = [0u8; ERR_LEN];
        // SAFETY: the emulator checks [dst, dst + bytes) against its allocations; `buf` is valid.
        let rc = unsafe { ffi::lora_emu_memset(self.id, dst, c_int::from(byte), bytes, buf.as_mut_ptr().cast(), buf.len()) };
        if rc != 0 { Err(err("memset", format!("{bytes} bytes: {}", message(&buf)))) } else { Ok(()) }
    }

    /// Runs `kernel` on a `grid` of `block`s with `shared_bytes` of dynamic shared memory, to
    /// completion. `params` is exactly cuLaunchKernel's `kernelParams`: one pointer per argument,
    /// to a value of the kernel's C parameter type. An error (naming the kernel, and the block,
    /// thread and line where it applies) for a bad configuration and for every fault the
    /// emulator catches.
    ///
    /// # Safety
    /// Each `params[i]` must point to a live, initialised value of the kernel's `i`-th parameter
    /// type (its size is [`KernelInfo::param_sizes`]). Device addresses among the values need not
    /// be valid: the emulator checks every access through them.
    pub unsafe fn launch(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        params: &[*mut c_void],
    ) -> Result<()> {
        let Some(&index) = table().by_name.get(kernel) else {
            return Err(err("launch", format!("no kernel `{kernel}` in the emulator (is its family in kernels/?)")));
        };
        let info = &table().kernels[index];
        if params.len() != info.param_sizes.len() {
            return Err(err(
                "launch",
                format!(
                    "kernel {kernel} takes {} parameters ({}), the launch passed {}",
                    info.param_sizes.len(),
                    info.params.join(", "),
                    params.len()
                ),
            ));
        }
        let opts = ffi::LaunchOptions {
            schedule: match self.opts.schedule {
                Schedule::Forward => 0,
                Schedule::Reverse => 1,
                Schedule::Shuffled(_) => 2,
            },
            seed: match self.opts.schedule {
                Schedule::Shuffled(s) => s,
                _ => 0,
            },
            time_limit_s: self.opts.time_limit.as_secs_f64(),
            use_ucontext: c_int::from(self.opts.context_switch == ContextSwitch::Ucontext),
        };
        let (g, b) = ([grid.0, grid.1, grid.2], [block.0, block.1, block.2]);
        let mut buf = vec![0u8; ERR_LEN];
        // SAFETY: `params` holds pointers to live values of the kernel's parameter types (the
        // caller's contract) and has the kernel's parameter count (checked above); the emulator
        // copies them before it returns. `g`, `b`, `opts` and `buf` are valid for the call.
        let rc = unsafe {
            ffi::lora_emu_launch(
                index,
                g.as_ptr(),
                b.as_ptr(),
                shared_bytes,
                params.as_ptr() as *mut *mut c_void,
                params.len(),
                &opts,
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let mut msg = message(&buf);
        if self.opts.schedule != Schedule::Forward {
            msg.push_str(&format!(" [schedule {:?}]", self.opts.schedule));
        }
        Err(err("launch", msg))
    }

    /// [`Emulator::launch`] with typed arguments, each checked against the size of its
    /// parameter: safe.
    pub fn launch_args(
        &self,
        kernel: &str,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_bytes: u32,
        args: &[EmuArg],
    ) -> Result<()> {
        let info = self
            .kernel(kernel)
            .ok_or_else(|| err("launch", format!("no kernel `{kernel}` in the emulator (is its family in kernels/?)")))?;
        if args.len() != info.param_sizes.len() {
            return Err(err(
                "launch",
                format!(
                    "kernel {kernel} takes {} parameters ({}), {} given",
                    info.param_sizes.len(),
                    info.params.join(", "),
                    args.len()
                ),
            ));
        }
        for (i, (a, &size)) in args.iter().zip(info.param_sizes).enumerate() {
            if a.size() != size {
                return Err(err(
                    "launch",
                    format!(
                        "kernel {kernel} parameter {i} (`{}`) is {size} bytes, the argument {a:?} is {}",
                        info.params.get(i).copied().unwrap_or("?"),
                        a.size()
                    ),
                ));
            }
        }
        let mut values = args.to_vec();
        let params: Vec<*mut c_void> = values.iter_mut().map(EmuArg::as_ptr).collect();
        // SAFETY: each pointer points into `values`, which outlives the call, at a value of
        // exactly the parameter's size (checked above).
        unsafe { self.launch(kernel, grid, block, shared_bytes, &params) }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        // SAFETY: unmaps only this emulator's allocations, which nothing can use once it is gone
        // (their addresses came from it and every access goes through it).
        unsafe { ffi::lora_emu_free_owner(self.id) }
    }
}

/// The C API of `host/engine/emu/runtime/` (or, in a build without the emulator, stand-ins that
/// are never reached: [`Emulator::new`] fails first).
#[allow(clippy::missing_safety_doc)]
mod ffi {
    use std::ffi::{c_char, c_int, c_void};

    #[repr(C)]
    pub struct LaunchOptions {
        pub schedule: c_int,
        pub seed: u64,
        pub time_limit_s: f64,
        pub use_ucontext: c_int,
    }

    #[cfg(lora_emu)]
    unsafe extern "C" {
        pub fn lora_emu_init();
        pub fn lora_emu_kernel_count() -> usize;
        pub fn lora_emu_kernel_name(i: usize) -> *const c_char;
        pub fn lora_emu_kernel_file(i: usize) -> *const c_char;
        pub fn lora_emu_kernel_nparams(i: usize) -> usize;
        pub fn lora_emu_kernel_param_sizes(i: usize) -> *const usize;
        pub fn lora_emu_alloc(owner: u64, bytes: usize, out: *mut u64, err: *mut c_char, errlen: usize) -> c_int;
        pub fn lora_emu_free(owner: u64, ptr: u64, freed: *mut usize, err: *mut c_char, errlen: usize) -> c_int;
        pub fn lora_emu_free_owner(owner: u64);
        pub fn lora_emu_copy(owner: u64, kind: c_int, dst: u64, src: u64, bytes: usize, err: *mut c_char, errlen: usize)
        -> c_int;
        pub fn lora_emu_memset(owner: u64, dst: u64, byte: c_int, bytes: usize, err: *mut c_char, errlen: usize) -> c_int;
        pub fn lora_emu_launch(
            kernel: usize,
            grid: *const u32,
            block: *const u32,
            smem: u32,
            params: *mut *mut c_void,
            nparams: usize,
            opts: *const LaunchOptions,
            err: *mut c_char,
            errlen: usize,
        ) -> c_int;
    }

    #[cfg(not(lora_emu))]
    mod absent {
        use super::*;
        pub unsafe fn lora_emu_init() {}
        pub unsafe fn lora_emu_kernel_count() -> usize {
            0
        }
        pub unsafe fn lora_emu_kernel_name(_: usize) -> *const c_char {
            c"".as_ptr()
        }
        pub unsafe fn lora_emu_kernel_file(_: usize) -> *const c_char {
            c"".as_ptr()
        }
        pub unsafe fn lora_emu_kernel_nparams(_: usize) -> usize {
            0
        }
        pub unsafe fn lora_emu_kernel_param_sizes(_: usize) -> *const usize {
            std::ptr::NonNull::dangling().as_ptr()
        }
        pub unsafe fn lora_emu_alloc(_: u64, _: usize, _: *mut u64, _: *mut c_char, _: usize) -> c_int {
            1
        }
        pub unsafe fn lora_emu_free(_: u64, _: u64, _: *mut usize, _: *mut c_char, _: usize) -> c_int {
            1
        }
        pub unsafe fn lora_emu_free_owner(_: u64) {}
        pub unsafe fn lora_emu_copy(_: u64, _: c_int, _: u64, _: u64, _: usize, _: *mut c_char, _: usize) -> c_int {
            1
        }
        pub unsafe fn lora_emu_memset(_: u64, _: u64, _: c_int, _: usize, _: *mut c_char, _: usize) -> c_int {
            1
        }
        #[allow(clippy::too_many_arguments)]
        pub unsafe fn lora_emu_launch(
            _: usize,
            _: *const u32,
            _: *const u32,
            _: u32,
            _: *mut *mut c_void,
            _: usize,
            _: *const LaunchOptions,
            _: *mut c_char,
            _: usize,
        ) -> c_int {
            1
        }
    }
    #[cfg(not(lora_emu))]
    pub use absent::*;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The emulator compiles every family exactly as NVRTC gets it (`kernels::full_source`), and
    /// nothing else: a family added to `kernels/` without being registered (or the other way
    /// round) fails here.
    #[test]
    fn the_emulator_compiles_exactly_the_nvrtc_text_of_every_family() {
        use super::super::kernels::{FAMILIES, PROBES, full_source};
        let all: Vec<&Family> = FAMILIES.iter().chain(PROBES).chain([&FAULT_PROBES, &PLANTED_BUG]).collect();
        assert_eq!(COMPILED_SOURCES.len(), all.len(), "families compiled vs registered");
        for f in all {
            let (_, text) = COMPILED_SOURCES
                .iter()
                .find(|(file, _)| *file == f.file)
                .unwrap_or_else(|| panic!("{} is registered but the emulator did not compile it", f.file));
            assert!(*text == full_source(f), "{}: the emulator's text differs from NVRTC's", f.file);
            let declared: Vec<&str> = generated::SIGNATURES.iter().filter(|s| s.1 == f.file).map(|s| s.0).collect();
            let mut want = f.kernels.to_vec();
            want.sort_unstable();
            let mut got = declared.clone();
            got.sort_unstable();
            assert_eq!(got, want, "{}: kernels in the source vs registered", f.file);
        }
    }

    /// NVRTC compiles the probe families too (they are CUDA like any other), and every family's
    /// PTX goes to `$LORA_PTX_OUT` when set, for tests/ci.d/50-nvrtc.sh to assemble with ptxas
    /// (NVRTC passes inline PTX through unchecked; ptxas is what parses mma.cuh's instructions).
    #[test]
    #[ignore = "needs NVRTC and CUDA headers: run by tests/ci.d/50-nvrtc.sh"]
    fn every_family_and_probe_compiles_with_nvrtc_for_sm90() {
        use super::super::kernels::{FAMILIES, PROBES};
        use super::super::nvrtc::{compile_family, include_dir};
        let include = include_dir().unwrap_or_else(|e| panic!("{e}"));
        let out = std::env::var_os("LORA_PTX_OUT").map(std::path::PathBuf::from);
        for f in FAMILIES.iter().chain(PROBES).chain([&FAULT_PROBES]) {
            let ptx = compile_family(f, "90", &include, false).unwrap_or_else(|e| panic!("{e}"));
            for k in f.kernels {
                assert!(ptx.contains(&format!(".entry {k}(")), "{}: kernel `{k}` is missing from the PTX", f.file);
            }
            if let Some(dir) = &out {
                let path = dir.join(f.file.replace(".cu", ".ptx"));
                std::fs::write(&path, &ptx).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
            }
            println!("{:<18} {:>2} kernels {:>7} bytes of PTX", f.file, f.kernels.len(), ptx.len());
        }
    }

    #[test]
    fn the_emulator_can_be_shared_between_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Emulator>();
    }

    /// With a compiler the emulator is built unless `LORA_EMU=off` asked otherwise, and without
    /// one every entry point says why instead of failing later.
    #[test]
    fn built_or_says_why() {
        let made = Emulator::new(EmuOptions::default());
        assert_eq!(made.is_ok(), BUILT, "Emulator::new vs BUILT");
        match made {
            Ok(e) => {
                assert!(e.has_kernel("attention_fwd_f32"));
                assert_eq!(e.kernels().len(), generated::SIGNATURES.len());
            }
            Err(e) => {
                let msg = e.to_string();
                if generated::NOT_BUILT_KIND == "compile-failed" {
                    panic!("a C++ compiler is present but the emulator did not compile: {msg}");
                }
                assert!(msg.contains("built without a C++ compiler"), "{msg}");
                assert!(msg.contains("backend `emu` op `init`"), "{msg}");
            }
        }
    }
}
