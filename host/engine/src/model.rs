//! The frozen base model on a backend: weights loaded from a Hugging Face folder (or random,
//! for benchmarks and test fixtures), named exactly as in the checkpoint. With quantization
//! ([`LoadOptions::quant`]) every decoder projection is held 4-bit or 8-bit ([`crate::quant`]):
//! quantized while loading a 16-bit folder, or read as stored from a bitsandbytes checkpoint;
//! embeddings, norms and the output head keep the backend's base dtype.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::backend::{Backend, Buf, DType, Device, HostData};
use crate::config::{Layout, ModelConfig};
use crate::cpu::CpuBackend;
use crate::error::{EngineError, Result};
use crate::quant::bnb;
use crate::quant::{DeviceQuant, Quant4, Quant8, QuantConfig, QuantInfo, QuantPlan, QuantSource, QuantTensor, QuantType};
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

    /// The modules a layer of this layout has: Phi-3's fused `qkv_proj` is [`Module::Q`] and
    /// its `gate_up_proj` [`Module::Gate`]; Granite 4's `input_linear` is [`Module::Gate`] and
    /// `output_linear` [`Module::Down`].
    pub fn present(layout: Layout) -> &'static [Module] {
        match layout {
            Layout::Split => &Module::ALL,
            Layout::Phi3 => &[Module::Q, Module::O, Module::Gate, Module::Down],
            Layout::Granite4 => &[Module::Q, Module::K, Module::V, Module::O, Module::Gate, Module::Down],
        }
    }

    /// The name in this layout (PEFT's `target_modules`), e.g. `qkv_proj` for Phi-3's Q.
    pub fn name_in(self, layout: Layout) -> &'static str {
        match (layout, self) {
            (Layout::Phi3, Module::Q) => "qkv_proj",
            (Layout::Phi3, Module::Gate) => "gate_up_proj",
            (Layout::Granite4, Module::Gate) => "input_linear",
            (Layout::Granite4, Module::Down) => "output_linear",
            _ => self.name(),
        }
    }

    /// The checkpoint path in this layout, e.g. `shared_mlp.input_linear`.
    pub fn path_in(self, layout: Layout) -> &'static str {
        match (layout, self) {
            (Layout::Phi3, Module::Q) => "self_attn.qkv_proj",
            (Layout::Phi3, Module::Gate) => "mlp.gate_up_proj",
            (Layout::Granite4, Module::Gate) => "shared_mlp.input_linear",
            (Layout::Granite4, Module::Down) => "shared_mlp.output_linear",
            _ => self.path(),
        }
    }

    /// The module a name means in this layout.
    pub fn from_name_in(layout: Layout, s: &str) -> Option<Module> {
        Module::present(layout).iter().copied().find(|m| m.name_in(layout) == s)
    }

    /// `(out_features, in_features)` for a config (a fused module's rows are all its parts').
    pub fn dims(self, c: &ModelConfig) -> (usize, usize) {
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
        match (c.layout, self) {
            (Layout::Phi3, Module::Q) => return (q + 2 * kv, d),
            (Layout::Phi3 | Layout::Granite4, Module::Gate) => return (2 * f, d),
            _ => {}
        }
        match self {
            Module::Q => (q, d),
            Module::K | Module::V => (kv, d),
            Module::O => (d, q),
            Module::Gate | Module::Up => (f, d),
            Module::Down => (d, f),
        }
    }
}

/// A frozen weight: dense in the backend's base dtype, or quantized.
#[derive(Debug)]
pub enum Weight {
    Dense(Buf),
    Quant(DeviceQuant),
}

/// A frozen linear layer `y = x W^T + b`, `W [out, in]`.
pub struct Linear {
    pub w: Weight,
    pub b: Option<Buf>,
    pub out_f: usize,
    pub in_f: usize,
    /// `layer * 7 + module`: which dequantized weight a scratch buffer holds.
    pub(crate) id: usize,
}

