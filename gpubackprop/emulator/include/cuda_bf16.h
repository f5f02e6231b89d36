// cuda_bf16.h for the CPU emulator: bfloat16 (__nv_bfloat16, __nv_bfloat162) as CUDA defines it.
//
// bfloat16 is float32 with the low 16 mantissa bits dropped: 8 exponent bits, 7 mantissa bits.
// Conversions round as their names say (_rn: to nearest, ties to even; _rz/_rd/_ru), NaN gives
// the canonical NaN 0x7fff, overflow gives infinity (or the largest finite value where the mode
// rounds toward zero), and subnormals are kept.  Arithmetic is correctly rounded and computed
// in double (see gbemu_float16_rounding.h): the native bf16 instructions of sm_80+ (this
// emulator's __CUDA_ARCH__) keep subnormal results that a float32 -ftz=true build would flush.
#ifndef GBEMU_CUDA_BF16_H
#define GBEMU_CUDA_BF16_H

#include "gbemu_float16_rounding.h"

namespace gbemu {
// float -> bf16, to nearest even, from the bits: add just under half an ulp plus the kept
// bit's parity, then truncate.  Overflow carries into the exponent and gives infinity.
static inline uint16_t float_to_bfloat16_rn(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // NaN
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
static inline float bfloat16_to_float(uint16_t bits) { return float_from_bits((uint32_t)bits << 16); }
}  // namespace gbemu

struct __nv_bfloat16_raw {
    unsigned short x;
};

struct __align__(2) __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(const __nv_bfloat16_raw& raw) : __x(raw.x) {}
    __nv_bfloat16(float value) : __x(gbemu::float_to_bfloat16_rn(value)) {}
    __nv_bfloat16(double value)
        : __x(gbemu::round_to_16<7, 8>(value, gbemu::ROUND_NEAREST_EVEN)) {}
    __nv_bfloat16(int value)
        : __x(gbemu::round_to_16<7, 8>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __nv_bfloat16(unsigned int value)
        : __x(gbemu::round_to_16<7, 8>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __nv_bfloat16(long long value)
        : __x(gbemu::round_to_16<7, 8>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __nv_bfloat16(unsigned long long value)
        : __x(gbemu::round_to_16<7, 8>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __nv_bfloat16(short value)
        : __x(gbemu::round_to_16<7, 8>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __nv_bfloat16(unsigned short value)
        : __x(gbemu::round_to_16<7, 8>((double)value, gbemu::ROUND_NEAREST_EVEN)) {}
    __nv_bfloat16& operator=(const __nv_bfloat16_raw& raw) { __x = raw.x; return *this; }
    __nv_bfloat16& operator=(float value) { __x = gbemu::float_to_bfloat16_rn(value); return *this; }
    __nv_bfloat16& operator=(double value) { return *this = __nv_bfloat16(value); }
    operator __nv_bfloat16_raw() const { __nv_bfloat16_raw raw; raw.x = __x; return raw; }
    operator float() const { return gbemu::bfloat16_to_float(__x); }
};

struct __align__(4) __nv_bfloat162 {
    __nv_bfloat16 x, y;
    __nv_bfloat162() = default;
    __nv_bfloat162(const __nv_bfloat16& a, const __nv_bfloat16& b) : x(a), y(b) {}
};
typedef __nv_bfloat16 nv_bfloat16;
typedef __nv_bfloat162 nv_bfloat162;

// ---- conversions -------------------------------------------------------------------------
static inline __nv_bfloat16 gbemu_bfloat16_from_bits(unsigned short bits) {
    __nv_bfloat16 b;
    b.__x = bits;
    return b;
}
#define GBEMU_BF16_ROUND(value, mode) \
    gbemu_bfloat16_from_bits(gbemu::round_to_16<7, 8>((value), gbemu::mode))
static inline double gbemu_bfloat16_value(__nv_bfloat16 a) { return gbemu::value_of_16<7, 8>(a.__x); }
static inline __nv_bfloat16 __float2bfloat16(float a) { return gbemu_bfloat16_from_bits(gbemu::float_to_bfloat16_rn(a)); }
static inline __nv_bfloat16 __float2bfloat16_rn(float a) { return gbemu_bfloat16_from_bits(gbemu::float_to_bfloat16_rn(a)); }
static inline __nv_bfloat16 __float2bfloat16_rz(float a) { return GBEMU_BF16_ROUND(gbemu::float_exact(a), ROUND_TOWARD_ZERO); }
static inline __nv_bfloat16 __float2bfloat16_rd(float a) { return GBEMU_BF16_ROUND(gbemu::float_exact(a), ROUND_DOWN); }
static inline __nv_bfloat16 __float2bfloat16_ru(float a) { return GBEMU_BF16_ROUND(gbemu::float_exact(a), ROUND_UP); }
static inline __nv_bfloat16 __double2bfloat16(double a) { return GBEMU_BF16_ROUND(a, ROUND_NEAREST_EVEN); }
static inline float __bfloat162float(__nv_bfloat16 a) { return gbemu::bfloat16_to_float(a.__x); }
static inline float __low2float(__nv_bfloat162 a) { return __bfloat162float(a.x); }
static inline float __high2float(__nv_bfloat162 a) { return __bfloat162float(a.y); }
static inline __nv_bfloat16 __int2bfloat16_rn(int i) { return GBEMU_BF16_ROUND((double)i, ROUND_NEAREST_EVEN); }
static inline __nv_bfloat16 __int2bfloat16_rz(int i) { return GBEMU_BF16_ROUND((double)i, ROUND_TOWARD_ZERO); }
// bf16 -> int: NaN gives 0 and out-of-range values saturate, as cvt.rni.s32 does.
static inline int gbemu_bfloat16_to_int(__nv_bfloat16 h, bool nearest) {
    const double v = gbemu_bfloat16_value(h);
    if (std::isnan(v)) return 0;
    if (v >= 2147483647.0) return INT_MAX;
    if (v <= -2147483648.0) return INT_MIN;
    return (int)(nearest ? std::nearbyint(v) : std::trunc(v));
}
static inline int __bfloat162int_rn(__nv_bfloat16 h) { return gbemu_bfloat16_to_int(h, true); }
static inline int __bfloat162int_rz(__nv_bfloat16 h) { return gbemu_bfloat16_to_int(h, false); }
static inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
static inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
static inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return gbemu_bfloat16_from_bits(bits); }
static inline __nv_bfloat16 __short_as_bfloat16(short bits) { return gbemu_bfloat16_from_bits((unsigned short)bits); }
static inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
static inline __nv_bfloat162 make_bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162(a, b); }
static inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162(a, a); }
static inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(b)); }
static inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __nv_bfloat162(__float2bfloat16_rn(a), __float2bfloat16_rn(a)); }
static inline __nv_bfloat162 __float22bfloat162_rn(float2 a) { return __floats2bfloat162_rn(a.x, a.y); }
static inline float2 __bfloat1622float2(__nv_bfloat162 a) { return make_float2(__bfloat162float(a.x), __bfloat162float(a.y)); }
static inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 a) { return a.x; }
static inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 a) { return a.y; }
static inline __nv_bfloat162 __lows2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.x, b.x); }
static inline __nv_bfloat162 __highs2bfloat162(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(a.y, b.y); }

