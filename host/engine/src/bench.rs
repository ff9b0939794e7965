//! Training-throughput benchmark: a model of a given shape with random weights (no files),
//! forward + backward + optimizer steps on a packed batch; tokens/s and peak memory, optionally
//! with the projections quantized 4-bit or 8-bit.
//! `tests/bench/peft_cpu_bench.py` runs the same shape and batch in PyTorch + PEFT.

use std::sync::Arc;
use std::time::Instant;

use crate::adapter::AdapterConfig;
use crate::backend::Backend;
use crate::config::{Arch, ModelConfig};
use crate::error::{EngineError, Result};
use crate::model::{LoadOptions, Model, Module};
use crate::quant::QuantConfig;
use crate::trainer::{Batch, OptimConfig, Trainer};

/// Shape presets: `smollm2-135m`, `qwen2.5-0.5b`, `qwen2.5-1.5b`.
pub const PRESETS: [&str; 3] = ["smollm2-135m", "qwen2.5-0.5b", "qwen2.5-1.5b"];

/// The config of a preset shape (real sizes, random weights).
pub fn preset(name: &str) -> Result<ModelConfig> {
    let qwen = |layers, hidden, mlp, heads, kv| ModelConfig {
        arch: Arch::Qwen2,
        qkv_bias: true,
        rope_theta: 1_000_000.0,
        max_position_embeddings: 32768,
        ..ModelConfig::llama_shape(layers, hidden, mlp, heads, kv, 151_936, true)
    };
    match name {
        "smollm2-135m" => Ok(ModelConfig { rope_theta: 100_000.0, max_position_embeddings: 8192, ..ModelConfig::llama_shape(30, 576, 1536, 9, 3, 49_152, true) }),
        "qwen2.5-0.5b" => Ok(qwen(24, 896, 4864, 14, 2)),
        "qwen2.5-1.5b" => Ok(qwen(28, 1536, 8960, 12, 2)),
        other => Err(EngineError::Unsupported(format!("bench shape `{other}`; presets: {}", PRESETS.join(", ")))),
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub cfg: ModelConfig,
    /// Rows of the batch and tokens per row (one document per row unless `docs_per_row > 1`).
    pub rows: usize,
    pub row_len: usize,
    pub docs_per_row: usize,
    /// Timed optimizer steps, after `warmup` untimed ones.
    pub steps: usize,
    pub warmup: usize,
    pub adapter: AdapterConfig,
    /// Recompute each layer's activations in backward instead of keeping them.
    pub recompute: bool,
    /// Hold the projections 4-bit or 8-bit.
    pub quant: Option<QuantConfig>,
    /// Time every device call of the timed steps by op ([`Backend::set_profiling`]: CUDA events
    /// on a GPU, each call waited for, so the step itself is slower): [`BenchResult::per_op`].
    pub per_op: bool,
}

/// One finished step, as [`run_with`] reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepReport {
    pub step: usize,
    pub warmup: bool,
    pub seconds: f64,
    pub loss: f64,
    pub tokens: usize,
    pub step_tokens_per_sec: f64,
}

/// Device time of one op over the timed steps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpTime {
    pub op: String,
    pub calls: u64,
    pub seconds: f64,
}

impl BenchOptions {
    pub fn new(cfg: ModelConfig) -> Self {
        BenchOptions { cfg, rows: 4, row_len: 512, docs_per_row: 1, steps: 3, warmup: 1, adapter: AdapterConfig::default(), recompute: false, quant: None, per_op: false }
    }
}

/// What was measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BenchResult {
    pub backend: String,
    pub tokens_per_step: usize,
    pub step_seconds: Vec<f64>,
    /// Tokens per second over the timed steps.
    pub tokens_per_sec: f64,
    /// Peak resident memory of the process (VmHWM), bytes; None where /proc is missing.
    pub peak_rss_bytes: Option<u64>,
    /// Resident memory right after the model was built (weights), bytes.
    pub rss_after_load_bytes: Option<u64>,
    /// Peak device memory, if the backend tracks it.
    pub peak_device_bytes: Option<u64>,
    /// [`Trainer::activation_bytes`] for this batch: what a run's memory plan would assume.
    pub estimated_activation_bytes: u64,
    /// The device work of the last timed step (kernels, products, memsets), if the backend counts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_counts_per_step: Option<crate::backend::DeviceCounts>,
    pub base_params: usize,
    pub trainable_params: usize,
    pub final_loss: f64,
    /// Parameters of the decoder projections (the weights quantization applies to) and the bytes
    /// they occupy in the backend's memory (dense: base dtype; quantized: codes and scales).
    pub projection_params: u64,
    pub projection_bytes: u64,
    /// The quantization the run used ([`crate::QuantInfo::to_json`]), if any.
    pub quantization: Option<serde_json::Value>,
    /// With [`BenchOptions::per_op`]: device time per op over the timed steps, largest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub per_op: Vec<OpTime>,
}

