//! `lora-engine`: Llama-family LoRA forward/backward and optimizer; CPU and CUDA backends.
//!
//! Owns: model config and weights (Hugging Face folders, safetensors), the [`Backend`] op set
//! and its CPU implementation, adapter math (LoRA, rsLoRA, DoRA), the hand-written forward and
//! backward of the decoder, AdamW with global-norm clipping, and the trainer state.
//! Must not: read datasets, tokenize, schedule learning rates, write run outputs other than the
//! adapter/merged-model tensors it is asked for, print, or exit.

pub mod adapter;
pub mod backend;
pub mod bench;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod error;
mod export;
pub mod selftest;
mod layer;
pub mod model;
pub mod rng;
pub mod testing;
pub mod trainer;
pub mod weights;

pub use backend::{
    AdamW, Attn, Backend, Buf, CrossEntropy, DType, Device, Gemm, HostData, IGNORE_TARGET,
    dropout_keep, splitmix64,
};
pub use adapter::AdapterConfig;
pub use config::{Arch, ModelConfig, RopeScaling};
pub use error::{EngineError, Result};
pub use model::{LoadOptions, Model, Module, backend_for};
pub use trainer::{Batch, NamedTensor, OptimConfig, OptimStats, StepStats, Trainer, TrainerState};
