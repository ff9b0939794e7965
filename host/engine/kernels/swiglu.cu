// SwiGLU: h = silu(gate) * up; backward dgate = dh * up * silu'(gate), dup = dh * silu(gate).
// silu(g) = g * sigmoid(g); silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g))). [n] elements;
// the _f32 kernels read and write f32, the _bf16 ones bf16 with the same f32 math (one rounding
// per output).
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

// ---- bf16 activations: f32 math, each output rounded once (RNE) -------------------------------
// Eight elements per 16-byte access (each u32 word holds two bf16, the lower address in its low
// half) when every pointer is 16-byte aligned; the n % 8 tail, or everything for a misaligned
// pointer, one element at a time. The math is the f32 kernels' expressions.
struct Silu_ {
    static __device__ __forceinline__ float h(float g, float u) { return g * sigmoidf_(g) * u; }
    static __device__ __forceinline__ void d(float g, float u, float dh, float& dg, float& du) {
        const float s = sigmoidf_(g);
        dg = dh * u * s * (1.0f + g * (1.0f - s));
        du = dh * g * s;
    }
};
struct GeluTanh_ {
    static __device__ __forceinline__ float h(float g, float u) { return 0.5f * g * (1.0f + gelu_tanh_t_(g)) * u; }
    static __device__ __forceinline__ void d(float g, float u, float dh, float& dg, float& du) {
        const float t = gelu_tanh_t_(g);
        const float dgelu = 0.5f * (1.0f + t) + 0.5f * g * (1.0f - t * t) * 0.7978845608f * (1.0f + 3.0f * 0.044715f * g * g);
        dg = dh * u * dgelu;
        du = dh * 0.5f * g * (1.0f + t);
    }
};

__device__ __forceinline__ bool aligned16_(const void* p) { return (reinterpret_cast<u64>(p) & 15) == 0; }
// Element j (0..7) of a 16-byte pack, as f32 (exact), and a bf16 result into its slot.
__device__ __forceinline__ float unpack_(const uint4& v, int j) {
    const u32 w = j < 2 ? v.x : j < 4 ? v.y : j < 6 ? v.z : v.w;
    return __uint_as_float((j & 1) ? (w & 0xffff0000u) : (w << 16));
}
__device__ __forceinline__ u32 pack2_(float lo, float hi) {
    return (u32)__bfloat16_as_ushort(__float2bfloat16(lo)) | ((u32)__bfloat16_as_ushort(__float2bfloat16(hi)) << 16);
}

template <class A>
__device__ __forceinline__ void glu_fwd_bf16_(const bf16* gate, const bf16* up, bf16* h, size_t n) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    const size_t nv = aligned16_(gate) && aligned16_(up) && aligned16_(h) ? n / 8 : 0;
    for (size_t i = tid; i < nv; i += stride) {
        const uint4 g = reinterpret_cast<const uint4*>(gate)[i], u = reinterpret_cast<const uint4*>(up)[i];
        float o[8];
        for (int j = 0; j < 8; ++j) o[j] = A::h(unpack_(g, j), unpack_(u, j));
        reinterpret_cast<uint4*>(h)[i] = make_uint4(pack2_(o[0], o[1]), pack2_(o[2], o[3]), pack2_(o[4], o[5]), pack2_(o[6], o[7]));
    }
    for (size_t i = nv * 8 + tid; i < n; i += stride) h[i] = __float2bfloat16(A::h(to_f32(gate[i]), to_f32(up[i])));
}

template <class A>
__device__ __forceinline__ void glu_bwd_bf16_(const bf16* gate, const bf16* up, const bf16* dh, bf16* dgate, bf16* dup, size_t n) {
    const size_t tid = (size_t)blockIdx.x * blockDim.x + threadIdx.x, stride = (size_t)gridDim.x * blockDim.x;
    const bool vec = aligned16_(gate) && aligned16_(up) && aligned16_(dh) && aligned16_(dgate) && aligned16_(dup);
    const size_t nv = vec ? n / 8 : 0;
    for (size_t i = tid; i < nv; i += stride) {
        const uint4 g = reinterpret_cast<const uint4*>(gate)[i], u = reinterpret_cast<const uint4*>(up)[i],
                    d = reinterpret_cast<const uint4*>(dh)[i];
        float dg[8], du[8];
        for (int j = 0; j < 8; ++j) A::d(unpack_(g, j), unpack_(u, j), unpack_(d, j), dg[j], du[j]);
        reinterpret_cast<uint4*>(dgate)[i] = make_uint4(pack2_(dg[0], dg[1]), pack2_(dg[2], dg[3]), pack2_(dg[4], dg[5]), pack2_(dg[6], dg[7]));
        reinterpret_cast<uint4*>(dup)[i] = make_uint4(pack2_(du[0], du[1]), pack2_(du[2], du[3]), pack2_(du[4], du[5]), pack2_(du[6], du[7]));
    }
    for (size_t i = nv * 8 + tid; i < n; i += stride) {
        float dg, du;
        A::d(to_f32(gate[i]), to_f32(up[i]), to_f32(dh[i]), dg, du);
        dgate[i] = __float2bfloat16(dg);
        dup[i] = __float2bfloat16(du);
    }
}

extern "C" __global__ void swiglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* h, size_t n) { glu_fwd_bf16_<Silu_>(gate, up, h, n); }
extern "C" __global__ void swiglu_bwd_bf16(const bf16* gate, const bf16* up, const bf16* dh, bf16* dgate, bf16* dup, size_t n) {
    glu_bwd_bf16_<Silu_>(gate, up, dh, dgate, dup, n);
}
extern "C" __global__ void geglu_fwd_bf16(const bf16* gate, const bf16* up, bf16* h, size_t n) { glu_fwd_bf16_<GeluTanh_>(gate, up, h, n); }
extern "C" __global__ void geglu_bwd_bf16(const bf16* gate, const bf16* up, const bf16* dh, bf16* dgate, bf16* dup, size_t n) {
    glu_bwd_bf16_<GeluTanh_>(gate, up, dh, dgate, dup, n);
}
