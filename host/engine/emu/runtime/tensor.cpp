// Tensor-core and asynchronous-copy instructions, emulated from the PTX ISA (9.7.14 "Warp Level
// Matrix Multiply-Accumulate Instructions", 9.7.9.25 "cp.async"), written for this emulator:
//
// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 — a warp collective over all 32
//   lanes. groupID = lane >> 2, tig = lane % 4. Each lane holds
//     A (16x16, row): a0..a7 in 4 registers, low half first; row = groupID (+8 for a2,a3,a6,a7),
//                     col = tig*2 + (i & 1) (+8 for a4..a7);
//     B (16x8, col):  b0..b3 in 2 registers; row (k) = tig*2 + (i & 1) (+8 for b2,b3), col = groupID;
//     C, D (16x8):    c0..c3; row = groupID (+8 for c2,c3), col = tig*2 + (i & 1).
//   Numerics modelled: every product of two bf16/f16 values is exact, the 16 products and C are
//   summed exactly (in double: 16 products of at most 22 significant bits each plus one f32) and
//   rounded once to f32 (nearest even). The hardware adds in a fixed tree with truncation, so a
//   GPU may differ from this in the last bit or so of a sum with cancellation; results that are
//   exact in f32 (e.g. small integers) agree bit for bit.
//
// ldmatrix.sync.aligned.m8n8.{x1,x2,x4}{,.trans}.shared.b16 — lanes 8m..8m+7 give the addresses of
//   rows 0..7 of matrix m (16 bytes each, 16-byte aligned, in shared memory); lane l receives, for
//   each matrix, one register holding elements (l/4, 2*(l%4)) and (l/4, 2*(l%4)+1), low half
//   first; with .trans, elements (2*(l%4), l/4) and (2*(l%4)+1, l/4).
//
// cp.async.{ca,cg}.shared.global [dst], [src], cp-size{, src-size} — per thread: copies src-size
//   bytes and zero-fills the rest of cp-size (4, 8 or 16; .cg only 16), both addresses aligned to
//   cp-size; src is not read when src-size is 0. commit_group closes the thread's open copies into
//   a group; wait_group N returns once at most the N most recent groups are pending; wait_all is
//   commit + wait_group 0. The copy really is asynchronous: under the forward and reverse
//   schedules it lands at the wait that covers it (the latest point the ISA allows), under the
//   shuffled schedule at a seeded point before that; until then the destination keeps whatever
//   it held (poison at block start). A kernel that reads its tile before waiting sees that.
#include "runtime.h"

namespace lora_emu {

const PendingCopy* volatile g_copy_in_flight = nullptr;
Fiber* volatile g_copy_fiber = nullptr;

static float element(uint16_t bits, bool f16) { return f16 ? f16_bits_to_f32(bits) : bf16_bits_to_f32(bits); }

static uint16_t half_of(unsigned reg, int i) { return (uint16_t)((reg >> (16 * (i & 1))) & 0xffffu); }

void resolve_mma(Fiber* const lanes[32]) {
    const bool f16 = lanes[0]->op.mode != 0;
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const WarpOp& op = lanes[lane]->op;
        const unsigned* a = static_cast<const unsigned*>(op.in[0]);
        const unsigned* b = static_cast<const unsigned*>(op.in[1]);
        const float* c = static_cast<const float*>(op.in[2]);
        const int group = lane >> 2, tig = lane & 3;
        for (int i = 0; i < 8; ++i) {
            const int row = group + ((i & 2) ? 8 : 0);
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = element(half_of(a[i / 2], i), f16);
        }
        for (int i = 0; i < 4; ++i) {
            const int k = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[k][group] = element(half_of(b[i / 2], i), f16);
        }
        for (int i = 0; i < 4; ++i) C[group + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)] = c[i];
    }
    float D[16][8];
    for (int r = 0; r < 16; ++r)
        for (int n = 0; n < 8; ++n) {
            double acc = C[r][n];
            for (int k = 0; k < 16; ++k) acc += (double)A[r][k] * (double)B[k][n];
            D[r][n] = (float)acc;
        }
    for (int lane = 0; lane < 32; ++lane) {
        float* d = static_cast<float*>(lanes[lane]->op.out);
        const int group = lane >> 2, tig = lane & 3;
        for (int i = 0; i < 4; ++i) d[i] = D[group + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)];
    }
}

void mma_m16n8k16(const char* file, int line, int f16, float d[4], const unsigned a[4], const unsigned b[2],
                  const float c[4]) {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    WarpOp& op = f->op;
    op = WarpOp{};
    op.kind = WarpKind::Mma;
    op.mode = f16 ? 1 : 0;
    op.mask = 0xffffffffu;  // .aligned: the whole warp executes it
    op.site = Site{file, line};
    // Read the operands now: d may alias c (the usual accumulate in place).
    float cc[4] = {c[0], c[1], c[2], c[3]};
    unsigned aa[4] = {a[0], a[1], a[2], a[3]}, bb[2] = {b[0], b[1]};
    float dd[4];
    op.in[0] = aa;
    op.in[1] = bb;
    op.in[2] = cc;
    op.out = dd;
    warp_collective(f);
    for (int i = 0; i < 4; ++i) d[i] = dd[i];
}

