// Fibers: one per CUDA thread of the block in progress, each on its own 64 KiB stack with a
// PROT_NONE guard page below it (a stack overflow is a fault the launch reports, not a silent
// corruption). Stacks are made once and reused by every block and launch.
//
// Context switch: on x86_64 a hand-written switch saves the callee-saved registers and swaps stack
// pointers (no system call; the floating-point control state is shared by every fiber, as kernels
// cannot change it); elsewhere, or when a launch asks for it (to compare), ucontext's
// swapcontext, which also saves the signal mask with a system call on every switch.
#include <sys/mman.h>
#include <unistd.h>

#include "runtime.h"

#if defined(__x86_64__)
extern "C" void lora_emu_switch_x86(void** save_sp, void* load_sp);
extern "C" void lora_emu_fiber_start_x86();
#endif

namespace lora_emu {

namespace {

struct StackPool {
    std::vector<Fiber*> fibers;
    uintptr_t lo = 0, hi = 0;  // one mapping for every stack and guard
    size_t page = 0;
    unsigned reserved = 0;
};
StackPool g_pool;
void* g_sched_sp = nullptr;
ucontext_t g_sched_uc;

[[noreturn]] void fiber_main(Fiber* f);

#if defined(__x86_64__)
asm(R"(
    .text
    .p2align 4
    .globl lora_emu_switch_x86
    .hidden lora_emu_switch_x86
    .type lora_emu_switch_x86,@function
lora_emu_switch_x86:
    .cfi_startproc
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .cfi_endproc
    .size lora_emu_switch_x86, .-lora_emu_switch_x86

    .p2align 4
    .globl lora_emu_fiber_start_x86
    .hidden lora_emu_fiber_start_x86
    .type lora_emu_fiber_start_x86,@function
lora_emu_fiber_start_x86:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    callq *%r13
    ud2
    .cfi_endproc
    .size lora_emu_fiber_start_x86, .-lora_emu_fiber_start_x86
)");
#endif

void fiber_main_uc(unsigned hi, unsigned lo) {
    fiber_main(reinterpret_cast<Fiber*>((uintptr_t(hi) << 32) | uintptr_t(lo)));
}

[[noreturn]] void fiber_main(Fiber* f) {
    const Kernel* k = g_L.kernel;
    g_kernel_running = 1;
    k->call(k->fn, g_L.params);
    g_kernel_running = 0;
    // Thread exit: the scheduler (sched.cpp) checks what exit means for barriers and warps.
    f->state = State::Done;
    switch_to_scheduler(f);
    __builtin_trap();  // a finished fiber is never resumed
}

}  // namespace

bool fibers_reserve(unsigned n, std::string& err) {
    if (n <= g_pool.reserved) return true;
    // Reserve every stack at once (virtual memory only; a fiber touches a page or two).
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t per = kFiberStack + page;
    const size_t total = per * kMaxThreads;
    if (g_pool.lo == 0) {
        void* m = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (m == MAP_FAILED) {
            err = format("cannot reserve %zu bytes for the emulator's thread stacks", total);
            return false;
        }
        g_pool.lo = (uintptr_t)m;
        g_pool.hi = g_pool.lo + total;
        g_pool.page = page;
        g_pool.fibers.resize(kMaxThreads, nullptr);
        g_fibers = g_pool.fibers.data();
    }
    for (unsigned i = g_pool.reserved; i < n; ++i) {
        char* lo = (char*)(g_pool.lo + i * per + page);
        if (mprotect(lo, kFiberStack, PROT_READ | PROT_WRITE) != 0) {
            err = format("cannot make the stack of emulated thread %u", i);
            return false;
        }
        Fiber* f = new Fiber();
        f->stack_lo = lo;
        g_pool.fibers[i] = f;
    }
    g_pool.reserved = n;
    return true;
}

Fiber** g_fibers = nullptr;

bool in_fiber_stack_guard(uintptr_t addr) {
    if (addr < g_pool.lo || addr >= g_pool.hi) return false;
    const size_t per = kFiberStack + g_pool.page;
    return (addr - g_pool.lo) % per < g_pool.page;
}

void fiber_prepare(Fiber* f, bool use_ucontext) {
    char* top = f->stack_lo + kFiberStack;
#if defined(__x86_64__)
    if (!use_ucontext) {
        // The frame lora_emu_switch_x86 pops: r15, r14, r13 (entry), r12 (arg), rbx, rbp, return
        // address (the start stub); after `ret` the stack is 16-byte aligned.
        uint64_t* sp = reinterpret_cast<uint64_t*>(top);
        *--sp = reinterpret_cast<uint64_t>(&lora_emu_fiber_start_x86);
        *--sp = 0;                                           // rbp
        *--sp = 0;                                           // rbx
        *--sp = reinterpret_cast<uint64_t>(f);               // r12
        *--sp = reinterpret_cast<uint64_t>(&fiber_main);     // r13
        *--sp = 0;                                           // r14
        *--sp = 0;                                           // r15
        f->sp = sp;
        return;
    }
#endif
    getcontext(&f->uc);
    f->uc.uc_stack.ss_sp = f->stack_lo;
    f->uc.uc_stack.ss_size = kFiberStack;
    f->uc.uc_link = nullptr;
    const uintptr_t p = reinterpret_cast<uintptr_t>(f);
    makecontext(&f->uc, reinterpret_cast<void (*)()>(&fiber_main_uc), 2, unsigned(p >> 32), unsigned(p & 0xffffffffu));
    f->sp = nullptr;
}

void switch_to_fiber(Fiber* f) {
    g_fiber = f;
    g_thread = &f->view;
#if defined(__x86_64__)
    if (!g_L.use_ucontext) {
        lora_emu_switch_x86(&g_sched_sp, f->sp);
        g_fiber = nullptr;
        return;
    }
#endif
    swapcontext(&g_sched_uc, &f->uc);
    g_fiber = nullptr;
}

void switch_to_scheduler(Fiber* f) {
#if defined(__x86_64__)
    if (!g_L.use_ucontext) {
        lora_emu_switch_x86(&f->sp, g_sched_sp);
        return;
    }
#endif
    swapcontext(&f->uc, &g_sched_uc);
}

}  // namespace lora_emu
