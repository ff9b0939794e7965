//! The CUDA flash attention's numerics on the CPU ([`super::CpuBackend::cuda_numerics`] at the
//! head dims `kernels/flash_attention.cu` serves): the same formulas as `attention.rs`, rounded to
//! bf16 exactly where the kernels round, so the emulated or real GPU is held to about 1e-3.
//!
//! Rounded: q, k, v, dout (the host casts them); in the forward, `exp(s - running max)` before
//! it multiplies v, with the running max taken over the kernel's key tiles (they start at the
//! first key the query tile sees and step by [`FLASH_BN`]; query tiles are [`FLASH_BM`] global
//! rows); in the backward, `p` before dv, and `ds` before dq and dk. Sums stay f32 (the kernels'
//! order differs, which is what the tolerance is for). Work is split per (document, kv head), as in
//! `attention.rs`, and each task writes only its own rows.

use rayon::prelude::*;

use crate::backend::Attn;

/// `flash_attention.cu`'s head dims and forward tiles (src/cuda/flash.rs holds them equal).
pub const FLASH_HEAD_DIMS: [usize; 3] = [64, 128, 256];
pub const FLASH_BM: usize = 64;
pub const FLASH_BN: usize = 64;

fn rb(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

// Tasks write disjoint rows (see module docs), through `SendPtr`.
use super::gemm::SendPtr as P;

/// Index of the document holding token `i`.
fn doc_of(cu: &[u32], i: usize) -> usize {
    cu.partition_point(|&s| s as usize <= i) - 1
}

/// The first key query `i` sees (its document's start, or its window's).
fn first_key(a: &Attn, cu: &[u32], i: usize) -> usize {
    let s = cu[doc_of(cu, i)] as usize;
    if a.window > 0 { s.max((i + 1).saturating_sub(a.window)) } else { s }
}

fn dot(x: &[f32], y: &[f32]) -> f32 {
    x.iter().zip(y).map(|(a, b)| a * b).sum()
}

fn round_all(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| rb(v)).collect()
}

/// Non-empty (document start, end, kv head) tasks.
fn tasks(a: &Attn, cu: &[u32]) -> Vec<(usize, usize, usize)> {
    (0..a.n_docs)
        .filter(|&d| cu[d + 1] > cu[d])
        .flat_map(|d| (0..a.n_kv_heads).map(move |g| (cu[d] as usize, cu[d + 1] as usize, g)))
        .collect()
}

pub fn forward(a: Attn, q: &[f32], k: &[f32], v: &[f32], cu: &[u32], out: &mut [f32], lse: &mut [f32]) {
    let (h, hkv, hd, t) = (a.n_heads, a.n_kv_heads, a.head_dim, a.tokens);
    let group = h / hkv;
    let (q, k, v) = (round_all(q), round_all(k), round_all(v));
    let (op, lp) = (P(out.as_mut_ptr()), P(lse.as_mut_ptr()));
    tasks(&a, cu).into_par_iter().for_each(|(s, e, g)| {
        let mut acc = vec![0f32; hd];
        for hq in g * group..(g + 1) * group {
            for i in s..e {
                let qi = &q[(i * h + hq) * hd..][..hd];
                let r0 = i / FLASH_BM * FLASH_BM;
                let kmin = first_key(&a, cu, r0);
                let first = first_key(&a, cu, i);
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                acc.fill(0.0);
                let mut j0 = kmin;
                while j0 <= i {
                    let (lo, hi) = (j0.max(first), (j0 + FLASH_BN - 1).min(i));
                    j0 += FLASH_BN;
                    if lo > hi {
                        continue;
                    }
                    let sc: Vec<f32> = (lo..=hi).map(|j| dot(qi, &k[(j * hkv + g) * hd..][..hd]) * a.scale).collect();
                    let mx = sc.iter().fold(m, |x, &y| x.max(y));
                    let base = if mx == f32::NEG_INFINITY { 0.0 } else { mx };
                    let alpha = (m - base).exp();
                    l *= alpha;
                    acc.iter_mut().for_each(|x| *x *= alpha);
                    m = mx;
                    for (jj, &sj) in sc.iter().enumerate() {
                        let p = (sj - base).exp();
                        l += p;
                        let p16 = rb(p);
                        let vj = &v[((lo + jj) * hkv + g) * hd..][..hd];
                        acc.iter_mut().zip(vj).for_each(|(x, y)| *x += p16 * y);
                    }
                }
                let inv = 1.0 / l;
                // SAFETY: row (i, hq) of out and lse belongs to this task.
                unsafe {
                    let o = std::slice::from_raw_parts_mut(op.get().add((i * h + hq) * hd), hd);
                    o.iter_mut().zip(&acc).for_each(|(x, y)| *x = y * inv);
                    *lp.get().add(hq * t + i) = m + l.ln();
                }
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn backward(a: Attn, q: &[f32], k: &[f32], v: &[f32], cu: &[u32], out: &[f32], lse: &[f32], dout: &[f32], dq: &mut [f32], dk: &mut [f32], dv: &mut [f32]) {
    let (h, hkv, hd, t) = (a.n_heads, a.n_kv_heads, a.head_dim, a.tokens);
    let group = h / hkv;
    let (q, k, v, dout) = (round_all(q), round_all(k), round_all(v), round_all(dout));
    let (dqp, dkp, dvp) = (P(dq.as_mut_ptr()), P(dk.as_mut_ptr()), P(dv.as_mut_ptr()));
    tasks(&a, cu).into_par_iter().for_each(|(s, e, g)| {
        let len = e - s;
        let (mut gk, mut gv) = (vec![0f32; len * hd], vec![0f32; len * hd]);
        let mut gq = vec![0f32; hd];
        for hq in g * group..(g + 1) * group {
            for i in s..e {
                let row = (i * h + hq) * hd;
                let (qi, doi) = (&q[row..][..hd], &dout[row..][..hd]);
                let delta = dot(&out[row..][..hd], doi);
                let l = lse[hq * t + i];
                gq.fill(0.0);
                for j in first_key(&a, cu, i)..=i {
                    let kv = (j * hkv + g) * hd;
                    let (kj, vj) = (&k[kv..][..hd], &v[kv..][..hd]);
                    let p = (dot(qi, kj) * a.scale - l).exp();
                    let ds = rb(p * (dot(doi, vj) - delta));
                    let p16 = rb(p);
                    let jj = (j - s) * hd;
                    for d in 0..hd {
                        gv[jj + d] += p16 * doi[d];
                        gk[jj + d] += ds * qi[d];
                        gq[d] += ds * kj[d];
                    }
                }
                // SAFETY: row (i, hq) of dq belongs to this task.
                let dqi = unsafe { std::slice::from_raw_parts_mut(dqp.get().add(row), hd) };
                dqi.iter_mut().zip(&gq).for_each(|(x, y)| *x = y * a.scale);
            }
        }
        for j in s..e {
            let kv = (j * hkv + g) * hd;
            // SAFETY: the dk/dv rows of (document, kv head g) belong to this task.
            let (dkj, dvj) = unsafe { (std::slice::from_raw_parts_mut(dkp.get().add(kv), hd), std::slice::from_raw_parts_mut(dvp.get().add(kv), hd)) };
            let jj = (j - s) * hd;
            for d in 0..hd {
                dkj[d] = gk[jj + d] * a.scale;
                dvj[d] = gv[jj + d];
            }
        }
    });
}
