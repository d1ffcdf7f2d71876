/* GPTQ's column loop inside one lazy block, for the plain integer grid (lowbit/native/gptq_columns.py).
 *
 * The same arithmetic as the torch loop in lowbit/quantize/gptq.py, operation for operation in float32:
 *   q   = clamp(round_half_even(w / s) (+ z), qmin, qmax)
 *   dq  = (q (- z)) * s, rounded to the scale storage dtype and back (float16 / bfloat16, or kept)
 *   err = (w - dq) / U[i, i]
 *   W[k, :] = W[k, :] - U[i, k] * err          for the block's later columns k (product, then difference)
 * Compiled with -ffp-contract=off and without -ffast-math, so no fused multiply-add or reassociation
 * changes a bit: the results equal the torch loop's exactly (tests/native/test_gptq_columns.py).
 *
 * Layout: the block is transposed, W1T [nb, ld] float32 row-major (row k = the block's column k over the
 * weight's rows); the caller passes a slice of rows [r0, r0 + rows) by offsetting W1T, s, z, Q, E. Rows are
 * independent (a row's codes and updates depend only on that row), so two calls on disjoint rows may run
 * at once. */
#include <stdint.h>
#include <string.h>

static inline float round_half_even(float x) {
    /* Adding and subtracting 2^23 rounds to an integer in the current (nearest-even) mode for |x| < 2^23;
     * beyond that every float is an integer already (and inf / nan pass through). */
    const float big = 8388608.0f;
    float a = x < 0 ? -x : x;
    if (a < big) {
        float y = x < 0 ? -big : big;
        return (x + y) - y;
    }
    return x;
}

static inline uint32_t bits_of(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static inline float float_of(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }

static inline float to_float16(float x) {
    /* The float32 value of x rounded to IEEE binary16, ties to even (what torch's .to(float16) gives). */
    uint32_t u = bits_of(x), sign = u & 0x80000000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return x;                       /* inf, nan */
    if (a < 0x38800000u) {                                /* below 2^-14: binary16 subnormal, quantum 2^-24 */
        float m = float_of(a) * 16777216.0f;              /* exact: a power-of-two scaling */
        return float_of(bits_of(round_half_even(m) * 5.9604644775390625e-08f) | sign);
    }
    a = (a + 0x0fffu + ((a >> 13) & 1u)) & ~0x1fffu;      /* keep 10 mantissa bits, ties to even */
    if (a > 0x477fe000u) a = 0x7f800000u;                 /* above 65504: overflow to inf */
    return float_of(a | sign);
}

static inline float to_bfloat16(float x) {
    /* The float32 value of x rounded to bfloat16, ties to even (what torch's .to(bfloat16) gives). */
    uint32_t u = bits_of(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return x;       /* nan */
    u = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
    return float_of(u);
}

/* Columns [i0, i1) of a block of nb columns.
 *   W1T  [nb, ld]  the block, updated in place (later columns receive the compensation)
 *   U1   [nb, ldu] the block of the upper inverse-Hessian factor, row-major
 *   s    scales of the rows, column i at s + i * s_step (s_step 0: one scale vector for all columns)
 *   z    zero points (float) likewise, or NULL for a symmetric grid
 *   kind 0: scales kept in float32, 1: dequantized values rounded to float16, 2: to bfloat16
 *   Q, E [nb, ld]  outputs: grid values and scaled errors (w - dq) / U1[i, i] of each column */
void gptq_columns(float *W1T, int64_t ld, int64_t rows, const float *U1, int64_t ldu, int64_t nb,
                  int64_t i0, int64_t i1, const float *s, int64_t s_step, const float *z, int64_t z_step,
                  float qmin, float qmax, int kind, float *Q, float *E) {
    for (int64_t i = i0; i < i1; i++) {
        const float *w = W1T + i * ld, *si = s + i * s_step, *zi = z ? z + i * z_step : 0;
        const float d = U1[i * ldu + i];
        float *q = Q + i * ld, *e = E + i * ld;
        for (int64_t r = 0; r < rows; r++) {
            float v = round_half_even(w[r] / si[r]);
            if (zi) v = v + zi[r];
            v = v < qmin ? qmin : v;
            v = v > qmax ? qmax : v;
            float dq = (zi ? v - zi[r] : v) * si[r];
            if (kind == 1) dq = to_float16(dq);
            else if (kind == 2) dq = to_bfloat16(dq);
            q[r] = v;
            e[r] = (w[r] - dq) / d;
        }
        for (int64_t k = i + 1; k < nb; k++) {
            const float u = U1[i * ldu + k];
            float *wk = W1T + k * ld;
            for (int64_t r = 0; r < rows; r++) {
                float t = u * e[r];
                wk[r] = wk[r] - t;
            }
        }
    }
}
