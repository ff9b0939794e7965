//! Adapter configuration and parameters (LoRA, rsLoRA, DoRA) with PEFT's semantics and names.

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, Buf, DType, HostData};
use crate::error::{EngineError, Result};
use crate::config::{Layout, ModelConfig};
use crate::moe::EXPERT_PARAMS;
use crate::model::{Model, Module};
use crate::rng::{Rng, hash_str};

/// Which modules get an adapter and how. Field names equal PEFT's `LoraConfig`; the floats are
/// kept as given (f64, like PEFT's Python floats), so `adapter_config.json` and checkpoints say
/// `0.1` for 0.1. The kernels use them as f32 ([`AdapterConfig::scaling`], the dropout rate).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    /// Module names (`q_proj`, …, `down_proj`); empty or `["all-linear"]` = all seven.
    /// The output head is never adapted.
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub use_dora: bool,
    /// Seed of the adapter initialisation stream.
    pub init_seed: u64,
}

impl Default for AdapterConfig {
    /// The reference's defaults: r 16, alpha 32, dropout 0, all seven modules, seed 3407.
    fn default() -> Self {
        AdapterConfig {
            r: 16,
            lora_alpha: 32.0,
            lora_dropout: 0.0,
            target_modules: Vec::new(),
            use_rslora: false,
            use_dora: false,
            init_seed: 3407,
        }
    }
}

