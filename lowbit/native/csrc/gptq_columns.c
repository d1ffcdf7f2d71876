/* GPTQ's column loop inside one lazy block, for the plain integer grid (lowbit/native/gptq_columns.py).
 *
 * The same arithmetic as the torch loop in lowbit/quantize/gptq.py, operation for operation in float32:
 *   q   = clamp(round_half_even(w / s) (+ z), qmin, qmax)
 *   dq  = (q (- z)) * s, rounded to the model dtype and back (float16 / bfloat16, or kept for float32)
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

/* Float32 rounding helpers, branch-free (selects only) so the loops that call them vectorise; each gives
 * exactly what torch gives on the CPU:
 *   round_half_even(x)  torch.round (ties to even), except that a zero result may have the other sign
 *                       (+0 for x in (-0.5, 0)); Q and E may then hold +0 where torch has -0
 *                       or the reverse, equal as numbers (and as int codes)
 *   to_float16(x)       x.to(torch.float16).float(): ties to even, subnormals, overflow to inf
 *   to_bfloat16(x)      x.to(torch.bfloat16).float(): ties to even
 *   to_kind(x, kind)    kind 0: x, 1: to_float16, 2: to_bfloat16 (gptq_columns.py DTYPE_KINDS) */

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

/* Quantize one column w [rows] on the grid (s, z per row) and write its grid values q and scaled errors
 * e = (w - dq) / d. Inlined with constant has_zero and kind (see quantize_column_for): a branch-free loop. */
static inline __attribute__((always_inline)) void quantize_column(const float *w, int64_t rows, const float *s,
                                                                  const float *z, float qmin, float qmax, float d,
                                                                  int kind, int has_zero, float *q, float *e) {
    for (int64_t r = 0; r < rows; r++) {
        float v = round_half_even(w[r] / s[r]);
        if (has_zero) v = v + z[r];
        v = v < qmin ? qmin : v;
        v = v > qmax ? qmax : v;
        float dq = to_kind((has_zero ? v - z[r] : v) * s[r], kind);
        q[r] = v;
        e[r] = (w[r] - dq) / d;
    }
}

static void quantize_column_for(const float *w, int64_t rows, const float *s, const float *z, float qmin, float qmax,
                                float d, int kind, float *q, float *e) {
    switch (kind * 2 + (z != 0)) {
        case 0: quantize_column(w, rows, s, z, qmin, qmax, d, 0, 0, q, e); break;
        case 1: quantize_column(w, rows, s, z, qmin, qmax, d, 0, 1, q, e); break;
        case 2: quantize_column(w, rows, s, z, qmin, qmax, d, 1, 0, q, e); break;
        case 3: quantize_column(w, rows, s, z, qmin, qmax, d, 1, 1, q, e); break;
        case 4: quantize_column(w, rows, s, z, qmin, qmax, d, 2, 0, q, e); break;
        default: quantize_column(w, rows, s, z, qmin, qmax, d, 2, 1, q, e); break;
    }
}

/* Columns [i0, i1) of a block of nb columns.
 *   W1T  [nb, ld]  the block, updated in place (later columns receive the compensation)
 *   U1   [nb, ldu] the block of the upper inverse-Hessian factor, row-major
 *   s    scales of the rows, column i at s + i * s_step (s_step 0: one scale vector for all columns)
 *   z    zero points (float) likewise, or NULL for a symmetric grid
 *   kind 0: dequantized values kept in float32, 1: rounded to float16, 2: to bfloat16 (the model dtype)
 *   Q, E [nb, ld]  outputs: grid values and scaled errors (w - dq) / U1[i, i] of each column */
void gptq_columns(float *W1T, int64_t ld, int64_t rows, const float *U1, int64_t ldu, int64_t nb,
                  int64_t i0, int64_t i1, const float *s, int64_t s_step, const float *z, int64_t z_step,
                  float qmin, float qmax, int kind, float *Q, float *E) {
    for (int64_t i = i0; i < i1; i++) {
        float *e = E + i * ld;
        quantize_column_for(W1T + i * ld, rows, s + i * s_step, z ? z + i * z_step : 0, qmin, qmax, U1[i * ldu + i],
                            kind, Q + i * ld, e);
        for (int64_t k = i + 1; k < nb; k++) {  /* the rank-1 update: a product, then a difference */
            const float u = U1[i * ldu + k];
            float *wk = W1T + k * ld;
            for (int64_t r = 0; r < rows; r++) {
                float t = u * e[r];
                wk[r] = wk[r] - t;
            }
        }
    }
}
