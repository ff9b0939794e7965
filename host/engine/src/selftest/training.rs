//! The end-to-end device check: a tiny real-shaped model (a bf16 safetensors folder, so both
//! devices hold identical base weights) trained for a few steps with the same seed on the CPU
//! and on the device under test; per-step loss within `1e-2` relative, final adapter within
//! bf16 tolerance; then the device run repeated, which must give identical adapter bytes.
//! Variants cover LoRA with dropout (the dropout masks must agree across devices), rsLoRA and
//! DoRA, on a Qwen2-like shape (q/k/v bias, tied embeddings, GQA 4/2) with packed documents.

use std::path::PathBuf;

use super::Row;
use crate::adapter::AdapterConfig;
use crate::backend::{DType, Device};
use crate::config::ModelConfig;
use crate::error::{EngineError, Result};
use crate::model::{LoadOptions, Model};
use crate::trainer::{Batch, NamedTensor, OptimConfig, Trainer};

/// One training run's per-step losses and final adapter.
struct Run {
    losses: Vec<f64>,
    adapter: Vec<NamedTensor>,
}

fn model_dir(seed: u64) -> Result<(PathBuf, ModelConfig)> {
    let mut cfg = ModelConfig::tiny_llama(211);
    cfg.arch = crate::config::Arch::Qwen2;
    cfg.qkv_bias = true;
    cfg.tie_word_embeddings = true;
    let dir = std::env::temp_dir().join(format!("lora-selftest-model-{}-{seed:x}", std::process::id()));
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

fn train(device: Device, dir: &std::path::Path, adapter: &AdapterConfig, b: &Batch, steps: usize, seed: u64) -> Result<Run> {
    let model = Model::load(dir, &LoadOptions::for_device(device)?)?;
    let mut tr = Trainer::new(model, adapter.clone(), OptimConfig::default(), seed)?;
    let trained = b.train_mask.iter().filter(|&&m| m).count() as f32;
    let mut losses = Vec::with_capacity(steps);
    for _ in 0..steps {
        tr.zero_grad()?;
        let st = tr.forward_backward(b, trained)?;
        losses.push(st.loss_sum / f64::from(trained));
        tr.optimizer_step(2e-3)?;
    }
    Ok(Run { losses, adapter: tr.adapter_tensors()? })
}

/// Appends the training rows for `device` (vs the CPU) to `rows`.
pub fn compare(device: Device, steps: usize, seed: u64, rows: &mut Vec<Row>) -> Result<()> {
    let (dir, cfg) = model_dir(seed)?;
    let result = compare_in(device, &dir, &cfg, steps, seed, rows);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn compare_in(device: Device, dir: &std::path::Path, cfg: &ModelConfig, steps: usize, seed: u64, rows: &mut Vec<Row>) -> Result<()> {
    let b = batch(seed, cfg.vocab_size as u32);
    let variants = [
        ("train lora+dropout", AdapterConfig { r: 8, lora_alpha: 16.0, lora_dropout: 0.1, ..AdapterConfig::default() }),
        ("train rslora", AdapterConfig { r: 4, lora_alpha: 8.0, use_rslora: true, ..AdapterConfig::default() }),
        ("train dora", AdapterConfig { r: 4, lora_alpha: 8.0, use_dora: true, ..AdapterConfig::default() }),
    ];
    let shape = format!("{steps} steps, {} tokens, {} docs", b.input_ids.len(), b.seq_lens.len());
    for (name, ad) in &variants {
        let cpu = train(Device::Cpu, dir, ad, &b, steps, seed)?;
        let dev = train(device, dir, ad, &b, steps, seed)?;
        // Loss per step, relative.
        let mut worst = (0.0f64, 0.0f64);
        for (a, c) in dev.losses.iter().zip(&cpu.losses) {
            let e = (a - c).abs();
            worst = (worst.0.max(e), worst.1.max(e / c.abs().max(1e-12)));
        }
        let first_last = format!(
            "loss {:.4} -> {:.4} on {device}, {:.4} -> {:.4} on cpu",
            dev.losses[0],
            dev.losses[steps - 1],
            cpu.losses[0],
            cpu.losses[steps - 1]
        );
        rows.push(Row {
            op: format!("{name}: loss per step"),
            shape: shape.clone(),
            max_abs: worst.0,
            max_rel: worst.1,
            pass: worst.1 <= 1e-2 && dev.losses.iter().all(|x| x.is_finite()),
            note: first_last,
        });
        // Final adapter within bf16 tolerance, per tensor in relative L2 norm
        // (||dev - cpu|| <= 2e-2 ||cpu||): Adam turns a tiny gradient difference into a full
        // step for elements whose gradient is near zero, so an elementwise bound would flag
        // those few elements rather than a real disagreement. max abs is reported as well.
        let (mut max_abs, mut max_rel, mut pass, mut note) = (0.0f64, 0.0f64, true, String::new());
        for (d, c) in dev.adapter.iter().zip(&cpu.adapter) {
            if d.name != c.name || d.data.len() != c.data.len() {
                return Err(EngineError::State { name: d.name.clone(), msg: format!("adapter layout differs from the cpu's ({})", c.name) });
            }
            let (mut diff2, mut ref2) = (0.0f64, 0.0f64);
            for (&x, &y) in d.data.iter().zip(&c.data) {
                let e = f64::from(x) - f64::from(y);
                max_abs = max_abs.max(e.abs());
                diff2 += e * e;
                ref2 += f64::from(y) * f64::from(y);
            }
            let rel = diff2.sqrt() / ref2.sqrt().max(1e-30);
            max_rel = max_rel.max(rel);
            if (rel > 2e-2 || !rel.is_finite()) && pass {
                pass = false;
                note = format!("{}: relative L2 error {rel:.3e}", d.name);
            }
        }
        rows.push(Row { op: format!("{name}: final adapter"), shape: shape.clone(), max_abs, max_rel, pass, note });
        // Same seed twice on the device: identical bytes.
        let again = train(device, dir, ad, &b, steps, seed)?;
        let same = again.losses.iter().zip(&dev.losses).all(|(a, b)| a.to_bits() == b.to_bits())
            && again.adapter.iter().zip(&dev.adapter).all(|(a, b)| a.data.iter().zip(&b.data).all(|(x, y)| x.to_bits() == y.to_bits()));
        rows.push(Row {
            op: format!("{name}: rerun identical bytes"),
            shape: shape.clone(),
            max_abs: 0.0,
            max_rel: 0.0,
            pass: same,
            note: if same { String::new() } else { "a second run with the same seed differs".into() },
        });
    }
    Ok(())
}
