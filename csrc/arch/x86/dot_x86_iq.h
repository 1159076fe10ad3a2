/* dot_x86_iq.h: the 256-bit vec_dots of the lattice i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S,
 * IQ1_M) on Q8_K activations, and of IQ4_NL and TQ2_0 at the end, included by dot_x86.h for each level that compiles it: what CPUs without the
 * VBMI kernels of avx512_vbmi_iq.c run. Without byte permutes across a whole register the grids stay in memory:
 * each 256-bit vector of weights is four grid points of 8 bytes, as in ggml's x86 dots, but put together by
 * broadcast loads and blends rather than by vpinsrq / vinserti128, whose shuffle port bounded the loop at 8
 * cycles per 32 weights (vpgatherqq: 13), or eight of 4 bytes (IQ3), which vpgatherdd reads faster than eight
 * scalar loads (65 against 79 and 120 cycles per superblock). Signs stored as 7 bits (the eighth
 * by parity) come from a table of 128 sign vectors, stored bytes through a compare; vpsignb applies them to the
 * activations, vpmaddubsw multiplies by the unsigned magnitudes and vpmaddwd by the sub-block scale, read from
 * a table too. Each computes what its fl_vec_dot_<t>_q8_K_generic computes, up to float rounding. */

/* byte j of iq2_sign_bytes[i]: -1 where fl_iq2_signs(i) has bit j set, else +1 (vpsignb's operand) */
#define IQ_PARITY(i) (((i) ^ (i) >> 1 ^ (i) >> 2 ^ (i) >> 3 ^ (i) >> 4 ^ (i) >> 5 ^ (i) >> 6) & 1)
#define IQ_SB(v, j) ((v) & 1 ? 0xffull << (8 * (j)) : 0x01ull << (8 * (j)))
#define IQ_SIGNS(i)                                                                                              \
    (IQ_SB((i), 0) | IQ_SB((i) >> 1, 1) | IQ_SB((i) >> 2, 2) | IQ_SB((i) >> 3, 3) | IQ_SB((i) >> 4, 4) |        \
     IQ_SB((i) >> 5, 5) | IQ_SB((i) >> 6, 6) | IQ_SB(IQ_PARITY(i), 7))
#define IQ_S4(i) IQ_SIGNS(i), IQ_SIGNS((i) + 1), IQ_SIGNS((i) + 2), IQ_SIGNS((i) + 3)
#define IQ_S16(i) IQ_S4(i), IQ_S4((i) + 4), IQ_S4((i) + 8), IQ_S4((i) + 12)
static const uint64_t iq2_sign_bytes[128] = {IQ_S16(0),  IQ_S16(16), IQ_S16(32), IQ_S16(48),
                                             IQ_S16(64), IQ_S16(80), IQ_S16(96), IQ_S16(112)};

/* the four 64-bit entries t[i0..i3] as one vector: broadcast loads and blends, no shuffle-port uop */
static inline __m256i table4(const uint64_t *t, int i0, int i1, int i2, int i3) {
    __m256i lo = _mm256_blend_epi32(_mm256_set1_epi64x((long long)t[i0]), _mm256_set1_epi64x((long long)t[i1]), 0x0c);
    __m256i hi = _mm256_blend_epi32(_mm256_set1_epi64x((long long)t[i2]), _mm256_set1_epi64x((long long)t[i3]), 0xc0);
    return _mm256_blend_epi32(lo, hi, 0xf0);
}

/* the sign vector of four groups of 8 whose 7-bit sign fields are bits 0..27 of w */
static inline __m256i iq2_signs4(uint32_t w) {
    return table4(iq2_sign_bytes, w & 127, (w >> 7) & 127, (w >> 14) & 127, (w >> 21) & 127);
}

/* the sign vector of 32 weights whose 8 sign bits each are the 4 bytes at p, for vpsignb */
static inline __m256i stored_signs4(const uint8_t *p) {
    uint32_t w;
    memcpy(&w, p, sizeof(w));
    const __m256i spread = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3,
                                            3, 3, 3, 3, 3, 3, 3);
    const __m256i bits = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i neg = _mm256_cmpeq_epi8(_mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32((int)w), spread), bits), bits);
    return _mm256_or_si256(neg, _mm256_set1_epi8(1));
}

/* 2 s + 1 for a 4-bit scale s in 8 words: odd_scale() in all 16 words, odd_scale_pair() one per 128-bit half for
 * a byte of two scales (low nibble first) */
