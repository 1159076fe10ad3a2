/* avx512_vnni.c: the vec_dots of dot_x86.h with vpdpbusd doing the byte products (AVX512-VNNI on ymm),
 * except Q4_K, whose dot takes a 64-weight pair of sub-blocks per zmm and applies their scales with
 * vpdpwssd. Q8_0 and MXFP4 stay on ymm: two 32-blocks per zmm measured slower here, since gathering
 * the per-block scales and inserting the halves cost more than the wider products save. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl,avx512vnni")
#define FL_X86_VNNI 1
#define FL_X86_TABLE fl_dot_avx512_vnni_ymm
#define FL_X86_TOKENS fl_tokens_avx512_vnni
#define FL_X86_ROWS fl_rows_avx512_vnni
#include "dot_x86.h"

fl_vec_dot_fn fl_dot_avx512_vnni_ymm(int type);

/* the 12 packed bytes of 6-bit scales and mins -> scales 0..7 in out[0..1], mins 0..7 in out[2..3] */
static inline void unpack_scales_mins_k4(const uint8_t *packed, uint32_t out[4]) {
    const uint32_t low6 = 0x3f3f3f3fu, low4 = 0x0f0f0f0fu, top2 = 0x03030303u;
    uint32_t w[3];
    memcpy(w, packed, sizeof(w));
    out[0] = w[0] & low6;
    out[1] = (w[2] & low4) | (((w[0] >> 6) & top2) << 4);
    out[2] = w[1] & low6;
    out[3] = ((w[2] >> 4) & low4) | (((w[1] >> 6) & top2) << 4);
}

static void dot_q4_K_512(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q4_K *x = vx;
    const block_q8_K *y = vy;
    const __m256i m4 = _mm256_set1_epi8(0x0f);
    /* per pair j of sub-blocks: scale 2j as 16 words in the low 256 bits, scale 2j+1 in the high 256 */
    __m512i pick[4];
    for (int j = 0; j < 4; j++) {
        int lo = 0x01000100 + 2 * (2 * j) * 0x01010101, hi = 0x01000100 + 2 * (2 * j + 1) * 0x01010101;
        pick[j] = _mm512_inserti64x4(_mm512_set1_epi32(lo), _mm256_set1_epi32(hi), 1);
    }
    __m512 acc = _mm512_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint32_t sm[4];
        unpack_scales_mins_k4(x[i].scales, sm);
        const __m512i scales = _mm512_broadcast_i32x4(_mm_cvtepu8_epi16(_mm_setr_epi32((int)sm[0], (int)sm[1], 0, 0)));
        const __m128i mins = _mm_cvtepu8_epi16(_mm_setr_epi32((int)sm[2], (int)sm[3], 0, 0));
        const __m128i bsums = _mm_hadd_epi16(_mm_loadu_si128((const __m128i *)y[i].bsums),
                                             _mm_loadu_si128((const __m128i *)(y[i].bsums + 8)));
        __m512i sumi = _mm512_setzero_si512();
        for (int j = 0; j < 4; j++) {
            __m256i q4 = load256(x[i].qs + 32 * j);
            __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(q4, m4)),
                                           _mm256_and_si256(_mm256_srli_epi16(q4, 4), m4), 1);
            __m512i p16 = _mm512_maddubs_epi16(q, _mm512_loadu_si512(y[i].qs + 64 * j));
            sumi = _mm512_dpwssd_epi32(sumi, p16, _mm512_shuffle_epi8(scales, pick[j]));
        }
        acc = _mm512_fmadd_ps(_mm512_set1_ps(y[i].d * half(x[i].d)), _mm512_cvtepi32_ps(sumi), acc);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(y[i].d * half(x[i].dmin)), _mm_cvtepi32_ps(_mm_madd_epi16(mins, bsums)),
                             acc_m);
    }
    __m128 m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    *s = _mm512_reduce_add_ps(acc) - _mm_cvtss_f32(m);
}

fl_vec_dot_fn fl_dot_avx512_vnni(int type) {
    switch (type) {
    case FL_TYPE_Q4_K: return dot_q4_K_512;
    default: return fl_dot_avx512_vnni_ymm(type);
    }
}
#endif
