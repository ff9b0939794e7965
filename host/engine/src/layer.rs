//! Forward and backward of one decoder layer, by hand, on a [`Backend`].
//!
//! ```text
//! xn  = rmsnorm(x)                    q,k,v = lin(xn) (+bias, +adapter); Qwen3: per-head rmsnorm
//! q,k = rope(q,k) (not on SmolLM3's    ao    = attention(q, k, v)      (packed, causal, GQA;
//!       no-RoPE layers)                        a sliding window on the layers that have one)
//! x2  = x + rm * lin_o(ao)            xn2   = rmsnorm(x2)
//! hh  = silu(lin_gate(xn2)) * lin_up(xn2)
//! out = x2 + rm * lin_down(hh)        (rm: Granite residual_multiplier, else 1)
//! ```
//! Gemma 3 (`gemma_norms`): `x2 = x + rmsnorm(lin_o(ao))`, `xn2 = rmsnorm_preff(x2)`,
//! `out = x2 + rmsnorm_postff(lin_down(hh))`, GeGLU for SwiGLU, and its sliding layers rotate
//! with their own RoPE base.
//! Qwen3-MoE's sparse layers replace the MLP by [`crate::moe`]'s experts.
//! An adapted linear (PEFT semantics, `xd = dropout(x)`, `s` = scaling):
//! LoRA `y = x W^T + b + s (xd A^T) B^T`;
//! DoRA `y = x W^T + b + (mn - 1) (xd W^T) + mn s (xd A^T) B^T`, `mn = mag / ||W + s B A||_row`
//! with the norm treated as a constant in backward, as PEFT does.
//!
//! A quantized `W` is dequantized (to the compute dtype) into a reused buffer right before the
//! matrix products that need it, forward and backward ([`Model::weight`]); the backward to the
//! input multiplies by that same dequantized weight, as PEFT with bitsandbytes does.

use crate::adapter::Lora;
use crate::backend::{Attn, Backend, Buf, DType, Gemm, splitmix64};
use crate::config::{Layout, ModelConfig};
use crate::error::Result;
use crate::model::{Layer, Linear, Model, Module};

fn missing(what: &str) -> crate::error::EngineError {
    crate::error::EngineError::State { name: what.to_string(), msg: "not saved by the forward pass (internal error)".into() }
}

/// What one batch's forward/backward shares.
pub(crate) struct Ctx<'a> {
    pub be: &'a dyn Backend,
    pub cfg: &'a ModelConfig,
    /// The base model (for its weights, dequantized on demand).
    pub model: &'a Model,
    pub t: usize,
    pub attn: Attn,
    pub pos: Buf,
    pub cu: Buf,
    pub inv_freq: Buf,
    /// Gemma 3's sliding layers' inverse frequencies.
    pub inv_freq_local: Option<Buf>,
    /// Adapter dropout probability (0 in eval).
    pub dropout: f32,
    /// Base of this micro-batch's dropout seeds.
    pub seed_base: u64,
    pub scale: f32,
    pub act: DType,
    /// Qwen3-MoE's router statistics of this pass ([`crate::moe`]).
    pub moe: crate::moe::RouterStats,
}

