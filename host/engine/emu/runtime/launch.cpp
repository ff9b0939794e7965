// The emulator's C API (called from host/engine/src/cuda/emu/mod.rs): the kernel table, and
// launch: check the configuration as the driver would, then run every block, one at a time, in
// the launch's order.
//
// Faults: a kernel's invalid access (a guard page, a freed allocation, a wild pointer), integer
// division by zero, or a fiber's stack overflow raises a signal on the launching thread; the
// handler records the address and the running thread and siglongjmps back into the launch, which
// returns an error naming the kernel, block, thread and what the address is. Signals that are not
// the emulator's are passed on to the handler installed before it (Rust's, wasmtime's, ...).
// Launches are serialised process-wide: static __shared__ memory is one section, and one handler
// state. A watchdog thread interrupts a launch that runs past its time limit.
#include <pthread.h>
#include <time.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <mutex>
#include <numeric>
#include <thread>

#include "runtime.h"

extern "C" const lora_emu::Family* const lora_emu_families[];
extern "C" const size_t lora_emu_family_count;

namespace lora_emu {
namespace {

constexpr int kWatchdogSignal = SIGUSR2;
const int kFaultSignals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, kWatchdogSignal};

struct Fault {
    int sig, code;
    uintptr_t addr;
    int write;  // 1 write, 0 read, -1 unknown
    Fiber* fiber;
    const PendingCopy* copy;
    Fiber* copy_fiber;
};

std::mutex g_launch_mu;
sigjmp_buf g_jmp;
volatile sig_atomic_t g_active = 0;
pthread_t g_kernel_thread;
Fault g_fault;
std::atomic<uint64_t> g_deadline{0};
struct sigaction g_previous[64];
std::once_flag g_init_once;

std::vector<const Kernel*> g_kernels;
std::vector<const Family*> g_kernel_family;

void chain(int sig, siginfo_t* si, void* uc) {
    const struct sigaction& p = g_previous[sig];
    if (p.sa_flags & SA_SIGINFO) {
        if (p.sa_sigaction) p.sa_sigaction(sig, si, uc);
        return;
    }
    if (p.sa_handler == SIG_IGN) return;
    if (p.sa_handler == SIG_DFL) {
        // Restore the default and let the fault happen again (or re-raise a sent signal).
        sigaction(sig, &p, nullptr);
        if (si->si_code <= 0) raise(sig);
        return;
    }
    p.sa_handler(sig);
}

void on_signal(int sig, siginfo_t* si, void* uc) {
    if (g_active && pthread_equal(pthread_self(), g_kernel_thread)) {
        if (sig == kWatchdogSignal && !g_kernel_running) {
            g_timeout_pending = 1;  // the runtime is running: the scheduler stops at its next step
            return;
        }
        g_fault.sig = sig;
        g_fault.code = si->si_code;
        g_fault.addr = (uintptr_t)si->si_addr;
        g_fault.write = -1;
#if defined(__x86_64__) && defined(REG_ERR)
        if (sig == SIGSEGV && uc) g_fault.write = (((ucontext_t*)uc)->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#endif
        g_fault.fiber = g_fiber;
        g_fault.copy = g_copy_in_flight;
        g_fault.copy_fiber = g_copy_fiber;
        siglongjmp(g_jmp, 1);
    }
    chain(sig, si, uc);
}

// The time limit counts the launching thread's CPU time, so a loaded machine does not stop a
// launch that is merely slow; an endless loop uses CPU and is stopped.
std::atomic<clockid_t> g_kernel_clock{CLOCK_THREAD_CPUTIME_ID};

void watchdog() {
    for (;;) {
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
        const uint64_t d = g_deadline.load();
        if (d && g_active && cpu_ns(g_kernel_clock.load()) > d) {
            g_deadline.store(0);
            pthread_kill(g_kernel_thread, kWatchdogSignal);
        }
    }
}

void init_once() {
    for (const int sig : kFaultSignals) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = &on_signal;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        sigaction(sig, &sa, &g_previous[sig]);
    }
    for (size_t i = 0; i < lora_emu_family_count; ++i) {
        const Family* fam = lora_emu_families[i];
        for (size_t k = 0; k < fam->count; ++k) {
            g_kernels.push_back(&fam->kernels[k]);
            g_kernel_family.push_back(fam);
        }
    }
    std::thread(watchdog).detach();
}

// A handler needs a stack that is not the faulting one (a fiber's stack may have overflowed).
bool ensure_altstack(std::string& err) {
    stack_t cur;
    if (sigaltstack(nullptr, &cur) == 0 && !(cur.ss_flags & SS_DISABLE) && cur.ss_size >= 16384) return true;
    static thread_local void* mine = nullptr;
    if (!mine) {
        const size_t size = 64 * 1024;
        mine = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mine == MAP_FAILED) {
            mine = nullptr;
            err = "cannot map a signal stack for the emulator";
            return false;
        }
        stack_t ss;
        ss.ss_sp = mine;
        ss.ss_size = size;
        ss.ss_flags = 0;
        if (sigaltstack(&ss, nullptr) != 0) {
            err = "cannot install a signal stack for the emulator";
            return false;
        }
    }
    return true;
}

