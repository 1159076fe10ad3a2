/* quant_legacy.c: ggml's first block formats, blocks of 32 with one fp16 scale: Q4_0 and Q5_0 (symmetric, paired
 * with Q8_0 activations) and Q4_1 and Q5_1 (scale and min, paired with Q8_1 activations, whose block sums carry
 * the min term). The reference quantizers follow quantize_row_*_ref bit for bit, the importance-weighted ones
 * ggml's quantize_* with quant_weights (the scale searches live in quant_k.c); dequantization is bit-exact with
 * gguf-py. */
#include <float.h>
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

/* float -> 8 bits as ggml's (int8_t) / (uint8_t) casts compile on x86: truncation through int32, where NaN and
 * out-of-range values become INT32_MIN (low byte 0), then the low byte. Finite input never leaves 0..32 here;
 * this keeps garbage input defined. */
static inline uint8_t trunc_low_byte(float v) {
    if (!(fabsf(v) < 2147483648.f))
        return 0;
    return (uint8_t)(uint32_t)(int32_t)v;
}

/* ggml's MIN(top, (int8_t)v): the signed byte capped at top, stored back into a byte */
static inline uint8_t trunc_capped(float v, int top) {
    int q = (int8_t)trunc_low_byte(v);
    return (uint8_t)(q > top ? top : q);
}

/* bit j of the little-endian 32-bit qh is the fifth bit of value j */
static inline uint32_t load_qh(const uint8_t *qh) {
    return (uint32_t)qh[0] | (uint32_t)qh[1] << 8 | (uint32_t)qh[2] << 16 | (uint32_t)qh[3] << 24;
}

static inline void store_qh(uint8_t *qh, uint32_t bits) {
    for (int i = 0; i < 4; i++)
        qh[i] = (uint8_t)(bits >> (8 * i));
}

/* levels 0..31 of values j and j + 16 into nibbles, their fifth bits into qh */
static void pack_q5(const uint8_t *L, uint8_t *qs, uint8_t *qh) {
    uint32_t bits = 0;
    for (int j = 0; j < 16; j++) {
        qs[j] = (uint8_t)((L[j] & 0x0F) | ((L[j + 16] & 0x0F) << 4));
        bits |= (uint32_t)((L[j] & 0x10u) >> 4) << j;
        bits |= (uint32_t)((L[j + 16] & 0x10u) >> 4) << (j + 16);
    }
    store_qh(qh, bits);
}

/* the value of largest magnitude, sign kept (the first of equals; NaN never wins) */
static float signed_absmax(const float *x, int n) {
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < n; j++) {
        if (amax < fabsf(x[j])) {
            amax = fabsf(x[j]);
            max = x[j];
        }
    }
    return max;
}

static void min_max(const float *x, int n, float *min, float *max) {
    *min = FLT_MAX;
    *max = -FLT_MAX;
    for (int j = 0; j < n; j++) {
        if (x[j] < *min)
            *min = x[j];
        if (x[j] > *max)
            *max = x[j];
    }
}

static float sum_squares(const float *x, int64_t n) {
    float s = 0;
    for (int64_t j = 0; j < n; j++)
        s += x[j] * x[j];
    return s;
}

/* ggml's quantize_<type> for these formats: the reference quantizer without importance, else per row the search
 * of each block, with weights qw * sqrt(sigma2 + x^2) where sigma2 is the mean square of the whole row */
static void quantize_legacy_rows(const float *src, void *dst, int64_t n_rows, int64_t n_per_row,
                                 const float *importance, size_t block_bytes,
                                 void (*ref)(const float *, void *, int64_t),
                                 void (*weighted)(const float *, const float *, float, void *)) {
    if (!importance) {
        ref(src, dst, n_rows * n_per_row);
        return;
    }
    uint8_t *y = dst;
    for (int64_t r = 0; r < n_rows; r++) {
        const float *x = src + r * n_per_row;
        const float sigma2 = sum_squares(x, n_per_row) / n_per_row;
        for (int64_t b = 0; b < n_per_row / 32; b++, y += block_bytes)
            weighted(x + 32 * b, importance + 32 * b, sigma2, y);
    }
}

