// Internal state of the CPU device emulator's runtime (not seen by kernel code).
//
//   fiber.cpp   fibers: stacks with guard pages, the context switch (x86_64 assembly, ucontext
//               elsewhere or on request)
//   sched.cpp   one block at a time: the seeded order of runnable threads, __syncthreads, warp
//               collectives (shuffles, votes, __syncwarp) and the checks that name a barrier or
//               mask that can never complete
//   tensor.cpp  mma.sync m16n8k16, ldmatrix, cp.async (warp-collective emulation from the PTX
//               ISA's fragment layouts)
//   memory.cpp  device memory: guarded, poisoned host mappings; bounds-checked copies; naming
//               the allocation an address belongs to
//   launch.cpp  the C API Rust calls: kernel table, launch (grid walk, fault and time-limit
//               handling through signals), options
#pragma once

#include <setjmp.h>
#include <signal.h>
#include <ucontext.h>

#include <atomic>
#include <cstdarg>
#include <string>
#include <vector>

#include "../include/lora_emu.h"

namespace lora_emu {

constexpr unsigned kMaxThreads = 1024;
constexpr int kMaxPendingCopies = 64;
// sm_90's largest dynamic shared memory per block (227 KiB, after the opt-in above 48 KiB).
constexpr uint32_t kMaxDynamicSmem = 232448;
constexpr size_t kFiberStack = 64 * 1024;

// ---- kernel table (instantiated per kernel by the generated family files) ----------------------
using Entry = void (*)();
struct Kernel {
    const char* name;
    Entry fn;
    void (*call)(Entry fn, void** params);
    size_t nparams;
    const size_t* param_sizes;
};
struct Family {
    const char* file;
    const Kernel* kernels;
    size_t count;
};

template <typename... A, size_t... I>
void invoke(void (*f)(A...), void** p, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}
template <typename... A>
void call_as(Entry g, void** p) {
    invoke(reinterpret_cast<void (*)(A...)>(g), p, std::index_sequence_for<A...>{});
}
template <typename... A>
Kernel make_kernel(const char* name, void (*f)(A...)) {
    static constexpr size_t sizes[] = {sizeof(A)..., 0};
    return Kernel{name, reinterpret_cast<Entry>(f), &call_as<A...>, sizeof...(A), sizes};
}

// ---- threads ------------------------------------------------------------------------------------
struct Site {
    const char* file;
    int line;
};
bool same_site(Site a, Site b);
const char* base_name(const char* path);

enum class State : uint8_t { Runnable, Barrier, Warp, Done };
enum class WarpKind : uint8_t { Shfl, Vote, Syncwarp, Mma, Ldmatrix };

struct WarpOp {
    WarpKind kind;
    int mode;        // shfl mode, vote mode, mma f16 flag, ldmatrix num | trans << 8
    unsigned mask;
    int c;           // shfl: packed clamp/segment operand; ldmatrix: unused
    Site site;
    uint64_t value;  // shfl value, vote predicate
    int b;           // shfl lane operand, width in bits 16..
    unsigned bytes;  // shfl value size
    const void* in[3];
    void* out;
    uint64_t result;
};

struct PendingCopy {
    void* dst;
    const void* src;
    uint32_t cp_size, src_size, group;
    Site site;
};

struct Fiber {
    ThreadView view;  // first: kernel code reads threadIdx through g_thread
    unsigned linear, warp, lane;
    State state;
    Site bar_site;
    int bar_mode, bar_pred, bar_result;
    WarpOp op;
    int ncopies;
    uint32_t committed;
    PendingCopy copies[kMaxPendingCopies];
    // Context: saved stack pointer (assembly switch) or a ucontext.
    void* sp;
    ucontext_t uc;
    char* stack_lo;  // usable stack [stack_lo, stack_lo + kFiberStack); a guard page below
};

enum Schedule { SCHED_FORWARD = 0, SCHED_REVERSE = 1, SCHED_SHUFFLED = 2 };

// The launch in progress (one at a time per process, under the launch lock).
struct Launch {
    const Kernel* kernel;
    const Family* family;
    void** params;
    dim3 grid, block;
    uint32_t smem;
    int schedule;
    uint64_t rng;
    bool use_ucontext;
    uint64_t deadline_ns;  // of the launching thread's CPU time
    double time_limit_s;
    // The block in progress.
    uint3 bid;
    unsigned nthreads;
    Fiber* fibers;
    std::vector<Fiber*> runq, next;
    unsigned done, at_barrier;
    Site barrier_site;
    uint64_t switches;
    bool failed;
    std::string err;
};

extern Launch g_L;
extern Fiber* g_fiber;                   // the running fiber; null in the scheduler
extern volatile sig_atomic_t g_kernel_running;  // kernel code (not the runtime) is executing
extern volatile sig_atomic_t g_timeout_pending;
extern const PendingCopy* volatile g_copy_in_flight;
extern Fiber* volatile g_copy_fiber;

// Marks a runtime entry point called from kernel code (for the time-limit signal: it only
// interrupts kernel code, never the runtime).
struct RuntimeScope {
    RuntimeScope() { g_kernel_running = 0; }
    ~RuntimeScope() { g_kernel_running = 1; }
};

uint64_t rng_next(uint64_t& state);
bool all_ff(uintptr_t lo, uintptr_t hi);  // every byte of [lo, hi) is 0xFF (the poison)
uint64_t cpu_ns(clockid_t clock);  // a CPU-time clock in ns (0 if it cannot be read)

// fiber.cpp
bool fibers_reserve(unsigned n, std::string& err);
extern Fiber** g_fibers;
inline Fiber* fiber_at(unsigned i) { return g_fibers[i]; }
void fiber_prepare(Fiber* f, bool use_ucontext);
void switch_to_fiber(Fiber* f);
void switch_to_scheduler(Fiber* f);
bool in_fiber_stack_guard(uintptr_t addr);

// sched.cpp
bool run_block(uint3 bid);
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string where(const Fiber* f);
std::string vformat(const char* fmt, va_list ap);
std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
Fiber* current();
uint64_t warp_collective(Fiber* f);  // f->op filled in; returns op.result after all arrived
Fiber* lane_fiber(unsigned warp, unsigned lane);

// Shared memory: the static section and this launch's dynamic buffer.
bool smem_prepare(uint32_t bytes, std::string& err);
void smem_poison();
bool smem_check_slack(std::string& err);
bool in_shared(const void* p, size_t bytes);
std::string describe_shared(const void* p);
bool in_dynamic_smem_guard(uintptr_t addr, std::string& what);

// tensor.cpp
void resolve_mma(Fiber* const lanes[32]);
void resolve_ldmatrix(Fiber* const lanes[32]);
void land_copy(Fiber* f, int i);
void land_all(Fiber* f);
void land_random(Fiber* f, unsigned one_in);

// memory.cpp
std::string describe_address(uintptr_t addr);
bool check_canaries(std::string& err);

}  // namespace lora_emu
