//! The trainer: batches in, adapter gradients, AdamW steps, checkpointable state out.

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::adapter::{AdapterConfig, Adapters, Param};
use crate::collective::Collective;
use crate::backend::{AdamW, Attn, Backend, Buf, CrossEntropy, DType, Gemm, HostData, IGNORE_TARGET, splitmix64};
use crate::error::{EngineError, Result};
use crate::layer::{self, Ctx, LayerActs};
use crate::config::ModelConfig;
use crate::model::Model;

/// A flat stream of documents. `train_mask[i]` (unshifted) means token `i` is a prediction
/// target, predicted from position `i-1` of the same document; the first token of a document is
/// never a target. Positions restart at 0 per document and documents never attend to each other.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    pub train_mask: Vec<bool>,
    /// Document lengths, in stream order; they sum to `input_ids.len()`.
    pub seq_lens: Vec<u32>,
}

/// What one forward/backward saw.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepStats {
    /// Cross-entropy summed over this batch's targets (not normalised).
    pub loss_sum: f64,
    pub trained_tokens: usize,
    pub tokens: usize,
    /// Qwen3-MoE with `output_router_logits`: the router load-balancing loss of this batch
    /// (transformers' `aux_loss`). It enters the objective as `router_aux_loss_coef * aux *
    /// trained_tokens / loss_denominator` (for one micro-batch per step: `coef * aux`, as
    /// transformers adds it); 0 otherwise.
    pub aux_loss: f64,
}

/// AdamW and clipping settings (torch / transformers defaults in `Default`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct OptimConfig {
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; `0` disables clipping.
    pub max_grad_norm: f64,
    pub betas: (f64, f64),
    pub eps: f64,
}

