/* neon.c: AArch64 Advanced SIMD kernels (part of the base ISA, so no runtime check): the f32, f16 and bf16
 * dots, and Q8_0 and MXFP4 against Q8_0 activations. Every other format falls back to its generic dot. Only
 * baseline A64 instructions are used (no dotprod), so any AArch64 core runs it. */
#if defined(__aarch64__)
#include <arm_neon.h>
#include "kernels.h"
#include "quant_generic.h"
#include "simd.h"

static void dot_f32(int64_t n, float *s, const void *vx, const void *vy) {
    const float *x = vx, *y = vy;
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        a0 = vfmaq_f32(a0, vld1q_f32(x + i), vld1q_f32(y + i));
        a1 = vfmaq_f32(a1, vld1q_f32(x + i + 4), vld1q_f32(y + i + 4));
    }
    float sum = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++)
        sum += x[i] * y[i];
    *s = sum;
}

static void dot_f16(int64_t n, float *s, const void *vx, const void *vy) {
    const uint16_t *x = vx;
    const float *y = vy;
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(x + i);
        a0 = vfmaq_f32(a0, vcvt_f32_f16(vreinterpret_f16_u16(vget_low_u16(h))), vld1q_f32(y + i));
        a1 = vfmaq_f32(a1, vcvt_f32_f16(vreinterpret_f16_u16(vget_high_u16(h))), vld1q_f32(y + i + 4));
    }
    float sum = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++)
        sum += fl_fp16_to_fp32(x[i]) * y[i];
    *s = sum;
}

static void dot_bf16(int64_t n, float *s, const void *vx, const void *vy) {
    const uint16_t *x = vx;
    const float *y = vy;
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        uint16x8_t h = vld1q_u16(x + i);
        a0 = vfmaq_f32(a0, vreinterpretq_f32_u32(vshll_n_u16(vget_low_u16(h), 16)), vld1q_f32(y + i));
        a1 = vfmaq_f32(a1, vreinterpretq_f32_u32(vshll_n_u16(vget_high_u16(h), 16)), vld1q_f32(y + i + 4));
    }
    float sum = vaddvq_f32(vaddq_f32(a0, a1));
    for (; i < n; i++)
        sum += fl_bf16_to_fp32(x[i]) * y[i];
    *s = sum;
}

/* the 32 products of two blocks of signed bytes, summed to 4 int32; |x * y| <= 128 * 127 fits a pair in int16 */
static inline int32x4_t dot32_i8(int8x16_t x0, int8x16_t x1, const int8_t *y) {
    int8x16_t y0 = vld1q_s8(y), y1 = vld1q_s8(y + 16);
    int16x8_t p0 = vmlal_high_s8(vmull_s8(vget_low_s8(x0), vget_low_s8(y0)), x0, y0);
    int16x8_t p1 = vmlal_high_s8(vmull_s8(vget_low_s8(x1), vget_low_s8(y1)), x1, y1);
    return vpadalq_s16(vpaddlq_s16(p0), p1);
}

static void dot_q8_0(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q8_0 *x = vx;
    const block_q8_0 *y = vy;
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < n / QK8_0; i++) {
        int32x4_t sum = dot32_i8(vld1q_s8(x[i].qs), vld1q_s8(x[i].qs + 16), y[i].qs);
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(sum), fl_fp16_to_fp32(x[i].d) * fl_fp16_to_fp32(y[i].d));
    }
    *s = vaddvq_f32(acc);
}

static void dot_mxfp4(int64_t n, float *s, const void *vx, const void *vy) {
    const block_mxfp4 *x = vx;
    const block_q8_0 *y = vy;
    const int8x16_t values = vld1q_s8(fl_kvalues_mxfp4);
    float32x4_t acc = vdupq_n_f32(0.0f);
    for (int64_t i = 0; i < n / QK_MXFP4; i++) {
        uint8x16_t q = vld1q_u8(x[i].qs);
        int8x16_t lo = vqtbl1q_s8(values, vandq_u8(q, vdupq_n_u8(0x0f)));
        int8x16_t hi = vqtbl1q_s8(values, vshrq_n_u8(q, 4));
        int32x4_t sum = dot32_i8(lo, hi, y[i].qs);
        acc = vmlaq_n_f32(acc, vcvtq_f32_s32(sum), fl_e8m0_to_fp32_half(x[i].e) * fl_fp16_to_fp32(y[i].d));
    }
    *s = vaddvq_f32(acc);
}

fl_vec_dot_fn fl_dot_neon(int type) {
    switch (type) {
    case FL_TYPE_F32: return dot_f32;
    case FL_TYPE_F16: return dot_f16;
    case FL_TYPE_BF16: return dot_bf16;
    case FL_TYPE_Q8_0: return dot_q8_0;
    case FL_TYPE_MXFP4: return dot_mxfp4;
    default: return NULL;
    }
}
#endif
