// Shared prelude of every kernel family: prepended to each .cu source before NVRTC compiles it
// (see src/cuda/kernels.rs). Activations and gradients are f32; base weights are bf16 (or f32
// when a caller uploads f32); indices are u32. Reductions use fixed trees: no atomics whose
// order could change a result.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;
typedef unsigned int u32;
typedef unsigned long long u64;

// -inf without relying on <math.h> macros (NVRTC has no standard headers).
#define NEG_INF __int_as_float(0xff800000)

// The launch's dynamic shared memory as `T* name` (16-byte aligned): `DYNAMIC_SMEM(float, smem);`.
// Under NVRTC an `extern __shared__` array; in the CPU emulator (LORA_EMU) its buffer of exactly
// the launch's size, so both compile this same text.
#ifdef LORA_EMU
#define DYNAMIC_SMEM(T, name) T* const name = reinterpret_cast<T*>(lora_emu::dynamic_smem())
#else
#define DYNAMIC_SMEM(T, name)                                        \
    extern __shared__ __align__(16) unsigned char lora_dynamic_smem[]; \
    T* const name = reinterpret_cast<T*>(lora_dynamic_smem)
#endif

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }

// Packed documents (attention.cu, flash_attention.cu): index d of the document holding token t: cu[d] <= t < cu[d + 1].
__device__ __forceinline__ int doc_of(const u32* cu, int n_docs, int t) {
    int lo = 0, hi = n_docs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if ((int)cu[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the result.
// `scratch` holds 32 floats of shared memory.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    return v;
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = (lane < nwarps) ? scratch[lane] : NEG_INF;
    v = warp_max(v);
    return v;
}