#define IQ_LS(s) {2 * (s) + 1, 2 * (s) + 1, 2 * (s) + 1, 2 * (s) + 1, 2 * (s) + 1, 2 * (s) + 1, 2 * (s) + 1, 2 * (s) + 1}
static const int16_t iq_odd_scales[16][8] __attribute__((aligned(16))) = {
    IQ_LS(0), IQ_LS(1), IQ_LS(2),  IQ_LS(3),  IQ_LS(4),  IQ_LS(5),  IQ_LS(6),  IQ_LS(7),
    IQ_LS(8), IQ_LS(9), IQ_LS(10), IQ_LS(11), IQ_LS(12), IQ_LS(13), IQ_LS(14), IQ_LS(15)};

static inline __m256i odd_scale(int s) {
    return _mm256_broadcastsi128_si256(_mm_load_si128((const __m128i *)iq_odd_scales[s]));
}

static inline __m256i odd_scale_pair(int byte) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_load_si128((const __m128i *)iq_odd_scales[byte & 15])),
                                   _mm_load_si128((const __m128i *)iq_odd_scales[byte >> 4]), 1);
}

/* magnitudes (unsigned) times activations with signs, summed in pairs, times a 16-bit scale per 128-bit half */
static inline __m256i signed_dot(__m256i mag, __m256i q8, __m256i signs, __m256i scales16) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(mag, _mm256_sign_epi8(q8, signs)), scales16);
}

static void dot_iq2_xxs(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq2_xxs *x = vx;
    const block_q8_K *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q = (const uint8_t *)x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < QK_K / 32; ib++, q += 8) {
            uint32_t w; /* 4 x 7 sign bits, the scale on top */
            memcpy(&w, q + 4, sizeof(w));
            __m256i mag = table4(fl_iq2xxs_grid, q[0], q[1], q[2], q[3]);
            sumi = _mm256_add_epi32(sumi, signed_dot(mag, load256(y[i].qs + 32 * ib), iq2_signs4(w),
                                                     odd_scale((int)(w >> 28))));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = 0.125f * hsum_ps(acc);
}

/* each qs word: a 9-bit grid index and 7 sign bits; a 4-bit scale per 16 weights */
static void dot_iq2_xs(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq2_xs *x = vx;
    const block_q8_K *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint16_t *q = x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < QK_K / 32; ib++, q += 4) {
            __m256i mag = table4(fl_iq2xs_grid, q[0] & 511, q[1] & 511, q[2] & 511, q[3] & 511);
            __m256i signs = _mm256_setr_epi64x((long long)iq2_sign_bytes[q[0] >> 9], (long long)iq2_sign_bytes[q[1] >> 9],
                                               (long long)iq2_sign_bytes[q[2] >> 9], (long long)iq2_sign_bytes[q[3] >> 9]);
            sumi = _mm256_add_epi32(sumi, signed_dot(mag, load256(y[i].qs + 32 * ib), signs,
                                                     odd_scale_pair(x[i].scales[ib])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = 0.125f * hsum_ps(acc);
}

/* 10-bit indices (the top two in qh), 8 stored sign bits per 8 weights */
static void dot_iq2_s(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq2_s *x = vx;
    const block_q8_K *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q = x[i].qs, *signs = x[i].qs + QK_K / 8;
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < QK_K / 32; ib++, q += 4) {
            const int h = x[i].qh[ib];
            __m256i mag = table4(fl_iq2s_grid, q[0] | ((h << 8) & 0x300), q[1] | ((h << 6) & 0x300),
                                q[2] | ((h << 4) & 0x300), q[3] | ((h << 2) & 0x300));
            sumi = _mm256_add_epi32(sumi, signed_dot(mag, load256(y[i].qs + 32 * ib), stored_signs4(signs + 4 * ib),
                                                     odd_scale_pair(x[i].scales[ib])));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = 0.125f * hsum_ps(acc);
}

static void dot_iq3_xxs(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq3_xxs *x = vx;
    const block_q8_K *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q = x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < QK_K / 32; ib++, q += 8) {
            uint32_t w;
            memcpy(&w, x[i].qs + QK_K / 4 + 4 * ib, sizeof(w));
            __m256i idx = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
            sumi = _mm256_add_epi32(sumi, signed_dot(_mm256_i32gather_epi32((const int *)fl_iq3xxs_grid, idx, 4),
                                                     load256(y[i].qs + 32 * ib),
                                                     iq2_signs4(w), odd_scale((int)(w >> 28))));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = 0.25f * hsum_ps(acc);
}

static void dot_iq3_s(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq3_s *x = vx;
    const block_q8_K *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q = x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        for (int ib = 0; ib < QK_K / 32; ib++, q += 8) {
            /* the ninth bit of index j of the sub-block: bit j of qh[ib] */
            __m256i ninth = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(x[i].qh[ib] << 8),
                                                               _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
                                             _mm256_set1_epi32(0x100));
            __m256i idx = _mm256_or_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q)), ninth);
            sumi = _mm256_add_epi32(sumi, signed_dot(_mm256_i32gather_epi32((const int *)fl_iq3s_grid, idx, 4),
                                                     load256(y[i].qs + 32 * ib),
                                                     stored_signs4(x[i].signs + 4 * ib),
                                                     odd_scale((x[i].scales[ib / 2] >> (4 * (ib % 2))) & 15)));
        }
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * y[i].d), _mm256_cvtepi32_ps(sumi), acc);
    }
    *s = hsum_ps(acc);
}