/// The frozen weights of one decoder layer.
pub struct Layer {
    pub input_norm: Buf,
    /// Applied to the MLP input; on Gemma 3 (`gemma_norms`) to the attention output.
    pub post_norm: Buf,
    /// Gemma 3's `pre_feedforward_layernorm` (the MLP input) and `post_feedforward_layernorm`
    /// (the MLP output).
    pub ffn_norms: Option<(Buf, Buf)>,
    /// Qwen3's per-head q/k RMSNorm weights `[head_dim]`.
    pub q_norm: Option<Buf>,
    pub k_norm: Option<Buf>,
    /// Indexed by [`Module`]; `None` where the layout has no such module (Phi-3's K, V, Up;
    /// Granite 4's Up; a Qwen3-MoE sparse layer's Gate, Up, Down).
    pub linears: Vec<Option<Linear>>,
    /// A Qwen3-MoE sparse layer's router and experts (its MLP).
    pub experts: Option<crate::moe::Experts>,
}

impl Layer {
    /// The linear of module `m` (an internal error where the layout lacks it).
    pub(crate) fn lin(&self, m: Module) -> Result<&Linear> {
        self.linears[m as usize].as_ref().ok_or_else(|| EngineError::State { name: m.name().into(), msg: "not a module of this layout (internal error)".into() })
    }
}

/// How to load a model.
#[derive(Clone)]
pub struct LoadOptions {
    pub backend: Arc<dyn Backend>,
    /// Hold the decoder projections 4-bit or 8-bit (`None`: the base dtype; a bitsandbytes
    /// checkpoint then is an error that says which switch it needs).
    pub quant: Option<QuantConfig>,
}

impl LoadOptions {
    /// The CPU backend.
    pub fn cpu() -> Self {
        LoadOptions { backend: Arc::new(CpuBackend::new()), quant: None }
    }

    /// The backend for `device` (CUDA needs the `cuda` backend to be built in).
    pub fn for_device(device: Device) -> Result<Self> {
        Ok(LoadOptions { backend: backend_for(device)?, quant: None })
    }

    /// The same backend, with quantization.
    pub fn with_quant(mut self, quant: Option<QuantConfig>) -> Self {
        self.quant = quant;
        self
    }
}

/// Reused buffers the quantized weights are dequantized into right before their matrix
/// products: one per weight size, remembering which weight it holds (so DoRA's second use of the
/// same weight does not dequantize again).
pub(crate) struct Dequantizer {
    slots: Mutex<Vec<Slot>>,
    /// Values are rounded to this (the compute dtype) and held in `buf_dtype`.
    round_to: DType,
    buf_dtype: DType,
}

pub(crate) struct Slot {
    buf: Buf,
    holds: Option<usize>,
}

/// A weight ready for a matrix product: the dense buffer, or a dequantized scratch buffer.
pub(crate) enum WeightRef<'a> {
    Dense(&'a Buf),
    Scratch(MutexGuard<'a, Vec<Slot>>, usize),
}

impl Deref for WeightRef<'_> {
    type Target = Buf;
    fn deref(&self) -> &Buf {
        match self {
            WeightRef::Dense(b) => b,
            WeightRef::Scratch(slots, i) => &slots[*i].buf,
        }
    }
}

impl Dequantizer {
    fn new(round_to: DType, buf_dtype: DType) -> Self {
        Dequantizer { slots: Mutex::new(Vec::new()), round_to, buf_dtype }
    }

    /// `lin`'s weight as a buffer of `out * in` values. Only one dequantized weight is in use
    /// at a time: asking for another while a [`WeightRef::Scratch`] lives is an error.
    pub(crate) fn get<'a>(&'a self, be: &dyn Backend, lin: &'a Linear) -> Result<WeightRef<'a>> {
        let q = match &lin.w {
            Weight::Dense(b) => return Ok(WeightRef::Dense(b)),
            Weight::Quant(q) => q,
        };
        let mut slots = self.slots.try_lock().map_err(|_| EngineError::State {
            name: "dequantized weights".into(),
            msg: "two quantized weights were requested at once (internal error)".into(),
        })?;
        let n = q.numel();
        let i = match slots.iter().position(|s| s.buf.len() == n) {
            Some(i) => i,
            None => {
                slots.push(Slot { buf: be.zeros(n, self.buf_dtype)?, holds: None });
                slots.len() - 1
            }
        };
        if slots[i].holds != Some(lin.id) {
            slots[i].holds = None;
            be.dequantize(q, self.round_to, &mut slots[i].buf)?;
            slots[i].holds = Some(lin.id);
        }
        Ok(WeightRef::Scratch(slots, i))
    }
}

