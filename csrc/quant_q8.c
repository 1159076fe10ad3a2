/* quant_q8.c: Q8_0 (weights and the activations of Q8_0 / MXFP4 / Q4_0 / Q5_0 weights), Q8_1 (activations of
 * Q4_1 / Q5_1) and Q8_K (activations of the k-quants and i-quants). Each follows ggml's quantize_row_*_ref bit
 * for bit. */
#include <math.h>
#include "kernels.h"
#include "quant_generic.h"

/* ggml's results depend on every product being rounded before it is added: no FMA contraction, whatever
 * -march the extension is built with */
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif

/* float -> int8 as x86 and numpy's astype do it: through int32, where NaN and out-of-range values become
 * INT32_MIN (low byte 0), and wrapping modulo 256. Only reached by blocks whose scale overflowed. */
static inline int8_t to_int8_wrapping(float r) {
    if (!(fabsf(r) < 2147483648.f))
        return 0;
    return (int8_t)(uint8_t)(uint32_t)(int32_t)r;
}

/* ---------------------------------------------------------------- Q8_0 */
void fl_dequantize_row_q8_0(const void *src, float *dst, int64_t n) {
    const block_q8_0 *x = src;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK8_0; j++)
            dst[i * QK8_0 + j] = x[i].qs[j] * d;
    }
}

void fl_quantize_row_q8_0_ref(const float *src, void *dst, int64_t n) {
    block_q8_0 *y = dst;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        const float *x = src + i * QK8_0;
        float amax = 0.0f;
        for (int j = 0; j < QK8_0; j++)
            amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_fp32_to_fp16(d);
        for (int j = 0; j < QK8_0; j++)
            y[i].qs[j] = to_int8_wrapping(roundf(x[j] * id));
    }
}

void fl_vec_dot_q8_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q8_0 *x = vx;
    const block_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int sumi = 0;
        for (int j = 0; j < QK8_0; j++)
            sumi += x[i].qs[j] * y[i].qs[j];
        sumf += sumi * (fl_fp16_to_fp32(x[i].d) * fl_fp16_to_fp32(y[i].d));
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- Q8_1 */
/* as Q8_0; s is what the weights' min term multiplies, ggml has no dequantizer for it: x = d * qs */
void fl_dequantize_row_q8_1(const void *src, float *dst, int64_t n) {
    const block_q8_1 *x = src;
    for (int64_t i = 0; i < n / QK8_1; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK8_1; j++)
            dst[i * QK8_1 + j] = x[i].qs[j] * d;
    }
}

void fl_quantize_row_q8_1_ref(const float *src, void *dst, int64_t n) {
    block_q8_1 *y = dst;
    for (int64_t i = 0; i < n / QK8_1; i++) {
        const float *x = src + i * QK8_1;
        float amax = 0.0f;
        for (int j = 0; j < QK8_1; j++)
            amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
        const float d = amax / 127;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_fp32_to_fp16(d);
        int sum = 0;
        for (int j = 0; j < QK8_1; j++) {
            y[i].qs[j] = to_int8_wrapping(roundf(x[j] * id));
            sum += y[i].qs[j];
        }
        y[i].s = fl_fp32_to_fp16(sum * d);
    }
}

/* ---------------------------------------------------------------- Q8_K */
void fl_dequantize_row_q8_K(const void *src, float *dst, int64_t n) {
    const block_q8_K *x = src;
    for (int64_t i = 0; i < n / QK_K; i++)
        for (int j = 0; j < QK_K; j++)
            dst[i * QK_K + j] = x[i].d * x[i].qs[j];
}

/* The scale maps the largest magnitude to -127 (not -128), so every q fits the signed products of
 * the i-quant kernels; bsums carry the sums the k-quant dots need for their mins. */
void fl_quantize_row_q8_K_ref(const float *src, void *dst, int64_t n) {
    block_q8_K *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *x = src + i * QK_K;
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < QK_K; j++) {
            if (fabsf(x[j]) > amax) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        if (!amax) {
            memset(&y[i], 0, sizeof(y[i]));
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK_K; j++) {
            int v = fl_nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)(v < 127 ? v : 127);
        }
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++)
                sum += y[i].qs[g * 16 + j];
            y[i].bsums[g] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}
