//! [`GpuDevice`] on the CPU device emulator ([`super::emu`]): the kernels are the same `.cu` text
//! NVRTC compiles, built as C++; memory is the emulator's guarded, poisoned mappings (an
//! out-of-bounds access is an error naming the kernel); a matrix product runs
//! [`plan::reference`] on the exact byte spans its [`MatmulPlan`] describes, so a wrong leading
//! dimension or transpose reads the wrong elements or past the allocation, here, on a CPU.
//! Every call is synchronous (it has finished when it returns), so an error names the op that
//! caused it.

use cudarc::driver::LaunchConfig;

use super::device::{Arg, DeviceInfo, GpuDevice};
use super::emu::{EmuArg, EmuOptions, Emulator, Schedule};
use super::plan::{self, MatmulPlan};
use crate::error::{EngineError, Result};

fn err(op: &'static str, msg: impl Into<String>) -> EngineError {
    EngineError::Backend { backend: "emu", op, msg: msg.into() }
}

/// The emulated GPU.
pub struct EmulatedDevice {
    emu: Emulator,
    info: DeviceInfo,
}

/// The thread order `LORA_EMU_SCHEDULE` asks for: `forward` (default), `reverse` or
/// `shuffled:<seed>`.
pub fn schedule_from_env() -> Result<Schedule> {
    match std::env::var("LORA_EMU_SCHEDULE") {
        Err(_) => Ok(Schedule::Forward),
        Ok(v) => match v.as_str() {
            "" | "forward" => Ok(Schedule::Forward),
            "reverse" => Ok(Schedule::Reverse),
            s => match s.strip_prefix("shuffled:").map(str::parse::<u64>) {
                Some(Ok(seed)) => Ok(Schedule::Shuffled(seed)),
                _ => Err(err("init", format!("LORA_EMU_SCHEDULE={v:?}: expected forward, reverse or shuffled:<seed>"))),
            },
        },
    }
}

impl EmulatedDevice {
    pub fn new(opts: EmuOptions) -> Result<Self> {
        let details = vec![
            ("schedule".into(), format!("{:?}", opts.schedule)),
            ("memory limit (bytes)".into(), opts.memory_limit.to_string()),
            ("time limit per launch".into(), format!("{:?}", opts.time_limit)),
            // sm_90's, so the host's shared-memory checks run here as on an H100/H200.
            (super::flash::SMEM_OPTIN_DETAIL.into(), "232448".into()),
        ];
        let emu = Emulator::new(opts)?;
        Ok(EmulatedDevice { emu, info: DeviceInfo { name: "CPU device emulator".into(), compute_capability: (9, 0), details } })
    }

    fn read(&self, op: &'static str, what: &str, ptr: u64, bytes: usize) -> Result<Vec<u8>> {
        let mut v = vec![0u8; bytes];
        if bytes > 0 {
            self.emu.copy_dtoh(ptr, &mut v).map_err(|e| err(op, format!("{what}: {e}")))?;
        }
        Ok(v)
    }
}

impl GpuDevice for EmulatedDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }

    fn alloc(&self, bytes: usize, zero: bool) -> Result<u64> {
        let bytes = bytes.max(1);
        let p = self.emu.alloc(bytes)?;
        if zero {
            self.emu.memset(p, 0, bytes)?;
        }
        Ok(p)
    }

    unsafe fn free(&self, ptr: u64) -> Result<()> {
        self.emu.free(ptr)
    }

    unsafe fn copy_htod(&self, dst: u64, src: &[u8]) -> Result<()> {
        self.emu.copy_htod(dst, src)
    }

    unsafe fn copy_dtoh(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        self.emu.copy_dtoh(src, dst)
    }

    unsafe fn copy_dtod(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        self.emu.copy_dtod(dst, src, bytes)
    }

    unsafe fn memset(&self, dst: u64, byte: u8, bytes: usize) -> Result<()> {
        self.emu.memset(dst, byte, bytes)
    }

    unsafe fn launch(&self, kernel: &'static str, cfg: LaunchConfig, args: &[Arg]) -> Result<()> {
        let args: Vec<EmuArg> = args
            .iter()
            .map(|a| match *a {
                Arg::Ptr(p) => EmuArg::Ptr(p),
                Arg::U64(v) => EmuArg::U64(v),
                Arg::I32(v) => EmuArg::I32(v),
                Arg::F32(v) => EmuArg::F32(v),
                Arg::Size(v) => EmuArg::Size(v),
                Arg::U32(v) => EmuArg::U32(v),
            })
            .collect();
        // Every access through the addresses is checked by the emulator.
        self.emu.launch_args(kernel, cfg.grid_dim, cfg.block_dim, cfg.shared_mem_bytes, &args)
    }

    unsafe fn matmul(&self, plan: &MatmulPlan, a: u64, b: u64, c: u64) -> Result<()> {
        let d = plan.describe();
        let op = plan.op;
        let av = self.read(op, &format!("operand A of {d}"), a, plan.a.span_bytes())?;
        let bv = self.read(op, &format!("operand B of {d}"), b, plan.b.span_bytes())?;
        let mut cv = self.read(op, &format!("operand C of {d}"), c, plan.c.span_bytes())?;
        plan::reference(plan, &av, &bv, &mut cv).map_err(|m| err(op, format!("cublasLtMatmul refused: {m} ({d})")))?;
        if !cv.is_empty() {
            self.emu.copy_htod(c, &cv).map_err(|e| err(op, format!("writing D of {d}: {e}")))?;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn memory(&self) -> Option<(u64, u64)> {
        let limit = self.emu.options().memory_limit as u64;
        Some((limit.saturating_sub(self.emu.memory_in_use() as u64), limit))
    }
}
