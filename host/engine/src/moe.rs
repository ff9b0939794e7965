//! Qwen3-MoE's sparse MLP block (`Qwen3MoeSparseMoeBlock` of transformers 5.17), forward and
//! backward on a [`Backend`], with LoRA on the 3-D expert weights as PEFT 0.21's
//! `target_parameters` adapts them.
//!
//! ```text
//! logits = xn W_router^T            [t, E]   (the router `mlp.gate` is frozen)
//! p      = softmax(logits) (f32)    sel, pk = top-k of p per token; w = pk / sum(pk) with norm_topk_prob, else pk
//! for each expert e, its tokens T_e in ascending order:
//!     xe = xn[T_e];  g | u = xe Wgu_e^T;  h = silu(g) * u;  ye = h Wd_e^T
//!     out[T_e] += w[T_e, e] * ye        (experts in ascending order: a fixed summation order)
//! ```
//! The gradient reaches the layer input through the experts and through the routing weights
//! `w` (softmax, top-k renormalisation), as in transformers; the router weight gets none.
//!
//! Routing decisions are computed on the host after one download of the router logits per
//! layer (top-k of a `[t, E]` matrix), for now; so is their backward (the same small matrix,
//! and each expert's `[n]` routing-weight gradients). The rows of each expert are gathered and
//! scattered back on the device by [`crate::backend::Backend::gather_rows`] and
//! [`crate::backend::Backend::scatter_add_rows`], one expert after another (no grouped GEMM yet).
//!
//! Load-balancing loss (`load_balancing_loss_func`, added when `output_router_logits`):
//! `aux = E * sum_e (n_e / N) (P_e / N)` over all sparse layers' rows together, `n_e` the top-k
//! selections of expert `e`, `P_e` the summed probabilities, `N` the rows of all sparse layers.
//! Each layer records its counts and sums in [`RouterStats`] during the forward; the backward
//! reads the totals (every layer's forward has run by then).
//!
//! Expert adapters (PEFT `ParamWrapper`, per 3-D parameter `[E, out, in]`): `lora_A [E*r, in]`
//! holds expert `e`'s `A_e [r, in]` in rows `e*r..(e+1)*r`; `lora_B [out, r*E]` holds
//! `B_e[o, j]` at column `j*E + e`; `W_e + s B_e A_e` is expert `e`'s weight. Dropout is
//! refused there (PEFT refuses it too). Here each expert's `A_e`, `B_e` is its own
//! [`crate::adapter::Param`], packed into PEFT's tensors by name ([`crate::adapter::Pack`]).

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::adapter::Lora;
use crate::backend::{Buf, DType, Gemm, HostData};
use crate::error::{EngineError, Result};
use crate::layer::{Ctx, LinActs, linear_bwd_rows, linear_fwd_rows};
use crate::model::{Linear, Module};

/// The adaptable 3-D expert parameters, by the name PEFT's `target_parameters` gives them.
pub const EXPERT_PARAMS: [&str; 2] = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"];
/// Index of `mlp.experts.gate_up_proj` in [`EXPERT_PARAMS`].
pub const GATE_UP: usize = 0;
/// Index of `mlp.experts.down_proj` in [`EXPERT_PARAMS`].
pub const DOWN: usize = 1;

/// The adapter slot of expert `e`'s parameter `which` in a layer's row of adapters (after the
/// seven linear modules).
pub fn slot(e: usize, which: usize) -> usize {
    Module::ALL.len() + 2 * e + which
}

/// A sparse layer's frozen weights: the router and each expert's fused `gate_up_proj`
/// `[2I, d]` (rows gate | up) and `down_proj` `[d, I]`.
pub struct Experts {
    pub router: Buf,
    pub gate_up: Vec<Linear>,
    pub down: Vec<Linear>,
}

/// Router statistics of one forward pass, per sparse layer (a recomputed forward overwrites its
/// layer's entry with the same values), and the weight of the load-balancing loss's gradient.
/// One layer's selection counts and summed probabilities per expert, and its rows.
type LayerRouting = (Vec<f64>, Vec<f64>, usize);

#[derive(Default)]
pub(crate) struct RouterStats {
    layers: Mutex<BTreeMap<usize, LayerRouting>>,
    grad_weight: Mutex<f64>,
}

