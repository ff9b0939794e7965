// Causal grouped-query attention over packed documents on tensor cores (FA2 style), for head
// dims 64, 128 and 256 (attention.cu, f32 on CUDA cores, stays the reference and serves the rest).
//   q, dout [t, h, hd] bf16; k, v [t, hkv, hd] bf16; out, dq [t, h, hd] f32; dk, dv [t, hkv, hd] f32;
//   lse, delta [h, t] f32; cu_seqlens [n_docs + 1] u32 (document starts, first 0, last t).
// Query i sees key j iff both lie in one document, j <= i, and (window > 0) i - window < j.
// Query head h uses kv head h / (h_total / hkv).
//   s = scale * q_i . k_j;  lse_i = log sum_j exp(s_ij);  out_i = sum_j exp(s_ij - lse_i) v_j
//   backward: p = exp(s - lse), dp = dout_i . v_j, delta_i = sum_d dout_i,d out_i,d,
//             ds = p (dp - delta_i); dv_j = sum_i p dout_i; dk_j = scale sum_i ds q_i;
//             dq_i = scale sum_j ds k_j.
// Products are mma.sync m16n8k16 bf16 with f32 accumulation; the softmax is online, in f32
// registers. What is rounded to bf16 (CpuBackend::cuda_numerics rounds at the same places): q, k,
// v, dout (the host casts them), the forward's exp(s - running max) before P.V, and in the
// backward p before dv and ds before dq and dk.
// Tiles are global: query tile b holds tokens [b BM, b BM + BM) whatever their documents, and
// its key tiles start at the first key any of its rows sees (kmin) and run in steps of BN up to
// its last row, so no tile lies wholly before every row's document or window; per-element
// masks do the rest. Each warp owns 16 rows of a tile; K/V (or Q/dO) tiles are double-buffered
// through cp.async and read with ldmatrix. Shared tiles are [rows][hd + FLASH_PAD] bf16: the pad
// keeps rows 16-byte aligned and spreads ldmatrix's 8 row addresses over the banks.
// Deterministic: no atomics. dk/dv of one key are summed by one thread over its group's query
// heads and the query tiles in a fixed order (flash_bwd_dkv); dq is a separate pass
// (flash_bwd_dq). The host (src/cuda/flash.rs) holds these constants equal to its own.
#define FLASH_WARPS 4
#define FLASH_BM 64
#define FLASH_BN 64
#define FLASH_BWD_BN 32
#define FLASH_PAD 8