impl Ctx<'_> {
    /// A zeroed activation buffer, for outputs that are accumulated into.
    pub(crate) fn zeros(&self, n: usize) -> Result<Buf> {
        self.be.zeros(n, self.act)
    }
    /// An activation buffer without a memset: every use below is an output its op writes in
    /// full (no accumulation into it), see [`Backend::alloc`].
    pub(crate) fn alloc(&self, n: usize) -> Result<Buf> {
        self.be.alloc(n, self.act)
    }
    /// The batch's attention sizes with layer `li`'s window.
    fn layer_attn(&self, li: usize) -> Attn {
        Attn { window: self.cfg.layer_window(li), ..self.attn }
    }
    /// Layer `li`'s RoPE inverse frequencies.
    fn inv_freq(&self, li: usize) -> &Buf {
        match &self.inv_freq_local {
            Some(local) if self.cfg.layer_window(li) > 0 => local,
            _ => &self.inv_freq,
        }
    }
    /// RoPE on `heads` heads of `x` (forward, or its backward with `inverse`), on the
    /// config's rotary dims with its cos/sin factor.
    fn rope(&self, x: &mut Buf, li: usize, heads: usize, inverse: bool) -> Result<()> {
        let c = self.cfg;
        self.be.rope_partial(x, &self.pos, self.inv_freq(li), self.t, heads, c.head_dim, c.rotary_dim, c.rope_attention_factor(), inverse)
    }
    /// Splits the rows-by-`sum(widths)` output of a fused projection into its parts.
    fn split(&self, y: &Buf, widths: &[usize]) -> Result<Vec<Buf>> {
        let n: usize = widths.iter().sum();
        let mut col = 0;
        let mut out = Vec::with_capacity(widths.len());
        for &w in widths {
            let mut part = self.alloc(self.t * w)?;
            self.be.copy_cols(y, n, col, &mut part, w, 0, self.t, w)?;
            col += w;
            out.push(part);
        }
        Ok(out)
    }
    /// The inverse of [`Ctx::split`]: joins the parts' gradients into the fused output's.
    fn join(&self, parts: &[&Buf], widths: &[usize]) -> Result<Buf> {
        let n: usize = widths.iter().sum();
        let mut y = self.alloc(self.t * n)?;
        let mut col = 0;
        for (p, &w) in parts.iter().zip(widths) {
            self.be.copy_cols(p, w, 0, &mut y, n, col, self.t, w)?;
            col += w;
        }
        Ok(y)
    }
    fn gated(&self, g: &Buf, u: &Buf, h: &mut Buf) -> Result<()> {
        if self.cfg.gelu_mlp { self.be.geglu_fwd(g, u, h) } else { self.be.swiglu_fwd(g, u, h) }
    }
    fn seed(&self, layer: usize, m: Module) -> u64 {
        splitmix64(self.seed_base ^ ((layer as u64) << 8 | m as u64))
    }
}

/// Saved by an adapted linear's forward for its backward.
#[derive(Default)]
pub(crate) struct LinActs {
    /// `xd A^T [t, r]`.
    xa: Option<Buf>,
    /// DoRA: `xd W^T + s xa B^T [t, out]`, `mn [out]`, weight norm `[out]`.
    comb: Option<Buf>,
    mn: Option<Buf>,
    wn: Option<Buf>,
}

/// Everything one layer's backward needs (its input `x` is kept by the caller).
pub(crate) struct LayerActs {
    rstd1: Buf,
    xn: Buf,
    q_pre: Option<Buf>,
    rstd_q: Option<Buf>,
    k_pre: Option<Buf>,
    rstd_k: Option<Buf>,
    q: Buf,
    k: Buf,
    v: Buf,
    ao: Buf,
    lse: Buf,
    x2: Buf,
    rstd2: Buf,
    xn2: Buf,
    g: Buf,
    u: Buf,
    hh: Buf,
    /// Gemma 3: the attention and MLP outputs before their norms, and those norms' rstd.
    o: Option<(Buf, Buf)>,
    down: Option<(Buf, Buf)>,
    lin: Vec<LinActs>,
    /// A sparse (expert) MLP's activations (`g`, `u`, `hh` then are empty).
    moe: Option<crate::moe::MoeActs>,
}

fn dropped(ctx: &Ctx, x: &Buf, seed: u64) -> Result<Option<Buf>> {
    if ctx.dropout > 0.0 {
        let mut xd = ctx.alloc(x.len())?;
        ctx.be.dropout(x, &mut xd, ctx.dropout, seed)?;
        Ok(Some(xd))
    } else {
        Ok(None)
    }
}

