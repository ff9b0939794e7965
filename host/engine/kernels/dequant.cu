// Dequantization of bitsandbytes 4-bit and 8-bit base weights (host/engine/src/quant, whose
// dequantize_host is the CPU twin). One thread per element, grid-stride over n = rows * cols.
//
//   4-bit:  out[i] = round(CODE[q_i] * absmax[i / blocksize])
//           q_i = high nibble of byte i/2 for even i, low nibble for odd i
//           double quant: absmax[j] = MAP[c_j] * nested[j / 256] + offset
//   8-bit:  out[i] = round((CB[i] * SCB[i / cols]) * (1/127))
//
// Bytes arrive as little-endian u32 words (read here as bytes). `round` is the compute dtype the
// value is rounded to (0 f32, 1 bf16, 2 f16) before it is stored (as f32, or bf16 for bf16).
// Every product and sum is __fmul_rn / __fadd_rn so nvcc does not fuse them into an FMA: the CPU
// twin rounds each one, and so does bitsandbytes.
#include <cuda_fp16.h>

// NF4 and FP4 values by code, as the CUDA kernels of bitsandbytes decode them (FP4 code 8: -0.0).
__constant__ float NF4_CODE[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
__constant__ float FP4_CODE[16] = {
    0.0f, 0.0052083334885537624f, 0.6666666865348816f, 1.0f, 0.3333333432674408f, 0.5f,
    0.1666666716337204f, 0.25f, -0.0f, -0.0052083334885537624f, -0.6666666865348816f, -1.0f,
    -0.3333333432674408f, -0.5f, -0.1666666716337204f, -0.25f};

// 1/127 as bitsandbytes' int8_vectorwise_dequant writes it, as an f32.
#define INV_127 7.874015718698502e-3f

__device__ __forceinline__ float round_to(float v, int mode) {
    if (mode == 1) return __bfloat162float(__float2bfloat16_rn(v));
    if (mode == 2) return __half2float(__float2half_rn(v));
    return v;
}
__device__ __forceinline__ void store(float* out, size_t i, float v) { out[i] = v; }
__device__ __forceinline__ void store(bf16* out, size_t i, float v) { out[i] = __float2bfloat16_rn(v); }

// data: packed codes; scales: absmax per block, or nested absmax per 256 blocks when
// nested_codes is not null (then nested_map holds the 256-entry map).
template <typename T>
__device__ void dequant_4bit(const u32* data, const float* scales, const u32* nested_codes, const float* nested_map,
                             float offset, int fp4, int blocksize, int round, size_t n, T* out) {
    const unsigned char* bytes = (const unsigned char*)data;
    const unsigned char* codes = (const unsigned char*)nested_codes;
    const float* code = fp4 ? FP4_CODE : NF4_CODE;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const unsigned char b = bytes[i >> 1];
        const int q = (i & 1) ? (b & 0x0f) : (b >> 4);
        const size_t blk = i / (size_t)blocksize;
        const float absmax = codes ? __fadd_rn(__fmul_rn(nested_map[codes[blk]], scales[blk / 256]), offset) : scales[blk];
        store(out, i, round_to(__fmul_rn(code[q], absmax), round));
    }
}
extern "C" __global__ void dequant_4bit_f32(const u32* data, const float* scales, const u32* nested_codes,
                                            const float* nested_map, float offset, int fp4, int blocksize, int round,
                                            size_t n, float* out) {
    dequant_4bit(data, scales, nested_codes, nested_map, offset, fp4, blocksize, round, n, out);
}
extern "C" __global__ void dequant_4bit_bf16(const u32* data, const float* scales, const u32* nested_codes,
                                             const float* nested_map, float offset, int fp4, int blocksize, int round,
                                             size_t n, bf16* out) {
    dequant_4bit(data, scales, nested_codes, nested_map, offset, fp4, blocksize, round, n, out);
}

// data: int8 CB [rows, cols]; scb: f32 [rows].
template <typename T>
__device__ void dequant_8bit(const u32* data, const float* scb, int cols, int round, size_t n, T* out) {
    const signed char* cb = (const signed char*)data;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = __fmul_rn(__fmul_rn((float)cb[i], scb[i / (size_t)cols]), INV_127);
        store(out, i, round_to(v, round));
    }
}
extern "C" __global__ void dequant_8bit_f32(const u32* data, const float* scb, int cols, int round, size_t n, float* out) {
    dequant_8bit(data, scb, cols, round, n, out);
}
extern "C" __global__ void dequant_8bit_bf16(const u32* data, const float* scb, int cols, int round, size_t n, bf16* out) {
    dequant_8bit(data, scb, cols, round, n, out);
}
