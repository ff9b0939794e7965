//! The frozen base model on a backend: weights loaded from a Hugging Face folder (or random,
//! for benchmarks and test fixtures), named exactly as in the checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::backend::{Backend, Buf, DType, Device, HostData};
use crate::config::ModelConfig;
use crate::cpu::CpuBackend;
use crate::error::Result;
use crate::rng::Rng;
use crate::weights::WeightFiles;

/// The seven adaptable linear modules of a decoder layer, in PEFT's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Module {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Module {
    pub const ALL: [Module; 7] = [Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Up, Module::Down];

    /// `q_proj`, `k_proj`, … as in the checkpoint and in PEFT's `target_modules`.
    pub fn name(self) -> &'static str {
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"][self as usize]
    }

    /// `self_attn.q_proj`, `mlp.gate_proj`, …
    pub fn path(self) -> &'static str {
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ][self as usize]
    }

    pub fn from_name(s: &str) -> Option<Module> {
        Module::ALL.into_iter().find(|m| m.name() == s)
    }

    /// `(out_features, in_features)` for a config.
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        match self {
            Module::Q => (q, d),
            Module::K | Module::V => (kv, d),
            Module::O => (d, q),
            Module::Gate | Module::Up => (f, d),
            Module::Down => (d, f),
        }
    }
}

/// A frozen linear layer `y = x W^T + b`, `W [out, in]`.
pub struct Linear {
    pub w: Buf,
    pub b: Option<Buf>,
    pub out_f: usize,
    pub in_f: usize,
}

/// The frozen weights of one decoder layer.
pub struct Layer {
    pub input_norm: Buf,
    pub post_norm: Buf,
    /// Qwen3's per-head q/k RMSNorm weights `[head_dim]`.
    pub q_norm: Option<Buf>,
    pub k_norm: Option<Buf>,
    /// Indexed by [`Module`].
    pub linears: Vec<Linear>,
}

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    pub backend: Arc<dyn Backend>,
}

impl LoadOptions {
    /// The CPU backend.
    pub fn cpu() -> Self {
        LoadOptions { backend: Arc::new(CpuBackend::new()) }
    }

    /// The backend for `device` (CUDA needs the `cuda` backend to be built in).
    pub fn for_device(device: Device) -> Result<Self> {
        Ok(LoadOptions { backend: backend_for(device)? })
    }
}

/// The backend that computes on `device`.
pub fn backend_for(device: Device) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Arc::new(CpuBackend::new())),
        Device::Cuda(i) => crate::cuda::open(i),
    }
}

/// A base model on a backend.
pub struct Model {
    pub cfg: ModelConfig,
    pub(crate) backend: Arc<dyn Backend>,
    pub(crate) embed: Buf,
    pub(crate) layers: Vec<Layer>,
    pub(crate) norm: Buf,
    /// `None` when tied to the embeddings.
    pub(crate) lm_head: Option<Buf>,
    /// The folder the weights came from (None for random models).
    pub(crate) source: Option<PathBuf>,
    /// The dtype of the weight files (f32 for random models).
    pub file_dtype: DType,
}

/// Every base tensor of a config: (name, shape), in checkpoint naming.
pub fn tensor_specs(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = c.hidden_size;
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, d])];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        for m in Module::ALL {
            let (o, inp) = m.dims(c);
            v.push((format!("{p}.{}.weight", m.path()), vec![o, inp]));
            let bias = match m {
                Module::Q | Module::K | Module::V => c.qkv_bias,
                Module::O => c.o_bias,
                _ => false,
            };
            if bias {
                v.push((format!("{p}.{}.bias", m.path()), vec![o]));
            }
        }
        if c.qk_norm {
            v.push((format!("{p}.self_attn.q_norm.weight"), vec![c.head_dim]));
            v.push((format!("{p}.self_attn.k_norm.weight"), vec![c.head_dim]));
        }
    }
    v.push(("model.norm.weight".to_string(), vec![d]));
    if !c.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![c.vocab_size, d]));
    }
    v
}

/// Deterministic random values for a base tensor: norms around 1, matrices uniform with
/// std 0.02 (like `initializer_range`), biases small.
pub(crate) fn random_tensor(name: &str, n: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed ^ crate::rng::hash_str(name));
    if name.ends_with("norm.weight") {
        (0..n).map(|_| 1.0 + 0.1 * (rng.uniform() * 2.0 - 1.0)).collect()
    } else {
        let a = if name.ends_with(".bias") { 0.02 } else { 0.02 * 3f32.sqrt() };
        (0..n).map(|_| a * (rng.uniform() * 2.0 - 1.0)).collect()
    }
}

impl Model {
    /// Loads a model folder (config.json + safetensors) onto `opts.backend`.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::from_model_dir(dir)?;
        let files = WeightFiles::open(dir)?;
        let file_dtype = files.file_dtype();
        let be = opts.backend.clone();
        let wdt = be.base_weight_dtype(file_dtype);
        let mut source = |name: &str, shape: &[usize]| -> Result<Buf> {
            let (data, _) = files.get(name, shape)?;
            be.upload(data, wdt)
        };
        let mut m = Self::build(cfg, opts.backend.clone(), &mut source)?;
        m.source = Some(dir.to_path_buf());
        m.file_dtype = file_dtype;
        Ok(m)
    }

    /// A model of `cfg` with deterministic random weights (no files), for benchmarks and tests.
    pub fn random(cfg: ModelConfig, backend: Arc<dyn Backend>, seed: u64) -> Result<Self> {
        let be = backend.clone();
        let wdt = be.base_weight_dtype(DType::F32);
        let mut source = |name: &str, shape: &[usize]| -> Result<Buf> {
            let data = random_tensor(name, shape.iter().product(), seed);
            be.upload(HostData::F32(&data), wdt)
        };
        Self::build(cfg, backend, &mut source)
    }

    fn build(cfg: ModelConfig, backend: Arc<dyn Backend>, get: &mut dyn FnMut(&str, &[usize]) -> Result<Buf>) -> Result<Self> {
        let d = cfg.hidden_size;
        let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linears = Vec::with_capacity(7);
            for m in Module::ALL {
                let (o, inp) = m.dims(&cfg);
                let w = get(&format!("{p}.{}.weight", m.path()), &[o, inp])?;
                let has_bias = match m {
                    Module::Q | Module::K | Module::V => cfg.qkv_bias,
                    Module::O => cfg.o_bias,
                    _ => false,
                };
                let b = if has_bias { Some(get(&format!("{p}.{}.bias", m.path()), &[o])?) } else { None };
                linears.push(Linear { w, b, out_f: o, in_f: inp });
            }
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(get(&format!("{p}.self_attn.q_norm.weight"), &[cfg.head_dim])?),
                    Some(get(&format!("{p}.self_attn.k_norm.weight"), &[cfg.head_dim])?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                input_norm: get(&format!("{p}.input_layernorm.weight"), &[d])?,
                post_norm: get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                q_norm,
                k_norm,
                linears,
            });
        }
        let norm = get("model.norm.weight", &[d])?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(get("lm_head.weight", &[cfg.vocab_size, d])?) };
        Ok(Model { cfg, backend, embed, layers, norm, lm_head, source: None, file_dtype: DType::F32 })
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// The folder the weights were loaded from, if any.
    pub fn source_dir(&self) -> Option<&Path> {
        self.source.as_deref()
    }

    /// The output projection `[vocab, hidden]` (the embeddings when tied).
    pub(crate) fn head(&self) -> &Buf {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