/// The backend that computes on `device`.
pub fn backend_for(device: Device) -> Result<Arc<dyn Backend>> {
    match device {
        Device::Cpu => Ok(Arc::new(CpuBackend::new())),
        Device::Cuda(i) => crate::cuda::open(i),
        Device::Emu => crate::cuda::open_emulated(),
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
    /// How the decoder projections are quantized, if they are.
    pub quant: Option<QuantInfo>,
    pub(crate) dequant: Dequantizer,
}

/// How many parameters the base model of a config has (every tensor of [`tensor_specs`]).
pub fn parameter_count(c: &ModelConfig) -> usize {
    tensor_specs(c).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
}

/// Every base tensor of a config: (name, shape), in checkpoint naming.
pub fn tensor_specs(c: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let d = c.hidden_size;
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, d])];
    for i in 0..c.num_hidden_layers {
        let p = format!("model.layers.{i}");
        v.push((format!("{p}.input_layernorm.weight"), vec![d]));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        if c.gemma_norms {
            v.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![d]));
            v.push((format!("{p}.post_feedforward_layernorm.weight"), vec![d]));
        }
        if let Some(e) = c.moe.as_ref().filter(|_| c.layer_is_sparse(i)) {
            v.push((format!("{p}.mlp.gate.weight"), vec![e.num_experts, d]));
            let im = e.moe_intermediate_size;
            for x in 0..e.num_experts {
                for (name, shape) in [("gate_proj", [im, d]), ("up_proj", [im, d]), ("down_proj", [d, im])] {
                    v.push((format!("{p}.mlp.experts.{x}.{name}.weight"), shape.to_vec()));
                }
            }
        }
        for &m in Module::present(c.layout) {
            if c.layer_is_sparse(i) && matches!(m, Module::Gate | Module::Up | Module::Down) {
                continue;
            }
            let (o, inp) = m.dims(c);
            v.push((format!("{p}.{}.weight", m.path_in(c.layout)), vec![o, inp]));
            let bias = match m {
                Module::Q | Module::K | Module::V => c.qkv_bias,
                Module::O => c.o_bias,
                _ => false,
            };
            if bias {
                v.push((format!("{p}.{}.bias", m.path_in(c.layout)), vec![o]));
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
    /// Loads a model folder (config.json + safetensors) onto `opts.backend`, quantizing the
    /// decoder projections as `opts.quant` asks (or reading them quantized from a bitsandbytes
    /// checkpoint).
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self> {
        let cfg = ModelConfig::from_model_dir(dir)?;
        let files = WeightFiles::open(dir)?;
        let file_dtype = files.file_dtype();
        let be = opts.backend.clone();
        let ckpt = bnb::read_config(dir)?;
        let plan = QuantPlan::resolve(opts.quant, ckpt.as_ref(), dir, be.base_weight_dtype(file_dtype))?;
        let wdt = be.base_weight_dtype(file_dtype);
        let dense = |name: &str, shape: &[usize]| -> Result<Buf> {
            let (data, _) = files.get(name, shape)?;
            be.upload(data, wdt)
        };
        let mut stats = QuantStats::default();
        let mut linear = |name: &str, shape: &[usize]| -> Result<Weight> {
            let Some(plan) = plan else { return Ok(Weight::Dense(dense(name, shape)?)) };
            let prefix = name.strip_suffix(".weight").unwrap_or(name);
            let (q, weight_dtype) = match (&ckpt, plan.source) {
                (Some(c), QuantSource::Checkpoint) => {
                    if !bnb::is_quantized(&files, prefix) {
                        // A module the checkpoint kept in 16 bits (llm_int8_skip_modules).
                        return Ok(Weight::Dense(dense(name, shape)?));
                    }
                    bnb::read_linear(&files, prefix, (shape[0], shape[1]), c)?
                }
                _ => {
                    let (data, dtype) = files.get(name, shape)?;
                    let q = quantize(&plan, &data.to_f32(), shape).map_err(|e| EngineError::Weights {
                        file: files.file_of(name),
                        tensor: name.to_string(),
                        msg: e.to_string(),
                    })?;
                    (q, dtype)
                }
            };
            stats.add(&q, weight_dtype);
            Ok(Weight::Quant(q.upload(be.as_ref())?))
        };
        let mut m = Self::build(cfg, opts.backend.clone(), &mut |n: &str, s: &[usize]| dense(n, s), &mut linear)?;
        m.source = Some(dir.to_path_buf());
        m.file_dtype = file_dtype;
        m.set_quant(plan, stats);
        Ok(m)
    }

    /// A model of `cfg` with deterministic random weights (no files), for benchmarks and tests.
    pub fn random(cfg: ModelConfig, backend: Arc<dyn Backend>, seed: u64) -> Result<Self> {
        Self::random_with(cfg, &LoadOptions { backend, quant: None }, seed)
    }

    /// [`Model::random`] with the projections quantized as `opts.quant` asks.
    pub fn random_with(cfg: ModelConfig, opts: &LoadOptions, seed: u64) -> Result<Self> {
        let be = opts.backend.clone();
        let wdt = be.base_weight_dtype(DType::F32);
        let plan = QuantPlan::resolve(opts.quant, None, Path::new("(random weights)"), be.base_weight_dtype(DType::F32))?;
        let mut source = |name: &str, shape: &[usize]| -> Result<Buf> {
            let data = random_tensor(name, shape.iter().product(), seed);
            be.upload(HostData::F32(&data), wdt)
        };
        let mut stats = QuantStats::default();
        let mut linear = |name: &str, shape: &[usize]| -> Result<Weight> {
            let data = random_tensor(name, shape.iter().product(), seed);
            match &plan {
                None => Ok(Weight::Dense(be.upload(HostData::F32(&data), wdt)?)),
                Some(p) => {
                    let q = quantize(p, &data, shape)?;
                    stats.add(&q, DType::F32);
                    Ok(Weight::Quant(q.upload(be.as_ref())?))
                }
            }
        };
        let mut m = Self::build(cfg, opts.backend.clone(), &mut source, &mut linear)?;
        m.set_quant(plan, stats);
        Ok(m)
    }

    fn set_quant(&mut self, plan: Option<QuantPlan>, stats: QuantStats) {
        let Some(p) = plan else { return };
        self.dequant = Dequantizer::new(p.compute, self.backend.dequant_dtype(p.compute));
        self.quant = Some(QuantInfo {
            bits: if p.four.is_some() { 4 } else { 8 },
            quant_type: stats.quant_type.or(p.four.map(|f| f.0)),
            double_quant: stats.double_quant.unwrap_or(p.four.is_some_and(|f| f.1)),
            blocksize: p.four.map(|f| stats.blocksize.unwrap_or(f.2)),
            compute_dtype: p.compute,
            source: p.source,
            weight_dtype: stats.weight_dtype.unwrap_or(self.file_dtype),
            linear_params: stats.params,
            linear_bytes: stats.bytes,
        });
    }

    fn build(
        cfg: ModelConfig,
        backend: Arc<dyn Backend>,
        get: &mut dyn FnMut(&str, &[usize]) -> Result<Buf>,
        get_linear: &mut dyn FnMut(&str, &[usize]) -> Result<Weight>,
    ) -> Result<Self> {
        let d = cfg.hidden_size;
        let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        // Gemma 3 scales by `1 + w`: held that way, in f32 on every backend (transformers
        // computes `1 + w` in f32; a bf16 `1 + w` would round it), so the one RMSNorm op serves.
        let offset = cfg.gemma_norms;
        let be = backend.clone();
        let fix = |b: Buf| -> Result<Buf> {
            if !offset {
                return Ok(b);
            }
            let w: Vec<f32> = be.download_f32(&b)?.into_iter().map(|w| 1.0 + w).collect();
            be.upload(HostData::F32(&w), DType::F32)
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let mut linears = Vec::with_capacity(7);
            let sparse = cfg.layer_is_sparse(i);
            for m in Module::ALL {
                if !Module::present(cfg.layout).contains(&m) || (sparse && matches!(m, Module::Gate | Module::Up | Module::Down)) {
                    linears.push(None);
                    continue;
                }
                let path = m.path_in(cfg.layout);
                let (o, inp) = m.dims(&cfg);
                let w = get_linear(&format!("{p}.{path}.weight"), &[o, inp])?;
                let has_bias = match m {
                    Module::Q | Module::K | Module::V => cfg.qkv_bias,
                    Module::O => cfg.o_bias,
                    _ => false,
                };
                let b = if has_bias { Some(get(&format!("{p}.{path}.bias"), &[o])?) } else { None };
                linears.push(Some(Linear { w, b, out_f: o, in_f: inp, id: i * 7 + m as usize }));
            }
            let (q_norm, k_norm) = if cfg.qk_norm {
                (
                    Some(fix(get(&format!("{p}.self_attn.q_norm.weight"), &[cfg.head_dim])?)?),
                    Some(fix(get(&format!("{p}.self_attn.k_norm.weight"), &[cfg.head_dim])?)?),
                )
            } else {
                (None, None)
            };
            layers.push(Layer {
                input_norm: fix(get(&format!("{p}.input_layernorm.weight"), &[d])?)?,
                post_norm: fix(get(&format!("{p}.post_attention_layernorm.weight"), &[d])?)?,
                ffn_norms: if cfg.gemma_norms {
                    Some((fix(get(&format!("{p}.pre_feedforward_layernorm.weight"), &[d])?)?, fix(get(&format!("{p}.post_feedforward_layernorm.weight"), &[d])?)?))
                } else {
                    None
                },
                q_norm,
                k_norm,
                linears,
                experts: if sparse { Some(experts_of(&cfg, be.as_ref(), i, get_linear)?) } else { None },
            });
        }
        let norm = fix(get("model.norm.weight", &[d])?)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(get("lm_head.weight", &[cfg.vocab_size, d])?) };
        let dequant = Dequantizer::new(DType::F32, DType::F32);
        Ok(Model { cfg, backend, embed, layers, norm, lm_head, source: None, file_dtype: DType::F32, quant: None, dequant })
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

    /// Bytes of the reused buffers quantized weights are dequantized into (one per distinct
    /// projection size, allocated on first use); 0 without quantization.
    pub fn dequant_scratch_bytes(&self) -> u64 {
        let mut sizes: Vec<usize> = self.layers.iter().flat_map(|l| l.linears.iter().flatten()).filter(|l| matches!(l.w, Weight::Quant(_))).map(|l| l.out_f * l.in_f).collect();
        sizes.sort_unstable();
        sizes.dedup();
        sizes.iter().sum::<usize>() as u64 * self.dequant.buf_dtype.size() as u64
    }

    /// `lin`'s weight ready for a matrix product (dequantized into a reused buffer if quantized).
    pub(crate) fn weight<'a>(&'a self, lin: &'a Linear) -> Result<WeightRef<'a>> {
        self.dequant.get(self.backend.as_ref(), lin)
    }

    /// The quantized weights this model holds, dequantized to the compute dtype, with their
    /// checkpoint names (for tests and tools; empty when nothing is quantized).
    pub fn dequantized_linears(&self) -> Result<Vec<(String, Vec<f32>)>> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            for &m in Module::present(self.cfg.layout) {
                let lin = layer.lin(m)?;
                if let Weight::Quant(_) = lin.w {
                    let w = self.weight(lin)?;
                    out.push((format!("model.layers.{i}.{}.weight", m.path_in(self.cfg.layout)), self.backend.download_f32(&w)?));
                }
            }
        }
        Ok(out)
    }
}

