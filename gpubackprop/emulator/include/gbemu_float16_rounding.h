// gbemu_float16_rounding.h: rounding to the 16-bit float formats, shared by the emulator's
// cuda_fp16.h (__half: 1 sign, 5 exponent, 10 mantissa bits) and cuda_bf16.h (__nv_bfloat16:
// 1 sign, 8 exponent, 7 mantissa bits).
//
// Why the arithmetic is exact: a 16-bit result is computed in a wider format and rounded once
// more.  Double rounding cannot change a correctly rounded +, -, *, / or sqrt when the wider
// format has at least 2p + 2 significand bits (p = 11 for half, 8 for bf16): float (24) is
// enough for half, double (53) for both.  bf16 arithmetic goes through double because its
// products reach float's subnormal range, which a float32 FTZ build would flush although the
// GPU's native bf16 instructions (sm_80+) do not.
//
// Values are read through their bits, never as float arithmetic, so that the FTZ/DAZ setting of
// a -ftz=true build (see cuda_emu.h) never flushes a conversion's input, as cvt does not on a GPU.
#ifndef GBEMU_FLOAT16_ROUNDING_H
#define GBEMU_FLOAT16_ROUNDING_H

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gbemu {

enum RoundingMode { ROUND_NEAREST_EVEN, ROUND_TOWARD_ZERO, ROUND_DOWN, ROUND_UP };

// The exact value of a float as a double, computed from its bits (immune to DAZ).
static inline double float_exact(float value) {
    uint32_t bits;
    memcpy(&bits, &value, 4);
    const uint32_t magnitude = bits & 0x7fffffffu;
    double result;
    if ((magnitude >> 23) == 0) {  // zero or subnormal: mantissa * 2^-149
        result = std::ldexp((double)magnitude, -149);
    } else if ((magnitude >> 23) == 0xff) {
        result = (magnitude & 0x7fffffu) ? NAN : INFINITY;
    } else {
        result = std::ldexp((double)((magnitude & 0x7fffffu) | 0x800000u),
                            (int)(magnitude >> 23) - 150);
    }
    return (bits >> 31) ? -result : result;
}

// A float from its exact double value, for 16-bit values (always representable), immune to FTZ.
static inline float float_from_bits(uint32_t bits) {
    float value;
    memcpy(&value, &bits, 4);
    return value;
}

// Round `value` to an IEEE-style binary format with MANT stored mantissa bits and EXP exponent
// bits (subnormals included), in `mode`; return its bits.  NaN gives 0x7fff, the canonical NaN
// that the GPU's cvt instruction produces for both 16-bit formats.
template <int MANT, int EXP>
static inline uint16_t round_to_16(double value, RoundingMode mode) {
    static_assert(MANT + EXP == 15, "a 16-bit format");
    if (std::isnan(value)) return 0x7fff;
    const bool negative = std::signbit(value);
    const uint16_t sign = negative ? 0x8000 : 0;
    const int bias = (1 << (EXP - 1)) - 1;
    const uint16_t infinity = (uint16_t)(((1 << EXP) - 1) << MANT);
    const uint16_t largest = (uint16_t)(infinity - 1);
    double magnitude = std::fabs(value);
    if (std::isinf(magnitude)) return sign | infinity;
    if (magnitude == 0.0) return sign;
    int exponent;
    std::frexp(magnitude, &exponent);  // magnitude in [2^(exponent-1), 2^exponent)
    const int emin = 1 - bias;
    const int quantum = (exponent - 1 > emin ? exponent - 1 : emin) - MANT;  // log2 of the ulp
    const double scaled = std::ldexp(magnitude, -quantum);  // exact: a power-of-two scale
    double integral = std::floor(scaled);
    const double fraction = scaled - integral;  // exact: scaled < 2^(MANT+1)
    const bool away_from_zero_is_up = !negative;
    bool increment = false;
    switch (mode) {
        case ROUND_NEAREST_EVEN:
            increment = fraction > 0.5 ||
                        (fraction == 0.5 && std::fmod(integral, 2.0) != 0.0);
            break;
        case ROUND_TOWARD_ZERO: increment = false; break;
        case ROUND_UP: increment = fraction != 0.0 && away_from_zero_is_up; break;
        case ROUND_DOWN: increment = fraction != 0.0 && !away_from_zero_is_up; break;
    }
    uint64_t mantissa = (uint64_t)integral + (increment ? 1u : 0u);
    int biased = quantum + MANT + bias;  // exponent field if mantissa is in [2^MANT, 2^(MANT+1))
    if (mantissa >= (2ull << MANT)) {    // rounding carried into the next binade
        mantissa >>= 1;
        ++biased;
    }
    if (mantissa < (1ull << MANT)) return sign | (uint16_t)mantissa;  // subnormal (or zero)
    if (biased >= (1 << EXP) - 1) {
        // Overflow: infinity, unless the mode rounds toward zero for this sign.
        const bool to_largest = mode == ROUND_TOWARD_ZERO ||
                                (mode == ROUND_UP && negative) || (mode == ROUND_DOWN && !negative);
        return sign | (to_largest ? largest : infinity);
    }
    return sign | (uint16_t)((biased << MANT) | (mantissa - (1ull << MANT)));
}

// The value of a 16-bit pattern as a double (exact).
template <int MANT, int EXP> static inline double value_of_16(uint16_t bits) {
    const int bias = (1 << (EXP - 1)) - 1;
    const int field = (bits >> MANT) & ((1 << EXP) - 1);
    const double mantissa = (double)(bits & ((1 << MANT) - 1));
    double magnitude;
    if (field == 0) {
        magnitude = std::ldexp(mantissa, 1 - bias - MANT);
    } else if (field == (1 << EXP) - 1) {
        magnitude = mantissa != 0.0 ? NAN : INFINITY;
    } else {
        magnitude = std::ldexp(mantissa + (double)(1 << MANT), field - bias - MANT);
    }
    return (bits & 0x8000) ? -magnitude : magnitude;
}

}  // namespace gbemu

#endif  // GBEMU_FLOAT16_ROUNDING_H
