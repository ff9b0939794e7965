// SwiGLU: h = silu(gate) * up; backward dgate = dh * up * silu'(gate), dup = dh * silu(gate).
// silu(g) = g * sigmoid(g); silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))). All f32, [n].
__device__ __forceinline__ float sigmoidf_(float g) { return 1.0f / (1.0f + expf(-g)); }

extern "C" __global__ void swiglu_fwd_f32(const float* gate, const float* up, float* h, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        h[i] = g * sigmoidf_(g) * up[i];
    }
}

extern "C" __global__ void swiglu_bwd_f32(const float* gate, const float* up, const float* dh, float* dgate,
                                          float* dup, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i], s = sigmoidf_(g);
        dgate[i] = dh[i] * up[i] * s * (1.0f + g * (1.0f - s));
        dup[i] = dh[i] * g * s;
    }
}
