/* quant_small.c: the small formats without a scale search: NVFP4 (e2m1 values with a UE4M3 scale per 16), Q1_0
 * (signs, with the mean magnitude as scale) and Q2_0 (-1, 0, 1, 2 times the block's largest magnitude), paired
 * with Q8_0 activations, and the ternary TQ1_0 and TQ2_0 of BitNet b1.58 / TriLM models, paired with Q8_K.
 * Their quantizers are ggml's quantize_row_*_ref; ggml's quantize_<t> ignores importance weights for all five,
 * so they have no .quantize search. Dequantization is bit-exact with ggml (and gguf-py where it has the type). */

/* ggml's results depend on every product being rounded before it is added: no FMA contraction, whatever
 * -march the extension is built with (before the includes: fl_best_index_fp4 is defined in one) */
#if defined(__clang__)
#pragma clang fp contract(off)
#else
#pragma GCC optimize("fp-contract=off")
#endif
#include <math.h>
#include <stddef.h>
#include "kernels.h"
#include "quant_generic.h"

/* ---------------------------------------------------------------- NVFP4 */

void fl_dequantize_row_nvfp4(const void *src, float *dst, int64_t n) {
    const block_nvfp4 *x = src;
    for (int64_t i = 0; i < n / QK_NVFP4; i++) {
        for (int s = 0; s < QK_NVFP4 / QK_NVFP4_SUB; s++) {
            const float d = fl_ue4m3_to_fp32_half(x[i].d[s]);
            const uint8_t *qs = x[i].qs + s * QK_NVFP4_SUB / 2;
            float *y = dst + i * QK_NVFP4 + s * QK_NVFP4_SUB;
            for (int j = 0; j < QK_NVFP4_SUB / 2; j++) {
                y[j] = fl_kvalues_mxfp4[qs[j] & 0x0F] * d;
                y[j + QK_NVFP4_SUB / 2] = fl_kvalues_mxfp4[qs[j] >> 4] * d;
            }
        }
    }
}

/* The UE4M3 byte of a positive scale x (the value before fl_ue4m3_to_fp32_half's halving), as ggml writes it:
 * x clamped to 448 (largest byte 0x7E: 0x7F would read as 0); normal bytes round the fourth mantissa bit up
 * (half away from zero, the bits below it ignored); below 2^-6, m = (int)(x 512 + 0.5) capped at 7; not
 * positive (NaN included) gives 0. */
static uint8_t fp32_to_ue4m3(float x) {
    if (!(x > 0.0f))
        return 0;
    if (x > 448.0f)
        x = 448.0f;
    uint32_t bits;
    memcpy(&bits, &x, sizeof(bits));
    int e = (int)((bits >> 23) & 0xFF) - 127 + 7;
    if (e <= 0) {
        int m = (int)(x * 512.0f + 0.5f);
        return (uint8_t)(m > 7 ? 7 : m);
    }
    if (e >= 15)
        return 0x7E;
    int m = (int)((bits >> 20) & 7) + (int)((bits >> 19) & 1);
    if (m > 7) {
        m = 0;
        if (++e >= 15)
            return 0x7E;
    }
    return (uint8_t)(e << 3 | m);
}

/* each sub-block's scale maps its largest magnitude to the largest e2m1 value, 6; NaN never wins the max */
void fl_quantize_row_nvfp4_ref(const float *src, void *dst, int64_t n) {
    block_nvfp4 *y = dst;
    for (int64_t i = 0; i < n / QK_NVFP4; i++) {
        for (int s = 0; s < QK_NVFP4 / QK_NVFP4_SUB; s++) {
            const float *x = src + i * QK_NVFP4 + s * QK_NVFP4_SUB;
            float amax = 0.0f;
            for (int j = 0; j < QK_NVFP4_SUB; j++)
                if (amax < fabsf(x[j]))
                    amax = fabsf(x[j]);
            const uint8_t ue = fp32_to_ue4m3(amax / 6.0f);
            const float d = fl_ue4m3_to_fp32_half(ue);
            y[i].d[s] = ue;
            uint8_t *qs = y[i].qs + s * QK_NVFP4_SUB / 2;
            for (int j = 0; j < QK_NVFP4_SUB / 2; j++)
                qs[j] = fl_best_index_fp4(x[j], d) | (uint8_t)(fl_best_index_fp4(x[j + QK_NVFP4_SUB / 2], d) << 4);
        }
    }
}

