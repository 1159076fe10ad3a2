/* avx512_dequant.c: AVX-512 dequantizers (to_float) for the prefill path of matmul.c, which dequantizes
 * every weight once per call; for IQ4_XS and Q6_K the plain-C loops were the larger part of that call.
 * Each gives the same floats as fl_dequantize_row_<t>: the same products, (d * scale) * q, in the same order. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl")
#include <immintrin.h>
#include "kernels.h"
#include "quant_generic.h"
#include "simd.h"

/* 16 signed bytes times dl, as 16 floats at y */
static inline void store_scaled(float *y, __m128i q, float dl) {
    _mm512_storeu_ps(y, _mm512_mul_ps(_mm512_set1_ps(dl), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q))));
}

static void dequant_iq4_xs(const void *src, float *dst, int64_t n) {
    const block_iq4_xs *x = src;
    const __m128i values = _mm_loadu_si128((const __m128i *)fl_kvalues_iq4nl), m4 = _mm_set1_epi8(0x0f);
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        for (int ib = 0; ib < QK_K / 32; ib++, y += 32) {
            const int ls = ((x[i].scales_l[ib / 2] >> 4 * (ib % 2)) & 0xf) | (((x[i].scales_h >> 2 * ib) & 3) << 4);
            const float dl = d * (ls - 32);
            __m128i q = _mm_loadu_si128((const __m128i *)(x[i].qs + 16 * ib));
            store_scaled(y, _mm_shuffle_epi8(values, _mm_and_si128(q, m4)), dl);
            store_scaled(y + 16, _mm_shuffle_epi8(values, _mm_and_si128(_mm_srli_epi16(q, 4), m4)), dl);
        }
    }
}

static void dequant_q6_K(const void *src, float *dst, int64_t n) {
    const block_q6_K *x = src;
    const __m128i m4 = _mm_set1_epi8(0x0f), m2 = _mm_set1_epi8(3), off = _mm_set1_epi8(32);
    float *y = dst;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const float d = fl_fp16_to_fp32(x[i].d);
        const uint8_t *ql = x[i].ql, *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int half = 0; half < QK_K; half += 128, y += 128, ql += 64, qh += 32, sc += 8) {
            for (int l = 0; l < 32; l += 16) {
                const int is = l / 16;
                __m128i lo = _mm_loadu_si128((const __m128i *)(ql + l));
                __m128i hi = _mm_loadu_si128((const __m128i *)(ql + l + 32));
                __m128i h = _mm_loadu_si128((const __m128i *)(qh + l));
                __m128i q1 = _mm_or_si128(_mm_and_si128(lo, m4), _mm_slli_epi16(_mm_and_si128(h, m2), 4));
                __m128i q2 = _mm_or_si128(_mm_and_si128(hi, m4),
                                          _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 2), m2), 4));
                __m128i q3 = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(lo, 4), m4),
                                          _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 4), m2), 4));
                __m128i q4 = _mm_or_si128(_mm_and_si128(_mm_srli_epi16(hi, 4), m4),
                                          _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(h, 6), m2), 4));
                store_scaled(y + l, _mm_sub_epi8(q1, off), d * sc[is]);
                store_scaled(y + l + 32, _mm_sub_epi8(q2, off), d * sc[is + 2]);
                store_scaled(y + l + 64, _mm_sub_epi8(q3, off), d * sc[is + 4]);
                store_scaled(y + l + 96, _mm_sub_epi8(q4, off), d * sc[is + 6]);
            }
        }
    }
}

fl_to_float_fn fl_to_float_avx512(int type) {
    switch (type) {
    case FL_TYPE_IQ4_XS: return dequant_iq4_xs;
    case FL_TYPE_Q6_K: return dequant_q6_K;
    default: return NULL;
    }
}
#endif
