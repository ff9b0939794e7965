//! Plain float64 implementations of every op's formula, written from the [`Backend`] docs and
//! nothing else (no shared code with a backend): the oracle of `selftest --device cpu`.
//! Shapes as in `crate::backend`: `t` tokens, `h`/`hkv` heads, `hd` head dim, `v` vocabulary.

use crate::backend::{Attn, CrossEntropy, IGNORE_TARGET, dropout_keep};

/// `c[m,n] = alpha * op(a) @ op(b) (+ c0)`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(m: usize, n: usize, k: usize, ta: bool, tb: bool, alpha: f64, a: &[f64], b: &[f64], c0: Option<&[f64]>) -> Vec<f64> {
    let mut c = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for p in 0..k {
                let av = if ta { a[p * m + i] } else { a[i * k + p] };
                let bv = if tb { b[j * k + p] } else { b[p * n + j] };
                acc += av * bv;
            }
            c[i * n + j] = alpha * acc + c0.map_or(0.0, |c0| c0[i * n + j]);
        }
    }
    c
}

/// RMSNorm forward: (y, rstd).
pub fn rmsnorm_fwd(x: &[f64], w: &[f64], rows: usize, dim: usize, eps: f64) -> (Vec<f64>, Vec<f64>) {
    let mut y = vec![0.0; rows * dim];
    let mut rstd = vec![0.0; rows];
    for r in 0..rows {
        let xr = &x[r * dim..(r + 1) * dim];
        let ms = xr.iter().map(|v| v * v).sum::<f64>() / dim as f64;
        rstd[r] = 1.0 / (ms + eps).sqrt();
        for i in 0..dim {
            y[r * dim + i] = xr[i] * rstd[r] * w[i];
        }
    }
    (y, rstd)
}

/// RMSNorm input gradient: `dx = rstd * (w*dy - xhat * mean(w*dy*xhat))`.
pub fn rmsnorm_bwd(dy: &[f64], x: &[f64], w: &[f64], rows: usize, dim: usize, eps: f64) -> Vec<f64> {
    let (_, rstd) = rmsnorm_fwd(x, w, rows, dim, eps);
    let mut dx = vec![0.0; rows * dim];
    for r in 0..rows {
        let s = rstd[r];
        let mean = (0..dim).map(|i| w[i] * dy[r * dim + i] * x[r * dim + i] * s).sum::<f64>() / dim as f64;
        for i in 0..dim {
            dx[r * dim + i] = s * (w[i] * dy[r * dim + i] - x[r * dim + i] * s * mean);
        }
    }
    dx
}

/// Rotate-half RoPE; `inverse` rotates by the negative angle. The angle `pos * inv_freq` is
/// formed in f32, as Hugging Face forms it (in f64 it differs by up to ulp(angle) at long
/// positions); sin and cos are then taken in f64.
pub fn rope(x: &[f64], pos: &[u32], inv_freq: &[f32], t: usize, heads: usize, hd: usize, inverse: bool) -> Vec<f64> {
    rope_partial(x, pos, inv_freq, t, heads, hd, hd, 1.0, inverse)
}

/// [`rope`] on the first `rd` dims of each head (pairs `(i, i + rd/2)`; the rest pass
/// through), cos and sin scaled by `scale`.
#[allow(clippy::too_many_arguments)]
pub fn rope_partial(x: &[f64], pos: &[u32], inv_freq: &[f32], t: usize, heads: usize, hd: usize, rd: usize, scale: f64, inverse: bool) -> Vec<f64> {
    let half = rd / 2;
    let mut y = x.to_vec();
    for (tt, &p) in pos.iter().enumerate().take(t) {
        for h in 0..heads {
            let base = (tt * heads + h) * hd;
            for i in 0..half {
                let ang = f64::from(p as f32 * inv_freq[i]);
                let (s, c) = ang.sin_cos();
                let (s, c) = (s * scale, c * scale);
                let s = if inverse { -s } else { s };
                let (a, b) = (x[base + i], x[base + i + half]);
                y[base + i] = a * c - b * s;
                y[base + i + half] = b * c + a * s;
            }
        }
    }
    y
}

