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

// GeGLU (Gemma 3): h = gelu_pytorch_tanh(gate) * up, gelu(g) = g/2 (1 + tanh(c (g + 0.044715 g^3))),
// c = sqrt(2/pi); gelu'(g) = (1 + t)/2 + g/2 (1 - t^2) c (1 + 3 * 0.044715 g^2). Backward as SwiGLU's.
__device__ __forceinline__ float gelu_tanh_t_(float g) {
    return tanhf(0.7978845608f * (g + 0.044715f * g * g * g));
}

extern "C" __global__ void geglu_fwd_f32(const float* gate, const float* up, float* h, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i];
        h[i] = 0.5f * g * (1.0f + gelu_tanh_t_(g)) * up[i];
    }
}

extern "C" __global__ void geglu_bwd_f32(const float* gate, const float* up, const float* dh, float* dgate,
                                         float* dup, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float g = gate[i], t = gelu_tanh_t_(g);
        const float dgelu = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * 0.7978845608f * (1.0f + 3.0f * 0.044715f * g * g);
        dgate[i] = dh[i] * up[i] * dgelu;
        dup[i] = dh[i] * 0.5f * g * (1.0f + t);
    }
}