impl Default for OptimConfig {
    /// The reference's defaults: weight decay 0.01, max grad norm 0.3, betas (0.9, 0.999), eps 1e-8.
    fn default() -> Self {
        OptimConfig { weight_decay: 0.01, max_grad_norm: 0.3, betas: (0.9, 0.999), eps: 1e-8 }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptimStats {
    /// Global L2 norm of the accumulated gradients, before clipping.
    pub grad_norm: f64,
    /// The factor the gradients were multiplied by (1 when not clipped).
    pub clip_coef: f64,
    /// Optimizer steps taken so far (after this one).
    pub step: u64,
}

/// Checkpointable trainer state: named f32 tensors (adapter values, `.exp_avg`, `.exp_avg_sq`)
/// plus a small JSON object (step, micro-batch counter, dropout seed, adapter config).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainerState {
    pub tensors: Vec<NamedTensor>,
    pub meta: serde_json::Value,
}

/// A named f32 host tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// The trainer. Memory policy: `recompute = true` keeps only each layer's input between forward
/// and backward and recomputes the layer (one extra forward); `false` keeps every activation.
pub struct Trainer {
    pub model: Model,
    pub adapters: Adapters,
    pub optim: OptimConfig,
    step: u64,
    micro: u64,
    /// `micro` when this optimizer step began (data parallel re-bases the counter per step).
    micro_base: u64,
    dropout_seed: u64,
    /// Data parallel: this trainer's rank and the number of ranks (0 and 1 otherwise).
    rank: u64,
    world: u64,
    pub recompute: bool,
}

/// A batch prepared for the device.
struct Prepared {
    t: usize,
    attn: Attn,
    ids: Buf,
    targets: Buf,
    pos: Buf,
    cu: Buf,
    inv_freq: Buf,
    inv_freq_local: Option<Buf>,
    trained: usize,
}

/// [`Trainer::activation_bytes`] from the model's config alone (without the dequantization
/// buffers of quantized weights): what `--dry-run` plans with before any weight is loaded.
pub fn activation_bytes(c: &ModelConfig, cfg: &AdapterConfig, tokens: usize, recompute: bool, dtype: DType) -> u64 {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let (q, kv) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
    let targets = cfg.resolve_targets_for(c.layout).unwrap_or_default();
    let lora: usize = targets
        .iter()
        .map(|m| cfg.r + if cfg.use_dora { m.dims(c).0 } else { 0 })
        .sum();
    let qk_norm = if c.qk_norm { q + kv + 2 * c.num_attention_heads } else { 0 };
    // Per token, one layer's saved activations (floats).
    // Gemma 3 keeps the attention and MLP outputs before their norms, and those norms' rstd.
    let sandwich = if c.gemma_norms { 2 * h + 2 } else { 0 };
    let layer = 3 * h + 2 * q + 2 * kv + c.num_attention_heads + 2 + 3 * i + lora + qk_norm + sandwich;
    let layers = c.num_hidden_layers;
    // A Qwen3-MoE sparse layer keeps, for each of its top-k experts per token, the gathered
    // input and output, gate/up/hidden and the two adapters' x·Aᵀ, plus the router's row,
    // instead of the dense MLP's gate/up/hidden.
    let sparse = (0..layers).filter(|&l| c.layer_is_sparse(l)).count();
    let sparse_layer = c.moe.as_ref().map_or(layer, |m| layer - 3 * i + m.num_experts + m.top_k * (2 * h + 3 * m.moe_intermediate_size + 2 * cfg.r));
    let biggest = layer.max(if sparse > 0 { sparse_layer } else { 0 });
    let kept = (layers - sparse) * layer + sparse * sparse_layer;
    // Kept between forward and backward, plus backward workspace (a layer's gradients and
    // the loss chunk, counted as two layers' activations) and the residual-stream gradients.
    let per_token = if recompute {
        layers * h + 3 * biggest + 3 * h
    } else {
        kept + layers * h + 2 * biggest + 3 * h
    };
    (per_token * tokens) as u64 * dtype.size() as u64
}

impl Trainer {
    /// Adapters initialised from `adapter.init_seed`; dropout masks from `seed`.
    pub fn new(model: Model, adapter: AdapterConfig, optim: OptimConfig, seed: u64) -> Result<Self> {
        if !(optim.betas.0 >= 0.0 && optim.betas.0 < 1.0 && optim.betas.1 >= 0.0 && optim.betas.1 < 1.0) {
            return Err(EngineError::Optim(format!("betas {:?} must be in [0, 1)", optim.betas)));
        }
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let non_negative = |x: f64| x.is_finite() && x >= 0.0;
        if !positive(optim.eps) || !non_negative(optim.weight_decay) || !non_negative(optim.max_grad_norm) {
            return Err(EngineError::Optim("eps must be positive; weight_decay and max_grad_norm non-negative".into()));
        }
        let adapters = Adapters::init(&model, &adapter)?;
        Ok(Trainer {
            model,
            adapters,
            optim,
            step: 0,
            micro: 0,
            micro_base: 0,
            dropout_seed: splitmix64(seed ^ 0x6472_6f70),
            rank: 0,
            world: 1,
            recompute: false,
        })
    }

    /// Estimated peak bytes a forward + backward of a micro-batch of `tokens` tokens allocates
    /// beyond the weights, adapters and optimizer state, with or without `recompute`. Counted
    /// from the buffers each layer keeps for its backward (normed inputs, q/k/v, attention output
    /// and log-sum-exp, the MLP's gate/up/hidden, LoRA's `x·Aᵀ` and DoRA's combined output), the
    /// layer inputs, backward workspace, and with quantized weights the buffers they are
    /// dequantized into. Slightly above the measured peak on CPU
    /// (`lora bench --shape smollm2-135m --rows 4 --seq-len 512`: 2.10 GiB estimated, 2.07 GiB
    /// measured; with `--recompute` 336 vs 315 MiB).
    pub fn activation_bytes(&self, tokens: usize, recompute: bool) -> u64 {
        activation_bytes(&self.model.cfg, &self.adapters.cfg, tokens, recompute, self.model.backend.activation_dtype())
            + self.model.dequant_scratch_bytes()
    }

