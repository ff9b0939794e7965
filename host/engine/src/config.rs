//! `config.json` of a Hugging Face Llama-family model: one struct with switches for every
//! supported architecture. Its RoPE (scaling kinds, inverse frequencies) is in `rope.rs`.

use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{EngineError, Result};

mod rope;
pub use rope::RopeScaling;
use rope::longrope_of;

/// Supported `architectures` entries.
pub const SUPPORTED_ARCHITECTURES: [&str; 10] = [
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MistralForCausalLM",
    "GraniteForCausalLM",
    "SmolLM3ForCausalLM",
    "Gemma3ForCausalLM",
    "Phi3ForCausalLM",
    "GraniteMoeHybridForCausalLM",
    "Qwen3MoeForCausalLM",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Llama,
    Qwen2,
    Qwen3,
    Mistral,
    Granite,
    SmolLM3,
    Gemma3,
    /// Phi-3 / Phi-4: fused `qkv_proj` and `gate_up_proj`, partial rotary, LongRoPE.
    Phi3,
    /// Granite 4.0 dense (GraniteMoeHybrid with attention layers only and no experts).
    Granite4,
    /// Qwen3-MoE: Qwen3 attention, sparse expert MLPs ([`MoeConfig`]).
    Qwen3Moe,
}

impl Arch {
    pub fn hf_name(self) -> &'static str {
        SUPPORTED_ARCHITECTURES[self as usize]
    }
    pub fn model_type(self) -> &'static str {
        ["llama", "qwen2", "qwen3", "mistral", "granite", "smollm3", "gemma3_text", "phi3", "granitemoehybrid", "qwen3_moe"][self as usize]
    }
    fn from_name(s: &str) -> Option<Self> {
        let all = [Arch::Llama, Arch::Qwen2, Arch::Qwen3, Arch::Mistral, Arch::Granite, Arch::SmolLM3, Arch::Gemma3, Arch::Phi3, Arch::Granite4, Arch::Qwen3Moe];
        all.into_iter().find(|a| a.hf_name() == s || a.model_type() == s)
    }
}

/// How a layer's projections are stored (and named, in the checkpoint and in PEFT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`.
    Split,
    /// Phi-3: `self_attn.qkv_proj` (rows q | k | v), `self_attn.o_proj`,
    /// `mlp.gate_up_proj` (rows gate | up), `mlp.down_proj`.
    Phi3,
    /// Granite 4: split attention, `shared_mlp.input_linear` (rows gate | up),
    /// `shared_mlp.output_linear`.
    Granite4,
}

/// Qwen3-MoE's sparse MLP blocks (`Qwen3MoeSparseMoeBlock`): a frozen router `mlp.gate`
/// `[num_experts, hidden]`, softmax over the experts, the `top_k` largest kept (renormalised to
/// sum 1 with `norm_topk_prob`), each token through its experts' SwiGLU MLPs of
/// `moe_intermediate_size`, outputs summed with those weights.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    /// `num_experts_per_tok`.
    pub top_k: usize,
    pub moe_intermediate_size: usize,
    pub norm_topk_prob: bool,
    /// Per layer: true for a sparse (expert) MLP, false for a dense one (`mlp_only_layers`, or
    /// not a multiple of `decoder_sparse_step`).
    pub sparse_layers: Vec<bool>,
    /// `router_aux_loss_coef` when `output_router_logits` is true (transformers adds the
    /// load-balancing loss only then), else 0.
    pub aux_loss_coef: f64,
    /// The config's own `output_router_logits` and `router_aux_loss_coef` (written back).
    pub output_router_logits: bool,
    pub router_aux_loss_coef: f64,
    pub decoder_sparse_step: usize,
    pub mlp_only_layers: Vec<usize>,
}

/// Qwen3-MoE's expert settings, as `Qwen3MoeConfig` reads them (its defaults where a key is
/// absent; `num_experts` is also written `num_local_experts`).
fn moe_of(m: &Map<String, Value>, path: &Path, layers: usize) -> Result<MoeConfig> {
    let num = |key: &str, default: u64| -> Result<usize> {
        match m.get(key) {
            None | Some(Value::Null) => Ok(default as usize),
            Some(v) => v.as_u64().map(|v| v as usize).ok_or_else(|| cfg_err(path, format!("`{key}` is {v}; expected a non-negative integer"))),
        }
    };
    let num_experts = if m.contains_key("num_local_experts") { num("num_local_experts", 128)? } else { num("num_experts", 128)? };
    let top_k = num("num_experts_per_tok", 8)?;
    let moe_intermediate_size = num("moe_intermediate_size", 768)?;
    let decoder_sparse_step = num("decoder_sparse_step", 1)?;
    if num_experts == 0 || top_k == 0 || top_k > num_experts {
        return Err(cfg_err(path, format!("`num_experts_per_tok` ({top_k}) must be in 1..=`num_experts` ({num_experts})")));
    }
    if moe_intermediate_size == 0 || decoder_sparse_step == 0 {
        return Err(cfg_err(path, "`moe_intermediate_size` and `decoder_sparse_step` must be positive"));
    }
    let mlp_only_layers: Vec<usize> = match m.get("mlp_only_layers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_u64().map(|v| v as usize).filter(|&v| v < layers).ok_or_else(|| cfg_err(path, format!("`mlp_only_layers` entry {v} is not a layer index below {layers}"))))
            .collect::<Result<_>>()?,
        Some(v) => return Err(cfg_err(path, format!("`mlp_only_layers` is {v}; expected a list of layer indices"))),
    };
    let sparse_layers = (0..layers).map(|i| !mlp_only_layers.contains(&i) && (i + 1) % decoder_sparse_step == 0).collect();
    let output_router_logits = m.get("output_router_logits").and_then(Value::as_bool).unwrap_or(false);
    let router_aux_loss_coef = get_f64(m, "router_aux_loss_coef").unwrap_or(0.001);
    if !router_aux_loss_coef.is_finite() || router_aux_loss_coef < 0.0 {
        return Err(cfg_err(path, format!("`router_aux_loss_coef` {router_aux_loss_coef} must be finite and non-negative")));
    }
    Ok(MoeConfig {
        num_experts,
        top_k,
        moe_intermediate_size,
        norm_topk_prob: m.get("norm_topk_prob").and_then(Value::as_bool).unwrap_or(false),
        sparse_layers,
        aux_loss_coef: if output_router_logits { router_aux_loss_coef } else { 0.0 },
        output_router_logits,
        router_aux_loss_coef,
        decoder_sparse_step,
        mlp_only_layers,
    })
}