/* one weight block spans two Q8_0 blocks, each holding two sub-blocks */
void fl_vec_dot_nvfp4_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_nvfp4 *x = vx;
    const block_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / QK_NVFP4; i++) {
        for (int sb = 0; sb < QK_NVFP4 / QK_NVFP4_SUB; sb++) {
            const block_q8_0 *a = &y[i * (QK_NVFP4 / QK8_0) + sb / 2];
            const int8_t *q8 = a->qs + (sb % 2) * QK_NVFP4_SUB;
            const uint8_t *qs = x[i].qs + sb * QK_NVFP4_SUB / 2;
            int sumi = 0;
            for (int j = 0; j < QK_NVFP4_SUB / 2; j++) {
                sumi += q8[j] * fl_kvalues_mxfp4[qs[j] & 0x0F];
                sumi += q8[j + QK_NVFP4_SUB / 2] * fl_kvalues_mxfp4[qs[j] >> 4];
            }
            sumf += fl_fp16_to_fp32(a->d) * fl_ue4m3_to_fp32_half(x[i].d[sb]) * sumi;
        }
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- Q1_0 */

void fl_dequantize_row_q1_0(const void *src, float *dst, int64_t n) {
    const block_q1_0 *x = src;
    for (int64_t i = 0; i < n / QK1_0; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK1_0; j++)
            dst[i * QK1_0 + j] = x[i].qs[j / 8] >> (j % 8) & 1 ? d : -d;
    }
}

/* the scale is the mean magnitude (summed in order), the bit the sign: x >= 0, so -0 is positive and NaN not */
void fl_quantize_row_q1_0_ref(const float *src, void *dst, int64_t n) {
    block_q1_0 *y = dst;
    for (int64_t i = 0; i < n / QK1_0; i++) {
        const float *x = src + i * QK1_0;
        float sum = 0.0f;
        for (int j = 0; j < QK1_0; j++)
            sum += fabsf(x[j]);
        y[i].d = fl_fp32_to_fp16(sum / QK1_0);
        memset(y[i].qs, 0, sizeof(y[i].qs));
        for (int j = 0; j < QK1_0; j++)
            if (x[j] >= 0.0f)
                y[i].qs[j / 8] |= (uint8_t)(1u << (j % 8));
    }
}

/* one weight block spans four Q8_0 blocks: their scaled sums add up in float before the weight scale */
void fl_vec_dot_q1_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q1_0 *x = vx;
    const block_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / QK1_0; i++) {
        float sumb = 0.0f;
        for (int k = 0; k < QK1_0 / QK8_0; k++) {
            const block_q8_0 *a = &y[i * (QK1_0 / QK8_0) + k];
            const uint8_t *bits = x[i].qs + k * QK8_0 / 8;
            int sumi = 0;
            for (int j = 0; j < QK8_0; j++)
                sumi += bits[j / 8] >> (j % 8) & 1 ? a->qs[j] : -a->qs[j];
            sumb += fl_fp16_to_fp32(a->d) * sumi;
        }
        sumf += fl_fp16_to_fp32(x[i].d) * sumb;
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- Q2_0 */

static inline int q2_0_code(const block_q2_0 *b, int j) {
    return b->qs[j / 4] >> (2 * (j % 4)) & 3;
}

void fl_dequantize_row_q2_0(const void *src, float *dst, int64_t n) {
    const block_q2_0 *x = src;
    for (int64_t i = 0; i < n / QK2_0; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK2_0; j++)
            dst[i * QK2_0 + j] = (float)(q2_0_code(&x[i], j) - 1) * d;
    }
}