impl AdapterConfig {
    /// The adapted modules of the usual layout (`q_proj` … `down_proj`), validated; a name
    /// of no layout is an error listing the valid ones. Names of fused layouts (`qkv_proj`,
    /// `gate_up_proj`, `input_linear`, `output_linear`) are accepted here and resolved by
    /// [`AdapterConfig::resolve_targets_for`] once the model's layout is known.
    pub fn resolve_targets(&self) -> Result<Vec<Module>> {
        if self.all_linear()? {
            return Ok(Module::ALL.to_vec());
        }
        let layouts = [Layout::Split, Layout::Phi3, Layout::Granite4];
        let mut out = Vec::new();
        for t in self.module_names() {
            let m = layouts.iter().find_map(|&l| Module::from_name_in(l, t)).ok_or_else(|| self.unknown(t, Layout::Split))?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The adapted modules of a model with this layout; a name the layout lacks (e.g.
    /// `q_proj` on Phi-3, whose attention is one `qkv_proj`) is an error listing its names.
    pub fn resolve_targets_for(&self, layout: Layout) -> Result<Vec<Module>> {
        if self.all_linear()? {
            return Ok(Module::present(layout).to_vec());
        }
        let mut out = Vec::new();
        for t in self.module_names() {
            let m = Module::from_name_in(layout, t).ok_or_else(|| self.unknown(t, layout))?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        out.sort();
        Ok(out)
    }

    /// `target_modules` less the 3-D expert parameters ([`EXPERT_PARAMS`]).
    fn module_names(&self) -> impl Iterator<Item = &String> {
        self.target_modules.iter().filter(|t| !EXPERT_PARAMS.contains(&t.as_str()))
    }

    /// The expert parameters named in `target_modules` (indices into [`EXPERT_PARAMS`]): PEFT's
    /// `target_parameters`.
    pub fn expert_targets(&self) -> Vec<usize> {
        (0..EXPERT_PARAMS.len()).filter(|&i| self.target_modules.iter().any(|t| t == EXPERT_PARAMS[i])).collect()
    }

    /// The adapted names of a model of config `c`, as PEFT's `target_modules` and
    /// `target_parameters` say them. On Qwen3-MoE the MLP is named by its 3-D expert parameters
    /// (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`): `gate_proj`/`up_proj`/`down_proj` and
    /// `all-linear` are refused there, since PEFT rewrites them (fused ranks, the router adapted)
    /// into an adapter other than the one named.
    pub fn target_names(&self, c: &ModelConfig) -> Result<(Vec<String>, Vec<String>)> {
        let modules = self.resolve_targets_for(c.layout)?;
        let experts = self.expert_targets();
        if c.moe.is_some() {
            let moe_hint = "on Qwen3MoeForCausalLM name attention modules (q_proj, k_proj, v_proj, o_proj) and the experts' 3-D parameters mlp.experts.gate_up_proj, mlp.experts.down_proj";
            if self.all_linear()? {
                return Err(EngineError::Adapter(format!("`target_modules`: all-linear is not supported here (PEFT's all-linear also adapts the router `mlp.gate` and doubles the rank of the fused gate_up_proj); {moe_hint}")));
            }
            if let Some(m) = modules.iter().find(|m| matches!(m, Module::Gate | Module::Up | Module::Down)) {
                return Err(EngineError::Adapter(format!("`target_modules`: `{}` is not supported (PEFT maps it onto the fused 3-D experts); {moe_hint}", m.name())));
            }
        } else if let Some(&e) = experts.first() {
            return Err(EngineError::Adapter(format!("`target_modules`: `{}` names 3-D expert weights, which only Qwen3MoeForCausalLM has", EXPERT_PARAMS[e])));
        }
        let modules = modules.iter().map(|m| m.name_in(c.layout).to_string()).collect();
        Ok((modules, experts.iter().map(|&e| EXPERT_PARAMS[e].to_string()).collect()))
    }

    fn all_linear(&self) -> Result<bool> {
        if self.module_names().next().is_none() && !self.expert_targets().is_empty() {
            return Ok(false);
        }
        if self.target_modules.is_empty() || self.target_modules.iter().any(|t| t == "all-linear") {
            if self.target_modules.len() > 1 {
                return Err(EngineError::Adapter("`target_modules`: `all-linear` cannot be combined with other names".into()));
            }
            return Ok(true);
        }
        Ok(false)
    }

    fn unknown(&self, t: &str, layout: Layout) -> EngineError {
        let hint = if t == "lm_head" || t == "embed_tokens" { " (the output head and embeddings are never adapted)" } else { "" };
        let of = if layout == Layout::Split { "" } else { " of this model" };
        EngineError::Adapter(format!(
            "`target_modules`: `{t}` is not an adaptable module{of}{hint}; valid: {}, or all-linear",
            Module::present(layout).iter().map(|m| m.name_in(layout)).collect::<Vec<_>>().join(", ")
        ))
    }

    /// `lora_alpha / r`, or `lora_alpha / sqrt(r)` with rsLoRA, in f32 as the kernels use it.
    pub fn scaling(&self) -> f32 {
        let alpha = self.lora_alpha as f32;
        if self.use_rslora { alpha / (self.r as f32).sqrt() } else { alpha / self.r as f32 }
    }

    /// The dropout rate as the kernels use it.
    pub fn dropout_f32(&self) -> f32 {
        self.lora_dropout as f32
    }

    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(EngineError::Adapter("`r` must be at least 1".into()));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(EngineError::Adapter(format!("`lora_dropout` {} must be in [0, 1)", self.lora_dropout)));
        }
        if self.use_dora && !self.expert_targets().is_empty() {
            return Err(EngineError::Adapter("`use_dora` is not supported with expert parameters in `target_modules` (PEFT's target_parameters are plain LoRA)".into()));
        }
        if self.lora_dropout > 0.0 && !self.expert_targets().is_empty() {
            return Err(EngineError::Adapter(format!(
                "`lora_dropout` {} is not supported with expert parameters in `target_modules` (PEFT's target_parameters refuses dropout too); use 0",
                self.lora_dropout
            )));
        }
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return Err(EngineError::Adapter(format!("`lora_alpha` {} must be positive", self.lora_alpha)));
        }
        self.resolve_targets().map(|_| ())
    }
}

/// One trainable tensor with its gradient and AdamW moments (all f32 on the device).
pub struct Param {
    /// PEFT state-dict key, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub value: Buf,
    pub grad: Buf,
    pub m: Buf,
    pub v: Buf,
    /// Where this tensor lies in a larger PEFT tensor (one expert's part of a 3-D parameter's
    /// adapter); `name` then is the part's own (`<PEFT key>#<expert>`).
    pub pack: Option<Pack>,
}

/// One expert's share of a PEFT `ParamWrapper` adapter tensor ([`crate::moe`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Pack {
    /// The PEFT key and shape of the whole tensor.
    pub key: String,
    pub shape: Vec<usize>,
    pub expert: usize,
    pub experts: usize,
    /// `lora_A [E*r, in]`: the part is rows `expert*r..`; else `lora_B [out, r*E]`: the part's
    /// `[o, j]` is column `j*E + expert`.
    pub rows: bool,
}

