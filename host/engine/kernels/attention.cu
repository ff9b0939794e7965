// Causal grouped-query attention over packed documents, flash style: scores live only in
// registers, a tile of 32 keys (or queries) at a time, so memory is linear in sequence length.
//   q, out, dout, dq [t, h, hd] f32; k, v, dk, dv [t, hkv, hd] f32;
//   lse, delta [h, t] f32; cu_seqlens [n_docs + 1] u32 (document starts, first 0, last t).
// Token i attends to tokens j of its own document with j <= i (and i - window < j when
// window > 0: a sliding window; tiles wholly outside it are skipped). Query head h uses kv head
// h / (h_total / hkv). hd <= 256 (8 values per lane). One warp owns one (token, head) row;
// ATT_WARPS warps per block share each shared-memory tile. No atomics: every sum runs in a
// fixed order, so results are bit-identical run to run.
#define ATT_WARPS 4
#define ATT_TILE 32
#define ATT_MAXC 8

// Dynamic shared memory: K tile, V tile [ATT_TILE][hd + 1], then q rows [ATT_WARPS][hd].
extern "C" __global__ void attention_fwd_f32(const float* q, const float* k, const float* v, const u32* cu,
                                             float* out, float* lse, int tokens, int n_docs, int heads,
                                             int kv_heads, int hd, float scale, int window) {
    DYNAMIC_SMEM(float, smem);
    const int ld = hd + 1;
    float* ks = smem;
    float* vs = ks + ATT_TILE * ld;
    float* qs = vs + ATT_TILE * ld;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const int t0 = blockIdx.x * ATT_WARPS;
    const int t = t0 + warp;
    const bool active = t < tokens;
    const int t_last = min(t0 + ATT_WARPS, tokens) - 1;
    int kmin = (int)cu[doc_of(cu, n_docs, t0)];
    if (window > 0) kmin = max(kmin, t0 - window + 1);
    const int my_start = active ? (int)cu[doc_of(cu, n_docs, t)] : 0;

    if (active)
        for (int d = lane; d < hd; d += 32) qs[warp * hd + d] = q[((size_t)t * heads + h) * hd + d];
    float o[ATT_MAXC];
    for (int c = 0; c < ATT_MAXC; ++c) o[c] = 0.0f;
    float m = NEG_INF, l = 0.0f;

    for (int j0 = kmin; j0 <= t_last; j0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * hd; e += blockDim.x) {
            const int jj = e / hd, d = e % hd, j = j0 + jj;
            float kv = 0.0f, vv = 0.0f;
            if (j < tokens) {
                const size_t off = ((size_t)j * kv_heads + hk) * hd + d;
                kv = k[off];
                vv = v[off];
            }
            ks[jj * ld + d] = kv;
            vs[jj * ld + d] = vv;
        }
        __syncthreads();
        if (!active) continue;
        const int j = j0 + lane;
        float s = NEG_INF;
        if (j >= my_start && j <= t && (window == 0 || j > t - window)) {
            float acc = 0.0f;
            for (int d = 0; d < hd; ++d) acc += qs[warp * hd + d] * ks[lane * ld + d];
            s = acc * scale;
        }
        const float m_new = fmaxf(m, warp_max(s));
        if (m_new == NEG_INF) continue;
        const float p = (s == NEG_INF) ? 0.0f : expf(s - m_new);
        const float alpha = (m == NEG_INF) ? 0.0f : expf(m - m_new);
        l = l * alpha + warp_sum(p);
        for (int c = 0; c < ATT_MAXC; ++c) o[c] *= alpha;
        for (int jj = 0; jj < ATT_TILE; ++jj) {
            const float pj = __shfl_sync(0xffffffffu, p, jj);
            if (pj == 0.0f) continue;
            for (int c = 0; c < ATT_MAXC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) o[c] += pj * vs[jj * ld + d];
            }
        }
        m = m_new;
    }
    if (!active) return;
    const float inv_l = 1.0f / l;
    for (int c = 0; c < ATT_MAXC; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) out[((size_t)t * heads + h) * hd + d] = o[c] * inv_l;
    }
    if (lane == 0) lse[(size_t)h * tokens + t] = m + logf(l);
}

