// The CUDA device as the CPU emulator presents it to kernel source: included before every kernel
// family, which is then compiled as C++17 by the system compiler exactly as NVRTC gets it
// (prelude + `#line` + family file, see host/engine/build.rs).
//
// What a kernel sees here and how it maps onto the emulator (runtime in ../runtime/):
//   - every CUDA thread is a fiber; `threadIdx`/`blockIdx`/`blockDim`/`gridDim` read the running
//     fiber's and block's coordinates;
//   - `__syncthreads()`, warp shuffles, votes, `__syncwarp()`, `mma.sync`, `ldmatrix` and
//     `cp.async` are calls into the runtime, which suspends the fiber until every participant has
//     arrived (and reports a barrier or mask that can never complete, naming the kernel, block,
//     thread, file and line);
//   - static `__shared__` variables live in one linker section that the runtime poisons (0xFF
//     bytes, a NaN in every float type) before each block; dynamic shared memory is a buffer of
//     exactly the launch's size ending at a guard page;
//   - atomics are plain read-modify-writes (one block runs at a time) followed by a yield, so a
//     spin loop on an atomic lets the other threads run.
// Nothing here is used by the GPU build: NVRTC never sees this header.
#pragma once

#define LORA_EMU 1
#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 900
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <type_traits>
#include <utility>

// ---- CUDA keywords ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __restrict__ __restrict
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// Static shared memory: one section for every kernel, poisoned before each block (see runtime).
#define __shared__ static __attribute__((section("lora_emu_shared")))
// Constant memory: read-only data initialised at load, an ordinary (const) global on the host.
#define __constant__ const

// ---- built-in vector types ----------------------------------------------------------------------
struct uint3 { unsigned int x, y, z; };
struct dim3 { unsigned int x, y, z; };
struct __align__(8) float2 { float x, y; };
struct float3 { float x, y, z; };
struct __align__(16) float4 { float x, y, z, w; };
struct __align__(8) int2 { int x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(8) uint2 { unsigned int x, y; };
struct __align__(16) uint4 { unsigned int x, y, z, w; };
struct __align__(16) double2 { double x, y; };
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

#define warpSize 32

namespace lora_emu {

// What kernel code reads of the running CUDA thread (the runtime's fiber begins with this).
struct ThreadView {
    uint3 tid;
};

extern ThreadView* g_thread;
extern uint3 g_block_idx;
extern dim3 g_block_dim;
extern dim3 g_grid_dim;

// Keeps the compiler from caching shared or global memory across a synchronisation point (the
// other fibers may have written it while this one was suspended).
inline void fence() { asm volatile("" ::: "memory"); }

// Runtime entry points (runtime/sched.cpp). `file`/`line` name the call site in messages.
void syncthreads(const char* file, int line);
int syncthreads_reduce(const char* file, int line, int mode, int pred);  // 0 count, 1 and, 2 or
void syncwarp(const char* file, int line, unsigned mask);
uint64_t shfl(const char* file, int line, int mode, unsigned mask, uint64_t bits, unsigned bytes, int b, int c);
unsigned vote(const char* file, int line, int mode, unsigned mask, int pred);  // 0 ballot, 1 any, 2 all
void yield_point();
void* dynamic_smem();
[[noreturn]] void trap(const char* file, int line, const char* what);

// Tensor-core and async-copy instructions (runtime/tensor.cpp); see kernels/mma.cuh.
void mma_m16n8k16(const char* file, int line, int f16, float d[4], const unsigned a[4], const unsigned b[2],
                  const float c[4]);
void ldmatrix(const char* file, int line, int num, int trans, unsigned* regs, const void* row_addr);
void cp_async(const char* file, int line, int cg, void* dst, const void* src, int cp_size, int src_size);
void cp_async_commit(const char* file, int line);
void cp_async_wait(const char* file, int line, int n);  // n < 0: wait_all

enum ShflMode { SHFL_IDX = 0, SHFL_UP = 1, SHFL_DOWN = 2, SHFL_BFLY = 3 };

template <typename T>
inline T shfl_as(const char* file, int line, int mode, unsigned mask, T var, int b, int width) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move at most 8 bytes");
    uint64_t bits = 0;
    memcpy(&bits, &var, sizeof(T));
    // The packed clamp/segment operand `c` exactly as CUDA's intrinsics build it for shfl.sync.
    const int seg = (32 - width) << 8;
    const int c = (mode == SHFL_UP) ? seg : (seg | 0x1f);
    fence();
    bits = shfl(file, line, mode, mask, bits, (unsigned)sizeof(T), (width << 16) | (b & 0xffff), c);
    fence();
    T out;
    memcpy(&out, &bits, sizeof(T));
    return out;
}

inline void syncthreads_fenced(const char* file, int line) {
    fence();
    syncthreads(file, line);
    fence();
}
inline int syncthreads_reduce_fenced(const char* file, int line, int mode, int pred) {
    fence();
    const int r = syncthreads_reduce(file, line, mode, pred);
    fence();
    return r;
}
inline void syncwarp_fenced(const char* file, int line, unsigned mask = 0xffffffffu) {
    fence();
    syncwarp(file, line, mask);
    fence();
}
inline unsigned vote_fenced(const char* file, int line, int mode, unsigned mask, int pred) {
    fence();
    const unsigned r = vote(file, line, mode, mask, pred);
    fence();
    return r;
}

// Atomics: one block runs at a time, so a plain read-modify-write is atomic; the yield afterwards
// lets a spinning thread's partners run.
template <typename T, typename F>
inline T atomic_rmw(T* p, F f) {
    fence();
    const T old = *p;
    *p = f(old);
    fence();
    yield_point();
    return old;
}

}  // namespace lora_emu