/// A decoder's configuration. Field names follow config.json.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q/k/v projections (Qwen2 always; Llama/Qwen3 `attention_bias`; also on o_proj
    /// for Llama/Granite `attention_bias`, see `o_bias`).
    pub qkv_bias: bool,
    pub o_bias: bool,
    /// Qwen3's and Gemma 3's per-head RMSNorm of q and k.
    pub qk_norm: bool,
    /// Gemma 3: every RMSNorm scales by `1 + w` (computed in f32), attention and MLP outputs
    /// are normed before their residual adds (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`; the MLP input norm is `pre_feedforward_layernorm`), and the
    /// MLP is GeGLU with tanh-approximated GELU (`gelu_pytorch_tanh`).
    pub gemma_norms: bool,
    pub gelu_mlp: bool,
    /// Gemma 3's RoPE base on its sliding layers (`rope_parameters.sliding_attention` or
    /// `rope_local_base_freq`); `rope_theta`/`rope_scaling` then hold the full layers' RoPE.
    pub rope_local_theta: Option<f64>,
    /// Sliding-window attention (Mistral; Qwen2/Qwen3/SmolLM3 with `use_sliding_window`): a
    /// token sees the `sliding_window` latest tokens of its document, itself included, on the
    /// layers [`ModelConfig::layer_window`] names.
    pub sliding_window: Option<usize>,
    /// Per layer, from `layer_types`: true for `sliding_attention`. Empty: every layer slides
    /// when `sliding_window` is set.
    pub sliding_layers: Vec<bool>,
    /// Per layer: true where RoPE is skipped (SmolLM3's `no_rope_layers` zeros). Empty: every
    /// layer rotates.
    pub nope_layers: Vec<bool>,
    /// Granite multipliers (1 elsewhere): embeddings, residual branches, logits divisor.
    pub embedding_multiplier: f32,
    pub residual_multiplier: f32,
    pub logits_scaling: f32,
    /// Attention score scale (`attention_multiplier` for Granite, else `1/sqrt(head_dim)`).
    pub attention_scale: f32,
    /// `torch_dtype`/`dtype` of config.json, if given.
    pub torch_dtype: Option<String>,
    /// Fused or split projections.
    pub layout: Layout,
    /// The leading dims of each head that RoPE rotates (`head_dim * partial_rotary_factor`);
    /// the rest pass through.
    pub rotary_dim: usize,
    /// Qwen3-MoE's experts (None: every layer has a dense MLP).
    pub moe: Option<MoeConfig>,
}

fn cfg_err(path: &Path, msg: impl Into<String>) -> EngineError {
    EngineError::Config { path: path.to_path_buf(), msg: msg.into() }
}

fn get_usize(m: &Map<String, Value>, path: &Path, key: &str) -> Result<usize> {
    m.get(key)
        .and_then(Value::as_u64)
        .map(|v| v as usize)
        .ok_or_else(|| cfg_err(path, format!("`{key}` is missing or not a non-negative integer")))
}

fn get_f64(m: &Map<String, Value>, key: &str) -> Option<f64> {
    m.get(key).and_then(Value::as_f64)
}

/// `sliding_window` and which layers use it, as transformers reads them: Mistral slides on
/// every layer whenever `sliding_window` is set (it ignores `layer_types`); Qwen2/Qwen3/SmolLM3
/// only with `use_sliding_window`, on the layers `layer_types` (transformers 5) marks, else by
/// their configs' rule: Qwen from `max_window_layers` (default 28) on, SmolLM3 its no-RoPE layers.
fn sliding_of(m: &Map<String, Value>, path: &Path, arch: Arch, layers: usize, nope: &[bool]) -> Result<(Option<usize>, Vec<bool>)> {
    let on = match arch {
        Arch::Mistral | Arch::Gemma3 | Arch::Phi3 => true,
        Arch::Qwen2 | Arch::Qwen3 | Arch::Qwen3Moe | Arch::SmolLM3 => m.get("use_sliding_window").and_then(Value::as_bool) == Some(true),
        Arch::Llama | Arch::Granite | Arch::Granite4 => false,
    };
    let window = match m.get("sliding_window") {
        Some(Value::Null) | None => None,
        Some(v) => Some(v.as_u64().filter(|&w| w > 0).ok_or_else(|| cfg_err(path, format!("`sliding_window` is {v}; expected a positive integer or null")))? as usize),
    };
    let Some(window) = window.filter(|_| on) else { return Ok((None, Vec::new())) };
    let types = match m.get("layer_types") {
        _ if matches!(arch, Arch::Mistral | Arch::Phi3) => Vec::new(),
        Some(Value::Array(a)) => {
            if a.len() != layers {
                return Err(cfg_err(path, format!("`layer_types` has {} entries for {layers} layers", a.len())));
            }
            a.iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("sliding_attention") => Ok(true),
                    Some("full_attention") => Ok(false),
                    _ => Err(cfg_err(path, format!("`layer_types[{i}]` is {t}; supported: \"full_attention\", \"sliding_attention\""))),
                })
                .collect::<Result<Vec<bool>>>()?
        }
        _ if arch == Arch::SmolLM3 => nope.to_vec(),
        _ if arch == Arch::Gemma3 => {
            let every = m.get("sliding_window_pattern").or_else(|| m.get("_sliding_window_pattern")).and_then(Value::as_u64).unwrap_or(6).max(1) as usize;
            (0..layers).map(|i| (i + 1) % every != 0).collect()
        }
        _ => {
            let mwl = m.get("max_window_layers").and_then(Value::as_u64).unwrap_or(28);
            (0..layers).map(|i| i as u64 >= mwl).collect()
        }
    };
    Ok((Some(window), types))
}

