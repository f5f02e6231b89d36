// cuda_fp16.h for the CPU emulator: IEEE half precision (__half, __half2) as CUDA defines it.
//
// Storage is the 16-bit pattern; every conversion rounds as its name says (_rn: to nearest,
// ties to even; _rz: toward zero; _rd: down; _ru: up), overflow gives infinity (or the largest
// finite value where the mode rounds toward zero), NaN gives the canonical NaN 0x7fff, and half
// subnormals are kept (FTZ never applies to half).  Arithmetic is correctly rounded (see
// gbemu_float16_rounding.h), as the GPU's native half instructions are (__CUDA_ARCH__ >= 530).
// The conversion constructors and `operator float` are those of CUDA's header, so expressions
// CUDA finds ambiguous (`h + 1.0f`) are ambiguous here too.
#ifndef GBEMU_CUDA_FP16_H
#define GBEMU_CUDA_FP16_H

#include "gbemu_float16_rounding.h"

namespace gbemu {
// float -> half, to nearest even, from the bits (the hot path of every conversion).
static inline uint16_t float_to_half_rn(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    const uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    const uint32_t magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return 0x7fff;                // NaN
    if (magnitude >= 0x477ff000u) return sign | 0x7c00;        // >= 65520 (and inf): infinity
    if (magnitude >= 0x38800000u) {                            // >= 2^-14: a normal half
        const uint32_t rest = magnitude & 0x1fffu;             // the 13 bits rounded away
        uint32_t half = ((magnitude >> 13) - ((127 - 15) << 10)) & 0xffffu;
        if (rest > 0x1000u || (rest == 0x1000u && (half & 1u))) ++half;  // may carry: fine
        return sign | (uint16_t)half;
    }
    if (magnitude <= 0x33000000u) return sign;                 // <= 2^-25: rounds to zero
    // A half subnormal: the value in units of 2^-24, rounded to nearest even.
    const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u;
    const int shift = 126 - (int)(magnitude >> 23);            // 14 .. 24
    uint32_t units = mantissa >> shift;
    const uint32_t rest = mantissa & ((1u << shift) - 1u), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (units & 1u))) ++units;
    return sign | (uint16_t)units;
}
static inline float half_to_float(uint16_t bits) {
    return (float)value_of_16<10, 5>(bits);  // exact; a half is never a float subnormal
}
}  // namespace gbemu

struct __half_raw {
    unsigned short x;
};

