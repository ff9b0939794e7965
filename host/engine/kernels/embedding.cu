// Embedding gather: out[t, :] = table[ids[t], :] * scale. Kernel suffix = dtype of the table.
//   ids [tokens] u32, table [vocab, dim], out [tokens, dim] f32.
// An id >= vocab writes zeros and records the smallest such position in *bad (initialised to
// 0xffffffff by the caller; atomicMin is order independent), so the host can name it.
template <typename T>
__device__ void embedding_fwd(const u32* ids, const T* table, float* out, int tokens, int dim, int vocab,
                              float scale, u32* bad) {
    const int t = blockIdx.x;
    if (t >= tokens) return;
    const u32 id = ids[t];
    float* o = out + (size_t)t * dim;
    if (id >= (u32)vocab) {
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = 0.0f;
        if (threadIdx.x == 0) atomicMin(bad, (u32)t);
        return;
    }
    const T* row = table + (size_t)id * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = to_f32(row[i]) * scale;
}

extern "C" __global__ void embedding_fwd_f32(const u32* ids, const float* table, float* out, int tokens, int dim,
                                             int vocab, float scale, u32* bad) {
    embedding_fwd(ids, table, out, tokens, dim, vocab, scale, bad);
}
extern "C" __global__ void embedding_fwd_bf16(const u32* ids, const bf16* table, float* out, int tokens, int dim,
                                              int vocab, float scale, u32* bad) {
    embedding_fwd(ids, table, out, tokens, dim, vocab, scale, bad);
}

// Embedding scatter (gradient of the table): dtable[ids[t], :] += dout[t, :] * scale.
// One thread per column walks the tokens in order: deterministic, no atomics.
extern "C" __global__ void embedding_bwd_f32(const u32* ids, const float* dout, float* dtable, int tokens, int dim,
                                             int vocab, float scale) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= dim) return;
    for (int t = 0; t < tokens; ++t) {
        const u32 id = ids[t];
        if (id < (u32)vocab) dtable[(size_t)id * dim + i] += dout[(size_t)t * dim + i] * scale;
    }
}