fn linear_fwd(ctx: &Ctx, lin: &Linear, x: &Buf, lora: Option<&Lora>, seed: u64, acts: &mut LinActs) -> Result<Buf> {
    linear_fwd_rows(ctx, ctx.t, lin, x, lora, seed, acts)
}

/// [`linear_fwd`] on `t` rows (an expert's tokens) instead of the batch's.
pub(crate) fn linear_fwd_rows(ctx: &Ctx, t: usize, lin: &Linear, x: &Buf, lora: Option<&Lora>, seed: u64, acts: &mut LinActs) -> Result<Buf> {
    let (be, s) = (ctx.be, ctx.scale);
    let (out_f, in_f) = (lin.out_f, lin.in_f);
    let w = ctx.model.weight(lin)?;
    let mut y = ctx.alloc(t * out_f)?;
    be.gemm(Gemm::linear(t, out_f, in_f), x, &w, &mut y)?;
    if let Some(l) = lora {
        let r = l.a.shape[0];
        let xd_own = dropped(ctx, x, seed)?;
        let xd = xd_own.as_ref().unwrap_or(x);
        let mut xa = be.alloc(t * r, DType::F32)?;
        be.gemm(Gemm::linear(t, r, in_f), xd, &l.a.value, &mut xa)?;
        match &l.mag {
            None => {
                be.gemm(Gemm { alpha: s, accumulate: true, ..Gemm::linear(t, out_f, r) }, &xa, &l.b.value, &mut y)?;
            }
            Some(mag) => {
                let mut wn = be.alloc(out_f, DType::F32)?;
                be.dora_weight_norm(&w, &l.a.value, &l.b.value, s, &mut wn, out_f, in_f, r)?;
                let mut mn = be.alloc(out_f, DType::F32)?;
                be.div(&mag.value, &wn, &mut mn)?;
                // comb = xd W^T + s * xa B^T
                let mut comb = ctx.alloc(t * out_f)?;
                match &xd_own {
                    Some(xd) => be.gemm(Gemm::linear(t, out_f, in_f), xd, &w, &mut comb)?,
                    None => be.copy(&y, &mut comb)?,
                }
                let mut bd = ctx.alloc(t * out_f)?;
                be.copy(&comb, &mut bd)?;
                be.gemm(Gemm { alpha: s, accumulate: true, ..Gemm::linear(t, out_f, r) }, &xa, &l.b.value, &mut comb)?;
                // y += mn * comb - bd
                be.scale_cols(&comb, &mn, &mut y, t, out_f, true)?;
                be.axpy(-1.0, &bd, &mut y)?;
                acts.comb = Some(comb);
                acts.mn = Some(mn);
                acts.wn = Some(wn);
            }
        }
        acts.xa = Some(xa);
    }
    if let Some(b) = &lin.b {
        be.add_bias(b, &mut y, t, out_f)?;
    }
    Ok(y)
}

/// `dx (+)= d(loss)/dx` of an (adapted) linear; adapter gradients are accumulated.
#[allow(clippy::too_many_arguments)]
fn linear_bwd(ctx: &Ctx, lin: &Linear, x: &Buf, dy: &Buf, dx: &mut Buf, accumulate: bool, lora: Option<&mut Lora>, seed: u64, acts: &LinActs) -> Result<()> {
    linear_bwd_rows(ctx, ctx.t, lin, x, dy, dx, accumulate, lora, seed, acts)
}

