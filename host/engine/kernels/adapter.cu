// Adapter ops: dropout with the engine's counter-based mask, and DoRA's weight norm.

// THE dropout mask, bit for bit as lora_engine::backend::dropout_keep computes it:
//   z = splitmix64(seed ^ index * 0xD1B54A32D192ED03); u = (z >> 40) * 2^-24; keep iff u >= p.
__device__ __forceinline__ u64 splitmix64(u64 x) {
    u64 z = x + 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// out[i] = x[i] / (1 - p) if kept, else 0. All f32, [n].
extern "C" __global__ void dropout_f32(const float* x, float* out, size_t n, float p, u64 seed) {
    const float keep_scale = 1.0f / (1.0f - p);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const u64 z = splitmix64(seed ^ ((u64)i * 0xD1B54A32D192ED03ull));
        const float u = (float)(z >> 40) * (1.0f / 16777216.0f);
        out[i] = (u >= p) ? x[i] * keep_scale : 0.0f;
    }
}

// DoRA's per-output-row norm: norm[o] = || w[o, :] + scale * (b @ a)[o, :] ||_2, one block per row.
//   w [out, in] (suffix = its dtype), a [r, in] f32, b [out, r] f32, norm [out] f32. r <= 256.
template <typename W>
__device__ void dora_weight_norm(const W* w, const float* a, const float* b, float scale, float* norm, int out_f,
                                 int in_f, int r) {
    __shared__ float scratch[32];
    __shared__ float brow[256];
    const int o = blockIdx.x;
    if (o >= out_f) return;
    for (int q = threadIdx.x; q < r; q += blockDim.x) brow[q] = b[(size_t)o * r + q];
    __syncthreads();
    float ss = 0.0f;
    for (int i = threadIdx.x; i < in_f; i += blockDim.x) {
        float ba = 0.0f;
        for (int q = 0; q < r; ++q) ba += brow[q] * a[(size_t)q * in_f + i];
        const float val = to_f32(w[(size_t)o * in_f + i]) + scale * ba;
        ss += val * val;
    }
    ss = block_sum(ss, scratch);
    if (threadIdx.x == 0) norm[o] = sqrtf(ss);
}

extern "C" __global__ void dora_weight_norm_f32(const float* w, const float* a, const float* b, float scale,
                                                float* norm, int out_f, int in_f, int r) {
    dora_weight_norm(w, a, b, scale, norm, out_f, in_f, r);
}
extern "C" __global__ void dora_weight_norm_bf16(const bf16* w, const float* a, const float* b, float scale,
                                                 float* norm, int out_f, int in_f, int r) {
    dora_weight_norm(w, a, b, scale, norm, out_f, in_f, r);
}