/// SmolLM3's layers without RoPE: `no_rope_layers[i] == 0` (1 rotates), or when the list is
/// absent every `no_rope_layer_interval`-th layer (default 4), as transformers builds it.
fn nope_of(m: &Map<String, Value>, path: &Path, layers: usize) -> Result<Vec<bool>> {
    match m.get("no_rope_layers") {
        Some(Value::Array(a)) => {
            if a.len() != layers {
                return Err(cfg_err(path, format!("`no_rope_layers` has {} entries for {layers} layers", a.len())));
            }
            a.iter()
                .enumerate()
                .map(|(i, v)| match v.as_u64() {
                    Some(0) => Ok(true),
                    Some(1) => Ok(false),
                    _ => Err(cfg_err(path, format!("`no_rope_layers[{i}]` is {v}; expected 0 (no RoPE) or 1 (RoPE)"))),
                })
                .collect()
        }
        Some(Value::Null) | None => {
            let every = m.get("no_rope_layer_interval").and_then(Value::as_u64).unwrap_or(4).max(1) as usize;
            Ok((0..layers).map(|i| (i + 1) % every == 0).collect())
        }
        Some(v) => Err(cfg_err(path, format!("`no_rope_layers` is {v}; expected a list of 0/1 per layer"))),
    }
}

/// Granite 4 (`GraniteMoeHybridForCausalLM`) trains here only as a dense decoder: every layer
/// attention, no experts.
fn granite4_check(m: &Map<String, Value>, path: &Path) -> Result<()> {
    // transformers maps the legacy "attention"/"mamba" to "full_attention"/"linear_attention";
    // without a list every layer is mamba.
    let layers = get_usize(m, path, "num_hidden_layers")?;
    let key = if m.contains_key("layer_types") { "layer_types" } else { "layers_block_type" };
    let types = match m.get(key) {
        Some(Value::Array(a)) => a.clone(),
        _ => vec![Value::String("linear_attention".into()); layers],
    };
    if types.len() != layers {
        return Err(cfg_err(path, format!("`{key}` has {} entries for {layers} layers", types.len())));
    }
    if let Some((i, t)) = types.iter().enumerate().find(|(_, t)| !matches!(t.as_str(), Some("attention" | "full_attention"))) {
        return Err(EngineError::Unsupported(format!(
            "`{key}[{i}]` is {t} in {}{}: only Granite 4 dense models (every layer \"attention\") are supported, not mamba layers",
            path.display(),
            if m.contains_key(key) { "" } else { " (absent: transformers makes every layer mamba)" }
        )));
    }
    if let Some(n) = m.get("num_local_experts").and_then(Value::as_u64).filter(|&n| n > 0) {
        return Err(EngineError::Unsupported(format!(
            "`num_local_experts` is {n} in {}: only Granite 4 dense models (num_local_experts 0) are supported",
            path.display()
        )));
    }
    for key in ["attention_dropout", "embedding_dropout"] {
        if let Some(v) = get_f64(m, key).filter(|&v| v != 0.0) {
            return Err(cfg_err(path, format!("`{key}` is {v}; dropout inside the base model is not supported (only 0.0)")));
        }
    }
    Ok(())
}

