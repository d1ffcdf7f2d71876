/* Float32 rounding helpers shared by the C kernels, written branch-free (selects only) so the loops that
 * call them vectorise. Each gives exactly what torch gives on the CPU:
 *   round_half_even(x)  torch.round (ties to even), except that a zero result may have the other sign
 *                       (+0 for x in (-0.5, 0)); the kernels' outputs may then hold +0 where torch has -0
 *                       or the reverse, equal as numbers (and as int codes)
 *   to_float16(x)       x.to(torch.float16).float(): ties to even, subnormals, overflow to inf
 *   to_bfloat16(x)      x.to(torch.bfloat16).float(): ties to even
 *   to_kind(x, kind)    kind 0: x, 1: to_float16, 2: to_bfloat16 (lowbit/native SCALE_KINDS) */
#ifndef LOWBIT_FLOAT_ROUNDING_H
#define LOWBIT_FLOAT_ROUNDING_H

#include <stdint.h>
#include <string.h>

static inline uint32_t bits_of(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float float_of(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

static inline float round_half_even(float x) {
    /* Adding and subtracting 2^23 rounds to an integer in the (nearest-even) rounding mode for |x| < 2^23;
     * beyond that every float is an integer already, and inf / nan pass through. */
    const float big = 8388608.0f;
    float y = x < 0 ? -big : big;
    float r = (x + y) - y;
    float a = x < 0 ? -x : x;
    return a < big ? r : x;
}

static inline float to_float16(float x) {
    uint32_t u = bits_of(x), sign = u & 0x80000000u, a = u & 0x7fffffffu;
    uint32_t normal = (a + 0x0fffu + ((a >> 13) & 1u)) & ~0x1fffu;  /* keep 10 mantissa bits, ties to even */
    normal = normal > 0x477fe000u ? 0x7f800000u : normal;           /* above 65504: inf */
    /* below 2^-14 a binary16 is subnormal, its quantum 2^-24: scale (exactly), round, scale back */
    uint32_t subnormal = bits_of(round_half_even(float_of(a) * 16777216.0f) * 5.9604644775390625e-08f);
    uint32_t r = a < 0x38800000u ? subnormal : normal;
    r = a >= 0x7f800000u ? a : r;                                   /* inf, nan */
    return float_of(r | sign);
}

static inline float to_bfloat16(float x) {
    uint32_t u = bits_of(x);
    uint32_t r = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return (u & 0x7fffffffu) > 0x7f800000u ? x : float_of(r);      /* nan passes through */
}

static inline float to_kind(float x, int kind) {
    return kind == 1 ? to_float16(x) : kind == 2 ? to_bfloat16(x) : x;
}

#endif
