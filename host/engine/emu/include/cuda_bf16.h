// Stand-in for CUDA's cuda_bf16.h in the CPU emulator: the `__nv_bfloat16` type, its conversions
// with the device's rounding (lora_emu_fp.h) and the arithmetic CUDA defines for sm_80+, computed
// exactly (in double) and rounded once, as the device's bf16 instructions do. Only what kernels
// here may use; anything missing is a compile error, never a silent difference.
#pragma once

#include "lora_emu_fp.h"

struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __attribute__((aligned(2))) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(const __nv_bfloat16_raw& r) : __x(r.x) {}
    __nv_bfloat16(float f) : __x(lora_emu::f32_to_bf16_bits(f, lora_emu::ROUND_RN)) {}
    operator __nv_bfloat16_raw() const { return {__x}; }
    operator float() const { return lora_emu::bf16_bits_to_f32(__x); }
};
typedef __nv_bfloat16 nv_bfloat16;

struct __attribute__((aligned(4))) __nv_bfloat162 {
    __nv_bfloat16 x, y;  // x in the low 16 bits
    __nv_bfloat162() = default;
    __nv_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) : x(a), y(b) {}
};
typedef __nv_bfloat162 nv_bfloat162;

inline __nv_bfloat16 __lora_emu_bf16(unsigned short bits) { return __nv_bfloat16_raw{bits}; }
inline __nv_bfloat16 __lora_emu_bf16_from_double(double v) {
    // `v` is the exact result (a sum or product of bf16 values is exact in double). Rounding it to
    // f32 and then to bf16 equals one rounding to bf16: for bf16 operands the f32 step can never
    // land on a bf16 tie that the exact value was not on.
    return __lora_emu_bf16(lora_emu::f32_to_bf16_bits((float)v, lora_emu::ROUND_RN));
}

inline __nv_bfloat16 __float2bfloat16(float a) { return __lora_emu_bf16(lora_emu::f32_to_bf16_bits(a, lora_emu::ROUND_RN)); }
inline __nv_bfloat16 __float2bfloat16_rn(float a) { return __lora_emu_bf16(lora_emu::f32_to_bf16_bits(a, lora_emu::ROUND_RN)); }
inline __nv_bfloat16 __float2bfloat16_rz(float a) { return __lora_emu_bf16(lora_emu::f32_to_bf16_bits(a, lora_emu::ROUND_RZ)); }
inline __nv_bfloat16 __float2bfloat16_rd(float a) { return __lora_emu_bf16(lora_emu::f32_to_bf16_bits(a, lora_emu::ROUND_RD)); }
inline __nv_bfloat16 __float2bfloat16_ru(float a) { return __lora_emu_bf16(lora_emu::f32_to_bf16_bits(a, lora_emu::ROUND_RU)); }
inline float __bfloat162float(__nv_bfloat16 a) { return lora_emu::bf16_bits_to_f32(a.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 a) { return a.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __lora_emu_bf16(b); }
inline short __bfloat16_as_short(__nv_bfloat16 a) { return (short)a.__x; }
inline __nv_bfloat16 __short_as_bfloat16(short b) { return __lora_emu_bf16((unsigned short)b); }

inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__float2bfloat16_rn(a), __float2bfloat16_rn(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 a) { return __floats2bfloat162_rn(a.x, a.y); }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 lo, __nv_bfloat16 hi) { return {lo, hi}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return {a, a}; }
inline float2 __bfloat1622float2(__nv_bfloat162 a) { return {__bfloat162float(a.x), __bfloat162float(a.y)}; }
inline float __low2float(__nv_bfloat162 a) { return __bfloat162float(a.x); }
inline float __high2float(__nv_bfloat162 a) { return __bfloat162float(a.y); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 a) { return a.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 a) { return a.y; }

inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __lora_emu_bf16_from_double((double)(float)a + (double)(float)b); }
inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return __lora_emu_bf16_from_double((double)(float)a - (double)(float)b); }
inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __lora_emu_bf16_from_double((double)(float)a * (double)(float)b); }
inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __lora_emu_bf16_from_double((double)(float)a * (double)(float)b + (double)(float)c);
}
inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return __lora_emu_bf16((unsigned short)(a.__x ^ 0x8000u)); }
inline __nv_bfloat16 __habs(__nv_bfloat16 a) { return __lora_emu_bf16((unsigned short)(a.__x & 0x7fffu)); }
inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hadd(a.x, b.x), __hadd(a.y, b.y)}; }
inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return {__hmul(a.x, b.x), __hmul(a.y, b.y)}; }
inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
    return {__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)};
}
inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hadd(a, b); }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hsub(a, b); }
inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hmul(a, b); }
inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { return __hneg(a); }
inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a == (float)b; }
inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a != (float)b; }
inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a < (float)b; }
inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a > (float)b; }
inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a <= (float)b; }
inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return (float)a >= (float)b; }