std::string describe_fault() {
    const Fault& f = g_fault;
    const Fiber* who = f.copy ? f.copy_fiber : f.fiber;
    std::string s = where(who) + ": ";
    if (f.sig == kWatchdogSignal)
        return s + format("ran past the emulator's time limit of %g CPU seconds per launch (an endless loop?)",
                          g_L.time_limit_s);
    if (f.copy)
        s += format("cp.async issued at %s:%d: ", f.copy->site.file, f.copy->site.line);
    if (f.sig == SIGFPE) {
        const char* what = f.code == FPE_INTDIV ? "integer division by zero" : f.code == FPE_INTOVF ? "integer overflow" : "arithmetic exception";
        return s + what;
    }
    if (f.sig == SIGILL) return s + "illegal instruction";
    const char* rw = f.write == 1 ? "invalid write" : f.write == 0 ? "invalid read" : "invalid access";
    std::string what;
    if (in_fiber_stack_guard(f.addr))
        what = "the thread's stack (64 KiB) overflowed (deep recursion or a huge local array?)";
    else if (!in_dynamic_smem_guard(f.addr, what))
        what = describe_address(f.addr);
    return s + format("%s at 0x%llx: ", rw, (unsigned long long)f.addr) + what;
}

int put_err(char* err, size_t errlen, const std::string& msg) {
    if (errlen) {
        const size_t n = std::min(msg.size(), errlen - 1);
        memcpy(err, msg.data(), n);
        err[n] = '\0';
    }
    return 1;
}

// Block i of the launch's order: a bijection of 0..total, forward, reverse or seeded.
struct BlockOrder {
    uint64_t total, a = 1, c = 0;
    int schedule;
    BlockOrder(uint64_t total, int schedule, uint64_t& rng) : total(total), schedule(schedule) {
        if (schedule == SCHED_SHUFFLED && total > 1) {
            // i -> (a*i + c) mod total with gcd(a, total) = 1.
            do a = rng_next(rng) % total; while (a == 0 || std::gcd(a, total) != 1);
            c = rng_next(rng) % total;
        }
    }
    uint64_t at(uint64_t i) const {
        if (schedule == SCHED_REVERSE) return total - 1 - i;
        if (schedule == SCHED_SHUFFLED) return (uint64_t)(((unsigned __int128)a * i + c) % total);
        return i;
    }
};

}  // namespace
}  // namespace lora_emu

using namespace lora_emu;