// ---- arithmetic: in double, rounded once ---------------------------------------------------
static inline __nv_bfloat16 __hadd(__nv_bfloat16 a, __nv_bfloat16 b) { return __double2bfloat16(gbemu_bfloat16_value(a) + gbemu_bfloat16_value(b)); }
static inline __nv_bfloat16 __hsub(__nv_bfloat16 a, __nv_bfloat16 b) { return __double2bfloat16(gbemu_bfloat16_value(a) - gbemu_bfloat16_value(b)); }
static inline __nv_bfloat16 __hmul(__nv_bfloat16 a, __nv_bfloat16 b) { return __double2bfloat16(gbemu_bfloat16_value(a) * gbemu_bfloat16_value(b)); }
static inline __nv_bfloat16 __hdiv(__nv_bfloat16 a, __nv_bfloat16 b) { return __double2bfloat16(gbemu_bfloat16_value(a) / gbemu_bfloat16_value(b)); }
#if __CUDA_ARCH__ >= 800  // as in CUDA's header: the fused bf16 operations need sm_80
static inline __nv_bfloat16 __hfma(__nv_bfloat16 a, __nv_bfloat16 b, __nv_bfloat16 c) {
    return __double2bfloat16(std::fma(gbemu_bfloat16_value(a), gbemu_bfloat16_value(b), gbemu_bfloat16_value(c)));
}
#endif
static inline __nv_bfloat16 __hneg(__nv_bfloat16 a) { return gbemu_bfloat16_from_bits(a.__x ^ 0x8000); }
static inline __nv_bfloat16 __habs(__nv_bfloat16 a) { return gbemu_bfloat16_from_bits(a.__x & 0x7fff); }
static inline bool __hisnan(__nv_bfloat16 a) { return (a.__x & 0x7fff) > 0x7f80; }
static inline int __hisinf(__nv_bfloat16 a) {
    return (a.__x & 0x7fff) == 0x7f80 ? ((a.__x & 0x8000) ? -1 : 1) : 0;
}
static inline __nv_bfloat16 __hmax(__nv_bfloat16 a, __nv_bfloat16 b) {
    if (__hisnan(a)) return __hisnan(b) ? gbemu_bfloat16_from_bits(0x7fff) : b;
    if (__hisnan(b)) return a;
    return gbemu_bfloat16_value(a) < gbemu_bfloat16_value(b) ? b : a;
}
static inline __nv_bfloat16 __hmin(__nv_bfloat16 a, __nv_bfloat16 b) {
    if (__hisnan(a)) return __hisnan(b) ? gbemu_bfloat16_from_bits(0x7fff) : b;
    if (__hisnan(b)) return a;
    return gbemu_bfloat16_value(b) < gbemu_bfloat16_value(a) ? b : a;
}
static inline bool __heq(__nv_bfloat16 a, __nv_bfloat16 b) { return gbemu_bfloat16_value(a) == gbemu_bfloat16_value(b); }
static inline bool __hne(__nv_bfloat16 a, __nv_bfloat16 b) { return gbemu_bfloat16_value(a) < gbemu_bfloat16_value(b) || gbemu_bfloat16_value(a) > gbemu_bfloat16_value(b); }
static inline bool __hlt(__nv_bfloat16 a, __nv_bfloat16 b) { return gbemu_bfloat16_value(a) < gbemu_bfloat16_value(b); }
static inline bool __hle(__nv_bfloat16 a, __nv_bfloat16 b) { return gbemu_bfloat16_value(a) <= gbemu_bfloat16_value(b); }
static inline bool __hgt(__nv_bfloat16 a, __nv_bfloat16 b) { return gbemu_bfloat16_value(a) > gbemu_bfloat16_value(b); }
static inline bool __hge(__nv_bfloat16 a, __nv_bfloat16 b) { return gbemu_bfloat16_value(a) >= gbemu_bfloat16_value(b); }
static inline bool __hneu(__nv_bfloat16 a, __nv_bfloat16 b) { return !(gbemu_bfloat16_value(a) == gbemu_bfloat16_value(b)); }
static inline __nv_bfloat162 __hadd2(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(__hadd(a.x, b.x), __hadd(a.y, b.y)); }
static inline __nv_bfloat162 __hsub2(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(__hsub(a.x, b.x), __hsub(a.y, b.y)); }
static inline __nv_bfloat162 __hmul2(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(__hmul(a.x, b.x), __hmul(a.y, b.y)); }
static inline __nv_bfloat162 __h2div(__nv_bfloat162 a, __nv_bfloat162 b) { return __nv_bfloat162(__hdiv(a.x, b.x), __hdiv(a.y, b.y)); }
#if __CUDA_ARCH__ >= 800
static inline __nv_bfloat162 __hfma2(__nv_bfloat162 a, __nv_bfloat162 b, __nv_bfloat162 c) {
    return __nv_bfloat162(__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y));
}
#endif
static inline __nv_bfloat162 __hneg2(__nv_bfloat162 a) { return __nv_bfloat162(__hneg(a.x), __hneg(a.y)); }