#define threadIdx (static_cast<const uint3&>(::lora_emu::g_thread->tid))
#define blockIdx (static_cast<const uint3&>(::lora_emu::g_block_idx))
#define blockDim (static_cast<const dim3&>(::lora_emu::g_block_dim))
#define gridDim (static_cast<const dim3&>(::lora_emu::g_grid_dim))

#define __syncthreads() ::lora_emu::syncthreads_fenced(__FILE__, __LINE__)
#define __syncthreads_count(p) ::lora_emu::syncthreads_reduce_fenced(__FILE__, __LINE__, 0, (p))
#define __syncthreads_and(p) ::lora_emu::syncthreads_reduce_fenced(__FILE__, __LINE__, 1, (p))
#define __syncthreads_or(p) ::lora_emu::syncthreads_reduce_fenced(__FILE__, __LINE__, 2, (p))
#define __syncwarp(...) ::lora_emu::syncwarp_fenced(__FILE__, __LINE__, ##__VA_ARGS__)
#define __threadfence() ::lora_emu::fence()
#define __threadfence_block() ::lora_emu::fence()
#define __trap() ::lora_emu::trap(__FILE__, __LINE__, "__trap()")

namespace lora_emu {
template <typename T>
inline T shfl_sync_(const char* f, int l, unsigned m, T v, int src, int w = 32) { return shfl_as(f, l, SHFL_IDX, m, v, src, w); }
template <typename T>
inline T shfl_up_sync_(const char* f, int l, unsigned m, T v, unsigned d, int w = 32) { return shfl_as(f, l, SHFL_UP, m, v, (int)d, w); }
template <typename T>
inline T shfl_down_sync_(const char* f, int l, unsigned m, T v, unsigned d, int w = 32) { return shfl_as(f, l, SHFL_DOWN, m, v, (int)d, w); }
template <typename T>
inline T shfl_xor_sync_(const char* f, int l, unsigned m, T v, int lm, int w = 32) { return shfl_as(f, l, SHFL_BFLY, m, v, lm, w); }
}  // namespace lora_emu

#define __shfl_sync(...) ::lora_emu::shfl_sync_(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_up_sync(...) ::lora_emu::shfl_up_sync_(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_down_sync(...) ::lora_emu::shfl_down_sync_(__FILE__, __LINE__, __VA_ARGS__)
#define __shfl_xor_sync(...) ::lora_emu::shfl_xor_sync_(__FILE__, __LINE__, __VA_ARGS__)
#define __ballot_sync(mask, pred) ::lora_emu::vote_fenced(__FILE__, __LINE__, 0, (mask), (pred))
#define __any_sync(mask, pred) ((int)::lora_emu::vote_fenced(__FILE__, __LINE__, 1, (mask), (pred)))
#define __all_sync(mask, pred) ((int)::lora_emu::vote_fenced(__FILE__, __LINE__, 2, (mask), (pred)))

// ---- atomics (the overloads CUDA has for the types kernels use) ---------------------------------
#define LORA_EMU_ATOMIC_ARITH(T)                                                                     \
    inline T atomicAdd(T* p, T v) { return ::lora_emu::atomic_rmw(p, [v](T o) { return (T)(o + v); }); } \
    inline T atomicSub(T* p, T v) { return ::lora_emu::atomic_rmw(p, [v](T o) { return (T)(o - v); }); } \
    inline T atomicExch(T* p, T v) { return ::lora_emu::atomic_rmw(p, [v](T) { return v; }); }
