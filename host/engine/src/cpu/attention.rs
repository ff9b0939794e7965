//! Causal GQA attention over packed documents on the CPU, fp32.
//!
//! One parallel task per (document, key/value head); inside it, the query heads of that group
//! are processed one after another in blocks of `QBLOCK` query rows. A block's scores
//! `[QBLOCK, keys]` are the only quadratic buffer (never the whole `[L, L]`). Each task writes
//! only its own rows of `out`/`lse`/`dq` and its own `dk`/`dv` rows, so results do not depend on
//! the thread count. With a sliding window a block only multiplies the keys its rows can see
//! (from `k0`), so the cost is linear in the document length.

use rayon::prelude::*;

use super::gemm::{View, sgemm_strided};
use crate::backend::Attn;

const QBLOCK: usize = 64;

// Tasks write disjoint rows (see module docs), through `SendPtr`.
use super::gemm::SendPtr as P;

/// The first key (within its document) that the query at document position `i` sees.
fn first_key(a: &Attn, i: usize) -> usize {
    if a.window > 0 { (i + 1).saturating_sub(a.window) } else { 0 }
}

/// All tasks: (doc start, doc end, kv head).
fn tasks(a: &Attn, cu: &[u32]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::with_capacity(a.n_docs * a.n_kv_heads);
    for d in 0..a.n_docs {
        let (s, e) = (cu[d] as usize, cu[d + 1] as usize);
        if e > s {
            for g in 0..a.n_kv_heads {
                out.push((s, e, g));
            }
        }
    }
    out
}

pub fn forward(a: Attn, q: &[f32], k: &[f32], v: &[f32], cu: &[u32], out: &mut [f32], lse: &mut [f32]) {
    let (h, hkv, hd, t) = (a.n_heads, a.n_kv_heads, a.head_dim, a.tokens);
    let group = h / hkv;
    let (op, lp) = (P(out.as_mut_ptr()), P(lse.as_mut_ptr()));
    tasks(&a, cu).into_par_iter().for_each(|(s, e, g)| {
        let len = e - s;
        let mut scores = vec![0f32; QBLOCK * len];
        for hq in g * group..(g + 1) * group {
            for q0 in (0..len).step_by(QBLOCK) {
                let q1 = (q0 + QBLOCK).min(len);
                let k0 = first_key(&a, q0);
                let (rows, keys) = (q1 - q0, q1 - k0); // keys k0..q1 of this doc are visible to some row
                let sc = &mut scores[..rows * keys];
                // scores = scale * Q_blk @ K^T
                sgemm_strided(
                    rows,
                    keys,
                    hd,
                    a.scale,
                    &q[((s + q0) * h + hq) * hd..],
                    View { rs: (h * hd) as isize, cs: 1 },
                    &k[((s + k0) * hkv + g) * hd..],
                    View { rs: 1, cs: (hkv * hd) as isize },
                    0.0,
                    sc,
                    View { rs: keys as isize, cs: 1 },
                );
                for i in 0..rows {
                    let row = &mut sc[i * keys..(i + 1) * keys];
                    let (lo, hi) = (first_key(&a, q0 + i) - k0, q0 + i + 1 - k0);
                    let mx = row[lo..hi].iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                    let mut sum = 0f32;
                    for x in row[lo..hi].iter_mut() {
                        *x = (*x - mx).exp();
                        sum += *x;
                    }
                    let inv = 1.0 / sum;
                    for x in row[lo..hi].iter_mut() {
                        *x *= inv;
                    }
                    row[..lo].fill(0.0);
                    row[hi..].fill(0.0);
                    // SAFETY: lse row (hq, s+q0+i) belongs to this task.
                    unsafe { *lp.get().add(hq * t + s + q0 + i) = mx + sum.ln() };
                }
                // out_blk = P @ V
                // SAFETY: rows s+q0..s+q1 of head hq belong to this task.
                let out_blk = unsafe {
                    std::slice::from_raw_parts_mut(op.get().add(((s + q0) * h + hq) * hd), (rows - 1) * h * hd + hd)
                };
                sgemm_strided(
                    rows,
                    hd,
                    keys,
                    1.0,
                    sc,
                    View { rs: keys as isize, cs: 1 },
                    &v[((s + k0) * hkv + g) * hd..],
                    View { rs: (hkv * hd) as isize, cs: 1 },
                    0.0,
                    out_blk,
                    View { rs: (h * hd) as isize, cs: 1 },
                );
            }
        }
    });
}

