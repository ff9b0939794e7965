// Float -> bf16 / f16 conversion with the device's rounding (internal to the emulator's stand-ins
// for cuda_bf16.h and cuda_fp16.h). Written from IEEE 754 and the PTX ISA's `cvt` rules:
//   - round to nearest even (`.rn`), toward zero (`.rz`), down (`.rm`, CUDA's `_rd`) and up
//     (`.rp`, CUDA's `_ru`), subnormals kept (no `.ftz`);
//   - a NaN input gives the canonical NaN 0x7FFF (what the device's cvt produces), not a
//     payload-preserving NaN;
//   - overflow follows the mode: to infinity when rounding away from zero, else to the largest
//     finite value.
#pragma once

#include <stdint.h>
#include <string.h>

namespace lora_emu {

enum Round { ROUND_RN = 0, ROUND_RZ = 1, ROUND_RD = 2, ROUND_RU = 3 };

// Applies `mode` to magnitude `q` with the discarded bits `rem` (of which `half` is the weight of
// the first); `neg` is the sign.
inline uint32_t round_magnitude(uint32_t q, uint64_t rem, uint64_t half, bool neg, int mode) {
    switch (mode) {
        case ROUND_RN: return (rem > half || (rem == half && (q & 1u))) ? q + 1 : q;
        case ROUND_RZ: return q;
        case ROUND_RD: return (rem != 0 && neg) ? q + 1 : q;
        default: return (rem != 0 && !neg) ? q + 1 : q;
    }
}

inline uint16_t f32_to_bf16_bits(float f, int mode) {
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;
    const bool neg = (x >> 31) != 0;
    // bf16 is the top half of an f32: the magnitude carries into the exponent (and to infinity)
    // by itself.
    const uint32_t mag = round_magnitude((x & 0x7fffffffu) >> 16, x & 0xffffu, 0x8000u, neg, mode);
    return (uint16_t)((neg ? 0x8000u : 0u) | mag);
}

inline uint16_t f32_to_f16_bits(float f, int mode) {
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t a = x & 0x7fffffffu;
    const bool neg = (x >> 31) != 0;
    const uint32_t sign = neg ? 0x8000u : 0u;
    if (a > 0x7f800000u) return 0x7fffu;
    if (a == 0x7f800000u) return (uint16_t)(sign | 0x7c00u);
    const int e32 = (int)(a >> 23);
    const uint32_t m32 = a & 0x7fffffu;
    const int e16 = e32 - 127 + 15;
    uint32_t mag;
    if (e16 >= 31) {
        // Beyond the largest finite f16 (65504) by more than rounding can reach.
        const bool away = mode == ROUND_RN || (mode == ROUND_RD && neg) || (mode == ROUND_RU && !neg);
        mag = away ? 0x7c00u : 0x7bffu;
    } else if (e16 >= 1) {
        mag = round_magnitude(((uint32_t)e16 << 10) | (m32 >> 13), m32 & 0x1fffu, 0x1000u, neg, mode);
    } else {
        // Subnormal (or zero) result, in units of 2^-24: value = m24 * 2^(e32 - 150).
        const uint32_t m24 = e32 == 0 ? m32 : (m32 | 0x800000u);
        const int shift = 126 - (e32 == 0 ? 1 : e32);  // 14 ..= 125
        if (shift >= 40) {
            mag = round_magnitude(0, m24 != 0 ? 1 : 0, 2, neg, mode);
        } else {
            const uint64_t wide = (uint64_t)m24;
            mag = round_magnitude((uint32_t)(wide >> shift), wide & ((1ull << shift) - 1), 1ull << (shift - 1), neg, mode);
        }
    }
    return (uint16_t)(sign | mag);
}

inline float bf16_bits_to_f32(uint16_t h) {
    const uint32_t x = (uint32_t)h << 16;
    float f;
    memcpy(&f, &x, 4);
    return f;
}

inline float f16_bits_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t x;
    if (e == 0x1f) {
        x = sign | 0x7f800000u | (m << 13);
    } else if (e != 0) {
        x = sign | ((e - 15 + 127) << 23) | (m << 13);
    } else if (m == 0) {
        x = sign;
    } else {
        // Subnormal f16: m * 2^-24, exact in f32.
        float v = (float)m * (1.0f / 16777216.0f);
        memcpy(&x, &v, 4);
        x |= sign;
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

}  // namespace lora_emu
