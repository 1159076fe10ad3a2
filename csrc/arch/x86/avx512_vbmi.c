/* avx512_vbmi.c: the decode kernels of Q8_0, MXFP4 and Q4_K for CPUs with AVX512-VNNI and VBMI, each on an
 * activation row prepared once per call in a layout made for it (struct fl_decode_kernel).
 *
 * Why this shape: the ymm dots of dot_x86.h spent most of their instructions on per-block scalar work
 * (two scale conversions and a broadcast per 32 weights) and on the sign trick of signed x signed bytes.
 * Here byte permutes gather the quants of four Q8_0 / MXFP4 blocks into the four 128-bit lanes of a zmm
 * and their scales into the matching dwords, so all per-block work is vector work; the weights are made
 * unsigned by an offset (q + 128 for Q8_0, the e2m1 table + 12 for MXFP4), whose cost, offset * sum of the
 * activation block, is precomputed with the activation and seeds the vpdpbusd accumulator. Q4_K takes its
 * 128 quant bytes in two zmm loads, unpacks its 6-bit scales in one xmm and applies them with vpdpwssd.
 * The activations are quantized here too, vectorized, bit for bit as the reference quantizers do. */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512dq,avx512bw,avx512vl,avx512vnni,avx512vbmi")
#include <float.h>
#include <immintrin.h>
#include <string.h>
#include "kernels.h"
#include "quant_generic.h"
#include "simd.h"

/* the lines from p + FL_PREFETCH_BYTES on, into L2, for a group of `bytes` weight bytes at p: prefetching
 * evenly as the dot consumes the row measured faster than a burst per row (decode_task) */
static inline void prefetch_ahead(const uint8_t *p, int bytes) {
    for (int off = 0; off < bytes; off += 64)
        _mm_prefetch((const char *)p + FL_PREFETCH_BYTES + off, _MM_HINT_T1);
}

static inline __mmask64 first_bytes(int64_t n) {
    return n >= 64 ? ~(__mmask64)0 : n <= 0 ? 0 : (((__mmask64)1 << n) - 1);
}

/* ---------------------------------------------------------------- Q8_0 activations, four blocks a group */
#define GROUP 4

/* lane b of every vector belongs to block b of the group; a missing block (past the row) is all zeros */
struct q8_group {
    int8_t lo[64];    /* elements 0..15 of each block */
    int8_t hi[64];    /* elements 16..31 */
    float d[16];      /* the block's scale, times the weight format's own factor, in all four dwords */
    int32_t base[16]; /* -offset * (sum of the block's quants) in the first dword: undoes the weight offset */
};

static size_t q8_group_bytes(int64_t k) {
    return (size_t)((k / QK8_0 + GROUP - 1) / GROUP) * sizeof(struct q8_group);
}

/* roundf (half away from zero) of every lane, exactly: the truncation plus one step where the dropped part
 * reaches a half */
static inline __m512i round_away(__m512 v) {
    __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    __m512 frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    __m512 step = _mm512_or_ps(_mm512_set1_ps(1.0f), _mm512_and_ps(v, _mm512_set1_ps(-0.0f)));
    __mmask16 up = _mm512_cmp_ps_mask(frac, _mm512_set1_ps(0.5f), _CMP_GE_OQ);
    return _mm512_cvttps_epi32(_mm512_mask_add_ps(t, up, t, step));
}

/* Quantizes x to Q8_0 (fl_quantize_row_q8_0_ref, bit for bit) straight into the group layout. A block
 * holding a NaN or infinity goes through the reference itself, whose wrapping the lanes do not copy. */
