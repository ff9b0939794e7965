//! `lora selftest`: every op of the [`Backend`] set checked on fresh random inputs of several
//! shapes (odd sizes, GQA ratios), one row per check (op, shape, max abs err, max rel err, wall
//! time, pass), each handed to the caller as soon as it is known.
//!
//! - `--device cpu`: the CPU backend against plain float64 implementations of each formula
//!   ([`reference`]), and the float64 backward formulas against finite differences of the
//!   float64 forwards (so the oracle itself is checked).
//! - `--device cuda` / `--device emu` (the CUDA backend on a GPU or on the CPU device
//!   emulator): the same cases against [`CpuBackend::cuda_numerics`], the CPU backend rounding
//!   to bf16 exactly where the CUDA path stores bf16. Base-weight inputs are bf16 values, so both
//!   sides see identical weights, and products with bf16 operands are held to ~1e-3.
//!   Then the training comparison ([`training`]): a tiny Qwen2-like model, first-step adapter
//!   gradients at identical parameters (<= 2e-2 relative L2), the loss per step (<= 1e-3
//!   relative), and a same-seed rerun on the device (identical bytes).
//!
//! The work is split into named families ([`families`]): `env` (what the device is), one per op
//! family, one per training variant. `lora selftest` runs each in its own child process with a
//! watchdog, so a sticky device fault or a hang costs one family, not the rest; [`run`] runs
//! them all in this process (the tests).
//!
//! One body of cases for every device (candle's `test_device!` habit): [`cases::Ctx`] takes the
//! backend under test; the oracle follows from its device.

mod cases;
pub mod reference;
mod training;

use std::fmt;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Device};
use crate::cpu::CpuBackend;
use crate::error::Result;

/// One line of the table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub op: String,
    pub shape: String,
    /// JSON has no NaN or infinity: they travel as `null` and come back as NaN.
    #[serde(deserialize_with = "nan_if_null")]
    pub max_abs: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub max_rel: f64,
    pub pass: bool,
    /// Why it failed, or what the row compares when it is not "device vs oracle".
    pub note: String,
    /// Wall time of the check (device and oracle), seconds.
    #[serde(default)]
    pub secs: f64,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

impl Row {
    /// A failed row for something that could not run at all.
    pub fn error(op: &str, shape: &str, note: String) -> Row {
        Row { op: op.into(), shape: shape.into(), max_abs: f64::NAN, max_rel: f64::NAN, pass: false, note, secs: 0.0 }
    }
}

/// The table's header line.
pub const HEADER: &str = "op                                 shape                                  max abs     max rel     secs  pass";

impl fmt::Display for Row {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<34} {:<34} {:>11.3e} {:>11.3e} {:>8.2}  {}{}",
            self.op,
            self.shape,
            self.max_abs,
            self.max_rel,
            self.secs,
            if self.pass { "ok" } else { "FAIL" },
            if self.note.is_empty() { String::new() } else { format!("  ({})", self.note) }
        )
    }
}

/// What a running selftest reports, as it happens.
pub enum Event<'a> {
    /// A check begins (for a watchdog to say what is running).
    Start(&'a str),
    /// A line about the device (`env` family): key, value.
    Info(&'a str, &'a str),
    /// A check finished.
    Row(&'a Row),
}

/// Where events go.
pub type Sink<'a> = &'a mut dyn FnMut(Event<'_>);

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
        writeln!(f, "{}", title(&self.device, self.oracle, self.seed))?;
        writeln!(f, "{HEADER}")?;
        for r in &self.rows {
            writeln!(f, "{r}")?;
        }
        write!(f, "{}", summary(&self.rows))
    }
}

/// The first line of a report.
pub fn title(device: &str, oracle: &str, seed: u64) -> String {
    format!("selftest on {device} against {oracle} (seed {seed})")
}

/// The last line of a report.
pub fn summary(rows: &[Row]) -> String {
    let n = rows.len();
    format!("{} of {n} checks passed", n - rows.iter().filter(|r| !r.pass).count())
}

/// What the device under test is compared with.
pub fn oracle_name(device: Device) -> &'static str {
    match device {
        Device::Cpu => "float64 formulas",
        _ => "the cpu backend with CUDA's bf16 rounding",
    }
}

/// Optimizer steps of the training comparison's loss curve.
pub const TRAIN_STEPS: usize = 8;