impl RouterStats {
    fn record(&self, li: usize, counts: Vec<f64>, prob_sums: Vec<f64>, rows: usize) {
        if let Ok(mut m) = self.layers.lock() {
            m.insert(li, (counts, prob_sums, rows));
        }
    }

    /// `(n_e / N, P_e / N)` over every recorded layer.
    fn fractions(&self) -> Option<LayerRouting> {
        let m = self.layers.lock().ok()?;
        let e = m.values().next()?.0.len();
        let (mut n, mut p, mut rows) = (vec![0f64; e], vec![0f64; e], 0usize);
        for (c, s, r) in m.values() {
            for i in 0..e {
                n[i] += c[i];
                p[i] += s[i];
            }
            rows += r;
        }
        let total = rows.max(1) as f64;
        Some((n.iter().map(|x| x / total).collect(), p.iter().map(|x| x / total).collect(), rows))
    }

    /// transformers' `load_balancing_loss_func` of the recorded layers (0 without any).
    pub(crate) fn aux_loss(&self) -> f64 {
        match self.fractions() {
            Some((f, p, _)) => f.len() as f64 * f.iter().zip(&p).map(|(a, b)| a * b).sum::<f64>(),
            None => 0.0,
        }
    }

    /// The factor the load-balancing loss enters the objective with (its backward's weight).
    pub(crate) fn set_grad_weight(&self, w: f64) {
        if let Ok(mut g) = self.grad_weight.lock() {
            *g = w;
        }
    }

    /// `d(weight * aux) / d p[row, e]` for every row of a sparse layer: `weight * E * f_e / N`.
    fn aux_grad(&self) -> Option<Vec<f32>> {
        let w = *self.grad_weight.lock().ok()?;
        if w == 0.0 {
            return None;
        }
        let (f, _, rows) = self.fractions()?;
        let e = f.len() as f64;
        Some(f.iter().map(|fe| (w * e * fe / rows.max(1) as f64) as f32).collect())
    }
}

/// One token's routing: softmax probabilities, the top-k experts (descending probability, ties
/// to the lower index as `torch.topk`) and their weights.
struct Routing {
    probs: Vec<f32>,
    sel: Vec<usize>,
    weights: Vec<f32>,
}

fn route(logits: &[f32], t: usize, n_exp: usize, k: usize, norm: bool) -> Routing {
    let mut probs = vec![0f32; t * n_exp];
    let mut sel = vec![0usize; t * k];
    let mut weights = vec![0f32; t * k];
    for i in 0..t {
        let l = &logits[i * n_exp..(i + 1) * n_exp];
        let max = l.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let p = &mut probs[i * n_exp..(i + 1) * n_exp];
        let mut sum = 0f32;
        for (p, &x) in p.iter_mut().zip(l) {
            *p = (x - max).exp();
            sum += *p;
        }
        p.iter_mut().for_each(|p| *p /= sum);
        let mut order: Vec<usize> = (0..n_exp).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]).then(a.cmp(&b)));
        let s = &mut sel[i * k..(i + 1) * k];
        s.copy_from_slice(&order[..k]);
        let w = &mut weights[i * k..(i + 1) * k];
        for (w, &e) in w.iter_mut().zip(s.iter()) {
            *w = p[e];
        }
        if norm {
            let total: f32 = w.iter().sum();
            w.iter_mut().for_each(|w| *w /= total);
        }
    }
    Routing { probs, sel, weights }
}

/// What one expert's forward kept for its backward.
struct ExpertActs {
    e: usize,
    /// The expert's tokens, ascending, and each one's top-k position.
    tokens: Vec<usize>,
    kpos: Vec<usize>,
    idx: Buf,
    w: Buf,
    xe: Buf,
    g: Buf,
    u: Buf,
    h: Buf,
    ye: Buf,
    lin: [LinActs; 2],
}

/// What a sparse MLP's forward kept for its backward.
pub(crate) struct MoeActs {
    routing: Routing,
    experts: Vec<ExpertActs>,
}

fn split_halves(ctx: &Ctx, gu: &Buf, rows: usize, i: usize) -> Result<(Buf, Buf)> {
    let (mut g, mut u) = (ctx.be.zeros(rows * i, ctx.act)?, ctx.be.zeros(rows * i, ctx.act)?);
    ctx.be.copy_cols(gu, 2 * i, 0, &mut g, i, 0, rows, i)?;
    ctx.be.copy_cols(gu, 2 * i, i, &mut u, i, 0, rows, i)?;
    Ok((g, u))
}