impl ModelConfig {
    /// Reads `<dir>/config.json`.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| EngineError::io(&path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| cfg_err(&path, format!("not valid JSON: {e}")))?;
        Self::from_json(&v, &path)
    }

    /// Parses a config.json value; `path` is only used in errors.
    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let m = v.as_object().ok_or_else(|| cfg_err(path, "not a JSON object"))?;
        let arch_name = match m.get("architectures").and_then(Value::as_array) {
            Some(a) if !a.is_empty() => a[0].as_str().unwrap_or("").to_string(),
            _ => m.get("model_type").and_then(Value::as_str).unwrap_or("").to_string(),
        };
        let arch = Arch::from_name(&arch_name).ok_or_else(|| {
            EngineError::Unsupported(format!(
                "architecture `{arch_name}` in {} is not supported; supported: {}",
                path.display(),
                SUPPORTED_ARCHITECTURES.join(", ")
            ))
        })?;
        let gemma = arch == Arch::Gemma3;
        // Gemma 3 names its activation `hidden_activation` (transformers ignores `hidden_act` there).
        let (act_key, want) = if gemma { ("hidden_activation", "gelu_pytorch_tanh") } else { ("hidden_act", "silu") };
        if let Some(act) = m.get(act_key).and_then(Value::as_str)
            && act != want
        {
            return Err(cfg_err(path, format!("`{act_key}` is `{act}`; only `{want}` is supported for {}", arch.hf_name())));
        }
        if m.get("mlp_bias").and_then(Value::as_bool) == Some(true) {
            return Err(cfg_err(path, "`mlp_bias: true` is not supported"));
        }
        let hidden_size = get_usize(m, path, "hidden_size")?;
        let num_attention_heads = get_usize(m, path, "num_attention_heads")?;
        let num_key_value_heads = match m.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            _ => get_usize(m, path, "num_key_value_heads")?,
        };
        if num_attention_heads == 0 || num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(cfg_err(path, format!("`num_attention_heads` ({num_attention_heads}) must be a positive multiple of `num_key_value_heads` ({num_key_value_heads})")));
        }
        let head_dim = match m.get("head_dim") {
            Some(Value::Null) | None => hidden_size / num_attention_heads,
            _ => get_usize(m, path, "head_dim")?,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(cfg_err(path, format!("`head_dim` {head_dim} must be even and positive")));
        }
        let phi3 = arch == Arch::Phi3;
        let granite4 = arch == Arch::Granite4;
        if granite4 {
            granite4_check(m, path)?;
        }
        if phi3 {
            for key in ["resid_pdrop", "attention_dropout"] {
                if let Some(v) = get_f64(m, key).filter(|&v| v != 0.0) {
                    return Err(cfg_err(path, format!("`{key}` is {v}; dropout inside the base model is not supported (only 0.0)")));
                }
            }
        }
        let rope_params_obj = m.get("rope_parameters").and_then(Value::as_object);
        let rotary_dim = match get_f64(m, "partial_rotary_factor").or_else(|| rope_params_obj.and_then(|p| get_f64(p, "partial_rotary_factor"))) {
            None | Some(1.0) => head_dim,
            Some(p) if phi3 && p > 0.0 && p < 1.0 => {
                let rd = (head_dim as f64 * p) as usize;
                if rd == 0 || !rd.is_multiple_of(2) {
                    return Err(cfg_err(path, format!("`partial_rotary_factor` {p} gives {rd} rotary dims of head_dim {head_dim}; they must be even and positive")));
                }
                rd
            }
            Some(p) => return Err(cfg_err(path, format!("`partial_rotary_factor` {p} is not supported for {} (Phi3ForCausalLM: in (0, 1])", arch.hf_name()))),
        };
        let mut rope_params = m.get("rope_parameters").and_then(Value::as_object);
        let mut rope_local_theta = None;
        if gemma {
            // transformers 5 nests Gemma 3's RoPE per layer type; older configs use
            // `rope_theta`/`rope_scaling` for full layers and `rope_local_base_freq`.
            let by_type = |t: &str| rope_params.and_then(|p| p.get(t)).and_then(Value::as_object);
            let local = by_type("sliding_attention");
            if let Some(l) = local {
                let kind = l.get("rope_type").and_then(Value::as_str).unwrap_or("default");
                if kind != "default" {
                    return Err(EngineError::Unsupported(format!(
                        "`rope_parameters.sliding_attention.rope_type` `{kind}` in {} is not supported; supported: default",
                        path.display()
                    )));
                }
            }
            rope_local_theta = Some(local.and_then(|l| get_f64(l, "rope_theta")).or_else(|| get_f64(m, "rope_local_base_freq")).unwrap_or(10000.0));
            if rope_params.is_some() {
                rope_params = by_type("full_attention");
            }
        }
        let rope_theta = get_f64(m, "rope_theta")
            .or_else(|| rope_params.and_then(|p| get_f64(p, "rope_theta")))
            .unwrap_or(if gemma { 1_000_000.0 } else { 10000.0 });
        let scaling_obj = match m.get("rope_scaling") {
            Some(Value::Object(o)) => Some(o),
            _ => rope_params,
        };
        let max_position_embeddings = m.get("max_position_embeddings").and_then(Value::as_u64).unwrap_or(2048) as usize;
        let rope_scaling = match scaling_obj {
            None => RopeScaling::None,
            Some(o) => {
                let kind = o.get("rope_type").or_else(|| o.get("type")).and_then(Value::as_str).unwrap_or("default");
                let factor = || get_f64(o, "factor").ok_or_else(|| cfg_err(path, format!("rope scaling `{kind}` needs `factor`")));
                match kind {
                    "default" => RopeScaling::None,
                    "linear" => RopeScaling::Linear { factor: factor()? },
                    "dynamic" => RopeScaling::Dynamic { factor: factor()? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: factor()?,
                        low_freq_factor: get_f64(o, "low_freq_factor").ok_or_else(|| cfg_err(path, "llama3 rope scaling needs `low_freq_factor`"))?,
                        high_freq_factor: get_f64(o, "high_freq_factor").ok_or_else(|| cfg_err(path, "llama3 rope scaling needs `high_freq_factor`"))?,
                        original_max_position_embeddings: get_f64(o, "original_max_position_embeddings")
                            .ok_or_else(|| cfg_err(path, "llama3 rope scaling needs `original_max_position_embeddings`"))?,
                    },
                    "longrope" if phi3 => longrope_of(m, o, path, rotary_dim, max_position_embeddings)?,
                    other => {
                        return Err(EngineError::Unsupported(format!(
                            "rope scaling `{other}` in {} is not supported; supported: default, linear, dynamic, llama3 (and longrope for Phi3ForCausalLM)",
                            path.display()
                        )));
                    }
                }
            }
        };
        let attention_bias = m.get("attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let (qkv_bias, o_bias) = match arch {
            Arch::Qwen2 => (true, false),
            Arch::Qwen3 | Arch::Qwen3Moe => (attention_bias, attention_bias),
            Arch::Mistral => (false, false),
            Arch::Llama | Arch::Granite | Arch::Granite4 | Arch::SmolLM3 | Arch::Gemma3 => (attention_bias, attention_bias),
            // Phi3Attention's projections never have a bias.
            Arch::Phi3 => (false, false),
        };
        let num_hidden_layers = get_usize(m, path, "num_hidden_layers")?;
        let nope_layers = if arch == Arch::SmolLM3 {
            nope_of(m, path, num_hidden_layers)?
        } else if granite4 {
            // transformers rotates only with "rope" (its default, null, is no RoPE).
            match m.get("position_embedding_type") {
                Some(Value::String(r)) if r == "rope" => Vec::new(),
                None | Some(Value::Null) => vec![true; num_hidden_layers],
                Some(Value::String(r)) if r == "nope" => vec![true; num_hidden_layers],
                Some(other) => return Err(cfg_err(path, format!("`position_embedding_type` is {other}; supported: \"rope\", \"nope\" or null (no RoPE)"))),
            }
        } else {
            Vec::new()
        };
        let (sliding_window, sliding_layers) = sliding_of(m, path, arch, num_hidden_layers, &nope_layers)?;
        if m.get("use_bidirectional_attention").and_then(Value::as_bool) == Some(true) {
            return Err(cfg_err(path, "`use_bidirectional_attention: true` is not supported (causal attention only)"));
        }
        for key in ["attn_logit_softcapping", "final_logit_softcapping"] {
            if let Some(v) = m.get(key).filter(|v| !v.is_null()) {
                return Err(cfg_err(path, format!("`{key}` is {v}; logit soft-capping is not supported (only null)")));
            }
        }
        let granite = arch == Arch::Granite || granite4;
        let gm = |k: &str| if granite { get_f64(m, k).unwrap_or(1.0) as f32 } else { 1.0 };
        let attention_scale = if granite {
            get_f64(m, "attention_multiplier").unwrap_or(1.0) as f32
        } else if gemma {
            (get_f64(m, "query_pre_attn_scalar").unwrap_or(256.0) as f32).powf(-0.5)
        } else {
            1.0 / (head_dim as f32).sqrt()
        };
        let cfg = ModelConfig {
            arch,
            vocab_size: get_usize(m, path, "vocab_size")?,
            hidden_size,
            // Granite 4's dense MLP is its `shared_mlp` (`intermediate_size` sizes experts).
            intermediate_size: get_usize(m, path, if granite4 { "shared_intermediate_size" } else { "intermediate_size" })?,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: get_f64(m, "rms_norm_eps").unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: m.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(gemma),
            qkv_bias,
            o_bias,
            qk_norm: matches!(arch, Arch::Qwen3 | Arch::Qwen3Moe) || gemma,
            gemma_norms: gemma,
            gelu_mlp: gemma,
            rope_local_theta,
            sliding_window,
            sliding_layers,
            nope_layers,
            // Gemma 3 scales embeddings by sqrt(hidden) (in the model dtype: f32 here).
            embedding_multiplier: if gemma { (hidden_size as f32).sqrt() } else { gm("embedding_multiplier") },
            residual_multiplier: gm("residual_multiplier"),
            logits_scaling: gm("logits_scaling"),
            attention_scale,
            torch_dtype: m.get("torch_dtype").or_else(|| m.get("dtype")).and_then(Value::as_str).map(str::to_string),
            layout: match arch {
                Arch::Phi3 => Layout::Phi3,
                Arch::Granite4 => Layout::Granite4,
                _ => Layout::Split,
            },
            rotary_dim,
            moe: if arch == Arch::Qwen3Moe { Some(moe_of(m, path, num_hidden_layers)?) } else { None },
        };
        if cfg.vocab_size == 0 || cfg.hidden_size == 0 || cfg.intermediate_size == 0 {
            return Err(cfg_err(path, "`vocab_size`, `hidden_size` and `intermediate_size` must be positive"));
        }
        Ok(cfg)
    }

    /// A tiny Llama (2 layers, hidden 64, GQA 4/2, untied) for tests of other crates.
    pub fn tiny_llama(vocab_size: usize) -> Self {
        ModelConfig {
            arch: Arch::Llama,
            vocab_size,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 16,
            rms_norm_eps: 1e-6,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            max_position_embeddings: 4096,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            qk_norm: false,
            gemma_norms: false,
            gelu_mlp: false,
            rope_local_theta: None,
            sliding_window: None,
            sliding_layers: Vec::new(),
            nope_layers: Vec::new(),
            embedding_multiplier: 1.0,
            residual_multiplier: 1.0,
            logits_scaling: 1.0,
            attention_scale: 0.25,
            torch_dtype: None,
            layout: Layout::Split,
            rotary_dim: 16,
            moe: None,
        }
    }

    /// A Llama-shaped config of explicit sizes (for the benchmark).
    #[allow(clippy::too_many_arguments)]
    pub fn llama_shape(layers: usize, hidden: usize, mlp: usize, heads: usize, kv_heads: usize, vocab: usize, tied: bool) -> Self {
        let head_dim = hidden / heads;
        ModelConfig {
            num_hidden_layers: layers,
            hidden_size: hidden,
            intermediate_size: mlp,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            tie_word_embeddings: tied,
            attention_scale: 1.0 / (head_dim as f32).sqrt(),
            rotary_dim: head_dim,
            ..Self::tiny_llama(vocab)
        }
    }

    /// The config.json text Hugging Face would write for this config.
    pub fn to_hf_json(&self, dtype_name: &str) -> Value {
        let mut v = json!({
            "architectures": [self.arch.hf_name()],
            "model_type": self.arch.model_type(),
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": if self.gelu_mlp { "gelu_pytorch_tanh" } else { "silu" },
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": dtype_name,
        });
        let o = v.as_object_mut().expect("object literal");
        match self.arch {
            Arch::Llama | Arch::Granite | Arch::Granite4 | Arch::Qwen3 | Arch::Qwen3Moe | Arch::SmolLM3 => {
                o.insert("attention_bias".into(), json!(self.qkv_bias));
            }
            _ => {}
        }
        if self.rotary_dim != self.head_dim {
            o.insert("partial_rotary_factor".into(), json!(self.rotary_dim as f64 / self.head_dim as f64));
        }
        if self.arch == Arch::Granite4 {
            let n = self.num_hidden_layers;
            o.insert("shared_intermediate_size".into(), json!(self.intermediate_size));
            o.insert("num_local_experts".into(), json!(0));
            o.insert("layer_types".into(), json!(vec!["attention"; n]));
            let rope = if self.nope_layers.iter().any(|&x| x) { "nope" } else { "rope" };
            o.insert("position_embedding_type".into(), json!(rope));
        }
        if matches!(self.arch, Arch::Phi3 | Arch::Granite4) {
            // Their config classes' default special-token ids lie outside a small vocabulary.
            for key in ["pad_token_id", "bos_token_id", "eos_token_id"] {
                o.insert(key.into(), Value::Null);
            }
        }
        if matches!(self.arch, Arch::Granite | Arch::Granite4) {
            o.insert("embedding_multiplier".into(), json!(self.embedding_multiplier));
            o.insert("residual_multiplier".into(), json!(self.residual_multiplier));
            o.insert("logits_scaling".into(), json!(self.logits_scaling));
            o.insert("attention_multiplier".into(), json!(self.attention_scale));
        }
        if let Some(w) = self.sliding_window {
            o.insert("sliding_window".into(), json!(w));
            if !matches!(self.arch, Arch::Mistral | Arch::Gemma3) {
                o.insert("use_sliding_window".into(), json!(true));
            }
        } else if self.arch == Arch::Mistral {
            o.insert("sliding_window".into(), Value::Null);
        }
        if self.sliding_window.is_some() && self.arch != Arch::Mistral {
            let types: Vec<&str> = (0..self.num_hidden_layers).map(|i| if self.layer_window(i) > 0 { "sliding_attention" } else { "full_attention" }).collect();
            o.insert("layer_types".into(), json!(types));
        }
        if self.arch == Arch::Gemma3 {
            o.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
            o.insert("query_pre_attn_scalar".into(), json!(self.attention_scale.powi(-2).round() as u64));
            o.insert("rope_local_base_freq".into(), json!(self.rope_local_theta));
        }
        if let Some(e) = &self.moe {
            o.insert("num_experts".into(), json!(e.num_experts));
            o.insert("num_experts_per_tok".into(), json!(e.top_k));
            o.insert("moe_intermediate_size".into(), json!(e.moe_intermediate_size));
            o.insert("norm_topk_prob".into(), json!(e.norm_topk_prob));
            o.insert("decoder_sparse_step".into(), json!(e.decoder_sparse_step));
            o.insert("mlp_only_layers".into(), json!(e.mlp_only_layers));
            o.insert("output_router_logits".into(), json!(e.output_router_logits));
            o.insert("router_aux_loss_coef".into(), json!(e.router_aux_loss_coef));
        }
        if self.arch == Arch::SmolLM3 {
            let flags: Vec<u8> = (0..self.num_hidden_layers).map(|i| u8::from(self.layer_uses_rope(i))).collect();
            o.insert("no_rope_layers".into(), json!(flags));
            // SmolLM3Config's default pad id (128004) lies outside a smaller vocabulary, which
            // transformers refuses; the engine knows no special tokens, so it names none.
            for key in ["pad_token_id", "bos_token_id", "eos_token_id"] {
                o.insert(key.into(), Value::Null);
            }
        }
        let scaling = match &self.rope_scaling {
            RopeScaling::None => Value::Null,
            RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
            RopeScaling::Dynamic { factor } => json!({"rope_type": "dynamic", "factor": factor}),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor, "original_max_position_embeddings": original_max_position_embeddings
            }),
            RopeScaling::LongRope { short_factor, long_factor, original_max_position_embeddings, attention_factor } => {
                o.insert("original_max_position_embeddings".into(), json!(original_max_position_embeddings));
                json!({"rope_type": "longrope", "short_factor": short_factor, "long_factor": long_factor, "attention_factor": attention_factor})
            }
        };
        o.insert("rope_scaling".into(), scaling);
        v
    }

    /// The switches of the one decoder implementation this config turns on, in words (for
    /// `--dry-run` and logs), e.g. `GQA 4/2`, `no RoPE on layers 3, 7`.
    pub fn switches(&self) -> Vec<String> {
        let layers = |pick: &dyn Fn(usize) -> bool| -> String {
            let l: Vec<String> = (0..self.num_hidden_layers).filter(|&i| pick(i)).map(|i| i.to_string()).collect();
            if l.len() == self.num_hidden_layers { "every layer".into() } else { format!("layers {}", l.join(", ")) }
        };
        let mut v = Vec::new();
        if self.num_key_value_heads != self.num_attention_heads {
            v.push(format!("GQA {}/{}", self.num_attention_heads, self.num_key_value_heads));
        }
        if self.qkv_bias {
            v.push(if self.o_bias { "q/k/v/o bias".into() } else { "q/k/v bias".into() });
        }
        if self.qk_norm {
            v.push("q/k RMSNorm".into());
        }
        if self.gemma_norms {
            v.push("(1+w) RMSNorm in f32, norms after attention and MLP".into());
        }
        if self.gelu_mlp {
            v.push("GeGLU (gelu_pytorch_tanh)".into());
        }
        if self.embedding_multiplier != 1.0 && !matches!(self.arch, Arch::Granite | Arch::Granite4) {
            v.push(format!("embeddings x {}", self.embedding_multiplier));
        }
        if let Some(b) = self.rope_local_theta {
            v.push(format!("RoPE base {b} on sliding layers, {} on full layers", self.rope_theta));
        }
        if self.tie_word_embeddings {
            v.push("tied embeddings".into());
        }
        match &self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => v.push(format!("linear RoPE scaling x{factor}")),
            RopeScaling::Dynamic { factor } => v.push(format!("dynamic RoPE scaling x{factor}")),
            RopeScaling::Llama3 { factor, .. } => v.push(format!("llama3 RoPE scaling x{factor}")),
            RopeScaling::LongRope { original_max_position_embeddings, attention_factor, .. } => v.push(format!(
                "LongRoPE (short factors up to {original_max_position_embeddings} positions, long beyond; attention factor {attention_factor:.4})"
            )),
        }
        match self.layout {
            Layout::Split => {}
            Layout::Phi3 => v.push("fused qkv_proj (q | k | v) and gate_up_proj (gate | up)".into()),
            Layout::Granite4 => v.push("fused shared_mlp.input_linear (gate | up), shared_mlp.output_linear".into()),
        }
        if let Some(e) = &self.moe {
            let dense: Vec<String> = (0..self.num_hidden_layers).filter(|&i| !self.layer_is_sparse(i)).map(|i| i.to_string()).collect();
            v.push(format!(
                "MoE: {} experts of MLP {}, top-{}{} (router frozen), dense MLP {}",
                e.num_experts,
                e.moe_intermediate_size,
                e.top_k,
                if e.norm_topk_prob { " renormalised" } else { "" },
                if dense.is_empty() { "on no layer".to_string() } else { format!("on layers {}", dense.join(", ")) }
            ));
            if e.aux_loss_coef > 0.0 {
                v.push(format!("router load-balancing loss x{}", e.aux_loss_coef));
            }
        }
        if self.rotary_dim != self.head_dim {
            v.push(format!("partial rotary: {} of {} head dims", self.rotary_dim, self.head_dim));
        }
        if self.nope_layers.iter().any(|&n| n) {
            v.push(format!("no RoPE on {}", layers(&|i| !self.layer_uses_rope(i))));
        }
        if let Some(w) = self.sliding_window {
            v.push(format!("sliding window {w} on {}", layers(&|i| self.layer_window(i) > 0)));
        }
        if matches!(self.arch, Arch::Granite | Arch::Granite4) {
            v.push(format!(
                "Granite multipliers (embedding {}, residual {}, attention {}, logits / {})",
                self.embedding_multiplier, self.residual_multiplier, self.attention_scale, self.logits_scaling
            ));
        }
        v
    }

    /// Does layer `li` have a sparse (expert) MLP?
    pub fn layer_is_sparse(&self, li: usize) -> bool {
        self.moe.as_ref().is_some_and(|e| e.sparse_layers.get(li) == Some(&true))
    }

    /// Does layer `li` rotate q and k (false on SmolLM3's no-RoPE layers)?
    pub fn layer_uses_rope(&self, li: usize) -> bool {
        !self.nope_layers.get(li).copied().unwrap_or(false)
    }

    /// The attention window of layer `li` ([`crate::backend::Attn::window`]; 0: plain causal).
    pub fn layer_window(&self, li: usize) -> usize {
        match self.sliding_window {
            Some(w) if self.sliding_layers.is_empty() || self.sliding_layers.get(li) == Some(&true) => w,
            _ => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: Value) -> Result<ModelConfig> {
        let mut v = json!({
            "architectures": ["SmolLM3ForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    #[test]
    fn smollm3_skips_rope_where_no_rope_layers_says_0_or_every_fourth_layer_by_default() {
        let c = parse(json!({})).unwrap();
        assert_eq!((0..8).filter(|&i| !c.layer_uses_rope(i)).collect::<Vec<_>>(), [3, 7]);
        let c = parse(json!({"no_rope_layers": [1, 0, 1, 1, 1, 1, 1, 0]})).unwrap();
        assert_eq!((0..8).filter(|&i| !c.layer_uses_rope(i)).collect::<Vec<_>>(), [1, 7]);
        assert!(c.switches().contains(&"no RoPE on layers 1, 7".to_string()), "{:?}", c.switches());
        let back = ModelConfig::from_json(&c.to_hf_json("float32"), Path::new("x")).unwrap();
        assert_eq!(back.nope_layers, c.nope_layers);
        let e = parse(json!({"no_rope_layers": [1, 0]})).unwrap_err().to_string();
        assert!(e.contains("`no_rope_layers` has 2 entries for 8 layers"), "{e}");
        let e = parse(json!({"no_rope_layers": [1, 2, 1, 1, 1, 1, 1, 1]})).unwrap_err().to_string();
        assert!(e.contains("`no_rope_layers[1]` is 2"), "{e}");
    }

    #[test]
    fn sliding_layers_follow_layer_types_and_use_sliding_window() {
        let types = json!(["sliding_attention", "full_attention", "sliding_attention", "full_attention", "full_attention", "full_attention", "full_attention", "sliding_attention"]);
        let c = parse(json!({"sliding_window": 16, "layer_types": types})).unwrap();
        assert_eq!(c.layer_window(0), 0, "no use_sliding_window: no window");
        let c = parse(json!({"sliding_window": 16, "use_sliding_window": true, "layer_types": types})).unwrap();
        assert_eq!((0..8).map(|i| c.layer_window(i)).collect::<Vec<_>>(), [16, 0, 16, 0, 0, 0, 0, 16]);
        let e = parse(json!({"sliding_window": 16, "use_sliding_window": true, "layer_types": vec!["chunked_attention"; 8]})).unwrap_err().to_string();
        assert!(e.contains("`layer_types[0]`") && e.contains("sliding_attention"), "{e}");
        let mistral = json!({"architectures": ["MistralForCausalLM"], "sliding_window": 5});
        let c = parse(mistral).unwrap();
        assert!((0..8).all(|i| c.layer_window(i) == 5));
    }

    #[test]
    fn soft_capping_and_unknown_architectures_are_refused_by_name() {
        let e = parse(json!({"attn_logit_softcapping": 50.0})).unwrap_err().to_string();
        assert!(e.contains("`attn_logit_softcapping`"), "{e}");
        assert!(parse(json!({"final_logit_softcapping": null})).is_ok());
        let e = parse(json!({"architectures": ["DeepseekV3ForCausalLM"]})).unwrap_err().to_string();
        assert!(e.contains("DeepseekV3ForCausalLM") && e.contains("Gemma3ForCausalLM, Phi3ForCausalLM, GraniteMoeHybridForCausalLM, Qwen3MoeForCausalLM"), "{e}");
    }

    #[test]
    fn gemma3_reads_nested_rope_parameters_layer_types_and_its_scales() {
        let c = parse(json!({"architectures": ["Gemma3ForCausalLM"], "head_dim": 16, "query_pre_attn_scalar": 64, "sliding_window": 4,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}))
        .unwrap();
        assert_eq!((c.rope_theta, c.rope_local_theta, &c.rope_scaling), (1e6, Some(1e4), &RopeScaling::Linear { factor: 8.0 }));
        assert_eq!((0..8).map(|i| c.layer_window(i)).collect::<Vec<_>>(), [4, 4, 4, 4, 4, 0, 4, 4], "sliding_window_pattern 6");
        assert_eq!((c.attention_scale, c.embedding_multiplier, c.tie_word_embeddings), (0.125, 32f32.sqrt(), true));
        let e = parse(json!({"architectures": ["Gemma3ForCausalLM"], "hidden_activation": "gelu"})).unwrap_err().to_string();
        assert!(e.contains("`hidden_activation` is `gelu`"), "{e}");
    }

    #[test]
    fn phi3_partial_rotary_longrope_and_refused_keys() {
        let phi3 = |extra: Value| {
            let mut v = json!({"architectures": ["Phi3ForCausalLM"], "head_dim": 8, "max_position_embeddings": 64});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            parse(v)
        };
        let c = phi3(json!({"partial_rotary_factor": 0.75})).unwrap();
        assert_eq!((c.rotary_dim, c.layout, c.qkv_bias), (6, Layout::Phi3, false));
        assert_eq!(c.rope_inv_freq(0).len(), 3);
        assert!(c.switches().iter().any(|s| s == "partial rotary: 6 of 8 head dims"), "{:?}", c.switches());
        let lr = json!({"rope_parameters": {"rope_type": "longrope", "rope_theta": 100.0, "short_factor": [1.0, 2.0, 1.0, 1.0], "long_factor": [4.0, 8.0, 1.0, 1.0]},
            "original_max_position_embeddings": 16});
        let c = phi3(lr).unwrap();
        // factor 64 / 16 = 4: attention factor sqrt(1 + ln 4 / ln 16) = sqrt(1.5).
        assert!((c.rope_attention_factor() - 1.5f32.sqrt()).abs() < 1e-6, "{}", c.rope_attention_factor());
        let (short, long) = (c.rope_inv_freq(15), c.rope_inv_freq(16));
        let b = 100f32.powf(0.25);
        assert_eq!((short[1], long[1]), (1.0 / (2.0 * b), 1.0 / (8.0 * b)), "positions up to 16 use short factors, beyond long");
        let back = ModelConfig::from_json(&c.to_hf_json("float32"), Path::new("x")).unwrap();
        assert_eq!((back.rope_scaling, back.rotary_dim), (c.rope_scaling.clone(), c.rotary_dim));
        let e = phi3(json!({"rope_parameters": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}})).unwrap_err().to_string();
        assert!(e.contains("`short_factor` must hold 4 numbers"), "{e}");
        let e = phi3(json!({"resid_pdrop": 0.1})).unwrap_err().to_string();
        assert!(e.contains("`resid_pdrop` is 0.1"), "{e}");
        let e = parse(json!({"partial_rotary_factor": 0.5})).unwrap_err().to_string();
        assert!(e.contains("`partial_rotary_factor` 0.5 is not supported for SmolLM3ForCausalLM"), "{e}");
        let c = phi3(json!({"sliding_window": 5})).unwrap();
        assert!((0..8).all(|i| c.layer_window(i) == 5), "Phi-3 slides on every layer");
    }

    #[test]
    fn granite4_dense_only_with_its_shared_mlp_and_rope_or_nope() {
        let g4 = |extra: Value| {
            let mut v = json!({"architectures": ["GraniteMoeHybridForCausalLM"], "shared_intermediate_size": 40, "num_local_experts": 0,
                "layer_types": vec!["attention"; 8], "position_embedding_type": "rope", "residual_multiplier": 0.5});
            v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            parse(v)
        };
        let c = g4(json!({})).unwrap();
        assert_eq!((c.intermediate_size, c.layout, c.residual_multiplier), (40, Layout::Granite4, 0.5));
        assert!((0..8).all(|i| c.layer_uses_rope(i)));
        let c = g4(json!({"position_embedding_type": null, "layer_types": vec!["full_attention"; 8]})).unwrap();
        assert!((0..8).all(|i| !c.layer_uses_rope(i)), "null position_embedding_type: no RoPE, as transformers");
        let mut types = vec!["attention"; 8];
        types[3] = "mamba";
        let e = g4(json!({"layer_types": types})).unwrap_err().to_string();
        assert!(e.contains("`layer_types[3]` is \"mamba\"") && e.contains("dense"), "{e}");
        let e = g4(json!({"num_local_experts": 4})).unwrap_err().to_string();
        assert!(e.contains("`num_local_experts` is 4"), "{e}");
        let mut v = json!({"architectures": ["GraniteMoeHybridForCausalLM"], "shared_intermediate_size": 40, "num_local_experts": 0});
        v.as_object_mut().unwrap().extend(json!({"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}).as_object().unwrap().clone());
        let e = ModelConfig::from_json(&v, Path::new("c")).unwrap_err().to_string();
        assert!(e.contains("`layers_block_type[0]`") && e.contains("every layer mamba"), "{e}");
    }
}

#[cfg(test)]
mod moe_tests {
    use super::*;

    fn moe(extra: Value) -> Result<ModelConfig> {
        let mut v = json!({"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
            "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4, "num_experts_per_tok": 2,
            "moe_intermediate_size": 16});
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        ModelConfig::from_json(&v, Path::new("config.json"))
    }

    #[test]
    fn qwen3_moe_sparse_layers_follow_mlp_only_layers_and_decoder_sparse_step() {
        let c = moe(json!({"mlp_only_layers": [0], "decoder_sparse_step": 2, "norm_topk_prob": true})).unwrap();
        assert_eq!((0..4).map(|i| c.layer_is_sparse(i)).collect::<Vec<_>>(), [false, true, false, true]);
        assert!(c.qk_norm);
        let e = c.moe.as_ref().unwrap();
        assert_eq!((e.num_experts, e.top_k, e.aux_loss_coef), (4, 2, 0.0), "no output_router_logits: no aux loss");
        assert!(c.switches().iter().any(|s| s == "MoE: 4 experts of MLP 16, top-2 renormalised (router frozen), dense MLP on layers 0, 2"), "{:?}", c.switches());
        let c = moe(json!({"output_router_logits": true, "router_aux_loss_coef": 0.1, "num_local_experts": 8})).unwrap();
        assert_eq!((c.moe.as_ref().unwrap().num_experts, c.moe.as_ref().unwrap().aux_loss_coef), (8, 0.1));
        let back = ModelConfig::from_json(&c.to_hf_json("float32"), Path::new("x")).unwrap();
        assert_eq!(back.moe, c.moe);
        let e = moe(json!({"num_experts_per_tok": 5})).unwrap_err().to_string();
        assert!(e.contains("`num_experts_per_tok` (5)"), "{e}");
        let e = moe(json!({"mlp_only_layers": [7]})).unwrap_err().to_string();
        assert!(e.contains("`mlp_only_layers` entry 7"), "{e}");
    }
}
