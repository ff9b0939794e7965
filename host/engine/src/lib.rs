//! `lora-engine`: Llama-family LoRA forward/backward and optimizer; CPU and CUDA backends.
//!
//! Owns: model config and weights (Hugging Face folders, safetensors), the [`Backend`] op set
//! and its CPU implementation, adapter math (LoRA, rsLoRA, DoRA), quantized base weights in
//! bitsandbytes' formats (4-bit NF4/FP4 with double quant, 8-bit; [`quant`]), the hand-written
//! forward and backward of the decoder, AdamW with global-norm clipping, and the trainer state;
//! the CUDA kernels and a CPU device emulator that runs them (`cuda::emu`); the CUDA backend over
//! either device (`Device::Cuda(i)` or `Device::Emu`, one device trait: `cuda::device`).
//! Must not: read datasets, tokenize, schedule learning rates, write run outputs other than the
//! adapter/merged-model tensors it is asked for, print, or exit.
//!
//! # API (what the run calls)
//! ```text
//! ModelConfig::from_model_dir(&Path) -> Result<ModelConfig>      ModelConfig::tiny_llama(vocab)
//! Model::load(dir, &LoadOptions::cpu() | &LoadOptions::for_device(Device)?) -> Result<Model>
//!     LoadOptions::with_quant(Some(QuantConfig::four_bit() | QuantConfig::EightBit)); model.quant
//! Trainer::new(model, AdapterConfig { r, lora_alpha, lora_dropout, target_modules, use_rslora,
//!              use_dora, init_seed }, OptimConfig { weight_decay, max_grad_norm, betas, eps }, seed)
//! trainer.forward_backward(&Batch { input_ids, train_mask, seq_lens }, step_trained_tokens)
//!     -> StepStats { loss_sum, trained_tokens, tokens }        (gradients accumulate)
//! trainer.eval_loss(&Batch) -> (loss_sum, trained_tokens)
//! trainer.optimizer_step(lr) -> OptimStats { grad_norm (before clipping), clip_coef, step }
//! trainer.save_state() -> TrainerState { tensors: Vec<NamedTensor>, meta: json }; load_state(&s)
//! trainer.save_peft_adapter(dir, base_model_name_or_path); trainer.merge_into(out_dir)
//! testing::write_random_model(dir, &cfg, DType, seed)     bench::{preset, run, BenchOptions}
//! ```
//! `Batch` labels are unshifted: `train_mask[i]` makes token `i` a target predicted from
//! position `i-1` of the same document; a document's first token is never a target.
//!
//! # Determinism
//! Same inputs, seeds and backend give bit-identical adapters. On the CPU backend this also
//! holds **across thread counts** (parallel splits depend only on shapes; reductions use fixed
//! chunks); `tests/behaviour.rs` checks 1, 2 and 3 threads. Dropout masks come from a
//! counter-based function ([`dropout_keep`]) of a per-(micro-batch, layer, module) seed, so a
//! resumed run replays them exactly.

pub mod adapter;
pub mod backend;
pub mod bench;
pub mod collective;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod export;
pub mod merge;
pub mod selftest;
mod layer;
pub mod moe;
pub mod model;
pub mod quant;
pub mod rng;
pub mod testing;
pub mod trainer;
pub mod weights;

pub use backend::{
    AdamW, Attn, Backend, Buf, CrossEntropy, DType, Device, DeviceCounts, Gemm, HostData, IGNORE_TARGET,
    dropout_keep, splitmix64,
};
pub use adapter::AdapterConfig;
pub use collective::{Collective, Single};
pub use config::{Arch, ModelConfig, RopeScaling, Layout};
pub use error::{EngineError, Result};
pub use model::{LoadOptions, Model, Module, backend_for};
pub use quant::{QuantConfig, QuantInfo, QuantSource, QuantType};
pub use trainer::{Batch, NamedTensor, OptimConfig, OptimStats, StepStats, Trainer, TrainerState};
