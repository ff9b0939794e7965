// Probe kernels: used by no op. Each runs one instruction family exactly as the PTX ISA and the
// CUDA programming guide document it, on inputs a plain host computation can check
// (src/cuda/emu/probes.rs builds the inputs and the expected outputs). The emulator's tests run
// them; NVRTC compiles them with every family (tests/ci.d/50-nvrtc.sh), so on a GPU the selftest
// can run the same probes on the hardware and hold both to the same answer.
#include <cuda_fp16.h>

// ---- mma.sync m16n8k16, fragments read straight from global memory by the documented layout ----
// One warp per 16x8 tile t = blockIdx.x: a [t][16][16] (bf16 or f16 bits, row-major),
// b [t][16][8] ([k][n]), c, d [t][16][8] f32.
template <bool F16>
__device__ void probe_mma(const unsigned short* a, const unsigned short* b, const float* c, float* d) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    a += blockIdx.x * 256;
    b += blockIdx.x * 128;
    c += blockIdx.x * 128;
    d += blockIdx.x * 128;
    u32 ra[4], rb[2];
    float rc[4], rd[4];
    for (int i = 0; i < 4; ++i) {
        // Register i holds elements 2i, 2i+1: rows g (+8 for odd i), columns 2t, 2t+1 (+8 for i >= 2).
        const int row = g + ((i & 1) ? 8 : 0), col = 2 * t + ((i & 2) ? 8 : 0);
        ra[i] = (u32)a[row * 16 + col] | ((u32)a[row * 16 + col + 1] << 16);
    }
    for (int i = 0; i < 2; ++i) {
        const int k = 2 * t + 8 * i;
        rb[i] = (u32)b[k * 8 + g] | ((u32)b[(k + 1) * 8 + g] << 16);
    }
    for (int i = 0; i < 4; ++i) rc[i] = c[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
    if constexpr (F16)
        mma_m16n8k16_f16(rd, ra, rb, rc);
    else
        mma_m16n8k16_bf16(rd, ra, rb, rc);
    for (int i = 0; i < 4; ++i) d[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = rd[i];
}

extern "C" __global__ void probe_mma_bf16(const unsigned short* a, const unsigned short* b, const float* c, float* d) {
    probe_mma<false>(a, b, c, d);
}
extern "C" __global__ void probe_mma_f16(const unsigned short* a, const unsigned short* b, const float* c, float* d) {
    probe_mma<true>(a, b, c, d);
}

// ---- ldmatrix ----------------------------------------------------------------------------------
// One warp. src: 4 matrices of 8x8 b16, row-major ([m][r][c]). Row r of matrix m goes to shared
// slot (8m + r) * 5 % 32 (scrambled, so only the per-lane addresses can find it); lane 8m + r
// passes that row's address. out[m * 32 + lane] = register m of the lane, for m < num.
extern "C" __global__ void probe_ldmatrix(const unsigned short* src, u32* out, int num, int trans) {
    __shared__ __align__(16) unsigned short tile[32 * 8];
    const int lane = threadIdx.x & 31;
    const int slot = (lane * 5) & 31;
    for (int c = 0; c < 8; ++c) tile[slot * 8 + c] = src[lane * 8 + c];
    __syncthreads();
    const void* row = &tile[slot * 8];
    u32 r[4] = {0, 0, 0, 0};
    switch (num * 2 + (trans ? 1 : 0)) {
        case 2: ldmatrix_x1(r, row); break;
        case 3: ldmatrix_x1_trans(r, row); break;
        case 4: ldmatrix_x2(r, row); break;
        case 5: ldmatrix_x2_trans(r, row); break;
        case 8: ldmatrix_x4(r, row); break;
        case 9: ldmatrix_x4_trans(r, row); break;
        default: return;
    }
    for (int m = 0; m < num; ++m) out[m * 32 + lane] = r[m];
}

// ---- the tensor-core tile pipeline: cp.async -> ldmatrix -> mma ----------------------------------
// One warp: A [16][16] and B [16][8] ([k][n]) bf16 go to shared with 16-byte cp.async.cg, then
// ldmatrix.x4 (A) and ldmatrix.x2.trans (B) form the fragments and mma.sync computes d = a b + c.
extern "C" __global__ void probe_tile_mma_bf16(const unsigned short* a, const unsigned short* b, const float* c,
                                               float* d) {
    __shared__ __align__(16) unsigned short as[16 * 16];
    __shared__ __align__(16) unsigned short bs[16 * 8];
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    cp_async_cg(&as[lane * 8], &a[lane * 8]);
    if (lane < 16) cp_async_cg(&bs[lane * 8], &b[lane * 8]);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 ra[4], rb[2];
    ldmatrix_x4(ra, &as[(lane % 16) * 16 + (lane / 16) * 8]);
    ldmatrix_x2_trans(rb, &bs[(lane % 16) * 8]);
    float rc[4], rd[4];
    for (int i = 0; i < 4; ++i) rc[i] = c[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)];
    mma_m16n8k16_bf16(rd, ra, rb, rc);
    for (int i = 0; i < 4; ++i) d[(g + (i >= 2 ? 8 : 0)) * 8 + 2 * t + (i & 1)] = rd[i];
}

