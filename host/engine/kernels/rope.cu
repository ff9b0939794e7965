// Rotary embedding in place, Hugging Face rotate-half layout on the first `rd` dims of each
// head: pairs (i, i + rd/2); dims rd..hd pass through (partial rotary, Phi-3/4).
//   x [tokens, heads, hd] f32, pos [tokens] u32 (restarting per document), inv_freq [rd/2] f32
//   (every rope scaling type is folded into inv_freq by the caller); cos and sin are scaled by
//   `scale` (LongRoPE's attention factor, else 1).
//   forward: (a, b) -> (a cos - b sin, b cos + a sin); inverse uses -angle (the backward).
extern "C" __global__ void rope_f32(float* x, const u32* pos, const float* inv_freq, int tokens, int heads,
                                    int hd, int rd, float scale, int inverse) {
    const int half = rd / 2;
    const size_t n = (size_t)tokens * heads * half;
    for (size_t idx = (size_t)blockIdx.x * blockDim.x + threadIdx.x; idx < n; idx += (size_t)gridDim.x * blockDim.x) {
        const int i = (int)(idx % half);
        const size_t th = idx / half;          // token * heads + head
        const size_t t = th / heads;
        const float angle = (float)pos[t] * inv_freq[i];
        float s, c;
        sincosf(angle, &s, &c);
        c *= scale;
        s *= scale;
        if (inverse) s = -s;
        float* row = x + th * hd;
        const float a = row[i], b = row[i + half];
        row[i] = a * c - b * s;
        row[i + half] = b * c + a * s;
    }
}