/// [`linear_bwd`] on `t` rows (an expert's tokens) instead of the batch's.
#[allow(clippy::too_many_arguments)]
pub(crate) fn linear_bwd_rows(ctx: &Ctx, t: usize, lin: &Linear, x: &Buf, dy: &Buf, dx: &mut Buf, accumulate: bool, lora: Option<&mut Lora>, seed: u64, acts: &LinActs) -> Result<()> {
    let (be, s) = (ctx.be, ctx.scale);
    let (out_f, in_f) = (lin.out_f, lin.in_f);
    // dx (+)= dy @ W
    let w = ctx.model.weight(lin)?;
    let dx_gemm = |dy: &Buf, dx: &mut Buf, acc: bool| be.gemm(Gemm { m: t, n: in_f, k: out_f, ta: false, tb: false, alpha: 1.0, accumulate: acc }, dy, &w, dx);
    let Some(l) = lora else {
        return dx_gemm(dy, dx, accumulate);
    };
    let r = l.a.shape[0];
    let xa = acts.xa.as_ref().ok_or_else(|| missing("adapter forward saved xa"))?;
    // DoRA: dmag += colsum(dy * comb) / wn; the LoRA path sees dy * mn.
    let dys_own = match (&mut l.mag, &acts.mn) {
        (Some(mag), Some(mn)) => {
            let (comb, wn) = (acts.comb.as_ref().ok_or_else(|| missing("dora comb"))?, acts.wn.as_ref().ok_or_else(|| missing("dora wn"))?);
            let mut cd = be.alloc(out_f, DType::F32)?;
            be.col_dot(dy, comb, &mut cd, t, out_f, false)?;
            let mut q = be.alloc(out_f, DType::F32)?;
            be.div(&cd, wn, &mut q)?;
            be.axpy(1.0, &q, &mut mag.grad)?;
            let mut dys = ctx.alloc(t * out_f)?;
            be.scale_cols(dy, mn, &mut dys, t, out_f, false)?;
            Some(dys)
        }
        _ => None,
    };
    let dys = dys_own.as_ref().unwrap_or(dy);
    // dB += s * dys^T @ xa ; dxa = s * dys @ B
    be.gemm(Gemm { m: out_f, n: r, k: t, ta: true, tb: false, alpha: s, accumulate: true }, dys, xa, &mut l.b.grad)?;
    let mut dxa = be.alloc(t * r, DType::F32)?;
    be.gemm(Gemm { m: t, n: r, k: out_f, ta: false, tb: false, alpha: s, accumulate: false }, dys, &l.b.value, &mut dxa)?;
    // dA += dxa^T @ xd
    let xd_own = dropped(ctx, x, seed)?;
    let xd = xd_own.as_ref().unwrap_or(x);
    be.gemm(Gemm { m: r, n: in_f, k: t, ta: true, tb: false, alpha: 1.0, accumulate: true }, &dxa, xd, &mut l.a.grad)?;
    let dxa_gemm = |dxa: &Buf, out: &mut Buf, acc: bool| be.gemm(Gemm { m: t, n: in_f, k: r, ta: false, tb: false, alpha: 1.0, accumulate: acc }, dxa, &l.a.value, out);
    if ctx.dropout == 0.0 {
        // xd == x: everything flows straight to dx.
        dx_gemm(dys, dx, accumulate)?;
        dxa_gemm(&dxa, dx, true)?;
    } else {
        dx_gemm(dy, dx, accumulate)?;
        let mut dxd = ctx.alloc(t * in_f)?;
        if dys_own.is_some() {
            // DoRA's (mn - 1) (xd W^T) term: d(xd) += (dys - dy) @ W
            let mut diff = ctx.alloc(t * out_f)?;
            be.copy(dys, &mut diff)?;
            be.axpy(-1.0, dy, &mut diff)?;
            dx_gemm(&diff, &mut dxd, false)?;
            dxa_gemm(&dxa, &mut dxd, true)?;
        } else {
            dxa_gemm(&dxa, &mut dxd, false)?;
        }
        let mut back = ctx.alloc(t * in_f)?;
        be.dropout(&dxd, &mut back, ctx.dropout, seed)?;
        be.axpy(1.0, &back, dx)?;
    }
    Ok(())
}