static void prep_q8_groups(int64_t k, const float *x, void *out, int offset, float factor) {
    struct q8_group *g = out;
    int64_t nb = k / QK8_0;
    memset(out, 0, q8_group_bytes(k));
    for (int64_t i = 0; i < nb; i++) {
        struct q8_group *dst = &g[i / GROUP];
        int b = (int)(i % GROUP);
        __m512 v0 = _mm512_loadu_ps(x + i * QK8_0), v1 = _mm512_loadu_ps(x + i * QK8_0 + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        __m128i q0, q1;
        fl_half dh;
        int nan = _mm512_cmp_ps_mask(v0, v0, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(v1, v1, _CMP_UNORD_Q);
        if (!nan && amax <= FLT_MAX) {
            const float d = amax / 127;
            const __m512 id = _mm512_set1_ps(d ? 1.0f / d : 0.0f);
            __m512i r0 = round_away(_mm512_mul_ps(v0, id)), r1 = round_away(_mm512_mul_ps(v1, id));
            q0 = _mm512_cvtepi32_epi8(r0);
            q1 = _mm512_cvtepi32_epi8(r1);
            dh = fl_fp32_to_fp16(d);
        } else {
            block_q8_0 ref;
            fl_quantize_row_q8_0_ref(x + i * QK8_0, &ref, QK8_0);
            q0 = _mm_loadu_si128((const __m128i *)ref.qs);
            q1 = _mm_loadu_si128((const __m128i *)(ref.qs + 16));
            dh = ref.d;
        }
        _mm_storeu_si128((__m128i *)(dst->lo + 16 * b), q0);
        _mm_storeu_si128((__m128i *)(dst->hi + 16 * b), q1);
        __m512i sum16 = _mm512_add_epi32(_mm512_cvtepi8_epi32(q0), _mm512_cvtepi8_epi32(q1));
        for (int j = 0; j < 4; j++)
            dst->d[4 * b + j] = fl_fp16_to_fp32(dh) * factor;
        dst->base[4 * b] = -offset * _mm512_reduce_add_epi32(sum16);
    }
}

static void prep_q8_0(int64_t k, const float *x, void *out) {
    prep_q8_groups(k, x, out, 128, 1.0f);
}

/* the 0.5: the doubled e2m1 table makes the block scale 2^(e-128), and the kernel builds 2^(e-127) */
static void prep_mxfp4(int64_t k, const float *x, void *out) {
    prep_q8_groups(k, x, out, 12, 0.5f);
}

#define L16(b) b, b + 1, b + 2, b + 3, b + 4, b + 5, b + 6, b + 7, b + 8, b + 9, b + 10, b + 11, b + 12, b + 13, b + 14, b + 15
#define D8(b) b, b + 1, b, b + 1, b, b + 1, b, b + 1
#define E16(b) b, 0, 0, 0, b, 0, 0, 0, b, 0, 0, 0, b, 0, 0, 0

/* Q8_0 weights, 34 bytes a block (fp16 d, 32 quants): byte offsets within a group of four */
static const uint8_t q8_lo_from_0[64] = {L16(2), L16(36), L16(70), L16(104)};  /* of bytes 0..127 */
static const uint8_t q8_hi_from_18[64] = {L16(0), L16(34), L16(68), L16(102)}; /* of bytes 18..145 */
static const uint8_t q8_d_from_0[64] = {D8(0), D8(34), D8(68), D8(102)};       /* words 4b..4b+3 = d_b */

static void dot_q8_0_groups(int64_t n, float *s, const void *vx, const void *vy) {
    const uint8_t *x = vx;
    const struct q8_group *y = vy;
    const int64_t nb = n / QK8_0, bytes = nb * (int64_t)sizeof(block_q8_0);
    const __m512i idx_lo = _mm512_loadu_si512(q8_lo_from_0), idx_hi = _mm512_loadu_si512(q8_hi_from_18);
    const __m512i idx_d = _mm512_loadu_si512(q8_d_from_0), bias = _mm512_set1_epi8((char)0x80);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    for (int64_t g = 0, off = 0; off < bytes; g++, off += GROUP * (int64_t)sizeof(block_q8_0)) {
        const uint8_t *p = x + off;
        prefetch_ahead(p, GROUP * (int)sizeof(block_q8_0));
        int64_t left = bytes - off;
        __m512i a, b, c, e;
        if (left >= GROUP * (int64_t)sizeof(block_q8_0)) {
            a = _mm512_loadu_si512(p);
            b = _mm512_loadu_si512(p + 64);
            c = _mm512_loadu_si512(p + 18);
            e = _mm512_maskz_loadu_epi8(first_bytes(136 - 82), p + 82);
        } else {
            a = _mm512_maskz_loadu_epi8(first_bytes(left), p);
            b = _mm512_maskz_loadu_epi8(first_bytes(left - 64), p + 64);
            c = _mm512_maskz_loadu_epi8(first_bytes(left - 18), p + 18);
            e = _mm512_maskz_loadu_epi8(first_bytes(left - 82), p + 82);
        }
        __m512i lo = _mm512_xor_si512(_mm512_permutex2var_epi8(a, idx_lo, b), bias);
        __m512i hi = _mm512_xor_si512(_mm512_permutex2var_epi8(c, idx_hi, e), bias);
        __m512i sum = _mm512_dpbusd_epi32(_mm512_loadu_si512(y[g].base), lo, _mm512_loadu_si512(y[g].lo));
        sum = _mm512_dpbusd_epi32(sum, hi, _mm512_loadu_si512(y[g].hi));
        __m512 d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi8(a, idx_d, b)));
        __m512 scaled = _mm512_mul_ps(d, _mm512_loadu_ps(y[g].d));
        if (g & 1)
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scaled, acc1);
        else
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scaled, acc0);
    }
    *s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* MXFP4 weights, 17 bytes a block (e8m0 exponent, 16 bytes of nibbles) */