// delta[h, t] = sum_d dout[t, h, d] * out[t, h, d]; one warp per (t, h).
extern "C" __global__ void attention_bwd_delta_f32(const float* out, const float* dout, float* delta, int tokens,
                                                   int heads, int hd) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= tokens * heads) return;
    const int t = row / heads, h = row % heads;
    float acc = 0.0f;
    for (int d = lane; d < hd; d += 32) acc += out[(size_t)row * hd + d] * dout[(size_t)row * hd + d];
    acc = warp_sum(acc);
    if (lane == 0) delta[(size_t)h * tokens + t] = acc;
}

// dq: one warp per query (t, h), keys of its document up to t.
// Shared: K tile, V tile [ATT_TILE][hd + 1], q rows and dout rows [ATT_WARPS][hd].
extern "C" __global__ void attention_bwd_dq_f32(const float* q, const float* k, const float* v, const u32* cu,
                                                const float* lse, const float* delta, const float* dout, float* dq,
                                                int tokens, int n_docs, int heads, int kv_heads, int hd, float scale,
                                                int window) {
    DYNAMIC_SMEM(float, smem);
    const int ld = hd + 1;
    float* ks = smem;
    float* vs = ks + ATT_TILE * ld;
    float* qs = vs + ATT_TILE * ld;
    float* dos = qs + ATT_WARPS * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const int t0 = blockIdx.x * ATT_WARPS;
    const int t = t0 + warp;
    const bool active = t < tokens;
    const int t_last = min(t0 + ATT_WARPS, tokens) - 1;
    int kmin = (int)cu[doc_of(cu, n_docs, t0)];
    if (window > 0) kmin = max(kmin, t0 - window + 1);
    const int my_start = active ? (int)cu[doc_of(cu, n_docs, t)] : 0;
    float my_lse = 0.0f, my_delta = 0.0f;
    if (active) {
        for (int d = lane; d < hd; d += 32) {
            qs[warp * hd + d] = q[((size_t)t * heads + h) * hd + d];
            dos[warp * hd + d] = dout[((size_t)t * heads + h) * hd + d];
        }
        my_lse = lse[(size_t)h * tokens + t];
        my_delta = delta[(size_t)h * tokens + t];
    }
    float acc[ATT_MAXC];
    for (int c = 0; c < ATT_MAXC; ++c) acc[c] = 0.0f;

    for (int j0 = kmin; j0 <= t_last; j0 += ATT_TILE) {
        __syncthreads();
        for (int e = threadIdx.x; e < ATT_TILE * hd; e += blockDim.x) {
            const int jj = e / hd, d = e % hd, j = j0 + jj;
            float kv = 0.0f, vv = 0.0f;
            if (j < tokens) {
                const size_t off = ((size_t)j * kv_heads + hk) * hd + d;
                kv = k[off];
                vv = v[off];
            }
            ks[jj * ld + d] = kv;
            vs[jj * ld + d] = vv;
        }
        __syncthreads();
        if (!active) continue;
        const int j = j0 + lane;
        float ds = 0.0f;
        if (j >= my_start && j <= t && (window == 0 || j > t - window)) {
            float s = 0.0f, dp = 0.0f;
            for (int d = 0; d < hd; ++d) {
                s += qs[warp * hd + d] * ks[lane * ld + d];
                dp += dos[warp * hd + d] * vs[lane * ld + d];
            }
            const float p = expf(s * scale - my_lse);
            ds = p * (dp - my_delta);
        }
        for (int jj = 0; jj < ATT_TILE; ++jj) {
            const float dsj = __shfl_sync(0xffffffffu, ds, jj);
            if (dsj == 0.0f) continue;
            for (int c = 0; c < ATT_MAXC; ++c) {
                const int d = lane + 32 * c;
                if (d < hd) acc[c] += dsj * ks[jj * ld + d];
            }
        }
    }
    if (!active) return;
    for (int c = 0; c < ATT_MAXC; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) dq[((size_t)t * heads + h) * hd + d] = acc[c] * scale;
    }
}

