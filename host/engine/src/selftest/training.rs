//! The end-to-end device check: a tiny real-shaped model (a bf16 safetensors folder, so both
//! sides hold identical base weights), on the device under test and on the oracle
//! ([`CpuBackend::cuda_numerics`]: the CPU rounding to bf16 where CUDA does). Per variant:
//!
//! - **first-step gradients**: the oracle takes one optimizer step (so LoRA's B is not zero and
//!   every adapter gradient is), both sides load exactly those adapter values and run one
//!   forward/backward; each adapter gradient within 2e-2 relative L2;
//! - **loss per step**: [`super::TRAIN_STEPS`] steps on each side from the same init, the loss
//!   of every step within 1e-3 relative;
//! - **rerun identical bytes**: the device run again with the same seed gives identical losses
//!   and adapter bytes.
//!
//! Not the adapter after many steps: Adam's first update is about `lr * sign(g)`, so comparing
//! adapters counts sign flips of near-zero gradients, not errors (CUDA-REVIEW C1).
//! Variants: LoRA with dropout (the dropout masks must agree across devices), rsLoRA, DoRA, on a
//! Qwen2-like shape (q/k/v bias, tied embeddings, GQA 4/2) with packed documents; LoRA on a
//! SmolLM3 of that shape with a sliding-window layer and a no-RoPE layer. A failure of
//! any part is a failed row, and the other parts still run.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::{Event, Row, Sink};
use crate::adapter::AdapterConfig;
use crate::backend::{Backend, DType, Device};
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::model::{LoadOptions, Model};
use crate::trainer::{Batch, NamedTensor, OptimConfig, Trainer};

/// The training variants, as `training:<name>` families.
pub const VARIANTS: &[&str] = &["lora+dropout", "rslora", "dora", "smollm3+window", "gemma3+window"];

fn adapter(variant: &str) -> AdapterConfig {
    match variant {
        "lora+dropout" => AdapterConfig { r: 8, lora_alpha: 16.0, lora_dropout: 0.1, ..AdapterConfig::default() },
        "rslora" => AdapterConfig { r: 4, lora_alpha: 8.0, use_rslora: true, ..AdapterConfig::default() },
        "smollm3+window" | "gemma3+window" => AdapterConfig { r: 4, lora_alpha: 8.0, ..AdapterConfig::default() },
        _ => AdapterConfig { r: 4, lora_alpha: 8.0, use_dora: true, ..AdapterConfig::default() },
    }
}

fn model_dir(seed: u64, variant: &str) -> Result<(PathBuf, ModelConfig)> {
    let mut cfg = ModelConfig::tiny_llama(211);
    cfg.arch = crate::config::Arch::Qwen2;
    cfg.qkv_bias = true;
    cfg.tie_word_embeddings = true;
    if variant == "smollm3+window" {
        // Layer 0 slides (a window of 20 cuts the 37- and 64-token documents), layer 1 has no RoPE.
        cfg = ModelConfig {
            arch: crate::config::Arch::SmolLM3,
            qkv_bias: false,
            sliding_window: Some(20),
            sliding_layers: vec![true, false],
            nope_layers: vec![false, true],
            ..cfg
        };
    }
    if variant == "gemma3+window" {
        // Gemma 3 text: (1+w) f32 norms (four per block), q/k norms, GeGLU, embeddings x sqrt(64),
        // query_pre_attn_scalar 32 (not head_dim), layer 0 sliding (window 20) at its own RoPE base.
        cfg = ModelConfig {
            arch: crate::config::Arch::Gemma3,
            qkv_bias: false,
            qk_norm: true,
            gemma_norms: true,
            gelu_mlp: true,
            embedding_multiplier: (cfg.hidden_size as f32).sqrt(),
            attention_scale: 32f32.powf(-0.5),
            rope_theta: 1_000_000.0,
            rope_local_theta: Some(10000.0),
            sliding_window: Some(20),
            sliding_layers: vec![true, false],
            ..cfg
        };
    }
    let tag: String = variant.chars().filter(char::is_ascii_alphanumeric).collect();
    let dir = std::env::temp_dir().join(format!("lora-selftest-model-{}-{seed:x}-{tag}", std::process::id()));
    crate::testing::write_random_model(&dir, &cfg, DType::BF16, seed)?;
    Ok((dir, cfg))
}

fn batch(seed: u64, vocab: u32) -> Batch {
    let seq_lens = vec![37u32, 64, 1, 27];
    let t: u32 = seq_lens.iter().sum();
    let mut s = seed;
    let input_ids = (0..t)
        .map(|_| {
            s = crate::backend::splitmix64(s);
            (s % u64::from(vocab)) as u32
        })
        .collect();
    let mut train_mask = Vec::new();
    for &n in &seq_lens {
        for i in 0..n {
            train_mask.push(i > 0);
        }
    }
    Batch { input_ids, train_mask, seq_lens }
}