static const uint8_t mx_q_from_0[64] = {L16(1), L16(18), L16(35)};
static const uint8_t mx_e_from_0[64] = {E16(0), E16(17), E16(34), E16(51)};

static void dot_mxfp4_groups(int64_t n, float *s, const void *vx, const void *vy) {
    const uint8_t *x = vx;
    const struct q8_group *y = vy;
    const int64_t nb = n / QK_MXFP4, bytes = nb * (int64_t)sizeof(block_mxfp4);
    /* vpermb reads 6 bits of each index: with the table repeated four times, the high nibble's bits 4-5
     * (or whatever the 16-bit shift moved there) need no masking */
    int8_t shifted[16];
    for (int j = 0; j < 16; j++)
        shifted[j] = (int8_t)(fl_kvalues_mxfp4[j] + 12);
    const __m512i values = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)shifted));
    const __m512i idx_q = _mm512_loadu_si512(mx_q_from_0), idx_e = _mm512_loadu_si512(mx_e_from_0);
    const __mmask64 exp_bytes = 0x1111111111111111ull;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = acc0;
    for (int64_t g = 0, off = 0; off < bytes; g++, off += GROUP * (int64_t)sizeof(block_mxfp4)) {
        const uint8_t *p = x + off;
        prefetch_ahead(p, GROUP * (int)sizeof(block_mxfp4));
        int64_t left = bytes - off;
        /* blocks 0-2 lie within the first 64 bytes, gathered by vpermb; block 3's quants end at byte 67 and
         * are inserted from their own load (vpermt2b, or a masked load into lane 3, measured slower) */
        __m512i a;
        __m128i last;
        if (left >= GROUP * (int64_t)sizeof(block_mxfp4)) {
            a = _mm512_loadu_si512(p);
            last = _mm_loadu_si128((const __m128i *)(p + 3 * sizeof(block_mxfp4) + 1));
        } else {
            a = _mm512_maskz_loadu_epi8(first_bytes(left), p);
            last = _mm_setzero_si128();
        }
        __m512i q = _mm512_inserti32x4(_mm512_permutexvar_epi8(idx_q, a), last, 3);
        __m512i lo = _mm512_permutexvar_epi8(q, values);
        __m512i hi = _mm512_permutexvar_epi8(_mm512_srli_epi16(q, 4), values);
        __m512i sum = _mm512_dpbusd_epi32(_mm512_loadu_si512(y[g].base), lo, _mm512_loadu_si512(y[g].lo));
        sum = _mm512_dpbusd_epi32(sum, hi, _mm512_loadu_si512(y[g].hi));
        /* e << 23 is the float 2^(e-127) (0 for e = 0, against a subnormal 2^-128 in the reference) */
        __m512 d = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_maskz_permutexvar_epi8(exp_bytes, idx_e, a), 23));
        __m512 scaled = _mm512_mul_ps(d, _mm512_loadu_ps(y[g].d));
        if (g & 1)
            acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scaled, acc1);
        else
            acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scaled, acc0);
    }
    *s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* ---------------------------------------------------------------- Q4_K on Q8_K activations */