#[allow(clippy::too_many_arguments)]
pub fn backward(
    a: Attn,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    cu: &[u32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (h, hkv, hd, t) = (a.n_heads, a.n_kv_heads, a.head_dim, a.tokens);
    let group = h / hkv;
    dk.fill(0.0);
    dv.fill(0.0);
    let (dqp, dkp, dvp) = (P(dq.as_mut_ptr()), P(dk.as_mut_ptr()), P(dv.as_mut_ptr()));
    tasks(&a, cu).into_par_iter().for_each(|(s, e, g)| {
        let len = e - s;
        let mut p = vec![0f32; QBLOCK * len];
        let mut dp = vec![0f32; QBLOCK * len];
        let kv_len = (len - 1) * hkv * hd + hd;
        // SAFETY: the dk/dv rows of (doc, kv head g) belong to this task only.
        let dk_doc = unsafe { std::slice::from_raw_parts_mut(dkp.get().add((s * hkv + g) * hd), kv_len) };
        let dv_doc = unsafe { std::slice::from_raw_parts_mut(dvp.get().add((s * hkv + g) * hd), kv_len) };
        let kv_view = View { rs: (hkv * hd) as isize, cs: 1 };
        let q_view = View { rs: (h * hd) as isize, cs: 1 };
        for hq in g * group..(g + 1) * group {
            for q0 in (0..len).step_by(QBLOCK) {
                let q1 = (q0 + QBLOCK).min(len);
                let k0 = first_key(&a, q0);
                let (rows, keys) = (q1 - q0, q1 - k0);
                let qoff = ((s + q0) * h + hq) * hd;
                let koff = ((s + k0) * hkv + g) * hd;
                let pb = &mut p[..rows * keys];
                sgemm_strided(
                    rows, keys, hd, a.scale,
                    &q[qoff..], q_view,
                    &k[koff..], View { rs: 1, cs: (hkv * hd) as isize },
                    0.0, pb, View { rs: keys as isize, cs: 1 },
                );
                // dp = dO_blk @ V^T
                let dpb = &mut dp[..rows * keys];
                sgemm_strided(
                    rows, keys, hd, 1.0,
                    &dout[qoff..], q_view,
                    &v[koff..], View { rs: 1, cs: (hkv * hd) as isize },
                    0.0, dpb, View { rs: keys as isize, cs: 1 },
                );
                for i in 0..rows {
                    let ti = s + q0 + i;
                    let l = lse[hq * t + ti];
                    let (lo, hi) = (first_key(&a, q0 + i) - k0, q0 + i + 1 - k0);
                    let o = &out[(ti * h + hq) * hd..][..hd];
                    let dorow = &dout[(ti * h + hq) * hd..][..hd];
                    let di: f32 = o.iter().zip(dorow).map(|(x, y)| x * y).sum();
                    let prow = &mut pb[i * keys..(i + 1) * keys];
                    let dprow = &mut dpb[i * keys..(i + 1) * keys];
                    for j in lo..hi {
                        let pj = (prow[j] - l).exp();
                        prow[j] = pj;
                        dprow[j] = pj * (dprow[j] - di) * a.scale; // dS (includes the score scale)
                    }
                    for row in [prow, dprow] {
                        row[..lo].fill(0.0);
                        row[hi..].fill(0.0);
                    }
                }
                // dv[keys] += P^T @ dO_blk
                sgemm_strided(
                    keys, hd, rows, 1.0,
                    pb, View { rs: 1, cs: keys as isize },
                    &dout[qoff..], q_view,
                    1.0, &mut dv_doc[k0 * hkv * hd..], kv_view,
                );
                // dk[keys] += dS^T @ Q_blk
                sgemm_strided(
                    keys, hd, rows, 1.0,
                    dpb, View { rs: 1, cs: keys as isize },
                    &q[qoff..], q_view,
                    1.0, &mut dk_doc[k0 * hkv * hd..], kv_view,
                );
                // dq_blk = dS @ K
                // SAFETY: dq rows of head hq in this block belong to this task.
                let dq_blk = unsafe { std::slice::from_raw_parts_mut(dqp.get().add(qoff), (rows - 1) * h * hd + hd) };
                sgemm_strided(
                    rows, hd, keys, 1.0,
                    dpb, View { rs: keys as isize, cs: 1 },
                    &k[koff..], kv_view,
                    0.0, dq_blk, q_view,
                );
            }
        }
    });
}
