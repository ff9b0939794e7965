// One block at a time: its threads run as fibers in rounds. In each round every runnable thread
// runs, in the launch's order (forward, reverse or a seeded shuffle), until it reaches a
// synchronisation point (__syncthreads, a warp collective, an atomic) or exits. A thread waiting
// at a point becomes runnable again in a later round, once every participant has arrived. So
// what one thread writes between two barriers is seen or not by another depending on the order:
// a missing barrier changes results between orders instead of passing by luck.
//
// Checked, and reported naming the kernel, block, thread, file and line:
//   - __syncthreads reached at different call sites, or by some threads while others have exited
//     (CUDA leaves both undefined);
//   - a warp collective whose mask leaves out the calling lane, names a lane the warp does not
//     have, a lane that has exited, waits at a barrier or at a different collective;
//   - a block that can no longer make progress (a deadlock), and the launch's time limit.
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>

#include "runtime.h"

extern "C" char __start_lora_emu_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_lora_emu_shared[] __attribute__((weak, visibility("hidden")));

namespace lora_emu {

ThreadView* g_thread = nullptr;
uint3 g_block_idx;
dim3 g_block_dim;
dim3 g_grid_dim;
Launch g_L;
Fiber* g_fiber = nullptr;
volatile sig_atomic_t g_kernel_running = 0;
volatile sig_atomic_t g_timeout_pending = 0;

// ---- small helpers ------------------------------------------------------------------------------

const char* base_name(const char* path) {
    const char* s = strrchr(path, '/');
    return s ? s + 1 : path;
}

bool same_site(Site a, Site b) { return a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0); }

std::string vformat(const char* fmt, va_list ap) {
    char buf[1024];
    va_list copy;
    va_copy(copy, ap);
    const int n = vsnprintf(buf, sizeof buf, fmt, copy);
    va_end(copy);
    if (n < (int)sizeof buf) return std::string(buf, n > 0 ? (size_t)n : 0);
    std::string s((size_t)n, '\0');
    vsnprintf(&s[0], (size_t)n + 1, fmt, ap);
    return s;
}

std::string format(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::string s = vformat(fmt, ap);
    va_end(ap);
    return s;
}