static void block_weights(const float *x, const float *qw, float sigma2, float *weight) {
    for (int j = 0; j < 32; j++)
        weight[j] = qw[j] * sqrtf(sigma2 + x[j] * x[j]);
}

/* ---------------------------------------------------------------- Q4_0 */
void fl_dequantize_row_q4_0(const void *src, float *dst, int64_t n) {
    const block_q4_0 *x = src;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        float *y = dst + i * QK4_0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            y[j] = ((x[i].qs[j] & 0x0F) - 8) * d;
            y[j + QK4_0 / 2] = ((x[i].qs[j] >> 4) - 8) * d;
        }
    }
}

/* the value of largest magnitude maps to level 0 (-8 d); levels round half up and stop at 15 */
void fl_quantize_row_q4_0_ref(const float *src, void *dst, int64_t n) {
    block_q4_0 *y = dst;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        const float *x = src + i * QK4_0;
        const float d = signed_absmax(x, QK4_0) / -8;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_fp32_to_fp16(d);
        for (int j = 0; j < QK4_0 / 2; j++) {
            const uint8_t lo = trunc_capped(x[j] * id + 8.5f, 15);
            const uint8_t hi = trunc_capped(x[j + QK4_0 / 2] * id + 8.5f, 15);
            y[i].qs[j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

static void quantize_block_q4_0_weighted(const float *x, const float *qw, float sigma2, void *dst) {
    block_q4_0 *y = dst;
    float weight[QK4_0];
    int8_t L[QK4_0];
    block_weights(x, qw, sigma2, weight);
    y->d = fl_fp32_to_fp16(fl_make_qx_quants(QK4_0, 8, x, L, weight));
    for (int j = 0; j < QK4_0 / 2; j++)
        y->qs[j] = (uint8_t)(L[j] | (L[j + QK4_0 / 2] << 4));
}

void fl_quantize_q4_0(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_legacy_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q4_0), fl_quantize_row_q4_0_ref,
                         quantize_block_q4_0_weighted);
}

void fl_vec_dot_q4_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q4_0 *x = vx;
    const block_q8_0 *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK4_0; i++) {
        int sumi0 = 0, sumi1 = 0;
        for (int j = 0; j < QK4_0 / 2; j++) {
            sumi0 += ((x[i].qs[j] & 0x0F) - 8) * y[i].qs[j];
            sumi1 += ((x[i].qs[j] >> 4) - 8) * y[i].qs[j + QK4_0 / 2];
        }
        sumf += (sumi0 + sumi1) * fl_fp16_to_fp32(x[i].d) * fl_fp16_to_fp32(y[i].d);
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- Q4_1 */
void fl_dequantize_row_q4_1(const void *src, float *dst, int64_t n) {
    const block_q4_1 *x = src;
    for (int64_t i = 0; i < n / QK4_1; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const float m = fl_fp16_to_fp32(x[i].m);
        float *y = dst + i * QK4_1;
        for (int j = 0; j < QK4_1 / 2; j++) {
            y[j] = (x[i].qs[j] & 0x0F) * d + m;
            y[j + QK4_1 / 2] = (x[i].qs[j] >> 4) * d + m;
        }
    }
}

/* min and max span levels 0..15; levels round half up */
void fl_quantize_row_q4_1_ref(const float *src, void *dst, int64_t n) {
    block_q4_1 *y = dst;
    for (int64_t i = 0; i < n / QK4_1; i++) {
        const float *x = src + i * QK4_1;
        float min, max;
        min_max(x, QK4_1, &min, &max);
        const float d = (max - min) / 15;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_fp32_to_fp16(d);
        y[i].m = fl_fp32_to_fp16(min);
        for (int j = 0; j < QK4_1 / 2; j++) {
            const uint8_t lo = trunc_capped((x[j] - min) * id + 0.5f, 15);
            const uint8_t hi = trunc_capped((x[j + QK4_1 / 2] - min) * id + 0.5f, 15);
            y[i].qs[j] = (uint8_t)(lo | (hi << 4));
        }
    }
}

static void quantize_block_q4_1_weighted(const float *x, const float *qw, float sigma2, void *dst) {
    block_q4_1 *y = dst;
    float weight[QK4_1], min;
    uint8_t L[QK4_1], Laux[QK4_1];
    block_weights(x, qw, sigma2, weight);
    y->d = fl_fp32_to_fp16(fl_make_qkx3_quants(QK4_1, 15, x, weight, L, &min, Laux));
    y->m = fl_fp32_to_fp16(-min);
    for (int j = 0; j < QK4_1 / 2; j++)
        y->qs[j] = (uint8_t)(L[j] | (L[j + QK4_1 / 2] << 4));
}

void fl_quantize_q4_1(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_legacy_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q4_1), fl_quantize_row_q4_1_ref,
                         quantize_block_q4_1_weighted);
}