/// Parts of a selftest run, for `--stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// What the device is (name, versions, SM count, shared memory).
    Env,
    /// Every op against the oracle.
    Ops,
    /// The training comparison (not on the CPU, which is its own oracle).
    Training,
    All,
}

impl Stage {
    pub fn parse(s: &str) -> Option<Stage> {
        match s {
            "env" => Some(Stage::Env),
            "ops" => Some(Stage::Ops),
            "training" => Some(Stage::Training),
            "all" => Some(Stage::All),
            _ => None,
        }
    }
}

/// The families of `stage` on `device`, in run order.
pub fn families(device: Device, stage: Stage) -> Vec<String> {
    let mut v = Vec::new();
    if matches!(stage, Stage::Env | Stage::All) {
        v.push("env".to_string());
    }
    if matches!(stage, Stage::Ops | Stage::All) {
        v.extend(cases::FAMILIES.iter().map(|(n, _)| n.to_string()));
    }
    if matches!(stage, Stage::Training | Stage::All) && device != Device::Cpu {
        v.extend(training::VARIANTS.iter().map(|n| format!("training:{n}")));
    }
    v
}

/// The backend under test.
pub fn open(device: Device) -> Result<std::sync::Arc<dyn Backend>> {
    crate::model::backend_for(device)
}

/// Draws a seed from the clock when none is given.
pub fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
    })
}

/// Runs family `name` on `device`, reporting to `sink`. An error only when the family does not
/// exist or the backend cannot be opened; a failing check is a failed row.
pub fn run_family(device: Device, seed: u64, name: &str, sink: Sink<'_>) -> Result<()> {
    let bad = || crate::error::EngineError::Backend { backend: "selftest", op: "family", msg: format!("no family `{name}` (families: {})", families(device, Stage::All).join(", ")) };
    if name == "env" {
        let t = Instant::now();
        let be = open(device)?;
        sink(Event::Info("backend", be.name()));
        sink(Event::Info("device", &device.to_string()));
        for (k, v) in env_details(&*be) {
            sink(Event::Info(&k, &v));
        }
        let mut row = Row { op: "open the backend".into(), shape: String::new(), max_abs: 0.0, max_rel: 0.0, pass: true, note: String::new(), secs: 0.0 };
        row.secs = t.elapsed().as_secs_f64();
        sink(Event::Row(&row));
        return Ok(());
    }
    if let Some(variant) = name.strip_prefix("training:") {
        if !training::VARIANTS.contains(&variant) || device == Device::Cpu {
            return Err(bad());
        }
        training::compare_variant(device, variant, TRAIN_STEPS, seed, sink);
        return Ok(());
    }
    let f = cases::FAMILIES.iter().find(|(n, _)| *n == name).ok_or_else(bad)?;
    let be = open(device)?;
    run_ops_with(&*be, seed, &[f], sink);
    Ok(())
}

/// Name/value lines about a backend's device.
fn env_details(be: &dyn Backend) -> Vec<(String, String)> {
    let mut v = Vec::new();
    if let Some(b) = be.available_memory_bytes() {
        v.push(("free memory (bytes)".into(), b.to_string()));
    }
    v.extend(be.device_details());
    v
}

fn run_ops_with(dev: &dyn Backend, seed: u64, which: &[&(&str, fn(&mut cases::Ctx))], sink: Sink<'_>) {
    let oracle = CpuBackend::cuda_numerics();
    let with_oracle = dev.device() != Device::Cpu;
    for (name, f) in which {
        // Each family draws from its own stream (the run's seed mixed with its name), so a
        // family run alone, as the child processes do, sees the inputs of a whole run.
        let fseed = name.bytes().fold(seed, |s, b| crate::backend::splitmix64(s ^ u64::from(b)));
        let mut ctx = cases::Ctx::new(dev, with_oracle.then_some(&oracle as &dyn Backend), fseed);
        ctx.sink = Some(&mut *sink);
        f(&mut ctx);
    }
}

/// Runs every family of `stage` on `device` in this process; rows go to `sink` as they finish
/// and into the report.
pub fn run_stage(device: Device, seed: Option<u64>, stage: Stage, sink: Sink<'_>) -> Result<Report> {
    let seed = seed_or_clock(seed);
    let mut rows = Vec::new();
    for name in families(device, stage) {
        let mut local = |e: Event<'_>| {
            if let Event::Row(r) = &e {
                rows.push((*r).clone());
            }
            sink(e);
        };
        run_family(device, seed, &name, &mut local)?;
    }
    Ok(Report { device: device.to_string(), oracle: oracle_name(device), seed, rows })
}