fn doc_range(cu: &[u32], t: usize) -> (usize, usize) {
    let d = cu.iter().rposition(|&s| s as usize <= t).expect("cu_seqlens starts at 0");
    (cu[d] as usize, cu[d + 1] as usize)
}

/// The first key query `i` sees: its document's start, or the window's (`i - window < j`).
fn visible_from(a: &Attn, cu: &[u32], i: usize) -> usize {
    let (start, _) = doc_range(cu, i);
    if a.window > 0 { start.max((i + 1).saturating_sub(a.window)) } else { start }
}

/// Causal GQA attention over packed documents, naive: (out [t,h,hd], lse [h,t]).
pub fn attention_fwd(a: &Attn, q: &[f64], k: &[f64], v: &[f64], cu: &[u32]) -> (Vec<f64>, Vec<f64>) {
    let (t, h, hkv, hd) = (a.tokens, a.n_heads, a.n_kv_heads, a.head_dim);
    let group = h / hkv;
    let mut out = vec![0.0; t * h * hd];
    let mut lse = vec![0.0; h * t];
    for i in 0..t {
        let start = visible_from(a, cu, i);
        for hh in 0..h {
            let hk = hh / group;
            let qi = &q[(i * h + hh) * hd..][..hd];
            let s: Vec<f64> = (start..=i)
                .map(|j| a.scale as f64 * qi.iter().zip(&k[(j * hkv + hk) * hd..][..hd]).map(|(x, y)| x * y).sum::<f64>())
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = s.iter().map(|x| (x - mx).exp()).sum();
            lse[hh * t + i] = mx + sum.ln();
            for (jj, j) in (start..=i).enumerate() {
                let p = (s[jj] - lse[hh * t + i]).exp();
                for d in 0..hd {
                    out[(i * h + hh) * hd + d] += p * v[(j * hkv + hk) * hd + d];
                }
            }
        }
    }
    (out, lse)
}

/// Attention backward, naive: (dq, dk, dv).
pub fn attention_bwd(a: &Attn, q: &[f64], k: &[f64], v: &[f64], cu: &[u32], dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (t, h, hkv, hd) = (a.tokens, a.n_heads, a.n_kv_heads, a.head_dim);
    let group = h / hkv;
    let scale = a.scale as f64;
    let (out, lse) = attention_fwd(a, q, k, v, cu);
    let (mut dq, mut dk, mut dv) = (vec![0.0; t * h * hd], vec![0.0; t * hkv * hd], vec![0.0; t * hkv * hd]);
    for i in 0..t {
        let start = visible_from(a, cu, i);
        for hh in 0..h {
            let hk = hh / group;
            let row = (i * h + hh) * hd;
            let delta: f64 = (0..hd).map(|d| dout[row + d] * out[row + d]).sum();
            for j in start..=i {
                let kr = (j * hkv + hk) * hd;
                let s = scale * (0..hd).map(|d| q[row + d] * k[kr + d]).sum::<f64>();
                let p = (s - lse[hh * t + i]).exp();
                let dp: f64 = (0..hd).map(|d| dout[row + d] * v[kr + d]).sum();
                let ds = p * (dp - delta);
                for d in 0..hd {
                    dv[kr + d] += p * dout[row + d];
                    dq[row + d] += ds * k[kr + d] * scale;
                    dk[kr + d] += ds * q[row + d] * scale;
                }
            }
        }
    }
    (dq, dk, dv)
}

fn sigmoid(g: f64) -> f64 {
    1.0 / (1.0 + (-g).exp())
}

pub fn swiglu_fwd(gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter().zip(up).map(|(&g, &u)| g * sigmoid(g) * u).collect()
}

/// (dgate, dup).
pub fn swiglu_bwd(gate: &[f64], up: &[f64], dh: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut dg = vec![0.0; gate.len()];
    let mut du = vec![0.0; gate.len()];
    for i in 0..gate.len() {
        let (g, s) = (gate[i], sigmoid(gate[i]));
        dg[i] = dh[i] * up[i] * s * (1.0 + g * (1.0 - s));
        du[i] = dh[i] * g * s;
    }
    (dg, du)
}

