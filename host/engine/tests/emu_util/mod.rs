//! Shared helpers of the emulator's integration tests (`emu.rs`, `emu_kernels.rs`): device buffers
//! from and to host vectors, and the CPU backend as the reference.
#![allow(dead_code)]

use lora_engine::cuda::emu::{EmuArg, EmuOptions, Emulator, Schedule};
use lora_engine::{Backend, Buf, DType, HostData};

pub use lora_engine::cpu::CpuBackend;

/// An emulator with helpers for typed buffers.
pub struct Dev {
    pub emu: Emulator,
}

impl Dev {
    pub fn new(schedule: Schedule) -> Dev {
        Dev::with(EmuOptions { schedule, ..Default::default() })
    }

    pub fn with(opts: EmuOptions) -> Dev {
        // These tests need the emulator: a build without a C++ compiler says so here.
        Dev { emu: Emulator::new(opts).unwrap_or_else(|e| panic!("{e}")) }
    }

    pub fn bytes(&self, b: &[u8]) -> u64 {
        let p = self.emu.alloc(b.len()).unwrap();
        self.emu.copy_htod(p, b).unwrap();
        p
    }
    pub fn f32s(&self, x: &[f32]) -> u64 {
        self.bytes(&x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }
    pub fn u32s(&self, x: &[u32]) -> u64 {
        self.bytes(&x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }
    pub fn i32s(&self, x: &[i32]) -> u64 {
        self.bytes(&x.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
    }
    pub fn bf16s(&self, x: &[f32]) -> u64 {
        self.bytes(&x.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect::<Vec<_>>())
    }
    /// `n` bytes, unwritten (poisoned).
    pub fn out(&self, n: usize) -> u64 {
        self.emu.alloc(n).unwrap()
    }
    pub fn zeros(&self, n: usize) -> u64 {
        let p = self.out(n);
        self.emu.memset(p, 0, n).unwrap();
        p
    }
    pub fn get(&self, p: u64, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.emu.copy_dtoh(p, &mut b).unwrap();
        b
    }
    pub fn get_f32(&self, p: u64, n: usize) -> Vec<f32> {
        self.get(p, n * 4).chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
    }
    pub fn get_f64(&self, p: u64, n: usize) -> Vec<f64> {
        self.get(p, n * 8).chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect()
    }
    pub fn get_u32(&self, p: u64, n: usize) -> Vec<u32> {
        self.get(p, n * 4).chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect()
    }
    pub fn get_u16(&self, p: u64, n: usize) -> Vec<u16> {
        self.get(p, n * 2).chunks_exact(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect()
    }
    pub fn run(&self, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[EmuArg]) {
        self.emu.launch_args(kernel, grid, block, smem, args).unwrap_or_else(|e| panic!("{kernel}: {e}"));
    }
    pub fn try_run(&self, kernel: &str, grid: (u32, u32, u32), block: (u32, u32, u32), smem: u32, args: &[EmuArg]) -> String {
        match self.emu.launch_args(kernel, grid, block, smem, args) {
            Ok(()) => panic!("{kernel}: the launch succeeded, an error was expected"),
            Err(e) => e.to_string(),
        }
    }
}

pub fn ptr(p: u64) -> EmuArg {
    EmuArg::Ptr(p)
}
pub fn i32a(v: usize) -> EmuArg {
    EmuArg::I32(v as i32)
}

/// The CUDA backend's grid-stride launch over `n` elements (ops.rs `grid1d`).
pub fn grid1d(n: usize) -> (u32, u32, u32) {
    (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1)
}
/// The CUDA backend's block per row (ops.rs `per_row`): threads a multiple of 32.
pub fn per_row(cols: usize) -> (u32, u32, u32) {
    ((cols.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32, 1, 1)
}

/// Deterministic values in [-1, 1).
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut r = lora_engine::rng::Rng::new(seed);
    (0..n).map(|_| r.uniform() * 2.0 - 1.0).collect()
}

pub fn cpu_buf(cpu: &CpuBackend, x: &[f32]) -> Buf {
    cpu.upload(HostData::F32(x), DType::F32).unwrap()
}
pub fn cpu_u32(cpu: &CpuBackend, x: &[u32]) -> Buf {
    cpu.upload(HostData::U32(x), DType::U32).unwrap()
}
pub fn cpu_get(cpu: &CpuBackend, b: &Buf) -> Vec<f32> {
    cpu.download_f32(b).unwrap()
}

/// Element-wise closeness with `atol + rtol * |want|`, printing the worst element on failure.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], atol: f32, rtol: f32) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut worst = (0usize, 0f32);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        let tol = atol + rtol * w.abs();
        assert!(!g.is_nan() || w.is_nan(), "{what}: [{i}] is NaN (want {w}): unwritten or poisoned memory read?");
        if err > tol && err - tol > worst.1 {
            worst = (i, err - tol);
        }
    }
    assert!(worst.1 == 0.0, "{what}: [{}] got {} want {} (beyond tolerance by {})", worst.0, got[worst.0], want[worst.0], worst.1);
}