/// One layer's forward: returns the layer output and what its backward needs.
pub(crate) fn forward(ctx: &Ctx, layer: &Layer, li: usize, lora: &[Option<Lora>], x: &Buf) -> Result<(Buf, LayerActs)> {
    let (be, c, t) = (ctx.be, ctx.cfg, ctx.t);
    let (d, f, h, hkv, hd) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let eps = c.rms_norm_eps as f32;
    let mut lin: Vec<LinActs> = (0..7).map(|_| LinActs::default()).collect();
    let mut rstd1 = be.alloc(t, DType::F32)?;
    let mut xn = ctx.alloc(t * d)?;
    be.rmsnorm_fwd(x, &layer.input_norm, &mut xn, &mut rstd1, t, d, eps)?;
    let proj = |m: Module, input: &Buf, lin: &mut Vec<LinActs>| {
        linear_fwd(ctx, layer.lin(m)?, input, lora[m as usize].as_ref(), ctx.seed(li, m), &mut lin[m as usize])
    };
    let (mut q, mut k, v) = if c.layout == Layout::Phi3 {
        // Phi-3's qkv_proj: rows q | k | v (the adapter too).
        let qkv = proj(Module::Q, &xn, &mut lin)?;
        let mut parts = ctx.split(&qkv, &[h * hd, hkv * hd, hkv * hd])?.into_iter();
        let mut next = || parts.next().ok_or_else(|| missing("qkv part"));
        (next()?, next()?, next()?)
    } else {
        (proj(Module::Q, &xn, &mut lin)?, proj(Module::K, &xn, &mut lin)?, proj(Module::V, &xn, &mut lin)?)
    };
    let (mut q_pre, mut rstd_q, mut k_pre, mut rstd_k) = (None, None, None, None);
    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
        let mut rq = be.alloc(t * h, DType::F32)?;
        let mut qo = ctx.alloc(t * h * hd)?;
        be.rmsnorm_fwd(&q, qn, &mut qo, &mut rq, t * h, hd, eps)?;
        let mut rk = be.alloc(t * hkv, DType::F32)?;
        let mut ko = ctx.alloc(t * hkv * hd)?;
        be.rmsnorm_fwd(&k, kn, &mut ko, &mut rk, t * hkv, hd, eps)?;
        q_pre = Some(std::mem::replace(&mut q, qo));
        k_pre = Some(std::mem::replace(&mut k, ko));
        rstd_q = Some(rq);
        rstd_k = Some(rk);
    }
    if c.layer_uses_rope(li) {
        ctx.rope(&mut q, li, h, false)?;
        ctx.rope(&mut k, li, hkv, false)?;
    }
    let mut ao = ctx.alloc(t * h * hd)?;
    let mut lse = be.alloc(h * t, DType::F32)?;
    be.attention_fwd(ctx.layer_attn(li), &q, &k, &v, &ctx.cu, &mut ao, &mut lse)?;
    // Gemma 3 norms a branch's output before its residual add (keeping the pre-norm output).
    let branch_norm = |y: Buf, w: Option<&Buf>| -> Result<(Buf, Option<(Buf, Buf)>)> {
        let Some(w) = w else { return Ok((y, None)) };
        let (mut yn, mut rstd) = (ctx.alloc(t * d)?, be.alloc(t, DType::F32)?);
        be.rmsnorm_fwd(&y, w, &mut yn, &mut rstd, t, d, eps)?;
        Ok((yn, Some((y, rstd))))
    };
    let (pre_ff, post_ff) = match &layer.ffn_norms {
        Some((pre, post)) => (pre, Some(post)),
        None => (&layer.post_norm, None),
    };
    let o = proj(Module::O, &ao, &mut lin)?;
    let (o, o_acts) = branch_norm(o, post_ff.map(|_| &layer.post_norm))?;
    let mut x2 = ctx.alloc(t * d)?;
    be.copy(x, &mut x2)?;
    be.axpy(c.residual_multiplier, &o, &mut x2)?;
    drop(o);
    let mut rstd2 = be.alloc(t, DType::F32)?;
    let mut xn2 = ctx.alloc(t * d)?;
    be.rmsnorm_fwd(&x2, pre_ff, &mut xn2, &mut rstd2, t, d, eps)?;
    if let Some(ex) = &layer.experts {
        let (down, acts) = crate::moe::forward(ctx, li, ex, lora, &xn2)?;
        let mut out = ctx.alloc(t * d)?;
        be.copy(&x2, &mut out)?;
        be.axpy(c.residual_multiplier, &down, &mut out)?;
        let (g, u, hh) = (ctx.zeros(0)?, ctx.zeros(0)?, ctx.zeros(0)?);
        let moe = Some(acts);
        return Ok((out, LayerActs { rstd1, xn, q_pre, rstd_q, k_pre, rstd_k, q, k, v, ao, lse, x2, rstd2, xn2, g, u, hh, o: o_acts, down: None, lin, moe }));
    }
    let (g, u) = if c.layout == Layout::Split {
        (proj(Module::Gate, &xn2, &mut lin)?, proj(Module::Up, &xn2, &mut lin)?)
    } else {
        // Phi-3's gate_up_proj, Granite 4's input_linear: rows gate | up.
        let gu = proj(Module::Gate, &xn2, &mut lin)?;
        let mut parts = ctx.split(&gu, &[f, f])?.into_iter();
        let mut next = || parts.next().ok_or_else(|| missing("gate/up part"));
        (next()?, next()?)
    };
    let mut hh = ctx.alloc(t * f)?;
    ctx.gated(&g, &u, &mut hh)?;
    let down = proj(Module::Down, &hh, &mut lin)?;
    let (down, down_acts) = branch_norm(down, post_ff)?;
    let mut out = ctx.alloc(t * d)?;
    be.copy(&x2, &mut out)?;
    be.axpy(c.residual_multiplier, &down, &mut out)?;
    Ok((out, LayerActs { rstd1, xn, q_pre, rstd_q, k_pre, rstd_k, q, k, v, ao, lse, x2, rstd2, xn2, g, u, hh, o: o_acts, down: down_acts, lin, moe: None }))
}