    fn be(&self) -> &dyn Backend {
        self.model.backend.as_ref()
    }

    /// Optimizer steps taken.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// Makes this trainer rank `rank` of `world` data-parallel ranks: its micro-batches draw
    /// dropout masks no other rank draws (micro-batch `m` of rank `r` uses stream `m·world + r`,
    /// which for one rank is the stream of an ordinary run), and its state records `world`.
    pub fn set_data_parallel(&mut self, rank: usize, world: usize) -> Result<()> {
        if world == 0 || rank >= world {
            return Err(EngineError::Collective(format!("rank {rank} of a world of {world}")));
        }
        (self.rank, self.world) = (rank as u64, world as u64);
        Ok(())
    }

    /// Data parallel, once per optimizer step, after this rank's micro-batches and before
    /// [`Trainer::optimizer_step`]: sums the accumulated adapter gradients and the step's
    /// statistics over the ranks of `c`, so that every rank takes the same optimizer step; the
    /// returned stats are the whole step's. The dropout counter moves past every rank's
    /// micro-batches, so it is the same on every rank and a checkpoint of rank 0 resumes any
    /// rank. With one rank nothing is communicated or copied.
    ///
    /// The loss of each micro-batch was already divided by the step's trained tokens over all
    /// ranks (the data plan's count, which every rank computes alike); the reduced count is
    /// checked against `step_trained_tokens`, so ranks that planned differently stop here
    /// instead of training on a wrong normaliser.
    pub fn all_reduce_step(&mut self, c: &dyn Collective, local: StepStats, step_trained_tokens: u64) -> Result<StepStats> {
        if c.world() as u64 != self.world || c.rank() as u64 != self.rank {
            return Err(EngineError::Collective(format!(
                "the trainer is rank {} of {}, the collective rank {} of {}",
                self.rank,
                self.world,
                c.rank(),
                c.world()
            )));
        }
        if self.world == 1 {
            return Ok(local);
        }
        let mut stats = [local.loss_sum, local.trained_tokens as f64, local.tokens as f64, (self.micro - self.micro_base) as f64];
        c.all_reduce_sum_f64(&mut stats)?;
        if stats[1] as u64 != step_trained_tokens {
            return Err(EngineError::Collective(format!(
                "the ranks trained {} tokens in optimizer step {}, their data plan says {step_trained_tokens}: the ranks do not share one data plan (same dataset, parameters and world size?)",
                stats[1] as u64,
                self.step + 1
            )));
        }
        let be = self.model.backend.clone();
        let mut flat = Vec::new();
        for p in self.adapters.params() {
            flat.extend(be.download_f32(&p.grad)?);
        }
        c.all_reduce_sum_f32(&mut flat)?;
        let mut at = 0;
        for p in self.adapters.params_mut() {
            let n: usize = p.shape.iter().product();
            p.grad = be.upload(HostData::F32(&flat[at..at + n]), DType::F32)?;
            at += n;
        }
        self.micro = self.micro_base + stats[3] as u64;
        Ok(StepStats { loss_sum: stats[0], trained_tokens: stats[1] as usize, tokens: stats[2] as usize, aux_loss: local.aux_loss })
    }

