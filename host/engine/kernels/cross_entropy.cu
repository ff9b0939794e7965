// Cross-entropy over one chunk of logits, fused with its gradient; one block per row.
//   logits [rows, vocab] f32 = (hidden @ w^T) for the chunk, before logit_scale;
//   targets [rows] u32 (0xffffffff = no loss at this row);
//   loss [rows] f32: logsumexp(z) - z[target], z = logits * logit_scale (0 on ignored rows);
//   dlogits [rows, vocab] bf16 (may be null): grad_scale * logit_scale * (softmax(z) - onehot)
//   (0 on ignored rows), ready for the bf16 matrix product dhidden = dlogits @ w.
extern "C" __global__ void cross_entropy_fwd_bwd_f32(const float* logits, const u32* targets, float* loss,
                                                     bf16* dlogits, int rows, int vocab, float logit_scale,
                                                     float grad_scale) {
    __shared__ float scratch[32];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const float* z = logits + (size_t)row * vocab;
    const u32 target = targets[row];
    bf16* dz = dlogits ? dlogits + (size_t)row * vocab : 0;
    if (target == 0xffffffffu) {
        if (dz)
            for (int i = threadIdx.x; i < vocab; i += blockDim.x) dz[i] = __float2bfloat16(0.0f);
        if (threadIdx.x == 0) loss[row] = 0.0f;
        return;
    }
    float mx = NEG_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) mx = fmaxf(mx, z[i] * logit_scale);
    mx = block_max(mx, scratch);
    float se = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) se += expf(z[i] * logit_scale - mx);
    se = block_sum(se, scratch);
    const float lse = mx + logf(se);
    if (threadIdx.x == 0) loss[row] = lse - z[target] * logit_scale;
    if (dz) {
        const float g = grad_scale * logit_scale;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float p = expf(z[i] * logit_scale - lse);
            dz[i] = __float2bfloat16(g * (p - (i == (int)target ? 1.0f : 0.0f)));
        }
    }
}