impl Pack {
    /// The index in the whole tensor of the part's element `i` (the part is `[a, b]`).
    pub fn index(&self, i: usize, part_shape: &[usize]) -> usize {
        let (a, b) = (part_shape[0], part_shape[1]);
        if self.rows {
            self.expert * a * b + i
        } else {
            let (o, j) = (i / b, i % b);
            o * b * self.experts + j * self.experts + self.expert
        }
    }
}

impl Param {
    fn new(be: &dyn Backend, name: String, shape: Vec<usize>, init: &[f32]) -> Result<Self> {
        let n = shape.iter().product();
        Ok(Param {
            name,
            shape,
            value: be.upload(HostData::F32(init), DType::F32)?,
            grad: be.zeros(n, DType::F32)?,
            m: be.zeros(n, DType::F32)?,
            v: be.zeros(n, DType::F32)?,
            pack: None,
        })
    }
}

/// The adapter of one linear module: `A [r, in]`, `B [out, r]`, DoRA magnitude `[out]`.
pub struct Lora {
    pub a: Param,
    pub b: Param,
    pub mag: Option<Param>,
    pub out_f: usize,
    pub in_f: usize,
}

impl Lora {
    pub fn params(&self) -> impl Iterator<Item = &Param> {
        [Some(&self.a), Some(&self.b), self.mag.as_ref()].into_iter().flatten()
    }
    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        [Some(&mut self.a), Some(&mut self.b), self.mag.as_mut()].into_iter().flatten()
    }
}

/// The PEFT key prefix of a module: `base_model.model.model.layers.{i}.self_attn.q_proj`.
pub fn peft_prefix(layer: usize, m: Module, layout: Layout) -> String {
    format!("base_model.model.model.layers.{layer}.{}", m.path_in(layout))
}

/// All adapters of a model: `slots[layer][module]`.
pub struct Adapters {
    pub cfg: AdapterConfig,
    pub scale: f32,
    pub slots: Vec<Vec<Option<Lora>>>,
}