/// The oracle of `device`: the plain CPU for the CPU itself, else the bf16-faithful one.
fn oracle_backend(device: Device) -> Arc<dyn Backend> {
    if device == Device::Cpu { Arc::new(CpuBackend::new()) } else { Arc::new(CpuBackend::cuda_numerics()) }
}

fn trainer(be: Arc<dyn Backend>, dir: &Path, ad: &AdapterConfig, seed: u64) -> Result<Trainer> {
    let model = Model::load(dir, &LoadOptions { backend: be, quant: None })?;
    Trainer::new(model, ad.clone(), OptimConfig::default(), seed)
}

fn trained(b: &Batch) -> f32 {
    b.train_mask.iter().filter(|&&m| m).count() as f32
}

/// Per-step losses and the final adapter of `steps` steps.
fn train(be: Arc<dyn Backend>, dir: &Path, ad: &AdapterConfig, b: &Batch, steps: usize, seed: u64) -> Result<(Vec<f64>, Vec<NamedTensor>)> {
    let mut tr = trainer(be, dir, ad, seed)?;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        tr.zero_grad()?;
        let st = tr.forward_backward(b, trained(b))?;
        losses.push(st.loss_sum / f64::from(trained(b)));
        tr.optimizer_step(2e-3)?;
    }
    Ok((losses, tr.adapter_tensors()?))
}

/// Adapter gradients of one forward/backward at adapter values `at`.
fn grads_at(be: Arc<dyn Backend>, dir: &Path, ad: &AdapterConfig, b: &Batch, seed: u64, at: &[NamedTensor]) -> Result<Vec<NamedTensor>> {
    let mut tr = trainer(be, dir, ad, seed)?;
    tr.set_adapter_tensors(at)?;
    tr.zero_grad()?;
    tr.forward_backward(b, trained(b))?;
    tr.adapter_grads()
}

/// Worst per-tensor relative L2 difference (and max abs), or an error text.
fn rel_l2(got: &[NamedTensor], want: &[NamedTensor]) -> std::result::Result<(f64, f64, String), String> {
    if got.len() != want.len() {
        return Err(format!("{} tensors, the oracle has {}", got.len(), want.len()));
    }
    let (mut worst, mut max_abs, mut name) = (0.0f64, 0.0f64, String::new());
    for (d, c) in got.iter().zip(want) {
        if d.name != c.name || d.data.len() != c.data.len() {
            return Err(format!("adapter layout differs: {} vs the oracle's {}", d.name, c.name));
        }
        let (mut e2, mut r2) = (0.0f64, 0.0f64);
        for (&x, &y) in d.data.iter().zip(&c.data) {
            let e = f64::from(x) - f64::from(y);
            // A NaN stays (f64::max would drop it).
            if !max_abs.is_nan() && (e.is_nan() || e.abs() > max_abs) {
                max_abs = e.abs();
            }
            e2 += e * e;
            r2 += f64::from(y) * f64::from(y);
        }
        let rel = if r2 == 0.0 { if e2 == 0.0 { 0.0 } else { f64::INFINITY } } else { e2.sqrt() / r2.sqrt() };
        // A NaN tensor stays the worst: a later finite one must not hide it.
        if !worst.is_nan() && (rel.is_nan() || rel > worst) {
            worst = rel;
            name = d.name.clone();
        }
    }
    Ok((worst, max_abs, name))
}