/// Runs the whole selftest on `device` in this process (`Device::Cuda(i)` opens that GPU; an
/// error if none is there). `seed` picks the random inputs; `None` draws one from the clock (it is
/// printed in the report).
pub fn run(device: Device, seed: Option<u64>) -> Result<Report> {
    run_stage(device, seed, Stage::All, &mut |_| {})
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

    /// A family run alone sees the same inputs as in a whole run (the child processes rely on
    /// it: a failure in a whole run is reproduced by that family alone).
    #[test]
    fn a_family_alone_gives_the_rows_of_a_whole_run() {
        let whole = run_stage(Device::Cpu, Some(9), Stage::Ops, &mut |_| {}).unwrap();
        let mut alone = Vec::new();
        run_family(Device::Cpu, 9, "rope", &mut |e| {
            if let Event::Row(r) = e {
                alone.push(r.clone());
            }
        })
        .unwrap();
        let in_whole: Vec<&Row> = whole.rows.iter().filter(|r| r.op.starts_with("rope")).collect();
        assert_eq!(alone.len(), in_whole.len());
        for (a, w) in alone.iter().zip(in_whole) {
            assert_eq!((a.max_abs.to_bits(), &a.shape), (w.max_abs.to_bits(), &w.shape));
        }
        assert!(run_family(Device::Cpu, 9, "nope", &mut |_| {}).unwrap_err().to_string().contains("no family `nope`"));
    }

    /// The training comparison's machinery, CPU against itself: equal losses and gradients, and
    /// a rerun with the same seed gives identical bytes (on a GPU the same code compares devices).
    #[test]
    fn training_comparison_runs_and_cpu_is_deterministic() {
        let mut rows = Vec::new();
        training::compare_variant(Device::Cpu, "rslora", 3, 7, &mut |e| {
            if let Event::Row(r) = e {
                rows.push(r.clone());
            }
        });
        assert_eq!(rows.len(), 3, "{rows:?}");
        for r in &rows {
            assert!(r.pass, "{} failed: {}", r.op, r.note);
            assert_eq!(r.max_abs, 0.0, "{}: cpu vs cpu differs", r.op);
        }
        assert!(rows.iter().any(|r| r.op.contains("gradients")), "{rows:?}");
        assert!(rows.iter().any(|r| r.note.contains("loss")), "{rows:?}");
    }

    /// Rows cross the child-process pipe as JSON; a NaN error (a kernel that wrote NaN) comes
    /// back as NaN, not as an unreadable row.
    #[test]
    fn rows_survive_json_with_nan_errors() {
        let mut r = Row::error("attention_fwd.lse", "t3", "got -inf".into());
        r.secs = 0.5;
        let back: Row = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert!(back.max_abs.is_nan() && back.max_rel.is_nan() && !back.pass);
        assert_eq!((back.op.as_str(), back.secs), ("attention_fwd.lse", 0.5));
    }

    /// A backend that gets an op wrong is caught: a deliberately wrong oracle comparison fails.
    #[test]
    fn a_wrong_result_fails_its_row() {
        let be = CpuBackend::new();
        let mut ctx = cases::Ctx::new(&be, None, 1);
        ctx.record_compare("fake", "n=3", cases::Tol::F32, &[vec![1.0, 2.0, 3.0]], &[vec![1.0, 2.0, 3.1]], &["x"]);
        assert!(!ctx.rows[0].pass);
        assert!((ctx.rows[0].max_abs - 0.1).abs() < 1e-9);
    }
}

#[cfg(all(test, feature = "cuda"))]
mod emu_tests {
    use super::*;

    /// The CUDA backend on the CPU device emulator passes the whole op table against the
    /// bf16-faithful oracle (the training comparison runs in tests/ci.d/60-emu.sh).
    #[test]
    fn emulated_cuda_backend_passes_every_op() {
        if !crate::cuda::emu::BUILT {
            eprintln!("no emulator in this build (no C++ compiler or LORA_EMU=off)");
            return;
        }
        let report = run_stage(Device::Emu, Some(0x5EED_2026), Stage::Ops, &mut |_| {}).expect("selftest ran");
        println!("{report}");
        assert!(report.rows.len() >= 100, "only {} checks ran", report.rows.len());
        assert!(report.passed(), "{} checks failed:\n{report}", report.failures());
        assert!(report.rows.iter().any(|r| r.op == "dequantize"), "no QLoRA dequantize rows");
    }
}
