/* vec_f32.h: the float32 dot that attention's scores take, and the blocked kernels built on it (vec_f32.c),
 * shared by the op-by-op kernels (attention.c) and the planned decode step (v4_attn.c) so that all give the same
 * bits. */
#ifndef FLASHLITE_VEC_F32_H
#define FLASHLITE_VEC_F32_H
#include <stdint.h>

/* The reference dot. Independent partial sums let the compiler vectorise without reassociating one
 * accumulator: lane j sums a[i + j] * b[i + j] over i in steps of 16, the lanes are added in order, then the
 * tail. Every kernel below gives each dot exactly these bits. */
static inline float fl_dot_f32(const float *a, const float *b, int64_t n) {
    float acc[16] = {0};
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        for (int j = 0; j < 16; j++) acc[j] += a[i + j] * b[i + j];
    float s = 0.0f;
    for (int j = 0; j < 16; j++) s += acc[j];
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* Attention's two inner loops over many queries that share their rows (V4's one KV head), blocked so that a
 * row loaded once serves several queries:
 * scores: s[h * n_rows + i] = fl_dot_f32(q + h * dim, rows[i], dim) * scale, for h < n_q, i < n_rows;
 * mix:    out[h * dim + d] = sum over i in order of w[h * n_rows + i] * rows[i][d], from 0. */
struct fl_f32_kernels {
    void (*scores)(int64_t n_q, const float *q, int64_t n_rows, const float *const *rows, int64_t dim, float scale,
                   float *s);
    void (*mix)(int64_t n_q, const float *w, int64_t n_rows, const float *const *rows, int64_t dim, float *out);
};

/* The kernels of the SIMD level in use; bitwise the same at every level. */
const struct fl_f32_kernels *fl_f32_kernels(void);
/* Those of one level (tests), or NULL where this build has none. */
const struct fl_f32_kernels *fl_f32_kernels_at(int level);

#endif