// Two floats as a bf16x2 register (low half first), as mma's A operand takes them.
__device__ __forceinline__ u32 fa_pack(float lo, float hi) {
    return (u32)__bfloat16_as_ushort(__float2bfloat16(lo)) | ((u32)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}

// rows [r0, r0 + rows) of head `head` of a [tokens, heads, HD] bf16 tensor into dst
// [rows][HD + FLASH_PAD] by cp.async; rows outside [0, tokens) are zero-filled.
template <int HD>
__device__ __forceinline__ void fa_load(bf16* dst, const bf16* src, int r0, int rows, int tokens, int heads, int head) {
    constexpr int CH = HD / 8;
    for (int c = threadIdx.x; c < rows * CH; c += blockDim.x) {
        const int r = c / CH, col = (c % CH) * 8, row = r0 + r;
        const bool ok = row >= 0 && row < tokens;
        cp_async_cg(dst + r * (HD + FLASH_PAD) + col, ok ? src + ((size_t)row * heads + head) * HD + col : src, ok ? 16 : 0);
    }
}

// Double buffering of K/V tiles: starts the copy of tile `it + 1` (rows from j0 + BN) into the
// buffer tile `it` does not use, then waits until tile `it` has landed (the last tile waits for all).
template <int HD, int BN>
__device__ __forceinline__ void fa_next_kv(bf16* ks, bf16* vs, const bf16* k, const bf16* v, int it, int n_tiles, int j0,
                                           int tokens, int kv_heads, int hk) {
    if (it + 1 < n_tiles) {
        const int nb = (it + 1) & 1;
        fa_load<HD>(ks + nb * BN * (HD + FLASH_PAD), k, j0 + BN, BN, tokens, kv_heads, hk);
        fa_load<HD>(vs + nb * BN * (HD + FLASH_PAD), v, j0 + BN, BN, tokens, kv_heads, hk);
        cp_async_commit();
        cp_async_wait<1>();
    } else {
        cp_async_wait<0>();
    }
}

// mma A operand: rows [r0, r0 + 16), columns [k0, k0 + 16) of a row-major tile.
__device__ __forceinline__ void fa_a(u32 a[4], const bf16* tile, int ld, int r0, int k0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(a, tile + (r0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8);
}

// mma B operands of X . T^T for the two 8-column blocks n0, n0 + 8, where T's rows are the
// columns (K as [key][d]): b[0..1] for n0, b[2..3] for n0 + 8; k from k0.
__device__ __forceinline__ void fa_bt(u32 b[4], const bf16* tile, int ld, int n0, int k0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4(b, tile + (n0 + (lane >> 4) * 8 + (lane & 7)) * ld + k0 + ((lane >> 3) & 1) * 8);
}

// mma B operands of X . T, where T's rows are k (V as [key][d]): columns n0 and n0 + 8.
__device__ __forceinline__ void fa_bn(u32 b[4], const bf16* tile, int ld, int k0, int n0) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4_trans(b, tile + (k0 + ((lane >> 3) & 1) * 8 + (lane & 7)) * ld + n0 + (lane >> 4) * 8);
}

// acc[N/8][4] (16 x N, accumulator layout) += rows [r0, r0 + 16) of A . T^T over all HD.
template <int HD, int N>
__device__ __forceinline__ void fa_qkt(float acc[][4], const bf16* a_tile, int r0, const bf16* t_tile) {
    constexpr int LD = HD + FLASH_PAD;
    for (int kk = 0; kk < HD; kk += 16) {
        u32 a[4];
        fa_a(a, a_tile, LD, r0, kk);
        for (int nb = 0; nb < N / 8; nb += 2) {
            u32 b[4];
            fa_bt(b, t_tile, LD, nb * 8, kk);
            mma_m16n8k16_bf16(acc[nb], a, b, acc[nb]);
            mma_m16n8k16_bf16(acc[nb + 1], a, b + 2, acc[nb + 1]);
        }
    }
}

// acc[HD/8][4] (16 x HD) += p (16 x K in accumulator layout, rounded to bf16) . T[K][HD].
template <int HD, int K>
__device__ __forceinline__ void fa_pv(float acc[][4], const float p[][4], const bf16* t_tile) {
    constexpr int LD = HD + FLASH_PAD;
    for (int kb = 0; kb < K / 16; ++kb) {
        const u32 a[4] = {fa_pack(p[2 * kb][0], p[2 * kb][1]), fa_pack(p[2 * kb][2], p[2 * kb][3]),
                          fa_pack(p[2 * kb + 1][0], p[2 * kb + 1][1]), fa_pack(p[2 * kb + 1][2], p[2 * kb + 1][3])};
        for (int nd = 0; nd < HD / 8; nd += 2) {
            u32 b[4];
            fa_bn(b, t_tile, LD, kb * 16, nd * 8);
            mma_m16n8k16_bf16(acc[nd], a, b, acc[nd]);
            mma_m16n8k16_bf16(acc[nd + 1], a, b + 2, acc[nd + 1]);
        }
    }
}

// Sum (or max) over the 4 lanes of a quad, which hold one accumulator row.
__device__ __forceinline__ float fa_quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float fa_quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// First key query `row` sees: its document's start, or the window's.
__device__ __forceinline__ int fa_first_key(const u32* cu, int n_docs, int row, int window) {
    const int s = (int)cu[doc_of(cu, n_docs, row)];
    return window > 0 ? max(s, row - window + 1) : s;
}

// Forward. Grid (ceil(t / FLASH_BM), h), FLASH_WARPS warps; shared: Q [BM][LD], K [2][BN][LD],
// V [2][BN][LD] bf16.
template <int HD>
__device__ __forceinline__ void fa_fwd(const bf16* q, const bf16* k, const bf16* v, const u32* cu, float* out, float* lse,
                                       int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    constexpr int LD = HD + FLASH_PAD, NB = FLASH_BN / 8, ND = HD / 8;
    DYNAMIC_SMEM(bf16, smem);
    bf16* qs = smem;
    bf16* ks = qs + FLASH_BM * LD;
    bf16* vs = ks + 2 * FLASH_BN * LD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const int r0 = blockIdx.x * FLASH_BM, r_last = min(r0 + FLASH_BM, tokens) - 1;
    const int kmin = fa_first_key(cu, n_docs, r0, window);
    int row[2], first[2];
    for (int r = 0; r < 2; ++r) {
        row[r] = r0 + warp * 16 + g + 8 * r;
        first[r] = row[r] < tokens ? fa_first_key(cu, n_docs, row[r], window) : tokens;
    }
    const int n_tiles = (r_last - kmin) / FLASH_BN + 1;
    fa_load<HD>(qs, q, r0, FLASH_BM, tokens, heads, h);
    fa_load<HD>(ks, k, kmin, FLASH_BN, tokens, kv_heads, hk);
    fa_load<HD>(vs, v, kmin, FLASH_BN, tokens, kv_heads, hk);
    cp_async_commit();
    float o[ND][4];
    for (int nd = 0; nd < ND; ++nd) o[nd][0] = o[nd][1] = o[nd][2] = o[nd][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    for (int it = 0; it < n_tiles; ++it) {
        const int j0 = kmin + it * FLASH_BN;
        fa_next_kv<HD, FLASH_BN>(ks, vs, k, v, it, n_tiles, j0, tokens, kv_heads, hk);
        __syncthreads();
        const bf16* kt = ks + (it & 1) * FLASH_BN * LD;
        const bf16* vt = vs + (it & 1) * FLASH_BN * LD;
        float s[NB][4];
        for (int nb = 0; nb < NB; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.0f;
        fa_qkt<HD, FLASH_BN>(s, qs, warp * 16, kt);
        float mx[2] = {m[0], m[1]};
        for (int nb = 0; nb < NB; ++nb)
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, j = j0 + nb * 8 + 2 * tq + (e & 1);
                const bool seen = j >= first[r] && j <= row[r];
                s[nb][e] = seen ? s[nb][e] * scale : NEG_INF;
                mx[r] = fmaxf(mx[r], s[nb][e]);
            }
        float base[2], rs[2] = {0.0f, 0.0f};
        for (int r = 0; r < 2; ++r) {
            mx[r] = fa_quad_max(mx[r]);
            // A row that has seen no key yet keeps m = -inf: exp against 0 then gives p = 0.
            base[r] = mx[r] == NEG_INF ? 0.0f : mx[r];
            const float alpha = expf(m[r] - base[r]);
            l[r] *= alpha;
            for (int nd = 0; nd < ND; ++nd) {
                o[nd][2 * r] *= alpha;
                o[nd][2 * r + 1] *= alpha;
            }
            m[r] = mx[r];
        }
        for (int nb = 0; nb < NB; ++nb)
            for (int e = 0; e < 4; ++e) {
                s[nb][e] = expf(s[nb][e] - base[e >> 1]);
                rs[e >> 1] += s[nb][e];
            }
        for (int r = 0; r < 2; ++r) l[r] += fa_quad_sum(rs[r]);
        fa_pv<HD, FLASH_BN>(o, s, vt);
        // The next iteration's prefetch overwrites this buffer.
        __syncthreads();
    }
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= tokens) continue;
        const float inv = 1.0f / l[r];
        float* dst = out + ((size_t)row[r] * heads + h) * HD + 2 * tq;
        for (int nd = 0; nd < ND; ++nd) {
            dst[nd * 8] = o[nd][2 * r] * inv;
            dst[nd * 8 + 1] = o[nd][2 * r + 1] * inv;
        }
        if (tq == 0) lse[(size_t)h * tokens + row[r]] = m[r] + logf(l[r]);
    }
}