/* One superblock of activations, regrouped to meet Q4_K's quant bytes: q[c] holds what the low (c even) or
 * high (c odd) nibbles of quant bytes 64*(c/2) .. +63 multiply, i.e. sub-blocks (c/2)*4 + c%2 and +2 */
struct q8k_sb {
    int8_t q[4][64];
    int16_t sums[16]; /* 0 in words 0..7, then the sum of each 32-sub-block: meets the mins */
    float d;
    uint8_t pad[28];
};

static size_t q8k_sb_bytes(int64_t k) {
    return (size_t)(k / QK_K) * sizeof(struct q8k_sb);
}

/* Quantizes one superblock to Q8_K (fl_quantize_row_q8_K_ref, bit for bit: the same single product per value,
 * rounded to nearest even as its magic-number rounding does) straight into the regrouped layout. Returns 0,
 * leaving the rest to the reference, for a block with a NaN or an infinity. */
static int prep_q8k_sb(const float *x, struct q8k_sb *sb) {
    __m512 v[16], amax = _mm512_setzero_ps();
    __mmask16 nan = 0;
    for (int j = 0; j < 16; j++) {
        v[j] = _mm512_loadu_ps(x + 16 * j);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[j]));
        nan |= _mm512_cmp_ps_mask(v[j], v[j], _CMP_UNORD_Q);
    }
    float m = _mm512_reduce_max_ps(amax);
    if (nan || !(m <= FLT_MAX))
        return 0;
    memset(sb, 0, sizeof(*sb));
    if (m == 0.0f)
        return 1;
    float max = 0.0f; /* the first value of the largest magnitude, with its sign */
    for (int j = 0; j < 16; j++) {
        __mmask16 at = _mm512_cmp_ps_mask(_mm512_abs_ps(v[j]), _mm512_set1_ps(m), _CMP_EQ_OQ);
        if (at) {
            max = x[16 * j + __builtin_ctz(at)];
            break;
        }
    }
    const float iscale = -127.f / max;
    const __m512 vs = _mm512_set1_ps(iscale);
    for (int s = 0; s < 8; s++) {
        int8_t *dst = sb->q[(s / 4) * 2 + s % 2] + 32 * ((s % 4) / 2);
        __m512i q0 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v[2 * s], vs)), _mm512_set1_epi32(127));
        __m512i q1 = _mm512_min_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v[2 * s + 1], vs)), _mm512_set1_epi32(127));
        _mm_storeu_si128((__m128i *)dst, _mm512_cvtepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(dst + 16), _mm512_cvtepi32_epi8(q1));
        sb->sums[8 + s] = (int16_t)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
    sb->d = 1 / iscale;
    return 1;
}

static void prep_q4_K(int64_t k, const float *x, void *out) {
    struct q8k_sb *sb = out;
    for (int64_t i = 0; i < k / QK_K; i++) {
        if (prep_q8k_sb(x + i * QK_K, &sb[i]))
            continue;
        block_q8_K y[1];
        fl_quantize_row_q8_K_ref(x + i * QK_K, y, QK_K);
        memset(&sb[i], 0, sizeof(sb[i]));
        for (int c = 0; c < 4; c++) {
            int first = (c / 2) * 4 + c % 2; /* sub-blocks first and first + 2 */
            memcpy(sb[i].q[c], y->qs + 32 * first, 32);
            memcpy(sb[i].q[c] + 32, y->qs + 32 * (first + 2), 32);
        }
        for (int j = 0; j < 8; j++)
            sb[i].sums[8 + j] = (int16_t)(y->bsums[2 * j] + y->bsums[2 * j + 1]);
        sb[i].d = y->d;
    }
}

/* the 12 bytes of 6-bit scales and mins -> bytes sc0..sc7, m0..m7 (fl_get_scale_min_k4, 4 at a time) */
static inline __m128i unpack_scales_mins(const uint8_t *packed) {
    __m128i t = _mm_loadu_si128((const __m128i *)packed); /* dwords w0 w1 w2 (+ 4 quant bytes, unused) */
    __m128i u = _mm_srlv_epi32(_mm_shuffle_epi32(t, _MM_SHUFFLE(2, 1, 2, 0)), _mm_setr_epi32(0, 0, 0, 4));
    __m128i low = _mm_and_si128(u, _mm_setr_epi32(0x3f3f3f3f, 0x0f0f0f0f, 0x3f3f3f3f, 0x0f0f0f0f));
    __m128i top = _mm_slli_epi32(_mm_and_si128(_mm_srli_epi32(t, 6), _mm_set1_epi32(0x03030303)), 4);
    return _mm_or_si128(low, _mm_maskz_shuffle_epi32(0xA, top, _MM_SHUFFLE(1, 1, 0, 0)));
}