/* round(v) + 1 clamped to the codes 0..3, with (int)roundf as x86 converts: NaN and |v| >= 2^31 give INT_MIN,
 * so code 0 (only reached through an infinite 1/d or a NaN element) */
static inline uint8_t q2_0_quantize_value(float v) {
    if (!(fabsf(v) < 2147483648.f))
        return 0;
    int q = (int)roundf(v) + 1;
    return (uint8_t)(q < 0 ? 0 : q > 3 ? 3 : q);
}

/* the scale is the largest magnitude (NaN never wins): the values -d, 0, d; 2d is never written */
void fl_quantize_row_q2_0_ref(const float *src, void *dst, int64_t n) {
    block_q2_0 *y = dst;
    for (int64_t i = 0; i < n / QK2_0; i++) {
        const float *x = src + i * QK2_0;
        float amax = 0.0f;
        for (int j = 0; j < QK2_0; j++)
            if (fabsf(x[j]) > amax)
                amax = fabsf(x[j]);
        const float id = amax > 0.0f ? 1.0f / amax : 0.0f;
        y[i].d = fl_fp32_to_fp16(amax);
        memset(y[i].qs, 0, sizeof(y[i].qs));
        for (int j = 0; j < QK2_0; j++)
            y[i].qs[j / 4] |= (uint8_t)(q2_0_quantize_value(x[j] * id) << (2 * (j % 4)));
    }
}

void fl_vec_dot_q2_0_q8_0_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q2_0 *x = vx;
    const block_q8_0 *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / QK2_0; i++) {
        float sumb = 0.0f;
        for (int k = 0; k < QK2_0 / QK8_0; k++) {
            const block_q8_0 *a = &y[i * (QK2_0 / QK8_0) + k];
            int sumi = 0;
            for (int j = 0; j < QK8_0; j++)
                sumi += (q2_0_code(&x[i], k * QK8_0 + j) - 1) * a->qs[j];
            sumb += fl_fp16_to_fp32(a->d) * sumi;
        }
        sumf += fl_fp16_to_fp32(x[i].d) * sumb;
    }
    *s = sumf;
}

/* ---------------------------------------------------------------- ternary: TQ1_0, TQ2_0 */

/* lroundf(v) + 1, the code of v in {-1, 0, 1} -> {0, 1, 2}, as ggml computes it on x86-64 and keeps only its low
 * bits (TQ2_0 two, TQ1_0 eight): NaN and |v| >= 2^63 give LONG_MIN, so 1. Outside -1.5..1.5 only after a NaN
 * element reset the block maximum (ggml's MAX). */
static inline uint8_t ternary_code(float v) {
    if (!(fabsf(v) < 9223372036854775808.f))
        return 1;
    return (uint8_t)((uint64_t)(int64_t)roundf(v) + 1);
}

/* the scale of a ternary block: its largest magnitude by ggml's MAX(a, b) = a > b ? a : b, so a NaN element
 * becomes the maximum and the next element replaces it */
static inline float ternary_amax(const float *x) {
    float amax = 0.0f;
    for (int j = 0; j < QK_K; j++)
        amax = amax > fabsf(x[j]) ? amax : fabsf(x[j]);
    return amax;
}

/* TQ1_0's bytes, counted from the block start (qs then qh): each group of `width` bytes holds `trits` elements
 * per byte, element base + width * n + m being trit n of byte first + m */
static const struct {
    uint8_t first, width, trits, base;
} tq1_groups[3] = {{0, 32, 5, 0}, {32, 16, 5, 160}, {48, 4, 4, 240}};
_Static_assert(offsetof(block_tq1_0, qh) == 48, "tq1_0 groups assume qh right after qs");

/* A byte holds ceil(v 256 / 243) for its base-3 number v of 5 trits: a fraction of 1 in fixed point, so
 * multiplying it by 3^n (mod 256) drops the first n trits and the top trit is then (q * 3) >> 8. */
static const uint8_t pow3[5] = {1, 3, 9, 27, 81};

