/* vec_f32.c: the blocked f32 kernels of vec_f32.h at each SIMD level (their body: vec_f32_kernels.h), and the
 * choice of the level in use. The core builds for the base instruction set, so the wider levels are compiled
 * here under target pragmas and chosen at run time. */
#include <stddef.h>
#include <string.h>

#include "flashlite.h"
#include "vec_f32.h"

/* plain C: the reference loops one query and one row at a time (the compiler vectorises fl_dot_f32's lanes and
 * the row sums for the base instruction set; a 16-float vector type passed around did worse) */
static void plain_scores(int64_t n_q, const float *q, int64_t n_rows, const float *const *rows, int64_t dim,
                         float scale, float *s) {
    for (int64_t h = 0; h < n_q; h++)
        for (int64_t i = 0; i < n_rows; i++) s[h * n_rows + i] = fl_dot_f32(q + h * dim, rows[i], dim) * scale;
}

static void plain_mix(int64_t n_q, const float *w, int64_t n_rows, const float *const *rows, int64_t dim,
                      float *out) {
    for (int64_t h = 0; h < n_q; h++) {
        float *o = out + h * dim;
        memset(o, 0, sizeof(float) * (size_t)dim);
        for (int64_t i = 0; i < n_rows; i++) {
            const float a = w[h * n_rows + i], *x = rows[i];
            for (int64_t d = 0; d < dim; d++) o[d] += a * x[d];
        }
    }
}

static const struct fl_f32_kernels plain_kernels = {plain_scores, plain_mix};

#if defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2")
/* AVX2: lanes 0-7 in lo, 8-15 in hi */
typedef struct {
    __m256 lo, hi;
} v16_avx2;
static inline v16_avx2 avx2_zero(void) { return (v16_avx2){_mm256_setzero_ps(), _mm256_setzero_ps()}; }
static inline v16_avx2 avx2_load(const float *p) { return (v16_avx2){_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
static inline void avx2_store(float *p, v16_avx2 a) {
    _mm256_storeu_ps(p, a.lo);
    _mm256_storeu_ps(p + 8, a.hi);
}
static inline v16_avx2 avx2_add(v16_avx2 a, v16_avx2 b) {
    return (v16_avx2){_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
}
static inline v16_avx2 avx2_mul(v16_avx2 a, v16_avx2 b) {
    return (v16_avx2){_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)};
}
static inline v16_avx2 avx2_set1(float x) { return (v16_avx2){_mm256_set1_ps(x), _mm256_set1_ps(x)}; }
#define V16 v16_avx2
#define V_ZERO avx2_zero
#define V_LOAD avx2_load
#define V_STORE avx2_store
#define V_ADD avx2_add
#define V_MUL avx2_mul
#define V_SET1 avx2_set1
#define KFN(name) avx2_##name
#include "vec_f32_kernels.h"
#undef V16
#undef V_ZERO
#undef V_LOAD
#undef V_STORE
#undef V_ADD
#undef V_MUL
#undef V_SET1
#undef KFN
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f")
#define V16 __m512
#define V_ZERO _mm512_setzero_ps
#define V_LOAD _mm512_loadu_ps
#define V_STORE _mm512_storeu_ps
#define V_ADD _mm512_add_ps
#define V_MUL _mm512_mul_ps
#define V_SET1 _mm512_set1_ps
#define KFN(name) avx512_##name
#include "vec_f32_kernels.h"
#undef V16
#undef V_ZERO
#undef V_LOAD
#undef V_STORE
#undef V_ADD
#undef V_MUL
#undef V_SET1
#undef KFN
#pragma GCC pop_options
#endif

const struct fl_f32_kernels *fl_f32_kernels_at(int level) {
    switch (level) {
    case FL_SIMD_SCALAR:
        return &plain_kernels;
#if defined(__x86_64__)
    case FL_SIMD_AVX2:
        return &avx2_kernels;
    case FL_SIMD_AVX512:
        return &avx512_kernels;
#endif
    default:
        return NULL;
    }
}

const struct fl_f32_kernels *fl_f32_kernels(void) {
    const struct fl_f32_kernels *k = fl_f32_kernels_at(fl_simd_level());
    return k ? k : &plain_kernels;
}
