// Stand-in for CUDA's cuda_fp16.h in the CPU emulator: `__half`, its conversions with the
// device's rounding (lora_emu_fp.h) and the basic arithmetic, computed exactly and rounded once.
// Only what kernels here may use; anything missing is a compile error.
#pragma once

#include "lora_emu_fp.h"

struct __half_raw {
    unsigned short x;
};

struct __attribute__((aligned(2))) __half {
    unsigned short __x;
    __half() = default;
    __half(const __half_raw& r) : __x(r.x) {}
    __half(float f) : __x(lora_emu::f32_to_f16_bits(f, lora_emu::ROUND_RN)) {}
    operator __half_raw() const { return {__x}; }
    operator float() const { return lora_emu::f16_bits_to_f32(__x); }
};

struct __attribute__((aligned(4))) __half2 {
    __half x, y;  // x in the low 16 bits
    __half2() = default;
    __half2(__half a, __half b) : x(a), y(b) {}
};

inline __half __lora_emu_f16(unsigned short bits) { return __half_raw{bits}; }
inline __half __lora_emu_f16_from_double(double v) {
    // Exact f16 sums/products are exact in double; one rounding to f32 then to f16 cannot
    // double-round for them (the f32 result is exact or far from an f16 tie).
    return __lora_emu_f16(lora_emu::f32_to_f16_bits((float)v, lora_emu::ROUND_RN));
}

inline __half __float2half(float a) { return __lora_emu_f16(lora_emu::f32_to_f16_bits(a, lora_emu::ROUND_RN)); }
inline __half __float2half_rn(float a) { return __lora_emu_f16(lora_emu::f32_to_f16_bits(a, lora_emu::ROUND_RN)); }
inline __half __float2half_rz(float a) { return __lora_emu_f16(lora_emu::f32_to_f16_bits(a, lora_emu::ROUND_RZ)); }
inline __half __float2half_rd(float a) { return __lora_emu_f16(lora_emu::f32_to_f16_bits(a, lora_emu::ROUND_RD)); }
inline __half __float2half_ru(float a) { return __lora_emu_f16(lora_emu::f32_to_f16_bits(a, lora_emu::ROUND_RU)); }
inline float __half2float(__half a) { return lora_emu::f16_bits_to_f32(a.__x); }
inline unsigned short __half_as_ushort(__half a) { return a.__x; }
inline __half __ushort_as_half(unsigned short b) { return __lora_emu_f16(b); }

inline __half2 __floats2half2_rn(float a, float b) { return {__float2half_rn(a), __float2half_rn(b)}; }
inline __half2 __float22half2_rn(float2 a) { return __floats2half2_rn(a.x, a.y); }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline __half2 __halves2half2(__half lo, __half hi) { return {lo, hi}; }
inline float2 __half22float2(__half2 a) { return {__half2float(a.x), __half2float(a.y)}; }
inline float __low2float(__half2 a) { return __half2float(a.x); }
inline float __high2float(__half2 a) { return __half2float(a.y); }

inline __half __hadd(__half a, __half b) { return __lora_emu_f16_from_double((double)(float)a + (double)(float)b); }
inline __half __hsub(__half a, __half b) { return __lora_emu_f16_from_double((double)(float)a - (double)(float)b); }
inline __half __hmul(__half a, __half b) { return __lora_emu_f16_from_double((double)(float)a * (double)(float)b); }
inline __half __hfma(__half a, __half b, __half c) {
    return __lora_emu_f16_from_double((double)(float)a * (double)(float)b + (double)(float)c);
}
inline __half __hneg(__half a) { return __lora_emu_f16((unsigned short)(a.__x ^ 0x8000u)); }
inline __half operator+(const __half& a, const __half& b) { return __hadd(a, b); }
inline __half operator-(const __half& a, const __half& b) { return __hsub(a, b); }
inline __half operator*(const __half& a, const __half& b) { return __hmul(a, b); }
inline __half operator-(const __half& a) { return __hneg(a); }