/// Runs the three checks of `variant` on `device` against its oracle, one row each to `sink`.
pub fn compare_variant(device: Device, variant: &str, steps: usize, seed: u64, sink: Sink<'_>) {
    let name = format!("train {variant}");
    let (dir, cfg) = match model_dir(seed, variant) {
        Ok(x) => x,
        Err(e) => {
            sink(Event::Row(&Row::error(&name, "", format!("writing the test model: {e}"))));
            return;
        }
    };
    let b = batch(seed, cfg.vocab_size as u32);
    let ad = adapter(variant);
    let shape = format!("{} tokens, {} docs", b.input_ids.len(), b.seq_lens.len());
    let open = || crate::model::backend_for(device);
    let oracle = oracle_backend(device);
    fn emit(sink: &mut dyn FnMut(Event<'_>), mut row: Row, t: Instant) {
        row.secs = t.elapsed().as_secs_f64();
        sink(Event::Row(&row));
    }

    // 1. First-step gradients at identical adapter values.
    let t = Instant::now();
    let op = format!("{name}: step-1 gradients");
    sink(Event::Start(&op));
    let row = (|| -> Result<Row> {
        let (_, at) = train(oracle.clone(), &dir, &ad, &b, 1, seed)?;
        let want = grads_at(oracle.clone(), &dir, &ad, &b, seed, &at)?;
        let got = grads_at(open()?, &dir, &ad, &b, seed, &at)?;
        Ok(match rel_l2(&got, &want) {
            Ok((worst, max_abs, tensor)) => Row {
                op: op.clone(),
                shape: shape.clone(),
                max_abs,
                max_rel: worst,
                pass: worst <= 2e-2,
                note: format!("worst relative L2 {worst:.3e} in {tensor} (limit 2e-2)"),
                secs: 0.0,
            },
            Err(m) => Row::error(&op, &shape, m),
        })
    })()
    .unwrap_or_else(|e| Row::error(&op, &shape, e.to_string()));
    emit(sink, row, t);

    // 2. Loss per step; 3. the same seed again on the device.
    let t = Instant::now();
    let op = format!("{name}: loss per step");
    let shape_steps = format!("{steps} steps, {shape}");
    sink(Event::Start(&op));
    let dev_run = (|| -> Result<_> {
        let want = train(oracle.clone(), &dir, &ad, &b, steps, seed)?;
        let got = train(open()?, &dir, &ad, &b, steps, seed)?;
        Ok((got, want))
    })();
    let dev = match dev_run {
        Ok(((dl, da), (cl, _))) => {
            let mut worst = (0.0f64, 0.0f64);
            for (a, c) in dl.iter().zip(&cl) {
                let e = (a - c).abs();
                worst = (worst.0.max(e), worst.1.max(e / c.abs().max(1e-12)));
            }
            let finite = dl.iter().all(|x| x.is_finite());
            emit(
                sink,
                Row {
                    op: op.clone(),
                    shape: shape_steps.clone(),
                    max_abs: worst.0,
                    max_rel: worst.1,
                    pass: worst.1 <= 1e-3 && finite && dl.len() == steps,
                    note: format!(
                        "loss {:.5} -> {:.5} on {device}, {:.5} -> {:.5} on the oracle (limit 1e-3)",
                        dl.first().copied().unwrap_or(f64::NAN),
                        dl.last().copied().unwrap_or(f64::NAN),
                        cl.first().copied().unwrap_or(f64::NAN),
                        cl.last().copied().unwrap_or(f64::NAN)
                    ),
                    secs: 0.0,
                },
                t,
            );
            Some((dl, da))
        }
        Err(e) => {
            emit(sink, Row::error(&op, &shape_steps, e.to_string()), t);
            None
        }
    };
    let t = Instant::now();
    let op = format!("{name}: rerun identical bytes");
    sink(Event::Start(&op));
    let row = match dev {
        None => Row::error(&op, &shape_steps, "the first device run failed".into()),
        Some((dl, da)) => match open().and_then(|be| train(be, &dir, &ad, &b, steps, seed)) {
            Ok((l2, a2)) => {
                let same = l2.iter().zip(&dl).all(|(a, b)| a.to_bits() == b.to_bits())
                    && a2.len() == da.len()
                    && a2.iter().zip(&da).all(|(a, b)| a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()));
                Row {
                    op: op.clone(),
                    shape: shape_steps.clone(),
                    max_abs: 0.0,
                    max_rel: 0.0,
                    pass: same,
                    note: if same { String::new() } else { "a second run with the same seed differs".into() },
                    secs: 0.0,
                }
            }
            Err(e) => Row::error(&op, &shape_steps, e.to_string()),
        },
    };
    emit(sink, row, t);
    let _ = std::fs::remove_dir_all(&dir);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(name: &str, data: &[f32]) -> NamedTensor {
        NamedTensor { name: name.into(), shape: vec![data.len()], data: data.to_vec() }
    }

    /// A NaN gradient (an activation read before it was written, on the emulator) fails the
    /// comparison wherever its tensor sits, also before tensors that agree.
    #[test]
    fn a_nan_tensor_stays_the_worst() {
        let want = [t("a", &[1.0, 2.0]), t("b", &[1.0, 1.0]), t("c", &[3.0, 4.0])];
        let got = [t("a", &[1.0, 2.0]), t("b", &[f32::NAN, 1.0]), t("c", &[3.0, 4.1])];
        let (worst, max_abs, name) = rel_l2(&got, &want).unwrap();
        assert!(worst.is_nan() && max_abs.is_nan(), "worst {worst}, max abs {max_abs}");
        assert_eq!(name, "b");
        let (worst, max_abs, name) = rel_l2(&got[2..], &want[2..]).unwrap();
        assert!((worst - 0.02).abs() < 1e-6 && (max_abs - 0.1).abs() < 1e-6 && name == "c", "{worst} {max_abs} {name}");
    }
}
