//! `lora selftest`: every op of the [`Backend`] set checked on fresh random inputs of several
//! shapes (odd sizes, GQA ratios), printed as one table (op, shape, max abs err, max rel err, pass).
//!
//! - `--device cpu`: the CPU backend against plain float64 implementations of each formula
//!   ([`reference`]), and the float64 backward formulas against finite differences of the
//!   float64 forwards (so the oracle itself is checked).
//! - `--device cuda`: the same cases, the GPU against its CPU twin. Base-weight inputs are
//!   rounded to bf16 first, so both devices see identical weights; tolerances scale with the
//!   dtype the GPU computes in (`t = atol * max|ref| + rtol * |ref|`).
//!
//! With a GPU the selftest then trains a tiny model for [`TRAIN_STEPS`] steps on the GPU and on
//! the CPU (LoRA with dropout, rsLoRA, DoRA): per-step loss within 1e-2 relative, final adapter
//! within bf16 tolerance, and a second GPU run with the same seed must give identical bytes.
//!
//! One body of cases for both devices (candle's `test_device!` habit): [`run_with`] takes the
//! backend under test; the oracle follows from its device.

mod cases;
pub mod reference;
mod training;

use std::fmt;

use crate::backend::{Backend, Device};
use crate::cpu::CpuBackend;
use crate::error::Result;

/// One line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    pub op: String,
    pub shape: String,
    pub max_abs: f64,
    pub max_rel: f64,
    pub pass: bool,
    /// Why it failed, or what the row compares when it is not "device vs oracle".
    pub note: String,
}

/// The whole run.
#[derive(Debug, Clone)]
pub struct Report {
    pub device: String,
    pub oracle: &'static str,
    pub seed: u64,
    pub rows: Vec<Row>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.rows.is_empty() && self.rows.iter().all(|r| r.pass)
    }

    pub fn failures(&self) -> usize {
        self.rows.iter().filter(|r| !r.pass).count()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "selftest on {} against {} (seed {})", self.device, self.oracle, self.seed)?;
        writeln!(f, "{:<34} {:<34} {:>11} {:>11}  pass", "op", "shape", "max abs", "max rel")?;
        for r in &self.rows {
            writeln!(
                f,
                "{:<34} {:<34} {:>11.3e} {:>11.3e}  {}{}",
                r.op,
                r.shape,
                r.max_abs,
                r.max_rel,
                if r.pass { "ok" } else { "FAIL" },
                if r.note.is_empty() { String::new() } else { format!("  ({})", r.note) }
            )?;
        }
        let n = self.rows.len();
        write!(f, "{} of {n} checks passed", n - self.failures())
    }
}

/// Optimizer steps of the GPU-vs-CPU training comparison.
pub const TRAIN_STEPS: usize = 20;

/// Runs the selftest on `device` (`Device::Cuda(i)` opens that GPU; an error if none is there).
/// `seed` picks the random inputs; `None` draws one from the clock (it is printed in the report).
pub fn run(device: Device, seed: Option<u64>) -> Result<Report> {
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    });
    match device {
        Device::Cpu => run_with(&CpuBackend::new(), seed),
        Device::Cuda(i) => {
            let be = crate::cuda::open(i)?;
            run_with(&*be, seed)
        }
    }
}

/// Runs every case on `dev`; the oracle is float64 for the CPU backend, the CPU backend otherwise.
pub fn run_with(dev: &dyn Backend, seed: u64) -> Result<Report> {
    let cpu = CpuBackend::new();
    let oracle_cpu = dev.device() != Device::Cpu;
    let mut ctx = cases::Ctx::new(dev, if oracle_cpu { Some(&cpu as &dyn Backend) } else { None }, seed);
    cases::all(&mut ctx)?;
    if oracle_cpu {
        training::compare(dev.device(), TRAIN_STEPS, seed, &mut ctx.rows)?;
    }
    Ok(Report {
        device: dev.device().to_string(),
        oracle: if oracle_cpu { "the cpu backend" } else { "float64 formulas" },
        seed,
        rows: ctx.rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CI proof of the CPU ops: every op matches its float64 formula, and every float64
    /// backward matches finite differences.
    #[test]
    fn cpu_backend_matches_float64_formulas() {
        let report = run(Device::Cpu, Some(0x5EED_2026)).expect("selftest ran");
        println!("{report}");
        assert!(report.rows.len() > 40, "only {} checks ran", report.rows.len());
        assert!(report.passed(), "{} checks failed:\n{report}", report.failures());
    }

    /// The training comparison's machinery, CPU against itself: equal losses and adapters, and
    /// a rerun with the same seed gives identical bytes (on a GPU the same code compares devices).
    #[test]
    fn training_comparison_runs_and_cpu_is_deterministic() {
        let mut rows = Vec::new();
        training::compare(Device::Cpu, 3, 7, &mut rows).expect("training ran");
        assert_eq!(rows.len(), 9);
        for r in &rows {
            assert!(r.pass, "{} failed: {}", r.op, r.note);
            assert_eq!(r.max_abs, 0.0, "{}: cpu vs cpu differs", r.op);
        }
        assert!(rows[0].note.contains("loss"), "{}", rows[0].note);
    }

    /// A backend that gets an op wrong is caught: a deliberately wrong oracle comparison fails.
    #[test]
    fn a_wrong_result_fails_its_row() {
        let mut ctx = cases::Ctx::new(&CpuBackend, None, 1);
        ctx.record_compare("fake", "n=3", cases::Tol::F32, &[vec![1.0, 2.0, 3.0]], &[vec![1.0, 2.0, 3.1]], &["x"]);
        assert!(!ctx.rows[0].pass);
        assert!((ctx.rows[0].max_abs - 0.1).abs() < 1e-9);
    }
}