// dk, dv: one warp per key (j, kv head), every query head of its group, queries of its
// document at or after j. Shared: q tile, dout tile [ATT_TILE][hd + 1], lse and delta of the
// tile [ATT_TILE] each, then k rows and v rows [ATT_WARPS][hd].
extern "C" __global__ void attention_bwd_dkv_f32(const float* q, const float* k, const float* v, const u32* cu,
                                                 const float* lse, const float* delta, const float* dout, float* dk,
                                                 float* dv, int tokens, int n_docs, int heads, int kv_heads, int hd,
                                                 float scale, int window) {
    DYNAMIC_SMEM(float, smem);
    const int ld = hd + 1;
    float* qs = smem;
    float* dos = qs + ATT_TILE * ld;
    float* lses = dos + ATT_TILE * ld;
    float* deltas = lses + ATT_TILE;
    float* kr = deltas + ATT_TILE;
    float* vr = kr + ATT_WARPS * hd;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int hk = blockIdx.y, group = heads / kv_heads;
    const int j0b = blockIdx.x * ATT_WARPS;
    const int j = j0b + warp;
    const bool active = j < tokens;
    const int j_last = min(j0b + ATT_WARPS, tokens) - 1;
    int qmax = (int)cu[doc_of(cu, n_docs, j_last) + 1];  // exclusive end of the last key's doc
    if (window > 0) qmax = min(qmax, j_last + window);
    const int my_end = active ? (int)cu[doc_of(cu, n_docs, j) + 1] : 0;
    if (active)
        for (int d = lane; d < hd; d += 32) {
            kr[warp * hd + d] = k[((size_t)j * kv_heads + hk) * hd + d];
            vr[warp * hd + d] = v[((size_t)j * kv_heads + hk) * hd + d];
        }
    float dka[ATT_MAXC], dva[ATT_MAXC];
    for (int c = 0; c < ATT_MAXC; ++c) dka[c] = dva[c] = 0.0f;

    for (int g = 0; g < group; ++g) {
        const int h = hk * group + g;
        for (int i0 = j0b; i0 < qmax; i0 += ATT_TILE) {
            __syncthreads();
            for (int e = threadIdx.x; e < ATT_TILE * hd; e += blockDim.x) {
                const int ii = e / hd, d = e % hd, i = i0 + ii;
                float qv = 0.0f, dov = 0.0f;
                if (i < tokens) {
                    const size_t off = ((size_t)i * heads + h) * hd + d;
                    qv = q[off];
                    dov = dout[off];
                }
                qs[ii * ld + d] = qv;
                dos[ii * ld + d] = dov;
            }
            for (int ii = threadIdx.x; ii < ATT_TILE; ii += blockDim.x) {
                const int i = i0 + ii;
                lses[ii] = i < tokens ? lse[(size_t)h * tokens + i] : 0.0f;
                deltas[ii] = i < tokens ? delta[(size_t)h * tokens + i] : 0.0f;
            }
            __syncthreads();
            if (!active) continue;
            const int i = i0 + lane;
            float p = 0.0f, ds = 0.0f;
            if (i >= j && i < my_end && (window == 0 || i < j + window)) {
                float s = 0.0f, dp = 0.0f;
                for (int d = 0; d < hd; ++d) {
                    s += qs[lane * ld + d] * kr[warp * hd + d];
                    dp += dos[lane * ld + d] * vr[warp * hd + d];
                }
                p = expf(s * scale - lses[lane]);
                ds = p * (dp - deltas[lane]);
            }
            for (int ii = 0; ii < ATT_TILE; ++ii) {
                const float pi = __shfl_sync(0xffffffffu, p, ii);
                const float dsi = __shfl_sync(0xffffffffu, ds, ii);
                if (pi == 0.0f && dsi == 0.0f) continue;
                for (int c = 0; c < ATT_MAXC; ++c) {
                    const int d = lane + 32 * c;
                    if (d < hd) {
                        dva[c] += pi * dos[ii * ld + d];
                        dka[c] += dsi * qs[ii * ld + d];
                    }
                }
            }
        }
    }
    if (!active) return;
    for (int c = 0; c < ATT_MAXC; ++c) {
        const int d = lane + 32 * c;
        if (d < hd) {
            dk[((size_t)j * kv_heads + hk) * hd + d] = dka[c] * scale;
            dv[((size_t)j * kv_heads + hk) * hd + d] = dva[c];
        }
    }
}