extern "C" {

struct lora_emu_options {
    int schedule;        // 0 forward, 1 reverse, 2 shuffled
    uint64_t seed;       // shuffled only
    double time_limit_s; // per launch
    int use_ucontext;    // 1: ucontext instead of the x86_64 switch
};

void lora_emu_init(void) { std::call_once(g_init_once, init_once); }

size_t lora_emu_kernel_count(void) {
    lora_emu_init();
    return g_kernels.size();
}
const char* lora_emu_kernel_name(size_t i) { return g_kernels[i]->name; }
const char* lora_emu_kernel_file(size_t i) { return g_kernel_family[i]->file; }
size_t lora_emu_kernel_nparams(size_t i) { return g_kernels[i]->nparams; }
const size_t* lora_emu_kernel_param_sizes(size_t i) { return g_kernels[i]->param_sizes; }

int lora_emu_launch(size_t kernel, const uint32_t* grid, const uint32_t* block, uint32_t smem, void** params,
                    size_t nparams, const lora_emu_options* opts, char* err, size_t errlen) {
    lora_emu_init();
    if (kernel >= g_kernels.size()) return put_err(err, errlen, format("no kernel #%zu", kernel));
    const Kernel* k = g_kernels[kernel];
    const char* name = k->name;
    if (nparams != k->nparams)
        return put_err(err, errlen, format("kernel %s takes %zu parameters, the launch passed %zu", name, k->nparams, nparams));
    const uint64_t threads = uint64_t(block[0]) * block[1] * block[2];
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || threads > kMaxThreads || block[2] > 64)
        return put_err(err, errlen, format("kernel %s: block (%u,%u,%u) is not a valid block (1 to %u threads, z at most 64)",
                                           name, block[0], block[1], block[2], kMaxThreads));
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535)
        return put_err(err, errlen, format("kernel %s: grid (%u,%u,%u) is not a valid grid (x 1..2^31-1, y and z 1..65535)",
                                           name, grid[0], grid[1], grid[2]));
    if (smem > kMaxDynamicSmem)
        return put_err(err, errlen, format("kernel %s asks for %u bytes of dynamic shared memory; an sm_90 block has at "
                                           "most %u",
                                           name, smem, kMaxDynamicSmem));
    for (size_t i = 0; i < nparams; ++i)
        if (!params[i]) return put_err(err, errlen, format("kernel %s: parameter %zu is a null pointer (kernelParams holds "
                                                           "pointers to the values)", name, i));

    std::lock_guard<std::mutex> lock(g_launch_mu);
    std::string why;
    if (!ensure_altstack(why) || !fibers_reserve((unsigned)threads, why) || !smem_prepare(smem, why))
        return put_err(err, errlen, format("kernel %s: %s", name, why.c_str()));

    Launch& L = g_L;
    L.kernel = k;
    L.family = g_kernel_family[kernel];
    L.params = params;
    L.grid = dim3{grid[0], grid[1], grid[2]};
    L.block = dim3{block[0], block[1], block[2]};
    L.smem = smem;
    L.schedule = opts->schedule;
    L.rng = opts->seed;  // same seed, same order: a failing order can be replayed
    L.use_ucontext = opts->use_ucontext != 0;
#if !defined(__x86_64__)
    L.use_ucontext = true;
#endif
    L.time_limit_s = opts->time_limit_s;
    clockid_t clock;
    if (pthread_getcpuclockid(pthread_self(), &clock) != 0) clock = CLOCK_MONOTONIC;
    g_kernel_clock.store(clock);
    L.deadline_ns = cpu_ns(CLOCK_THREAD_CPUTIME_ID) + (uint64_t)(opts->time_limit_s * 1e9);
    L.nthreads = (unsigned)threads;
    L.switches = 0;
    L.failed = false;
    L.err.clear();
    L.runq.reserve(kMaxThreads);
    L.next.reserve(kMaxThreads);
    g_grid_dim = L.grid;
    g_block_dim = L.block;
    g_timeout_pending = 0;
    g_kernel_running = 0;
    g_copy_in_flight = nullptr;
    g_copy_fiber = nullptr;
    g_fiber = nullptr;
    g_kernel_thread = pthread_self();
    g_deadline.store(L.deadline_ns);

    bool ok = true;
    std::string msg;
    if (sigsetjmp(g_jmp, 1) == 0) {
        g_active = 1;
        BlockOrder blocks(uint64_t(grid[0]) * grid[1] * grid[2], L.schedule, L.rng);
        for (uint64_t i = 0; i < blocks.total && ok; ++i) {
            const uint64_t b = blocks.at(i);
            const uint3 bid{(unsigned)(b % grid[0]), (unsigned)((b / grid[0]) % grid[1]),
                            (unsigned)(b / (uint64_t(grid[0]) * grid[1]))};
            ok = run_block(bid);
        }
        g_active = 0;
        if (!ok) msg = L.err;
    } else {
        g_active = 0;
        ok = false;
        msg = describe_fault();
    }
    g_deadline.store(0);
    g_fiber = nullptr;
    g_kernel_running = 0;
    if (!check_canaries(why)) {
        msg = ok ? format("kernel %s ", name) + why : msg + format("; it also %s", why.c_str());
        ok = false;
    }
    return ok ? 0 : put_err(err, errlen, msg);
}

}  // extern "C"