/// Layer `li`'s router and experts, read as transformers 5.17 writes them (and the hub holds
/// them): `mlp.gate.weight` and per expert `mlp.experts.{e}.{gate,up,down}_proj.weight`; each
/// expert's gate and up are joined into one `gate_up_proj [2I, d]` (rows gate | up), as
/// transformers holds them in `mlp.experts.gate_up_proj [E, 2I, d]`.
fn experts_of(cfg: &ModelConfig, be: &dyn Backend, li: usize, get: &mut dyn FnMut(&str, &[usize]) -> Result<Weight>) -> Result<crate::moe::Experts> {
    let mc = cfg.moe.as_ref().ok_or_else(|| EngineError::State { name: "moe".into(), msg: "a sparse layer without an expert config (internal error)".into() })?;
    let (d, im, p) = (cfg.hidden_size, mc.moe_intermediate_size, format!("model.layers.{li}.mlp"));
    let dense = |w: Weight, name: &str| match w {
        Weight::Dense(b) => Ok(b),
        Weight::Quant(_) => Err(EngineError::Unsupported(format!("`{name}`: quantized expert weights are not supported (Qwen3MoeForCausalLM trains from 16/32-bit weights)"))),
    };
    let router = dense(get(&format!("{p}.gate.weight"), &[mc.num_experts, d])?, "mlp.gate")?;
    let (mut gate_up, mut down) = (Vec::new(), Vec::new());
    // Dequantizer ids past every linear module's (`layer * 7 + module`); the experts are dense.
    let id = cfg.num_hidden_layers * Module::ALL.len();
    for e in 0..mc.num_experts {
        let g = dense(get(&format!("{p}.experts.{e}.gate_proj.weight"), &[im, d])?, "gate_proj")?;
        let u = dense(get(&format!("{p}.experts.{e}.up_proj.weight"), &[im, d])?, "up_proj")?;
        // Joined once, on the host, at load.
        let mut joined = be.download_f32(&g)?;
        joined.extend(be.download_f32(&u)?);
        let gu = be.upload(HostData::F32(&joined), g.dtype())?;
        gate_up.push(Linear { w: Weight::Dense(gu), b: None, out_f: 2 * im, in_f: d, id });
        let w = dense(get(&format!("{p}.experts.{e}.down_proj.weight"), &[d, im])?, "down_proj")?;
        down.push(Linear { w: Weight::Dense(w), b: None, out_f: d, in_f: im, id });
    }
    Ok(crate::moe::Experts { router, gate_up, down })
}