struct __align__(2) __half {
    unsigned short __x;
    __half() = default;
    __half(const __half_raw& raw) : __x(raw.x) {}
    __half(float value) : __x(gbemu::float_to_half_rn(value)) {}
    __half(double value)
        : __x(gbemu::round_to_16<10, 5>(value, gbemu::ROUND_NEAREST_EVEN)) {}
    __half(int value) : __x(gbemu::round_to_16<10, 5>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __half(unsigned int value)
        : __x(gbemu::round_to_16<10, 5>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __half(long long value)
        : __x(gbemu::round_to_16<10, 5>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __half(unsigned long long value)
        : __x(gbemu::round_to_16<10, 5>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __half(short value)
        : __x(gbemu::round_to_16<10, 5>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __half(unsigned short value)
        : __x(gbemu::round_to_16<10, 5>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __half& operator=(const __half_raw& raw) { __x = raw.x; return *this; }
    __half& operator=(float value) { __x = gbemu::float_to_half_rn(value); return *this; }
    __half& operator=(double value) { return *this = __half(value); }
    operator __half_raw() const { __half_raw raw; raw.x = __x; return raw; }
    operator float() const { return gbemu::half_to_float(__x); }
};

struct __align__(4) __half2 {
    __half x, y;
    __half2() = default;
    __half2(const __half& a, const __half& b) : x(a), y(b) {}
};
typedef __half half;
typedef __half2 half2;

// ---- conversions -------------------------------------------------------------------------
static inline __half gbemu_half_from_bits(unsigned short bits) {
    __half h;
    h.__x = bits;
    return h;
}
#define GBEMU_HALF_ROUND(value, mode) \
    gbemu_half_from_bits(gbemu::round_to_16<10, 5>((value), gbemu::mode))
static inline __half __float2half(float a) { return gbemu_half_from_bits(gbemu::float_to_half_rn(a)); }
static inline __half __float2half_rn(float a) { return gbemu_half_from_bits(gbemu::float_to_half_rn(a)); }
static inline __half __float2half_rz(float a) { return GBEMU_HALF_ROUND(gbemu::float_exact(a), ROUND_TOWARD_ZERO); }
static inline __half __float2half_rd(float a) { return GBEMU_HALF_ROUND(gbemu::float_exact(a), ROUND_DOWN); }
static inline __half __float2half_ru(float a) { return GBEMU_HALF_ROUND(gbemu::float_exact(a), ROUND_UP); }
static inline __half __double2half(double a) { return GBEMU_HALF_ROUND(a, ROUND_NEAREST_EVEN); }
static inline float __half2float(__half a) { return gbemu::half_to_float(a.__x); }
static inline float __low2float(__half2 a) { return __half2float(a.x); }
static inline float __high2float(__half2 a) { return __half2float(a.y); }
static inline __half __int2half_rn(int i) { return GBEMU_HALF_ROUND((double)i, ROUND_NEAREST_EVEN); }
static inline __half __int2half_rz(int i) { return GBEMU_HALF_ROUND((double)i, ROUND_TOWARD_ZERO); }
static inline __half __uint2half_rn(unsigned int i) { return GBEMU_HALF_ROUND((double)i, ROUND_NEAREST_EVEN); }
static inline __half __ll2half_rn(long long i) { return GBEMU_HALF_ROUND((double)i, ROUND_NEAREST_EVEN); }
// half -> int: NaN gives 0 and infinity saturates, as cvt.rni.s32.f16 does.
static inline int __half2int_rn(__half h) {
    const double v = gbemu::value_of_16<10, 5>(h.__x);
    if (std::isnan(v)) return 0;
    if (std::isinf(v)) return v > 0 ? INT_MAX : INT_MIN;
    return (int)std::nearbyint(v);
}
static inline int __half2int_rz(__half h) {
    const double v = gbemu::value_of_16<10, 5>(h.__x);
    if (std::isnan(v)) return 0;
    if (std::isinf(v)) return v > 0 ? INT_MAX : INT_MIN;
    return (int)std::trunc(v);
}
static inline unsigned short __half_as_ushort(__half h) { return h.__x; }
static inline short __half_as_short(__half h) { return (short)h.__x; }
static inline __half __ushort_as_half(unsigned short bits) { return gbemu_half_from_bits(bits); }
static inline __half __short_as_half(short bits) { return gbemu_half_from_bits((unsigned short)bits); }
static inline __half2 __halves2half2(__half a, __half b) { return __half2(a, b); }
static inline __half2 make_half2(__half a, __half b) { return __half2(a, b); }
static inline __half2 __half2half2(__half a) { return __half2(a, a); }
static inline __half2 __floats2half2_rn(float a, float b) { return __half2(__float2half_rn(a), __float2half_rn(b)); }
static inline __half2 __float2half2_rn(float a) { return __half2(__float2half_rn(a), __float2half_rn(a)); }
static inline __half2 __float22half2_rn(float2 a) { return __floats2half2_rn(a.x, a.y); }
static inline float2 __half22float2(__half2 a) { return make_float2(__half2float(a.x), __half2float(a.y)); }
static inline __half __low2half(__half2 a) { return a.x; }
static inline __half __high2half(__half2 a) { return a.y; }
static inline __half2 __lows2half2(__half2 a, __half2 b) { return __half2(a.x, b.x); }
static inline __half2 __highs2half2(__half2 a, __half2 b) { return __half2(a.y, b.y); }

// ---- arithmetic: computed in float (exact enough, see the rounding header), rounded once --
static inline __half __hadd(__half a, __half b) { return __float2half_rn(__half2float(a) + __half2float(b)); }
static inline __half __hsub(__half a, __half b) { return __float2half_rn(__half2float(a) - __half2float(b)); }
static inline __half __hmul(__half a, __half b) { return __float2half_rn(__half2float(a) * __half2float(b)); }
static inline __half __hdiv(__half a, __half b) { return __float2half_rn(__half2float(a) / __half2float(b)); }
static inline __half __hfma(__half a, __half b, __half c) {
    // a*b is exact in double; one rounding of the exact sum's double to half is correct.
    return __double2half(std::fma(gbemu::value_of_16<10, 5>(a.__x),
                                  gbemu::value_of_16<10, 5>(b.__x),
                                  gbemu::value_of_16<10, 5>(c.__x)));
}
static inline __half __hneg(__half a) { return gbemu_half_from_bits(a.__x ^ 0x8000); }
static inline __half __habs(__half a) { return gbemu_half_from_bits(a.__x & 0x7fff); }
static inline bool __hisnan(__half a) { return (a.__x & 0x7fff) > 0x7c00; }
static inline int __hisinf(__half a) {
    return (a.__x & 0x7fff) == 0x7c00 ? ((a.__x & 0x8000) ? -1 : 1) : 0;
}
// __hmax/__hmin: the non-NaN operand wins (NaN only when both are NaN), as on the GPU.
static inline __half __hmax(__half a, __half b) {
    if (__hisnan(a)) return __hisnan(b) ? gbemu_half_from_bits(0x7fff) : b;
    if (__hisnan(b)) return a;
    return __half2float(a) < __half2float(b) ? b : a;
}
static inline __half __hmin(__half a, __half b) {
    if (__hisnan(a)) return __hisnan(b) ? gbemu_half_from_bits(0x7fff) : b;
    if (__hisnan(b)) return a;
    return __half2float(b) < __half2float(a) ? b : a;
}
static inline bool __heq(__half a, __half b) { return __half2float(a) == __half2float(b); }
static inline bool __hne(__half a, __half b) { return __half2float(a) < __half2float(b) || __half2float(a) > __half2float(b); }
static inline bool __hlt(__half a, __half b) { return __half2float(a) < __half2float(b); }
static inline bool __hle(__half a, __half b) { return __half2float(a) <= __half2float(b); }
static inline bool __hgt(__half a, __half b) { return __half2float(a) > __half2float(b); }
static inline bool __hge(__half a, __half b) { return __half2float(a) >= __half2float(b); }
static inline bool __hneu(__half a, __half b) { return !(__half2float(a) == __half2float(b)); }
static inline __half2 __hadd2(__half2 a, __half2 b) { return __half2(__hadd(a.x, b.x), __hadd(a.y, b.y)); }
static inline __half2 __hsub2(__half2 a, __half2 b) { return __half2(__hsub(a.x, b.x), __hsub(a.y, b.y)); }
static inline __half2 __hmul2(__half2 a, __half2 b) { return __half2(__hmul(a.x, b.x), __hmul(a.y, b.y)); }
static inline __half2 __h2div(__half2 a, __half2 b) { return __half2(__hdiv(a.x, b.x), __hdiv(a.y, b.y)); }
static inline __half2 __hfma2(__half2 a, __half2 b, __half2 c) {
    return __half2(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
static inline __half2 __hneg2(__half2 a) { return __half2(__hneg(a.x), __hneg(a.y)); }

static inline __half operator+(const __half& a, const __half& b) { return __hadd(a, b); }
static inline __half operator-(const __half& a, const __half& b) { return __hsub(a, b); }
static inline __half operator*(const __half& a, const __half& b) { return __hmul(a, b); }
static inline __half operator/(const __half& a, const __half& b) { return __hdiv(a, b); }
static inline __half& operator+=(__half& a, const __half& b) { return a = __hadd(a, b); }
static inline __half& operator-=(__half& a, const __half& b) { return a = __hsub(a, b); }
static inline __half& operator*=(__half& a, const __half& b) { return a = __hmul(a, b); }
static inline __half& operator/=(__half& a, const __half& b) { return a = __hdiv(a, b); }
static inline __half operator+(const __half& a) { return a; }
static inline __half operator-(const __half& a) { return __hneg(a); }
static inline bool operator==(const __half& a, const __half& b) { return __heq(a, b); }
static inline bool operator!=(const __half& a, const __half& b) { return __hneu(a, b); }
static inline bool operator<(const __half& a, const __half& b) { return __hlt(a, b); }
static inline bool operator<=(const __half& a, const __half& b) { return __hle(a, b); }
static inline bool operator>(const __half& a, const __half& b) { return __hgt(a, b); }
static inline bool operator>=(const __half& a, const __half& b) { return __hge(a, b); }
static inline __half2 operator+(const __half2& a, const __half2& b) { return __hadd2(a, b); }
static inline __half2 operator-(const __half2& a, const __half2& b) { return __hsub2(a, b); }
static inline __half2 operator*(const __half2& a, const __half2& b) { return __hmul2(a, b); }
static inline __half2 operator/(const __half2& a, const __half2& b) { return __h2div(a, b); }

#undef GBEMU_HALF_ROUND

// Kernel parameters of these types take NumPy float16 arrays and scalars (launch.py).
namespace gbemu {
template <> struct type_code<__half> { static constexpr const char* value = "f2"; };
}  // namespace gbemu

#endif  // GBEMU_CUDA_FP16_H