impl Adapters {
    /// Initialises adapters as PEFT does: A Kaiming-uniform (a = √5, i.e. U(±1/√in)) from
    /// the seeded stream, B zeros, DoRA magnitude = row norms of the base weight.
    pub fn init(model: &Model, cfg: &AdapterConfig) -> Result<Self> {
        cfg.validate()?;
        let layout = model.cfg.layout;
        cfg.target_names(&model.cfg)?;
        let targets = cfg.resolve_targets_for(layout)?;
        let expert_targets = cfg.expert_targets();
        let be = model.backend.as_ref();
        let scale = cfg.scaling();
        let r = cfg.r;
        let mut slots = Vec::with_capacity(model.layers.len());
        for (li, layer) in model.layers.iter().enumerate() {
            let mut row = Vec::with_capacity(7);
            for m in Module::ALL {
                // A Qwen3-MoE sparse layer has no dense MLP modules.
                if !targets.contains(&m) || layer.linears[m as usize].is_none() {
                    row.push(None);
                    continue;
                }
                let lin = layer.lin(m)?;
                let (out_f, in_f) = (lin.out_f, lin.in_f);
                let prefix = peft_prefix(li, m, layout);
                let a_name = format!("{prefix}.lora_A.weight");
                let mut rng = Rng::new(cfg.init_seed ^ hash_str(&a_name));
                let bound = 1.0 / (in_f as f32).sqrt();
                let a_init: Vec<f32> = (0..r * in_f).map(|_| bound * (2.0 * rng.uniform() - 1.0)).collect();
                let a = Param::new(be, a_name, vec![r, in_f], &a_init)?;
                let b = Param::new(be, format!("{prefix}.lora_B.weight"), vec![out_f, r], &vec![0.0; out_f * r])?;
                let mag = if cfg.use_dora {
                    let mut p = Param::new(be, format!("{prefix}.lora_magnitude_vector"), vec![out_f], &vec![0.0; out_f])?;
                    let w = model.weight(lin)?;
                    be.dora_weight_norm(&w, &a.value, &b.value, scale, &mut p.value, out_f, in_f, r)?;
                    Some(p)
                } else {
                    None
                };
                row.push(Some(Lora { a, b, mag, out_f, in_f }));
            }
            if let Some(ex) = &layer.experts {
                let n = ex.gate_up.len();
                let both = expert_targets.len() == 2;
                for e in 0..n {
                    for which in 0..2 {
                        let lin = if which == crate::moe::GATE_UP { &ex.gate_up[e] } else { &ex.down[e] };
                        if !expert_targets.contains(&which) {
                            row.push(None);
                            continue;
                        }
                        // PEFT nests the two wrappers: gate_up_proj's is the inner (`base_layer`).
                        let inner = if both && which == crate::moe::GATE_UP { "base_layer." } else { "" };
                        let prefix = format!("base_model.model.model.layers.{li}.mlp.experts.{inner}");
                        let (out_f, in_f) = (lin.out_f, lin.in_f);
                        let a_key = format!("{prefix}lora_A.weight");
                        let mut rng = Rng::new(cfg.init_seed ^ hash_str(&a_key) ^ (e as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                        let bound = 1.0 / (in_f as f32).sqrt();
                        let a_init: Vec<f32> = (0..r * in_f).map(|_| bound * (2.0 * rng.uniform() - 1.0)).collect();
                        let mut a = Param::new(be, format!("{a_key}#{e}"), vec![r, in_f], &a_init)?;
                        a.pack = Some(Pack { key: a_key, shape: vec![n * r, in_f], expert: e, experts: n, rows: true });
                        let b_key = format!("{prefix}lora_B.weight");
                        let mut b = Param::new(be, format!("{b_key}#{e}"), vec![out_f, r], &vec![0.0; out_f * r])?;
                        b.pack = Some(Pack { key: b_key, shape: vec![out_f, r * n], expert: e, experts: n, rows: false });
                        row.push(Some(Lora { a, b, mag: None, out_f, in_f }));
                    }
                }
            }
            slots.push(row);
        }
        Ok(Adapters { cfg: cfg.clone(), scale, slots })
    }

    pub fn params(&self) -> impl Iterator<Item = &Param> {
        self.slots.iter().flatten().flatten().flat_map(|l| l.params())
    }

    pub fn params_mut(&mut self) -> impl Iterator<Item = &mut Param> {
        self.slots.iter_mut().flatten().flatten().flat_map(|l| l.params_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fused_layouts_take_their_own_module_names_and_refuse_the_split_ones() {
        let cfg = |t: &[&str]| AdapterConfig { target_modules: t.iter().map(|s| s.to_string()).collect(), ..AdapterConfig::default() };
        assert_eq!(cfg(&["qkv_proj", "gate_up_proj"]).resolve_targets_for(Layout::Phi3).unwrap(), [Module::Q, Module::Gate]);
        assert_eq!(cfg(&[]).resolve_targets_for(Layout::Phi3).unwrap(), [Module::Q, Module::O, Module::Gate, Module::Down]);
        let e = cfg(&["q_proj"]).resolve_targets_for(Layout::Phi3).unwrap_err().to_string();
        assert!(e.contains("`q_proj` is not an adaptable module of this model") && e.contains("qkv_proj, o_proj, gate_up_proj, down_proj"), "{e}");
        let e = cfg(&["up_proj"]).resolve_targets_for(Layout::Granite4).unwrap_err().to_string();
        assert!(e.contains("input_linear, output_linear"), "{e}");
        assert!(cfg(&["qkv_proj"]).validate().is_ok(), "fused names pass before the model is known");
        assert!(cfg(&["qkv_proj"]).resolve_targets_for(Layout::Split).is_err());
    }
}