// ---- cp.async ----------------------------------------------------------------------------------
// One warp. Lane l copies the 16-byte chunk l of src (512 bytes) four ways into shared: as four
// ca.4, two ca.8, one ca.16 and one cg.16, each with src_bytes[l] (0..16) real bytes of the chunk
// and the rest zero-filled; a lane with src_bytes 0 passes a source far outside src (which must
// not be read). out [4][32][16] bytes: the four copies.
__device__ __forceinline__ int clamp_bytes(int n, int lo, int hi) { return n < lo ? lo : n > hi ? hi : n; }

extern "C" __global__ void probe_cp_async(const unsigned char* src, unsigned char* out, const int* src_bytes) {
    __shared__ __align__(16) unsigned char s[4 * 32 * 16];
    const int lane = threadIdx.x & 31;
    const int n = src_bytes[lane];
    const unsigned char* chunk = n == 0 ? src + ((size_t)1 << 30) : src + lane * 16;
    for (int p = 0; p < 4; ++p) cp_async_ca<4>(&s[(0 * 32 + lane) * 16 + 4 * p], chunk + 4 * p, clamp_bytes(n - 4 * p, 0, 4));
    for (int p = 0; p < 2; ++p) cp_async_ca<8>(&s[(1 * 32 + lane) * 16 + 8 * p], chunk + 8 * p, clamp_bytes(n - 8 * p, 0, 8));
    cp_async_ca<16>(&s[(2 * 32 + lane) * 16], chunk, n);
    cp_async_cg(&s[(3 * 32 + lane) * 16], chunk, n);
    cp_async_commit();
    cp_async_wait_all();
    __syncthreads();
    for (int i = threadIdx.x; i < 4 * 32 * 16; i += blockDim.x) out[i] = s[i];
}

// Two groups in flight: after wait_group 1 the first tile is complete (and is read, across lanes,
// before wait_group 0 completes the second). src, out [2][128] f32; one warp.
extern "C" __global__ void probe_cp_async_groups(const float* src, float* out) {
    __shared__ __align__(16) float s[2 * 128];
    const int lane = threadIdx.x & 31;
    cp_async_cg(&s[lane * 4], &src[lane * 4]);
    cp_async_commit();
    cp_async_cg(&s[128 + lane * 4], &src[128 + lane * 4]);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    for (int i = lane; i < 128; i += 32) out[i] = s[(i * 7) % 128];
    cp_async_wait<0>();
    __syncthreads();
    for (int i = lane; i < 128; i += 32) out[128 + i] = s[128 + (i * 7) % 128];
}

