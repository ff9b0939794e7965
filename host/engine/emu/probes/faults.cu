// Emulator-only probe kernels: deliberate bugs (a missing barrier, a divergent barrier, a bad
// shuffle mask, out-of-bounds accesses, an endless loop, ...) whose detection the emulator's tests
// check, plus a barrier loop to time the emulator. Compiled into the emulator only, never loaded
// on a GPU.

// Thread i writes s[i] and reads s[n - 1 - i] with no barrier in between: the result depends on
// which thread ran first. With `sync` set, the same kernel with the barrier (always right).
// (Declared with __launch_bounds__ as kernels may be: the launch table must still find it.)
extern "C" __global__ void __launch_bounds__(1024) probe_race(float* out, int sync) {
    __shared__ float s[1024];
    const int i = threadIdx.x, n = blockDim.x;
    s[i] = (float)(i * 3 + 1);
    if (sync) __syncthreads();
    out[blockIdx.x * n + i] = s[n - 1 - i];
}

// Threads below 32 and the others wait at two different __syncthreads.
extern "C" __global__ void probe_divergent_barrier(float* out) {
    if (threadIdx.x < 32) {
        __syncthreads();  // divergent barrier A
        out[threadIdx.x] = 1.0f;
    } else {
        __syncthreads();  // divergent barrier B
        out[threadIdx.x] = 2.0f;
    }
}

// Thread 5 returns early; the others then wait at a barrier it never reaches.
extern "C" __global__ void probe_barrier_after_exit(float* out) {
    if (threadIdx.x == 5) return;
    __syncthreads();  // barrier after exit
    out[threadIdx.x] = 1.0f;
}

// Lanes 0..15 shuffle with a full mask: lanes 16..31 never take part.
extern "C" __global__ void probe_shfl_missing_lanes(float* out) {
    float v = (float)threadIdx.x;
    if ((threadIdx.x & 31) < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // half-warp shuffle
    out[threadIdx.x] = v;
}

// Each lane shuffles with a mask naming only lane 0 (so lanes 1..31 are not in their own mask).
extern "C" __global__ void probe_shfl_mask_without_self(float* out) {
    out[threadIdx.x] = __shfl_sync(0x1u, (float)threadIdx.x, 0);
}

// Even lanes shuffle while odd lanes take a vote under the same full mask.
extern "C" __global__ void probe_mismatched_collectives(int* out) {
    const int lane = threadIdx.x & 31;
    out[lane] = (lane & 1) ? (int)__ballot_sync(0xffffffffu, 1) : __shfl_sync(0xffffffffu, lane, 0);
}

// Reads x[n + i]: past the end of an n-element buffer.
extern "C" __global__ void probe_oob_read(const float* x, float* out, int n) {
    out[threadIdx.x] = x[n + threadIdx.x * 1024];
}

// Writes out[n + i * stride]: past the end of an n-element buffer.
extern "C" __global__ void probe_oob_write(float* out, int n, int stride) {
    out[n + threadIdx.x * stride] = 1.0f;
}

// Writes dynamic shared memory one element past the launch's size (n floats).
extern "C" __global__ void probe_dynamic_smem_overflow(float* out, int n, int offset) {
    DYNAMIC_SMEM(float, s);
    s[n - 1 + offset] = 1.0f;
    __syncthreads();
    out[threadIdx.x] = s[0];
}

// Spins until *flag changes, which nothing does.
extern "C" __global__ void probe_spin(const int* flag, int* out) {
    int n = 0;
    while (*(volatile const int*)flag == 0) ++n;
    out[0] = n;
}

// Integer division by x[0].
extern "C" __global__ void probe_divide(const int* x, int* out) { out[threadIdx.x] = 1000 / x[0]; }

// Recursion with a large frame per level: overflows the thread's stack.
__device__ __noinline__ int probe_deep(volatile int* p, int depth) {
    volatile int frame[512];
    frame[depth & 511] = depth;
    if (depth == 0) return frame[0];
    return probe_deep(p, depth - 1) + frame[depth & 511] + p[0];
}
extern "C" __global__ void probe_stack_overflow(int* out, int depth) { out[0] = probe_deep(out, depth); }

// Each thread reads its own cp.async destination before waiting for the copy: right only if the
// copy happened to land early.
extern "C" __global__ void probe_cp_async_early_read(const float* src, float* out) {
    __shared__ __align__(16) float s[128];
    const int lane = threadIdx.x & 31;
    cp_async_cg(&s[lane * 4], &src[lane * 4]);
    cp_async_commit();
    for (int j = 0; j < 4; ++j) out[lane * 4 + j] = s[lane * 4 + j];
    cp_async_wait_all();
}

// An ldmatrix row address that is not in shared memory (a global pointer).
extern "C" __global__ void probe_ldmatrix_global(const unsigned short* src, u32* out) {
    u32 r[1];
    ldmatrix_x1(r, src + (threadIdx.x & 7) * 8);
    out[threadIdx.x] = r[0];
}

// A block-wide spin lock built on atomicCAS around a non-atomic increment (works on Volta and
// later, where a waiting thread cannot starve the holder): counter ends at the thread count.
extern "C" __global__ void probe_spin_lock(int* lock, int* counter) {
    while (atomicCAS(lock, 0, 1) != 0) {
    }
    *(volatile int*)counter = *(volatile int*)counter + 1;
    __threadfence();
    atomicExch(lock, 0);
}

// n barriers in a row (timing: the emulator's cost per thread and barrier).
extern "C" __global__ void probe_barrier_loop(float* out, int n) {
    float v = (float)threadIdx.x;
    for (int i = 0; i < n; ++i) {
        v = v * 0.5f + 1.0f;
        __syncthreads();
    }
    out[blockIdx.x * blockDim.x + threadIdx.x] = v;
}