static void dot_q4_K_sb(int64_t n, float *s, const void *vx, const void *vy) {
    const block_q4_K *x = vx;
    const struct q8k_sb *y = vy;
    const __m512i m4 = _mm512_set1_epi8(0x0f);
    /* per quant vector c: the scale of its first sub-block in words 0..15, of the second in 16..31 */
    __m512i pick[4];
    for (int c = 0; c < 4; c++) {
        int first = (c / 2) * 4 + c % 2;
        pick[c] = _mm512_inserti64x4(_mm512_set1_epi16((short)first), _mm256_set1_epi16((short)(first + 2)), 1);
    }
    __m512 acc = _mm512_setzero_ps();
    __m256 acc_m = _mm256_setzero_ps();
    for (int64_t i = 0; i < n / QK_K; i++) {
        __m256i sm = _mm256_cvtepu8_epi16(unpack_scales_mins(x[i].scales)); /* words sc0..7, m0..7 */
        __m512i scales = _mm512_castsi256_si512(sm);
        prefetch_ahead((const uint8_t *)&x[i], (int)sizeof(block_q4_K));
        __m512i z0 = _mm512_loadu_si512(x[i].qs), z1 = _mm512_loadu_si512(x[i].qs + 64);
        __m512i q[4] = {_mm512_and_si512(z0, m4), _mm512_and_si512(_mm512_srli_epi16(z0, 4), m4),
                        _mm512_and_si512(z1, m4), _mm512_and_si512(_mm512_srli_epi16(z1, 4), m4)};
        __m512i sumi = _mm512_setzero_si512();
        for (int c = 0; c < 4; c++) {
            __m512i p16 = _mm512_maddubs_epi16(q[c], _mm512_loadu_si512(y[i].q[c]));
            sumi = _mm512_dpwssd_epi32(sumi, p16, _mm512_permutexvar_epi16(pick[c], scales));
        }
        uint32_t dd;
        memcpy(&dd, &x[i], sizeof(dd));
        __m128 dm = _mm_mul_ps(_mm_cvtph_ps(_mm_cvtsi32_si128((int)dd)), _mm_set1_ps(y[i].d)); /* d, dmin */
        acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm), _mm512_cvtepi32_ps(sumi), acc);
        __m256i mins = _mm256_madd_epi16(sm, _mm256_loadu_si256((const __m256i *)y[i].sums));
        acc_m = _mm256_fmadd_ps(_mm256_broadcastss_ps(_mm_movehdup_ps(dm)), _mm256_cvtepi32_ps(mins), acc_m);
    }
    __m128 m = _mm_add_ps(_mm256_castps256_ps128(acc_m), _mm256_extractf128_ps(acc_m, 1));
    m = _mm_add_ps(m, _mm_movehl_ps(m, m));
    m = _mm_add_ss(m, _mm_movehdup_ps(m));
    *s = _mm512_reduce_add_ps(acc) - _mm_cvtss_f32(m);
}

static const struct fl_decode_kernel q8_0_kernel = {q8_group_bytes, prep_q8_0, dot_q8_0_groups};
static const struct fl_decode_kernel mxfp4_kernel = {q8_group_bytes, prep_mxfp4, dot_mxfp4_groups};
static const struct fl_decode_kernel q4_K_kernel = {q8k_sb_bytes, prep_q4_K, dot_q4_K_sb};

const struct fl_decode_kernel *fl_decode_avx512_vbmi(int type) {
    switch (type) {
    case FL_TYPE_Q8_0: return &q8_0_kernel;
    case FL_TYPE_MXFP4: return &mxfp4_kernel;
    case FL_TYPE_Q4_K: return &q4_K_kernel;
    default: return NULL;
    }
}
#endif
