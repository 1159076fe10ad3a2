/* vbmi_rows.h: what the prepared-activation decode kernels (struct fl_decode_kernel) share: the prefetch they
 * issue as they go, and ROW_DOTS, which makes the one-row and the four-row dot of a format from one step
 * function. Include after the target pragma of the file that uses it. */
#ifndef FLASHLITE_VBMI_ROWS_H
#define FLASHLITE_VBMI_ROWS_H
#include <float.h>
#include <immintrin.h>
#include <stdint.h>
#include "kernels.h"

#define STEP static inline __attribute__((always_inline))

/* the lines from p + FL_PREFETCH_BYTES on, into L2, for a group of `bytes` weight bytes at p: prefetching
 * evenly as the dot consumes the row measured faster than a burst per row (decode_task) */
static inline void prefetch_ahead(const uint8_t *p, int bytes) {
    for (int off = 0; off < bytes; off += 64)
        _mm_prefetch((const char *)p + FL_PREFETCH_BYTES + off, _MM_HINT_T1);
}

/* ROW_DOTS makes of a format's step (ROW_DOTS_ROWS below) its one-row and four-row dots and its token dot
 * (struct fl_decode_kernel's dot_tn): one row against 1..FL_DOT_TOKENS activation rows, as verifying drafted tokens
 * and short prefills multiply. Each (row, token) pair runs the same steps in the same order as the one-row dot, so
 * its result is the one-row dot's bits; the weight work of a step is the same for every token, and the compiler
 * computes it once for all of them where it sees that it is (Q4_K, Q6_K; not past Q8_0's and MXFP4's branch on a
 * row's last group). A format whose step is written in two halves, name_weights() (step g's weights unpacked, a
 * weights_t) and acc(state, &weights, g, vy) (their products with one activation row), takes ROW_DOTS_SPLIT
 * instead, whose token dot unpacks each step once by construction. */
#define ROW_DOTS(name, consts_t, state_t, n_steps)                                                  \
    ROW_DOTS_ROWS(name, consts_t, state_t, n_steps)                                                 \
    STEP void name##_tokens(int count, int64_t n, float *s, const void *vx, const void *const *vy) { \
        const consts_t c = name##_consts();                                                         \
        state_t st[FL_DOT_TOKENS];                                                                  \
        _Pragma("GCC unroll 8") for (int t = 0; t < count; t++) st[t] = name##_init();              \
        for (int64_t g = 0; g < n_steps(n); g++) {                                                  \
            _Pragma("GCC unroll 8") for (int t = 0; t < count; t++)                                 \
                name##_step(&st[t], vx, g, n, vy[t], &c);                                           \
        }                                                                                           \
        _Pragma("GCC unroll 8") for (int t = 0; t < count; t++) s[t] = name##_finish(&st[t]);       \
    }                                                                                               \
    TOKEN_COUNTS(name)

#define ROW_DOTS_SPLIT(name, consts_t, state_t, n_steps, weights_t, acc)                            \
    ROW_DOTS_ROWS(name, consts_t, state_t, n_steps)                                                 \
    STEP void name##_tokens(int count, int64_t n, float *s, const void *vx, const void *const *vy) { \
        const consts_t c = name##_consts();                                                         \
        state_t st[FL_DOT_TOKENS];                                                                  \
        _Pragma("GCC unroll 8") for (int t = 0; t < count; t++) st[t] = name##_init();              \
        for (int64_t g = 0; g < n_steps(n); g++) {                                                  \
            const weights_t w = name##_weights(vx, g, n, &c);                                       \
            _Pragma("GCC unroll 8") for (int t = 0; t < count; t++) acc(&st[t], &w, g, vy[t]);      \
        }                                                                                           \
        _Pragma("GCC unroll 8") for (int t = 0; t < count; t++) s[t] = name##_finish(&st[t]);       \
    }                                                                                               \
    TOKEN_COUNTS(name)

/* name_tn: name_tokens with each count a constant of its own, so that every token's accumulators stay in
 * registers; one token is the one-row dot itself */
