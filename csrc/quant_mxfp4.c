/* quant_mxfp4.c: MXFP4 (OCP microscaling, e2m1 values with an e8m0 block scale), paired with Q8_0 activations.
 * The table holds the e2m1 values doubled so they are integers; the scale is halved to match. */

/* ggml's results depend on every product being rounded before it is added: no FMA contraction, whatever
 * -march the extension is built with (before the includes: fl_best_index_fp4 is defined in one) */
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include "kernels.h"
#include "quant_generic.h"

const int8_t fl_kvalues_mxfp4[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

void fl_dequantize_row_mxfp4(const void *src, float *dst, int64_t n) {
    const block_mxfp4 *x = src;
    for (int64_t i = 0; i < n / QK_MXFP4; i++) {
        const float d = fl_e8m0_to_fp32_half(x[i].e);
        float *y = dst + i * QK_MXFP4;
        for (int j = 0; j < QK_MXFP4 / 2; j++) {
            y[j] = fl_kvalues_mxfp4[x[i].qs[j] & 0x0F] * d;
            y[j + QK_MXFP4 / 2] = fl_kvalues_mxfp4[x[i].qs[j] >> 4] * d;
        }
    }
}

/* float -> uint8 as x86 and numpy's astype do it: through int32 (infinity gives INT32_MIN, low byte 0), wrapping
 * modulo 256, so the exponent of an amax below 2^-125 wraps as in ggml (on x86) and gguf-py */
static inline uint8_t to_uint8_wrapping(float v) {
    if (!(fabsf(v) < 2147483648.f))
        return 0;
    return (uint8_t)(uint32_t)(int32_t)v;
}

void fl_quantize_row_mxfp4_ref(const float *src, void *dst, int64_t n) {
    block_mxfp4 *y = dst;
    for (int64_t i = 0; i < n / QK_MXFP4; i++) {
        const float *x = src + i * QK_MXFP4;
        float amax = 0.0f;
        for (int j = 0; j < QK_MXFP4; j++)
            if (amax < fabsf(x[j]))
                amax = fabsf(x[j]);
        const uint8_t e = amax > 0.0f ? to_uint8_wrapping(floorf(log2f(amax)) - 2 + 127) : 0;
        const float d = fl_e8m0_to_fp32_half(e);
        y[i].e = e;
        for (int j = 0; j < QK_MXFP4 / 2; j++)
            y[i].qs[j] = fl_best_index_fp4(x[j], d) | (uint8_t)(fl_best_index_fp4(x[j + QK_MXFP4 / 2], d) << 4);
    }
}

void fl_vec_dot_mxfp4_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_mxfp4 *x = vx;
    const block_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / QK_MXFP4; i++) {
        const float d = fl_fp16_to_fp32(y[i].d) * fl_e8m0_to_fp32_half(x[i].e);
        int sumi = 0;
        for (int j = 0; j < QK_MXFP4 / 2; j++) {
            sumi += y[i].qs[j] * fl_kvalues_mxfp4[x[i].qs[j] & 0x0F];
            sumi += y[i].qs[j + QK_MXFP4 / 2] * fl_kvalues_mxfp4[x[i].qs[j] >> 4];
        }
        sumf += d * sumi;
    }
    *s = sumf;
}