// delta[h, t] = sum_d dout[t, h, d] * out[t, h, d] (dout as the backward's products see it,
// bf16); one warp per (t, h).
extern "C" __global__ void flash_bwd_delta(const float* out, const bf16* dout, float* delta, int tokens, int heads, int hd) {
    const int row = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (row >= tokens * heads) return;
    const int t = row / heads, h = row % heads;
    float acc = 0.0f;
    for (int d = lane; d < hd; d += 32) acc += out[(size_t)row * hd + d] * __bfloat162float(dout[(size_t)row * hd + d]);
    acc = warp_sum(acc);
    if (lane == 0) delta[(size_t)h * tokens + t] = acc;
}

// dq. Grid (ceil(t / FLASH_BM), h); shared: Q, dO [BM][LD], K [2][BWD_BN][LD], V [2][BWD_BN][LD].
template <int HD>
__device__ __forceinline__ void fa_dq(const bf16* q, const bf16* k, const bf16* v, const u32* cu, const float* lse,
                                      const float* delta, const bf16* dout, float* dq, int tokens, int n_docs, int heads,
                                      int kv_heads, float scale, int window) {
    constexpr int LD = HD + FLASH_PAD, BN = FLASH_BWD_BN, NB = BN / 8, ND = HD / 8;
    DYNAMIC_SMEM(bf16, smem);
    bf16* qs = smem;
    bf16* dos = qs + FLASH_BM * LD;
    bf16* ks = dos + FLASH_BM * LD;
    bf16* vs = ks + 2 * BN * LD;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int h = blockIdx.y, hk = h / (heads / kv_heads);
    const int r0 = blockIdx.x * FLASH_BM, r_last = min(r0 + FLASH_BM, tokens) - 1;
    const int kmin = fa_first_key(cu, n_docs, r0, window);
    int row[2], first[2];
    float rl[2], rd[2];
    for (int r = 0; r < 2; ++r) {
        row[r] = r0 + warp * 16 + g + 8 * r;
        const bool ok = row[r] < tokens;
        first[r] = ok ? fa_first_key(cu, n_docs, row[r], window) : tokens;
        rl[r] = ok ? lse[(size_t)h * tokens + row[r]] : 0.0f;
        rd[r] = ok ? delta[(size_t)h * tokens + row[r]] : 0.0f;
    }
    const int n_tiles = (r_last - kmin) / BN + 1;
    fa_load<HD>(qs, q, r0, FLASH_BM, tokens, heads, h);
    fa_load<HD>(dos, dout, r0, FLASH_BM, tokens, heads, h);
    fa_load<HD>(ks, k, kmin, BN, tokens, kv_heads, hk);
    fa_load<HD>(vs, v, kmin, BN, tokens, kv_heads, hk);
    cp_async_commit();
    float acc[ND][4];
    for (int nd = 0; nd < ND; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.0f;
    for (int it = 0; it < n_tiles; ++it) {
        const int j0 = kmin + it * BN;
        fa_next_kv<HD, BN>(ks, vs, k, v, it, n_tiles, j0, tokens, kv_heads, hk);
        __syncthreads();
        const bf16* kt = ks + (it & 1) * BN * LD;
        const bf16* vt = vs + (it & 1) * BN * LD;
        float s[NB][4], dp[NB][4];
        for (int nb = 0; nb < NB; ++nb)
            for (int e = 0; e < 4; ++e) s[nb][e] = dp[nb][e] = 0.0f;
        fa_qkt<HD, BN>(s, qs, warp * 16, kt);
        fa_qkt<HD, BN>(dp, dos, warp * 16, vt);
        for (int nb = 0; nb < NB; ++nb)
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, j = j0 + nb * 8 + 2 * tq + (e & 1);
                const bool seen = j >= first[r] && j <= row[r];
                const float p = seen ? expf(s[nb][e] * scale - rl[r]) : 0.0f;
                s[nb][e] = p * (dp[nb][e] - rd[r]);
            }
        fa_pv<HD, BN>(acc, s, kt);
        __syncthreads();
    }
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= tokens) continue;
        float* dst = dq + ((size_t)row[r] * heads + h) * HD + 2 * tq;
        for (int nd = 0; nd < ND; ++nd) {
            dst[nd * 8] = acc[nd][2 * r] * scale;
            dst[nd * 8 + 1] = acc[nd][2 * r + 1] * scale;
        }
    }
}