    fn prepare(&self, b: &Batch) -> Result<Prepared> {
        let c = &self.model.cfg;
        let t = b.input_ids.len();
        if t == 0 {
            return Err(EngineError::Batch("the batch has no tokens".into()));
        }
        if b.train_mask.len() != t {
            return Err(EngineError::Batch(format!("train_mask has {} entries for {t} tokens", b.train_mask.len())));
        }
        let total: u64 = b.seq_lens.iter().map(|&l| l as u64).sum();
        if total != t as u64 || b.seq_lens.contains(&0) {
            return Err(EngineError::Batch(format!("seq_lens (sum {total}) must be positive and sum to the {t} tokens")));
        }
        if let Some(p) = b.input_ids.iter().position(|&i| i as usize >= c.vocab_size) {
            return Err(EngineError::Batch(format!("token id {} at position {p} is outside the vocabulary of {}", b.input_ids[p], c.vocab_size)));
        }
        let max_len = *b.seq_lens.iter().max().unwrap_or(&0) as usize;
        let mut cu = vec![0u32];
        let mut pos = Vec::with_capacity(t);
        let mut targets = vec![IGNORE_TARGET; t];
        let mut trained = 0;
        for &l in &b.seq_lens {
            let s = *cu.last().unwrap_or(&0) as usize;
            for j in 0..l as usize {
                pos.push(j as u32);
                if j > 0 && b.train_mask[s + j] {
                    targets[s + j - 1] = b.input_ids[s + j];
                    trained += 1;
                }
            }
            cu.push((s + l as usize) as u32);
        }
        let be = self.be();
        let inv = c.rope_inv_freq(max_len.saturating_sub(1));
        Ok(Prepared {
            t,
            attn: Attn {
                tokens: t,
                n_docs: b.seq_lens.len(),
                max_seqlen: max_len,
                n_heads: c.num_attention_heads,
                n_kv_heads: c.num_key_value_heads,
                head_dim: c.head_dim,
                scale: c.attention_scale,
                // Set per layer (ModelConfig::layer_window).
                window: 0,
            },
            ids: be.upload(HostData::U32(&b.input_ids), DType::U32)?,
            targets: be.upload(HostData::U32(&targets), DType::U32)?,
            pos: be.upload(HostData::U32(&pos), DType::U32)?,
            cu: be.upload(HostData::U32(&cu), DType::U32)?,
            inv_freq: be.upload(HostData::F32(&inv), DType::F32)?,
            inv_freq_local: c.rope_local_inv_freq().map(|f| be.upload(HostData::F32(&f), DType::F32)).transpose()?,
            trained,
        })
    }

    fn ctx<'a>(&'a self, p: Prepared, train: bool) -> (Ctx<'a>, Buf, Buf, usize) {
        let ctx = Ctx {
            be: self.model.backend.as_ref(),
            cfg: &self.model.cfg,
            model: &self.model,
            t: p.t,
            attn: p.attn,
            pos: p.pos,
            cu: p.cu,
            inv_freq: p.inv_freq,
            inv_freq_local: p.inv_freq_local,
            dropout: if train { self.adapters.cfg.dropout_f32() } else { 0.0 },
            seed_base: splitmix64(self.dropout_seed ^ (self.micro * self.world + self.rank)),
            scale: self.adapters.scale,
            act: self.model.backend.activation_dtype(),
            moe: Default::default(),
        };
        (ctx, p.ids, p.targets, p.trained)
    }

    fn embed(&self, ctx: &Ctx, ids: &Buf) -> Result<Buf> {
        let c = &self.model.cfg;
        let mut x = ctx.be.alloc(ctx.t * c.hidden_size, ctx.act)?;
        ctx.be.embedding(ids, &self.model.embed, &mut x, ctx.t, c.hidden_size, c.embedding_multiplier)?;
        Ok(x)
    }

    /// Final hidden states `[t, d]` after the last norm, and what their backward needs.
    fn final_norm(&self, ctx: &Ctx, x: &Buf) -> Result<(Buf, Buf)> {
        let c = &self.model.cfg;
        let mut y = ctx.be.alloc(ctx.t * c.hidden_size, ctx.act)?;
        let mut rstd = ctx.be.alloc(ctx.t, DType::F32)?;
        ctx.be.rmsnorm_fwd(x, &self.model.norm, &mut y, &mut rstd, ctx.t, c.hidden_size, c.rms_norm_eps as f32)?;
        Ok((y, rstd))
    }

    fn ce(&self, t: usize, grad_scale: f32) -> CrossEntropy {
        let c = &self.model.cfg;
        CrossEntropy { tokens: t, dim: c.hidden_size, vocab: c.vocab_size, logit_scale: 1.0 / c.logits_scaling, grad_scale }
    }