/// One layer's backward. On entry `dres` is d(loss)/d(layer output); on exit d(loss)/d(input).
pub(crate) fn backward(ctx: &Ctx, layer: &Layer, li: usize, lora: &mut [Option<Lora>], x: &Buf, a: &LayerActs, dres: &mut Buf) -> Result<()> {
    let (be, c, t) = (ctx.be, ctx.cfg, ctx.t);
    let (d, f, h, hkv, hd) = (c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim);
    let rm = c.residual_multiplier;
    // The gradient into a branch's output: through Gemma 3's post-branch norm, else scaled by rm.
    let scaled = |g: &Buf, normed: Option<(&(Buf, Buf), &Buf)>| -> Result<Option<Buf>> {
        if let Some(((y, rstd), w)) = normed {
            let mut dy = ctx.alloc(t * d)?;
            be.rmsnorm_bwd(g, y, w, rstd, &mut dy, t, d, false)?;
            return Ok(Some(dy));
        }
        if rm == 1.0 {
            return Ok(None);
        }
        let mut s = ctx.alloc(g.len())?;
        be.copy(g, &mut s)?;
        be.scale(rm, &mut s)?;
        Ok(Some(s))
    };
    let lb = |m: Module, input: &Buf, dy: &Buf, dx: &mut Buf, acc: bool, lora: &mut [Option<Lora>]| {
        linear_bwd(ctx, layer.lin(m)?, input, dy, dx, acc, lora[m as usize].as_mut(), ctx.seed(li, m), &a.lin[m as usize])
    };
    // MLP
    let (pre_ff, post_ff) = match &layer.ffn_norms {
        Some((pre, post)) => (pre, Some(post)),
        None => (&layer.post_norm, None),
    };
    let dd_own = scaled(dres, a.down.as_ref().zip(post_ff))?;
    let moe = layer.experts.as_ref().zip(a.moe.as_ref());
    // The expert path scatter-adds into dxn2; the dense path's first product writes it in full.
    let mut dxn2 = if moe.is_some() { ctx.zeros(t * d)? } else { ctx.alloc(t * d)? };
    if let Some((ex, ma)) = moe {
        crate::moe::backward(ctx, ex, lora, ma, dd_own.as_ref().unwrap_or(dres), &mut dxn2)?;
    } else {
        let mut dhh = ctx.alloc(t * f)?;
        lb(Module::Down, &a.hh, dd_own.as_ref().unwrap_or(dres), &mut dhh, false, lora)?;
        drop(dd_own);
        let (mut dg, mut du) = (ctx.alloc(t * f)?, ctx.alloc(t * f)?);
        if c.gelu_mlp {
            be.geglu_bwd(&a.g, &a.u, &dhh, &mut dg, &mut du)?;
        } else {
            be.swiglu_bwd(&a.g, &a.u, &dhh, &mut dg, &mut du)?;
        }
        drop(dhh);
        if c.layout == Layout::Split {
            lb(Module::Gate, &a.xn2, &dg, &mut dxn2, false, lora)?;
            lb(Module::Up, &a.xn2, &du, &mut dxn2, true, lora)?;
        } else {
            let dgu = ctx.join(&[&dg, &du], &[f, f])?;
            lb(Module::Gate, &a.xn2, &dgu, &mut dxn2, false, lora)?;
        }
        drop((dg, du));
    }
    be.rmsnorm_bwd(&dxn2, &a.x2, pre_ff, &a.rstd2, dres, t, d, true)?;
    // attention
    let do_own = scaled(dres, a.o.as_ref().map(|o| (o, &layer.post_norm)))?;
    let mut dao = ctx.alloc(t * h * hd)?;
    lb(Module::O, &a.ao, do_own.as_ref().unwrap_or(dres), &mut dao, false, lora)?;
    drop(do_own);
    let (mut dq, mut dk, mut dv) = (ctx.alloc(t * h * hd)?, ctx.alloc(t * hkv * hd)?, ctx.alloc(t * hkv * hd)?);
    be.attention_bwd(ctx.layer_attn(li), &a.q, &a.k, &a.v, &ctx.cu, &a.ao, &a.lse, &dao, &mut dq, &mut dk, &mut dv)?;
    drop(dao);
    if c.layer_uses_rope(li) {
        ctx.rope(&mut dq, li, h, true)?;
        ctx.rope(&mut dk, li, hkv, true)?;
    }
    if let (Some(qn), Some(kn)) = (&layer.q_norm, &layer.k_norm) {
        let mut dqp = ctx.alloc(t * h * hd)?;
        be.rmsnorm_bwd(&dq, a.q_pre.as_ref().ok_or_else(|| missing("q_pre"))?, qn, a.rstd_q.as_ref().ok_or_else(|| missing("rstd_q"))?, &mut dqp, t * h, hd, false)?;
        let mut dkp = ctx.alloc(t * hkv * hd)?;
        be.rmsnorm_bwd(&dk, a.k_pre.as_ref().ok_or_else(|| missing("k_pre"))?, kn, a.rstd_k.as_ref().ok_or_else(|| missing("rstd_k"))?, &mut dkp, t * hkv, hd, false)?;
        dq = dqp;
        dk = dkp;
    }
    let mut dxn = ctx.alloc(t * d)?;
    if c.layout == Layout::Phi3 {
        let dqkv = ctx.join(&[&dq, &dk, &dv], &[h * hd, hkv * hd, hkv * hd])?;
        lb(Module::Q, &a.xn, &dqkv, &mut dxn, false, lora)?;
    } else {
        lb(Module::Q, &a.xn, &dq, &mut dxn, false, lora)?;
        lb(Module::K, &a.xn, &dk, &mut dxn, true, lora)?;
        lb(Module::V, &a.xn, &dv, &mut dxn, true, lora)?;
    }
    be.rmsnorm_bwd(&dxn, x, &layer.input_norm, &a.rstd1, dres, t, d, true)?;
    Ok(())
}