// dk, dv. Grid (ceil(t / FLASH_BM), hkv): a block owns FLASH_BM keys (16 per warp) of one kv
// head and walks, for each query head of the group in order, the query tiles of BWD_BN rows from
// its first key to the end of its last key's document (or window). Shared: K, V [BM][LD], then
// Q, dO [2][BWD_BN][LD] bf16, then lse, delta [2][BWD_BN] f32.
template <int HD>
__device__ __forceinline__ void fa_dkv(const bf16* q, const bf16* k, const bf16* v, const u32* cu, const float* lse,
                                       const float* delta, const bf16* dout, float* dk, float* dv, int tokens, int n_docs,
                                       int heads, int kv_heads, float scale, int window) {
    constexpr int LD = HD + FLASH_PAD, BQ = FLASH_BWD_BN, NB = BQ / 8, ND = HD / 8;
    DYNAMIC_SMEM(bf16, smem);
    bf16* ks = smem;
    bf16* vs = ks + FLASH_BM * LD;
    bf16* qs = vs + FLASH_BM * LD;
    bf16* dos = qs + 2 * BQ * LD;
    float* ls = reinterpret_cast<float*>(dos + 2 * BQ * LD);
    float* ds_ = ls + 2 * BQ;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tq = lane & 3;
    const int hk = blockIdx.y, group = heads / kv_heads;
    const int j0 = blockIdx.x * FLASH_BM, j_last = min(j0 + FLASH_BM, tokens) - 1;
    // Exclusive end of the queries any key of the block is seen by.
    int qend = (int)cu[doc_of(cu, n_docs, j_last) + 1];
    if (window > 0) qend = min(qend, j_last + window);
    int kr[2], kend[2];
    for (int r = 0; r < 2; ++r) {
        kr[r] = j0 + warp * 16 + g + 8 * r;
        const int e = kr[r] < tokens ? (int)cu[doc_of(cu, n_docs, kr[r]) + 1] : 0;
        kend[r] = window > 0 ? min(e, kr[r] + window) : e;
    }
    const int n_q = (qend - j0 + BQ - 1) / BQ, steps = group * n_q;
    fa_load<HD>(ks, k, j0, FLASH_BM, tokens, kv_heads, hk);
    fa_load<HD>(vs, v, j0, FLASH_BM, tokens, kv_heads, hk);
    // Step s: query head hk * group + s / n_q, query tile j0 + (s % n_q) * BQ, into buffer s & 1.
    auto stage = [&](int st) {
        const int h = hk * group + st / n_q, i0 = j0 + (st % n_q) * BQ, b = st & 1;
        fa_load<HD>(qs + b * BQ * LD, q, i0, BQ, tokens, heads, h);
        fa_load<HD>(dos + b * BQ * LD, dout, i0, BQ, tokens, heads, h);
        for (int x = threadIdx.x; x < BQ; x += blockDim.x) {
            const int i = i0 + x;
            ls[b * BQ + x] = i < tokens ? lse[(size_t)h * tokens + i] : 0.0f;
            ds_[b * BQ + x] = i < tokens ? delta[(size_t)h * tokens + i] : 0.0f;
        }
    };
    stage(0);
    cp_async_commit();
    float adk[ND][4], adv[ND][4];
    for (int nd = 0; nd < ND; ++nd)
        for (int e = 0; e < 4; ++e) adk[nd][e] = adv[nd][e] = 0.0f;
    for (int st = 0; st < steps; ++st) {
        if (st + 1 < steps) {
            stage(st + 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int b = st & 1, i0 = j0 + (st % n_q) * BQ;
        const bf16* qt = qs + b * BQ * LD;
        const bf16* dot = dos + b * BQ * LD;
        float p[NB][4], dp[NB][4];
        for (int nb = 0; nb < NB; ++nb)
            for (int e = 0; e < 4; ++e) p[nb][e] = dp[nb][e] = 0.0f;
        // Transposed scores: rows are this warp's keys, columns the tile's queries.
        fa_qkt<HD, BQ>(p, ks, warp * 16, qt);
        fa_qkt<HD, BQ>(dp, vs, warp * 16, dot);
        for (int nb = 0; nb < NB; ++nb)
            for (int e = 0; e < 4; ++e) {
                const int r = e >> 1, c = nb * 8 + 2 * tq + (e & 1), qi = i0 + c;
                const bool seen = qi >= kr[r] && qi < kend[r];
                p[nb][e] = seen ? expf(p[nb][e] * scale - ls[b * BQ + c]) : 0.0f;
                dp[nb][e] = p[nb][e] * (dp[nb][e] - ds_[b * BQ + c]);
            }
        fa_pv<HD, BQ>(adv, p, dot);
        fa_pv<HD, BQ>(adk, dp, qt);
        __syncthreads();
    }
    for (int r = 0; r < 2; ++r) {
        if (kr[r] >= tokens) continue;
        const size_t off = ((size_t)kr[r] * kv_heads + hk) * HD + 2 * tq;
        for (int nd = 0; nd < ND; ++nd)
            for (int c = 0; c < 2; ++c) {
                dk[off + nd * 8 + c] = adk[nd][2 * r + c] * scale;
                dv[off + nd * 8 + c] = adv[nd][2 * r + c];
            }
    }
}

// One entry point per head dim (extern "C" kernels cannot be templates).
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_fwd_hd64(const bf16* q, const bf16* k, const bf16* v, const u32* cu, float* out, float* lse, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_fwd<64>(q, k, v, cu, out, lse, tokens, n_docs, heads, kv_heads, scale, window);
}
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_fwd_hd128(const bf16* q, const bf16* k, const bf16* v, const u32* cu, float* out, float* lse, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_fwd<128>(q, k, v, cu, out, lse, tokens, n_docs, heads, kv_heads, scale, window);
}
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_fwd_hd256(const bf16* q, const bf16* k, const bf16* v, const u32* cu, float* out, float* lse, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_fwd<256>(q, k, v, cu, out, lse, tokens, n_docs, heads, kv_heads, scale, window);
}
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_bwd_dq_hd64(const bf16* q, const bf16* k, const bf16* v, const u32* cu, const float* lse, const float* delta, const bf16* dout, float* dq, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_dq<64>(q, k, v, cu, lse, delta, dout, dq, tokens, n_docs, heads, kv_heads, scale, window);
}
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_bwd_dq_hd128(const bf16* q, const bf16* k, const bf16* v, const u32* cu, const float* lse, const float* delta, const bf16* dout, float* dq, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_dq<128>(q, k, v, cu, lse, delta, dout, dq, tokens, n_docs, heads, kv_heads, scale, window);
}
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_bwd_dq_hd256(const bf16* q, const bf16* k, const bf16* v, const u32* cu, const float* lse, const float* delta, const bf16* dout, float* dq, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_dq<256>(q, k, v, cu, lse, delta, dout, dq, tokens, n_docs, heads, kv_heads, scale, window);
}
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_bwd_dkv_hd64(const bf16* q, const bf16* k, const bf16* v, const u32* cu, const float* lse, const float* delta, const bf16* dout, float* dk, float* dv, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_dkv<64>(q, k, v, cu, lse, delta, dout, dk, dv, tokens, n_docs, heads, kv_heads, scale, window);
}
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_bwd_dkv_hd128(const bf16* q, const bf16* k, const bf16* v, const u32* cu, const float* lse, const float* delta, const bf16* dout, float* dk, float* dv, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_dkv<128>(q, k, v, cu, lse, delta, dout, dk, dv, tokens, n_docs, heads, kv_heads, scale, window);
}
extern "C" __global__ void __launch_bounds__(32 * FLASH_WARPS) flash_bwd_dkv_hd256(const bf16* q, const bf16* k, const bf16* v, const u32* cu, const float* lse, const float* delta, const bf16* dout, float* dk, float* dv, int tokens, int n_docs, int heads, int kv_heads, float scale, int window) {
    fa_dkv<256>(q, k, v, cu, lse, delta, dout, dk, dv, tokens, n_docs, heads, kv_heads, scale, window);
}