/// Resets the process's peak resident memory (`VmHWM`) to the current resident size, so the
/// next run of a benchmark measures its own peak; false where the kernel does not allow it.
pub fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// Reads a `/proc/self/status` field (kB) as bytes.
pub fn proc_status_bytes(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The deterministic benchmark batch.
pub fn bench_batch(vocab: usize, rows: usize, row_len: usize, docs_per_row: usize) -> Batch {
    let mut b = Batch::default();
    let docs = docs_per_row.max(1);
    let mut x = 12345u64;
    for _ in 0..rows {
        let mut left = row_len;
        for d in 0..docs {
            let len = if d + 1 == docs { left } else { row_len / docs };
            left -= len;
            b.seq_lens.push(len as u32);
            for _ in 0..len {
                x = crate::backend::splitmix64(x);
                b.input_ids.push((x % vocab as u64) as u32);
                b.train_mask.push(true);
            }
        }
    }
    b
}

/// Runs the benchmark on `backend`.
pub fn run(opts: &BenchOptions, backend: Arc<dyn Backend>) -> Result<BenchResult> {
    run_with(opts, backend, &mut |_| {})
}

/// [`run`], reporting each step to `on_step` as it finishes.
pub fn run_with(opts: &BenchOptions, backend: Arc<dyn Backend>, on_step: &mut dyn FnMut(&StepReport)) -> Result<BenchResult> {
    let c = &opts.cfg;
    let base_params = crate::model::parameter_count(c);
    let name = backend.name().to_string();
    let model = Model::random_with(c.clone(), &LoadOptions { backend: backend.clone(), quant: opts.quant }, 0)?;
    let rss_after_load_bytes = proc_status_bytes("VmRSS:");
    let projection_params: u64 = Module::present(c.layout).iter().map(|m| (m.dims(c).0 * m.dims(c).1) as u64).sum::<u64>() * c.num_hidden_layers as u64;
    let (projection_bytes, quantization) = match &model.quant {
        Some(q) => (q.linear_bytes, Some(q.to_json())),
        None => (projection_params * backend.base_weight_dtype(crate::DType::F32).size() as u64, None),
    };
    let mut tr = Trainer::new(model, opts.adapter.clone(), OptimConfig::default(), 0)?;
    tr.recompute = opts.recompute;
    let trainable_params = tr.adapters.params().map(|p| p.shape.iter().product::<usize>()).sum();
    let batch = bench_batch(c.vocab_size, opts.rows, opts.row_len, opts.docs_per_row);
    let estimated_activation_bytes = tr.activation_bytes(batch.input_ids.len(), opts.recompute);
    let mut times = Vec::new();
    let mut device_counts_per_step = None;
    let mut loss = 0.0;
    let tokens = batch.input_ids.len();
    for i in 0..opts.warmup + opts.steps {
        if opts.per_op && i == opts.warmup && !backend.set_profiling(true) {
            return Err(crate::EngineError::Backend { backend: backend.name(), op: "bench", msg: "per-op timing needs a device backend (--device cuda or emu)".into() });
        }
        let before = backend.device_counts();
        let t0 = Instant::now();
        let st = tr.forward_backward(&batch, batch.input_ids.len() as f32)?;
        tr.optimizer_step(1e-4)?;
        backend.synchronize()?;
        loss = st.loss_sum / st.trained_tokens.max(1) as f64;
        let seconds = t0.elapsed().as_secs_f64();
        if i >= opts.warmup {
            times.push(seconds);
            device_counts_per_step = backend.device_counts().zip(before).map(|(a, b)| a.since(b));
        }
        on_step(&StepReport { step: i, warmup: i < opts.warmup, seconds, loss, tokens, step_tokens_per_sec: tokens as f64 / seconds.max(1e-12) });
    }
    let per_op = if opts.per_op {
        let v = backend.take_profile();
        backend.set_profiling(false);
        v.into_iter().map(|(op, calls, seconds)| OpTime { op, calls, seconds }).collect()
    } else {
        Vec::new()
    };
    let total: f64 = times.iter().sum();
    Ok(BenchResult {
        backend: name,
        tokens_per_step: tokens,
        tokens_per_sec: if total > 0.0 { tokens as f64 * times.len() as f64 / total } else { 0.0 },
        step_seconds: times,
        peak_rss_bytes: proc_status_bytes("VmHWM:"),
        rss_after_load_bytes,
        peak_device_bytes: backend.peak_memory_bytes(),
        estimated_activation_bytes,
        device_counts_per_step,
        base_params,
        trainable_params,
        final_loss: loss,
        projection_params,
        projection_bytes,
        quantization,
        per_op,
    })
}