static inline __nv_bfloat16 operator+(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hadd(a, b); }
static inline __nv_bfloat16 operator-(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hsub(a, b); }
static inline __nv_bfloat16 operator*(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hmul(a, b); }
static inline __nv_bfloat16 operator/(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hdiv(a, b); }
static inline __nv_bfloat16& operator+=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = __hadd(a, b); }
static inline __nv_bfloat16& operator-=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = __hsub(a, b); }
static inline __nv_bfloat16& operator*=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = __hmul(a, b); }
static inline __nv_bfloat16& operator/=(__nv_bfloat16& a, const __nv_bfloat16& b) { return a = __hdiv(a, b); }
static inline __nv_bfloat16 operator+(const __nv_bfloat16& a) { return a; }
static inline __nv_bfloat16 operator-(const __nv_bfloat16& a) { return __hneg(a); }
static inline bool operator==(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __heq(a, b); }
static inline bool operator!=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hneu(a, b); }
static inline bool operator<(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hlt(a, b); }
static inline bool operator<=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hle(a, b); }
static inline bool operator>(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hgt(a, b); }
static inline bool operator>=(const __nv_bfloat16& a, const __nv_bfloat16& b) { return __hge(a, b); }
static inline __nv_bfloat162 operator+(const __nv_bfloat162& a, const __nv_bfloat162& b) { return __hadd2(a, b); }
static inline __nv_bfloat162 operator-(const __nv_bfloat162& a, const __nv_bfloat162& b) { return __hsub2(a, b); }
static inline __nv_bfloat162 operator*(const __nv_bfloat162& a, const __nv_bfloat162& b) { return __hmul2(a, b); }
static inline __nv_bfloat162 operator/(const __nv_bfloat162& a, const __nv_bfloat162& b) { return __h2div(a, b); }

#undef GBEMU_BF16_ROUND

// Kernel parameters of this type take 2-byte arrays (uint16 bit patterns, or a bfloat16 dtype).
namespace gbemu {
template <> struct type_code<__nv_bfloat16> { static constexpr const char* value = "bf2"; };
}  // namespace gbemu

#endif  // GBEMU_CUDA_BF16_H