/// `gelu_pytorch_tanh(g)` and its derivative, in f64.
fn gelu_tanh(g: f64) -> (f64, f64) {
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let t = (c * (g + 0.044715 * g * g * g)).tanh();
    (0.5 * g * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * g * g))
}

pub fn geglu_fwd(gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.iter().zip(up).map(|(&g, &u)| gelu_tanh(g).0 * u).collect()
}

/// (dgate, dup).
pub fn geglu_bwd(gate: &[f64], up: &[f64], dh: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let mut dg = vec![0.0; gate.len()];
    let mut du = vec![0.0; gate.len()];
    for i in 0..gate.len() {
        let (a, da) = gelu_tanh(gate[i]);
        dg[i] = dh[i] * up[i] * da;
        du[i] = dh[i] * a;
    }
    (dg, du)
}

/// (loss summed over target rows, dhidden of `grad_scale * loss`).
pub fn linear_cross_entropy(c: &CrossEntropy, hidden: &[f64], w: &[f64], targets: &[u32]) -> (f64, Vec<f64>) {
    let (t, d, v) = (c.tokens, c.dim, c.vocab);
    let mut total = 0.0;
    let mut dh = vec![0.0; t * d];
    for i in 0..t {
        if targets[i] == IGNORE_TARGET {
            continue;
        }
        let z: Vec<f64> = (0..v)
            .map(|o| c.logit_scale as f64 * (0..d).map(|e| hidden[i * d + e] * w[o * d + e]).sum::<f64>())
            .collect();
        let mx = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = mx + z.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
        let tg = targets[i] as usize;
        total += lse - z[tg];
        for o in 0..v {
            let dz = c.grad_scale as f64 * c.logit_scale as f64 * ((z[o] - lse).exp() - if o == tg { 1.0 } else { 0.0 });
            for e in 0..d {
                dh[i * d + e] += dz * w[o * d + e];
            }
        }
    }
    (total, dh)
}

pub fn dropout(x: &[f64], p: f32, seed: u64) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| if dropout_keep(seed, i as u64, p) { v / (1.0 - p as f64) } else { 0.0 })
        .collect()
}

/// `norm[o] = || w[o,:] + scale * (b @ a)[o,:] ||`.
pub fn dora_weight_norm(w: &[f64], a: &[f64], b: &[f64], scale: f64, out_f: usize, in_f: usize, r: usize) -> Vec<f64> {
    (0..out_f)
        .map(|o| {
            (0..in_f)
                .map(|i| {
                    let ba: f64 = (0..r).map(|q| b[o * r + q] * a[q * in_f + i]).sum();
                    let x = w[o * in_f + i] + scale * ba;
                    x * x
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect()
}

/// One torch AdamW update: (param, m, v).
#[allow(clippy::too_many_arguments)]
pub fn adamw(o: &crate::backend::AdamW, p: &[f64], g: &[f64], m: &[f64], v: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (lr, b1, b2, eps, wd) = (o.lr as f64, o.beta1 as f64, o.beta2 as f64, o.eps as f64, o.weight_decay as f64);
    let bc1 = 1.0 - b1.powi(o.step as i32);
    let bc2 = 1.0 - b2.powi(o.step as i32);
    let (mut p2, mut m2, mut v2) = (p.to_vec(), m.to_vec(), v.to_vec());
    for i in 0..p.len() {
        let gi = g[i] * o.grad_scale as f64;
        p2[i] *= 1.0 - lr * wd;
        m2[i] = b1 * m[i] + (1.0 - b1) * gi;
        v2[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
        p2[i] -= lr / bc1 * m2[i] / (v2[i].sqrt() / bc2.sqrt() + eps);
    }
    (p2, m2, v2)
}

/// Central finite differences of a scalar function at `coords` of `x`.
pub fn finite_diff(x: &[f64], coords: &[usize], f: impl Fn(&[f64]) -> f64) -> Vec<f64> {
    let mut x = x.to_vec();
    coords
        .iter()
        .map(|&i| {
            let h = 1e-5 * x[i].abs().max(1.0);
            let x0 = x[i];
            x[i] = x0 + h;
            let fp = f(&x);
            x[i] = x0 - h;
            let fm = f(&x);
            x[i] = x0;
            (fp - fm) / (2.0 * h)
        })
        .collect()
}