#define TOKEN_COUNTS(name)                                                                          \
    static void name##_tn(int64_t n, float *s, const void *vx, const void *const *vy, int count) {  \
        switch (count) {                                                                            \
        case 1: name(n, s, vx, vy[0]); break;                                                       \
        case 2: name##_tokens(2, n, s, vx, vy); break;                                              \
        case 3: name##_tokens(3, n, s, vx, vy); break;                                              \
        case 4: name##_tokens(4, n, s, vx, vy); break;                                              \
        case 5: name##_tokens(5, n, s, vx, vy); break;                                              \
        case 6: name##_tokens(6, n, s, vx, vy); break;                                              \
        case 7: name##_tokens(7, n, s, vx, vy); break;                                              \
        default: name##_tokens(8, n, s, vx, vy); break;                                             \
        }                                                                                           \
    }

/* A format's decode dot is a step over one group (or superblock) of a row, written once; ROW_DOTS_ROWS makes of
 * it the one-row dot and a four-row dot that runs the same steps on four rows in turn. Four rows from far apart
 * (matmul.c takes them from the four quarters of a decode task) keep four streams of reads in flight where one
 * row keeps one. Each row is summed exactly as the one-row dot sums it. A format provides name_consts() (what
 * every step reuses), name_init() and name_finish() (its accumulators, and the row's sum from them) and
 * name_step() (step g of the row at vx against the prepared activations vy); n_steps(n) counts the steps of
 * k = n. */
#define ROW_DOTS_ROWS(name, consts_t, state_t, n_steps)                                             \
    static void name(int64_t n, float *s, const void *vx, const void *vy) {                         \
        const consts_t c = name##_consts();                                                         \
        state_t st = name##_init();                                                                 \
        for (int64_t g = 0; g < n_steps(n); g++)                                                    \
            name##_step(&st, vx, g, n, vy, &c);                                                     \
        *s = name##_finish(&st);                                                                    \
    }                                                                                               \
    static void name##_x4(int64_t n, float *s, const void *const *vx, const void *vy) {             \
        const consts_t c = name##_consts();                                                         \
        state_t st0 = name##_init(), st1 = st0, st2 = st0, st3 = st0;                               \
        for (int64_t g = 0; g < n_steps(n); g++) {                                                  \
            name##_step(&st0, vx[0], g, n, vy, &c);                                                 \
            name##_step(&st1, vx[1], g, n, vy, &c);                                                 \
            name##_step(&st2, vx[2], g, n, vy, &c);                                                 \
            name##_step(&st3, vx[3], g, n, vy, &c);                                                 \
        }                                                                                           \
        s[0] = name##_finish(&st0);                                                                 \
        s[1] = name##_finish(&st1);                                                                 \
        s[2] = name##_finish(&st2);                                                                 \
        s[3] = name##_finish(&st3);                                                                 \
    }

/* The 256 values of a Q8_K block at x loaded into v, and the multiplier fl_quantize_row_q8_K_ref takes for them:
 * -127 over the first value of the largest magnitude, with its sign. Returns 1 with *iscale set, 0 when every
 * value is zero, -1 when one is a NaN or an infinity (the reference itself decides those blocks). */
static inline int q8k_load_scale(const float *x, __m512 v[16], float *iscale) {
    __m512 amax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int j = 0; j < 16; j++) {
        v[j] = _mm512_loadu_ps(x + 16 * j);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j]));
        nan |= _mm512_cmp_ps_mask(v[j], v[j], _CMP_UNORD_Q);
    }
    float m = _mm512_reduce_max_ps(amax);
    if (nan || !(m <= FLT_MAX))
        return -1;
    if (m == 0.0f)
        return 0;
    for (int j = 0; j < 16; j++) {
        __mmask16 at = _mm512_cmp_ps_mask(_mm512_abs_ps(v[j]), _mm512_set1_ps(m), _CMP_EQ_OQ);
        if (at) {
            *iscale = -127.f / x[16 * j + __builtin_ctz(at)];
            break;
        }
    }
    return 1;
}

#endif