/* IQ1_S and IQ1_M: grid values -1, 0, 1 times the activations, |g| * (q8 with g's sign), pairs summed */
static inline __m256i ternary_dot(__m256i g, __m256i q8) {
    return _mm256_maddubs_epi16(_mm256_sign_epi8(g, g), _mm256_sign_epi8(q8, g));
}

/* the shifts go through the activations' block sums (fl_vec_dot_iq1_s_q8_K_generic) */
static void dot_iq1_s(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq1_s *x = vx;
    const block_q8_K *y = vy;
    __m256 acc = _mm256_setzero_ps();
    float shifts = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        const uint8_t *q = x[i].qs;
        __m256i sumi = _mm256_setzero_si256();
        int sumi1 = 0;
        for (int ib = 0; ib < QK_K / 32; ib++, q += 4) {
            const int h = x[i].qh[ib], ls = 2 * ((h >> 12) & 7) + 1; /* the scale 2 s + 1, the shift's sign on top */
            __m256i g = table4(fl_iq1s_grid, q[0] | ((h << 8) & 0x700), q[1] | ((h << 5) & 0x700),
                              q[2] | ((h << 2) & 0x700), q[3] | ((h >> 1) & 0x700));
            sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(ternary_dot(g, load256(y[i].qs + 32 * ib)),
                                                            odd_scale((h >> 12) & 7)));
            sumi1 += ls * (h & 0x8000 ? -1 : 1) * (y[i].bsums[2 * ib] + y[i].bsums[2 * ib + 1]);
        }
        const float d = half(x[i].d) * y[i].d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        shifts += d * IQ1S_DELTA * (float)sumi1;
    }
    *s = hsum_ps(acc) + shifts;
}

/* qword j of iq1m_shift_signs[m]: the vpsignb operand of the shift of 8 weights, -1 where bit j of m is set */
#define IQ_SH(m, j) ((m) >> (j) & 1 ? -1LL : 0x0101010101010101LL)
#define IQ_SH4(m) {IQ_SH(m, 0), IQ_SH(m, 1), IQ_SH(m, 2), IQ_SH(m, 3)}
static const long long iq1m_shift_signs[16][4] __attribute__((aligned(32))) = {
    IQ_SH4(0), IQ_SH4(1), IQ_SH4(2),  IQ_SH4(3),  IQ_SH4(4),  IQ_SH4(5),  IQ_SH4(6),  IQ_SH4(7),
    IQ_SH4(8), IQ_SH4(9), IQ_SH4(10), IQ_SH4(11), IQ_SH4(12), IQ_SH4(13), IQ_SH4(14), IQ_SH4(15)};