// ---- warp shuffles and votes ---------------------------------------------------------------------
// One warp over in[32]; out[k * 32 + lane] for case k (see probes.rs for the table). Cases 8 and 12
// run on lanes 0..15 only, with mask 0x0000ffff (the other lanes write -1).
extern "C" __global__ void probe_shfl(const int* in, int* out) {
    const int lane = threadIdx.x & 31;
    const int v = in[lane];
    const unsigned full = 0xffffffffu;
    out[0 * 32 + lane] = __shfl_sync(full, v, (lane * 7 + 3) % 32);
    out[1 * 32 + lane] = __shfl_sync(full, v, 13, 8);
    out[2 * 32 + lane] = __shfl_up_sync(full, v, 3);
    out[3 * 32 + lane] = __shfl_up_sync(full, v, 2, 16);
    out[4 * 32 + lane] = __shfl_down_sync(full, v, 5);
    out[5 * 32 + lane] = __shfl_down_sync(full, v, 1, 4);
    out[6 * 32 + lane] = __shfl_xor_sync(full, v, 1);
    out[7 * 32 + lane] = __shfl_xor_sync(full, v, 9, 8);
    out[8 * 32 + lane] = lane < 16 ? __shfl_xor_sync(0x0000ffffu, v, 4) : -1;
    out[9 * 32 + lane] = (int)__ballot_sync(full, v & 1);
    out[10 * 32 + lane] = __any_sync(full, v == 77);
    out[11 * 32 + lane] = __all_sync(full, v >= 0);
    out[12 * 32 + lane] = lane < 16 ? (int)__ballot_sync(0x0000ffffu, v & 2) : -1;
    out[13 * 32 + lane] = __shfl_sync(full, (double)v * 0.5, 31 - lane) == (double)in[31 - lane] * 0.5;
}

// Atomics across blocks and threads, with order-independent results. counters: [0] atomicAdd 1,
// [1] atomicAdd of the thread's linear index, [2] atomicMin, [3] atomicMax, [4] atomicCAS loop +3,
// [5] atomicOr of bit (tid % 31), [6] how many atomicExch of [7] from 0 to 1 saw 0 (exactly one).
extern "C" __global__ void probe_atomics(int* counters) {
    const int id = blockIdx.x * blockDim.x + threadIdx.x;
    atomicAdd(&counters[0], 1);
    atomicAdd(&counters[1], id);
    atomicMin(&counters[2], 1000 - id);
    atomicMax(&counters[3], id * 3);
    int old = counters[4], seen;
    do {
        seen = old;
        old = atomicCAS(&counters[4], seen, seen + 3);
    } while (old != seen);
    atomicOr(&counters[5], 1 << (threadIdx.x % 31));
    if (atomicExch(&counters[7], 1) == 0) atomicAdd(&counters[6], 1);
}

// ---- conversions with the device's rounding --------------------------------------------------------
// out [8][n] bits of x[i] as bf16 rn, rz, rd, ru, then f16 rn, rz, rd, ru.
extern "C" __global__ void probe_convert(const float* x, unsigned short* out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        const float v = x[i];
        out[0 * n + i] = __bfloat16_as_ushort(__float2bfloat16_rn(v));
        out[1 * n + i] = __bfloat16_as_ushort(__float2bfloat16_rz(v));
        out[2 * n + i] = __bfloat16_as_ushort(__float2bfloat16_rd(v));
        out[3 * n + i] = __bfloat16_as_ushort(__float2bfloat16_ru(v));
        out[4 * n + i] = __half_as_ushort(__float2half_rn(v));
        out[5 * n + i] = __half_as_ushort(__float2half_rz(v));
        out[6 * n + i] = __half_as_ushort(__float2half_rd(v));
        out[7 * n + i] = __half_as_ushort(__float2half_ru(v));
    }
}

// out [2][n]: bf16 bits h[i] and f16 bits h[i] widened to f32.
extern "C" __global__ void probe_widen(const unsigned short* h, float* out, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        out[i] = __bfloat162float(__ushort_as_bfloat16(h[i]));
        out[n + i] = __half2float(__ushort_as_half(h[i]));
    }
}
