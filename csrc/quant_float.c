/* quant_float.c: the unquantized formats F32, F16 and BF16, and their reference dots with float32 activations.
 * The dots sum in double, as ggml's ggml_vec_dot_f32/f16 do (ggml_float), so they can stand as the reference. */
#include <string.h>
#include "kernels.h"
#include "quant_generic.h"

/* ggml's results depend on every product being rounded before it is added: no FMA contraction, whatever
 * -march the extension is built with */
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif

/* ---------------------------------------------------------------- F32 */
void fl_dequantize_row_f32(const void *src, float *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

void fl_quantize_row_f32_ref(const float *src, void *dst, int64_t n) {
    memcpy(dst, src, (size_t)n * sizeof(float));
}

void fl_vec_dot_f32_f32_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const float *x = vx;
    const float *y = vy;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)(x[i] * y[i]);
    *s = (float)sum;
}

/* ---------------------------------------------------------------- F16 */
void fl_dequantize_row_f16(const void *src, float *dst, int64_t n) {
    const fl_half *x = src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = fl_fp16_to_fp32(x[i]);
}

void fl_quantize_row_f16_ref(const float *src, void *dst, int64_t n) {
    fl_half *y = dst;
    for (int64_t i = 0; i < n; i++)
        y[i] = fl_fp32_to_fp16(src[i]);
}

void fl_vec_dot_f16_f32_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const fl_half *x = vx;
    const float *y = vy;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)(fl_fp16_to_fp32(x[i]) * y[i]);
    *s = (float)sum;
}

/* ---------------------------------------------------------------- BF16 */
void fl_dequantize_row_bf16(const void *src, float *dst, int64_t n) {
    const uint16_t *x = src;
    for (int64_t i = 0; i < n; i++)
        dst[i] = fl_bf16_to_fp32(x[i]);
}

void fl_quantize_row_bf16_ref(const float *src, void *dst, int64_t n) {
    uint16_t *y = dst;
    for (int64_t i = 0; i < n; i++)
        y[i] = fl_fp32_to_bf16(src[i]);
}

void fl_vec_dot_bf16_f32_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const uint16_t *x = vx;
    const float *y = vy;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++)
        sum += (double)(fl_bf16_to_fp32(x[i]) * y[i]);
    *s = (float)sum;
}
