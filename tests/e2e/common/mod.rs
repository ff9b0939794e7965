//! Shared helpers of the end-to-end tests: a tiny model folder made in the test (random weights
//! from the engine, the SmolLM2 tokenizer fixture from lora-data), and a way to run the real
//! binary in a temp dir.

#![allow(dead_code)]

pub mod fake_hub;
pub mod kube_api;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use lora_engine::{DType, ModelConfig};

pub const BIN: &str = env!("CARGO_BIN_EXE_lora");

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// A fresh temp dir for one test.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lora-e2e-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes a tiny Llama (2 layers, hidden 64, vocab 49152) with the SmolLM2 tokenizer into `dir`.
pub fn tiny_model(dir: &Path, dtype: DType) -> PathBuf {
    tiny_model_of(dir, &ModelConfig::tiny_llama(49152), dtype)
}

/// A tiny Gemma 3 text config: layer 0 slides (window 6, local RoPE base 100), layer 1 is global;
/// `(1+w)` norms, GeGLU, q/k norm, tied embeddings scaled by √hidden as Gemma 3 does.
pub fn tiny_gemma3(vocab: usize) -> ModelConfig {
    let llama = ModelConfig::tiny_llama(vocab);
    ModelConfig {
        arch: lora_engine::Arch::Gemma3,
        tie_word_embeddings: true,
        qk_norm: true,
        gemma_norms: true,
        gelu_mlp: true,
        rope_local_theta: Some(100.0),
        sliding_window: Some(6),
        sliding_layers: vec![true, false],
        embedding_multiplier: (llama.hidden_size as f32).sqrt(),
        ..llama
    }
}

/// [`tiny_model`] of another config (another family's switches on the same sizes).
pub fn tiny_model_of(dir: &Path, cfg: &ModelConfig, dtype: DType) -> PathBuf {
    lora_engine::testing::write_random_model(dir, cfg, dtype, 7).unwrap();
    let fixture = repo_root().join("tests/data/fixtures/smollm2");
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja"] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
    std::fs::write(dir.join("generation_config.json"), r#"{"bos_token_id": 1, "eos_token_id": 2}"#).unwrap();
    dir.to_path_buf()
}

/// Like [`tiny_model`] (f32), with the final norm scaled up: a random tiny model's logits are
/// nearly uniform (head rows of norm ~0.2), so no adapter could make it confident; with a larger
/// final norm the frozen head can express peaked answers, and learning becomes measurable.
pub fn learnable_model(dir: &Path, norm_scale: f32) -> PathBuf {
    learnable_model_in(dir, norm_scale, DType::F32)
}

/// [`learnable_model`] stored in `dtype` (the scale is a power of two: exact in bf16 too).
pub fn learnable_model_in(dir: &Path, norm_scale: f32, dtype: DType) -> PathBuf {
    learnable_model_of(dir, &ModelConfig::tiny_llama(49152), norm_scale, dtype)
}

/// [`learnable_model_in`] of another config.
pub fn learnable_model_of(dir: &Path, cfg: &ModelConfig, norm_scale: f32, dtype: DType) -> PathBuf {
    tiny_model_of(dir, cfg, dtype);
    let path = dir.join("model.safetensors");
    let files = lora_engine::weights::WeightFiles::open(dir).unwrap();
    let tensors: Vec<lora_engine::weights::OutTensor> = files
        .names()
        .into_iter()
        .map(|name| {
            let shape = files.shape(&name).unwrap();
            let mut data = files.get(&name, &shape).unwrap().0.to_f32();
            if name == "model.norm.weight" {
                data.iter_mut().for_each(|v| *v *= norm_scale);
            }
            lora_engine::weights::OutTensor { name, shape, data }
        })
        .collect();
    drop(files);
    lora_engine::weights::write_safetensors(&path, &tensors, dtype, Some([("format".to_string(), "pt".to_string())].into())).unwrap();
    dir.to_path_buf()
}

pub fn capitals() -> PathBuf {
    repo_root().join("examples/data/capitals.jsonl")
}

/// A `lora train` command line for a run under `work` (outputs in `work/out`, workspace in
/// `work/pvc`), quiet HF environment, plain logs.
pub fn train_cmd(work: &Path, model: &Path, dataset: &Path, extra: &[&str]) -> Command {
    train_cmd_at(work, &work.join("pvc"), model, dataset, extra)
}

/// [`train_cmd`] with the workspace at `pvc` (outputs still in `work/out`, HF cache in `work/hf`).
pub fn train_cmd_at(work: &Path, pvc: &Path, model: &Path, dataset: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("train")
        .arg("--training-base-model")
        .arg(model)
        .arg("--dataset")
        .arg(dataset)
        .arg("--output-model")
        .arg(work.join("out/model"))
        .arg("--output-metrics")
        .arg(work.join("out/metrics.json"))
        .arg("--output-loss-chart")
        .arg(work.join("out/loss_chart.html"))
        .arg("--pvc-path")
        .arg(pvc);
    // Defaults for a tiny model, unless `extra` sets them.
    for [flag, value] in [["--training-device", "cpu"], ["--training-max-seq-len", "256"], ["--training-max-tokens-per-gpu", "1024"]] {
        if !extra.contains(&flag) {
            c.args([flag, value]);
        }
    }
    c.args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", work.join("hf"))
        .env_remove("LORA_FAULT_INJECT")
        .env_remove("LORA_TEST_FROZEN_CLOCK");
    c
}

pub fn run_ok(mut c: Command) -> Output {
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "lora failed ({}):\n--- stderr\n{}\n--- stdout\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    out
}

pub fn adapter_bytes(work: &Path) -> Vec<u8> {
    std::fs::read(work.join("out/model/adapter/adapter_model.safetensors")).unwrap()
}