/// The sparse MLP of layer `li` on its normed input `xn [t, d]`: returns its output `[t, d]`.
pub(crate) fn forward(ctx: &Ctx, li: usize, ex: &Experts, lora: &[Option<Lora>], xn: &Buf) -> Result<(Buf, MoeActs)> {
    let (be, c, t) = (ctx.be, ctx.cfg, ctx.t);
    let mc = c.moe.as_ref().ok_or_else(|| EngineError::State { name: "moe".into(), msg: "a sparse layer without an expert config (internal error)".into() })?;
    let (d, n_exp, k, i) = (c.hidden_size, mc.num_experts, mc.top_k, mc.moe_intermediate_size);
    let mut logits = be.zeros(t * n_exp, DType::F32)?;
    be.gemm(Gemm::linear(t, n_exp, d), xn, &ex.router, &mut logits)?;
    let routing = route(&be.download_f32(&logits)?, t, n_exp, k, mc.norm_topk_prob);
    let mut counts = vec![0f64; n_exp];
    routing.sel.iter().for_each(|&e| counts[e] += 1.0);
    let mut sums = vec![0f64; n_exp];
    routing.probs.chunks(n_exp).for_each(|p| p.iter().zip(sums.iter_mut()).for_each(|(p, s)| *s += *p as f64));
    ctx.moe.record(li, counts, sums, t);

    let mut out = ctx.zeros(t * d)?;
    let mut experts = Vec::new();
    for e in 0..n_exp {
        let (mut tokens, mut kpos, mut wv) = (Vec::new(), Vec::new(), Vec::new());
        for tok in 0..t {
            if let Some(j) = routing.sel[tok * k..(tok + 1) * k].iter().position(|&s| s == e) {
                tokens.push(tok);
                kpos.push(j);
                wv.push(routing.weights[tok * k + j]);
            }
        }
        let n = tokens.len();
        if n == 0 {
            continue;
        }
        let ids: Vec<u32> = tokens.iter().map(|&x| x as u32).collect();
        let idx = be.upload(HostData::U32(&ids), DType::U32)?;
        let w = be.upload(HostData::F32(&wv), DType::F32)?;
        let mut xe = ctx.zeros(n * d)?;
        be.gather_rows(xn, &idx, None, &mut xe, n, d)?;
        let mut lin = [LinActs::default(), LinActs::default()];
        let gu = linear_fwd_rows(ctx, n, &ex.gate_up[e], &xe, lora[slot(e, GATE_UP)].as_ref(), 0, &mut lin[0])?;
        let (g, u) = split_halves(ctx, &gu, n, i)?;
        drop(gu);
        let mut h = ctx.zeros(n * i)?;
        be.swiglu_fwd(&g, &u, &mut h)?;
        let ye = linear_fwd_rows(ctx, n, &ex.down[e], &h, lora[slot(e, DOWN)].as_ref(), 0, &mut lin[1])?;
        be.scatter_add_rows(&ye, &idx, Some(&w), &mut out, n, d)?;
        experts.push(ExpertActs { e, tokens, kpos, idx, w, xe, g, u, h, ye, lin });
    }
    Ok((out, MoeActs { routing, experts }))
}

