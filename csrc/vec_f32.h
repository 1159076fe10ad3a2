/* vec_f32.h: the float32 dot that attention's scores take, shared by the op-by-op kernels (attention.c) and the
 * planned decode step (v4_attn.c) so that both give the same bits. */
#ifndef FLASHLITE_VEC_F32_H
#define FLASHLITE_VEC_F32_H
#include <stdint.h>

/* Independent partial sums let the compiler vectorise without reassociating one accumulator. */
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

#endif