    /// Forward and backward of one micro-batch; adapter gradients are ADDED to what earlier
    /// micro-batches of the same optimizer step left. The loss is normalised by
    /// `loss_denominator`: the trained-token count of the whole optimizer step.
    pub fn forward_backward(&mut self, batch: &Batch, loss_denominator: f32) -> Result<StepStats> {
        if !loss_denominator.is_finite() || loss_denominator <= 0.0 {
            return Err(EngineError::Batch(format!("loss_denominator {loss_denominator} must be positive (trained tokens of the step)")));
        }
        let p = self.prepare(batch)?;
        let result = {
            let mut adapters = std::mem::take(&mut self.adapters.slots);
            let r = self.fwd_bwd_inner(p, loss_denominator, &mut adapters);
            self.adapters.slots = adapters;
            r
        };
        self.micro += 1;
        result
    }

    fn fwd_bwd_inner(&self, p: Prepared, denom: f32, slots: &mut [Vec<Option<crate::adapter::Lora>>]) -> Result<StepStats> {
        let (ctx, ids, targets, trained) = self.ctx(p, true);
        let be = ctx.be;
        let c = &self.model.cfg;
        let t = ctx.t;
        let mut x = self.embed(&ctx, &ids)?;
        let mut inputs: Vec<Buf> = Vec::with_capacity(c.num_hidden_layers);
        let mut saved: Vec<Option<LayerActs>> = Vec::with_capacity(c.num_hidden_layers);
        for (li, layer) in self.model.layers.iter().enumerate() {
            let (out, acts) = layer::forward(&ctx, layer, li, &slots[li], &x)?;
            saved.push(if self.recompute { None } else { Some(acts) });
            inputs.push(std::mem::replace(&mut x, out));
        }
        let coef = c.moe.as_ref().map_or(0.0, |m| m.aux_loss_coef);
        let aux_loss = if coef > 0.0 { ctx.moe.aux_loss() } else { 0.0 };
        ctx.moe.set_grad_weight(coef * trained as f64 / denom as f64);
        let (xf, rstd_f) = self.final_norm(&ctx, &x)?;
        let mut dxf = be.alloc(t * c.hidden_size, ctx.act)?;
        let loss_sum = be.linear_cross_entropy(self.ce(t, 1.0 / denom), &xf, self.model.head(), &targets, Some(&mut dxf))?;
        drop(xf);
        if trained > 0 {
            let mut dres = be.alloc(t * c.hidden_size, ctx.act)?;
            be.rmsnorm_bwd(&dxf, &x, &self.model.norm, &rstd_f, &mut dres, t, c.hidden_size, false)?;
            drop(dxf);
            for li in (0..self.model.layers.len()).rev() {
                let layer = &self.model.layers[li];
                let acts = match saved.pop().flatten() {
                    Some(a) => a,
                    None => layer::forward(&ctx, layer, li, &slots[li], &inputs[li])?.1,
                };
                layer::backward(&ctx, layer, li, &mut slots[li], &inputs[li], &acts, &mut dres)?;
            }
        }
        Ok(StepStats { loss_sum, trained_tokens: trained, tokens: t, aux_loss })
    }

    /// Loss summed over the batch's targets and the number of targets; no dropout, no gradients.
    pub fn eval_loss(&self, batch: &Batch) -> Result<(f64, usize)> {
        let p = self.prepare(batch)?;
        let (ctx, ids, targets, trained) = self.ctx(p, false);
        let xf = self.last_hidden(&ctx, &ids)?;
        let loss = ctx.be.linear_cross_entropy(self.ce(ctx.t, 1.0), &xf, self.model.head(), &targets, None)?;
        Ok((loss, trained))
    }