/// The backward of [`forward`]: `dout` is d(loss)/d(output); writes d(loss)/d(xn) into `dxn`
/// (overwritten) and accumulates the expert adapters' gradients.
pub(crate) fn backward(ctx: &Ctx, ex: &Experts, lora: &mut [Option<Lora>], a: &MoeActs, dout: &Buf, dxn: &mut Buf) -> Result<()> {
    let (be, c, t) = (ctx.be, ctx.cfg, ctx.t);
    let mc = c.moe.as_ref().ok_or_else(|| EngineError::State { name: "moe".into(), msg: "a sparse layer without an expert config (internal error)".into() })?;
    let (d, n_exp, k, i) = (c.hidden_size, mc.num_experts, mc.top_k, mc.moe_intermediate_size);
    be.fill(dxn, 0.0)?;
    // d(loss)/d(w) per token and top-k position.
    let mut dw = vec![0f32; t * k];
    for x in &a.experts {
        let n = x.tokens.len();
        let mut gd = ctx.zeros(n * d)?;
        be.gather_rows(dout, &x.idx, None, &mut gd, n, d)?;
        let mut dwe = be.zeros(n, DType::F32)?;
        be.row_dot(&gd, &x.ye, &mut dwe, n, d)?;
        for (j, v) in be.download_f32(&dwe)?.into_iter().enumerate() {
            dw[x.tokens[j] * k + x.kpos[j]] = v;
        }
        drop(gd);
        let mut dye = ctx.zeros(n * d)?;
        be.gather_rows(dout, &x.idx, Some(&x.w), &mut dye, n, d)?;
        let mut dh = ctx.zeros(n * i)?;
        linear_bwd_rows(ctx, n, &ex.down[x.e], &x.h, &dye, &mut dh, false, lora[slot(x.e, DOWN)].as_mut(), 0, &x.lin[1])?;
        drop(dye);
        let (mut dg, mut du) = (ctx.zeros(n * i)?, ctx.zeros(n * i)?);
        be.swiglu_bwd(&x.g, &x.u, &dh, &mut dg, &mut du)?;
        drop(dh);
        let mut dgu = ctx.zeros(n * 2 * i)?;
        be.copy_cols(&dg, i, 0, &mut dgu, 2 * i, 0, n, i)?;
        be.copy_cols(&du, i, 0, &mut dgu, 2 * i, i, n, i)?;
        drop((dg, du));
        let mut dxe = ctx.zeros(n * d)?;
        linear_bwd_rows(ctx, n, &ex.gate_up[x.e], &x.xe, &dgu, &mut dxe, false, lora[slot(x.e, GATE_UP)].as_mut(), 0, &x.lin[0])?;
        be.scatter_add_rows(&dxe, &x.idx, None, dxn, n, d)?;
    }
    // Back through the top-k weights and the softmax to the router logits, then to xn.
    let r = &a.routing;
    let aux = ctx.moe.aux_grad();
    let mut dlogits = vec![0f32; t * n_exp];
    let mut dp = vec![0f32; n_exp];
    for tok in 0..t {
        match &aux {
            Some(g) => dp.copy_from_slice(g),
            None => dp.iter_mut().for_each(|x| *x = 0.0),
        }
        let (sel, w, dwt) = (&r.sel[tok * k..(tok + 1) * k], &r.weights[tok * k..(tok + 1) * k], &dw[tok * k..(tok + 1) * k]);
        let p = &r.probs[tok * n_exp..(tok + 1) * n_exp];
        if mc.norm_topk_prob {
            // w_j = p_j / S: dp_j = (dw_j - sum_i dw_i w_i) / S.
            let s: f32 = sel.iter().map(|&e| p[e]).sum();
            let dot: f32 = dwt.iter().zip(w).map(|(a, b)| a * b).sum();
            for (j, &e) in sel.iter().enumerate() {
                dp[e] += (dwt[j] - dot) / s;
            }
        } else {
            for (j, &e) in sel.iter().enumerate() {
                dp[e] += dwt[j];
            }
        }
        let dot: f32 = p.iter().zip(&dp).map(|(a, b)| a * b).sum();
        for e in 0..n_exp {
            dlogits[tok * n_exp + e] = p[e] * (dp[e] - dot);
        }
    }
    let dl = be.upload(HostData::F32(&dlogits), DType::F32)?;
    be.gemm(Gemm { m: t, n: d, k: n_exp, ta: false, tb: false, alpha: 1.0, accumulate: true }, &dl, &ex.router, dxn)
}