/* sum (d q + m) a over a block = d d8 sum q q8 + m s, s = d8 sum q8 as the activation block stores it */
void fl_vec_dot_q4_1_q8_1_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q4_1 *x = vx;
    const block_q8_1 *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK4_1; i++) {
        int sumi0 = 0, sumi1 = 0;
        for (int j = 0; j < QK4_1 / 2; j++) {
            sumi0 += (x[i].qs[j] & 0x0F) * y[i].qs[j];
            sumi1 += (x[i].qs[j] >> 4) * y[i].qs[j + QK4_1 / 2];
        }
        sumf += (fl_fp16_to_fp32(x[i].d) * fl_fp16_to_fp32(y[i].d)) * (sumi0 + sumi1) +
                fl_fp16_to_fp32(x[i].m) * fl_fp16_to_fp32(y[i].s);
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- Q5_0 */
void fl_dequantize_row_q5_0(const void *src, float *dst, int64_t n) {
    const block_q5_0 *x = src;
    for (int64_t i = 0; i < n / QK5_0; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const uint32_t qh = load_qh(x[i].qh);
        float *y = dst + i * QK5_0;
        for (int j = 0; j < QK5_0 / 2; j++) {
            const int lo = (x[i].qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            const int hi = (x[i].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = (lo - 16) * d;
            y[j + QK5_0 / 2] = (hi - 16) * d;
        }
    }
}

/* the value of largest magnitude maps to level 0 (-16 d); levels round half up and stop at 31 */
void fl_quantize_row_q5_0_ref(const float *src, void *dst, int64_t n) {
    block_q5_0 *y = dst;
    uint8_t L[QK5_0];
    for (int64_t i = 0; i < n / QK5_0; i++) {
        const float *x = src + i * QK5_0;
        const float d = signed_absmax(x, QK5_0) / -16;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_fp32_to_fp16(d);
        for (int j = 0; j < QK5_0; j++)
            L[j] = trunc_capped(x[j] * id + 16.5f, 31);
        pack_q5(L, y[i].qs, y[i].qh);
    }
}

static void quantize_block_q5_0_weighted(const float *x, const float *qw, float sigma2, void *dst) {
    block_q5_0 *y = dst;
    float weight[QK5_0];
    int8_t L[QK5_0];
    block_weights(x, qw, sigma2, weight);
    y->d = fl_fp32_to_fp16(fl_make_qx_quants(QK5_0, 16, x, L, weight));
    pack_q5((const uint8_t *)L, y->qs, y->qh);
}

void fl_quantize_q5_0(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_legacy_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q5_0), fl_quantize_row_q5_0_ref,
                         quantize_block_q5_0_weighted);
}

void fl_vec_dot_q5_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q5_0 *x = vx;
    const block_q8_0 *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK5_0; i++) {
        const uint32_t qh = load_qh(x[i].qh);
        int sumi0 = 0, sumi1 = 0;
        for (int j = 0; j < QK5_0 / 2; j++) {
            const int lo = ((x[i].qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4) - 16;
            const int hi = ((x[i].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4) - 16;
            sumi0 += lo * y[i].qs[j];
            sumi1 += hi * y[i].qs[j + QK5_0 / 2];
        }
        sumf += (fl_fp16_to_fp32(x[i].d) * fl_fp16_to_fp32(y[i].d)) * (sumi0 + sumi1);
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- Q5_1 */
void fl_dequantize_row_q5_1(const void *src, float *dst, int64_t n) {
    const block_q5_1 *x = src;
    for (int64_t i = 0; i < n / QK5_1; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const float m = fl_fp16_to_fp32(x[i].m);
        const uint32_t qh = load_qh(x[i].qh);
        float *y = dst + i * QK5_1;
        for (int j = 0; j < QK5_1 / 2; j++) {
            const int lo = (x[i].qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            const int hi = (x[i].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            y[j] = lo * d + m;
            y[j + QK5_1 / 2] = hi * d + m;
        }
    }
}

/* min and max span levels 0..31; levels round half up (ggml caps nothing here: finite input stays in range) */
void fl_quantize_row_q5_1_ref(const float *src, void *dst, int64_t n) {
    block_q5_1 *y = dst;
    uint8_t L[QK5_1];
    for (int64_t i = 0; i < n / QK5_1; i++) {
        const float *x = src + i * QK5_1;
        float min, max;
        min_max(x, QK5_1, &min, &max);
        const float d = (max - min) / 31;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_fp32_to_fp16(d);
        y[i].m = fl_fp32_to_fp16(min);
        for (int j = 0; j < QK5_1; j++)
            L[j] = trunc_low_byte((x[j] - min) * id + 0.5f);
        pack_q5(L, y[i].qs, y[i].qh);
    }
}

static void quantize_block_q5_1_weighted(const float *x, const float *qw, float sigma2, void *dst) {
    block_q5_1 *y = dst;
    float weight[QK5_1], min;
    uint8_t L[QK5_1], Laux[QK5_1];
    block_weights(x, qw, sigma2, weight);
    y->d = fl_fp32_to_fp16(fl_make_qkx3_quants(QK5_1, 31, x, weight, L, &min, Laux));
    y->m = fl_fp32_to_fp16(-min);
    pack_q5(L, y->qs, y->qh);
}

void fl_quantize_q5_1(const float *src, void *dst, int64_t n_rows, int64_t n_per_row, const float *importance) {
    quantize_legacy_rows(src, dst, n_rows, n_per_row, importance, sizeof(block_q5_1), fl_quantize_row_q5_1_ref,
                         quantize_block_q5_1_weighted);
}

void fl_vec_dot_q5_1_q8_1_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q5_1 *x = vx;
    const block_q8_1 *y = vy;
    float sumf = 0;
    for (int64_t i = 0; i < n / QK5_1; i++) {
        const uint32_t qh = load_qh(x[i].qh);
        int sumi0 = 0, sumi1 = 0;
        for (int j = 0; j < QK5_1 / 2; j++) {
            const int lo = (x[i].qs[j] & 0x0F) | (int)((qh >> j) & 1) << 4;
            const int hi = (x[i].qs[j] >> 4) | (int)((qh >> (j + 16)) & 1) << 4;
            sumi0 += lo * y[i].qs[j];
            sumi1 += hi * y[i].qs[j + QK5_1 / 2];
        }
        sumf += (fl_fp16_to_fp32(x[i].d) * fl_fp16_to_fp32(y[i].d)) * (sumi0 + sumi1) +
                fl_fp16_to_fp32(x[i].m) * fl_fp16_to_fp32(y[i].s);
    }
    *s = sumf;
}