    fn last_hidden(&self, ctx: &Ctx, ids: &Buf) -> Result<Buf> {
        let mut x = self.embed(ctx, ids)?;
        for (li, layer) in self.model.layers.iter().enumerate() {
            x = layer::forward(ctx, layer, li, &self.adapters.slots[li], &x)?.0;
        }
        Ok(self.final_norm(ctx, &x)?.0)
    }

    /// Full logits `[t, vocab]` of a batch (eval mode). For tests and small batches only.
    pub fn logits(&self, batch: &Batch) -> Result<Vec<f32>> {
        let p = self.prepare(batch)?;
        let (ctx, ids, _, _) = self.ctx(p, false);
        let xf = self.last_hidden(&ctx, &ids)?;
        let c = &self.model.cfg;
        let mut lg = ctx.be.alloc(ctx.t * c.vocab_size, DType::F32)?;
        let g = Gemm { alpha: 1.0 / c.logits_scaling, ..Gemm::linear(ctx.t, c.vocab_size, c.hidden_size) };
        ctx.be.gemm(g, &xf, self.model.head(), &mut lg)?;
        ctx.be.download_f32(&lg)
    }

    /// Clips the accumulated gradients by global norm, applies AdamW with learning rate `lr`,
    /// and zeroes the gradients.
    pub fn optimizer_step(&mut self, lr: f64) -> Result<OptimStats> {
        // The update runs in f32: a rate finite in f64 but not in f32 (1e300) would turn every
        // adapter value into inf/NaN.
        if !lr.is_finite() || lr < 0.0 || !(lr as f32).is_finite() {
            return Err(EngineError::Optim(format!("learning rate {lr:e} must be non-negative and finite in f32 (at most {:e})", f32::MAX)));
        }
        let be = self.model.backend.clone();
        let grads: Vec<&Buf> = self.adapters.params().map(|p| &p.grad).collect();
        let grad_norm = be.sum_squares(&grads)?.sqrt();
        if !grad_norm.is_finite() {
            return Err(EngineError::Optim(format!(
                "the gradient norm is {grad_norm} at step {}: the loss diverged (try a lower learning rate)",
                self.step + 1
            )));
        }
        let clip_coef = if self.optim.max_grad_norm > 0.0 { (self.optim.max_grad_norm / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        self.step += 1;
        let o = AdamW {
            lr: lr as f32,
            beta1: self.optim.betas.0 as f32,
            beta2: self.optim.betas.1 as f32,
            eps: self.optim.eps as f32,
            weight_decay: self.optim.weight_decay as f32,
            step: self.step,
            grad_scale: clip_coef as f32,
        };
        for p in self.adapters.params_mut() {
            be.adamw(o, &mut p.value, &p.grad, &mut p.m, &mut p.v)?;
            be.fill(&mut p.grad, 0.0)?;
        }
        self.micro_base = self.micro;
        Ok(OptimStats { grad_norm, clip_coef, step: self.step })
    }

    /// Discards accumulated gradients.
    pub fn zero_grad(&mut self) -> Result<()> {
        let be = self.model.backend.clone();
        for p in self.adapters.params_mut() {
            be.fill(&mut p.grad, 0.0)?;
        }
        Ok(())
    }

    fn download(&self, f: impl Fn(&Param) -> &Buf, suffix: &str) -> Result<Vec<NamedTensor>> {
        self.adapters
            .params()
            .map(|p| Ok(NamedTensor { name: format!("{}{suffix}", p.name), shape: p.shape.clone(), data: self.be().download_f32(f(p))? }))
            .collect()
    }

    /// [`Trainer::download`] with the experts' parts packed into PEFT's tensors (in the order
    /// each tensor's first part comes).
    fn download_packed(&self, f: impl Fn(&Param) -> &Buf) -> Result<Vec<NamedTensor>> {
        let mut out: Vec<NamedTensor> = Vec::new();
        for p in self.adapters.params() {
            let data = self.be().download_f32(f(p))?;
            let Some(pk) = &p.pack else {
                out.push(NamedTensor { name: p.name.clone(), shape: p.shape.clone(), data });
                continue;
            };
            let at = match out.iter().position(|t| t.name == pk.key) {
                Some(i) => i,
                None => {
                    out.push(NamedTensor { name: pk.key.clone(), shape: pk.shape.clone(), data: vec![0.0; pk.shape.iter().product()] });
                    out.len() - 1
                }
            };
            for (i, v) in data.into_iter().enumerate() {
                out[at].data[pk.index(i, &p.shape)] = v;
            }
        }
        Ok(out)
    }

    /// Adapter tensors under their PEFT keys.
    pub fn adapter_tensors(&self) -> Result<Vec<NamedTensor>> {
        self.download_packed(|p| &p.value)
    }

    /// Accumulated adapter gradients under their PEFT keys.
    pub fn adapter_grads(&self) -> Result<Vec<NamedTensor>> {
        self.download_packed(|p| &p.grad)
    }

    /// Replaces adapter values by PEFT key (every given name must exist with the same size).
    pub fn set_adapter_tensors(&mut self, tensors: &[NamedTensor]) -> Result<()> {
        let be = self.model.backend.clone();
        for t in tensors {
            // A packed PEFT tensor (the experts' adapters) sets each expert's part.
            let parts: Vec<&mut Param> = self.adapters.params_mut().filter(|p| p.pack.as_ref().is_some_and(|pk| pk.key == t.name)).collect();
            if !parts.is_empty() {
                for p in parts {
                    let pk = p.pack.as_ref().ok_or_else(|| EngineError::State { name: t.name.clone(), msg: "pack lost (internal error)".into() })?;
                    if pk.shape != t.shape || t.data.len() != pk.shape.iter().product::<usize>() {
                        return Err(EngineError::State { name: t.name.clone(), msg: format!("shape {:?}, expected {:?}", t.shape, pk.shape) });
                    }
                    let n: usize = p.shape.iter().product();
                    let part: Vec<f32> = (0..n).map(|i| t.data[pk.index(i, &p.shape)]).collect();
                    p.value = be.upload(HostData::F32(&part), DType::F32)?;
                }
                continue;
            }
            let p = self
                .adapters
                .params_mut()
                .find(|p| p.name == t.name && p.pack.is_none())
                .ok_or_else(|| EngineError::State { name: t.name.clone(), msg: "no such adapter tensor".into() })?;
            if p.shape != t.shape {
                return Err(EngineError::State { name: t.name.clone(), msg: format!("shape {:?}, expected {:?}", t.shape, p.shape) });
            }
            p.value = be.upload(HostData::F32(&t.data), DType::F32)?;
        }
        Ok(())
    }

    /// Everything needed to resume bit-identically.
    pub fn save_state(&self) -> Result<TrainerState> {
        let mut tensors = self.download(|p| &p.value, "")?;
        tensors.extend(self.download(|p| &p.m, ".exp_avg")?);
        tensors.extend(self.download(|p| &p.v, ".exp_avg_sq")?);
        let mut meta = json!({
            "format": "lora-engine-trainer-state/1",
            "step": self.step,
            "micro": self.micro,
            "dropout_seed": self.dropout_seed.to_string(),
            "adapter": self.adapters.cfg,
            "optim": self.optim,
        });
        // Only data-parallel states say so: a one-rank state stays what it always was.
        if self.world > 1 {
            meta["world_size"] = json!(self.world);
        }
        Ok(TrainerState { tensors, meta })
    }

    /// Restores a state written by [`Trainer::save_state`] with the same adapter config.
    pub fn load_state(&mut self, s: &TrainerState) -> Result<()> {
        let bad = |name: &str, msg: String| EngineError::State { name: name.to_string(), msg };
        let m = &s.meta;
        if m.get("format").and_then(|v| v.as_str()) != Some("lora-engine-trainer-state/1") {
            return Err(bad("meta.format", "not a lora-engine trainer state".into()));
        }
        let cfg: AdapterConfig = serde_json::from_value(m["adapter"].clone()).map_err(|e| bad("meta.adapter", e.to_string()))?;
        if cfg != self.adapters.cfg {
            return Err(bad("meta.adapter", format!("saved with {cfg:?}, this run uses {:?}", self.adapters.cfg)));
        }
        let step = m["step"].as_u64().ok_or_else(|| bad("meta.step", "missing".into()))?;
        let micro = m["micro"].as_u64().ok_or_else(|| bad("meta.micro", "missing".into()))?;
        // States from before data parallel have no `world_size`: they are of one rank.
        let world = m.get("world_size").map_or(Some(1), |v| v.as_u64()).ok_or_else(|| bad("meta.world_size", "not a number".into()))?;
        if world != self.world {
            return Err(bad(
                "meta.world_size",
                format!("saved by a run of {world} data-parallel rank(s), this run has {}: resume with the same number of ranks", self.world),
            ));
        }
        let seed: u64 = m["dropout_seed"].as_str().and_then(|s| s.parse().ok()).ok_or_else(|| bad("meta.dropout_seed", "missing".into()))?;
        let be = self.model.backend.clone();
        let find = |name: &str, shape: &[usize]| -> Result<&NamedTensor> {
            let t = s.tensors.iter().find(|t| t.name == name).ok_or_else(|| bad(name, "missing from the saved state".into()))?;
            if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
                return Err(bad(name, format!("shape {:?}, expected {shape:?}", t.shape)));
            }
            Ok(t)
        };
        let mut staged = Vec::new();
        for p in self.adapters.params() {
            let v = find(&p.name, &p.shape)?;
            let m1 = find(&format!("{}.exp_avg", p.name), &p.shape)?;
            let m2 = find(&format!("{}.exp_avg_sq", p.name), &p.shape)?;
            staged.push((be.upload(HostData::F32(&v.data), DType::F32)?, be.upload(HostData::F32(&m1.data), DType::F32)?, be.upload(HostData::F32(&m2.data), DType::F32)?));
        }
        for (p, (v, m1, m2)) in self.adapters.params_mut().zip(staged) {
            p.value = v;
            p.m = m1;
            p.v = m2;
            be.fill(&mut p.grad, 0.0)?;
        }
        self.step = step;
        self.micro = micro;
        self.micro_base = micro;
        self.dropout_seed = seed;
        Ok(())
    }
}

#[cfg(test)]
mod moe_plan_tests {
    use super::*;