/// The adapter with every packed expert tensor (PEFT's `mlp.experts[.base_layer].lora_{A,B}`)
/// replaced by per-expert adapters of the weights the base files hold:
/// `mlp.experts.{e}.gate_proj` and `up_proj` (the two row halves of `B_e`, the same `A_e`) and
/// `mlp.experts.{e}.down_proj`, so that a merge folds `s B_e A_e` into each.
pub fn unpack_expert_adapters(adapter: &[crate::trainer::NamedTensor], cfg: &crate::adapter::AdapterConfig) -> Result<Vec<crate::trainer::NamedTensor>> {
    use crate::trainer::NamedTensor;
    let targets = cfg.expert_targets();
    let mut out = Vec::new();
    for t in adapter {
        let Some(prefix) = t.name.strip_suffix(".lora_A.weight") else {
            if !(t.name.ends_with(".lora_B.weight") && (t.name.contains(".mlp.experts.lora_B") || t.name.contains(".mlp.experts.base_layer.lora_B"))) {
                out.push(t.clone());
            }
            continue;
        };
        let (layer, which) = if let Some(l) = prefix.strip_suffix(".mlp.experts.base_layer") {
            (l, GATE_UP)
        } else if let Some(l) = prefix.strip_suffix(".mlp.experts") {
            // The outer wrapper: down_proj when both are adapted, else the one adapted.
            (l, if targets == [GATE_UP] { GATE_UP } else { DOWN })
        } else {
            out.push(t.clone());
            continue;
        };
        let bad = |msg: String| EngineError::State { name: t.name.clone(), msg };
        let b = adapter.iter().find(|x| x.name == format!("{prefix}.lora_B.weight")).ok_or_else(|| bad("its lora_B is missing".into()))?;
        let r = cfg.r;
        let (er, in_f) = match t.shape[..] {
            [a, b] if r > 0 && a % r == 0 => (a, b),
            _ => return Err(bad(format!("shape {:?} is not [experts * r, in] with r {r}", t.shape))),
        };
        let n = er / r;
        let out_f = b.shape.first().copied().unwrap_or(0);
        if b.shape != [out_f, er] {
            return Err(bad(format!("lora_B {:?} does not fit lora_A {:?}", b.shape, t.shape)));
        }
        for e in 0..n {
            let a_e = t.data[e * r * in_f..(e + 1) * r * in_f].to_vec();
            let b_e = |rows: std::ops::Range<usize>| -> Vec<f32> { rows.flat_map(|o| (0..r).map(move |j| (o, j))).map(|(o, j)| b.data[o * er + j * n + e]).collect() };
            let parts: Vec<(&str, std::ops::Range<usize>)> =
                if which == GATE_UP { vec![("gate_proj", 0..out_f / 2), ("up_proj", out_f / 2..out_f)] } else { vec![("down_proj", 0..out_f)] };
            for (name, rows) in parts {
                let p = format!("{layer}.mlp.experts.{e}.{name}");
                let h = rows.len();
                out.push(NamedTensor { name: format!("{p}.lora_A.weight"), shape: vec![r, in_f], data: a_e.clone() });
                out.push(NamedTensor { name: format!("{p}.lora_B.weight"), shape: vec![h, r], data: b_e(rows) });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keeps_the_top_k_renormalised_and_breaks_ties_to_the_lower_expert() {
        let r = route(&[0.0, 2.0, 1.0, 2.0], 1, 4, 2, true);
        assert_eq!(r.sel, [1, 3], "equal logits: the lower expert first");
        assert!((r.weights[0] - 0.5).abs() < 1e-6 && (r.weights[1] - 0.5).abs() < 1e-6);
        let r = route(&[0.0, 2.0, 1.0, 0.5], 1, 4, 2, false);
        assert_eq!(r.sel, [1, 2]);
        assert!((r.weights[0] - r.probs[1]).abs() < 1e-7 && r.weights[0] + r.weights[1] < 1.0);
    }

    #[test]
    fn load_balancing_loss_pools_every_layers_rows() {
        let s = RouterStats::default();
        // Two layers of 2 rows, 2 experts, top-1: layer 0 picks expert 0 twice, layer 1 each once.
        s.record(0, vec![2.0, 0.0], vec![1.5, 0.5], 2);
        s.record(1, vec![1.0, 1.0], vec![1.0, 1.0], 2);
        // f = (3/4, 1/4), P = (2.5/4, 1.5/4): 2 * (0.75 * 0.625 + 0.25 * 0.375) = 1.125
        assert!((s.aux_loss() - 1.125).abs() < 1e-12, "{}", s.aux_loss());
        s.record(1, vec![1.0, 1.0], vec![1.0, 1.0], 2);
        assert!((s.aux_loss() - 1.125).abs() < 1e-12, "a recomputed layer replaces its entry");
        assert!(s.aux_grad().is_none(), "weight 0: no gradient");
        s.set_grad_weight(0.5);
        let g = s.aux_grad().unwrap();
        assert!((g[0] - 0.5 * 2.0 * 0.75 / 4.0).abs() < 1e-7, "{g:?}");
    }
}