/* the 256 values t - 1 in -1..1 of one TQ1_0 block, in element order */
static void tq1_0_unpack(const block_tq1_0 *b, int8_t *t) {
    const uint8_t *bytes = (const uint8_t *)b;
    for (int g = 0; g < 3; g++)
        for (int n = 0; n < tq1_groups[g].trits; n++)
            for (int m = 0; m < tq1_groups[g].width; m++) {
                const uint8_t q = (uint8_t)(bytes[tq1_groups[g].first + m] * pow3[n]);
                t[tq1_groups[g].base + tq1_groups[g].width * n + m] = (int8_t)((q * 3 >> 8) - 1);
            }
}

void fl_dequantize_row_tq1_0(const void *src, float *dst, int64_t n) {
    const block_tq1_0 *x = src;
    int8_t t[QK_K];
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        tq1_0_unpack(&x[i], t);
        for (int j = 0; j < QK_K; j++)
            dst[i * QK_K + j] = (float)t[j] * d;
    }
}

void fl_quantize_row_tq1_0_ref(const float *src, void *dst, int64_t n) {
    block_tq1_0 *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *x = src + i * QK_K;
        const float d = ternary_amax(x);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_fp32_to_fp16(d);
        uint8_t *bytes = (uint8_t *)&y[i];
        for (int g = 0; g < 3; g++)
            for (int m = 0; m < tq1_groups[g].width; m++) {
                uint8_t q = 0; /* wraps modulo 256 as ggml's uint8_t does, for the garbage codes */
                for (int k = 0; k < tq1_groups[g].trits; k++)
                    q = (uint8_t)(q * 3 + ternary_code(x[tq1_groups[g].base + tq1_groups[g].width * k + m] * id));
                if (tq1_groups[g].trits == 4)
                    q = (uint8_t)(q * 3); /* the missing fifth trit is the least significant, 0 */
                bytes[tq1_groups[g].first + m] = (uint8_t)((q * 256 + 242) / 243);
            }
    }
}

void fl_vec_dot_tq1_0_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_tq1_0 *x = vx;
    const block_q8_K *y = vy;
    int8_t t[QK_K];
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        tq1_0_unpack(&x[i], t);
        int sumi = 0;
        for (int j = 0; j < QK_K; j++)
            sumi += t[j] * y[i].qs[j];
        sumf += (float)sumi * (fl_fp16_to_fp32(x[i].d) * y[i].d);
    }
    *s = sumf;
}

static inline int tq2_0_value(const block_tq2_0 *b, int j) {
    return (b->qs[j / 128 * 32 + j % 32] >> (2 * (j % 128 / 32)) & 3) - 1;
}

void fl_dequantize_row_tq2_0(const void *src, float *dst, int64_t n) {
    const block_tq2_0 *x = src;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int j = 0; j < QK_K; j++)
            dst[i * QK_K + j] = (float)tq2_0_value(&x[i], j) * d;
    }
}

void fl_quantize_row_tq2_0_ref(const float *src, void *dst, int64_t n) {
    block_tq2_0 *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float *x = src + i * QK_K;
        const float d = ternary_amax(x);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = fl_fp32_to_fp16(d);
        memset(y[i].qs, 0, sizeof(y[i].qs));
        for (int j = 0; j < QK_K; j++)
            y[i].qs[j / 128 * 32 + j % 32] |= (uint8_t)((ternary_code(x[j] * id) & 3) << (2 * (j % 128 / 32)));
    }
}

void fl_vec_dot_tq2_0_q8_K_generic(int64_t n, float *s, const void *vx, const void *vy) {
    const block_tq2_0 *x = vx;
    const block_q8_K *y = vy;
    float sumf = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        int sumi = 0;
        for (int j = 0; j < QK_K; j++)
            sumi += tq2_0_value(&x[i], j) * y[i].qs[j];
        sumf += (float)sumi * (y[i].d * fl_fp16_to_fp32(x[i].d));
    }
    *s = sumf;
}