/// Quantizes one projection as the plan says (4-bit at the plan's block size, or 8-bit).
fn quantize(p: &QuantPlan, w: &[f32], shape: &[usize]) -> Result<QuantTensor> {
    Ok(match p.four {
        Some((t, dq, bs)) => QuantTensor::Four(Quant4::quantize(w, shape, t, bs, dq)?),
        None => QuantTensor::Eight(Quant8::quantize(w, shape)?),
    })
}

/// What the quantized projections add up to (and what a checkpoint stored in them).
#[derive(Default)]
struct QuantStats {
    params: u64,
    bytes: u64,
    quant_type: Option<QuantType>,
    double_quant: Option<bool>,
    blocksize: Option<usize>,
    weight_dtype: Option<DType>,
}

impl QuantStats {
    fn add(&mut self, q: &QuantTensor, weight_dtype: DType) {
        self.params += q.shape().iter().product::<usize>() as u64;
        self.weight_dtype.get_or_insert(weight_dtype);
        if let QuantTensor::Four(q) = q {
            self.bytes += q.bytes() as u64;
            self.quant_type.get_or_insert(q.quant_type);
            self.double_quant.get_or_insert(matches!(q.absmax, crate::quant::Absmax::Double(_)));
            self.blocksize.get_or_insert(q.blocksize);
        } else if let QuantTensor::Eight(q) = q {
            self.bytes += q.bytes() as u64;
        }
    }
}