/* 3-bit scales per 16 weights, a shift sign per 8: the shifts times the sums of 8 activations, by vpsignb */
static void dot_iq1_m(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq1_m *x = vx;
    const block_q8_K *y = vy;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        uint16_t sc[4];
        memcpy(sc, x[i].scales, sizeof(sc));
        const fl_half dh = (fl_half)((sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000));
        __m256i sum1 = _mm256_setzero_si256(), sum2 = sum1;
        for (int ib = 0; ib < QK_K / 32; ib++) {
            const uint8_t *q = x[i].qs + 4 * ib, *qh = x[i].qh + 2 * ib;
            /* the 3-bit scales of the two 16s: bits 6 (ib % 2) .. + 5 of scale word ib / 2 */
            const int s6 = sc[ib / 2] >> (ib % 2 ? 6 : 0);
            const __m256i ls = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_load_si128((const __m128i *)iq_odd_scales[s6 & 7])),
                _mm_load_si128((const __m128i *)iq_odd_scales[(s6 >> 3) & 7]), 1);
            __m256i g = table4(fl_iq1s_grid, q[0] | ((qh[0] << 8) & 0x700), q[1] | ((qh[0] << 4) & 0x700),
                               q[2] | ((qh[1] << 8) & 0x700), q[3] | ((qh[1] << 4) & 0x700));
            __m256i shift = _mm256_load_si256((const __m256i *)iq1m_shift_signs[((qh[0] >> 3) & 1) | ((qh[0] >> 6) & 2) |
                                                                            ((qh[1] >> 1) & 4) | ((qh[1] >> 4) & 8)]);
            __m256i q8 = load256(y[i].qs + 32 * ib);
            sum1 = _mm256_add_epi32(sum1, _mm256_madd_epi16(ternary_dot(g, q8), ls));
            sum2 = _mm256_add_epi32(sum2, _mm256_madd_epi16(ternary_dot(shift, q8), ls));
        }
        __m256 d = _mm256_set1_ps(half(dh) * y[i].d);
        acc = _mm256_fmadd_ps(d, _mm256_fmadd_ps(_mm256_set1_ps(IQ1M_DELTA), _mm256_cvtepi32_ps(sum2),
                                                 _mm256_cvtepi32_ps(sum1)),
                              acc);
    }
    *s = hsum_ps(acc);
}

/* IQ4_NL: MXFP4's dot with the iq4nl table and an fp16 scale */
static void dot_iq4_nl(int64_t n, float *s, const void *vx, const void *vy) {
    const block_iq4_nl *x = vx;
    const block_q8_0 *y = vy;
    const __m256i values = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)fl_kvalues_iq4nl));
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK4_NL; i++) {
        __m256i p = dot_i8i8(_mm256_shuffle_epi8(values, nibbles_lo_hi(x[i].qs)), load256(y[i].qs));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(half(x[i].d) * half(y[i].d)), _mm256_cvtepi32_ps(p), acc);
    }
    *s = hsum_ps(acc);
}

/* TQ2_0: the 2-bit trits t as unsigned bytes, sum (t - 1) q = sum t q - sum q, the last from the block sums */
static void dot_tq2_0(int64_t n, float *s, const void *vx, const void *vy) {
    const block_tq2_0 *x = vx;
    const block_q8_K *y = vy;
    const __m256i m2 = _mm256_set1_epi8(3);
    __m256 acc = _mm256_setzero_ps();
    float sums = 0.0f;
    for (int64_t i = 0; i < n / QK_K; i++) {
        __m256i sumi = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i q = load256(x[i].qs + 32 * h);
            for (int j = 0; j < 4; j++)
                sumi = _mm256_add_epi32(sumi, dot_u8i8(_mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m2),
                                                       load256(y[i].qs + 128 * h + 32 * j)));
        }
        int bsum = 0;
        for (int j = 0; j < QK_K / 16; j++)
            bsum += y[i].bsums[j];
        const float d = half(x[i].d) * y[i].d;
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi), acc);
        sums += d * (float)bsum;
    }
    *s = hsum_ps(acc) - sums;
}

static fl_vec_dot_fn dot_x86_iq(int type) {
    switch (type) {
    case FL_TYPE_IQ2_XXS: return dot_iq2_xxs;
    case FL_TYPE_IQ2_XS: return dot_iq2_xs;
    case FL_TYPE_IQ2_S: return dot_iq2_s;
    case FL_TYPE_IQ3_XXS: return dot_iq3_xxs;
    case FL_TYPE_IQ3_S: return dot_iq3_s;
    case FL_TYPE_IQ1_S: return dot_iq1_s;
    case FL_TYPE_IQ1_M: return dot_iq1_m;
    case FL_TYPE_IQ4_NL: return dot_iq4_nl;
    case FL_TYPE_TQ2_0: return dot_tq2_0;
    default: return NULL;
    }
}
