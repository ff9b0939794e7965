#line 1 "mma.cuh"
// Tensor-core and asynchronous-copy instructions as small device functions, part of every
// family's prelude (src/cuda/kernels.rs). Under NVRTC each is one inline PTX instruction; in the
// CPU emulator (LORA_EMU, host/engine/emu/) each is the runtime's emulation of that instruction,
// which also names the calling line in its errors. Layouts (PTX ISA 9.7.14.5.8, 9.7.14.5.15):
//
//   mma_m16n8k16_{bf16,f16}(d, a, b, c): d = a @ b + c, a 16x16 row-major, b 16x8 column-major,
//     c, d 16x8 f32; per lane (g = lane / 4, t = lane % 4), low half of a register first:
//       a[0] = A[g][2t..2t+1]    a[1] = A[g+8][2t..]    a[2] = A[g][2t+8..]    a[3] = A[g+8][2t+8..]
//       b[0] = B[2t..2t+1][g]    b[1] = B[2t+8..][g]
//       c[0..1] = C[g][2t..2t+1] c[2..3] = C[g+8][2t..2t+1]   (d likewise)
//   ldmatrix_x{1,2,4}{,_trans}(r, row): lanes 8m..8m+7 pass the shared addresses of rows 0..7 of
//     8x8 b16 matrix m (16 bytes each, 16-byte aligned); r[m] = M_m[lane/4][2(lane%4)..+1], or
//     with _trans M_m[2(lane%4)..+1][lane/4]. x4 of a row-major 16x16 tile (lane l at row l % 16,
//     column 8 * (l / 16)) gives exactly mma's a[0..3]; x2_trans of a [k][n] 16x8 tile (lane l at
//     row l) gives b[0..1].
//   cp_async_ca<BYTES>(dst, src, src_bytes) / cp_async_cg(dst, src, src_bytes): copy src_bytes
//     (default all) of BYTES = 4, 8, 16 (cg: 16) from global to shared, zero-filling the rest;
//     both addresses aligned to BYTES; src is not read when src_bytes is 0. Complete only after
//     cp_async_commit() and cp_async_wait<N>() (at most N most recent groups left pending) or
//     cp_async_wait_all(); other threads see the data after a __syncthreads that follows the wait.

#ifdef LORA_EMU
#define LORA_EMU_SITE , const char* lora_emu_file = __builtin_FILE(), int lora_emu_line = __builtin_LINE()
#define LORA_EMU_AT lora_emu_file, lora_emu_line
#else
// A shared-memory address as the 32-bit operand the .shared instructions take.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned s;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(s) : "l"(p));
    return s;
}
#endif

__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const u32 a[4], const u32 b[2], const float c[4]
#ifdef LORA_EMU
                                                  LORA_EMU_SITE) {
    lora_emu::mma_m16n8k16(LORA_EMU_AT, 0, d, a, b, c);
}
#else
) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#endif

__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const u32 a[4], const u32 b[2], const float c[4]
#ifdef LORA_EMU
                                                 LORA_EMU_SITE) {
    lora_emu::mma_m16n8k16(LORA_EMU_AT, 1, d, a, b, c);
}
#else
) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#endif

#ifdef LORA_EMU
#define LORA_LDMATRIX(name, num, trans)                                                        \
    __device__ __forceinline__ void name(u32 r[num], const void* row LORA_EMU_SITE) {          \
        lora_emu::ldmatrix(LORA_EMU_AT, num, trans, r, row);                                   \
    }
LORA_LDMATRIX(ldmatrix_x1, 1, 0)
LORA_LDMATRIX(ldmatrix_x2, 2, 0)
LORA_LDMATRIX(ldmatrix_x4, 4, 0)
LORA_LDMATRIX(ldmatrix_x1_trans, 1, 1)
LORA_LDMATRIX(ldmatrix_x2_trans, 2, 1)
LORA_LDMATRIX(ldmatrix_x4_trans, 4, 1)
#undef LORA_LDMATRIX
#else
__device__ __forceinline__ void ldmatrix_x1(u32 r[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2(u32 r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4(u32 r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x1_trans(u32 r[1], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(u32 r[2], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                 : "=r"(r[0]), "=r"(r[1])
                 : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(u32 r[4], const void* row) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_u32(row)));
}
#endif

template <int BYTES>
__device__ __forceinline__ void cp_async_ca(void* dst, const void* src, int src_bytes = BYTES
#ifdef LORA_EMU
                                            LORA_EMU_SITE) {
    lora_emu::cp_async(LORA_EMU_AT, 0, dst, src, BYTES, src_bytes);
}
#else
) {
    static_assert(BYTES == 4 || BYTES == 8 || BYTES == 16, "cp.async.ca copies 4, 8 or 16 bytes");
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(smem_u32(dst)), "l"(src), "n"(BYTES), "r"(src_bytes));
}
#endif

__device__ __forceinline__ void cp_async_cg(void* dst, const void* src, int src_bytes = 16
#ifdef LORA_EMU
                                            LORA_EMU_SITE) {
    lora_emu::cp_async(LORA_EMU_AT, 1, dst, src, 16, src_bytes);
}
#else
) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes));
}
#endif

__device__ __forceinline__ void cp_async_commit(
#ifdef LORA_EMU
    const char* lora_emu_file = __builtin_FILE(), int lora_emu_line = __builtin_LINE()) {
    lora_emu::cp_async_commit(LORA_EMU_AT);
}
#else
) {
    asm volatile("cp.async.commit_group;\n" ::);
}
#endif

template <int N>
__device__ __forceinline__ void cp_async_wait(
#ifdef LORA_EMU
    const char* lora_emu_file = __builtin_FILE(), int lora_emu_line = __builtin_LINE()) {
    lora_emu::cp_async_wait(LORA_EMU_AT, N);
}
#else
) {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
#endif

__device__ __forceinline__ void cp_async_wait_all(
#ifdef LORA_EMU
    const char* lora_emu_file = __builtin_FILE(), int lora_emu_line = __builtin_LINE()) {
    lora_emu::cp_async_wait(LORA_EMU_AT, -1);
}
#else
) {
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}
#endif

#ifdef LORA_EMU
#undef LORA_EMU_SITE
#undef LORA_EMU_AT
#endif