    #[test]
    fn the_activation_estimate_counts_each_sparse_layers_experts_instead_of_its_dense_mlp() {
        let dense = ModelConfig { num_hidden_layers: 3, ..ModelConfig::tiny_llama(64) };
        let moe = crate::config::MoeConfig {
            num_experts: 8,
            top_k: 2,
            moe_intermediate_size: 32,
            norm_topk_prob: true,
            sparse_layers: vec![false, true, true],
            aux_loss_coef: 0.0,
            output_router_logits: false,
            router_aux_loss_coef: 0.001,
            decoder_sparse_step: 1,
            mlp_only_layers: vec![0],
        };
        let sparse = ModelConfig { moe: Some(moe), ..dense.clone() };
        let a = AdapterConfig { r: 4, target_modules: vec!["q_proj".into()], ..AdapterConfig::default() };
        let (h, i) = (dense.hidden_size, dense.intermediate_size);
        // Per token and sparse layer: 8 router logits + 2 experts x (2h + 3 x 32 + 2r), not 3i.
        let extra = 8 + 2 * (2 * h + 96 + 8);
        let (d, s) = (activation_bytes(&dense, &a, 10, false, DType::F32), activation_bytes(&sparse, &a, 10, false, DType::F32));
        assert_eq!(s - d, ((2 * (extra - 3 * i) + 2 * (extra - 3 * i)) * 10 * 4) as u64, "two sparse layers kept, and the larger layer as workspace twice");
    }
}
