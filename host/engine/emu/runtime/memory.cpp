// Device memory of the emulator: every allocation is its own host mapping
//
//     [4 KiB guard][ ... slack | data (size bytes) | slack < 16 ][64 KiB guard]
//
// with the data 16-byte aligned and ending within 16 bytes of the trailing guard, so an access
// past the end faults at once (or, within the last < 16 bytes of slack, is found by the canary
// check after the launch). New memory is poisoned with 0xFF bytes (a NaN as f32, bf16, f16 and
// f64; 0xFFFFFFFF as u32), so a read of memory nothing wrote shows in the results. The slack
// keeps the poison; a launch that changed it wrote out of bounds. A freed allocation stays
// mapped without access (in a bounded quarantine), so a use after free faults and is named.
//
// Copies from and to the host are checked against the allocation they address.
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <deque>
#include <map>
#include <mutex>

#include "runtime.h"

namespace lora_emu {

namespace {

constexpr size_t kBackGuard = 64 * 1024;
constexpr size_t kQuarantineBytes = 256u << 20;
constexpr size_t kQuarantineCount = 4096;

struct Alloc {
    uintptr_t map;
    size_t map_len;
    uintptr_t ptr;
    size_t size;
    uintptr_t data_lo, data_hi;  // the accessible pages
    uint64_t owner;
    bool freed;
};

std::mutex g_mu;
std::map<uintptr_t, Alloc> g_allocs;  // by mapping start, live and quarantined
std::deque<uintptr_t> g_quarantine;
size_t g_quarantine_bytes = 0;

size_t page_size() {
    static const size_t p = (size_t)sysconf(_SC_PAGESIZE);
    return p;
}

// The allocation whose mapping (guards included) holds `addr`.
Alloc* find_mapping(uintptr_t addr) {
    auto it = g_allocs.upper_bound(addr);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    Alloc& a = it->second;
    return addr < a.map + a.map_len ? &a : nullptr;
}

std::string describe_locked(uintptr_t addr) {
    const Alloc* a = find_mapping(addr);
    if (!a) {
        if (addr < 65536) return format("0x%llx is a null pointer (or an offset from one)", (unsigned long long)addr);
        return format("0x%llx is in no device allocation", (unsigned long long)addr);
    }
    const unsigned long long base = a->ptr, size = a->size;
    if (a->freed)
        return format("0x%llx is inside allocation 0x%llx (%llu bytes), which has been freed", (unsigned long long)addr,
                      base, size);
    if (addr < a->ptr)
        return format("0x%llx is %llu bytes before the start of allocation 0x%llx (%llu bytes)", (unsigned long long)addr,
                      (unsigned long long)(a->ptr - addr), base, size);
    if (addr >= a->ptr + a->size)
        return format("0x%llx is %llu bytes past the end of allocation 0x%llx (%llu bytes)", (unsigned long long)addr,
                      (unsigned long long)(addr - a->ptr - a->size), base, size);
    return format("0x%llx is at offset %llu of allocation 0x%llx (%llu bytes)", (unsigned long long)addr,
                  (unsigned long long)(addr - a->ptr), base, size);
}

// Checks [addr, addr + bytes) lies in one live allocation of `owner`.
bool check_range_locked(uint64_t owner, uintptr_t addr, size_t bytes, std::string& err) {
    const Alloc* a = find_mapping(addr);
    if (a && !a->freed && addr >= a->ptr && addr <= a->ptr + a->size) {
        if (a->owner != owner) {
            err = format("0x%llx belongs to another emulator instance", (unsigned long long)addr);
            return false;
        }
        if (bytes <= a->ptr + a->size - addr) return true;
        err = format("%zu bytes at 0x%llx run %llu bytes past the end of allocation 0x%llx (%zu bytes)", bytes,
                     (unsigned long long)addr, (unsigned long long)(addr + bytes - a->ptr - a->size),
                     (unsigned long long)a->ptr, a->size);
        return false;
    }
    err = describe_locked(addr);
    return false;
}

void release(const Alloc& a) { munmap((void*)a.map, a.map_len); }

}  // namespace

bool all_ff(uintptr_t lo, uintptr_t hi) {
    static unsigned char ff[4096];
    static std::once_flag once;
    std::call_once(once, [] { memset(ff, 0xFF, sizeof ff); });
    for (uintptr_t p = lo; p < hi; p += sizeof ff) {
        const size_t n = std::min<uintptr_t>(sizeof ff, hi - p);
        if (memcmp((const void*)p, ff, n) != 0) return false;
    }
    return true;
}

std::string describe_address(uintptr_t addr) {
    std::lock_guard<std::mutex> lock(g_mu);
    return describe_locked(addr);
}

bool check_canaries(std::string& err) {
    // Every damaged slack is reported once: the first in the error, the count after it, and all
    // are poisoned again so the next launch starts clean.
    std::lock_guard<std::mutex> lock(g_mu);
    size_t damaged = 0;
    std::string first;
    for (const auto& kv : g_allocs) {
        const Alloc& a = kv.second;
        if (a.freed) continue;
        const bool before = !all_ff(a.data_lo, a.ptr), after = !all_ff(a.ptr + a.size, a.data_hi);
        if (!before && !after) continue;
        if (damaged++ == 0)
            first = format("wrote %s allocation 0x%llx (%zu bytes); the writing thread is unknown (found after the "
                           "launch)",
                           before ? "before the start of" : "past the end of", (unsigned long long)a.ptr, a.size);
        memset((void*)a.data_lo, 0xFF, a.ptr - a.data_lo);
        memset((void*)(a.ptr + a.size), 0xFF, a.data_hi - a.ptr - a.size);
    }
    if (damaged == 0) return true;
    err = damaged == 1 ? first : first + format(", and out of %zu other allocations", damaged - 1);
    return false;
}

}  // namespace lora_emu