#define LORA_EMU_ATOMIC_INT(T)                                                                             \
    inline T atomicMin(T* p, T v) { return ::lora_emu::atomic_rmw(p, [v](T o) { return o < v ? o : v; }); }    \
    inline T atomicMax(T* p, T v) { return ::lora_emu::atomic_rmw(p, [v](T o) { return o > v ? o : v; }); }    \
    inline T atomicAnd(T* p, T v) { return ::lora_emu::atomic_rmw(p, [v](T o) { return (T)(o & v); }); }       \
    inline T atomicOr(T* p, T v) { return ::lora_emu::atomic_rmw(p, [v](T o) { return (T)(o | v); }); }        \
    inline T atomicXor(T* p, T v) { return ::lora_emu::atomic_rmw(p, [v](T o) { return (T)(o ^ v); }); }       \
    inline T atomicCAS(T* p, T cmp, T v) { return ::lora_emu::atomic_rmw(p, [cmp, v](T o) { return o == cmp ? v : o; }); }
LORA_EMU_ATOMIC_ARITH(int)
LORA_EMU_ATOMIC_ARITH(unsigned int)
LORA_EMU_ATOMIC_ARITH(unsigned long long)
LORA_EMU_ATOMIC_ARITH(float)
LORA_EMU_ATOMIC_ARITH(double)
LORA_EMU_ATOMIC_INT(int)
LORA_EMU_ATOMIC_INT(unsigned int)
LORA_EMU_ATOMIC_INT(long long)
LORA_EMU_ATOMIC_INT(unsigned long long)
#undef LORA_EMU_ATOMIC_ARITH
#undef LORA_EMU_ATOMIC_INT
inline unsigned atomicInc(unsigned* p, unsigned v) {
    return ::lora_emu::atomic_rmw(p, [v](unsigned o) { return o >= v ? 0u : o + 1; });
}
inline unsigned atomicDec(unsigned* p, unsigned v) {
    return ::lora_emu::atomic_rmw(p, [v](unsigned o) { return (o == 0 || o > v) ? v : o - 1; });
}

// ---- integer and float built-ins -----------------------------------------------------------------
// CUDA's min/max overloads (math_functions.h), including the mixed signed/unsigned ones.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline unsigned int min(int a, unsigned int b) { return min((unsigned int)a, b); }
inline unsigned int max(int a, unsigned int b) { return max((unsigned int)a, b); }
inline unsigned int min(unsigned int a, int b) { return min(a, (unsigned int)b); }
inline unsigned int max(unsigned int a, int b) { return max(a, (unsigned int)b); }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long min(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long max(unsigned long long a, unsigned long long b) { return a > b ? a : b; }
inline unsigned long min(unsigned long a, unsigned long b) { return a < b ? a : b; }
inline unsigned long max(unsigned long a, unsigned long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }

inline float __int_as_float(int x) { float f; memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float x) { int i; memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned x) { float f; memcpy(&f, &x, 4); return f; }
inline unsigned __float_as_uint(float x) { unsigned i; memcpy(&i, &x, 4); return i; }
inline double __longlong_as_double(long long x) { double d; memcpy(&d, &x, 8); return d; }
inline long long __double_as_longlong(double x) { long long i; memcpy(&i, &x, 8); return i; }

// Math: the C library's functions stand in for CUDA's (CUDA's expf, logf, sincosf and rsqrtf are
// within 1-2 ulp of these; the fast intrinsics differ more). FMA contraction (NVRTC's
// --fmad=true) is not reproduced: the host compiler decides.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float __fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __fadd_rn(float x, float y) { return x + y; }
inline float __fmul_rn(float x, float y) { return x * y; }
inline float __fmaf_rn(float x, float y, float z) { return fmaf(x, y, z); }
inline float __saturatef(float x) { return x != x ? 0.0f : fminf(fmaxf(x, 0.0f), 1.0f); }
inline void __sincosf(float x, float* s, float* c) { sincosf(x, s, c); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned __brev(unsigned x) {
    unsigned r = 0;
    for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
    return r;
}
inline int __mul24(int a, int b) { return (int)((long long)((a << 8) >> 8) * ((b << 8) >> 8)); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
template <typename T>
inline T __ldg(const T* p) { return *p; }

// Stand-ins for the CUDA headers the kernels include.
#include "cuda_fp16.h"
#include "cuda_bf16.h"