uint64_t rng_next(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t cpu_ns(clockid_t clock) {
    timespec ts;
    if (clock_gettime(clock, &ts) != 0) return 0;
    return uint64_t(ts.tv_sec) * 1000000000ull + uint64_t(ts.tv_nsec);
}

Fiber* current() { return g_fiber; }

std::string where(const Fiber* f) {
    const Launch& L = g_L;
    std::string s = format("kernel %s, block (%u,%u,%u)", L.kernel->name, L.bid.x, L.bid.y, L.bid.z);
    if (f) s += format(", thread (%u,%u,%u)", f->view.tid.x, f->view.tid.y, f->view.tid.z);
    return s;
}

void fail(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    Fiber* f = g_fiber;
    g_L.err = where(f) + ": " + vformat(fmt, ap);
    va_end(ap);
    g_L.failed = true;
    g_kernel_running = 0;
    switch_to_scheduler(f);  // the launch is abandoned: this fiber never runs again
    __builtin_trap();
}

static bool block_error(const Fiber* f, const std::string& msg) {
    g_L.err = where(f) + ": " + msg;
    g_L.failed = true;
    return false;
}

Fiber* lane_fiber(unsigned warp, unsigned lane) { return fiber_at(warp * 32 + lane); }

// What the scheduler knows of each warp of the block, as lane bit masks, per-lane slots and the
// collectives in progress, so an arrival checks its partners without touching their fibers.
namespace {
struct Pending {
    uint64_t sig;      // the collective (kind, mode, operands that must agree, mask)
    uint32_t mask;     // its lanes
    uint32_t arrived;  // those waiting in it
};
struct WarpState {
    uint32_t exists;   // the lanes this warp has (a block's last warp may be partial)
    uint32_t done;     // lanes that exited
    uint32_t barrier;  // lanes waiting at __syncthreads
    int npending;
    Pending pending[32];
    uint64_t value[32];
    int32_t b[32];
    uint64_t result[32];
};
WarpState g_warps[kMaxThreads / 32];

// A collective in progress of `w` that waits for `lane`, if any.
const Pending* waiting_for(const WarpState& w, unsigned lane) {
    for (int i = 0; i < w.npending; ++i)
        if ((w.pending[i].mask >> lane) & 1u) return &w.pending[i];
    return nullptr;
}
}  // namespace

static unsigned lanes_in_warp(unsigned warp) {
    const unsigned first = warp * 32;
    return std::min(32u, g_L.nthreads - first);
}

static uint64_t signature(const WarpOp& op) {
    const uint64_t packed = uint64_t(op.kind) | (uint64_t(op.mode & 0x1ff) << 3) | (uint64_t(op.c & 0x1fff) << 12) |
                            (uint64_t(op.bytes & 0xf) << 25);
    return (uint64_t(op.mask) << 32) | packed;
}

static const char* op_name(const WarpOp& op) {
    switch (op.kind) {
        case WarpKind::Shfl: {
            static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync"};
            return names[op.mode & 3];
        }
        case WarpKind::Vote: {
            static const char* names[] = {"__ballot_sync", "__any_sync", "__all_sync"};
            return names[op.mode % 3];
        }
        case WarpKind::Syncwarp: return "__syncwarp";
        case WarpKind::Mma: return op.mode ? "mma.sync.m16n8k16 (f16)" : "mma.sync.m16n8k16 (bf16)";
        case WarpKind::Ldmatrix: return "ldmatrix";
    }
    return "?";
}

static std::string describe_op(const WarpOp& op) {
    return format("%s at %s:%d (mask 0x%08x)", op_name(op), base_name(op.site.file), op.site.line, op.mask);
}

// A lane of `f`'s warp that waits in a collective whose mask names `f`, which is about to reach
// __syncthreads at `s`: the collective can never complete.
static void check_warp_waiters(const Fiber* f, Site s) {
    if (const Pending* p = waiting_for(g_warps[f->warp], f->lane)) {
        const unsigned l = (unsigned)__builtin_ctz(p->arrived);
        fail("reaches __syncthreads at %s:%d while lane %u of its warp waits for it in %s", base_name(s.file), s.line, l,
             describe_op(lane_fiber(f->warp, l)->op).c_str());
    }
}

static void make_runnable(Fiber* f) {
    f->state = State::Runnable;
    g_L.next.push_back(f);
}

// ---- barriers -----------------------------------------------------------------------------------

static const Fiber* first_exited() {
    for (unsigned i = 0; i < g_L.nthreads; ++i)
        if (fiber_at(i)->state == State::Done) return fiber_at(i);
    return nullptr;
}

static int barrier(Site s, int mode, int pred) {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    Launch& L = g_L;
    check_warp_waiters(f, s);
    if (L.done > 0) {
        const Fiber* x = first_exited();
        fail("reaches __syncthreads at %s:%d, but thread (%u,%u,%u) has already exited: every thread of the block "
             "must reach each __syncthreads",
             base_name(s.file), s.line, x->view.tid.x, x->view.tid.y, x->view.tid.z);
    }
    if (L.at_barrier > 0 && !same_site(L.barrier_site, s))
        fail("divergent __syncthreads: this thread reaches __syncthreads at %s:%d while %u threads wait at %s:%d",
             base_name(s.file), s.line, L.at_barrier, base_name(L.barrier_site.file), L.barrier_site.line);
    if (L.at_barrier == 0) L.barrier_site = s;
    f->state = State::Barrier;
    g_warps[f->warp].barrier |= 1u << f->lane;
    f->bar_site = s;
    f->bar_mode = mode;
    f->bar_pred = pred != 0;
    if (++L.at_barrier == L.nthreads) {
        int count = 0;
        for (unsigned i = 0; i < L.nthreads; ++i) count += fiber_at(i)->bar_pred;
        const int result = mode == 0 ? count : mode == 1 ? (count == (int)L.nthreads) : (count > 0);
        L.at_barrier = 0;
        for (unsigned w = 0; w * 32 < L.nthreads; ++w) g_warps[w].barrier = 0;
        for (unsigned i = 0; i < L.nthreads; ++i) {
            Fiber* g = fiber_at(i);
            g->bar_result = result;
            make_runnable(g);
            // Asynchronous copies may land at any point before their wait: some land here.
            if (L.schedule == SCHED_SHUFFLED && g->ncopies) land_random(g, 2);
        }
    }
    switch_to_scheduler(f);
    return f->bar_result;
}

void syncthreads(const char* file, int line) { barrier(Site{file, line}, -1, 0); }

int syncthreads_reduce(const char* file, int line, int mode, int pred) { return barrier(Site{file, line}, mode, pred); }

void yield_point() {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    make_runnable(f);
    switch_to_scheduler(f);
}

// ---- warp collectives -----------------------------------------------------------------------------

static void resolve_shfl(WarpState& w, const WarpOp& op) {
    const unsigned mask = op.mask;
    const int seg = (op.c >> 8) & 0x1f, clamp = op.c & 0x1f;
    const uint64_t poison = op.bytes >= 8 ? ~0ull : ((1ull << (8 * op.bytes)) - 1);
    for (uint32_t o = mask; o; o &= o - 1) {
        const int i = __builtin_ctz(o);
        const int b = w.b[i] & 0xffff;
        const int max_lane = (i & seg) | (clamp & ~seg), min_lane = i & seg;
        int j;
        bool in;
        switch (op.mode) {
            case SHFL_IDX: j = min_lane | (b & 0x1f & ~seg); in = j <= max_lane; break;
            case SHFL_UP: j = i - b; in = j >= max_lane; break;
            case SHFL_DOWN: j = i + b; in = j <= max_lane; break;
            default: j = i ^ b; in = j <= max_lane; break;
        }
        if (!in) j = i;
        // A source lane outside the mask has no defined value: poison (0xFF bytes), as the
        // emulator does for every undefined read.
        w.result[i] = (j >= 0 && j < 32 && ((mask >> j) & 1u)) ? w.value[j] : poison;
    }
}

static void resolve_vote(WarpState& w, int mode, unsigned mask) {
    unsigned ballot = 0;
    for (uint32_t o = mask; o; o &= o - 1) {
        const int l = __builtin_ctz(o);
        if (w.value[l]) ballot |= 1u << l;
    }
    const unsigned r = mode == 0 ? ballot : mode == 1 ? (ballot != 0) : (ballot == mask);
    for (uint32_t o = mask; o; o &= o - 1) w.result[__builtin_ctz(o)] = r;
}

uint64_t warp_collective(Fiber* f) {
    const WarpOp& op = f->op;
    const uint32_t mask = op.mask, me = 1u << f->lane;
    WarpState& w = g_warps[f->warp];
    if (!(mask & me)) fail("%s: the mask does not include the calling lane %u", describe_op(op).c_str(), f->lane);
    if (mask & ~w.exists)
        fail("%s names lane %d, but this warp has only %u threads (the block has %u)", describe_op(op).c_str(),
             __builtin_ctz(mask & ~w.exists), lanes_in_warp(f->warp), g_L.nthreads);
    if (mask & w.done) fail("%s names lane %d, which has exited", describe_op(op).c_str(), __builtin_ctz(mask & w.done));
    if (mask & w.barrier) {
        const Fiber* g = lane_fiber(f->warp, (unsigned)__builtin_ctz(mask & w.barrier));
        fail("%s names lane %u, which waits at __syncthreads at %s:%d", describe_op(op).c_str(), g->lane,
             base_name(g->bar_site.file), g->bar_site.line);
    }
    const uint64_t sig = signature(op);
    Pending* mine = nullptr;
    for (int i = 0; i < w.npending; ++i) {
        Pending& p = w.pending[i];
        if (p.sig == sig) {
            mine = &p;
        } else if ((p.mask & me) && (mask & p.arrived)) {
            // That collective waits for this lane, and this one for a lane waiting in it.
            const unsigned l = (unsigned)__builtin_ctz(mask & p.arrived);
            fail("%s, but lane %u of the mask is in %s, which waits for this lane: every lane of a mask must "
                 "execute the same collective",
                 describe_op(op).c_str(), l, describe_op(lane_fiber(f->warp, l)->op).c_str());
        }
        // Otherwise its lanes come to this collective once theirs is done.
    }
    if (!mine) {
        mine = &w.pending[w.npending++];
        *mine = Pending{sig, mask, 0};
    }
    f->state = State::Warp;
    mine->arrived |= me;
    w.value[f->lane] = op.value;
    w.b[f->lane] = op.b;
    if (mine->arrived == mask) {
        *mine = w.pending[--w.npending];
        if (op.kind == WarpKind::Shfl || op.kind == WarpKind::Vote || op.kind == WarpKind::Syncwarp) {
            if (op.kind == WarpKind::Shfl) resolve_shfl(w, op);
            if (op.kind == WarpKind::Vote) resolve_vote(w, op.mode, mask);
            for (uint32_t o = mask; o; o &= o - 1) make_runnable(lane_fiber(f->warp, (unsigned)__builtin_ctz(o)));
        } else {
            Fiber* lanes[32] = {};
            for (uint32_t o = mask; o; o &= o - 1) {
                const unsigned l = (unsigned)__builtin_ctz(o);
                lanes[l] = lane_fiber(f->warp, l);
            }
            if (op.kind == WarpKind::Mma) resolve_mma(lanes);
            if (op.kind == WarpKind::Ldmatrix) resolve_ldmatrix(lanes);
            for (uint32_t o = mask; o; o &= o - 1) make_runnable(lanes[__builtin_ctz(o)]);
        }
    }
    switch_to_scheduler(f);
    return w.result[f->lane];
}

static bool valid_width(int w) { return w >= 1 && w <= 32 && (w & (w - 1)) == 0; }

uint64_t shfl(const char* file, int line, int mode, unsigned mask, uint64_t bits, unsigned bytes, int b, int c) {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    WarpOp& op = f->op;  // (the hot path: only the fields a shuffle uses are set)
    op.kind = WarpKind::Shfl;
    op.mode = mode;
    op.mask = mask;
    op.c = c;
    op.site = Site{file, line};
    op.value = bits;
    op.b = b;
    op.bytes = bytes;
    const int width = b >> 16;
    if (!valid_width(width)) fail("%s: width %d is not a power of two in 1..=32", describe_op(op).c_str(), width);
    return warp_collective(f);
}

unsigned vote(const char* file, int line, int mode, unsigned mask, int pred) {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    WarpOp& op = f->op;
    op.kind = WarpKind::Vote;
    op.c = 0;
    op.bytes = 0;
    op.mode = mode;
    op.mask = mask;
    op.site = Site{file, line};
    op.value = pred != 0;
    return (unsigned)warp_collective(f);
}

void syncwarp(const char* file, int line, unsigned mask) {
    RuntimeScope scope;
    Fiber* f = g_fiber;
    WarpOp& op = f->op;
    op.kind = WarpKind::Syncwarp;
    op.mode = op.c = 0;
    op.bytes = 0;
    op.mask = mask;
    op.site = Site{file, line};
    warp_collective(f);
}

void trap(const char* file, int line, const char* what) {
    RuntimeScope scope;
    fail("%s at %s:%d", what, base_name(file), line);
}

// ---- shared memory --------------------------------------------------------------------------------

namespace {
struct DynSmem {
    uintptr_t map = 0, guard = 0;  // [map, guard) may be accessible; [guard, guard + page) never
    size_t page = 0;
    uintptr_t open = 0;   // start of the accessible pages for the current size
    uintptr_t ptr = 0;    // the launch's buffer: [ptr, ptr + size)
    uint32_t size = 0;
};
DynSmem g_dyn;
}  // namespace

void* dynamic_smem() { return reinterpret_cast<void*>(g_dyn.ptr); }

bool smem_prepare(uint32_t bytes, std::string& err) {
    DynSmem& d = g_dyn;
    if (d.map == 0) {
        d.page = (size_t)sysconf(_SC_PAGESIZE);
        const size_t region = (kMaxDynamicSmem + d.page - 1) / d.page * d.page;
        void* m = mmap(nullptr, region + d.page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            err = "cannot map the emulator's shared memory";
            return false;
        }
        d.map = (uintptr_t)m;
        d.guard = d.map + region;
        d.open = d.guard;
    }
    // The buffer ends at the guard page (16-byte aligned start, as the device aligns it); only
    // the pages it touches are accessible, so an access before it faults too.
    const uintptr_t ptr = (d.guard - bytes) & ~uintptr_t(15);
    const uintptr_t open = ptr & ~uintptr_t(d.page - 1);
    if (open != d.open) {
        if (open < d.open && mprotect((void*)open, d.open - open, PROT_READ | PROT_WRITE) != 0) {
            err = "cannot resize the emulator's shared memory";
            return false;
        }
        if (open > d.open && mprotect((void*)d.open, open - d.open, PROT_NONE) != 0) {
            err = "cannot resize the emulator's shared memory";
            return false;
        }
        d.open = open;
    }
    d.ptr = ptr;
    d.size = bytes;
    return true;
}

static size_t static_smem_bytes() {
    return (__start_lora_emu_shared && __stop_lora_emu_shared) ? size_t(__stop_lora_emu_shared - __start_lora_emu_shared) : 0;
}

void smem_poison() {
    memset((void*)g_dyn.open, 0xFF, g_dyn.guard - g_dyn.open);
    if (static_smem_bytes()) memset(__start_lora_emu_shared, 0xFF, static_smem_bytes());
}


bool smem_check_slack(std::string& err) {
    const DynSmem& d = g_dyn;
    const uintptr_t end = d.ptr + d.size;
    if (!all_ff(d.open, d.ptr)) {
        err = format("wrote before the start of its %u bytes of dynamic shared memory", d.size);
        return false;
    }
    if (!all_ff(end, d.guard)) {
        err = format("wrote past the end of its %u bytes of dynamic shared memory", d.size);
        return false;
    }
    return true;
}

bool in_shared(const void* p, size_t bytes) {
    const uintptr_t a = (uintptr_t)p;
    if (a >= g_dyn.ptr && a + bytes <= g_dyn.ptr + g_dyn.size && a + bytes >= a) return true;
    const uintptr_t s = (uintptr_t)__start_lora_emu_shared;
    return static_smem_bytes() && a >= s && a + bytes <= s + static_smem_bytes();
}

std::string describe_shared(const void* p) {
    return format("0x%llx is not in shared memory (this launch's dynamic shared memory is %u bytes at 0x%llx)",
                  (unsigned long long)(uintptr_t)p, g_dyn.size, (unsigned long long)g_dyn.ptr);
}

bool in_dynamic_smem_guard(uintptr_t addr, std::string& what) {
    const DynSmem& d = g_dyn;
    if (d.map == 0 || addr < d.map || addr >= d.guard + d.page) return false;
    if (addr >= d.ptr + d.size)
        what = format("%llu bytes past the end of the launch's %u bytes of dynamic shared memory",
                      (unsigned long long)(addr - d.ptr - d.size), d.size);
    else
        what = format("%llu bytes before the start of the launch's %u bytes of dynamic shared memory",
                      (unsigned long long)(d.ptr - addr), d.size);
    return true;
}

// ---- one block ------------------------------------------------------------------------------------

// Puts a round's runnable threads in the launch's order: by thread index (a bitmap, linear time)
// forward or backward, or a fresh seeded permutation.
static void order(std::vector<Fiber*>& q) {
    if (g_L.schedule == SCHED_SHUFFLED) {
        for (size_t i = q.size(); i > 1; --i) std::swap(q[i - 1], q[rng_next(g_L.rng) % i]);
        return;
    }
    uint64_t bits[kMaxThreads / 64] = {};
    for (const Fiber* f : q) bits[f->linear >> 6] |= 1ull << (f->linear & 63);
    size_t k = 0;
    const unsigned words = (g_L.nthreads + 63) / 64;
    if (g_L.schedule == SCHED_FORWARD) {
        for (unsigned w = 0; w < words; ++w)
            for (uint64_t b = bits[w]; b; b &= b - 1) q[k++] = fiber_at(w * 64 + (unsigned)__builtin_ctzll(b));
    } else {
        for (unsigned w = words; w-- > 0;)
            for (uint64_t b = bits[w]; b;) {
                const unsigned top = 63 - (unsigned)__builtin_clzll(b);
                q[k++] = fiber_at(w * 64 + top);
                b &= ~(1ull << top);
            }
    }
}

// A thread exited: what it leaves behind must still be able to complete.
static bool on_exit(Fiber* f) {
    Launch& L = g_L;
    ++L.done;
    land_all(f);  // copies it never waited for still land
    WarpState& w = g_warps[f->warp];
    w.done |= 1u << f->lane;
    if (const Pending* p = waiting_for(w, f->lane)) {
        const unsigned l = (unsigned)__builtin_ctz(p->arrived);
        return block_error(f, format("exited while lane %u of its warp waits for it in %s", l,
                                     describe_op(lane_fiber(f->warp, l)->op).c_str()));
    }
    if (L.at_barrier > 0)
        return block_error(f, format("exited while %u threads wait at __syncthreads at %s:%d: every thread of the "
                                     "block must reach each __syncthreads",
                                     L.at_barrier, base_name(L.barrier_site.file), L.barrier_site.line));
    return true;
}

static bool over_time() {
    return g_timeout_pending || cpu_ns(CLOCK_THREAD_CPUTIME_ID) > g_L.deadline_ns;
}

static bool time_error(const Fiber* f) {
    return block_error(f, format("ran past the emulator's time limit of %g CPU seconds per launch (an endless loop, "
                                 "or a launch far too large to emulate)",
                                 g_L.time_limit_s));
}

bool run_block(uint3 bid) {
    Launch& L = g_L;
    L.bid = bid;
    g_block_idx = bid;
    smem_poison();
    L.done = 0;
    L.at_barrier = 0;
    L.runq.clear();
    L.next.clear();
    for (unsigned w = 0; w * 32 < L.nthreads; ++w) {
        const unsigned have = lanes_in_warp(w);
        g_warps[w].exists = have == 32 ? 0xffffffffu : ((1u << have) - 1);
        g_warps[w].done = g_warps[w].barrier = 0;
        g_warps[w].npending = 0;
    }
    const unsigned bx = L.block.x, bxy = L.block.x * L.block.y;
    for (unsigned i = 0; i < L.nthreads; ++i) {
        Fiber* f = fiber_at(i);
        f->view.tid = uint3{i % bx, (i / bx) % L.block.y, i / bxy};
        f->linear = i;
        f->warp = i / 32;
        f->lane = i % 32;
        f->state = State::Runnable;
        f->ncopies = 0;
        f->committed = 0;
        fiber_prepare(f, L.use_ucontext);
        L.next.push_back(f);
    }
    while (!L.next.empty()) {
        std::swap(L.runq, L.next);
        L.next.clear();
        order(L.runq);
        for (Fiber* f : L.runq) {
            switch_to_fiber(f);
            if (L.failed) return false;
            if (f->state == State::Done && !on_exit(f)) return false;
            if (L.schedule == SCHED_SHUFFLED && f->ncopies) land_random(f, 4);
            if ((++L.switches & 255) == 0 || g_timeout_pending) {
                if (over_time()) return time_error(f);
            }
        }
    }
    if (L.done != L.nthreads) {
        // Every way to get stuck is caught where it happens; this is the safety net.
        for (unsigned i = 0; i < L.nthreads; ++i) {
            const Fiber* f = fiber_at(i);
            if (f->state == State::Warp)
                return block_error(f, "deadlock: waits in " + describe_op(f->op) + " and no thread can run");
            if (f->state == State::Barrier)
                return block_error(f, format("deadlock: waits at __syncthreads at %s:%d and no thread can run",
                                             base_name(f->bar_site.file), f->bar_site.line));
        }
        return block_error(nullptr, "deadlock: no thread can run");
    }
    std::string err;
    if (!smem_check_slack(err)) return block_error(nullptr, err);
    return true;
}

}  // namespace lora_emu