void resolve_ldmatrix(Fiber* const lanes[32]) {
    const int num = lanes[0]->op.mode & 0xff;
    const bool trans = (lanes[0]->op.mode >> 8) != 0;
    uint16_t M[4][8][8];
    for (int m = 0; m < num; ++m)
        for (int r = 0; r < 8; ++r) {
            const Fiber* g = lanes[m * 8 + r];
            const void* row = g->op.in[0];
            if ((uintptr_t)row % 16 != 0)
                fail("ldmatrix at %s:%d: lane %d's row address 0x%llx is not 16-byte aligned", base_name(g->op.site.file),
                     g->op.site.line, m * 8 + r, (unsigned long long)(uintptr_t)row);
            if (!in_shared(row, 16))
                fail("ldmatrix at %s:%d: lane %d's row address: %s", base_name(g->op.site.file), g->op.site.line, m * 8 + r,
                     describe_shared(row).c_str());
            memcpy(M[m][r], row, 16);
        }
    for (int lane = 0; lane < 32; ++lane) {
        unsigned* out = static_cast<unsigned*>(lanes[lane]->op.out);
        const int r = lane >> 2, c = (lane & 3) * 2;
        for (int m = 0; m < num; ++m) {
            const uint16_t lo = trans ? M[m][c][r] : M[m][r][c];
            const uint16_t hi = trans ? M[m][c + 1][r] : M[m][r][c + 1];
            out[m] = unsigned(lo) | (unsigned(hi) << 16);
        }
    }
}

void ldmatrix(const char* file, int line, int num, int trans, unsigned* regs, const void* row_addr) {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    WarpOp& op = f->op;
    op = WarpOp{};
    op.kind = WarpKind::Ldmatrix;
    op.mode = num | ((trans ? 1 : 0) << 8);
    op.mask = 0xffffffffu;
    op.site = Site{file, line};
    if (num != 1 && num != 2 && num != 4) fail("ldmatrix at %s:%d: .x%d is not x1, x2 or x4", base_name(file), line, num);
    unsigned out[4];
    op.in[0] = row_addr;
    op.out = out;
    warp_collective(f);
    for (int m = 0; m < num; ++m) regs[m] = out[m];
}

// ---- cp.async -------------------------------------------------------------------------------------

void land_copy(Fiber* f, int i) {
    const PendingCopy& c = f->copies[i];
    g_copy_fiber = f;
    g_copy_in_flight = &c;
    if (c.src_size) memcpy(c.dst, c.src, c.src_size);
    if (c.src_size < c.cp_size) memset((char*)c.dst + c.src_size, 0, c.cp_size - c.src_size);
    g_copy_in_flight = nullptr;
    g_copy_fiber = nullptr;
}

// Lands every copy of `f` for which keep(i) is false, in issue order, and compacts the rest.
template <typename Keep>
static void land_where(Fiber* f, Keep keep) {
    int w = 0;
    for (int i = 0; i < f->ncopies; ++i) {
        if (keep(f->copies[i])) {
            if (w != i) f->copies[w] = f->copies[i];
            ++w;
        } else {
            land_copy(f, i);
        }
    }
    f->ncopies = w;
}

void land_all(Fiber* f) {
    land_where(f, [](const PendingCopy&) { return false; });
}

void land_random(Fiber* f, unsigned one_in) {
    land_where(f, [one_in](const PendingCopy&) { return rng_next(g_L.rng) % one_in != 0; });
}

void cp_async(const char* file, int line, int cg, void* dst, const void* src, int cp_size, int src_size) {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    const char* kind = cg ? "cp.async.cg" : "cp.async.ca";
    file = base_name(file);
    if (cp_size != 4 && cp_size != 8 && cp_size != 16)
        fail("%s at %s:%d: cp-size %d is not 4, 8 or 16", kind, file, line, cp_size);
    if (cg && cp_size != 16) fail("%s at %s:%d: .cg copies 16 bytes only, not %d", kind, file, line, cp_size);
    if (src_size < 0 || src_size > cp_size)
        fail("%s at %s:%d: src-size %d is outside 0..=%d", kind, file, line, src_size, cp_size);
    if ((uintptr_t)dst % cp_size != 0 || (uintptr_t)src % cp_size != 0)
        fail("%s at %s:%d: dst 0x%llx and src 0x%llx must both be aligned to %d bytes", kind, file, line,
             (unsigned long long)(uintptr_t)dst, (unsigned long long)(uintptr_t)src, cp_size);
    if (!in_shared(dst, cp_size)) fail("%s at %s:%d: destination %s", kind, file, line, describe_shared(dst).c_str());
    if (f->ncopies == kMaxPendingCopies)
        fail("%s at %s:%d: more than %d copies in flight in one thread (wait for some)", kind, file, line,
             kMaxPendingCopies);
    f->copies[f->ncopies++] = PendingCopy{dst, src, (uint32_t)cp_size, (uint32_t)src_size, f->committed, Site{file, line}};
}

void cp_async_commit(const char*, int) {
    RuntimeScope scope;
    ++g_fiber->committed;
}

void cp_async_wait(const char*, int, int n) {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    if (n < 0) {
        ++f->committed;
        n = 0;
    }
    // Groups 0 .. committed-1 exist; all but the n most recent must be complete.
    const uint32_t done_below = f->committed > (uint32_t)n ? f->committed - (uint32_t)n : 0;
    land_where(f, [done_below](const PendingCopy& c) { return c.group >= done_below; });
}

}  // namespace lora_emu