using namespace lora_emu;

static int put_err(char* err, size_t errlen, const std::string& msg) {
    if (errlen) {
        const size_t n = std::min(msg.size(), errlen - 1);
        memcpy(err, msg.data(), n);
        err[n] = '\0';
    }
    return 1;
}

extern "C" int lora_emu_alloc(uint64_t owner, size_t bytes, uint64_t* out, char* err, size_t errlen) {
    const size_t page = page_size();
    const size_t data = (std::max<size_t>(bytes, 1) + 15) & ~size_t(15);
    const size_t data_pages = (data + page - 1) / page;
    const size_t map_len = page + data_pages * page + kBackGuard;
    if (bytes > (size_t(1) << 46))
        return put_err(err, errlen, format("cannot allocate %zu bytes of emulated device memory", bytes));
    void* m = mmap(nullptr, map_len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return put_err(err, errlen, format("cannot map %zu bytes of emulated device memory", bytes));
    Alloc a;
    a.map = (uintptr_t)m;
    a.map_len = map_len;
    a.data_lo = a.map + page;
    a.data_hi = a.data_lo + data_pages * page;
    a.ptr = a.data_hi - data;
    a.size = bytes;
    a.owner = owner;
    a.freed = false;
    if (mprotect((void*)a.data_lo, a.data_hi - a.data_lo, PROT_READ | PROT_WRITE) != 0) {
        munmap(m, map_len);
        return put_err(err, errlen, format("cannot map %zu bytes of emulated device memory", bytes));
    }
    memset((void*)a.data_lo, 0xFF, a.data_hi - a.data_lo);
    {
        std::lock_guard<std::mutex> lock(g_mu);
        g_allocs[a.map] = a;
    }
    *out = a.ptr;
    return 0;
}

// Frees `ptr`; *freed gets its size.
extern "C" int lora_emu_free(uint64_t owner, uint64_t ptr, size_t* freed, char* err, size_t errlen) {
    std::lock_guard<std::mutex> lock(g_mu);
    Alloc* a = find_mapping(ptr);
    if (!a || a->ptr != ptr) {
        const std::string what = describe_locked(ptr);
        return put_err(err, errlen, format("0x%llx is not an allocation: %s", (unsigned long long)ptr, what.c_str()));
    }
    if (a->freed) return put_err(err, errlen, format("0x%llx was already freed", (unsigned long long)ptr));
    if (a->owner != owner)
        return put_err(err, errlen, format("0x%llx belongs to another emulator instance", (unsigned long long)ptr));
    mprotect((void*)a->map, a->map_len, PROT_NONE);
    a->freed = true;
    *freed = a->size;
    g_quarantine.push_back(a->map);
    g_quarantine_bytes += a->map_len;
    while (g_quarantine.size() > kQuarantineCount || g_quarantine_bytes > kQuarantineBytes) {
        auto it = g_allocs.find(g_quarantine.front());
        g_quarantine.pop_front();
        if (it == g_allocs.end()) continue;
        g_quarantine_bytes -= it->second.map_len;
        release(it->second);
        g_allocs.erase(it);
    }
    return 0;
}

// Unmaps every live allocation of `owner` (an emulator being dropped).
extern "C" void lora_emu_free_owner(uint64_t owner) {
    std::lock_guard<std::mutex> lock(g_mu);
    for (auto it = g_allocs.begin(); it != g_allocs.end();) {
        if (it->second.owner == owner && !it->second.freed) {
            release(it->second);
            it = g_allocs.erase(it);
        } else {
            ++it;
        }
    }
}

// kind 0: host -> device, 1: device -> host, 2: device -> device. Device addresses are checked.
extern "C" int lora_emu_copy(uint64_t owner, int kind, uint64_t dst, uint64_t src, size_t bytes, char* err,
                             size_t errlen) {
    std::string why;
    std::lock_guard<std::mutex> lock(g_mu);
    if (kind != 0 && !check_range_locked(owner, src, bytes, why))
        return put_err(err, errlen, "source: " + why);
    if (kind != 1 && !check_range_locked(owner, dst, bytes, why))
        return put_err(err, errlen, "destination: " + why);
    if (bytes) memmove((void*)dst, (const void*)src, bytes);
    return 0;
}

extern "C" int lora_emu_memset(uint64_t owner, uint64_t dst, int byte, size_t bytes, char* err, size_t errlen) {
    std::string why;
    std::lock_guard<std::mutex> lock(g_mu);
    if (!check_range_locked(owner, dst, bytes, why)) return put_err(err, errlen, why);
    if (bytes) memset((void*)dst, byte, bytes);
    return 0;
}

extern "C" int lora_emu_describe(uint64_t addr, char* out, size_t outlen) {
    return put_err(out, outlen, describe_address(addr));
}
